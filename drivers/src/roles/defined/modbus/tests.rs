//! Several Modbus RTU units on one in-memory RS-485 line, against a scripted bus written with labctl's
//! own Modbus codec (the driver speaks through tokio-modbus): one connection for all, each unit read and
//! written at its own id, a silent unit timing out alone, and a broken line reset once for everyone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use labctl_codecs::Decoded;
use labctl_codecs::modbus::{
    Exception, Request as Pdu, Response, decode_request, decode_rtu_request, encode_response,
    encode_rtu,
};
use labctl_protocols::instrument_def::{InstrumentDefinition, check_definition};
use labctl_transport::{self as transport, MemoryDevice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::instrument::{DeviceCommand, Instrument};
use crate::roles::{DefinedInstrument, ModbusInstrument};

const BRONKHORST: &str = include_str!("../../../../../instruments/bronkhorst-el-flow-modbus.toml");
const FLOW: u16 = 41216;
const SETPOINT: u16 = 41240;

fn definition(text: &str) -> Arc<InstrumentDefinition> {
    let (def, findings) = check_definition(text);
    Arc::new(def.unwrap_or_else(|| panic!("{findings:?}")))
}

/// The bus: each unit's holding registers; units in `silent` hear but never answer; `writes` records
/// every write as (unit, address, words).
#[derive(Default)]
struct Bus {
    units: BTreeMap<u8, BTreeMap<u16, u16>>,
    silent: BTreeSet<u8>,
    writes: Vec<(u8, u16, Vec<u16>)>,
    /// Drop the connection at the next request (a USB adapter pulled).
    break_next: bool,
    connections: usize,
}

impl Bus {
    /// A Bronkhorst at `unit` with `flow` ln/min and its serial number and model in their string registers.
    fn add(&mut self, unit: u8, flow: f32, serial: &str) {
        let def = definition(BRONKHORST);
        let mut registers = BTreeMap::new();
        for (field, text) in [("serial", serial), ("model", "F-201CV")] {
            let r = &def.identity.registers[field];
            for (k, w) in r.encode_text(text).unwrap().into_iter().enumerate() {
                registers.insert(r.address + k as u16, w);
            }
        }
        let bits = flow.to_bits();
        registers.insert(FLOW, (bits >> 16) as u16);
        registers.insert(FLOW + 1, bits as u16);
        registers.insert(FLOW + 56, 0x41a8); // temperature_c, 21.0 as f32 (0x41A80000)
        registers.insert(FLOW + 57, 0);
        registers.insert(SETPOINT, 0);
        registers.insert(SETPOINT + 1, 0);
        self.units.insert(unit, registers);
    }

    /// The answer of the unit a frame is for, `None` when nobody on the line answers.
    fn answer(&mut self, unit: u8, pdu: &[u8]) -> Option<Vec<u8>> {
        if self.silent.contains(&unit) {
            return None;
        }
        let registers = self.units.get_mut(&unit)?;
        let function = pdu.first().copied().unwrap_or(0);
        let response = match decode_request(pdu) {
            Ok(Pdu::ReadHoldingRegisters { address, count }) => (address..address + count)
                .map(|a| {
                    registers
                        .get(&a)
                        .copied()
                        .ok_or(Exception::IllegalDataAddress)
                })
                .collect::<Result<Vec<u16>, _>>()
                .map_or_else(Response::Exception, Response::Registers),
            Ok(Pdu::WriteMultipleRegisters { address, values }) => {
                for (k, v) in values.iter().enumerate() {
                    registers.insert(address + k as u16, *v);
                }
                self.writes.push((unit, address, values.clone()));
                Response::Echo {
                    address,
                    value: values.len() as u16,
                }
            }
            Ok(_) => Response::Exception(Exception::IllegalFunction),
            Err(e) => Response::Exception(e),
        };
        let mut out = Vec::new();
        encode_response(function, &response, &mut out);
        let mut frame = Vec::new();
        encode_rtu(unit, &out, &mut frame);
        Some(frame)
    }
}

/// Serves every connection the host opens, one after another, until the host side is gone.
fn serve(mut device: MemoryDevice, bus: Arc<Mutex<Bus>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(mut stream) = device.accept().await {
            bus.lock().unwrap().connections += 1;
            let mut rx = Vec::new();
            let mut buf = [0u8; 256];
            'conn: loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                rx.extend_from_slice(&buf[..n]);
                while let Ok(Decoded::Frame { value, consumed }) = decode_rtu_request(&rx) {
                    rx.drain(..consumed);
                    let reply = {
                        let mut bus = bus.lock().unwrap();
                        if std::mem::take(&mut bus.break_next) {
                            break 'conn;
                        }
                        bus.answer(value.unit, &value.pdu)
                    };
                    if let Some(reply) = reply
                        && stream.write_all(&reply).await.is_err()
                    {
                        break 'conn;
                    }
                }
            }
        }
    })
}

/// Two controllers at units 1 and 2 on one in-memory line, with the bus serving them.
fn two_on_one_line(
    text: &str,
) -> (
    ModbusInstrument,
    ModbusInstrument,
    Arc<Mutex<Bus>>,
    Arc<ModbusLine>,
) {
    let (endpoint, device) = transport::memory("rs485", None);
    let bus = Arc::new(Mutex::new(Bus::default()));
    bus.lock().unwrap().add(1, 1.5, "M11111111A");
    bus.lock().unwrap().add(2, 3.25, "M22222222B");
    serve(device, Arc::clone(&bus));
    let mut lines = ModbusLines::default();
    let def = definition(text);
    let mut make = |id: &str, unit: u8| {
        let line = lines.line(id, &endpoint, ModbusTransport::Rtu).unwrap();
        let wire = ModbusWire::on_line(id, line, Arc::clone(&def), Some(unit)).unwrap();
        DefinedInstrument::new(id, Arc::clone(&def), Vec::new(), wire)
    };
    let (a, b) = (make("mfc-a", 1), make("mfc-b", 2));
    let line = lines.lines().next().unwrap().clone();
    assert_eq!(lines.lines().count(), 1, "both units on one line");
    (a, b, bus, line)
}

fn flow(t: &crate::instrument::Telemetry) -> f64 {
    t.values
        .iter()
        .find(|(n, _)| *n == "flow_ln_per_min")
        .map(|(_, v)| *v)
        .unwrap()
}

/// `stop_flow`: writes 0 to the setpoint.
fn stop_flow() -> DeviceCommand {
    DeviceCommand::Defined {
        action: "stop_flow".into(),
        params: BTreeMap::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn two_units_share_one_connection_each_at_its_own_unit_id() {
    let (mut a, mut b, bus, line) = two_on_one_line(BRONKHORST);
    let (ia, ib) = (a.start().await.unwrap(), b.start().await.unwrap());
    // Each unit's own serial number, read from its string registers.
    assert_eq!(
        (ia.serial.as_str(), ia.model.as_str()),
        ("M11111111A", "F-201CV")
    );
    assert_eq!(ib.serial, "M22222222B");
    assert_eq!(flow(&a.poll().await.unwrap()), 1.5);
    assert_eq!(flow(&b.poll().await.unwrap()), 3.25);
    // A write goes to its own unit only (`stop_flow` writes 0 to the setpoint).
    b.execute(&stop_flow()).await.unwrap();
    assert_eq!(bus.lock().unwrap().writes, [(2, SETPOINT, vec![0, 0])]);
    a.safe_state().await.unwrap();
    assert_eq!(
        bus.lock().unwrap().writes.last(),
        Some(&(1, SETPOINT, vec![0, 0]))
    );
    assert_eq!(
        bus.lock().unwrap().connections,
        1,
        "one connection for the line"
    );
    // Stopping one keeps the line open for the other; the last one closes it.
    a.stop().await;
    assert!(line.is_open());
    assert_eq!(flow(&b.poll().await.unwrap()), 3.25);
    b.stop().await;
    assert!(!line.is_open());
}

#[tokio::test(start_paused = true)]
async fn a_silent_unit_times_out_alone_while_the_other_keeps_working() {
    let (mut a, mut b, bus, _line) = two_on_one_line(BRONKHORST);
    a.start().await.unwrap();
    b.start().await.unwrap();
    bus.lock().unwrap().silent.insert(2);
    let err = b.poll().await.unwrap_err();
    assert!(
        matches!(&err, DriverError::Port(PortError::Timeout { port, timeout })
            if port.contains("unit 2") && timeout.as_millis() == 500),
        "{err:?}"
    );
    // Unit 1 answers on the same connection, before and after unit 2 comes back.
    assert_eq!(flow(&a.poll().await.unwrap()), 1.5);
    bus.lock().unwrap().silent.clear();
    assert_eq!(flow(&b.poll().await.unwrap()), 3.25);
    assert_eq!(flow(&a.poll().await.unwrap()), 1.5);
    assert_eq!(bus.lock().unwrap().connections, 1);
}

#[tokio::test(start_paused = true)]
async fn a_broken_line_reopens_once_and_every_unit_on_it_sees_its_own_error() {
    let (mut a, mut b, bus, line) = two_on_one_line(BRONKHORST);
    a.start().await.unwrap();
    b.start().await.unwrap();
    bus.lock().unwrap().break_next = true;
    // Unit 1's request meets the broken line; unit 2, which sent nothing then, is told on its next one.
    assert!(matches!(
        a.poll().await,
        Err(DriverError::Port(PortError::Io { .. }))
    ));
    let err = b.poll().await.unwrap_err().to_string();
    assert!(err.contains("the line was reset"), "{err}");
    // Both are made safe (each step reconnects its wire), on one new connection.
    a.safe_state().await.unwrap();
    b.safe_state().await.unwrap();
    assert_eq!(bus.lock().unwrap().connections, 2, "reopened once for both");
    assert!(line.is_open());
    assert_eq!(flow(&a.poll().await.unwrap()), 1.5);
    assert_eq!(flow(&b.poll().await.unwrap()), 3.25);
}

#[tokio::test(start_paused = true)]
async fn firmware_read_from_a_string_register_passes_the_allow_list() {
    // The definition with its firmware read from 0xF128 and one known version.
    let text = BRONKHORST
        .replace(
            r#"firmware = ["not read over Modbus"]"#,
            r#"firmware = ["V1.41"]"#,
        )
        .replace(r#", firmware = "not read over Modbus" }"#, " }")
        .replace(
            "registers.serial =",
            "registers.firmware = { table = \"holding\", address = 61736, data_type = \"string\", count = 3 }\nregisters.serial =",
        );
    let firmware = definition(&text).identity.registers["firmware"].clone();
    let (mut a, mut b, bus, _line) = two_on_one_line(&text);
    for (unit, version) in [(1u8, "V1.41"), (2, "V9.99")] {
        let mut bus = bus.lock().unwrap();
        let registers = bus.units.get_mut(&unit).unwrap();
        for (k, w) in firmware
            .encode_text(version)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            registers.insert(firmware.address + k as u16, w);
        }
    }
    assert_eq!(a.start().await.unwrap().firmware, "V1.41");
    let err = b.start().await.unwrap_err().to_string();
    assert!(err.contains("firmware") && err.contains("V9.99"), "{err}");
}

#[test]
fn units_on_one_port_with_different_line_settings_are_refused() {
    use labctl_protocols::lab::{FlowControl, Parity, SerialLine};
    let line = |baud: u32, parity: Parity| {
        Endpoint::Serial(SerialLine {
            port: "/dev/ttyUSB0".into(),
            baud,
            data_bits: 8,
            parity,
            stop_bits: 1,
            flow_control: FlowControl::None,
        })
    };
    let mut lines = ModbusLines::default();
    lines
        .line("mfc-a", &line(19200, Parity::Even), ModbusTransport::Rtu)
        .unwrap();
    lines
        .line("mfc-b", &line(19200, Parity::Even), ModbusTransport::Rtu)
        .unwrap();
    let err = lines
        .line("mfc-c", &line(9600, Parity::None), ModbusTransport::Rtu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mfc-c") && err.contains("9600 8N1") && err.contains("19200 8E1"),
        "{err}"
    );
    assert_eq!(lines.lines().count(), 1);
}
