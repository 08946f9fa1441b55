//! Keeps the address space true: instrument identities, states and readings from the world model's
//! snapshots, runs from the journal's committed records. Only values that changed are written, so a
//! subscription sees one notification per change; writes go to memory and never wait on an instrument.

use std::collections::HashMap;
use std::sync::Arc;

use opcua::server::SubscriptionCache;
use opcua::types::{DataValue, DateTime, NodeId, StatusCode, Variant};
use tokio::sync::broadcast::error::RecvError;

use super::address_space as space;
use super::address_space::Names;
use super::devices;
use super::names;
use super::node_manager::LabNodeManager;
use labctl_core::api::{ControllerHandle, RunInfo};
use labctl_core::contract::EventDetail;
use labctl_core::instruments::{Connection, InstrumentView};
use labctl_core::instruments::{DeviceCommand, DeviceState};
use labctl_core::journal::Record;
use labctl_core::world::LabSnapshot;

pub struct Updater {
    manager: Arc<LabNodeManager>,
    subscriptions: Arc<SubscriptionCache>,
    names: Names,
    /// What each dynamic variable was last set to (with its status), so unchanged values are not rewritten.
    written: HashMap<NodeId, (Variant, StatusCode)>,
    /// Results seen per run, for `ResultCount`.
    results: HashMap<String, u64>,
    /// Setpoint commands sent and not yet confirmed, by run and step: (`TargetValue` path, new value).
    pending_setpoints: HashMap<(Option<String>, Option<String>), (String, f64)>,
}

/// The setpoint a command sets: the `TargetValue` node path and its new value (NaN when the command
/// switches the function off: no setpoint, as before the first one).
pub fn setpoint_of_command(instrument: &str, command: &DeviceCommand) -> Option<(String, f64)> {
    let (quantity, value) = devices::setpoint_of(command)?;
    Some((names::target_value(instrument, quantity), value))
}

fn connection_text(c: &Connection) -> String {
    match c {
        Connection::Connecting => "connecting".into(),
        Connection::Online => "online".into(),
        Connection::Lost(why) => format!("lost: {why}"),
    }
}

fn device_state_text(s: Option<&DeviceState>) -> String {
    match s {
        None => "unknown".into(),
        Some(DeviceState::Idle) => "idle".into(),
        Some(DeviceState::Busy) => "busy".into(),
        Some(DeviceState::Alarm(why)) => format!("alarm: {why}"),
        Some(DeviceState::Locked(why)) => format!("locked: {why}"),
    }
}

/// The values of one instrument's variables. Readings of an instrument that is not online keep their last
/// value but say it is no longer live (`UncertainLastUsableValue`).
pub fn instrument_values(view: &InstrumentView) -> Vec<(String, Variant, StatusCode)> {
    let id = view.id.as_str();
    let mut out = vec![
        (
            names::device_variable(id, "ConnectionState"),
            Variant::from(connection_text(&view.connection)),
            StatusCode::Good,
        ),
        (
            names::device_variable(id, "DeviceState"),
            Variant::from(device_state_text(view.state.as_ref())),
            StatusCode::Good,
        ),
    ];
    if let Some(identity) = &view.identity {
        for (property, value) in [
            ("Manufacturer", &identity.manufacturer),
            ("Model", &identity.model),
            ("SerialNumber", &identity.serial),
            ("SoftwareRevision", &identity.firmware),
        ] {
            out.push((
                names::identification(id, property),
                Variant::from(value.as_str()),
                StatusCode::Good,
            ));
        }
    }
    let live = if view.connection == Connection::Online {
        StatusCode::Good
    } else {
        StatusCode::UncertainLastUsableValue
    };
    for (quantity, value) in &view.values {
        out.push((
            names::sensor_value(id, quantity),
            Variant::from(*value),
            live,
        ));
    }
    out
}

impl Updater {
    pub fn new(
        manager: Arc<LabNodeManager>,
        subscriptions: Arc<SubscriptionCache>,
        names: Names,
    ) -> Updater {
        Updater {
            manager,
            subscriptions,
            names,
            written: HashMap::new(),
            results: HashMap::new(),
            pending_setpoints: HashMap::new(),
        }
    }

    /// Writes the values that changed; values of nodes that do not exist (a reading the lab file did not
    /// declare) are skipped, since one unknown node would fail the whole batch.
    fn write(&mut self, values: Vec<(String, Variant, StatusCode)>) {
        let now = DateTime::now();
        let mut changed: Vec<(NodeId, DataValue)> = Vec::new();
        {
            let space = self.manager.address_space().read();
            for (path, value, status) in values {
                let id = self.names.id(&path);
                if self
                    .written
                    .get(&id)
                    .is_some_and(|(v, s)| *v == value && *s == status)
                    || !space.node_exists(&id)
                {
                    continue;
                }
                self.written.insert(id.clone(), (value.clone(), status));
                changed.push((
                    id,
                    DataValue {
                        value: Some(value),
                        status: Some(status),
                        source_timestamp: Some(now),
                        server_timestamp: Some(now),
                        ..Default::default()
                    },
                ));
            }
        }
        if changed.is_empty() {
            return;
        }
        if let Err(e) = self.manager.set_values(
            &self.subscriptions,
            changed.iter().map(|(id, dv)| (id, None, dv.clone())),
        ) {
            tracing::warn!(status = %e, "opcua: could not update the address space");
        }
    }

    pub fn apply_snapshot(&mut self, snapshot: &LabSnapshot) {
        let mut values = vec![(
            names::ESTOP_LATCHED.to_owned(),
            Variant::from(snapshot.estop_latched),
            StatusCode::Good,
        )];
        for view in &snapshot.instruments {
            values.extend(instrument_values(view));
        }
        // The current step moves with the tick; states come from the journal (a stale snapshot must never
        // take a finished run back to `running`).
        for run in &snapshot.runs {
            values.push((
                names::run_variable(&run.run_id, "CurrentStep"),
                Variant::from(run.current_step.clone().unwrap_or_default()),
                StatusCode::Good,
            ));
        }
        self.write(values);
    }

    /// Adds the run's node unless it is there (see [`super::runs`]).
    fn ensure_run(&mut self, run: &RunInfo) {
        let (added, removed) = {
            let mut space = self.manager.address_space().write();
            let mut runs = self.manager.inner().runs().lock();
            runs.ensure(&mut space, self.names, run)
        };
        if added {
            tracing::debug!(run = %run.run_id, "opcua: run added");
        }
        self.forget(&removed);
    }

    /// The run has reached a final state: the oldest finished runs beyond the limit lose their nodes.
    fn finished(&mut self, run_id: &str) {
        let removed = {
            let mut space = self.manager.address_space().write();
            let mut runs = self.manager.inner().runs().lock();
            runs.finished_now(&mut space, self.names, run_id)
        };
        self.forget(&removed);
    }

    fn forget(&mut self, removed: &[String]) {
        for run_id in removed {
            tracing::debug!(run = %run_id, "opcua: finished run removed from Lab/Runs");
            self.results.remove(run_id);
            for (name, _) in space::RUN_VARIABLES {
                self.written
                    .remove(&self.names.id(&names::run_variable(run_id, name)));
            }
        }
    }

    /// Every run the controller knows, with all its variables (at start, and after missing records).
    pub fn apply_runs(&mut self, runs: &[RunInfo]) {
        for run in runs {
            self.ensure_run(run);
            self.results.insert(run.run_id.clone(), run.results);
            let values = space::run_values(run)
                .into_iter()
                .map(|(name, value)| {
                    (
                        names::run_variable(&run.run_id, name),
                        value,
                        StatusCode::Good,
                    )
                })
                .collect();
            self.write(values);
            if run.state.is_terminal() {
                self.finished(&run.run_id);
            }
        }
    }

    pub fn apply_record(&mut self, record: &Record) {
        match record {
            Record::RunCreated(r) => {
                let info = RunInfo {
                    run_id: r.run_id.clone(),
                    proposal_id: r.proposal_id.clone(),
                    name: r.name.clone(),
                    planner_id: r.planner_id.clone(),
                    submitted_by: r.submitted_by.clone(),
                    state: r.state,
                    current_step: None,
                    reason: None,
                    estimated_duration_s: r.estimated_duration_s,
                    approval_required_because: Vec::new(),
                    instruments: Vec::new(),
                    results: 0,
                };
                self.ensure_run(&info);
                let v = |name: &str, value: &str| {
                    (
                        names::run_variable(&r.run_id, name),
                        Variant::from(value),
                        StatusCode::Good,
                    )
                };
                self.write(vec![
                    v("State", r.state.as_str()),
                    v("SupervisoryJobId", &r.proposal_id),
                    v("Name", &r.name),
                    v("SubmittedBy", &r.submitted_by),
                ]);
            }
            Record::RunState {
                run_id,
                state,
                step,
                reason,
                ..
            } => {
                let v = |name: &str, value: String| {
                    (
                        names::run_variable(run_id, name),
                        Variant::from(value),
                        StatusCode::Good,
                    )
                };
                let mut values = vec![
                    v("State", state.to_string()),
                    v("Reason", reason.clone().unwrap_or_default()),
                ];
                if let Some(step) = step {
                    values.push(v("CurrentStep", step.clone()));
                }
                self.write(values);
                if state.is_terminal() {
                    self.finished(run_id);
                    // A command that failed is never confirmed.
                    self.pending_setpoints
                        .retain(|(run, _), _| run.as_deref() != Some(run_id.as_str()));
                }
            }
            Record::Result {
                run_id,
                seq,
                name,
                step,
                instrument,
                value,
                ..
            } => {
                if !self.manager.inner().runs().lock().is_present(run_id) {
                    return;
                }
                let count = self.results.entry(run_id.clone()).or_default();
                *count += 1;
                let count = *count;
                let last = serde_json::json!({
                    "seq": seq, "name": name, "step": step, "instrument": instrument, "value": value,
                });
                self.write(vec![
                    (
                        names::run_variable(run_id, "ResultCount"),
                        Variant::from(count),
                        StatusCode::Good,
                    ),
                    (
                        names::run_variable(run_id, "LastResult"),
                        Variant::from(last.to_string()),
                        StatusCode::Good,
                    ),
                ]);
            }
            Record::Command {
                run_id,
                step,
                instrument,
                command,
                ..
            } => {
                if let Some(setpoint) = setpoint_of_command(instrument, command) {
                    self.pending_setpoints
                        .insert((Some(run_id.clone()), Some(step.clone())), setpoint);
                }
            }
            Record::Event {
                run_id,
                detail: EventDetail::CommandDone { .. },
                step,
                ..
            } => {
                let key = (run_id.clone(), step.clone());
                if let Some((path, value)) = self.pending_setpoints.remove(&key) {
                    // A technician's write sets the variable directly, so the cache may be stale.
                    self.written.remove(&self.names.id(&path));
                    self.write(vec![(path, Variant::from(value), StatusCode::Good)]);
                }
            }
            Record::Approval { .. } | Record::Event { .. } => {}
            // The latch is shown from the snapshot, which every face reads.
            Record::EStopLatch { .. } | Record::InterlockOverride { .. } => {}
        }
    }

    /// Follows the controller until it stops.
    pub async fn run(mut self, api: ControllerHandle) {
        let mut snapshots = api.watch_snapshot();
        // Subscribe before reading the runs, so no record falls between the two.
        let mut records = api.events();
        self.apply_runs(&api.runs().await);
        let first = snapshots.borrow_and_update().clone();
        self.apply_snapshot(&first);
        loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    self.apply_snapshot(&snapshot);
                }
                record = records.recv() => match record {
                    Ok(record) => self.apply_record(&record),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "opcua: journal records missed; reading the runs again");
                        self.apply_runs(&api.runs().await);
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labctl_core::instruments::DeviceCommand;

    #[test]
    fn setpoint_commands_name_their_target_value_and_others_none() {
        let target = |q: &str| {
            format!("Lab/Devices/hotplate/FunctionalUnitSet/hotplate/FunctionSet/{q}/TargetValue")
        };
        let setpoint = |command| setpoint_of_command("hotplate", &command);
        assert_eq!(
            setpoint(DeviceCommand::SetTemperature {
                temperature_c: 42.5
            }),
            Some((target("temperature_c"), 42.5))
        );
        assert_eq!(
            setpoint(DeviceCommand::SetStirSpeed { speed_rpm: 300.0 }),
            Some((target("stir_speed_rpm"), 300.0))
        );
        let (path, off) = setpoint(DeviceCommand::HeaterOff).unwrap();
        assert_eq!(path, target("temperature_c"));
        assert!(off.is_nan());
        let (path, off) = setpoint(DeviceCommand::StirOff).unwrap();
        assert_eq!(path, target("stir_speed_rpm"));
        assert!(off.is_nan());
        assert_eq!(setpoint(DeviceCommand::ReadTemperature), None);
        assert_eq!(setpoint(DeviceCommand::Home), None);
    }

    #[test]
    fn an_offline_instrument_keeps_its_readings_but_marks_them_uncertain() {
        let view = InstrumentView {
            id: "hotplate".into(),
            connection: Connection::Lost("cable".into()),
            identity: None,
            state: Some(DeviceState::Alarm("overheat".into())),
            values: vec![("temperature_c", 21.5)],
            last_seen: None,
            busy: false,
            armed: false,
        };
        let values = instrument_values(&view);
        assert!(values.contains(&(
            "Lab/Devices/hotplate/ConnectionState".into(),
            Variant::from("lost: cable"),
            StatusCode::Good
        )));
        assert!(values.contains(&(
            "Lab/Devices/hotplate/DeviceState".into(),
            Variant::from("alarm: overheat"),
            StatusCode::Good
        )));
        assert!(values.contains(&(
            "Lab/Devices/hotplate/FunctionalUnitSet/hotplate/FunctionSet/temperature_c/SensorValue"
                .into(),
            Variant::from(21.5),
            StatusCode::UncertainLastUsableValue
        )));
    }
}
