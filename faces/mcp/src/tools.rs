//! The tools' inputs and outputs: typed, with the JSON Schemas an agent reads in `tools/list`.
//!
//! Outputs are this face's own types, not the core's, so the schema an agent sees is stable and documented
//! here; values whose shape the core already documents elsewhere (an instrument's envelope, a result's
//! value) pass through as JSON.

use labctl_core::api::{RunInfo, SubmitReply};
use labctl_protocols::Finding;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most results one `run_results` call returns.
pub const MAX_RESULTS_PER_CALL: usize = 1_000;
/// Results a `run_results` call returns when it does not say.
pub const DEFAULT_RESULTS_PER_CALL: usize = 100;
/// Most events one `run_status` call returns (the latest ones).
pub const MAX_EVENTS_PER_CALL: usize = 200;
/// How long a `wait_for_run` call waits when it does not say (seconds).
pub const DEFAULT_WAIT_S: f64 = 60.0;
/// Longest wait of one `wait_for_run` call (seconds), well within an idle session's 5 minutes: an agent
/// that wants to follow a run longer calls again.
pub const MAX_WAIT_S: f64 = 120.0;

/// A protocol document, as `labctl schema` describes it.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ProtocolInput {
    /// The protocol: a JSON object with `version`, `metadata`, `labware` and `steps` (read the resource
    /// `labctl://protocol/schema` or the prompt `write_protocol`).
    pub protocol: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SubmitInput {
    /// The protocol: a JSON object with `version`, `metadata`, `labware` and `steps`. Its
    /// `metadata.proposal_id` names it for good: submitting the same id again returns the same run.
    pub protocol: serde_json::Map<String, Value>,
    /// The AI model the agent runs (e.g. `claude-sonnet-4.5`), recorded with the run as provenance.
    #[serde(default)]
    pub agent_model: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct InstrumentInput {
    /// The instrument's id, as `list_instruments` gives it (e.g. `pump-red`).
    pub instrument: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunInput {
    /// The run's id, as `submit_protocol` returned it (e.g. `run-1764000000000-1`).
    pub run_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct StatusInput {
    /// The run's id.
    pub run_id: String,
    /// Only events with a sequence number above this one (the `next_event_cursor` of the last call).
    #[serde(default)]
    pub after_event: Option<i64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ResultsInput {
    /// The run's id.
    pub run_id: String,
    /// Only results with a sequence number above this one: 0 (the default) for all, else the
    /// `next_cursor` of the last call.
    #[serde(default)]
    pub after: u64,
    /// Most results to return (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WaitInput {
    /// The run's id.
    pub run_id: String,
    /// Also return as soon as the run has a result with a sequence number above this one (the
    /// `next_cursor` of `run_results`; 0 for its first result). Without it, only the run's end or pause ends
    /// the wait.
    #[serde(default)]
    pub after_result: Option<u64>,
    /// Longest wait in seconds (default 60, at most 120). The call returns with `ended_by: "timeout"`
    /// then: call again to keep following.
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

/// Why a `wait_for_run` call returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitEnd {
    /// The run has ended (completed, failed, aborted, interrupted or rejected).
    Finished,
    /// The run is paused: it waits for a resume (its own planner's or a technician's).
    Paused,
    /// The run has a result above `after_result`: read it with `run_results`.
    Result,
    /// `timeout_s` passed first.
    Timeout,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct WaitOut {
    pub ended_by: WaitEnd,
    pub run_id: String,
    /// The run's state when the wait ended (`queued`, `running`, `paused`, `completed`, ...).
    pub state: String,
    /// The run has ended: its state will not change again.
    pub finished: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Results on disk: above `after_result`, `run_results` has new ones.
    pub results: u64,
    /// Progress notifications sent during the wait (0 without a `progressToken` in the request's `_meta`).
    pub notifications: u64,
}

/// One finding of the validator.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FindingOut {
    /// `error` (the protocol is refused) or `warning`.
    pub severity: String,
    /// A stable code (e.g. `out_of_envelope`, `unknown_instrument`).
    pub code: String,
    /// JSON pointer to the offending value, e.g. `/steps/3/params/volume_ul` (`""` is the document).
    pub path: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
}

impl From<&Finding> for FindingOut {
    fn from(f: &Finding) -> Self {
        let text = |v: Value| match v {
            Value::String(s) => s,
            other => other.to_string(),
        };
        FindingOut {
            severity: text(serde_json::to_value(f.severity).unwrap_or_default()),
            code: text(serde_json::to_value(f.code).unwrap_or_default()),
            path: f.path.clone(),
            message: f.message.clone(),
            found: f.found.clone(),
            expected: f.expected.clone(),
        }
    }
}

pub fn findings(list: &[Finding]) -> Vec<FindingOut> {
    list.iter().map(FindingOut::from).collect()
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct LabOverview {
    pub lab_id: String,
    /// The emergency stop is latched: nothing runs until a technician acknowledges it.
    pub estop_latched: bool,
    pub instruments: Vec<InstrumentSummary>,
    /// Interlocks whose condition holds now (their instruments are inhibited).
    pub interlocks_tripped: Vec<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct InstrumentSummary {
    pub id: String,
    /// The instrument's kind (e.g. `syringe_pump`, `spectrophotometer`).
    pub kind: String,
    /// Actions a protocol's `action` steps may name on it.
    pub actions: Vec<String>,
    /// Actions a protocol's `measure` steps may name on it.
    pub measurements: Vec<String>,
    /// `online`, `connecting` or `lost`, as labctl sees its line now.
    pub connection: String,
    /// Ready for commands.
    pub armed: bool,
    /// A command is in flight.
    pub busy: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct InstrumentDetail {
    pub id: String,
    pub kind: String,
    /// `online`, `connecting` or `lost`.
    pub connection: String,
    /// Why the line is lost, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_detail: Option<String>,
    /// Model, serial number and firmware, once the instrument has answered.
    pub identity: Value,
    /// The device's own state (e.g. idle, moving), once known.
    pub state: Value,
    /// The last values read, by quantity.
    pub values: std::collections::BTreeMap<String, f64>,
    pub armed: bool,
    pub busy: bool,
    /// Its capabilities as the lab file gives them (ranges, positions, stock).
    pub capabilities: Value,
    /// The safety envelope labctl holds it to, whatever a protocol asks.
    pub envelope: Value,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ValidationOut {
    pub valid: bool,
    /// Every finding, each with the JSON pointer of the offending value.
    pub findings: Vec<FindingOut>,
    /// Static estimate, in seconds (every `wait_until` counted at its timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_duration_s: Option<f64>,
    /// Steps executed once every `repeat` is unrolled.
    pub expanded_steps: u64,
    /// Why a technician would have to approve it; empty when the lab's policy approves it by itself.
    pub approval_required_because: Vec<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProblemOut {
    /// JSON pointer of the step, e.g. `/steps/3`.
    pub path: String,
    pub message: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DryRunOut {
    pub valid: bool,
    pub findings: Vec<FindingOut>,
    /// Whether the dry run on the lab's physical model happened (only for a valid protocol).
    pub simulated: bool,
    /// Duration on the physical model, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_duration_s: Option<f64>,
    /// What would go wrong on the model (a vessel overflowing, a stock running out), each with the JSON
    /// pointer of its step.
    pub problems: Vec<ProblemOut>,
    pub notes: Vec<String>,
    pub steps_simulated: u64,
    pub approval_required_because: Vec<String>,
}

/// What became of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Accepted and queued (or running): the lab's policy approved it.
    Accepted,
    /// Accepted, and waiting for a technician's approval (`approval_required_because` says why); follow it
    /// with `run_status`.
    AwaitingApproval,
    /// The validator refused it: `findings` says where and why. Fix the protocol and submit it with a new
    /// proposal id.
    Rejected,
    /// Refused before validation (`message` says why: permissions, quota, a latched emergency stop, a reused
    /// proposal id).
    Refused,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SubmitOut {
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proposal_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The run's state (`queued`, `awaiting_approval`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The proposal id was submitted before: this is that run.
    pub duplicate: bool,
    pub findings: Vec<FindingOut>,
    pub approval_required_because: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_duration_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl From<SubmitReply> for SubmitOut {
    fn from(r: SubmitReply) -> Self {
        let outcome = match (&r.error, r.accepted, r.state) {
            (Some(_), _, _) => Outcome::Refused,
            (None, false, _) => Outcome::Rejected,
            (None, true, Some(labctl_core::api::RunState::AwaitingApproval)) => {
                Outcome::AwaitingApproval
            }
            (None, true, _) => Outcome::Accepted,
        };
        SubmitOut {
            outcome,
            proposal_id: r.proposal_id,
            run_id: r.run_id,
            state: r.state.map(|s| s.as_str().to_owned()),
            duplicate: r.duplicate,
            findings: findings(&r.findings),
            approval_required_because: r.approval_required_because,
            estimated_duration_s: r.estimated_duration_s,
            message: r.error.map(|e| e.to_string()),
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunOut {
    pub run_id: String,
    pub proposal_id: String,
    pub name: String,
    /// `awaiting_approval`, `queued`, `running`, `paused`, `completed`, `failed`, `aborted`,
    /// `interrupted` or `rejected`.
    pub state: String,
    /// The run has ended: its state will not change again.
    pub finished: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub planner_id: String,
    pub submitted_by: String,
    pub approval_required_because: Vec<String>,
    /// Results on disk so far.
    pub results: u64,
    /// The run's journal events (the latest 200 at most), oldest first.
    pub events: Vec<EventOut>,
    /// Give it as `after_event` to get only newer events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_event_cursor: Option<i64>,
}

impl RunOut {
    pub fn new(run: RunInfo, events: Vec<EventOut>) -> Self {
        RunOut {
            finished: run.state.is_terminal(),
            state: run.state.as_str().to_owned(),
            run_id: run.run_id,
            proposal_id: run.proposal_id,
            name: run.name,
            current_step: run.current_step,
            reason: run.reason,
            planner_id: run.planner_id,
            submitted_by: run.submitted_by,
            approval_required_because: run.approval_required_because,
            results: run.results,
            next_event_cursor: events.last().map(|e| e.seq),
            events,
        }
    }
}

impl WaitOut {
    pub fn new(run: RunInfo, ended_by: WaitEnd, notifications: u64) -> Self {
        WaitOut {
            ended_by,
            finished: run.state.is_terminal(),
            state: run.state.as_str().to_owned(),
            run_id: run.run_id,
            current_step: run.current_step,
            reason: run.reason,
            results: run.results,
            notifications,
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EventOut {
    pub seq: i64,
    pub at_ms: i64,
    /// e.g. `submitted`, `approval`, `step_started`, `step_finished`, `operator_action`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    pub detail: Value,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ResultsOut {
    pub run_id: String,
    pub results: Vec<ResultOut>,
    /// Give it as `after` to continue; equal to the `after` given when there was nothing new.
    pub next_cursor: u64,
    /// The run has ended and every result up to `next_cursor` was returned.
    pub complete: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ResultOut {
    /// The run's sequence number of this result (1, 2, ...).
    pub seq: i64,
    /// The measure step's `result` name.
    pub name: String,
    pub step: String,
    pub instrument: String,
    /// The instrument's identity when it measured (model, serial, firmware).
    pub identity: Value,
    pub value: Value,
    pub at_ms: i64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ControlOut {
    pub run_id: String,
    /// The run's state when the request was taken. An abort is immediate (`aborted`); a pause or a resume
    /// is taken by the run at its next check (the state still reads `running` or `paused`): follow it with
    /// `run_status`.
    pub state: String,
}
