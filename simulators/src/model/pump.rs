//! Syringe pumps of the New Era NE-1000 family: programmed diameter and rate limits, volume target,
//! direction, RUN/STP (pause, then stop), dispensed counters (DIS), and a stall alarm when the syringe
//! empties (infuse) or cannot fill (withdraw).
//!
//! Infusing pushes stock out of the syringe into whatever is under the head (routed by the lab model);
//! withdrawing refills the syringe from the stock reservoir. Volumes in uL, rates in uL/min. The pump's
//! counters are nominal (what the pump believes); the liquid actually moved differs by a seeded
//! per-run volume error and by the ratio of physical to programmed syringe area.

use std::time::Duration;

use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::deck::{Dye, Liquid};
use super::faults::FaultConfig;
use super::noise::gaussian;
use super::{ConfigError, check_positive, secs_to_duration};

/// Fastest plunger travel (mm/min): about 1500 uL/min with a 14.43 mm (10 mL) syringe.
pub const MAX_PLUNGER_MM_PER_MIN: f64 = 9.2;
/// Slowest plunger travel (mm/min): about 0.001 uL/min with a 14.43 mm syringe.
pub const MIN_PLUNGER_MM_PER_MIN: f64 = 6.12e-6;
/// Syringe inside diameters the pump accepts (mm).
pub const DIAMETER_RANGE_MM: (f64, f64) = (0.1, 50.0);

const VOLUME_EPS_UL: f64 = 1e-9;

/// Rate limits (min, max) in uL/min for a syringe inside diameter in mm.
pub fn rate_limits_ul_min(diameter_mm: f64) -> (f64, f64) {
    let area_mm2 = std::f64::consts::PI * diameter_mm * diameter_mm / 4.0;
    (
        area_mm2 * MIN_PLUNGER_MM_PER_MIN,
        area_mm2 * MAX_PLUNGER_MM_PER_MIN,
    )
}

/// One pump and its syringe of stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PumpConfig {
    /// Instrument id, e.g. "pump-red".
    pub id: String,
    /// Liquid in the syringe.
    pub liquid: Liquid,
    /// Physical syringe inside diameter (mm); also the initially programmed diameter.
    pub diameter_mm: f64,
    /// Syringe volume (uL).
    pub syringe_ul: f64,
    /// Stock in the syringe at start (uL).
    pub fill_ul: f64,
    /// Stock left in the reservoir that withdrawing refills from (uL).
    pub reservoir_ul: f64,
    /// Relative standard deviation of the delivered volume per run (0.005 = 0.5 %).
    pub volume_error_sd: f64,
    /// Fault injection for the NE-1000 front end.
    pub faults: FaultConfig,
}

impl Default for PumpConfig {
    fn default() -> Self {
        Self::sim_default(Dye::Red)
    }
}

impl PumpConfig {
    /// A full 10 mL syringe (14.43 mm) of a dye stock with 40 mL in reserve.
    pub fn sim_default(dye: Dye) -> Self {
        Self {
            id: format!("pump-{}", dye.name()),
            liquid: Liquid::Dye(dye),
            diameter_mm: 14.43,
            syringe_ul: 10_000.0,
            fill_ul: 10_000.0,
            reservoir_ul: 40_000.0,
            volume_error_sd: 0.005,
            faults: FaultConfig::default(),
        }
    }

    /// Checks the syringe geometry and volumes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let f = |name: &str| format!("pumps.{}.{name}", self.id);
        if self.id.is_empty() {
            return Err(ConfigError::invalid("pumps.id", "empty pump id"));
        }
        let (lo, hi) = DIAMETER_RANGE_MM;
        if !(lo..=hi).contains(&self.diameter_mm) {
            return Err(ConfigError::invalid(
                f("diameter_mm"),
                format!("must be in {lo}..={hi}"),
            ));
        }
        check_positive(&f("syringe_ul"), self.syringe_ul)?;
        if !(0.0..=self.syringe_ul).contains(&self.fill_ul) {
            return Err(ConfigError::invalid(
                f("fill_ul"),
                "must be in 0..=syringe_ul",
            ));
        }
        if !(self.reservoir_ul.is_finite() && self.reservoir_ul >= 0.0) {
            return Err(ConfigError::invalid(
                f("reservoir_ul"),
                "must be finite and >= 0",
            ));
        }
        if !(0.0..=0.2).contains(&self.volume_error_sd) {
            return Err(ConfigError::invalid(
                f("volume_error_sd"),
                "must be in 0..=0.2",
            ));
        }
        self.faults.validate(&f("faults"))
    }
}

/// Pumping direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Push stock out (INF).
    Infuse,
    /// Draw stock back into the syringe from the reservoir (WDR).
    Withdraw,
}

/// Pump state, as shown by the NE-1000 status prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpState {
    /// Stopped (prompt S).
    Stopped,
    /// Infusing (prompt I).
    Infusing,
    /// Withdrawing (prompt W).
    Withdrawing,
    /// Paused by STP; RUN resumes the same target (prompt P).
    Paused,
}

impl PumpState {
    /// The NE-1000 prompt character.
    pub fn prompt(self) -> char {
        match self {
            PumpState::Stopped => 'S',
            PumpState::Infusing => 'I',
            PumpState::Withdrawing => 'W',
            PumpState::Paused => 'P',
        }
    }
}

/// Pump alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpAlarm {
    /// Motor stalled: the syringe ran empty or could not fill (NE-1000 `A?S`).
    Stalled,
}

/// A pump command that was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PumpError {
    /// No pump at this index.
    #[error("no pump {0}")]
    NoSuchPump(usize),
    /// Rate outside the limits of the programmed syringe (NE-1000 `?OOR`).
    #[error("rate {rate} uL/min outside {min}..={max}")]
    RateOutOfRange {
        /// Requested rate (uL/min).
        rate: f64,
        /// Lowest rate (uL/min).
        min: f64,
        /// Highest rate (uL/min).
        max: f64,
    },
    /// Volume target negative or not finite (uL).
    #[error("invalid volume {0} uL")]
    InvalidVolume(f64),
    /// Diameter outside the accepted range (mm).
    #[error("invalid syringe diameter {0} mm")]
    InvalidDiameter(f64),
    /// RUN without a rate set.
    #[error("no pumping rate set")]
    RateNotSet,
    /// Not allowed while pumping (NE-1000 `?NA`).
    #[error("not applicable while pumping")]
    NotWhilePumping,
}

/// Snapshot of a pump for its front end.
#[derive(Debug, Clone, PartialEq)]
pub struct PumpStatus {
    /// Instrument id.
    pub id: String,
    /// Liquid in the syringe.
    pub liquid: Liquid,
    /// Pumping state.
    pub state: PumpState,
    /// Pending alarm.
    pub alarm: Option<PumpAlarm>,
    /// Direction for the next or current run.
    pub direction: Direction,
    /// Programmed rate (uL/min), 0 if never set.
    pub rate_ul_min: f64,
    /// Rate limits (min, max) for the programmed diameter (uL/min).
    pub rate_limits_ul_min: (f64, f64),
    /// Programmed syringe diameter (mm).
    pub diameter_mm: f64,
    /// Volume target per run, 0 = none (uL).
    pub target_ul: f64,
    /// Volume pumped so far in the current run (uL, nominal).
    pub run_ul: f64,
    /// DIS infused counter (uL, nominal).
    pub infused_ul: f64,
    /// DIS withdrawn counter (uL, nominal).
    pub withdrawn_ul: f64,
    /// Stock left in the syringe (uL, actual).
    pub syringe_ul: f64,
    /// Stock left in the reservoir (uL, actual).
    pub reservoir_ul: f64,
    /// Liquid this pump spilled: no vial under the head or vial full (uL, actual).
    pub spilled_ul: f64,
}

/// One syringe pump.
#[derive(Debug, Clone)]
pub struct Pump {
    config: PumpConfig,
    rng: SmallRng,
    diameter_mm: f64,
    rate_ul_min: f64,
    target_ul: f64,
    direction: Direction,
    state: PumpState,
    alarm: Option<PumpAlarm>,
    run_ul: f64,
    factor: f64,
    infused_ul: f64,
    withdrawn_ul: f64,
    syringe_ul: f64,
    reservoir_ul: f64,
    spilled_ul: f64,
}

impl Pump {
    /// A stopped pump with a full programmed syringe, no rate and no volume target.
    pub fn new(config: PumpConfig, rng: SmallRng) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            diameter_mm: config.diameter_mm,
            syringe_ul: config.fill_ul,
            reservoir_ul: config.reservoir_ul,
            config,
            rng,
            rate_ul_min: 0.0,
            target_ul: 0.0,
            direction: Direction::Infuse,
            state: PumpState::Stopped,
            alarm: None,
            run_ul: 0.0,
            factor: 1.0,
            infused_ul: 0.0,
            withdrawn_ul: 0.0,
            spilled_ul: 0.0,
        })
    }

    /// The pump configuration.
    pub fn config(&self) -> &PumpConfig {
        &self.config
    }

    /// Liquid this pump delivers.
    pub fn liquid(&self) -> Liquid {
        self.config.liquid
    }

    /// True while infusing or withdrawing.
    pub fn is_running(&self) -> bool {
        matches!(self.state, PumpState::Infusing | PumpState::Withdrawing)
    }

    /// Rate limits (min, max) for the programmed diameter (uL/min).
    pub fn rate_limits(&self) -> (f64, f64) {
        rate_limits_ul_min(self.diameter_mm)
    }

    /// RAT: sets the rate (uL/min); allowed while pumping.
    pub fn set_rate(&mut self, rate_ul_min: f64) -> Result<(), PumpError> {
        let (min, max) = self.rate_limits();
        if !(rate_ul_min.is_finite() && rate_ul_min >= min && rate_ul_min <= max) {
            return Err(PumpError::RateOutOfRange {
                rate: rate_ul_min,
                min,
                max,
            });
        }
        self.rate_ul_min = rate_ul_min;
        Ok(())
    }

    /// VOL: sets the volume target per run (uL, 0 = pump until stopped).
    pub fn set_volume(&mut self, target_ul: f64) -> Result<(), PumpError> {
        if self.is_running() {
            return Err(PumpError::NotWhilePumping);
        }
        if !(target_ul.is_finite() && target_ul >= 0.0) {
            return Err(PumpError::InvalidVolume(target_ul));
        }
        self.target_ul = target_ul;
        Ok(())
    }

    /// DIR: sets the direction.
    pub fn set_direction(&mut self, direction: Direction) -> Result<(), PumpError> {
        if self.is_running() {
            return Err(PumpError::NotWhilePumping);
        }
        self.direction = direction;
        Ok(())
    }

    /// DIA: programs the syringe diameter; clears DIS, the target and a rate outside the new limits.
    pub fn set_diameter(&mut self, diameter_mm: f64) -> Result<(), PumpError> {
        if self.is_running() {
            return Err(PumpError::NotWhilePumping);
        }
        let (lo, hi) = DIAMETER_RANGE_MM;
        if !(lo..=hi).contains(&diameter_mm) {
            return Err(PumpError::InvalidDiameter(diameter_mm));
        }
        self.diameter_mm = diameter_mm;
        self.infused_ul = 0.0;
        self.withdrawn_ul = 0.0;
        self.target_ul = 0.0;
        let (min, max) = self.rate_limits();
        if !(min..=max).contains(&self.rate_ul_min) {
            self.rate_ul_min = 0.0;
        }
        Ok(())
    }

    /// RUN: starts (or resumes when paused) pumping; clears a pending alarm and stalls at once if it cannot move.
    pub fn run(&mut self) -> Result<(), PumpError> {
        if self.is_running() {
            return Ok(());
        }
        if self.rate_ul_min <= 0.0 {
            return Err(PumpError::RateNotSet);
        }
        self.alarm = None;
        if self.state != PumpState::Paused {
            self.run_ul = 0.0;
            let noise = gaussian(&mut self.rng, self.config.volume_error_sd).clamp(-0.5, 0.5);
            let area_ratio = (self.config.diameter_mm / self.diameter_mm).powi(2);
            self.factor = area_ratio * (1.0 + noise);
        }
        self.state = match self.direction {
            Direction::Infuse => PumpState::Infusing,
            Direction::Withdraw => PumpState::Withdrawing,
        };
        if self.available_ul() <= VOLUME_EPS_UL {
            self.stall();
        }
        Ok(())
    }

    /// STP: pauses a running pump; stops (ends the run) a paused one.
    pub fn stop(&mut self) {
        match self.state {
            PumpState::Infusing | PumpState::Withdrawing => self.state = PumpState::Paused,
            PumpState::Paused | PumpState::Stopped => {
                self.state = PumpState::Stopped;
                self.run_ul = 0.0;
            }
        }
    }

    /// Clears the pending alarm (the front end does so on the next command).
    pub fn clear_alarm(&mut self) {
        self.alarm = None;
    }

    /// CLD: clears the infused or withdrawn counter.
    pub fn clear_dispensed(&mut self, direction: Direction) {
        match direction {
            Direction::Infuse => self.infused_ul = 0.0,
            Direction::Withdraw => self.withdrawn_ul = 0.0,
        }
    }

    /// Snapshot for the front end.
    pub fn status(&self) -> PumpStatus {
        PumpStatus {
            id: self.config.id.clone(),
            liquid: self.config.liquid,
            state: self.state,
            alarm: self.alarm,
            direction: self.direction,
            rate_ul_min: self.rate_ul_min,
            rate_limits_ul_min: self.rate_limits(),
            diameter_mm: self.diameter_mm,
            target_ul: self.target_ul,
            run_ul: self.run_ul,
            infused_ul: self.infused_ul,
            withdrawn_ul: self.withdrawn_ul,
            syringe_ul: self.syringe_ul,
            reservoir_ul: self.reservoir_ul,
            spilled_ul: self.spilled_ul,
        }
    }

    /// Liquid the plunger can still move in the current direction (uL, actual).
    fn available_ul(&self) -> f64 {
        match self.direction {
            Direction::Infuse => self.syringe_ul,
            Direction::Withdraw => {
                (self.config.syringe_ul - self.syringe_ul).min(self.reservoir_ul)
            }
        }
        .max(0.0)
    }

    fn stall(&mut self) {
        self.state = PumpState::Stopped;
        self.alarm = Some(PumpAlarm::Stalled);
        self.run_ul = 0.0;
    }

    /// Time until the run reaches its target or stalls.
    pub fn next_event_in(&self) -> Option<Duration> {
        if !self.is_running() || self.rate_ul_min <= 0.0 {
            return None;
        }
        let mut minutes = f64::INFINITY;
        if self.target_ul > 0.0 {
            minutes = minutes.min((self.target_ul - self.run_ul).max(0.0) / self.rate_ul_min);
        }
        let actual_rate = self.rate_ul_min * self.factor;
        if actual_rate > 0.0 {
            minutes = minutes.min(self.available_ul() / actual_rate);
        }
        minutes
            .is_finite()
            .then(|| secs_to_duration(minutes * 60.0).saturating_add(Duration::from_nanos(1)))
    }

    /// Pumps for `dt`; returns the actual volume pushed out of the syringe (uL, 0 when withdrawing).
    pub fn advance(&mut self, dt: Duration) -> f64 {
        if !self.is_running() || self.rate_ul_min <= 0.0 || dt.is_zero() {
            return 0.0;
        }
        let mut nominal = self.rate_ul_min * dt.as_secs_f64() / 60.0;
        if self.target_ul > 0.0 {
            nominal = nominal.min((self.target_ul - self.run_ul).max(0.0));
        }
        let available = self.available_ul();
        let mut actual = nominal * self.factor;
        if actual >= available {
            actual = available;
            if self.factor > 0.0 {
                nominal = actual / self.factor;
            }
        }
        self.run_ul += nominal;
        let pushed = match self.direction {
            Direction::Infuse => {
                self.syringe_ul = (self.syringe_ul - actual).max(0.0);
                self.infused_ul += nominal;
                actual
            }
            Direction::Withdraw => {
                self.syringe_ul = (self.syringe_ul + actual).min(self.config.syringe_ul);
                self.reservoir_ul = (self.reservoir_ul - actual).max(0.0);
                self.withdrawn_ul += nominal;
                0.0
            }
        };
        let target_tol = VOLUME_EPS_UL * self.target_ul.max(1.0);
        if self.target_ul > 0.0 && self.run_ul >= self.target_ul - target_tol {
            self.state = PumpState::Stopped;
            self.run_ul = 0.0;
        } else if self.available_ul() <= VOLUME_EPS_UL {
            self.stall();
        }
        pushed
    }

    /// Counts liquid this pump delivered that ended up outside a vial.
    pub(crate) fn record_spill(&mut self, ul: f64) {
        self.spilled_ul += ul;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{LabConfig, LabModel};
    use super::*;
    use labctl_clock::{Clock, ManualClock};

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// A lab with the head homed over vial "v" at `position`.
    fn lab_over(position: &str, seed: u64) -> (LabModel, ManualClock) {
        let clock = ManualClock::new();
        let mut lab = LabModel::new(LabConfig::sim_default(), seed).unwrap();
        lab.gantry_home(clock.now()).unwrap();
        lab.add_vial(clock.now(), "v", position).unwrap();
        let p = lab.deck().position(position).unwrap();
        let target = [p.x_mm, p.y_mm, 20.0];
        lab.gantry_move(clock.now() + secs(1.0), target, None)
            .unwrap();
        clock.advance(secs(10.0));
        (lab, clock)
    }

    #[test]
    fn rate_limits_follow_the_syringe_diameter() {
        let (min, max) = rate_limits_ul_min(14.43);
        assert!((min - 0.001).abs() < 1e-5, "{min}");
        assert!((1450.0..1550.0).contains(&max), "{max}");
        let (_, max_small) = rate_limits_ul_min(4.78);
        assert!(max_small < max / 5.0);
        let (mut lab, clock) = lab_over("A1", 1);
        let (lo, hi) = lab.pump_status(clock.now(), 0).unwrap().rate_limits_ul_min;
        assert_eq!((lo, hi), (min, max));
        assert!(matches!(
            lab.pump_set_rate(clock.now(), 0, 2000.0),
            Err(PumpError::RateOutOfRange { .. })
        ));
        assert!(lab.pump_set_rate(clock.now(), 0, 0.0001).is_err());
        assert!(lab.pump_set_rate(clock.now(), 0, f64::NAN).is_err());
        assert_eq!(
            lab.pump_set_rate(clock.now(), 9, 10.0),
            Err(PumpError::NoSuchPump(9))
        );
        assert_eq!(lab.pump_run(clock.now(), 0), Err(PumpError::RateNotSet));
    }

    #[test]
    fn dispenses_rate_times_time_without_target() {
        let (mut lab, clock) = lab_over("A1", 2);
        let t0 = clock.now();
        lab.pump_set_rate(t0, 0, 600.0).unwrap();
        lab.pump_run(t0, 0).unwrap();
        clock.set(t0 + secs(30.0));
        let st = lab.pump_status(clock.now(), 0).unwrap();
        assert_eq!(st.state, PumpState::Infusing);
        assert!((st.infused_ul - 300.0).abs() < 1e-6, "{}", st.infused_ul);
        let vial = lab.vial("v").unwrap();
        let got = vial.contents.dye_ul[Dye::Red.index()];
        assert!((got - 300.0).abs() < 300.0 * 0.03, "{got}");
        assert!((st.syringe_ul - (10_000.0 - got)).abs() < 1e-6);
        lab.pump_stop(clock.now(), 0).unwrap();
        assert_eq!(
            lab.pump_status(clock.now(), 0).unwrap().state,
            PumpState::Paused
        );
        clock.advance(secs(30.0));
        let st = lab.pump_status(clock.now(), 0).unwrap();
        assert!(
            (st.infused_ul - 300.0).abs() < 1e-6,
            "paused pumps do not pump"
        );
    }

    #[test]
    fn stops_at_the_volume_target() {
        let (mut lab, clock) = lab_over("A1", 3);
        let t0 = clock.now();
        lab.pump_set_rate(t0, 1, 600.0).unwrap();
        lab.pump_set_volume(t0, 1, 100.0).unwrap();
        lab.pump_run(t0, 1).unwrap();
        assert_eq!(
            lab.pump_set_volume(t0, 1, 5.0),
            Err(PumpError::NotWhilePumping)
        );
        clock.set(t0 + secs(9.9));
        assert_eq!(
            lab.pump_status(clock.now(), 1).unwrap().state,
            PumpState::Infusing
        );
        clock.set(t0 + secs(10.0) + Duration::from_nanos(2));
        let st = lab.pump_status(clock.now(), 1).unwrap();
        assert_eq!(st.state, PumpState::Stopped);
        assert_eq!(st.state.prompt(), 'S');
        assert!((st.infused_ul - 100.0).abs() < 1e-6);
        clock.advance(secs(60.0));
        let st = lab.pump_status(clock.now(), 1).unwrap();
        assert!((st.infused_ul - 100.0).abs() < 1e-6);
        let got = lab.vial("v").unwrap().contents.dye_ul[Dye::Yellow.index()];
        assert!((got - 100.0).abs() < 3.0, "{got}");
        lab.pump_clear_dispensed(clock.now(), 1, Direction::Infuse)
            .unwrap();
        assert_eq!(lab.pump_status(clock.now(), 1).unwrap().infused_ul, 0.0);
    }

    #[test]
    fn pause_then_run_resumes_the_same_target() {
        let (mut lab, clock) = lab_over("A1", 4);
        let t0 = clock.now();
        lab.pump_set_rate(t0, 2, 60.0).unwrap();
        lab.pump_set_volume(t0, 2, 10.0).unwrap();
        lab.pump_run(t0, 2).unwrap();
        clock.set(t0 + secs(4.0));
        lab.pump_stop(clock.now(), 2).unwrap();
        clock.set(t0 + secs(100.0));
        lab.pump_run(clock.now(), 2).unwrap();
        clock.set(t0 + secs(105.9));
        assert_eq!(
            lab.pump_status(clock.now(), 2).unwrap().state,
            PumpState::Infusing
        );
        clock.set(t0 + secs(106.1));
        let st = lab.pump_status(clock.now(), 2).unwrap();
        assert_eq!(st.state, PumpState::Stopped);
        assert!((st.infused_ul - 10.0).abs() < 1e-6);
    }

    #[test]
    fn no_vial_under_the_head_spills() {
        let clock = ManualClock::new();
        let mut lab = LabModel::new(LabConfig::sim_default(), 5).unwrap();
        lab.pump_set_rate(clock.now(), 0, 120.0).unwrap();
        lab.pump_run(clock.now(), 0).unwrap();
        clock.advance(secs(60.0));
        let st = lab.pump_status(clock.now(), 0).unwrap();
        assert!(
            st.spilled_ul > 110.0 && st.spilled_ul < 130.0,
            "{}",
            st.spilled_ul
        );
        assert!((lab.stats().spilled_ul - st.spilled_ul).abs() < 1e-9);
    }

    #[test]
    fn empty_syringe_stalls_and_withdraw_refills() {
        let mut config = LabConfig::sim_default();
        config.pumps[0].fill_ul = 50.0;
        config.pumps[0].reservoir_ul = 30.0;
        let clock = ManualClock::new();
        let mut lab = LabModel::new(config, 6).unwrap();
        lab.gantry_unlock(clock.now()).unwrap();
        lab.add_vial(clock.now(), "v", "A1").unwrap();
        lab.gantry_move(clock.now(), [20.0, 20.0, 20.0], None)
            .unwrap();
        clock.advance(secs(5.0));
        lab.pump_set_rate(clock.now(), 0, 600.0).unwrap();
        lab.pump_set_volume(clock.now(), 0, 100.0).unwrap();
        lab.pump_run(clock.now(), 0).unwrap();
        clock.advance(secs(60.0));
        let st = lab.pump_status(clock.now(), 0).unwrap();
        assert_eq!(st.state, PumpState::Stopped);
        assert_eq!(st.alarm, Some(PumpAlarm::Stalled));
        assert_eq!(st.syringe_ul, 0.0);
        assert!(st.infused_ul > 45.0 && st.infused_ul < 55.0);
        assert!((lab.vial("v").unwrap().contents.total_ul() - 50.0).abs() < 1e-9);
        // RUN again stalls at once.
        lab.pump_run(clock.now(), 0).unwrap();
        assert_eq!(
            lab.pump_status(clock.now(), 0).unwrap().alarm,
            Some(PumpAlarm::Stalled)
        );
        // Withdraw refills from the reservoir until it runs dry.
        lab.pump_set_direction(clock.now(), 0, Direction::Withdraw)
            .unwrap();
        lab.pump_set_volume(clock.now(), 0, 0.0).unwrap();
        lab.pump_run(clock.now(), 0).unwrap();
        assert_eq!(lab.pump_status(clock.now(), 0).unwrap().state.prompt(), 'W');
        clock.advance(secs(60.0));
        let st = lab.pump_status(clock.now(), 0).unwrap();
        assert_eq!(st.alarm, Some(PumpAlarm::Stalled));
        assert!((st.syringe_ul - 30.0).abs() < 1e-9);
        assert_eq!(st.reservoir_ul, 0.0);
        assert!((lab.vial("v").unwrap().contents.total_ul() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn wrong_programmed_diameter_changes_the_delivered_volume() {
        let (mut lab, clock) = lab_over("A1", 7);
        let t = clock.now();
        lab.pump_set_diameter(t, 0, 14.43 / 2.0_f64.sqrt()).unwrap();
        lab.pump_set_rate(t, 0, 100.0).unwrap();
        lab.pump_set_volume(t, 0, 100.0).unwrap();
        lab.pump_run(t, 0).unwrap();
        lab.advance_to(clock.advance(secs(120.0)));
        let got = lab.vial("v").unwrap().contents.total_ul();
        assert!((got - 200.0).abs() < 6.0, "{got}");
    }

    #[test]
    fn volume_error_is_seeded() {
        let run = |seed: u64| {
            let (mut lab, clock) = lab_over("A1", seed);
            for i in 0..3 {
                lab.pump_set_rate(clock.now(), i, 500.0).unwrap();
                lab.pump_set_volume(clock.now(), i, 250.0).unwrap();
                lab.pump_run(clock.now(), i).unwrap();
            }
            lab.advance_to(clock.advance(secs(60.0)));
            lab.vial("v").unwrap().contents
        };
        let a = run(11);
        assert_eq!(a, run(11));
        assert_ne!(a, run(12));
        for ul in a.dye_ul {
            assert!((ul - 250.0).abs() < 250.0 * 0.03, "{ul}");
            assert_ne!(ul, 250.0);
        }
    }
}
