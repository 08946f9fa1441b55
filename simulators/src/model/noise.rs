//! Seeded noise: one independent `SmallRng` stream per instrument and Box-Muller Gaussian samples.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Random stream number `stream` derived from the model seed (instruments never share a stream).
pub(crate) fn stream(seed: u64, stream: u64) -> SmallRng {
    let mixed = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    SmallRng::seed_from_u64(mixed)
}

/// One standard normal sample (Box-Muller transform).
pub(crate) fn standard_normal(rng: &mut SmallRng) -> f64 {
    // 1 - u lies in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Gaussian sample with mean 0 and standard deviation `sd` (0 when `sd` is not positive).
pub(crate) fn gaussian(rng: &mut SmallRng, sd: f64) -> f64 {
    if sd.is_finite() && sd > 0.0 {
        sd * standard_normal(rng)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_muller_has_unit_variance_and_zero_mean() {
        let mut rng = stream(42, 0);
        let n = 20_000;
        let samples: Vec<f64> = (0..n).map(|_| standard_normal(&mut rng)).collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        assert!(samples.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a: Vec<f64> = {
            let mut r = stream(1, 3);
            (0..5).map(|_| standard_normal(&mut r)).collect()
        };
        let b: Vec<f64> = {
            let mut r = stream(1, 3);
            (0..5).map(|_| standard_normal(&mut r)).collect()
        };
        let c: Vec<f64> = {
            let mut r = stream(1, 4);
            (0..5).map(|_| standard_normal(&mut r)).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(gaussian(&mut stream(1, 3), 0.0), 0.0);
    }
}
