//! Whole-system scenarios: `labctl run` as a process against the rig `LABCTL_RIG` names (default
//! `hil-tests/rigs/sim.toml`, the simulated lab on ptys and TCP, started here), driven through its command
//! port like a test rig would.
//!
//! Every scenario asserts, besides its own outcome:
//! (a) no result acknowledged to a client (a count from `RUN:STAT?`, a `result` line on stdout) is missing
//!     from the journal (`labctl runs export`);
//! (b) nothing outside the lab's envelope reached an instrument (decoded from the simulators' wire taps);
//! (c) every instrument ended in its safe state, or where the run left it on purpose (the physical model).
//! On a hardware rig, (b) and (c) have no tap or model to read and only (a) and the run's outcome are
//! checked; scenarios the rig file does not list are skipped with the reason printed.

#![cfg(unix)]

use std::sync::OnceLock;
use std::time::Duration;

use labctl_hil_tests::rig_file::RigFile;
use labctl_hil_tests::system::{Bench, workspace};

/// The rig of this test process.
fn rig() -> &'static RigFile {
    static RIG: OnceLock<RigFile> = OnceLock::new();
    RIG.get_or_init(|| RigFile::from_env().unwrap_or_else(|e| panic!("{e}")))
}

/// The bench for `scenario`, or `None` (with the reason printed) when the rig does not allow it.
fn bench(scenario: &str) -> Option<Bench> {
    let rig = rig();
    if let Some(reason) = rig.skip_reason(scenario) {
        eprintln!("skipped: {reason}");
        return None;
    }
    Some(Bench::start(rig, scenario))
}

/// Real time for a span of the rig's virtual time, plus slack for the wire and the machine.
fn virtual_secs(secs: f64) -> Duration {
    Duration::from_secs_f64(secs / rig().warp) + Duration::from_secs(20)
}

fn protocol(name: &str, proposal_id: &str) -> serde_json::Value {
    let path = workspace().join("protocols/examples").join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut protocol: serde_json::Value = serde_json::from_str(&text).expect("protocol JSON");
    // A proposal id submitted twice gives the same run: each submission here is new.
    protocol["metadata"]["proposal_id"] = proposal_id.into();
    protocol
}

fn result_names(journal: &[serde_json::Value]) -> Vec<String> {
    journal
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect()
}

/// The dye-mixing loop of sim-lab.md, two experiments with a fresh vial each: both complete, with their
/// spectrum and mass journaled, the dispensed volumes as asked and nothing left running.
#[test]
fn dye_mixing() {
    let Some(bench) = bench("dye_mixing") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    for k in 0..2 {
        bench.place_vial("mix1", "A1");
        let run = port
            .submit(&protocol("dye-mix.json", &format!("hil-dye-mixing-{k}")))
            .expect("dye-mix accepted");
        let end = port.wait_run(&run, virtual_secs(600.0), "an end", |s| s.is_final());
        assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
        let journal =
            bench.assert_no_acknowledged_result_lost(&run, &port, &[labctl.reported_results(&run)]);
        assert_eq!(result_names(&journal), ["spectrum", "mass"]);
        assert_eq!(end.results, 2);
        if bench.is_sim() {
            // 900 uL of dye in a vial on the balance: the run dispensed what it asked.
            let (position, volume) = bench.model(|m, _| {
                let vial = m.deck().vial("mix1").expect("mix1 on the deck");
                (vial.position().map(str::to_owned), vial.contents.total_ul())
            });
            assert_eq!(position.as_deref(), Some("W1"));
            assert!((volume - 900.0).abs() < 30.0, "{volume} uL in the vial");
        }
    }
    if let Some(wire) = bench.assert_wire_inside_envelope() {
        for pump in ["pump-red", "pump-yellow", "pump-blue"] {
            assert_eq!(wire.sent(pump, "volume_ul").len(), 2, "{wire}");
        }
        assert_eq!(wire.sent("pump-red", "volume_ul"), [300.0, 300.0]);
        assert!(wire.count("gantry") > 0 && wire.count("spectro") > 0 && wire.count("balance") > 0);
        assert_eq!(
            wire.sent("hotplate", "stir_speed_rpm").first(),
            Some(&600.0)
        );
    }
    // The run switched the stirrer off itself.
    bench.assert_safe_within(Duration::from_secs(10), false);
}

/// `--warp` with `--config` is for simulators only: without `--simulated-instruments` labctl refuses to
/// start, naming the flag, rather than run real instruments' waits 20 times too fast.
#[test]
fn warp_on_a_lab_file_needs_simulated_instruments() {
    let dir = labctl_hil_tests::system::ScratchDir::new("warp-refused");
    let lab = dir.path().join("lab.toml");
    std::fs::write(
        &lab,
        toml::to_string(&labctl_protocols::Lab::sim()).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(labctl_hil_tests::system::labctl_binary())
        .args([
            "run",
            "--warp",
            "20",
            "--command-port",
            "off",
            "--no-opcua",
            "--config",
        ])
        .arg(&lab)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("run labctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--simulated-instruments"), "{stderr}");
}
