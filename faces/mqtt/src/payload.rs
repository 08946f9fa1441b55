//! JSON payloads of the MQTT contract (docs/mqtt.md): parsing what planners and technicians send, with a
//! strict size limit, and building what labctl publishes. Pure functions; every bad input becomes a
//! [`Rejection`], never a panic.

use labctl_protocols::Lab;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use labctl_core::api::Control;
use labctl_core::contract::messages::{
    EStopState, LabStatus, Presence, RunEvent, RunResult, RunStatus,
};
use labctl_core::contract::{self, RunState};
use labctl_core::journal::Record;

/// Largest payload accepted on any inbound topic (a protocol with thousands of steps fits easily).
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// Why an inbound message was refused; published as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejection {
    pub accepted: bool,
    /// `payload_too_large`, `malformed`, `forbidden`, `unknown_run`, `invalid_state`, `estop_latched`,
    /// `unavailable`, `unknown_topic`.
    pub error: &'static str,
    pub message: String,
    /// The topic the refused message came on.
    pub topic: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proposal_id: Option<String>,
}

impl Rejection {
    pub fn new(error: &'static str, message: impl Into<String>, topic: &str) -> Self {
        Rejection {
            accepted: false,
            error,
            message: message.into(),
            topic: topic.to_owned(),
            run_id: None,
            proposal_id: None,
        }
    }

    pub fn for_run(mut self, run_id: &str) -> Self {
        self.run_id = Some(run_id.to_owned());
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Refuses payloads over [`MAX_PAYLOAD`].
pub fn check_size(payload: &[u8], topic: &str) -> Result<(), Rejection> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Rejection::new(
            "payload_too_large",
            format!(
                "payload is {} bytes; the limit is {MAX_PAYLOAD}",
                payload.len()
            ),
            topic,
        ));
    }
    Ok(())
}

/// The proposal id of a submitted protocol, when it can be read (for the reply topic even when the
/// protocol is invalid).
pub fn proposal_id_of(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Meta {
        proposal_id: Option<String>,
    }
    #[derive(Deserialize)]
    struct Doc {
        metadata: Option<Meta>,
    }
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    serde_json::from_slice::<Doc>(payload)
        .ok()?
        .metadata?
        .proposal_id
        .filter(|p| labctl_mqtt_link::topics::is_topic_level(p))
}

/// Accepts `{"action": "pause"}` (with an optional `"reason"`) or the bare word `pause`.
fn word_or_field(
    payload: &[u8],
    field: &str,
    topic: &str,
) -> Result<(String, Option<String>), Rejection> {
    check_size(payload, topic)?;
    let text = std::str::from_utf8(payload)
        .map_err(|_| Rejection::new("malformed", "payload is not UTF-8", topic))?
        .trim();
    if !text.starts_with('{') && !text.starts_with('"') {
        return Ok((text.to_ascii_lowercase(), None));
    }
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Rejection::new("malformed", format!("malformed JSON: {e}"), topic))?;
    match v {
        Value::String(s) => Ok((s.to_ascii_lowercase(), None)),
        Value::Object(m) => {
            let word = m.get(field).and_then(Value::as_str).ok_or_else(|| {
                Rejection::new("malformed", format!("expected {{\"{field}\": ...}}"), topic)
            })?;
            let reason = m.get("reason").and_then(Value::as_str).map(str::to_owned);
            Ok((word.to_ascii_lowercase(), reason))
        }
        _ => Err(Rejection::new(
            "malformed",
            format!("expected {{\"{field}\": ...}}"),
            topic,
        )),
    }
}

/// `runs/{run_id}/control`: `pause`, `resume` or `abort`.
pub fn parse_control(payload: &[u8], topic: &str) -> Result<Control, Rejection> {
    let (word, _) = word_or_field(payload, "action", topic)?;
    match word.as_str() {
        "pause" => Ok(Control::Pause),
        "resume" => Ok(Control::Resume),
        "abort" => Ok(Control::Abort),
        other => Err(Rejection::new(
            "malformed",
            format!("unknown control {other:?}; expected pause, resume or abort"),
            topic,
        )),
    }
}

/// What a message on `runs/{run_id}/control` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    Run(Control),
    /// Publish the run's results with `seq` greater than `after` again (resume from a cursor).
    Replay {
        after: u64,
    },
}

/// `runs/{run_id}/control`: `pause`, `resume`, `abort`, or `{"action": "replay", "after": N}`.
pub fn parse_control_request(payload: &[u8], topic: &str) -> Result<ControlRequest, Rejection> {
    let (word, _) = word_or_field(payload, "action", topic)?;
    if word == "replay" {
        let after = serde_json::from_slice::<Value>(payload)
            .ok()
            .map(|v| v["after"].clone())
            .unwrap_or(Value::Null);
        let after = match after {
            Value::Null => 0,
            Value::Number(n) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
            other => {
                return Err(Rejection::new(
                    "malformed",
                    format!("\"after\" must be a result seq (a whole number >= 0), not {other}"),
                    topic,
                ));
            }
        };
        return Ok(ControlRequest::Replay { after });
    }
    parse_control(payload, topic).map(ControlRequest::Run)
}

/// An approval decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject { reason: String },
}

/// `runs/{run_id}/approval`: `approve`, or `reject` with a reason.
pub fn parse_approval(payload: &[u8], topic: &str) -> Result<Decision, Rejection> {
    let (word, reason) = word_or_field(payload, "decision", topic)?;
    match word.as_str() {
        "approve" => Ok(Decision::Approve),
        "reject" => Ok(Decision::Reject {
            reason: reason.unwrap_or_else(|| "rejected over MQTT".into()),
        }),
        other => Err(Rejection::new(
            "malformed",
            format!("unknown decision {other:?}; expected approve or reject"),
            topic,
        )),
    }
}

/// `estop`: `trigger` or `acknowledge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EStopAction {
    Trigger,
    Acknowledge,
}

pub fn parse_estop(payload: &[u8], topic: &str) -> Result<EStopAction, Rejection> {
    let (word, _) = word_or_field(payload, "action", topic)?;
    match word.as_str() {
        "trigger" => Ok(EStopAction::Trigger),
        "acknowledge" | "ack" => Ok(EStopAction::Acknowledge),
        other => Err(Rejection::new(
            "malformed",
            format!("unknown e-stop action {other:?}; expected trigger or acknowledge"),
            topic,
        )),
    }
}

/// What an `interlocks/{name}/override` message asks.
#[derive(Debug, Clone, PartialEq)]
pub enum OverrideRequest {
    /// Let runs use the tripped interlock's instruments for this long, for this reason.
    Set {
        duration: std::time::Duration,
        reason: String,
    },
    Withdraw,
}

/// `{"seconds": 600, "reason": "..."}` sets an override, `{"action": "withdraw"}` ends it.
pub fn parse_override(payload: &[u8], topic: &str) -> Result<OverrideRequest, Rejection> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        action: Option<String>,
        seconds: Option<f64>,
        reason: Option<String>,
    }
    check_size(payload, topic)?;
    let malformed = |why: String| Rejection::new("malformed", why, topic);
    let body: Body = serde_json::from_slice(payload).map_err(|e| {
        malformed(format!(
            "{e}; expected {{\"seconds\": N, \"reason\": \"...\"}} or {{\"action\": \"withdraw\"}}"
        ))
    })?;
    match (body.action.as_deref(), body.seconds, body.reason) {
        (Some("withdraw"), None, None) => Ok(OverrideRequest::Withdraw),
        (Some(other), ..) if other != "set" => Err(malformed(format!(
            "action: {other:?}; expected \"set\" or \"withdraw\""
        ))),
        (_, Some(seconds), Some(reason)) => {
            let duration = std::time::Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    malformed(format!("seconds: {seconds}; expected a positive number"))
                })?;
            Ok(OverrideRequest::Set { duration, reason })
        }
        (_, None, _) => Err(malformed(
            "seconds: missing; how long the override stands".into(),
        )),
        (_, _, None) => Err(malformed(
            "reason: missing; an override needs a reason".into(),
        )),
    }
}

/// The retained `status` message (`offline` is also the last will).
pub fn status(online: bool, lab_id: &str, started_at_ms: i64) -> Vec<u8> {
    serde_json::to_vec(&LabStatus {
        status: if online {
            Presence::Online
        } else {
            Presence::Offline
        },
        lab_id: lab_id.to_owned(),
        labctl_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at_ms,
    })
    .unwrap_or_default()
}

/// The retained `capabilities` message: enough for a planner to write a valid protocol (the lab's one
/// capabilities document, with the protocol's JSON Schema).
pub fn capabilities(lab: &Lab) -> Vec<u8> {
    let mut doc = labctl_protocols::capabilities::document(lab);
    doc["protocol_schema"] = labctl_protocols::schema::protocol_schema();
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// What one committed journal record becomes on MQTT (all at QoS 1).
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// The retained `runs/{run_id}/status`.
    Status(RunStatus),
    /// `runs/{run_id}/events`.
    Event(RunEvent),
    /// `runs/{run_id}/results`.
    Result(RunResult),
    /// The emergency stop latch changed: the retained `estop/state`.
    EStop(EStopState),
}

/// The retained `estop/state` message: whether the latch is set, who last changed it and when (both null
/// when labctl started with the latch as it was, e.g. after a restart).
pub fn estop_state(latched: bool, by: Option<&str>, at_ms: Option<i64>) -> EStopState {
    EStopState {
        latched,
        by: by.map(str::to_owned),
        at_ms,
    }
}

/// A run's status as the record says it; [`RunContext::decorate`] adds what a late console needs.
pub fn run_status(
    run_id: &str,
    proposal_id: Option<&str>,
    state: RunState,
    step: Option<&str>,
    reason: Option<&str>,
    at_ms: i64,
) -> RunStatus {
    RunStatus {
        run_id: run_id.to_owned(),
        proposal_id: proposal_id.map(str::to_owned),
        state,
        step: step.map(str::to_owned),
        reason: reason.map(str::to_owned),
        at_ms,
        name: None,
        submitted_by: None,
        estimated_duration_s: None,
        started_at_ms: None,
        approval: None,
    }
}

/// Maps a committed record to its MQTT message; `proposal_id` is the run's, when known.
pub fn from_record(record: &Record, proposal_id: Option<&str>) -> Option<Outbound> {
    match record {
        Record::RunCreated(r) => Some(Outbound::Status(run_status(
            &r.run_id,
            Some(&r.proposal_id),
            r.state,
            None,
            None,
            r.submitted_at_ms,
        ))),
        Record::RunState {
            run_id,
            state,
            step,
            reason,
            at_ms,
        } => Some(Outbound::Status(run_status(
            run_id,
            proposal_id,
            *state,
            step.as_deref(),
            reason.as_deref(),
            *at_ms,
        ))),
        Record::Command { .. } | Record::Approval { .. } | Record::Event { .. } => {
            let row = record.as_event()?;
            Some(Outbound::Event(RunEvent::new(
                row.run_id?,
                row.kind,
                row.step,
                row.actor,
                row.detail.into_owned(),
                row.at_ms,
            )))
        }
        // The latch as recorded, whoever (or whatever: a failed journal) changed it.
        Record::EStopLatch {
            latched,
            actor,
            at_ms,
            ..
        } => Some(Outbound::EStop(estop_state(
            *latched,
            actor.as_deref(),
            Some(*at_ms),
        ))),
        Record::InterlockOverride { .. } => None,
        Record::Result {
            run_id,
            seq,
            name,
            step,
            instrument,
            identity,
            value,
            at_ms,
        } => Some(Outbound::Result(RunResult {
            run_id: run_id.clone(),
            proposal_id: proposal_id.map(str::to_owned),
            seq: *seq,
            name: name.clone(),
            step: step.clone(),
            instrument: instrument.clone(),
            identity: identity.clone(),
            value: value.clone(),
            at_ms: *at_ms,
        })),
    }
}

/// A result read back from the journal (a replay, a catch-up after a lag), as `runs/{run_id}/results`.
pub fn result_from_row(
    run_id: &str,
    proposal_id: Option<&str>,
    row: &labctl_core::journal::read::ResultRow,
) -> RunResult {
    RunResult {
        run_id: run_id.to_owned(),
        proposal_id: proposal_id.map(str::to_owned),
        seq: u64::try_from(row.seq).unwrap_or(0),
        name: row.name.clone(),
        step: row.step.clone(),
        instrument: row.instrument.clone(),
        identity: row.identity.clone(),
        value: row.value.clone(),
        at_ms: row.at_ms,
    }
}

/// What the retained `runs/{run_id}/status` carries beyond the record itself, so that a console that connects
/// late still has it: the run's name, who submitted it, the estimate and when it started running, and, while
/// the run awaits approval, everything an approver decides on (`approval`). Gathered from the committed
/// journal records in order; pure.
#[derive(Debug, Default)]
pub struct RunContext {
    runs: std::collections::HashMap<String, RunMeta>,
}

#[derive(Debug, Default)]
struct RunMeta {
    name: Option<String>,
    submitted_by: Option<String>,
    estimated_duration_s: Option<f64>,
    started_at_ms: Option<i64>,
    /// Present while the run awaits approval.
    approval: Option<serde_json::Map<String, Value>>,
}

impl RunContext {
    /// What an approver decides on for `run_id`, while it awaits approval.
    fn approval_of(&mut self, run_id: &str) -> Option<&mut serde_json::Map<String, Value>> {
        self.runs.get_mut(run_id)?.approval.as_mut()
    }

    /// Takes note of what a committed record tells about its run; forgets a run once it has ended.
    pub fn observe(&mut self, record: &Record) {
        match record {
            Record::RunCreated(r) => {
                let approval = (r.state == RunState::AwaitingApproval).then(|| {
                    let protocol = serde_json::from_str::<Value>(&r.protocol_json)
                        .unwrap_or_else(|_| Value::String(r.protocol_json.clone()));
                    let mut m = serde_json::Map::new();
                    m.insert("proposal_id".into(), json!(r.proposal_id));
                    m.insert(
                        "planner".into(),
                        json!({"id": r.planner_id, "model": r.planner_model, "model_version": r.planner_model_version}),
                    );
                    m.insert("submitted_at_ms".into(), json!(r.submitted_at_ms));
                    m.insert("because".into(), json!([]));
                    m.insert("findings".into(), json!([]));
                    m.insert("dry_run".into(), Value::Null);
                    m.insert("protocol".into(), protocol);
                    m
                });
                self.runs.insert(
                    r.run_id.clone(),
                    RunMeta {
                        name: Some(r.name.clone()),
                        submitted_by: Some(r.submitted_by.clone()),
                        estimated_duration_s: r.estimated_duration_s,
                        started_at_ms: None,
                        approval,
                    },
                );
            }
            Record::RunState {
                run_id,
                state,
                at_ms,
                ..
            } => {
                let meta = self.runs.entry(run_id.clone()).or_default();
                if *state != RunState::AwaitingApproval {
                    meta.approval = None;
                }
                if *state == RunState::Running && meta.started_at_ms.is_none() {
                    meta.started_at_ms = Some(*at_ms);
                }
            }
            Record::Event {
                run_id: Some(run_id),
                detail: detail @ contract::EventDetail::DryRun { .. },
                ..
            } => {
                if let Some(approval) = self.approval_of(run_id) {
                    approval.insert("dry_run".into(), detail.to_json());
                }
            }
            Record::Approval {
                run_id,
                decision:
                    contract::Decision::AwaitingApproval {
                        because, findings, ..
                    },
                ..
            } => {
                if let Some(approval) = self.approval_of(run_id) {
                    approval.insert("because".into(), json!(because));
                    approval.insert("findings".into(), json!(findings));
                }
            }
            _ => {}
        }
    }

    /// Fills what is known of a run that this process saw no `RunCreated` for (e.g. after a lag).
    pub fn fill_from(&mut self, info: &labctl_core::api::RunInfo) {
        let meta = self.runs.entry(info.run_id.clone()).or_default();
        meta.name.get_or_insert_with(|| info.name.clone());
        meta.submitted_by
            .get_or_insert_with(|| info.submitted_by.clone());
        if meta.estimated_duration_s.is_none() {
            meta.estimated_duration_s = info.estimated_duration_s;
        }
    }

    pub fn knows(&self, run_id: &str) -> bool {
        self.runs.contains_key(run_id)
    }

    /// Adds `name`, `submitted_by`, `estimated_duration_s`, `started_at_ms` and (while awaiting approval)
    /// `approval` to a status.
    pub fn decorate(&self, status: &mut RunStatus) {
        let Some(meta) = self.runs.get(&status.run_id) else {
            return;
        };
        // What the context knows wins; what it does not know is left as the caller set it.
        status.name = meta.name.clone().or(status.name.take());
        status.submitted_by = meta.submitted_by.clone().or(status.submitted_by.take());
        status.estimated_duration_s = meta.estimated_duration_s.or(status.estimated_duration_s);
        status.started_at_ms = meta.started_at_ms.or(status.started_at_ms);
        if status.state == RunState::AwaitingApproval {
            status.approval = meta.approval.clone().map(Value::Object);
        }
    }

    /// Forgets a run (it has ended and its last status is published).
    pub fn forget(&mut self, run_id: &str) {
        self.runs.remove(run_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "labctl/sim/runs/r1/control";

    #[test]
    fn an_override_needs_its_time_and_reason_and_a_withdrawal_nothing_else() {
        const O: &str = "labctl/sim/interlocks/pump-alarm/override";
        assert_eq!(
            parse_override(br#"{"seconds": 90, "reason": "checked"}"#, O),
            Ok(OverrideRequest::Set {
                duration: std::time::Duration::from_secs(90),
                reason: "checked".into()
            })
        );
        assert_eq!(
            parse_override(br#"{"action": "withdraw"}"#, O),
            Ok(OverrideRequest::Withdraw)
        );
        for (bad, names) in [
            (&br#"{"seconds": 90}"#[..], "reason"),
            (br#"{"reason": "x"}"#, "seconds"),
            (br#"{"seconds": -5, "reason": "x"}"#, "seconds"),
            (br#"{"seconds": 0, "reason": "x"}"#, "seconds"),
            (
                br#"{"action": "extend", "seconds": 9, "reason": "x"}"#,
                "action",
            ),
            (br#"{"seconds": 9, "reason": "x", "until": 5}"#, "until"),
            (b"withdraw", "expected"),
        ] {
            let r = parse_override(bad, O).unwrap_err();
            assert_eq!(r.error, "malformed");
            assert!(
                r.message.contains(names),
                "{:?}: {}",
                String::from_utf8_lossy(bad),
                r.message
            );
        }
    }

    #[test]
    fn control_accepts_json_or_a_bare_word_and_refuses_the_rest() {
        assert_eq!(
            parse_control(br#"{"action":"pause"}"#, T),
            Ok(Control::Pause)
        );
        assert_eq!(parse_control(b"resume", T), Ok(Control::Resume));
        assert_eq!(parse_control(br#""ABORT""#, T), Ok(Control::Abort));
        for bad in [
            &b"{"[..],
            b"[1]",
            b"\xff\xfe",
            br#"{"act":"pause"}"#,
            b"explode",
            b"",
        ] {
            let r = parse_control(bad, T).unwrap_err();
            assert!(!r.accepted);
            assert_eq!(r.error, "malformed", "{bad:?}");
        }
    }

    #[test]
    fn replay_takes_a_cursor() {
        assert_eq!(
            parse_control_request(br#"{"action":"replay","after":12}"#, T),
            Ok(ControlRequest::Replay { after: 12 })
        );
        assert_eq!(
            parse_control_request(b"replay", T),
            Ok(ControlRequest::Replay { after: 0 })
        );
        assert_eq!(
            parse_control_request(b"pause", T),
            Ok(ControlRequest::Run(Control::Pause))
        );
        assert!(parse_control_request(br#"{"action":"replay","after":-1}"#, T).is_err());
        assert!(parse_control_request(br#"{"action":"replay","after":"x"}"#, T).is_err());
    }

    #[test]
    fn oversized_payloads_are_refused_before_parsing() {
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(
            parse_control(&big, T).unwrap_err().error,
            "payload_too_large"
        );
        assert!(check_size(&big[..MAX_PAYLOAD], T).is_ok());
        assert_eq!(proposal_id_of(&big), None);
    }

    #[test]
    fn latch_changes_become_the_retained_estop_state_and_other_lab_events_do_not() {
        let event = |detail: contract::EventDetail, actor: Option<&str>| Record::Event {
            run_id: None,
            step: None,
            actor: actor.map(str::to_owned),
            detail,
            at_ms: 1_700_000_000_123,
        };
        let latch = |latched: bool, actor: &str| Record::EStopLatch {
            latched,
            reason: None,
            actor: Some(actor.to_owned()),
            at_ms: 1_700_000_000_123,
        };
        let Some(Outbound::EStop(state)) = from_record(&latch(true, "alice"), None) else {
            panic!("a trigger must map to the estop state");
        };
        assert_eq!(
            serde_json::to_value(&state).unwrap(),
            json!({ "latched": true, "by": "alice", "at_ms": 1_700_000_000_123_i64 })
        );
        let Some(Outbound::EStop(state)) = from_record(&latch(false, "bob"), None) else {
            panic!("an acknowledgement must map to the estop state");
        };
        assert!(!state.latched);
        assert_eq!(state.by.as_deref(), Some("bob"));
        for detail in [
            contract::EventDetail::ControllerStarted {
                version: "0".into(),
                lab_id: "sim".into(),
                lab_sha256: "x".into(),
                interrupted_runs: Vec::new(),
            },
            contract::EventDetail::InstrumentSafe {
                instrument: "hotplate".into(),
                confirmed: true,
            },
            contract::EventDetail::Interlock(contract::InterlockTrip {
                interlock: "hot".into(),
                instrument: None,
                reason: "131 C".into(),
                action: None,
                safe_state: None,
                runs: None,
                again: None,
            }),
            contract::EventDetail::EstopTriggered {},
        ] {
            let kind = detail.kind();
            assert!(from_record(&event(detail, None), None).is_none(), "{kind}");
        }
    }

    #[test]
    fn approval_and_estop_words() {
        assert_eq!(parse_approval(b"approve", T), Ok(Decision::Approve));
        assert_eq!(
            parse_approval(br#"{"decision":"reject","reason":"too hot"}"#, T),
            Ok(Decision::Reject {
                reason: "too hot".into()
            })
        );
        assert_eq!(
            parse_estop(br#"{"action":"trigger"}"#, T),
            Ok(EStopAction::Trigger)
        );
        assert_eq!(parse_estop(b"acknowledge", T), Ok(EStopAction::Acknowledge));
        assert!(parse_estop(b"maybe", T).is_err());
    }

    #[test]
    fn proposal_id_is_read_only_when_it_can_be_a_topic_level() {
        assert_eq!(
            proposal_id_of(br#"{"metadata":{"proposal_id":"p-1"}}"#).as_deref(),
            Some("p-1")
        );
        assert_eq!(
            proposal_id_of(br#"{"metadata":{"proposal_id":"a/#"}}"#),
            None
        );
        assert_eq!(proposal_id_of(b"not json"), None);
    }

    #[test]
    fn capabilities_carry_the_schema_and_every_instrument() {
        let lab = Lab::sim();
        let v: Value = serde_json::from_slice(&capabilities(&lab)).unwrap();
        assert!(v["protocol_schema"].is_object());
        assert_eq!(
            v["instruments"].as_array().unwrap().len(),
            lab.instruments.len()
        );
    }
    #[test]
    fn a_status_awaiting_approval_carries_what_the_approver_needs_and_loses_it_once_decided() {
        use labctl_core::journal::RunRecord;
        let mut ctx = RunContext::default();
        let created = Record::RunCreated(RunRecord {
            run_id: "r1".into(),
            proposal_id: "p1".into(),
            name: "long wait".into(),
            planner_id: "bo".into(),
            planner_model: Some("gp".into()),
            planner_model_version: None,
            submitted_by: "planner-bo".into(),
            protocol_json: r#"{"steps":[{"type":"wait"}]}"#.into(),
            protocol_sha256: "x".into(),
            lab_id: "sim".into(),
            lab_sha256: "y".into(),
            labctl_version: "0".into(),
            state: RunState::AwaitingApproval,
            estimated_duration_s: Some(4000.0),
            submitted_at_ms: 5,
        });
        ctx.observe(&created);
        ctx.observe(&Record::Event {
            run_id: Some("r1".into()),
            step: None,
            actor: None,
            detail: contract::EventDetail::DryRun {
                estimated_duration_s: 4000.0,
                problems: Vec::new(),
                notes: Vec::new(),
                steps_simulated: 1,
            },
            at_ms: 6,
        });
        ctx.observe(&Record::Approval {
            run_id: "r1".into(),
            actor: None,
            decision: contract::Decision::AwaitingApproval {
                because: vec!["too long".into()],
                findings: vec![labctl_protocols::Finding::warning(
                    labctl_protocols::FindingCode::Schema,
                    "/steps/0",
                    "long",
                )],
                estimated_duration_s: Some(4000.0),
            },
            at_ms: 6,
        });
        let state = |state: RunState, at| Record::RunState {
            run_id: "r1".into(),
            state,
            step: None,
            reason: None,
            at_ms: at,
        };
        ctx.observe(&state(RunState::AwaitingApproval, 7));
        let mut status = run_status("r1", None, RunState::AwaitingApproval, None, None, 7);
        ctx.decorate(&mut status);
        let status = serde_json::to_value(&status).unwrap();
        assert_eq!(status["name"], "long wait");
        assert_eq!(status["submitted_by"], "planner-bo");
        assert_eq!(status["estimated_duration_s"], 4000.0);
        let a = &status["approval"];
        assert_eq!(a["because"], json!(["too long"]));
        assert_eq!(a["dry_run"]["estimated_duration_s"], 4000.0);
        assert_eq!(a["planner"]["model"], "gp");
        assert_eq!(a["findings"][0]["severity"], "warning");
        assert_eq!(a["protocol"]["steps"][0]["type"], "wait");

        ctx.observe(&state(RunState::Queued, 8));
        ctx.observe(&state(RunState::Running, 9));
        let mut status = run_status("r1", None, RunState::Running, None, None, 9);
        ctx.decorate(&mut status);
        assert!(status.approval.is_none(), "{status:?}");
        assert_eq!(status.started_at_ms, Some(9));
        // A run it never heard of is left alone.
        let other = run_status("r2", None, RunState::Running, None, None, 9);
        let mut decorated = other.clone();
        ctx.decorate(&mut decorated);
        assert_eq!(decorated, other);
    }
}
