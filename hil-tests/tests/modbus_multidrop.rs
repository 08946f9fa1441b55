//! Several Modbus RTU instruments on one RS-485 line, end to end: the lab file puts three Bronkhorst
//! controllers on one serial port at addresses 1, 2 and 7; the simulated lab serves them as one multi-unit
//! simulator on one pty, and the drivers built from the lab file share one connection to it, each unit
//! with its own state, its own readings and its own faults.

use std::time::Duration;

use labctl_drivers::{DeviceCommand, DriverError, Instrument, Outcome, PortError, Telemetry};
use labctl_hil_tests::rig::{Rig, RigConfig, ok, step, within};
use labctl_hil_tests::system::workspace;
use labctl_protocols::Lab;
use labctl_protocols::lab::SIM_LAB_TOML;
use labctl_simulators::model::FaultConfig;

const WARP: f64 = 20.0;

/// The three controllers on `/dev/ttyRS485` at 19200 baud with `line` (`parity = "even"`).
fn lab_with(line: &str) -> Lab {
    let mut text = SIM_LAB_TOML.to_owned();
    for (id, address) in [("mfc-a", 1), ("mfc-b", 2), ("mfc-c", 7)] {
        text.push_str(&format!(
            r#"
[[instruments]]
id = "{id}"
kind = "defined"
driver = "definition"
definition = "instruments/bronkhorst-el-flow-modbus.toml"
transport = {{ type = "serial", port = "/dev/ttyRS485", baud = 19200, {line} }}
address = {address}
envelope = {{ flow_ln_per_min = [0, 5] }}
"#
        ));
    }
    Lab::from_toml_str_in(&text, "test lab", &workspace()).unwrap_or_else(|e| panic!("{e}"))
}

fn lab() -> Lab {
    lab_with(r#"parity = "even""#)
}

async fn rig_with(lab: Lab) -> Rig {
    Rig::start(RigConfig {
        lab: Some(lab),
        ..RigConfig::warp(WARP)
    })
    .await
}

async fn rig() -> Rig {
    rig_with(lab()).await
}

fn flow(t: &Telemetry) -> f64 {
    t.values
        .iter()
        .find(|(n, _)| *n == "flow_ln_per_min")
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no flow in {t:?}"))
}

fn set_flow(value: f64) -> DeviceCommand {
    DeviceCommand::Defined {
        action: "set_flow".into(),
        params: [("flow_ln_per_min".to_owned(), value)].into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_on_one_line_each_follow_their_own_setpoint() {
    let mut rig = rig().await;
    // One simulated line for the three, named after the lab's port, each unit at its address.
    let endpoints: Vec<_> = ["mfc-a", "mfc-b", "mfc-c"]
        .iter()
        .map(|id| rig.sim.endpoint(id).unwrap())
        .collect();
    for e in &endpoints {
        assert_eq!(e.port, "modbus-ttyRS485", "{e:?}");
        assert_eq!(e.location(), endpoints[0].location());
    }
    let addresses: Vec<Option<u8>> = endpoints.iter().map(|e| e.network_address).collect();
    assert_eq!(addresses, [Some(1), Some(2), Some(7)]);

    let mut drivers: Vec<_> = ["mfc-a", "mfc-b", "mfc-c"]
        .iter()
        .map(|id| rig.driver(id))
        .collect();
    assert_eq!(
        rig.ports.modbus.lines().count(),
        1,
        "one connection for the line"
    );
    for d in &mut drivers {
        let identity = ok("start", step("start", d.start()).await);
        // Model and serial from the simulator's string registers.
        assert_eq!(
            (identity.model.as_str(), identity.serial.as_str()),
            ("F-201CV-SIM", "SIM0001")
        );
    }
    for (d, target) in drivers.iter_mut().zip([1.0, 2.5, 4.0]) {
        let outcome = within(
            Duration::from_secs(20),
            "set_flow",
            d.execute(&set_flow(target)),
        )
        .await;
        assert_eq!(ok("set_flow", outcome), Outcome::Done);
    }
    for (d, target) in drivers.iter_mut().zip([1.0, 2.5, 4.0]) {
        let value = flow(&ok("poll", step("poll", d.poll()).await));
        assert!((value - target).abs() < 0.05, "{value} for {target}");
    }
    // The wire tap of the shared line, read back per unit id: each setpoint went to its own unit.
    let report = labctl_hil_tests::envelope::check_lab(
        &rig.lab,
        |id| rig.sim.endpoint(id).map(|e| e.port),
        |port| rig.sim.transcript(port),
    );
    assert!(
        report.violations.is_empty() && report.undecodable.is_empty(),
        "{report}"
    );
    for (id, target) in [("mfc-a", 1.0), ("mfc-b", 2.5), ("mfc-c", 4.0)] {
        assert_eq!(
            report.sent(id, "flow_ln_per_min"),
            [target],
            "{id}: {report}"
        );
    }
    for d in &mut drivers {
        d.stop().await;
    }
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_unit_times_out_alone_while_the_others_keep_answering() {
    let mut rig = rig().await;
    let (mut a, mut b) = (rig.driver("mfc-a"), rig.driver("mfc-b"));
    ok("start a", step("start", a.start()).await);
    ok("start b", step("start", b.start()).await);
    rig.set_faults(
        "mfc-b",
        FaultConfig {
            no_reply: true,
            ..FaultConfig::default()
        },
    );
    let err = step("poll b", b.poll()).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::Port(PortError::Timeout { port, .. }) if port.contains("unit 2")),
        "{err:?}"
    );
    ok("poll a", step("poll a", a.poll()).await);
    rig.set_faults("mfc-b", FaultConfig::default());
    ok("poll b again", step("poll b", b.poll()).await);
    ok("poll a again", step("poll a", a.poll()).await);
    a.stop().await;
    b.stop().await;
    rig.shutdown().await;
}

/// pymodbus, an independent Modbus master, on the simulated line's pty: each unit id answers with its own
/// registers (its serial number as a string, its own setpoint after a write), and an id nobody has is met
/// with silence, as on a real RS-485 bus. Needs `LABCTL_TEST_PYTHON` with pymodbus (`scripts/deps`).
#[test]
fn pymodbus_reads_and_writes_each_unit_on_the_simulated_line() {
    let python = std::env::var("LABCTL_TEST_PYTHON")
        .expect("LABCTL_TEST_PYTHON: a Python with pymodbus (scripts/test sets it)");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // No parity and 2 stop bits (the Modbus specification's other framing): pyserial refuses 8 data bits
    // with even parity on a pseudo-terminal (EINVAL), which a real serial port accepts.
    let rig = runtime.block_on(rig_with(lab_with(r#"parity = "none", stop_bits = 2"#)));
    let port = match &rig.lab.instrument("mfc-a").unwrap().transport {
        labctl_protocols::lab::Transport::Serial(line) => line.port.clone(),
        other => panic!("mfc-a on {other:?}"),
    };
    let script = r#"
import sys, struct
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusException
client = ModbusSerialClient(port=sys.argv[1], baudrate=19200, bytesize=8, parity="N", stopbits=2,
                            timeout=0.5, retries=0)
assert client.connect()
def text(words):
    return b"".join(struct.pack(">H", w) for w in words).rstrip(b"\0").decode()
# Serial number, PDU 0xF118, 8 registers (9.17.061).
for unit in (1, 2, 7):
    print(unit, text(client.read_holding_registers(61720, count=8, device_id=unit).registers))
# Fsetpoint of unit 2 only, as an IEEE float in two registers, high word first.
hi, lo = struct.unpack(">HH", struct.pack(">f", 3.0))
assert not client.write_registers(41240, [hi, lo], device_id=2).isError()
for unit in (1, 2):
    r = client.read_holding_registers(41240, count=2, device_id=unit).registers
    print(unit, struct.unpack(">f", struct.pack(">HH", *r))[0])
try:
    r = client.read_holding_registers(41216, count=2, device_id=3)
    print(3, "answered" if not r.isError() else "error")
except ModbusException:
    print(3, "silent")
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&port)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "1 SIM0001",
            "2 SIM0001",
            "7 SIM0001",
            "1 0.0",
            "2 3.0",
            "3 silent"
        ],
        "{stdout}"
    );
    runtime.block_on(rig.shutdown());
}
