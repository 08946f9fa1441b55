//! `labctl mcp` as a desktop agent uses it: the official MCP Python SDK starts it as its stdio server, and it
//! bridges to a running `labctl run --sim --mcp 127.0.0.1:0`; real processes end to end. A proposal beyond
//! the auto-approval waits until a technician approves it over MQTT (paho-mqtt on the embedded broker), and
//! the agent follows it. A wrong password fails the agent's `initialize` with the refusal.
//!
//! Needs LABCTL_TEST_PYTHON, a Python with `mcp` (scripts/test installs it): without it the test fails.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/mcp_stdio_agent.py"
);

/// Kills the controller when the test ends, passed or not.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_agent_on_the_python_sdk_runs_labctl_mcp_over_stdio() {
    let python = std::env::var("LABCTL_TEST_PYTHON").expect(
        "LABCTL_TEST_PYTHON is not set: a Python with the official MCP SDK (`pip install mcp`); scripts/test \
         makes .venv with it",
    );
    let dir = tempfile::tempdir().unwrap();
    // LABCTL_BIN when set (an installed build, or one a shared target directory cannot overwrite), else
    // the one cargo built for this test.
    let labctl_bin =
        std::env::var("LABCTL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_labctl").to_owned());
    let labctl = labctl_bin.as_str();
    let mut child = Command::new(labctl)
        .args([
            "run",
            "--sim",
            "--warp",
            "20",
            "--no-opcua",
            "--mqtt-port",
            "0",
            "--command-port",
            "127.0.0.1:0",
            "--mcp",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("LABCTL_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut running = Running(child);
    let said = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    // The endpoint line, read on a thread so the deadline holds even if the controller says nothing.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut url, mut broker) = (None, None);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("mcp: ") {
                url = Some(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("mqtt: ") {
                broker = rest.split_whitespace().next().map(str::to_owned);
            }
            if let (Some(u), Some(b)) = (&url, &broker) {
                let _ = tx.send((u.clone(), b.clone()));
                url = None;
            }
        }
    });
    let (url, broker) = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(found) => found,
        Err(e) => {
            let _ = running.0.kill();
            panic!(
                "labctl run ({labctl}) did not print its MCP endpoint and MQTT broker within 60 s ({e}); it said: {}",
                said.join().unwrap_or_default()
            )
        }
    };
    let started = Instant::now();
    let mut agent = Command::new(&python)
        .args([AGENT, labctl, &url, &broker])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the agent runs");
    // The agent's own waits have deadlines; this one bounds the whole conversation.
    while agent.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(180) {
            let _ = agent.kill();
            panic!("the agent did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = agent.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the agent failed after {:?}: {}\n{stdout}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("the agent's report")).unwrap();
    assert_eq!(seen["tools"], 11, "{seen}");
    assert_eq!(seen["wrong_password_refused"], true, "{seen}");
    assert!(
        seen["approved_by"]
            .as_str()
            .is_some_and(|a| a.starts_with("alice") && a.contains("via mqtt")),
        "{seen}"
    );
}
