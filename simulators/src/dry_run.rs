//! Dry run of a protocol on the physical model, in virtual time and without wires.
//!
//! Before a run starts, the controller walks the protocol on a fresh [`LabModel`] to estimate how long it
//! will take and to find conflicts the static validator cannot see, because they depend on where the head
//! is and what is in the vials at that moment: liquid dispensed with no vessel under the head, a vessel
//! overflowing, a stock running out, a gantry alarm, a step that would time out, a measurement with no
//! vessel under the probe. The estimate is recorded and shown to whoever approves the run.
//!
//! The dry run does not imitate the executor: both take what a step means from the one interpreter
//! (`labctl_protocols::interpret`: the expansion of `move_to` and `transfer` into gantry moves at the same
//! feed rates, the ramp of a setpoint, the rise before a lateral move from low down, the command of a
//! measurement, the default timeouts). The dry run applies those device commands to model-backed
//! instruments, one per instrument of the lab ([`planned_commands`] lists them); the executor sends them
//! to the drivers. A dispense runs until the pump stops, a `wait_until` ends when the reading meets the
//! condition (held for `hold_s`) or at its timeout, a `parallel` block lasts as long as its longest
//! branch, a `repeat` runs its steps `count` times. Time is the model's: travel time from distance over
//! feed, pumping time from volume over rate, balance settling, spectrometer integration, first-order
//! heating. What it leaves out is listed under [`dry_run`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use labctl_protocols::device::DeviceCommand;
use labctl_protocols::instrument_def::InstrumentDefinition;
use labctl_protocols::interpret::{self, ExpandError, Expansion};
use labctl_protocols::lab::Position as DeckSpot;
use labctl_protocols::{
    Action, ActionCall, ActionStep, Comparison, InstrumentKind, Lab, MeasureStep, ParallelStep,
    Protocol, RepeatStep, Step, WaitUntilStep,
};
use serde::{Deserialize, Serialize};

use crate::devices::mtsics::MtSicsConfig;
use crate::devices::scpi::ScpiConfig;
use crate::model::{
    Contents, DeckPosition, Direction, Dye, GantryAlarm, GantryError, GantryState, LabConfig,
    LabModel, Liquid, LoadState, PumpAlarm, PumpConfig, SpectroError, Stationed,
};

/// Steps simulated one by one; past this, the remaining iterations of a `repeat` are extrapolated.
pub const MAX_SIMULATED_STEPS: u64 = 200_000;
/// `wait_until` readings and `repeat` iterations simulated in all; past this, the remaining iterations of
/// a `repeat` are extrapolated too (a body of blocks nested too deep to simulate still costs its loop).
const MAX_WORK: u64 = 2_000_000;
/// Readings of one `wait_until`: a longer timeout polls more coarsely than every [`POLL_S`].
const MAX_POLLS_PER_WAIT: f64 = 100_000.0;
/// Virtual seconds between two readings of a `wait_until` condition.
const POLL_S: f64 = 1.0;
/// Deepest nesting of `parallel` and `repeat` blocks simulated (the stack must not run out).
const MAX_DEPTH: usize = 64;
/// Problems listed; more are counted in one last entry.
const MAX_PROBLEMS: usize = 200;
/// Notes kept (nested repeats past the budget each add one).
const MAX_NOTES: usize = 16;
/// Longest span handled (about 31 700 years); longer durations saturate.
const FAR_FUTURE_S: f64 = 1.0e12;
/// Bound on the iterations of the loops that wait for the gantry or a pump to finish.
const MAX_WAIT_EVENTS: usize = 10_000;

/// What a dry run found: how long the protocol would take and what would go wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryRunReport {
    /// Estimated wall-clock duration of the run in seconds (virtual time of the model, extrapolated for
    /// `repeat` iterations past the simulation budget).
    pub estimated_duration_s: f64,
    /// Conflicts found, at most one of each kind per step.
    pub problems: Vec<DryRunProblem>,
    /// Steps walked on the model (every step counts, blocks included).
    pub steps_simulated: u64,
    /// How the estimate was made where it is not a plain simulation (extrapolated iterations, a lab the
    /// model cannot represent exactly); empty for a fully simulated run.
    pub notes: Vec<String>,
}

/// One conflict, located by a JSON pointer into the protocol (defined with the findings, so the journal's
/// typed events carry it too).
pub use labctl_protocols::finding::DryRunProblem;

/// Dry-runs `protocol` in `lab` on a fresh physical model seeded with `seed`.
///
/// The model is the simulated lab ([`LabConfig::sim_default`]) with the lab file's deck positions,
/// stations, safe height, gantry limits, pumps (one per syringe pump of the lab, holding its `stock`) and
/// balances (one per balance of the lab, on its deck station);
/// the protocol's labware stands at its locations with its capacity and its initial volume (as water).
///
/// Limits of the estimate:
/// - physics only, so the real run takes somewhat longer: the drivers notice the end of a dispense up to
///   one status poll late (1/20 of its duration, 0.2 to 2 s) and the end of a move up to 100 ms late, and
///   every command costs a few serial transactions (milliseconds each);
/// - `wait_until` is read every virtual second (coarser for timeouts beyond 100 000 s), so it ends up to
///   one reading late;
/// - `parallel` branches are simulated one after the other on the one model, each from where the
///   previous left it, and the block counts as long as its longest branch; physical coupling between
///   branches at the same moment (a pump dispensing while another branch moves the head) is not seen;
/// - after [`MAX_SIMULATED_STEPS`] steps the remaining iterations of a `repeat` are extrapolated at the
///   mean duration of those simulated (said so in [`DryRunReport::notes`]); only stock consumption is
///   extrapolated with them, other conflicts of those iterations are not looked for;
/// - the physical model has one gantry, hotplate and spectrophotometer: a lab's second one of those kinds
///   is not modelled (its steps take no time and are not checked; a note says so), and neither is a pump
///   or a second balance in a lab the model cannot represent (when the simulated lab's default is used);
/// - syringes start full (the simulated lab's 10 mL), instruments start idle and cold, without faults;
///   interlocks and the safety envelope are the validator's business, not checked here.
pub fn dry_run(protocol: &Protocol, lab: &Lab, seed: u64) -> DryRunReport {
    walk(protocol, lab, seed, None)
}

/// The device commands the dry run applied to its model-backed instruments, in order, each with its
/// instrument: what the executor sends for the same protocol in the same lab (both come from
/// [`interpret`]), for a reviewer who wants to see them and for the tests that hold the two together.
/// At most `limit` are kept.
pub fn planned_commands(
    protocol: &Protocol,
    lab: &Lab,
    seed: u64,
    limit: usize,
) -> Vec<(String, DeviceCommand)> {
    let mut trace = Vec::new();
    walk(protocol, lab, seed, Some((&mut trace, limit)));
    trace
}

/// The dry run's walk; `trace` collects the commands applied, up to its limit.
fn walk(
    protocol: &Protocol,
    lab: &Lab,
    seed: u64,
    trace: Option<(&mut Vec<(String, DeviceCommand)>, usize)>,
) -> DryRunReport {
    let mut notes = Vec::new();
    let (config, parts) = match lab_config(lab, &mut notes) {
        Ok(built) => built,
        Err(reason) => {
            notes.push(format!(
                "the lab file cannot be modelled exactly ({reason}); the simulated lab's default deck, \
                 gantry, pumps and balance are used"
            ));
            (LabConfig::sim_default(), Parts::of_default_lab(lab))
        }
    };
    let model = match LabModel::new(config, seed) {
        Ok(m) => m,
        Err(e) => {
            return DryRunReport {
                estimated_duration_s: 0.0,
                problems: vec![DryRunProblem {
                    path: String::new(),
                    message: format!("the physical model cannot be built: {e}"),
                }],
                steps_simulated: 0,
                notes,
            };
        }
    };
    let mut sim = Sim::new(lab, model, parts, notes);
    sim.trace = trace;
    sim.place_labware(protocol);
    let mut total = 0.0;
    for (i, step) in protocol.steps.iter().enumerate() {
        total += sim.step(step, &format!("/steps/{i}"), 0);
    }
    sim.finish(total)
}

/// Which model part each lab instrument of a built-in kind drives: the model's pump, balance or hotplate
/// index.
#[derive(Debug, Default)]
struct Parts {
    pumps: BTreeMap<String, usize>,
    balances: BTreeMap<String, usize>,
    hotplates: BTreeMap<String, usize>,
}

impl Parts {
    /// The parts of the simulated lab's default model: its three dye pumps, its balance and its hotplate.
    fn of_default_lab(lab: &Lab) -> Parts {
        let first = |kind| {
            of_kind(lab, kind)
                .take(1)
                .map(|i| (i.id.clone(), 0))
                .collect()
        };
        Parts {
            pumps: default_pump_indices(lab),
            balances: first(InstrumentKind::Balance),
            hotplates: first(InstrumentKind::Hotplate),
        }
    }
}

/// The lab's instruments of `kind`, in lab-file order: the first balance stands on the model's weigh
/// station, the first hotplate under its stir station.
fn of_kind(
    lab: &Lab,
    kind: InstrumentKind,
) -> impl Iterator<Item = &labctl_protocols::lab::Instrument> {
    lab.instruments.iter().filter(move |i| i.kind == kind)
}

/// The model's configuration for `lab`, and the model part of each pump and balance.
fn lab_config(lab: &Lab, notes: &mut Vec<String>) -> Result<(LabConfig, Parts), String> {
    let mut config = LabConfig::sim_default();
    let mut parts = Parts::default();
    let spots = lab.deck.positions();
    if !spots.is_empty() {
        config.deck.positions = spots
            .iter()
            .map(|p| DeckPosition::new(p.name.clone(), p.x_mm, p.y_mm, p.z_mm))
            .collect();
        let station_of = |id: &str| {
            spots
                .iter()
                .find(|p| p.instrument.as_deref() == Some(id))
                .map(|p| p.name.clone())
        };
        // The model needs a station for each balance and the hotplate; an instrument without one gets a
        // position far off the deck, which the head can never be over.
        let mut off_deck = |name: String, n: f64| {
            config
                .deck
                .positions
                .push(DeckPosition::new(&name, -1.0e9 * n, -1.0e9 * n, 0.0));
            name
        };
        // Each balance and hotplate of the lab on its own station: the first of each kind on the model's
        // weigh or stir station, the others as `more_balances` and `more_hotplates`.
        let mut stationed = |kind: InstrumentKind, parts: &mut BTreeMap<String, usize>, n0: f64| {
            let mut all = Vec::new();
            for (n, inst) in of_kind(lab, kind).enumerate() {
                let station = station_of(&inst.id).unwrap_or_else(|| {
                    off_deck(format!("(no station for {})", inst.id), n0 + n as f64)
                });
                parts.insert(inst.id.clone(), n);
                all.push(Stationed {
                    id: inst.id.clone(),
                    station,
                });
            }
            let mut all = all.into_iter();
            let first = all.next().map(|s| s.station);
            (first, all.collect::<Vec<_>>())
        };
        let (weigh, more_balances) = stationed(InstrumentKind::Balance, &mut parts.balances, 10.0);
        let (stir, more_hotplates) =
            stationed(InstrumentKind::Hotplate, &mut parts.hotplates, 1000.0);
        config.deck.weigh_station =
            weigh.unwrap_or_else(|| off_deck("(no weigh station)".into(), 1.0));
        config.deck.stir_station =
            stir.unwrap_or_else(|| off_deck("(no stir station)".into(), 2.0));
        config.more_balances = more_balances;
        config.more_hotplates = more_hotplates;
    } else {
        let default = Parts::of_default_lab(lab);
        parts.balances = default.balances;
        parts.hotplates = default.hotplates;
    }
    config.deck.safe_z_mm = lab.deck.safe_z_mm;
    if let Some(g) = lab
        .instruments
        .iter()
        .find(|i| i.kind == InstrumentKind::Gantry)
    {
        let caps = &g.capabilities;
        if let (Some(x), Some(y), Some(z)) = (caps.x_mm, caps.y_mm, caps.z_mm) {
            config.gantry.min_mm = [x.min, y.min, z.min];
            config.gantry.max_mm = [x.max, y.max, z.max];
            config.gantry.home_mm = [x.min, y.min, z.max];
        }
        if let Some(f) = caps.feed_mm_per_min {
            config.gantry.max_feed_mm_min = f.max;
        }
    }
    let pumps = &mut parts.pumps;
    config.pumps.clear();
    for inst in lab
        .instruments
        .iter()
        .filter(|i| i.kind == InstrumentKind::SyringePump)
    {
        let stock = inst.stock.as_deref().unwrap_or("").to_ascii_lowercase();
        let liquid = match stock.as_str() {
            "red" => Liquid::Dye(Dye::Red),
            "yellow" => Liquid::Dye(Dye::Yellow),
            "blue" => Liquid::Dye(Dye::Blue),
            "water" => Liquid::Water,
            other => {
                notes.push(format!(
                    "{}: stock {other:?} is modelled as water (only its volume matters here)",
                    inst.id
                ));
                Liquid::Water
            }
        };
        pumps.insert(inst.id.clone(), config.pumps.len());
        config.pumps.push(PumpConfig {
            id: inst.id.clone(),
            liquid,
            ..PumpConfig::sim_default(Dye::Red)
        });
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok((config, parts))
}

/// Pump indices of the simulated lab's default pumps (red, yellow, blue), by each pump's `stock`.
fn default_pump_indices(lab: &Lab) -> BTreeMap<String, usize> {
    lab.instruments
        .iter()
        .filter(|i| i.kind == InstrumentKind::SyringePump)
        .filter_map(|i| {
            let stock = i.stock.as_deref()?.to_ascii_lowercase();
            let dye = Dye::ALL.into_iter().find(|d| d.name() == stock)?;
            Some((i.id.clone(), dye.index()))
        })
        .collect()
}

/// Seconds to a `Duration`: NaN and negative give zero, huge saturates.
fn secs(s: f64) -> Duration {
    if s.is_finite() && s > 0.0 {
        Duration::from_secs_f64(s.min(FAR_FUTURE_S))
    } else if s == f64::INFINITY {
        Duration::from_secs_f64(FAR_FUTURE_S)
    } else {
        Duration::ZERO
    }
}

/// What stands behind each of the lab's instruments in the dry run: a part of the one physical model, a
/// definition's state model, or nothing the model can represent. The interpreter's device commands are
/// applied to it as the executor sends them to the real instrument.
#[derive(Debug, Clone)]
enum Backing {
    Gantry,
    /// The model's pump of this index.
    Pump(usize),
    /// The model's balance of this index.
    Balance(usize),
    /// The model's hotplate of this index.
    Hotplate(usize),
    Spectro,
    /// A defined instrument: its definition's readings and duration model.
    Defined(Arc<InstrumentDefinition>),
    /// An instrument the model has no part for: a second gantry, hotplate or spectrophotometer (the model
    /// has one of each). Its commands take no modelled time and are not checked; a note says so.
    Unmodelled {
        kind: InstrumentKind,
        why: String,
    },
}

impl Backing {
    fn kind(&self) -> InstrumentKind {
        match self {
            Backing::Gantry => InstrumentKind::Gantry,
            Backing::Pump(_) => InstrumentKind::SyringePump,
            Backing::Balance(_) => InstrumentKind::Balance,
            Backing::Hotplate(_) => InstrumentKind::Hotplate,
            Backing::Spectro => InstrumentKind::Spectrophotometer,
            Backing::Defined(_) => InstrumentKind::Defined,
            Backing::Unmodelled { kind, .. } => *kind,
        }
    }

    /// The backing of every instrument of `lab`, by id: every pump and balance its model part (`parts`),
    /// the first of each other built-in kind the model's one.
    fn of_lab(lab: &Lab, parts: &Parts) -> BTreeMap<String, Backing> {
        let mut taken = BTreeSet::new();
        lab.instruments
            .iter()
            .map(|inst| {
                let single = |part: Backing, taken: &mut BTreeSet<InstrumentKind>| {
                    if taken.insert(inst.kind) {
                        part
                    } else {
                        Backing::Unmodelled {
                            kind: inst.kind,
                            why: format!("the physical model has one {}", inst.kind),
                        }
                    }
                };
                let backing = match (inst.defined(), inst.kind) {
                    (Some(def), _) => Backing::Defined(Arc::clone(def)),
                    (None, InstrumentKind::SyringePump) => match parts.pumps.get(&inst.id) {
                        Some(&index) => Backing::Pump(index),
                        None => Backing::Unmodelled {
                            kind: inst.kind,
                            why: "its stock has no model".to_owned(),
                        },
                    },
                    (None, InstrumentKind::Gantry) => single(Backing::Gantry, &mut taken),
                    (None, InstrumentKind::Balance) => match parts.balances.get(&inst.id) {
                        Some(&index) => Backing::Balance(index),
                        None => Backing::Unmodelled {
                            kind: inst.kind,
                            why: "the simulated lab's default model has one balance".to_owned(),
                        },
                    },
                    (None, InstrumentKind::Hotplate) => match parts.hotplates.get(&inst.id) {
                        Some(&index) => Backing::Hotplate(index),
                        None => Backing::Unmodelled {
                            kind: inst.kind,
                            why: "the simulated lab's default model has one hotplate".to_owned(),
                        },
                    },
                    (None, InstrumentKind::Spectrophotometer) => {
                        single(Backing::Spectro, &mut taken)
                    }
                    (None, kind) => Backing::Unmodelled {
                        kind,
                        why: "it has no definition".to_owned(),
                    },
                };
                (inst.id.clone(), backing)
            })
            .collect()
    }
}

/// What a step means to do, for the checks that compare what the model does with it (a transfer picks a
/// given vessel; a dispense pours into one).
struct Intent<'s> {
    /// The action's or measurement's name.
    name: &'s str,
    vessel: Option<&'s str>,
}

impl<'s> Intent<'s> {
    fn of_action(action: &'s ActionCall) -> Self {
        let vessel = match action.builtin() {
            Some(Action::Transfer(t)) => Some(t.vessel.as_str()),
            Some(Action::Dispense(d)) => Some(d.vessel.as_str()),
            _ => None,
        };
        Intent {
            name: action.name(),
            vessel,
        }
    }
}

fn op_text(op: Comparison) -> &'static str {
    match op {
        Comparison::Gt => ">",
        Comparison::Ge => ">=",
        Comparison::Lt => "<",
        Comparison::Le => "<=",
        Comparison::Within => "within",
    }
}

/// The walk: the model, its virtual time and what was found so far.
struct Sim<'a> {
    lab: &'a Lab,
    /// The commands applied so far and how many to keep, when asked for ([`planned_commands`]).
    trace: Option<(&'a mut Vec<(String, DeviceCommand)>, usize)>,
    model: LabModel,
    /// Virtual time; the model is always advanced to it.
    now: Duration,
    /// Deck positions by upper-case name.
    spots: BTreeMap<String, DeckSpot>,
    /// Model pump index of each pump instrument.
    pumps: BTreeMap<String, usize>,
    /// What stands behind each instrument of the lab.
    backing: BTreeMap<String, Backing>,
    /// Deck position of each vessel, updated as transfers finish (as the executor does).
    vessels: BTreeMap<String, String>,
    problems: Vec<DryRunProblem>,
    /// (path, kind) already reported: a step inside a `repeat` reports each kind of problem once.
    reported: BTreeMap<String, BTreeSet<&'static str>>,
    unlisted: u64,
    notes: Vec<String>,
    noted: BTreeSet<String>,
    steps: u64,
    /// `wait_until` readings and `repeat` iterations so far.
    work: u64,
    /// Defined instruments' last parameter values, for their duration models.
    params: labctl_protocols::instrument_def::ParamHistory,
    /// Defined instruments' readings, on the same state model as their simulators (a parameter named
    /// like a reading sets its target, approached with the definition's lag), by instrument id.
    defined: BTreeMap<String, Vec<crate::devices::defined::Value>>,
}

impl<'a> Sim<'a> {
    fn new(lab: &'a Lab, model: LabModel, parts: Parts, notes: Vec<String>) -> Self {
        let spots = lab
            .deck
            .positions()
            .into_iter()
            .map(|p| (p.name.to_ascii_uppercase(), p))
            .collect();
        Sim {
            lab,
            trace: None,
            model,
            now: Duration::ZERO,
            spots,
            backing: Backing::of_lab(lab, &parts),
            pumps: parts.pumps,
            vessels: BTreeMap::new(),
            problems: Vec::new(),
            reported: BTreeMap::new(),
            unlisted: 0,
            notes,
            noted: BTreeSet::new(),
            steps: 0,
            work: 0,
            params: Default::default(),
            defined: BTreeMap::new(),
        }
    }

    fn finish(mut self, total: f64) -> DryRunReport {
        if self.unlisted > 0 {
            self.problems.push(DryRunProblem {
                path: String::new(),
                message: format!("{} more problems not listed", self.unlisted),
            });
        }
        DryRunReport {
            estimated_duration_s: if total.is_finite() {
                total.max(0.0)
            } else {
                f64::MAX
            },
            problems: self.problems,
            steps_simulated: self.steps,
            notes: self.notes,
        }
    }

    fn problem(&mut self, path: &str, kind: &'static str, message: String) {
        match self.reported.get_mut(path) {
            Some(kinds) => {
                if !kinds.insert(kind) {
                    return;
                }
            }
            None => {
                self.reported
                    .insert(path.to_owned(), BTreeSet::from([kind]));
            }
        }
        if self.problems.len() >= MAX_PROBLEMS {
            self.unlisted += 1;
            return;
        }
        self.problems.push(DryRunProblem {
            path: path.to_owned(),
            message,
        });
    }

    fn note(&mut self, key: &str, message: String) {
        if self.notes.len() < MAX_NOTES && self.noted.insert(key.to_owned()) {
            self.notes.push(message);
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now.saturating_add(d);
        self.model.advance_to(self.now);
    }

    fn since(&self, t0: Duration) -> f64 {
        self.now.saturating_sub(t0).as_secs_f64()
    }

    fn exhausted(&self) -> bool {
        self.steps >= MAX_SIMULATED_STEPS || self.work >= MAX_WORK
    }

    fn spot(&mut self, name: &str, path: &str) -> Option<DeckSpot> {
        let found = self.spots.get(&name.to_ascii_uppercase()).cloned();
        if found.is_none() {
            self.problem(
                path,
                "position",
                format!("there is no deck position {name} in this lab"),
            );
        }
        found
    }

    // ----- labware -----

    fn place_labware(&mut self, protocol: &Protocol) {
        let max_fill = self.lab.deck.max_fill_fraction;
        for (i, lw) in protocol.labware.iter().enumerate() {
            let path = format!("/labware/{i}");
            let Some(spot) = self.spot(&lw.location, &path) else {
                continue;
            };
            if let Err(e) = self.model.add_vial(self.now, &lw.id, &spot.name) {
                self.problem(
                    &path,
                    "labware",
                    format!("vessel {} cannot stand at {}: {e}", lw.id, spot.name),
                );
                continue;
            }
            let initial = if lw.initial_volume_ul.is_finite() {
                lw.initial_volume_ul.max(0.0)
            } else {
                0.0
            };
            let _ = self.model.set_vial(
                self.now,
                &lw.id,
                lw.capacity_ul,
                Contents::new([0.0; 3], initial),
            );
            if let Some(v) = self.model.vial(&lw.id)
                && initial > v.capacity_ul * max_fill
            {
                self.problem(
                    &path,
                    "overflow",
                    format!(
                        "vessel {} starts with {initial} uL, more than {max_fill} of its {} uL",
                        lw.id, v.capacity_ul
                    ),
                );
            }
            self.vessels.insert(lw.id.clone(), spot.name.clone());
        }
    }

    // ----- steps -----

    fn steps(&mut self, steps: &[Step], path: &str, depth: usize) -> f64 {
        let mut total = 0.0;
        for (i, step) in steps.iter().enumerate() {
            total += self.step(step, &format!("{path}/{i}"), depth);
        }
        total
    }

    /// Simulates one step; returns its estimated duration in seconds.
    fn step(&mut self, step: &Step, path: &str, depth: usize) -> f64 {
        if depth > MAX_DEPTH {
            self.problem(
                path,
                "depth",
                format!("blocks nested deeper than {MAX_DEPTH} levels are not simulated"),
            );
            return 0.0;
        }
        self.steps += 1;
        let t0 = self.now;
        let duration = match step {
            Step::Action(a) => {
                self.action(a, path);
                self.since(t0)
            }
            Step::Measure(m) => {
                self.measure(m, path);
                self.since(t0)
            }
            Step::Wait(w) => {
                self.advance(secs(w.duration_s));
                self.since(t0)
            }
            Step::WaitUntil(w) => {
                self.wait_until(w, path);
                self.since(t0)
            }
            Step::Parallel(p) => self.parallel(p, path, depth),
            Step::Repeat(r) => self.repeat(r, path, depth),
        };
        // A `wait_until` stops at its timeout and says so itself.
        if !matches!(step, Step::WaitUntil(_))
            && let Some(limit) = step.timeout_or_default_s(self.lab)
            && duration > limit + 1e-6
        {
            self.problem(
                path,
                "timeout",
                format!("would time out: takes about {duration:.1} s, its timeout is {limit} s"),
            );
        }
        duration
    }

    /// Branches run at the same time in the lab. Here they are simulated one after the other on the one
    /// model (each starts where the previous left the model, which is fine for instruments no other branch
    /// uses, as the validator requires), and the block lasts as long as its longest branch.
    fn parallel(&mut self, p: &ParallelStep, path: &str, depth: usize) -> f64 {
        let mut longest = 0.0f64;
        for (j, branch) in p.branches.iter().enumerate() {
            let d = self.steps(branch, &format!("{path}/branches/{j}"), depth + 1);
            longest = longest.max(d);
        }
        longest
    }

    /// Iterates; once the simulation budget is spent (and at least one iteration was simulated), the
    /// remaining iterations are extrapolated linearly at the mean duration of the simulated ones, and so
    /// is each pump's stock consumption.
    fn repeat(&mut self, r: &RepeatStep, path: &str, depth: usize) -> f64 {
        let count = u64::from(r.count);
        if r.steps.is_empty() {
            return 0.0;
        }
        let inner = format!("{path}/steps");
        let stock_before = self.stock_levels();
        let mut total = 0.0;
        let mut done = 0u64;
        while done < count {
            if done > 0 && self.exhausted() {
                break;
            }
            total += self.steps(&r.steps, &inner, depth + 1);
            done += 1;
            self.work += 1;
        }
        if done < count {
            let remaining = count - done;
            let per = total / done as f64;
            total += per * remaining as f64;
            let per_text = if per.abs() < 1e6 {
                format!("{per:.3}")
            } else {
                format!("{per:.3e}")
            };
            self.note(
                path,
                format!(
                    "{path}: {done} of {count} iterations simulated, the other {remaining} extrapolated at \
                     {per_text} s each (simulation budget spent)"
                ),
            );
            let stock_after = self.stock_levels();
            for (id, index) in self.pumps.clone() {
                let (Some(before), Some(left)) = (stock_before.get(index), stock_after.get(index))
                else {
                    continue;
                };
                let per_iteration = (before - left) / done as f64;
                if per_iteration > 0.0 && per_iteration * remaining as f64 > left + 1e-9 {
                    let more = (left / per_iteration).floor();
                    self.problem(
                        path,
                        "stock",
                        format!(
                            "{id}'s stock would run out after about {more} more iterations \
                             (extrapolated: {per_iteration:.3} uL per iteration, {left:.1} uL left, \
                             {remaining} iterations to go)"
                        ),
                    );
                }
            }
        }
        total
    }

    /// Stock left in each model pump's syringe (uL).
    fn stock_levels(&mut self) -> Vec<f64> {
        (0..self.model.pump_count())
            .map(|i| {
                self.model
                    .pump_status(self.now, i)
                    .map_or(0.0, |s| s.syringe_ul)
            })
            .collect()
    }

    /// The instrument's backing, or a problem when the lab has no such instrument.
    fn backing_of(&mut self, id: &str, path: &str) -> Option<Backing> {
        let found = self.backing.get(id).cloned();
        if found.is_none() {
            self.problem(
                path,
                "instrument",
                format!("instrument {id} is not in this lab; the step is not simulated"),
            );
        }
        found
    }

    // ----- actions -----

    /// The interpreter's expansion of the action, applied command by command as the executor sends them;
    /// the first command the model refuses ends the step, as it fails the step in the lab.
    fn action(&mut self, a: &ActionStep, path: &str) {
        if self.backing_of(&a.instrument, path).is_none() {
            return;
        }
        let vessels = &self.vessels;
        let expansion = interpret::expand(self.lab, &a.instrument, &a.action, |v| {
            vessels.get(v).cloned()
        });
        let intent = Intent::of_action(&a.action);
        let commands = match expansion {
            Ok(Expansion::Commands(commands)) => commands,
            Ok(Expansion::Ramp {
                target_c,
                rate_c_per_min,
            }) => {
                // The executor's ramp, setpoint by setpoint: the model sees each when the lab would.
                let plate_c = self.reading(&a.instrument, "plate_temperature_c");
                let setpoints =
                    interpret::ramp(self.lab, &a.instrument, plate_c, target_c, rate_c_per_min);
                for (wait_s, temperature_c) in setpoints {
                    self.advance(secs(wait_s));
                    let set = DeviceCommand::SetTemperature { temperature_c };
                    if !self.device(&a.instrument, &set, path, &intent) {
                        break;
                    }
                }
                return;
            }
            Err(e) => {
                let (kind, message) = match &e {
                    ExpandError::UnknownPosition(name) => (
                        "position",
                        format!("there is no deck position {name} in this lab"),
                    ),
                    ExpandError::UnknownVessel(v) => (
                        "vessel",
                        format!("vessel {v} is not in the protocol's labware"),
                    ),
                    ExpandError::NoSuchAction { .. } | ExpandError::Parameter(_) => {
                        ("instrument", format!("{e}; the step is not simulated"))
                    }
                };
                self.problem(path, kind, message);
                return;
            }
        };
        for (instrument, command) in &commands {
            if !self.device(instrument, command, path, &intent) {
                return;
            }
        }
        if let Some(Action::Transfer(t)) = a.action.builtin() {
            self.vessels
                .insert(t.vessel.clone(), t.to.to_ascii_uppercase());
        }
    }

    /// Applies one device command to the instrument's backing; false when the instrument would refuse it
    /// or fail, which ends the step.
    fn device(
        &mut self,
        instrument: &str,
        command: &DeviceCommand,
        path: &str,
        intent: &Intent<'_>,
    ) -> bool {
        let Some(backing) = self.backing_of(instrument, path) else {
            return false;
        };
        // A lateral move from low down rises first, as the executor does, from where the head is now.
        if matches!(backing, Backing::Gantry)
            && let Some(rise) =
                interpret::rise_before(self.lab, self.model.gantry().position(), command)
            && !self.device(instrument, &rise, path, intent)
        {
            return false;
        }
        if let Some((trace, limit)) = &mut self.trace
            && trace.len() < *limit
        {
            trace.push((instrument.to_owned(), command.clone()));
        }
        if backing.kind() != command.kind() {
            self.problem(
                path,
                "instrument",
                format!(
                    "{instrument} is a {}, it cannot {}",
                    backing.kind(),
                    intent.name
                ),
            );
            return false;
        }
        let now = self.now;
        match (backing, command) {
            (Backing::Unmodelled { kind, why }, _) => {
                self.note(
                    instrument,
                    format!(
                        "{instrument} ({kind}) is not modelled ({why}): its steps take no time here and \
                         are not checked"
                    ),
                );
                true
            }
            (Backing::Gantry, DeviceCommand::Home) => {
                self.home(path);
                true
            }
            (
                Backing::Gantry,
                DeviceCommand::MoveTo {
                    x_mm,
                    y_mm,
                    z_mm,
                    feed_mm_per_min,
                },
            ) => self.move_head([*x_mm, *y_mm, *z_mm], *feed_mm_per_min, path),
            (Backing::Gantry, DeviceCommand::Gripper { closed: true }) => {
                self.pick(intent.vessel, path);
                true
            }
            (Backing::Gantry, DeviceCommand::Gripper { closed: false }) => {
                self.place(intent.vessel, path);
                true
            }
            (
                Backing::Pump(index),
                DeviceCommand::Dispense {
                    volume_ul,
                    rate_ul_per_min,
                },
            ) => {
                self.dispense(
                    instrument,
                    index,
                    *volume_ul,
                    *rate_ul_per_min,
                    intent.vessel,
                    path,
                );
                true
            }
            (Backing::Pump(index), DeviceCommand::StopPump) => {
                // The first STP pauses a pumping phase, the second stops it (as the driver sends it).
                let _ = self.model.pump_stop(now, index);
                let _ = self.model.pump_stop(now, index);
                true
            }
            (Backing::Balance(index), DeviceCommand::Tare | DeviceCommand::Zero) => {
                let tare = matches!(command, DeviceCommand::Tare);
                self.settle_balance(index, path);
                let now = self.now;
                let result = if tare {
                    self.model.balance_tare(now, index, false)
                } else {
                    self.model.balance_zero(now, index, false)
                };
                if let Err(e) = result {
                    let what = if tare { "tare" } else { "zero" };
                    self.problem(
                        path,
                        "balance",
                        format!("the balance would refuse to {what}: {e}"),
                    );
                }
                true
            }
            (Backing::Balance(index), DeviceCommand::Weigh { stable }) => {
                if *stable {
                    self.settle_balance(index, path);
                }
                match self.model.balance_read(self.now, index) {
                    Ok(reading) if reading.load == LoadState::InRange => {}
                    Ok(reading) => self.problem(
                        path,
                        "balance",
                        format!("{instrument} would report {:?}", reading.load),
                    ),
                    Err(e) => self.problem(path, "balance", format!("{instrument}: {e}")),
                }
                true
            }
            (Backing::Hotplate(h), DeviceCommand::SetTemperature { temperature_c }) => {
                let set = self
                    .model
                    .hotplate_message(now, h)
                    .and_then(|()| self.model.hotplate_set_temperature(now, h, *temperature_c))
                    .and_then(|()| self.model.hotplate_heat(now, h, true));
                if let Err(e) = set {
                    self.problem(
                        path,
                        "hotplate",
                        format!("the hotplate would refuse the setpoint: {e}"),
                    );
                    return false;
                }
                true
            }
            (Backing::Hotplate(h), DeviceCommand::HeaterOff) => {
                let _ = self.model.hotplate_heat(now, h, false);
                true
            }
            (Backing::Hotplate(h), DeviceCommand::SetStirSpeed { speed_rpm }) => {
                // The driver sends whole rpm.
                let set = self
                    .model
                    .hotplate_message(now, h)
                    .and_then(|()| self.model.hotplate_set_speed(now, h, speed_rpm.round()))
                    .and_then(|()| self.model.hotplate_stir(now, h, true));
                if let Err(e) = set {
                    self.problem(
                        path,
                        "hotplate",
                        format!("the hotplate would refuse the stirrer speed: {e}"),
                    );
                }
                true
            }
            (Backing::Hotplate(h), DeviceCommand::StirOff) => {
                let _ = self.model.hotplate_stir(now, h, false);
                true
            }
            (Backing::Hotplate(h), DeviceCommand::ReadTemperature) => {
                if self
                    .model
                    .hotplate_status(now, h)
                    .is_ok_and(|st| st.vial_c.is_none())
                {
                    self.problem(
                        path,
                        "probe",
                        "no vessel on the hotplate: the probe would read the air".to_owned(),
                    );
                }
                true
            }
            (
                Backing::Spectro,
                DeviceCommand::Spectrum {
                    start_nm,
                    stop_nm,
                    step_nm,
                },
            ) => {
                self.spectro(*start_nm, *stop_nm, *step_nm, path);
                true
            }
            (Backing::Spectro, DeviceCommand::Absorbance { wavelength_nm }) => {
                self.spectro(*wavelength_nm, *wavelength_nm, 1.0, path);
                true
            }
            // A defined instrument's action takes the time its definition's duration model says.
            (Backing::Defined(def), DeviceCommand::Defined { action, params }) => {
                let Some(spec) = def.action(action) else {
                    self.problem(
                        path,
                        "instrument",
                        format!("{instrument} cannot {action}; the step is not simulated"),
                    );
                    return false;
                };
                let readings = self
                    .defined
                    .entry(instrument.to_owned())
                    .or_insert_with(|| crate::devices::defined::Value::all(&def));
                for v in readings.iter_mut() {
                    if let Some(target) = params.get(&v.name) {
                        v.set_target(now, def.simulation.tau_s, *target);
                    }
                }
                let s = self.params.estimate_s(instrument, &def, spec, params);
                self.advance(secs(s));
                true
            }
            // A defined instrument's reading is a query: no time worth modelling, nothing to refuse.
            (Backing::Defined(_), DeviceCommand::Read { .. }) => true,
            // Kinds agree, so only a command the role has no such model part for is left.
            (_, other) => {
                self.problem(
                    path,
                    "instrument",
                    format!("{instrument} has no model of {other:?}; the step is not simulated"),
                );
                false
            }
        }
    }

    fn home(&mut self, path: &str) {
        // As the driver does: after a limit alarm GRBL answers nothing until a soft reset.
        if self.model.gantry().reset_required() {
            self.model.gantry_reset(self.now);
        }
        match self.model.gantry_home(self.now) {
            Ok(()) => self.wait_gantry(),
            Err(e) => self.problem(
                path,
                "gantry",
                format!("the gantry would refuse to home: {e}"),
            ),
        }
    }

    /// Advances until the gantry has finished its moves (or homing).
    fn wait_gantry(&mut self) {
        for _ in 0..MAX_WAIT_EVENTS {
            let gantry = self.model.gantry();
            if !matches!(gantry.state(), GantryState::Run | GantryState::Home) {
                return;
            }
            let d = gantry
                .next_event_in()
                .unwrap_or(Duration::from_millis(1))
                .max(Duration::from_nanos(1));
            self.advance(d);
        }
    }

    /// One G1 move, waited for as the driver does; false when the gantry refused it.
    fn move_head(&mut self, target: [f64; 3], feed: f64, path: &str) -> bool {
        let mut result = self.model.gantry_move(self.now, target, Some(feed));
        if let Err(GantryError::Locked(alarm)) = &result {
            let message = if *alarm == GantryAlarm::HomingRequired {
                "the gantry is not homed here: GRBL refuses to move before a home step".to_owned()
            } else {
                format!("the gantry is in alarm ({alarm:?}) and refuses to move")
            };
            self.problem(path, "alarm", message);
            // Carry on as if unlocked, so the rest of the protocol is still checked.
            let _ = self.model.gantry_unlock(self.now);
            result = self.model.gantry_move(self.now, target, Some(feed));
        }
        match result {
            Ok(()) => {
                self.wait_gantry();
                true
            }
            Err(GantryError::SoftLimit(p)) => {
                self.problem(
                    path,
                    "alarm",
                    format!(
                        "gantry alarm: X{} Y{} Z{} lies outside the soft limits (ALARM:2); the run would \
                         fail and the gantry needs a reset and homing",
                        p[0], p[1], p[2]
                    ),
                );
                // Recover where the head stopped, so the rest of the protocol is still checked.
                self.model.gantry_reset(self.now);
                let _ = self.model.gantry_unlock(self.now);
                false
            }
            Err(e) => {
                self.problem(
                    path,
                    "gantry",
                    format!("the gantry would refuse the move: {e}"),
                );
                false
            }
        }
    }

    fn grip(&mut self, closed: bool, path: &str) {
        if let Err(e) = self.model.gantry_grip(self.now, closed) {
            self.problem(path, "gantry", format!("the gripper would not work: {e}"));
        }
    }

    /// The name of the deck position under the head, where there is one.
    fn spot_under_head(&self) -> Option<String> {
        let [x, y, _] = self.model.gantry().position();
        self.model
            .deck()
            .position_near(x, y)
            .map(|p| p.name.clone())
    }

    /// Closes the gripper; a transfer expects to be holding its vessel then.
    fn pick(&mut self, vessel: Option<&str>, path: &str) {
        self.grip(true, path);
        let Some(vessel) = vessel else {
            return;
        };
        let held = self.model.deck().held_vial().map(|v| v.id.clone());
        if held.as_deref() != Some(vessel) {
            let here = self
                .spot_under_head()
                .unwrap_or_else(|| "the head".to_owned());
            let found = match (&held, self.model.deck().vial_at(&here)) {
                (Some(h), _) => format!("the gripper holds {h}"),
                (None, Some(v)) => format!("{} stands there", v.id),
                (None, None) => "the position is empty".to_owned(),
            };
            self.problem(
                path,
                "pick",
                format!("vessel {vessel} is not at {here} to pick up: {found}"),
            );
        }
    }

    /// Opens the gripper; a vessel put where it cannot stand is dropped.
    fn place(&mut self, vessel: Option<&str>, path: &str) {
        let here = self.spot_under_head();
        let dropped = self.model.stats().dropped_vials;
        let occupant = here
            .as_deref()
            .and_then(|h| self.model.deck().vial_at(h))
            .map(|v| v.id.clone());
        let carried = self.model.deck().held_vial().map(|v| v.id.clone());
        self.grip(false, path);
        if self.model.stats().dropped_vials > dropped {
            let why = match (occupant, here) {
                (Some(o), Some(h)) => format!("{h} is occupied by {o}"),
                _ => "it cannot be put down there".to_owned(),
            };
            let what = vessel.map(str::to_owned).or(carried).unwrap_or_default();
            self.problem(
                path,
                "drop",
                format!("vessel {what} would be dropped: {why}"),
            );
        }
    }

    /// The driver's NE-1000 sequence (DIR INF, RAT, VOL, CLD, RUN), then wait until the pump stops.
    fn dispense(
        &mut self,
        instrument: &str,
        index: usize,
        volume_ul: f64,
        rate_ul_per_min: f64,
        vessel: Option<&str>,
        path: &str,
    ) {
        if !(volume_ul.is_finite() && volume_ul > 0.0) {
            self.problem(
                path,
                "pump",
                format!(
                    "volume {volume_ul} uL is not a volume to dispense (0 would run the pump until it empties)"
                ),
            );
            return;
        }
        let now = self.now;
        let set = self
            .model
            .pump_set_direction(now, index, Direction::Infuse)
            .and_then(|()| self.model.pump_set_rate(now, index, rate_ul_per_min))
            .and_then(|()| self.model.pump_set_volume(now, index, volume_ul))
            .and_then(|()| {
                self.model
                    .pump_clear_dispensed(now, index, Direction::Infuse)
            });
        if let Err(e) = set {
            self.problem(
                path,
                "pump",
                format!("{instrument} would refuse the dispense: {e}"),
            );
            return;
        }
        let under = self.model.vial_under_head(now).map(|v| v.id.clone());
        if let (Some(id), Some(vessel)) = (&under, vessel)
            && id != vessel
        {
            self.problem(
                path,
                "wrong-vessel",
                format!("the head is over vessel {id}, not {vessel}: the stock would go into {id}"),
            );
        }
        let before = self.model.stats();
        if let Err(e) = self.model.pump_run(now, index) {
            self.problem(path, "pump", format!("{instrument} would not run: {e}"));
            return;
        }
        for _ in 0..MAX_WAIT_EVENTS {
            let Some(pump) = self.model.pump(index) else {
                break;
            };
            if !pump.is_running() {
                break;
            }
            let Some(next) = pump.next_event_in() else {
                break;
            };
            self.advance(next.max(Duration::from_nanos(1)));
        }
        if self.model.pump(index).is_some_and(|p| p.is_running()) {
            // Cannot happen with a volume target; never leave a pump running into later steps.
            let _ = self.model.pump_stop(self.now, index);
            let _ = self.model.pump_stop(self.now, index);
        }
        let now = self.now;
        if let Ok(status) = self.model.pump_status(now, index)
            && status.alarm == Some(PumpAlarm::Stalled)
        {
            self.problem(
                path,
                "stock",
                format!(
                    "{instrument}'s stock runs out: the syringe empties after {:.1} of {volume_ul} uL",
                    status.infused_ul
                ),
            );
            let _ = self.model.pump_clear_alarm(now, index);
        }
        let after = self.model.stats();
        let spilled = after.spilled_ul - before.spilled_ul;
        let overflow = after.overflow_ul - before.overflow_ul;
        if spilled > 1e-9 {
            let [x, y, _] = self.model.gantry().position();
            self.problem(
                path,
                "spill",
                format!(
                    "{spilled:.1} uL would spill: no vessel under the head at X{x:.1} Y{y:.1} \
                     (move the head over {} first)",
                    vessel.unwrap_or("the vessel")
                ),
            );
        }
        if let Some(id) = under
            && let Some(v) = self.model.vial(&id)
        {
            let (total, capacity) = (v.contents.total_ul(), v.capacity_ul);
            let max_fill = self.lab.deck.max_fill_fraction;
            if overflow > 1e-9 {
                self.problem(
                    path,
                    "overflow",
                    format!(
                        "vessel {id} would overflow: {overflow:.1} uL do not fit in its {capacity} uL"
                    ),
                );
            } else if total > capacity * max_fill + 1e-6 {
                self.problem(
                    path,
                    "overflow",
                    format!(
                        "vessel {id} would hold {total:.1} uL, above the lab's max fill of {max_fill} \
                         of its {capacity} uL"
                    ),
                );
            }
        }
    }

    /// Waits until balance `index`'s reading is stable, as `S`, `T` and `Z` do.
    fn settle_balance(&mut self, index: usize, path: &str) {
        let stable_at = self
            .model
            .balance_stable_at(self.now, index)
            .unwrap_or(self.now);
        let wait = stable_at.saturating_sub(self.now);
        let limit = secs(MtSicsConfig::default().stable_timeout_s);
        if wait > limit {
            self.problem(
                path,
                "balance",
                format!(
                    "the balance would not settle within {} s",
                    limit.as_secs_f64()
                ),
            );
            self.advance(limit);
        } else {
            self.advance(wait);
        }
    }

    // ----- measurements -----

    fn measure(&mut self, m: &MeasureStep, path: &str) {
        let command = interpret::measurement_command(&m.measurement);
        let intent = Intent {
            name: m.measurement.name(),
            vessel: None,
        };
        self.device(&m.instrument, &command, path, &intent);
    }

    /// One measurement: the integration time, then the reading of the vial under the head.
    fn spectro(&mut self, start_nm: f64, stop_nm: f64, step_nm: f64, path: &str) {
        let integration =
            Duration::from_millis(u64::from(ScpiConfig::default().default_integration_ms));
        self.advance(integration);
        let message = match self.model.spectrum(self.now, start_nm, stop_nm, step_nm) {
            Ok(_) => return,
            Err(SpectroError::NoVial) => {
                let [x, y, _] = self.model.gantry().position();
                format!("no vessel under the probe at X{x:.1} Y{y:.1}: the measurement would fail")
            }
            Err(e) => format!("the measurement would fail: {e}"),
        };
        self.problem(path, "spectro", message);
    }

    // ----- wait_until -----

    /// The live reading `wait_until` tests, as the instrument's telemetry reports it.
    fn reading(&mut self, instrument: &str, quantity: &str) -> Option<f64> {
        let now = self.now;
        match (self.backing.get(instrument)?, quantity) {
            (Backing::Defined(def), _) => {
                let tau_s = def.simulation.tau_s;
                let readings = self
                    .defined
                    .entry(instrument.to_owned())
                    .or_insert_with(|| crate::devices::defined::Value::all(def));
                readings
                    .iter()
                    .find(|v| v.name == quantity)
                    .map(|v| v.at(now, tau_s))
            }
            (&Backing::Hotplate(h), "temperature_c") => {
                let ambient = self.model.config().ambient_c;
                let status = self.model.hotplate_status(now, h).ok()?;
                Some(status.vial_c.unwrap_or(ambient))
            }
            (&Backing::Hotplate(h), "plate_temperature_c") => {
                self.model.hotplate_status(now, h).ok().map(|s| s.plate_c)
            }
            (&Backing::Hotplate(h), "stir_speed_rpm") => {
                self.model.hotplate_status(now, h).ok().map(|s| s.speed_rpm)
            }
            (&Backing::Balance(index), "mass_g") => {
                self.model.balance_read(now, index).ok().map(|r| r.value_g)
            }
            (Backing::Pump(index), "dispensed_ul") => {
                let index = *index;
                self.model
                    .pump_status(now, index)
                    .ok()
                    .map(|s| s.infused_ul)
            }
            (Backing::Gantry, "x_mm" | "y_mm" | "z_mm") => {
                let p = self.model.gantry_status(now).position;
                Some(match quantity {
                    "x_mm" => p[0],
                    "y_mm" => p[1],
                    _ => p[2],
                })
            }
            _ => None,
        }
    }

    fn wait_until(&mut self, w: &WaitUntilStep, path: &str) {
        let c = &w.condition;
        let timeout = if w.timeout_s.is_finite() && w.timeout_s > 0.0 {
            w.timeout_s.min(FAR_FUTURE_S)
        } else {
            0.0
        };
        let hold = c
            .hold_s
            .filter(|h| h.is_finite() && *h > 0.0)
            .unwrap_or(0.0)
            .min(FAR_FUTURE_S);
        let t0 = self.now;
        if self.reading(&c.instrument, &c.quantity).is_none() {
            self.problem(
                path,
                "timeout",
                format!(
                    "would time out after {timeout} s: {} reports no {}",
                    c.instrument, c.quantity
                ),
            );
            self.advance(secs(timeout));
            return;
        }
        let interval = (timeout / MAX_POLLS_PER_WAIT).max(POLL_S);
        let mut holding_since: Option<Duration> = None;
        let mut last = f64::NAN;
        for _ in 0..(MAX_POLLS_PER_WAIT as u64 + 16) {
            self.work += 1;
            let reading = self.reading(&c.instrument, &c.quantity).unwrap_or(f64::NAN);
            last = reading;
            if c.op.holds(reading, c.value, c.tolerance) {
                let since = *holding_since.get_or_insert(self.now);
                if self.now.saturating_sub(since).as_secs_f64() >= hold - 1e-9 {
                    return;
                }
            } else {
                holding_since = None;
            }
            let elapsed = self.since(t0);
            if elapsed >= timeout - 1e-9 {
                break;
            }
            self.advance(secs(interval.min(timeout - elapsed).max(1e-6)));
        }
        let mut message = format!(
            "would time out after {timeout} s: {} {} reads {last:.2}, the condition is {} {}{}",
            c.instrument,
            c.quantity,
            op_text(c.op),
            c.value,
            c.tolerance.map_or(String::new(), |t| format!(" +/- {t}")),
        );
        if hold > 0.0 {
            message.push_str(&format!(" held {hold} s"));
        }
        if let Some(&Backing::Hotplate(h)) = self.backing.get(&c.instrument)
            && let Ok(st) = self.model.hotplate_status(self.now, h)
        {
            if c.quantity == "temperature_c" && st.vial_c.is_none() {
                message.push_str(" (no vessel on the hotplate: the probe reads the air)");
            } else if st.heating {
                message.push_str(&format!(" (setpoint {} C)", st.setpoint_c));
            } else {
                message.push_str(" (heater off)");
            }
        }
        self.problem(path, "timeout", message);
        // A timeout lands exactly at the limit even if the last reading interval overshot it.
        let end = t0.saturating_add(secs(timeout));
        if end > self.now {
            self.advance(end - self.now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use labctl_protocols::{
        AbsorbanceParams, Condition, DispenseParams, Labware, LabwareKind, Measurement,
        MoveToParams, MoveXyzParams, OnError, SetTemperatureParams, SpectrumParams, TransferParams,
        WaitStep, validate_bytes,
    };

    use super::*;

    const DYE_MIX: &str = include_str!("../../protocols/examples/dye-mix.json");
    const HEAT_AND_HOLD: &str = include_str!("../../protocols/examples/heat-and-hold.json");
    const PARALLEL_PREP: &str = include_str!("../../protocols/examples/parallel-prep.json");
    const TITRATION: &str = include_str!("../../protocols/examples/titration-series.json");

    /// The executor's default feed in the sim lab (its envelope's 3000 mm/min), in mm/s.
    const FEED_MM_S: f64 = 3000.0 / 60.0;
    // Deck of the sim lab: A1 at (20, 20), rack pitch 20 mm, W1 (200, 40), H1 (200, 100); safe z 50 mm and
    // every work height 0, so lowering or raising the head is 50 mm = 1 s at 3000 mm/min.
    const UP_DOWN_S: f64 = 50.0 / FEED_MM_S;
    /// Homing from the power-on position (which is the home position): only the switch pull-off.
    const HOMING_S: f64 = 0.5;
    /// Spectrometer integration (SCPI default 100 ms).
    const INTEGRATION_S: f64 = 0.1;
    /// Balance settling after a load change (1.5 s), less the 1 s the head takes to rise after putting
    /// the vial down.
    const SETTLE_AFTER_PLACING_S: f64 = 1.5 - UP_DOWN_S;

    /// The examples are valid, so the validator hands back the decoded protocol.
    fn parse(json: &str) -> Protocol {
        validate_bytes(json.as_bytes(), &Lab::sim())
            .protocol
            .expect("valid example protocol")
    }

    fn run_protocol(p: &Protocol) -> DryRunReport {
        let report = dry_run(p, &Lab::sim(), 7);
        eprintln!("{report:#?}");
        report
    }

    /// The sim lab without its setpoint ramp: the heating tests compare with first-order closed forms,
    /// which assume the setpoint is there at once.
    fn run_unramped(p: &Protocol) -> DryRunReport {
        let mut lab = Lab::sim();
        for inst in &mut lab.instruments {
            inst.envelope.ramp_c_per_min = None;
        }
        dry_run(p, &lab, 7)
    }

    /// The lab's ramp (10 C/min from the plate's 22 C) delays heating by about the ramp's length: a
    /// setpoint of 45 C reached in 23 increments, the last after 132 s.
    #[test]
    fn a_ramped_setpoint_heats_later_than_an_instant_one() {
        let only = {
            let mut p = parse(HEAT_AND_HOLD);
            p.steps = p.steps[3..6].to_vec();
            p
        };
        let instant = run_unramped(&only).estimated_duration_s;
        let ramped = run_protocol(&only).estimated_duration_s;
        let ramp_s = labctl_protocols::lab::ramp_setpoints(22.0, 45.0, 10.0)
            .iter()
            .map(|(w, _)| w)
            .sum::<f64>();
        assert!((ramp_s - 132.0).abs() < 1e-9, "{ramp_s}");
        // Slower than instant, by less than the ramp itself (the plate heats while the setpoint rises).
        assert!(ramped > instant, "{ramped} vs {instant}");
        assert!(
            ramped < instant + ramp_s + 1.0,
            "{ramped} vs {instant} + {ramp_s}"
        );
    }

    /// Travel time of the head between two deck points at the default feed (s).
    fn travel(a: (f64, f64), b: (f64, f64)) -> f64 {
        (a.0 - b.0).hypot(a.1 - b.1) / FEED_MM_S
    }

    fn has_problem(report: &DryRunReport, path: &str, words: &str) -> bool {
        report
            .problems
            .iter()
            .any(|p| p.path == path && p.message.contains(words))
    }

    // Protocols the validator would refuse (that is the point: the dry run must judge them on its own)
    // are built in code.

    fn protocol(labware: Vec<Labware>, steps: Vec<Step>) -> Protocol {
        let mut p = parse(DYE_MIX);
        p.labware = labware;
        p.steps = steps;
        p
    }

    fn vial(id: &str, at: &str, initial_volume_ul: f64) -> Labware {
        Labware {
            id: id.into(),
            kind: LabwareKind::Vial,
            location: at.into(),
            capacity_ul: 20_000.0,
            initial_volume_ul,
        }
    }

    fn act(instrument: &str, action: Action) -> Step {
        Step::Action(ActionStep {
            id: None,
            instrument: instrument.into(),
            action: action.into(),
            timeout_s: None,
            on_error: OnError::Fail,
        })
    }

    fn home() -> Step {
        act("gantry", Action::Home {})
    }

    fn move_to(position: &str) -> Step {
        act(
            "gantry",
            Action::MoveTo(MoveToParams {
                position: position.into(),
                feed_mm_per_min: None,
            }),
        )
    }

    fn dispense(pump: &str, vessel: &str, volume_ul: f64, rate_ul_per_min: f64) -> Step {
        act(
            pump,
            Action::Dispense(DispenseParams {
                vessel: vessel.into(),
                volume_ul,
                rate_ul_per_min,
            }),
        )
    }

    fn transfer(vessel: &str, to: &str) -> Step {
        act(
            "gantry",
            Action::Transfer(TransferParams {
                vessel: vessel.into(),
                to: to.into(),
            }),
        )
    }

    fn set_temperature(temperature_c: f64) -> Step {
        act(
            "hotplate",
            Action::SetTemperature(SetTemperatureParams { temperature_c }),
        )
    }

    fn wait(duration_s: f64) -> Step {
        Step::Wait(WaitStep {
            id: None,
            duration_s,
            on_error: OnError::Fail,
        })
    }

    fn wait_until(
        instrument: &str,
        quantity: &str,
        op: Comparison,
        value: f64,
        timeout_s: f64,
    ) -> Step {
        Step::WaitUntil(WaitUntilStep {
            id: None,
            condition: Condition {
                instrument: instrument.into(),
                quantity: quantity.into(),
                op,
                value,
                tolerance: None,
                hold_s: None,
            },
            timeout_s,
            on_error: OnError::Fail,
        })
    }

    fn measure(instrument: &str, measurement: Measurement) -> Step {
        Step::Measure(MeasureStep {
            id: None,
            instrument: instrument.into(),
            measurement,
            result: "r".into(),
            timeout_s: None,
            on_error: OnError::Fail,
        })
    }

    /// Two balances, each on a station of its own: each weighs what stands on its own pan. A vial of
    /// 5 mL (about 15 g with its 10 g tare) on W2 shows on the second balance and not on the first; moved
    /// to W1, the other way round. A wait on the wrong balance times out, which is how a protocol that
    /// confuses them is caught before it runs.
    #[test]
    fn two_balances_each_weigh_what_stands_on_their_own_pan() {
        let text = labctl_protocols::lab::SIM_LAB_TOML.replace(
            "[[instruments]]\nid = \"gantry\"",
            "[[deck.stations]]\nname = \"W2\"\nx_mm = 240.0\ny_mm = 40.0\ninstrument = \"balance-2\"\n\n\
             [[instruments]]\nid = \"balance-2\"\nkind = \"balance\"\ndriver = \"mt_sics\"\n\
             transport = { type = \"simulated\" }\ncapabilities = { mass_g = [-220, 220] }\n\
             envelope = { mass_g = [0, 200] }\n\n[[instruments]]\nid = \"gantry\"",
        );
        let lab = Lab::from_toml_str(&text, "two balances").unwrap();
        let on = |balance: &str, timeout_s: f64| {
            wait_until(balance, "mass_g", Comparison::Gt, 12.0, timeout_s)
        };
        let weighed = |steps: Vec<Step>| {
            let p = protocol(vec![vial("v1", "W2", 5000.0)], steps);
            dry_run(&p, &lab, 7)
        };
        let report = weighed(vec![
            on("balance-2", 10.0),
            home(),
            transfer("v1", "W1"),
            on("balance", 10.0),
            measure(
                "balance",
                Measurement::Weigh(labctl_protocols::WeighParams { stable: true }),
            ),
        ]);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(
            !report.notes.iter().any(|n| n.contains("not modelled")),
            "{:?}",
            report.notes
        );
        let wrong = weighed(vec![on("balance", 10.0)]);
        assert_eq!(wrong.problems.len(), 1, "{:?}", wrong.problems);
        assert!(
            wrong.problems[0].message.contains("time out"),
            "{:?}",
            wrong.problems
        );
        let left = weighed(vec![home(), transfer("v1", "W1"), on("balance-2", 10.0)]);
        assert_eq!(left.problems.len(), 1, "{:?}", left.problems);
    }

    /// Two hotplates, each under a station of its own: a setpoint on the second heats the vessel on
    /// H2 and nothing else, so a wait on the second's probe is reached and the same wait on the first's
    /// times out, naming its heater as off.
    #[test]
    fn two_hotplates_each_heat_the_vessel_on_their_own_plate() {
        let text = labctl_protocols::lab::SIM_LAB_TOML.replace(
            "[[instruments]]\nid = \"gantry\"",
            "[[deck.stations]]\nname = \"H2\"\nx_mm = 240.0\ny_mm = 100.0\ninstrument = \"hotplate-2\"\n\n\
             [[instruments]]\nid = \"gantry\"",
        ) + "\n[[instruments]]\nid = \"hotplate-2\"\nkind = \"hotplate\"\ndriver = \"ika_namur\"\n\
             transport = { type = \"simulated\" }\n\
             capabilities = { temperature_c = [0, 340], stir_speed_rpm = [0, 1500] }\n\
             envelope = { temperature_c = [15, 90], stir_speed_rpm = [0, 1000] }\n";
        let lab = Lab::from_toml_str(&text, "two hotplates").unwrap();
        let heat_second = act(
            "hotplate-2",
            Action::SetTemperature(SetTemperatureParams {
                temperature_c: 40.0,
            }),
        );
        let warm = |on: &str| wait_until(on, "temperature_c", Comparison::Ge, 35.0, 1200.0);
        let run = |steps: Vec<Step>| {
            let p = protocol(
                vec![vial("a", "H1", 5000.0), vial("b", "H2", 5000.0)],
                steps,
            );
            dry_run(&p, &lab, 3)
        };
        let report = run(vec![heat_second.clone(), warm("hotplate-2")]);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(
            report.estimated_duration_s > 10.0 && report.estimated_duration_s < 1200.0,
            "{report:?}"
        );
        assert!(
            !report.notes.iter().any(|n| n.contains("not modelled")),
            "{:?}",
            report.notes
        );
        let wrong = run(vec![heat_second, warm("hotplate")]);
        assert_eq!(wrong.problems.len(), 1, "{:?}", wrong.problems);
        assert!(
            wrong.problems[0].message.contains("heater off"),
            "{:?}",
            wrong.problems
        );
    }

    fn repeat(count: u32, steps: Vec<Step>) -> Step {
        Step::Repeat(RepeatStep {
            id: None,
            count,
            steps,
            timeout_s: None,
            on_error: OnError::Fail,
        })
    }

    #[test]
    fn dye_mix_takes_its_dispenses_wait_and_moves() {
        let report = run_protocol(&parse(DYE_MIX));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(report.notes.is_empty(), "{:?}", report.notes);
        assert_eq!(report.steps_simulated, 12);
        // 300 + 150 + 450 uL at 600 uL/min: 90 s of pumping, plus the 30 s mixing wait.
        let fixed = 90.0 + 30.0;
        // Two transfers lower and raise the head twice each: 8 s of vertical travel at least; the
        // horizontal legs, homing, integration and settling stay well under 15 s on this small deck.
        let est = report.estimated_duration_s;
        let vertical = 4.0 * 2.0 * UP_DOWN_S;
        assert!(
            (fixed + vertical..fixed + vertical + 15.0).contains(&est),
            "{est}"
        );
        // Exactly, from the model's figures.
        let expected = HOMING_S
            + travel((0.0, 0.0), (20.0, 20.0))
            + fixed
            + (4.0 * UP_DOWN_S + travel((20.0, 20.0), (200.0, 100.0)))
            + INTEGRATION_S
            + (4.0 * UP_DOWN_S + travel((200.0, 100.0), (200.0, 40.0)))
            + SETTLE_AFTER_PLACING_S;
        assert!((est - expected).abs() < 0.01, "{est} vs {expected}");
    }

    #[test]
    fn heat_and_hold_waits_as_long_as_first_order_heating_predicts() {
        let config = LabConfig::sim_default();
        // The vial on the plate relaxes from ambient towards the setpoint with the vial time constant:
        // within 0.5 C of 45 C after tau * ln((45 - 22) / 0.5), then held 30 s.
        let tau = config.hotplate.vial_tau_s;
        let predicted = tau * ((45.0 - config.ambient_c) / 0.5).ln() + 30.0;
        assert!((489.0..490.0).contains(&predicted), "{predicted}");

        let report = run_unramped(&parse(HEAT_AND_HOLD));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let others = HOMING_S + travel((0.0, 0.0), (200.0, 100.0)) + 600.0 + 2.0 * INTEGRATION_S;
        let wait_until = report.estimated_duration_s - others;
        // Read once a (virtual) second: at most one reading late.
        assert!(
            wait_until >= predicted - 1e-6 && wait_until <= predicted + 1.0 + 1e-6,
            "wait_until took {wait_until} s, the first-order model says {predicted} s"
        );

        // The same steps alone (stirrer, setpoint, wait_until): the estimate is the heating time.
        let mut only = parse(HEAT_AND_HOLD);
        only.steps = only.steps[3..6].to_vec();
        let alone = run_unramped(&only);
        assert!(alone.problems.is_empty(), "{:?}", alone.problems);
        assert!(
            (alone.estimated_duration_s - predicted).abs() <= 1.0,
            "{} vs {predicted}",
            alone.estimated_duration_s
        );
    }

    #[test]
    fn parallel_prep_lasts_as_long_as_its_preheating_branch() {
        let report = run_unramped(&parse(PARALLEL_PREP));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let config = LabConfig::sim_default();
        // Plate from 22 C towards 40 C with tau 120 s reaches 39.5 C after 120 ln(18 / 0.5) = 430 s, read
        // at 431 s; the other branch (move, two 1000 uL dispenses at 800 uL/min side by side) takes 77 s.
        let preheat = config.hotplate.plate_tau_s * ((40.0 - config.ambient_c) / 0.5).ln();
        let dispensing = travel((0.0, 0.0), (60.0, 60.0)) + 1000.0 / 800.0 * 60.0;
        assert!(dispensing < preheat);
        let expected = HOMING_S
            + (1.5 - HOMING_S) // zero waits for the balance to settle after power-on
            + preheat.ceil()
            + (4.0 * UP_DOWN_S + travel((60.0, 60.0), (200.0, 40.0)))
            + SETTLE_AFTER_PLACING_S
            + (4.0 * UP_DOWN_S + travel((200.0, 40.0), (200.0, 100.0)))
            + 60.0;
        let est = report.estimated_duration_s;
        assert!((est - expected).abs() < 0.01, "{est} vs {expected}");
    }

    #[test]
    fn titration_series_repeats_its_additions() {
        let report = run_protocol(&parse(TITRATION));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.steps_simulated, 2 + 1 + 5 * 3);
        // Five times: 200 uL at 400 uL/min (30 s), 5 s wait, one absorbance reading.
        let expected =
            HOMING_S + travel((0.0, 0.0), (40.0, 40.0)) + 5.0 * (30.0 + 5.0 + INTEGRATION_S);
        let est = report.estimated_duration_s;
        assert!((est - expected).abs() < 0.01, "{est} vs {expected}");
    }

    #[test]
    fn the_estimate_is_reproducible_and_its_duration_independent_of_the_seed() {
        let p = parse(DYE_MIX);
        let a = dry_run(&p, &Lab::sim(), 1);
        assert_eq!(a, dry_run(&p, &Lab::sim(), 1));
        assert_eq!(
            a.estimated_duration_s,
            dry_run(&p, &Lab::sim(), 2).estimated_duration_s
        );
    }

    #[test]
    fn dispensing_over_an_empty_position_reports_the_spill() {
        let p = protocol(
            vec![vial("mix1", "A1", 0.0)],
            vec![
                home(),
                move_to("B3"),
                dispense("pump-red", "mix1", 100.0, 600.0),
            ],
        );
        let report = run_protocol(&p);
        assert!(
            has_problem(
                &report,
                "/steps/2",
                "uL would spill: no vessel under the head"
            ),
            "{:?}",
            report.problems
        );
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        // All of it, give or take the pump's seeded volume error (0.5 % standard deviation).
        let spilled: f64 = report.problems[0]
            .message
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((95.0..105.0).contains(&spilled), "{spilled}");
        // The pump still runs its 10 s.
        let expected = HOMING_S + travel((0.0, 0.0), (60.0, 40.0)) + 10.0;
        assert!((report.estimated_duration_s - expected).abs() < 0.01);
    }

    #[test]
    fn dispensing_over_another_vessel_says_where_the_stock_goes() {
        let p = protocol(
            vec![vial("mix1", "A1", 0.0), vial("other", "A2", 0.0)],
            vec![
                home(),
                move_to("A2"),
                dispense("pump-red", "mix1", 100.0, 600.0),
            ],
        );
        let report = run_protocol(&p);
        assert!(
            has_problem(&report, "/steps/2", "over vessel other, not mix1"),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn waiting_for_an_unreachable_temperature_times_out() {
        let p = protocol(
            vec![vial("s", "H1", 5000.0)],
            vec![
                set_temperature(30.0),
                wait_until("hotplate", "temperature_c", Comparison::Ge, 80.0, 900.0),
            ],
        );
        let report = run_unramped(&p);
        assert!(
            has_problem(&report, "/steps/1", "would time out after 900 s"),
            "{:?}",
            report.problems
        );
        assert!(has_problem(&report, "/steps/1", "setpoint 30 C"));
        assert!((report.estimated_duration_s - 900.0).abs() < 1e-6);

        // Without a vessel on the plate the probe reads the air, and the problem says so.
        let p = protocol(
            vec![vial("s", "A1", 5000.0)],
            vec![
                set_temperature(40.0),
                wait_until("hotplate", "temperature_c", Comparison::Ge, 39.0, 3600.0),
            ],
        );
        let report = run_unramped(&p);
        assert!(has_problem(&report, "/steps/1", "probe reads the air"));
    }

    #[test]
    fn a_repeat_of_100000_iterations_is_extrapolated_quickly() {
        let p = protocol(
            vec![],
            vec![
                home(),
                repeat(100_000, vec![move_to("A1"), move_to("A2"), wait(2.0)]),
            ],
        );
        let started = Instant::now();
        let report = dry_run(&p, &Lab::sim(), 7);
        let took = started.elapsed();
        eprintln!("{report:#?} in {took:?}");
        assert!(took.as_secs_f64() < 30.0, "{took:?}");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(
            report.steps_simulated <= MAX_SIMULATED_STEPS + 4,
            "{}",
            report.steps_simulated
        );
        assert!(
            report.notes.iter().any(|n| n.contains("/steps/1")
                && n.contains("extrapolated")
                && n.contains("of 100000 iterations simulated")),
            "{:?}",
            report.notes
        );
        // Per iteration: 20 mm there and back (0.4 s each) and 2 s of waiting.
        let per = 2.0 * travel((20.0, 20.0), (40.0, 20.0)) + 2.0;
        let expected = HOMING_S + 100_000.0 * per;
        let est = report.estimated_duration_s;
        assert!((est - expected).abs() < 1.0, "{est} vs {expected}");
    }

    #[test]
    fn a_stock_running_out_is_reported_simulated_or_extrapolated() {
        // Three 4 mL dispenses from a 10 mL syringe: the third stops short.
        let p = protocol(
            vec![vial("v", "A1", 0.0)],
            vec![
                home(),
                move_to("A1"),
                dispense("pump-red", "v", 4000.0, 1000.0),
                dispense("pump-red", "v", 4000.0, 1000.0),
                dispense("pump-red", "v", 4000.0, 1000.0),
            ],
        );
        let report = run_protocol(&p);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(has_problem(&report, "/steps/4", "stock runs out"));

        // A million tiny dispenses: the simulated part leaves stock, the extrapolated part does not.
        let p = protocol(
            vec![vial("v", "A1", 0.0)],
            vec![
                home(),
                move_to("A1"),
                repeat(
                    1_000_000,
                    vec![dispense("pump-red", "v", 0.02, 1000.0), wait(1.0)],
                ),
            ],
        );
        let report = dry_run(&p, &Lab::sim(), 7);
        assert!(
            has_problem(&report, "/steps/2", "stock would run out after about"),
            "{:?}",
            report.problems
        );
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
    }

    #[test]
    fn gantry_conflicts_are_reported() {
        // Outside the soft limits: ALARM:2; the next move is still simulated after the recovery.
        let p = protocol(
            vec![],
            vec![
                home(),
                act(
                    "gantry",
                    Action::MoveXyz(MoveXyzParams {
                        x_mm: 400.0,
                        y_mm: 10.0,
                        z_mm: 50.0,
                        feed_mm_per_min: None,
                    }),
                ),
                move_to("A1"),
            ],
        );
        let report = run_protocol(&p);
        assert!(has_problem(&report, "/steps/1", "soft limits"));
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);

        // A move before homing.
        let report = run_protocol(&protocol(vec![], vec![move_to("A1")]));
        assert!(has_problem(&report, "/steps/0", "not homed"));

        // Putting a vessel down where another stands drops it.
        let p = protocol(
            vec![vial("a", "A1", 0.0), vial("b", "A2", 0.0)],
            vec![home(), transfer("a", "A2")],
        );
        let report = run_protocol(&p);
        assert!(has_problem(
            &report,
            "/steps/1",
            "would be dropped: A2 is occupied by b"
        ));
    }

    #[test]
    fn a_measurement_with_no_vessel_under_the_probe_is_reported() {
        let spectrum = Measurement::Spectrum(SpectrumParams {
            start_nm: 380.0,
            stop_nm: 780.0,
            step_nm: 5.0,
        });
        let p = protocol(
            vec![vial("v", "A1", 1000.0)],
            vec![home(), move_to("D6"), measure("spectro", spectrum)],
        );
        let report = run_protocol(&p);
        assert!(has_problem(
            &report,
            "/steps/2",
            "no vessel under the probe"
        ));

        // Over the vial, but with too little liquid for the dip probe.
        let absorbance = Measurement::Absorbance(AbsorbanceParams {
            wavelength_nm: 520.0,
        });
        let p = protocol(
            vec![vial("v", "A1", 20.0)],
            vec![home(), move_to("A1"), measure("spectro", absorbance)],
        );
        let report = run_protocol(&p);
        assert!(has_problem(&report, "/steps/2", "too small for the probe"));
    }

    #[test]
    fn an_overflowing_vessel_is_reported() {
        let tube = Labware {
            id: "small".into(),
            kind: LabwareKind::Tube,
            location: "A1".into(),
            capacity_ul: 1000.0,
            initial_volume_ul: 0.0,
        };
        let p = protocol(
            vec![tube],
            vec![
                home(),
                move_to("A1"),
                dispense("pump-blue", "small", 1500.0, 1000.0),
            ],
        );
        let report = run_protocol(&p);
        assert!(
            has_problem(&report, "/steps/2", "would overflow"),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn step_timeouts_are_checked() {
        // 223.6 mm at 10 mm/min is 22 minutes, past the default 120 s.
        let slow = act(
            "gantry",
            Action::MoveTo(MoveToParams {
                position: "H1".into(),
                feed_mm_per_min: Some(10.0),
            }),
        );
        let report = run_protocol(&protocol(vec![], vec![home(), slow]));
        assert!(has_problem(&report, "/steps/1", "would time out"));
    }

    #[test]
    fn hostile_protocols_neither_panic_nor_hang() {
        // Nested far deeper than simulated, each level repeated as often as a u32 allows.
        let mut nested = wait(1.0);
        for _ in 0..200 {
            nested = repeat(u32::MAX, vec![nested, wait(1.0)]);
        }
        let deep = protocol(vec![], vec![home(), nested, repeat(u32::MAX, vec![])]);
        // Odd numbers, unknown names, instruments asked what they cannot do.
        let odd = protocol(
            vec![vial("v", "Z9", f64::MAX), vial("v", "A1", f64::NAN)],
            vec![
                wait(-3.0),
                wait(f64::INFINITY),
                act("nope", Action::Home {}),
                act("spectro", Action::Home {}),
                dispense("pump-red", "v", 0.0, 1e9),
                transfer("ghost", "Q1"),
                wait_until("balance", "colour", Comparison::Gt, 1.0, 1e300),
                wait_until("balance", "mass_g", Comparison::Gt, 1.0, 1e7),
                dispense("pump-red", "v", f64::NAN, f64::NAN),
                set_temperature(f64::NAN),
                repeat(0, vec![home()]),
                Step::Parallel(ParallelStep {
                    id: None,
                    branches: vec![vec![], vec![wait(f64::NAN)]],
                    timeout_s: Some(-1.0),
                    on_error: OnError::Fail,
                }),
            ],
        );
        let started = Instant::now();
        let deep = run_protocol(&deep);
        let odd = run_protocol(&odd);
        let took = started.elapsed();
        assert!(took.as_secs_f64() < 60.0, "{took:?}");
        assert!(
            deep.problems
                .iter()
                .any(|p| p.message.contains("nested deeper"))
        );
        assert!(deep.estimated_duration_s > 0.0 && !deep.estimated_duration_s.is_nan());
        assert!(!deep.notes.is_empty());
        assert!(odd.estimated_duration_s.is_finite());
        assert!(has_problem(&odd, "/labware/0", "no deck position Z9"));
        assert!(has_problem(&odd, "/steps/2", "not in this lab"));
        assert!(has_problem(&odd, "/steps/3", "cannot home"));
        assert!(has_problem(&odd, "/steps/4", "not a volume"));
        assert!(has_problem(&odd, "/steps/5", "ghost"));
        assert!(has_problem(&odd, "/steps/6", "reports no colour"));
        assert!(has_problem(&odd, "/steps/7", "would time out"));
        assert!(has_problem(&odd, "/steps/9", "refuse the setpoint"));
    }

    #[test]
    fn problems_inside_a_repeat_are_reported_once() {
        let p = protocol(
            vec![vial("v", "A1", 0.0)],
            vec![
                home(),
                move_to("B3"),
                repeat(50, vec![dispense("pump-yellow", "v", 10.0, 600.0)]),
            ],
        );
        let report = run_protocol(&p);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].path, "/steps/2/steps/0");
    }

    /// A defined instrument's readings follow its setpoints in the dry run on the same state model as its
    /// simulator: a `wait_until` the setpoint reaches passes in the time the lag takes, one it never reaches
    /// is the timeout problem it would be in the lab.
    #[test]
    fn a_defined_instrument_s_readings_follow_its_setpoints_on_the_simulator_s_model() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = format!(
            "{}\n[[instruments]]\nid = \"stirrer\"\nkind = \"defined\"\ndriver = \"definition\"\n\
             definition = \"instruments/ika-rct-digital.toml\"\ntransport = {{ type = \"simulated\" }}\n\
             envelope = {{ temperature_c = [15, 80], speed_rpm = [0, 1000] }}\n",
            labctl_protocols::lab::SIM_LAB_TOML
        );
        let lab = Lab::from_toml_str_in(&text, "test", &root).unwrap();
        let walk = |target: f64| {
            let json = serde_json::json!({
                "version": 1,
                "metadata": { "name": "t", "proposal_id": "t", "planner": { "id": "p" } },
                "steps": [
                    { "type": "action", "instrument": "stirrer", "action": "set_temperature",
                      "params": { "temperature_c": 40.0 } },
                    { "type": "wait_until", "condition": { "instrument": "stirrer", "quantity": "temperature_c",
                      "op": "gt", "value": target }, "timeout_s": 300 }
                ]
            });
            let report = validate_bytes(json.to_string().as_bytes(), &lab);
            dry_run(report.protocol.as_ref().expect("valid"), &lab, 1)
        };
        // 22 -> 40 degC, 6 s per degree for the setpoint (the definition's duration model), and by then the
        // probe (tau 10 s) is above 39.
        let reached = walk(39.0);
        assert!(reached.problems.is_empty(), "{:?}", reached.problems);
        assert!(
            reached.estimated_duration_s < 18.0 * 6.0 + 300.0,
            "{reached:?}"
        );
        let never = walk(45.0);
        assert_eq!(never.problems.len(), 1, "{:?}", never.problems);
        assert!(
            never.problems[0].message.contains("time out"),
            "{:?}",
            never.problems
        );
    }

    /// A lab of another shape than the simulated one: four pumps, two balances and a defined stirrer. Each
    /// instrument is its own model-backed instrument: every pump pours from its own syringe, the defined
    /// stirrer takes its definition's time, and the second balance is a balance of its own (with no
    /// station on the deck, it weighs nothing), never read as the first.
    #[test]
    fn a_lab_of_four_pumps_two_balances_and_a_defined_stirrer_is_walked_instrument_by_instrument() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = format!(
            "{}\n[[instruments]]\nid = \"pump-water\"\nkind = \"syringe_pump\"\ndriver = \"ne1000\"\n\
             transport = {{ type = \"simulated\" }}\naddress = 4\nstock = \"water\"\n\
             capabilities = {{ rate_ul_per_min = [0.01, 1500], volume_ul = [0.1, 10000] }}\n\
             envelope = {{ rate_ul_per_min = [1, 1000], volume_ul = [1, 5000] }}\n\
             [[instruments]]\nid = \"balance-2\"\nkind = \"balance\"\ndriver = \"mt_sics\"\n\
             transport = {{ type = \"simulated\" }}\ncapabilities = {{ mass_g = [-220, 220] }}\n\
             envelope = {{ mass_g = [0, 200] }}\n\
             [[instruments]]\nid = \"stirrer\"\nkind = \"defined\"\ndriver = \"definition\"\n\
             definition = \"instruments/ika-rct-digital.toml\"\ntransport = {{ type = \"simulated\" }}\n\
             envelope = {{ temperature_c = [15, 80], speed_rpm = [0, 1000] }}\n",
            labctl_protocols::lab::SIM_LAB_TOML
        );
        let lab = Lab::from_toml_str_in(&text, "test", &root).unwrap();
        let pumps = ["pump-red", "pump-yellow", "pump-blue", "pump-water"];
        let mut steps = vec![
            home(),
            act(
                "gantry",
                Action::MoveTo(MoveToParams {
                    position: "A1".into(),
                    feed_mm_per_min: None,
                }),
            ),
        ];
        // 100 uL at 1000 uL/min: 6 s each.
        steps.extend(pumps.iter().map(|p| dispense(p, "v1", 100.0, 1000.0)));
        steps.push(measure(
            "balance-2",
            Measurement::Weigh(labctl_protocols::WeighParams { stable: true }),
        ));
        let p = protocol(vec![vial("v1", "A1", 0.0)], steps);
        let report = dry_run(&p, &lab, 7);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(
            report.estimated_duration_s >= 4.0 * 6.0,
            "every pump's dispense takes its time: {report:?}"
        );
        assert!(
            !report.notes.iter().any(|n| n.contains("not modelled")),
            "{:?}",
            report.notes
        );
        let planned = planned_commands(&p, &lab, 7, 1000);
        for pump in pumps {
            assert_eq!(
                planned
                    .iter()
                    .filter(|(to, c)| to == pump && matches!(c, DeviceCommand::Dispense { .. }))
                    .count(),
                1,
                "{pump}: {planned:?}"
            );
        }
        assert!(planned.contains(&(
            "balance-2".to_owned(),
            DeviceCommand::Weigh { stable: true }
        )));
        // The first balance was not asked anything on the second's behalf.
        assert!(!planned.iter().any(|(to, _)| to == "balance"));

        // The defined stirrer: its definition's action, sent as the executor sends it.
        let stir = protocol(
            vec![],
            vec![Step::Action(ActionStep {
                id: None,
                instrument: "stirrer".into(),
                action: ActionCall::Defined(labctl_protocols::DefinedAction {
                    action: "set_temperature".into(),
                    params: [("temperature_c".to_owned(), 40.0)].into(),
                }),
                timeout_s: None,
                on_error: OnError::Fail,
            })],
        );
        let report = dry_run(&stir, &lab, 7);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(report.estimated_duration_s > 0.0, "{report:?}");
        assert_eq!(
            planned_commands(&stir, &lab, 7, 10),
            vec![(
                "stirrer".to_owned(),
                DeviceCommand::Defined {
                    action: "set_temperature".into(),
                    params: [("temperature_c".to_owned(), 40.0)].into(),
                }
            )]
        );
    }
}
