//! The executor on a manual clock: tokio's paused time stands still until every task waits, then jumps to
//! the next deadline, so a protocol's hour of waiting takes no real time. Fake instruments answer at once;
//! the journal is a real SQLite file, and under test a wait for its commit holds the paused clock still
//! (see `journal::committed`): without that, a slow disk let paused time race past a step's timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use labctl_clock::VirtualClock;
use labctl_drivers::DeviceCommand;
use labctl_protocols::{Lab, Protocol};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{RunContext, RunEnd, RunUpdate, run_protocol};
use crate::api::Control;
use crate::instruments::fake::{FakeInstrument, spawn_lab};
use crate::instruments::{InstrumentHandle, TaskTiming};
use crate::journal;
use crate::safety::EStop;

struct Bench {
    _dir: tempfile::TempDir,
    journal: journal::JournalHandle,
    handles: Arc<BTreeMap<String, InstrumentHandle>>,
    fakes: BTreeMap<String, FakeInstrument>,
    estop: EStop,
}

fn bench() -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let journal = journal::start(journal::open_db(dir.path()).unwrap());
    let estop = EStop::default();
    let (handles, fakes) = spawn_lab(&Lab::sim(), &estop, TaskTiming::default());
    Bench {
        _dir: dir,
        journal,
        handles: Arc::new(handles),
        fakes,
        estop,
    }
}

fn protocol(steps: serde_json::Value) -> Protocol {
    serde_json::from_value(json!({
        "version": 1,
        "metadata": {
            "name": "executor test",
            "proposal_id": "executor-test",
            "planner": { "id": "planner-test" }
        },
        "labware": [],
        "steps": steps
    }))
    .unwrap()
}

/// Starts `protocol`; returns its control, its updates and the task that ends with the run.
fn start(
    bench: &Bench,
    protocol: &Protocol,
) -> (
    watch::Sender<Control>,
    mpsc::UnboundedReceiver<RunUpdate>,
    tokio::task::JoinHandle<()>,
) {
    let (control_tx, control_rx) = watch::channel(Control::Resume);
    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(RunContext::new(
        "run-1".into(),
        protocol,
        Arc::new(Lab::sim()),
        Arc::clone(&bench.handles),
        bench.journal.clone(),
        VirtualClock::new(1.0).unwrap(),
        Duration::from_secs(5),
        control_rx,
        updates_tx,
        bench.estop.clone(),
    ));
    let task = tokio::spawn(run_protocol(ctx, Arc::new(protocol.clone())));
    (control_tx, updates_rx, task)
}

/// How the run ended, from its updates.
async fn end_of(updates: &mut mpsc::UnboundedReceiver<RunUpdate>) -> RunEnd {
    while let Some(update) = updates.recv().await {
        if let RunUpdate::Finished { end, .. } = update {
            return end;
        }
    }
    panic!("the run task ended without saying how the run ended");
}

fn commands(fake: &FakeInstrument) -> Vec<DeviceCommand> {
    fake.log.lock().unwrap().commands.clone()
}

#[tokio::test(start_paused = true)]
async fn a_wait_takes_its_virtual_time_and_the_next_step_starts_at_its_end() {
    let bench = bench();
    let protocol = protocol(json!([
        { "type": "wait", "duration_s": 3600 },
        { "type": "action", "instrument": "hotplate", "action": "stir_off", "params": {} },
        { "type": "wait", "duration_s": 90 }
    ]));
    let (_control, mut updates, task) = start(&bench, &protocol);
    // When each step started, on the paused clock. A step's start is announced before it does anything,
    // and the wait journals nothing, so the gap after a wait is the wait alone.
    let mut started = Vec::new();
    let end = loop {
        match updates.recv().await.expect("the run's updates") {
            RunUpdate::Step { step, .. } => started.push((step, Instant::now())),
            RunUpdate::Finished { end, .. } => break end,
            _ => {}
        }
    };
    task.await.unwrap();
    assert_eq!(end, RunEnd::Completed);
    let steps: Vec<&str> = started.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(steps, ["/steps/0", "/steps/1", "/steps/2"]);
    // Exactly an hour: the next step went out when the wait ended, not at a later tick or poll.
    assert_eq!(started[1].1 - started[0].1, Duration::from_secs(3600));
    assert_eq!(commands(&bench.fakes["hotplate"]), [DeviceCommand::StirOff]);
}

#[tokio::test(start_paused = true)]
async fn an_abort_during_a_wait_ends_the_run_then_and_leaves_its_instruments_safe() {
    let bench = bench();
    let protocol = protocol(json!([
        { "type": "action", "instrument": "hotplate", "action": "set_temperature",
          "params": { "temperature_c": 60 } },
        { "type": "wait", "duration_s": 3600 },
        { "type": "action", "instrument": "hotplate", "action": "heater_off", "params": {} }
    ]));
    let started = Instant::now();
    let (control, mut updates, task) = start(&bench, &protocol);
    // Ten minutes into the protocol (the ramp to 60 °C takes about five), well inside the hour's wait.
    tokio::time::sleep(Duration::from_secs(600)).await;
    control
        .send(Control::Abort)
        .expect("the run ended before the abort");
    let end = end_of(&mut updates).await;
    task.await.unwrap();
    assert!(matches!(end, RunEnd::Aborted(_)), "{end:?}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3600),
        "the abort waited for the wait to end: {took:?}"
    );
    let log = bench.fakes["hotplate"].log.lock().unwrap();
    // Ramped up to 60 °C by the protocol (the sim lab limits the ramp rate), never switched off by it,
    // made safe by the abort.
    assert_eq!(
        log.commands.last(),
        Some(&DeviceCommand::SetTemperature {
            temperature_c: 60.0
        })
    );
    assert!(!log.commands.contains(&DeviceCommand::HeaterOff));
    assert!(log.safe_states >= 1, "the hotplate was not made safe");
}

#[tokio::test(start_paused = true)]
async fn a_device_error_fails_the_run_at_its_step_and_nothing_after_it_runs() {
    let bench = bench();
    bench.fakes["pump-red"].log.lock().unwrap().fail_with = Some("syringe stalled".into());
    let protocol = protocol(json!([
        { "type": "action", "id": "prime", "instrument": "pump-red", "action": "dispense",
          "params": { "vessel": "waste", "volume_ul": 50, "rate_ul_per_min": 600 } },
        { "type": "action", "instrument": "hotplate", "action": "set_temperature",
          "params": { "temperature_c": 45 } }
    ]));
    let (_control, mut updates, task) = start(&bench, &protocol);
    let end = end_of(&mut updates).await;
    task.await.unwrap();
    let RunEnd::Failed(reason) = end else {
        panic!("expected a failed run, got {end:?}");
    };
    assert!(reason.contains("syringe stalled"), "{reason}");
    assert!(commands(&bench.fakes["hotplate"]).is_empty());
    assert!(bench.fakes["pump-red"].log.lock().unwrap().safe_states >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_lateral_move_from_below_the_safe_height_first_rises_where_the_head_is() {
    let bench = bench();
    // An aborted run left the head down in a vial at (10, 20, 5); the deck's safe height is 50 mm.
    bench.fakes["gantry"].log.lock().unwrap().values =
        vec![("x_mm", 10.0), ("y_mm", 20.0), ("z_mm", 5.0)];
    let protocol = protocol(json!([
        { "type": "action", "instrument": "gantry", "action": "move_xyz",
          "params": { "x_mm": 100, "y_mm": 120, "z_mm": 50, "feed_mm_per_min": 600 } },
        // Straight down where the head already is: no rise needed.
        { "type": "action", "instrument": "gantry", "action": "move_xyz",
          "params": { "x_mm": 10, "y_mm": 20, "z_mm": 2, "feed_mm_per_min": 600 } }
    ]));
    // Wait until the instrument task has read the position the fake reports.
    let deadline = Instant::now() + Duration::from_secs(60);
    while bench.handles["gantry"].view().values.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the gantry never reported a position"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_control, mut updates, task) = start(&bench, &protocol);
    let end = end_of(&mut updates).await;
    task.await.unwrap();
    assert_eq!(end, RunEnd::Completed);
    let move_to = |x_mm, y_mm, z_mm| DeviceCommand::MoveTo {
        x_mm,
        y_mm,
        z_mm,
        feed_mm_per_min: 600.0,
    };
    assert_eq!(
        commands(&bench.fakes["gantry"]),
        [
            move_to(10.0, 20.0, 50.0),
            move_to(100.0, 120.0, 50.0),
            move_to(10.0, 20.0, 2.0)
        ]
    );
}

/// One interpreter: each instrument receives from the executor exactly the commands the dry run applied to
/// that instrument's model, for the shipped examples. The fakes report the hotplate's plate at the model's
/// ambient temperature (where both ramps start) and the vessel at the temperature `heat-and-hold` waits for.
#[tokio::test(start_paused = true)]
async fn each_instrument_receives_what_the_dry_run_applied_to_its_model() {
    let lab = Lab::sim();
    let ambient_c = labctl_simulators::model::LabConfig::sim_default().ambient_c;
    for example in [
        include_str!("../../../protocols/examples/dye-mix.json"),
        include_str!("../../../protocols/examples/titration-series.json"),
        include_str!("../../../protocols/examples/heat-and-hold.json"),
    ] {
        let protocol = labctl_protocols::validate_bytes(example.as_bytes(), &lab)
            .protocol
            .expect("a valid example");
        let planned = labctl_simulators::dry_run::planned_commands(&protocol, &lab, 7, 100_000);
        assert!(
            !planned.is_empty(),
            "{}: nothing planned",
            protocol.metadata.name
        );
        let bench = bench();
        bench.fakes["hotplate"].log.lock().unwrap().values =
            vec![("plate_temperature_c", ambient_c), ("temperature_c", 45.0)];
        let deadline = Instant::now() + Duration::from_secs(60);
        while bench.handles["hotplate"].view().values.is_empty() {
            assert!(Instant::now() < deadline, "the hotplate never reported");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_control, mut updates, task) = start(&bench, &protocol);
        let end = end_of(&mut updates).await;
        task.await.unwrap();
        assert_eq!(end, RunEnd::Completed, "{}", protocol.metadata.name);
        for (id, fake) in &bench.fakes {
            let planned_here: Vec<DeviceCommand> = planned
                .iter()
                .filter(|(to, _)| to == id)
                .map(|(_, c)| c.clone())
                .collect();
            assert_eq!(
                commands(fake),
                planned_here,
                "{}: {id} received other commands than the dry run applied",
                protocol.metadata.name
            );
        }
    }
}
