//! The whole system on a bench: `labctl run` as a process, its command port, its journal, and (on the sim
//! rig) the simulated lab it drives, with its wire taps and physical model.
//!
//! Everything blocks with a deadline: a hang fails the scenario with what was seen so far, never a stuck job.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use labctl_protocols::Lab;
use labctl_simulators::model::gantry::GantryState;
use labctl_simulators::model::{FaultConfig, LabModel};
use labctl_simulators::{ClockConfig, SimLab, SimLabConfig, SimLabHandle};

use crate::envelope::{WireReport, check_lab};
use crate::rig_file::{RigFile, RigKind};

/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(50);

/// The workspace root (hil-tests' parent).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The `labctl` binary: `LABCTL_BIN` if set (a bench with an installed build), else built once per test
/// process with `cargo build --bin labctl` into the target directory this test binary lives in (which
/// follows `CARGO_TARGET_DIR` and the profile).
pub fn labctl_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("LABCTL_BIN") {
            return PathBuf::from(bin);
        }
        // target/<profile>/deps/scenarios-<hash> -> target/<profile>/labctl
        let exe = std::env::current_exe().expect("path of the test binary");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary inside target/<profile>/deps");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let target_dir = profile_dir.parent().expect("target directory");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(workspace())
            .args(["build", "--quiet", "-p", "labctl", "--bin", "labctl"])
            .arg("--target-dir")
            .arg(target_dir);
        if release {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "cargo build --bin labctl failed");
        let bin = profile_dir.join("labctl");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// A directory removed when dropped.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("labctl-hil-{name}-{}-{n}", std::process::id()));
        // A leftover of an earlier process with the same pid is stale.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the scenario's directory");
        ScratchDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A run's state as `RUN:STAT?` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    pub state: String,
    pub step: String,
    pub results: u64,
    pub reason: String,
}

impl RunState {
    pub fn is_final(&self) -> bool {
        matches!(
            self.state.as_str(),
            "completed" | "failed" | "aborted" | "rejected" | "interrupted"
        )
    }

    /// Parses `running,"/steps/3",2,"reason"`.
    fn parse(line: &str) -> Option<RunState> {
        let (state, rest) = line.split_once(',')?;
        let rest = rest.strip_prefix('"')?;
        let (step, rest) = rest.split_once("\",")?;
        let (results, reason) = rest.split_once(',')?;
        Some(RunState {
            state: state.to_owned(),
            step: step.to_owned(),
            results: results.parse().ok()?,
            reason: reason.trim_matches('"').to_owned(),
        })
    }
}

/// A command-port session (plain TCP lines).
pub struct CommandPort {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The most results `RUN:STAT?` has reported per run: what the controller has acknowledged.
    pub acknowledged: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl CommandPort {
    pub fn connect(addr: SocketAddr) -> CommandPort {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("command port {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("read timeout");
        let _ = stream.set_nodelay(true);
        CommandPort {
            reader: BufReader::new(stream.try_clone().expect("clone the socket")),
            writer: stream,
            acknowledged: Arc::default(),
        }
    }

    pub fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("command port: sending {line:?}: {e}"));
    }

    fn read_line(&mut self, after: &str) -> String {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => line.trim_end().to_owned(),
            Ok(_) => panic!("command port closed after {after:?}"),
            Err(e) => panic!("command port: no answer to {after:?}: {e}"),
        }
    }

    /// Sends a query and returns its one reply line.
    pub fn query(&mut self, line: &str) -> String {
        self.send(line);
        self.read_line(line)
    }

    /// Sends a command (no reply) and returns the error it queued, `None` when it had none.
    pub fn command(&mut self, line: &str) -> Option<String> {
        self.send(line);
        let err = self.query("SYST:ERR?");
        (!err.starts_with("0,")).then_some(err)
    }

    pub fn login(&mut self, user: &str, password: &str) {
        if let Some(err) = self.command(&format!("SYST:LOGIN {user},{password}")) {
            panic!("login as {user} refused: {err}");
        }
    }

    /// Submits a protocol (one JSON line): the run id, or the error the controller queued.
    pub fn submit(&mut self, protocol: &serde_json::Value) -> Result<String, String> {
        self.send(&format!("RUN:SUBM {protocol}"));
        let first = self.query("SYST:ERR?");
        if let Some(id) = first.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            let err = self.read_line("SYST:ERR?");
            assert!(
                err.starts_with("0,"),
                "submit answered {id} and queued {err}"
            );
            Ok(id.to_owned())
        } else {
            Err(first)
        }
    }

    pub fn run_state(&mut self, run: &str) -> RunState {
        let line = self.query(&format!("RUN:STAT? {run};:SYST:ERR?"));
        let state = line
            .rsplit_once(';')
            .and_then(|(head, _)| RunState::parse(head))
            .unwrap_or_else(|| panic!("RUN:STAT? {run}: {line:?}"));
        let mut ack = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
        let seen = ack.entry(run.to_owned()).or_default();
        *seen = (*seen).max(state.results);
        state
    }

    /// Polls the run until `done` holds, failing after `limit` with the last state seen.
    pub fn wait_run(
        &mut self,
        run: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&RunState) -> bool,
    ) -> RunState {
        let deadline = Instant::now() + limit;
        loop {
            let state = self.run_state(run);
            if done(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "run {run}: {what} not within {limit:?}; last {state:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// `INST:STAT? id`: `online,idle,0,""`.
    pub fn instrument_state(&mut self, id: &str) -> String {
        self.query(&format!("INST:STAT? {id}"))
    }

    /// Waits until `INST:STAT?` of `id` satisfies `done`.
    pub fn wait_instrument(
        &mut self,
        id: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let state = self.instrument_state(id);
            if done(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: {what} not within {limit:?}; last {state:?}"
            );
            std::thread::sleep(POLL);
        }
    }
}

/// `labctl run` as a child process, killed when dropped.
pub struct Labctl {
    child: Child,
    /// Every stdout line so far.
    lines: Arc<Mutex<Vec<String>>>,
    pub command_port: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    /// The OPC UA endpoint, when the scenario asked for the server (`--opcua-port 0`).
    pub opcua: Option<String>,
    stderr: PathBuf,
}

impl Labctl {
    /// Stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Results it reported as durable on stdout (`result RUN SEQ NAME INSTRUMENT`).
    pub fn reported_results(&self, run: &str) -> BTreeSet<i64> {
        self.stdout()
            .iter()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == "result" && it.next()? == run).then_some(())?;
                it.next()?.parse().ok()
            })
            .collect()
    }

    /// Its whole log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// How it exited, if it did (on its own: the tests only ever kill it by consuming it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit (it leaves the instruments safe first).
    pub fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        // std has no SIGTERM; `kill` the program is everywhere labctl runs.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "labctl did not exit within {limit:?} of SIGTERM; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Labctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rig brought up for one scenario: the lab file labctl runs on, its data directory, and on the sim rig
/// the simulated lab itself.
pub struct Bench {
    pub rig: RigFile,
    /// The lab as labctl sees it (on the sim rig: every transport pointing at a simulator).
    pub lab: Lab,
    pub lab_path: PathBuf,
    pub data_dir: PathBuf,
    /// The simulated lab (sim rig only). Declared before the runtime so it is dropped first.
    pub sim: Option<SimLabHandle>,
    runtime: tokio::runtime::Runtime,
    dir: ScratchDir,
    /// Scenarios run one at a time: each starts a whole lab and a controller, and two at once on a
    /// 2-core machine turn the scenarios' deadlines into a test of the machine. Dropped last.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// Held by the running scenario (see `Bench::_one_at_a_time`).
static ONE_SCENARIO_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Bench {
    /// Brings the rig up for scenario `name` (its own directory, data dir and free ports).
    pub fn start(rig: &RigFile, name: &str) -> Bench {
        // A scenario that failed (poisoning the lock) must not fail the others.
        let one_at_a_time = ONE_SCENARIO_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = ScratchDir::new(name);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the simulators");
        let (sim, lab) = match rig.kind {
            RigKind::Sim => {
                let sim = runtime
                    .block_on(SimLab::start(SimLabConfig {
                        lab: rig.lab.clone(),
                        seed: rig.seed,
                        clock: ClockConfig::Warp(rig.warp),
                        pty_dir: Some(dir.path().join("ptys")),
                        wire_timing: true,
                        ..SimLabConfig::default()
                    }))
                    .expect("start the simulated lab");
                let lab = sim.lab_file(&rig.lab);
                (Some(sim), lab)
            }
            RigKind::Hardware => (None, rig.lab.clone()),
        };
        let lab_path = dir.path().join("lab.toml");
        let text = toml::to_string(&lab).expect("the lab serializes to TOML");
        // The file labctl reads must mean the same lab: a lossy serialization would test another lab.
        let back = Lab::from_toml_str(&text, "wired lab").expect("the wired lab file parses");
        assert_eq!(back, lab, "the wired lab file does not round-trip");
        std::fs::write(&lab_path, text).expect("write the wired lab file");
        let data_dir = dir.path().join("data");
        Bench {
            rig: rig.clone(),
            lab,
            lab_path,
            data_dir,
            sim,
            runtime,
            dir,
            _one_at_a_time: one_at_a_time,
        }
    }

    pub fn is_sim(&self) -> bool {
        self.sim.is_some()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `labctl run` on the bench and waits until it prints its endpoints and every instrument is
    /// online.
    pub fn labctl(&self) -> Labctl {
        self.labctl_with(&[])
    }

    /// [`Bench::labctl`] with more `labctl run` arguments (e.g. `--mqtt URL`).
    pub fn labctl_with(&self, extra: &[&str]) -> Labctl {
        let labctl = self.labctl_listening(extra);
        let mut port = self.technician(&labctl);
        for instrument in &self.lab.instruments {
            port.wait_instrument(&instrument.id, Duration::from_secs(30), "online", |s| {
                s.starts_with("online")
            });
        }
        labctl
    }

    /// Starts `labctl run` and returns once it prints its command port, without waiting for the
    /// instruments (some may be unplugged on purpose).
    pub fn labctl_listening(&self, extra: &[&str]) -> Labctl {
        let stderr = self.dir().join(format!(
            "labctl-{}.log",
            std::fs::read_dir(self.dir())
                .map(|d| d.count())
                .unwrap_or(0)
        ));
        let mut cmd = Command::new(labctl_binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.lab_path)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--command-port", "127.0.0.1:0", "--mqtt-port", "0"]);
        // The OPC UA server only when the scenario asks for it.
        let want_opcua = extra.contains(&"--opcua-port");
        if !want_opcua {
            cmd.arg("--no-opcua");
        }
        // Nor the browser console, unless asked: each would try the default 127.0.0.1:8080.
        if !extra.iter().any(|a| a.starts_with("--web")) {
            cmd.arg("--no-web");
        }
        cmd.args(extra);
        if self.is_sim() {
            cmd.args(["--simulated-instruments", "--warp"])
                .arg(self.rig.warp.to_string());
        }
        let mut child = cmd
            .env("LABCTL_LOG", "info,mqtt5=warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("log file"))
            .spawn()
            .expect("start labctl run");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    lines
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        // Endpoints come before anything else; labctl may also exit (a bad flag).
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut command_port, mut mqtt, mut opcua) = (None, None, None);
        while command_port.is_none() || (want_opcua && opcua.is_none()) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "labctl run exited with {status}; log:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "labctl run printed no command port; stdout {:?}",
                lines.lock().unwrap_or_else(|e| e.into_inner())
            );
            let Ok(line) = rx.recv_timeout(POLL) else {
                continue;
            };
            let line = line.trim();
            if let Some(addr) = line.strip_prefix("command port: tcp ") {
                command_port = addr.parse().ok();
            } else if let Some(rest) = line.strip_prefix("mqtt: ") {
                mqtt = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            } else if let Some(rest) = line.strip_prefix("opcua: ") {
                opcua = rest.split_whitespace().next().map(str::to_owned);
            }
        }
        Labctl {
            child,
            lines,
            command_port: command_port.expect("command port"),
            mqtt,
            opcua,
            stderr,
        }
    }

    /// A command-port session logged in as the rig's technician.
    pub fn technician(&self, labctl: &Labctl) -> CommandPort {
        let mut port = CommandPort::connect(labctl.command_port);
        port.login(&self.rig.technician_user, &self.rig.technician_password);
        port
    }

    /// Runs `f` in the simulators' runtime (unplugging, replugging).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    fn sim(&self) -> &SimLabHandle {
        self.sim
            .as_ref()
            .expect("a scenario needing the simulators ran on hardware")
    }

    /// Runs `f` on the simulated lab's physical model at the current virtual time.
    pub fn model<R>(&self, f: impl FnOnce(&mut LabModel, Duration) -> R) -> R {
        self.sim().with_model(f)
    }

    /// Sets an instrument's faults (or the pump line's, `pumps`).
    pub fn set_faults(&self, id: &str, faults: FaultConfig) {
        self.sim()
            .faults(id)
            .expect("fault handle")
            .set(faults)
            .expect("valid faults");
    }

    /// Pulls `id`'s cable; returns once its port is closed.
    pub fn unplug(&self, id: &str) {
        let handle = self.sim().faults(id).expect("fault handle");
        self.block_on(handle.unplug()).expect("unplug");
    }

    /// Plugs `id` back; returns once its port is open again.
    pub fn replug(&self, id: &str) {
        let handle = self.sim().faults(id).expect("fault handle");
        self.block_on(handle.replug()).expect("replug");
    }

    /// A fresh vessel `id` at `position` on the simulated deck (a technician's job on a bench).
    pub fn place_vial(&self, id: &str, position: &str) {
        if !self.is_sim() {
            return;
        }
        self.model(|m, now| {
            let stale: Vec<String> = m
                .deck()
                .vials()
                .iter()
                .filter(|v| v.id == id)
                .map(|v| v.id.clone())
                .collect();
            for v in stale {
                let _ = m.remove_vial(now, &v);
            }
            m.add_vial(now, id, position)
                .unwrap_or_else(|e| panic!("place {id} at {position}: {e}"));
        });
    }

    /// What the instruments were sent, checked against the envelope (sim rig only: hardware has no tap).
    pub fn wire_report(&self) -> Option<WireReport> {
        let sim = self.sim.as_ref()?;
        Some(check_lab(
            &self.lab,
            |id| sim.endpoint(id).map(|e| e.port),
            |port| sim.transcript(port),
        ))
    }

    /// Asserts nothing outside the envelope, and nothing undecodable, reached an instrument; returns the
    /// report for scenario-specific checks.
    pub fn assert_wire_inside_envelope(&self) -> Option<WireReport> {
        let report = self.wire_report()?;
        assert!(
            report.violations.is_empty() && report.undecodable.is_empty(),
            "the instruments were sent what they must not be:\n{report}"
        );
        Some(report)
    }

    /// What in the physical model is not in its safe state now: heater on, motor on (unless `stirring_ok`),
    /// a pump running, the gantry moving.
    pub fn unsafe_instruments(&self, stirring_ok: bool) -> Vec<String> {
        self.model(|m, now| {
            let mut out = Vec::new();
            for h in 0..m.hotplate_count() {
                let Ok(hotplate) = m.hotplate_status(now, h) else {
                    continue;
                };
                let name = match h {
                    0 => "hotplate".to_owned(),
                    _ => m.config().more_hotplates[h - 1].id.clone(),
                };
                if hotplate.heating {
                    out.push(format!(
                        "{name} heating (setpoint {} C)",
                        hotplate.setpoint_c
                    ));
                }
                if hotplate.stirring && !stirring_ok {
                    out.push(format!(
                        "{name} stirring ({} rpm)",
                        hotplate.speed_setpoint_rpm
                    ));
                }
            }
            for i in 0..m.pump_count() {
                if m.pump(i).is_some_and(|p| p.is_running()) {
                    out.push(format!("{} running", m.config().pumps[i].id));
                }
            }
            let gantry = m.gantry_status(now);
            if matches!(gantry.state, GantryState::Run | GantryState::Home) {
                out.push(format!("gantry moving ({:?})", gantry.state));
            }
            out
        })
    }

    /// Waits (up to `limit`) until every instrument is in its safe state; sim rig only.
    pub fn assert_safe_within(&self, limit: Duration, stirring_ok: bool) {
        if !self.is_sim() {
            return;
        }
        let deadline = Instant::now() + limit;
        loop {
            let unsafe_now = self.unsafe_instruments(stirring_ok);
            if unsafe_now.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not safe within {limit:?}: {unsafe_now:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Runs a `labctl runs ...` subcommand on the bench's data directory.
    fn runs(&self, args: &[&str]) -> String {
        let out = Command::new(labctl_binary())
            .arg("runs")
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .expect("run labctl runs");
        assert!(
            out.status.success(),
            "labctl runs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The result sequence numbers the journal holds for `run` (`labctl runs export RUN --format jsonl`).
    pub fn journal_results(&self, run: &str) -> Vec<serde_json::Value> {
        self.runs(&["export", run, "--format", "jsonl"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// The journaled state of `run` (`labctl runs list --json`).
    pub fn journal_state(&self, run: &str) -> Option<String> {
        let list: serde_json::Value =
            serde_json::from_str(&self.runs(&["list", "--json"])).expect("runs list JSON");
        list.as_array()?
            .iter()
            .find(|r| r["run_id"] == run)
            .and_then(|r| r["state"].as_str().map(str::to_owned))
    }

    /// The kinds of the run's journaled events, in order (`labctl runs show RUN --json`).
    pub fn journal_event_kinds(&self, run: &str) -> Vec<String> {
        let detail: serde_json::Value =
            serde_json::from_str(&self.runs(&["show", run, "--json"])).expect("runs show JSON");
        detail["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter_map(|e| e["kind"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the journal holds a run for `proposal_id` (submitted by another client) and returns
    /// its id.
    pub fn wait_run_of_proposal(&self, proposal_id: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let list: serde_json::Value =
                serde_json::from_str(&self.runs(&["list", "--json"])).expect("runs list JSON");
            if let Some(run) = list.as_array().and_then(|runs| {
                runs.iter()
                    .find(|r| r["proposal_id"] == proposal_id)
                    .and_then(|r| r["run_id"].as_str().map(str::to_owned))
            }) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "no run for proposal {proposal_id} within {limit:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Asserts every result acknowledged to a client (a count from `RUN:STAT?` on `port`, a `result` line
    /// on stdout) is in the journal; returns the journaled results.
    pub fn assert_no_acknowledged_result_lost(
        &self,
        run: &str,
        port: Option<&CommandPort>,
        labctl_outputs: &[BTreeSet<i64>],
    ) -> Vec<serde_json::Value> {
        let journal = self.journal_results(run);
        let seqs: BTreeSet<i64> = journal.iter().filter_map(|r| r["seq"].as_i64()).collect();
        let acknowledged = port.map_or(0, |port| {
            port.acknowledged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(run)
                .copied()
                .unwrap_or(0)
        });
        assert!(
            seqs.len() as u64 >= acknowledged,
            "run {run}: RUN:STAT? acknowledged {acknowledged} results, the journal holds {}",
            seqs.len()
        );
        for reported in labctl_outputs {
            let missing: Vec<_> = reported.difference(&seqs).collect();
            assert!(
                missing.is_empty(),
                "run {run}: results {missing:?} were reported but are not in the journal"
            );
        }
        journal
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Close the ptys before the runtime goes (its drop would cancel the port tasks mid-write).
        if let Some(sim) = self.sim.take() {
            self.runtime.block_on(sim.shutdown());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_state_lines_parse() {
        assert_eq!(
            RunState::parse("paused,\"/steps/2\",1,\"pause requested\""),
            Some(RunState {
                state: "paused".into(),
                step: "/steps/2".into(),
                results: 1,
                reason: "pause requested".into()
            })
        );
        assert!(
            RunState::parse("completed,\"/steps/11\",2,\"\"")
                .unwrap()
                .is_final()
        );
        assert_eq!(RunState::parse("0,\"No error\""), None);
    }
}
