//! Physical model of the simulated dye-mixing lab (see `sim-lab.md`): deck, gantry, syringe pumps, balance,
//! hotplate stirrer and spectrometer behind one [`LabModel`].
//!
//! The model is pure and deterministic: no I/O, no threads, no clock reads. Every method takes the virtual
//! time `now` (a [`Duration`] since the start of the run, usually from a [`Clock`]) and first advances the
//! physics to it with [`LabModel::advance_to`]; a `now` earlier than the model's time counts as the model's
//! time. All randomness comes from `SmallRng` streams seeded from the model seed, so the same seed and the
//! same command sequence give the same readings. The wire front ends (GRBL, NE-1000, MT-SICS, IKA NAMUR,
//! SCPI) translate bytes into these calls; byte-level faults are theirs, read from [`FaultConfig`].
#![warn(missing_docs)]

pub mod balance;
pub mod deck;
pub mod faults;
pub mod gantry;
pub mod hotplate;
pub(crate) mod noise;
pub mod pump;
pub mod spectro;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use balance::{Balance, BalanceConfig, BalanceError, LoadState, Reading};
pub use deck::{
    Contents, Deck, DeckConfig, DeckError, DeckPosition, Dye, Liquid, Vial, VialLocation,
};
pub use faults::{FaultConfig, FaultStats, InstrumentId};
pub use gantry::{
    Gantry, GantryAlarm, GantryConfig, GantryError, GantryEvent, GantryState, GantryStatus,
    Position,
};
pub use hotplate::{Hotplate, HotplateConfig, HotplateError, HotplateStatus};
pub use pump::{Direction, Pump, PumpAlarm, PumpConfig, PumpError, PumpState, PumpStatus};
pub use spectro::{DyeSpec, Spectro, SpectroConfig, SpectroError, Spectrum};

/// A model configuration the model cannot use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A field has an unusable value.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub(crate) fn check_finite(field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::invalid(field, format!("{v} is not finite")))
    }
}

pub(crate) fn check_positive(field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(ConfigError::invalid(field, format!("{v} is not positive")))
    }
}

pub(crate) fn check_non_negative(field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{v} is negative or not finite"),
        ))
    }
}

/// Longest span the model represents (about 31 700 years); longer spans saturate.
const FAR_FUTURE_S: f64 = 1.0e12;

/// Seconds to a `Duration`, saturating: negative or NaN gives zero, huge gives a far-future span.
pub(crate) fn secs_to_duration(s: f64) -> Duration {
    if s.is_nan() || s <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(s.min(FAR_FUTURE_S))
    }
}

/// Everything about the simulated lab (a lab file can deserialise it; missing fields take defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabConfig {
    /// Room temperature (C).
    pub ambient_c: f64,
    /// Density of all stocks and water (g/mL).
    pub density_g_per_ml: f64,
    /// Deck layout and vial defaults.
    pub deck: DeckConfig,
    /// Gantry settings.
    pub gantry: GantryConfig,
    /// Pumps, addressed by index (NE-1000 network address).
    pub pumps: Vec<PumpConfig>,
    /// Balance settings (every balance of the lab is this model of balance).
    pub balance: BalanceConfig,
    /// Balances beyond the first (which stands on `deck.weigh_station`), each on a deck position of its
    /// own: a lab with two balances weighs on both.
    pub more_balances: Vec<Stationed>,
    /// Hotplate settings (every hotplate of the lab is this model of hotplate).
    pub hotplate: HotplateConfig,
    /// Hotplates beyond the first (which stands under `deck.stir_station`), each under a deck position
    /// of its own.
    pub more_hotplates: Vec<Stationed>,
    /// Spectrometer settings.
    pub spectro: SpectroConfig,
    /// Absorption bands and stock concentrations, indexed by [`Dye::index`].
    pub dyes: [DyeSpec; 3],
}

impl Default for LabConfig {
    fn default() -> Self {
        Self::sim_default()
    }
}

impl LabConfig {
    /// The simulated lab of `sim-lab.md`: default deck, gantry, red/yellow/blue pumps, balance, hotplate, spectrometer.
    pub fn sim_default() -> Self {
        Self {
            ambient_c: 22.0,
            density_g_per_ml: 1.0,
            deck: DeckConfig::sim_default(),
            gantry: GantryConfig::default(),
            pumps: Dye::ALL.into_iter().map(PumpConfig::sim_default).collect(),
            balance: BalanceConfig::default(),
            more_balances: Vec::new(),
            hotplate: HotplateConfig::default(),
            more_hotplates: Vec::new(),
            spectro: SpectroConfig::default(),
            dyes: DyeSpec::sim_defaults(),
        }
    }

    /// Checks the whole configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_finite("ambient_c", self.ambient_c)?;
        check_positive("density_g_per_ml", self.density_g_per_ml)?;
        self.deck.validate()?;
        self.gantry.validate()?;
        for (i, p) in self.pumps.iter().enumerate() {
            p.validate()?;
            if self.pumps[..i].iter().any(|q| q.id == p.id) {
                return Err(ConfigError::invalid(
                    "pumps",
                    format!("duplicate pump id {}", p.id),
                ));
            }
        }
        self.balance.validate()?;
        check_stationed(
            "more_balances",
            &self.more_balances,
            &self.deck.weigh_station,
            &self.deck,
        )?;
        self.hotplate.validate()?;
        check_stationed(
            "more_hotplates",
            &self.more_hotplates,
            &self.deck.stir_station,
            &self.deck,
        )?;
        self.spectro.validate()?;
        for d in Dye::ALL {
            self.dyes[d.index()].validate(&format!("dyes.{}", d.name()))?;
        }
        Ok(())
    }
}

/// A balance or hotplate beyond the first of its kind, where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stationed {
    /// Its instrument id (the first of each kind is `balance` or `hotplate`).
    pub id: String,
    /// The deck position on its pan or plate.
    pub station: String,
}

/// Each of `list` (`field`) stands on a position of the deck that no other of its kind (the first on
/// `first`) stands on, under an id of its own.
fn check_stationed(
    field: &str,
    list: &[Stationed],
    first: &str,
    deck: &DeckConfig,
) -> Result<(), ConfigError> {
    for (i, unit) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        if !deck.positions.iter().any(|p| p.name == unit.station) {
            return Err(ConfigError::invalid(
                format!("{at}.station"),
                format!("no position named {}", unit.station),
            ));
        }
        let others = std::iter::once(first).chain(list[..i].iter().map(|o| o.station.as_str()));
        if others.into_iter().any(|s| s == unit.station) {
            return Err(ConfigError::invalid(
                format!("{at}.station"),
                format!("{} is taken by another of its kind", unit.station),
            ));
        }
        if list[..i].iter().any(|o| o.id == unit.id) {
            return Err(ConfigError::invalid(
                format!("{at}.id"),
                format!("duplicate id {}", unit.id),
            ));
        }
    }
    Ok(())
}

/// Safety net: after this many event steps in one `advance_to`, the rest is integrated in one step.
const MAX_EVENT_STEPS: u32 = 1_000_000;
/// Shortest sub-step while the head moves with a pump running.
const MIN_SUBSTEP: Duration = Duration::from_millis(1);

/// The whole simulated lab: one deck, gantry, pumps, balances, hotplates and spectrometer in virtual time.
#[derive(Debug, Clone)]
pub struct LabModel {
    config: LabConfig,
    now: Duration,
    deck: Deck,
    gantry: Gantry,
    pumps: Vec<Pump>,
    /// The balance on `deck.weigh_station`, then one per `more_balances` entry: a balance is addressed by
    /// this index, like a pump.
    balances: Vec<Balance>,
    /// The hotplate under `deck.stir_station`, then one per `more_hotplates` entry.
    hotplates: Vec<Hotplate>,
    spectro: Spectro,
    stats: FaultStats,
    /// Instruments simulated from their definitions: their names and fault settings (their state lives in
    /// their devices; the model keeps what fault files and the fault API address by name).
    defined: Vec<(String, FaultConfig)>,
}

impl LabModel {
    /// A lab at virtual time zero: empty deck, gantry in its power-on alarm, pumps stopped with full syringes.
    pub fn new(config: LabConfig, seed: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        let pumps = config
            .pumps
            .iter()
            .enumerate()
            .map(|(i, c)| Pump::new(c.clone(), noise::stream(seed, 16 + i as u64)))
            .collect::<Result<Vec<_>, _>>()?;
        // The first balance keeps the stream it always had, so a lab of one balance reads as before.
        let balances = (0..=config.more_balances.len())
            .map(|i| {
                let stream = if i == 0 { 1 } else { 64 + i as u64 };
                Balance::new(config.balance.clone(), noise::stream(seed, stream))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            now: Duration::ZERO,
            deck: Deck::new(config.deck.clone())?,
            gantry: Gantry::new(config.gantry.clone())?,
            pumps,
            balances,
            hotplates: (0..=config.more_hotplates.len())
                .map(|_| Hotplate::new(config.hotplate.clone(), config.ambient_c))
                .collect::<Result<Vec<_>, _>>()?,
            spectro: Spectro::new(config.spectro.clone(), noise::stream(seed, 2))?,
            stats: FaultStats::default(),
            defined: Vec::new(),
            config,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// The model's virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Physical faults counted so far (spills, overflows, dropped vials).
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    // ----- time -----

    /// Advances the physics to virtual time `t` (no-op if `t` is not after the model's time).
    pub fn advance_to(&mut self, t: Duration) {
        let mut steps = 0u32;
        while self.now < t {
            steps += 1;
            let next = if steps > MAX_EVENT_STEPS {
                t
            } else {
                self.next_stop(t)
            };
            self.step(next);
        }
    }

    /// The next time at which something discrete happens, at most `t`.
    fn next_stop(&self, t: Duration) -> Duration {
        let now = self.now;
        let mut next = t;
        let mut consider = |at: Duration| {
            if at < next {
                next = at;
            }
        };
        if let Some(d) = self.gantry.next_event_in() {
            consider(now.saturating_add(d));
        }
        for p in &self.pumps {
            if let Some(d) = p.next_event_in() {
                consider(now.saturating_add(d));
            }
        }
        for hotplate in &self.hotplates {
            if let Some(at) = hotplate.watchdog_expiry() {
                consider(at);
            }
        }
        // While the head moves over the deck with liquid flowing, re-check what is under it every half tolerance.
        if self.gantry.is_moving() && self.pumps.iter().any(Pump::is_running) {
            let speed = self.gantry.speed_mm_s();
            if speed > 0.0 {
                let sub = secs_to_duration(0.5 * self.deck.config().position_tolerance_mm / speed);
                consider(now.saturating_add(sub.max(MIN_SUBSTEP)));
            }
        }
        next.max(now.saturating_add(Duration::from_nanos(1))).min(t)
    }

    /// Integrates everything over [now, to], with discrete events landing at `to`.
    fn step(&mut self, to: Duration) {
        let dt = to.saturating_sub(self.now);
        if dt.is_zero() {
            self.now = self.now.max(to);
            return;
        }
        let dt_s = dt.as_secs_f64();

        // Pumps deliver into whatever was under the head at the start of the step.
        let target = self.vial_index_under_head();
        for i in 0..self.pumps.len() {
            let out = self.pumps[i].advance(dt);
            if out > 0.0 {
                self.deliver(i, out, target, to);
            }
        }

        // Heat, cooling and mixing of the vials: each hotplate's on the vial standing on it.
        let mut heated: Vec<(usize, f64, f64)> = Vec::new();
        for h in 0..self.hotplates.len() {
            let vial = self.hotplate_station(h).and_then(|s| self.deck.index_at(s));
            let hotplate = &mut self.hotplates[h];
            let thermal_target = hotplate.thermal_target();
            let stir_integral = hotplate.advance(to, dt);
            if let Some(k) = vial {
                heated.push((k, thermal_target, stir_integral));
            }
        }
        let ambient = self.config.ambient_c;
        let vial_tau = self.config.hotplate.vial_tau_s;
        let mix_rpm_s = self.config.hotplate.mix_rpm_s;
        let passive_mix_s = self.deck.config().passive_mix_s;
        let cooling_tau = self.deck.config().cooling_tau_s;
        for (k, vial) in self.deck.vials_mut().iter_mut().enumerate() {
            let mut exponent = dt_s / passive_mix_s;
            if let Some(&(_, thermal_target, stir_integral)) = heated.iter().find(|h| h.0 == k) {
                vial.relax_temperature(thermal_target, dt_s, vial_tau);
                exponent += stir_integral / mix_rpm_s;
            } else {
                vial.relax_temperature(ambient, dt_s, cooling_tau);
            }
            vial.mix(exponent);
        }

        // Motion, then what the gripper did at the end of it.
        self.gantry.advance(dt);
        self.now = to;
        self.apply_gantry_events();

        for balance in &mut self.balances {
            balance.advance(dt);
        }
        self.spectro.advance(dt);
    }

    /// Index of the vial under the head: the one in the gripper, else the one standing where the head is.
    fn vial_index_under_head(&self) -> Option<usize> {
        self.deck.held_index().or_else(|| {
            let [x, y, _] = self.gantry.position();
            let name = &self.deck.position_near(x, y)?.name;
            self.deck.index_at(name)
        })
    }

    fn deliver(&mut self, pump: usize, ul: f64, target: Option<usize>, at: Duration) {
        let liquid = self.pumps[pump].liquid();
        let Some(k) = target.filter(|&k| k < self.deck.vials().len()) else {
            self.stats.spilled_ul += ul;
            self.pumps[pump].record_spill(ul);
            return;
        };
        let overflow = self.deck.vials_mut()[k].add_liquid(liquid, ul, self.config.ambient_c);
        if overflow > 0.0 {
            self.stats.overflow_ul += overflow;
            self.pumps[pump].record_spill(overflow);
        }
        self.disturb_balance_holding(k, at);
    }

    /// Applies gripper events at the current head position and time.
    fn apply_gantry_events(&mut self) {
        for event in self.gantry.take_events() {
            let GantryEvent::Gripper { closed } = event;
            let [x, y, z] = self.gantry.position();
            let low = z <= self.deck.config().grip_z_max_mm + 1e-9;
            let spot = self.deck.position_near(x, y).map(|p| p.name.clone());
            if closed {
                let free = self.deck.held_index().is_none();
                if let Some(name) = spot.filter(|_| low && free)
                    && self.deck.vial_at(&name).is_some()
                {
                    // Cannot fail: the gripper is free and a vial stands there.
                    let _ = self.deck.pick(&name);
                    self.disturb_balance_at(&name);
                }
            } else if let Some(k) = self.deck.held_index() {
                match spot.filter(|_| low) {
                    Some(name) if self.deck.place(&name).is_ok() => {
                        self.disturb_balance_at(&name);
                    }
                    _ => {
                        if let Some(vial) = self.deck.remove_index(k) {
                            self.stats.dropped_vials += 1;
                            self.stats.dropped_ul += vial.contents.total_ul();
                        }
                    }
                }
            }
        }
    }

    // ----- deck -----

    /// The deck with its positions and vials, as of the model's time (call `advance_to` first).
    pub fn deck(&self) -> &Deck {
        &self.deck
    }

    /// The vial with this id, as of the model's time (call `advance_to` first).
    pub fn vial(&self, id: &str) -> Option<&Vial> {
        self.deck.vial(id)
    }

    /// The vial the head would dispense into or measure: held by the gripper, else standing under the head.
    pub fn vial_under_head(&mut self, now: Duration) -> Option<&Vial> {
        self.advance_to(now);
        self.vial_index_under_head().map(|k| &self.deck.vials()[k])
    }

    /// Places a fresh, empty vial in an empty position (the lab's "fresh vial" step).
    pub fn add_vial(&mut self, now: Duration, id: &str, position: &str) -> Result<(), DeckError> {
        self.advance_to(now);
        self.deck.add_vial(id, position)?;
        self.disturb_balance_at(position);
        Ok(())
    }

    /// Takes a vial off the deck (or out of the gripper) and returns it.
    pub fn remove_vial(&mut self, now: Duration, id: &str) -> Result<Vial, DeckError> {
        self.advance_to(now);
        let vial = self.deck.remove_vial(id)?;
        if let Some(position) = vial.position() {
            self.disturb_balance_at(position);
        }
        Ok(vial)
    }

    /// Sets a vial's capacity (uL; ignored unless finite and positive) and its contents, as a protocol's
    /// labware declares them (the dry run uses it for `capacity_ul` and `initial_volume_ul`).
    pub fn set_vial(
        &mut self,
        now: Duration,
        id: &str,
        capacity_ul: f64,
        contents: Contents,
    ) -> Result<(), DeckError> {
        self.advance_to(now);
        let k = self
            .deck
            .vials()
            .iter()
            .position(|v| v.id == id)
            .ok_or_else(|| DeckError::NoSuchVial(id.into()))?;
        let vial = &mut self.deck.vials_mut()[k];
        if capacity_ul.is_finite() && capacity_ul > 0.0 {
            vial.capacity_ul = capacity_ul;
        }
        vial.contents = Contents::new(contents.dye_ul, contents.water_ul);
        vial.homogeneity = 1.0;
        let now = self.now;
        self.disturb_balance_holding(k, now);
        Ok(())
    }

    // ----- gantry -----

    fn with_gantry<T>(&mut self, now: Duration, f: impl FnOnce(&mut Gantry) -> T) -> T {
        self.advance_to(now);
        let result = f(&mut self.gantry);
        self.apply_gantry_events();
        result
    }

    /// `$H`: starts homing.
    pub fn gantry_home(&mut self, now: Duration) -> Result<(), GantryError> {
        self.with_gantry(now, Gantry::home)
    }

    /// `$X`: clears the alarm lock without homing.
    pub fn gantry_unlock(&mut self, now: Duration) -> Result<(), GantryError> {
        self.with_gantry(now, Gantry::unlock)
    }

    /// G0 (`feed_mm_min` None) or G1 to an absolute machine position; queued behind earlier moves.
    pub fn gantry_move(
        &mut self,
        now: Duration,
        target: Position,
        feed_mm_min: Option<f64>,
    ) -> Result<(), GantryError> {
        self.with_gantry(now, |g| g.move_to(target, feed_mm_min))
    }

    /// M8 (`closed` true: grip the vial under a lowered head) or M9 (release it here); queued in order.
    pub fn gantry_grip(&mut self, now: Duration, closed: bool) -> Result<(), GantryError> {
        self.with_gantry(now, |g| g.set_gripper(closed))
    }

    /// `!` feed hold.
    pub fn gantry_feed_hold(&mut self, now: Duration) {
        self.with_gantry(now, Gantry::feed_hold)
    }

    /// `~` cycle start (resume after hold).
    pub fn gantry_resume(&mut self, now: Duration) {
        self.with_gantry(now, Gantry::resume)
    }

    /// Ctrl-X soft reset (opens the gripper; in motion: ALARM:3).
    pub fn gantry_reset(&mut self, now: Duration) {
        self.with_gantry(now, Gantry::soft_reset)
    }

    /// Gantry status report.
    pub fn gantry_status(&mut self, now: Duration) -> GantryStatus {
        self.advance_to(now);
        GantryStatus {
            state: self.gantry.state(),
            position: self.gantry.position(),
            feed_mm_min: self.gantry.feed_mm_min(),
            gripper_closed: self.gantry.gripper_closed(),
            held_vial: self.deck.held_vial().map(|v| v.id.clone()),
            planner_free: self.gantry.planner_free(),
        }
    }

    /// The gantry itself (settings, limits, state without advancing time).
    pub fn gantry(&self) -> &Gantry {
        &self.gantry
    }

    // ----- pumps -----

    /// Number of pumps.
    pub fn pump_count(&self) -> usize {
        self.pumps.len()
    }

    /// One pump (settings, state, time to its next event) without advancing time, like [`LabModel::gantry`].
    pub fn pump(&self, index: usize) -> Option<&Pump> {
        self.pumps.get(index)
    }

    fn pump_at(&mut self, now: Duration, index: usize) -> Result<&mut Pump, PumpError> {
        self.advance_to(now);
        self.pumps
            .get_mut(index)
            .ok_or(PumpError::NoSuchPump(index))
    }

    /// RAT: pumping rate (uL/min).
    pub fn pump_set_rate(
        &mut self,
        now: Duration,
        index: usize,
        rate_ul_min: f64,
    ) -> Result<(), PumpError> {
        self.pump_at(now, index)?.set_rate(rate_ul_min)
    }

    /// VOL: volume target per run (uL, 0 = none).
    pub fn pump_set_volume(
        &mut self,
        now: Duration,
        index: usize,
        target_ul: f64,
    ) -> Result<(), PumpError> {
        self.pump_at(now, index)?.set_volume(target_ul)
    }

    /// DIR: pumping direction.
    pub fn pump_set_direction(
        &mut self,
        now: Duration,
        index: usize,
        direction: Direction,
    ) -> Result<(), PumpError> {
        self.pump_at(now, index)?.set_direction(direction)
    }

    /// DIA: programmed syringe diameter (mm).
    pub fn pump_set_diameter(
        &mut self,
        now: Duration,
        index: usize,
        diameter_mm: f64,
    ) -> Result<(), PumpError> {
        self.pump_at(now, index)?.set_diameter(diameter_mm)
    }

    /// RUN: starts or resumes pumping.
    pub fn pump_run(&mut self, now: Duration, index: usize) -> Result<(), PumpError> {
        self.pump_at(now, index)?.run()
    }

    /// STP: pauses a running pump, stops a paused one.
    pub fn pump_stop(&mut self, now: Duration, index: usize) -> Result<(), PumpError> {
        self.pump_at(now, index)?.stop();
        Ok(())
    }

    /// Clears a pending pump alarm.
    pub fn pump_clear_alarm(&mut self, now: Duration, index: usize) -> Result<(), PumpError> {
        self.pump_at(now, index)?.clear_alarm();
        Ok(())
    }

    /// CLD: clears the infused or withdrawn counter.
    pub fn pump_clear_dispensed(
        &mut self,
        now: Duration,
        index: usize,
        direction: Direction,
    ) -> Result<(), PumpError> {
        self.pump_at(now, index)?.clear_dispensed(direction);
        Ok(())
    }

    /// Pump status (state, alarm, rate, limits, target, DIS counters, syringe and reservoir).
    pub fn pump_status(&mut self, now: Duration, index: usize) -> Result<PumpStatus, PumpError> {
        Ok(self.pump_at(now, index)?.status())
    }

    // ----- balance -----

    /// Number of balances (1 + `more_balances`).
    pub fn balance_count(&self) -> usize {
        self.balances.len()
    }

    /// The deck position on balance `index`'s pan.
    fn balance_station(&self, index: usize) -> Option<&str> {
        match index {
            0 => Some(&self.config.deck.weigh_station),
            k => self
                .config
                .more_balances
                .get(k - 1)
                .map(|b| b.station.as_str()),
        }
    }

    /// A load changed at `position`: the balance there (if any) turns dynamic.
    fn disturb_balance_at(&mut self, position: &str) {
        let now = self.now;
        if let Some(b) =
            (0..self.balances.len()).find(|&b| self.balance_station(b) == Some(position))
        {
            self.balances[b].disturb(now);
        }
    }

    /// The contents of vial `k` changed at `at`: the balance it stands on (if any) turns dynamic.
    fn disturb_balance_holding(&mut self, k: usize, at: Duration) {
        for b in 0..self.balances.len() {
            if self
                .balance_station(b)
                .is_some_and(|s| self.deck.index_at(s) == Some(k))
            {
                self.balances[b].disturb(at);
            }
        }
    }

    fn balance_load_g(&self, index: usize) -> f64 {
        self.balance_station(index)
            .and_then(|s| self.deck.index_at(s))
            .map_or(0.0, |k| {
                self.deck.vials()[k].mass_g(self.config.density_g_per_ml)
            })
    }

    /// Balance `index`, at `now`, with its load.
    fn balance_at(
        &mut self,
        now: Duration,
        index: usize,
    ) -> Result<(&mut Balance, f64), BalanceError> {
        self.advance_to(now);
        let load = self.balance_load_g(index);
        let balance = self
            .balances
            .get_mut(index)
            .ok_or(BalanceError::NoSuchBalance(index))?;
        Ok((balance, load))
    }

    /// Reads balance `index` (SI; `S` waits until [`LabModel::balance_stable_at`]).
    pub fn balance_read(&mut self, now: Duration, index: usize) -> Result<Reading, BalanceError> {
        let t = now.max(self.now);
        let (balance, load) = self.balance_at(now, index)?;
        Ok(balance.read(t, load))
    }

    /// Z (ZI when `immediate`): zero.
    pub fn balance_zero(
        &mut self,
        now: Duration,
        index: usize,
        immediate: bool,
    ) -> Result<(), BalanceError> {
        let t = now.max(self.now);
        let (balance, load) = self.balance_at(now, index)?;
        balance.zero(t, load, immediate)
    }

    /// T (TI when `immediate`): tare.
    pub fn balance_tare(
        &mut self,
        now: Duration,
        index: usize,
        immediate: bool,
    ) -> Result<(), BalanceError> {
        let t = now.max(self.now);
        let (balance, load) = self.balance_at(now, index)?;
        balance.tare(t, load, immediate)
    }

    /// TAC: clears the tare.
    pub fn balance_clear_tare(&mut self, now: Duration, index: usize) -> Result<(), BalanceError> {
        self.balance_at(now, index)?.0.clear_tare();
        Ok(())
    }

    /// `TA <value>`: presets the tare (g).
    pub fn balance_preset_tare(
        &mut self,
        now: Duration,
        index: usize,
        tare_g: f64,
    ) -> Result<(), BalanceError> {
        self.balance_at(now, index)?.0.preset_tare(tare_g)
    }

    /// Current tare (g).
    pub fn balance_tare_g(&self, index: usize) -> Result<f64, BalanceError> {
        self.balances
            .get(index)
            .map(Balance::tare_g)
            .ok_or(BalanceError::NoSuchBalance(index))
    }

    /// Virtual time at which balance `index`'s reading becomes stable (unless something changes before).
    pub fn balance_stable_at(
        &mut self,
        now: Duration,
        index: usize,
    ) -> Result<Duration, BalanceError> {
        Ok(self.balance_at(now, index)?.0.stable_at())
    }

    // ----- hotplate -----

    /// Number of hotplates (1 + `more_hotplates`).
    pub fn hotplate_count(&self) -> usize {
        self.hotplates.len()
    }

    /// The deck position on hotplate `index`.
    fn hotplate_station(&self, index: usize) -> Option<&str> {
        match index {
            0 => Some(&self.config.deck.stir_station),
            k => self
                .config
                .more_hotplates
                .get(k - 1)
                .map(|h| h.station.as_str()),
        }
    }

    /// Hotplate `index` at `now`.
    fn hotplate_at(&mut self, now: Duration, index: usize) -> Result<&mut Hotplate, HotplateError> {
        self.advance_to(now);
        self.hotplates
            .get_mut(index)
            .ok_or(HotplateError::NoSuchHotplate(index))
    }

    /// Any NAMUR message received: feeds the watchdog (the front end calls it for every message).
    pub fn hotplate_message(&mut self, now: Duration, index: usize) -> Result<(), HotplateError> {
        let t = now.max(self.now);
        self.hotplate_at(now, index)?.message(t);
        Ok(())
    }

    /// `OUT_SP_1`: temperature setpoint (C).
    pub fn hotplate_set_temperature(
        &mut self,
        now: Duration,
        index: usize,
        setpoint_c: f64,
    ) -> Result<(), HotplateError> {
        self.hotplate_at(now, index)?.set_setpoint(setpoint_c)
    }

    /// `START_1` / `STOP_1`: heater on or off.
    pub fn hotplate_heat(
        &mut self,
        now: Duration,
        index: usize,
        on: bool,
    ) -> Result<(), HotplateError> {
        self.hotplate_at(now, index)?.set_heating(on)
    }

    /// `OUT_SP_4`: stirrer speed setpoint (rpm).
    pub fn hotplate_set_speed(
        &mut self,
        now: Duration,
        index: usize,
        rpm: f64,
    ) -> Result<(), HotplateError> {
        self.hotplate_at(now, index)?.set_speed(rpm)
    }

    /// `START_4` / `STOP_4`: motor on or off.
    pub fn hotplate_stir(
        &mut self,
        now: Duration,
        index: usize,
        on: bool,
    ) -> Result<(), HotplateError> {
        self.hotplate_at(now, index)?.set_stirring(on)
    }

    /// `OUT_WD1@m`: arms the watchdog for `secs` seconds.
    pub fn hotplate_arm_watchdog(
        &mut self,
        now: Duration,
        index: usize,
        secs: f64,
    ) -> Result<(), HotplateError> {
        let t = now.max(self.now);
        self.hotplate_at(now, index)?.arm_watchdog(t, secs)
    }

    /// `RESET`: clears the watchdog error, disarms it, heater and motor off.
    pub fn hotplate_reset(&mut self, now: Duration, index: usize) -> Result<(), HotplateError> {
        self.hotplate_at(now, index)?.reset();
        Ok(())
    }

    /// Hotplate status (plate and vial temperature with drift, setpoints, speed, watchdog).
    pub fn hotplate_status(
        &mut self,
        now: Duration,
        index: usize,
    ) -> Result<HotplateStatus, HotplateError> {
        self.advance_to(now);
        let vial_c = self
            .hotplate_station(index)
            .and_then(|s| self.deck.index_at(s))
            .map(|k| self.deck.vials()[k].temperature_c);
        let hotplate = self
            .hotplates
            .get(index)
            .ok_or(HotplateError::NoSuchHotplate(index))?;
        Ok(hotplate.status(vial_c))
    }

    // ----- spectrometer -----

    /// Measures the absorbance spectrum of the vial under the head.
    pub fn spectrum(
        &mut self,
        now: Duration,
        start_nm: f64,
        stop_nm: f64,
        step_nm: f64,
    ) -> Result<Spectrum, SpectroError> {
        self.advance_to(now);
        let vial = self.vial_index_under_head().map(|k| &self.deck.vials()[k]);
        self.spectro
            .measure(vial, &self.config.dyes, start_nm, stop_nm, step_nm)
    }

    /// Noise-free spectrum of hidden dye volumes plus water (uL), the closed loop's target.
    pub fn target_spectrum(
        &self,
        dye_ul: [f64; 3],
        water_ul: f64,
        start_nm: f64,
        stop_nm: f64,
        step_nm: f64,
    ) -> Result<Spectrum, SpectroError> {
        let grid = spectro::wavelength_grid(self.spectro.config(), start_nm, stop_nm, step_nm)?;
        Ok(spectro::target_spectrum(
            &self.config.dyes,
            &Contents::new(dye_ul, water_ul),
            self.spectro.config().path_cm,
            &grid,
        ))
    }

    // ----- faults -----

    /// Instrument id from its name ("gantry", "balance", "hotplate", "spectro", a pump id like "pump-red",
    /// another balance's or hotplate's id).
    pub fn instrument_id(&self, name: &str) -> Option<InstrumentId> {
        // A lab's balances are named by their ids, whichever of them stands on the weigh station.
        if let Some(k) = self.config.more_balances.iter().position(|b| b.id == name) {
            return Some(InstrumentId::Balance(k + 1));
        }
        if let Some(k) = self.config.more_hotplates.iter().position(|h| h.id == name) {
            return Some(InstrumentId::Hotplate(k + 1));
        }
        match name {
            "gantry" => Some(InstrumentId::Gantry),
            "balance" => Some(InstrumentId::Balance(0)),
            "hotplate" => Some(InstrumentId::Hotplate(0)),
            "spectro" => Some(InstrumentId::Spectro),
            _ => self
                .pumps
                .iter()
                .position(|p| p.config().id == name)
                .map(InstrumentId::Pump)
                .or_else(|| {
                    self.defined
                        .iter()
                        .position(|(n, _)| n == name)
                        .map(InstrumentId::Defined)
                }),
        }
    }

    /// Registers an instrument simulated from its definition, so faults can be set on it by name.
    pub fn add_defined(&mut self, name: &str) -> InstrumentId {
        if let Some(i) = self.defined.iter().position(|(n, _)| n == name) {
            return InstrumentId::Defined(i);
        }
        self.defined.push((name.to_owned(), FaultConfig::default()));
        InstrumentId::Defined(self.defined.len() - 1)
    }

    /// Fault settings of one instrument.
    pub fn faults(&self, id: InstrumentId) -> Option<&FaultConfig> {
        match id {
            InstrumentId::Gantry => Some(&self.config.gantry.faults),
            InstrumentId::Pump(i) => self.config.pumps.get(i).map(|p| &p.faults),
            InstrumentId::Balance(i) => self.balances.get(i).map(|b| &b.config().faults),
            InstrumentId::Hotplate(i) => self.hotplates.get(i).map(|h| &h.config().faults),
            InstrumentId::Spectro => Some(&self.config.spectro.faults),
            InstrumentId::Defined(i) => self.defined.get(i).map(|(_, f)| f),
        }
    }

    /// Replaces the fault settings of one instrument from `now` on (drift so far is kept).
    pub fn set_faults(
        &mut self,
        now: Duration,
        id: InstrumentId,
        faults: FaultConfig,
    ) -> Result<(), ConfigError> {
        faults.validate("faults")?;
        self.advance_to(now);
        match id {
            InstrumentId::Gantry => self.config.gantry.faults = faults,
            InstrumentId::Pump(i) => {
                let pump = self
                    .config
                    .pumps
                    .get_mut(i)
                    .ok_or_else(|| ConfigError::invalid("faults", format!("no pump {i}")))?;
                pump.faults = faults;
            }
            InstrumentId::Balance(i) => {
                let balance = self
                    .balances
                    .get_mut(i)
                    .ok_or_else(|| ConfigError::invalid("faults", format!("no balance {i}")))?;
                balance.set_faults(faults.clone());
                if i == 0 {
                    self.config.balance.faults = faults;
                }
            }
            InstrumentId::Hotplate(i) => {
                let hotplate = self
                    .hotplates
                    .get_mut(i)
                    .ok_or_else(|| ConfigError::invalid("faults", format!("no hotplate {i}")))?;
                hotplate.set_faults(faults.clone());
                if i == 0 {
                    self.config.hotplate.faults = faults;
                }
            }
            InstrumentId::Spectro => {
                self.config.spectro.faults = faults.clone();
                self.spectro.set_faults(faults);
            }
            InstrumentId::Defined(i) => {
                let entry = self.defined.get_mut(i).ok_or_else(|| {
                    ConfigError::invalid("faults", format!("no defined instrument {i}"))
                })?;
                entry.1 = faults;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
