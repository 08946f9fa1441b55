//! `labctl console` end to end, as a technician uses it: the real `labctl run --sim` binary with its
//! embedded broker, a planner's proposal that needs approval (longer than the sim lab's auto-approve limit),
//! and `labctl console` in a real 80x24 terminal (tmux): the technician opens the approval queue, approves
//! the run with two keys, and watches it complete; the journal records the approval under her name.
//!
//! Needs tmux (scripts/test installs it); without it the test fails.

#![cfg(unix)]

mod common;

use std::process::Command;
use std::time::Duration;

use labctl_hil_tests::terminal::Tmux;

#[test]
fn a_technician_approves_a_pending_run_from_the_console_and_sees_it_complete() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (labctl, port) = common::start_labctl_sim(&data, "200", 0);
    let url = format!("mqtt://127.0.0.1:{port}");

    // The planner proposes a 3700 s wait: over the sim lab's 3600 s auto-approve limit, so it waits for a
    // technician (18.5 s at warp 200).
    let protocol = dir.path().join("long-wait.json");
    std::fs::write(
        &protocol,
        r#"{"version": 1,
            "metadata": {"name": "long wait", "proposal_id": "console-e2e-1", "planner": {"id": "planner-bo"}},
            "steps": [{"type": "wait", "id": "soak", "duration_s": 3700}]}"#,
    )
    .unwrap();
    let submitted = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .arg("submit")
        .arg(&protocol)
        .args(["--mqtt", &url])
        .env("LABCTL_MQTT_USER", "planner-bo")
        .env("LABCTL_MQTT_PASSWORD", "planner-dev")
        .output()
        .expect("run labctl submit");
    let reply: serde_json::Value = serde_json::from_slice(&submitted.stdout)
        .unwrap_or_else(|e| panic!("submit printed no JSON ({e}): {submitted:?}"));
    assert_eq!(reply["state"], "awaiting_approval", "{reply}");
    let run_id = reply["run_id"].as_str().unwrap().to_owned();

    // The technician's password from a file, never on a command line.
    let password_file = dir.path().join("alice.password");
    std::fs::write(&password_file, "technician-dev\n").unwrap();
    let tmux = Tmux::new("labctl-console-test");
    let console = format!(
        "env LABCTL_MQTT_USER=alice LABCTL_MQTT_PASSWORD_FILE={} {} console --mqtt {url}",
        password_file.display(),
        env!("CARGO_BIN_EXE_labctl"),
    );
    tmux.open(&console);

    let wait = Duration::from_secs(20);
    tmux.wait_for(&["broker ok", "controller online", "Approvals (1)"], wait);
    tmux.send("3");
    let screen = tmux.wait_for(&[&run_id, "long wait  proposed by planner-bo"], wait);
    assert!(screen.contains("needs approval:"), "{screen}");
    assert!(screen.contains("wait [soak] 3700 s"), "{screen}");
    tmux.send("a");
    tmux.wait_for(&[&format!("Approve {run_id} as alice?")], wait);
    tmux.send("y");
    tmux.wait_for(&[&format!("approve {run_id} accepted")], wait);

    tmux.send("2");
    let screen = tmux.wait_for(&[&run_id, "completed"], Duration::from_secs(90));
    assert!(!screen.contains("Approvals (1)"), "{screen}");
    // The state transitions are in the event log.
    tmux.send("5");
    tmux.wait_for(&["running -> completed"], wait);

    // The controller (and its embedded broker) goes away and comes back on the same port: the console
    // says so and reconnects by itself.
    drop(labctl);
    tmux.wait_for(&["BROKER DOWN, retrying"], wait);
    let (_labctl, _) = common::start_labctl_sim(&data, "200", port);
    tmux.wait_for(&["broker ok", "controller online"], Duration::from_secs(40));

    tmux.send("q");
    tmux.wait_until_exited(wait);

    // The approval is journaled under the technician's name.
    let shown = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args(["runs", "show", &run_id, "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    let detail: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let approved_by_alice = detail["events"].as_array().is_some_and(|events| {
        events.iter().any(|e| {
            e["kind"] == "approval" && e["actor"].as_str().is_some_and(|a| a.starts_with("alice "))
        })
    });
    assert!(approved_by_alice, "{detail}");
}
