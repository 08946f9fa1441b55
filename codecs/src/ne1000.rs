//! New Era NE-1000 family syringe pumps, RS-232 basic mode (19200 8N1), both ends of the line.
//!
//! The pump driver encodes [`Command`]s and decodes [`Response`]s; the pump simulator does the reverse with
//! the same definitions, so the two cannot drift apart.
//!
//! Framing (user manual, "RS-232 Protocol: Basic Mode"): a command is `[address]<command>[<parameter>]\r`,
//! where the address (0-99, or `*` for a system command) lets several pumps share one line. The pump strips
//! spaces and control characters and upper-cases the rest before parsing. Each addressed pump replies with
//! `STX`, its two-digit address, a status prompt (or `A?` and an alarm type), optional data, `ETX`.
//!
//! Numbers are the manual's `<float>`: at most 4 digits and one decimal point, at most 3 decimals. They are
//! held as [`PumpFloat`], a fixed-point value that can only hold what the pump can, so a value is never
//! silently rounded on the wire.
//!
//! The device side ([`check_command`]) refuses what the pump refuses, with its error reply (`?`, `?NA`,
//! `?OOR`, `?COM`). Limits that depend on pump state (the rate range follows the syringe diameter, most set
//! commands are `?NA` while pumping, `?IGN`) are left to the simulator, which owns that state.

use std::fmt;

use super::{DecodeError, Decoded, MAX_LINE};

/// Protocol name in [`DecodeError::protocol`].
pub const PROTOCOL: &str = "ne1000";
/// Start of a reply.
pub const STX: u8 = 0x02;
/// End of a reply.
pub const ETX: u8 = 0x03;
/// End of a command.
pub const CR: u8 = b'\r';

/// Smallest and largest syringe inside diameter the NE-1000 accepts, in thousandths of a millimetre.
const DIAMETER_RANGE_THOUSANDTHS: std::ops::RangeInclusive<u32> = 100..=50_000;

// ---------------------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------------------

/// A pump network address, 0 to 99.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Address(u8);

impl Address {
    /// `None` above 99.
    pub const fn new(address: u8) -> Option<Address> {
        if address <= 99 {
            Some(Address(address))
        } else {
            None
        }
    }

    pub const fn get(self) -> u8 {
        self.0
    }
}

/// A pumping program phase, 1 to 41.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Phase(u8);

impl Phase {
    /// `None` outside 1-41.
    pub const fn new(phase: u8) -> Option<Phase> {
        if phase >= 1 && phase <= 41 {
            Some(Phase(phase))
        } else {
            None
        }
    }

    pub const fn get(self) -> u8 {
        self.0
    }
}

/// The manual's `<float>`: non-negative, at most 4 significant digits and 3 decimals (0.001 to 9999).
/// Stored in thousandths so equality is exact and every value has exactly one wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PumpFloat {
    thousandths: u32,
}

/// Why text is not a `<float>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloatError {
    /// Not made of digits and decimal points at all: the pump does not recognise the command.
    Syntax,
    /// Digits and points, but too many of them: the pump says out of range.
    Range,
}

impl PumpFloat {
    pub const ZERO: PumpFloat = PumpFloat { thousandths: 0 };
    pub const MAX: PumpFloat = PumpFloat {
        thousandths: 9_999_000,
    };

    /// Decimals of the wire form, or `None` when the value needs more than 4 digits.
    const fn decimals(thousandths: u32) -> Option<u32> {
        if thousandths <= 9_999 {
            Some(3)
        } else if thousandths <= 99_990 && thousandths.is_multiple_of(10) {
            Some(2)
        } else if thousandths <= 999_900 && thousandths.is_multiple_of(100) {
            Some(1)
        } else if thousandths <= 9_999_000 && thousandths.is_multiple_of(1000) {
            Some(0)
        } else {
            None
        }
    }

    /// Exactly `thousandths / 1000`, or `None` if the pump cannot represent it (e.g. 12.345).
    pub const fn from_thousandths(thousandths: u32) -> Option<PumpFloat> {
        match PumpFloat::decimals(thousandths) {
            Some(_) => Some(PumpFloat { thousandths }),
            None => None,
        }
    }

    /// The nearest value the pump can represent (26.594 becomes 26.59, as the pump would keep 4 digits),
    /// or `None` for negative, non-finite or too large values.
    pub fn from_f64(value: f64) -> Option<PumpFloat> {
        if !value.is_finite() || value < 0.0 {
            return None;
        }
        for step in [1u32, 10, 100, 1000] {
            let mantissa = (value * 1000.0 / f64::from(step)).round();
            if mantissa <= 9_999.0 {
                // In range by the check above, so the cast cannot truncate.
                return PumpFloat::from_thousandths(mantissa as u32 * step);
            }
        }
        None
    }

    pub const fn thousandths(self) -> u32 {
        self.thousandths
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.thousandths) / 1000.0
    }

    fn parse(text: &[u8]) -> Result<PumpFloat, FloatError> {
        if text.is_empty() || !text.iter().all(|&b| b.is_ascii_digit() || b == b'.') {
            return Err(FloatError::Syntax);
        }
        let (int, frac) = match text.iter().position(|&b| b == b'.') {
            Some(point) => (
                text.get(..point).unwrap_or_default(),
                text.get(point + 1..).unwrap_or_default(),
            ),
            None => (text, &[][..]),
        };
        if frac.contains(&b'.')
            || int.len() + frac.len() > 4
            || int.len() + frac.len() == 0
            || frac.len() > 3
        {
            return Err(FloatError::Range);
        }
        let digits = |part: &[u8]| {
            part.iter()
                .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'))
        };
        let frac_thousandths = digits(frac) * 10u32.pow(3 - frac.len() as u32);
        PumpFloat::from_thousandths(digits(int) * 1000 + frac_thousandths).ok_or(FloatError::Range)
    }
}

/// The pump's own format: as many decimals as 4 digits allow (`0.500`, `26.59`, `100.0`, `1234`).
impl fmt::Display for PumpFloat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decimals = PumpFloat::decimals(self.thousandths).unwrap_or(0);
        let mantissa = self.thousandths / 10u32.pow(3 - decimals);
        if decimals == 0 {
            write!(f, "{mantissa}")
        } else {
            let scale = 10u32.pow(decimals);
            write!(
                f,
                "{}.{:0width$}",
                mantissa / scale,
                mantissa % scale,
                width = decimals as usize
            )
        }
    }
}

/// Pumping rate units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateUnits {
    /// `UM`: µL/min.
    MicrolitresPerMinute,
    /// `MM`: mL/min.
    MillilitresPerMinute,
    /// `UH`: µL/h.
    MicrolitresPerHour,
    /// `MH`: mL/h.
    MillilitresPerHour,
}

impl RateUnits {
    pub const fn code(self) -> &'static str {
        match self {
            RateUnits::MicrolitresPerMinute => "UM",
            RateUnits::MillilitresPerMinute => "MM",
            RateUnits::MicrolitresPerHour => "UH",
            RateUnits::MillilitresPerHour => "MH",
        }
    }

    fn from_code(code: &[u8]) -> Option<RateUnits> {
        match code {
            b"UM" => Some(RateUnits::MicrolitresPerMinute),
            b"MM" => Some(RateUnits::MillilitresPerMinute),
            b"UH" => Some(RateUnits::MicrolitresPerHour),
            b"MH" => Some(RateUnits::MillilitresPerHour),
            _ => None,
        }
    }
}

/// Volume units. The pump picks µL for syringes up to 14.00 mm inside diameter and mL above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumeUnits {
    /// `UL`: µL.
    Microlitres,
    /// `ML`: mL.
    Millilitres,
}

impl VolumeUnits {
    pub const fn code(self) -> &'static str {
        match self {
            VolumeUnits::Microlitres => "UL",
            VolumeUnits::Millilitres => "ML",
        }
    }

    fn from_code(code: &[u8]) -> Option<VolumeUnits> {
        match code {
            b"UL" => Some(VolumeUnits::Microlitres),
            b"ML" => Some(VolumeUnits::Millilitres),
            _ => None,
        }
    }
}

/// A pumping direction as the pump reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `INF`.
    Infuse,
    /// `WDR`.
    Withdraw,
}

impl Direction {
    pub const fn code(self) -> &'static str {
        match self {
            Direction::Infuse => "INF",
            Direction::Withdraw => "WDR",
        }
    }

    fn from_code(code: &[u8]) -> Option<Direction> {
        match code {
            b"INF" => Some(Direction::Infuse),
            b"WDR" => Some(Direction::Withdraw),
            _ => None,
        }
    }
}

/// What `DIR` may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DirectionSetting {
    Infuse,
    Withdraw,
    /// `REV`: infuse becomes withdraw and back.
    Reverse,
}

impl DirectionSetting {
    pub const fn code(self) -> &'static str {
        match self {
            DirectionSetting::Infuse => "INF",
            DirectionSetting::Withdraw => "WDR",
            DirectionSetting::Reverse => "REV",
        }
    }
}

/// Baud rates `ADR ... B <baud>` may select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BaudRate {
    B19200,
    B9600,
    B2400,
    B1200,
    B300,
}

impl BaudRate {
    pub const fn bits_per_second(self) -> u32 {
        match self {
            BaudRate::B19200 => 19200,
            BaudRate::B9600 => 9600,
            BaudRate::B2400 => 2400,
            BaudRate::B1200 => 1200,
            BaudRate::B300 => 300,
        }
    }

    fn from_bits_per_second(bps: u32) -> Option<BaudRate> {
        [
            BaudRate::B19200,
            BaudRate::B9600,
            BaudRate::B2400,
            BaudRate::B1200,
            BaudRate::B300,
        ]
        .into_iter()
        .find(|b| b.bits_per_second() == bps)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Commands (host -> pump)
// ---------------------------------------------------------------------------------------------------------

/// Which pumps a command is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// No address prefix. On a shared line always address the pump instead.
    Unaddressed,
    /// `<address>`: only the pump with this address acts and replies.
    Pump(Address),
    /// `*`: a system command every pump accepts whatever its address (e.g. `*ADR`).
    System,
}

/// What a command asks. Without a parameter most commands are queries; with one they set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Empty command: the pump replies with its status only.
    Status,
    /// `DIA`: syringe inside diameter.
    QueryDiameter,
    /// `DIA <float>`: 0.1 to 50 mm.
    SetDiameter { diameter_mm: PumpFloat },
    /// `RAT`.
    QueryRate,
    /// `RAT <float> [<units>]`; without units the pump keeps its current ones. The allowed range follows
    /// the syringe diameter, so only the simulator can answer `?OOR` for a value in the right format.
    SetRate {
        rate: PumpFloat,
        units: Option<RateUnits>,
    },
    /// `VOL`: volume to be dispensed.
    QueryVolume,
    /// `VOL <float>` in the current volume units; 0 pumps continuously.
    SetVolume { volume: PumpFloat },
    /// `VOL UL|ML`.
    SetVolumeUnits(VolumeUnits),
    /// `DIR`.
    QueryDirection,
    /// `DIR INF|WDR|REV`.
    SetDirection(DirectionSetting),
    /// `RUN [<phase>]`: start the pumping program, optionally at a phase.
    Run { phase: Option<Phase> },
    /// `STP`: pause when running, stop when paused.
    Stop,
    /// `DIS`: volume dispensed in each direction.
    QueryDispensed,
    /// `CLD INF|WDR`: clear one dispensed volume.
    ClearDispensed(Direction),
    /// `VER`: firmware version.
    QueryVersion,
    /// `ADR`: network address (usually sent as the system command `*ADR`).
    QueryAddress,
    /// `ADR <address> [B <baud>]`: the reply already uses the new baud rate.
    SetAddress {
        address: Address,
        baud: Option<BaudRate>,
    },
}

/// One command: where it goes and what it asks. A struct rather than an enum because every request
/// carries an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub target: Target,
    pub request: Request,
}

impl Command {
    /// A request for the pump at `address`.
    pub const fn to(address: Address, request: Request) -> Command {
        Command {
            target: Target::Pump(address),
            request,
        }
    }
}

/// Writes one command in the compact form the pump parses (it drops spaces anyway).
pub fn encode_command(cmd: &Command, out: &mut Vec<u8>) {
    let mut text = match cmd.target {
        Target::Unaddressed => String::new(),
        Target::Pump(address) => address.get().to_string(),
        Target::System => "*".to_owned(),
    };
    let body = match &cmd.request {
        Request::Status => String::new(),
        Request::QueryDiameter => "DIA".to_owned(),
        Request::SetDiameter { diameter_mm } => format!("DIA{diameter_mm}"),
        Request::QueryRate => "RAT".to_owned(),
        Request::SetRate { rate, units } => format!(
            "RAT{rate}{}",
            units.map(RateUnits::code).unwrap_or_default()
        ),
        Request::QueryVolume => "VOL".to_owned(),
        Request::SetVolume { volume } => format!("VOL{volume}"),
        Request::SetVolumeUnits(units) => format!("VOL{}", units.code()),
        Request::QueryDirection => "DIR".to_owned(),
        Request::SetDirection(dir) => format!("DIR{}", dir.code()),
        Request::Run { phase: None } => "RUN".to_owned(),
        Request::Run { phase: Some(phase) } => format!("RUN{}", phase.get()),
        Request::Stop => "STP".to_owned(),
        Request::QueryDispensed => "DIS".to_owned(),
        Request::ClearDispensed(dir) => format!("CLD{}", dir.code()),
        Request::QueryVersion => "VER".to_owned(),
        Request::QueryAddress => "ADR".to_owned(),
        Request::SetAddress {
            address,
            baud: None,
        } => format!("ADR{}", address.get()),
        Request::SetAddress {
            address,
            baud: Some(baud),
        } => {
            format!("ADR{}B{}", address.get(), baud.bits_per_second())
        }
    };
    text.push_str(&body);
    out.extend_from_slice(text.as_bytes());
    out.push(CR);
}

/// A command the pump refuses, with what it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Whom the command addressed: only that pump replies.
    pub target: Target,
    /// The error the pump puts in its reply.
    pub reply: CommandError,
    /// The frame and the reason, for logs; `skip` drops exactly the refused frame.
    pub error: DecodeError,
}

impl Rejection {
    /// The reply packet of the pump at `address` in state `status`.
    pub fn response(&self, address: Address, status: Status) -> Response {
        Response {
            address,
            status,
            data: Data::Error(self.reply),
        }
    }
}

/// Device side: decodes the command at the front of `buf`. A command the pump refuses becomes a
/// [`DecodeError`]; use [`check_command`] to also get the pump's error reply.
pub fn decode_command(buf: &[u8]) -> Result<Decoded<Command>, DecodeError> {
    check_command(buf).map_err(|rejection| rejection.error)
}

/// Device side, with the pump's verdict: like [`decode_command`], but a refused command comes as a
/// [`Rejection`] carrying the error the pump replies with.
pub fn check_command(buf: &[u8]) -> Result<Decoded<Command>, Rejection> {
    let Some(end) = buf.iter().position(|&b| b == CR) else {
        if buf.len() > MAX_LINE {
            return Err(Rejection {
                target: Target::Unaddressed,
                reply: CommandError::InvalidPacket,
                error: DecodeError::new(
                    PROTOCOL,
                    buf,
                    format!("no carriage return within {MAX_LINE} bytes"),
                ),
            });
        }
        return Ok(Decoded::Incomplete);
    };
    let consumed = end + 1;
    let frame = buf.get(..consumed).unwrap_or(buf);
    let raw = buf.get(..end).unwrap_or_default();
    // The pump strips spaces and control characters and upper-cases the rest.
    let text: Vec<u8> = raw
        .iter()
        .filter(|&&b| b.is_ascii_graphic() || b > 0x7F)
        .map(u8::to_ascii_uppercase)
        .collect();
    let (target, body) = split_target(&text);
    let refused = |reply: CommandError, reason: String| Rejection {
        target,
        reply,
        error: DecodeError::new(
            PROTOCOL,
            frame,
            format!("?{} ({reply}): {reason}", reply.code()),
        ),
    };
    if body.iter().any(|&b| b > 0x7F) {
        return Err(refused(
            CommandError::InvalidPacket,
            "non-ASCII byte in the command".into(),
        ));
    }
    match parse_request(body) {
        Ok(request) => Ok(Decoded::Frame {
            value: Command { target, request },
            consumed,
        }),
        Err((reply, reason)) => Err(refused(reply, reason)),
    }
}

/// Splits the optional `*` or one- or two-digit address off a cleaned command.
fn split_target(text: &[u8]) -> (Target, &[u8]) {
    if let Some(rest) = text.strip_prefix(b"*") {
        return (Target::System, rest);
    }
    let digits = text
        .iter()
        .take(2)
        .take_while(|b| b.is_ascii_digit())
        .count();
    let (address, rest) = text.split_at_checked(digits).unwrap_or((&[], text));
    match number(address)
        .and_then(|n| u8::try_from(n).ok())
        .and_then(Address::new)
    {
        Some(address) => (Target::Pump(address), rest),
        None => (Target::Unaddressed, text),
    }
}

/// A non-empty run of ASCII digits as a number (saturating, for range errors).
fn number(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u32, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u32::from(d - b'0'))
    }))
}

type Refusal = (CommandError, String);

fn not_recognized(what: &[u8]) -> Refusal {
    (
        CommandError::NotRecognized,
        format!(
            "{:?} is not a command the pump knows",
            String::from_utf8_lossy(what)
        ),
    )
}

fn float_param(text: &[u8], what: &str) -> Result<PumpFloat, Refusal> {
    PumpFloat::parse(text).map_err(|e| match e {
        FloatError::Syntax => (
            CommandError::NotRecognized,
            format!("{what} {:?} is not a number", lossy(text)),
        ),
        FloatError::Range => (
            CommandError::OutOfRange,
            format!(
                "{what} {:?} has more than 4 digits or 3 decimals",
                lossy(text)
            ),
        ),
    })
}

/// Leading digits and points, and the rest (`1.5MM` -> `1.5`, `MM`).
fn split_number(text: &[u8]) -> (&[u8], &[u8]) {
    let n = text
        .iter()
        .take_while(|&&b| b.is_ascii_digit() || b == b'.')
        .count();
    text.split_at_checked(n).unwrap_or((text, &[]))
}

fn parse_request(body: &[u8]) -> Result<Request, Refusal> {
    if body.is_empty() {
        return Ok(Request::Status);
    }
    let Some((mnemonic, param)) = body.split_at_checked(3) else {
        return Err(not_recognized(body));
    };
    let no_param = |query: Request| {
        if param.is_empty() {
            Ok(query)
        } else {
            Err((
                CommandError::NotApplicable,
                format!("{} takes no parameter", lossy(mnemonic)),
            ))
        }
    };
    match mnemonic {
        b"DIA" if param.is_empty() => Ok(Request::QueryDiameter),
        b"DIA" => {
            let diameter_mm = float_param(param, "diameter")?;
            if !DIAMETER_RANGE_THOUSANDTHS.contains(&diameter_mm.thousandths()) {
                return Err((
                    CommandError::OutOfRange,
                    format!("diameter {diameter_mm} mm is outside 0.1-50 mm"),
                ));
            }
            Ok(Request::SetDiameter { diameter_mm })
        }
        b"RAT" if param.is_empty() => Ok(Request::QueryRate),
        b"RAT" => {
            let (value, units) = split_number(param);
            if value.is_empty() {
                return Err(not_recognized(body));
            }
            let units = match units {
                [] => None,
                code => Some(RateUnits::from_code(code).ok_or_else(|| not_recognized(body))?),
            };
            Ok(Request::SetRate {
                rate: float_param(value, "rate")?,
                units,
            })
        }
        b"VOL" if param.is_empty() => Ok(Request::QueryVolume),
        b"VOL" => match VolumeUnits::from_code(param) {
            Some(units) => Ok(Request::SetVolumeUnits(units)),
            None => Ok(Request::SetVolume {
                volume: float_param(param, "volume")?,
            }),
        },
        b"DIR" => match param {
            [] => Ok(Request::QueryDirection),
            b"INF" => Ok(Request::SetDirection(DirectionSetting::Infuse)),
            b"WDR" => Ok(Request::SetDirection(DirectionSetting::Withdraw)),
            b"REV" => Ok(Request::SetDirection(DirectionSetting::Reverse)),
            _ => Err(not_recognized(body)),
        },
        b"RUN" if param.is_empty() => Ok(Request::Run { phase: None }),
        b"RUN" => {
            let n = number(param).ok_or_else(|| not_recognized(body))?;
            let phase = u8::try_from(n).ok().and_then(Phase::new);
            let phase = phase.ok_or((
                CommandError::OutOfRange,
                format!("phase {n} is outside 1-41"),
            ))?;
            Ok(Request::Run { phase: Some(phase) })
        }
        b"STP" => no_param(Request::Stop),
        b"DIS" => no_param(Request::QueryDispensed),
        b"VER" => no_param(Request::QueryVersion),
        b"CLD" => match Direction::from_code(param) {
            Some(dir) => Ok(Request::ClearDispensed(dir)),
            None if param.is_empty() => {
                Err((CommandError::NotApplicable, "CLD has no query".into()))
            }
            None => Err(not_recognized(body)),
        },
        b"ADR" if param.is_empty() => Ok(Request::QueryAddress),
        b"ADR" => {
            let digits = param.iter().take_while(|b| b.is_ascii_digit()).count();
            let (address, rest) = param.split_at_checked(digits).unwrap_or((param, &[]));
            let address = number(address).ok_or_else(|| not_recognized(body))?;
            let address = u8::try_from(address).ok().and_then(Address::new).ok_or((
                CommandError::OutOfRange,
                format!("address {address} is outside 0-99"),
            ))?;
            let baud = match rest {
                [] => None,
                [b'B', bps @ ..] => {
                    let bps = number(bps).ok_or_else(|| not_recognized(body))?;
                    let baud = BaudRate::from_bits_per_second(bps).ok_or((
                        CommandError::OutOfRange,
                        format!("{bps} baud is not offered"),
                    ))?;
                    Some(baud)
                }
                _ => return Err(not_recognized(body)),
            };
            Ok(Request::SetAddress { address, baud })
        }
        _ => Err(not_recognized(body)),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Responses (pump -> host)
// ---------------------------------------------------------------------------------------------------------

/// Alarm types after the `A?` prompt. An alarm is cleared by the reply that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alarm {
    /// `R`.
    Reset,
    /// `S`.
    Stalled,
    /// `T`.
    CommsTimeout,
    /// `E`.
    ProgramError,
    /// `O`.
    PhaseOutOfRange,
}

impl Alarm {
    pub const ALL: [Alarm; 5] = [
        Alarm::Reset,
        Alarm::Stalled,
        Alarm::CommsTimeout,
        Alarm::ProgramError,
        Alarm::PhaseOutOfRange,
    ];

    pub const fn code(self) -> u8 {
        match self {
            Alarm::Reset => b'R',
            Alarm::Stalled => b'S',
            Alarm::CommsTimeout => b'T',
            Alarm::ProgramError => b'E',
            Alarm::PhaseOutOfRange => b'O',
        }
    }
}

/// The manual's meaning of each alarm type.
impl fmt::Display for Alarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Alarm::Reset => "Pump was reset (power was interrupted)",
            Alarm::Stalled => "Pump motor stalled",
            Alarm::CommsTimeout => "Safe mode communications time out",
            Alarm::ProgramError => "Pumping Program error",
            Alarm::PhaseOutOfRange => "Pumping Program Phase is out of range",
        })
    }
}

/// Command errors a reply carries as data after the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandError {
    /// `?`.
    NotRecognized,
    /// `?NA`.
    NotApplicable,
    /// `?OOR`.
    OutOfRange,
    /// `?COM`.
    InvalidPacket,
    /// `?IGN`.
    Ignored,
}

impl CommandError {
    pub const ALL: [CommandError; 5] = [
        CommandError::NotRecognized,
        CommandError::NotApplicable,
        CommandError::OutOfRange,
        CommandError::InvalidPacket,
        CommandError::Ignored,
    ];

    /// The text after `?`.
    pub const fn code(self) -> &'static str {
        match self {
            CommandError::NotRecognized => "",
            CommandError::NotApplicable => "NA",
            CommandError::OutOfRange => "OOR",
            CommandError::InvalidPacket => "COM",
            CommandError::Ignored => "IGN",
        }
    }
}

/// The manual's meaning of each command error.
impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CommandError::NotRecognized => "Command is not recognized",
            CommandError::NotApplicable => "Command is not currently applicable",
            CommandError::OutOfRange => "Command data is out of range",
            CommandError::InvalidPacket => "Invalid communications packet received",
            CommandError::Ignored => "Command ignored due to a simultaneous new Phase start",
        })
    }
}

/// The operational state every reply starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `I`.
    Infusing,
    /// `W`.
    Withdrawing,
    /// `S`: pumping program stopped.
    Stopped,
    /// `P`: pumping program paused.
    Paused,
    /// `T`: timed pause phase.
    TimedPause,
    /// `U`: waiting for a user trigger.
    UserWait,
    /// `X`: purging.
    Purging,
    /// `A?<type>`.
    Alarm(Alarm),
}

impl Status {
    const PROMPTS: [(Status, u8); 7] = [
        (Status::Infusing, b'I'),
        (Status::Withdrawing, b'W'),
        (Status::Stopped, b'S'),
        (Status::Paused, b'P'),
        (Status::TimedPause, b'T'),
        (Status::UserWait, b'U'),
        (Status::Purging, b'X'),
    ];
}

/// What a reply carries after the status. The reply does not say which command it answers, so data is
/// classified by shape; the driver knows which query it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// Status only: a set command was accepted, or an empty command was sent.
    None,
    Error(CommandError),
    /// A bare number: the `DIA` reply (diameter in mm) or the `ADR` reply (address).
    Number(PumpFloat),
    /// `RAT` reply.
    Rate {
        rate: PumpFloat,
        units: RateUnits,
    },
    /// `VOL` reply.
    Volume {
        volume: PumpFloat,
        units: VolumeUnits,
    },
    /// `DIR` reply.
    Direction(Direction),
    /// `DIS` reply `I<float>W<float><units>`.
    Dispensed {
        infused: PumpFloat,
        withdrawn: PumpFloat,
        units: VolumeUnits,
    },
    /// `VER` reply, starting with `NE` (e.g. `NE1000V3.928`).
    Version(String),
    /// Any other printable reply (commands this codec does not model), verbatim. Never one of the shapes
    /// above and never starting with `NE`.
    Text(String),
}

/// One reply packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub address: Address,
    pub status: Status,
    pub data: Data,
}

/// Writes one reply packet as the pump sends it.
pub fn encode_response(resp: &Response, out: &mut Vec<u8>) {
    out.push(STX);
    out.extend_from_slice(format!("{:02}", resp.address.get()).as_bytes());
    match resp.status {
        Status::Alarm(alarm) => out.extend_from_slice(&[b'A', b'?', alarm.code()]),
        prompt => {
            let code = Status::PROMPTS
                .iter()
                .find(|(s, _)| *s == prompt)
                .map_or(b'S', |&(_, c)| c);
            out.push(code);
        }
    }
    let data = match &resp.data {
        Data::None => String::new(),
        Data::Error(e) => format!("?{}", e.code()),
        Data::Number(n) => n.to_string(),
        Data::Rate { rate, units } => format!("{rate}{}", units.code()),
        Data::Volume { volume, units } => format!("{volume}{}", units.code()),
        Data::Direction(dir) => dir.code().to_owned(),
        Data::Dispensed {
            infused,
            withdrawn,
            units,
        } => format!("I{infused}W{withdrawn}{}", units.code()),
        Data::Version(text) | Data::Text(text) => text.clone(),
    };
    out.extend_from_slice(data.as_bytes());
    out.push(ETX);
}

/// Host side: decodes the reply packet at the front of `buf`. Bytes before an `STX`, and a packet cut
/// short by a new `STX`, are errors whose `skip` resynchronises on the next `STX`.
pub fn decode_response(buf: &[u8]) -> Result<Decoded<Response>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(Decoded::Incomplete);
    };
    if first != STX {
        let skip = buf.iter().position(|&b| b == STX).unwrap_or(buf.len());
        return Err(DecodeError::new(
            PROTOCOL,
            buf.get(..skip).unwrap_or(buf),
            "bytes outside an STX..ETX packet",
        ));
    }
    let body_and_rest = buf.get(1..).unwrap_or_default();
    match body_and_rest.iter().position(|&b| b == ETX || b == STX) {
        None if buf.len() > MAX_LINE => Err(DecodeError::new(
            PROTOCOL,
            buf,
            format!("no ETX within {MAX_LINE} bytes"),
        )),
        None => Ok(Decoded::Incomplete),
        Some(end) => {
            let consumed = end + 2;
            let frame = buf.get(..consumed).unwrap_or(buf);
            if body_and_rest.get(end) == Some(&STX) {
                return Err(DecodeError::new(
                    PROTOCOL,
                    buf.get(..end + 1).unwrap_or(buf),
                    "packet cut short by STX",
                ));
            }
            let body = body_and_rest.get(..end).unwrap_or_default();
            parse_body(body)
                .map(|value| Decoded::Frame { value, consumed })
                .map_err(|reason| DecodeError::new(PROTOCOL, frame, reason))
        }
    }
}

fn parse_body(body: &[u8]) -> Result<Response, String> {
    let digits = body
        .iter()
        .take(2)
        .take_while(|b| b.is_ascii_digit())
        .count();
    let (address, rest) = body.split_at_checked(digits).unwrap_or((&[], body));
    let address = number(address)
        .and_then(|n| u8::try_from(n).ok())
        .and_then(Address::new)
        .ok_or("reply without an address")?;
    let (status, data) = match rest {
        [b'A', b'?', code, data @ ..] => {
            let alarm = Alarm::ALL
                .into_iter()
                .find(|a| a.code() == *code)
                .ok_or("unknown alarm type")?;
            (Status::Alarm(alarm), data)
        }
        [prompt, data @ ..] => {
            let status = Status::PROMPTS
                .iter()
                .find(|(_, c)| c == prompt)
                .map(|&(s, _)| s)
                .ok_or_else(|| format!("unknown status prompt {:?}", char::from(*prompt)))?;
            (status, data)
        }
        [] => return Err("reply without a status prompt".into()),
    };
    Ok(Response {
        address,
        status,
        data: parse_data(data)?,
    })
}

fn parse_data(data: &[u8]) -> Result<Data, String> {
    if data.is_empty() {
        return Ok(Data::None);
    }
    if !data.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
        return Err("reply data is not printable ASCII".into());
    }
    if let Some(code) = data.strip_prefix(b"?") {
        return CommandError::ALL
            .into_iter()
            .find(|e| e.code().as_bytes() == code)
            .map(Data::Error)
            .ok_or_else(|| format!("unknown command error ?{}", lossy(code)));
    }
    if let Some(dir) = Direction::from_code(data) {
        return Ok(Data::Direction(dir));
    }
    if let Some(dispensed) = parse_dispensed(data) {
        return Ok(dispensed);
    }
    let (value, suffix) = split_number(data);
    if let Ok(value) = PumpFloat::parse(value) {
        if suffix.is_empty() {
            return Ok(Data::Number(value));
        }
        if let Some(units) = RateUnits::from_code(suffix) {
            return Ok(Data::Rate { rate: value, units });
        }
        if let Some(units) = VolumeUnits::from_code(suffix) {
            return Ok(Data::Volume {
                volume: value,
                units,
            });
        }
    }
    let text = lossy(data);
    Ok(if data.starts_with(b"NE") {
        Data::Version(text)
    } else {
        Data::Text(text)
    })
}

fn parse_dispensed(data: &[u8]) -> Option<Data> {
    let rest = data.strip_prefix(b"I")?;
    let (infused, rest) = split_number(rest);
    let rest = rest.strip_prefix(b"W")?;
    let (withdrawn, units) = split_number(rest);
    Some(Data::Dispensed {
        infused: PumpFloat::parse(infused).ok()?,
        withdrawn: PumpFloat::parse(withdrawn).ok()?,
        units: VolumeUnits::from_code(units)?,
    })
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn float(text: &str) -> PumpFloat {
        PumpFloat::parse(text.as_bytes()).unwrap()
    }

    fn addr(n: u8) -> Address {
        Address::new(n).unwrap()
    }

    fn cmd(bytes: &[u8]) -> Command {
        match decode_command(bytes) {
            Ok(Decoded::Frame { value, consumed }) => {
                assert_eq!(consumed, bytes.len());
                value
            }
            other => panic!(
                "{:?}: expected a frame, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    /// The pump's error reply to a refused command, checking the refusal drops exactly that command.
    fn refusal(bytes: &[u8]) -> (Target, CommandError) {
        match check_command(bytes) {
            Err(rejection) => {
                assert_eq!(rejection.error.skip, bytes.len());
                (rejection.target, rejection.reply)
            }
            other => panic!(
                "{:?}: expected a rejection, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    fn resp(bytes: &[u8]) -> Response {
        match decode_response(bytes) {
            Ok(Decoded::Frame { value, consumed }) => {
                assert_eq!(consumed, bytes.len());
                value
            }
            other => panic!(
                "{:?}: expected a frame, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    fn encoded_cmd(c: &Command) -> Vec<u8> {
        let mut out = Vec::new();
        encode_command(c, &mut out);
        out
    }

    fn encoded_resp(r: &Response) -> Vec<u8> {
        let mut out = Vec::new();
        encode_response(r, &mut out);
        out
    }

    fn unaddressed(request: Request) -> Command {
        Command {
            target: Target::Unaddressed,
            request,
        }
    }

    fn reply(status: Status, data: Data) -> Response {
        Response {
            address: addr(0),
            status,
            data,
        }
    }

    #[test]
    fn pump_floats_follow_the_manual() {
        for (text, thousandths, wire) in [
            ("26.59", 26_590, "26.59"),
            ("0.5", 500, "0.500"),
            (".5", 500, "0.500"),
            ("100", 100_000, "100.0"),
            ("1234", 1_234_000, "1234"),
            ("1.", 1_000, "1.000"),
            ("0.001", 1, "0.001"),
            ("0", 0, "0.000"),
        ] {
            let value = float(text);
            assert_eq!(value.thousandths(), thousandths, "{text}");
            assert_eq!(value.to_string(), wire, "{text}");
        }
        for too_fine in ["12.345", "12345", "0.0001", "1.2.3", "."] {
            assert_eq!(
                PumpFloat::parse(too_fine.as_bytes()),
                Err(FloatError::Range),
                "{too_fine}"
            );
        }
        assert_eq!(PumpFloat::parse(b"1e3"), Err(FloatError::Syntax));
        assert_eq!(PumpFloat::from_f64(26.594), Some(float("26.59")));
        assert_eq!(PumpFloat::from_f64(9999.4), Some(float("9999")));
        assert_eq!(PumpFloat::from_f64(9999.6), None);
        assert_eq!(PumpFloat::from_f64(-1.0), None);
        assert_eq!(PumpFloat::from_thousandths(12_345), None);
        assert_eq!(float("26.59").as_f64(), 26.59);
    }

    #[test]
    fn commands_from_the_manual_decode() {
        assert_eq!(
            cmd(b"DIA 26.59\r"),
            unaddressed(Request::SetDiameter {
                diameter_mm: float("26.59")
            })
        );
        assert_eq!(cmd(b"DIA\r"), unaddressed(Request::QueryDiameter));
        assert_eq!(
            cmd(b"RAT 1.5 MM\r"),
            unaddressed(Request::SetRate {
                rate: float("1.5"),
                units: Some(RateUnits::MillilitresPerMinute)
            })
        );
        assert_eq!(
            cmd(b"rat 100 uh\r"),
            unaddressed(Request::SetRate {
                rate: float("100"),
                units: Some(RateUnits::MicrolitresPerHour)
            })
        );
        assert_eq!(
            cmd(b"RAT 2.5\r"),
            unaddressed(Request::SetRate {
                rate: float("2.5"),
                units: None
            })
        );
        assert_eq!(cmd(b"RAT\r"), unaddressed(Request::QueryRate));
        assert_eq!(
            cmd(b"VOL 2.5\r"),
            unaddressed(Request::SetVolume {
                volume: float("2.5")
            })
        );
        assert_eq!(
            cmd(b"VOL ML\r"),
            unaddressed(Request::SetVolumeUnits(VolumeUnits::Millilitres))
        );
        assert_eq!(cmd(b"VOL\r"), unaddressed(Request::QueryVolume));
        assert_eq!(
            cmd(b"DIR INF\r"),
            unaddressed(Request::SetDirection(DirectionSetting::Infuse))
        );
        assert_eq!(
            cmd(b"DIR REV\r"),
            unaddressed(Request::SetDirection(DirectionSetting::Reverse))
        );
        assert_eq!(cmd(b"DIR\r"), unaddressed(Request::QueryDirection));
        assert_eq!(cmd(b"RUN\r"), unaddressed(Request::Run { phase: None }));
        assert_eq!(
            cmd(b"RUN 2\r"),
            unaddressed(Request::Run {
                phase: Phase::new(2)
            })
        );
        assert_eq!(cmd(b"STP\r"), unaddressed(Request::Stop));
        assert_eq!(cmd(b"DIS\r"), unaddressed(Request::QueryDispensed));
        assert_eq!(
            cmd(b"CLD WDR\r"),
            unaddressed(Request::ClearDispensed(Direction::Withdraw))
        );
        assert_eq!(cmd(b"VER\r"), unaddressed(Request::QueryVersion));
        assert_eq!(cmd(b"\r"), unaddressed(Request::Status));
        // Network addresses and system commands.
        assert_eq!(
            cmd(b"*ADR\r"),
            Command {
                target: Target::System,
                request: Request::QueryAddress
            }
        );
        assert_eq!(
            cmd(b"*ADR 3\r"),
            Command {
                target: Target::System,
                request: Request::SetAddress {
                    address: addr(3),
                    baud: None
                }
            }
        );
        assert_eq!(
            cmd(b"*ADR 5 B 1200\r"),
            Command {
                target: Target::System,
                request: Request::SetAddress {
                    address: addr(5),
                    baud: Some(BaudRate::B1200)
                }
            }
        );
        assert_eq!(
            cmd(b"12 DIA\r"),
            Command::to(addr(12), Request::QueryDiameter)
        );
        assert_eq!(cmd(b"7\r"), Command::to(addr(7), Request::Status));
        // A line feed left over from a CR LF terminator is a control character the pump strips.
        assert_eq!(cmd(b"\n1STP\r"), Command::to(addr(1), Request::Stop));
    }

    #[test]
    fn commands_encode_compactly() {
        let text = |c: Command| String::from_utf8(encoded_cmd(&c)).unwrap();
        assert_eq!(
            text(Command::to(
                addr(1),
                Request::SetDiameter {
                    diameter_mm: float("26.59")
                }
            )),
            "1DIA26.59\r"
        );
        assert_eq!(
            text(Command::to(
                addr(0),
                Request::SetRate {
                    rate: float("1.5"),
                    units: Some(RateUnits::MillilitresPerHour)
                }
            )),
            "0RAT1.500MH\r"
        );
        assert_eq!(
            text(Command::to(addr(42), Request::QueryDispensed)),
            "42DIS\r"
        );
        assert_eq!(
            text(Command {
                target: Target::System,
                request: Request::QueryAddress
            }),
            "*ADR\r"
        );
        assert_eq!(
            text(Command {
                target: Target::System,
                request: Request::SetAddress {
                    address: addr(5),
                    baud: Some(BaudRate::B1200)
                }
            }),
            "*ADR5B1200\r"
        );
        assert_eq!(text(unaddressed(Request::Status)), "\r");
    }

    #[test]
    fn refused_commands_get_the_pumps_error() {
        use CommandError::*;
        assert_eq!(refusal(b"FOO\r"), (Target::Unaddressed, NotRecognized));
        assert_eq!(refusal(b"3XY\r"), (Target::Pump(addr(3)), NotRecognized));
        assert_eq!(refusal(b"DI\r").1, NotRecognized);
        assert_eq!(refusal(b"DIA 60\r").1, OutOfRange);
        assert_eq!(refusal(b"DIA 0.05\r").1, OutOfRange);
        assert_eq!(refusal(b"DIA 12.345\r").1, OutOfRange);
        assert_eq!(refusal(b"DIA 1.2.3\r").1, OutOfRange);
        assert_eq!(refusal(b"DIA abc\r").1, NotRecognized);
        assert_eq!(refusal(b"RAT 1.5 XX\r").1, NotRecognized);
        assert_eq!(refusal(b"RAT MM\r").1, NotRecognized);
        assert_eq!(refusal(b"RAT 12345 MH\r").1, OutOfRange);
        assert_eq!(refusal(b"VOL 1.0000\r").1, OutOfRange);
        assert_eq!(refusal(b"VOL GAL\r").1, NotRecognized);
        assert_eq!(refusal(b"DIR UP\r").1, NotRecognized);
        assert_eq!(refusal(b"RUN 42\r").1, OutOfRange);
        assert_eq!(refusal(b"RUN 0\r").1, OutOfRange);
        assert_eq!(refusal(b"RUN X\r").1, NotRecognized);
        assert_eq!(refusal(b"VER 1\r").1, NotApplicable);
        assert_eq!(refusal(b"STP 1\r").1, NotApplicable);
        assert_eq!(refusal(b"DIS 1\r").1, NotApplicable);
        assert_eq!(refusal(b"CLD\r").1, NotApplicable);
        assert_eq!(refusal(b"CLD ALL\r").1, NotRecognized);
        assert_eq!(refusal(b"*ADR 100\r"), (Target::System, OutOfRange));
        assert_eq!(refusal(b"*ADR 5 B 4800\r").1, OutOfRange);
        assert_eq!(refusal(b"*ADR 5 C 1200\r").1, NotRecognized);
        assert_eq!(
            refusal(b"1DIA\xE9\r"),
            (Target::Pump(addr(1)), InvalidPacket)
        );
        // "100RAT" reads as address 10 and the unknown command "0RAT", as the pump's grammar does.
        assert_eq!(
            refusal(b"100RAT\r"),
            (Target::Pump(addr(10)), NotRecognized)
        );
        // The simulator turns a rejection into the pump's reply packet.
        let rejection = check_command(b"5DIA 99\r").unwrap_err();
        assert_eq!(
            encoded_resp(&rejection.response(addr(5), Status::Stopped)),
            b"\x0205S?OOR\x03"
        );
    }

    #[test]
    fn responses_from_the_manual_decode() {
        assert_eq!(resp(b"\x0200S\x03"), reply(Status::Stopped, Data::None));
        assert_eq!(
            resp(b"\x0201I\x03"),
            Response {
                address: addr(1),
                status: Status::Infusing,
                data: Data::None
            }
        );
        for (prompt, status) in [
            (b'W', Status::Withdrawing),
            (b'P', Status::Paused),
            (b'T', Status::TimedPause),
            (b'U', Status::UserWait),
            (b'X', Status::Purging),
        ] {
            assert_eq!(
                resp(&[STX, b'0', b'0', prompt, ETX]),
                reply(status, Data::None)
            );
        }
        for (code, alarm) in [
            (b'R', Alarm::Reset),
            (b'S', Alarm::Stalled),
            (b'T', Alarm::CommsTimeout),
            (b'E', Alarm::ProgramError),
            (b'O', Alarm::PhaseOutOfRange),
        ] {
            assert_eq!(
                resp(&[STX, b'0', b'0', b'A', b'?', code, ETX]),
                reply(Status::Alarm(alarm), Data::None)
            );
        }
        for (text, error) in [
            (&b"\x0200S?\x03"[..], CommandError::NotRecognized),
            (b"\x0200S?NA\x03", CommandError::NotApplicable),
            (b"\x0200S?OOR\x03", CommandError::OutOfRange),
            (b"\x0200S?COM\x03", CommandError::InvalidPacket),
            (b"\x0200I?IGN\x03", CommandError::Ignored),
        ] {
            assert_eq!(resp(text).data, Data::Error(error));
        }
        assert_eq!(resp(b"\x0200S26.59\x03").data, Data::Number(float("26.59")));
        assert_eq!(
            resp(b"\x0200S10.00MM\x03").data,
            Data::Rate {
                rate: float("10"),
                units: RateUnits::MillilitresPerMinute
            }
        );
        assert_eq!(
            resp(b"\x0200S5.000ML\x03").data,
            Data::Volume {
                volume: float("5"),
                units: VolumeUnits::Millilitres
            }
        );
        assert_eq!(
            resp(b"\x0200SINF\x03").data,
            Data::Direction(Direction::Infuse)
        );
        assert_eq!(
            resp(b"\x0200SWDR\x03").data,
            Data::Direction(Direction::Withdraw)
        );
        assert_eq!(
            resp(b"\x0200SI0.974W0.959ML\x03").data,
            Data::Dispensed {
                infused: float("0.974"),
                withdrawn: float("0.959"),
                units: VolumeUnits::Millilitres
            }
        );
        assert_eq!(
            resp(b"\x0200SNE1000V3.928\x03").data,
            Data::Version("NE1000V3.928".into())
        );
        assert_eq!(resp(b"\x0200S0 1 2\x03").data, Data::Text("0 1 2".into()));
        // One-digit addresses fit the manual's grammar too.
        assert_eq!(resp(b"\x020S\x03"), reply(Status::Stopped, Data::None));
        // Errors carry the manual's meaning.
        assert_eq!(
            CommandError::OutOfRange.to_string(),
            "Command data is out of range"
        );
        assert_eq!(Alarm::Stalled.to_string(), "Pump motor stalled");
        // Encoding reproduces the pump's bytes.
        assert_eq!(
            encoded_resp(&reply(
                Status::Stopped,
                Data::Dispensed {
                    infused: float("0"),
                    withdrawn: float("0"),
                    units: VolumeUnits::Microlitres
                }
            )),
            b"\x0200SI0.000W0.000UL\x03"
        );
        assert_eq!(
            encoded_resp(&reply(Status::Alarm(Alarm::Reset), Data::None)),
            b"\x0200A?R\x03"
        );
    }

    #[test]
    fn malformed_replies_are_dropped_whole() {
        for bad in [
            &b"\x02S\x03"[..],
            b"\x0200\x03",
            b"\x0200Q\x03",
            b"\x0200A?Z\x03",
            b"\x0200A\x03",
            b"\x0200S?XYZ\x03",
            b"\x0200S\x01\x03",
            b"\x02001S\x03",
        ] {
            let error = decode_response(bad).unwrap_err();
            assert_eq!(error.skip, bad.len(), "{error}");
        }
    }

    #[test]
    fn partial_frames_are_incomplete() {
        assert_eq!(decode_response(b"").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_response(b"\x02").unwrap(), Decoded::Incomplete);
        assert_eq!(
            decode_response(b"\x0200S26.5").unwrap(),
            Decoded::Incomplete
        );
        assert_eq!(decode_command(b"").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_command(b"1DIA 26").unwrap(), Decoded::Incomplete);
    }

    #[test]
    fn garbage_then_a_valid_frame() {
        let mut buf = b"xx\x0200S\x0201W\x03".to_vec();
        let error = decode_response(&buf).unwrap_err();
        assert_eq!(error.skip, 2);
        buf.drain(..error.skip);
        // A packet cut short by the next STX is dropped up to that STX.
        let error = decode_response(&buf).unwrap_err();
        assert_eq!(error.skip, 4);
        buf.drain(..error.skip);
        assert_eq!(
            resp(&buf),
            Response {
                address: addr(1),
                status: Status::Withdrawing,
                data: Data::None
            }
        );

        let mut buf = b"JUNK\r0VER\r".to_vec();
        let rejection = check_command(&buf).unwrap_err();
        assert_eq!(rejection.error.skip, 5);
        buf.drain(..rejection.error.skip);
        assert_eq!(cmd(&buf), Command::to(addr(0), Request::QueryVersion));
    }

    #[test]
    fn replies_from_several_pumps_separate() {
        let stream = b"\x0200S\x03\x0201I?NA\x03\x0202A?S\x03";
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in stream.chunks(3) {
            buf.extend_from_slice(chunk);
            while let Decoded::Frame { value, consumed } = decode_response(&buf).unwrap() {
                got.push(value);
                buf.drain(..consumed);
            }
        }
        assert!(buf.is_empty());
        let addresses: Vec<u8> = got.iter().map(|r| r.address.get()).collect();
        assert_eq!(addresses, [0, 1, 2]);
        assert_eq!(got[1].data, Data::Error(CommandError::NotApplicable));
        assert_eq!(got[2].status, Status::Alarm(Alarm::Stalled));
    }

    // ----- property tests -----

    fn pump_float() -> impl Strategy<Value = PumpFloat> {
        prop_oneof![
            (0u32..=9_999).prop_map(|m| m),
            (0u32..=9_999).prop_map(|m| m * 10),
            (0u32..=9_999).prop_map(|m| m * 100),
            (0u32..=9_999).prop_map(|m| m * 1000),
        ]
        .prop_map(|t| PumpFloat::from_thousandths(t).expect("representable"))
    }

    fn address() -> impl Strategy<Value = Address> {
        (0u8..=99).prop_map(|n| Address::new(n).expect("in range"))
    }

    fn command_strategy() -> impl Strategy<Value = Command> {
        let target = prop_oneof![
            Just(Target::Unaddressed),
            Just(Target::System),
            address().prop_map(Target::Pump)
        ];
        let rate_units = proptest::sample::select(vec![
            RateUnits::MicrolitresPerMinute,
            RateUnits::MillilitresPerMinute,
            RateUnits::MicrolitresPerHour,
            RateUnits::MillilitresPerHour,
        ]);
        let direction = prop_oneof![Just(Direction::Infuse), Just(Direction::Withdraw)];
        let request = prop_oneof![
            Just(Request::Status),
            Just(Request::QueryDiameter),
            (100u32..=50_000)
                .prop_filter_map("representable", PumpFloat::from_thousandths)
                .prop_map(|diameter_mm| Request::SetDiameter { diameter_mm }),
            Just(Request::QueryRate),
            (pump_float(), proptest::option::of(rate_units))
                .prop_map(|(rate, units)| Request::SetRate { rate, units }),
            Just(Request::QueryVolume),
            pump_float().prop_map(|volume| Request::SetVolume { volume }),
            prop_oneof![
                Just(VolumeUnits::Microlitres),
                Just(VolumeUnits::Millilitres)
            ]
            .prop_map(Request::SetVolumeUnits),
            Just(Request::QueryDirection),
            prop_oneof![
                Just(DirectionSetting::Infuse),
                Just(DirectionSetting::Withdraw),
                Just(DirectionSetting::Reverse)
            ]
            .prop_map(Request::SetDirection),
            proptest::option::of((1u8..=41).prop_map(|p| Phase::new(p).expect("in range")))
                .prop_map(|phase| Request::Run { phase }),
            Just(Request::Stop),
            Just(Request::QueryDispensed),
            direction.prop_map(Request::ClearDispensed),
            Just(Request::QueryVersion),
            Just(Request::QueryAddress),
            (
                address(),
                proptest::option::of(proptest::sample::select(vec![
                    BaudRate::B19200,
                    BaudRate::B9600,
                    BaudRate::B2400,
                    BaudRate::B1200,
                    BaudRate::B300
                ]))
            )
                .prop_map(|(address, baud)| Request::SetAddress { address, baud }),
        ];
        (target, request).prop_map(|(target, request)| Command { target, request })
    }

    fn response_strategy() -> impl Strategy<Value = Response> {
        let status = prop_oneof![
            proptest::sample::select(Status::PROMPTS.map(|(s, _)| s).to_vec()),
            proptest::sample::select(Alarm::ALL.to_vec()).prop_map(Status::Alarm),
        ];
        let volume_units = || {
            prop_oneof![
                Just(VolumeUnits::Microlitres),
                Just(VolumeUnits::Millilitres)
            ]
        };
        let data = prop_oneof![
            Just(Data::None),
            proptest::sample::select(CommandError::ALL.to_vec()).prop_map(Data::Error),
            pump_float().prop_map(Data::Number),
            (
                pump_float(),
                proptest::sample::select(vec![
                    RateUnits::MicrolitresPerMinute,
                    RateUnits::MillilitresPerMinute,
                    RateUnits::MicrolitresPerHour,
                    RateUnits::MillilitresPerHour
                ])
            )
                .prop_map(|(rate, units)| Data::Rate { rate, units }),
            (pump_float(), volume_units())
                .prop_map(|(volume, units)| Data::Volume { volume, units }),
            prop_oneof![Just(Direction::Infuse), Just(Direction::Withdraw)]
                .prop_map(Data::Direction),
            (pump_float(), pump_float(), volume_units()).prop_map(|(infused, withdrawn, units)| {
                Data::Dispensed {
                    infused,
                    withdrawn,
                    units,
                }
            }),
            "NE[0-9A-Z.]{1,12}".prop_map(Data::Version),
            "[a-z][a-z0-9 .]{0,15}".prop_map(Data::Text),
        ];
        (address(), status, data).prop_map(|(address, status, data)| Response {
            address,
            status,
            data,
        })
    }

    use crate::drain;

    proptest! {
        #[test]
        fn commands_round_trip(command in command_strategy()) {
            let bytes = encoded_cmd(&command);
            prop_assert_eq!(decode_command(&bytes), Ok(Decoded::Frame { value: command, consumed: bytes.len() }));
        }

        #[test]
        fn responses_round_trip(response in response_strategy()) {
            let bytes = encoded_resp(&response);
            prop_assert_eq!(decode_response(&bytes), Ok(Decoded::Frame { value: response, consumed: bytes.len() }));
        }

        #[test]
        fn pump_floats_round_trip_through_text(value in pump_float()) {
            prop_assert_eq!(PumpFloat::parse(value.to_string().as_bytes()), Ok(value));
            prop_assert_eq!(PumpFloat::from_f64(value.as_f64()), Some(value));
        }

        #[test]
        fn arbitrary_bytes_never_stall_either_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            drain(&bytes, decode_command);
            drain(&bytes, decode_response);
        }

        #[test]
        fn packet_like_noise_never_stalls(bytes in proptest::collection::vec(
            proptest::sample::select(b"\x02\x03\r0123456789.?*ASIWPTUXRMLHDNEOFV ".to_vec()), 0..200)) {
            drain(&bytes, decode_command);
            drain(&bytes, decode_response);
        }
    }
}
