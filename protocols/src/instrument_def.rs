//! Instrument definitions: one TOML file describes one instrument model (its line or Modbus addressing, how
//! it says what it is, what it reads, what it does and how it is made safe), in the spirit of EPICS
//! StreamDevice protocol files, so an instrument is added to a lab without writing Rust.
//!
//! This module is the format and its checker (`labctl check-instrument`); the format is documented in
//! `docs/instrument-definitions.md` and published as a JSON Schema (`instrument_schema`). The checker
//! refuses what could never work (a pattern that does not compile or lacks its captures, a template naming
//! a parameter that does not exist, a range without a unit, a missing safe state) with a finding that names
//! the field by its JSON pointer, like the protocol validator's.

use labctl_codecs::ascii_frame::{AsciiFraming, Check};
use std::collections::BTreeSet;

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::finding::{Finding, FindingCode as Code};
use crate::serial::{FlowControl, Parity};

/// Format version this labctl reads.
pub const DEFINITION_VERSION: u32 = 1;

/// One instrument model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstrumentDefinition {
    /// Format version: 1.
    pub version: u32,
    pub model: Model,
    /// An ASCII instrument on a serial line (or serial over TCP). Exactly one of `line` and `modbus`.
    #[serde(default)]
    pub line: Option<LineSettings>,
    /// An instrument spoken to over Modbus RTU or TCP. Exactly one of `line` and `modbus`.
    #[serde(default)]
    pub modbus: Option<ModbusSettings>,
    pub identity: IdentitySpec,
    #[serde(default)]
    pub readings: Vec<Reading>,
    #[serde(default)]
    pub actions: Vec<ActionSpec>,
    /// Commands that bring the instrument to a state where it cannot do harm (heating off, motion stopped),
    /// sent in order on every safety stop. Required: an instrument without one cannot be made safe.
    pub safe_state: Vec<String>,
    /// Commands that bring it back to ready after a safe state, before its next command.
    #[serde(default)]
    pub recovery: Vec<String>,
    /// How the simulator built from this definition behaves (`labctl sim`, `labctl run --sim`).
    #[serde(default)]
    pub simulation: Simulation,
}

/// The simulator's state model: a reading that an action's parameter of the same name sets moves toward it
/// with a first-order lag; every reading starts at its initial value and carries a little noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Simulation {
    /// Time constant of the lag, in the instrument's seconds.
    pub tau_s: f64,
    /// Starting values by reading name (0 when absent).
    pub initial: std::collections::BTreeMap<String, f64>,
    /// Peak-to-peak noise on every reading, in its unit.
    pub noise: f64,
    /// What the simulator answers the identity queries with, where the manual quotes a real unit's reply
    /// (`model = "BC_LOOP"`); the definition's model, manufacturer and first firmware otherwise.
    pub identity: std::collections::BTreeMap<String, String>,
}

impl Default for Simulation {
    fn default() -> Self {
        Simulation {
            tau_s: 10.0,
            initial: Default::default(),
            noise: 0.0,
            identity: Default::default(),
        }
    }
}

/// Which instrument this is, and where its description comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub manufacturer: String,
    pub name: String,
    /// The manual the commands and replies are taken from: title and revision.
    pub manual: String,
}

/// Framing and checksums common on lab instruments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Checksum {
    #[default]
    None,
    /// The sum of the frame's bytes, modulo 256.
    Sum8,
    /// The XOR of the frame's bytes.
    Xor,
    /// CRC-16/MODBUS (polynomial 0xA001 reflected, initial 0xFFFF), low byte first.
    Crc16Modbus,
}

/// Line settings of an ASCII instrument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LineSettings {
    pub baud: u32,
    #[serde(default = "crate::serial::default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "crate::serial::default_stop_bits")]
    pub stop_bits: u8,
    /// Flow control: none (default), hardware (RTS/CTS) or software (XON/XOFF).
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Appended to every command (e.g. "\r\n").
    pub terminator_out: String,
    /// Ends every reply.
    pub terminator_in: String,
    /// Wait at least this long between two commands.
    #[serde(default)]
    pub inter_command_delay_ms: u32,
    /// A reply not complete after this long is a timeout.
    pub reply_timeout_ms: u32,
    /// Frames start with STX (0x02) and end with ETX (0x03).
    #[serde(default)]
    pub stx_etx: bool,
    #[serde(default)]
    pub checksum: Checksum,
}

impl LineSettings {
    /// The framing the wire codec applies: STX/ETX and the checksum (docs/instrument-definitions.md).
    pub fn framing(&self) -> AsciiFraming {
        AsciiFraming {
            stx_etx: self.stx_etx,
            check: match self.checksum {
                Checksum::None => Check::None,
                Checksum::Sum8 => Check::Sum8,
                Checksum::Xor => Check::Xor,
                Checksum::Crc16Modbus => Check::Crc16Modbus,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModbusTransport {
    Rtu,
    Tcp,
}

/// Modbus addressing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModbusSettings {
    pub transport: ModbusTransport,
    /// The unit (slave) id, 1-247.
    pub unit_id: u8,
    pub reply_timeout_ms: u32,
    /// RTU: the line's speed (the Modbus specification's default, 19200, when absent). RTU characters
    /// always have 8 data bits.
    #[serde(default = "modbus_baud")]
    pub baud: u32,
    /// RTU: parity (the specification's default is even).
    #[serde(default = "modbus_parity")]
    pub parity: Parity,
    /// RTU: stop bits (1; 2 when there is no parity, as the specification asks).
    #[serde(default = "crate::serial::default_stop_bits")]
    pub stop_bits: u8,
}

fn modbus_baud() -> u32 {
    19_200
}
fn modbus_parity() -> Parity {
    Parity::Even
}

/// A value written to a register or coil: a Modbus instrument's safe-state and recovery steps, written
/// `holding:<address>=<value>` (a raw 16-bit value) or `coil:<address>=<0|1>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterWrite {
    pub table: RegisterTable,
    pub address: u16,
    pub value: u16,
}

impl std::str::FromStr for RegisterWrite {
    type Err = String;

    fn from_str(text: &str) -> Result<RegisterWrite, String> {
        let expected =
            || format!("{text:?}: expected holding:<address>=<value> or coil:<address>=<0|1>");
        let (table, rest) = text.split_once(':').ok_or_else(expected)?;
        let (address, value) = rest.split_once('=').ok_or_else(expected)?;
        let table = match table.trim() {
            "holding" => RegisterTable::Holding,
            "coil" => RegisterTable::Coil,
            _ => return Err(expected()),
        };
        let address: u16 = address.trim().parse().map_err(|_| expected())?;
        let value: u16 = value.trim().parse().map_err(|_| expected())?;
        if table == RegisterTable::Coil && value > 1 {
            return Err(expected());
        }
        Ok(RegisterWrite {
            table,
            address,
            value,
        })
    }
}

impl Register {
    /// How many 16-bit registers the value takes (1 for a coil; a string's `count`).
    pub fn words(&self) -> u16 {
        match self.data_type {
            RegisterType::U16 | RegisterType::I16 => 1,
            RegisterType::U32 | RegisterType::I32 | RegisterType::F32 => 2,
            RegisterType::String => self.count.unwrap_or(1),
        }
    }

    /// The text the registers hold: numbers in decimal; a string's characters two per register, high byte
    /// first, with trailing NULs and spaces trimmed. `None` when there are too few words, or a string holds
    /// bytes that are not printable ASCII.
    pub fn decode_text(&self, words: &[u16]) -> Option<String> {
        if self.data_type != RegisterType::String {
            let raw = self.decode(words)?;
            return Some(format!("{raw}"));
        }
        let words = words.get(..usize::from(self.words()))?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        // A NUL ends the string (the rest of the block is padding).
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let text = &bytes[..end];
        if !text.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            return None;
        }
        Some(String::from_utf8_lossy(text).trim_end().to_owned())
    }

    /// The registers holding `text` in a string register (high byte first, padded with NULs, cut at the
    /// register's length); `None` for a numeric register or text that is not ASCII.
    pub fn encode_text(&self, text: &str) -> Option<Vec<u16>> {
        if self.data_type != RegisterType::String || !text.is_ascii() {
            return None;
        }
        let mut bytes = text.as_bytes().to_vec();
        bytes.resize(usize::from(self.words()) * 2, 0);
        Some(
            bytes
                .chunks(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect(),
        )
    }

    /// The raw value the registers hold (before scale and offset).
    pub fn decode(&self, words: &[u16]) -> Option<f64> {
        let pair = |w: &[u16]| -> Option<u32> {
            let (a, b) = (*w.first()?, *w.get(1)?);
            let (high, low) = match self.word_order {
                WordOrder::Big => (a, b),
                WordOrder::Little => (b, a),
            };
            Some((u32::from(high) << 16) | u32::from(low))
        };
        Some(match self.data_type {
            RegisterType::U16 => f64::from(*words.first()?),
            RegisterType::I16 => f64::from(*words.first()? as i16),
            RegisterType::U32 => f64::from(pair(words)?),
            RegisterType::I32 => f64::from(pair(words)? as i32),
            RegisterType::F32 => f64::from(f32::from_bits(pair(words)?)),
            RegisterType::String => return None,
        })
    }

    /// The registers that hold raw value `raw`, rounded for integer types; `None` when it does not fit.
    pub fn encode(&self, raw: f64) -> Option<Vec<u16>> {
        let split = |bits: u32| -> Vec<u16> {
            let (high, low) = ((bits >> 16) as u16, bits as u16);
            match self.word_order {
                WordOrder::Big => vec![high, low],
                WordOrder::Little => vec![low, high],
            }
        };
        let int = |min: f64, max: f64| {
            let r = raw.round();
            (r.is_finite() && (min..=max).contains(&r)).then_some(r)
        };
        Some(match self.data_type {
            RegisterType::U16 => vec![int(0.0, f64::from(u16::MAX))? as u16],
            RegisterType::I16 => vec![int(f64::from(i16::MIN), f64::from(i16::MAX))? as i16 as u16],
            RegisterType::U32 => split(int(0.0, f64::from(u32::MAX))? as u32),
            RegisterType::I32 => {
                split(int(f64::from(i32::MIN), f64::from(i32::MAX))? as i32 as u32)
            }
            RegisterType::F32 => {
                if !raw.is_finite() {
                    return None;
                }
                split((raw as f32).to_bits())
            }
            RegisterType::String => return None,
        })
    }
}

/// Where a Modbus value lives and how it is encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub table: RegisterTable,
    /// The register's (or coil's) address, from 0.
    pub address: u16,
    #[serde(default = "u16_type")]
    pub data_type: RegisterType,
    /// For 32-bit values: the high word first (`big`) or the low word first (`little`).
    #[serde(default = "big")]
    pub word_order: WordOrder,
    /// For `data_type = "string"`: how many registers the string takes (two ASCII characters each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u16>,
}

fn u16_type() -> RegisterType {
    RegisterType::U16
}
fn big() -> WordOrder {
    WordOrder::Big
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegisterTable {
    Holding,
    Input,
    Coil,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegisterType {
    U16,
    I16,
    U32,
    I32,
    F32,
    /// ASCII text, two characters per register (high byte first), `count` registers; identity only.
    String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    Big,
    Little,
}

/// How the instrument says what it is, read at connect (never from the lab file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    /// Queries sent at connect (line instruments), each with a regular expression on its reply whose
    /// named captures give `manufacturer`, `model`, `serial` or `firmware`.
    #[serde(default)]
    pub queries: Vec<IdentityQuery>,
    /// Identity fields the instrument does not report (e.g. `manufacturer = "IKA"`).
    #[serde(default)]
    pub fixed: std::collections::BTreeMap<String, String>,
    /// Identity fields read from registers at connect (Modbus instruments), by field name:
    /// `serial = { table = "holding", address = 61720, data_type = "string", count = 8 }`.
    #[serde(default)]
    pub registers: std::collections::BTreeMap<String, Register>,
    /// Firmware versions the definition is known to work with; others are refused unless the lab file
    /// allows them.
    pub firmware: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityQuery {
    pub query: String,
    pub reply: String,
}

/// A value the instrument reports, polled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    /// The quantity's name, with its unit in it as everywhere in labctl (`temperature_c`).
    pub name: String,
    pub unit: String,
    /// The query (line instruments).
    #[serde(default)]
    pub query: Option<String>,
    /// A regular expression on the reply with a named capture `value` (line instruments).
    #[serde(default)]
    pub reply: Option<String>,
    /// Where the value lives (Modbus instruments).
    #[serde(default)]
    pub register: Option<Register>,
    /// value = raw * scale + offset.
    #[serde(default = "unit_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    pub poll_ms: u32,
}

fn unit_scale() -> f64 {
    1.0
}

/// Something the instrument does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// The action's name in protocols (`set_temperature`).
    pub name: String,
    #[serde(default)]
    pub params: Vec<Param>,
    /// The commands sent in order, with `{param}` where a parameter's value goes (line instruments).
    #[serde(default)]
    pub commands: Vec<String>,
    /// The register written with the parameter's value, or with `value` (Modbus instruments).
    #[serde(default)]
    pub register: Option<Register>,
    /// What a Modbus action without a parameter writes (e.g. 1 to a run coil).
    #[serde(default)]
    pub value: Option<f64>,
    /// Modbus: the register holds (value - offset) / scale (e.g. scale 0.1 for tenths of a degree).
    #[serde(default = "unit_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// A regular expression the acknowledgement matches (line instruments that acknowledge).
    #[serde(default)]
    pub ack: Option<String>,
    /// Replies that mean the instrument refused, with what to tell the user.
    #[serde(default)]
    pub errors: Vec<ErrorReply>,
    pub completion: Completion,
    /// How long the dry run assumes the action takes.
    pub duration: Duration,
}

/// A parameter of an action: a number in a unit, within what the instrument can do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Param {
    /// With its unit in it, as in protocols (`temperature_c`).
    pub name: String,
    pub unit: String,
    /// What the instrument can do (its capability range); the lab's envelope narrows it.
    pub min: f64,
    pub max: f64,
    /// Digits after the point in the command.
    #[serde(default)]
    pub decimals: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// A regular expression on the reply.
    pub reply: String,
    pub message: String,
}

/// How labctl knows the action has finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Completion {
    /// When the acknowledgement arrives.
    Acknowledged,
    /// After a fixed time.
    AfterS(f64),
    /// When a reading comes within `tolerance` of a parameter's value.
    Reading {
        reading: String,
        param: String,
        tolerance: f64,
        timeout_s: f64,
    },
}

/// The dry run's duration model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Duration {
    FixedS(f64),
    /// `per_unit_s` seconds per unit of the parameter's value (e.g. 0.5 s per degree).
    PerUnit {
        param: String,
        per_unit_s: f64,
    },
}

/// Why a reply could not be read, or a command not written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DefinitionError {
    #[error("{what}: the reply {reply:?} does not match {pattern:?}")]
    NoMatch {
        what: String,
        reply: String,
        pattern: String,
    },
    #[error("{what}: captured {text:?}, not a number")]
    NotANumber { what: String, text: String },
    #[error("{what}: no value for parameter {param}")]
    MissingParam { what: String, param: String },
    #[error("{what}: {param} = {value} is outside {min}..={max} {unit}")]
    OutOfRange {
        what: String,
        param: String,
        value: f64,
        min: f64,
        max: f64,
        unit: String,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl InstrumentDefinition {
    /// The action by its name in protocols.
    pub fn action(&self, name: &str) -> Option<&ActionSpec> {
        self.actions.iter().find(|a| a.name == name)
    }

    /// The reading by its name.
    pub fn reading(&self, name: &str) -> Option<&Reading> {
        self.readings.iter().find(|r| r.name == name)
    }

    /// The instrument's line ending for commands (none for Modbus).
    pub fn terminator_out(&self) -> &str {
        self.line.as_ref().map_or("", |l| l.terminator_out.as_str())
    }
}

impl ActionSpec {
    /// A regular expression matching what `template` renders to, with a named capture for each parameter
    /// (how a simulator reads the command back).
    pub fn command_pattern(template: &str) -> Result<Regex, String> {
        let mut pattern = String::from("^");
        for part in template_parts(template)? {
            match part {
                Part::Text(text) => pattern.push_str(&regex::escape(&text)),
                Part::Param(name) => {
                    pattern.push_str(&format!("(?P<{name}>[-+]?[0-9]*\\.?[0-9]+)"))
                }
            }
        }
        pattern.push('$');
        Regex::new(&pattern).map_err(|e| e.to_string())
    }
}

impl Completion {
    /// The longest the action may take to complete, in seconds.
    pub fn longest_s(&self) -> f64 {
        match self {
            Completion::Acknowledged => 0.0,
            Completion::AfterS(s) => s.max(0.0),
            Completion::Reading { timeout_s, .. } => timeout_s.max(0.0),
        }
    }
}

impl Duration {
    /// The estimate for parameters `values`, in seconds: a `per_unit` model counts the change from
    /// `previous` (the parameter's last value on this instrument, when known).
    pub fn estimate_s(
        &self,
        values: &std::collections::BTreeMap<String, f64>,
        previous: Option<f64>,
    ) -> f64 {
        match self {
            Duration::FixedS(s) => s.max(0.0),
            Duration::PerUnit { param, per_unit_s } => values.get(param).map_or(0.0, |v| {
                ((v - previous.unwrap_or(0.0)).abs() * per_unit_s).max(0.0)
            }),
        }
    }
}

/// What a walk over a protocol (the validator's, the dry run's) remembers of defined instruments, so a
/// `per_unit` duration counts the change a setpoint asks for, not its value: the last value of each
/// parameter by instrument, starting from the simulation's initial value of a reading of the same name
/// (the best guess of where a real instrument starts).
#[derive(Debug, Default, Clone)]
pub struct ParamHistory {
    last: std::collections::BTreeMap<(String, String), f64>,
}

impl ParamHistory {
    /// The estimated duration of `action` on `instrument` with `values`, remembering them for the next.
    pub fn estimate_s(
        &mut self,
        instrument: &str,
        def: &InstrumentDefinition,
        action: &ActionSpec,
        values: &std::collections::BTreeMap<String, f64>,
    ) -> f64 {
        let previous = match &action.duration {
            Duration::PerUnit { param, .. } => self
                .last
                .get(&(instrument.to_owned(), param.clone()))
                .copied()
                .or_else(|| def.simulation.initial.get(param).copied()),
            Duration::FixedS(_) => None,
        };
        for (name, v) in values {
            self.last.insert((instrument.to_owned(), name.clone()), *v);
        }
        action.duration.estimate_s(values, previous)
    }
}

impl Reading {
    /// The reading's value in its unit from one reply line (terminator removed): the `value` capture,
    /// scaled and offset.
    pub fn value_from(&self, reply: &str) -> Result<f64, DefinitionError> {
        let what = || format!("reading {}", self.name);
        let pattern = self
            .reply
            .as_deref()
            .ok_or_else(|| DefinitionError::Invalid {
                what: what(),
                reason: "no reply pattern (a Modbus reading is read from its register)".into(),
            })?;
        let re = Regex::new(pattern).map_err(|e| DefinitionError::Invalid {
            what: what(),
            reason: e.to_string(),
        })?;
        self.value_with(&re, reply)
    }

    /// [`Reading::value_from`] with the reply pattern compiled once by the caller (a driver's poll).
    pub fn value_with(&self, re: &Regex, reply: &str) -> Result<f64, DefinitionError> {
        let what = || format!("reading {}", self.name);
        let no_match = || DefinitionError::NoMatch {
            what: what(),
            reply: reply.to_owned(),
            pattern: re.as_str().to_owned(),
        };
        let captures = re.captures(reply).ok_or_else(no_match)?;
        let text = captures.name("value").ok_or_else(no_match)?.as_str();
        let raw: f64 = text
            .trim()
            .parse()
            .map_err(|_| DefinitionError::NotANumber {
                what: what(),
                text: text.to_owned(),
            })?;
        // A sign written apart from the digits (`-   123.56 g`).
        let negative = captures
            .name(crate::pattern_text::SIGN)
            .is_some_and(|m| m.as_str().trim() == "-");
        let raw = if negative { -raw } else { raw };
        Ok(raw * self.scale + self.offset)
    }
}

impl ActionSpec {
    /// The commands to send for `values` (by parameter name), each value within its parameter's range and
    /// written with its decimals.
    pub fn render(
        &self,
        values: &std::collections::BTreeMap<String, f64>,
    ) -> Result<Vec<String>, DefinitionError> {
        let what = || format!("action {}", self.name);
        let mut texts = std::collections::BTreeMap::new();
        for p in &self.params {
            let value = *values
                .get(&p.name)
                .ok_or_else(|| DefinitionError::MissingParam {
                    what: what(),
                    param: p.name.clone(),
                })?;
            if !(value.is_finite() && (p.min..=p.max).contains(&value)) {
                return Err(DefinitionError::OutOfRange {
                    what: what(),
                    param: p.name.clone(),
                    value,
                    min: p.min,
                    max: p.max,
                    unit: p.unit.clone(),
                });
            }
            texts.insert(
                p.name.as_str(),
                format!("{value:.prec$}", prec = usize::from(p.decimals)),
            );
        }
        self.commands
            .iter()
            .map(|template| {
                let parts =
                    template_parts(template).map_err(|reason| DefinitionError::Invalid {
                        what: what(),
                        reason,
                    })?;
                let mut out = String::with_capacity(template.len() + 8);
                for part in parts {
                    match part {
                        Part::Text(text) => out.push_str(&text),
                        Part::Param(name) => {
                            out.push_str(texts.get(name.as_str()).ok_or_else(|| {
                                DefinitionError::MissingParam {
                                    what: what(),
                                    param: name.clone(),
                                }
                            })?)
                        }
                    }
                }
                Ok(out)
            })
            .collect()
    }
}

/// The identity a simulator of `def` reports: the definition's fixed fields, its model and manufacturer,
/// the first firmware it lists, and a made-up serial.
pub fn sample_identity(def: &InstrumentDefinition) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::from([
        ("manufacturer".to_owned(), def.model.manufacturer.clone()),
        ("model".to_owned(), def.model.name.clone()),
        ("serial".to_owned(), "SIM0001".to_owned()),
        (
            "firmware".to_owned(),
            def.identity.firmware.first().cloned().unwrap_or_default(),
        ),
    ]);
    out.extend(def.identity.fixed.clone());
    out.extend(def.simulation.identity.clone());
    out
}

/// The definition JSON Schema, generated from the types.
pub fn instrument_schema() -> serde_json::Value {
    let mut schema =
        serde_json::to_value(schemars::schema_for!(InstrumentDefinition)).unwrap_or_default();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("$id".into(), "urn:labctl:schema:instrument:1".into());
    }
    schema
}

/// The committed copy, checked against the generated one by a test.
pub const COMMITTED_SCHEMA: &str = include_str!("../schema/instrument.schema.json");

/// The schema as pretty JSON with a trailing newline, as committed under `protocols/schema/`.
pub fn instrument_schema_pretty() -> String {
    let mut s = serde_json::to_string_pretty(&instrument_schema()).unwrap_or_default();
    s.push('\n');
    s
}

/// Reads and checks a definition's TOML text; the definition when it has no error, and every finding.
pub fn check_definition(text: &str) -> (Option<InstrumentDefinition>, Vec<Finding>) {
    let def: InstrumentDefinition = match toml::from_str(text) {
        Ok(d) => d,
        Err(e) => {
            let mut finding = Finding::error(Code::Schema, "", e.message().to_owned());
            if let Some(span) = e.span() {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                finding = finding.at(line, column);
            }
            return (None, vec![finding]);
        }
    };
    let findings = Checker::default().run(&def);
    let ok = !findings.iter().any(Finding::is_error);
    (ok.then_some(def), findings)
}

#[derive(Default)]
struct Checker {
    findings: Vec<Finding>,
}

impl Checker {
    fn error(&mut self, code: Code, path: String, message: impl Into<String>) {
        self.findings.push(Finding::error(code, path, message));
    }

    /// Compiles `pattern`; with `captures`, each must be a named group in it.
    fn pattern(&mut self, path: String, pattern: &str, captures: &[&str]) -> Option<Regex> {
        match Regex::new(pattern) {
            Ok(re) => {
                let names: BTreeSet<&str> = re.capture_names().flatten().collect();
                for want in captures {
                    if !names.contains(want) {
                        self.error(
                            Code::InvalidValue,
                            path.clone(),
                            format!(
                                "the pattern has no named capture `{want}`: write (?P<{want}>...)"
                            ),
                        );
                    }
                }
                Some(re)
            }
            Err(e) => {
                self.error(
                    Code::InvalidValue,
                    path,
                    format!("not a regular expression: {e}"),
                );
                None
            }
        }
    }

    fn run(mut self, def: &InstrumentDefinition) -> Vec<Finding> {
        if def.version != DEFINITION_VERSION {
            self.error(
                Code::UnsupportedVersion,
                "/version".into(),
                format!(
                    "version {}: this labctl reads version {DEFINITION_VERSION}",
                    def.version
                ),
            );
        }
        if def.model.manual.trim().is_empty() {
            self.error(
                Code::InvalidValue,
                "/model/manual".into(),
                "name the manual the commands come from (title and revision)",
            );
        }
        let line = match (&def.line, &def.modbus) {
            (Some(_), None) => true,
            (None, Some(m)) => {
                if !(1..=247).contains(&m.unit_id) {
                    self.error(
                        Code::OutOfRange,
                        "/modbus/unit_id".into(),
                        format!("unit id {}: expected 1 to 247", m.unit_id),
                    );
                }
                false
            }
            _ => {
                self.error(
                    Code::Schema,
                    "".into(),
                    "give exactly one of [line] (an ASCII instrument) and [modbus]",
                );
                def.line.is_some()
            }
        };
        if let Some(l) = &def.line {
            self.line(l);
        }
        self.identity(&def.identity, line);
        let mut readings = BTreeSet::new();
        for (i, r) in def.readings.iter().enumerate() {
            let at = format!("/readings/{i}");
            if !readings.insert(r.name.as_str()) {
                self.error(
                    Code::DuplicateId,
                    format!("{at}/name"),
                    format!("reading {} is defined twice", r.name),
                );
            }
            self.unit(&format!("{at}/unit"), &r.unit);
            self.addressed(
                &at,
                line,
                r.query.as_deref(),
                r.reply.as_deref(),
                &r.register,
                &["value"],
            );
            if let Some(register) = &r.register {
                self.numeric_register(&format!("{at}/register"), register, "a reading");
            }
            if r.poll_ms == 0 {
                self.error(
                    Code::InvalidValue,
                    format!("{at}/poll_ms"),
                    "a poll period of 0 ms",
                );
            }
            if !(r.scale.is_finite() && r.scale != 0.0 && r.offset.is_finite()) {
                self.error(
                    Code::InvalidValue,
                    format!("{at}/scale"),
                    "scale must be a non-zero number and offset a number",
                );
            }
        }
        let mut actions = BTreeSet::new();
        for (i, a) in def.actions.iter().enumerate() {
            if let Some(register) = &a.register {
                self.numeric_register(&format!("/actions/{i}/register"), register, "an action");
            }
            if !actions.insert(a.name.as_str()) {
                self.error(
                    Code::DuplicateId,
                    format!("/actions/{i}/name"),
                    format!("action {} is defined twice", a.name),
                );
            }
            self.action(i, a, line, &readings);
        }
        if def.safe_state.is_empty() {
            self.error(
                Code::InvalidValue,
                "/safe_state".into(),
                "no safe state: list the commands that make the instrument harmless (heating off, motion stopped)",
            );
        }
        for (field, commands) in [("safe_state", &def.safe_state), ("recovery", &def.recovery)] {
            for (i, c) in commands.iter().enumerate() {
                if !line {
                    let fixed_action = def
                        .action(c)
                        .is_some_and(|a| a.params.is_empty() && a.value.is_some());
                    if let (false, Err(e)) = (fixed_action, c.parse::<RegisterWrite>()) {
                        self.error(
                            Code::InvalidValue,
                            format!("/{field}/{i}"),
                            format!("{e}, or the name of an action that writes a fixed `value`"),
                        );
                    }
                    continue;
                }
                let takes_params = template_parts(c)
                    .map(|parts| parts.iter().any(|p| matches!(p, Part::Param(_))))
                    .unwrap_or(true);
                if takes_params {
                    self.error(
                        Code::InvalidValue,
                        format!("/{field}/{i}"),
                        "a safe-state or recovery command takes no parameters",
                    );
                }
            }
        }
        self.simulable(def);
        self.findings
    }

    /// Every reply pattern must be one a simulator can answer: the definition is tested end to end on its
    /// simulator, so a pattern only a real instrument could satisfy is refused.
    fn simulable(&mut self, def: &InstrumentDefinition) {
        use crate::pattern_text::{write, write_number};
        let sim = &def.simulation;
        if !(sim.tau_s.is_finite() && sim.tau_s > 0.0) {
            self.error(
                Code::InvalidValue,
                "/simulation/tau_s".into(),
                "expected a time constant > 0 s",
            );
        }
        if !(sim.noise.is_finite() && sim.noise >= 0.0) {
            self.error(
                Code::InvalidValue,
                "/simulation/noise".into(),
                "expected a noise >= 0",
            );
        }
        for name in sim.initial.keys() {
            if def.reading(name).is_none() {
                self.error(
                    Code::UnknownQuantity,
                    format!("/simulation/initial/{name}"),
                    format!("no reading {name}"),
                );
            }
        }
        for key in sim.identity.keys() {
            if !["manufacturer", "model", "serial", "firmware"].contains(&key.as_str()) {
                self.error(
                    Code::Schema,
                    format!("/simulation/identity/{key}"),
                    "expected manufacturer, model, serial or firmware",
                );
            }
        }
        let sample = sample_identity(def);
        let sample: std::collections::BTreeMap<&str, String> = sample
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        for (i, q) in def.identity.queries.iter().enumerate() {
            if Regex::new(&q.reply).is_ok()
                && let Err(e) = write(&q.reply, &sample)
            {
                self.error(
                    Code::InvalidValue,
                    format!("/identity/queries/{i}/reply"),
                    format!("a simulator cannot answer this pattern: {e}"),
                );
            }
        }
        for (i, r) in def.readings.iter().enumerate() {
            if let Some(reply) = &r.reply
                && Regex::new(reply)
                    .is_ok_and(|re| re.capture_names().flatten().any(|n| n == "value"))
                && let Err(e) = write_number(reply, "value", 1.0, &Default::default())
            {
                self.error(
                    Code::InvalidValue,
                    format!("/readings/{i}/reply"),
                    format!("a simulator cannot answer this pattern: {e}"),
                );
            }
        }
    }

    fn line(&mut self, l: &LineSettings) {
        if !(300..=921_600).contains(&l.baud) {
            self.error(
                Code::OutOfRange,
                "/line/baud".into(),
                format!("{} baud: expected 300 to 921600", l.baud),
            );
        }
        if !(5..=8).contains(&l.data_bits) {
            self.error(
                Code::OutOfRange,
                "/line/data_bits".into(),
                "expected 5 to 8 data bits",
            );
        }
        if !(1..=2).contains(&l.stop_bits) {
            self.error(
                Code::OutOfRange,
                "/line/stop_bits".into(),
                "expected 1 or 2 stop bits",
            );
        }
        if l.terminator_in.is_empty() && !l.stx_etx {
            self.error(
                Code::InvalidValue,
                "/line/terminator_in".into(),
                "replies need a terminator (or stx_etx framing) to be told apart",
            );
        }
        if l.reply_timeout_ms == 0 {
            self.error(
                Code::InvalidValue,
                "/line/reply_timeout_ms".into(),
                "a reply timeout of 0 ms",
            );
        }
    }

    /// A register's own consistency: `count` goes with a string, and a string takes 1 to 125 registers
    /// (the most one Modbus read returns).
    fn register(&mut self, at: &str, r: &Register) {
        match (r.data_type, r.count) {
            (RegisterType::String, None) => self.error(
                Code::InvalidValue,
                format!("{at}/count"),
                "missing: how many registers the string takes (two characters each)",
            ),
            (RegisterType::String, Some(n)) if !(1..=125).contains(&n) => self.error(
                Code::OutOfRange,
                format!("{at}/count"),
                format!("{n} registers: expected 1 to 125"),
            ),
            (RegisterType::String, Some(_)) if r.table == RegisterTable::Coil => self.error(
                Code::InvalidValue,
                format!("{at}/table"),
                "a string lives in holding or input registers, not coils",
            ),
            (RegisterType::String, Some(_)) => {}
            (_, Some(_)) => self.error(
                Code::InvalidValue,
                format!("{at}/count"),
                "only a string register takes a count (a number's type gives its size)",
            ),
            (_, None) => {}
        }
    }

    /// A reading's or action's register holds a number.
    fn numeric_register(&mut self, at: &str, r: &Register, what: &str) {
        self.register(at, r);
        if r.data_type == RegisterType::String {
            self.error(
                Code::InvalidValue,
                format!("{at}/data_type"),
                format!(
                    "{what} is a number: a string register can only be read as identity ([identity] registers)"
                ),
            );
        }
    }

    fn identity(&mut self, id: &IdentitySpec, line: bool) {
        const FIELDS: [&str; 4] = ["manufacturer", "model", "serial", "firmware"];
        for (key, register) in &id.registers {
            let at = format!("/identity/registers/{key}");
            if !FIELDS.contains(&key.as_str()) {
                self.error(
                    Code::Schema,
                    at.clone(),
                    "expected manufacturer, model, serial or firmware",
                );
            }
            if line {
                self.error(
                    Code::Schema,
                    at.clone(),
                    "a line instrument has no registers: read its identity with `queries`",
                );
            }
            if id.fixed.contains_key(key) {
                self.error(
                    Code::InvalidValue,
                    format!("/identity/fixed/{key}"),
                    format!("{key} is also read from a register: give it one way"),
                );
            }
            self.register(&at, register);
            if register.data_type == RegisterType::F32 {
                self.error(
                    Code::InvalidValue,
                    format!("{at}/data_type"),
                    "an identity register is a string or an integer",
                );
            }
        }
        for key in id.fixed.keys() {
            if !FIELDS.contains(&key.as_str()) {
                self.error(
                    Code::Schema,
                    format!("/identity/fixed/{key}"),
                    "expected manufacturer, model, serial or firmware",
                );
            }
        }
        if !line && !id.queries.is_empty() {
            self.error(
                Code::InvalidValue,
                "/identity/queries".into(),
                "a Modbus instrument has no queries: read its identity from `registers` or give it in `fixed`",
            );
        }
        let mut captured: BTreeSet<String> = BTreeSet::new();
        for (i, q) in id.queries.iter().enumerate() {
            let path = format!("/identity/queries/{i}/reply");
            if let Some(re) = self.pattern(path.clone(), &q.reply, &[]) {
                for name in re.capture_names().flatten() {
                    if FIELDS.contains(&name) {
                        captured.insert(name.to_owned());
                    } else {
                        self.error(
                            Code::InvalidValue,
                            path.clone(),
                            format!(
                                "capture `{name}`: expected manufacturer, model, serial or firmware"
                            ),
                        );
                    }
                }
            }
        }
        let missing: Vec<&str> = FIELDS
            .into_iter()
            .filter(|f| {
                !captured.contains(*f)
                    && !id.fixed.contains_key(*f)
                    && !id.registers.contains_key(*f)
            })
            .collect();
        if !missing.is_empty() {
            self.error(
                Code::InvalidValue,
                "/identity".into(),
                format!(
                    "{}: neither captured from a reply, read from a register nor fixed",
                    missing.join(", ")
                ),
            );
        }
        if id.firmware.is_empty() {
            self.error(
                Code::InvalidValue,
                "/identity/firmware".into(),
                "list the firmware versions the definition is known to work with",
            );
        }
    }

    /// A reading's or action's addressing: query and pattern on a line, a register on Modbus.
    fn addressed(
        &mut self,
        at: &str,
        line: bool,
        query: Option<&str>,
        reply: Option<&str>,
        register: &Option<Register>,
        captures: &[&str],
    ) {
        if line {
            match (query, reply) {
                (Some(_), Some(reply)) => {
                    self.pattern(format!("{at}/reply"), reply, captures);
                }
                (None, _) => self.error(
                    Code::InvalidValue,
                    format!("{at}/query"),
                    "missing: what to send",
                ),
                (_, None) => self.error(
                    Code::InvalidValue,
                    format!("{at}/reply"),
                    "missing: the reply's pattern",
                ),
            }
            if register.is_some() {
                self.error(
                    Code::Schema,
                    format!("{at}/register"),
                    "a line instrument has no registers",
                );
            }
        } else if register.is_none() {
            self.error(
                Code::InvalidValue,
                format!("{at}/register"),
                "missing: where the value lives",
            );
        }
    }

    fn unit(&mut self, path: &str, unit: &str) {
        if unit.trim().is_empty() {
            self.error(Code::Unit, path.to_owned(), "a value needs its unit");
        }
    }

    fn action(&mut self, i: usize, a: &ActionSpec, line: bool, readings: &BTreeSet<&str>) {
        let at = format!("/actions/{i}");
        let mut params = BTreeSet::new();
        for (j, p) in a.params.iter().enumerate() {
            let pat = format!("{at}/params/{j}");
            params.insert(p.name.as_str());
            self.unit(&format!("{pat}/unit"), &p.unit);
            if !(p.min.is_finite() && p.max.is_finite() && p.min <= p.max) {
                self.error(
                    Code::InvalidValue,
                    format!("{pat}/min"),
                    format!(
                        "range {}..{}: expected finite numbers with min <= max",
                        p.min, p.max
                    ),
                );
            }
        }
        if line {
            if a.commands.is_empty() {
                self.error(
                    Code::InvalidValue,
                    format!("{at}/commands"),
                    "missing: what to send",
                );
            }
            for (k, command) in a.commands.iter().enumerate() {
                match template_parts(command) {
                    Err(reason) => {
                        self.error(Code::InvalidValue, format!("{at}/commands/{k}"), reason)
                    }
                    Ok(parts) => {
                        for part in parts {
                            if let Part::Param(name) = part
                                && !params.contains(name.as_str())
                            {
                                self.error(
                                    Code::InvalidValue,
                                    format!("{at}/commands/{k}"),
                                    format!("{{{name}}} is not a parameter of {}", a.name),
                                );
                            }
                        }
                    }
                }
            }
            if let Some(ack) = &a.ack {
                self.pattern(format!("{at}/ack"), ack, &[]);
            }
        } else {
            match &a.register {
                None => self.error(
                    Code::InvalidValue,
                    format!("{at}/register"),
                    "missing: the register written",
                ),
                Some(r) if r.table == RegisterTable::Input => self.error(
                    Code::InvalidValue,
                    format!("{at}/register/table"),
                    "input registers are read-only: an action writes a holding register or a coil",
                ),
                Some(_) => {}
            }
            if a.params.len() + usize::from(a.value.is_some()) != 1 {
                self.error(
                    Code::InvalidValue,
                    format!("{at}/params"),
                    "a Modbus action writes one value: one parameter, or `value` and no parameter",
                );
            }
        }
        for (j, e) in a.errors.iter().enumerate() {
            self.pattern(format!("{at}/errors/{j}/reply"), &e.reply, &[]);
        }
        match &a.completion {
            Completion::Acknowledged if line && a.ack.is_none() => self.error(
                Code::InvalidValue,
                format!("{at}/completion"),
                "completes when acknowledged, but no `ack` pattern is given",
            ),
            Completion::AfterS(s) if !(s.is_finite() && *s >= 0.0) => self.error(
                Code::InvalidValue,
                format!("{at}/completion/after_s"),
                "expected a time of 0 s or more",
            ),
            Completion::Reading {
                reading,
                param,
                tolerance,
                timeout_s,
            } => {
                if !readings.contains(reading.as_str()) {
                    self.error(
                        Code::UnknownQuantity,
                        format!("{at}/completion/reading/reading"),
                        format!("no reading named {reading}"),
                    );
                }
                if !params.contains(param.as_str()) {
                    self.error(
                        Code::InvalidValue,
                        format!("{at}/completion/reading/param"),
                        format!("{param} is not a parameter of {}", a.name),
                    );
                }
                if !(tolerance.is_finite()
                    && *tolerance > 0.0
                    && timeout_s.is_finite()
                    && *timeout_s > 0.0)
                {
                    self.error(
                        Code::InvalidValue,
                        format!("{at}/completion/reading/tolerance"),
                        "tolerance and timeout_s must be positive",
                    );
                }
            }
            _ => {}
        }
        if let Duration::PerUnit { param, .. } = &a.duration
            && !params.contains(param.as_str())
        {
            self.error(
                Code::InvalidValue,
                format!("{at}/duration/per_unit/param"),
                format!("{param} is not a parameter of {}", a.name),
            );
        }
    }
}

/// A piece of a command template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    /// `{name}`: a parameter's value.
    Param(String),
}

/// Splits a command template into text and `{param}` placeholders; `{{` and `}}` are literal braces.
fn template_parts(template: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed || name.is_empty() || name.contains('{') {
                    return Err(format!("{template:?}: expected {{parameter}}"));
                }
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(Part::Param(name));
            }
            '}' => return Err(format!("{template:?}: a lone }} (write }}}} for a brace)")),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}
