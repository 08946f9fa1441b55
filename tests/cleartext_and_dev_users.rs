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

/// The simulated lab's file with `text` added to its `[interfaces]`, written to `dir`.
fn sim_lab_with(dir: &Path, text: &str) -> std::path::PathBuf {
    let sim = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sim-lab.toml"),
    )
    .unwrap();
    let path = dir.join("lab.toml");
    std::fs::write(&path, format!("{sim}\n{text}\n")).unwrap();
    path
}

/// MCP from the lab file (`[interfaces.mcp]`): served where it says, and held to the same clear-text rule as
/// the command line's `--mcp`.
#[test]
fn the_lab_file_turns_mcp_on_and_its_address_obeys_the_clear_text_rule() {
    let dir = tempfile::tempdir().unwrap();
    let args = |lab: &Path| {
        vec![
            "--config".to_owned(),
            lab.to_str().unwrap().to_owned(),
            "--simulated-instruments".into(),
            "--no-opcua".into(),
            "--no-web".into(),
            "--mqtt-port".into(),
            "0".into(),
            "--command-port".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let on_network = sim_lab_with(dir.path(), "[interfaces.mcp]\nlisten = \"0.0.0.0:0\"");
    let arg_refs = args(&on_network);
    let out = labctl_run(
        &arg_refs.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("refused"),
    );
    refused(&out, "MCP over HTTP on 0.0.0.0");

    let loopback = sim_lab_with(dir.path(), "[interfaces.mcp]\nlisten = \"127.0.0.1:0\"");
    let mut child = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .arg("run")
        .args(args(&loopback))
        .arg("--data-dir")
        .arg(dir.path().join("served"))
        .env("LABCTL_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(url) = line.trim().strip_prefix("mcp: ") {
                let _ = tx.send(url.to_owned());
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    let url = url.expect("labctl run announced MCP from the lab file");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(url.ends_with("/mcp"), "{url}");
    assert!(!url.ends_with(":0/mcp"), "the free port it picked: {url}");
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
