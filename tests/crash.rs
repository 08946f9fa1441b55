//! Crash safety of the real binary: `labctl run --sim` is killed with SIGKILL in the middle of a run, then
//! started again on the same data directory. Every result it had reported must be in the journal, the run
//! must come back `interrupted` (never resumed), and every instrument must be confirmed safe before anything
//! new runs.

#![cfg(unix)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use labctl::journal;

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Where `start` writes the warnings and errors of the process on `data`, shown when an assertion fails.
fn log_path(data: &Path) -> std::path::PathBuf {
    data.with_extension("log")
}

/// Starts `labctl run --sim` and forwards its stdout lines; its stderr goes to `log_path(data)`.
fn start(data: &Path, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(data))
        .expect("open the log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args(["run", "--sim", "--warp", "20", "--data-dir"])
        .arg(data)
        .args(extra)
        .env("LABCTL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start labctl");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Collects stdout lines until `done` says stop, or fails after `limit`.
fn read_until(
    rx: &mpsc::Receiver<String>,
    limit: Duration,
    mut done: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let stop = done(&line);
            lines.push(line);
            if stop {
                return lines;
            }
        }
    }
    panic!("timed out; output so far: {lines:#?}");
}

#[test]
fn sigkill_mid_run_loses_no_reported_result_and_the_run_comes_back_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let protocol = repo("tests/fixtures/long-titration.json");
    let (mut child, rx) = start(&data, &["--submit", protocol.to_str().unwrap()]);
    let mut results = 0;
    let lines = read_until(&rx, Duration::from_secs(60), |l| {
        if l.starts_with("result ") {
            results += 1;
        }
        results >= 5
    });
    // Kill without warning, in the middle of the run.
    child.kill().unwrap();
    child.wait().unwrap();
    let reported: BTreeSet<(String, i64)> = lines
        .iter()
        .chain(rx.try_iter().collect::<Vec<_>>().iter())
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == "result").then_some(())?;
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect();
    assert!(reported.len() >= 5);
    let run_id = reported.iter().next().unwrap().0.clone();

    // Every result reported before the kill is in the journal.
    let conn = journal::open_db(&data).unwrap();
    let stored: BTreeSet<(String, i64)> = journal::read::results(&conn, &run_id, 0)
        .unwrap()
        .into_iter()
        .map(|r| (r.run_id, r.seq))
        .collect();
    let missing: Vec<_> = reported.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "reported but not journaled: {missing:?}"
    );
    let runs = journal::read::list_runs(&conn).unwrap();
    assert_eq!(
        runs[0].state, "running",
        "the killed process never got to say otherwise"
    );
    drop(conn);

    // Restart: the run is interrupted, never resumed; every instrument is confirmed safe.
    let (mut child, rx) = start(&data, &[]);
    read_until(&rx, Duration::from_secs(30), |l| l.starts_with("labctl "));
    let conn = journal::open_db(&data).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let confirmed = loop {
        let mut stmt = conn
            .prepare(
                "SELECT detail FROM events WHERE kind = 'instrument_safe'
                 AND seq > (SELECT MAX(seq) FROM events WHERE kind = 'controller_started')",
            )
            .unwrap();
        let details: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let ok: BTreeSet<String> = details
            .iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter(|v| v["confirmed"] == true)
            .filter_map(|v| v["instrument"].as_str().map(str::to_owned))
            .collect();
        if ok.len() == 7 || Instant::now() > deadline {
            break ok;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        confirmed.len(),
        7,
        "instruments confirmed safe after restart: {confirmed:?}; labctl's log:\n{}",
        std::fs::read_to_string(log_path(&data)).unwrap_or_default()
    );
    let detail = journal::read::run_detail(&conn, &run_id).unwrap().unwrap();
    assert_eq!(detail.summary.state, "interrupted");
    assert!(detail.events.iter().any(|e| e.kind == "interrupted"));
    let count_before = stored.len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        journal::read::results(&conn, &run_id, 0).unwrap().len(),
        count_before,
        "an interrupted run must not resume"
    );

    // A clean stop on SIGTERM.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "labctl exited with {status} on SIGTERM");
    let stopped: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM events WHERE kind = 'controller_stopped'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stopped, 1);
}
