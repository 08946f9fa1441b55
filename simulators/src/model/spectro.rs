//! UV-Vis spectrometer with a dip probe on the gantry head (SCPI front end).
//!
//! Beer-Lambert: A(λ) = Σ ε_i(λ)·c_i·l, each dye a Gaussian band, c_i = stock concentration × dye volume /
//! total volume. Seeded Gaussian noise; true absorbance above saturation reads as the saturation level with
//! larger noise; an unmixed vial reads with a random per-dye bias and extra noise.

use std::time::Duration;

use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::deck::{Contents, Dye, Vial};
use super::faults::FaultConfig;
use super::noise::gaussian;
use super::{ConfigError, check_non_negative, check_positive};

/// Absorption band and stock concentration of one dye.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DyeSpec {
    /// Band centre (nm).
    pub peak_nm: f64,
    /// Band standard deviation (nm).
    pub width_nm: f64,
    /// Molar absorptivity at the peak (per mM per cm).
    pub epsilon_per_mm_cm: f64,
    /// Stock concentration (mM).
    pub stock_mm: f64,
}

impl DyeSpec {
    /// Absorptivity at a wavelength (per mM per cm).
    pub fn epsilon_at(&self, nm: f64) -> f64 {
        let z = (nm - self.peak_nm) / self.width_nm;
        self.epsilon_per_mm_cm * (-0.5 * z * z).exp()
    }

    /// The simulated lab's dyes, indexed by [`Dye::index`]: each stock reads about 2.5-2.7 AU at its peak.
    pub fn sim_defaults() -> [DyeSpec; 3] {
        let spec = |dye: Dye| match dye {
            Dye::Red => DyeSpec {
                peak_nm: 520.0,
                width_nm: 45.0,
                epsilon_per_mm_cm: 25.0,
                stock_mm: 0.1,
            },
            Dye::Yellow => DyeSpec {
                peak_nm: 430.0,
                width_nm: 40.0,
                epsilon_per_mm_cm: 27.0,
                stock_mm: 0.1,
            },
            Dye::Blue => DyeSpec {
                peak_nm: 620.0,
                width_nm: 50.0,
                epsilon_per_mm_cm: 130.0,
                stock_mm: 0.02,
            },
        };
        Dye::ALL.map(spec)
    }

    /// Checks the band and concentration are usable.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        check_positive(&format!("{field}.peak_nm"), self.peak_nm)?;
        check_positive(&format!("{field}.width_nm"), self.width_nm)?;
        check_non_negative(
            &format!("{field}.epsilon_per_mm_cm"),
            self.epsilon_per_mm_cm,
        )?;
        check_non_negative(&format!("{field}.stock_mm"), self.stock_mm)
    }
}

/// Spectrometer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpectroConfig {
    /// Shortest wavelength (nm).
    pub min_nm: f64,
    /// Longest wavelength (nm).
    pub max_nm: f64,
    /// Most points in one spectrum.
    pub max_points: usize,
    /// Optical path length (cm).
    pub path_cm: f64,
    /// Noise standard deviation (AU).
    pub noise_au: f64,
    /// Absorbance at which the detector saturates (AU).
    pub saturation_au: f64,
    /// Noise standard deviation of saturated readings (AU).
    pub saturated_noise_au: f64,
    /// Relative per-dye bias standard deviation of a fully unmixed vial.
    pub unmixed_bias_sd: f64,
    /// Noise multiplier gain for an unmixed vial (noise × (1 + gain × (1 - homogeneity))).
    pub unmixed_noise_gain: f64,
    /// Least liquid the dip probe needs (uL).
    pub min_sample_ul: f64,
    /// Fault injection for the SCPI front end (drift in AU per hour).
    pub faults: FaultConfig,
}

impl Default for SpectroConfig {
    fn default() -> Self {
        Self {
            min_nm: 380.0,
            max_nm: 780.0,
            max_points: 4001,
            path_cm: 1.0,
            noise_au: 0.002,
            saturation_au: 3.0,
            saturated_noise_au: 0.05,
            unmixed_bias_sd: 0.5,
            unmixed_noise_gain: 20.0,
            min_sample_ul: 100.0,
            faults: FaultConfig::default(),
        }
    }
}

impl SpectroConfig {
    /// Checks all values are usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_positive("spectro.min_nm", self.min_nm)?;
        check_positive("spectro.max_nm", self.max_nm)?;
        if self.min_nm > self.max_nm {
            return Err(ConfigError::invalid("spectro.max_nm", "below min_nm"));
        }
        if self.max_points == 0 {
            return Err(ConfigError::invalid("spectro.max_points", "must be >= 1"));
        }
        check_positive("spectro.path_cm", self.path_cm)?;
        check_non_negative("spectro.noise_au", self.noise_au)?;
        check_positive("spectro.saturation_au", self.saturation_au)?;
        check_non_negative("spectro.saturated_noise_au", self.saturated_noise_au)?;
        check_non_negative("spectro.unmixed_bias_sd", self.unmixed_bias_sd)?;
        check_non_negative("spectro.unmixed_noise_gain", self.unmixed_noise_gain)?;
        check_non_negative("spectro.min_sample_ul", self.min_sample_ul)?;
        self.faults.validate("spectro.faults")
    }
}

/// A measurement that could not be made.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpectroError {
    /// No vial under the head.
    #[error("no vial under the probe")]
    NoVial,
    /// Too little liquid to immerse the probe (uL).
    #[error("sample volume {0} uL too small for the probe")]
    InsufficientSample(f64),
    /// Wavelength range outside the instrument's or reversed (nm).
    #[error("wavelength range {0}..{1} nm not available")]
    BadRange(f64, f64),
    /// Step not positive and finite (nm).
    #[error("invalid wavelength step {0} nm")]
    BadStep(f64),
    /// More points than the instrument delivers.
    #[error("{0} points exceed the instrument maximum")]
    TooManyPoints(usize),
    /// Two spectra are on different wavelength grids.
    #[error("spectra have different wavelength grids")]
    GridMismatch,
}

/// An absorbance spectrum.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Spectrum {
    /// Wavelengths (nm), ascending.
    pub wavelengths_nm: Vec<f64>,
    /// Absorbance at each wavelength (AU).
    pub absorbance: Vec<f64>,
}

impl Spectrum {
    /// Number of points.
    pub fn len(&self) -> usize {
        self.wavelengths_nm.len()
    }

    /// True when the spectrum has no points.
    pub fn is_empty(&self) -> bool {
        self.wavelengths_nm.is_empty()
    }

    /// Wavelength of the highest absorbance (nm).
    pub fn peak_nm(&self) -> Option<f64> {
        self.wavelengths_nm
            .iter()
            .zip(&self.absorbance)
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(nm, _)| *nm)
    }

    /// Absorbance at the grid point nearest to `nm` (within half a nm).
    pub fn at(&self, nm: f64) -> Option<f64> {
        self.wavelengths_nm
            .iter()
            .position(|w| (w - nm).abs() <= 0.5)
            .map(|k| self.absorbance[k])
    }

    /// Root-mean-square absorbance difference over the wavelengths (the closed loop's spectral error).
    pub fn rms_error(&self, other: &Spectrum) -> Result<f64, SpectroError> {
        let same_grid = self.len() == other.len()
            && self.absorbance.len() == self.len()
            && other.absorbance.len() == other.len()
            && self
                .wavelengths_nm
                .iter()
                .zip(&other.wavelengths_nm)
                .all(|(a, b)| (a - b).abs() <= 1e-6);
        if !same_grid || self.is_empty() {
            return Err(SpectroError::GridMismatch);
        }
        let sum: f64 = self
            .absorbance
            .iter()
            .zip(&other.absorbance)
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        Ok((sum / self.len() as f64).sqrt())
    }
}

/// The wavelength grid start, start+step, ... up to stop, validated against the instrument range.
pub fn wavelength_grid(
    config: &SpectroConfig,
    start_nm: f64,
    stop_nm: f64,
    step_nm: f64,
) -> Result<Vec<f64>, SpectroError> {
    let in_range = start_nm.is_finite()
        && stop_nm.is_finite()
        && start_nm >= config.min_nm - 1e-9
        && stop_nm <= config.max_nm + 1e-9
        && start_nm <= stop_nm;
    if !in_range {
        return Err(SpectroError::BadRange(start_nm, stop_nm));
    }
    if !(step_nm.is_finite() && step_nm > 0.0) {
        return Err(SpectroError::BadStep(step_nm));
    }
    let intervals = ((stop_nm - start_nm) / step_nm + 1e-9).floor();
    if intervals + 1.0 > config.max_points as f64 {
        return Err(SpectroError::TooManyPoints(
            (intervals + 1.0).min(usize::MAX as f64) as usize,
        ));
    }
    let n = intervals as usize + 1;
    Ok((0..n).map(|k| start_nm + k as f64 * step_nm).collect())
}

/// Dye concentrations in a vial's contents (mM), indexed by [`Dye::index`].
pub fn concentrations_mm(dyes: &[DyeSpec; 3], contents: &Contents) -> [f64; 3] {
    let total = contents.total_ul();
    std::array::from_fn(|i| {
        if total > 0.0 {
            dyes[i].stock_mm * contents.dye_ul[i] / total
        } else {
            0.0
        }
    })
}

/// Noise-free Beer-Lambert absorbance of dye concentrations (mM) at a wavelength.
pub fn absorbance(dyes: &[DyeSpec; 3], concentrations_mm: &[f64; 3], path_cm: f64, nm: f64) -> f64 {
    dyes.iter()
        .zip(concentrations_mm)
        .map(|(d, c)| d.epsilon_at(nm) * c * path_cm)
        .sum()
}

/// Noise-free spectrum of the given contents on a wavelength grid (the closed loop's target).
pub fn target_spectrum(
    dyes: &[DyeSpec; 3],
    contents: &Contents,
    path_cm: f64,
    wavelengths_nm: &[f64],
) -> Spectrum {
    let c = concentrations_mm(dyes, contents);
    Spectrum {
        wavelengths_nm: wavelengths_nm.to_vec(),
        absorbance: wavelengths_nm
            .iter()
            .map(|&nm| absorbance(dyes, &c, path_cm, nm))
            .collect(),
    }
}

/// The spectrometer.
#[derive(Debug, Clone)]
pub struct Spectro {
    config: SpectroConfig,
    rng: SmallRng,
    drift_au: f64,
}

impl Spectro {
    /// A spectrometer with its own noise stream.
    pub fn new(config: SpectroConfig, rng: SmallRng) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            rng,
            drift_au: 0.0,
        })
    }

    /// The spectrometer settings.
    pub fn config(&self) -> &SpectroConfig {
        &self.config
    }

    /// Replaces the fault settings.
    pub(crate) fn set_faults(&mut self, faults: FaultConfig) {
        self.config.faults = faults;
    }

    /// Accumulated baseline drift (AU).
    pub fn drift_au(&self) -> f64 {
        self.drift_au
    }

    /// Accumulates drift over `dt`.
    pub fn advance(&mut self, dt: Duration) {
        self.drift_au += self.config.faults.drift_over(dt);
    }

    /// Measures the spectrum of `vial` (the one under the head) from `start_nm` to `stop_nm` every `step_nm`.
    pub fn measure(
        &mut self,
        vial: Option<&Vial>,
        dyes: &[DyeSpec; 3],
        start_nm: f64,
        stop_nm: f64,
        step_nm: f64,
    ) -> Result<Spectrum, SpectroError> {
        let grid = wavelength_grid(&self.config, start_nm, stop_nm, step_nm)?;
        let vial = vial.ok_or(SpectroError::NoVial)?;
        let volume = vial.contents.total_ul();
        if volume < self.config.min_sample_ul || volume <= 0.0 {
            return Err(SpectroError::InsufficientSample(volume));
        }
        let unmixed = (1.0 - vial.homogeneity).clamp(0.0, 1.0);
        let mut c = concentrations_mm(dyes, &vial.contents);
        for ci in &mut c {
            let bias = unmixed * gaussian(&mut self.rng, self.config.unmixed_bias_sd);
            *ci *= (1.0 + bias).max(0.0);
        }
        let noise_sd = self.config.noise_au * (1.0 + self.config.unmixed_noise_gain * unmixed);
        let sat = self.config.saturation_au;
        let absorbance = grid
            .iter()
            .map(|&nm| {
                let a = absorbance(dyes, &c, self.config.path_cm, nm);
                let read = if a > sat {
                    sat + gaussian(&mut self.rng, self.config.saturated_noise_au)
                } else {
                    a + gaussian(&mut self.rng, noise_sd)
                };
                read + self.drift_au
            })
            .collect();
        Ok(Spectrum {
            wavelengths_nm: grid,
            absorbance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::deck::Liquid;
    use super::super::{LabConfig, LabModel};
    use super::*;
    use labctl_clock::{Clock, ManualClock};

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// A lab with the head over A1 holding vial "v" filled directly with the given volumes.
    fn lab_with_vial(
        config: LabConfig,
        seed: u64,
        dye_ul: [f64; 3],
        water_ul: f64,
    ) -> (LabModel, ManualClock) {
        let clock = ManualClock::new();
        let mut lab = LabModel::new(config, seed).unwrap();
        lab.gantry_unlock(clock.now()).unwrap();
        lab.add_vial(clock.now(), "v", "A1").unwrap();
        lab.gantry_move(clock.now(), [20.0, 20.0, 0.0], None)
            .unwrap();
        let vial = &mut lab.deck.vials_mut()[0];
        for d in Dye::ALL {
            vial.add_liquid(Liquid::Dye(d), dye_ul[d.index()], 22.0);
        }
        vial.add_liquid(Liquid::Water, water_ul, 22.0);
        vial.homogeneity = 1.0;
        clock.advance(secs(5.0));
        (lab, clock)
    }

    #[test]
    fn single_dyes_peak_at_their_bands() {
        for (dye, peak) in [(Dye::Yellow, 430.0), (Dye::Red, 520.0), (Dye::Blue, 620.0)] {
            let mut dye_ul = [0.0; 3];
            dye_ul[dye.index()] = 1000.0;
            let (mut lab, clock) = lab_with_vial(LabConfig::sim_default(), 1, dye_ul, 1000.0);
            let s = lab.spectrum(clock.now(), 380.0, 780.0, 1.0).unwrap();
            assert_eq!(s.len(), 401);
            assert_eq!(s.wavelengths_nm[0], 380.0);
            assert_eq!(s.wavelengths_nm[400], 780.0);
            let found = s.peak_nm().unwrap();
            assert!((found - peak).abs() <= 3.0, "{dye:?}: peak at {found}");
            // Half the stock: about half the stock's peak absorbance; far from the band almost nothing.
            let spec = LabConfig::sim_default().dyes[dye.index()];
            let expected = spec.epsilon_per_mm_cm * spec.stock_mm / 2.0;
            assert!((s.at(peak).unwrap() - expected).abs() < 0.01);
            let far = if peak < 500.0 { 780.0 } else { 380.0 };
            assert!(s.at(far).unwrap() < 0.05 * expected);
        }
    }

    #[test]
    fn absorbance_scales_linearly_with_concentration() {
        let measure = |red_ul: f64| {
            let (mut lab, clock) = lab_with_vial(
                LabConfig::sim_default(),
                2,
                [red_ul, 0.0, 0.0],
                2000.0 - red_ul,
            );
            lab.spectrum(clock.now(), 500.0, 540.0, 2.0).unwrap()
        };
        let low = measure(400.0);
        let high = measure(800.0);
        let a_low = low.at(520.0).unwrap();
        let a_high = high.at(520.0).unwrap();
        assert!((a_low - 0.5).abs() < 0.01, "{a_low}");
        assert!((a_high / a_low - 2.0).abs() < 0.05, "{a_high} / {a_low}");
        let c = concentrations_mm(
            &DyeSpec::sim_defaults(),
            &Contents::new([800.0, 0.0, 0.0], 1200.0),
        );
        assert!((c[0] - 0.04).abs() < 1e-12);
    }

    #[test]
    fn saturates_above_three_au() {
        let mut config = LabConfig::sim_default();
        config.dyes[Dye::Blue.index()].stock_mm = 0.05; // 6.5 AU at 620 nm undiluted
        let (mut lab, clock) = lab_with_vial(config, 3, [0.0, 0.0, 2000.0], 0.0);
        let s = lab.spectrum(clock.now(), 600.0, 640.0, 1.0).unwrap();
        let readings: Vec<f64> = s.absorbance.clone();
        assert!(
            readings.iter().all(|a| (a - 3.0).abs() < 0.3),
            "{readings:?}"
        );
        let mean = readings.iter().sum::<f64>() / readings.len() as f64;
        let sd = (readings.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / readings.len() as f64)
            .sqrt();
        assert!(sd > 0.01, "saturated readings are noisier: {sd}");
        // Below saturation the noise is small.
        let (mut lab, clock) =
            lab_with_vial(LabConfig::sim_default(), 3, [0.0, 0.0, 1000.0], 1000.0);
        let s = lab.spectrum(clock.now(), 610.0, 630.0, 1.0).unwrap();
        let truth = target_spectrum(
            &DyeSpec::sim_defaults(),
            &Contents::new([0.0, 0.0, 1000.0], 1000.0),
            1.0,
            &s.wavelengths_nm,
        );
        assert!(s.rms_error(&truth).unwrap() < 0.005);
    }

    #[test]
    fn errors_without_vial_sample_or_valid_range() {
        let (mut lab, clock) = lab_with_vial(LabConfig::sim_default(), 4, [50.0, 0.0, 0.0], 0.0);
        assert_eq!(
            lab.spectrum(clock.now(), 380.0, 780.0, 5.0),
            Err(SpectroError::InsufficientSample(50.0))
        );
        assert_eq!(
            lab.spectrum(clock.now(), 300.0, 780.0, 5.0),
            Err(SpectroError::BadRange(300.0, 780.0))
        );
        assert_eq!(
            lab.spectrum(clock.now(), 500.0, 400.0, 5.0),
            Err(SpectroError::BadRange(500.0, 400.0))
        );
        assert_eq!(
            lab.spectrum(clock.now(), 400.0, 500.0, 0.0),
            Err(SpectroError::BadStep(0.0))
        );
        assert_eq!(
            lab.spectrum(clock.now(), 380.0, 780.0, 0.01),
            Err(SpectroError::TooManyPoints(40_001))
        );
        lab.gantry_move(clock.now(), [100.0, 150.0, 50.0], None)
            .unwrap();
        clock.advance(secs(5.0));
        assert_eq!(
            lab.spectrum(clock.now(), 380.0, 780.0, 5.0),
            Err(SpectroError::NoVial)
        );
    }

    #[test]
    fn unmixed_vials_read_worse() {
        let contents = Contents::new([600.0, 600.0, 600.0], 0.0);
        let grid = wavelength_grid(&SpectroConfig::default(), 380.0, 780.0, 5.0).unwrap();
        let truth = target_spectrum(&DyeSpec::sim_defaults(), &contents, 1.0, &grid);
        let error = |homogeneity: f64, seed: u64| {
            let (mut lab, clock) =
                lab_with_vial(LabConfig::sim_default(), seed, contents.dye_ul, 0.0);
            lab.deck.vials_mut()[0].homogeneity = homogeneity;
            lab.spectrum(clock.now(), 380.0, 780.0, 5.0)
                .unwrap()
                .rms_error(&truth)
                .unwrap()
        };
        let mixed: f64 = (0..10).map(|s| error(1.0, s)).sum::<f64>() / 10.0;
        let unmixed: f64 = (0..10).map(|s| error(0.33, s)).sum::<f64>() / 10.0;
        assert!(mixed < 0.005, "{mixed}");
        assert!(unmixed > 10.0 * mixed, "{unmixed} vs {mixed}");
    }

    #[test]
    fn drift_shifts_the_baseline() {
        let mut config = LabConfig::sim_default();
        config.spectro.faults.drift_per_hour = 0.1;
        let (mut lab, clock) = lab_with_vial(config, 5, [0.0, 0.0, 0.0], 1000.0);
        clock.set(Duration::from_secs(3600));
        let s = lab.spectrum(clock.now(), 700.0, 780.0, 10.0).unwrap();
        let mean = s.absorbance.iter().sum::<f64>() / s.len() as f64;
        assert!((mean - 0.1).abs() < 0.005, "{mean}");
    }

    #[test]
    fn rms_error_of_spectra() {
        let a = Spectrum {
            wavelengths_nm: vec![400.0, 500.0],
            absorbance: vec![1.0, 2.0],
        };
        let b = Spectrum {
            wavelengths_nm: vec![400.0, 500.0],
            absorbance: vec![2.0, 1.0],
        };
        assert_eq!(a.rms_error(&b), Ok(1.0));
        assert_eq!(a.rms_error(&a), Ok(0.0));
        let c = Spectrum {
            wavelengths_nm: vec![400.0, 501.0],
            absorbance: vec![1.0, 2.0],
        };
        assert_eq!(a.rms_error(&c), Err(SpectroError::GridMismatch));
    }
}
