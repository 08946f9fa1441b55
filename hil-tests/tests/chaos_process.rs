//! The safety campaign against the real binary: seeded, reproducible random sequences of what a lab sees,
//! driven from every face of `labctl run --simulated-instruments` as a process, with the simulators' wire
//! taps as the judge of what reached the instruments.
//!
//! Operations, from three roles (technician `alice`, rig `rig-1`, observer `watcher`, each on its own
//! command-port session): valid submissions (dye mix, heat and move, and a long soak that needs a
//! technician's approval) and invalid ones; approvals and rejections; pause, resume and abort of their own
//! and others' runs; the emergency stop and its acknowledgement; physical faults that trip interlocks
//! (over-temperature and overload through sensor drift, a silent hotplate); unplugging and replugging
//! instruments; time passing; the journal's disk filling up and being freed (the data directory is a small
//! tmpfs: the campaign needs root); and `kill -9` of the controller, restarted on the same data directory
//! (on a full disk, the disk is freed before the restart, as an operator would). A model predicts what each role may do (docs/controller.md, "Who may do what").
//!
//! After every operation:
//! 1. the wire: nothing outside the envelope and nothing undecodable reached an instrument (a frame cut by
//!    a `kill -9` or an unplugged cable excepted), and while the e-stop is latched (or an interlock holds
//!    the hotplate) no motion, pumping or heating command was sent; a gantry feed hold is followed by a soft
//!    reset before any motion; after an e-stop every instrument is safe in the physical model within 5 s;
//! 2. `SYST:ESTOP?` shows the latch the sequence set (a full disk sets it too), across every restart, and
//!    only a technician's acknowledgement releases it, never while the journal cannot record the release;
//!    a proposal awaiting approval is awaiting again after a restart, and only a technician decides it;
//! 3. every result count `RUN:STAT?` reported and every `result` line labctl printed is in the journal
//!    after every `kill -9`;
//! 5. labctl is still running, its log has no panic, every refusal names its reason, and an invalid
//!    protocol's refusal names a field.
//!
//! At the end of a sequence (4): acknowledge, clear the faults, replug, wait for the instruments and the
//! interlocks, and the health protocol (home, a dispense, a reading) completes.
//!
//! `LABCTL_PROCESS_CHAOS_SEQUENCES` (default 2), `LABCTL_PROCESS_CHAOS_SEED` (first seed, default fixed),
//! `LABCTL_PROCESS_CHAOS_LENGTH` (operations per sequence, default 8; every sequence has at least one
//! `kill -9`) and `LABCTL_PROCESS_CHAOS_SHRINK_SECS` (time allowed to shrink a failure, default 600)
//! choose the campaign; a failing sequence prints its seed, its operations and the shortest reproduction
//! found. With `LABCTL_PROCESS_CHAOS_KEEP_GOING=1` (the long campaign) every sequence runs and the failing
//! seeds are listed at the end instead. The operations are a function of the seed; the process's timing
//! is not, so a reproduction is re-run, not replayed. `scripts/chaos-campaign` runs the long campaign; docs/testing.md has its figures.

#![cfg(unix)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use labctl_codecs::{DecodeError, Decoded, grbl, namur, ne1000};
use labctl_hil_tests::rig_file::RigFile;
use labctl_hil_tests::system::{Bench, CommandPort, Labctl, workspace};
use labctl_hil_tests::tmpfs::Tmpfs;
use labctl_simulators::serve::tap::WireTap;
use serde_json::json;

/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(20);

/// Ports whose safe-state bytes are timed (the ones with something to stop).
const STOPPABLE: [&str; 3] = ["gantry", "pumps", "hotplate"];
/// Every port of the simulated lab.
const PORTS: [&str; 5] = ["gantry", "pumps", "balance", "hotplate", "spectro"];

// ----- the seeded generator -----

/// xorshift64* seeded through splitmix64: small, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ----- operations -----

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Alice,
    Rig,
    Watcher,
}

impl Who {
    const ALL: [Who; 3] = [Who::Alice, Who::Rig, Who::Watcher];

    fn credentials(self) -> (&'static str, &'static str) {
        match self {
            Who::Alice => ("alice", "technician-dev"),
            Who::Rig => ("rig-1", "rig-dev"),
            Who::Watcher => ("watcher", "observer-dev"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    DyeMix,
    HeatAndMove,
    /// `version` missing.
    NoVersion,
    /// A setpoint above the hotplate's envelope.
    TooHot,
    /// An instrument the lab does not have.
    NoSuchInstrument,
    /// Valid, but an hour and a half long: it waits for a technician's approval.
    Soak,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctl {
    Pause,
    Resume,
    Abort,
}

impl Ctl {
    fn header(self) -> &'static str {
        match self {
            Ctl::Pause => "RUN:PAUS",
            Ctl::Resume => "RUN:RES",
            Ctl::Abort => "RUN:ABOR",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// The hotplate's sensor reads 20 C above its 130 C interlock.
    OverTemperature,
    /// The balance reads more than its 210 g interlock.
    Overload,
    /// The hotplate hears commands and never answers (its silence interlock).
    Silence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Submit(Who, Kind),
    /// Pause, resume or abort the n-th run this controller process serves.
    Control(Who, usize, Ctl),
    /// Approve (`true`) or reject the n-th run this controller process serves.
    Decide(Who, usize, bool),
    EStop(Who),
    Acknowledge(Who),
    /// Fill the journal's file system, then free it.
    FillDisk,
    FreeDisk,
    Fault(Fault, bool),
    Unplug(&'static str),
    Replug(&'static str),
    /// Let the lab run for this many real milliseconds.
    Wait(u64),
    /// `kill -9` and a restart on the same data directory.
    Kill,
}

const UNPLUGGABLE: [&str; 3] = ["balance", "hotplate", "spectro"];
const FAULTS: [Fault; 3] = [Fault::OverTemperature, Fault::Overload, Fault::Silence];

fn random_op(rng: &mut Rng) -> Op {
    let who = Who::ALL[rng.below(3) as usize];
    match rng.below(100) {
        0..20 => {
            let kinds = [
                Kind::DyeMix,
                Kind::HeatAndMove,
                Kind::DyeMix,
                Kind::HeatAndMove,
                Kind::Soak,
                Kind::Soak,
                Kind::NoVersion,
                Kind::TooHot,
                Kind::NoSuchInstrument,
            ];
            Op::Submit(who, kinds[rng.below(kinds.len() as u64) as usize])
        }
        20..32 => {
            let ctl = [Ctl::Pause, Ctl::Resume, Ctl::Abort][rng.below(3) as usize];
            Op::Control(who, rng.below(4) as usize, ctl)
        }
        32..40 => Op::Decide(who, rng.below(4) as usize, rng.below(3) != 0),
        40..46 => Op::EStop(who),
        46..52 => Op::Acknowledge(who),
        52..58 => {
            if rng.below(2) == 0 {
                Op::FillDisk
            } else {
                Op::FreeDisk
            }
        }
        58..66 => Op::Fault(FAULTS[rng.below(3) as usize], rng.below(2) == 0),
        66..74 => {
            let id = UNPLUGGABLE[rng.below(3) as usize];
            if rng.below(2) == 0 {
                Op::Unplug(id)
            } else {
                Op::Replug(id)
            }
        }
        74..88 => Op::Wait(200 + rng.below(2800)),
        _ => Op::Kill,
    }
}

/// The operations of `seed`: `length` of them, at least one a `kill -9`.
fn sequence(seed: u64, length: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let mut ops: Vec<Op> = (0..length).map(|_| random_op(&mut rng)).collect();
    if length > 0 && !ops.contains(&Op::Kill) {
        let at = rng.below(length as u64) as usize;
        ops[at] = Op::Kill;
    }
    ops
}

// ----- protocols -----

fn example(name: &str) -> serde_json::Value {
    let path = workspace().join("protocols/examples").join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("protocol JSON")
}

/// Heats to 60 C and stirs while the gantry moves slowly back and forth.
fn heat_and_move(proposal_id: &str) -> serde_json::Value {
    let mut steps = vec![
        json!({ "type": "action", "instrument": "gantry", "action": "home", "params": {} }),
        json!({ "type": "action", "instrument": "hotplate", "action": "set_stir_speed", "params": { "speed_rpm": 300 } }),
        json!({ "type": "action", "instrument": "hotplate", "action": "set_temperature", "params": { "temperature_c": 60 } }),
    ];
    for k in 0..6 {
        let position = if k % 2 == 0 { "D6" } else { "A1" };
        steps.push(json!({
            "type": "action", "instrument": "gantry", "action": "move_to",
            "params": { "position": position, "feed_mm_per_min": 600 }
        }));
    }
    steps.push(
        json!({ "type": "action", "instrument": "hotplate", "action": "heater_off", "params": {} }),
    );
    steps.push(
        json!({ "type": "action", "instrument": "hotplate", "action": "stir_off", "params": {} }),
    );
    json!({
        "version": 1,
        "metadata": {
            "name": "Heat while moving", "objective": "chaos", "proposal_id": proposal_id,
            "planner": { "id": "hil-chaos" }
        },
        "labware": [],
        "steps": steps
    })
}

/// Warms the hotplate and holds it for an hour and a half: over the lab's auto-approval duration.
fn soak(proposal_id: &str) -> serde_json::Value {
    json!({
        "version": 1,
        "metadata": {
            "name": "Soak", "objective": "chaos: a proposal for a technician", "proposal_id": proposal_id,
            "planner": { "id": "hil-chaos" }
        },
        "labware": [],
        "steps": [
            { "type": "action", "instrument": "hotplate", "action": "set_temperature", "params": { "temperature_c": 40 } },
            { "type": "wait", "duration_s": 5400 },
            { "type": "action", "instrument": "hotplate", "action": "heater_off", "params": {} }
        ]
    })
}

fn protocol(kind: Kind, proposal_id: &str) -> serde_json::Value {
    if kind == Kind::Soak {
        return soak(proposal_id);
    }
    let mut p = match kind {
        Kind::DyeMix | Kind::NoVersion => example("dye-mix.json"),
        Kind::HeatAndMove | Kind::TooHot | Kind::NoSuchInstrument | Kind::Soak => {
            heat_and_move(proposal_id)
        }
    };
    p["metadata"]["proposal_id"] = proposal_id.into();
    match kind {
        Kind::NoVersion => {
            p.as_object_mut().expect("an object").remove("version");
        }
        Kind::TooHot => p["steps"][2]["params"]["temperature_c"] = 400.into(),
        Kind::NoSuchInstrument => p["steps"][1]["instrument"] = "centrifuge".into(),
        Kind::DyeMix | Kind::HeatAndMove | Kind::Soak => {}
    }
    p
}

/// The standard health protocol: home, over a fresh vial, a dispense, a reading.
fn health(proposal_id: &str) -> serde_json::Value {
    json!({
        "version": 1,
        "metadata": { "name": "health", "objective": "return to service", "proposal_id": proposal_id, "planner": { "id": "hil-chaos" } },
        "labware": [ { "id": "health", "kind": "vial", "location": "D5", "capacity_ul": 20000 } ],
        "steps": [
            { "type": "action", "instrument": "gantry", "action": "home", "params": {}, "timeout_s": 60 },
            { "type": "action", "instrument": "gantry", "action": "move_to", "params": { "position": "D5", "feed_mm_per_min": 3000 } },
            { "type": "action", "instrument": "pump-red", "action": "dispense", "params": { "vessel": "health", "volume_ul": 100, "rate_ul_per_min": 600 } },
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "mass" }
        ]
    })
}

// ----- the wire -----

/// One decoded frame of a port: where it starts and ends in the tap, and what it was.
#[derive(Debug, Clone)]
struct Frame {
    start: u64,
    end: u64,
    what: Result<Sent, String>,
}

/// What a frame told an instrument, as far as the campaign cares.
#[derive(Debug, Clone, PartialEq)]
enum Sent {
    /// Motion, pumping or heating: never while latched.
    Energize(String),
    /// Gantry feed hold (`!`): the gantry's safe state.
    FeedHold,
    /// Gantry soft reset (ctrl-X): its recovery.
    SoftReset,
    /// A pump's `STP`.
    PumpStop,
    /// Hotplate `STOP_1` / `STOP_4`.
    HeaterOff,
    MotorOff,
    Other,
}

/// The tap's bytes and the offset of the first one kept.
fn tap_bytes(tap: &WireTap) -> (u64, Vec<u8>) {
    for _ in 0..100 {
        let before = tap.total();
        let bytes = tap.contents();
        if tap.total() == before {
            return (before - bytes.len() as u64, bytes);
        }
    }
    let bytes = tap.contents();
    (tap.total().saturating_sub(bytes.len() as u64), bytes)
}

fn frames_of<T>(
    base: u64,
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> Result<Decoded<T>, DecodeError>,
    classify: impl Fn(T) -> Sent,
) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let start = base + at as u64;
        match decode(&bytes[at..]) {
            Ok(Decoded::Frame { value, consumed }) => {
                let n = consumed.clamp(1, bytes.len() - at);
                out.push(Frame {
                    start,
                    end: start + n as u64,
                    what: Ok(classify(value)),
                });
                at += n;
            }
            Ok(Decoded::Incomplete) => break,
            Err(e) => {
                let n = e.skip.clamp(1, bytes.len() - at);
                out.push(Frame {
                    start,
                    end: start + n as u64,
                    what: Err(format!("{}: {}", e.reason, e.frame)),
                });
                at += n;
            }
        }
    }
    out
}

/// Every frame the host sent `port`, decoded with the drivers' codecs.
fn frames(tap: &WireTap, port: &str) -> Vec<Frame> {
    let (base, bytes) = tap_bytes(tap);
    match port {
        "gantry" => frames_of(base, &bytes, grbl::decode_command, |cmd| match cmd {
            grbl::Command::Realtime(grbl::Realtime::FeedHold) => Sent::FeedHold,
            grbl::Command::Realtime(grbl::Realtime::SoftReset) => Sent::SoftReset,
            grbl::Command::Realtime(grbl::Realtime::CycleStart) => {
                Sent::Energize("cycle start `~`".into())
            }
            m @ grbl::Command::Move { .. } => Sent::Energize(format!("{m:?}")),
            grbl::Command::Home => Sent::Energize("home `$H`".into()),
            _ => Sent::Other,
        }),
        "pumps" => frames_of(base, &bytes, ne1000::decode_command, |cmd| {
            match cmd.request {
                ne1000::Request::Run { .. } => Sent::Energize(format!("{cmd:?}")),
                ne1000::Request::Stop => Sent::PumpStop,
                _ => Sent::Other,
            }
        }),
        "hotplate" => frames_of(base, &bytes, namur::decode_command, |cmd| match cmd {
            namur::Command::StartHeater => Sent::Energize("START_1".into()),
            namur::Command::StartMotor => Sent::Energize("START_4".into()),
            namur::Command::StopHeater => Sent::HeaterOff,
            namur::Command::StopMotor => Sent::MotorOff,
            _ => Sent::Other,
        }),
        _ => Vec::new(),
    }
}

/// Tap totals of every port now.
fn marks(taps: &BTreeMap<&'static str, WireTap>) -> BTreeMap<&'static str, u64> {
    taps.iter().map(|(p, t)| (*p, t.total())).collect()
}

/// Watches the taps from `from` until every expected safe-state frame has appeared (or `limit`), and
/// returns when the last one was seen, measured from `t0`.
fn watch_safe_state(
    taps: BTreeMap<&'static str, WireTap>,
    from: BTreeMap<&'static str, u64>,
    expect: Vec<&'static str>,
    t0: Instant,
    limit: Duration,
) -> JoinHandle<Option<Duration>> {
    std::thread::spawn(move || {
        let mut seen: BTreeMap<&str, Duration> = BTreeMap::new();
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        while seen.len() < expect.len() && t0.elapsed() < limit {
            for port in &expect {
                if seen.contains_key(port) {
                    continue;
                }
                let tap = &taps[port];
                let total = tap.total();
                if totals.get(port) == Some(&total) {
                    continue;
                }
                totals.insert(port, total);
                let at = t0.elapsed();
                let after: Vec<Sent> = frames(tap, port)
                    .into_iter()
                    .filter(|f| f.start >= from[port])
                    .filter_map(|f| f.what.ok())
                    .collect();
                let done = match *port {
                    "gantry" => after.contains(&Sent::FeedHold),
                    "pumps" => after.iter().filter(|s| **s == Sent::PumpStop).count() >= 3,
                    "hotplate" => {
                        after.contains(&Sent::HeaterOff) && after.contains(&Sent::MotorOff)
                    }
                    _ => true,
                };
                if done {
                    seen.insert(port, at);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (seen.len() == expect.len() && !expect.is_empty())
            .then(|| seen.values().max().copied())
            .flatten()
    })
}

// ----- the model -----

#[derive(Debug, Clone)]
struct RunRec {
    id: String,
    owner: Who,
    /// Accepted as awaiting a technician's approval and not decided since.
    awaiting: bool,
}

#[derive(Debug, Default)]
struct Model {
    latched: bool,
    /// Tap totals when the latch went on: nothing energizing may follow until a technician acknowledges.
    latched_at: Option<BTreeMap<&'static str, u64>>,
    faults: BTreeSet<Fault>,
    /// Hotplate tap total when an interlock holding the hotplate was seen tripped, by fault.
    hotplate_held_at: BTreeMap<Fault, u64>,
    unplugged: BTreeSet<&'static str>,
    /// Runs the current controller process serves.
    live: Vec<RunRec>,
    /// Every run ever accepted.
    all_runs: Vec<String>,
    /// The most results `RUN:STAT?` reported per run.
    acknowledged: BTreeMap<String, u64>,
    /// `result` lines labctl printed, per run, across processes.
    reported: BTreeMap<String, BTreeSet<i64>>,
    /// Tap offsets where a frame may have been cut: a `kill -9`, a cable pulled.
    cuts: BTreeMap<&'static str, Vec<u64>>,
    submitted: usize,
    /// The filler file while the journal's disk is full.
    filler: Option<std::path::PathBuf>,
}

/// What the campaign adds up.
#[derive(Debug, Default, Clone)]
struct Figures {
    sequences: u64,
    operations: u64,
    kills: u64,
    estops: u64,
    acknowledgements: u64,
    approvals: u64,
    rejections: u64,
    disk_fills: u64,
    refusals: u64,
    accepted_runs: u64,
    interlock_trips: u64,
    violations: u64,
    /// E-stop sent -> last safe-state frame on the wire.
    estop_to_wire: Vec<Duration>,
    /// E-stop sent -> every instrument safe in the physical model.
    estop_to_model: Vec<Duration>,
    /// Sensor past the over-temperature limit -> the hotplate's STOP_1/STOP_4 on the wire.
    trip_to_wire: Vec<Duration>,
}

type Violation = String;

/// One sequence's lab: the bench, the controller process and a session per role. Fields drop in order:
/// the process goes before the tmpfs under its data directory, the tmpfs before the bench's directory.
struct World {
    labctl: Option<Labctl>,
    ports: BTreeMap<Who, CommandPort>,
    disk: Tmpfs,
    bench: Bench,
    taps: BTreeMap<&'static str, WireTap>,
    name: String,
}

impl World {
    fn port(&mut self, who: Who) -> &mut CommandPort {
        self.ports.get_mut(&who).expect("a session per role")
    }

    fn log_tail(&self) -> String {
        self.labctl
            .as_ref()
            .map(|l| l.log_tail())
            .unwrap_or_default()
    }

    fn start_labctl(&mut self, model: &Model) -> Result<(), Violation> {
        let labctl = self.bench.labctl_listening(&[]);
        self.ports.clear();
        for who in Who::ALL {
            let mut port = CommandPort::connect(labctl.command_port);
            let (user, password) = who.credentials();
            port.login(user, password);
            self.ports.insert(who, port);
        }
        self.labctl = Some(labctl);
        // Every instrument that can answer comes online.
        for id in self.instrument_ids() {
            if !self.can_answer(model, &id) {
                continue;
            }
            self.wait_for(Duration::from_secs(30), &format!("{id} online"), |w| {
                w.port(Who::Alice)
                    .instrument_state(&id)
                    .starts_with("online")
            })?;
        }
        Ok(())
    }

    fn instrument_ids(&self) -> Vec<String> {
        self.bench
            .lab
            .instruments
            .iter()
            .map(|i| i.id.clone())
            .collect()
    }

    /// Whether `id` can answer its controller (not unplugged, not silenced).
    fn can_answer(&self, model: &Model, id: &str) -> bool {
        let silenced = id == "hotplate" && model.faults.contains(&Fault::Silence);
        !model.unplugged.contains(id) && !silenced
    }

    fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&mut World) -> bool,
    ) -> Result<(), Violation> {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{what}: not within {limit:?}\nlabctl log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    fn interlock(&mut self, name: &str) -> String {
        self.port(Who::Alice)
            .query(&format!("SYST:INT:STAT? \"{name}\";:SYST:ERR?"))
    }

    fn cut_here(&self, model: &mut Model, ports: &[&'static str]) {
        for port in ports {
            let total = self.taps[port].total();
            model.cuts.entry(port).or_default().push(total);
        }
    }

    fn drift(&self, id: &str, per_hour: f64) {
        self.bench
            .sim
            .as_ref()
            .expect("the sim rig")
            .faults(id)
            .expect("fault handle")
            .update(|f| f.drift_per_hour = per_hour)
            .expect("valid faults");
    }

    fn plate_c(&self) -> f64 {
        self.bench
            .model(|m, now| m.hotplate_status(now, 0).unwrap().plate_c)
    }

    fn balance_g(&self) -> f64 {
        self.bench
            .model(|m, now| m.balance_read(now, 0).map_or(f64::NAN, |r| r.value_g))
    }
}

/// `-203,"Command protected;RUN:PAUS: why"` -> `why`; empty when the refusal names nothing.
fn reason(err: &str) -> &str {
    let detail = err
        .split_once(';')
        .map(|(_, d)| d.trim_end_matches('"'))
        .unwrap_or("");
    detail
        .split_once(": ")
        .map_or(detail, |(_, why)| why)
        .trim()
}

fn refusal_named(what: &str, err: &str) -> Result<(), Violation> {
    if reason(err).is_empty() {
        Err(format!("{what}: a refusal without a reason: {err}"))
    } else {
        Ok(())
    }
}

/// Invariant 1 on the wire.
fn check_wire(world: &World, model: &Model) -> Result<(), Violation> {
    if let Some(report) = world.bench.wire_report()
        && !report.violations.is_empty()
    {
        return Err(format!("outside the envelope on the wire:\n{report}"));
    }
    for (port, tap) in &world.taps {
        let frames = frames(tap, port);
        let cuts = model.cuts.get(port).map(Vec::as_slice).unwrap_or(&[]);
        for f in &frames {
            if let Err(e) = &f.what
                && !cuts.iter().any(|&c| f.start <= c && c <= f.end)
            {
                return Err(format!(
                    "{port}: undecodable bytes at {}..{} (no kill or unplug cut them): {e}",
                    f.start, f.end
                ));
            }
        }
        if let Some(at) = &model.latched_at
            && let Some(f) = frames
                .iter()
                .find(|f| f.start >= at[port] && matches!(f.what, Ok(Sent::Energize(_))))
        {
            return Err(format!(
                "{port}: {:?} reached the instrument while the e-stop was latched (bytes {}..{}, latched at {})",
                f.what, f.start, f.end, at[port]
            ));
        }
        if *port == "hotplate" {
            for (fault, from) in &model.hotplate_held_at {
                if let Some(f) = frames
                    .iter()
                    .find(|f| f.start >= *from && matches!(f.what, Ok(Sent::Energize(_))))
                {
                    return Err(format!(
                        "hotplate: {:?} while its {fault:?} interlock held it (bytes {}..{})",
                        f.what, f.start, f.end
                    ));
                }
            }
        }
        if *port == "gantry" {
            // After a feed hold, motion only after the recovery's soft reset.
            let mut held: Option<u64> = None;
            for f in &frames {
                match &f.what {
                    Ok(Sent::FeedHold) => held = Some(f.start),
                    Ok(Sent::SoftReset) => held = None,
                    Ok(Sent::Energize(what)) => {
                        if let Some(h) = held {
                            return Err(format!(
                                "gantry: {what} at byte {} after the feed hold at {h} without a soft reset",
                                f.start
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// The checks after every operation.
fn check(world: &mut World, model: &mut Model) -> Result<(), Violation> {
    let labctl = world.labctl.as_mut().expect("a running labctl");
    if let Some(status) = labctl.exited() {
        return Err(format!(
            "labctl exited on its own ({status}); log:\n{}",
            labctl.log_tail()
        ));
    }
    let log = labctl.log();
    if let Some(at) = log.find("panicked at") {
        return Err(format!(
            "labctl panicked: {}",
            &log[at..log.len().min(at + 2000)]
        ));
    }
    let latch = world.port(Who::Watcher).query("SYST:ESTOP?");
    let want = if model.latched { "1" } else { "0" };
    if latch != want {
        return Err(format!(
            "SYST:ESTOP? answers {latch:?}, the sequence set {want}\nlabctl log:\n{}",
            world.log_tail()
        ));
    }
    for run in model.live.clone() {
        let state = world.port(Who::Alice).run_state(&run.id);
        let seen = model.acknowledged.entry(run.id.clone()).or_default();
        *seen = (*seen).max(state.results);
        if matches!(state.state.as_str(), "failed" | "rejected") && state.reason.trim().is_empty() {
            return Err(format!(
                "run {} ended {} without a reason",
                run.id, state.state
            ));
        }
        // A proposal waits out a stop: it is decided, never started, until the stop is acknowledged.
        if model.latched && !state.is_final() && state.state != "awaiting_approval" {
            return Err(format!(
                "run {} is {} while the e-stop is latched",
                run.id, state.state
            ));
        }
        if run.awaiting && state.state != "awaiting_approval" {
            return Err(format!(
                "run {} is {} though nobody approved or rejected it",
                run.id, state.state
            ));
        }
    }
    check_wire(world, model)
}

/// Invariant 3: the journal holds what was acknowledged.
fn check_journal(world: &World, model: &Model) -> Result<(), Violation> {
    for run in &model.all_runs {
        let journal = world.bench.journal_results(run);
        let seqs: BTreeSet<i64> = journal.iter().filter_map(|r| r["seq"].as_i64()).collect();
        let acknowledged = model.acknowledged.get(run).copied().unwrap_or(0);
        if (seqs.len() as u64) < acknowledged {
            return Err(format!(
                "run {run}: RUN:STAT? acknowledged {acknowledged} results, the journal holds {}",
                seqs.len()
            ));
        }
        if let Some(reported) = model.reported.get(run) {
            let missing: Vec<_> = reported.difference(&seqs).collect();
            if !missing.is_empty() {
                return Err(format!(
                    "run {run}: results {missing:?} were printed by labctl but are not in the journal"
                ));
            }
        }
    }
    Ok(())
}

fn apply(
    world: &mut World,
    model: &mut Model,
    figures: &mut Figures,
    op: Op,
) -> Result<(), Violation> {
    match op {
        Op::Submit(who, kind) => {
            model.submitted += 1;
            let id = format!("{}-{}", world.name, model.submitted);
            let p = protocol(kind, &id);
            let valid = matches!(kind, Kind::DyeMix | Kind::HeatAndMove | Kind::Soak);
            if kind == Kind::DyeMix {
                world.bench.place_vial("mix1", "A1");
            }
            match world.port(who).submit(&p) {
                Ok(run) => {
                    if who == Who::Watcher {
                        return Err(format!("an observer's submission was accepted: {run}"));
                    }
                    if !valid {
                        return Err(format!(
                            "an invalid protocol ({kind:?}) was accepted: {run}"
                        ));
                    }
                    if model.latched {
                        return Err(format!("a submission was accepted while latched: {run}"));
                    }
                    if model.filler.is_some() {
                        return Err(format!(
                            "a submission was accepted while the journal's disk was full: {run}"
                        ));
                    }
                    figures.accepted_runs += 1;
                    let state = world.port(Who::Alice).run_state(&run);
                    let awaiting = state.state == "awaiting_approval";
                    if awaiting != (kind == Kind::Soak) {
                        return Err(format!(
                            "{kind:?} was accepted as {} (only the soak needs a technician)",
                            state.state
                        ));
                    }
                    model.all_runs.push(run.clone());
                    model.live.push(RunRec {
                        id: run,
                        owner: who,
                        awaiting,
                    });
                }
                Err(err) => {
                    figures.refusals += 1;
                    refusal_named("RUN:SUBM", &err)?;
                    if who == Who::Watcher && !err.starts_with("-203") {
                        return Err(format!("an observer's submission refused with {err}"));
                    } else if who != Who::Watcher && !valid && !model.latched {
                        // Refused for what it is, naming the field.
                        if !reason(&err).contains('/') {
                            return Err(format!(
                                "an invalid protocol ({kind:?}) refused without naming a field: {err}"
                            ));
                        }
                    } else if who != Who::Watcher && valid && !model.latched {
                        return Err(format!(
                            "{who:?}'s valid protocol ({kind:?}) refused while not latched: {err}"
                        ));
                    }
                }
            }
        }
        Op::Control(who, n, ctl) => {
            if model.live.is_empty() {
                return Ok(());
            }
            let i = n % model.live.len();
            let run = model.live[i].clone();
            let err = world
                .port(who)
                .command(&format!("{} {}", ctl.header(), run.id));
            let allowed = who == Who::Alice || who == run.owner;
            match err {
                None => {
                    if ctl == Ctl::Abort {
                        model.live[i].awaiting = false;
                    }
                    if !allowed {
                        return Err(format!(
                            "{who:?} could {ctl:?} {}'s run {}",
                            run.owner.credentials().0,
                            run.id
                        ));
                    }
                    if model.latched && ctl != Ctl::Abort {
                        return Err(format!("{ctl:?} of {} accepted while latched", run.id));
                    }
                }
                Some(err) => {
                    figures.refusals += 1;
                    refusal_named(ctl.header(), &err)?;
                    // While latched, a pause or resume is refused for the latch before anyone's role is
                    // looked at (docs/command-port.md): refused either way.
                    let latch_first = model.latched && ctl != Ctl::Abort;
                    if !allowed && !latch_first && !err.starts_with("-203") {
                        return Err(format!(
                            "{who:?}'s {ctl:?} of {} refused with {err}, not as forbidden",
                            run.id
                        ));
                    }
                    if allowed && err.starts_with("-203") {
                        return Err(format!(
                            "{who:?} may {ctl:?} {} but was refused: {err}",
                            run.id
                        ));
                    }
                }
            }
        }
        Op::Decide(who, n, approve) => {
            if model.live.is_empty() {
                return Ok(());
            }
            let i = n % model.live.len();
            let run = model.live[i].clone();
            let before = world.port(Who::Alice).run_state(&run.id);
            let line = if approve {
                format!("RUN:APPR {}", run.id)
            } else {
                format!("RUN:REJ {},\"chaos: not today\"", run.id)
            };
            let err = world.port(who).command(&line);
            let awaiting = before.state == "awaiting_approval";
            match (who, err) {
                (Who::Alice, None) => {
                    if !awaiting {
                        return Err(format!(
                            "{line} accepted though the run was {}",
                            before.state
                        ));
                    }
                    if approve && model.latched {
                        return Err(format!("{line} accepted while the e-stop was latched"));
                    }
                    if model.filler.is_some() {
                        return Err(format!(
                            "{line} acknowledged while the journal's disk was full"
                        ));
                    }
                    let after = world.port(Who::Alice).run_state(&run.id);
                    let want: &[&str] = if approve {
                        &["queued", "running", "completed", "failed", "aborted"]
                    } else {
                        &["rejected"]
                    };
                    if !want.contains(&after.state.as_str()) {
                        return Err(format!("after {line} the run is {}", after.state));
                    }
                    if approve {
                        figures.approvals += 1;
                    } else {
                        figures.rejections += 1;
                    }
                    model.live[i].awaiting = false;
                }
                (Who::Alice, Some(err)) => {
                    figures.refusals += 1;
                    refusal_named(&line, &err)?;
                    let explained =
                        !awaiting || (approve && model.latched) || model.filler.is_some();
                    if !explained {
                        return Err(format!(
                            "the technician's {line} was refused while the run awaited approval: {err}"
                        ));
                    }
                }
                (_, None) => return Err(format!("{who:?} could {line}")),
                (_, Some(err)) => {
                    figures.refusals += 1;
                    refusal_named(&line, &err)?;
                    if !err.starts_with("-203") {
                        return Err(format!(
                            "{who:?}'s {line} refused with {err}, not as forbidden"
                        ));
                    }
                }
            }
        }
        Op::FillDisk => {
            if model.filler.is_some() {
                return Ok(());
            }
            let (filler, err) = world.disk.fill();
            if err.kind() != std::io::ErrorKind::StorageFull {
                return Err(format!(
                    "filling the journal's disk stopped on {err}, not ENOSPC"
                ));
            }
            model.filler = Some(filler);
            figures.disk_fills += 1;
            // The next commit fails: a submission needs one.
            model.submitted += 1;
            let p = protocol(Kind::DyeMix, &format!("{}-{}", world.name, model.submitted));
            if let Ok(run) = world.port(Who::Rig).submit(&p) {
                return Err(format!("accepted with the journal's disk full: {run}"));
            }
            world.wait_for(
                Duration::from_secs(10),
                "the e-stop latched by the full disk",
                |w| w.port(Who::Watcher).query("SYST:ESTOP?") == "1",
            )?;
            model.latched = true;
            if model.latched_at.is_none() {
                model.latched_at = Some(marks(&world.taps));
            }
            for run in model.live.clone() {
                world.wait_for(
                    Duration::from_secs(10),
                    &format!("run {} ended by the full disk", run.id),
                    |w| {
                        let s = w.port(Who::Alice).run_state(&run.id);
                        s.is_final() || s.state == "awaiting_approval"
                    },
                )?;
            }
        }
        Op::FreeDisk => {
            if let Some(filler) = model.filler.take() {
                std::fs::remove_file(&filler)
                    .map_err(|e| format!("delete {}: {e}", filler.display()))?;
            }
        }
        Op::EStop(who) => {
            let from = marks(&world.taps);
            let expect: Vec<&'static str> = STOPPABLE
                .iter()
                .copied()
                .filter(|p| world.can_answer(model, p))
                .collect();
            let was_latched = model.latched;
            let t0 = Instant::now();
            let watcher = (!was_latched && who != Who::Watcher).then(|| {
                watch_safe_state(world.taps.clone(), from, expect, t0, Duration::from_secs(5))
            });
            let err = world.port(who).command("SYST:ESTOP");
            match (who, err) {
                (Who::Watcher, None) => return Err("an observer latched the e-stop".into()),
                (Who::Watcher, Some(err)) => {
                    figures.refusals += 1;
                    refusal_named("SYST:ESTOP", &err)?;
                }
                (_, Some(err)) if model.filler.is_none() || !err.contains("journal") => {
                    return Err(format!("{who:?}'s e-stop refused: {err}"));
                }
                // On a full disk the stop latches and says the journal could not record it.
                (_, _) => {
                    figures.estops += 1;
                    model.latched = true;
                    if model.latched_at.is_none() {
                        model.latched_at = Some(marks(&world.taps));
                    }
                    // Every run ends; every instrument that can hear it is safe in the physical model.
                    let unplugged = model.unplugged.clone();
                    let silent = model.faults.contains(&Fault::Silence);
                    let deadline = t0 + Duration::from_secs(5);
                    loop {
                        let unsafe_now: Vec<String> = world
                            .bench
                            .unsafe_instruments(false)
                            .into_iter()
                            .filter(|u| {
                                !(u.starts_with("hotplate")
                                    && (silent || unplugged.contains("hotplate")))
                            })
                            .collect();
                        if unsafe_now.is_empty() {
                            if !was_latched {
                                figures.estop_to_model.push(t0.elapsed());
                            }
                            break;
                        }
                        if Instant::now() > deadline {
                            return Err(format!(
                                "not safe 5 s after the e-stop: {unsafe_now:?}\nlabctl log:\n{}",
                                world.log_tail()
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    for run in model.live.clone() {
                        world.wait_for(
                            Duration::from_secs(10),
                            &format!("run {} ended by the e-stop", run.id),
                            // A proposal waits out the stop.
                            |w| {
                                let s = w.port(Who::Alice).run_state(&run.id);
                                s.is_final() || s.state == "awaiting_approval"
                            },
                        )?;
                    }
                }
            }
            if let Some(watcher) = watcher
                && let Ok(Some(latency)) = watcher.join()
            {
                figures.estop_to_wire.push(latency);
            }
        }
        Op::Acknowledge(who) => {
            // Whatever reached the wire while latched is judged before the latch goes.
            check_wire(world, model)?;
            match (who, world.port(who).command("SYST:ESTOP:ACK")) {
                (Who::Alice, None) if model.filler.is_some() && model.latched => {
                    return Err(
                        "the e-stop was released while the journal could not record the release"
                            .into(),
                    );
                }
                (Who::Alice, Some(err)) if model.filler.is_some() => {
                    figures.refusals += 1;
                    refusal_named("SYST:ESTOP:ACK", &err)?;
                }
                (Who::Alice, None) => {
                    if model.latched {
                        figures.acknowledgements += 1;
                    }
                    model.latched = false;
                    model.latched_at = None;
                }
                (Who::Alice, Some(err)) => {
                    return Err(format!(
                        "the technician's acknowledgement was refused: {err}"
                    ));
                }
                (_, None) => {
                    return Err(format!("{who:?} acknowledged the e-stop"));
                }
                (_, Some(err)) => {
                    figures.refusals += 1;
                    refusal_named("SYST:ESTOP:ACK", &err)?;
                }
            }
        }
        Op::Fault(fault, on) => set_fault(world, model, figures, fault, on)?,
        Op::Unplug(id) => {
            if model.unplugged.insert(id) {
                world.cut_here(model, &[id]);
                world.bench.unplug(id);
                world.cut_here(model, &[id]);
            }
        }
        Op::Replug(id) => {
            if model.unplugged.remove(id) {
                world.cut_here(model, &[id]);
                world.bench.replug(id);
            }
        }
        Op::Wait(ms) => std::thread::sleep(Duration::from_millis(ms)),
        Op::Kill => {
            figures.kills += 1;
            let labctl = world.labctl.take().expect("a running labctl");
            for run in &model.all_runs {
                model
                    .reported
                    .entry(run.clone())
                    .or_default()
                    .extend(labctl.reported_results(run));
            }
            world.ports.clear();
            labctl.kill();
            world.cut_here(model, &PORTS);
            // An operator frees the disk before starting the controller again.
            if let Some(filler) = model.filler.take() {
                std::fs::remove_file(&filler)
                    .map_err(|e| format!("delete {}: {e}", filler.display()))?;
            }
            check_journal(world, model)?;
            let gone = std::mem::take(&mut model.live);
            world.start_labctl(model)?;
            // The runs the killed process served are not resumed; a proposal awaiting approval awaits again.
            for mut run in gone {
                let state = world.bench.journal_state(&run.id);
                if matches!(
                    state.as_deref(),
                    Some("running" | "paused" | "queued") | None
                ) {
                    return Err(format!(
                        "run {} is {state:?} in the journal after the restart",
                        run.id
                    ));
                }
                if run.awaiting {
                    let now = world.port(Who::Alice).run_state(&run.id);
                    if now.state != "awaiting_approval" {
                        return Err(format!(
                            "proposal {} awaited approval before the kill and is {} after the restart",
                            run.id, now.state
                        ));
                    }
                    run.awaiting = true;
                    model.live.push(run);
                }
            }
            check_journal(world, model)?;
        }
    }
    check(world, model)
}

fn set_fault(
    world: &mut World,
    model: &mut Model,
    figures: &mut Figures,
    fault: Fault,
    on: bool,
) -> Result<(), Violation> {
    if model.faults.contains(&fault) == on {
        return Ok(());
    }
    let limit = Duration::from_secs(10);
    let watched = match fault {
        Fault::OverTemperature | Fault::Silence => "hotplate",
        Fault::Overload => "balance",
    };
    // An instrument that has not answered this controller process (unplugged, silent since a restart)
    // has said nothing to judge: its interlocks trip once it has (docs/controller.md, Safety).
    let answering = world
        .port(Who::Alice)
        .instrument_state(watched)
        .starts_with("online");
    match (fault, on) {
        (Fault::OverTemperature, true) => {
            let hears = answering && world.can_answer(model, "hotplate");
            world.drift("hotplate", 36_000.0);
            let deadline = Instant::now() + limit;
            let mut watcher = None;
            loop {
                let c = world.plate_c();
                if c > 130.0 && watcher.is_none() && hears {
                    let t0 = Instant::now();
                    watcher = Some(watch_safe_state(
                        world.taps.clone(),
                        marks(&world.taps),
                        vec!["hotplate"],
                        t0,
                        Duration::from_secs(10),
                    ));
                }
                if c >= 150.0 {
                    break;
                }
                if Instant::now() > deadline {
                    world.drift("hotplate", 0.0);
                    return Err(format!("the plate never read 150 C ({c} C)"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            world.drift("hotplate", 0.0);
            if let Some(watcher) = watcher
                && let Ok(Some(latency)) = watcher.join()
            {
                figures.trip_to_wire.push(latency);
            }
        }
        (Fault::OverTemperature, false) => {
            world.drift("hotplate", -36_000.0);
            let deadline = Instant::now() + limit;
            while world.plate_c() > 50.0 {
                if Instant::now() > deadline {
                    world.drift("hotplate", 0.0);
                    return Err("the plate never read 50 C again".into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            world.drift("hotplate", 0.0);
        }
        (Fault::Overload, true) => {
            world.drift("balance", 360_000.0);
            let deadline = Instant::now() + limit;
            while world.balance_g() < 230.0 {
                if Instant::now() > deadline {
                    world.drift("balance", 0.0);
                    return Err("the balance never read 230 g".into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            world.drift("balance", 0.0);
        }
        (Fault::Overload, false) => {
            world.drift("balance", -360_000.0);
            let deadline = Instant::now() + limit;
            while world.balance_g() > 50.0 {
                if Instant::now() > deadline {
                    world.drift("balance", 0.0);
                    return Err("the balance never read 50 g again".into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            world.drift("balance", 0.0);
        }
        (Fault::Silence, on) => {
            world
                .bench
                .sim
                .as_ref()
                .expect("the sim rig")
                .faults("hotplate")
                .expect("fault handle")
                .update(|f| f.no_reply = on)
                .expect("valid faults");
        }
    }
    if on {
        model.faults.insert(fault);
        let interlock = match fault {
            Fault::OverTemperature => "hotplate-over-temperature",
            Fault::Overload => "balance-overload",
            Fault::Silence => "hotplate-silent",
        };
        if !answering {
            return Ok(());
        }
        // The interlock trips (fail safe: an instrument that stops answering counts as tripped too).
        world.wait_for(
            Duration::from_secs(30),
            &format!("{interlock} tripped after {fault:?}"),
            |w| w.interlock(interlock).starts_with("TRIP"),
        )?;
        figures.interlock_trips += 1;
        if fault != Fault::Overload {
            let at = world.taps["hotplate"].total();
            model.hotplate_held_at.insert(fault, at);
        }
    } else {
        model.faults.remove(&fault);
        model.hotplate_held_at.remove(&fault);
    }
    Ok(())
}

/// Invariant 4: acknowledging and clearing what needs it, the health protocol completes.
fn back_to_service(
    world: &mut World,
    model: &mut Model,
    figures: &mut Figures,
) -> Result<(), Violation> {
    apply(world, model, figures, Op::FreeDisk)?;
    if model.latched {
        // The journal commits again within its retry period once the disk has space.
        world.wait_for(
            Duration::from_secs(10),
            "the technician's acknowledgement after the disk was freed",
            |w| w.port(Who::Alice).command("SYST:ESTOP:ACK").is_none(),
        )?;
        model.latched = false;
        model.latched_at = None;
    }
    for fault in model.faults.clone() {
        set_fault(world, model, figures, fault, false)?;
    }
    for id in model.unplugged.clone() {
        // A technician replugs what the controller shows unplugged. Replugging before the controller has
        // noticed the unplug would let it notice later, after the health protocol started: that run would be
        // paused by the trip, as it must be, and wait for a person (the long campaign of 2026-12-07 met this).
        world.wait_for(
            Duration::from_secs(30),
            &format!("{id} shown offline before it is replugged"),
            |w| {
                !w.port(Who::Alice)
                    .instrument_state(id)
                    .starts_with("online")
            },
        )?;
        apply(world, model, figures, Op::Replug(id))?;
    }
    for id in world.instrument_ids() {
        world.wait_for(
            Duration::from_secs(30),
            &format!("{id} online for the return to service"),
            |w| {
                w.port(Who::Alice)
                    .instrument_state(&id)
                    .starts_with("online")
            },
        )?;
    }
    let interlocks: Vec<String> = world
        .bench
        .lab
        .interlocks
        .iter()
        .map(|i| i.name.clone())
        .collect();
    for name in interlocks {
        world.wait_for(
            Duration::from_secs(30),
            &format!("{name} clear for the return to service"),
            |w| w.interlock(&name).starts_with("CLE"),
        )?;
    }
    for run in model.live.clone() {
        let _ = world
            .port(Who::Alice)
            .command(&format!("RUN:ABOR {}", run.id));
        world.wait_for(
            Duration::from_secs(20),
            &format!("run {} ended for the return to service", run.id),
            |w| w.port(Who::Alice).run_state(&run.id).is_final(),
        )?;
    }
    // Aborted by the technician, proposals included.
    for run in &mut model.live {
        run.awaiting = false;
    }
    world.bench.place_vial("health", "D5");
    model.submitted += 1;
    let p = health(&format!("{}-health-{}", world.name, model.submitted));
    let run = world
        .port(Who::Rig)
        .submit(&p)
        .map_err(|e| format!("the health protocol was refused: {e}"))?;
    model.all_runs.push(run.clone());
    model.live.push(RunRec {
        id: run.clone(),
        owner: Who::Rig,
        awaiting: false,
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = world.port(Who::Rig).run_state(&run);
        if state.is_final() {
            if state.state != "completed" || state.results != 1 {
                return Err(format!(
                    "the health protocol ended {state:?}\nlabctl log:\n{}",
                    world.log_tail()
                ));
            }
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the health protocol is still {state:?} after 60 s\nlabctl log:\n{}",
                world.log_tail()
            ));
        }
        std::thread::sleep(POLL);
    }
    check(world, model)?;
    check_journal(world, model)
}

/// Where a sequence failed.
#[derive(Debug, Clone)]
struct Failure {
    /// Index of the operation after which it failed (`ops.len()`: the return to service).
    at: usize,
    violation: Violation,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "after operation {}: {}", self.at, self.violation)
    }
}

fn rig() -> RigFile {
    let rig = RigFile::from_env().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        rig.skip_reason("unplug_and_replug").is_none() && rig.lab.lab_id == "sim",
        "the process chaos campaign needs the simulated lab (its faults, taps and model)"
    );
    rig
}

fn run_sequence(rig: &RigFile, name: &str, ops: &[Op], figures: &mut Figures) -> Option<Failure> {
    let mut at = 0;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut bench = Bench::start(rig, name);
        // The journal on a disk of its own, to fill.
        let disk = Tmpfs::mount(name, "32m");
        bench.data_dir = disk.path().join("data");
        let taps = PORTS
            .iter()
            .map(|p| {
                let tap = bench
                    .sim
                    .as_ref()
                    .and_then(|s| s.tap(p))
                    .unwrap_or_else(|| panic!("no wire tap on {p}"));
                (*p, tap)
            })
            .collect();
        let mut world = World {
            labctl: None,
            ports: BTreeMap::new(),
            disk,
            bench,
            taps,
            name: name.to_owned(),
        };
        let mut model = Model::default();
        world.start_labctl(&model)?;
        for (i, op) in ops.iter().enumerate() {
            at = i;
            figures.operations += 1;
            apply(&mut world, &mut model, figures, *op)?;
        }
        at = ops.len();
        let end = back_to_service(&mut world, &mut model, figures);
        if let Some(labctl) = world.labctl.take() {
            labctl.kill();
        }
        end
    }));
    let violation = match outcome {
        Ok(Ok(())) => return None,
        Ok(Err(v)) => v,
        Err(panic) => format!(
            "the campaign's harness failed: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        ),
    };
    Some(Failure { at, violation })
}

/// Removes chunks of operations, then single ones, while the sequence still fails, within `budget`.
fn shrink(rig: &RigFile, seed: u64, mut ops: Vec<Op>, budget: Duration) -> Vec<Op> {
    let started = Instant::now();
    let mut scratch = Figures::default();
    let mut attempt = 0;
    let mut chunk = ops.len() / 2;
    while chunk >= 1 && started.elapsed() < budget {
        let mut i = 0;
        while i < ops.len() && started.elapsed() < budget {
            let mut shorter = ops.clone();
            shorter.drain(i..(i + chunk).min(ops.len()));
            attempt += 1;
            let name = format!("chaos-{seed}-shrink-{attempt}");
            if let Some(failure) = run_sequence(rig, &name, &shorter, &mut scratch) {
                eprintln!(
                    "shrink: {} operations still fail ({failure})",
                    shorter.len()
                );
                ops = shorter;
            } else {
                i += chunk;
            }
        }
        chunk /= 2;
    }
    ops
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn summary(d: &[Duration]) -> String {
    if d.is_empty() {
        return "none measured".into();
    }
    let mut ms: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    format!(
        "n {} min {:.1} ms, median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        ms.len(),
        ms[0],
        pct(0.5),
        pct(0.95),
        ms[ms.len() - 1]
    )
}

/// Invariants of the helpers themselves: the generator is a function of the seed, every sequence has
/// a `kill -9`, refusals are parsed as the command port words them.
#[test]
fn sequences_are_a_function_of_the_seed() {
    assert_eq!(sequence(42, 30), sequence(42, 30));
    assert_ne!(sequence(42, 30), sequence(43, 30));
    for seed in 0..200 {
        assert!(sequence(seed, 5).contains(&Op::Kill), "seed {seed}");
    }
    assert_eq!(
        reason(
            "-203,\"Command protected;RUN:PAUS: rig-1 may not control run r: it belongs to alice\""
        ),
        "rig-1 may not control run r: it belongs to alice"
    );
    assert_eq!(reason("-200,\"Execution error\""), "");
}

#[test]
fn random_sequences_against_the_process_keep_every_safety_invariant() {
    let rig = rig();
    let sequences: u64 = env_or("LABCTL_PROCESS_CHAOS_SEQUENCES", 2);
    let first_seed: u64 = env_or("LABCTL_PROCESS_CHAOS_SEED", 0x00c4_a05e);
    let length: usize = env_or("LABCTL_PROCESS_CHAOS_LENGTH", 8);
    let shrink_budget = Duration::from_secs(env_or("LABCTL_PROCESS_CHAOS_SHRINK_SECS", 600));
    let keep_going = env_or("LABCTL_PROCESS_CHAOS_KEEP_GOING", 0u8) == 1;
    let mut failures: Vec<String> = Vec::new();
    let started = Instant::now();
    let mut f = Figures::default();
    for seed in first_seed..first_seed + sequences {
        let ops = sequence(seed, length);
        f.sequences += 1;
        let seq_started = Instant::now();
        let failure = run_sequence(&rig, &format!("chaos-{seed}"), &ops, &mut f);
        eprintln!(
            "seed {seed}: {} operations, {:.1} s, {}",
            ops.len(),
            seq_started.elapsed().as_secs_f64(),
            failure
                .as_ref()
                .map_or("ok".to_owned(), |x| format!("FAILED {x}"))
        );
        if let Some(failure) = failure {
            f.violations += 1;
            if keep_going {
                // The long campaign counts every failing sequence; each is re-run alone by its seed.
                let first_line = failure.to_string().lines().next().unwrap_or("").to_owned();
                failures.push(format!("seed {seed}: {first_line}\n  operations: {ops:?}"));
                continue;
            }
            let shortest = shrink(&rig, seed, ops.clone(), shrink_budget);
            let mut scratch = Figures::default();
            let again = run_sequence(
                &rig,
                &format!("chaos-{seed}-again"),
                &shortest,
                &mut scratch,
            )
            .map_or("passed when re-run".to_owned(), |x| x.to_string());
            panic!(
                "seed {seed}: {failure}\noperations: {ops:?}\nshortest reproduction found ({} operations; re-run: {again}): {shortest:?}\nre-run with LABCTL_PROCESS_CHAOS_SEED={seed} LABCTL_PROCESS_CHAOS_SEQUENCES=1 LABCTL_PROCESS_CHAOS_LENGTH={length}",
                shortest.len()
            );
        }
    }
    println!(
        "process chaos: seeds {first_seed}..{}, {} sequences of {length}, {} operations, {} kill -9 and restarts, {} e-stops, {} acknowledgements, {} approvals, {} rejections, {} full disks, {} interlock trips, {} runs accepted, {} refusals (all with a reason), {} violations, {:.1} s",
        first_seed + sequences,
        f.sequences,
        f.operations,
        f.kills,
        f.estops,
        f.acknowledgements,
        f.approvals,
        f.rejections,
        f.disk_fills,
        f.interlock_trips,
        f.accepted_runs,
        f.refusals,
        f.violations,
        started.elapsed().as_secs_f64()
    );
    println!(
        "e-stop sent -> last safe-state frame on the wire (wire tap, polled every 1 ms): {}",
        summary(&f.estop_to_wire)
    );
    println!(
        "e-stop sent -> every instrument safe in the physical model: {}",
        summary(&f.estop_to_model)
    );
    println!(
        "plate sensor past 130 C -> STOP_1 and STOP_4 on the hotplate's wire: {}",
        summary(&f.trip_to_wire)
    );
    assert!(
        failures.is_empty(),
        "{} sequences violated an invariant (re-run each with LABCTL_PROCESS_CHAOS_SEED=<seed> LABCTL_PROCESS_CHAOS_SEQUENCES=1 LABCTL_PROCESS_CHAOS_LENGTH={length} to shrink it):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Approvals and a full disk across two `kill -9`s, as a fixed sequence so that every CI run goes through
/// them: two proposals wait for a technician (an observer's and a rig's approvals refused), survive a kill,
/// one is rejected; the disk fills (the lab latches, an acknowledgement and an approval are refused), labctl
/// is killed on the full disk and restarted with space back: still latched, the other proposal still
/// awaiting; acknowledged, approved, it runs until a rig's e-stop; then the lab returns to service.
#[test]
fn approvals_and_a_full_disk_across_kills_keep_every_invariant() {
    let rig = rig();
    let ops = [
        Op::Submit(Who::Rig, Kind::Soak),
        Op::Submit(Who::Alice, Kind::Soak),
        Op::Decide(Who::Watcher, 0, true),
        Op::Decide(Who::Rig, 0, true),
        Op::Kill,
        Op::Decide(Who::Alice, 0, false),
        Op::FillDisk,
        Op::Acknowledge(Who::Alice),
        Op::Decide(Who::Alice, 1, true),
        Op::Kill,
        Op::Acknowledge(Who::Alice),
        Op::Decide(Who::Alice, 0, true),
        Op::Wait(500),
        Op::EStop(Who::Rig),
        Op::Acknowledge(Who::Alice),
    ];
    let mut figures = Figures::default();
    if let Some(failure) = run_sequence(&rig, "approvals-disk", &ops, &mut figures) {
        panic!("{failure}\noperations: {ops:?}");
    }
    assert_eq!(
        (
            figures.kills,
            figures.disk_fills,
            figures.approvals,
            figures.rejections
        ),
        (2, 1, 1, 1),
        "the sequence went through what it was written for: {figures:?}"
    );
}

/// Found by the campaign (seed 101, length 20): labctl killed while the gantry is held (its safe state,
/// here the e-stop's feed hold during a move) and started again. GRBL in Hold answers `$I` with error:8
/// (not idle); the driver's start took that for unsupported firmware and retried forever, so the gantry
/// never came back online and the lab could not return to service without a power cycle. Now the driver
/// completes the hold and resets GRBL before it identifies it.
#[test]
fn gantry_held_when_labctl_is_killed_comes_back_online() {
    let rig = rig();
    let bench = Bench::start(&rig, "held-gantry-kill");
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    let run = port
        .submit(&heat_and_move("held-gantry-kill"))
        .expect("accepted");
    let deadline = Instant::now() + Duration::from_secs(30);
    while bench.model(|m, now| m.gantry_status(now).state)
        != labctl_simulators::model::gantry::GantryState::Run
    {
        assert!(
            Instant::now() < deadline,
            "the gantry never moved: {:?}\n{}",
            port.run_state(&run),
            labctl.log_tail()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(port.command("SYST:ESTOP"), None);
    bench.assert_safe_within(Duration::from_secs(5), false);
    labctl.kill();
    let labctl = bench.labctl_listening(&[]);
    let mut port = bench.technician(&labctl);
    assert_eq!(
        port.query("SYST:ESTOP?"),
        "1",
        "the latch survives the kill"
    );
    port.wait_instrument("gantry", Duration::from_secs(30), "online", |s| {
        s.starts_with("online")
    });
}
