//! The browser console end to end, in a real headless Chromium driven over WebDriver (Python selenium, in
//! tests/fixtures/web_console_browser.py) against `labctl run --sim --web 127.0.0.1:0`: a wrong password
//! refused; alice sees the seven instruments live; a proposal a planner submitted over MQTT (`labctl
//! submit`) approved and run to its results plots, its downloads equal to `labctl runs export`; an
//! observer's approve refused by the core; the emergency stop pressed by alice and seen by a second session
//! (an observer, phone-sized), acknowledged; a request without the CSRF token refused; the log filtered;
//! the controller killed (the page greys out) and started again (the page recovers by itself).
//!
//! Needs LABCTL_TEST_PYTHON (a Python with `selenium`) and Debian's `chromium` and `chromium-driver`
//! (scripts/test installs them): without them the test fails and says so. Screenshots are kept in
//! target/web-screenshots/.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BROWSER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/web_console_browser.py"
);

/// Kills the controller when the test ends, passed or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn labctl_bin() -> String {
    std::env::var("LABCTL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_labctl").to_owned())
}

/// Starts the sim lab with the console on `web` and returns it with its console URL and MQTT URL.
fn start(data_dir: &Path, web: &str) -> (Running, String, String) {
    let mut child = Command::new(labctl_bin())
        .args([
            "run",
            "--sim",
            "--warp",
            "20",
            "--no-opcua",
            "--mqtt-port",
            "0",
        ])
        .args(["--command-port", "127.0.0.1:0", "--web", web, "--data-dir"])
        .arg(data_dir)
        .env("LABCTL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn labctl");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut web, mut mqtt) = (None, None);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("web: ") {
                web = Some(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("mqtt: ") {
                mqtt = rest
                    .split_whitespace()
                    .next()
                    .map(|a| format!("mqtt://{a}"));
            }
            if let (Some(w), Some(m)) = (&web, &mqtt) {
                let _ = tx.send((w.clone(), m.clone()));
                web = None;
            }
        }
    });
    let (web, mqtt) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("labctl printed its console and MQTT addresses within 60 s");
    (running, web, mqtt)
}

#[test]
fn technicians_use_the_console_in_a_real_browser() {
    let python = std::env::var("LABCTL_TEST_PYTHON").expect(
        "LABCTL_TEST_PYTHON is not set: a Python with selenium (`pip install selenium`); scripts/test makes \
         .venv with it",
    );
    for (path, package) in [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
    ] {
        let given = if package == "chromium" {
            std::env::var("LABCTL_TEST_CHROMIUM").ok()
        } else {
            std::env::var("LABCTL_TEST_CHROMEDRIVER").ok()
        };
        let path = given.unwrap_or_else(|| path.to_owned());
        assert!(
            Path::new(&path).exists(),
            "{path} is missing: install Debian's {package} (scripts/test does)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (first, url, mqtt) = start(dir.path(), "127.0.0.1:0");
    let shots: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("web-screenshots");
    let mut browser = Command::new(&python)
        .arg(BROWSER)
        .args([&url, &labctl_bin(), &mqtt])
        .arg(dir.path())
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the browser script with LABCTL_TEST_PYTHON");
    let mut to_browser = browser.stdin.take().unwrap();
    let from_browser = BufReader::new(browser.stdout.take().unwrap());
    let mut first = Some(first);
    let mut second = None;
    let mut transcript = Vec::new();
    for line in from_browser.lines().map_while(Result::ok) {
        println!("{line}");
        match line.as_str() {
            "KILL" => {
                drop(first.take());
                writeln!(to_browser, "killed").unwrap();
            }
            "RESTART" => {
                // The same address: the page finds the controller where it was.
                let addr = url
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned();
                second = Some(start(dir.path(), &addr).0);
                writeln!(to_browser, "restarted").unwrap();
            }
            _ => {}
        }
        transcript.push(line);
    }
    let status = browser.wait().unwrap();
    drop(second);
    assert!(
        status.success() && transcript.last().map(String::as_str) == Some("OK"),
        "the browser run failed (screenshots in {}):\n{}",
        shots.display(),
        transcript.join("\n")
    );
}
