//! Instrument actions as methods of their device nodes (`Lab/Devices/{id}/MoveTo`, ...) and setpoints as
//! writable variables (`.../FunctionSet/temperature_c/TargetValue`), for technicians.
//!
//! Neither reaches an instrument directly: each call or write becomes a protocol of one step (two when the
//! gantry must first bring its head above the vessel), submitted with [`ControllerHandle::submit`] as the
//! session's user. So it passes the same validation, capabilities, safety envelope, dry run, approval
//! policy, instrument reservations and journal as a protocol from MQTT, the command port or
//! `SubmitProtocol`; a refused one sends nothing to the instrument.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use labctl_protocols::lab::{Instrument, Lab};
use labctl_protocols::registry::InstrumentModel;
use labctl_protocols::{FindingCode, InstrumentKind};
use opcua::types::{Argument, DataTypeId, LocalizedText, StatusCode, Variant};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::names::{self, DEVICES, target_value};
use labctl_core::api::{ControllerHandle, Principal, RunState, SubmitReply};
use labctl_core::instruments::DeviceCommand;
use labctl_core::journal::Record;

/// How long a device method or a setpoint write waits for its run to end before it answers with the
/// state the run is in (the run goes on; `Lab/Runs/{run_id}` follows it).
pub const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// The result name of a measurement method's step.
const RESULT: &str = "value";

/// One input argument of a device method: a String or a Double.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Text(&'static str, &'static str),
    Number(&'static str, &'static str),
}

/// The methods a device may have: one per action or measurement of the protocol language that its kind
/// accepts (`transfer` is not one: it moves a vessel the protocol must describe; use `SubmitProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMethod {
    Home,
    MoveTo,
    MoveXyz,
    Dispense,
    StopPump,
    Tare,
    Zero,
    Weigh,
    SetTemperature,
    HeaterOff,
    SetStirSpeed,
    StirOff,
    ReadTemperature,
    Spectrum,
    Absorbance,
}

impl DeviceMethod {
    pub const ALL: [DeviceMethod; 15] = [
        DeviceMethod::Home,
        DeviceMethod::MoveTo,
        DeviceMethod::MoveXyz,
        DeviceMethod::Dispense,
        DeviceMethod::StopPump,
        DeviceMethod::Tare,
        DeviceMethod::Zero,
        DeviceMethod::Weigh,
        DeviceMethod::SetTemperature,
        DeviceMethod::HeaterOff,
        DeviceMethod::SetStirSpeed,
        DeviceMethod::StirOff,
        DeviceMethod::ReadTemperature,
        DeviceMethod::Spectrum,
        DeviceMethod::Absorbance,
    ];

    /// The browse name of the method.
    pub fn name(self) -> &'static str {
        match self {
            DeviceMethod::Home => "Home",
            DeviceMethod::MoveTo => "MoveTo",
            DeviceMethod::MoveXyz => "MoveXyz",
            DeviceMethod::Dispense => "Dispense",
            DeviceMethod::StopPump => "StopPump",
            DeviceMethod::Tare => "Tare",
            DeviceMethod::Zero => "Zero",
            DeviceMethod::Weigh => "Weigh",
            DeviceMethod::SetTemperature => "SetTemperature",
            DeviceMethod::HeaterOff => "HeaterOff",
            DeviceMethod::SetStirSpeed => "SetStirSpeed",
            DeviceMethod::StirOff => "StirOff",
            DeviceMethod::ReadTemperature => "ReadTemperature",
            DeviceMethod::Spectrum => "Spectrum",
            DeviceMethod::Absorbance => "Absorbance",
        }
    }

    /// The protocol's action or measurement.
    pub fn step_name(self) -> &'static str {
        match self {
            DeviceMethod::Home => "home",
            DeviceMethod::MoveTo => "move_to",
            DeviceMethod::MoveXyz => "move_xyz",
            DeviceMethod::Dispense => "dispense",
            DeviceMethod::StopPump => "stop_pump",
            DeviceMethod::Tare => "tare",
            DeviceMethod::Zero => "zero",
            DeviceMethod::Weigh => "weigh",
            DeviceMethod::SetTemperature => "set_temperature",
            DeviceMethod::HeaterOff => "heater_off",
            DeviceMethod::SetStirSpeed => "set_stir_speed",
            DeviceMethod::StirOff => "stir_off",
            DeviceMethod::ReadTemperature => "read_temperature",
            DeviceMethod::Spectrum => "spectrum",
            DeviceMethod::Absorbance => "absorbance",
        }
    }

    pub fn is_measurement(self) -> bool {
        matches!(
            self,
            DeviceMethod::Weigh
                | DeviceMethod::ReadTemperature
                | DeviceMethod::Spectrum
                | DeviceMethod::Absorbance
        )
    }

    /// Whether a device of this model has the method: the model accepts the action or measurement.
    pub fn offered(self, model: &InstrumentModel) -> bool {
        model.offers(self.step_name())
    }

    /// The built-in methods of a device of this model (a defined instrument's actions are its
    /// definition's, see [`defined_method_at`]).
    pub fn of_model(model: &InstrumentModel) -> impl Iterator<Item = DeviceMethod> + '_ {
        DeviceMethod::ALL
            .into_iter()
            .filter(move |m| m.offered(model))
    }

    /// Whether the head must first be brought above a vessel at a deck position (the pumps dispense, and
    /// the spectrophotometer's dip probe measures, under the gantry head).
    fn at_position(self) -> bool {
        matches!(
            self,
            DeviceMethod::Dispense | DeviceMethod::Spectrum | DeviceMethod::Absorbance
        )
    }

    pub fn inputs(self) -> &'static [Input] {
        const POSITION: Input = Input::Text(
            "Position",
            "deck position of the vessel (A1, W1, H1, ...); the gantry head moves above it first",
        );
        match self {
            DeviceMethod::MoveTo => &[Input::Text(
                "Position",
                "deck position to move the head above (A1, W1, H1, ...)",
            )],
            DeviceMethod::MoveXyz => &[
                Input::Number("XMm", "x, mm"),
                Input::Number("YMm", "y, mm"),
                Input::Number("ZMm", "z, mm"),
            ],
            DeviceMethod::Dispense => &[
                POSITION,
                Input::Number("VolumeUl", "volume to dispense, µL"),
                Input::Number("RateUlPerMin", "rate, µL/min"),
                Input::Number(
                    "CapacityUl",
                    "capacity of the receiving vessel, µL (it is taken as empty: the overfill check)",
                ),
            ],
            DeviceMethod::SetTemperature => {
                &[Input::Number("TemperatureC", "temperature setpoint, °C")]
            }
            DeviceMethod::SetStirSpeed => &[Input::Number("SpeedRpm", "stirrer speed, r/min")],
            DeviceMethod::Spectrum => &[
                POSITION,
                Input::Number("StartNm", "first wavelength, nm"),
                Input::Number("StopNm", "last wavelength, nm"),
                Input::Number("StepNm", "step, nm"),
            ],
            DeviceMethod::Absorbance => {
                &[POSITION, Input::Number("WavelengthNm", "wavelength, nm")]
            }
            DeviceMethod::Home
            | DeviceMethod::StopPump
            | DeviceMethod::Tare
            | DeviceMethod::Zero
            | DeviceMethod::Weigh
            | DeviceMethod::HeaterOff
            | DeviceMethod::StirOff
            | DeviceMethod::ReadTemperature => &[],
        }
    }

    pub fn description(self) -> String {
        let what = if self.is_measurement() {
            "measurement"
        } else {
            "action"
        };
        format!(
            "The protocol {what} `{}` as a one-step run, through validation, the safety envelope and approval (technicians); waits up to {} s for the run to end",
            self.step_name(),
            DEVICE_WAIT.as_secs()
        )
    }

    pub fn input_arguments(self) -> Vec<Argument> {
        self.inputs()
            .iter()
            .map(|input| match *input {
                Input::Text(name, description) => argument(name, DataTypeId::String, description),
                Input::Number(name, description) => argument(name, DataTypeId::Double, description),
            })
            .collect()
    }

    pub fn output_arguments() -> Vec<Argument> {
        vec![
            argument("RunId", DataTypeId::String, "the one-step run's id"),
            argument(
                "State",
                DataTypeId::String,
                "the run's state when the method returns: completed, failed, ..., or awaiting_approval, queued, running when it has not ended yet",
            ),
            argument(
                "Result",
                DataTypeId::String,
                "a measurement's result, JSON (as in LastResult's value); empty for actions or when the run has not ended",
            ),
            argument(
                "Reason",
                DataTypeId::String,
                "why the run failed or was aborted, if it did",
            ),
        ]
    }
}

fn argument(name: &str, data_type: DataTypeId, description: &str) -> Argument {
    Argument {
        name: name.into(),
        data_type: data_type.into(),
        value_rank: -1,
        array_dimensions: None,
        description: LocalizedText::new("", description),
    }
}

/// The node id string of a device method.
pub fn method_path(instrument: &str, method: DeviceMethod) -> String {
    format!("{}/{}", names::device(instrument), method.name())
}

/// The device method at a node path, if it is one.
pub fn method_at<'a>(lab: &'a Lab, path: &str) -> Option<(&'a Instrument, DeviceMethod)> {
    let rest = path.strip_prefix(DEVICES)?.strip_prefix('/')?;
    let (id, name) = rest.rsplit_once('/')?;
    let instrument = lab.instrument(id)?;
    let method = DeviceMethod::of_model(instrument.model()).find(|m| m.name() == name)?;
    Some((instrument, method))
}

/// A defined instrument's action as an OPC UA method at `Lab/Devices/<id>/<action>` (the definition's
/// name): one Double input per parameter, in the definition's order.
pub fn defined_method_at<'a>(
    lab: &'a Lab,
    path: &str,
) -> Option<(
    &'a Instrument,
    &'a labctl_protocols::instrument_def::ActionSpec,
)> {
    let rest = path.strip_prefix(DEVICES)?.strip_prefix('/')?;
    let (id, name) = rest.rsplit_once('/')?;
    let instrument = lab.instrument(id)?;
    let action = instrument.defined()?.action(name)?;
    Some((instrument, action))
}

/// The input arguments of a defined action's method: each parameter with its unit and range.
pub fn defined_input_arguments(
    action: &labctl_protocols::instrument_def::ActionSpec,
) -> Vec<Argument> {
    action
        .params
        .iter()
        .map(|p| {
            argument(
                &p.name,
                DataTypeId::Double,
                &format!("{} in {}, {} to {}", p.name, p.unit, p.min, p.max),
            )
        })
        .collect()
}

/// The one-step protocol a defined action's method call runs, its arguments as the action's parameters.
pub fn defined_protocol(
    instrument: &Instrument,
    action: &labctl_protocols::instrument_def::ActionSpec,
    args: &[Variant],
    who: &Principal,
) -> Result<String, StatusCode> {
    let mut params = serde_json::Map::new();
    for (k, p) in action.params.iter().enumerate() {
        params.insert(p.name.clone(), json!(number(args, k)?));
    }
    let id = instrument.id.as_str();
    let protocol = json!({
        "version": 1,
        "metadata": {
            "name": format!("{} on {id} (OPC UA, {})", action.name, who.name),
            "proposal_id": proposal_id(&who.name),
            "planner": { "id": who.name, "model": "opcua-device-method" },
            "tags": ["opcua", "device-method"],
        },
        "labware": [],
        "steps": [{
            "type": "action", "id": action.name, "instrument": id, "action": action.name,
            "params": params,
        }],
    });
    Ok(protocol.to_string())
}

/// A settable quantity: writing its `TargetValue` runs the action that sets it (the third); the fourth
/// switches the function off.
const SETPOINTS: [(InstrumentKind, &str, DeviceMethod, DeviceMethod); 2] = [
    (
        InstrumentKind::Hotplate,
        "temperature_c",
        DeviceMethod::SetTemperature,
        DeviceMethod::HeaterOff,
    ),
    (
        InstrumentKind::Hotplate,
        "stir_speed_rpm",
        DeviceMethod::SetStirSpeed,
        DeviceMethod::StirOff,
    ),
];

/// The setpoint quantity a command sets and its new value (NaN when it switches the function off).
pub fn setpoint_of(command: &DeviceCommand) -> Option<(&'static str, f64)> {
    let (method, value) = match command {
        DeviceCommand::SetTemperature { temperature_c } => {
            (DeviceMethod::SetTemperature, *temperature_c)
        }
        DeviceCommand::SetStirSpeed { speed_rpm } => (DeviceMethod::SetStirSpeed, *speed_rpm),
        DeviceCommand::HeaterOff => (DeviceMethod::HeaterOff, f64::NAN),
        DeviceCommand::StirOff => (DeviceMethod::StirOff, f64::NAN),
        _ => return None,
    };
    SETPOINTS.iter().find_map(|(_, quantity, set, off)| {
        (*set == method || *off == method).then_some((*quantity, value))
    })
}

/// The setpoints of an instrument: the settable quantities its capabilities in the lab file give a range.
pub fn setpoints(instrument: &Instrument) -> Vec<(&'static str, DeviceMethod)> {
    SETPOINTS
        .iter()
        .filter(|(kind, quantity, ..)| {
            *kind == instrument.kind && instrument.capabilities.range(quantity).is_some()
        })
        .map(|(_, quantity, method, _)| (*quantity, *method))
        .collect()
}

/// The setpoint at a node path, if it is one.
pub fn setpoint_at<'a>(lab: &'a Lab, path: &str) -> Option<(&'a Instrument, DeviceMethod)> {
    lab.instruments.iter().find_map(|instrument| {
        setpoints(instrument)
            .into_iter()
            .find(|(quantity, _)| target_value(&instrument.id, quantity) == path)
            .map(|(_, method)| (instrument, method))
    })
}

pub(crate) fn number(args: &[Variant], index: usize) -> Result<f64, StatusCode> {
    match args.get(index) {
        Some(Variant::Double(v)) => Ok(*v),
        Some(Variant::Float(v)) => Ok(f64::from(*v)),
        Some(Variant::Int16(v)) => Ok(f64::from(*v)),
        Some(Variant::Int32(v)) => Ok(f64::from(*v)),
        Some(Variant::Int64(v)) => Ok(*v as f64),
        Some(Variant::UInt16(v)) => Ok(f64::from(*v)),
        Some(Variant::UInt32(v)) => Ok(f64::from(*v)),
        Some(Variant::UInt64(v)) => Ok(*v as f64),
        Some(Variant::Empty) => Err(StatusCode::BadInvalidArgument),
        Some(_) => Err(StatusCode::BadTypeMismatch),
        None => Err(StatusCode::BadArgumentsMissing),
    }
}

fn text(args: &[Variant], index: usize) -> Result<String, StatusCode> {
    match args.get(index) {
        Some(Variant::String(s)) => s.value().clone().ok_or(StatusCode::BadInvalidArgument),
        Some(Variant::Empty) => Err(StatusCode::BadInvalidArgument),
        Some(_) => Err(StatusCode::BadTypeMismatch),
        None => Err(StatusCode::BadArgumentsMissing),
    }
}

/// A fresh proposal id for a device command of `user`.
fn proposal_id(user: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let user: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!(
        "opcua-{user}-{}-{}",
        labctl_core::journal::now_ms(),
        NEXT.fetch_add(1, Ordering::Relaxed) + 1
    )
}

/// The protocol a device method call stands for (JSON text).
pub fn protocol(
    lab: &Lab,
    instrument: &Instrument,
    method: DeviceMethod,
    args: &[Variant],
    who: &Principal,
) -> Result<String, StatusCode> {
    let id = instrument.id.as_str();
    let params = match method {
        DeviceMethod::MoveTo => json!({ "position": text(args, 0)? }),
        DeviceMethod::MoveXyz => json!({
            "x_mm": number(args, 0)?, "y_mm": number(args, 1)?, "z_mm": number(args, 2)?,
        }),
        DeviceMethod::Dispense => json!({
            "vessel": "vessel", "volume_ul": number(args, 1)?, "rate_ul_per_min": number(args, 2)?,
        }),
        DeviceMethod::SetTemperature => json!({ "temperature_c": number(args, 0)? }),
        DeviceMethod::SetStirSpeed => json!({ "speed_rpm": number(args, 0)? }),
        DeviceMethod::Spectrum => json!({
            "start_nm": number(args, 1)?, "stop_nm": number(args, 2)?, "step_nm": number(args, 3)?,
        }),
        DeviceMethod::Absorbance => json!({ "wavelength_nm": number(args, 1)? }),
        _ => json!({}),
    };
    let mut step = json!({
        "type": if method.is_measurement() { "measure" } else { "action" },
        "id": method.step_name(),
        "instrument": id,
        "action": method.step_name(),
        "params": params,
    });
    if method.is_measurement() {
        step["result"] = RESULT.into();
    }
    let mut steps = Vec::new();
    let mut labware = Vec::new();
    if method.at_position() {
        let position = text(args, 0)?;
        // A dispense fills a vessel of the given capacity; a measurement only needs one to be there.
        let capacity = if method == DeviceMethod::Dispense {
            number(args, 3)?
        } else {
            1000.0
        };
        labware.push(json!({
            "id": "vessel", "kind": "vial", "location": position, "capacity_ul": capacity,
            "initial_volume_ul": 0.0,
        }));
        if let Some(gantry) = lab
            .instruments
            .iter()
            .find(|i| i.kind == InstrumentKind::Gantry)
        {
            steps.push(json!({
                "type": "action", "id": "move_to", "instrument": gantry.id, "action": "move_to",
                "params": { "position": position },
            }));
        }
    }
    steps.push(step);
    let protocol = json!({
        "version": 1,
        "metadata": {
            "name": format!("{} on {id} (OPC UA, {})", method.name(), who.name),
            "proposal_id": proposal_id(&who.name),
            "planner": { "id": who.name, "model": "opcua-device-method" },
            "tags": ["opcua", "device-method"],
        },
        "labware": labware,
        "steps": steps,
    });
    Ok(protocol.to_string())
}

/// A device command's run as it stood when the call returned.
#[derive(Debug, Clone)]
pub struct Done {
    pub run_id: String,
    pub state: RunState,
    pub result: Option<Value>,
    pub reason: Option<String>,
}

impl Done {
    pub fn outputs(&self) -> Vec<Variant> {
        vec![
            Variant::from(self.run_id.as_str()),
            Variant::from(self.state.as_str()),
            Variant::from(
                self.result
                    .as_ref()
                    .map(Value::to_string)
                    .unwrap_or_default(),
            ),
            Variant::from(self.reason.clone().unwrap_or_default()),
        ]
    }

    /// A setpoint write's status: done, still to be done (awaiting approval, queued behind another run),
    /// or not done.
    pub fn write_status(&self) -> StatusCode {
        match self.state {
            RunState::Completed => StatusCode::Good,
            RunState::AwaitingApproval
            | RunState::Queued
            | RunState::Running
            | RunState::Paused => StatusCode::GoodCompletesAsynchronously,
            RunState::Failed => StatusCode::BadDeviceFailure,
            RunState::Aborted | RunState::Interrupted | RunState::Rejected => {
                StatusCode::BadInvalidState
            }
        }
    }
}

/// The status of a refused submission: outside the envelope or the capabilities `BadOutOfRange`, any
/// other finding `BadInvalidArgument`, a latched emergency stop `BadInvalidState`.
pub fn refusal_status(reply: &SubmitReply) -> StatusCode {
    if reply.findings.iter().any(|f| {
        matches!(
            f.code,
            FindingCode::OutsideEnvelope | FindingCode::OutOfRange
        )
    }) {
        StatusCode::BadOutOfRange
    } else if !reply.findings.is_empty() {
        StatusCode::BadInvalidArgument
    } else {
        match &reply.error {
            Some(e) => super::methods::status_of(e),
            None => StatusCode::BadInvalidState,
        }
    }
}

/// Submits the protocol as `who` (a technician) and waits up to [`DEVICE_WAIT`] for the run to end,
/// unless it waits for approval. A refused protocol is a Bad status; nothing was sent to an instrument.
pub async fn run(
    api: &ControllerHandle,
    who: Principal,
    what: &str,
    protocol: String,
) -> Result<Done, StatusCode> {
    if !labctl_core::policy::allows(who.role, labctl_core::policy::Permission::CommandInstrument) {
        tracing::info!(user = %who.name, what, "opcua: device command refused: technicians only");
        return Err(StatusCode::BadUserAccessDenied);
    }
    // Subscribe before submitting, so no record of the run is missed.
    let mut records = api.events();
    let user = who.name.clone();
    let reply = api.submit(protocol.into_bytes(), who).await;
    if !reply.accepted {
        let status = refusal_status(&reply);
        tracing::info!(
            %user, what, %status,
            reply = %serde_json::to_string(&reply).unwrap_or_default(),
            "opcua: device command refused"
        );
        return Err(status);
    }
    let mut done = Done {
        run_id: reply.run_id.clone().unwrap_or_default(),
        state: reply.state.unwrap_or(RunState::Queued),
        result: None,
        reason: None,
    };
    tracing::info!(%user, what, run = %done.run_id, state = %done.state, "opcua: device command submitted");
    if done.state == RunState::AwaitingApproval || done.state.is_terminal() {
        return Ok(done);
    }
    let deadline = tokio::time::Instant::now() + DEVICE_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, records.recv()).await {
            Err(_) | Ok(Err(RecvError::Closed)) => break,
            Ok(Ok(record)) => match &*record {
                Record::RunState {
                    run_id,
                    state,
                    reason,
                    ..
                } if *run_id == done.run_id => {
                    done.state = *state;
                    done.reason = reason.clone();
                    if state.is_terminal() {
                        break;
                    }
                }
                Record::Result { run_id, value, .. } if *run_id == done.run_id => {
                    done.result = Some(value.clone());
                }
                _ => {}
            },
            Ok(Err(RecvError::Lagged(_))) => {
                if let Some(info) = api.run(&done.run_id).await {
                    done.state = info.state;
                    done.reason = info.reason;
                    if info.state.is_terminal() {
                        break;
                    }
                }
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{is_device_method, is_setpoint};
    use labctl_core::api::{ApiError, Face};

    #[test]
    fn a_refused_device_command_s_status_comes_from_the_refusal_s_kind() {
        for (error, status) in [
            (ApiError::Unavailable, StatusCode::BadServerHalted),
            (ApiError::EStopLatched, StatusCode::BadInvalidState),
            (
                ApiError::OverQuota("3 queued".into()),
                StatusCode::BadTooManyOperations,
            ),
            (
                ApiError::Forbidden("observer".into()),
                StatusCode::BadUserAccessDenied,
            ),
            (
                ApiError::Journal("disk full".into()),
                StatusCode::BadResourceUnavailable,
            ),
        ] {
            let reply = SubmitReply::refused(None, error.clone());
            assert_eq!(refusal_status(&reply), status, "{error:?}");
        }
    }

    #[test]
    fn devices_have_the_methods_of_their_kind_and_the_hotplate_its_two_setpoints() {
        let lab = Lab::sim();
        let names = |id: &str| {
            DeviceMethod::of_model(lab.instrument(id).unwrap().model())
                .map(DeviceMethod::name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("gantry"), ["Home", "MoveTo", "MoveXyz"]);
        assert_eq!(names("pump-red"), ["Dispense", "StopPump"]);
        assert_eq!(names("balance"), ["Tare", "Zero", "Weigh"]);
        assert_eq!(
            names("hotplate"),
            [
                "SetTemperature",
                "HeaterOff",
                "SetStirSpeed",
                "StirOff",
                "ReadTemperature"
            ]
        );
        assert_eq!(names("spectro"), ["Spectrum", "Absorbance"]);
        let hotplate = lab.instrument("hotplate").unwrap();
        assert_eq!(
            setpoints(hotplate),
            [
                ("temperature_c", DeviceMethod::SetTemperature),
                ("stir_speed_rpm", DeviceMethod::SetStirSpeed)
            ]
        );
        assert!(setpoints(lab.instrument("balance").unwrap()).is_empty());
        let path = target_value("hotplate", "temperature_c");
        assert_eq!(
            setpoint_at(&lab, &path).map(|(i, m)| (i.id.as_str(), m)),
            Some(("hotplate", DeviceMethod::SetTemperature))
        );
        assert_eq!(
            method_at(&lab, "Lab/Devices/pump-red/Dispense").map(|(i, m)| (i.id.as_str(), m)),
            Some(("pump-red", DeviceMethod::Dispense))
        );
        assert!(method_at(&lab, "Lab/Devices/pump-red/Home").is_none());
        assert!(method_at(&lab, "Lab/SubmitProtocol").is_none());
        assert!(is_setpoint(&path));
        assert!(!is_setpoint(&super::names::sensor_value(
            "hotplate",
            "temperature_c"
        )));
        assert!(is_device_method("Lab/Devices/gantry/MoveTo"));
        assert!(!is_device_method("Lab/SubmitProtocol"));
    }

    #[test]
    fn a_dispense_is_a_move_above_the_vessel_then_the_dispense_and_validates() {
        let lab = Lab::sim();
        let who = Principal::new(
            "alice",
            labctl_protocols::lab::Role::Technician,
            Face::Opcua,
        );
        let pump = lab.instrument("pump-red").unwrap();
        let args = [
            Variant::from("A1"),
            Variant::from(300.0),
            Variant::from(600.0),
            Variant::from(2000.0),
        ];
        let text = protocol(&lab, pump, DeviceMethod::Dispense, &args, &who).unwrap();
        let report = labctl_protocols::validate_bytes(text.as_bytes(), &lab);
        assert!(report.findings.is_empty(), "{text}: {:?}", report.findings);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["steps"][0]["action"], "move_to");
        assert_eq!(v["steps"][1]["action"], "dispense");
        // Outside the envelope (5000 uL at most): refused by the validator, as from any interface.
        let args = [
            Variant::from("A1"),
            Variant::from(6000.0),
            Variant::from(600.0),
            Variant::from(20000.0),
        ];
        let text = protocol(&lab, pump, DeviceMethod::Dispense, &args, &who).unwrap();
        let report = labctl_protocols::validate_bytes(text.as_bytes(), &lab);
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.code == FindingCode::OutsideEnvelope),
            "{:?}",
            report.findings
        );
        // Arguments of the wrong kind are the caller's error.
        assert_eq!(
            protocol(
                &lab,
                pump,
                DeviceMethod::Dispense,
                &[
                    Variant::from(1.0),
                    Variant::from(1.0),
                    Variant::from(1.0),
                    Variant::from(1.0)
                ],
                &who
            ),
            Err(StatusCode::BadTypeMismatch)
        );
        let spectro = lab.instrument("spectro").unwrap();
        let text = protocol(
            &lab,
            spectro,
            DeviceMethod::Absorbance,
            &[Variant::from("B2"), Variant::from(520.0)],
            &who,
        )
        .unwrap();
        let report = labctl_protocols::validate_bytes(text.as_bytes(), &lab);
        assert!(report.findings.is_empty(), "{text}: {:?}", report.findings);
    }
}
