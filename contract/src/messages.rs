//! What the MQTT gateway publishes and its clients read (topics in `docs/mqtt.md`): one struct per message,
//! serialised by the gateway and deserialised by `labctl console` and `labctl submit`, so the two sides
//! cannot drift apart and a malformed message is refused with the field that is wrong.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use labctl_protocols::device::{DeviceState, Identity};

use crate::{EventKind, RunState};

/// Whether the controller is up: the retained `status` (`offline` is also its last will).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Online,
    Offline,
}

/// The retained `status` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabStatus {
    pub status: Presence,
    pub lab_id: String,
    pub labctl_version: String,
    pub started_at_ms: i64,
}

/// The retained `estop/state` message: whether the latch is set, who last changed it and when (both
/// absent when labctl started with the latch as it was, e.g. after a restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EStopState {
    pub latched: bool,
    pub by: Option<String>,
    pub at_ms: Option<i64>,
}

/// The retained `runs/{run_id}/status` message: the run's state, and what a console that connects late
/// needs beside it (name, submitter, estimate, start, and while it awaits approval what an approver decides
/// on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    pub run_id: String,
    pub proposal_id: Option<String>,
    pub state: RunState,
    pub step: Option<String>,
    pub reason: Option<String>,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_duration_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    /// While the run awaits approval: the protocol, the planner, why approval is needed, the dry run and
    /// the validator's findings (an object; docs/mqtt.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Value>,
}

/// A `runs/{run_id}/events` message: one journal event of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    pub run_id: String,
    /// An [`EventKind`] name; kept as text on the wire so that a console older than its controller still
    /// shows kinds it does not know ([`RunEvent::known_kind`]).
    pub kind: String,
    pub step: Option<String>,
    pub actor: Option<String>,
    #[serde(default)]
    pub detail: Value,
    pub at_ms: i64,
}

impl RunEvent {
    pub fn new(
        run_id: &str,
        kind: EventKind,
        step: Option<&str>,
        actor: Option<&str>,
        detail: Value,
        at_ms: i64,
    ) -> Self {
        RunEvent {
            run_id: run_id.to_owned(),
            kind: kind.as_str().to_owned(),
            step: step.map(str::to_owned),
            actor: actor.map(str::to_owned),
            detail,
            at_ms,
        }
    }

    /// The kind, when this version of labctl knows it.
    pub fn known_kind(&self) -> Option<EventKind> {
        self.kind.parse().ok()
    }
}

/// A `runs/{run_id}/results` message: one durable result, numbered from 1 within its run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub run_id: String,
    pub proposal_id: Option<String>,
    pub seq: u64,
    pub name: String,
    pub step: String,
    pub instrument: String,
    /// The instrument's identity as read at connect (manufacturer, model, serial, firmware); null when it
    /// was never identified.
    #[serde(default)]
    pub identity: Value,
    pub value: Value,
    pub at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_missing_a_field_is_refused_by_its_name() {
        let err = serde_json::from_value::<RunStatus>(json!({"run_id": "r", "state": "running"}))
            .unwrap_err();
        assert!(err.to_string().contains("at_ms"), "{err}");
        let err = serde_json::from_value::<RunStatus>(
            json!({"run_id": "r", "proposal_id": null, "state": "done", "step": null, "reason": null, "at_ms": 1}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("done"), "{err}");
        let err = serde_json::from_value::<EStopState>(json!({"latched": "yes"})).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn events_keep_kinds_this_version_does_not_know() {
        let event: RunEvent = serde_json::from_value(json!({
            "run_id": "r", "kind": "step_rehearsed", "step": null, "actor": null, "detail": {}, "at_ms": 3
        }))
        .unwrap();
        assert_eq!(event.known_kind(), None);
        let known = RunEvent::new(
            "r",
            EventKind::StepFailed,
            Some("/steps/0"),
            None,
            json!({}),
            4,
        );
        let back: RunEvent = serde_json::from_value(serde_json::to_value(&known).unwrap()).unwrap();
        assert_eq!(back.known_kind(), Some(EventKind::StepFailed));
        assert_eq!(back, known);
    }
}

/// Connection of an instrument as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "connection", content = "detail", rename_all = "snake_case")]
pub enum Connection {
    Connecting,
    Online,
    /// Lost or refused; the text says why. The controller keeps trying to reconnect.
    Lost(String),
}

impl Connection {
    /// The connection's word as published (`connecting`, `online`, `lost`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Connection::Connecting => "connecting",
            Connection::Online => "online",
            Connection::Lost(_) => "lost",
        }
    }

    /// Why it is lost, when it is.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Connection::Lost(why) => Some(why),
            Connection::Connecting | Connection::Online => None,
        }
    }
}

/// The retained `instruments/{id}/state` message: everything known about an instrument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstrumentState {
    pub id: String,
    pub connection: Connection,
    pub identity: Option<Identity>,
    pub state: Option<DeviceState>,
    /// Its latest readings, by quantity name, in the order the instrument reports them.
    pub values: Vec<(String, f64)>,
    /// A command is in flight.
    pub busy: bool,
    /// Ready for commands: false from a safe state until the driver's recovery before the next command.
    pub armed: bool,
}
