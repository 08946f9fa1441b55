//! The typed contract between labctl's core, its faces and its clients: who asks ([`Principal`]), the
//! states of a run ([`RunState`]), what the journal records ([`EventKind`]), run control, the API's errors
//! and the replies every face renders in its own way.
//!
//! Plain data: nothing here holds a channel, a lock or a runtime, so the consoles and other clients read
//! the same types the controller writes without linking the controller.
//!
//! May depend on: protocols (findings, roles). Nothing else of labctl.

use labctl_protocols::Finding;
use labctl_protocols::lab::Role;
use serde::{Deserialize, Serialize};

pub mod events;
pub mod messages;

pub use events::{EventDetail, InterlockTrip, ProposalRejection, RejectionReason};

/// Milliseconds since the Unix epoch: the timestamps of the journal and of every payload.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The face a request came through, recorded with everything it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Face {
    Mqtt,
    Opcua,
    /// The SCPI command port, over TCP, TLS or a serial line.
    CommandPort,
    Console,
    /// `labctl` on the command line.
    Cli,
    /// Code linked with the controller (tests, benchmarks, an embedding program).
    InProcess,
    /// The Model Context Protocol, for AI agents (streamable HTTP or `labctl mcp` over stdio).
    Mcp,
    /// The technicians' console in the browser (`labctl run`, HTTP or HTTPS).
    Web,
}

impl Face {
    pub fn as_str(self) -> &'static str {
        match self {
            Face::Mqtt => "mqtt",
            Face::Opcua => "opcua",
            Face::CommandPort => "command-port",
            Face::Console => "console",
            Face::Cli => "cli",
            Face::InProcess => "in-process",
            Face::Mcp => "mcp",
            Face::Web => "web",
        }
    }
}

impl std::fmt::Display for Face {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is asking, as authenticated by the gateway they came through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub via: Face,
    /// The program the user acts through, when the face learns it (an MCP client's `initialize`); recorded
    /// with what it submits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
}

impl Principal {
    pub fn new(name: &str, role: Role, via: Face) -> Self {
        Principal {
            name: name.to_owned(),
            role,
            via,
            client: None,
        }
    }

    /// The same principal, acting through `client`.
    pub fn with_client(mut self, client: ClientInfo) -> Self {
        self.client = Some(client);
        self
    }
}

/// The client program a user acts through, as it declared itself: for an MCP client, the name and version
/// of its `initialize` request's `clientInfo`, and the model the agent says it runs. Declared, not proven:
/// provenance for people reading the journal, never a basis for a permission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub name: String,
    pub version: String,
    /// The AI model behind the agent (e.g. `claude-sonnet-4.5`), when it declared one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_model: Option<String>,
}

/// The consent of an agent's operator (the person at the MCP client) to submit one protocol, bound to its
/// SHA-256 and used once. Recorded as consent, never as an approval: a proposal beyond the lab's
/// auto-approval still waits for a technician.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorConsent {
    /// SHA-256 (hex) of the exact protocol bytes the operator was shown.
    pub protocol_sha256: String,
}

/// States of a run, as published on `runs/{run_id}/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Rejected,
    AwaitingApproval,
    Queued,
    Running,
    Paused,
    Completed,
    Failed,
    Aborted,
    Interrupted,
}

impl RunState {
    pub const ALL: [RunState; 9] = [
        RunState::Rejected,
        RunState::AwaitingApproval,
        RunState::Queued,
        RunState::Running,
        RunState::Paused,
        RunState::Completed,
        RunState::Failed,
        RunState::Aborted,
        RunState::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Rejected => "rejected",
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::Aborted => "aborted",
            RunState::Interrupted => "interrupted",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Rejected
                | RunState::Completed
                | RunState::Failed
                | RunState::Aborted
                | RunState::Interrupted
        )
    }
}

/// A run state's name that is not one of [`RunState`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown run state {0:?}")]
pub struct UnknownRunState(pub String);

impl std::str::FromStr for RunState {
    type Err = UnknownRunState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownRunState(s.to_owned()))
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to a submission.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitReply {
    pub accepted: bool,
    pub proposal_id: Option<String>,
    pub run_id: Option<String>,
    pub state: Option<RunState>,
    /// The same proposal id was submitted before: this is that run.
    pub duplicate: bool,
    pub findings: Vec<Finding>,
    pub estimated_duration_s: Option<f64>,
    pub approval_required_because: Vec<String>,
    /// The planner the run is attributed to (the protocol's `metadata.planner.id`), once accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planner_id: Option<String>,
    /// Why the submission was refused before validation (permissions, shutdown, reused proposal id,
    /// quota, a latched stop); on the wire its message.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "refusal_message"
    )]
    pub error: Option<ApiError>,
}

fn refusal_message<S: serde::Serializer>(
    error: &Option<ApiError>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match error {
        Some(e) => serializer.collect_str(e),
        None => serializer.serialize_none(),
    }
}

impl SubmitReply {
    pub fn refused(proposal_id: Option<String>, error: ApiError) -> Self {
        SubmitReply {
            accepted: false,
            proposal_id,
            run_id: None,
            state: None,
            duplicate: false,
            findings: Vec::new(),
            estimated_duration_s: None,
            approval_required_because: Vec::new(),
            planner_id: None,
            error: Some(error),
        }
    }
}

/// A decision on a proposal, as the journal's `approval` event records it and faces show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Approved: by the lab's policy (`by: "policy"`) or by the technician the event names.
    Approved {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        estimated_duration_s: Option<f64>,
    },
    /// Waits for a technician: why, and what the validator found (warnings only: it was accepted).
    AwaitingApproval {
        because: Vec<String>,
        findings: Vec<Finding>,
        estimated_duration_s: Option<f64>,
    },
    Rejected {
        reason: String,
    },
}

/// Operator or planner control of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[serde(tag = "error", content = "message", rename_all = "snake_case")]
pub enum ApiError {
    #[error("{0}")]
    Forbidden(String),
    #[error("unknown run {0}")]
    UnknownRun(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("emergency stop is latched; acknowledge it first")]
    EStopLatched,
    /// An interlock's condition still holds on an instrument the run needs.
    #[error("{0}")]
    Interlocked(String),
    /// The journal could not record the decision, so it was not taken.
    #[error("{0}")]
    Journal(String),
    #[error("unknown interlock {0}")]
    UnknownInterlock(String),
    /// A parameter of the request is out of range or missing; the message names it.
    #[error("{0}")]
    BadArgument(String),
    #[error("controller is shutting down")]
    Unavailable,
    /// A proposal id names one protocol for good: a changed protocol needs a new id.
    #[error(
        "metadata.proposal_id: {proposal_id} was already used for a different protocol (run {run_id}); a changed protocol needs a new proposal id"
    )]
    ProposalReused { proposal_id: String, run_id: String },
    /// The user holds as many queued or awaiting runs as one user may.
    #[error("quota: {0}")]
    OverQuota(String),
}

/// Longest interlock override a technician may set; renewing it is a new, journaled decision.
pub const MAX_OVERRIDE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Where an interlock stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum InterlockState {
    /// Its condition does not hold.
    Clear,
    /// Its condition holds: its instruments are inhibited.
    Tripped { reason: String },
    /// Its condition holds, and a technician has let runs use its instruments anyway until `until_ms`.
    Overridden {
        reason: String,
        by: String,
        because: String,
        until_ms: i64,
    },
}

/// One interlock of the lab file and where it stands (the MQTT `interlocks` message is a list of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterlockStatus {
    pub name: String,
    #[serde(flatten)]
    pub state: InterlockState,
}

/// A run as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub run_id: String,
    pub proposal_id: String,
    pub name: String,
    pub planner_id: String,
    pub submitted_by: String,
    pub state: RunState,
    pub current_step: Option<String>,
    pub reason: Option<String>,
    pub estimated_duration_s: Option<f64>,
    pub approval_required_because: Vec<String>,
    pub instruments: Vec<String>,
    /// Results on disk (a result being committed is not counted yet).
    pub results: u64,
}

/// What a journal event records. Written to the journal and to every face by [`EventKind::as_str`]; the
/// severity a console shows is [`EventKind::severity`], decided here once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    ControllerStarted,
    ControllerStopped,
    JournalFailed,
    JournalRecovered,
    JournalClosed,
    Submitted,
    OperatorConsent,
    DryRun,
    ProposalRejected,
    Approval,
    ApprovalRestored,
    Started,
    StepStarted,
    StepFinished,
    StepSkipped,
    StepFailed,
    Command,
    CommandDone,
    OperatorAction,
    PlannerLost,
    EstopTriggered,
    EstopAcknowledged,
    EstopRestored,
    Interlock,
    InterlockCleared,
    InterlockOverride,
    InterlockOverridden,
    InterlockOverrideEnded,
    InterlockOverrideRestored,
    InstrumentSafe,
    InstrumentArmed,
    InstrumentDisarmed,
}

/// How much a technician needs to see an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Routine traffic (each device command): not worth a log line on a console.
    Routine,
    Info,
    /// Something a technician acts on: a failure, a stop, an interlock, an override.
    Warning,
}

/// A journal event kind that no version of labctl writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event kind {0:?}")]
pub struct UnknownEventKind(pub String);

impl EventKind {
    pub const ALL: [EventKind; 32] = [
        EventKind::ControllerStarted,
        EventKind::ControllerStopped,
        EventKind::JournalFailed,
        EventKind::JournalRecovered,
        EventKind::JournalClosed,
        EventKind::Submitted,
        EventKind::OperatorConsent,
        EventKind::DryRun,
        EventKind::ProposalRejected,
        EventKind::Approval,
        EventKind::ApprovalRestored,
        EventKind::Started,
        EventKind::StepStarted,
        EventKind::StepFinished,
        EventKind::StepSkipped,
        EventKind::StepFailed,
        EventKind::Command,
        EventKind::CommandDone,
        EventKind::OperatorAction,
        EventKind::PlannerLost,
        EventKind::EstopTriggered,
        EventKind::EstopAcknowledged,
        EventKind::EstopRestored,
        EventKind::Interlock,
        EventKind::InterlockCleared,
        EventKind::InterlockOverride,
        EventKind::InterlockOverridden,
        EventKind::InterlockOverrideEnded,
        EventKind::InterlockOverrideRestored,
        EventKind::InstrumentSafe,
        EventKind::InstrumentArmed,
        EventKind::InstrumentDisarmed,
    ];

    /// The name in the journal and on every face.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ControllerStarted => "controller_started",
            EventKind::ControllerStopped => "controller_stopped",
            EventKind::JournalFailed => "journal_failed",
            EventKind::JournalRecovered => "journal_recovered",
            EventKind::JournalClosed => "journal_closed",
            EventKind::Submitted => "submitted",
            EventKind::OperatorConsent => "operator_consent",
            EventKind::DryRun => "dry_run",
            EventKind::ProposalRejected => "proposal_rejected",
            EventKind::Approval => "approval",
            EventKind::ApprovalRestored => "approval_restored",
            EventKind::Started => "started",
            EventKind::StepStarted => "step_started",
            EventKind::StepFinished => "step_finished",
            EventKind::StepSkipped => "step_skipped",
            EventKind::StepFailed => "step_failed",
            EventKind::Command => "command",
            EventKind::CommandDone => "command_done",
            EventKind::OperatorAction => "operator_action",
            EventKind::PlannerLost => "planner_lost",
            EventKind::EstopTriggered => "estop_triggered",
            EventKind::EstopAcknowledged => "estop_acknowledged",
            EventKind::EstopRestored => "estop_restored",
            EventKind::Interlock => "interlock",
            EventKind::InterlockCleared => "interlock_cleared",
            EventKind::InterlockOverride => "interlock_override",
            EventKind::InterlockOverridden => "interlock_overridden",
            EventKind::InterlockOverrideEnded => "interlock_override_ended",
            EventKind::InterlockOverrideRestored => "interlock_override_restored",
            EventKind::InstrumentSafe => "instrument_safe",
            EventKind::InstrumentArmed => "instrument_armed",
            EventKind::InstrumentDisarmed => "instrument_disarmed",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            EventKind::Command | EventKind::CommandDone => Severity::Routine,
            EventKind::JournalFailed
            | EventKind::JournalClosed
            | EventKind::ProposalRejected
            | EventKind::StepFailed
            | EventKind::PlannerLost
            | EventKind::EstopTriggered
            | EventKind::EstopRestored
            | EventKind::Interlock
            | EventKind::InterlockOverride
            | EventKind::InterlockOverridden
            | EventKind::InterlockOverrideEnded
            | EventKind::InterlockOverrideRestored => Severity::Warning,
            _ => Severity::Info,
        }
    }
}

impl std::str::FromStr for EventKind {
    type Err = UnknownEventKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownEventKind(s.to_owned()))
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_read_in_the_journal_as_they_always_did() {
        let by_policy = Decision::Approved {
            by: Some("policy".into()),
            estimated_duration_s: Some(12.5),
        };
        let by_technician = Decision::Approved {
            by: None,
            estimated_duration_s: None,
        };
        let rejected = Decision::Rejected {
            reason: "too hot".into(),
        };
        for (decision, wire) in [
            (
                &by_policy,
                serde_json::json!({"decision": "approved", "by": "policy", "estimated_duration_s": 12.5}),
            ),
            (&by_technician, serde_json::json!({"decision": "approved"})),
            (
                &rejected,
                serde_json::json!({"decision": "rejected", "reason": "too hot"}),
            ),
        ] {
            assert_eq!(serde_json::to_value(decision).unwrap(), wire);
            assert_eq!(&serde_json::from_value::<Decision>(wire).unwrap(), decision);
        }
    }

    #[test]
    fn a_principal_names_its_client_program_only_when_the_face_knows_it() {
        let bo = Principal::new("planner-bo", Role::Planner, Face::Mqtt);
        assert_eq!(
            serde_json::to_value(&bo).unwrap(),
            serde_json::json!({"name": "planner-bo", "role": "planner", "via": "mqtt"})
        );
        let agent =
            Principal::new("planner-bo", Role::Planner, Face::Mcp).with_client(ClientInfo {
                name: "claude-desktop".into(),
                version: "0.10.2".into(),
                agent_model: None,
            });
        assert_eq!(
            serde_json::to_value(&agent).unwrap()["client"],
            serde_json::json!({"name": "claude-desktop", "version": "0.10.2"})
        );
        assert_eq!(Face::Mcp.to_string(), "mcp");
        assert_eq!(Face::Web.to_string(), "web");
    }

    #[test]
    fn a_refusal_is_typed_inside_and_its_message_on_the_wire() {
        let reply = SubmitReply::refused(
            Some("p-1".into()),
            ApiError::ProposalReused {
                proposal_id: "p-1".into(),
                run_id: "run-1".into(),
            },
        );
        let wire = serde_json::to_value(&reply).unwrap();
        assert_eq!(wire["accepted"], false);
        assert_eq!(
            wire["error"],
            "metadata.proposal_id: p-1 was already used for a different protocol (run run-1); a changed protocol needs a new proposal id"
        );
        let accepted = SubmitReply {
            error: None,
            accepted: true,
            ..reply
        };
        assert!(
            serde_json::to_value(&accepted)
                .unwrap()
                .get("error")
                .is_none()
        );
    }

    #[test]
    fn run_states_and_event_kinds_read_back_what_they_write_in_serde_and_text_alike() {
        for state in RunState::ALL {
            assert_eq!(state.as_str().parse::<RunState>(), Ok(state));
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str())
            );
        }
        assert_eq!(
            "estop_pressed".parse::<EventKind>(),
            Err(UnknownEventKind("estop_pressed".into()))
        );
        assert!("done".parse::<RunState>().is_err());
    }

    #[test]
    fn a_technician_is_warned_of_stops_interlocks_and_failures_not_of_each_command() {
        assert_eq!(EventKind::Command.severity(), Severity::Routine);
        assert_eq!(EventKind::StepFinished.severity(), Severity::Info);
        for kind in [
            EventKind::EstopTriggered,
            EventKind::Interlock,
            EventKind::StepFailed,
            EventKind::JournalFailed,
        ] {
            assert_eq!(kind.severity(), Severity::Warning, "{kind}");
        }
    }
}
