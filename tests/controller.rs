//! The controller end to end on in-process fake instruments, in warped virtual time: approval, execution,
//! reservations, interlocks, e-stop, timeouts, on-error policies, and recovery after a crash.

mod common;

use labctl::api::Face;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use labctl::api::{ApiError, Control, ControllerHandle, InterlockState, Principal, RunState};
use labctl::controller::Controller;
use labctl::instruments::fake::FakeInstrument;
use labctl::journal;
use labctl_drivers::{DeviceCommand, DeviceState};
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use serde_json::{Value, json};

struct Rig {
    controller: Controller,
    fakes: BTreeMap<String, FakeInstrument>,
    handles: BTreeMap<String, labctl::instruments::InstrumentHandle>,
}

impl Rig {
    fn api(&self) -> &ControllerHandle {
        &self.controller.handle
    }
    fn fake(&self, id: &str) -> std::sync::MutexGuard<'_, labctl::instruments::fake::FakeLog> {
        self.fakes[id].log.lock().unwrap()
    }
}

async fn rig(dir: &Path) -> Rig {
    rig_with(dir, Lab::sim()).await
}

async fn rig_with(dir: &Path, lab: Lab) -> Rig {
    rig_prepared(dir, lab, |_| {}).await
}

/// A rig whose fakes are set up by `prepare` before the controller starts (and, on a current-thread runtime,
/// before any instrument task first runs).
async fn rig_prepared(
    dir: &Path,
    lab: Lab,
    prepare: impl FnOnce(&BTreeMap<String, FakeInstrument>),
) -> Rig {
    let (controller, fakes, handles) = common::controller_on_fakes(dir, lab, prepare).await;
    Rig {
        controller,
        fakes,
        handles,
    }
}

fn planner() -> Principal {
    Principal::new("planner-bo", Role::Planner, Face::InProcess)
}
fn technician() -> Principal {
    Principal::new("alice", Role::Technician, Face::InProcess)
}

fn example(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("protocols/examples")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

async fn wait_for(api: &ControllerHandle, run_id: &str, want: RunState) -> labctl::api::RunInfo {
    for _ in 0..1000 {
        let info = api.run(run_id).await.expect("run exists");
        if info.state == want {
            return info;
        }
        if info.state.is_terminal() && want != info.state {
            panic!(
                "run {run_id} ended {} ({:?}) while waiting for {want}",
                info.state, info.reason
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "run {run_id} never reached {want}: {:?}",
        api.run(run_id).await
    );
}

/// Waits until the fake has been sent to its safe state at least `n` times.
/// Waits until no interlock's condition holds, as the world model publishes it.
async fn wait_interlocks_clear(api: &ControllerHandle) {
    let mut snapshots = api.watch_snapshot();
    tokio::time::timeout(
        Duration::from_secs(10),
        snapshots.wait_for(|s| s.interlocks_tripped.is_empty()),
    )
    .await
    .expect("the interlocks never cleared")
    .unwrap();
}

async fn wait_safe_states(rig: &Rig, id: &str, n: usize) {
    for _ in 0..400 {
        if rig.fake(id).safe_states >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{id} was sent to its safe state {} times, expected at least {n}",
        rig.fake(id).safe_states
    );
}

/// The run as the journal has it, once `ready` holds (records are committed in batches, shortly after).
async fn journal_detail(
    dir: &Path,
    run_id: &str,
    ready: impl Fn(&journal::read::RunDetail) -> bool,
) -> journal::read::RunDetail {
    let conn = journal::open_db(dir).unwrap();
    for _ in 0..400 {
        if let Some(d) = journal::read::run_detail(&conn, run_id).unwrap()
            && ready(&d)
        {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "journal never showed the expected state of {run_id}: {:?}",
        journal::read::run_detail(&conn, run_id).unwrap()
    );
}

/// Results of a finished run, once the journal has committed its final state (records commit in order).
async fn results(dir: &Path, run_id: &str) -> Vec<journal::read::ResultRow> {
    let terminal = ["completed", "failed", "aborted", "rejected", "interrupted"];
    journal_detail(dir, run_id, |d| {
        terminal.contains(&d.summary.state.as_str())
    })
    .await;
    let conn = journal::open_db(dir).unwrap();
    journal::read::results(&conn, run_id, 0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dye_mix_runs_to_completion_and_every_result_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let reply = rig
        .api()
        .submit(bytes(&example("dye-mix.json")), planner())
        .await;
    assert!(reply.accepted, "{reply:?}");
    assert_eq!(
        reply.state,
        Some(RunState::Queued),
        "the sim lab auto-approves the dye mix"
    );
    let run_id = reply.run_id.unwrap();
    wait_for(rig.api(), &run_id, RunState::Completed).await;

    let red = rig.fake("pump-red").commands.clone();
    assert_eq!(
        red,
        vec![DeviceCommand::Dispense {
            volume_ul: 300.0,
            rate_ul_per_min: 600.0
        }]
    );
    let gantry = rig.fake("gantry").commands.clone();
    assert_eq!(gantry[0], DeviceCommand::Home);
    assert_eq!(
        gantry[1],
        DeviceCommand::MoveTo {
            x_mm: 20.0,
            y_mm: 20.0,
            z_mm: 50.0,
            feed_mm_per_min: 3000.0
        }
    );
    assert!(gantry.contains(&DeviceCommand::Gripper { closed: true }));

    // Results are durable: read them back from the database file.
    let rows = results(dir.path(), &run_id).await;
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["spectrum", "mass"]);
    assert_eq!(rows[0].seq, 1);
    assert_eq!(rows[0].instrument, "spectro");
    assert_eq!(rows[0].identity["serial"], "FAKE-spectro");
    assert_eq!(rows[0].value["outcome"], "spectrum");
    assert_eq!(
        rows[0].value["wavelengths_nm"].as_array().unwrap().len(),
        81
    );
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_outside_the_auto_envelope_waits_for_a_technician() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let mut p = example("heat-and-hold.json");
    p["steps"][4]["params"]["temperature_c"] = json!(80.0);
    p["steps"][5]["condition"]["value"] = json!(80.0);
    let reply = rig.api().submit(bytes(&p), planner()).await;
    assert_eq!(reply.state, Some(RunState::AwaitingApproval), "{reply:?}");
    assert!(reply.approval_required_because[0].contains("auto-approve limit 60"));
    let run_id = reply.run_id.unwrap();
    // The planner cannot approve its own proposal.
    let err = rig.api().approve(&run_id, planner()).await.unwrap_err();
    assert!(
        err.to_string().contains("may not approve or reject runs"),
        "{err}"
    );
    assert!(
        rig.fake("hotplate").commands.is_empty(),
        "nothing ran before approval"
    );
    // A rejection with a reason ends it.
    rig.api()
        .reject(&run_id, "too hot for this dye", technician())
        .await
        .unwrap();
    assert_eq!(
        rig.api().run(&run_id).await.unwrap().state,
        RunState::Rejected
    );
    assert!(rig.fake("hotplate").commands.is_empty());
    let detail = journal_detail(dir.path(), &run_id, |d| d.summary.state == "rejected").await;
    let approval = detail
        .events
        .iter()
        .rev()
        .find(|e| e.kind == "approval")
        .unwrap();
    assert_eq!(approval.detail["decision"], "rejected");
    assert!(approval.actor.as_deref().unwrap().starts_with("alice"));
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_proposal_id_gives_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let p = bytes(&example("dye-mix.json"));
    let a = rig.api().submit(p.clone(), planner()).await;
    let b = rig.api().submit(p, planner()).await;
    assert_eq!(a.run_id, b.run_id);
    assert!(b.duplicate && !a.duplicate);
    let mut other = example("dye-mix.json");
    other["steps"][2]["params"]["volume_ul"] = json!(301);
    let c = rig.api().submit(bytes(&other), planner()).await;
    assert!(!c.accepted);
    let reused = c.error.unwrap();
    assert!(
        matches!(&reused, ApiError::ProposalReused { run_id, .. } if Some(run_id) == a.run_id.as_ref()),
        "{reused:?}"
    );
    assert!(
        reused
            .to_string()
            .contains("already used for a different protocol")
    );
    assert_eq!(rig.api().runs().await.len(), 1);
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_proposal_is_rejected_with_its_findings_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let mut p = example("dye-mix.json");
    p["steps"][2]["params"]["rate_ul_per_min"] = json!(5000);
    let reply = rig.api().submit(bytes(&p), planner()).await;
    assert!(!reply.accepted);
    assert_eq!(reply.state, Some(RunState::Rejected));
    assert_eq!(reply.findings[0].path, "/steps/2/params/rate_ul_per_min");
    assert!(rig.api().runs().await.is_empty());
    let observer = Principal::new("watcher", Role::Observer, Face::InProcess);
    let reply = rig
        .api()
        .submit(bytes(&example("dye-mix.json")), observer)
        .await;
    assert!(!reply.accepted);
    let refusal = reply.error.unwrap();
    assert!(
        matches!(&refusal, ApiError::Forbidden(why) if why.contains("observer")),
        "{refusal:?}"
    );
    rig.controller.shutdown().await;
}

fn long_hotplate_protocol(id: &str, wait_s: f64) -> Value {
    json!({
        "version": 1,
        "metadata": { "name": id, "proposal_id": id, "planner": { "id": "planner-bo" } },
        "steps": [
            { "type": "action", "instrument": "hotplate", "action": "set_stir_speed", "params": { "speed_rpm": 300 } },
            { "type": "wait", "duration_s": wait_s },
            { "type": "action", "instrument": "hotplate", "action": "stir_off", "params": {} }
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_one_instrument_queue_and_runs_on_disjoint_instruments_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let first = rig
        .api()
        .submit(bytes(&long_hotplate_protocol("hot-1", 300.0)), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &first, RunState::Running).await;
    let second = rig
        .api()
        .submit(bytes(&long_hotplate_protocol("hot-2", 1.0)), planner())
        .await
        .run_id
        .unwrap();
    let weigh = json!({
        "version": 1,
        "metadata": { "name": "weigh", "proposal_id": "weigh-1", "planner": { "id": "planner-bo" } },
        "steps": [ { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m" } ]
    });
    let third = rig
        .api()
        .submit(bytes(&weigh), planner())
        .await
        .run_id
        .unwrap();
    // The balance run does not wait for the hotplate run.
    wait_for(rig.api(), &third, RunState::Completed).await;
    assert_eq!(
        rig.api().run(&second).await.unwrap().state,
        RunState::Queued,
        "second hotplate run must wait"
    );
    assert_eq!(
        rig.api().run(&first).await.unwrap().state,
        RunState::Running
    );
    wait_for(rig.api(), &first, RunState::Completed).await;
    wait_for(rig.api(), &second, RunState::Completed).await;
    // Never interleaved on the hotplate: run 1's three commands, then run 2's.
    let cmds = rig.fake("hotplate").commands.clone();
    assert_eq!(cmds.len(), 4);
    assert_eq!(cmds[1], DeviceCommand::StirOff);
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_temperature_interlock_fails_the_run_and_makes_the_hotplate_safe() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let run = rig
        .api()
        .submit(bytes(&long_hotplate_protocol("hot-il", 600.0)), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    let safe_before = rig.fake("hotplate").safe_states;
    rig.fake("hotplate").values = vec![("plate_temperature_c", 135.0), ("temperature_c", 90.0)];
    let info = wait_for(rig.api(), &run, RunState::Failed).await;
    assert!(info.reason.unwrap().contains("hotplate-over-temperature"));
    for _ in 0..100 {
        if rig.fake("hotplate").safe_states > safe_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        rig.fake("hotplate").safe_states > safe_before,
        "hotplate was not sent to its safe state"
    );
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_alarm_pauses_the_run_until_a_technician_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let p = json!({
        "version": 1,
        "metadata": { "name": "pump", "proposal_id": "pump-alarm", "planner": { "id": "planner-bo" } },
        "steps": [
            { "type": "action", "instrument": "pump-red", "action": "stop_pump", "params": {} },
            { "type": "wait", "duration_s": 120 },
            { "type": "action", "instrument": "pump-red", "action": "stop_pump", "params": {} }
        ]
    });
    let run = rig.api().submit(bytes(&p), planner()).await.run_id.unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    rig.fake("pump-red").state = Some(DeviceState::Alarm("A?S stalled".into()));
    wait_for(rig.api(), &run, RunState::Paused).await;
    // While the alarm holds, nobody resumes the run: the interlock is level, not edge.
    let err = rig
        .api()
        .control(&run, Control::Resume, technician())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Interlocked(ref why) if why.contains("pump-alarm")),
        "{err}"
    );
    rig.fake("pump-red").state = Some(DeviceState::Idle);
    wait_interlocks_clear(rig.api()).await;
    // The planner may resume its own run once the condition has cleared.
    rig.api()
        .control(&run, Control::Resume, planner())
        .await
        .unwrap();
    wait_for(rig.api(), &run, RunState::Completed).await;
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_stop_aborts_everything_and_latches_until_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let run = rig
        .api()
        .submit(bytes(&long_hotplate_protocol("hot-es", 600.0)), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    let observer = Principal::new("watcher", Role::Observer, Face::InProcess);
    assert!(
        rig.api().emergency_stop(observer).await.is_err(),
        "observers cannot trigger the e-stop"
    );
    // Anyone who may change the lab may stop it; only a technician releases it.
    rig.api().emergency_stop(planner()).await.unwrap();
    let err = rig
        .api()
        .acknowledge_emergency_stop(planner())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("may not acknowledge the emergency stop"),
        "{err}"
    );
    rig.api().emergency_stop(technician()).await.unwrap();
    let info = rig.api().run(&run).await.unwrap();
    assert_eq!(info.state, RunState::Aborted);
    assert!(info.reason.unwrap().contains("emergency stop"));
    // Every instrument receives its safe state.
    for _ in 0..200 {
        if rig.fakes.keys().all(|id| rig.fake(id).safe_states >= 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for id in rig.fakes.keys() {
        assert!(
            rig.fake(id).safe_states >= 2,
            "{id} not made safe after the e-stop"
        );
    }
    // Latched: a direct command is refused in the instrument task itself, and new runs do not start.
    let err = rig.handles["hotplate"]
        .execute(DeviceCommand::SetStirSpeed { speed_rpm: 100.0 })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("emergency stop is latched"),
        "{err}"
    );
    // Nothing new is accepted while latched, from anyone: no run exists to start once acknowledged.
    let runs_before = rig.api().runs().await.len();
    for who in [planner(), technician()] {
        let refused = rig
            .api()
            .submit(bytes(&long_hotplate_protocol("during-es", 1.0)), who)
            .await;
        assert!(!refused.accepted && refused.run_id.is_none(), "{refused:?}");
        assert_eq!(refused.error, Some(ApiError::EStopLatched), "{refused:?}");
    }
    assert_eq!(rig.api().runs().await.len(), runs_before);
    rig.api()
        .acknowledge_emergency_stop(technician())
        .await
        .unwrap();
    // The refusal did not burn the proposal id: submitted again after the acknowledgement, it runs.
    let after = rig
        .api()
        .submit(bytes(&long_hotplate_protocol("during-es", 1.0)), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &after, RunState::Completed).await;
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_outside_the_envelope_never_reaches_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let err = rig.handles["hotplate"]
        .execute(DeviceCommand::SetTemperature {
            temperature_c: 200.0,
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("outside the safety envelope"),
        "{err}"
    );
    assert!(rig.fake("hotplate").commands.is_empty());
    rig.controller.shutdown().await;
}

fn one_step(id: &str, on_error: &str, timeout_s: f64) -> Value {
    json!({
        "version": 1,
        "metadata": { "name": id, "proposal_id": id, "planner": { "id": "planner-bo" } },
        "steps": [
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m1", "timeout_s": timeout_s, "on_error": on_error },
            { "type": "action", "instrument": "balance", "action": "tare", "params": {} }
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_timeouts_and_every_on_error_policy() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    // The balance takes 2 s (real) per command; the step allows 5 s virtual = 5 ms real.
    rig.fake("balance").delay = Duration::from_secs(2);
    let failed = rig
        .api()
        .submit(bytes(&one_step("t-fail", "fail", 5.0)), planner())
        .await
        .run_id
        .unwrap();
    let info = wait_for(rig.api(), &failed, RunState::Failed).await;
    assert!(info.reason.unwrap().contains("timed out"));

    rig.fake("balance").delay = Duration::ZERO;
    rig.fake("balance").fail_with = Some("ES syntax error".into());
    let skipped = rig
        .api()
        .submit(bytes(&one_step("t-skip", "skip", 60.0)), planner())
        .await
        .run_id
        .unwrap();
    // The weigh fails and is skipped; the tare after it also fails (fail policy) -> failed, after the skip.
    wait_for(rig.api(), &skipped, RunState::Failed).await;
    let detail = journal_detail(dir.path(), &skipped, |d| d.summary.state == "failed").await;
    assert!(
        detail
            .events
            .iter()
            .any(|e| e.kind == "step_skipped" && e.step.as_deref() == Some("/steps/0"))
    );
    assert!(
        detail
            .events
            .iter()
            .any(|e| e.kind == "step_failed" && e.step.as_deref() == Some("/steps/1"))
    );

    let paused = rig
        .api()
        .submit(bytes(&one_step("t-pause", "pause", 60.0)), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &paused, RunState::Paused).await;
    rig.fake("balance").fail_with = None;
    rig.api()
        .control(&paused, Control::Resume, technician())
        .await
        .unwrap();
    wait_for(rig.api(), &paused, RunState::Completed).await;
    assert!(
        results(dir.path(), &paused).await.is_empty(),
        "the failed weigh produced no result"
    );
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_abort_by_operators() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let p = json!({
        "version": 1,
        "metadata": { "name": "loop", "proposal_id": "loop-1", "planner": { "id": "planner-bo" } },
        "steps": [ { "type": "repeat", "count": 100, "steps": [
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m" },
            { "type": "wait", "duration_s": 5 } ] } ]
    });
    let run = rig.api().submit(bytes(&p), planner()).await.run_id.unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    rig.api()
        .control(&run, Control::Pause, planner())
        .await
        .unwrap();
    wait_for(rig.api(), &run, RunState::Paused).await;
    let n = rig.fake("balance").commands.len();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        rig.fake("balance").commands.len(),
        n,
        "a paused run sends nothing"
    );
    let stranger = Principal::new("planner-x", Role::Planner, Face::InProcess);
    assert!(
        rig.api()
            .control(&run, Control::Abort, stranger)
            .await
            .is_err(),
        "not its run"
    );
    rig.api()
        .control(&run, Control::Resume, technician())
        .await
        .unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rig.api().run(&run).await.unwrap().results == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no result after the resume"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rig.api()
        .control(&run, Control::Abort, technician())
        .await
        .unwrap();
    assert_eq!(rig.api().run(&run).await.unwrap().state, RunState::Aborted);
    // Results of repeats are numbered per iteration.
    let rows = results(dir.path(), &run).await;
    assert!(!rows.is_empty());
    assert_eq!(rows[0].name, "m_1");
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_run_holds_safely_when_its_planner_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let mut p = long_hotplate_protocol("sup-1", 600.0);
    p["metadata"]["supervised"] = json!(true);
    let run = rig.api().submit(bytes(&p), planner()).await.run_id.unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    // The start-up reconciliation makes every instrument safe once; count from after it.
    wait_safe_states(&rig, "hotplate", 1).await;
    let before = rig.fake("hotplate").safe_states;
    rig.api().planner_lost("planner-bo").await;
    wait_for(rig.api(), &run, RunState::Paused).await;
    wait_safe_states(&rig, "hotplate", before + 1).await;
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_active_at_a_crash_come_back_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rig = rig(dir.path()).await;
        let run = rig
            .api()
            .submit(bytes(&long_hotplate_protocol("crash-1", 600.0)), planner())
            .await
            .run_id
            .unwrap();
        wait_for(rig.api(), &run, RunState::Running).await;
        // Simulate a crash: the journal says "running" and the process never said otherwise.
        std::mem::forget(rig);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rig = rig(dir.path()).await;
    assert_eq!(rig.controller.interrupted.len(), 1);
    let conn = journal::open_db(dir.path()).unwrap();
    let runs = journal::read::list_runs(&conn).unwrap();
    assert_eq!(runs[0].state, "interrupted");
    // Resubmitting the same proposal gives the same (interrupted) run, never a silent re-run.
    let again = rig
        .api()
        .submit(bytes(&long_hotplate_protocol("crash-1", 600.0)), planner())
        .await;
    assert!(again.duplicate);
    assert_eq!(again.state, Some(RunState::Interrupted));
    // Every interface asks the API about the run: it answers from the journal, not "unknown run".
    let info = rig
        .api()
        .run(&runs[0].run_id)
        .await
        .expect("a run of the last process");
    assert_eq!(info.state, RunState::Interrupted);
    assert_eq!(info.proposal_id, "crash-1");
    assert_eq!(info.submitted_by, "planner-bo");
    assert!(rig.api().run("run-0-nonexistent").await.is_none());
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_overload_pauses_and_gantry_alarm_fails_with_the_pumps_made_safe() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let weigh = json!({
        "version": 1,
        "metadata": { "name": "weigh loop", "proposal_id": "overload-1", "planner": { "id": "planner-bo" } },
        "steps": [ { "type": "repeat", "count": 50, "steps": [
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m" },
            { "type": "wait", "duration_s": 10 } ] } ]
    });
    let run = rig
        .api()
        .submit(bytes(&weigh), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    rig.fake("balance").values = vec![("mass_g", 215.0)];
    wait_for(rig.api(), &run, RunState::Paused).await;
    rig.api()
        .control(&run, Control::Abort, technician())
        .await
        .unwrap();

    let moves = json!({
        "version": 1,
        "metadata": { "name": "moves", "proposal_id": "alarm-1", "planner": { "id": "planner-bo" } },
        "steps": [ { "type": "action", "instrument": "gantry", "action": "home", "params": {} },
                   { "type": "wait", "duration_s": 600 } ]
    });
    let run = rig
        .api()
        .submit(bytes(&moves), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    for p in ["pump-red", "pump-yellow", "pump-blue"] {
        wait_safe_states(&rig, p, 1).await;
    }
    let pumps_before: usize = ["pump-red", "pump-yellow", "pump-blue"]
        .iter()
        .map(|p| rig.fake(p).safe_states)
        .sum();
    rig.fake("gantry").state = Some(DeviceState::Alarm("ALARM:2 soft limit".into()));
    let info = wait_for(rig.api(), &run, RunState::Failed).await;
    assert!(info.reason.unwrap().contains("gantry-alarm"));
    for _ in 0..100 {
        let now: usize = ["pump-red", "pump-yellow", "pump-blue"]
            .iter()
            .map(|p| rig.fake(p).safe_states)
            .sum();
        if now >= pumps_before + 3 {
            return rig.controller.shutdown().await.map(|_| ()).unwrap_or(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the gantry alarm did not send every pump to its safe state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_instrument_trips_its_heartbeat_interlock() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::sim();
    for inst in &mut lab.instruments {
        inst.heartbeat_s = 0.2;
    }
    // Only the heartbeat interlock here (an unplugged hotplate also trips its over-temperature interlock:
    // see the next test).
    lab.interlocks
        .retain(|i| i.name != "hotplate-over-temperature");
    let rig = rig_with(dir.path(), lab).await;
    let run = rig
        .api()
        .submit(bytes(&long_hotplate_protocol("silent-1", 600.0)), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    // Once the first command went through (the run is in its wait), unplug: every poll now fails.
    for _ in 0..400 {
        if !rig.fake("hotplate").commands.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rig.fake("hotplate").unplugged = true;
    wait_for(rig.api(), &run, RunState::Paused).await;
    let detail = journal_detail(dir.path(), &run, |d| {
        d.events.iter().any(|e| e.kind == "interlock")
    })
    .await;
    let il = detail
        .events
        .iter()
        .find(|e| e.kind == "interlock")
        .unwrap();
    assert_eq!(il.detail["interlock"], "hotplate-silent");
    rig.controller.shutdown().await;
}

/// An instrument that goes offline is not judged on its last value: its over-temperature interlock trips
/// (here failing the run), a queued run on it waits, and it serves runs again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_instrument_counts_as_tripped_and_inhibits_its_runs_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let run = rig
        .api()
        .submit(
            bytes(&long_hotplate_protocol("offline-1", 600.0)),
            planner(),
        )
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    // In its wait (the stirrer set), so the run is failed by the interlock, not by a command.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rig.api().run(&run).await.unwrap().current_step.as_deref() != Some("/steps/1") {
        assert!(
            std::time::Instant::now() < deadline,
            "never reached the wait"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rig.fake("hotplate").unplugged = true;
    let info = wait_for(rig.api(), &run, RunState::Failed).await;
    assert!(
        info.reason
            .as_deref()
            .is_some_and(|r| r.contains("hotplate-over-temperature") && r.contains("offline")),
        "{info:?}"
    );
    // A run on the tripped instrument stays queued while the condition holds.
    let queued = rig
        .api()
        .submit(bytes(&long_hotplate_protocol("offline-2", 1.0)), planner())
        .await
        .run_id
        .unwrap();
    let mut snapshots = rig.api().watch_snapshot();
    snapshots
        .wait_for(|s| !s.interlocks_tripped.is_empty())
        .await
        .unwrap();
    assert_eq!(
        rig.api().run(&queued).await.unwrap().state,
        RunState::Queued,
        "a run started on an instrument whose interlock holds"
    );
    rig.fake("hotplate").unplugged = false;
    wait_for(rig.api(), &queued, RunState::Completed).await;
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_world_model_shows_instruments_runs_and_vessels() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let mut p = example("dye-mix.json");
    p["steps"][7]["duration_s"] = json!(600);
    let run = rig.api().submit(bytes(&p), planner()).await.run_id.unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    let mut watch = rig.controller.handle.watch_snapshot();
    for _ in 0..200 {
        let snap = rig.api().snapshot();
        let moved = snap
            .vessels
            .iter()
            .any(|v| v.vessel == "mix1" && v.position == "H1");
        if moved && snap.instruments.len() == 7 && snap.runs.iter().any(|r| r.run_id == run) {
            assert!(
                snap.instruments.iter().all(|i| i.identity.is_some()),
                "identities read at connect"
            );
            let r = snap.runs.iter().find(|r| r.run_id == run).unwrap();
            assert!(r.instruments.contains(&"hotplate".to_string()));
            assert!(snap.tick.ticks > 0);
            return rig.controller.shutdown().await.map(|_| ()).unwrap_or(());
        }
        let _ = tokio::time::timeout(Duration::from_millis(20), watch.changed()).await;
    }
    panic!(
        "snapshot never showed the run with mix1 moved to H1: {:?}",
        rig.api().snapshot()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_estimate_is_recorded_and_its_conflicts_need_a_technician() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    // Valid for the validator, but the hotplate set to 30 C never brings the vessel to 50 C.
    let p = json!({
        "version": 1,
        "metadata": { "name": "unreachable", "proposal_id": "dry-1", "planner": { "id": "planner-bo" } },
        "labware": [ { "id": "v", "kind": "vial", "location": "H1", "capacity_ul": 20000, "initial_volume_ul": 5000 } ],
        "steps": [
            { "type": "action", "instrument": "hotplate", "action": "set_temperature", "params": { "temperature_c": 30 } },
            { "type": "wait_until", "condition": { "instrument": "hotplate", "quantity": "temperature_c", "op": "ge", "value": 50 }, "timeout_s": 300 }
        ]
    });
    let reply = rig.api().submit(bytes(&p), planner()).await;
    assert_eq!(reply.state, Some(RunState::AwaitingApproval), "{reply:?}");
    assert!(
        reply
            .approval_required_because
            .iter()
            .any(|r| r.contains("dry run")),
        "{reply:?}"
    );
    // The ramp from the plate's 22 C to 30 C at the envelope's 10 C/min (42 s), then the 300 s wait.
    let estimate = reply.estimated_duration_s.unwrap();
    assert!((340.0..352.0).contains(&estimate), "estimate {estimate}");
    let run = reply.run_id.unwrap();
    let detail = journal_detail(dir.path(), &run, |d| {
        d.events.iter().any(|e| e.kind == "dry_run")
    })
    .await;
    let dry = detail.events.iter().find(|e| e.kind == "dry_run").unwrap();
    assert!(!dry.detail["problems"].as_array().unwrap().is_empty());
    // The dye mix dry-runs clean, with the model's estimate (not the static one).
    let reply = rig
        .api()
        .submit(bytes(&example("dye-mix.json")), planner())
        .await;
    assert_eq!(reply.state, Some(RunState::Queued));
    let estimate = reply.estimated_duration_s.unwrap();
    assert!(
        (120.0..150.0).contains(&estimate),
        "dye mix estimate {estimate}"
    );
    rig.controller.shutdown().await;
}

/// `instrument_safe` events journaled since the last `controller_started`: (instrument, confirmed).
fn reconcile_events(dir: &Path) -> Vec<(String, bool)> {
    let conn = journal::open_db(dir).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT detail FROM events WHERE kind = 'instrument_safe'
             AND seq > (SELECT MAX(seq) FROM events WHERE kind = 'controller_started') ORDER BY seq",
        )
        .unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|d| {
            let v: Value = serde_json::from_str(&d.unwrap()).unwrap();
            (
                v["instrument"].as_str().unwrap().to_owned(),
                v["confirmed"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_instrument_still_connecting_at_start_is_confirmed_safe_once_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig_prepared(dir.path(), Lab::sim(), |fakes| {
        fakes["hotplate"].log.lock().unwrap().unplugged = true;
    })
    .await;
    // The reconcile request reaches the hotplate while its connect keeps failing; it must wait for the
    // connect (which makes the instrument safe) rather than answer "not confirmed" at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !reconcile_events(dir.path())
            .iter()
            .any(|(id, _)| id == "hotplate"),
        "the hotplate cannot be confirmed either way while it is unplugged"
    );
    rig.fake("hotplate").unplugged = false;
    for _ in 0..400 {
        let events = reconcile_events(dir.path());
        if let Some((_, confirmed)) = events.iter().find(|(id, _)| id == "hotplate") {
            assert!(
                confirmed,
                "the hotplate connected and was made safe: {events:?}"
            );
            assert_eq!(
                events.len(),
                7,
                "every instrument reconciled once: {events:?}"
            );
            assert!(events.iter().all(|(_, ok)| *ok), "{events:?}");
            assert!(rig.fake("hotplate").safe_states >= 1);
            return rig.controller.shutdown().await.map(|_| ()).unwrap_or(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "the hotplate was never reconciled: {:?}",
        reconcile_events(dir.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_result_count_the_api_reports_is_always_on_disk_and_complete_when_the_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let weigh = json!({
        "version": 1,
        "metadata": { "name": "weigh often", "proposal_id": "count-1", "planner": { "id": "planner-bo" } },
        "steps": [ { "type": "repeat", "count": 200, "steps": [
            { "type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m" } ] } ]
    });
    let run = rig
        .api()
        .submit(bytes(&weigh), planner())
        .await
        .run_id
        .unwrap();
    let conn = journal::open_db(dir.path()).unwrap();
    let mut samples = 0;
    loop {
        // The count first, then the disk: the disk may only be ahead.
        let info = rig.api().run(&run).await.unwrap();
        let on_disk = journal::read::results(&conn, &run, 0).unwrap().len() as u64;
        assert!(
            on_disk >= info.results,
            "the API reported {} results while the journal held {on_disk}",
            info.results
        );
        samples += 1;
        // A run is reported ended only once all its results are on disk.
        if info.state.is_terminal() {
            assert_eq!(info.state, RunState::Completed, "{:?}", info.reason);
            assert_eq!(info.results, 200, "every result counted when the run ends");
            assert_eq!(on_disk, 200, "every result on disk when the run ends");
            break;
        }
    }
    assert!(samples > 1);
    rig.controller.shutdown().await;
}

/// Lab-wide events of `kind` journaled so far, oldest first: (actor, detail).
fn lab_events(dir: &Path, kind: &str) -> Vec<(Option<String>, Value)> {
    let conn = journal::open_db(dir).unwrap();
    let mut stmt = conn
        .prepare("SELECT actor, detail FROM events WHERE kind = ?1 AND run_id IS NULL ORDER BY seq")
        .unwrap();
    stmt.query_map([kind], |r| {
        Ok((r.get::<_, Option<String>>(0)?, r.get::<_, String>(1)?))
    })
    .unwrap()
    .map(|row| {
        let (actor, detail) = row.unwrap();
        (actor, serde_json::from_str(&detail).unwrap())
    })
    .collect()
}

/// Lab-wide events of `kind`, once at least `n` are committed (records commit in batches, shortly after).
async fn wait_lab_events(dir: &Path, kind: &str, n: usize) -> Vec<(Option<String>, Value)> {
    for _ in 0..1000 {
        let events = lab_events(dir, kind);
        if events.len() >= n {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("fewer than {n} {kind} events: {:?}", lab_events(dir, kind));
}

async fn wait_interlock(api: &ControllerHandle, name: &str, want: fn(&InterlockState) -> bool) {
    for _ in 0..2000 {
        if api
            .interlocks()
            .await
            .iter()
            .any(|i| i.name == name && want(&i.state))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "interlock {name} never reached the state: {:?}",
        api.interlocks().await
    );
}

fn pump_steps(id: &str, wait_s: f64) -> Value {
    json!({
        "version": 1,
        "metadata": { "name": "pump", "proposal_id": id, "planner": { "id": "planner-bo" } },
        "steps": [
            { "type": "action", "instrument": "pump-red", "action": "stop_pump", "params": {} },
            { "type": "wait", "duration_s": wait_s },
            { "type": "action", "instrument": "pump-red", "action": "stop_pump", "params": {} }
        ]
    })
}

/// Override, sequence: trip -> a planner cannot override, bad overrides are refused by name -> a
/// technician's override (journaled, with the reason) lets the paused run resume and finish while the
/// condition holds, re-trips included -> the condition clears and ends the override -> the next trip acts
/// again; and an override whose time runs out pauses the run it let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_technician_overrides_a_tripped_interlock_until_it_clears_or_its_time_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let run = rig
        .api()
        .submit(bytes(&pump_steps("override-1", 600.0)), planner())
        .await
        .run_id
        .unwrap();
    let alarm = || Some(DeviceState::Alarm("A?S stalled".into()));
    // The clock runs 1000 times real time: the wait is 0.6 s here.
    wait_for(rig.api(), &run, RunState::Running).await;
    rig.fake("pump-red").state = alarm();
    wait_for(rig.api(), &run, RunState::Paused).await;
    let minute = Duration::from_secs(60);
    let refused = rig
        .api()
        .override_interlock("pump-alarm", minute, "let it go", planner())
        .await
        .unwrap_err();
    assert!(matches!(refused, ApiError::Forbidden(_)), "{refused}");
    for (name, duration, reason, expect) in [
        ("pump-alarm", minute, "  ", "reason"),
        ("pump-alarm", Duration::from_secs(7200), "ok", "duration"),
        ("pump-alarm", Duration::ZERO, "ok", "duration"),
        ("hotplate-over-temperature", minute, "ok", "not tripped"),
        ("no-such", minute, "ok", "unknown interlock"),
    ] {
        let err = rig
            .api()
            .override_interlock(name, duration, reason, technician())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(expect),
            "{name} {duration:?}: {err}"
        );
    }
    rig.api()
        .override_interlock(
            "pump-alarm",
            minute,
            "stall sensor faulty, pump checked by hand",
            technician(),
        )
        .await
        .unwrap();
    let overridden = |s: &InterlockState| matches!(s, InterlockState::Overridden { by, .. } if by.starts_with("alice "));
    wait_interlock(rig.api(), "pump-alarm", overridden).await;
    // The planner may now resume its own run; its next command re-arms the pump while the alarm holds,
    // which the override lets through (journaled) instead of tripping again.
    rig.api()
        .control(&run, Control::Resume, planner())
        .await
        .unwrap();
    wait_for(rig.api(), &run, RunState::Completed).await;
    let set = wait_lab_events(dir.path(), "interlock_override", 1).await;
    assert_eq!(set.len(), 1, "{set:?}");
    assert_eq!(
        set[0].0.as_deref(),
        Some("alice (Technician via in-process)")
    );
    assert_eq!(
        set[0].1["because"],
        "stall sensor faulty, pump checked by hand"
    );
    // The pump's arming and its safe state at the trip are in the journal.
    for kind in ["instrument_armed", "instrument_disarmed"] {
        let events = wait_lab_events(dir.path(), kind, 1).await;
        assert!(
            events.iter().any(|(_, d)| d["instrument"] == "pump-red"),
            "{kind}: {events:?}"
        );
    }
    // Clearing the condition ends the override: a new alarm pauses the next run again.
    rig.fake("pump-red").state = Some(DeviceState::Idle);
    wait_interlock(rig.api(), "pump-alarm", |s| *s == InterlockState::Clear).await;
    let second = rig
        .api()
        .submit(bytes(&pump_steps("override-2", 3000.0)), planner())
        .await
        .run_id
        .unwrap();
    wait_for(rig.api(), &second, RunState::Running).await;
    rig.fake("pump-red").state = alarm();
    wait_for(rig.api(), &second, RunState::Paused).await;
    // A one-second override lets it resume; when the second is up, the interlock acts again.
    rig.api()
        .override_interlock(
            "pump-alarm",
            Duration::from_secs(1),
            "one second",
            technician(),
        )
        .await
        .unwrap();
    rig.api()
        .control(&second, Control::Resume, technician())
        .await
        .unwrap();
    wait_for(rig.api(), &second, RunState::Running).await;
    wait_for(rig.api(), &second, RunState::Paused).await;
    let ended: Vec<String> = wait_lab_events(dir.path(), "interlock_override_ended", 2)
        .await
        .into_iter()
        .map(|(_, d)| d["why"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ended, ["the condition cleared", "its time ran out"]);
    rig.controller.shutdown().await;
}

/// An override stands across a restart for the time it was given (and a withdrawn one does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interlock_override_survives_a_restart_and_can_be_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let alarm = |fakes: &BTreeMap<String, FakeInstrument>| {
        fakes["pump-red"].log.lock().unwrap().state =
            Some(DeviceState::Alarm("A?S stalled".into()));
    };
    let rig = rig_prepared(dir.path(), Lab::sim(), alarm).await;
    wait_interlock(rig.api(), "pump-alarm", |s| {
        matches!(s, InterlockState::Tripped { .. })
    })
    .await;
    rig.api()
        .override_interlock(
            "pump-alarm",
            Duration::from_secs(600),
            "sensor fault",
            technician(),
        )
        .await
        .unwrap();
    // A crash: nothing is shut down.
    std::mem::forget(rig);
    let rig = rig_prepared(dir.path(), Lab::sim(), alarm).await;
    wait_interlock(
        rig.api(),
        "pump-alarm",
        |s| matches!(s, InterlockState::Overridden { because, .. } if because == "sensor fault"),
    )
    .await;
    // Withdrawn: the condition still holds, so it is tripped again at once, and a restart keeps it so.
    rig.api()
        .withdraw_override("pump-alarm", technician())
        .await
        .unwrap();
    wait_interlock(rig.api(), "pump-alarm", |s| {
        matches!(s, InterlockState::Tripped { .. })
    })
    .await;
    rig.controller.shutdown().await;
    let rig = rig_prepared(dir.path(), Lab::sim(), alarm).await;
    wait_interlock(rig.api(), "pump-alarm", |s| {
        matches!(s, InterlockState::Tripped { .. })
    })
    .await;
    assert_eq!(
        wait_lab_events(dir.path(), "interlock_override_restored", 1)
            .await
            .len(),
        1
    );
    rig.controller.shutdown().await;
}

/// A planner cannot fill the approval queue or the run queue: past its quota a submission is refused with
/// the reason and nothing is recorded for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_runs_awaiting_approval_are_bounded_by_a_quota() {
    use labctl::controller::MAX_AWAITING_APPROVAL_PER_USER;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    for i in 0..MAX_AWAITING_APPROVAL_PER_USER {
        let r = rig
            .api()
            .submit(bytes(&pump_steps(&format!("quota-{i}"), 7200.0)), planner())
            .await;
        assert_eq!(r.state, Some(RunState::AwaitingApproval), "{r:?}");
    }
    let over = rig
        .api()
        .submit(bytes(&pump_steps("quota-over", 7200.0)), planner())
        .await;
    assert!(!over.accepted);
    let why = over.error.unwrap();
    assert!(matches!(why, ApiError::OverQuota(_)), "{why:?}");
    let why = why.to_string();
    assert!(why.contains("quota") && why.contains("planner-bo"), "{why}");
    assert!(
        rig.api()
            .runs()
            .await
            .iter()
            .all(|r| r.proposal_id != "quota-over")
    );
    // Another user is not held by the planner's quota.
    let other = rig
        .api()
        .submit(
            bytes(&pump_steps("quota-other", 7200.0)),
            Principal::new("rig-1", Role::Rig, Face::InProcess),
        )
        .await;
    assert!(other.accepted, "{other:?}");
    rig.controller.shutdown().await;
}

/// Finished runs leave the controller's memory beyond the most recent ones; every face still answers for
/// an old run, from the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_leave_memory_and_old_ones_are_answered_from_the_journal() {
    use labctl::controller::KEEP_FINISHED_RUNS;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let weigh = |i: usize| {
        json!({
            "version": 1,
            "metadata": { "name": "weigh", "proposal_id": format!("mem-{i}"), "planner": { "id": "planner-bo" } },
            "steps": [ { "type": "measure", "id": "w", "instrument": "balance", "action": "weigh", "params": {}, "result": "m" } ]
        })
    };
    let mut first = None;
    for i in 0..KEEP_FINISHED_RUNS + 5 {
        let id = rig
            .api()
            .submit(bytes(&weigh(i)), planner())
            .await
            .run_id
            .unwrap();
        wait_for(rig.api(), &id, RunState::Completed).await;
        first.get_or_insert(id);
    }
    let first = first.unwrap();
    let in_memory = rig.api().runs().await;
    assert_eq!(in_memory.len(), KEEP_FINISHED_RUNS);
    assert!(in_memory.iter().all(|r| r.run_id != first));
    let old = rig
        .api()
        .run(&first)
        .await
        .expect("answered from the journal");
    assert_eq!((old.state, old.results), (RunState::Completed, 1));
    let err = rig
        .api()
        .control(&first, Control::Abort, technician())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::InvalidState(ref m) if m.contains("completed")),
        "{err}"
    );
    // Its proposal id still means that run.
    let again = rig.api().submit(bytes(&weigh(0)), planner()).await;
    assert!(
        again.duplicate && again.run_id.as_deref() == Some(first.as_str()),
        "{again:?}"
    );
    rig.controller.shutdown().await;
}

/// Found by the campaign against the binary (seed 3): a hotplate that stops answering while a run keeps
/// sending it setpoints, which expect no reply, was never judged silent (each "successful" write counted
/// as a sign of life, and the stream of commands kept the polls from running). Only data from the
/// instrument proves it alive now, and polls are never starved by commands: the heartbeat interlock trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_instrument_trips_even_while_a_run_keeps_writing_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::sim();
    lab.interlocks
        .retain(|i| i.name != "hotplate-over-temperature");
    lab.approval.auto_approve.max_steps = None;
    lab.approval.auto_approve.max_duration_s = None;
    for inst in &mut lab.instruments {
        inst.envelope.ramp_c_per_min = None;
    }
    let rig = rig_with(dir.path(), lab).await;
    // A setpoint every 5 virtual seconds (5 ms here) for 10,000 virtual seconds: longer than the 5 s
    // heartbeat in real time, whatever the machine's speed.
    let steps: Vec<Value> = (0..4_000)
        .flat_map(|i| {
            [
                json!({ "type": "action", "instrument": "hotplate", "action": "set_temperature", "params": { "temperature_c": 30 + i % 2 } }),
                json!({ "type": "wait", "duration_s": 5 }),
            ]
        })
        .collect();
    let p = json!({
        "version": 1,
        "metadata": { "name": "writes", "proposal_id": "mute-1", "planner": { "id": "planner-bo" } },
        "steps": steps
    });
    let run = rig.api().submit(bytes(&p), planner()).await.run_id.unwrap();
    wait_for(rig.api(), &run, RunState::Running).await;
    rig.fake("hotplate").mute = true;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = rig.api().run(&run).await.unwrap();
        if info.state == RunState::Paused {
            break;
        }
        assert!(
            !info.state.is_terminal() && std::time::Instant::now() < deadline,
            "the silent hotplate's interlock did not pause the run: {} {:?}",
            info.state,
            info.reason
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let interlocks = rig.api().interlocks().await;
    assert!(
        interlocks
            .iter()
            .any(|i| i.name == "hotplate-silent"
                && matches!(i.state, InterlockState::Tripped { .. })),
        "{interlocks:?}"
    );
    rig.controller.shutdown().await;
}
