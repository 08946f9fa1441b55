//! The OPC UA face's `Lab` methods alone, in front of a scripted fake controller
//! (`labctl_core::fake_core`): what reaches the core and as whom, which calls the face refuses before the
//! core hears of them, and how the core's answers become outputs and status codes.

use labctl_core::api::{ApiError, Control, Face, Principal, RunState, SubmitReply};
use labctl_core::fake_core::{Call, FakeCore, Script};
use labctl_opcua::methods::{LabMethod, call};
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use opcua::types::{StatusCode, Variant};

/// Knows one run, `run-1`, which any request moves to `queued`; accepts every valid proposal.
struct OneRun;

impl Script for OneRun {
    fn submit(&mut self, report: &labctl_protocols::Report, _: &Principal) -> SubmitReply {
        let protocol = report.protocol.as_ref().expect("a valid proposal");
        SubmitReply {
            accepted: true,
            proposal_id: Some(protocol.metadata.proposal_id.clone()),
            run_id: Some("run-1".into()),
            state: Some(RunState::AwaitingApproval),
            duplicate: false,
            findings: Vec::new(),
            estimated_duration_s: Some(3.0),
            approval_required_because: vec!["always_ask".into()],
            planner_id: Some(protocol.metadata.planner.id.clone()),
            error: None,
        }
    }

    fn run_request(&mut self, run_id: &str, _: &Principal) -> Result<RunState, ApiError> {
        match run_id {
            "run-1" => Ok(RunState::Queued),
            other => Err(ApiError::UnknownRun(other.to_owned())),
        }
    }
}

fn alice() -> Principal {
    Principal::new("alice", Role::Technician, Face::Opcua)
}

fn planner() -> Principal {
    Principal::new("planner-bo", Role::Planner, Face::Opcua)
}

fn text(s: &str) -> Variant {
    Variant::from(s)
}

const PROPOSAL: &str = r#"{"version": 1,
    "metadata": {"name": "w", "proposal_id": "ua-1", "planner": {"id": "planner-bo"}},
    "steps": [{"type": "measure", "instrument": "balance", "action": "weigh", "params": {},
               "result": "m"}]}"#;

#[tokio::test]
async fn lab_methods_reach_the_core_as_their_caller_and_its_answers_become_outputs_and_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let core = FakeCore::start(Lab::sim(), dir.path(), OneRun).unwrap();
    let api = &core.handle;

    // A submission: the core's reply in the outputs (run id, state, the reply as JSON).
    let out = call(api, planner(), LabMethod::SubmitProtocol, &[text(PROPOSAL)])
        .await
        .unwrap();
    assert_eq!(out[0], text("run-1"));
    assert_eq!(out[1], text("awaiting_approval"));
    let Variant::String(json) = &out[2] else {
        panic!("{:?}", out[2])
    };
    let reply: serde_json::Value = serde_json::from_str(json.as_ref()).unwrap();
    assert_eq!(reply["approval_required_because"][0], "always_ask");

    // A technician's approval reaches the core as her; the state it answers is the output.
    let out = call(api, alice(), LabMethod::ApproveRun, &[text("run-1")])
        .await
        .unwrap();
    assert_eq!(out, [text("queued")]);
    // The core's refusal becomes the status the face's one table gives it.
    let unknown = call(api, alice(), LabMethod::AbortRun, &[text("run-9")]).await;
    assert_eq!(unknown, Err(StatusCode::BadNotFound));
    // A planner may not approve: refused by the face under the role table, the core never asked.
    let refused = call(api, planner(), LabMethod::ApproveRun, &[text("run-1")]).await;
    assert_eq!(refused, Err(StatusCode::BadUserAccessDenied));
    // A missing argument is refused before the core too.
    let missing = call(api, alice(), LabMethod::RejectRun, &[text("run-1")]).await;
    assert!(missing.is_err(), "{missing:?}");

    assert_eq!(
        core.calls(),
        [
            Call::Submit {
                proposal_id: Some("ua-1".into()),
                principal: planner(),
            },
            Call::Approve {
                run_id: "run-1".into(),
                principal: alice(),
            },
            Call::Control {
                run_id: "run-9".into(),
                control: Control::Abort,
                principal: alice(),
            },
        ]
    );
}

#[tokio::test]
async fn the_stop_and_its_release_go_to_the_core_which_holds_the_latch() {
    let dir = tempfile::tempdir().unwrap();
    let core = FakeCore::start(Lab::sim(), dir.path(), OneRun).unwrap();
    let api = &core.handle;
    call(api, planner(), LabMethod::EmergencyStop, &[])
        .await
        .unwrap();
    assert!(api.estop_latched());
    // Only a technician releases it: the face refuses a planner outright.
    let refused = call(api, planner(), LabMethod::AcknowledgeEmergencyStop, &[]).await;
    assert_eq!(refused, Err(StatusCode::BadUserAccessDenied));
    assert!(api.estop_latched());
    call(api, alice(), LabMethod::AcknowledgeEmergencyStop, &[])
        .await
        .unwrap();
    assert!(!api.estop_latched());
    assert_eq!(
        core.calls(),
        [
            Call::EmergencyStop {
                principal: planner()
            },
            Call::AcknowledgeEmergencyStop { principal: alice() },
        ]
    );
}

/// Every role against every `Lab` method: the core hears exactly the calls the one role table allows, and
/// the face answers the others `BadUserAccessDenied` without asking it.
#[tokio::test]
async fn each_role_reaches_the_core_with_exactly_the_methods_the_role_table_allows() {
    for role in Role::ALL {
        for method in LabMethod::ALL {
            let dir = tempfile::tempdir().unwrap();
            let core = FakeCore::start(Lab::sim(), dir.path(), OneRun).unwrap();
            let args: Vec<Variant> = match method {
                LabMethod::SubmitProtocol => vec![text(PROPOSAL)],
                LabMethod::RejectRun => vec![text("run-1"), text("not today")],
                LabMethod::EmergencyStop | LabMethod::AcknowledgeEmergencyStop => Vec::new(),
                LabMethod::OverrideInterlock => vec![
                    text("pump-alarm"),
                    Variant::Double(600.0),
                    text("sensor checked by hand"),
                ],
                LabMethod::WithdrawInterlockOverride => vec![text("pump-alarm")],
                _ => vec![text("run-1")],
            };
            let who = Principal::new("someone", role, Face::Opcua);
            let result = call(&core.handle, who, method, &args).await;
            let allowed = labctl_core::policy::allows(role, method.permission());
            if allowed {
                assert_ne!(
                    result,
                    Err(StatusCode::BadUserAccessDenied),
                    "{role} {}",
                    method.name()
                );
                assert_eq!(
                    core.calls().len(),
                    1,
                    "{role} {}: {:?}",
                    method.name(),
                    core.calls()
                );
            } else {
                assert_eq!(
                    result,
                    Err(StatusCode::BadUserAccessDenied),
                    "{role} {}",
                    method.name()
                );
                assert!(
                    core.calls().is_empty(),
                    "{role} {}: {:?}",
                    method.name(),
                    core.calls()
                );
            }
        }
    }
}
