//! Hotplate stirrer (IKA NAMUR): plate and the vial on the stir station follow first-order dynamics toward
//! the setpoint while heating (toward ambient when off); the stirrer ramps to its speed setpoint and mixes
//! the vial; the `OUT_WD1@m` watchdog switches heater and motor off after `m` seconds without a message.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::deck::relax;
use super::faults::FaultConfig;
use super::{ConfigError, check_finite, check_positive, secs_to_duration};

/// Hotplate settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HotplateConfig {
    /// Highest temperature setpoint (C).
    pub plate_max_c: f64,
    /// Safety circuit limit; setpoints above it are refused (C).
    pub safety_limit_c: f64,
    /// Time constant of the plate temperature (virtual s).
    pub plate_tau_s: f64,
    /// Time constant of the vial on the plate (virtual s).
    pub vial_tau_s: f64,
    /// Lowest non-zero stirrer speed (rpm).
    pub speed_min_rpm: f64,
    /// Highest stirrer speed (rpm).
    pub speed_max_rpm: f64,
    /// Stirrer acceleration (rpm per s).
    pub speed_ramp_rpm_s: f64,
    /// Stirring mixes a vial with time constant `mix_rpm_s / speed` (rpm·s).
    pub mix_rpm_s: f64,
    /// Shortest watchdog time (s).
    pub watchdog_min_s: f64,
    /// Longest watchdog time (s).
    pub watchdog_max_s: f64,
    /// Fault injection for the NAMUR front end (drift in C per hour).
    pub faults: FaultConfig,
}

impl Default for HotplateConfig {
    fn default() -> Self {
        Self {
            plate_max_c: 340.0,
            safety_limit_c: 250.0,
            plate_tau_s: 120.0,
            vial_tau_s: 120.0,
            speed_min_rpm: 100.0,
            speed_max_rpm: 1500.0,
            speed_ramp_rpm_s: 500.0,
            mix_rpm_s: 12_000.0,
            watchdog_min_s: 20.0,
            watchdog_max_s: 1500.0,
            faults: FaultConfig::default(),
        }
    }
}

impl HotplateConfig {
    /// Checks all values are usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_positive("hotplate.plate_max_c", self.plate_max_c)?;
        check_finite("hotplate.safety_limit_c", self.safety_limit_c)?;
        check_positive("hotplate.plate_tau_s", self.plate_tau_s)?;
        check_positive("hotplate.vial_tau_s", self.vial_tau_s)?;
        check_positive("hotplate.speed_min_rpm", self.speed_min_rpm)?;
        check_positive("hotplate.speed_max_rpm", self.speed_max_rpm)?;
        check_positive("hotplate.speed_ramp_rpm_s", self.speed_ramp_rpm_s)?;
        check_positive("hotplate.mix_rpm_s", self.mix_rpm_s)?;
        check_positive("hotplate.watchdog_min_s", self.watchdog_min_s)?;
        check_positive("hotplate.watchdog_max_s", self.watchdog_max_s)?;
        if self.speed_min_rpm > self.speed_max_rpm || self.watchdog_min_s > self.watchdog_max_s {
            return Err(ConfigError::invalid(
                "hotplate",
                "a minimum exceeds its maximum",
            ));
        }
        self.faults.validate("hotplate.faults")
    }
}

/// A hotplate command that was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum HotplateError {
    /// Temperature setpoint outside 0..=plate max (C).
    #[error("setpoint {0} C out of range")]
    SetpointOutOfRange(f64),
    /// Temperature setpoint above the safety limit (C).
    #[error("setpoint {setpoint_c} C above the safety limit {limit_c} C")]
    AboveSafetyLimit {
        /// Requested setpoint (C).
        setpoint_c: f64,
        /// Safety limit (C).
        limit_c: f64,
    },
    /// Speed setpoint neither 0 nor within min..=max (rpm).
    #[error("speed {0} rpm out of range")]
    SpeedOutOfRange(f64),
    /// Watchdog time outside min..=max (s).
    #[error("watchdog time {0} s out of range")]
    WatchdogOutOfRange(f64),
    /// The watchdog tripped; RESET first.
    #[error("watchdog tripped: reset required")]
    WatchdogTripped,
    /// The lab has no hotplate of this index.
    #[error("no hotplate {0}")]
    NoSuchHotplate(usize),
}

/// Snapshot of the hotplate for its front end (temperatures include drift).
#[derive(Debug, Clone, PartialEq)]
pub struct HotplateStatus {
    /// Plate temperature (C, `IN_PV_2`).
    pub plate_c: f64,
    /// Temperature of the vial on the stir station, if any (C, external probe `IN_PV_1`).
    pub vial_c: Option<f64>,
    /// Temperature setpoint (C).
    pub setpoint_c: f64,
    /// Heater on.
    pub heating: bool,
    /// Actual stirrer speed (rpm).
    pub speed_rpm: f64,
    /// Speed setpoint (rpm).
    pub speed_setpoint_rpm: f64,
    /// Motor on.
    pub stirring: bool,
    /// Armed watchdog time (s).
    pub watchdog_s: Option<f64>,
    /// The watchdog tripped and the device shows its error until RESET.
    pub watchdog_tripped: bool,
    /// Safety limit (C).
    pub safety_limit_c: f64,
}

/// The hotplate stirrer.
#[derive(Debug, Clone)]
pub struct Hotplate {
    config: HotplateConfig,
    ambient_c: f64,
    plate_c: f64,
    setpoint_c: f64,
    heating: bool,
    speed_setpoint_rpm: f64,
    speed_rpm: f64,
    stirring: bool,
    watchdog: Option<Duration>,
    last_message: Duration,
    watchdog_tripped: bool,
    drift_c: f64,
}

/// Integrates a linear ramp from `s0` toward `s1` at `rate` per second for `dt_s`; returns (end, integral).
fn ramp(s0: f64, s1: f64, rate: f64, dt_s: f64) -> (f64, f64) {
    let ramp_s = (s1 - s0).abs() / rate;
    if dt_s >= ramp_s {
        (s1, (s0 + s1) / 2.0 * ramp_s + s1 * (dt_s - ramp_s))
    } else {
        let end = s0 + (s1 - s0).signum() * rate * dt_s;
        (end, (s0 + end) / 2.0 * dt_s)
    }
}

impl Hotplate {
    /// A cold, idle hotplate at ambient temperature.
    pub fn new(config: HotplateConfig, ambient_c: f64) -> Result<Self, ConfigError> {
        config.validate()?;
        check_finite("ambient_c", ambient_c)?;
        Ok(Self {
            config,
            ambient_c,
            plate_c: ambient_c,
            setpoint_c: 0.0,
            heating: false,
            speed_setpoint_rpm: 0.0,
            speed_rpm: 0.0,
            stirring: false,
            watchdog: None,
            last_message: Duration::ZERO,
            watchdog_tripped: false,
            drift_c: 0.0,
        })
    }

    /// The hotplate settings.
    pub fn config(&self) -> &HotplateConfig {
        &self.config
    }

    /// Replaces the fault settings.
    pub(crate) fn set_faults(&mut self, faults: FaultConfig) {
        self.config.faults = faults;
    }

    /// Temperature the plate (and the vial on it) is heading for (C).
    pub fn thermal_target(&self) -> f64 {
        if self.heating {
            self.setpoint_c.max(self.ambient_c)
        } else {
            self.ambient_c
        }
    }

    /// Accumulated sensor drift (C).
    pub fn drift_c(&self) -> f64 {
        self.drift_c
    }

    /// Any NAMUR message received at `now` feeds the watchdog.
    pub fn message(&mut self, now: Duration) {
        self.last_message = now;
    }

    /// `OUT_SP_1`: temperature setpoint (C).
    pub fn set_setpoint(&mut self, setpoint_c: f64) -> Result<(), HotplateError> {
        if !(setpoint_c.is_finite() && (0.0..=self.config.plate_max_c).contains(&setpoint_c)) {
            return Err(HotplateError::SetpointOutOfRange(setpoint_c));
        }
        if setpoint_c > self.config.safety_limit_c {
            return Err(HotplateError::AboveSafetyLimit {
                setpoint_c,
                limit_c: self.config.safety_limit_c,
            });
        }
        self.setpoint_c = setpoint_c;
        Ok(())
    }

    /// `START_1` / `STOP_1`: heater on or off.
    pub fn set_heating(&mut self, on: bool) -> Result<(), HotplateError> {
        if on && self.watchdog_tripped {
            return Err(HotplateError::WatchdogTripped);
        }
        self.heating = on;
        Ok(())
    }

    /// `OUT_SP_4`: stirrer speed setpoint, 0 or min..=max (rpm).
    pub fn set_speed(&mut self, rpm: f64) -> Result<(), HotplateError> {
        let ok =
            rpm == 0.0 || (self.config.speed_min_rpm..=self.config.speed_max_rpm).contains(&rpm);
        if !ok {
            return Err(HotplateError::SpeedOutOfRange(rpm));
        }
        self.speed_setpoint_rpm = rpm;
        Ok(())
    }

    /// `START_4` / `STOP_4`: motor on or off.
    pub fn set_stirring(&mut self, on: bool) -> Result<(), HotplateError> {
        if on && self.watchdog_tripped {
            return Err(HotplateError::WatchdogTripped);
        }
        self.stirring = on;
        Ok(())
    }

    /// `OUT_WD1@m`: arms the watchdog for `secs` seconds from `now`.
    pub fn arm_watchdog(&mut self, now: Duration, secs: f64) -> Result<(), HotplateError> {
        if self.watchdog_tripped {
            return Err(HotplateError::WatchdogTripped);
        }
        if !(self.config.watchdog_min_s..=self.config.watchdog_max_s).contains(&secs) {
            return Err(HotplateError::WatchdogOutOfRange(secs));
        }
        self.watchdog = Some(secs_to_duration(secs));
        self.last_message = now;
        Ok(())
    }

    /// `RESET`: clears a watchdog error, disarms the watchdog and switches heater and motor off.
    pub fn reset(&mut self) {
        self.watchdog_tripped = false;
        self.watchdog = None;
        self.heating = false;
        self.stirring = false;
    }

    /// Virtual time at which the armed watchdog trips unless fed.
    pub fn watchdog_expiry(&self) -> Option<Duration> {
        if self.watchdog_tripped {
            return None;
        }
        self.watchdog
            .map(|period| self.last_message.saturating_add(period))
    }

    /// Advances over `dt` ending at `to`; returns the stirring integral (rpm·s) for mixing.
    pub fn advance(&mut self, to: Duration, dt: Duration) -> f64 {
        let dt_s = dt.as_secs_f64();
        self.plate_c = relax(
            self.plate_c,
            self.thermal_target(),
            dt_s,
            self.config.plate_tau_s,
        );
        let goal = if self.stirring {
            self.speed_setpoint_rpm
        } else {
            0.0
        };
        let (speed, integral) = ramp(self.speed_rpm, goal, self.config.speed_ramp_rpm_s, dt_s);
        self.speed_rpm = speed;
        self.drift_c += self.config.faults.drift_over(dt);
        if self.watchdog_expiry().is_some_and(|at| to >= at) {
            self.watchdog_tripped = true;
            self.watchdog = None;
            self.heating = false;
            self.stirring = false;
        }
        integral
    }

    /// Snapshot with the true temperature of the vial on the stir station.
    pub fn status(&self, vial_c: Option<f64>) -> HotplateStatus {
        HotplateStatus {
            plate_c: self.plate_c + self.drift_c,
            vial_c: vial_c.map(|c| c + self.drift_c),
            setpoint_c: self.setpoint_c,
            heating: self.heating,
            speed_rpm: self.speed_rpm,
            speed_setpoint_rpm: self.speed_setpoint_rpm,
            stirring: self.stirring,
            watchdog_s: self.watchdog.map(|d| d.as_secs_f64()),
            watchdog_tripped: self.watchdog_tripped,
            safety_limit_c: self.config.safety_limit_c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::deck::{Dye, Liquid};
    use super::super::{LabConfig, LabModel};
    use super::*;
    use labctl_clock::{Clock, ManualClock};

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn lab() -> (LabModel, ManualClock) {
        (
            LabModel::new(LabConfig::sim_default(), 1).unwrap(),
            ManualClock::new(),
        )
    }

    #[test]
    fn plate_and_vial_reach_63_percent_after_one_time_constant() {
        let (mut lab, clock) = lab();
        lab.add_vial(clock.now(), "v", "H1").unwrap();
        lab.add_vial(clock.now(), "w", "A1").unwrap();
        lab.hotplate_set_temperature(clock.now(), 0, 100.0).unwrap();
        lab.hotplate_heat(clock.now(), 0, true).unwrap();
        clock.advance(secs(120.0));
        let st = lab.hotplate_status(clock.now(), 0).unwrap();
        let expected = 22.0 + (100.0 - 22.0) * (1.0 - (-1.0f64).exp());
        assert!((st.plate_c - expected).abs() < 0.01, "{}", st.plate_c);
        assert!((st.vial_c.unwrap() - expected).abs() < 0.01);
        assert!((lab.vial("w").unwrap().temperature_c - 22.0).abs() < 1e-9);
        clock.advance(secs(1200.0));
        assert!((lab.hotplate_status(clock.now(), 0).unwrap().plate_c - 100.0).abs() < 0.01);
        // Off: cools toward ambient with the same time constant.
        lab.hotplate_heat(clock.now(), 0, false).unwrap();
        clock.advance(secs(120.0));
        let cooled = lab.hotplate_status(clock.now(), 0).unwrap().plate_c;
        assert!(
            (cooled - (22.0 + 78.0 * (-1.0f64).exp())).abs() < 0.05,
            "{cooled}"
        );
    }

    #[test]
    fn setpoint_limits() {
        let (mut lab, clock) = lab();
        assert_eq!(
            lab.hotplate_set_temperature(clock.now(), 0, 400.0),
            Err(HotplateError::SetpointOutOfRange(400.0))
        );
        assert!(matches!(
            lab.hotplate_set_temperature(clock.now(), 0, 300.0),
            Err(HotplateError::AboveSafetyLimit { .. })
        ));
        assert!(
            lab.hotplate_set_temperature(clock.now(), 0, f64::NAN)
                .is_err()
        );
        lab.hotplate_set_temperature(clock.now(), 0, 250.0).unwrap();
    }

    #[test]
    fn stirrer_ramps_to_its_setpoint() {
        let (mut lab, clock) = lab();
        assert_eq!(
            lab.hotplate_set_speed(clock.now(), 0, 50.0),
            Err(HotplateError::SpeedOutOfRange(50.0))
        );
        assert!(lab.hotplate_set_speed(clock.now(), 0, 1600.0).is_err());
        lab.hotplate_set_speed(clock.now(), 0, 600.0).unwrap();
        lab.hotplate_stir(clock.now(), 0, true).unwrap();
        clock.advance(secs(0.5));
        assert!((lab.hotplate_status(clock.now(), 0).unwrap().speed_rpm - 250.0).abs() < 1e-9);
        clock.advance(secs(1.5));
        assert_eq!(
            lab.hotplate_status(clock.now(), 0).unwrap().speed_rpm,
            600.0
        );
        lab.hotplate_stir(clock.now(), 0, false).unwrap();
        clock.advance(secs(2.0));
        assert_eq!(lab.hotplate_status(clock.now(), 0).unwrap().speed_rpm, 0.0);
    }

    #[test]
    fn stirring_mixes_the_vial_on_the_stir_station() {
        let (mut lab, clock) = lab();
        lab.add_vial(clock.now(), "v", "H1").unwrap();
        lab.add_vial(clock.now(), "w", "A1").unwrap();
        for id in ["v", "w"] {
            let k = lab.deck.vials().iter().position(|v| v.id == id).unwrap();
            let vial = &mut lab.deck.vials_mut()[k];
            vial.add_liquid(Liquid::Dye(Dye::Red), 500.0, 22.0);
            vial.add_liquid(Liquid::Dye(Dye::Blue), 500.0, 22.0);
        }
        assert!(!lab.vial("v").unwrap().is_mixed());
        lab.hotplate_set_speed(clock.now(), 0, 600.0).unwrap();
        lab.hotplate_stir(clock.now(), 0, true).unwrap();
        lab.advance_to(clock.advance(secs(20.0)));
        let h20 = lab.vial("v").unwrap().homogeneity;
        assert!(h20 > 0.7 && h20 < 0.95, "{h20}");
        lab.advance_to(clock.advance(secs(40.0)));
        assert!(lab.vial("v").unwrap().is_mixed());
        let unstirred = lab.vial("w").unwrap().homogeneity;
        assert!(unstirred < 0.6, "{unstirred}");
    }

    #[test]
    fn watchdog_trips_after_silence_and_messages_feed_it() {
        let (mut lab, clock) = lab();
        lab.hotplate_set_temperature(clock.now(), 0, 80.0).unwrap();
        lab.hotplate_heat(clock.now(), 0, true).unwrap();
        lab.hotplate_set_speed(clock.now(), 0, 500.0).unwrap();
        lab.hotplate_stir(clock.now(), 0, true).unwrap();
        assert_eq!(
            lab.hotplate_arm_watchdog(clock.now(), 0, 5.0),
            Err(HotplateError::WatchdogOutOfRange(5.0))
        );
        lab.hotplate_arm_watchdog(clock.now(), 0, 30.0).unwrap();
        clock.advance(secs(20.0));
        lab.hotplate_message(clock.now(), 0).unwrap();
        clock.advance(secs(29.9));
        let st = lab.hotplate_status(clock.now(), 0).unwrap();
        assert!(!st.watchdog_tripped && st.heating && st.stirring);
        assert_eq!(st.watchdog_s, Some(30.0));
        clock.advance(secs(0.1));
        let st = lab.hotplate_status(clock.now(), 0).unwrap();
        assert!(st.watchdog_tripped);
        assert!(!st.heating && !st.stirring);
        assert_eq!(
            lab.hotplate_heat(clock.now(), 0, true),
            Err(HotplateError::WatchdogTripped)
        );
        assert_eq!(
            lab.hotplate_stir(clock.now(), 0, true),
            Err(HotplateError::WatchdogTripped)
        );
        let plate_at_trip = st.plate_c;
        clock.advance(secs(300.0));
        assert!(lab.hotplate_status(clock.now(), 0).unwrap().plate_c < plate_at_trip);
        lab.hotplate_reset(clock.now(), 0).unwrap();
        assert!(
            !lab.hotplate_status(clock.now(), 0)
                .unwrap()
                .watchdog_tripped
        );
        lab.hotplate_heat(clock.now(), 0, true).unwrap();
    }

    #[test]
    fn watchdog_trips_even_when_the_model_is_queried_late() {
        let (mut lab, clock) = lab();
        lab.hotplate_set_temperature(clock.now(), 0, 100.0).unwrap();
        lab.hotplate_heat(clock.now(), 0, true).unwrap();
        lab.hotplate_arm_watchdog(clock.now(), 0, 60.0).unwrap();
        clock.advance(secs(3600.0));
        // A message arriving long after the deadline does not rescue it, and the plate cooled after 60 s.
        lab.hotplate_message(clock.now(), 0).unwrap();
        let st = lab.hotplate_status(clock.now(), 0).unwrap();
        assert!(st.watchdog_tripped);
        let peak = 22.0 + 78.0 * (1.0 - (-0.5f64).exp());
        let expected = 22.0 + (peak - 22.0) * (-(3540.0 / 120.0f64)).exp();
        assert!((st.plate_c - expected).abs() < 0.01, "{}", st.plate_c);
    }

    #[test]
    fn ramp_integral_is_exact() {
        let (end, integral) = ramp(0.0, 600.0, 500.0, 2.0);
        assert_eq!(end, 600.0);
        assert!((integral - (0.5 * 600.0 * 1.2 + 600.0 * 0.8)).abs() < 1e-9);
        let (end, integral) = ramp(600.0, 0.0, 500.0, 0.4);
        assert!((end - 400.0).abs() < 1e-9);
        assert!((integral - 200.0).abs() < 1e-9);
    }
}
