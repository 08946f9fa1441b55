//! A lab of another shape than the simulated one, with no Rust changed: a second balance (on W2) and a
//! second hotplate (under H2), each on a station of its own. The simulated lab serves each on its own pty
//! (MT-SICS, IKA NAMUR); `labctl run` drives them with the built-in drivers; the dry run, the controller and
//! the simulator all weigh on each balance's own pan and heat on each hotplate's own plate; each result's
//! provenance names the instrument that measured it; an emergency stop makes the second hotplate safe too.

use std::time::Duration;

use labctl_hil_tests::rig_file::{RigFile, RigKind};
use labctl_hil_tests::system::Bench;
use labctl_protocols::Lab;
use labctl_protocols::lab::SIM_LAB_TOML;

const WARP: f64 = 20.0;

fn rig() -> RigFile {
    let text = SIM_LAB_TOML.replace(
        "[[instruments]]\nid = \"gantry\"",
        "[[deck.stations]]\nname = \"W2\"\nx_mm = 240.0\ny_mm = 40.0\ninstrument = \"balance-2\"\n\n\
         [[deck.stations]]\nname = \"H2\"\nx_mm = 240.0\ny_mm = 100.0\ninstrument = \"hotplate-2\"\n\n\
         [[instruments]]\nid = \"gantry\"",
    ) + "\n[[instruments]]\nid = \"balance-2\"\nkind = \"balance\"\ndriver = \"mt_sics\"\n\
         transport = { type = \"simulated\" }\ncapabilities = { mass_g = [-220, 220] }\n\
         envelope = { mass_g = [0, 200] }\n\n\
         [[instruments]]\nid = \"hotplate-2\"\nkind = \"hotplate\"\ndriver = \"ika_namur\"\n\
         transport = { type = \"simulated\" }\n\
         capabilities = { temperature_c = [0, 340], stir_speed_rpm = [0, 1500] }\n\
         envelope = { temperature_c = [15, 90], stir_speed_rpm = [0, 1000] }\n";
    let lab = Lab::from_toml_str(&text, "sim lab + a second balance and hotplate")
        .unwrap_or_else(|e| panic!("{e}"));
    RigFile {
        origin: "more-instruments test".into(),
        kind: RigKind::Sim,
        lab,
        warp: WARP,
        seed: 11,
        scenarios: vec!["more_instruments"],
        technician_user: "alice".into(),
        technician_password: "technician-dev".into(),
    }
}

fn weigh(balance: &str, result: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "measure", "instrument": balance, "action": "weigh",
        "params": { "stable": true }, "result": result
    })
}

#[test]
fn a_second_balance_weighs_what_stands_on_its_own_pan() {
    let bench = Bench::start(&rig(), "more_instruments_weigh");
    bench.place_vial("v1", "W2");
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    let state = port.instrument_state("balance-2");
    assert!(state.starts_with("online,"), "{state}");
    let protocol = serde_json::json!({
        "version": 1,
        "metadata": {
            "name": "weigh on both balances",
            "proposal_id": "two-balances",
            "planner": { "id": "hil", "model": "scenario" }
        },
        "labware": [{ "id": "v1", "kind": "vial", "location": "W2", "capacity_ul": 20000 }],
        "steps": [
            weigh("balance-2", "on_second"),
            weigh("balance", "first_empty"),
            { "type": "action", "instrument": "gantry", "action": "home", "params": {} },
            { "type": "action", "instrument": "gantry", "action": "transfer", "params": { "vessel": "v1", "to": "W1" } },
            weigh("balance", "on_first"),
            weigh("balance-2", "second_empty"),
        ],
    });
    let run = port.submit(&protocol).expect("the protocol is accepted");
    let limit = Duration::from_secs_f64(600.0 / WARP) + Duration::from_secs(30);
    let end = port.wait_run(&run, limit, "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    let journal = bench.assert_no_acknowledged_result_lost(&run, Some(&port), &[]);
    let result = |name: &str| {
        journal
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no result `{name}` in {journal:?}"))
            .clone()
    };
    let grams = |name: &str| {
        let r = result(name);
        r["value"]["mass_g"]
            .as_f64()
            .or_else(|| r["value"]["value"].as_f64())
            .unwrap_or_else(|| panic!("no mass in {r}"))
    };
    // An empty simulated vial weighs its 10 g tare.
    assert!(
        (grams("on_second") - 10.0).abs() < 0.05,
        "{}",
        result("on_second")
    );
    assert!(
        grams("first_empty").abs() < 0.05,
        "{}",
        result("first_empty")
    );
    assert!(
        (grams("on_first") - 10.0).abs() < 0.05,
        "{}",
        result("on_first")
    );
    assert!(
        grams("second_empty").abs() < 0.05,
        "{}",
        result("second_empty")
    );
    // Provenance: each result names the balance that weighed it, by its own serial number.
    let serial = |name: &str| result(name)["identity"]["serial"].clone();
    assert_ne!(serial("on_second"), serial("on_first"), "{journal:?}");
    assert_eq!(serial("on_second"), serial("second_empty"));
    // What each balance was sent, read back from its own pty: weighing only.
    let wire = bench
        .assert_wire_inside_envelope()
        .expect("the sim rig has a wire tap");
    assert!(wire.count("balance-2") >= 2, "{wire}");
}

/// The second hotplate heats the vessel on its own plate (H2) and the journal says which hotplate read
/// it; an emergency stop mid-run turns its heater off (in the simulated device and on the wire, `STOP_1`
/// on its own pty) like the first one's, and the latch holds until a technician acknowledges it.
#[test]
fn a_second_hotplate_heats_its_own_vessel_and_goes_safe_on_an_emergency_stop() {
    let bench = Bench::start(&rig(), "more_instruments_heat");
    bench.place_vial("warm", "H2");
    bench.place_vial("cold", "H1");
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    let state = port.instrument_state("hotplate-2");
    assert!(state.starts_with("online,"), "{state}");
    let protocol = |steps: serde_json::Value, proposal_id: &str| {
        serde_json::json!({
            "version": 1,
            "metadata": {
                "name": "heat on the second hotplate",
                "proposal_id": proposal_id,
                "planner": { "id": "hil", "model": "scenario" }
            },
            "labware": [
                { "id": "warm", "kind": "vial", "location": "H2", "capacity_ul": 20000 },
                { "id": "cold", "kind": "vial", "location": "H1", "capacity_ul": 20000 }
            ],
            "steps": steps,
        })
    };
    let heat = protocol(
        serde_json::json!([
            { "type": "action", "instrument": "hotplate-2", "action": "set_temperature", "params": { "temperature_c": 40.0 } },
            { "type": "wait_until", "condition": { "instrument": "hotplate-2", "quantity": "temperature_c", "op": "ge", "value": 30.0 }, "timeout_s": 900 },
            { "type": "measure", "instrument": "hotplate-2", "action": "read_temperature", "params": {}, "result": "second" },
            { "type": "measure", "instrument": "hotplate", "action": "read_temperature", "params": {}, "result": "first" },
            { "type": "wait", "duration_s": 1200 }
        ]),
        "second-hotplate-heat",
    );
    let run = port.submit(&heat).expect("the protocol is accepted");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while bench.journal_results(&run).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no readings within 120 s: {:?}, {:?}\n{}",
            port.run_state(&run),
            bench.journal_results(&run),
            labctl.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let journal = bench.journal_results(&run);
    let value = |name: &str| {
        let r = journal
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no result `{name}` in {journal:?}"));
        r["value"]["temperature_c"]
            .as_f64()
            .or_else(|| r["value"]["value"].as_f64())
            .unwrap_or_else(|| panic!("no temperature in {r}"))
    };
    assert!(value("second") >= 30.0, "{journal:?}");
    // The vessel on the first hotplate stays at room temperature: nothing heated it.
    assert!(value("first") < 25.0, "{journal:?}");
    assert!(
        bench.model(|m, now| m.hotplate_status(now, 1).unwrap().heating),
        "the second hotplate heats during the run"
    );
    let before = bench
        .sim
        .as_ref()
        .expect("the sim rig")
        .transcript("hotplate-2")
        .len();
    assert_eq!(port.command("SYST:ESTOP"), None);
    let end = port.wait_run(&run, Duration::from_secs(30), "an end", |s| s.is_final());
    assert_eq!(end.state, "aborted", "{end:?}");
    bench.assert_safe_within(Duration::from_secs(10), false);
    let sent = bench
        .sim
        .as_ref()
        .expect("the sim rig")
        .transcript("hotplate-2");
    let after = String::from_utf8_lossy(&sent[before.min(sent.len())..]).into_owned();
    assert!(after.contains("STOP_1"), "{after:?}");
    let refused = port
        .submit(&protocol(serde_json::json!([]), "after-estop"))
        .expect_err("latched");
    assert!(refused.contains("emergency stop"), "{refused}");
    bench
        .assert_wire_inside_envelope()
        .expect("the sim rig has a wire tap");
}
