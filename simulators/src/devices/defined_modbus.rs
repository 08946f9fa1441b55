//! A Modbus instrument simulated from its definition: the registers and coils the definition names, served
//! over Modbus TCP (a socket) or RTU (a pty), with the same state model as the ASCII simulator
//! ([`super::defined`]): a write to an action's register whose parameter is named like a reading sets
//! that reading's target, approached with a first-order lag.
//!
//! Reads of a reading's register return its simulated value (`(value - offset) / scale`, encoded as the
//! register's type and word order); reads of an action's register return what was last written; an address
//! the definition does not name gets exception 0x02 (illegal data address), a write to a read-only one too.
//! RTU requests for another unit are ignored; broadcast writes (unit 0) are carried out unanswered.
//! Identity registers (`[identity] registers`) hold the simulator's identity (`[simulation] identity`, else
//! the definition's model and first firmware), a string two characters per register.
//!
//! Several RTU units that a lab file puts on one serial line (multi-drop RS-485) are one device
//! ([`DefinedModbusDevice::bus`]) on one pty: each answers its own unit id from its own state model, with
//! its own faults, and nobody answers an unknown id (as on a real bus, the master times out).

use std::collections::BTreeMap;
use std::sync::Arc;

use labctl_codecs::modbus::{
    self, Exception, Frame, Request, Response, decode_request, decode_rtu_request, decode_tcp,
    encode_response,
};
use labctl_codecs::{Decoded, MAX_LINE};
use labctl_protocols::instrument_def::{
    InstrumentDefinition, ModbusSettings, ModbusTransport, Register, RegisterTable, sample_identity,
};
use rand::rngs::SmallRng;

use super::defined::Value;
use super::{Ctx, Device, LineSettings};
use crate::model::{InstrumentId, noise};

/// A register an action writes: the reading it sets (if any), and how to read the raw value back.
#[derive(Debug, Clone)]
struct Writable {
    register: Register,
    scale: f64,
    offset: f64,
    target: Option<usize>,
}

/// One simulated unit: its definition's registers and state model.
#[derive(Debug)]
struct Unit {
    definition: Arc<InstrumentDefinition>,
    unit_id: u8,
    values: Vec<Value>,
    writable: Vec<Writable>,
    /// Raw words (or 0/1 for coils) last written, by (table, address).
    written: BTreeMap<(u8, u16), u16>,
    /// The identity registers' words, by (table, address).
    identity: BTreeMap<(u8, u16), u16>,
    rng: SmallRng,
}

/// The simulated Modbus instrument, or the units of one RS-485 line.
#[derive(Debug)]
pub struct DefinedModbusDevice {
    transport: ModbusTransport,
    line: LineSettings,
    units: Vec<Unit>,
    instruments: Vec<InstrumentId>,
    rx: Vec<u8>,
}

fn table_key(table: RegisterTable) -> u8 {
    match table {
        RegisterTable::Holding => 0,
        RegisterTable::Input => 1,
        RegisterTable::Coil => 2,
    }
}

impl Unit {
    fn new(definition: Arc<InstrumentDefinition>, unit_id: u8, seed: u64) -> Unit {
        let values = Value::all(&definition);
        let mut writable: Vec<Writable> = definition
            .actions
            .iter()
            .filter_map(|a| {
                let register = a.register.clone()?;
                let target = a
                    .params
                    .first()
                    .and_then(|p| values.iter().position(|v| v.name == p.name));
                Some(Writable {
                    register,
                    scale: a.scale,
                    offset: a.offset,
                    target,
                })
            })
            .collect();
        // An action without a parameter (`stop_flow` writing 0) moves what the register's other action sets.
        for k in 0..writable.len() {
            if writable[k].target.is_none() {
                let (table, address) = (writable[k].register.table, writable[k].register.address);
                writable[k].target = writable.iter().find_map(|w| {
                    (w.register.table == table && w.register.address == address)
                        .then_some(w.target)
                        .flatten()
                });
            }
        }
        let sample = sample_identity(&definition);
        let mut identity = BTreeMap::new();
        for (field, register) in &definition.identity.registers {
            let text = sample.get(field).map_or("", String::as_str);
            let words = register.encode_text(text).or_else(|| {
                // An integer identity register: the sample's number, 0 when it is not one.
                register.encode(text.trim().parse().unwrap_or(0.0))
            });
            for (k, word) in words.unwrap_or_default().into_iter().enumerate() {
                identity.insert(
                    (
                        table_key(register.table),
                        register.address.wrapping_add(k as u16),
                    ),
                    word,
                );
            }
        }
        Unit {
            unit_id,
            values,
            writable,
            written: BTreeMap::new(),
            identity,
            rng: noise::stream(seed, 65),
            definition,
        }
    }
}

impl DefinedModbusDevice {
    /// The simulator of a Modbus `definition` at its definition's unit id; `None` for a line instrument.
    pub fn new(
        definition: Arc<InstrumentDefinition>,
        id: InstrumentId,
        seed: u64,
    ) -> Option<DefinedModbusDevice> {
        let settings: ModbusSettings = definition.modbus.clone()?;
        Some(DefinedModbusDevice {
            transport: settings.transport,
            line: LineSettings {
                baud: settings.baud,
                data_bits: 8,
                parity: settings.parity,
                stop_bits: settings.stop_bits,
            },
            units: vec![Unit::new(definition, settings.unit_id, seed)],
            instruments: vec![id],
            rx: Vec::new(),
        })
    }

    /// The same answering at `unit_id` (the lab's `address` for the instrument).
    pub fn at_unit(mut self, unit_id: u8) -> DefinedModbusDevice {
        for unit in &mut self.units {
            unit.unit_id = unit_id;
        }
        self
    }

    /// The Modbus RTU units of one serial line at `line`'s settings: each `(definition, instrument, unit id,
    /// seed)`. Refused when one is not a Modbus RTU definition or two share a unit id.
    pub fn bus(
        units: Vec<(Arc<InstrumentDefinition>, InstrumentId, u8, u64)>,
        line: LineSettings,
    ) -> Result<DefinedModbusDevice, String> {
        let mut device = DefinedModbusDevice {
            transport: ModbusTransport::Rtu,
            line,
            units: Vec::new(),
            instruments: Vec::new(),
            rx: Vec::new(),
        };
        for (definition, id, unit_id, seed) in units {
            if definition.modbus.as_ref().map(|m| m.transport) != Some(ModbusTransport::Rtu) {
                return Err(format!("{id:?}: not a Modbus RTU definition"));
            }
            if device.units.iter().any(|u| u.unit_id == unit_id) {
                return Err(format!(
                    "two units with Modbus unit id {unit_id} on one line"
                ));
            }
            device.units.push(Unit::new(definition, unit_id, seed));
            device.instruments.push(id);
        }
        Ok(device)
    }
}

impl Unit {
    /// The words at `address..address + count` of `table`, or the exception a device answers.
    fn read_words(
        &mut self,
        ctx: &Ctx<'_>,
        table: RegisterTable,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, Exception> {
        let tau_s = self.definition.simulation.tau_s;
        let sd = self.definition.simulation.noise / 4.0;
        let mut out = Vec::with_capacity(usize::from(count));
        let mut at = address;
        let end = u32::from(address) + u32::from(count);
        while u32::from(at) < end {
            let reading = self
                .definition
                .readings
                .iter()
                .zip(&self.values)
                .find(|(r, _)| {
                    r.register
                        .as_ref()
                        .is_some_and(|reg| reg.table == table && reg.address == at)
                });
            let words = if let Some((r, v)) = reading {
                let register = r.register.as_ref().ok_or(Exception::ServerDeviceFailure)?;
                let value = v.at(ctx.now, tau_s) + noise::gaussian(&mut self.rng, sd);
                register
                    .encode((value - v.offset) / v.scale)
                    .ok_or(Exception::ServerDeviceFailure)?
            } else if let Some(word) = self.identity.get(&(table_key(table), at)) {
                vec![*word]
            } else if let Some(w) = self
                .writable
                .iter()
                .find(|w| w.register.table == table && w.register.address == at)
            {
                (0..w.register.words())
                    .map(|k| {
                        self.written
                            .get(&(table_key(table), at + k))
                            .copied()
                            .unwrap_or(0)
                    })
                    .collect()
            } else {
                return Err(Exception::IllegalDataAddress);
            };
            at = at.saturating_add(words.len() as u16);
            out.extend(words);
        }
        out.truncate(usize::from(count));
        Ok(out)
    }

    /// Carries out a write to `table` at `address`, setting the reading it targets.
    fn write(
        &mut self,
        ctx: &Ctx<'_>,
        table: RegisterTable,
        address: u16,
        words: &[u16],
    ) -> Result<(), Exception> {
        let Some(w) = self
            .writable
            .iter()
            .find(|w| w.register.table == table && w.register.address == address)
            .cloned()
        else {
            return Err(Exception::IllegalDataAddress);
        };
        if words.len() != usize::from(w.register.words()) {
            return Err(Exception::IllegalDataValue);
        }
        for (k, word) in words.iter().enumerate() {
            self.written
                .insert((table_key(table), address + k as u16), *word);
        }
        let raw = w
            .register
            .decode(words)
            .ok_or(Exception::IllegalDataValue)?;
        if let Some(index) = w.target
            && let Some(v) = self.values.get_mut(index)
        {
            v.set_target(
                ctx.now,
                self.definition.simulation.tau_s,
                raw * w.scale + w.offset,
            );
        }
        Ok(())
    }

    fn serve(&mut self, ctx: &Ctx<'_>, request: &Request) -> Response {
        let result = match request {
            Request::ReadCoils { address, count } => (0..*count)
                .map(|k| {
                    self.read_words(ctx, RegisterTable::Coil, address.saturating_add(k), 1)
                        .map(|w| w.first().copied().unwrap_or(0) != 0)
                })
                .collect::<Result<Vec<bool>, _>>()
                .map(Response::Coils),
            Request::ReadHoldingRegisters { address, count } => self
                .read_words(ctx, RegisterTable::Holding, *address, *count)
                .map(Response::Registers),
            Request::ReadInputRegisters { address, count } => self
                .read_words(ctx, RegisterTable::Input, *address, *count)
                .map(Response::Registers),
            Request::WriteSingleCoil { address, on } => self
                .write(ctx, RegisterTable::Coil, *address, &[u16::from(*on)])
                .map(|()| Response::Echo {
                    address: *address,
                    value: if *on { 0xFF00 } else { 0 },
                }),
            Request::WriteSingleRegister { address, value } => self
                .write(ctx, RegisterTable::Holding, *address, &[*value])
                .map(|()| Response::Echo {
                    address: *address,
                    value: *value,
                }),
            Request::WriteMultipleRegisters { address, values } => self
                .write(ctx, RegisterTable::Holding, *address, values)
                .map(|()| Response::Echo {
                    address: *address,
                    value: values.len() as u16,
                }),
        };
        result.unwrap_or_else(Response::Exception)
    }
}

impl DefinedModbusDevice {
    /// Unit `index` answers `frame` (its faults apply to its own replies).
    fn answer(&mut self, ctx: &mut Ctx<'_>, index: usize, frame: &Frame) {
        let (Some(unit), Some(id)) = (self.units.get_mut(index), self.instruments.get(index))
        else {
            return;
        };
        let function = frame.pdu.first().copied().unwrap_or(0);
        let response = match ctx.faults(*id).error_code {
            Some(_) => Response::Exception(Exception::ServerDeviceFailure),
            None => match decode_request(&frame.pdu) {
                Ok(request) => unit.serve(ctx, &request),
                Err(e) => Response::Exception(e),
            },
        };
        let mut pdu = Vec::new();
        encode_response(function, &response, &mut pdu);
        let mut out = Vec::new();
        match self.transport {
            ModbusTransport::Tcp => modbus::encode_tcp(frame, &pdu, &mut out),
            ModbusTransport::Rtu => modbus::encode_rtu(frame.unit, &pdu, &mut out),
        }
        ctx.emit(index, out);
    }
}

impl Device for DefinedModbusDevice {
    fn protocol(&self) -> &'static str {
        "definition_modbus"
    }

    fn instruments(&self) -> &[InstrumentId] {
        &self.instruments
    }

    /// RTU on a serial line (8 data bits, the definition's speed and parity, or the lab line's for a
    /// bus); TCP on a socket.
    fn line(&self) -> Option<LineSettings> {
        (self.transport == ModbusTransport::Rtu).then_some(self.line)
    }

    fn power_on(&mut self, _ctx: &mut Ctx<'_>) {
        self.rx.clear();
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, bytes: &[u8]) {
        self.rx.extend_from_slice(bytes);
        loop {
            let decoded = match self.transport {
                ModbusTransport::Tcp => decode_tcp(&self.rx),
                ModbusTransport::Rtu => decode_rtu_request(&self.rx),
            };
            match decoded {
                Ok(Decoded::Frame { value, consumed }) => {
                    self.rx.drain(..consumed.clamp(1, self.rx.len()));
                    let addressed = self.units.iter().position(|u| u.unit_id == value.unit);
                    match (self.transport, addressed) {
                        (_, Some(index)) => self.answer(ctx, index, &value),
                        // A TCP device answers 0xFF too ("no unit": a direct connection).
                        (ModbusTransport::Tcp, None) if value.unit == 0xFF => {
                            self.answer(ctx, 0, &value)
                        }
                        // Broadcast: carried out by every unit, never answered.
                        (ModbusTransport::Rtu, None) if value.unit == 0 => {
                            if let Ok(request) = decode_request(&value.pdu) {
                                for unit in &mut self.units {
                                    unit.serve(ctx, &request);
                                }
                            }
                        }
                        // Another unit's request: silence.
                        _ => {}
                    }
                }
                Ok(Decoded::Incomplete) => {
                    if self.rx.len() > MAX_LINE {
                        self.rx.clear();
                    }
                    break;
                }
                Err(e) => {
                    self.rx.drain(..e.skip.clamp(1, self.rx.len()));
                }
            }
        }
    }

    fn host_reset(&mut self) {
        self.rx.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{LabConfig, LabModel};
    use labctl_protocols::instrument_def::check_definition;

    const BRONKHORST: &str = include_str!("../../../instruments/bronkhorst-el-flow-modbus.toml");

    /// Sends `unit` a read of `count` holding registers at `address`; the words of the reply and which
    /// unit's source emitted it, or `None` when the line stays silent.
    fn read(
        device: &mut DefinedModbusDevice,
        model: &mut LabModel,
        unit: u8,
        address: u16,
        count: u16,
    ) -> Option<(usize, Vec<u16>)> {
        let mut pdu = vec![0x03];
        pdu.extend(address.to_be_bytes());
        pdu.extend(count.to_be_bytes());
        let mut frame = Vec::new();
        modbus::encode_rtu(unit, &pdu, &mut frame);
        let mut out = Vec::new();
        let mut ctx = Ctx::new(model, Duration::from_secs(1), None, &mut out);
        device.receive(&mut ctx, &frame);
        let emit = out.first()?;
        // unit, function 0x03, byte count, the words, CRC.
        let bytes = &emit.bytes;
        assert_eq!(bytes[..2], [unit, 0x03], "{bytes:?}");
        let n = usize::from(bytes[2]);
        assert_eq!(bytes.len(), 3 + n + 2, "{bytes:?}");
        let words = bytes[3..3 + n]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Some((emit.source, words))
    }

    #[test]
    fn units_on_one_bus_answer_their_own_ids_from_their_own_state_and_unknown_ids_get_silence() {
        let (def, findings) = check_definition(&BRONKHORST.replace(
            "initial = { flow_ln_per_min = 0.0,",
            "initial = { flow_ln_per_min = 1.5,",
        ));
        let one = Arc::new(def.unwrap_or_else(|| panic!("{findings:?}")));
        let (def, _) = check_definition(BRONKHORST);
        let two = Arc::new(def.unwrap());
        let mut model = LabModel::new(LabConfig::sim_default(), 1).unwrap();
        let (a, b) = (model.add_defined("mfc-a"), model.add_defined("mfc-b"));
        let line = LineSettings {
            baud: 19200,
            data_bits: 8,
            parity: labctl_protocols::lab::Parity::Even,
            stop_bits: 1,
        };
        let mut bus =
            DefinedModbusDevice::bus(vec![(one, a, 1, 1), (Arc::clone(&two), b, 7, 2)], line)
                .unwrap();
        assert_eq!(bus.line(), Some(line));
        assert_eq!(bus.instruments(), [a, b]);
        let flow =
            |words: &[u16]| f32::from_bits((u32::from(words[0]) << 16) | u32::from(words[1]));
        let (source, words) = read(&mut bus, &mut model, 1, 41216, 2).unwrap();
        // The definition's noise is 0.002 ln/min peak to peak.
        assert_eq!(source, 0);
        assert!((flow(&words) - 1.5).abs() < 0.01, "{words:?}");
        let (source, words) = read(&mut bus, &mut model, 7, 41216, 2).unwrap();
        assert_eq!(source, 1);
        assert!(flow(&words).abs() < 0.01, "{words:?}");
        assert_eq!(
            read(&mut bus, &mut model, 2, 41216, 2),
            None,
            "no unit 2 on the line"
        );
        // The serial number from the simulation's identity, two characters per register.
        let serial = &two.identity.registers["serial"];
        let (_, words) = read(&mut bus, &mut model, 7, serial.address, serial.words()).unwrap();
        assert_eq!(serial.decode_text(&words).as_deref(), Some("SIM0001"));
        // Two units at one id cannot share a line.
        let err = DefinedModbusDevice::bus(vec![(Arc::clone(&two), a, 3, 1), (two, b, 3, 2)], line)
            .unwrap_err();
        assert!(err.contains("unit id 3"), "{err}");
    }
}
