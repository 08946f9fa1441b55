//! What the integration tests share: the controller on the lab's fake instruments (in process), and
//! `labctl run --sim` as a child process. Each test crate compiles this module for itself and uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use labctl::api::ControllerHandle;
use labctl::controller::{Controller, ControllerConfig, start};
use labctl::instruments::fake::{FakeInstrument, spawn_lab};
use labctl::instruments::{Connection, InstrumentHandle, TaskTiming};
use labctl::safety::EStop;
use labctl::world::TickConfig;
use labctl_clock::VirtualClock;
use labctl_protocols::Lab;

pub type Fakes = BTreeMap<String, FakeInstrument>;

/// The controller on fake instruments of `lab`, journalling into `dir`, with the fakes set up by `prepare`
/// before it starts (on a current-thread runtime, before any instrument task first runs). The clock runs
/// at 1000x (a 30 s wait takes 30 ms), the tick every 10 ms, each instrument is polled every 5 ms.
pub async fn controller_on_fakes(
    dir: &Path,
    lab: Lab,
    prepare: impl FnOnce(&Fakes),
) -> (Controller, Fakes, BTreeMap<String, InstrumentHandle>) {
    let estop = EStop::default();
    let timing = TaskTiming {
        poll: Duration::from_millis(5),
        reconnect: Duration::from_millis(20),
    };
    let (handles, fakes) = spawn_lab(&lab, &estop, timing);
    prepare(&fakes);
    let config = ControllerConfig {
        lab,
        lab_sha256: "test".into(),
        data_dir: dir.to_owned(),
        clock: VirtualClock::new(1000.0).unwrap(),
        // Each command's intent is fsynced before it goes out, in real time whatever the warp: a step is
        // given at least 1 s (a 120 s step is 120 ms at 1000x, less than one fsync on a busy CI disk).
        step_timeout_floor: Duration::from_secs(1),
        tick: TickConfig {
            period: Duration::from_millis(10),
            spin: Duration::ZERO,
            realtime_priority: None,
        },
        labware: None,
    };
    let controller = start(config, handles.clone(), estop).await.unwrap();
    (controller, fakes, handles)
}

/// Gives the hotplate's fake a plate temperature, for tests that read one back through a gateway.
pub fn plate_at_42_5(fakes: &Fakes) {
    fakes["hotplate"].log.lock().unwrap().values = vec![("plate_temperature_c", 42.5)];
}

/// Returns once every instrument is online in the published snapshot, so a client asking about them
/// sees them all; panics after `within`.
pub async fn wait_all_online(api: &ControllerHandle, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let snapshot = api.snapshot();
        if !snapshot.instruments.is_empty()
            && snapshot
                .instruments
                .iter()
                .all(|i| i.connection == Connection::Online)
        {
            return;
        }
        assert!(Instant::now() < deadline, "instruments never online");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A `labctl` child process, killed when dropped.
pub struct Labctl(pub Child);

impl Drop for Labctl {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `labctl run --sim --warp WARP --no-web --mqtt-port MQTT_PORT --command-port 127.0.0.1:0 --data-dir
/// DIR` (`MQTT_PORT` 0 picks a free one) and returns it with the embedded broker's port from its banner.
pub fn start_labctl_sim(data_dir: &Path, warp: &str, mqtt_port: u16) -> (Labctl, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args(["run", "--sim", "--warp", warp, "--no-web", "--mqtt-port"])
        .arg(mqtt_port.to_string())
        .args(["--command-port", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("LABCTL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn labctl");
    let stdout = child.stdout.take().unwrap();
    let labctl = Labctl(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("mqtt: ") {
                let port = rest
                    .split_whitespace()
                    .next()
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                let _ = tx.send(port);
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("labctl printed its MQTT port within 30 s")
        .expect("a port number");
    (labctl, port)
}

/// The base command line of `labctl run --sim` on `data_dir` for the process-level tests: warped time, a
/// free MQTT port and a free TCP command port, no OPC UA server and no browser console, warnings and errors
/// on standard error.
/// Callers add arguments and choose where standard output and standard error go.
pub fn labctl_run_sim_command(data_dir: &Path, warp: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_labctl"));
    command
        .args([
            "run",
            "--sim",
            "--warp",
            warp,
            "--mqtt-port",
            "0",
            "--no-web",
        ])
        .args(["--command-port", "127.0.0.1:0", "--no-opcua", "--data-dir"])
        .arg(data_dir)
        .env("LABCTL_LOG", "warn");
    command
}

/// A running `labctl run --sim` with the addresses it announced on standard output; killed when dropped.
pub struct SimProcess {
    pub labctl: Labctl,
    /// The embedded MQTT broker's port.
    pub mqtt_port: u16,
    /// The TCP command port's address.
    pub command_port: std::net::SocketAddr,
    /// Where its standard error goes (appended to by every start with the same log).
    pub log: std::path::PathBuf,
}

impl SimProcess {
    /// Kills the process with SIGKILL, without warning, and reaps it.
    pub fn sigkill(mut self) {
        self.labctl.0.kill().expect("SIGKILL labctl");
        self.labctl.0.wait().expect("reap labctl");
    }

    /// The last 15 lines the process (and earlier ones with the same log) wrote on standard error, without
    /// terminal colours: for assertion messages.
    pub fn log_tail(&self) -> String {
        let text = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Starts `labctl_run_sim_command(data_dir, warp)` with its standard error appended to `log`, and returns
/// once it has printed both its MQTT port and its command port (panics with the log after 60 s, or if it
/// exits first). Its standard output keeps being read, so it never blocks on a full pipe.
pub fn start_sim_process(data_dir: &Path, log: &Path, warp: &str) -> SimProcess {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the labctl log file");
    let mut child = labctl_run_sim_command(data_dir, warp)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("spawn labctl");
    let stdout = child.stdout.take().unwrap();
    let mut labctl = Labctl(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut mqtt, mut command) = (None, None);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("mqtt: ") {
                mqtt = rest
                    .split_whitespace()
                    .next()
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse::<u16>().ok());
            } else if let Some(rest) = line.strip_prefix("command port: tcp ") {
                command = rest.trim().parse::<std::net::SocketAddr>().ok();
            }
            if let (Some(m), Some(c)) = (mqtt, command) {
                let _ = tx.send((m, c));
                mqtt = None;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mqtt_port, command_port) = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ports) => break ports,
            Err(_) => {
                let log_text = || strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
                if let Some(status) = labctl.0.try_wait().expect("labctl's status") {
                    panic!(
                        "labctl run --sim on {} exited with {status} before announcing its MQTT and \
                         command ports; its log:\n{}",
                        data_dir.display(),
                        log_text()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "labctl run --sim on {} announced no MQTT and command port within 60 s; its log:\n{}",
                    data_dir.display(),
                    log_text()
                );
            }
        }
    };
    SimProcess {
        labctl,
        mqtt_port,
        command_port,
        log: log.to_owned(),
    }
}

/// `text` without ANSI escape sequences (the log's colours).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The dye-mix example (`protocols/examples/dye-mix.json`), on one line, with its own proposal id.
pub fn dye_mix_json(proposal_id: &str) -> String {
    protocol_file_json("protocols/examples/dye-mix.json", proposal_id)
}

/// A protocol file of the repository (`rel` from its root), on one line, with its own proposal id.
pub fn protocol_file_json(rel: &str, proposal_id: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["metadata"]["proposal_id"] = proposal_id.into();
    serde_json::to_string(&v).unwrap()
}

/// A blocking client of the TCP command port that only writes lines and reads lines (no labctl code).
pub struct ScpiClient {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
    /// Who is logged in, for messages.
    pub who: String,
}

/// What `RUN:STAT?` answers, split into its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStat {
    pub state: String,
    pub step: String,
    pub results: u64,
    pub reason: String,
    /// The whole reply, for messages.
    pub reply: String,
}

/// Run states no run leaves.
pub const ENDED_STATES: [&str; 5] = ["completed", "failed", "aborted", "rejected", "interrupted"];

impl ScpiClient {
    /// Connects to `addr`; every reply must come within 10 s.
    pub fn connect(addr: std::net::SocketAddr) -> ScpiClient {
        let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to the command port {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let writer = stream.try_clone().unwrap();
        ScpiClient {
            reader: BufReader::new(stream),
            writer,
            who: "anonymous".into(),
        }
    }

    /// Connects to `addr` and logs in as `user`; the login must succeed.
    pub fn login(addr: std::net::SocketAddr, user: &str, password: &str) -> ScpiClient {
        let mut c = ScpiClient::connect(addr);
        c.ok(&format!("SYST:LOGIN {user},{password}"));
        c.who = user.to_owned();
        c
    }

    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("{}: send {line:?}: {e}", self.who));
        self.writer.flush().unwrap();
    }

    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap_or_else(|e| {
            panic!("{}: no reply from the command port in 10 s: {e}", self.who)
        });
        assert!(
            n > 0,
            "{}: the command port closed the connection",
            self.who
        );
        assert!(
            line.ends_with('\n'),
            "{}: a reply ends with a newline: {line:?}",
            self.who
        );
        line.trim_end().to_owned()
    }

    pub fn query(&mut self, line: &str) -> String {
        self.send(line);
        self.read_line()
    }

    /// The next error queue entry.
    pub fn error(&mut self) -> String {
        self.query("SYST:ERR?")
    }

    /// Sends a command that answers nothing and checks that it queued no error (it ran).
    pub fn ok(&mut self, line: &str) {
        self.send(line);
        let err = self.error();
        assert_eq!(
            err, "0,\"No error\"",
            "{}: expected {line:?} to be accepted",
            self.who
        );
    }

    /// Sends a command that must be refused with `code`; returns the error entry.
    pub fn refused(&mut self, line: &str, code: i32) -> String {
        self.send(line);
        let err = self.error();
        assert!(
            err.starts_with(&format!("{code},")),
            "{}: expected {line:?} to be refused with {code}, got {err:?}",
            self.who
        );
        err
    }

    /// `SYST:ESTOP?` as a bool (`1` latched, `0` clear).
    pub fn estop_latched(&mut self) -> bool {
        match self.query("SYST:ESTOP?").as_str() {
            "1" => true,
            "0" => false,
            other => panic!("{}: SYST:ESTOP? answers 1 or 0, got {other:?}", self.who),
        }
    }

    /// `RUN:SUBM`: the run id it answered, or the error entry it queued instead.
    pub fn try_submit(&mut self, protocol: &str) -> Result<String, String> {
        // A refused submission answers nothing: ask for the error in the same round trip.
        self.send(&format!("RUN:SUBM {protocol}"));
        self.send("SYST:ERR?");
        let first = self.read_line();
        if first.starts_with('"') {
            let err = self.read_line();
            assert_eq!(
                err, "0,\"No error\"",
                "{}: RUN:SUBM answered {first} and queued an error",
                self.who
            );
            let id = first.trim_matches('"').to_owned();
            assert!(
                id.starts_with("run-"),
                "{}: RUN:SUBM answers a run id, got {first}",
                self.who
            );
            Ok(id)
        } else {
            assert!(
                !first.starts_with("0,"),
                "{}: RUN:SUBM answered nothing and queued no error",
                self.who
            );
            Err(first)
        }
    }

    /// `RUN:SUBM` that must be accepted; returns the run id.
    pub fn submit(&mut self, protocol: &str) -> String {
        let who = self.who.clone();
        self.try_submit(protocol)
            .unwrap_or_else(|e| panic!("{who}: expected the submission to be accepted, got {e}"))
    }

    /// `RUN:STAT? run_id`, which must answer.
    pub fn run_stat(&mut self, run_id: &str) -> RunStat {
        self.send(&format!("RUN:STAT? {run_id}"));
        self.send("SYST:ERR?");
        let reply = self.read_line();
        let parsed = parse_run_stat(&reply).unwrap_or_else(|| {
            panic!(
                "{}: RUN:STAT? {run_id} gave {reply:?}, expected state,\"step\",results,\"reason\"",
                self.who
            )
        });
        let err = self.read_line();
        assert_eq!(
            err, "0,\"No error\"",
            "{}: after RUN:STAT? {run_id}",
            self.who
        );
        parsed
    }

    /// Polls `RUN:STAT?` until `done` holds (within `within`); panics when the run ends otherwise.
    pub fn wait_run(
        &mut self,
        run_id: &str,
        within: Duration,
        what: &str,
        mut done: impl FnMut(&RunStat) -> bool,
    ) -> RunStat {
        let deadline = Instant::now() + within;
        loop {
            let stat = self.run_stat(run_id);
            if done(&stat) {
                return stat;
            }
            assert!(
                !ENDED_STATES.contains(&stat.state.as_str()),
                "run {run_id}: expected {what}, but it ended: {}",
                stat.reply
            );
            assert!(
                Instant::now() < deadline,
                "run {run_id}: expected {what} within {within:?}, last RUN:STAT?: {}",
                stat.reply
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `RUN:STAT?` until the run is in `state` (within `within`).
    pub fn wait_state(&mut self, run_id: &str, state: &str, within: Duration) -> RunStat {
        self.wait_run(run_id, within, state, |s| s.state == state)
    }
}

/// Splits a `RUN:STAT?` reply, `{state},"{current_step}",{results},"{reason}"`.
pub fn parse_run_stat(reply: &str) -> Option<RunStat> {
    let (state, rest) = reply.split_once(',')?;
    let rest = rest.strip_prefix('"')?;
    let (step, rest) = rest.split_once("\",")?;
    let (results, reason) = rest.split_once(',')?;
    let reason = reason.strip_prefix('"')?.strip_suffix('"')?;
    Some(RunStat {
        state: state.to_owned(),
        step: step.to_owned(),
        results: results.parse().ok()?,
        reason: reason.replace("\"\"", "\""),
        reply: reply.to_owned(),
    })
}

/// `LABCTL_TEST_PYTHON`, checked to import `module`: panics (the test fails, never skips) with how to get
/// it when it is unset or lacks the module (`pip`, the package to install; scripts/test installs them all).
pub fn python_with(module: &str, pip: &str) -> String {
    let python = std::env::var("LABCTL_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "LABCTL_TEST_PYTHON is not set: a Python with `{pip}` (`pip install {pip}`); scripts/test makes \
             .venv with it"
        )
    });
    let probe = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .unwrap_or_else(|e| panic!("LABCTL_TEST_PYTHON={python} does not run: {e}"));
    assert!(
        probe.status.success(),
        "{python} cannot import {module} (`{python} -m pip install {pip}`): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    python
}
