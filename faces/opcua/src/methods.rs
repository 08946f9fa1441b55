//! The `Lab` methods (`interfaces.md`): who may call which, their arguments, and the call itself, which goes
//! through [`ControllerHandle`] like every other interface, so validation, approval and the safety envelope
//! are the same ones.

use labctl_protocols::lab::Role;
use opcua::types::{Argument, DataTypeId, StatusCode, Variant};

use labctl_core::api::{ApiError, Control, ControllerHandle, Principal};
use labctl_core::policy::{self, Permission};

/// Browse names of the methods on `Lab`, and the way to tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabMethod {
    SubmitProtocol,
    ApproveRun,
    RejectRun,
    PauseRun,
    ResumeRun,
    AbortRun,
    EmergencyStop,
    AcknowledgeEmergencyStop,
    OverrideInterlock,
    WithdrawInterlockOverride,
}

impl LabMethod {
    pub const ALL: [LabMethod; 10] = [
        LabMethod::SubmitProtocol,
        LabMethod::ApproveRun,
        LabMethod::RejectRun,
        LabMethod::PauseRun,
        LabMethod::ResumeRun,
        LabMethod::AbortRun,
        LabMethod::EmergencyStop,
        LabMethod::AcknowledgeEmergencyStop,
        LabMethod::OverrideInterlock,
        LabMethod::WithdrawInterlockOverride,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LabMethod::SubmitProtocol => "SubmitProtocol",
            LabMethod::ApproveRun => "ApproveRun",
            LabMethod::RejectRun => "RejectRun",
            LabMethod::PauseRun => "PauseRun",
            LabMethod::ResumeRun => "ResumeRun",
            LabMethod::AbortRun => "AbortRun",
            LabMethod::EmergencyStop => "EmergencyStop",
            LabMethod::AcknowledgeEmergencyStop => "AcknowledgeEmergencyStop",
            LabMethod::OverrideInterlock => "OverrideInterlock",
            LabMethod::WithdrawInterlockOverride => "WithdrawInterlockOverride",
        }
    }

    /// The method whose node id string is `Lab/{name}` (see `names::method`).
    pub fn from_node_path(path: &str) -> Option<LabMethod> {
        let name = path.strip_prefix("Lab/")?;
        LabMethod::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The role table's permission the method needs (`policy`); which runs a caller may touch is the
    /// controller's decision.
    pub fn permission(self) -> Permission {
        match self {
            LabMethod::SubmitProtocol => Permission::Submit,
            LabMethod::ApproveRun | LabMethod::RejectRun => Permission::Approve,
            LabMethod::PauseRun | LabMethod::ResumeRun | LabMethod::AbortRun => {
                Permission::ControlOwnRun
            }
            LabMethod::EmergencyStop => Permission::TriggerEStop,
            LabMethod::AcknowledgeEmergencyStop => Permission::AcknowledgeEStop,
            LabMethod::OverrideInterlock | LabMethod::WithdrawInterlockOverride => {
                Permission::OverrideInterlock
            }
        }
    }

    pub fn allowed(self, role: Role) -> bool {
        policy::allows(role, self.permission())
    }

    pub fn description(self) -> &'static str {
        match self {
            LabMethod::SubmitProtocol => {
                "Validate, dry-run and submit a protocol (JSON); returns the run id, its state and the full reply (JSON, with every finding when rejected)"
            }
            LabMethod::ApproveRun => "Approve a run awaiting approval (technicians)",
            LabMethod::RejectRun => "Reject a run awaiting approval, with a reason (technicians)",
            LabMethod::PauseRun => "Pause a run at the next step boundary",
            LabMethod::ResumeRun => "Resume a paused run",
            LabMethod::AbortRun => "Abort a run; its instruments go to their safe state",
            LabMethod::EmergencyStop => {
                "Latch the emergency stop: every instrument to its safe state, every run aborted"
            }
            LabMethod::AcknowledgeEmergencyStop => "Release the emergency stop latch (technicians)",
            LabMethod::OverrideInterlock => {
                "Let runs use a tripped interlock's instruments for a time (at most an hour) while its condition holds, with a reason for the journal (technicians)"
            }
            LabMethod::WithdrawInterlockOverride => {
                "End an interlock override; if the condition still holds the interlock trips again at once (technicians)"
            }
        }
    }

    pub fn inputs(self) -> Vec<Argument> {
        let run_id = arg("RunId", "the run's id (run-...)");
        let interlock = arg("Interlock", "the interlock's name in the lab file");
        match self {
            LabMethod::SubmitProtocol => vec![arg("Protocol", "the protocol, JSON text")],
            LabMethod::RejectRun => vec![run_id, arg("Reason", "why it is rejected")],
            LabMethod::ApproveRun
            | LabMethod::PauseRun
            | LabMethod::ResumeRun
            | LabMethod::AbortRun => vec![run_id],
            LabMethod::EmergencyStop | LabMethod::AcknowledgeEmergencyStop => Vec::new(),
            LabMethod::OverrideInterlock => vec![
                interlock,
                Argument {
                    data_type: DataTypeId::Double.into(),
                    ..arg("Seconds", "how long the override stands, at most 3600")
                },
                arg("Reason", "why, for the journal"),
            ],
            LabMethod::WithdrawInterlockOverride => vec![interlock],
        }
    }

    pub fn outputs(self) -> Vec<Argument> {
        match self {
            LabMethod::SubmitProtocol => vec![
                arg("RunId", "the run's id; empty when the protocol was refused"),
                arg("State", "the run's state, or `rejected`"),
                arg(
                    "Reply",
                    "the full reply, JSON: findings, estimated duration, approval reasons",
                ),
            ],
            LabMethod::ApproveRun
            | LabMethod::RejectRun
            | LabMethod::PauseRun
            | LabMethod::ResumeRun
            | LabMethod::AbortRun => vec![arg("State", "the run's state afterwards")],
            LabMethod::EmergencyStop
            | LabMethod::AcknowledgeEmergencyStop
            | LabMethod::OverrideInterlock
            | LabMethod::WithdrawInterlockOverride => Vec::new(),
        }
    }
}

fn arg(name: &str, description: &str) -> Argument {
    Argument {
        name: name.into(),
        data_type: DataTypeId::String.into(),
        value_rank: -1,
        array_dimensions: None,
        description: opcua::types::LocalizedText::new("", description),
    }
}

/// The number argument at `index` (any numeric type); anything else is the caller's error.
fn number_arg(args: &[Variant], index: usize) -> Result<f64, StatusCode> {
    match args.get(index) {
        Some(Variant::Double(v)) => Ok(*v),
        Some(Variant::Float(v)) => Ok(f64::from(*v)),
        Some(Variant::Int32(v)) => Ok(f64::from(*v)),
        Some(Variant::UInt32(v)) => Ok(f64::from(*v)),
        Some(Variant::Int64(v)) => Ok(*v as f64),
        Some(Variant::UInt16(v)) => Ok(f64::from(*v)),
        Some(Variant::Int16(v)) => Ok(f64::from(*v)),
        Some(_) => Err(StatusCode::BadTypeMismatch),
        None => Err(StatusCode::BadArgumentsMissing),
    }
}

/// The string argument at `index`; a missing, null or non-string argument is the caller's error.
fn string_arg(args: &[Variant], index: usize) -> Result<String, StatusCode> {
    match args.get(index) {
        Some(Variant::String(s)) => s.value().clone().ok_or(StatusCode::BadInvalidArgument),
        Some(_) => Err(StatusCode::BadTypeMismatch),
        None => Err(StatusCode::BadArgumentsMissing),
    }
}

/// How the controller's refusals read in OPC UA status codes (the text goes to the log).
pub fn status_of(error: &ApiError) -> StatusCode {
    match error {
        ApiError::Forbidden(_) => StatusCode::BadUserAccessDenied,
        ApiError::UnknownRun(_) | ApiError::UnknownInterlock(_) => StatusCode::BadNotFound,
        ApiError::BadArgument(_) => StatusCode::BadInvalidArgument,
        ApiError::InvalidState(_)
        | ApiError::EStopLatched
        | ApiError::Interlocked(_)
        | ApiError::ProposalReused { .. } => StatusCode::BadInvalidState,
        ApiError::OverQuota(_) => StatusCode::BadTooManyOperations,
        ApiError::Journal(_) => StatusCode::BadResourceUnavailable,
        ApiError::Unavailable => StatusCode::BadServerHalted,
    }
}

/// Calls `method` as `who`. Errors are OPC UA status codes; a refused submission is not an error but a
/// `rejected` state with the findings in the reply, so the client can show them.
pub async fn call(
    api: &ControllerHandle,
    who: Principal,
    method: LabMethod,
    args: &[Variant],
) -> Result<Vec<Variant>, StatusCode> {
    if !method.allowed(who.role) {
        tracing::info!(user = %who.name, method = method.name(), "opcua: method refused for this role");
        return Err(StatusCode::BadUserAccessDenied);
    }
    let user = who.name.clone();
    let state = |r: Result<labctl_core::api::RunState, ApiError>| match r {
        Ok(state) => Ok(vec![Variant::from(state.as_str())]),
        Err(e) => {
            tracing::info!(%user, method = method.name(), error = %e, "opcua: method refused");
            Err(status_of(&e))
        }
    };
    match method {
        LabMethod::SubmitProtocol => {
            let protocol = string_arg(args, 0)?;
            let reply = api.submit(protocol.into_bytes(), who).await;
            let run_id = reply.run_id.clone().unwrap_or_default();
            let run_state = match (reply.accepted, reply.state) {
                (true, Some(s)) => s.as_str(),
                _ => "rejected",
            };
            let json = serde_json::to_string(&reply).unwrap_or_default();
            Ok(vec![
                Variant::from(run_id),
                Variant::from(run_state),
                Variant::from(json),
            ])
        }
        LabMethod::ApproveRun => {
            let run_id = string_arg(args, 0)?;
            state(api.approve(&run_id, who).await)
        }
        LabMethod::RejectRun => {
            let run_id = string_arg(args, 0)?;
            let reason = string_arg(args, 1)?;
            state(api.reject(&run_id, &reason, who).await)
        }
        LabMethod::PauseRun | LabMethod::ResumeRun | LabMethod::AbortRun => {
            let run_id = string_arg(args, 0)?;
            let control = match method {
                LabMethod::PauseRun => Control::Pause,
                LabMethod::ResumeRun => Control::Resume,
                _ => Control::Abort,
            };
            state(api.control(&run_id, control, who).await)
        }
        LabMethod::OverrideInterlock | LabMethod::WithdrawInterlockOverride => {
            let interlock = string_arg(args, 0)?;
            let result = if method == LabMethod::OverrideInterlock {
                let seconds = number_arg(args, 1)?;
                let reason = string_arg(args, 2)?;
                let duration = std::time::Duration::try_from_secs_f64(seconds)
                    .map_err(|_| StatusCode::BadOutOfRange)?;
                api.override_interlock(&interlock, duration, &reason, who)
                    .await
            } else {
                api.withdraw_override(&interlock, who).await
            };
            match result {
                Ok(()) => Ok(Vec::new()),
                Err(e) => {
                    tracing::info!(%user, method = method.name(), error = %e, "opcua: method refused");
                    Err(status_of(&e))
                }
            }
        }
        LabMethod::EmergencyStop | LabMethod::AcknowledgeEmergencyStop => {
            let result = if method == LabMethod::EmergencyStop {
                api.emergency_stop(who).await
            } else {
                api.acknowledge_emergency_stop(who).await
            };
            match result {
                Ok(()) => Ok(Vec::new()),
                Err(e) => {
                    tracing::info!(%user, method = method.name(), error = %e, "opcua: method refused");
                    Err(status_of(&e))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip_through_their_node_paths() {
        for m in LabMethod::ALL {
            assert_eq!(
                LabMethod::from_node_path(&format!("Lab/{}", m.name())),
                Some(m)
            );
        }
        assert_eq!(LabMethod::from_node_path("Lab/Devices"), None);
        assert_eq!(LabMethod::from_node_path("SubmitProtocol"), None);
    }

    /// The methods follow the role table: planners submit, control their own runs and may stop the lab;
    /// only technicians approve and release the stop; observers call nothing.
    #[test]
    fn methods_follow_the_role_table() {
        for m in LabMethod::ALL {
            assert!(!m.allowed(Role::Observer), "{m:?}");
            assert!(m.allowed(Role::Technician), "{m:?}");
            let planner = matches!(
                m,
                LabMethod::SubmitProtocol
                    | LabMethod::PauseRun
                    | LabMethod::ResumeRun
                    | LabMethod::AbortRun
                    | LabMethod::EmergencyStop
            );
            assert_eq!(m.allowed(Role::Planner), planner, "{m:?}");
            assert_eq!(m.allowed(Role::Rig), planner, "{m:?}");
        }
    }

    #[test]
    fn arguments_of_the_wrong_kind_are_refused_by_status() {
        assert_eq!(
            string_arg(&[Variant::from(3i32)], 0),
            Err(StatusCode::BadTypeMismatch)
        );
        assert_eq!(string_arg(&[], 0), Err(StatusCode::BadArgumentsMissing));
        assert_eq!(
            string_arg(&[Variant::from("run-1")], 0),
            Ok("run-1".to_owned())
        );
    }
}
