//! Mettler Toledo MT-SICS level 0/1, the balance protocol (9600 8N1, every line ends CR LF).
//!
//! A command is a mnemonic, optionally followed by space-separated parameters. The balance answers with the
//! same mnemonic (the reply "ID"), a one-character status and data, e.g. `S` -> `S S     100.00 g`. Because
//! every reply names itself, replies decode without knowing which command they answer.
//!
//! Weights are kept exactly as the balance printed them (fixed point, see [`Mass`]), so the readability of
//! the balance survives and nothing gets rounded twice on the way to a protocol record.
//!
//! Text fields (`"..."`) are 8-bit: the balances use a Latin-1 ("ANSI/WIN") character set, so bytes map
//! one-to-one to `char`s 0..=255 here rather than being read as UTF-8.

use std::fmt;

use super::{DecodeError, Decoded, Malformed, split_line};

const PROTOCOL: &str = "MT-SICS";

/// Weight values are right-aligned in a 10-character field ("10 characters, right aligned").
const WEIGHT_FIELD: usize = 10;

/// More decimals than this would overflow the fixed-point value; no balance prints that many.
const MAX_DECIMALS: usize = 18;

/// A weighing unit as the balance names it on the wire. Symbols are case-sensitive (`GN` is grain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MassUnit {
    Gram,
    Kilogram,
    Milligram,
    Microgram,
    Carat,
    Pound,
    Ounce,
    TroyOunce,
    Grain,
    Pennyweight,
}

impl MassUnit {
    pub const ALL: [MassUnit; 10] = [
        MassUnit::Gram,
        MassUnit::Kilogram,
        MassUnit::Milligram,
        MassUnit::Microgram,
        MassUnit::Carat,
        MassUnit::Pound,
        MassUnit::Ounce,
        MassUnit::TroyOunce,
        MassUnit::Grain,
        MassUnit::Pennyweight,
    ];

    /// The symbol we send. Micrograms go out as ASCII `ug` so the line stays 7-bit clean.
    pub fn symbol(self) -> &'static str {
        match self {
            MassUnit::Gram => "g",
            MassUnit::Kilogram => "kg",
            MassUnit::Milligram => "mg",
            MassUnit::Microgram => "ug",
            MassUnit::Carat => "ct",
            MassUnit::Pound => "lb",
            MassUnit::Ounce => "oz",
            MassUnit::TroyOunce => "ozt",
            MassUnit::Grain => "GN",
            MassUnit::Pennyweight => "dwt",
        }
    }

    /// Reads a unit symbol. µg arrives as `ug`, as Latin-1 `0xB5 g` (what the balances print) or as UTF-8.
    pub fn from_symbol(symbol: &[u8]) -> Option<MassUnit> {
        Some(match symbol {
            b"g" => MassUnit::Gram,
            b"kg" => MassUnit::Kilogram,
            b"mg" => MassUnit::Milligram,
            b"ug" | [0xB5, b'g'] | [0xC2, 0xB5, b'g'] => MassUnit::Microgram,
            b"ct" => MassUnit::Carat,
            b"lb" => MassUnit::Pound,
            b"oz" => MassUnit::Ounce,
            b"ozt" => MassUnit::TroyOunce,
            b"GN" => MassUnit::Grain,
            b"dwt" => MassUnit::Pennyweight,
            _ => return None,
        })
    }

    /// Grams in one of this unit (international avoirdupois and troy definitions).
    pub fn grams_per_unit(self) -> f64 {
        match self {
            MassUnit::Gram => 1.0,
            MassUnit::Kilogram => 1000.0,
            MassUnit::Milligram => 1e-3,
            MassUnit::Microgram => 1e-6,
            MassUnit::Carat => 0.2,
            MassUnit::Pound => 453.592_37,
            MassUnit::Ounce => 28.349_523_125,
            MassUnit::TroyOunce => 31.103_476_8,
            MassUnit::Grain => 0.064_798_91,
            MassUnit::Pennyweight => 1.555_173_84,
        }
    }
}

/// A weight as the balance printed it: `digits` scaled by `10^-decimals`, so `-12.345 g` is
/// `Mass { digits: -12345, decimals: 3, unit: Gram }`. Fixed point keeps the readability (the number of
/// decimals) and makes encode -> decode exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mass {
    pub digits: i64,
    pub decimals: u8,
    pub unit: MassUnit,
}

impl Mass {
    pub const fn new(digits: i64, decimals: u8, unit: MassUnit) -> Mass {
        Mass {
            digits,
            decimals,
            unit,
        }
    }

    /// The value in `unit`, for arithmetic; lossy for more than ~15 significant digits.
    pub fn value(&self) -> f64 {
        self.digits as f64 / 10f64.powi(i32::from(self.decimals))
    }

    pub fn grams(&self) -> f64 {
        self.value() * self.unit.grams_per_unit()
    }

    /// Parses a weight value and unit strictly: `-?digits(.digits)?`, nothing else (no `+`, exponent,
    /// leading or trailing point), because a misread weight is worse than a rejected one.
    pub fn parse(number: &[u8], unit: &[u8]) -> Result<Mass, Malformed> {
        Self::from_fields(number, unit).map_err(Malformed)
    }

    fn from_fields(number: &[u8], unit: &[u8]) -> Result<Mass, String> {
        let (digits, decimals) = parse_fixed(number)?;
        let unit = MassUnit::from_symbol(unit)
            .ok_or_else(|| format!("unknown weight unit {:?}", latin1(unit)))?;
        Ok(Mass {
            digits,
            decimals,
            unit,
        })
    }

    /// The number as the balance prints it, without padding or unit.
    pub fn number_text(&self) -> String {
        let magnitude = self.digits.unsigned_abs().to_string();
        let decimals = usize::from(self.decimals);
        let mut text = String::new();
        if self.digits < 0 {
            text.push('-');
        }
        if decimals == 0 {
            text.push_str(&magnitude);
        } else {
            let padded = format!("{magnitude:0>width$}", width = decimals + 1);
            let (int, frac) = padded.split_at(padded.len() - decimals);
            text.push_str(int);
            text.push('.');
            text.push_str(frac);
        }
        text
    }
}

impl fmt::Display for Mass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.number_text(), self.unit.symbol())
    }
}

/// Parses `-?digits(.digits)?` into fixed point.
fn parse_fixed(text: &[u8]) -> Result<(i64, u8), String> {
    let bad = || format!("weight value {:?} is not -?digits[.digits]", latin1(text));
    let (negative, body) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let (int, frac) = match body.iter().position(|&b| b == b'.') {
        Some(dot) => (&body[..dot], &body[dot + 1..]),
        None => (body, &[][..]),
    };
    let has_point = int.len() < body.len();
    if int.is_empty() || (has_point && frac.is_empty()) {
        return Err(bad());
    }
    if !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return Err(bad());
    }
    if frac.len() > MAX_DECIMALS {
        return Err(format!(
            "weight value {:?} has too many decimals",
            latin1(text)
        ));
    }
    let limit = i128::from(i64::MAX) + 1;
    let mut magnitude: i128 = 0;
    for &b in int.iter().chain(frac) {
        magnitude = magnitude * 10 + i128::from(b - b'0');
        if magnitude > limit {
            return Err(format!("weight value {:?} is out of range", latin1(text)));
        }
    }
    let signed = if negative { -magnitude } else { magnitude };
    let digits = i64::try_from(signed)
        .map_err(|_| format!("weight value {:?} is out of range", latin1(text)))?;
    // frac.len() <= MAX_DECIMALS (18) fits in u8.
    Ok((digits, frac.len() as u8))
}

/// Host -> balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `@`: reset to the power-on state without zeroing, cancels `SIR`; answered like `I4`.
    Reset,
    /// `I1`: MT-SICS level and level versions.
    QueryLevel,
    /// `I2`: balance data (type, capacity, unit).
    QueryBalanceData,
    /// `I3`: software version.
    QuerySoftwareVersion,
    /// `I4`: serial number.
    QuerySerialNumber,
    /// `S`: the next stable weight.
    StableWeight,
    /// `SI`: the weight now, stable or not.
    ImmediateWeight,
    /// `SIR`: `SI` repeated until the next command.
    RepeatImmediateWeight,
    /// `Z`: zero once stable.
    Zero,
    /// `ZI`: zero now, stable or not.
    ZeroImmediate,
    /// `T`: tare once stable.
    Tare,
    /// `TA`: query the tare weight.
    QueryTare,
    /// `TA <value> <unit>`: preset a tare weight.
    PresetTare { mass: Mass },
    /// `TAC`: clear the tare.
    ClearTare,
}

impl Command {
    /// The mnemonic on the wire.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Command::Reset => "@",
            Command::QueryLevel => "I1",
            Command::QueryBalanceData => "I2",
            Command::QuerySoftwareVersion => "I3",
            Command::QuerySerialNumber => "I4",
            Command::StableWeight => "S",
            Command::ImmediateWeight => "SI",
            Command::RepeatImmediateWeight => "SIR",
            Command::Zero => "Z",
            Command::ZeroImmediate => "ZI",
            Command::Tare => "T",
            Command::QueryTare | Command::PresetTare { .. } => "TA",
            Command::ClearTare => "TAC",
        }
    }
}

/// The reply ID a balance puts in front of a status answer; `S` also answers `SI` and `SIR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyId {
    Level,
    BalanceData,
    SoftwareVersion,
    SerialNumber,
    Weight,
    Zero,
    ZeroImmediate,
    Tare,
    TareValue,
    ClearTare,
}

impl ReplyId {
    pub const ALL: [ReplyId; 10] = [
        ReplyId::Level,
        ReplyId::BalanceData,
        ReplyId::SoftwareVersion,
        ReplyId::SerialNumber,
        ReplyId::Weight,
        ReplyId::Zero,
        ReplyId::ZeroImmediate,
        ReplyId::Tare,
        ReplyId::TareValue,
        ReplyId::ClearTare,
    ];

    pub fn id(self) -> &'static str {
        match self {
            ReplyId::Level => "I1",
            ReplyId::BalanceData => "I2",
            ReplyId::SoftwareVersion => "I3",
            ReplyId::SerialNumber => "I4",
            ReplyId::Weight => "S",
            ReplyId::Zero => "Z",
            ReplyId::ZeroImmediate => "ZI",
            ReplyId::Tare => "T",
            ReplyId::TareValue => "TA",
            ReplyId::ClearTare => "TAC",
        }
    }

    fn from_id(id: &[u8]) -> Option<ReplyId> {
        ReplyId::ALL.into_iter().find(|r| r.id().as_bytes() == id)
    }
}

/// Why a command was understood but not carried out (the status character of the reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `I`: not executable now (busy, or no stable weight before the timeout).
    NotExecutable,
    /// `+`: overload, the weight is above the weighing range.
    Overload,
    /// `-`: underload, the weight is below the weighing range (e.g. pan missing).
    Underload,
    /// `L`: a parameter is wrong (e.g. a negative tare preset).
    InvalidParameter,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::NotExecutable,
        Refusal::Overload,
        Refusal::Underload,
        Refusal::InvalidParameter,
    ];

    pub fn status(self) -> u8 {
        match self {
            Refusal::NotExecutable => b'I',
            Refusal::Overload => b'+',
            Refusal::Underload => b'-',
            Refusal::InvalidParameter => b'L',
        }
    }

    fn from_status(status: &[u8]) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| [r.status()] == status)
    }
}

/// Whether the balance considered the weight settled when it sent it (`S` vs `D` status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stability {
    Stable,
    Dynamic,
}

impl Stability {
    fn status(self) -> &'static str {
        match self {
            Stability::Stable => "S",
            Stability::Dynamic => "D",
        }
    }

    fn from_status(status: &[u8]) -> Option<Stability> {
        match status {
            b"S" => Some(Stability::Stable),
            b"D" => Some(Stability::Dynamic),
            _ => None,
        }
    }
}

/// Balance -> host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `I1 A "<level>" "<version>"...`, e.g. `I1 A "0123" "2.20" "2.20" "1.0" "1.0"`.
    Level {
        level: String,
        versions: Vec<String>,
    },
    /// `I2 A "<type> <capacity> <unit>"`, e.g. `I2 A "XS204 Excellence 220.0090 g"`.
    BalanceData(String),
    /// `I3 A "<software version>"`.
    SoftwareVersion(String),
    /// `I4 A "<serial>"`: also the answer to `@`.
    SerialNumber(String),
    /// `S S <weight>` / `S D <weight>`: answers `S` (always stable), `SI` and `SIR`.
    Weight { stability: Stability, mass: Mass },
    /// `Z A`: zeroed.
    Zeroed,
    /// `ZI S` / `ZI D`: zeroed under stable or dynamic conditions.
    ZeroedImmediately { stability: Stability },
    /// `T S <weight>`: tared; the weight is the tare.
    Tared { mass: Mass },
    /// `TA A <weight>`: the current (or just preset) tare.
    TareValue { mass: Mass },
    /// `TAC A`: tare cleared.
    TareCleared,
    /// `<ID> I`, `<ID> +`, `<ID> -`, `<ID> L`: understood but not carried out.
    Refused { id: ReplyId, reason: Refusal },
    /// `ES`: the command was not recognised.
    SyntaxError,
    /// `ET`: the command arrived corrupted (parity, framing, stray control bytes).
    TransmissionError,
    /// `EL`: the command cannot be executed.
    LogicalError,
}

/// Writes a command line, CR LF included.
pub fn encode_command(cmd: &Command, out: &mut Vec<u8>) {
    out.extend_from_slice(cmd.mnemonic().as_bytes());
    if let Command::PresetTare { mass } = cmd {
        out.push(b' ');
        out.extend_from_slice(mass.to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Device side: decodes the command line at the front of `buf`. A line the balance would refuse is an
/// error; [`error_reply`] gives the reply the balance sends for it.
pub fn decode_command(buf: &[u8]) -> Result<Decoded<Command>, DecodeError> {
    let Some((line, consumed)) = split_line(PROTOCOL, buf, false)? else {
        return Ok(Decoded::Incomplete);
    };
    match parse_command(line) {
        Ok(value) => Ok(Decoded::Frame { value, consumed }),
        Err((reply, reason)) => {
            let mut answer = Vec::new();
            encode_response(&reply, &mut answer);
            let answer = String::from_utf8_lossy(answer.trim_ascii_end()).into_owned();
            Err(DecodeError::new(
                PROTOCOL,
                &buf[..consumed],
                format!("{reason}; the balance answers {answer}"),
            ))
        }
    }
}

/// The balance's answer to a frame [`decode_command`] rejected (pass the `skip` bytes it reported):
/// `ES`, `ET`, or `TA L` for a bad tare preset. `None` if the frame is in fact a valid command.
pub fn error_reply(frame: &[u8]) -> Option<Response> {
    let line = frame.strip_suffix(b"\n").unwrap_or(frame);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    parse_command(line).err().map(|(reply, _)| reply)
}

/// Parses one command line, or says which reply the balance gives instead and why.
fn parse_command(line: &[u8]) -> Result<Command, (Response, String)> {
    if let Some(&b) = line.iter().find(|&&b| b < 0x20 || b == 0x7F) {
        return Err((
            Response::TransmissionError,
            format!("control byte 0x{b:02X} in command"),
        ));
    }
    let line = trim_spaces_end(line);
    let (name, params) = split_word(line);
    let plain = |cmd: Command| {
        if params.is_empty() {
            Ok(cmd)
        } else {
            Err((
                Response::SyntaxError,
                format!("{} takes no parameters", cmd.mnemonic()),
            ))
        }
    };
    match name {
        b"@" => plain(Command::Reset),
        b"I1" => plain(Command::QueryLevel),
        b"I2" => plain(Command::QueryBalanceData),
        b"I3" => plain(Command::QuerySoftwareVersion),
        b"I4" => plain(Command::QuerySerialNumber),
        b"S" => plain(Command::StableWeight),
        b"SI" => plain(Command::ImmediateWeight),
        b"SIR" => plain(Command::RepeatImmediateWeight),
        b"Z" => plain(Command::Zero),
        b"ZI" => plain(Command::ZeroImmediate),
        b"T" => plain(Command::Tare),
        b"TAC" => plain(Command::ClearTare),
        b"TA" if params.is_empty() => Ok(Command::QueryTare),
        b"TA" => parse_tare_preset(params)
            .map(|mass| Command::PresetTare { mass })
            .map_err(|reason| {
                let reply = Response::Refused {
                    id: ReplyId::TareValue,
                    reason: Refusal::InvalidParameter,
                };
                (reply, reason)
            }),
        _ => Err((
            Response::SyntaxError,
            format!(
                "unknown command {:?} (commands are upper case)",
                latin1(name)
            ),
        )),
    }
}

fn parse_tare_preset(params: &[u8]) -> Result<Mass, String> {
    let (number, rest) = split_word(params);
    let (unit, rest) = split_word(rest);
    if unit.is_empty() || !rest.is_empty() {
        return Err("TA preset must be `TA <value> <unit>`".to_string());
    }
    let mass = Mass::from_fields(number, unit)?;
    if mass.digits < 0 {
        return Err("a tare preset cannot be negative".to_string());
    }
    Ok(mass)
}

/// Writes a reply line, CR LF included. Text fields are written as Latin-1; a `"` inside one (which
/// MT-SICS cannot quote) becomes `'`, control characters become spaces and non-Latin-1 characters `?`.
pub fn encode_response(resp: &Response, out: &mut Vec<u8>) {
    match resp {
        Response::Level { level, versions } => {
            out.extend_from_slice(b"I1 A ");
            push_quoted(out, level);
            for version in versions {
                out.push(b' ');
                push_quoted(out, version);
            }
        }
        Response::BalanceData(text) => {
            out.extend_from_slice(b"I2 A ");
            push_quoted(out, text);
        }
        Response::SoftwareVersion(text) => {
            out.extend_from_slice(b"I3 A ");
            push_quoted(out, text);
        }
        Response::SerialNumber(text) => {
            out.extend_from_slice(b"I4 A ");
            push_quoted(out, text);
        }
        Response::Weight { stability, mass } => push_weight(out, "S", stability.status(), mass),
        Response::Zeroed => out.extend_from_slice(b"Z A"),
        Response::ZeroedImmediately { stability } => {
            out.extend_from_slice(b"ZI ");
            out.extend_from_slice(stability.status().as_bytes());
        }
        Response::Tared { mass } => push_weight(out, "T", "S", mass),
        Response::TareValue { mass } => push_weight(out, "TA", "A", mass),
        Response::TareCleared => out.extend_from_slice(b"TAC A"),
        Response::Refused { id, reason } => {
            out.extend_from_slice(id.id().as_bytes());
            out.push(b' ');
            out.push(reason.status());
        }
        Response::SyntaxError => out.extend_from_slice(b"ES"),
        Response::TransmissionError => out.extend_from_slice(b"ET"),
        Response::LogicalError => out.extend_from_slice(b"EL"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Host side: decodes the reply line at the front of `buf`.
pub fn decode_response(buf: &[u8]) -> Result<Decoded<Response>, DecodeError> {
    let Some((line, consumed)) = split_line(PROTOCOL, buf, false)? else {
        return Ok(Decoded::Incomplete);
    };
    match parse_response(line) {
        Ok(value) => Ok(Decoded::Frame { value, consumed }),
        Err(reason) => Err(DecodeError::new(PROTOCOL, &buf[..consumed], reason)),
    }
}

fn parse_response(line: &[u8]) -> Result<Response, String> {
    if let Some(&b) = line.iter().find(|&&b| b < 0x20 || b == 0x7F) {
        return Err(format!("control byte 0x{b:02X} in reply"));
    }
    let line = trim_spaces_end(line);
    let (id, rest) = split_word(line);
    match id {
        b"ES" | b"ET" | b"EL" if !rest.is_empty() => {
            return Err(format!("unexpected data after {}", latin1(id)));
        }
        b"ES" => return Ok(Response::SyntaxError),
        b"ET" => return Ok(Response::TransmissionError),
        b"EL" => return Ok(Response::LogicalError),
        _ => {}
    }
    let reply_id =
        ReplyId::from_id(id).ok_or_else(|| format!("unknown reply ID {:?}", latin1(id)))?;
    let (status, data) = split_word(rest);
    if let Some(reason) = Refusal::from_status(status) {
        if !data.is_empty() {
            return Err(format!("unexpected data after status {:?}", latin1(status)));
        }
        return Ok(Response::Refused {
            id: reply_id,
            reason,
        });
    }
    let no_data = |value: Response| {
        if data.is_empty() {
            Ok(value)
        } else {
            Err(format!(
                "unexpected data after {} {}",
                latin1(id),
                latin1(status)
            ))
        }
    };
    let bad_status = || format!("unexpected status {:?} for {}", latin1(status), latin1(id));
    match (reply_id, status) {
        (ReplyId::Level, b"A") => {
            let mut strings = parse_quoted_list(data)?.into_iter();
            let level = strings.next().ok_or("I1 without a level")?;
            Ok(Response::Level {
                level,
                versions: strings.collect(),
            })
        }
        (ReplyId::BalanceData, b"A") => parse_single_quoted(data).map(Response::BalanceData),
        (ReplyId::SoftwareVersion, b"A") => {
            parse_single_quoted(data).map(Response::SoftwareVersion)
        }
        (ReplyId::SerialNumber, b"A") => parse_single_quoted(data).map(Response::SerialNumber),
        (ReplyId::Weight, _) => {
            let stability = Stability::from_status(status).ok_or_else(bad_status)?;
            Ok(Response::Weight {
                stability,
                mass: parse_weight(data)?,
            })
        }
        (ReplyId::Zero, b"A") => no_data(Response::Zeroed),
        (ReplyId::ZeroImmediate, _) => {
            let stability = Stability::from_status(status).ok_or_else(bad_status)?;
            no_data(Response::ZeroedImmediately { stability })
        }
        (ReplyId::Tare, b"S") => Ok(Response::Tared {
            mass: parse_weight(data)?,
        }),
        (ReplyId::TareValue, b"A") => Ok(Response::TareValue {
            mass: parse_weight(data)?,
        }),
        (ReplyId::ClearTare, b"A") => no_data(Response::TareCleared),
        _ => Err(bad_status()),
    }
}

/// The width of a weight reply's value field, counted from the end of the status to the end of the value
/// (`S S     100.00 g` gives 11: the separator and the 10-character field), and whether the value was
/// padded. `None` for a line that is not a weight reply. MT-SICS has no checksum: a balance that pads
/// prints every weight at the same width, so a driver that saw a padded width once can tell that a line of
/// another width lost or gained bytes on the way (`100.00` read as `10.00`).
pub fn weight_field_width(line: &[u8]) -> Option<(usize, bool)> {
    let line = trim_spaces_end(
        line.strip_suffix(b"\r\n")
            .or(line.strip_suffix(b"\n"))
            .unwrap_or(line),
    );
    let (id, rest) = split_word(line);
    let reply_id = ReplyId::from_id(id)?;
    if !matches!(
        reply_id,
        ReplyId::Weight | ReplyId::Tare | ReplyId::TareValue
    ) {
        return None;
    }
    let status_end = line.len() - rest.len() + rest.iter().position(|&b| b == b' ')?;
    let after_status = &line[status_end..];
    let padding = after_status.iter().take_while(|&&b| b == b' ').count();
    let value_len = after_status[padding..].iter().position(|&b| b == b' ')?;
    Some((padding + value_len, padding > 1))
}

/// `<value> <unit>` after the status; the padding spaces before the value were already skipped.
fn parse_weight(data: &[u8]) -> Result<Mass, String> {
    let (number, rest) = split_word(data);
    let (unit, rest) = split_word(rest);
    if number.is_empty() || unit.is_empty() || !rest.is_empty() {
        return Err(format!("weight {:?} is not `<value> <unit>`", latin1(data)));
    }
    Mass::from_fields(number, unit)
}

fn parse_single_quoted(data: &[u8]) -> Result<String, String> {
    let mut strings = parse_quoted_list(data)?;
    if strings.len() != 1 {
        return Err(format!(
            "expected one quoted string, found {}",
            strings.len()
        ));
    }
    Ok(strings.remove(0))
}

/// `"a" "b" ...`: MT-SICS strings cannot contain `"`, so the next quote always closes.
fn parse_quoted_list(mut data: &[u8]) -> Result<Vec<String>, String> {
    let mut strings = Vec::new();
    while !data.is_empty() {
        let rest = data
            .strip_prefix(b"\"")
            .ok_or_else(|| format!("expected a quoted string at {:?}", latin1(data)))?;
        let end = rest
            .iter()
            .position(|&b| b == b'"')
            .ok_or("unterminated quoted string")?;
        strings.push(latin1(&rest[..end]));
        data = &rest[end + 1..];
        if !data.is_empty() {
            if data[0] != b' ' {
                return Err("expected a space between quoted strings".to_string());
            }
            data = trim_spaces_start(data);
        }
    }
    Ok(strings)
}

fn push_weight(out: &mut Vec<u8>, id: &str, status: &str, mass: &Mass) {
    let number = mass.number_text();
    let line = format!(
        "{id} {status} {number:>WEIGHT_FIELD$} {}",
        mass.unit.symbol()
    );
    out.extend_from_slice(line.as_bytes());
}

fn push_quoted(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for c in text.chars() {
        let byte = match u32::from(c) {
            0x22 => b'\'',
            0..=0x1F | 0x7F => b' ',
            code => u8::try_from(code).unwrap_or(b'?'),
        };
        out.push(byte);
    }
    out.push(b'"');
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// Splits off the first space-delimited word and skips the spaces after it.
fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    let end = s.iter().position(|&b| b == b' ').unwrap_or(s.len());
    (&s[..end], trim_spaces_start(&s[end..]))
}

fn trim_spaces_start(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    &s[start..]
}

fn trim_spaces_end(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn command(bytes: &[u8]) -> Command {
        match decode_command(bytes).unwrap() {
            Decoded::Frame { value, consumed } => {
                assert_eq!(consumed, bytes.len());
                value
            }
            Decoded::Incomplete => panic!("incomplete: {bytes:?}"),
        }
    }

    fn response(bytes: &[u8]) -> Response {
        match decode_response(bytes).unwrap() {
            Decoded::Frame { value, consumed } => {
                assert_eq!(consumed, bytes.len());
                value
            }
            Decoded::Incomplete => panic!("incomplete: {bytes:?}"),
        }
    }

    fn encoded_command(cmd: &Command) -> Vec<u8> {
        let mut out = Vec::new();
        encode_command(cmd, &mut out);
        out
    }

    fn encoded_response(resp: &Response) -> Vec<u8> {
        let mut out = Vec::new();
        encode_response(resp, &mut out);
        out
    }

    const G: MassUnit = MassUnit::Gram;

    #[test]
    fn manual_commands_both_directions() {
        let cases: [(&[u8], Command); 14] = [
            (b"@\r\n", Command::Reset),
            (b"I1\r\n", Command::QueryLevel),
            (b"I2\r\n", Command::QueryBalanceData),
            (b"I3\r\n", Command::QuerySoftwareVersion),
            (b"I4\r\n", Command::QuerySerialNumber),
            (b"S\r\n", Command::StableWeight),
            (b"SI\r\n", Command::ImmediateWeight),
            (b"SIR\r\n", Command::RepeatImmediateWeight),
            (b"Z\r\n", Command::Zero),
            (b"ZI\r\n", Command::ZeroImmediate),
            (b"T\r\n", Command::Tare),
            (b"TA\r\n", Command::QueryTare),
            (
                b"TA 100.00 g\r\n",
                Command::PresetTare {
                    mass: Mass::new(10000, 2, G),
                },
            ),
            (b"TAC\r\n", Command::ClearTare),
        ];
        for (bytes, cmd) in cases {
            assert_eq!(command(bytes), cmd, "{}", String::from_utf8_lossy(bytes));
            assert_eq!(encoded_command(&cmd), bytes);
        }
    }

    #[test]
    fn manual_replies_both_directions() {
        let cases: Vec<(&[u8], Response)> = vec![
            (
                b"I1 A \"0123\" \"2.20\" \"2.20\" \"1.0\" \"1.0\"\r\n",
                Response::Level {
                    level: "0123".into(),
                    versions: vec!["2.20".into(), "2.20".into(), "1.0".into(), "1.0".into()],
                },
            ),
            (
                b"I2 A \"XS204 Excellence 220.0090 g\"\r\n",
                Response::BalanceData("XS204 Excellence 220.0090 g".into()),
            ),
            (
                b"I3 A \"2.10 10.28.0.493.142\"\r\n",
                Response::SoftwareVersion("2.10 10.28.0.493.142".into()),
            ),
            (
                b"I4 A \"B021002593\"\r\n",
                Response::SerialNumber("B021002593".into()),
            ),
            (
                b"S S     100.00 g\r\n",
                Response::Weight {
                    stability: Stability::Stable,
                    mass: Mass::new(10000, 2, G),
                },
            ),
            (
                b"S D    12.3456 g\r\n",
                Response::Weight {
                    stability: Stability::Dynamic,
                    mass: Mass::new(123456, 4, G),
                },
            ),
            (
                b"S S    -0.0012 g\r\n",
                Response::Weight {
                    stability: Stability::Stable,
                    mass: Mass::new(-12, 4, G),
                },
            ),
            (b"Z A\r\n", Response::Zeroed),
            (
                b"ZI S\r\n",
                Response::ZeroedImmediately {
                    stability: Stability::Stable,
                },
            ),
            (
                b"ZI D\r\n",
                Response::ZeroedImmediately {
                    stability: Stability::Dynamic,
                },
            ),
            (
                b"T S     100.00 g\r\n",
                Response::Tared {
                    mass: Mass::new(10000, 2, G),
                },
            ),
            (
                b"TA A       0.00 g\r\n",
                Response::TareValue {
                    mass: Mass::new(0, 2, G),
                },
            ),
            (b"TAC A\r\n", Response::TareCleared),
            (
                b"S I\r\n",
                Response::Refused {
                    id: ReplyId::Weight,
                    reason: Refusal::NotExecutable,
                },
            ),
            (
                b"S +\r\n",
                Response::Refused {
                    id: ReplyId::Weight,
                    reason: Refusal::Overload,
                },
            ),
            (
                b"S -\r\n",
                Response::Refused {
                    id: ReplyId::Weight,
                    reason: Refusal::Underload,
                },
            ),
            (
                b"Z I\r\n",
                Response::Refused {
                    id: ReplyId::Zero,
                    reason: Refusal::NotExecutable,
                },
            ),
            (
                b"Z +\r\n",
                Response::Refused {
                    id: ReplyId::Zero,
                    reason: Refusal::Overload,
                },
            ),
            (
                b"Z -\r\n",
                Response::Refused {
                    id: ReplyId::Zero,
                    reason: Refusal::Underload,
                },
            ),
            (
                b"ZI I\r\n",
                Response::Refused {
                    id: ReplyId::ZeroImmediate,
                    reason: Refusal::NotExecutable,
                },
            ),
            (
                b"T I\r\n",
                Response::Refused {
                    id: ReplyId::Tare,
                    reason: Refusal::NotExecutable,
                },
            ),
            (
                b"T +\r\n",
                Response::Refused {
                    id: ReplyId::Tare,
                    reason: Refusal::Overload,
                },
            ),
            (
                b"T -\r\n",
                Response::Refused {
                    id: ReplyId::Tare,
                    reason: Refusal::Underload,
                },
            ),
            (
                b"TA L\r\n",
                Response::Refused {
                    id: ReplyId::TareValue,
                    reason: Refusal::InvalidParameter,
                },
            ),
            (
                b"TAC I\r\n",
                Response::Refused {
                    id: ReplyId::ClearTare,
                    reason: Refusal::NotExecutable,
                },
            ),
            (
                b"I4 I\r\n",
                Response::Refused {
                    id: ReplyId::SerialNumber,
                    reason: Refusal::NotExecutable,
                },
            ),
            (b"ES\r\n", Response::SyntaxError),
            (b"ET\r\n", Response::TransmissionError),
            (b"EL\r\n", Response::LogicalError),
        ];
        for (bytes, resp) in cases {
            assert_eq!(response(bytes), resp, "{}", String::from_utf8_lossy(bytes));
            assert_eq!(encoded_response(&resp), bytes, "{resp:?}");
        }
    }

    #[test]
    fn weight_field_is_right_aligned_in_ten_characters() {
        let resp = Response::Weight {
            stability: Stability::Stable,
            mass: Mass::new(10000, 2, G),
        };
        let line = encoded_response(&resp);
        // "S S " then the 10-character field, then " g".
        assert_eq!(&line[4..14], b"    100.00");
        assert_eq!(&line[14..], b" g\r\n");
    }

    #[test]
    fn weight_field_width_counts_padding_and_value() {
        assert_eq!(
            weight_field_width(b"S S     100.00 g\r\n"),
            Some((11, true))
        );
        assert_eq!(
            weight_field_width(b"S D    12.3456 g\r\n"),
            Some((11, true))
        );
        assert_eq!(weight_field_width(b"TA A     100.00 g"), Some((11, true)));
        assert_eq!(
            weight_field_width(b"T S     100.00 g  \r\n"),
            Some((11, true))
        );
        // A dropped digit or space shows as a narrower field.
        assert_eq!(weight_field_width(b"S S     10.00 g\r\n"), Some((10, true)));
        assert_eq!(weight_field_width(b"S S    100.00 g\r\n"), Some((10, true)));
        // A balance that does not pad: no fixed width to hold it to.
        assert_eq!(weight_field_width(b"S S 100.00 g\n"), Some((7, false)));
        assert_eq!(weight_field_width(b"I4 A \"B021002593\"\r\n"), None);
        assert_eq!(weight_field_width(b"S I\r\n"), None);
        assert_eq!(weight_field_width(b""), None);
    }

    #[test]
    fn decoder_tolerates_other_padding_and_trailing_spaces() {
        // The brief's manual quote pads one more space; some balances pad the unit field.
        let expected = Response::Weight {
            stability: Stability::Stable,
            mass: Mass::new(10000, 2, G),
        };
        assert_eq!(response(b"S S      100.00 g\r\n"), expected);
        assert_eq!(response(b"S S     100.00 g  \r\n"), expected);
        assert_eq!(response(b"S S 100.00 g\n"), expected);
    }

    #[test]
    fn units_other_than_grams() {
        let latin1_micro = response(b"S S      12.34 \xB5g\r\n");
        assert_eq!(
            latin1_micro,
            Response::Weight {
                stability: Stability::Stable,
                mass: Mass::new(1234, 2, MassUnit::Microgram)
            }
        );
        let kg = response(b"S S    1.23456 kg\r\n");
        let Response::Weight { mass, .. } = kg else {
            panic!("{kg:?}")
        };
        assert_eq!(mass.unit, MassUnit::Kilogram);
        assert!((mass.grams() - 1234.56).abs() < 1e-9);
        assert!((Mass::new(5, 0, MassUnit::Carat).grams() - 1.0).abs() < 1e-12);
        for unit in MassUnit::ALL {
            assert_eq!(MassUnit::from_symbol(unit.symbol().as_bytes()), Some(unit));
        }
        assert_eq!(
            MassUnit::from_symbol(b"G"),
            None,
            "unit symbols are case-sensitive"
        );
    }

    #[test]
    fn weight_numbers_are_parsed_strictly() {
        for bad in [
            &b"S S    +100.00 g\r\n"[..],
            b"S S     100. g\r\n",
            b"S S     .5 g\r\n",
            b"S S     1e2 g\r\n",
            b"S S     1,5 g\r\n",
            b"S S     --1 g\r\n",
            b"S S     12 3 g\r\n",
            b"S S     100.00\r\n",
            b"S S     100.00 g extra\r\n",
            b"S S     100.00 parsec\r\n",
            b"S S  99999999999999999999 g\r\n",
            b"S S     100.00 G\r\n",
        ] {
            let err = decode_response(bad).unwrap_err();
            assert_eq!(err.skip, bad.len(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            Mass::parse(b"-9223372036854775808", b"g"),
            Ok(Mass::new(i64::MIN, 0, G))
        );
        assert!(Mass::parse(b"9223372036854775808", b"g").is_err());
    }

    #[test]
    fn malformed_replies_are_rejected() {
        for bad in [
            &b"S X     100.00 g\r\n"[..],
            b"Z S\r\n",
            b"Z A extra\r\n",
            b"ES now\r\n",
            b"I4 A B021002593\r\n",
            b"I4 A \"B0210\r\n",
            b"I4 A \"a\" \"b\"\r\n",
            b"I1 A\r\n",
            b"X A\r\n",
            b"S I 1\r\n",
            b"\r\n",
            b"S S \x00 100.00 g\r\n",
        ] {
            let err = decode_response(bad).unwrap_err();
            assert_eq!(err.skip, bad.len(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn balance_rejects_what_it_does_not_understand() {
        let cases: [(&[u8], Response); 9] = [
            (b"s\r\n", Response::SyntaxError),
            (b"XYZ\r\n", Response::SyntaxError),
            (b"\r\n", Response::SyntaxError),
            (b"S 5\r\n", Response::SyntaxError),
            (b" S\r\n", Response::SyntaxError),
            (b"S\x07\r\n", Response::TransmissionError),
            (
                b"TA -5.00 g\r\n",
                Response::Refused {
                    id: ReplyId::TareValue,
                    reason: Refusal::InvalidParameter,
                },
            ),
            (
                b"TA 5.00 parsec\r\n",
                Response::Refused {
                    id: ReplyId::TareValue,
                    reason: Refusal::InvalidParameter,
                },
            ),
            (
                b"TA abc\r\n",
                Response::Refused {
                    id: ReplyId::TareValue,
                    reason: Refusal::InvalidParameter,
                },
            ),
        ];
        for (bytes, reply) in cases {
            let err = decode_command(bytes).unwrap_err();
            assert_eq!(err.skip, bytes.len());
            assert_eq!(error_reply(&bytes[..err.skip]), Some(reply.clone()));
            let mut answer = encoded_response(&reply);
            answer.truncate(answer.len() - 2);
            assert!(
                err.reason.contains(&*String::from_utf8_lossy(&answer)),
                "{}",
                err.reason
            );
        }
        assert_eq!(error_reply(b"SI\r\n"), None);
        // Trailing spaces are harmless.
        assert_eq!(command(b"SI  \r\n"), Command::ImmediateWeight);
    }

    #[test]
    fn partial_frames_are_incomplete() {
        assert_eq!(decode_command(b"SI").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_command(b"SI\r").unwrap(), Decoded::Incomplete);
        assert_eq!(
            decode_response(b"S S     100.0").unwrap(),
            Decoded::Incomplete
        );
        assert_eq!(decode_response(b"").unwrap(), Decoded::Incomplete);
    }

    #[test]
    fn garbage_then_a_valid_frame() {
        let buf = b"S S  garbage g\r\nS S     100.00 g\r\n";
        let err = decode_response(buf).unwrap_err();
        assert_eq!(err.skip, 16);
        assert_eq!(
            response(&buf[err.skip..]),
            Response::Weight {
                stability: Stability::Stable,
                mass: Mass::new(10000, 2, G)
            }
        );

        let buf = b"\xFF\xFE\r\nZI\r\n";
        let err = decode_command(buf).unwrap_err();
        assert_eq!(err.skip, 4);
        assert_eq!(command(&buf[err.skip..]), Command::ZeroImmediate);
    }

    #[test]
    fn text_fields_cannot_break_framing() {
        let resp = Response::BalanceData("say \"hi\"\r\nµ€".into());
        let bytes = encoded_response(&resp);
        assert_eq!(bytes, b"I2 A \"say 'hi'  \xB5?\"\r\n");
        assert_eq!(
            response(&bytes),
            Response::BalanceData("say 'hi'  µ?".into())
        );
    }

    fn mass_strategy() -> impl Strategy<Value = Mass> {
        (
            -999_999_999_999i64..=999_999_999_999,
            0u8..=9,
            proptest::sample::select(MassUnit::ALL.to_vec()),
        )
            .prop_map(|(digits, decimals, unit)| Mass {
                digits,
                decimals,
                unit,
            })
    }

    fn command_strategy() -> impl Strategy<Value = Command> {
        prop_oneof![
            proptest::sample::select(vec![
                Command::Reset,
                Command::QueryLevel,
                Command::QueryBalanceData,
                Command::QuerySoftwareVersion,
                Command::QuerySerialNumber,
                Command::StableWeight,
                Command::ImmediateWeight,
                Command::RepeatImmediateWeight,
                Command::Zero,
                Command::ZeroImmediate,
                Command::Tare,
                Command::QueryTare,
                Command::ClearTare,
            ]),
            mass_strategy().prop_map(|mass| Command::PresetTare {
                mass: Mass {
                    digits: mass.digits.abs(),
                    ..mass
                }
            }),
        ]
    }

    /// Latin-1 text without `"` or control characters: what a balance can send.
    fn text_strategy() -> impl Strategy<Value = String> {
        "[ -!#-~\u{a0}-\u{ff}]{0,30}"
    }

    fn stability_strategy() -> impl Strategy<Value = Stability> {
        prop_oneof![Just(Stability::Stable), Just(Stability::Dynamic)]
    }

    fn response_strategy() -> impl Strategy<Value = Response> {
        prop_oneof![
            (
                text_strategy(),
                proptest::collection::vec(text_strategy(), 0..5)
            )
                .prop_map(|(level, versions)| Response::Level { level, versions }),
            text_strategy().prop_map(Response::BalanceData),
            text_strategy().prop_map(Response::SoftwareVersion),
            text_strategy().prop_map(Response::SerialNumber),
            (stability_strategy(), mass_strategy())
                .prop_map(|(stability, mass)| Response::Weight { stability, mass }),
            Just(Response::Zeroed),
            stability_strategy().prop_map(|stability| Response::ZeroedImmediately { stability }),
            mass_strategy().prop_map(|mass| Response::Tared { mass }),
            mass_strategy().prop_map(|mass| Response::TareValue { mass }),
            Just(Response::TareCleared),
            (
                proptest::sample::select(ReplyId::ALL.to_vec()),
                proptest::sample::select(Refusal::ALL.to_vec())
            )
                .prop_map(|(id, reason)| Response::Refused { id, reason }),
            Just(Response::SyntaxError),
            Just(Response::TransmissionError),
            Just(Response::LogicalError),
        ]
    }

    use crate::drain;

    proptest! {
        #[test]
        fn command_round_trip(cmd in command_strategy()) {
            let bytes = encoded_command(&cmd);
            prop_assert_eq!(decode_command(&bytes).unwrap(), Decoded::Frame { value: cmd, consumed: bytes.len() });
        }

        #[test]
        fn response_round_trip(resp in response_strategy()) {
            let bytes = encoded_response(&resp);
            prop_assert_eq!(decode_response(&bytes).unwrap(), Decoded::Frame { value: resp, consumed: bytes.len() });
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_make_progress(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            drain(&bytes, decode_command);
            drain(&bytes, decode_response);
        }

        #[test]
        fn line_noise_around_valid_replies(
            noise in proptest::collection::vec(prop_oneof![Just(b'S'), Just(b' '), Just(b'\r'), Just(b'\n'), any::<u8>()], 0..40),
            resp in response_strategy(),
        ) {
            let mut buf = noise.clone();
            buf.push(b'\n');
            let valid = encoded_response(&resp);
            buf.extend_from_slice(&valid);
            let mut rest = &buf[..];
            // Whatever the noise does, the valid reply comes out intact at the end.
            let mut last = None;
            loop {
                match decode_response(rest) {
                    Ok(Decoded::Frame { value, consumed }) => { last = Some(value); rest = &rest[consumed..]; }
                    Ok(Decoded::Incomplete) => break,
                    Err(err) => { last = None; rest = &rest[err.skip..]; }
                }
            }
            prop_assert_eq!(last, Some(resp));
        }
    }
}
