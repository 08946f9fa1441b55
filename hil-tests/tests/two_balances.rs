//! A lab of another shape than the simulated one, with no Rust changed: a second balance on a station of
//! its own (W2). The simulated lab serves it as an MT-SICS balance on its own pty; `labctl run` drives it
//! with the built-in driver; the dry run, the controller and the simulator all weigh on each balance's own
//! pan; each result's provenance names the balance that weighed it.

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
         [[instruments]]\nid = \"gantry\"",
    ) + "\n[[instruments]]\nid = \"balance-2\"\nkind = \"balance\"\ndriver = \"mt_sics\"\n\
         transport = { type = \"simulated\" }\ncapabilities = { mass_g = [-220, 220] }\n\
         envelope = { mass_g = [0, 200] }\n";
    let lab =
        Lab::from_toml_str(&text, "sim lab + a second balance").unwrap_or_else(|e| panic!("{e}"));
    RigFile {
        origin: "two-balances test".into(),
        kind: RigKind::Sim,
        lab,
        warp: WARP,
        seed: 11,
        scenarios: vec!["two_balances"],
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
    let bench = Bench::start(&rig(), "two_balances");
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
