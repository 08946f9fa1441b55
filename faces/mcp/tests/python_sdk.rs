//! The official MCP Python SDK (`mcp` on PyPI) as the independent client, over streamable HTTP, against a
//! real controller on the simulated lab: tools with their schemas and annotations, the resources and the
//! prompt, a bad protocol's findings with their paths, the dye mix followed to completion and its results
//! from a cursor, a proposal beyond the auto-approve envelope waiting for a technician, pause, resume and
//! abort of the agent's own run, another user's run refused, a wrong password refused. Then the journal's
//! provenance of the agent's run.
//!
//! Needs LABCTL_TEST_PYTHON, a Python with `mcp` (scripts/test installs it): without it the test fails.

mod common;

use std::time::Duration;

use common::{DYE_MIX, Rig, hold, technician};
use labctl_core::api::RunState;
use labctl_core::journal::Record;

const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_agent.py");

fn python() -> String {
    let python = std::env::var("LABCTL_TEST_PYTHON").expect(
        "LABCTL_TEST_PYTHON is not set: a Python with the official MCP SDK (`pip install mcp`); scripts/test \
         makes .venv with it",
    );
    let probe = std::process::Command::new(&python)
        .args(["-c", "import mcp.client.streamable_http"])
        .output()
        .expect("LABCTL_TEST_PYTHON runs");
    assert!(
        probe.status.success(),
        "{python} has no MCP SDK (`{python} -m pip install mcp`): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_drives_the_simulated_lab_over_streamable_http() {
    let python = python();
    let rig = Rig::start().await;
    // Another user's run, waiting for approval: the agent may not abort it.
    let others = rig
        .api
        .submit(hold("alice-hold-1", 4000), technician())
        .await;
    assert_eq!(others.state, Some(RunState::AwaitingApproval), "{others:?}");
    let others = others.run_id.unwrap();
    // The technician approves what the agent submits beyond the envelope, as soon as it is on disk.
    let mut records = rig.api.events();
    let api = rig.api.clone();
    let technician_at_work = tokio::spawn(async move {
        while let Ok(record) = records.recv().await {
            if let Record::RunCreated(run) = &*record
                && run.state == RunState::AwaitingApproval
                && run.submitted_by == "planner-bo"
            {
                api.approve(&run.run_id, technician()).await.unwrap();
            }
        }
    });
    let agent = tokio::process::Command::new(&python)
        .args([
            AGENT,
            &rig.mcp.url(),
            "planner-bo",
            "planner-dev",
            DYE_MIX,
            &others,
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), agent)
        .await
        .expect("the agent finishes within 300 s")
        .expect("the agent runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the agent failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("the agent's report")).unwrap();
    assert_eq!(seen["wrong_password_refused"], true);
    assert!(
        seen["others_refusal"]
            .as_str()
            .unwrap()
            .contains("belongs to alice"),
        "{seen}"
    );

    // Provenance: the face, the MCP client's own name and version, the agent's declared model.
    let run_id = seen["dye_run"].as_str().unwrap();
    let record = rig
        .api
        .run_record(run_id)
        .await
        .expect("the dye run in the journal");
    assert_eq!(record.submitted_by, "planner-bo");
    let submitted = record
        .events
        .iter()
        .find(|e| e.kind == "submitted")
        .expect("a submitted event");
    assert_eq!(submitted.detail["via"], "mcp", "{:?}", submitted.detail);
    assert_eq!(submitted.detail["client"]["name"], "labctl-test-agent");
    assert_eq!(submitted.detail["client"]["version"], "1.2.3");
    assert_eq!(submitted.detail["client"]["agent_model"], "test-model-1");
    assert!(submitted.actor.as_deref().unwrap().contains("via mcp"));
    // The operator's consent: journaled with the run, bound to its exact protocol, by the agent's user
    // over MCP; and no approval: the approval is the technician's, recorded apart.
    let consent_run = seen["consent_run"].as_str().unwrap();
    // The test's technician approves it as soon as it is on disk: wait for that decision.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let record = loop {
        let record = rig
            .api
            .run_record(consent_run)
            .await
            .expect("the consented run in the journal");
        let approved = record.events.iter().any(|e| {
            e.kind == "approval" && e.actor.as_deref().is_some_and(|a| a.starts_with("alice"))
        });
        if approved || tokio::time::Instant::now() > deadline {
            break record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let consent = record
        .events
        .iter()
        .find(|e| e.kind == "operator_consent")
        .expect("an operator_consent event");
    assert_eq!(
        consent.detail["protocol_sha256"], record.protocol_sha256,
        "the consent names the run's exact protocol"
    );
    assert!(
        consent.actor.as_deref().unwrap().starts_with("planner-bo"),
        "{consent:?}"
    );
    assert!(
        seen["consent_question"]
            .as_str()
            .unwrap()
            .contains(&record.protocol_sha256),
        "the operator was shown the digest it consented to: {seen}"
    );
    let approvals: Vec<_> = record
        .events
        .iter()
        .filter(|e| e.kind == "approval")
        .collect();
    assert_eq!(
        approvals.first().map(|e| &e.detail["decision"]),
        Some(&serde_json::json!("awaiting_approval")),
        "the consent approved nothing: {approvals:?}"
    );
    assert!(
        approvals
            .iter()
            .any(|e| e.actor.as_deref().is_some_and(|a| a.starts_with("alice"))),
        "the technician approved it: {approvals:?}"
    );
    // A declined submission never reached the lab.
    assert!(
        seen["declined"]
            .as_str()
            .unwrap()
            .contains("nothing was submitted"),
        "{seen}"
    );
    assert!(
        rig.api
            .runs()
            .await
            .iter()
            .all(|r| r.proposal_id != "mcp-consent-no"),
        "the declined proposal became a run"
    );
    // The other user's run is untouched.
    assert_eq!(
        rig.api.run(&others).await.unwrap().state,
        RunState::AwaitingApproval
    );
    technician_at_work.abort();
    rig.stop().await;
}
