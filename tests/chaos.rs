//! The safety campaign: seeded, reproducible random sequences of what a lab sees (submissions valid and
//! invalid, approvals and rejections, pause/resume/abort by every role, e-stop and acknowledgement by every
//! role, interlock faults, unplug and replug, restarts of the controller on the same journal), driven
//! through the controller's one API on the lab's fake instruments, with the invariants checked after every
//! step:
//!
//! 1. no command reaches an instrument while the e-stop is latched, every command after a safe state comes
//!    after the driver's recovery, and every command the driver sees is inside the envelope;
//! 2. a latched e-stop is released only by a technician's acknowledgement, across any restart;
//! 3. every result the API reported is in the journal after a restart;
//! 4. the lab returns to service: acknowledging and clearing what needs it, the health protocol (home, a
//!    dispense, a reading) completes;
//! 5. nothing panics, and every refusal names its reason.
//!
//! `LABCTL_CHAOS_SEQUENCES` (default 12) and `LABCTL_CHAOS_SEED` (default fixed) choose the campaign; a
//! failing sequence prints its seed and the shortest reproduction found by removing operations one at a
//! time. docs/testing.md has the figures of the long campaign.

mod common;

use labctl::api::Face;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use labctl::api::{Control, ControllerHandle, Principal, RunState};
use labctl::controller::Controller;
use labctl::instruments::fake::FakeEvent;
use labctl::journal;
use labctl_drivers::DeviceState;
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use common::{Fakes, controller_on_fakes};

/// Panics anywhere in the process (controller tasks included) while a sequence runs.
static PANICS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Alice,
    Planner,
    Rig,
    Watcher,
}

impl Who {
    const ALL: [Who; 4] = [Who::Alice, Who::Planner, Who::Rig, Who::Watcher];

    fn principal(self) -> Principal {
        match self {
            Who::Alice => Principal::new("alice", Role::Technician, Face::InProcess),
            Who::Planner => Principal::new("planner-bo", Role::Planner, Face::InProcess),
            Who::Rig => Principal::new("rig-1", Role::Rig, Face::InProcess),
            Who::Watcher => Principal::new("watcher", Role::Observer, Face::InProcess),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stir,
    Weigh,
    Dispense,
    Gantry,
    /// Above the auto-approve limit: waits for a technician.
    Hot,
    /// Not a valid protocol.
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    OverTemperature,
    PumpAlarm,
    Overload,
    Unplug(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Submit(Who, Kind),
    /// Approve (`true`) or reject the n-th run awaiting approval.
    Decide(Who, usize, bool),
    Control(Who, usize, Control),
    EStop(Who),
    Acknowledge(Who),
    Fault(Fault),
    Clear(Fault),
    /// Let this many milliseconds pass (runs progress at 1000x).
    Elapse(u64),
    Restart,
}

const FAULTS: [Fault; 5] = [
    Fault::OverTemperature,
    Fault::PumpAlarm,
    Fault::Overload,
    Fault::Unplug("balance"),
    Fault::Unplug("hotplate"),
];

fn random_op(rng: &mut SmallRng) -> Op {
    let who = Who::ALL[rng.random_range(0..4)];
    match rng.random_range(0..100) {
        0..30 => {
            let kinds = [
                Kind::Stir,
                Kind::Weigh,
                Kind::Dispense,
                Kind::Gantry,
                Kind::Hot,
                Kind::Invalid,
            ];
            Op::Submit(who, kinds[rng.random_range(0..kinds.len())])
        }
        30..38 => Op::Decide(who, rng.random_range(0..3), rng.random_bool(0.7)),
        38..52 => {
            let control = [Control::Pause, Control::Resume, Control::Abort][rng.random_range(0..3)];
            Op::Control(who, rng.random_range(0..4), control)
        }
        52..58 => Op::EStop(who),
        58..66 => Op::Acknowledge(who),
        66..74 => Op::Fault(FAULTS[rng.random_range(0..FAULTS.len())]),
        74..84 => Op::Clear(FAULTS[rng.random_range(0..FAULTS.len())]),
        84..97 => Op::Elapse(rng.random_range(1..60)),
        _ => Op::Restart,
    }
}

fn protocol(kind: Kind, n: usize) -> Vec<u8> {
    let id = format!("chaos-{n}");
    let steps = match kind {
        Kind::Stir => json!([
            { "type": "action", "instrument": "hotplate", "action": "set_stir_speed", "params": { "speed_rpm": 300 } },
            { "type": "wait", "duration_s": 30 },
            { "type": "action", "instrument": "hotplate", "action": "stir_off", "params": {} }
        ]),
        Kind::Weigh => json!([
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m1" },
            { "type": "wait", "duration_s": 20 },
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m2" }
        ]),
        Kind::Dispense => json!([
            { "type": "action", "instrument": "gantry", "action": "move_to", "params": { "position": "A1" } },
            { "type": "action", "instrument": "pump-red", "action": "dispense", "params": { "vessel": "v1", "volume_ul": 50, "rate_ul_per_min": 600 } },
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m" }
        ]),
        Kind::Gantry => json!([
            { "type": "action", "instrument": "gantry", "action": "home", "params": {} },
            { "type": "action", "instrument": "gantry", "action": "move_to", "params": { "position": "A1" } },
            { "type": "wait", "duration_s": 10 }
        ]),
        Kind::Hot => json!([
            { "type": "action", "instrument": "hotplate", "action": "set_temperature", "params": { "temperature_c": 80 } },
            { "type": "wait", "duration_s": 10 },
            { "type": "action", "instrument": "hotplate", "action": "heater_off", "params": {} }
        ]),
        Kind::Invalid => {
            return serde_json::to_vec(
                &json!({ "version": 1, "metadata": { "proposal_id": id }, "steps": "none" }),
            )
            .unwrap();
        }
    };
    serde_json::to_vec(&json!({
        "version": 1,
        "metadata": { "name": id, "proposal_id": id, "planner": { "id": "planner-bo" } },
        "labware": [ { "id": "v1", "kind": "vial", "location": "A1", "capacity_ul": 20000 } ],
        "steps": steps
    }))
    .unwrap()
}

/// The standard health protocol: home, over the vial, a dispense, a reading.
fn health(n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "version": 1,
        "metadata": { "name": "health", "proposal_id": format!("health-{n}"), "planner": { "id": "planner-bo" } },
        "labware": [ { "id": "v1", "kind": "vial", "location": "A1", "capacity_ul": 20000 } ],
        "steps": [
            { "type": "action", "instrument": "gantry", "action": "home", "params": {} },
            { "type": "action", "instrument": "gantry", "action": "move_to", "params": { "position": "A1" } },
            { "type": "action", "instrument": "pump-red", "action": "dispense", "params": { "vessel": "v1", "volume_ul": 100, "rate_ul_per_min": 600 } },
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "mass" }
        ]
    }))
    .unwrap()
}

/// What the campaign expects, and what it has seen, across the sequence.
struct Model {
    latched: bool,
    faults: Vec<Fault>,
    /// Per instrument, how much of the fake's history was checked, and whether the latch covered it.
    checked: BTreeMap<String, usize>,
    /// Results the API reported per run (must be in the journal after any restart).
    reported: BTreeMap<String, u64>,
    submitted: usize,
}

/// The controller under test and its fake instruments.
struct TestLab {
    /// Taken only to shut it down.
    controller: Option<Controller>,
    fakes: Fakes,
}

impl TestLab {
    fn api(&self) -> &ControllerHandle {
        &self
            .controller
            .as_ref()
            .expect("a running controller")
            .handle
    }

    async fn shutdown(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown().await;
        }
    }
}

async fn start(dir: &Path, model: &Model) -> TestLab {
    let (controller, fakes, _handles) = controller_on_fakes(dir, Lab::sim(), |_| {}).await;
    let lab = TestLab {
        controller: Some(controller),
        fakes,
    };
    for fault in &model.faults {
        set_fault(&lab.fakes, *fault, true);
    }
    lab
}

fn set_fault(fakes: &Fakes, fault: Fault, on: bool) {
    let log = |id: &str| fakes[id].log.lock().unwrap();
    match fault {
        Fault::OverTemperature => {
            log("hotplate").values = vec![("plate_temperature_c", if on { 131.0 } else { 25.0 })];
        }
        Fault::PumpAlarm => {
            log("pump-red").state = Some(if on {
                DeviceState::Alarm("stalled".into())
            } else {
                DeviceState::Idle
            });
        }
        Fault::Overload => {
            log("balance").values = vec![("mass_g", if on { 215.0 } else { 10.0 })];
        }
        Fault::Unplug(id) => log(id).unplugged = on,
    }
}

/// The n-th run (in submission order) that matches `keep`, as the API lists them.
async fn nth_run(
    api: &ControllerHandle,
    n: usize,
    keep: impl Fn(RunState) -> bool,
) -> Option<String> {
    let runs: Vec<_> = api
        .runs()
        .await
        .into_iter()
        .filter(|r| keep(r.state))
        .collect();
    if runs.is_empty() {
        return None;
    }
    Some(runs[n % runs.len()].run_id.clone())
}

type Violation = String;

async fn apply(lab: &mut TestLab, dir: &Path, model: &mut Model, op: Op) -> Result<(), Violation> {
    let named = |r: &str, what: &str| {
        if r.trim().is_empty() {
            Err(format!("{what}: a refusal without a reason"))
        } else {
            Ok(())
        }
    };
    match op {
        Op::Submit(who, kind) => {
            model.submitted += 1;
            let reply = lab
                .api()
                .submit(protocol(kind, model.submitted), who.principal())
                .await;
            if !reply.accepted {
                let reason = reply
                    .error
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
                    + &reply
                        .findings
                        .iter()
                        .map(|f| f.message.clone())
                        .collect::<String>();
                named(&reason, "submit")?;
            } else if model.latched {
                return Err(format!(
                    "a submission was accepted while latched: {reply:?}"
                ));
            }
        }
        Op::Decide(who, n, approve) => {
            if let Some(run) = nth_run(lab.api(), n, |s| s == RunState::AwaitingApproval).await {
                let r = if approve {
                    lab.api().approve(&run, who.principal()).await
                } else {
                    lab.api().reject(&run, "chaos", who.principal()).await
                };
                if let Err(e) = r {
                    named(&e.to_string(), "decide")?;
                } else if who != Who::Alice {
                    return Err(format!("{who:?} decided on {run}"));
                }
            }
        }
        Op::Control(who, n, control) => {
            if let Some(run) = nth_run(lab.api(), n, |s| !s.is_terminal()).await
                && let Err(e) = lab.api().control(&run, control, who.principal()).await
            {
                named(&e.to_string(), "control")?;
            }
        }
        Op::EStop(who) => match lab.api().emergency_stop(who.principal()).await {
            Ok(()) => {
                if who == Who::Watcher {
                    return Err("an observer latched the e-stop".into());
                }
                if !model.latched {
                    model.latched = true;
                    // From here no command may reach any instrument until a technician acknowledges.
                    for (id, fake) in &lab.fakes {
                        model
                            .checked
                            .insert(id.clone(), fake.log.lock().unwrap().history.len());
                    }
                }
            }
            Err(e) => named(&e.to_string(), "estop")?,
        },
        Op::Acknowledge(who) => match lab.api().acknowledge_emergency_stop(who.principal()).await {
            Ok(()) => {
                if who != Who::Alice {
                    return Err(format!("{who:?} released the e-stop"));
                }
                check_histories(lab, model)?;
                model.latched = false;
            }
            Err(e) => named(&e.to_string(), "acknowledge")?,
        },
        Op::Fault(f) => {
            if !model.faults.contains(&f) {
                model.faults.push(f);
            }
            set_fault(&lab.fakes, f, true);
        }
        Op::Clear(f) => {
            model.faults.retain(|x| *x != f);
            set_fault(&lab.fakes, f, false);
        }
        Op::Elapse(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Op::Restart => {
            check_histories(lab, model)?;
            for run in lab.api().runs().await {
                let seen = model.reported.entry(run.run_id).or_default();
                *seen = (*seen).max(run.results);
            }
            lab.shutdown().await;
            *lab = start(dir, model).await;
            model.checked.clear();
            if model.latched {
                for (id, fake) in &lab.fakes {
                    model
                        .checked
                        .insert(id.clone(), fake.log.lock().unwrap().history.len());
                }
            }
            check_journal(dir, model)?;
        }
    }
    check_latch(lab, model).await?;
    check_histories(lab, model)
}

/// Invariant 2: the latch the lab shows is the one the sequence set (it may take a tick to show).
async fn check_latch(lab: &TestLab, model: &Model) -> Result<(), Violation> {
    let mut snapshots = lab.api().watch_snapshot();
    let want = model.latched;
    match tokio::time::timeout(
        Duration::from_secs(2),
        snapshots.wait_for(|s| s.estop_latched == want),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        _ => Err(format!(
            "the e-stop shows latched = {}, expected {want}",
            !want
        )),
    }
}

/// Invariant 1 on the fakes' histories.
fn check_histories(lab: &TestLab, model: &Model) -> Result<(), Violation> {
    let sim = Lab::sim();
    for (id, fake) in &lab.fakes {
        let log = fake.log.lock().unwrap();
        let config = sim.instrument(id).unwrap();
        if model.latched {
            let from = model.checked.get(id).copied().unwrap_or(0);
            if let Some(cmd) = log.history[from.min(log.history.len())..]
                .iter()
                .find(|e| matches!(e, FakeEvent::Command(_)))
            {
                return Err(format!(
                    "{id}: {cmd:?} reached the driver while the e-stop was latched"
                ));
            }
        }
        let mut disarmed = false;
        for event in &log.history {
            match event {
                FakeEvent::Safe => disarmed = true,
                FakeEvent::Recover => disarmed = false,
                FakeEvent::Command(cmd) => {
                    if disarmed {
                        return Err(format!("{id}: {cmd:?} after a safe state without recovery"));
                    }
                    if let Err(v) = labctl::safety::check_command(config, cmd) {
                        return Err(format!("{id}: {cmd:?} outside the envelope: {v}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Invariant 3: whatever the API reported before a restart is in the journal after it.
fn check_journal(dir: &Path, model: &Model) -> Result<(), Violation> {
    let conn = journal::open_db(dir).map_err(|e| e.to_string())?;
    for (run, reported) in &model.reported {
        let on_disk = journal::read::results(&conn, run, 0)
            .map_err(|e| e.to_string())?
            .len() as u64;
        if on_disk < *reported {
            return Err(format!(
                "{run}: {reported} results reported, {on_disk} in the journal after the restart"
            ));
        }
    }
    Ok(())
}

/// Invariant 4: acknowledging and clearing what needs it, the health protocol completes.
async fn back_to_service(lab: &mut TestLab, model: &mut Model) -> Result<(), Violation> {
    for fault in std::mem::take(&mut model.faults) {
        set_fault(&lab.fakes, fault, false);
    }
    if model.latched {
        lab.api()
            .acknowledge_emergency_stop(Who::Alice.principal())
            .await
            .map_err(|e| format!("the technician's acknowledgement was refused: {e}"))?;
        check_histories(lab, model)?;
        model.latched = false;
    }
    // As a technician would: every instrument heard from since the faults were cleared (a replugged one
    // reconnects with backoff, up to 10 s; a view from before the clearing proves nothing), and no
    // interlock holding.
    let cleared = Instant::now();
    let mut snapshots = lab.api().watch_snapshot();
    tokio::time::timeout(
        Duration::from_secs(30),
        // Non-empty: right after a restart the snapshot may not list the instruments yet.
        snapshots.wait_for(|s| {
            s.interlocks_tripped.is_empty()
                && !s.instruments.is_empty()
                && s.instruments.iter().all(|i| {
                    i.connection == labctl::instruments::Connection::Online
                        && i.last_seen.is_some_and(|t| t > cleared)
                })
        }),
    )
    .await
    .map_err(|_| {
        "instruments offline or interlocks tripped 30 s after every fault was cleared".to_string()
    })?
    .map_err(|e| e.to_string())?;
    // Runs still holding instruments are the technician's to end.
    for run in lab.api().runs().await {
        if !run.state.is_terminal() {
            let _ = lab
                .api()
                .control(&run.run_id, Control::Abort, Who::Alice.principal())
                .await;
        }
    }
    model.submitted += 1;
    let reply = lab
        .api()
        .submit(health(model.submitted), Who::Planner.principal())
        .await;
    let run = reply
        .run_id
        .clone()
        .ok_or_else(|| format!("the health protocol was refused: {reply:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = lab.api().run(&run).await.unwrap();
        match info.state {
            RunState::Completed => return Ok(()),
            s if s.is_terminal() => {
                return Err(format!(
                    "the health protocol ended {s}: {:?}; instruments: {:?}",
                    info.reason,
                    connections(lab)
                ));
            }
            _ if Instant::now() > deadline => {
                return Err(format!(
                    "the health protocol is still {} after 20 s (step {:?}, {:?}); instruments: {:?}",
                    info.state,
                    info.current_step,
                    info.reason,
                    connections(lab)
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Each instrument's connection as the lab shows it, and whether its fake is unplugged: what a failing
/// return to service prints.
fn connections(lab: &TestLab) -> Vec<(String, String, bool)> {
    lab.api()
        .snapshot()
        .instruments
        .iter()
        .map(|i| {
            let unplugged = lab.fakes[&i.id].log.lock().unwrap().unplugged;
            (i.id.clone(), format!("{:?}", i.connection), unplugged)
        })
        .collect()
}

struct Outcome {
    violation: Option<(usize, Violation)>,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.violation {
            None => write!(f, "ok"),
            Some((i, v)) => write!(f, "after operation {i}: {v}"),
        }
    }
}

async fn run_sequence(ops: &[Op]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model {
        latched: false,
        faults: Vec::new(),
        checked: BTreeMap::new(),
        reported: BTreeMap::new(),
        submitted: 0,
    };
    let panics_before = PANICS.load(Ordering::SeqCst);
    let mut lab = start(dir.path(), &model).await;
    for (i, op) in ops.iter().enumerate() {
        if let Err(v) = apply(&mut lab, dir.path(), &mut model, *op).await {
            lab.shutdown().await;
            return Outcome {
                violation: Some((i, v)),
            };
        }
        if PANICS.load(Ordering::SeqCst) != panics_before {
            lab.shutdown().await;
            return Outcome {
                violation: Some((i, "a panic".into())),
            };
        }
    }
    let end = back_to_service(&mut lab, &mut model).await;
    lab.shutdown().await;
    Outcome {
        violation: end.err().map(|v| (ops.len(), v)),
    }
}

/// Removes operations one at a time while the sequence still fails: the shortest reproduction found.
async fn shrink(mut ops: Vec<Op>) -> Vec<Op> {
    let mut i = 0;
    while i < ops.len() {
        let mut shorter = ops.clone();
        shorter.remove(i);
        if run_sequence(&shorter).await.violation.is_some() {
            ops = shorter;
        } else {
            i += 1;
        }
    }
    ops
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_keep_every_safety_invariant() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let sequences: u64 = env_or("LABCTL_CHAOS_SEQUENCES", 12);
    let first_seed: u64 = env_or("LABCTL_CHAOS_SEED", 0x001a_bc71);
    let length: usize = env_or("LABCTL_CHAOS_LENGTH", 40);
    let started = Instant::now();
    let (mut operations, mut restarts, mut estops) = (0, 0, 0);
    for seed in first_seed..first_seed + sequences {
        let mut rng = SmallRng::seed_from_u64(seed);
        let ops: Vec<Op> = (0..length).map(|_| random_op(&mut rng)).collect();
        operations += ops.len();
        restarts += ops.iter().filter(|o| **o == Op::Restart).count();
        estops += ops.iter().filter(|o| matches!(o, Op::EStop(_))).count();
        let outcome = run_sequence(&ops).await;
        if outcome.violation.is_some() {
            let shortest = shrink(ops.clone()).await;
            let again = run_sequence(&shortest).await;
            panic!(
                "seed {seed}: {outcome}\nshortest reproduction ({} operations, {again}):\n{shortest:#?}",
                shortest.len()
            );
        }
    }
    println!(
        "chaos: {sequences} sequences, {operations} operations ({restarts} restarts, {estops} e-stop attempts), 0 violations, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
