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
        let journal = bench.assert_no_acknowledged_result_lost(
            &run,
            Some(&port),
            &[labctl.reported_results(&run)],
        );
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

/// Dye-mix with a longer mixing wait, so there is time to act while the run is in the middle of it.
fn long_dye_mix(proposal_id: &str, mix_s: f64) -> serde_json::Value {
    let mut p = protocol("dye-mix.json", proposal_id);
    let steps = p["steps"].as_array_mut().expect("steps");
    let mix = steps
        .iter_mut()
        .find(|s| s["id"] == "mix")
        .expect("the mix step");
    mix["duration_s"] = mix_s.into();
    p
}

/// Index of the step with id `id` as `RUN:STAT?` names it (`/steps/7`).
fn step_path(p: &serde_json::Value, id: &str) -> String {
    let k = p["steps"]
        .as_array()
        .and_then(|s| s.iter().position(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no step {id}"));
    format!("/steps/{k}")
}

/// The balance's cable is pulled while the vial is mixing and plugged back: the controller sees it lost,
/// and its overload interlock counts as tripped while it is (a lost balance's last mass proves nothing), so
/// the run pauses; it reconnects to the new pty on its own, the interlock clears, the technician resumes,
/// and the run completes with every result.
/// (This found a leak: the suite's pty masters were inherited by the `labctl` it starts, so an unplugged
/// pty never hung up; the simulators now open them close-on-exec.)
#[test]
fn unplug_and_replug() {
    let Some(bench) = bench("unplug_and_replug") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    bench.place_vial("mix1", "A1");
    let p = long_dye_mix("hil-unplug", 200.0);
    let mix = step_path(&p, "mix");
    let run = port.submit(&p).expect("accepted");
    port.wait_run(&run, virtual_secs(300.0), "the mixing wait", |s| {
        s.step == mix || s.is_final()
    });
    let pty_before = bench
        .sim
        .as_ref()
        .map(|s| s.endpoint("balance").map(|e| e.location()));
    bench.unplug("balance");
    // Fail safe: while the balance is lost, the run holds.
    let held = port.wait_run(&run, Duration::from_secs(20), "the hold", |s| {
        s.state == "paused" || s.is_final()
    });
    assert_eq!(held.state, "paused", "{held:?}\n{}", labctl.log_tail());
    assert!(held.reason.contains("balance-overload"), "{held:?}");
    eprintln!(
        "balance while unplugged: INST:STAT? {}",
        port.instrument_state("balance")
    );
    bench.replug("balance");
    let pty_after = bench
        .sim
        .as_ref()
        .map(|s| s.endpoint("balance").map(|e| e.location()));
    // The kernel may hand out the same /dev/pts/N again; labctl finds it through the rig's symlink.
    assert_ne!(
        pty_after,
        Some(Some("-".to_owned())),
        "the replugged pty is open (was {pty_before:?})"
    );
    // Back online, the interlock clears; until then a resume is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        port.send(&format!("RUN:RES {run}"));
        let err = port.query("SYST:ERR?");
        if err.starts_with("0,") {
            break;
        }
        assert!(err.contains("interlock"), "{err}");
        assert!(
            std::time::Instant::now() < deadline,
            "the resume was refused for 30 s: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = port.wait_run(&run, virtual_secs(900.0), "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    let journal = bench.assert_no_acknowledged_result_lost(
        &run,
        Some(&port),
        &[labctl.reported_results(&run)],
    );
    assert_eq!(result_names(&journal), ["spectrum", "mass"]);
    bench.assert_wire_inside_envelope();
    bench.assert_safe_within(Duration::from_secs(10), false);
}

/// heat-and-hold.json as a technician's script: no planner lease (nothing holds one over the command
/// port), and a temperature reading instead of the first absorbance (the suite's vial is empty).
fn heat_and_hold(proposal_id: &str) -> serde_json::Value {
    let mut p = protocol("heat-and-hold.json", proposal_id);
    p["metadata"]["supervised"] = false.into();
    p["steps"][2] = serde_json::json!({
        "type": "measure", "instrument": "hotplate", "action": "read_temperature", "params": {},
        "result": "temperature_before"
    });
    p
}

/// Heat-and-hold (heater on, stirring, waiting for 45 C), killed with SIGKILL while heating and started
/// again on the same journal: the results it had reported are journaled, the run comes back `interrupted`
/// and is never resumed, and the heater that was on when labctl died is switched off.
#[test]
fn sigkill_and_restart() {
    sigkill_scenario(false);
}

/// The same with `RUN:STAT?`'s result count taken as an acknowledgement: every result it counted must be
/// in the restarted journal. (This scenario found that the count once ran ahead of the journal's commit:
/// `RUN:STAT?` said 1 result, SIGKILL came right after, and the restarted journal held 0. The count is now
/// raised as each result commits.)
#[test]
fn sigkill_after_run_stat_counted_a_result() {
    sigkill_scenario(true);
}

fn sigkill_scenario(run_stat_is_an_acknowledgement: bool) {
    let Some(bench) = bench("sigkill_and_restart") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    bench.place_vial("sample", "H1");
    let p = heat_and_hold("hil-sigkill");
    let heating = step_path(&p, "reach-45");
    let run = port.submit(&p).expect("accepted");
    let mid = port.wait_run(&run, virtual_secs(600.0), "heating", |s| {
        (s.step == heating && s.results >= 1) || s.is_final()
    });
    assert_eq!(mid.state, "running", "{mid:?}\n{}", labctl.log_tail());
    if bench.is_sim() {
        assert!(
            bench.model(|m, now| m.hotplate_status(now, 0).unwrap().heating),
            "the heater is on when labctl dies"
        );
    }
    let reported = labctl.reported_results(&run);
    labctl.kill();
    assert_eq!(
        bench.journal_state(&run).as_deref(),
        Some("running"),
        "the killed process never got to say otherwise"
    );

    // The restarted controller does not serve the old run over the command port (RUN:STAT? answers
    // "unknown run"): its journal is where it comes back.
    let _labctl = bench.labctl();
    assert_eq!(bench.journal_state(&run).as_deref(), Some("interrupted"));
    let journaled = bench
        .assert_no_acknowledged_result_lost(
            &run,
            run_stat_is_an_acknowledgement.then_some(&port),
            &[reported],
        )
        .len();
    bench.assert_safe_within(Duration::from_secs(20), false);
    // Never resumed: still interrupted after a minute of virtual time, nothing more journaled, the
    // heater stays off.
    std::thread::sleep(virtual_secs(60.0) - Duration::from_secs(20));
    assert_eq!(bench.journal_state(&run).as_deref(), Some("interrupted"));
    assert_eq!(bench.journal_results(&run).len(), journaled);
    assert!(bench.unsafe_instruments(false).is_empty());
    bench.assert_wire_inside_envelope();
}

/// A protocol that heats, stirs and then moves the gantry slowly back and forth.
fn heat_and_move(proposal_id: &str) -> serde_json::Value {
    let mut steps = vec![
        serde_json::json!({ "type": "action", "instrument": "gantry", "action": "home", "params": {} }),
        serde_json::json!({ "type": "action", "instrument": "hotplate", "action": "set_stir_speed", "params": { "speed_rpm": 300 } }),
        serde_json::json!({ "type": "action", "instrument": "hotplate", "action": "set_temperature", "params": { "temperature_c": 60 } }),
    ];
    for k in 0..10 {
        let position = if k % 2 == 0 { "D6" } else { "A1" };
        steps.push(serde_json::json!({
            "type": "action", "id": format!("move-{k}"), "instrument": "gantry", "action": "move_to",
            "params": { "position": position, "feed_mm_per_min": 200 }
        }));
    }
    steps.push(serde_json::json!({ "type": "action", "instrument": "hotplate", "action": "heater_off", "params": {} }));
    steps.push(serde_json::json!({ "type": "action", "instrument": "hotplate", "action": "stir_off", "params": {} }));
    serde_json::json!({
        "version": 1,
        "metadata": {
            "name": "Heat while moving",
            "objective": "Keep the gantry moving while the hotplate heats (e-stop scenario)",
            "proposal_id": proposal_id,
            "planner": { "id": "hil-tests" }
        },
        "labware": [],
        "steps": steps
    })
}

/// The emergency stop while the gantry moves and the hotplate heats: the run is aborted, the heater, the
/// stirrer and the gantry stop, and nothing new starts until the latch is acknowledged.
#[test]
fn estop_during_motion_and_heating() {
    let Some(bench) = bench("estop_during_motion_and_heating") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    let run = port.submit(&heat_and_move("hil-estop")).expect("accepted");
    port.wait_run(&run, virtual_secs(600.0), "moving", |s| {
        s.step.starts_with("/steps/4") || s.is_final()
    });
    if bench.is_sim() {
        // Moving and heating right now, in the physical model.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !bench.model(|m, now| {
            m.gantry_status(now).state == labctl_simulators::model::gantry::GantryState::Run
                && m.hotplate_status(now, 0).unwrap().heating
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "never moving and heating at once"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let pressed = std::time::Instant::now();
    assert_eq!(port.command("SYST:ESTOP"), None);
    bench.assert_safe_within(Duration::from_secs(5), false);
    eprintln!(
        "e-stop to every instrument safe (physical model): {:?}",
        pressed.elapsed()
    );
    let end = port.wait_run(&run, Duration::from_secs(10), "aborted", |s| s.is_final());
    assert_eq!(end.state, "aborted", "{end:?}");
    assert_eq!(port.query("SYST:ESTOP?"), "1");
    // Latched: nothing new runs.
    let refused = port.submit(&heat_and_move("hil-estop-2")).unwrap_err();
    assert!(refused.contains("emergency stop"), "{refused}");
    assert_eq!(port.command("SYST:ESTOP:ACK"), None);
    assert_eq!(port.query("SYST:ESTOP?"), "0");
    bench.assert_no_acknowledged_result_lost(&run, Some(&port), &[labctl.reported_results(&run)]);
    if let Some(wire) = bench.assert_wire_inside_envelope() {
        // The setpoint was ramped on the wire (the lab's 10 C/min, 1 C a step) up to the protocol's 60 C.
        let sent = wire.sent("hotplate", "temperature_c");
        assert_eq!(sent.last(), Some(&60.0), "{sent:?}");
        assert!(sent.len() > 2, "no ramp: {sent:?}");
        assert!(
            sent.windows(2).all(|w| w[1] - w[0] <= 1.0 + 1e-9),
            "a setpoint rose more than one ramp increment: {sent:?}"
        );
    }
}

/// The spectrometer stops answering before the run measures: the measure step fails, the run pauses as
/// the protocol asks (`on_error: pause`), nothing else goes wrong, and an abort ends it safely.
#[test]
fn silent_instrument() {
    let Some(bench) = bench("silent_instrument") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    bench.place_vial("mix1", "A1");
    bench.set_faults(
        "spectro",
        labctl_simulators::model::FaultConfig {
            no_reply: true,
            ..Default::default()
        },
    );
    let p = protocol("dye-mix.json", "hil-silent");
    let spectrum = step_path(&p, "spectrum");
    let run = port.submit(&p).expect("accepted");
    let held = port.wait_run(&run, virtual_secs(900.0), "a hold", |s| {
        s.state != "running" && s.state != "queued"
    });
    assert_eq!(
        (held.state.as_str(), held.step.as_str()),
        ("paused", spectrum.as_str()),
        "{held:?}\n{}",
        labctl.log_tail()
    );
    assert!(!held.reason.is_empty(), "{held:?}");
    assert_eq!(port.command(&format!("RUN:ABOR {run}")), None);
    let end = port.wait_run(&run, Duration::from_secs(20), "aborted", |s| s.is_final());
    assert_eq!(end.state, "aborted");
    bench.assert_no_acknowledged_result_lost(&run, Some(&port), &[labctl.reported_results(&run)]);
    bench.assert_wire_inside_envelope();
    bench.assert_safe_within(Duration::from_secs(10), false);
}

/// Replies garbled on the serial lines (1 byte in 100 on the balance and the pumps): the drivers skip
/// the damage and retry, the run completes, and the host never sent anything undecodable.
#[test]
fn garbled_bytes() {
    let Some(bench) = bench("garbled_bytes") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    for id in ["balance", "pumps"] {
        bench.set_faults(
            id,
            labctl_simulators::model::FaultConfig {
                garble_probability: 0.01,
                ..Default::default()
            },
        );
    }
    bench.place_vial("mix1", "A1");
    let run = port
        .submit(&protocol("dye-mix.json", "hil-garbled"))
        .expect("accepted");
    let end = port.wait_run(&run, virtual_secs(900.0), "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    let journal = bench.assert_no_acknowledged_result_lost(
        &run,
        Some(&port),
        &[labctl.reported_results(&run)],
    );
    // The dispenses must succeed through the damage. The final weighing is `on_error: skip` in the
    // protocol: when garbling outlasts the driver's retries (about one run in a hundred at this rate) the
    // step is skipped, and the journal must say so; a result is never dropped silently.
    let names = result_names(&journal);
    if names == ["spectrum"] {
        let kinds = bench.journal_event_kinds(&run);
        assert!(
            kinds.iter().any(|k| k == "step_skipped"),
            "no mass and no skipped weighing: {kinds:?}"
        );
    } else {
        assert_eq!(names, ["spectrum", "mass"]);
    }
    bench.assert_wire_inside_envelope();
    bench.assert_safe_within(Duration::from_secs(10), false);
}

/// Dye-mix into vessel `vessel` at `position`.
fn dye_mix_at(proposal_id: &str, vessel: &str, position: &str) -> serde_json::Value {
    let text = protocol("dye-mix.json", proposal_id)
        .to_string()
        .replace("\"mix1\"", &format!("\"{vessel}\""))
        .replace("\"A1\"", &format!("\"{position}\""));
    serde_json::from_str(&text).expect("protocol JSON")
}

/// Two runs that need the same instruments, submitted together: one waits for the other (their spans of
/// `running` never overlap on the journal's stdout), and both complete with all their results.
#[test]
fn two_runs_contend() {
    let Some(bench) = bench("two_runs_contend") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    bench.place_vial("mix1", "A1");
    bench.place_vial("mix2", "A2");
    let first = port
        .submit(&dye_mix_at("hil-contend-1", "mix1", "A1"))
        .expect("accepted");
    let second = port
        .submit(&dye_mix_at("hil-contend-2", "mix2", "A2"))
        .expect("accepted");
    for run in [&first, &second] {
        let end = port.wait_run(run, virtual_secs(1200.0), "an end", |s| s.is_final());
        assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
        let journal = bench.assert_no_acknowledged_result_lost(
            run,
            Some(&port),
            &[labctl.reported_results(run)],
        );
        assert_eq!(result_names(&journal), ["spectrum", "mass"]);
    }
    // The order of durable state changes, as labctl printed them.
    let events: Vec<String> = labctl
        .stdout()
        .into_iter()
        .filter(|l| l.starts_with("run "))
        .collect();
    let at = |run: &str, state: &str| {
        events
            .iter()
            .position(|l| l.starts_with(&format!("run {run} {state}")))
            .unwrap_or_else(|| panic!("no `run {run} {state}` in {events:#?}"))
    };
    let (a, b) = if at(&first, "running") < at(&second, "running") {
        (&first, &second)
    } else {
        (&second, &first)
    };
    assert!(
        at(a, "completed") < at(b, "running"),
        "both ran at once: {events:#?}"
    );
    if let Some(wire) = bench.assert_wire_inside_envelope() {
        assert_eq!(wire.sent("pump-blue", "volume_ul"), [450.0, 450.0]);
    }
    bench.assert_safe_within(Duration::from_secs(10), false);
}

/// The hotplate's temperature reading runs away (sensor drift) while it heats: the over-temperature
/// interlock trips, the heater goes off, the run fails with the interlock named, and no setpoint above
/// the envelope was ever sent to chase it.
#[test]
fn over_temperature_interlock() {
    let Some(bench) = bench("over_temperature_interlock") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    bench.place_vial("sample", "H1");
    let p = heat_and_hold("hil-overtemp");
    let heating = step_path(&p, "reach-45");
    let run = port.submit(&p).expect("accepted");
    port.wait_run(&run, virtual_secs(600.0), "heating", |s| {
        s.step == heating || s.is_final()
    });
    assert!(bench.model(|m, now| m.hotplate_status(now, 0).unwrap().heating));
    // 10 C per virtual second: past the 130 C trip point within a few real seconds.
    bench.set_faults(
        "hotplate",
        labctl_simulators::model::FaultConfig {
            drift_per_hour: 36_000.0,
            ..Default::default()
        },
    );
    let end = port.wait_run(&run, virtual_secs(300.0), "an end", |s| s.is_final());
    assert_eq!(end.state, "failed", "{end:?}\n{}", labctl.log_tail());
    assert!(end.reason.contains("hotplate-over-temperature"), "{end:?}");
    bench.assert_safe_within(Duration::from_secs(10), false);
    bench.assert_no_acknowledged_result_lost(&run, Some(&port), &[labctl.reported_results(&run)]);
    if let Some(wire) = bench.assert_wire_inside_envelope() {
        assert!(
            wire.sent("hotplate", "temperature_c")
                .iter()
                .all(|&t| t <= 45.0),
            "{wire}"
        );
    }
}

/// A supervised heat-and-hold submitted over MQTT by a planner (`labctl submit --wait` as planner-bo)
/// whose process dies while the plate heats: the planner lease breaks, the journal records it, the heater
/// and stirrer go off at once, and a technician's abort ends the run.
#[test]
fn planner_disconnects_during_a_supervised_run() {
    let Some(bench) = bench("planner_disconnect") else {
        return;
    };
    let labctl = bench.labctl();
    let mqtt = labctl.mqtt.expect("the embedded broker's address");
    let mut port = bench.technician(&labctl);
    bench.place_vial("sample", "H1");
    let mut p = heat_and_hold("hil-planner-lease");
    p["metadata"]["supervised"] = true.into();
    p["metadata"]["planner"]["id"] = "planner-bo".into();
    let heating = step_path(&p, "reach-45");
    let file = bench.dir().join("supervised.json");
    std::fs::write(&file, p.to_string()).unwrap();
    let mut planner = std::process::Command::new(labctl_hil_tests::system::labctl_binary())
        .arg("submit")
        .arg(&file)
        .args(["--wait", "--lab-id", &bench.lab.lab_id, "--mqtt"])
        .arg(format!("mqtt://{mqtt}"))
        .env("LABCTL_MQTT_USER", "planner-bo")
        .env("LABCTL_MQTT_PASSWORD", "planner-dev")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the planner");
    let run = bench.wait_run_of_proposal("hil-planner-lease", Duration::from_secs(30));
    let mid = port.wait_run(&run, virtual_secs(600.0), "heating", |s| {
        s.step == heating || s.is_final()
    });
    assert_eq!(mid.state, "running", "{mid:?}\n{}", labctl.log_tail());
    assert!(bench.model(|m, now| m.hotplate_status(now, 0).unwrap().heating) || !bench.is_sim());
    // The planner crashes: its MQTT connection closes without a goodbye.
    let _ = planner.kill();
    let _ = planner.wait();
    // The hold sends the run's instruments to their safe state at once; the run itself pauses at its
    // next step boundary (here the end of the 45 C wait, which now cannot come).
    bench.assert_safe_within(Duration::from_secs(10), false);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !bench
        .journal_event_kinds(&run)
        .iter()
        .any(|k| k == "planner_lost")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no planner_lost in the journal: {:?}\n{}",
            bench.journal_event_kinds(&run),
            labctl.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bench.unsafe_instruments(false).is_empty());
    assert_eq!(port.command(&format!("RUN:ABOR {run}")), None);
    let end = port.wait_run(&run, Duration::from_secs(20), "aborted", |s| s.is_final());
    assert_eq!(end.state, "aborted");
    bench.assert_no_acknowledged_result_lost(&run, Some(&port), &[labctl.reported_results(&run)]);
    bench.assert_wire_inside_envelope();
}

/// A mosquitto broker on `port`, killed when dropped.
struct Mosquitto(std::process::Child);

impl Mosquitto {
    fn start(dir: &std::path::Path, port: u16) -> Mosquitto {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto not listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Mosquitto(child)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The retained message on `topic` of the broker on `port`, waiting for it up to `limit`.
fn retained(port: u16, topic: &str, limit: Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        let out = std::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
            .args(["-C", "1", "-W", "1"])
            .output()
            .expect("run mosquitto_sub (apt-get install mosquitto-clients)");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !text.is_empty() {
            return Some(text);
        }
    }
    None
}

/// The external MQTT broker is killed mid-run and started again: the run goes on and completes with every
/// result journaled, and labctl republishes its retained status and the run's final state on the new
/// broker (which kept nothing).
#[test]
fn broker_killed_and_restarted() {
    let Some(bench) = bench("broker_restart") else {
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let broker = Mosquitto::start(bench.dir(), port);
    let url = format!("mqtt://127.0.0.1:{port}");
    let labctl = bench.labctl_with(&["--mqtt", &url]);
    let lab_id = bench.lab.lab_id.clone();
    let status = retained(
        port,
        &format!("labctl/{lab_id}/status"),
        Duration::from_secs(15),
    );
    assert!(
        status.as_deref().is_some_and(|s| s.contains("online")),
        "{status:?}"
    );
    let mut cp = bench.technician(&labctl);
    bench.place_vial("mix1", "A1");
    let p = long_dye_mix("hil-broker", 200.0);
    let mix = step_path(&p, "mix");
    let run = cp.submit(&p).expect("accepted");
    cp.wait_run(&run, virtual_secs(300.0), "the mixing wait", |s| {
        s.step == mix || s.is_final()
    });
    drop(broker);
    // While the broker is gone the run goes on.
    let during = cp.run_state(&run);
    assert_eq!(during.state, "running", "{during:?}");
    let broker = Mosquitto::start(bench.dir(), port);
    let end = cp.wait_run(&run, virtual_secs(900.0), "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    let journal =
        bench.assert_no_acknowledged_result_lost(&run, Some(&cp), &[labctl.reported_results(&run)]);
    assert_eq!(result_names(&journal), ["spectrum", "mass"]);
    let status = retained(
        port,
        &format!("labctl/{lab_id}/status"),
        Duration::from_secs(30),
    );
    assert!(
        status.as_deref().is_some_and(|s| s.contains("online")),
        "status on the restarted broker: {status:?}\n{}",
        labctl.log_tail()
    );
    let run_status = retained(
        port,
        &format!("labctl/{lab_id}/runs/{run}/status"),
        Duration::from_secs(30),
    );
    assert!(
        run_status
            .as_deref()
            .is_some_and(|s| s.contains("completed")),
        "run status on the restarted broker: {run_status:?}"
    );
    bench.assert_wire_inside_envelope();
    bench.assert_safe_within(Duration::from_secs(10), false);
    drop(broker);
}

/// Slow instruments: every reply of the balance and the spectrometer comes 4 virtual seconds late
/// (200 ms at warp 20), within the drivers' budgets. The run takes longer and completes with every result.
#[test]
fn slow_instrument() {
    let Some(bench) = bench("slow_instrument") else {
        return;
    };
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    for id in ["balance", "spectro"] {
        bench.set_faults(
            id,
            labctl_simulators::model::FaultConfig {
                latency_ms: 4_000,
                ..Default::default()
            },
        );
    }
    bench.place_vial("mix1", "A1");
    let run = port
        .submit(&protocol("dye-mix.json", "hil-slow"))
        .expect("accepted");
    let end = port.wait_run(&run, virtual_secs(1200.0), "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    let journal = bench.assert_no_acknowledged_result_lost(
        &run,
        Some(&port),
        &[labctl.reported_results(&run)],
    );
    assert_eq!(result_names(&journal), ["spectrum", "mass"]);
    bench.assert_wire_inside_envelope();
    bench.assert_safe_within(Duration::from_secs(10), false);
}
