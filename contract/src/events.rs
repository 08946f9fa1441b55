//! What a journal event says, typed by its kind. The controller and the executor write an [`EventDetail`];
//! the journal stores its kind ([`EventDetail::kind`]) and its fields as the `detail` JSON of the `events`
//! table ([`EventDetail::to_json`]), unchanged from when they were written by hand; a reader turns a row
//! back into the variant with [`EventDetail::parse`]. Commands and approval decisions have typed records of
//! their own (the core's `Record::Command` and `Record::Approval`), so they are not here.

use labctl_protocols::OnError;
use labctl_protocols::finding::DryRunProblem;
use labctl_protocols::lab::TripAction;
use serde::{Deserialize, Serialize};

use crate::{ClientInfo, Control, EventKind, Face, OperatorConsent};

/// An event's fields, one variant per kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum EventDetail {
    ControllerStarted {
        version: String,
        lab_id: String,
        lab_sha256: String,
        /// Runs the previous process left active, now `interrupted`.
        interrupted_runs: Vec<String>,
    },
    ControllerStopped {},
    /// The journal could not commit: the lab stopped.
    JournalFailed {
        reason: String,
    },
    JournalRecovered {
        /// Why it had failed.
        was: String,
    },
    JournalClosed {},
    Submitted {
        proposal_id: String,
        protocol_sha256: String,
        via: Face,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<ClientInfo>,
    },
    /// The agent's operator consented to this exact protocol (never an approval).
    OperatorConsent(OperatorConsent),
    DryRun {
        estimated_duration_s: f64,
        problems: Vec<DryRunProblem>,
        notes: Vec<String>,
        steps_simulated: u64,
    },
    ProposalRejected(ProposalRejection),
    /// A proposal awaiting approval when the last process stopped, awaiting it again.
    ApprovalRestored {
        because: Vec<String>,
        estimated_duration_s: f64,
        problems: Vec<DryRunProblem>,
    },
    Started {},
    StepStarted {
        /// The block's step type (`parallel`, `repeat`, ...).
        #[serde(rename = "type")]
        step_type: String,
    },
    StepFinished {},
    StepSkipped {
        reason: String,
    },
    StepFailed {
        reason: String,
        on_error: OnError,
    },
    CommandDone {
        instrument: String,
        /// A summary of the driver's outcome (a spectrum as its number of points).
        outcome: serde_json::Value,
    },
    OperatorAction {
        control: Control,
    },
    PlannerLost {
        planner_id: String,
        /// What was done about it (`safe hold`).
        action: String,
    },
    EstopTriggered {},
    EstopAcknowledged {
        was_latched: bool,
    },
    EstopRestored {
        reason: String,
    },
    /// An interlock tripped: lab-wide (with what it did) or on one run it holds (`runs` empty, no action).
    Interlock(InterlockTrip),
    InterlockCleared {
        interlock: String,
    },
    /// A technician's override was set.
    InterlockOverride {
        interlock: String,
        because: String,
        condition: String,
        until_ms: i64,
    },
    /// A trip that an override in force let pass.
    InterlockOverridden {
        interlock: String,
        reason: String,
        override_by: String,
        until_ms: i64,
    },
    InterlockOverrideEnded {
        interlock: String,
        why: String,
    },
    InterlockOverrideRestored {
        interlock: String,
        by: Option<String>,
        because: String,
        until_ms: i64,
    },
    InstrumentSafe {
        instrument: String,
        confirmed: bool,
    },
    InstrumentArmed {
        instrument: String,
    },
    InstrumentDisarmed {
        instrument: String,
    },
}

/// Why a proposal was refused before it became a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProposalRejection {
    /// `None` when the document was too broken to name one.
    pub proposal_id: Option<String>,
    /// Validation findings, when it was refused for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub findings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RejectionReason>,
    /// The run the proposal id already names (`proposal_id_reused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The quota that was reached (`quota`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A refusal that is not about the protocol's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    ProposalIdReused,
    Quota,
    EstopLatched,
}

/// An interlock's trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterlockTrip {
    pub interlock: String,
    /// The instrument whose condition tripped it (so a log filtered by instrument shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instrument: Option<String>,
    pub reason: String,
    /// What the trip does to the runs it holds (lab-wide event only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<TripAction>,
    /// Instruments sent to their safe state (lab-wide event only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_state: Option<Vec<String>>,
    /// Runs it holds (lab-wide event only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<String>>,
    /// Whether it tripped again while its condition held (something re-armed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub again: Option<bool>,
}

/// A row whose detail does not fit its kind.
#[derive(Debug, thiserror::Error)]
#[error("event {kind}: {source}")]
pub struct BadEventDetail {
    pub kind: EventKind,
    pub source: serde_json::Error,
}

impl EventDetail {
    /// The kind the journal files it under.
    pub fn kind(&self) -> EventKind {
        match self {
            EventDetail::ControllerStarted { .. } => EventKind::ControllerStarted,
            EventDetail::ControllerStopped {} => EventKind::ControllerStopped,
            EventDetail::JournalFailed { .. } => EventKind::JournalFailed,
            EventDetail::JournalRecovered { .. } => EventKind::JournalRecovered,
            EventDetail::JournalClosed {} => EventKind::JournalClosed,
            EventDetail::Submitted { .. } => EventKind::Submitted,
            EventDetail::OperatorConsent(_) => EventKind::OperatorConsent,
            EventDetail::DryRun { .. } => EventKind::DryRun,
            EventDetail::ProposalRejected(_) => EventKind::ProposalRejected,
            EventDetail::ApprovalRestored { .. } => EventKind::ApprovalRestored,
            EventDetail::Started {} => EventKind::Started,
            EventDetail::StepStarted { .. } => EventKind::StepStarted,
            EventDetail::StepFinished {} => EventKind::StepFinished,
            EventDetail::StepSkipped { .. } => EventKind::StepSkipped,
            EventDetail::StepFailed { .. } => EventKind::StepFailed,
            EventDetail::CommandDone { .. } => EventKind::CommandDone,
            EventDetail::OperatorAction { .. } => EventKind::OperatorAction,
            EventDetail::PlannerLost { .. } => EventKind::PlannerLost,
            EventDetail::EstopTriggered {} => EventKind::EstopTriggered,
            EventDetail::EstopAcknowledged { .. } => EventKind::EstopAcknowledged,
            EventDetail::EstopRestored { .. } => EventKind::EstopRestored,
            EventDetail::Interlock(_) => EventKind::Interlock,
            EventDetail::InterlockCleared { .. } => EventKind::InterlockCleared,
            EventDetail::InterlockOverride { .. } => EventKind::InterlockOverride,
            EventDetail::InterlockOverridden { .. } => EventKind::InterlockOverridden,
            EventDetail::InterlockOverrideEnded { .. } => EventKind::InterlockOverrideEnded,
            EventDetail::InterlockOverrideRestored { .. } => EventKind::InterlockOverrideRestored,
            EventDetail::InstrumentSafe { .. } => EventKind::InstrumentSafe,
            EventDetail::InstrumentArmed { .. } => EventKind::InstrumentArmed,
            EventDetail::InstrumentDisarmed { .. } => EventKind::InstrumentDisarmed,
        }
    }

    /// The fields as the journal's `detail` column holds them (an object; `{}` for a kind without any).
    pub fn to_json(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut tagged)) => tagged
                .remove("detail")
                .unwrap_or_else(|| serde_json::Value::Object(Default::default())),
            _ => serde_json::Value::Object(Default::default()),
        }
    }

    /// A journal row's kind and detail as the variant; an error names the kind when they do not fit.
    pub fn parse(
        kind: EventKind,
        detail: &serde_json::Value,
    ) -> Result<EventDetail, BadEventDetail> {
        serde_json::from_value(serde_json::json!({ "kind": kind, "detail": detail }))
            .map_err(|source| BadEventDetail { kind, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The stored JSON is what the controller wrote by hand before these types, and reads back as the
    /// same variant.
    #[test]
    fn details_keep_their_journal_json_and_read_back() {
        let cases = [
            (
                EventDetail::ControllerStarted {
                    version: "0.1.0".into(),
                    lab_id: "sim".into(),
                    lab_sha256: "ab".into(),
                    interrupted_runs: vec!["run-1".into()],
                },
                json!({"version": "0.1.0", "lab_id": "sim", "lab_sha256": "ab", "interrupted_runs": ["run-1"]}),
            ),
            (EventDetail::Started {}, json!({})),
            (
                EventDetail::StepStarted {
                    step_type: "parallel".into(),
                },
                json!({"type": "parallel"}),
            ),
            (
                EventDetail::StepFailed {
                    reason: "timeout".into(),
                    on_error: OnError::Skip,
                },
                json!({"reason": "timeout", "on_error": "skip"}),
            ),
            (
                EventDetail::ProposalRejected(ProposalRejection {
                    proposal_id: Some("p-1".into()),
                    findings: None,
                    reason: Some(RejectionReason::ProposalIdReused),
                    run_id: Some("run-1".into()),
                    detail: None,
                }),
                json!({"proposal_id": "p-1", "reason": "proposal_id_reused", "run_id": "run-1"}),
            ),
            (
                EventDetail::Interlock(InterlockTrip {
                    interlock: "hot".into(),
                    instrument: None,
                    reason: "131 C".into(),
                    action: Some(TripAction::Pause),
                    safe_state: Some(vec!["hotplate".into()]),
                    runs: Some(vec![]),
                    again: Some(false),
                }),
                json!({"interlock": "hot", "reason": "131 C", "action": "pause", "safe_state": ["hotplate"], "runs": [], "again": false}),
            ),
            (
                EventDetail::Submitted {
                    proposal_id: "p".into(),
                    protocol_sha256: "cd".into(),
                    via: Face::Mcp,
                    client: None,
                },
                json!({"proposal_id": "p", "protocol_sha256": "cd", "via": "mcp"}),
            ),
            (
                EventDetail::OperatorConsent(OperatorConsent {
                    protocol_sha256: "ef".into(),
                }),
                json!({"protocol_sha256": "ef"}),
            ),
        ];
        for (detail, wire) in cases {
            assert_eq!(detail.to_json(), wire, "{detail:?}");
            assert_eq!(
                EventDetail::parse(detail.kind(), &wire).unwrap(),
                detail,
                "{wire}"
            );
        }
    }

    #[test]
    fn a_detail_that_does_not_fit_its_kind_is_refused_by_name() {
        let err =
            EventDetail::parse(EventKind::InstrumentSafe, &json!({"instrument": 3})).unwrap_err();
        assert_eq!(err.kind, EventKind::InstrumentSafe);
        assert!(
            err.to_string().starts_with("event instrument_safe: "),
            "{err}"
        );
    }

    /// Every kind but the two with records of their own has a variant.
    #[test]
    fn every_event_kind_has_a_detail_or_a_record_of_its_own() {
        for kind in EventKind::ALL {
            if matches!(kind, EventKind::Command | EventKind::Approval) {
                continue;
            }
            // The variant's name is the kind's, so an empty detail either parses or names a field.
            let err = EventDetail::parse(kind, &json!({}));
            if let Err(e) = err {
                assert!(
                    e.source.to_string().contains("missing field"),
                    "{kind}: {e}"
                );
            }
        }
    }
}
