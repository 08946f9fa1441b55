//! Analytical balance (Mettler Toledo MT-SICS): weighs what stands on the weigh station, dynamic after a
//! change for a settling time, stable with tiny noise afterwards; zero and tare; overload and underload.
//!
//! Gross = load + drift - zero; displayed net = gross - tare, rounded to the readability.

use std::time::Duration;

use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::faults::FaultConfig;
use super::noise::gaussian;
use super::{ConfigError, check_non_negative, check_positive, secs_to_duration};

/// Balance settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceConfig {
    /// Maximum load (g); above it the balance reports overload.
    pub capacity_g: f64,
    /// Display resolution (g).
    pub readability_g: f64,
    /// Time the reading stays dynamic after a change (virtual s).
    pub settle_s: f64,
    /// Noise standard deviation while dynamic (g).
    pub dynamic_noise_g: f64,
    /// Noise standard deviation once stable (g).
    pub stable_noise_g: f64,
    /// Zeroing is refused when the load differs from the factory zero by more than this (g).
    pub zero_range_g: f64,
    /// Underload when the gross reading is below minus this margin (g).
    pub underload_margin_g: f64,
    /// Fault injection for the MT-SICS front end (drift in g per hour).
    pub faults: FaultConfig,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            capacity_g: 220.0,
            readability_g: 0.0001,
            settle_s: 1.5,
            dynamic_noise_g: 0.002,
            stable_noise_g: 0.00003,
            zero_range_g: 4.4,
            underload_margin_g: 1.0,
            faults: FaultConfig::default(),
        }
    }
}

impl BalanceConfig {
    /// Checks all values are usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_positive("balance.capacity_g", self.capacity_g)?;
        check_positive("balance.readability_g", self.readability_g)?;
        check_non_negative("balance.settle_s", self.settle_s)?;
        check_non_negative("balance.dynamic_noise_g", self.dynamic_noise_g)?;
        check_non_negative("balance.stable_noise_g", self.stable_noise_g)?;
        check_non_negative("balance.zero_range_g", self.zero_range_g)?;
        check_non_negative("balance.underload_margin_g", self.underload_margin_g)?;
        self.faults.validate("balance.faults")
    }
}

/// Whether the load lies within the weighing range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadState {
    /// Within range.
    InRange,
    /// Above capacity (MT-SICS `S +`).
    Overload,
    /// Below zero by more than the margin (MT-SICS `S -`).
    Underload,
}

/// One weight reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Net weight (g), rounded to the readability.
    pub value_g: f64,
    /// True once the settling time after the last change has passed.
    pub stable: bool,
    /// Overload or underload.
    pub load: LoadState,
}

/// A balance command that could not be executed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum BalanceError {
    /// The reading is dynamic (MT-SICS `Z I` / `T I`).
    #[error("balance not stable")]
    Unstable,
    /// The load exceeds the capacity.
    #[error("balance overloaded")]
    Overload,
    /// The load is below zero by more than the margin.
    #[error("balance underloaded")]
    Underload,
    /// Zero setting range exceeded (MT-SICS `Z +` / `Z -`).
    #[error("zero range exceeded: {0} g")]
    ZeroRange(f64),
    /// Taring range exceeded (MT-SICS `T +` / `T -`).
    #[error("tare range exceeded: {0} g")]
    TareRange(f64),
    /// The lab has no balance of this index.
    #[error("no balance {0}")]
    NoSuchBalance(usize),
}

/// The balance.
#[derive(Debug, Clone)]
pub struct Balance {
    config: BalanceConfig,
    rng: SmallRng,
    zero_g: f64,
    tare_g: f64,
    last_change: Duration,
    drift_g: f64,
}

impl Balance {
    /// A balance at factory zero, no tare, settling after power-on at time zero.
    pub fn new(config: BalanceConfig, rng: SmallRng) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            rng,
            zero_g: 0.0,
            tare_g: 0.0,
            last_change: Duration::ZERO,
            drift_g: 0.0,
        })
    }

    /// The balance settings.
    pub fn config(&self) -> &BalanceConfig {
        &self.config
    }

    /// Replaces the fault settings.
    pub(crate) fn set_faults(&mut self, faults: FaultConfig) {
        self.config.faults = faults;
    }

    /// Marks a change of load at time `t`: the reading is dynamic until `t + settle`.
    pub fn disturb(&mut self, t: Duration) {
        self.last_change = self.last_change.max(t);
    }

    /// Time at which the reading becomes stable (front ends use it to answer `S`).
    pub fn stable_at(&self) -> Duration {
        self.last_change
            .saturating_add(secs_to_duration(self.config.settle_s))
    }

    /// True when the reading is stable at `t`.
    pub fn is_stable(&self, t: Duration) -> bool {
        t >= self.stable_at()
    }

    /// Current tare (g).
    pub fn tare_g(&self) -> f64 {
        self.tare_g
    }

    /// Accumulated sensor drift (g).
    pub fn drift_g(&self) -> f64 {
        self.drift_g
    }

    /// Accumulates drift over `dt`.
    pub fn advance(&mut self, dt: Duration) {
        self.drift_g += self.config.faults.drift_over(dt);
    }

    fn gross(&self, load_g: f64) -> f64 {
        load_g + self.drift_g - self.zero_g
    }

    fn load_state(&self, load_g: f64) -> LoadState {
        if load_g > self.config.capacity_g {
            LoadState::Overload
        } else if self.gross(load_g) < -self.config.underload_margin_g {
            LoadState::Underload
        } else {
            LoadState::InRange
        }
    }

    fn round(&self, g: f64) -> f64 {
        let r = self.config.readability_g;
        (g / r).round() * r
    }

    /// Reads the balance at `t` with `load_g` on the pan.
    pub fn read(&mut self, t: Duration, load_g: f64) -> Reading {
        let stable = self.is_stable(t);
        let sd = if stable {
            self.config.stable_noise_g
        } else {
            self.config.dynamic_noise_g
        };
        let net = self.gross(load_g) - self.tare_g + gaussian(&mut self.rng, sd);
        Reading {
            value_g: self.round(net),
            stable,
            load: self.load_state(load_g),
        }
    }

    fn check_ready(&self, t: Duration, load_g: f64, immediate: bool) -> Result<(), BalanceError> {
        match self.load_state(load_g) {
            LoadState::Overload => return Err(BalanceError::Overload),
            LoadState::Underload if !immediate => return Err(BalanceError::Underload),
            _ => {}
        }
        if !immediate && !self.is_stable(t) {
            return Err(BalanceError::Unstable);
        }
        Ok(())
    }

    /// Z (or ZI when `immediate`): sets zero to the current load and clears the tare.
    pub fn zero(&mut self, t: Duration, load_g: f64, immediate: bool) -> Result<(), BalanceError> {
        self.check_ready(t, load_g, immediate)?;
        let raw = load_g + self.drift_g;
        if raw.abs() > self.config.zero_range_g {
            return Err(BalanceError::ZeroRange(raw));
        }
        self.zero_g = raw;
        self.tare_g = 0.0;
        Ok(())
    }

    /// T (or TI when `immediate`): stores the current gross weight as tare.
    pub fn tare(&mut self, t: Duration, load_g: f64, immediate: bool) -> Result<(), BalanceError> {
        self.check_ready(t, load_g, immediate)?;
        let gross = self.gross(load_g);
        if !(0.0..=self.config.capacity_g).contains(&gross) {
            return Err(BalanceError::TareRange(gross));
        }
        self.tare_g = self.round(gross);
        Ok(())
    }

    /// TAC: clears the tare.
    pub fn clear_tare(&mut self) {
        self.tare_g = 0.0;
    }

    /// `TA <value>`: presets the tare (g), refused outside 0..=capacity.
    pub fn preset_tare(&mut self, tare_g: f64) -> Result<(), BalanceError> {
        if !(tare_g.is_finite() && (0.0..=self.config.capacity_g).contains(&tare_g)) {
            return Err(BalanceError::TareRange(tare_g));
        }
        self.tare_g = self.round(tare_g);
        Ok(())
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

    fn lab_with(config: LabConfig, seed: u64) -> (LabModel, ManualClock) {
        let clock = ManualClock::new();
        let lab = LabModel::new(config, seed).unwrap();
        clock.advance(secs(10.0));
        (lab, clock)
    }

    #[test]
    fn empty_pan_reads_zero_once_settled() {
        let (mut lab, clock) = lab_with(LabConfig::sim_default(), 1);
        let r = lab.balance_read(clock.now(), 0).unwrap();
        assert!(r.stable);
        assert_eq!(r.load, LoadState::InRange);
        assert!(r.value_g.abs() <= 0.0002, "{}", r.value_g);
    }

    #[test]
    fn vial_is_unstable_then_stable_with_the_right_mass() {
        let (mut lab, clock) = lab_with(LabConfig::sim_default(), 2);
        let t0 = clock.now();
        lab.add_vial(t0, "v", "W1").unwrap();
        let r = lab.balance_read(t0 + secs(0.2), 0).unwrap();
        assert!(!r.stable);
        assert!((r.value_g - 10.0).abs() < 0.02);
        assert_eq!(
            lab.balance_stable_at(t0 + secs(0.2), 0).unwrap(),
            t0 + secs(1.5)
        );
        assert_eq!(
            lab.balance_zero(t0 + secs(0.3), 0, false),
            Err(BalanceError::Unstable)
        );
        clock.set(t0 + secs(1.49));
        assert!(!lab.balance_read(clock.now(), 0).unwrap().stable);
        clock.set(t0 + secs(1.5));
        let r = lab.balance_read(clock.now(), 0).unwrap();
        assert!(r.stable);
        assert!((r.value_g - 10.0).abs() <= 0.0002, "{}", r.value_g);
        // Readings are rounded to 0.1 mg.
        let steps = r.value_g / 0.0001;
        assert!((steps - steps.round()).abs() < 1e-6);
    }

    #[test]
    fn dynamic_readings_are_noisier_than_stable_ones() {
        let (mut lab, clock) = lab_with(LabConfig::sim_default(), 3);
        let t0 = clock.now();
        lab.add_vial(t0, "v", "W1").unwrap();
        let spread = |lab: &mut LabModel, t: Duration| {
            let v: Vec<f64> = (0..50)
                .map(|_| lab.balance_read(t, 0).unwrap().value_g)
                .collect();
            v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min)
        };
        let dynamic = spread(&mut lab, t0 + secs(0.5));
        let stable = spread(&mut lab, t0 + secs(5.0));
        assert!(dynamic > 0.002, "{dynamic}");
        assert!(stable <= 0.0003, "{stable}");
    }

    #[test]
    fn tare_and_zero() {
        let (mut lab, clock) = lab_with(LabConfig::sim_default(), 4);
        let t0 = clock.now();
        lab.add_vial(t0, "v", "W1").unwrap();
        clock.advance(secs(2.0));
        assert_eq!(
            lab.balance_zero(clock.now(), 0, false),
            Err(BalanceError::ZeroRange(10.0))
        );
        lab.balance_tare(clock.now(), 0, false).unwrap();
        assert!((lab.balance_tare_g(0).unwrap() - 10.0).abs() < 1e-9);
        assert!(lab.balance_read(clock.now(), 0).unwrap().value_g.abs() <= 0.0002);
        lab.remove_vial(clock.now(), "v").unwrap();
        clock.advance(secs(2.0));
        let r = lab.balance_read(clock.now(), 0).unwrap();
        assert!((r.value_g + 10.0).abs() <= 0.0002);
        assert_eq!(r.load, LoadState::InRange);
        lab.balance_zero(clock.now(), 0, false).unwrap();
        assert_eq!(lab.balance_tare_g(0).unwrap(), 0.0);
        assert!(lab.balance_read(clock.now(), 0).unwrap().value_g.abs() <= 0.0002);
    }

    #[test]
    fn overload_above_capacity_and_underload_below_zero() {
        let mut config = LabConfig::sim_default();
        config.balance.capacity_g = 12.0;
        config.balance.zero_range_g = 20.0;
        let (mut lab, clock) = lab_with(config, 5);
        lab.add_vial(clock.now(), "v", "W1").unwrap();
        clock.advance(secs(2.0));
        assert_eq!(
            lab.balance_read(clock.now(), 0).unwrap().load,
            LoadState::InRange
        );
        // Zero with the vial on, then lift it off: underload.
        lab.balance_zero(clock.now(), 0, false).unwrap();
        let vial = lab.remove_vial(clock.now(), "v").unwrap();
        assert_eq!(vial.tare_g, 10.0);
        clock.advance(secs(2.0));
        assert_eq!(
            lab.balance_read(clock.now(), 0).unwrap().load,
            LoadState::Underload
        );
        assert_eq!(
            lab.balance_tare(clock.now(), 0, false),
            Err(BalanceError::Underload)
        );
        lab.balance_zero(clock.now(), 0, true).unwrap();
        // 10 g vial plus 2.5 mL exceeds 12 g.
        lab.add_vial(clock.now(), "w", "W1").unwrap();
        lab.gantry_unlock(clock.now()).unwrap();
        lab.gantry_move(clock.now(), [200.0, 40.0, 20.0], None)
            .unwrap();
        clock.advance(secs(5.0));
        lab.pump_set_rate(clock.now(), 0, 1500.0).unwrap();
        lab.pump_set_volume(clock.now(), 0, 2500.0).unwrap();
        lab.pump_run(clock.now(), 0).unwrap();
        clock.advance(secs(50.0));
        assert!(
            !lab.balance_read(clock.now(), 0).unwrap().stable,
            "still dispensing"
        );
        clock.advance(secs(60.0));
        assert!(lab.balance_read(clock.now(), 0).unwrap().stable);
        assert_eq!(
            lab.balance_read(clock.now(), 0).unwrap().load,
            LoadState::Overload
        );
        assert_eq!(
            lab.balance_tare(clock.now(), 0, false),
            Err(BalanceError::Overload)
        );
    }

    #[test]
    fn dispensing_at_the_weigh_station_reads_tare_plus_liquid() {
        let (mut lab, clock) = lab_with(LabConfig::sim_default(), 6);
        lab.add_vial(clock.now(), "v", "W1").unwrap();
        lab.gantry_unlock(clock.now()).unwrap();
        lab.gantry_move(clock.now(), [200.0, 40.0, 20.0], None)
            .unwrap();
        clock.advance(secs(5.0));
        lab.balance_tare(clock.now(), 0, false).unwrap();
        for (i, ul) in [(0, 400.0), (1, 300.0), (2, 200.0)] {
            lab.pump_set_rate(clock.now(), i, 600.0).unwrap();
            lab.pump_set_volume(clock.now(), i, ul).unwrap();
            lab.pump_run(clock.now(), i).unwrap();
        }
        clock.advance(secs(20.0));
        assert!(!lab.balance_read(clock.now() + secs(0.1), 0).unwrap().stable);
        clock.advance(secs(40.0));
        let r = lab.balance_read(clock.now(), 0).unwrap();
        assert!(r.stable);
        let vial = lab.vial("v").unwrap();
        let liquid = vial.contents.total_ul();
        assert!((liquid - 900.0).abs() < 900.0 * 0.02, "{liquid}");
        assert!(
            (r.value_g - liquid / 1000.0).abs() <= 0.0002,
            "{} vs {liquid}",
            r.value_g
        );
        assert!((vial.mass_g(1.0) - 10.0 - liquid / 1000.0).abs() < 1e-12);
    }

    #[test]
    fn drift_grows_with_time() {
        let mut config = LabConfig::sim_default();
        config.balance.faults.drift_per_hour = 0.01;
        let (mut lab, clock) = lab_with(config, 7);
        clock.set(Duration::from_secs(2 * 3600));
        let r = lab.balance_read(clock.now(), 0).unwrap();
        assert!((r.value_g - 0.02).abs() <= 0.0002, "{}", r.value_g);
    }
}
