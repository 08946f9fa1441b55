//! Instruments added to a lab with nothing but definition files: the simulated lab plus a second hotplate
//! stirrer described by `instruments/ika-rct-digital.toml` (ASCII) and a mass-flow controller described by
//! `instruments/bronkhorst-el-flow-modbus.toml` (Modbus RTU); no Rust of labctl knows either. `labctl run`
//! drives them over ptys against the simulators built from the same definitions; the command port shows
//! them, the validator holds their actions to the lab's envelope, a protocol using both completes with
//! their readings journaled, and the wire tap checks every byte they were sent against the envelope.

use std::time::Duration;

use labctl_hil_tests::rig_file::{RigFile, RigKind};
use labctl_hil_tests::system::{Bench, labctl_binary, workspace};
use labctl_hil_tests::terminal::Tmux;
use labctl_protocols::Lab;
use labctl_protocols::lab::SIM_LAB_TOML;

const WARP: f64 = 20.0;

/// The stirrer as a lab file names it: kind, driver and definition, its envelope on the definition's
/// parameters; nothing else.
const STIRRER: &str = r#"
[[instruments]]
id = "stirrer"
kind = "defined"
driver = "definition"
definition = "instruments/ika-rct-digital.toml"
transport = { type = "simulated" }
envelope = { temperature_c = [15, 80], speed_rpm = [0, 1000] }

[[instruments]]
id = "mfc"
kind = "defined"
driver = "definition"
definition = "instruments/bronkhorst-el-flow-modbus.toml"
transport = { type = "simulated" }
envelope = { flow_ln_per_min = [0, 5] }
"#;

fn rig() -> RigFile {
    let text = format!("{SIM_LAB_TOML}\n{STIRRER}");
    let lab = Lab::from_toml_str_in(&text, "sim lab + stirrer", &workspace())
        .unwrap_or_else(|e| panic!("{e}"));
    RigFile {
        origin: "defined-instrument test".into(),
        kind: RigKind::Sim,
        lab,
        warp: WARP,
        seed: 7,
        scenarios: vec!["defined_instrument"],
        technician_user: "alice".into(),
        technician_password: "technician-dev".into(),
    }
}

fn protocol(steps: serde_json::Value, proposal_id: &str) -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "metadata": {
            "name": "warm with the defined stirrer",
            "proposal_id": proposal_id,
            "planner": { "id": "hil", "model": "scenario" }
        },
        "labware": [],
        "steps": steps,
    })
}

/// Where the stirrer's transcript and the flow controller's flow writes stand now.
fn wire_marks(bench: &Bench) -> (usize, usize) {
    let stirrer = bench
        .sim
        .as_ref()
        .expect("the sim rig")
        .transcript("stirrer");
    let wire = bench.wire_report().expect("sim rig");
    (stirrer.len(), wire.sent("mfc", "flow_ln_per_min").len())
}

/// Waits until both definitions' safe states are on the wire after `before`: the stirrer's `STOP_1` and
/// `STOP_4`, and a flow of 0.
fn wait_both_safe(
    bench: &Bench,
    (stirrer_before, flows_before): (usize, usize),
    within: Duration,
    what: &str,
    log: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let stirrer = bench
            .sim
            .as_ref()
            .expect("the sim rig")
            .transcript("stirrer");
        let after =
            String::from_utf8_lossy(&stirrer[stirrer_before.min(stirrer.len())..]).into_owned();
        let wire = bench.wire_report().expect("sim rig");
        let flows = wire.sent("mfc", "flow_ln_per_min");
        let stopped = flows[flows_before.min(flows.len())..].contains(&0.0);
        if after.contains("STOP_1\r\nSTOP_4\r\n") && stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no safe state on the wire {what} within {within:?}: stirrer {after:?}, mfc {flows:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_defined_instrument_runs_a_protocol_inside_its_envelope_with_no_code() {
    let bench = Bench::start(&rig(), "defined_instrument");
    // `labctl` waits until every instrument of the lab, the defined ones included, is online.
    let labctl = bench.labctl_with(&["--opcua-port", "0", "--opcua-insecure-dev"]);
    let mut port = bench.technician(&labctl);
    let state = port.instrument_state("stirrer");
    assert!(state.starts_with("online,"), "{state}");

    // The envelope holds: 90 degC is inside what the definition says the instrument can do (310) but
    // outside this lab's envelope (80), and is refused with the parameter's path before anything runs.
    let too_hot = protocol(
        serde_json::json!([{
            "type": "action", "instrument": "stirrer", "action": "set_temperature",
            "params": { "temperature_c": 90.0 }
        }]),
        "defined-too-hot",
    );
    let err = port.submit(&too_hot).expect_err("90 degC is refused");
    assert!(
        err.contains("/steps/0/params/temperature_c") && err.contains("envelope"),
        "{err}"
    );
    // An action the definition does not have is refused by name.
    let too_much = protocol(
        serde_json::json!([{
            "type": "action", "instrument": "mfc", "action": "set_flow",
            "params": { "flow_ln_per_min": 7.5 }
        }]),
        "defined-too-much",
    );
    let err = port.submit(&too_much).expect_err("7.5 ln/min is refused");
    assert!(err.contains("/steps/0/params/flow_ln_per_min"), "{err}");
    let unknown = protocol(
        serde_json::json!([{ "type": "action", "instrument": "stirrer", "action": "dispense", "params": {} }]),
        "defined-unknown",
    );
    let err = port.submit(&unknown).expect_err("no dispense on a stirrer");
    assert!(err.contains("/steps/0/action"), "{err}");

    let warm = protocol(
        serde_json::json!([
            { "type": "action", "instrument": "stirrer", "action": "set_stir_speed", "params": { "speed_rpm": 300 } },
            { "type": "action", "instrument": "stirrer", "action": "set_temperature", "params": { "temperature_c": 40.0 } },
            { "type": "measure", "instrument": "stirrer", "action": "read", "params": { "quantity": "temperature_c" }, "result": "warm" },
            { "type": "action", "instrument": "mfc", "action": "set_flow", "params": { "flow_ln_per_min": 2.0 } },
            { "type": "measure", "instrument": "mfc", "action": "read", "params": { "quantity": "flow_ln_per_min" }, "result": "flow" },
            { "type": "action", "instrument": "mfc", "action": "stop_flow", "params": {} },
            { "type": "action", "instrument": "stirrer", "action": "heater_off", "params": {} },
            { "type": "action", "instrument": "stirrer", "action": "stir_off", "params": {} }
        ]),
        "defined-warm",
    );
    let run = port.submit(&warm).expect("the protocol is accepted");
    // The definition's simulator follows a setpoint with a 10 s time constant: from 22 to within 1 degC of
    // 40 takes about 30 virtual seconds.
    let limit = Duration::from_secs_f64(300.0 / WARP) + Duration::from_secs(30);
    let end = port.wait_run(&run, limit, "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    let journal = bench.assert_no_acknowledged_result_lost(&run, Some(&port), &[]);
    let warm = journal
        .iter()
        .find(|r| r["name"] == "warm")
        .unwrap_or_else(|| panic!("no result `warm` in {journal:?}"));
    let value = warm["value"]["value"].as_f64().expect("a reading's value");
    assert!((value - 40.0).abs() <= 1.5, "{warm}");
    assert_eq!(warm["value"]["unit"], "degC", "{warm}");
    // Provenance: the identity the instrument reported at connect, read with the definition's patterns.
    assert_eq!(warm["identity"]["model"], "RCT digital", "{warm}");
    assert_eq!(warm["identity"]["firmware"], "1.10", "{warm}");

    let flow = journal
        .iter()
        .find(|r| r["name"] == "flow")
        .unwrap_or_else(|| panic!("no result `flow` in {journal:?}"));
    let value = flow["value"]["value"].as_f64().expect("a reading's value");
    assert!((value - 2.0).abs() <= 0.05, "{flow}");
    assert_eq!(flow["identity"]["manufacturer"], "Bronkhorst", "{flow}");

    // The live reading, as any instrument's, on the command port.
    let reading = port.query("MEAS? stirrer,temperature_c");
    assert!(reading.parse::<f64>().is_ok(), "{reading}");

    // Every byte the stirrer was sent, read back with its definition: inside the envelope.
    let wire = bench
        .assert_wire_inside_envelope()
        .expect("the sim rig has a wire tap");
    assert_eq!(wire.sent("stirrer", "temperature_c"), [40.0], "{wire}");
    assert_eq!(wire.sent("stirrer", "speed_rpm"), [300.0], "{wire}");
    assert!(wire.count("stirrer") > 5, "{wire}");
    // The flow setpoint, then the stop, read back from the Modbus frames (the controller also makes the
    // instrument safe when it connects: those are zeros too).
    let flows = wire.sent("mfc", "flow_ln_per_min");
    let nonzero: Vec<f64> = flows.iter().copied().filter(|v| *v != 0.0).collect();
    assert_eq!(nonzero, [2.0], "{wire}");
    assert_eq!(flows.last(), Some(&0.0), "{wire}");
}

/// The faces show a defined instrument like a built-in one: in OPC UA (browsed with the Python `asyncua`
/// client, an independent implementation) a device with a function per reading and its engineering units,
/// and a method per action that a technician calls and an observer cannot; on MQTT the retained
/// capabilities with the definition's actions and parameters (read with `paho-mqtt`).
const FACES_SCRIPT: &str = r#"
import asyncio, json, sys, threading
from asyncua import Client, ua
import paho.mqtt.client as mqtt

opcua_url, mqtt_port = sys.argv[1], int(sys.argv[2])
out = {}

def client(user, password):
    c = Client(url=opcua_url, timeout=30)
    c.set_user(user)
    c.set_password(password)
    return c

async def opcua():
    watcher = client("watcher", "observer-dev")
    await watcher.connect()
    ns = await watcher.get_namespace_index("urn:labctl:sim")
    stirrer = await watcher.nodes.objects.get_child([f"{ns}:Lab", f"{ns}:Devices", f"{ns}:stirrer"])
    out["stirrer"] = sorted([(await c.read_browse_name()).Name for c in await stirrer.get_children()])
    sensor = watcher.get_node(ua.NodeId(
        "Lab/Devices/stirrer/FunctionalUnitSet/stirrer/FunctionSet/temperature_c/SensorValue", ns))
    out["temperature_c"] = await sensor.read_value()
    out["unit"] = (await (await sensor.get_child("0:EngineeringUnits")).read_value()).DisplayName.Text
    try:
        await stirrer.call_method(f"{ns}:set_stir_speed", ua.Variant(200.0, ua.VariantType.Double))
        out["observer_call"] = "accepted"
    except ua.UaStatusCodeError as e:
        out["observer_call"] = ua.StatusCode(e.code).name
    await watcher.disconnect()
    alice = client("alice", "technician-dev")
    await alice.connect()
    stirrer = alice.get_node(ua.NodeId("Lab/Devices/stirrer", ns))
    result = await stirrer.call_method(f"{ns}:set_stir_speed", ua.Variant(200.0, ua.VariantType.Double))
    out["technician_call"] = result[1] if isinstance(result, list) else result
    try:
        await stirrer.call_method(f"{ns}:set_stir_speed", ua.Variant(5000.0, ua.VariantType.Double))
        out["over_range_call"] = "accepted"
    except ua.UaStatusCodeError as e:
        out["over_range_call"] = ua.StatusCode(e.code).name
    await alice.disconnect()

def capabilities():
    got = threading.Event()
    def on_message(c, userdata, msg):
        out["capabilities"] = json.loads(msg.payload)
        got.set()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set("watcher", "observer-dev")
    c.on_message = on_message
    c.on_connect = lambda c, u, f, rc, p: c.subscribe("labctl/sim/capabilities")
    c.connect("127.0.0.1", mqtt_port)
    c.loop_start()
    if not got.wait(30):
        raise SystemExit("no capabilities message")
    c.loop_stop()

asyncio.run(opcua())
capabilities()
print(json.dumps(out))
"#;

#[test]
fn the_faces_show_a_defined_instrument_with_no_code() {
    let python = std::env::var("LABCTL_TEST_PYTHON")
        .expect("LABCTL_TEST_PYTHON: a Python with asyncua and paho-mqtt (scripts/test sets it)");
    let bench = Bench::start(&rig(), "defined_instrument_faces");
    let labctl = bench.labctl_with(&["--opcua-port", "0", "--opcua-insecure-dev"]);
    let url = labctl.opcua.clone().expect("the OPC UA endpoint");
    let mqtt = labctl.mqtt.expect("the MQTT broker");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(FACES_SCRIPT)
        .arg(&url)
        .arg(mqtt.port().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        labctl.log_tail()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let children: Vec<&str> = v["stirrer"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for name in [
        "Identification",
        "FunctionalUnitSet",
        "set_temperature",
        "set_stir_speed",
        "heater_off",
        "stir_off",
    ] {
        assert!(children.contains(&name), "{name} not in {children:?}");
    }
    assert!(
        (v["temperature_c"].as_f64().unwrap() - 22.0).abs() < 1.0,
        "{v}"
    );
    assert_eq!(v["unit"], "°C", "{v}");
    assert_eq!(v["observer_call"], "BadUserAccessDenied", "{v}");
    assert_eq!(v["technician_call"], "completed", "{v}");
    assert_ne!(v["over_range_call"], "accepted", "{v}");
    let instruments = v["capabilities"]["instruments"].as_array().unwrap();
    let stirrer = instruments
        .iter()
        .find(|i| i["id"] == "stirrer")
        .expect("the stirrer in capabilities");
    assert_eq!(stirrer["kind"], "defined");
    assert_eq!(stirrer["model"]["model"], "RCT digital");
    assert_eq!(stirrer["driver"], "definition");
    let actions: Vec<&str> = stirrer["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(actions.contains(&"set_temperature"), "{stirrer}");
    assert_eq!(stirrer["measurements"][0], "read");
    let mfc = instruments
        .iter()
        .find(|i| i["id"] == "mfc")
        .expect("the flow controller");
    assert_eq!(
        mfc["model"]["actions"][0]["params"][0]["unit"], "ln/min",
        "{mfc}"
    );
}

/// The terminal console, as a technician opens it on a lab with two instruments added by definition files:
/// both are listed beside the built-in ones, and the stirrer's detail shows the identity read from it at
/// connect (its definition's identity queries) and its definition's first reading with its history (an
/// 80x24 terminal has room for one).
#[test]
fn the_terminal_console_shows_a_defined_instrument_with_its_identity_and_readings() {
    let bench = Bench::start(&rig(), "defined_instrument_console");
    let labctl = bench.labctl_with(&[]);
    let mqtt = labctl.mqtt.expect("the MQTT broker");
    let password = bench.dir().join("alice.password");
    std::fs::write(&password, "technician-dev\n").unwrap();
    let tmux = Tmux::new("labctl-defined-console");
    tmux.open(&format!(
        "env LABCTL_MQTT_USER=alice LABCTL_MQTT_PASSWORD_FILE={} {} console --mqtt mqtt://127.0.0.1:{}",
        password.display(),
        labctl_binary().display(),
        mqtt.port()
    ));
    let wait = Duration::from_secs(30);
    tmux.wait_for(&["broker ok", "controller online"], wait);
    tmux.send("1");
    let count = format!("Instruments ({})", bench.lab.instruments.len());
    // Instruments are listed by id: the flow controller among the first, the stirrer the last (below the
    // fold of an 80x24 terminal until it is selected).
    tmux.wait_for(&[&count, "mfc", "flow_ln_per_min"], wait);
    for _ in 1..bench.lab.instruments.len() {
        tmux.send("Down");
    }
    let screen = tmux.wait_for(
        &[
            "┌ stirrer ─",
            "IKA RCT digital  serial not reported  firmware 1.10",
            "temperature_c 22.0",
        ],
        wait,
    );
    assert!(screen.contains("online"), "{screen}");
    tmux.send("q");
    tmux.wait_until_exited(wait);
}

/// Safety in sequence, for defined instruments as for built-in ones: an emergency stop while a run using
/// them waits (the stirrer heating, gas flowing) sends both
/// defined instruments their definitions' safe states (the NAMUR `STOP_1`/`STOP_4`, the flow controller's
/// `stop_flow`), aborts the run, refuses a new one while latched, and after a technician's acknowledgement
/// the next run on the same instruments completes.
#[test]
fn an_emergency_stop_makes_defined_instruments_safe_and_a_run_after_the_acknowledgement_completes()
{
    let bench = Bench::start(&rig(), "defined_instrument_estop");
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    // The run sets a flow and a temperature, then waits 600 virtual seconds (30 s real): it is still
    // running when the stop comes, however slow the machine.
    let slow = protocol(
        serde_json::json!([
            { "type": "action", "instrument": "mfc", "action": "set_flow", "params": { "flow_ln_per_min": 3.0 } },
            { "type": "action", "instrument": "stirrer", "action": "set_temperature", "params": { "temperature_c": 55.0 } },
            { "type": "wait", "duration_s": 600 }
        ]),
        "defined-estop-slow",
    );
    let run = port.submit(&slow).expect("accepted");
    // Inside the auto-approval envelope: it runs at once.
    port.wait_run(&run, Duration::from_secs(30), "running", |s| {
        s.state == "running"
    });
    // The flow setpoint is on the wire before the stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !bench
        .wire_report()
        .expect("sim rig")
        .sent("mfc", "flow_ln_per_min")
        .contains(&3.0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "set_flow never reached the wire"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = wire_marks(&bench);
    assert_eq!(port.command("SYST:ESTOP"), None);
    let end = port.wait_run(&run, Duration::from_secs(30), "an end", |s| s.is_final());
    assert_eq!(end.state, "aborted", "{end:?}");
    // Both definitions' safe states reached the wire after the stop.
    wait_both_safe(
        &bench,
        before,
        Duration::from_secs(10),
        "after the stop",
        || labctl.log_tail(),
    );
    // Latched: nothing new starts.
    let again = protocol(
        serde_json::json!([
            { "type": "action", "instrument": "mfc", "action": "set_flow", "params": { "flow_ln_per_min": 1.0 } },
            { "type": "action", "instrument": "mfc", "action": "stop_flow", "params": {} }
        ]),
        "defined-after-estop",
    );
    let refused = port.submit(&again).expect_err("latched");
    assert!(refused.contains("emergency stop"), "{refused}");
    assert_eq!(port.command("SYST:ESTOP:ACK"), None);
    let again = protocol(
        serde_json::json!([
            { "type": "action", "instrument": "mfc", "action": "set_flow", "params": { "flow_ln_per_min": 1.0 } },
            { "type": "action", "instrument": "mfc", "action": "stop_flow", "params": {} }
        ]),
        "defined-after-ack",
    );
    let run = port
        .submit(&again)
        .expect("accepted after the acknowledgement");
    let end = port.wait_run(&run, Duration::from_secs(30), "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    bench.assert_wire_inside_envelope();
}

/// `kill -9` in the middle of a run on defined instruments: the restarted controller makes both safe
/// from their definitions before anything else (the stirrer's heater and motor off, the flow at 0), marks
/// the run interrupted and never resumes it (no setpoint of it reaches the wire again), and the next run
/// on them completes.
#[test]
fn after_kill_9_mid_run_defined_instruments_are_made_safe_and_the_run_is_not_resumed() {
    let bench = Bench::start(&rig(), "defined_instrument_kill");
    let labctl = bench.labctl_listening(&[]);
    let mut port = bench.technician(&labctl);
    let sim = bench.sim.as_ref().expect("the sim rig");
    let slow = protocol(
        serde_json::json!([
            { "type": "action", "instrument": "mfc", "action": "set_flow", "params": { "flow_ln_per_min": 3.0 } },
            { "type": "action", "instrument": "stirrer", "action": "set_temperature", "params": { "temperature_c": 55.0 } },
            { "type": "wait", "duration_s": 120 },
            { "type": "action", "instrument": "mfc", "action": "set_flow", "params": { "flow_ln_per_min": 4.5 } }
        ]),
        "defined-kill-slow",
    );
    let run = port.submit(&slow).expect("accepted");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !sim
        .transcript("stirrer")
        .windows(b"START_1".len())
        .any(|w| w == b"START_1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the stirrer never started heating: {:?}\n{}",
            port.run_state(&run),
            labctl.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = wire_marks(&bench);
    drop(port);
    labctl.kill();

    let labctl = bench.labctl_listening(&[]);
    let mut port = bench.technician(&labctl);
    // Made safe by the restarted controller, from the definitions' safe-state sequences.
    wait_both_safe(
        &bench,
        before,
        Duration::from_secs(30),
        "made safe by the restarted controller",
        || labctl.log_tail(),
    );
    assert_eq!(
        bench.journal_state(&run).as_deref(),
        Some("interrupted"),
        "the killed run is interrupted in the journal"
    );
    let state = port.run_state(&run);
    assert!(state.is_final(), "the killed run is not resumed: {state:?}");
    let again = protocol(
        serde_json::json!([
            { "type": "action", "instrument": "mfc", "action": "set_flow", "params": { "flow_ln_per_min": 1.0 } },
            { "type": "action", "instrument": "stirrer", "action": "set_temperature", "params": { "temperature_c": 30.0 } },
            { "type": "action", "instrument": "stirrer", "action": "heater_off", "params": {} },
            { "type": "action", "instrument": "mfc", "action": "stop_flow", "params": {} }
        ]),
        "defined-after-kill",
    );
    let run = port.submit(&again).expect("accepted after the restart");
    let end = port.wait_run(&run, Duration::from_secs(60), "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    // Had the killed run been resumed, it would have held the mfc until its last step (4.5 ln/min) and
    // this run would have waited behind it: its last setpoint is not on the wire.
    let wire = bench.wire_report().expect("sim rig");
    let flows = wire.sent("mfc", "flow_ln_per_min");
    assert!(
        !flows.contains(&4.5),
        "a setpoint of the killed run reached the wire after the restart: {flows:?}"
    );
    bench.assert_wire_inside_envelope();
}
