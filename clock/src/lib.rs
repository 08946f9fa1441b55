//! labctl's clocks, shared by the controller, the simulators and the tests (it depends on nothing of labctl).
//!
//! - [`Clock`]: a source of virtual time, the `Duration` since the start of a run.
//! - [`VirtualClock`]: real elapsed time times a warp factor (warp 1 is real time).
//! - [`ManualClock`]: a mock that only moves when a test moves it; clones share the time.
//! - [`LabClock`]: either of the two, with the real wait to a virtual deadline.
//!
//! Pure models never read a clock; the tasks that drive them read one and pass the time in.

mod lab_clock;

pub use lab_clock::{LabClock, MANUAL_POLL};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Largest warp factor a [`VirtualClock`] accepts.
pub const MAX_WARP: f64 = 1.0e6;

/// A source of virtual time: the `Duration` elapsed since the start of the simulated run.
pub trait Clock: Send + Sync {
    /// Current virtual time since the start of the run.
    fn now(&self) -> Duration;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Duration {
        (**self).now()
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Duration {
        (**self).now()
    }
}

/// A clock that cannot be built.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ClockError {
    /// The warp factor is not finite or not in (0, MAX_WARP].
    #[error("warp factor must be finite and in (0, {MAX_WARP}], got {0}")]
    InvalidWarp(f64),
}

/// Real elapsed time times a warp factor (warp 60 runs a virtual minute per real second).
#[derive(Debug, Clone, Copy)]
pub struct VirtualClock {
    start: Instant,
    warp: f64,
}

impl VirtualClock {
    /// A clock starting now with the given warp factor.
    pub fn new(warp: f64) -> Result<Self, ClockError> {
        Self::starting_at(Instant::now(), warp)
    }

    /// A clock whose virtual zero is the real instant `start`.
    pub fn starting_at(start: Instant, warp: f64) -> Result<Self, ClockError> {
        if warp.is_finite() && warp > 0.0 && warp <= MAX_WARP {
            Ok(Self { start, warp })
        } else {
            Err(ClockError::InvalidWarp(warp))
        }
    }

    /// The warp factor (virtual seconds per real second).
    pub fn warp(&self) -> f64 {
        self.warp
    }

    /// Virtual time that passes during a real span.
    pub fn to_virtual(&self, real: Duration) -> Duration {
        Duration::try_from_secs_f64(real.as_secs_f64() * self.warp).unwrap_or(Duration::MAX)
    }

    /// Real time to wait for a virtual span to pass (front ends use it to sleep).
    pub fn to_real(&self, virtual_span: Duration) -> Duration {
        Duration::try_from_secs_f64(virtual_span.as_secs_f64() / self.warp).unwrap_or(Duration::MAX)
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Duration {
        self.to_virtual(self.start.elapsed())
    }
}

/// A mock clock advanced explicitly by tests; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

fn to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl ManualClock {
    /// A clock at virtual time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock at virtual time `t`.
    pub fn starting_at(t: Duration) -> Self {
        let clock = Self::new();
        clock.set(t);
        clock
    }

    /// Moves time forward by `d` (saturating) and returns the new time.
    pub fn advance(&self, d: Duration) -> Duration {
        let step = to_nanos(d);
        let previous = self
            .nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(step))
            })
            .unwrap_or_else(|n| n);
        Duration::from_nanos(previous.saturating_add(step))
    }

    /// Sets the time to `t` (it may go backwards; the model ignores times in its past).
    pub fn set(&self, t: Duration) {
        self.nanos.store(to_nanos(t), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_advances_and_clones_share_time() {
        let clock = ManualClock::new();
        let other = clock.clone();
        assert_eq!(clock.now(), Duration::ZERO);
        assert_eq!(
            clock.advance(Duration::from_millis(1500)),
            Duration::from_millis(1500)
        );
        assert_eq!(other.now(), Duration::from_millis(1500));
        other.set(Duration::from_secs(10));
        assert_eq!(clock.now(), Duration::from_secs(10));
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        assert_eq!(shared.now(), Duration::from_secs(10));
        assert_eq!(
            ManualClock::starting_at(Duration::from_secs(3)).now(),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn virtual_clock_runs_warped_real_time() {
        let real_start = Instant::now();
        let clock = VirtualClock::starting_at(real_start, 1000.0).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let virtual_now = clock.now();
        let real_elapsed = real_start.elapsed();
        assert!(virtual_now >= Duration::from_secs(20), "{virtual_now:?}");
        assert!(
            virtual_now <= real_elapsed * 1000,
            "{virtual_now:?} vs {real_elapsed:?}"
        );
        assert_eq!(
            clock.to_real(Duration::from_secs(60)),
            Duration::from_millis(60)
        );
        assert_eq!(
            clock.to_virtual(Duration::from_millis(60)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn virtual_clock_rejects_bad_warp() {
        for warp in [0.0, -1.0, f64::NAN, f64::INFINITY, 2.0e6] {
            assert!(VirtualClock::new(warp).is_err(), "warp {warp}");
        }
        assert_eq!(VirtualClock::new(60.0).unwrap().warp(), 60.0);
    }
}
