//! The one clock of a lab: warped real time ([`VirtualClock`]) or a test clock that only moves when the test
//! moves it ([`ManualClock`]). Servers convert virtual deadlines into real waits with it.

use std::time::Duration;

use crate::{Clock, ManualClock, VirtualClock};

/// How often a server looks at a [`ManualClock`] while it waits for a virtual deadline (real time).
pub const MANUAL_POLL: Duration = Duration::from_millis(2);

/// The lab's clock.
#[derive(Debug, Clone)]
pub enum LabClock {
    /// Real time times a warp factor.
    Virtual(VirtualClock),
    /// Moved by the test ([`ManualClock::advance`]); clones share the time.
    Manual(ManualClock),
}

impl LabClock {
    /// Real time to wait, at virtual time `now`, for virtual time `until` to come. A manual clock cannot
    /// be predicted, so it is looked at again after [`MANUAL_POLL`].
    pub fn real_wait(&self, now: Duration, until: Duration) -> Duration {
        let span = until.saturating_sub(now);
        match self {
            LabClock::Virtual(clock) => clock.to_real(span),
            LabClock::Manual(_) if span.is_zero() => Duration::ZERO,
            LabClock::Manual(_) => MANUAL_POLL,
        }
    }

    /// Virtual seconds per real second (a manual clock has none; 0).
    pub fn warp(&self) -> f64 {
        match self {
            LabClock::Virtual(clock) => clock.warp(),
            LabClock::Manual(_) => 0.0,
        }
    }
}

impl Clock for LabClock {
    fn now(&self) -> Duration {
        match self {
            LabClock::Virtual(clock) => clock.now(),
            LabClock::Manual(clock) => clock.now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_waits_follow_the_warp_or_poll_a_manual_clock() {
        let warped = LabClock::Virtual(VirtualClock::new(10.0).unwrap());
        assert_eq!(
            warped.real_wait(Duration::from_secs(1), Duration::from_secs(2)),
            Duration::from_millis(100)
        );
        assert_eq!(
            warped.real_wait(Duration::from_secs(2), Duration::from_secs(1)),
            Duration::ZERO
        );
        let manual = ManualClock::new();
        let clock = LabClock::Manual(manual.clone());
        assert_eq!(
            clock.real_wait(Duration::ZERO, Duration::from_secs(60)),
            MANUAL_POLL
        );
        manual.advance(Duration::from_secs(5));
        assert_eq!(clock.now(), Duration::from_secs(5));
        assert_eq!(clock.warp(), 0.0);
    }
}
