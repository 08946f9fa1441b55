//! The closed loop through MCP: the real `labctl run --sim` binary serving MCP over streamable HTTP, and the
//! Python reference planner (`examples/planner.py --mcp URL`, on the official MCP Python SDK) matching the
//! target spectrum of tests/planner.rs (300:150:450, seed 1) with its threshold (0.02 AU) and budget (30
//! experiments), through `submit_protocol`, `wait_for_run` and `run_results` only; every run in the journal
//! came over MCP from the planner.
//!
//! Needs LABCTL_TEST_PYTHON, a Python with `mcp` (scripts/test installs it): without it the test fails.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PLANNER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/planner.py");

#[test]
fn the_python_planner_matches_the_target_spectrum_through_mcp_within_the_mqtt_budget() {
    let python = common::python_with("mcp.client.streamable_http", "mcp");
    let dir = tempfile::tempdir().unwrap();
    // Warp 200 as tests/planner.rs: step timeouts keep a real-time floor for the wire.
    let mut child = common::labctl_run_sim_command(dir.path(), "200")
        .args(["--mcp", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn labctl");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let labctl = common::Labctl(child);
    let said = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    // Read on a thread (to the end, so labctl never blocks on a full pipe) for the deadline to hold.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.trim().strip_prefix("mcp: ") {
                let _ = tx.send(url.to_owned());
            }
        }
    });
    let url = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => url,
        Err(e) => {
            drop(labctl);
            panic!(
                "labctl run did not print its MCP endpoint within 60 s ({e}); it said: {}",
                said.join().unwrap_or_default()
            )
        }
    };

    let (threshold, budget) = (0.02, 30);
    let started = Instant::now();
    let mut planner = Command::new(&python)
        .arg(PLANNER)
        .args([
            "--mcp",
            &url,
            "--json",
            "--seed",
            "1",
            "--per-experiment",
            "30",
        ])
        .args([
            "--target-red",
            "300",
            "--target-yellow",
            "150",
            "--target-blue",
            "450",
        ])
        .args([
            "--threshold",
            &threshold.to_string(),
            "--budget",
            &budget.to_string(),
        ])
        .env("LABCTL_MQTT_USER", "planner-bo")
        .env("LABCTL_MQTT_PASSWORD", "planner-dev")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the planner runs");
    // Each experiment has its own 30 s deadline in the planner; this one bounds the whole loop (31 runs,
    // the target's included, about 2 s each at warp 200).
    while planner.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            let _ = planner.kill();
            panic!("the planner did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = planner.wait_with_output().unwrap();
    drop(labctl);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let summary: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no summary from the planner ({}): {}\n{stdout}\nlabctl said: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                said.join().unwrap_or_default()
            )
        });
    assert_eq!(summary["transport"], "mcp", "{summary}");
    let experiments = summary["experiments"].as_u64().expect("experiments");
    let rmse = summary["rmse"].as_f64().expect("rmse");
    assert!(
        out.status.success() && summary["converged"] == true && rmse < threshold,
        "no convergence through MCP: best rmse {rmse:.4} AU after {experiments} experiments ({})",
        out.status
    );
    assert!(experiments <= budget, "{experiments} experiments");

    // Every experiment (and the target's vial) went through MCP, with the planner's client identity.
    let conn = labctl::journal::open_db(dir.path()).unwrap();
    let runs = labctl::journal::read::recent_runs(&conn, 1000).unwrap();
    assert_eq!(runs.len() as u64, experiments + 1, "runs in the journal");
    for run in &runs {
        let detail = labctl::journal::read::run_detail(&conn, &run.run_id)
            .unwrap()
            .expect("the run's detail");
        let submitted = detail
            .events
            .iter()
            .find(|e| e.kind == "submitted")
            .unwrap_or_else(|| panic!("{}: no submitted event", run.run_id));
        assert_eq!(submitted.detail["via"], "mcp", "{}", submitted.detail);
        assert_eq!(
            submitted.detail["client"]["name"], "labctl-reference-planner",
            "{}",
            submitted.detail
        );
    }
}
