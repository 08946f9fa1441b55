//! Every instrument definition shipped in `instruments/`, end to end, with no Rust of labctl knowing any of
//! them: one lab with all of them beside the simulated lab's instruments, each served by the simulator its
//! own definition gives.
//! - `labctl run` drives each through a protocol (one of its actions, then one of its readings), the run
//!   completes, each reading carries the identity its instrument reported at connect, and the wire tap
//!   holds every byte each was sent to the lab's envelope;
//! - pyserial, an independent client, gets the manuals' replies to the manuals' commands from the ASCII
//!   ones' simulators at the manuals' line settings (the Modbus one has pymodbus in
//!   `modbus_multidrop.rs`).
//!
//! A definition added to `instruments/` without a row here fails
//! `every_shipped_definition_runs_a_protocol_on_labctl_run`.

use std::time::Duration;

use labctl_hil_tests::rig_file::{RigFile, RigKind};
use labctl_hil_tests::system::{Bench, workspace};
use labctl_protocols::Lab;
use labctl_protocols::lab::SIM_LAB_TOML;

const WARP: f64 = 20.0;

/// One shipped definition in the lab: its id, file, envelope, and the step pair the protocol runs.
struct Shipped {
    id: &'static str,
    file: &'static str,
    envelope: &'static str,
    /// An action with its parameters (JSON).
    action: (&'static str, &'static str),
    /// A reading, and the value it must give within a tolerance.
    reading: (&'static str, f64, f64),
    /// A parameter the action sends and its value, as the wire tap reads it back.
    sent: Option<(&'static str, f64)>,
}

const SHIPPED: &[Shipped] = &[
    Shipped {
        id: "mfc",
        file: "bronkhorst-el-flow-modbus.toml",
        envelope: "{ flow_ln_per_min = [0, 5] }",
        action: ("set_flow", r#"{ "flow_ln_per_min": 1.5 }"#),
        reading: ("flow_ln_per_min", 1.5, 0.05),
        sent: Some(("flow_ln_per_min", 1.5)),
    },
    Shipped {
        id: "stirrer",
        file: "ika-rct-digital.toml",
        envelope: "{ temperature_c = [15, 80], speed_rpm = [0, 1000] }",
        action: ("set_stir_speed", r#"{ "speed_rpm": 200 }"#),
        reading: ("temperature_c", 22.0, 1.0),
        sent: Some(("speed_rpm", 200.0)),
    },
    // The thermostats' setpoints are inside their tolerance of the start (20 degC): their completion (the
    // bath within 0.5 degC of it) comes at once, whatever their time constants.
    Shipped {
        id: "loop",
        file: "lauda-loop.toml",
        envelope: "{ temperature_c = [5, 40] }",
        action: ("set_temperature", r#"{ "temperature_c": 20.3 }"#),
        reading: ("temperature_c", 20.0, 0.5),
        sent: Some(("temperature_c", 20.3)),
    },
    Shipped {
        id: "kryomat",
        file: "lauda-proline-kryomat.toml",
        envelope: "{ temperature_c = [-40, 40] }",
        action: ("set_temperature", r#"{ "temperature_c": 20.3 }"#),
        reading: ("temperature_c", 20.0, 0.5),
        sent: Some(("temperature_c", 20.3)),
    },
    Shipped {
        id: "excellence",
        file: "mettler-toledo-excellence.toml",
        envelope: "{}",
        action: ("tare", "{}"),
        reading: ("weight_g", 0.0, 0.01),
        sent: None,
    },
    Shipped {
        id: "sartorius",
        file: "sartorius-cp.toml",
        envelope: "{}",
        action: ("tare", "{}"),
        reading: ("weight_g", 0.0, 0.01),
        sent: None,
    },
];

fn rig() -> RigFile {
    let mut text = SIM_LAB_TOML.to_owned();
    for s in SHIPPED {
        text.push_str(&format!(
            "\n[[instruments]]\nid = \"{}\"\nkind = \"defined\"\ndriver = \"definition\"\n\
             definition = \"instruments/{}\"\ntransport = {{ type = \"simulated\" }}\nenvelope = {}\n",
            s.id, s.file, s.envelope
        ));
    }
    let lab = Lab::from_toml_str_in(&text, "sim lab + every shipped definition", &workspace())
        .unwrap_or_else(|e| panic!("{e}"));
    RigFile {
        origin: "shipped-definitions test".into(),
        kind: RigKind::Sim,
        lab,
        warp: WARP,
        seed: 5,
        scenarios: vec!["shipped_definitions"],
        technician_user: "alice".into(),
        technician_password: "technician-dev".into(),
    }
}

#[test]
fn every_shipped_definition_runs_a_protocol_on_labctl_run() {
    let shipped: Vec<String> = std::fs::read_dir(workspace().join("instruments"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".toml"))
        .collect();
    for file in &shipped {
        assert!(
            SHIPPED.iter().any(|s| s.file == file),
            "{file} has no row in SHIPPED"
        );
    }
    let bench = Bench::start(&rig(), "shipped_definitions_run");
    let labctl = bench.labctl();
    let mut port = bench.technician(&labctl);
    let mut steps = Vec::new();
    for s in SHIPPED {
        let state = port.instrument_state(s.id);
        assert!(state.starts_with("online,"), "{}: {state}", s.id);
        let params: serde_json::Value = serde_json::from_str(s.action.1).unwrap();
        steps.push(serde_json::json!({
            "type": "action", "instrument": s.id, "action": s.action.0, "params": params
        }));
        steps.push(serde_json::json!({
            "type": "measure", "instrument": s.id, "action": "read",
            "params": { "quantity": s.reading.0 }, "result": s.id
        }));
    }
    let protocol = serde_json::json!({
        "version": 1,
        "metadata": {
            "name": "every shipped definition",
            "proposal_id": "shipped-definitions",
            "planner": { "id": "hil", "model": "scenario" }
        },
        "labware": [],
        "steps": steps,
    });
    let run = port.submit(&protocol).expect("the protocol is accepted");
    let limit = Duration::from_secs_f64(600.0 / WARP) + Duration::from_secs(60);
    let end = port.wait_run(&run, limit, "an end", |s| s.is_final());
    assert_eq!(end.state, "completed", "{end:?}\n{}", labctl.log_tail());
    let journal = bench.assert_no_acknowledged_result_lost(&run, Some(&port), &[]);
    let lab = bench.lab.clone();
    for s in SHIPPED {
        let result = journal
            .iter()
            .find(|r| r["name"] == s.id)
            .unwrap_or_else(|| panic!("no result `{}` in {journal:?}", s.id));
        let value = result["value"]["value"]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: no value in {result}", s.id));
        let (_, expected, tolerance) = s.reading;
        assert!(
            (value - expected).abs() <= tolerance,
            "{}: {value} is not {expected} +/- {tolerance}: {result}",
            s.id
        );
        let definition = lab.instrument(s.id).unwrap().defined().unwrap().clone();
        assert_eq!(
            result["identity"]["manufacturer"], definition.model.manufacturer,
            "{}: {result}",
            s.id
        );
    }
    let wire = bench
        .assert_wire_inside_envelope()
        .expect("the sim rig has a wire tap");
    for s in SHIPPED {
        assert!(wire.count(s.id) >= 2, "{}: {wire}", s.id);
        if let Some((param, value)) = s.sent {
            assert!(
                wire.sent(s.id, param).contains(&value),
                "{} was not sent {param} = {value}: {wire}",
                s.id
            );
        }
    }
}

/// pyserial against the ASCII definitions' simulators, at each manual's line settings, with each manual's
/// command bytes: the replies are the manuals' (or, for readings, in the manual's format). Needs
/// `LABCTL_TEST_PYTHON` (a Python with pyserial; `scripts/test` provides it).
#[test]
fn pyserial_gets_the_manuals_replies_from_every_ascii_definition() {
    let python = std::env::var("LABCTL_TEST_PYTHON")
        .expect("LABCTL_TEST_PYTHON: a Python with pyserial (scripts/test sets it)");
    let bench = Bench::start(&rig(), "shipped_definitions_pyserial");
    let port = |id: &str| match &bench.lab.instrument(id).unwrap().transport {
        labctl_protocols::lab::Transport::Serial(line) => line.port.clone(),
        other => panic!("{id} on {other:?}"),
    };
    let script = r#"
import re, sys, serial
out = []
def ask(link, command, expect_reply=True):
    link.write(command)
    if expect_reply:
        out.append(link.read_until(b"\r\n"))
# LAUDA LOOP (5.11) and Proline Kryomat (8.3.2): 9600 8N1; "OUT_SP_00_30.5" answered "OK"; "IN_PV_00"
# answered with the bath temperature, a fixed point number.
for path in sys.argv[1:3]:
    lauda = serial.Serial(path, 9600, bytesize=8, parity="N", stopbits=1, timeout=5)
    ask(lauda, b"OUT_SP_00_30.5\r\n")
    ask(lauda, b"IN_PV_00\r\n")
    lauda.close()
# METTLER TOLEDO Excellence, MT-SICS: 9600 8N1, Xon/Xoff; "Z" answered "Z A", "S" answered "S S <weight> g".
mt = serial.Serial(sys.argv[3], 9600, bytesize=8, parity="N", stopbits=1, xonxoff=True, timeout=10)
ask(mt, b"Z\r\n")
ask(mt, b"S\r\n")
mt.close()
# Sartorius CP: 1200 baud, 7 data bits, odd parity, 1 stop bit; "Esc P" prints the weight as
# "<sign> <value> g" (the sign apart from the digits); "Esc T" tares and answers nothing.
sa = serial.Serial(sys.argv[4], 1200, bytesize=7, parity="O", stopbits=1, timeout=10)
ask(sa, b"\x1bT\r\n", expect_reply=False)
ask(sa, b"\x1bP\r\n")
sa.close()
for line in out:
    print(repr(line))
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(port("loop"))
        .arg(port("kryomat"))
        .arg(port("excellence"))
        .arg(port("sartorius"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    let number = |line: &str| -> f64 {
        line.strip_prefix("b'")
            .and_then(|l| l.strip_suffix("\\r\\n'"))
            .and_then(|l| l.contains('.').then_some(l))
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("not a fixed point number: {line}"))
    };
    for lauda in [&lines[0..2], &lines[2..4]] {
        assert_eq!(lauda[0], "b'OK\\r\\n'", "{stdout}");
        assert!((number(lauda[1]) - 20.0).abs() < 1.0, "{stdout}");
    }
    assert_eq!(lines[4], "b'Z A\\r\\n'", "{stdout}");
    assert!(
        lines[5].starts_with("b'S S ") && lines[5].ends_with(" g\\r\\n'"),
        "{stdout}"
    );
    assert!(
        (lines[6].starts_with("b'+ ") || lines[6].starts_with("b'- ")) && lines[6].contains(" g"),
        "{stdout}"
    );
}
