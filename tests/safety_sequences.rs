//! Safety sequences of the real binary, as an independent client sees them: `labctl run --sim` as a child
//! process on a temporary data directory, driven over its TCP command port with plain lines (and, for the
//! one thing the command port cannot do, a technician's approval, over its embedded MQTT broker). Each test
//! proves one safety property across what a lab meets in practice: the emergency stop stays latched through
//! SIGKILL and only a technician releases it; a second controller cannot take over a data directory in use;
//! a gantry aborted in the middle of a move serves the next run; a proposal awaiting approval survives
//! SIGKILL and its proposal id keeps meaning one protocol; a journal that cannot commit (disk full) stops
//! the lab until a technician acknowledges.

#![cfg(unix)]

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use labctl_hil_tests::tmpfs::Tmpfs;

use common::{
    ENDED_STATES, ScpiClient, SimProcess, dye_mix_json, protocol_file_json, start_sim_process,
};
use serde_json::json;

/// Protocol waits run 20 times faster; a step timeout is never shorter than 10 real seconds.
const WARP: &str = "20";
/// How long a dye mix may take to complete (about 7 s at warp 20).
const DYE_MIX: Duration = Duration::from_secs(45);
/// How long a run may take to start or to change state after a command.
const PROMPTLY: Duration = Duration::from_secs(15);

const TECHNICIAN: (&str, &str) = ("alice", "technician-dev");
const RIG: (&str, &str) = ("rig-1", "rig-dev");

/// A temporary directory with the controller's data directory and its log beside it.
struct Bench {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let log = dir.path().join("labctl.log");
        Bench {
            _dir: dir,
            data,
            log,
        }
    }

    fn start(&self) -> SimProcess {
        start_sim_process(&self.data, &self.log, WARP)
    }
}

fn login(lab: &SimProcess, (user, password): (&str, &str)) -> ScpiClient {
    ScpiClient::login(lab.command_port, user, password)
}

/// Asserts that `run_id` reaches `completed`, with the labctl log in the message when it does not.
fn assert_completes(c: &mut ScpiClient, lab: &SimProcess, run_id: &str, what: &str) {
    let stat = c.wait_run(run_id, DYE_MIX, "completed", |s| {
        ENDED_STATES.contains(&s.state.as_str())
    });
    assert_eq!(
        stat.state,
        "completed",
        "{what} ({run_id}) was expected to complete, RUN:STAT? gave {}; labctl's log:\n{}",
        stat.reply,
        lab.log_tail()
    );
}

/// The emergency stop latched by a technician is still latched after the controller is killed with SIGKILL
/// and started again; while latched a rig can neither submit nor acknowledge; the technician's
/// acknowledgement releases it and the lab runs the dye mix again.
#[test]
fn estop_survives_sigkill_and_only_a_technician_releases_it() {
    let bench = Bench::new();
    let lab = bench.start();
    let mut alice = login(&lab, TECHNICIAN);
    alice.ok("SYST:ESTOP");
    assert!(
        alice.estop_latched(),
        "SYST:ESTOP? answers 1 right after alice's SYST:ESTOP"
    );
    drop(alice);
    lab.sigkill();

    let lab = bench.start();
    let mut rig = login(&lab, RIG);
    assert!(
        rig.estop_latched(),
        "SYST:ESTOP? answers 1 after SIGKILL and restart: the latch must survive the process; labctl's log:\n{}",
        lab.log_tail()
    );
    let err = rig
        .try_submit(&dye_mix_json("safety-estop-latched"))
        .expect_err(
            "a rig's RUN:SUBM is refused while the emergency stop is latched after a restart",
        );
    assert!(
        err.starts_with("-200,") && err.contains("emergency stop is latched"),
        "the refusal of RUN:SUBM names the latched emergency stop (-200), got {err:?}"
    );
    // -203 names who was refused (docs/command-port.md).
    let err = rig.refused("SYST:ESTOP:ACK", -203);
    assert!(
        err.contains("rig-1"),
        "a rig's SYST:ESTOP:ACK is refused (-203) naming rig-1, got {err:?}"
    );
    assert!(
        rig.estop_latched(),
        "SYST:ESTOP? still answers 1 after the rig's refused acknowledgement"
    );

    let mut alice = login(&lab, TECHNICIAN);
    alice.ok("SYST:ESTOP:ACK");
    assert!(
        !alice.estop_latched(),
        "SYST:ESTOP? answers 0 after alice's SYST:ESTOP:ACK"
    );
    let run_id = rig.submit(&dye_mix_json("safety-estop-after"));
    assert_completes(
        &mut rig,
        &lab,
        &run_id,
        "the dye mix after the acknowledgement",
    );
}

/// A second `labctl run` on a data directory in use exits with an error saying so, and leaves the first
/// controller and its run alone.
#[test]
fn a_second_controller_on_the_same_data_directory_is_refused() {
    let bench = Bench::new();
    let lab = bench.start();
    let mut rig = login(&lab, RIG);
    let run_id = rig.submit(&dye_mix_json("safety-second-controller"));
    rig.wait_run(&run_id, PROMPTLY, "queued or running", |s| {
        s.state == "queued" || s.state == "running"
    });

    let mut second = common::labctl_run_sim_command(&bench.data, WARP)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the second labctl");
    let mut stderr = second.stderr.take().unwrap();
    // Read standard error on the side, so a chatty process never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut second = common::Labctl(second);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.0.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.is_none() {
        let _ = second.0.kill();
        let _ = second.0.wait();
    }
    let stderr = common::strip_ansi(&reader.join().unwrap());
    let status = status.unwrap_or_else(|| {
        panic!(
            "a second labctl run on the data directory in use was expected to exit within 20 s, it was \
             still running (killed now); its stderr:\n{stderr}"
        )
    });
    assert!(
        !status.success(),
        "the second labctl on the same data directory exits with a non-zero status, got {status}; its \
         stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("in use"),
        "the second labctl's stderr says the data directory is in use, got:\n{stderr}"
    );

    assert!(
        !rig.estop_latched(),
        "the first controller still answers SYST:ESTOP? with 0"
    );
    let stat = rig.run_stat(&run_id);
    assert_ne!(
        stat.state, "interrupted",
        "the first controller's run must not be interrupted by the refused second controller: {}",
        stat.reply
    );
    assert_completes(
        &mut rig,
        &lab,
        &run_id,
        "the first controller's dye mix, submitted before the second started",
    );
}

/// A long gantry move across the deck, aborted in the middle, leaves the gantry able to serve the next
/// run: the dye mix after it homes and completes.
#[test]
fn gantry_aborted_mid_move_serves_the_next_run() {
    let bench = Bench::new();
    let lab = bench.start();
    let mut rig = login(&lab, RIG);
    // From home (0, 0, 50) to the far corner at 150 mm/min: 360 mm, 144 s of protocol time, about 7 s here.
    let crossing = json!({
        "version": 1,
        "metadata": {
            "name": "Long gantry move (abort test)",
            "proposal_id": "safety-gantry-crossing",
            "planner": { "id": "safety-tests" }
        },
        "steps": [
            { "type": "action", "id": "home", "instrument": "gantry", "action": "home", "params": {}, "timeout_s": 60 },
            { "type": "action", "id": "cross", "instrument": "gantry", "action": "move_xyz",
              "params": { "x_mm": 300, "y_mm": 200, "z_mm": 50, "feed_mm_per_min": 150 }, "timeout_s": 600 }
        ]
    })
    .to_string();
    let run_id = rig.submit(&crossing);
    let stat = rig.run_stat(&run_id);
    assert!(
        stat.state == "queued" || stat.state == "running",
        "the crossing is approved automatically (queued or running), got {}",
        stat.reply
    );
    // Mid-move: the run is on the move step and the gantry has the move in flight (the position is only
    // read back between commands, so it says nothing while the head travels).
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let stat = rig.run_stat(&run_id);
        let gantry = rig.query("INST:STAT? gantry");
        if stat.state == "running"
            && stat.step == "/steps/1"
            && gantry.split(',').nth(2) == Some("1")
        {
            break;
        }
        assert!(
            !ENDED_STATES.contains(&stat.state.as_str()),
            "the crossing was expected to be caught in its move, but it ended: {}",
            stat.reply
        );
        assert!(
            Instant::now() < deadline,
            "the crossing was expected to be running /steps/1 with the gantry busy within {PROMPTLY:?}; \
             RUN:STAT?: {}; INST:STAT? gantry: {gantry}",
            stat.reply
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rig.ok(&format!("RUN:ABOR {run_id}"));
    let stat = rig.wait_run(&run_id, PROMPTLY, "aborted after RUN:ABOR", |s| {
        s.state == "aborted"
    });
    assert_eq!(
        stat.step, "/steps/1",
        "the crossing was aborted during the move step: {}",
        stat.reply
    );

    let next = rig.submit(&dye_mix_json("safety-gantry-next"));
    assert_completes(
        &mut rig,
        &lab,
        &next,
        "the dye mix after the aborted gantry move",
    );
}

/// A small protocol that heats the plate above the auto-approve limit (60 °C), so it waits for a
/// technician; `celsius` makes different bodies under one proposal id.
fn warm_plate(proposal_id: &str, celsius: f64) -> String {
    json!({
        "version": 1,
        "metadata": {
            "name": "Warm plate (needs approval)",
            "proposal_id": proposal_id,
            "planner": { "id": "safety-tests" }
        },
        "steps": [
            { "type": "action", "id": "heat", "instrument": "hotplate", "action": "set_temperature",
              "params": { "temperature_c": celsius } },
            { "type": "action", "id": "off", "instrument": "hotplate", "action": "heater_off", "params": {} }
        ]
    })
    .to_string()
}

/// Alice connected to the embedded MQTT broker, with what `rejections` has said since.
struct MqttTechnician {
    _client: rumqttc::Client,
    rejections: Arc<Mutex<Vec<String>>>,
}

impl MqttTechnician {
    /// What `rejections` (and the connection, if it failed) said so far.
    fn rejections(&self) -> Vec<String> {
        lock(&self.rejections).clone()
    }
}

/// The list, even if a thread panicked while holding it.
fn lock(list: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
    list.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A technician's approval over the embedded MQTT broker (the command port has no approval command);
/// returns once the broker has acknowledged the message.
fn approve_over_mqtt(mqtt_port: u16, run_id: &str) -> MqttTechnician {
    use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
    let mut opts = MqttOptions::new(
        format!("safety-alice-{}", std::process::id()),
        "127.0.0.1",
        mqtt_port,
    );
    opts.set_credentials(TECHNICIAN.0, TECHNICIAN.1);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(opts, 16);
    let rejections = Arc::new(Mutex::new(Vec::new()));
    let seen = rejections.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = tx.send("connack");
                }
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    let _ = tx.send("suback");
                }
                Ok(Event::Incoming(Incoming::PubAck(_))) => {
                    let _ = tx.send("puback");
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    lock(&seen).push(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Ok(_) => {}
                Err(e) => {
                    lock(&seen).push(format!("connection error: {e}"));
                    return;
                }
            }
        }
    });
    let expect = |what: &str| {
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            got,
            Ok(what),
            "alice over MQTT on port {mqtt_port}: expected {what}; rejections/errors so far: {:?}",
            lock(&rejections)
        );
    };
    expect("connack");
    client
        .subscribe("labctl/sim/rejections", QoS::AtLeastOnce)
        .unwrap();
    expect("suback");
    client
        .publish(
            format!("labctl/sim/runs/{run_id}/approval"),
            QoS::AtLeastOnce,
            false,
            br#"{"decision": "approve"}"#.to_vec(),
        )
        .unwrap();
    expect("puback");
    MqttTechnician {
        _client: client,
        rejections,
    }
}

/// A proposal awaiting approval is still awaiting it after SIGKILL and restart, a technician approves it
/// and it completes; its proposal id keeps meaning that one protocol: a different body is refused, the
/// same body is a duplicate of the same run, before and after another restart.
#[test]
fn proposal_awaiting_approval_survives_sigkill() {
    let bench = Bench::new();
    let lab = bench.start();
    let mut rig = login(&lab, RIG);
    let proposal = "safety-approval-1";
    let body = warm_plate(proposal, 70.0);
    let other_body = warm_plate(proposal, 65.0);
    let run_id = rig.submit(&body);
    let stat = rig.run_stat(&run_id);
    assert_eq!(
        stat.state, "awaiting_approval",
        "a plate at 70 °C (above the 60 °C auto-approve limit) waits for a technician: {}",
        stat.reply
    );
    drop(rig);
    lab.sigkill();

    let lab = bench.start();
    let mut rig = login(&lab, RIG);
    let stat = rig.run_stat(&run_id);
    assert_eq!(
        stat.state,
        "awaiting_approval",
        "after SIGKILL and restart the proposal still awaits approval (not unknown, not interrupted): {}; \
         labctl's log:\n{}",
        stat.reply,
        lab.log_tail()
    );
    let alice = approve_over_mqtt(lab.mqtt_port, &run_id);
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let stat = rig.run_stat(&run_id);
        if stat.state != "awaiting_approval" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's approval over MQTT was expected to take the run out of awaiting_approval within \
             {PROMPTLY:?}; RUN:STAT?: {}; what labctl/sim/rejections said: {:?}",
            stat.reply,
            alice.rejections()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stat = rig.wait_run(&run_id, DYE_MIX, "completed after alice's approval", |s| {
        ENDED_STATES.contains(&s.state.as_str())
    });
    assert_eq!(
        stat.state,
        "completed",
        "the approved proposal runs to completion, RUN:STAT? gave {}; MQTT rejections: {:?}",
        stat.reply,
        alice.rejections()
    );

    let check_identity = |rig: &mut ScpiClient, when: &str| {
        let err = rig.try_submit(&other_body).expect_err(&format!(
            "{when}: the same proposal id with a different protocol is refused"
        ));
        assert!(
            err.contains(proposal),
            "{when}: the refusal of a different protocol under a used proposal id names the proposal id \
             {proposal}, got {err:?}"
        );
        let again = rig.try_submit(&body);
        assert_eq!(
            again,
            Ok(run_id.clone()),
            "{when}: the identical protocol under the same proposal id is a duplicate of run {run_id}"
        );
    };
    check_identity(&mut rig, "after the first restart");
    drop(rig);
    lab.sigkill();

    let lab = bench.start();
    let mut rig = login(&lab, RIG);
    check_identity(&mut rig, "after the second restart");
    let stat = rig.run_stat(&run_id);
    assert_eq!(
        stat.state, "completed",
        "after the second restart the run is still completed: {}",
        stat.reply
    );
}

/// When the journal's file system fills up under a running protocol, the lab latches its emergency stop
/// (nothing it does could be recorded), the run stops and nothing new is accepted; once space is back and
/// a technician acknowledges, the lab runs the dye mix again.
#[test]
fn a_full_disk_under_the_journal_stops_the_lab_until_a_technician_acknowledges() {
    // Declared before the process, so the process is killed before the tmpfs is unmounted.
    let tmpfs = Tmpfs::mount("safety-disk-full", "16m");
    let bench = Bench::new();
    let data = tmpfs.path().join("data");
    let lab = start_sim_process(&data, &bench.log, WARP);
    let mut rig = login(&lab, RIG);
    let titration = protocol_file_json("tests/fixtures/long-titration.json", "safety-disk-full");
    let run_id = rig.submit(&titration);
    rig.wait_run(&run_id, PROMPTLY, "running with a result", |s| {
        s.state == "running" && s.results > 0
    });

    let (filler, err) = tmpfs.fill();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "filling the tmpfs stops at ENOSPC, got {err}"
    );

    let mut alice = login(&lab, TECHNICIAN);
    let deadline = Instant::now() + PROMPTLY;
    while !alice.estop_latched() {
        assert!(
            Instant::now() < deadline,
            "with the journal's disk full the lab latches its emergency stop within {PROMPTLY:?}: \
             SYST:ESTOP? still answers 0; run: {}; labctl's log:\n{}",
            rig.run_stat(&run_id).reply,
            lab.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The run stops when the journal cannot commit (it ends, or at least leaves `running`).
    rig.wait_run(
        &run_id,
        PROMPTLY,
        "no longer running after the latch",
        |s| s.state != "running",
    );
    let err = rig
        .try_submit(&dye_mix_json("safety-disk-full-refused"))
        .expect_err(
            "a rig's submission is refused while the journal's disk is full and the stop latched",
        );
    assert!(
        err.starts_with("-200,"),
        "the refused submission is an execution error (-200), got {err:?}"
    );

    std::fs::remove_file(&filler).expect("delete the filler file");
    alice.ok("SYST:ESTOP:ACK");
    assert!(
        !alice.estop_latched(),
        "SYST:ESTOP? answers 0 after alice acknowledges with space back on the disk"
    );
    let run_id = rig.submit(&dye_mix_json("safety-disk-full-after"));
    assert_completes(
        &mut rig,
        &lab,
        &run_id,
        "the dye mix after the disk-full stop was acknowledged",
    );
}

/// A stop the journal could not record still holds after `kill -9`: with the disk full, the latch set by
/// the failing journal cannot go into the database, so it goes into a block of its own reserved when the
/// controller started. A restart on the still-full disk refuses to start or comes up latched; with space
/// back it comes up latched, and only a technician's acknowledgement returns the lab to service.
#[test]
fn a_stop_set_by_a_full_disk_survives_kill_9_and_restarts_until_a_technician_acknowledges() {
    let tmpfs = Tmpfs::mount("safety-disk-full-kill", "16m");
    let bench = Bench::new();
    let data = tmpfs.path().join("data");
    let lab = start_sim_process(&data, &bench.log, WARP);
    let mut rig = login(&lab, RIG);
    let titration = protocol_file_json("tests/fixtures/long-titration.json", "disk-full-kill");
    let run_id = rig.submit(&titration);
    rig.wait_run(&run_id, PROMPTLY, "running with a result", |s| {
        s.state == "running" && s.results > 0
    });
    let (filler, err) = tmpfs.fill();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let mut alice = login(&lab, TECHNICIAN);
    let deadline = Instant::now() + PROMPTLY;
    while !alice.estop_latched() {
        assert!(
            Instant::now() < deadline,
            "the full disk latches the stop within {PROMPTLY:?}; log:\n{}",
            lab.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.sigkill();

    // On the still-full disk: either labctl refuses to start, naming its journal, or it starts latched.
    let mut child = common::labctl_run_sim_command(&data, WARP)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn labctl");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut started = None;
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stdout, &mut line).unwrap_or(0) > 0 {
        if let Some(rest) = line.trim().strip_prefix("command port: tcp ") {
            started = rest.trim().parse::<std::net::SocketAddr>().ok();
            break;
        }
        line.clear();
    }
    let mut guard = common::Labctl(child);
    match started {
        Some(addr) => {
            let mut alice = ScpiClient::login(addr, TECHNICIAN.0, TECHNICIAN.1);
            assert!(
                alice.estop_latched(),
                "restarted on the full disk, SYST:ESTOP? answers 0: the stop the journal could not record was lost"
            );
        }
        None => {
            let status = guard.0.wait().expect("labctl's status");
            let mut stderr = String::new();
            guard
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            assert!(
                !status.success() && stderr.contains("journal"),
                "on a full disk labctl either starts latched or refuses to start naming its journal; it \
                 exited {status} saying:\n{stderr}"
            );
        }
    }
    drop(guard);

    std::fs::remove_file(&filler).expect("delete the filler file");
    let lab = start_sim_process(&data, &bench.log, WARP);
    let mut alice = login(&lab, TECHNICIAN);
    assert!(
        alice.estop_latched(),
        "with space back, the restarted lab must still hold the stop the full disk set; log:\n{}",
        lab.log_tail()
    );
    let mut rig = login(&lab, RIG);
    rig.try_submit(&dye_mix_json("disk-full-kill-latched"))
        .expect_err("nothing is accepted while the stop holds");
    alice.ok("SYST:ESTOP:ACK");
    assert!(!alice.estop_latched());
    let run_id = rig.submit(&dye_mix_json("disk-full-kill-after"));
    assert_completes(
        &mut rig,
        &lab,
        &run_id,
        "the dye mix after the full disk's stop was acknowledged",
    );
}
