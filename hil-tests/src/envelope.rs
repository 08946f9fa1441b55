//! What the instruments were actually sent, decoded from the simulators' wire taps with the drivers' own
//! sans-IO codecs, and checked against the lab file's safety envelope: the last line of defence, below
//! every check labctl makes itself.

use std::collections::BTreeMap;
use std::fmt;

use labctl_codecs::{DecodeError, Decoded, grbl, mtsics, namur, ne1000, scpi};
use labctl_protocols::Lab;
use labctl_protocols::instrument_def::{ActionSpec, InstrumentDefinition};
use labctl_protocols::lab::{Driver, Instrument, Range};

/// Everything decoded from the taps.
#[derive(Debug, Default, Clone)]
pub struct WireReport {
    /// Commands decoded, by instrument id (the pumps by their address on the shared line).
    pub commands: BTreeMap<String, usize>,
    /// Commands outside the envelope, each naming the instrument, the command and the limit.
    pub violations: Vec<String>,
    /// Frames the codecs could not decode: a host that sends those is broken too.
    pub undecodable: Vec<String>,
    /// Setpoints as sent, in order, per instrument and quantity (`hotplate` / `temperature_c`), so a
    /// scenario can assert what was commanded.
    pub setpoints: BTreeMap<(String, String), Vec<f64>>,
}

impl WireReport {
    /// Commands decoded for `id`.
    pub fn count(&self, id: &str) -> usize {
        self.commands.get(id).copied().unwrap_or(0)
    }

    /// Values sent to `id` for `quantity`.
    pub fn sent(&self, id: &str, quantity: &str) -> &[f64] {
        self.setpoints
            .get(&(id.to_owned(), quantity.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn command(&mut self, id: &str) {
        *self.commands.entry(id.to_owned()).or_default() += 1;
    }

    fn check(&mut self, instrument: &Instrument, quantity: &str, value: f64, what: &str) {
        self.setpoints
            .entry((instrument.id.clone(), quantity.to_owned()))
            .or_default()
            .push(value);
        if let Some(range) = instrument.envelope.range(quantity)
            && !range.contains(value)
        {
            self.violations.push(format!(
                "{}: {what} sets {quantity} = {value}, outside the envelope {range}",
                instrument.id
            ));
        }
    }

    /// Only above the envelope's maximum counts: a setpoint below the minimum is how a driver parks a
    /// quantity (a hotplate setpoint of 0 with the heater off).
    fn check_max(&mut self, instrument: &Instrument, quantity: &str, value: f64, what: &str) {
        self.setpoints
            .entry((instrument.id.clone(), quantity.to_owned()))
            .or_default()
            .push(value);
        if let Some(Range { max, .. }) = instrument.envelope.range(quantity)
            && (value > max || value.is_nan())
        {
            self.violations.push(format!(
                "{}: {what} sets {quantity} = {value}, above the envelope's maximum {max}",
                instrument.id
            ));
        }
    }
}

impl fmt::Display for WireReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "commands {:?}", self.commands)?;
        for v in &self.violations {
            write!(f, "\n  violation: {v}")?;
        }
        for u in &self.undecodable {
            write!(f, "\n  undecodable: {u}")?;
        }
        Ok(())
    }
}

/// Decodes every frame of `buf`, skipping exactly the frames that do not decode.
fn drain<T>(
    mut buf: &[u8],
    decode: impl Fn(&[u8]) -> Result<Decoded<T>, DecodeError>,
    mut frame: impl FnMut(T),
    undecodable: &mut Vec<String>,
) {
    while !buf.is_empty() {
        match decode(buf) {
            Ok(Decoded::Frame { value, consumed }) => {
                frame(value);
                buf = &buf[consumed.clamp(1, buf.len())..];
            }
            // A command still being written when the tap was read.
            Ok(Decoded::Incomplete) => break,
            Err(e) => {
                undecodable.push(e.to_string());
                buf = &buf[e.skip.clamp(1, buf.len())..];
            }
        }
    }
}

/// Checks what one port's instruments (`instruments`, all on that port) were sent.
pub fn check_port(report: &mut WireReport, instruments: &[&Instrument], bytes: &[u8]) {
    let Some(first) = instruments.first() else {
        return;
    };
    let mut undecodable = Vec::new();
    match first.driver {
        Driver::Grbl => {
            let gantry = *first;
            // Absolute targets; labctl always moves in G90, but follow G91 if it ever appears.
            let mut incremental = false;
            let mut position: [Option<f64>; 3] = [None; 3];
            drain(
                bytes,
                grbl::decode_command,
                |cmd| {
                    report.command(&gantry.id);
                    match cmd {
                        grbl::Command::Distance(mode) => {
                            incremental = mode == grbl::DistanceMode::Incremental
                        }
                        grbl::Command::Move {
                            x_mm,
                            y_mm,
                            z_mm,
                            feed_mm_per_min,
                            ..
                        } => {
                            for (k, (axis, value)) in
                                [("x_mm", x_mm), ("y_mm", y_mm), ("z_mm", z_mm)]
                                    .into_iter()
                                    .enumerate()
                            {
                                let Some(v) = value else { continue };
                                position[k] = match (incremental, position[k]) {
                                    (false, _) => Some(v),
                                    (true, Some(p)) => Some(p + v),
                                    (true, None) => None,
                                };
                                match position[k] {
                                    Some(p) => report.check(gantry, axis, p, "a move"),
                                    None => report.violations.push(format!(
                                        "{}: an incremental move on {axis} from an unknown position",
                                        gantry.id
                                    )),
                                }
                            }
                            if let Some(feed) = feed_mm_per_min {
                                report.check(gantry, "feed_mm_per_min", feed, "a move");
                            }
                        }
                        _ => {}
                    }
                },
                &mut undecodable,
            );
        }
        Driver::Ne1000 => {
            // Units are per pump and sticky, as on the device.
            let mut volume_ml: BTreeMap<u8, bool> = BTreeMap::new();
            let mut rate_units: BTreeMap<u8, ne1000::RateUnits> = BTreeMap::new();
            drain(
                bytes,
                ne1000::decode_command,
                |cmd| {
                    let targets: Vec<&Instrument> = match cmd.target {
                        ne1000::Target::Pump(address) => instruments
                            .iter()
                            .copied()
                            .filter(|i| i.address == Some(address.get()))
                            .collect(),
                        // Everyone on the line listens.
                        _ => instruments.to_vec(),
                    };
                    if targets.is_empty() {
                        report.violations.push(format!(
                            "pump line: a command to {:?}, which no lab instrument has",
                            cmd.target
                        ));
                    }
                    for pump in targets {
                        report.command(&pump.id);
                        let address = pump.address.unwrap_or(0);
                        match &cmd.request {
                            ne1000::Request::SetRate { rate, units } => {
                                let units = units
                                    .or_else(|| rate_units.get(&address).copied())
                                    .unwrap_or(ne1000::RateUnits::MicrolitresPerMinute);
                                rate_units.insert(address, units);
                                let ul_per_min = rate.as_f64()
                                    * match units {
                                        ne1000::RateUnits::MicrolitresPerMinute => 1.0,
                                        ne1000::RateUnits::MillilitresPerMinute => 1000.0,
                                        ne1000::RateUnits::MicrolitresPerHour => 1.0 / 60.0,
                                        ne1000::RateUnits::MillilitresPerHour => 1000.0 / 60.0,
                                    };
                                report.check(pump, "rate_ul_per_min", ul_per_min, "RAT");
                            }
                            ne1000::Request::SetVolumeUnits(units) => {
                                volume_ml
                                    .insert(address, *units == ne1000::VolumeUnits::Millilitres);
                            }
                            ne1000::Request::SetVolume { volume } => {
                                let ml = volume_ml.get(&address).copied().unwrap_or(false);
                                let ul = volume.as_f64() * if ml { 1000.0 } else { 1.0 };
                                report.check(pump, "volume_ul", ul, "VOL");
                            }
                            _ => {}
                        }
                    }
                },
                &mut undecodable,
            );
        }
        Driver::IkaNamur => {
            let hotplate = *first;
            drain(
                bytes,
                namur::decode_command,
                |cmd| {
                    report.command(&hotplate.id);
                    match cmd {
                        namur::Command::SetTemperature { temperature_c } => {
                            report.check_max(hotplate, "temperature_c", temperature_c, "OUT_SP_1")
                        }
                        namur::Command::SetSafetyTemperature { temperature_c } => {
                            report.check_max(hotplate, "temperature_c", temperature_c, "OUT_SP_12")
                        }
                        namur::Command::SetSpeed { speed_rpm } => report.check(
                            hotplate,
                            "stir_speed_rpm",
                            f64::from(speed_rpm),
                            "OUT_SP_4",
                        ),
                        namur::Command::SetSafetySpeed { speed_rpm } => report.check(
                            hotplate,
                            "stir_speed_rpm",
                            f64::from(speed_rpm),
                            "OUT_SP_42",
                        ),
                        _ => {}
                    }
                },
                &mut undecodable,
            );
        }
        Driver::ScpiSpectro => {
            let spectro = *first;
            drain(
                bytes,
                scpi::decode_command,
                |message| {
                    match &message.fault {
                        // The codec checks the instrument's own range: beyond it is beyond any envelope.
                        Some(fault) if fault.error == scpi::ScpiError::DataOutOfRange => {
                            report.violations.push(format!(
                                "{}: sent a command outside the instrument's range: {}",
                                spectro.id, fault.detail
                            ))
                        }
                        Some(fault) => report
                            .undecodable
                            .push(format!("{}: {fault:?}", spectro.id)),
                        None => {}
                    }
                    for cmd in message.commands {
                        report.command(&spectro.id);
                        match cmd {
                            scpi::Command::MeasureAbsorbance { wavelength_nm } => {
                                report.check(spectro, "wavelength_nm", wavelength_nm, "MEAS:ABS?")
                            }
                            scpi::Command::MeasureSpectrum {
                                start_nm, stop_nm, ..
                            } => {
                                report.check(
                                    spectro,
                                    "wavelength_nm",
                                    start_nm,
                                    "MEAS:SPEC? start",
                                );
                                report.check(spectro, "wavelength_nm", stop_nm, "MEAS:SPEC? stop");
                            }
                            _ => {}
                        }
                    }
                },
                &mut undecodable,
            );
        }
        // Units of a shared Modbus RTU line are each checked against the line's bytes (their own unit
        // id's requests); an ASCII defined instrument has its port to itself.
        Driver::Definition => {
            for instrument in instruments {
                match instrument.defined() {
                    Some(definition) if definition.modbus.is_some() => {
                        check_modbus(report, instrument, definition, bytes, &mut undecodable)
                    }
                    Some(definition) => {
                        check_defined(report, instrument, definition, bytes, &mut undecodable)
                    }
                    None => {}
                }
            }
        }
        Driver::MtSics => {
            // Nothing a balance is told can leave an envelope; decode to prove the host spoke MT-SICS.
            let balance = *first;
            drain(
                bytes,
                mtsics::decode_command,
                |_| report.command(&balance.id),
                &mut undecodable,
            );
        }
    }
    report.undecodable.extend(undecodable);
}

/// A defined instrument's lines, read back with its definition's command patterns: each parameter an
/// action carries is checked against the envelope; queries, safe-state and recovery commands pass; a line
/// the definition does not know is undecodable.
fn check_defined(
    report: &mut WireReport,
    instrument: &Instrument,
    definition: &InstrumentDefinition,
    bytes: &[u8],
    undecodable: &mut Vec<String>,
) {
    let mut known: Vec<(String, regex::Regex)> = Vec::new();
    for action in &definition.actions {
        for template in &action.commands {
            if let Ok(re) = ActionSpec::command_pattern(template) {
                known.push((action.name.clone(), re));
            }
        }
    }
    let queries: Vec<&str> = definition
        .identity
        .queries
        .iter()
        .map(|q| q.query.as_str())
        .chain(
            definition
                .readings
                .iter()
                .filter_map(|r| r.query.as_deref()),
        )
        .chain(definition.safe_state.iter().map(String::as_str))
        .chain(definition.recovery.iter().map(String::as_str))
        .collect();
    let text = String::from_utf8_lossy(bytes);
    for line in text.split(['\r', '\n']).filter(|l| !l.is_empty()) {
        report.command(&instrument.id);
        if let Some((action, re)) = known.iter().find(|(_, re)| re.is_match(line)) {
            if let Some(caps) = re.captures(line) {
                for name in re.capture_names().flatten() {
                    if let Some(value) =
                        caps.name(name).and_then(|m| m.as_str().parse::<f64>().ok())
                    {
                        report.check(instrument, name, value, action);
                    }
                }
            }
        } else if !queries.contains(&line) {
            undecodable.push(format!(
                "{}: {line:?} is no command of its definition",
                instrument.id
            ));
        }
    }
}

/// A Modbus instrument's requests, decoded with labctl's Modbus codec: a write to an action's register is
/// read back as the action's parameter and checked against the envelope; reads pass; a write to a register
/// no action names is a violation (a safe-state write names its action or register in the definition).
fn check_modbus(
    report: &mut WireReport,
    instrument: &Instrument,
    definition: &InstrumentDefinition,
    mut bytes: &[u8],
    undecodable: &mut Vec<String>,
) {
    use labctl_codecs::modbus::{self, Request};
    use labctl_protocols::instrument_def::{ModbusTransport, RegisterTable, RegisterWrite};
    let Some(settings) = &definition.modbus else {
        return;
    };
    let allowed_raw: Vec<RegisterWrite> = definition
        .safe_state
        .iter()
        .chain(&definition.recovery)
        .filter_map(|s| s.parse().ok())
        .collect();
    while !bytes.is_empty() {
        let decoded = match settings.transport {
            ModbusTransport::Tcp => modbus::decode_tcp(bytes),
            ModbusTransport::Rtu => modbus::decode_rtu_request(bytes),
        };
        let frame = match decoded {
            Ok(Decoded::Frame { value, consumed }) => {
                bytes = &bytes[consumed.clamp(1, bytes.len())..];
                value
            }
            Ok(Decoded::Incomplete) => break,
            Err(e) => {
                undecodable.push(e.to_string());
                bytes = &bytes[e.skip.clamp(1, bytes.len())..];
                continue;
            }
        };
        // On a shared RS-485 line the tap holds every unit's requests: this instrument's are those to its
        // unit id (and broadcasts).
        if settings.transport == ModbusTransport::Rtu
            && frame.unit != 0
            && Some(frame.unit) != instrument.modbus_unit_id()
        {
            continue;
        }
        report.command(&instrument.id);
        let (table, address, words) = match modbus::decode_request(&frame.pdu) {
            Ok(Request::WriteSingleRegister { address, value }) => {
                (RegisterTable::Holding, address, vec![value])
            }
            Ok(Request::WriteMultipleRegisters { address, values }) => {
                (RegisterTable::Holding, address, values)
            }
            Ok(Request::WriteSingleCoil { address, on }) => {
                (RegisterTable::Coil, address, vec![u16::from(on)])
            }
            Ok(_) => continue,
            Err(e) => {
                undecodable.push(format!(
                    "{}: a request the device refuses ({e:?})",
                    instrument.id
                ));
                continue;
            }
        };
        let action = definition.actions.iter().find(|a| {
            a.register
                .as_ref()
                .is_some_and(|r| r.table == table && r.address == address)
        });
        match action {
            Some(a) => {
                let register = a.register.as_ref().expect("found by its register");
                let Some(raw) = register.decode(&words) else {
                    report.violations.push(format!(
                        "{}: {} written with {} words",
                        instrument.id,
                        a.name,
                        words.len()
                    ));
                    continue;
                };
                let value = raw * a.scale + a.offset;
                match a.params.first() {
                    Some(p) => report.check(instrument, &p.name, value, &a.name),
                    None if a.value.is_some_and(|v| (v - value).abs() < 1e-9) => {}
                    None => report.violations.push(format!(
                        "{}: {} wrote {value}, not its fixed value",
                        instrument.id, a.name
                    )),
                }
            }
            None if allowed_raw.iter().any(|w| {
                w.table == table && w.address == address && words == [w.value]
            }) => {}
            None => report.violations.push(format!(
                "{}: a write of {words:?} to {table:?} register {address}, which no action of its definition names",
                instrument.id
            )),
        }
    }
}

/// Checks every port of the simulated lab: `port_of(id)` names the port an instrument is served on (as
/// the simulated lab names it: `gantry`, `pumps`, a defined instrument's id, ...) and `transcript(port)`
/// gives what the host sent that port. Instruments on one port (the pump line) are checked together.
pub fn check_lab(
    lab: &Lab,
    port_of: impl Fn(&str) -> Option<String>,
    transcript: impl Fn(&str) -> Vec<u8>,
) -> WireReport {
    let mut report = WireReport::default();
    let mut ports: BTreeMap<String, Vec<&Instrument>> = BTreeMap::new();
    for instrument in &lab.instruments {
        match port_of(&instrument.id) {
            Some(port) => ports.entry(port).or_default().push(instrument),
            None => report.violations.push(format!(
                "{}: no simulated port serves it, so nothing it was sent can be checked",
                instrument.id
            )),
        }
    }
    for (port, instruments) in ports {
        check_port(&mut report, &instruments, &transcript(&port));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(port: &str, bytes: &[u8]) -> WireReport {
        let lab = Lab::sim();
        // The simulated lab's ports: the pumps share one line, every other instrument has its own.
        let port_of =
            |id: &str| Some(if id.starts_with("pump-") { "pumps" } else { id }.to_owned());
        check_lab(&lab, port_of, |p| {
            if p == port {
                bytes.to_vec()
            } else {
                Vec::new()
            }
        })
    }

    #[test]
    fn commands_inside_the_envelope_pass() {
        let r = check("gantry", b"$H\nG90\nG0 X20 Y20 Z50 F3000\n?G1 Z0 F500\n");
        assert!(r.violations.is_empty() && r.undecodable.is_empty(), "{r}");
        assert_eq!(r.count("gantry"), 5);
        assert_eq!(r.sent("gantry", "z_mm"), [50.0, 0.0]);
        let r = check(
            "pumps",
            b"1DIRINF\r1RAT600UM\r1VOLUL\r1VOL300\r1RUN\r2RAT1MM\r",
        );
        assert!(r.violations.is_empty(), "{r}");
        assert_eq!(r.count("pump-red"), 5);
        assert_eq!(r.sent("pump-yellow", "rate_ul_per_min"), [1000.0]);
        let r = check(
            "hotplate",
            b"OUT_SP_1 60\r\nSTART_1\r\nOUT_SP_4 600\r\nOUT_SP_1 0\r\n",
        );
        assert!(r.violations.is_empty(), "{r}");
        let r = check("spectro", b"*IDN?\nMEAS:SPEC? 380,780,5\n");
        assert!(r.violations.is_empty() && r.undecodable.is_empty(), "{r}");
        assert_eq!(r.count("spectro"), 2);
    }

    #[test]
    fn commands_outside_the_envelope_are_named() {
        // Feed above 3000, x beyond 300.
        let r = check("gantry", b"G0 X310 F4000\n");
        assert_eq!(r.violations.len(), 2, "{r}");
        assert!(r.violations[0].contains("x_mm = 310"), "{r}");
        // 1.2 mL/min is above the pumps' 1000 uL/min; 6 mL above their 5000 uL.
        let r = check("pumps", b"3RAT1.2MM\r3VOLML\r3VOL6\r");
        assert_eq!(r.violations.len(), 2, "{r}");
        assert!(r.violations[0].starts_with("pump-blue: RAT"), "{r}");
        assert!(r.violations[1].contains("volume_ul = 6000"), "{r}");
        let r = check("hotplate", b"OUT_SP_1 121\r\nOUT_SP_4 1300\r\n");
        assert_eq!(r.violations.len(), 2, "{r}");
        let r = check("spectro", b"MEAS:ABS? 900\n");
        assert_eq!(r.violations.len(), 1, "{r}");
        // An incremental move is followed from the last absolute target.
        let r = check("gantry", b"G90\nG0 X290\nG91\nG0 X20\n");
        assert_eq!(r.sent("gantry", "x_mm"), [290.0, 310.0]);
        assert_eq!(r.violations.len(), 1, "{r}");
    }

    #[test]
    fn garbage_from_the_host_is_reported_and_skipped() {
        let r = check("hotplate", b"\x01\x02garbage\r\nOUT_SP_1 50\r\n");
        assert_eq!(r.undecodable.len(), 1, "{r}");
        assert_eq!(r.sent("hotplate", "temperature_c"), [50.0]);
    }
}
