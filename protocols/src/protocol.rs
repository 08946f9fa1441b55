//! The lab protocol language: what a planner proposes and the lab executes.
//!
//! Plain data only: every field is a value with its unit in its name (`volume_ul`, `temperature_c`), there
//! are no expressions and nothing that could run code. The JSON Schema is generated from these types
//! (see [`crate::schema`]), so the schema a planner reads and the parser that judges it cannot drift apart.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The protocol language version this build understands.
pub const PROTOCOL_VERSION: u32 = 1;

/// A complete experiment proposed by a planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// Protocol language version; must be 1.
    pub version: u32,
    pub metadata: Metadata,
    /// Vessels the protocol uses, where they stand and how much they hold.
    #[serde(default)]
    pub labware: Vec<Labware>,
    /// Steps, executed in order.
    pub steps: Vec<Step>,
}

/// Who proposed what, and why. The proposal id is the planner's idempotency and correlation key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Human-readable name of the experiment.
    pub name: String,
    /// What the experiment is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
    /// The hypothesis under test, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypothesis: Option<String>,
    /// Planner-chosen unique id; submitting the same id twice yields the same run.
    pub proposal_id: String,
    pub planner: Planner,
    /// Free-form labels for searching runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Ask the lab to hold the run safely when the planner's connection is lost.
    #[serde(default, skip_serializing_if = "is_false")]
    pub supervised: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The planner that proposed the protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Planner {
    /// Planner identity (matches its MQTT user where the lab enforces roles).
    pub id: String,
    /// Model name, e.g. the optimiser or language model used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Model version, for provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

/// A vessel used by the protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Labware {
    /// Name steps use to refer to this vessel.
    pub id: String,
    pub kind: LabwareKind,
    /// Deck position where the vessel stands at the start, e.g. `A1`.
    pub location: String,
    /// Nominal capacity in microlitres.
    pub capacity_ul: f64,
    /// Liquid already in the vessel at the start, in microlitres.
    #[serde(default)]
    pub initial_volume_ul: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LabwareKind {
    Vial,
    Tube,
    Beaker,
}

/// What to do when a step fails or times out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop the run as failed; instruments go to their safe state.
    #[default]
    Fail,
    /// Hold the run for a technician to resume or abort.
    Pause,
    /// Record the failure and continue with the next step.
    Skip,
}

/// One step of a protocol, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Step {
    Action(ActionStep),
    Measure(MeasureStep),
    Wait(WaitStep),
    WaitUntil(WaitUntilStep),
    Parallel(ParallelStep),
    Repeat(RepeatStep),
}

/// Which of a step list's instruments [`collect_instruments`] gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstrumentUse {
    /// Those an action or a measurement commands.
    Commanded,
    /// Those, and those a `wait_until` watches.
    CommandedOrWatched,
}

/// Every instrument `steps` use in the way `which` says, into `out` (nested blocks included).
pub fn collect_instruments(
    steps: &[Step],
    which: InstrumentUse,
    out: &mut std::collections::BTreeSet<String>,
) {
    for step in steps {
        match step {
            Step::Action(a) => {
                out.insert(a.instrument.clone());
            }
            Step::Measure(m) => {
                out.insert(m.instrument.clone());
            }
            Step::WaitUntil(w) if which == InstrumentUse::CommandedOrWatched => {
                out.insert(w.condition.instrument.clone());
            }
            Step::Parallel(p) => p
                .branches
                .iter()
                .for_each(|b| collect_instruments(b, which, out)),
            Step::Repeat(r) => collect_instruments(&r.steps, which, out),
            Step::WaitUntil(_) | Step::Wait(_) => {}
        }
    }
}

/// Tell an instrument to do something.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ActionStep {
    /// Optional step name, unique within the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Instrument id from the lab's capabilities.
    pub instrument: String,
    #[serde(flatten)]
    pub action: ActionCall,
    /// Seconds before the step counts as failed; the lab's default for the action when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub on_error: OnError,
}

/// Take a measurement and keep it as a named result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MeasureStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub instrument: String,
    #[serde(flatten)]
    pub measurement: Measurement,
    /// Name of the result this step produces, unique within the protocol (a `repeat` numbers its copies).
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub on_error: OnError,
}

/// Wait for a fixed time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub duration_s: f64,
    #[serde(default)]
    pub on_error: OnError,
}

/// Wait until a live instrument reading meets a condition, or fail after `timeout_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitUntilStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub condition: Condition,
    /// Required: a condition that never comes true must not hold the lab forever.
    pub timeout_s: f64,
    #[serde(default)]
    pub on_error: OnError,
}

/// Run branches at the same time; the step ends when every branch has ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParallelStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Each branch is a sequence of steps; no instrument may appear in two branches.
    pub branches: Vec<Vec<Step>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub on_error: OnError,
}

/// Run the same steps `count` times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepeatStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub count: u32,
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub on_error: OnError,
}

/// A comparison of a live reading with a value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub instrument: String,
    /// A quantity the instrument reports, e.g. `temperature_c`.
    pub quantity: String,
    pub op: Comparison,
    /// In the quantity's unit.
    pub value: f64,
    /// Required with `within`: the allowed distance from `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// The condition must hold this long before the step ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    Gt,
    Ge,
    Lt,
    Le,
    Within,
}

impl Comparison {
    /// Whether `reading` satisfies the comparison; `within` needs a tolerance.
    pub fn holds(self, reading: f64, value: f64, tolerance: Option<f64>) -> bool {
        match self {
            Comparison::Gt => reading > value,
            Comparison::Ge => reading >= value,
            Comparison::Lt => reading < value,
            Comparison::Le => reading <= value,
            Comparison::Within => (reading - value).abs() <= tolerance.unwrap_or(0.0),
        }
    }
}

/// An action step's action: one of the built-in roles' actions, or one that an instrument definition
/// declares (any other name, with numeric parameters). The validator checks either against the instrument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ActionCall {
    Builtin(Action),
    Defined(DefinedAction),
}

/// An action declared by an instrument definition, e.g. `{"action": "set_flow", "params": {"flow_ml_per_min": 2}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DefinedAction {
    /// The action's name in the instrument's definition.
    pub action: String,
    /// Its parameters, numbers in the unit their names carry.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, f64>,
}

impl ActionCall {
    /// The action's name as written in a protocol.
    pub fn name(&self) -> &str {
        match self {
            ActionCall::Builtin(a) => a.name(),
            ActionCall::Defined(d) => &d.action,
        }
    }

    /// The built-in action, if it is one.
    pub fn builtin(&self) -> Option<&Action> {
        match self {
            ActionCall::Builtin(a) => Some(a),
            ActionCall::Defined(_) => None,
        }
    }

    /// Its parameters as numbers by name, as a defined instrument takes them (a built-in action's name can
    /// also be a definition's: `set_temperature`). `Err` names a parameter that is not a number.
    pub fn numeric_params(&self) -> Result<std::collections::BTreeMap<String, f64>, String> {
        match self {
            ActionCall::Defined(d) => Ok(d.params.clone()),
            ActionCall::Builtin(a) => {
                let value = serde_json::to_value(a).map_err(|e| e.to_string())?;
                let mut out = std::collections::BTreeMap::new();
                if let Some(params) = value.get("params").and_then(|p| p.as_object()) {
                    for (name, v) in params {
                        let n = v.as_f64().ok_or_else(|| {
                            format!("{name}: a defined instrument's parameters are numbers")
                        })?;
                        out.insert(name.clone(), n);
                    }
                }
                Ok(out)
            }
        }
    }
}

impl From<Action> for ActionCall {
    fn from(a: Action) -> Self {
        ActionCall::Builtin(a)
    }
}

/// Instrument actions, tagged by `action` with their parameters in `params`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", content = "params", rename_all = "snake_case")]
pub enum Action {
    /// Gantry: run the homing cycle.
    Home {},
    /// Gantry: move the head above a named deck position.
    MoveTo(MoveToParams),
    /// Gantry: move the head to machine coordinates.
    MoveXyz(MoveXyzParams),
    /// Gantry: carry a vessel with the head's gripper to another deck position.
    Transfer(TransferParams),
    /// Syringe pump: dispense stock into a vessel.
    Dispense(DispenseParams),
    /// Syringe pump: stop pumping.
    StopPump {},
    /// Balance: tare with what is on the pan.
    Tare {},
    /// Balance: zero the empty pan.
    Zero {},
    /// Hotplate: set the temperature setpoint and switch heating on.
    SetTemperature(SetTemperatureParams),
    /// Hotplate: switch heating off.
    HeaterOff {},
    /// Hotplate: set the stirrer speed and start stirring.
    SetStirSpeed(SetStirSpeedParams),
    /// Hotplate: stop stirring.
    StirOff {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveToParams {
    /// Deck position, e.g. `A1`, `W1`, `H1`.
    pub position: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed_mm_per_min: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveXyzParams {
    pub x_mm: f64,
    pub y_mm: f64,
    pub z_mm: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed_mm_per_min: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferParams {
    /// Labware id of the vessel to carry.
    pub vessel: String,
    /// Deck position to put it down at.
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DispenseParams {
    /// Labware id of the receiving vessel.
    pub vessel: String,
    pub volume_ul: f64,
    pub rate_ul_per_min: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTemperatureParams {
    pub temperature_c: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStirSpeedParams {
    pub speed_rpm: f64,
}

/// Measurements, tagged by `action` with their parameters in `params`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", content = "params", rename_all = "snake_case")]
pub enum Measurement {
    /// Balance: the mass on the pan, in grams.
    Weigh(WeighParams),
    /// Spectrophotometer: an absorbance spectrum of the vessel under the probe.
    Spectrum(SpectrumParams),
    /// Spectrophotometer: absorbance at one wavelength.
    Absorbance(AbsorbanceParams),
    /// Hotplate: the current temperature of the vessel on the plate.
    ReadTemperature {},
    /// A defined instrument: the current value of one of its readings.
    Read(ReadParams),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// The reading's name in the instrument's definition (`temperature_c`).
    pub quantity: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeighParams {
    /// Wait for a stable reading (true) or take the immediate one.
    #[serde(default = "default_true")]
    pub stable: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpectrumParams {
    pub start_nm: f64,
    pub stop_nm: f64,
    pub step_nm: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AbsorbanceParams {
    pub wavelength_nm: f64,
}

impl Action {
    /// The action's name as written in a protocol.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Home {} => "home",
            Action::MoveTo(_) => "move_to",
            Action::MoveXyz(_) => "move_xyz",
            Action::Transfer(_) => "transfer",
            Action::Dispense(_) => "dispense",
            Action::StopPump {} => "stop_pump",
            Action::Tare {} => "tare",
            Action::Zero {} => "zero",
            Action::SetTemperature(_) => "set_temperature",
            Action::HeaterOff {} => "heater_off",
            Action::SetStirSpeed(_) => "set_stir_speed",
            Action::StirOff {} => "stir_off",
        }
    }
}

impl Measurement {
    /// The measurement's name as written in a protocol.
    pub fn name(&self) -> &'static str {
        match self {
            Measurement::Weigh(_) => "weigh",
            Measurement::Spectrum(_) => "spectrum",
            Measurement::Absorbance(_) => "absorbance",
            Measurement::ReadTemperature {} => "read_temperature",
            Measurement::Read(_) => "read",
        }
    }
}

impl Step {
    /// The step's optional id.
    pub fn id(&self) -> Option<&str> {
        match self {
            Step::Action(s) => s.id.as_deref(),
            Step::Measure(s) => s.id.as_deref(),
            Step::Wait(s) => s.id.as_deref(),
            Step::WaitUntil(s) => s.id.as_deref(),
            Step::Parallel(s) => s.id.as_deref(),
            Step::Repeat(s) => s.id.as_deref(),
        }
    }

    /// The step's on-error policy.
    pub fn on_error(&self) -> OnError {
        match self {
            Step::Action(s) => s.on_error,
            Step::Measure(s) => s.on_error,
            Step::Wait(s) => s.on_error,
            Step::WaitUntil(s) => s.on_error,
            Step::Parallel(s) => s.on_error,
            Step::Repeat(s) => s.on_error,
        }
    }

    /// The step's explicit timeout, if it has one.
    pub fn timeout_s(&self) -> Option<f64> {
        match self {
            Step::Action(s) => s.timeout_s,
            Step::Measure(s) => s.timeout_s,
            Step::Wait(_) => None,
            Step::WaitUntil(s) => Some(s.timeout_s),
            Step::Parallel(s) => s.timeout_s,
            Step::Repeat(s) => s.timeout_s,
        }
    }

    /// The timeout the executor (and the dry run) give the step: its own, or else a default, since nothing
    /// may hold the lab forever. A dispense gets twice its pumping time plus 60 s; a temperature setpoint
    /// its longest ramp (from the envelope's minimum, at the envelope's `ramp_c_per_min`) plus 120 s.
    pub fn timeout_or_default_s(&self, lab: &crate::Lab) -> Option<f64> {
        if let Some(t) = self.timeout_s() {
            return Some(t);
        }
        match self {
            Step::Action(a) => Some(
                match lab.instrument(&a.instrument).and_then(|i| i.defined()) {
                    Some(def) => def
                        .action(a.action.name())
                        .map_or(120.0, |spec| spec.completion.longest_s() + 60.0),
                    None => match a.action.builtin() {
                        Some(Action::Dispense(d)) if d.rate_ul_per_min > 0.0 => {
                            d.volume_ul / d.rate_ul_per_min * 60.0 * 2.0 + 60.0
                        }
                        Some(Action::SetTemperature(t)) => {
                            let envelope = lab.instrument(&a.instrument).map(|i| &i.envelope);
                            let ramp_s = envelope
                                .and_then(|e| Some((e.temperature_c?.min, e.ramp_c_per_min?)))
                                .map(|(from, rate)| {
                                    crate::lab::ramp_setpoints(from, t.temperature_c, rate)
                                        .iter()
                                        .map(|(wait, _)| wait)
                                        .sum::<f64>()
                                })
                                .unwrap_or(0.0);
                            ramp_s + 120.0
                        }
                        Some(Action::Home {} | Action::Transfer(_)) => 300.0,
                        _ => 120.0,
                    },
                },
            ),
            Step::Measure(_) => Some(120.0),
            Step::Wait(_) | Step::WaitUntil(_) | Step::Parallel(_) | Step::Repeat(_) => None,
        }
    }

    /// The `type` tag as written in a protocol.
    pub fn type_name(&self) -> &'static str {
        match self {
            Step::Action(_) => "action",
            Step::Measure(_) => "measure",
            Step::Wait(_) => "wait",
            Step::WaitUntil(_) => "wait_until",
            Step::Parallel(_) => "parallel",
            Step::Repeat(_) => "repeat",
        }
    }
}
