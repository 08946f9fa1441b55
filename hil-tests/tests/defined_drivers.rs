//! The definition-driven drivers against the simulators built from the same definitions, over real
//! pseudo-terminals and TCP: an ASCII instrument (the IKA RCT digital definition) and a Modbus mass-flow
//! controller (the Bronkhorst EL-FLOW definition) over RTU on a pty and, with the same registers, over TCP.
//! The Modbus side is two independent implementations of the specification: `tokio-modbus` in the driver,
//! labctl's own codec in the simulator.

use std::time::Duration;

use labctl_drivers::{DeviceCommand, DriverError, Instrument, Outcome, Telemetry};
use labctl_hil_tests::rig::{Rig, RigConfig, ok, step, within};
use labctl_hil_tests::system::workspace;
use labctl_protocols::Lab;
use labctl_protocols::lab::SIM_LAB_TOML;
use labctl_simulators::model::FaultConfig;

use labctl_codecs::ascii_frame::{AsciiFraming, Check};

const WARP: f64 = 20.0;

/// The simulated lab plus three defined instruments; the TCP flow controller's definition is the RTU one
/// with its transport changed, written next to the test's scratch files.
fn lab() -> Lab {
    let rtu =
        std::fs::read_to_string(workspace().join("instruments/bronkhorst-el-flow-modbus.toml"))
            .expect("the shipped Bronkhorst definition");
    let tcp = rtu.replace("transport = \"rtu\"", "transport = \"tcp\"");
    assert_ne!(tcp, rtu);
    let dir = std::env::temp_dir().join(format!("labctl-defined-drivers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tcp_path = dir.join("bronkhorst-tcp.toml");
    std::fs::write(&tcp_path, tcp).unwrap();
    // The hotplate's definition with its lines framed: STX/ETX and an XOR checksum before CR LF, and
    // STX/ETX with a CRC-16 and no terminator at all (ETX ends a frame).
    let ika = std::fs::read_to_string(workspace().join("instruments/ika-rct-digital.toml"))
        .expect("the shipped IKA definition");
    let line = "terminator_in = \"\\r\\n\"\n";
    assert!(ika.contains(line), "the IKA definition's reply terminator");
    let xor = ika.replace(line, &format!("{line}stx_etx = true\nchecksum = \"xor\"\n"));
    let crc = ika
        .replace(
            line,
            "terminator_in = \"\"\nstx_etx = true\nchecksum = \"crc16_modbus\"\n",
        )
        .replace("terminator_out = \"\\r\\n\"", "terminator_out = \"\"");
    assert!(
        crc.contains("terminator_out = \"\"\n"),
        "the IKA definition's command terminator"
    );
    let (xor_path, crc_path) = (dir.join("ika-xor.toml"), dir.join("ika-crc.toml"));
    std::fs::write(&xor_path, xor).unwrap();
    std::fs::write(&crc_path, crc).unwrap();
    let extra = format!(
        r#"
[[instruments]]
id = "stirrer"
kind = "defined"
driver = "definition"
definition = "instruments/ika-rct-digital.toml"
transport = {{ type = "simulated" }}
envelope = {{ temperature_c = [15, 80], speed_rpm = [0, 1000] }}

[[instruments]]
id = "thermostat"
kind = "defined"
driver = "definition"
definition = "instruments/lauda-loop.toml"
transport = {{ type = "simulated" }}
envelope = {{ temperature_c = [5, 60] }}

[[instruments]]
id = "mfc"
kind = "defined"
driver = "definition"
definition = "instruments/bronkhorst-el-flow-modbus.toml"
transport = {{ type = "simulated" }}
envelope = {{ flow_ln_per_min = [0, 5] }}

[[instruments]]
id = "mfc-tcp"
kind = "defined"
driver = "definition"
definition = "{}"
transport = {{ type = "simulated" }}
envelope = {{ flow_ln_per_min = [0, 5] }}

[[instruments]]
id = "stirrer-xor"
kind = "defined"
driver = "definition"
definition = "{}"
transport = {{ type = "simulated" }}
envelope = {{ temperature_c = [15, 80], speed_rpm = [0, 1000] }}

[[instruments]]
id = "stirrer-crc"
kind = "defined"
driver = "definition"
definition = "{}"
transport = {{ type = "simulated" }}
envelope = {{ temperature_c = [15, 80], speed_rpm = [0, 1000] }}
"#,
        tcp_path.display(),
        xor_path.display(),
        crc_path.display()
    );
    Lab::from_toml_str_in(
        &format!("{SIM_LAB_TOML}\n{extra}"),
        "test lab",
        &workspace(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn rig() -> Rig {
    Rig::start(RigConfig {
        lab: Some(lab()),
        ..RigConfig::warp(WARP)
    })
    .await
}

fn value(t: &Telemetry, name: &str) -> f64 {
    t.values
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} in {t:?}"))
}

fn action(name: &str, params: &[(&str, f64)]) -> DeviceCommand {
    DeviceCommand::Defined {
        action: name.into(),
        params: params.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    }
}

fn reading(outcome: Outcome) -> f64 {
    match outcome {
        Outcome::Reading { value, .. } => value,
        other => panic!("expected a reading, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ascii_definition_drives_its_simulator_over_a_pty() {
    an_ascii_hotplate_heats_reads_and_goes_safe("stirrer", AsciiFraming::PLAIN, b"\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stx_etx_framing_with_an_xor_checksum_drives_its_simulator_over_a_pty() {
    let framing = AsciiFraming {
        stx_etx: true,
        check: Check::Xor,
    };
    an_ascii_hotplate_heats_reads_and_goes_safe("stirrer-xor", framing, b"\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stx_etx_frames_with_a_crc_and_no_terminator_drive_their_simulator_over_a_pty() {
    let framing = AsciiFraming {
        stx_etx: true,
        check: Check::Crc16Modbus,
    };
    an_ascii_hotplate_heats_reads_and_goes_safe("stirrer-crc", framing, b"").await;
}

/// The IKA hotplate's definition (as shipped, or with its lines framed): identity, telemetry, a setpoint
/// reached in simulated time, a read, and the safe state; the bytes on the wire are the manual's commands
/// in the definition's framing (checked against an independent framing of the same text).
async fn an_ascii_hotplate_heats_reads_and_goes_safe(
    id: &str,
    framing: AsciiFraming,
    terminator: &[u8],
) {
    let frame = |text: &str| {
        let mut bytes = framing.wrap(text.as_bytes());
        bytes.extend_from_slice(terminator);
        bytes
    };
    let mut rig = rig().await;
    let mut stirrer = rig.driver(id);
    let identity = ok("start", step("start", stirrer.start()).await);
    assert_eq!(
        (identity.model.as_str(), identity.firmware.as_str()),
        ("RCT digital", "1.10")
    );
    let t = ok("poll", step("poll", stirrer.poll()).await);
    assert!((value(&t, "temperature_c") - 22.0).abs() < 0.5, "{t:?}");
    // The probe reaches the setpoint in simulated time (tau 10 s at warp 20) and the action completes.
    let set = action("set_temperature", &[("temperature_c", 40.0)]);
    ok(
        "set",
        within(
            Duration::from_secs(20),
            "set_temperature",
            stirrer.execute(&set),
        )
        .await,
    );
    let now = reading(ok(
        "read",
        step(
            "read",
            stirrer.execute(&DeviceCommand::Read {
                quantity: "temperature_c".into(),
            }),
        )
        .await,
    ));
    assert!((now - 40.0).abs() <= 1.5, "{now}");
    ok("safe", step("safe", stirrer.safe_state()).await);
    // The last command may still be crossing the line (wire timing) when the driver returns.
    let safe = [frame("STOP_1"), frame("STOP_4")].concat();
    let set = [frame("OUT_SP_1 40.0"), frame("START_1")].concat();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let sent = loop {
        let sent = rig.sim.transcript(id);
        if sent.ends_with(&safe) || tokio::time::Instant::now() >= deadline {
            break sent;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let shown = String::from_utf8_lossy(&sent).into_owned();
    assert!(sent.windows(set.len()).any(|w| w == set), "{shown:?}");
    assert!(sent.ends_with(&safe), "{shown:?}");
    stirrer.stop().await;
    rig.shutdown().await;
}

/// One flow controller through its whole life: identity, telemetry, a setpoint that completes on the
/// measured flow, a read, and the safe state stopping the flow.
async fn a_flow_controller_follows_its_setpoint_and_stops_on_the_safe_state(id: &str) {
    let mut rig = rig().await;
    let mut mfc = rig.driver(id);
    let identity = ok("start", step("start", mfc.start()).await);
    assert_eq!(identity.manufacturer, "Bronkhorst");
    let t = ok("poll", step("poll", mfc.poll()).await);
    assert!(value(&t, "flow_ln_per_min").abs() < 0.05, "{t:?}");
    assert!((value(&t, "temperature_c") - 21.0).abs() < 0.1, "{t:?}");
    let set = action("set_flow", &[("flow_ln_per_min", 2.5)]);
    ok(
        "set",
        within(Duration::from_secs(20), "set_flow", mfc.execute(&set)).await,
    );
    let flow = reading(ok(
        "read",
        step(
            "read",
            mfc.execute(&DeviceCommand::Read {
                quantity: "flow_ln_per_min".into(),
            }),
        )
        .await,
    ));
    assert!((flow - 2.5).abs() <= 0.05, "{flow}");
    ok("safe", step("safe", mfc.safe_state()).await);
    // The valve closes: within a few time constants the flow is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = ok("poll", step("poll", mfc.poll()).await);
        if value(&t, "flow_ln_per_min").abs() < 0.05 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "flow did not stop: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the line carried, read back with labctl's codec: a write of 2.5 as an IEEE float, high word
    // first, to Fsetpoint (PDU 0xA118).
    let sent = rig.sim.transcript(id);
    let float = 2.5f32.to_bits().to_be_bytes();
    let write = [&[0x10, 0xA1, 0x18, 0x00, 0x02, 0x04][..], &float[..]].concat();
    assert!(
        sent.windows(write.len()).any(|w| w == write.as_slice()),
        "no Fsetpoint write in {sent:02X?}"
    );
    // An instrument in trouble answers with an exception, which the driver reports as a device error.
    rig.set_faults(
        id,
        FaultConfig {
            error_code: Some("failure".into()),
            ..FaultConfig::default()
        },
    );
    let err = step("poll", mfc.poll()).await.unwrap_err();
    assert!(matches!(err, DriverError::Device { .. }), "{err}");
    mfc.stop().await;
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_rtu_definition_drives_its_simulator_over_a_pty() {
    a_flow_controller_follows_its_setpoint_and_stops_on_the_safe_state("mfc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_tcp_definition_drives_its_simulator_over_tcp() {
    a_flow_controller_follows_its_setpoint_and_stops_on_the_safe_state("mfc-tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_tap_reads_modbus_writes_back_and_holds_them_to_the_envelope() {
    let mut rig = rig().await;
    let mut mfc = rig.driver("mfc");
    ok("start", step("start", mfc.start()).await);
    let set = action("set_flow", &[("flow_ln_per_min", 2.5)]);
    ok(
        "set",
        within(Duration::from_secs(20), "set_flow", mfc.execute(&set)).await,
    );
    // 8 ln/min is inside the definition's 10 but outside this lab's envelope of 5: the controller would
    // never send it (its envelope check runs before the driver); sent here below the controller, the tap
    // must catch it.
    let over = action("set_flow", &[("flow_ln_per_min", 8.0)]);
    ok(
        "over",
        within(Duration::from_secs(20), "set_flow", mfc.execute(&over)).await,
    );
    ok("safe", step("safe", mfc.safe_state()).await);
    let report = labctl_hil_tests::envelope::check_lab(
        &rig.lab,
        |id| rig.sim.endpoint(id).map(|e| e.port),
        |port| rig.sim.transcript(port),
    );
    // The safe state's write of 0 to Fsetpoint is the third.
    assert_eq!(
        report.sent("mfc", "flow_ln_per_min"),
        [2.5, 8.0, 0.0],
        "{report}"
    );
    assert!(report.undecodable.is_empty(), "{report}");
    assert_eq!(report.violations.len(), 1, "{report}");
    assert!(
        report.violations[0].contains("flow_ln_per_min = 8"),
        "{report}"
    );
    mfc.stop().await;
    rig.shutdown().await;
}

/// pyserial, the library most lab scripts use, as an independent client of the simulators built from the
/// definitions: the manuals' own byte strings on the ptys, at the manuals' line settings. Needs
/// `LABCTL_TEST_PYTHON` (a Python with pyserial; `scripts/test` provides it).
#[test]
fn pyserial_gets_the_manuals_replies_from_the_definitions_simulators() {
    let python = std::env::var("LABCTL_TEST_PYTHON")
        .expect("LABCTL_TEST_PYTHON: a Python with pyserial (scripts/test sets it)");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rig = runtime.block_on(rig());
    let port = |id: &str| match &rig.lab.instrument(id).unwrap().transport {
        labctl_protocols::lab::Transport::Serial(line) => line.port.clone(),
        other => panic!("{id} on {other:?}"),
    };
    let script = r#"
import sys, serial
# IKA RCT digital, NAMUR: 9600 baud, 7 data bits, even parity, 1 stop bit, CR LF.
ika = serial.Serial(sys.argv[1], 9600, bytesize=7, parity="E", stopbits=1, timeout=5)
ika.write(b"IN_NAME\r\n")
print(repr(ika.read_until(b"\r\n")))
ika.write(b"IN_PV_1\r\n")
print(repr(ika.read_until(b"\r\n")))
# LAUDA LOOP, 5.11: 9600 8N1; "OUT_SP_00_30.5" answered "OK", replies end CR LF.
lauda = serial.Serial(sys.argv[2], 9600, bytesize=8, parity="N", stopbits=1, timeout=5)
lauda.write(b"OUT_SP_00_30.5\r\n")
print(repr(lauda.read_until(b"\r\n")))
lauda.write(b"TYPE\r\n")
print(repr(lauda.read_until(b"\r\n")))
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(port("stirrer"))
        .arg(port("thermostat"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "b'RCT digital\\r\\n'", "{stdout}");
    assert_eq!(lines[1], "b'22.0 1\\r\\n'", "{stdout}");
    assert_eq!(lines[2], "b'OK\\r\\n'", "{stdout}");
    assert_eq!(lines[3], "b'BC_LOOP\\r\\n'", "{stdout}");
    runtime.block_on(rig.shutdown());
}
