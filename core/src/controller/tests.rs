//! The whole controller on tokio's paused clock: the executor, the interlocks and the tick (on the test's
//! runtime, see `TickDriver::PausedRuntime`) all wait on tokio's clock, which jumps to the next deadline
//! when every task waits. An hour of protocol, a night awaiting approval or a ten-minute override take no
//! real time, and the instants things happen at are asserted, not slept for. Fake instruments answer at
//! once; the journal is a real SQLite file whose commits hold the paused clock still.

use crate::api::Face;
use std::collections::BTreeMap;
use std::time::Duration;

use labctl_clock::VirtualClock;
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Controller, ControllerConfig, start_on};
use crate::api::{ControllerHandle, InterlockState, Principal, RunState};
use crate::instruments::fake::{FakeInstrument, spawn_lab};
use crate::instruments::{DeviceCommand, TaskTiming};
use crate::safety::EStop;
use crate::world::{TickConfig, TickDriver};

/// The poll a test waits with: fine against the minutes asserted, coarse enough to keep tests quick.
const POLL: Duration = Duration::from_secs(1);

struct Lab1 {
    _dir: tempfile::TempDir,
    controller: Controller,
    fakes: BTreeMap<String, FakeInstrument>,
}

impl Lab1 {
    fn api(&self) -> &ControllerHandle {
        &self.controller.handle
    }
}

async fn sim_lab() -> Lab1 {
    sim_lab_in(tempfile::tempdir().unwrap(), |_| {}).await
}

/// The controller on `dir` (a restart when it was used before), its fakes set up by `prepare` first.
async fn sim_lab_in(
    dir: tempfile::TempDir,
    prepare: impl FnOnce(&BTreeMap<String, FakeInstrument>),
) -> Lab1 {
    let estop = EStop::default();
    let lab = Lab::sim();
    // Every poll and tick is a wake-up of the paused runtime: kept as slow as the assertions allow, so a
    // simulated night costs seconds, not minutes.
    let timing = TaskTiming {
        poll: Duration::from_secs(1),
        ..TaskTiming::default()
    };
    let (handles, fakes) = spawn_lab(&lab, &estop, timing);
    prepare(&fakes);
    let config = ControllerConfig {
        lab,
        lab_sha256: "test".into(),
        data_dir: dir.path().to_owned(),
        clock: VirtualClock::new(1.0).unwrap(),
        step_timeout_floor: Duration::ZERO,
        tick: TickConfig {
            period: Duration::from_millis(250),
            ..TickConfig::default()
        },
        labware: None,
    };
    let controller = start_on(config, handles, estop, TickDriver::PausedRuntime)
        .await
        .unwrap();
    Lab1 {
        _dir: dir,
        controller,
        fakes,
    }
}

fn planner() -> Principal {
    Principal::new("planner-bo", Role::Planner, Face::InProcess)
}

fn technician() -> Principal {
    Principal::new("alice", Role::Technician, Face::InProcess)
}

fn hotplate_protocol(id: &str, steps: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "version": 1,
        "metadata": { "name": id, "proposal_id": id, "planner": { "id": "planner-bo" } },
        "steps": steps
    }))
    .unwrap()
}

/// Stirs, waits `wait_s`, stops stirring.
fn stir_for(id: &str, wait_s: u64) -> Vec<u8> {
    hotplate_protocol(
        id,
        json!([
            { "type": "action", "instrument": "hotplate", "action": "set_stir_speed",
              "params": { "speed_rpm": 300 } },
            { "type": "wait", "duration_s": wait_s },
            { "type": "action", "instrument": "hotplate", "action": "stir_off", "params": {} }
        ]),
    )
}

async fn submit(lab: &Lab1, protocol: Vec<u8>) -> (String, RunState) {
    let reply = lab.api().submit(protocol, planner()).await;
    assert!(reply.accepted, "{reply:?}");
    (reply.run_id.unwrap(), reply.state.unwrap())
}

async fn state_of(lab: &Lab1, run_id: &str) -> RunState {
    lab.api().run(run_id).await.expect("the run exists").state
}

/// Polls until `run_id` is in `want`; returns the (paused) instant it was first seen there.
async fn seen_in(lab: &Lab1, run_id: &str, want: RunState, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let state = state_of(lab, run_id).await;
        if state == want {
            return Instant::now();
        }
        assert!(
            !state.is_terminal(),
            "{run_id} ended {state} while waiting for {want}"
        );
        assert!(
            Instant::now() < deadline,
            "{run_id} still {state}, not {want}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn interlock(lab: &Lab1, name: &str) -> InterlockState {
    lab.api()
        .interlocks()
        .await
        .into_iter()
        .find(|i| i.name == name)
        .expect("the interlock exists")
        .state
}

async fn wait_interlock(lab: &Lab1, name: &str, want: fn(&InterlockState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = interlock(lab, name).await;
        if want(&state) {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: still {state:?}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_queued_on_the_same_instrument_starts_when_the_first_ends_50_minutes_later() {
    let lab = sim_lab().await;
    let start = Instant::now();
    // 50 minutes: inside the sim lab's auto-approve limit of an hour.
    let (first, _) = submit(&lab, stir_for("stir-long", 3000)).await;
    let (second, state) = submit(&lab, stir_for("stir-minute", 60)).await;
    assert_eq!(state, RunState::Queued);
    // 25 minutes in, the second run is still waiting for the hotplate.
    tokio::time::sleep(Duration::from_secs(1500)).await;
    assert_eq!(state_of(&lab, &first).await, RunState::Running);
    assert_eq!(state_of(&lab, &second).await, RunState::Queued);
    let first_done = seen_in(&lab, &first, RunState::Completed, Duration::from_secs(3100)).await;
    let second_done = seen_in(&lab, &second, RunState::Completed, Duration::from_secs(120)).await;
    let took = first_done - start;
    assert!(
        took >= Duration::from_secs(3000) && took <= Duration::from_secs(3000) + 2 * POLL,
        "the 50 minutes' run took {took:?}"
    );
    // The second run's minute followed at once: no tick, poll or retry between them.
    let gap = second_done - first_done;
    assert!(
        gap >= Duration::from_secs(60) && gap <= Duration::from_secs(60) + 2 * POLL,
        "the second run ended {gap:?} after the first"
    );
    // Never interleaved on the hotplate.
    let commands = lab.fakes["hotplate"].log.lock().unwrap().commands.clone();
    let stir = DeviceCommand::SetStirSpeed { speed_rpm: 300.0 };
    assert_eq!(
        commands,
        [
            stir.clone(),
            DeviceCommand::StirOff,
            stir,
            DeviceCommand::StirOff
        ]
    );
    lab.controller.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_proposal_awaits_its_technician_overnight_and_runs_once_approved() {
    let lab = sim_lab().await;
    // 80 °C is above the sim lab's auto-approve limit (60 °C).
    let protocol = hotplate_protocol(
        "hot-80",
        json!([
            { "type": "action", "instrument": "hotplate", "action": "set_temperature",
              "params": { "temperature_c": 80 } },
            { "type": "wait", "duration_s": 600 },
            { "type": "action", "instrument": "hotplate", "action": "heater_off", "params": {} }
        ]),
    );
    let (run, state) = submit(&lab, protocol).await;
    assert_eq!(state, RunState::AwaitingApproval);
    // The next morning nothing has run and nothing expired it: only a person decides.
    tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
    assert_eq!(state_of(&lab, &run).await, RunState::AwaitingApproval);
    assert!(
        lab.fakes["hotplate"]
            .log
            .lock()
            .unwrap()
            .commands
            .is_empty()
    );
    let approved = Instant::now();
    lab.api().approve(&run, technician()).await.unwrap();
    let done = seen_in(&lab, &run, RunState::Completed, Duration::from_secs(3600)).await;
    // The ramp to 80 °C (limited by the lab's ramp rate) and the ten-minute hold, nothing else.
    assert!(
        done - approved >= Duration::from_secs(600),
        "{:?}",
        done - approved
    );
    let commands = lab.fakes["hotplate"].log.lock().unwrap().commands.clone();
    assert_eq!(commands.last(), Some(&DeviceCommand::HeaterOff));
    assert!(commands.contains(&DeviceCommand::SetTemperature {
        temperature_c: 80.0
    }));
    lab.controller.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_override_ends_at_its_time_the_interlock_trips_again_and_runs_wait_until_it_clears() {
    let lab = sim_lab().await;
    let set_plate = |celsius: f64| {
        lab.fakes["hotplate"].log.lock().unwrap().values = vec![("plate_temperature_c", celsius)];
    };
    let over = "hotplate-over-temperature";
    set_plate(135.0);
    wait_interlock(&lab, over, |s| matches!(s, InterlockState::Tripped { .. })).await;
    let ten_minutes = Duration::from_secs(600);
    lab.api()
        .override_interlock(
            over,
            ten_minutes,
            "thermocouple checked by hand",
            technician(),
        )
        .await
        .unwrap();
    let overridden_at = Instant::now();
    // A second before its end the override stands; a moment after, the interlock has tripped again
    // because the plate is still over temperature.
    tokio::time::sleep_until(overridden_at + ten_minutes - Duration::from_secs(1)).await;
    assert!(
        matches!(
            interlock(&lab, over).await,
            InterlockState::Overridden { .. }
        ),
        "{:?}",
        interlock(&lab, over).await
    );
    tokio::time::sleep_until(overridden_at + ten_minutes + Duration::from_millis(1)).await;
    assert!(
        matches!(interlock(&lab, over).await, InterlockState::Tripped { .. }),
        "{:?}",
        interlock(&lab, over).await
    );
    // A run on the hotplate waits while the trip holds, however long.
    let (run, _) = submit(&lab, stir_for("after-trip", 60)).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(state_of(&lab, &run).await, RunState::Queued);
    assert!(
        lab.fakes["hotplate"]
            .log
            .lock()
            .unwrap()
            .commands
            .is_empty()
    );
    // The plate cools: the trip clears at the next tick and the run goes.
    set_plate(25.0);
    wait_interlock(&lab, over, |s| *s == InterlockState::Clear).await;
    seen_in(&lab, &run, RunState::Completed, Duration::from_secs(300)).await;
    lab.controller.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_override_restored_after_a_restart_ends_when_its_condition_no_longer_holds() {
    let over = "hotplate-over-temperature";
    let hot = |fakes: &BTreeMap<String, FakeInstrument>| {
        fakes["hotplate"].log.lock().unwrap().values = vec![("plate_temperature_c", 135.0)];
    };
    let lab = sim_lab_in(tempfile::tempdir().unwrap(), hot).await;
    wait_interlock(&lab, over, |s| matches!(s, InterlockState::Tripped { .. })).await;
    lab.api()
        .override_interlock(
            over,
            Duration::from_secs(3000),
            "probe checked",
            technician(),
        )
        .await
        .unwrap();
    let Lab1 {
        _dir: dir,
        controller,
        ..
    } = lab;
    controller.shutdown().await;
    // Restarted with the plate cool: the override, given for a condition that no longer holds, ends at
    // the first judgement instead of waiting out its 50 minutes to cover the next trip unasked.
    let lab = sim_lab_in(dir, |_| {}).await;
    wait_interlock(&lab, over, |s| *s == InterlockState::Clear).await;
    let restarted = Instant::now();
    lab.fakes["hotplate"].log.lock().unwrap().values = vec![("plate_temperature_c", 140.0)];
    wait_interlock(&lab, over, |s| matches!(s, InterlockState::Tripped { .. })).await;
    assert!(Instant::now() - restarted < Duration::from_secs(60));
    lab.controller.shutdown().await;
}
