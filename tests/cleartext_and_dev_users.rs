//! `labctl run` refuses what would put passwords on the network in clear text or open real instruments
//! with the documented development passwords: real process, real files, exit codes and messages.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn labctl_run(args: &[&str], data_dir: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .arg("run")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("LABCTL_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A refusal exits at once; one that was not refused would serve until killed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "labctl run {args:?} was not refused within 60 s; it said: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn refused(out: &Output, expect: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(expect), "expected {expect:?} in: {stderr}");
}

#[test]
fn the_simulated_lab_never_listens_in_clear_text_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let sim = ["--sim", "--no-opcua", "--mqtt-port", "0"];
    let out = labctl_run(
        &[&sim[..], &["--command-port", "0.0.0.0:0"]].concat(),
        dir.path(),
    );
    refused(&out, "the TCP command port on 0.0.0.0");
    refused(&out, "allow_cleartext_on_network");
}

#[test]
fn mcp_over_http_never_listens_in_clear_text_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = labctl_run(
        &[
            "--sim",
            "--no-opcua",
            "--mqtt-port",
            "0",
            "--command-port",
            "127.0.0.1:0",
            "--mcp",
            "0.0.0.0:0",
        ],
        dir.path(),
    );
    refused(&out, "MCP over HTTP on 0.0.0.0");
    refused(&out, "allow_cleartext_on_network");
}

#[test]
fn a_lab_file_copied_from_the_simulated_lab_is_refused_on_real_instruments() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sim-lab.toml");
    let out = labctl_run(
        &[
            "--config",
            lab.to_str().unwrap(),
            "--no-opcua",
            "--mqtt-port",
            "0",
        ],
        &dir.path().join("data"),
    );
    refused(&out, "development password");
    for user in ["alice", "planner-bo", "watcher", "rig-1"] {
        refused(&out, user);
    }
    // Nothing was started: not even the journal.
    assert!(!dir.path().join("data/journal.sqlite").exists());
}

#[test]
fn an_embedded_broker_on_the_network_needs_the_lab_files_consent() {
    let dir = tempfile::tempdir().unwrap();
    let sim = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sim-lab.toml"),
    )
    .unwrap();
    let lab = sim.replace("listen = \"127.0.0.1:1883\"", "listen = \"0.0.0.0:0\"");
    assert_ne!(
        lab, sim,
        "examples/sim-lab.toml has no embedded broker listen address to change"
    );
    let path = dir.path().join("lab.toml");
    std::fs::write(&path, &lab).unwrap();
    let out = labctl_run(
        &[
            "--config",
            path.to_str().unwrap(),
            "--simulated-instruments",
            "--no-opcua",
            "--command-port",
            "127.0.0.1:0",
        ],
        &dir.path().join("data"),
    );
    refused(&out, "the embedded MQTT broker on 0.0.0.0");
}
