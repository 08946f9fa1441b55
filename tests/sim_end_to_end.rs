//! The dye-mixing experiment on the whole simulated lab, in warped virtual time: real drivers talk to the
//! wire-level simulators over pseudo-terminals and TCP, and the physical model shows what happened.

use labctl::api::Face;
use std::time::Duration;

use labctl::api::{Principal, RunState};
use labctl::controller::{ControllerConfig, start};
use labctl::journal;
use labctl::lab_runtime::RuntimeOptions;
use labctl::safety::EStop;
use labctl::world::TickConfig;
use labctl_clock::VirtualClock;
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;

/// The simulated lab with the model seed these tests expect.
fn options() -> RuntimeOptions {
    RuntimeOptions {
        seed: 7,
        ..RuntimeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dye_mix_on_the_simulated_lab() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::sim();
    let clock = VirtualClock::new(20.0).unwrap();
    let estop = EStop::default();
    let runtime = labctl::lab_runtime::connect(&lab, &options(), clock, &estop)
        .await
        .unwrap();
    let config = ControllerConfig {
        lab: lab.clone(),
        lab_sha256: "sim".into(),
        data_dir: dir.path().to_owned(),
        clock,
        step_timeout_floor: Duration::from_secs(10),
        tick: TickConfig {
            period: Duration::from_millis(10),
            spin: Duration::ZERO,
            realtime_priority: None,
        },
        labware: runtime.labware_loader(),
    };
    let controller = start(config, runtime.instruments.clone(), estop)
        .await
        .unwrap();
    let api = controller.handle.clone();
    let protocol = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/protocols/examples/dye-mix.json"
    ))
    .unwrap();
    let reply = api
        .submit(
            protocol,
            Principal::new("planner-bo", Role::Planner, Face::InProcess),
        )
        .await;
    let run_id = reply.run_id.clone().unwrap_or_else(|| panic!("{reply:?}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = api.run(&run_id).await.unwrap();
        if info.state.is_terminal() {
            assert_eq!(info.state, RunState::Completed, "{info:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run did not finish: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    controller.shutdown().await;

    // The journal has both results, with the identity the instruments reported over the wire.
    let conn = journal::open_db(dir.path()).unwrap();
    let rows = journal::read::results(&conn, &run_id, 0).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["spectrum", "mass"]
    );
    let spectrum = &rows[0].value;
    let wl: Vec<f64> = spectrum["wavelengths_nm"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let ab: Vec<f64> = spectrum["absorbance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(wl.len(), 81);
    let at = |nm: f64| ab[wl.iter().position(|w| *w == nm).unwrap()];
    // Blue (450 uL) dominates red (300 uL) and yellow (150 uL): more absorbance near 620 nm than at 780 nm.
    assert!(
        at(620.0) > at(780.0) + 0.1,
        "620 nm {} vs 780 nm {}",
        at(620.0),
        at(780.0)
    );
    assert!(!rows[0].identity["serial"].as_str().unwrap().is_empty());
    // 900 uL of stock (~0.9 g) in a vial of ~10 g tare, weighed on the balance over the wire.
    let mass = rows[1].value["mass_g"].as_f64().unwrap();
    assert!((mass - 10.9).abs() < 0.1, "mass {mass}");

    // And the physical model agrees: the vial holds the three dyes and stands on the weigh station.
    let sim = runtime.sim.as_ref().unwrap();
    let (dyes, spilled) = sim.with_model(|m, now| {
        m.advance_to(now);
        let v = m.vial("mix1").expect("vial mix1 on the deck").clone();
        (v.contents.dye_ul, m.stats().spilled_ul)
    });
    for (got, want) in dyes.iter().zip([300.0, 150.0, 450.0]) {
        assert!((got - want).abs() < want * 0.05, "dye volumes {dyes:?}");
    }
    assert_eq!(spilled, 0.0, "nothing spilled");
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_stop_during_motion_and_heating_on_the_simulated_lab() {
    use labctl_simulators::model::GantryState;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::sim();
    let clock = VirtualClock::new(1.0).unwrap();
    let estop = EStop::default();
    let runtime = labctl::lab_runtime::connect(&lab, &options(), clock, &estop)
        .await
        .unwrap();
    let config = ControllerConfig {
        lab: lab.clone(),
        lab_sha256: "sim".into(),
        data_dir: dir.path().to_owned(),
        clock,
        step_timeout_floor: Duration::from_secs(10),
        tick: TickConfig {
            period: Duration::from_millis(10),
            spin: Duration::ZERO,
            realtime_priority: None,
        },
        labware: runtime.labware_loader(),
    };
    let controller = start(config, runtime.instruments.clone(), estop)
        .await
        .unwrap();
    let api = controller.handle.clone();
    let protocol = serde_json::json!({
        "version": 1,
        "metadata": { "name": "slow move while heating", "proposal_id": "estop-sim", "planner": { "id": "planner-bo" } },
        "steps": [
            { "type": "action", "instrument": "gantry", "action": "home", "params": {} },
            { "type": "parallel", "branches": [
                [ { "type": "action", "instrument": "hotplate", "action": "set_temperature", "params": { "temperature_c": 55 } },
                  { "type": "wait", "duration_s": 600 } ],
                [ { "type": "action", "instrument": "gantry", "action": "move_xyz", "params": { "x_mm": 290, "y_mm": 190, "z_mm": 50, "feed_mm_per_min": 200 } } ]
            ] }
        ]
    });
    let reply = api
        .submit(
            serde_json::to_vec(&protocol).unwrap(),
            Principal::new("planner-bo", Role::Planner, Face::InProcess),
        )
        .await;
    let run_id = reply.run_id.clone().unwrap_or_else(|| panic!("{reply:?}"));
    let sim = runtime.sim.as_ref().unwrap();
    // Wait until the gantry moves and the hotplate heats.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (moving, heating) = sim.with_model(|m, now| {
            (
                m.gantry_status(now).state == GantryState::Run,
                m.hotplate_status(now, 0).unwrap().heating,
            )
        });
        if moving && heating {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw motion and heating together"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.emergency_stop(Principal::new("alice", Role::Technician, Face::InProcess))
        .await
        .unwrap();
    // Within a few wire times the gantry holds where it is and the heater is off.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (state, pos, heating) = sim.with_model(|m, now| {
        let g = m.gantry_status(now);
        (
            g.state,
            g.position,
            m.hotplate_status(now, 0).unwrap().heating,
        )
    });
    assert!(!heating, "heater still on after the e-stop");
    assert!(
        matches!(state, GantryState::Hold | GantryState::Idle),
        "gantry {state:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = sim.with_model(|m, now| m.gantry_status(now).position);
    assert_eq!(pos, later, "the gantry kept moving after the e-stop");
    assert_eq!(api.run(&run_id).await.unwrap().state, RunState::Aborted);
    controller.shutdown().await;
    runtime.shutdown().await;
}
