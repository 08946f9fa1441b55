//! GRBL 1.1 G-code controller (serial 115200 8N1), both ends of the line.
//!
//! The gantry driver encodes [`Command`]s and decodes [`Response`]s; the gantry simulator decodes commands
//! and encodes responses with the same definitions, so the two cannot drift apart.
//!
//! Framing follows the "Grbl v1.1 Interface" document: a command is one line ended by `\n` (`\r\n` and a
//! bare `\r` are accepted too, as GRBL ends a line at either); a real-time command is a single byte that
//! needs no newline and may arrive at any time. GRBL answers each line with `ok` or `error:N` and pushes
//! other lines (`ALARM:N`, `<status>`, `[MSG:...]`, the welcome banner) in between, each ended by `\r\n`.
//! One deliberate difference: real GRBL sees `\r\n` as two line ends and answers an extra `ok` for the
//! empty second line; here `\r\n` arriving together is one terminator, so hosts counting `ok`s stay in step.
//!
//! The device side ([`check_command`]) validates a line the way the firmware does: it normalises it like
//! `protocol.c` (spaces, comments and case), then runs the stateless checks of `gc_execute_line` and
//! `system_execute_line`, so a refused line comes with the same `error:N` the real controller sends.
//! Checks that depend on machine state (alarm lock, idle state, a feed rate set by an earlier line, soft
//! limits, homing enabled) belong to the simulator, which owns that state.

use std::fmt;

use super::fixed_point::{FixedPointError, common_decimals};
use super::{DecodeError, Decoded, MAX_LINE, split_line};

/// Protocol name in [`DecodeError::protocol`].
pub const PROTOCOL: &str = "grbl";

/// GRBL's line buffer size: it keeps at most `LINE_BUFFER_SIZE - 1` characters of a line (after dropping
/// spaces and comments) and answers `error:11` for anything longer.
pub const LINE_BUFFER_SIZE: usize = 80;

/// Highest `N` line number GRBL accepts (`error:27` above).
const MAX_LINE_NUMBER: f64 = 10_000_000.0;
/// Highest `T` tool number GRBL accepts (`error:38` above).
const MAX_TOOL_NUMBER: f64 = 255.0;

// ---------------------------------------------------------------------------------------------------------
// Commands (host -> controller)
// ---------------------------------------------------------------------------------------------------------

/// Single-byte real-time commands. GRBL picks them out of the serial stream as they arrive, even in the
/// middle of a line, so they act at once instead of queueing behind buffered G-code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Realtime {
    /// `?`: send one status report.
    StatusReport,
    /// `!`: decelerate to a controlled stop and hold.
    FeedHold,
    /// `~`: start or resume a held cycle.
    CycleStart,
    /// `0x18` (ctrl-x): soft reset; GRBL answers with the welcome banner.
    SoftReset,
    /// `0x84`: behave as if the safety door opened.
    SafetyDoor,
    /// `0x85`: cancel the current jog.
    JogCancel,
    /// `0x90`: feed override back to 100 %.
    FeedOverrideReset,
    /// `0x91`: feed override +10 %.
    FeedOverrideCoarsePlus,
    /// `0x92`: feed override -10 %.
    FeedOverrideCoarseMinus,
    /// `0x93`: feed override +1 %.
    FeedOverrideFinePlus,
    /// `0x94`: feed override -1 %.
    FeedOverrideFineMinus,
    /// `0x95`: rapid override back to 100 %.
    RapidOverrideReset,
    /// `0x96`: rapid override 50 %.
    RapidOverrideMedium,
    /// `0x97`: rapid override 25 %.
    RapidOverrideLow,
    /// `0x99`: spindle override back to 100 %.
    SpindleOverrideReset,
    /// `0x9A`: spindle override +10 %.
    SpindleOverrideCoarsePlus,
    /// `0x9B`: spindle override -10 %.
    SpindleOverrideCoarseMinus,
    /// `0x9C`: spindle override +1 %.
    SpindleOverrideFinePlus,
    /// `0x9D`: spindle override -1 %.
    SpindleOverrideFineMinus,
    /// `0x9E`: toggle spindle stop (only in hold).
    SpindleStop,
    /// `0xA0`: toggle flood coolant, which on labctl's head is the vial gripper.
    FloodToggle,
    /// `0xA1`: toggle mist coolant (only when GRBL is built with M7).
    MistToggle,
}

impl Realtime {
    /// Every real-time command, for tables and tests.
    pub const ALL: [Realtime; 22] = [
        Realtime::StatusReport,
        Realtime::FeedHold,
        Realtime::CycleStart,
        Realtime::SoftReset,
        Realtime::SafetyDoor,
        Realtime::JogCancel,
        Realtime::FeedOverrideReset,
        Realtime::FeedOverrideCoarsePlus,
        Realtime::FeedOverrideCoarseMinus,
        Realtime::FeedOverrideFinePlus,
        Realtime::FeedOverrideFineMinus,
        Realtime::RapidOverrideReset,
        Realtime::RapidOverrideMedium,
        Realtime::RapidOverrideLow,
        Realtime::SpindleOverrideReset,
        Realtime::SpindleOverrideCoarsePlus,
        Realtime::SpindleOverrideCoarseMinus,
        Realtime::SpindleOverrideFinePlus,
        Realtime::SpindleOverrideFineMinus,
        Realtime::SpindleStop,
        Realtime::FloodToggle,
        Realtime::MistToggle,
    ];

    /// The byte on the wire.
    pub const fn byte(self) -> u8 {
        match self {
            Realtime::StatusReport => b'?',
            Realtime::FeedHold => b'!',
            Realtime::CycleStart => b'~',
            Realtime::SoftReset => 0x18,
            Realtime::SafetyDoor => 0x84,
            Realtime::JogCancel => 0x85,
            Realtime::FeedOverrideReset => 0x90,
            Realtime::FeedOverrideCoarsePlus => 0x91,
            Realtime::FeedOverrideCoarseMinus => 0x92,
            Realtime::FeedOverrideFinePlus => 0x93,
            Realtime::FeedOverrideFineMinus => 0x94,
            Realtime::RapidOverrideReset => 0x95,
            Realtime::RapidOverrideMedium => 0x96,
            Realtime::RapidOverrideLow => 0x97,
            Realtime::SpindleOverrideReset => 0x99,
            Realtime::SpindleOverrideCoarsePlus => 0x9A,
            Realtime::SpindleOverrideCoarseMinus => 0x9B,
            Realtime::SpindleOverrideFinePlus => 0x9C,
            Realtime::SpindleOverrideFineMinus => 0x9D,
            Realtime::SpindleStop => 0x9E,
            Realtime::FloodToggle => 0xA0,
            Realtime::MistToggle => 0xA1,
        }
    }

    /// The real-time command a byte stands for, if any.
    pub fn from_byte(byte: u8) -> Option<Realtime> {
        Realtime::ALL.into_iter().find(|rt| rt.byte() == byte)
    }
}

/// `G0` or `G1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Motion {
    /// `G0`: rapid positioning at the machine's maximum rate.
    Rapid,
    /// `G1`: linear move at the programmed feed rate.
    Linear,
}

/// `G90` / `G91`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DistanceMode {
    /// `G90`: axis words are machine targets.
    Absolute,
    /// `G91`: axis words are offsets from the current position.
    Incremental,
}

/// Coolant outputs. labctl wires the flood output to the head's vial gripper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coolant {
    /// `M8`: flood on, which closes the gripper.
    Flood,
    /// `M9`: all coolant off, which opens the gripper.
    Off,
}

/// One command to the controller. Lengths are millimetres because labctl always runs in `G21`, and GRBL
/// reports in millimetres as long as `$13=0`.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A single real-time byte; no newline follows it.
    Realtime(Realtime),
    /// An empty line (or one with only comments or an `N` word). GRBL answers `ok`; hosts use it to sync.
    Empty,
    /// `G0`/`G1` with optional axis and feed words. A `G1` without `F` relies on an earlier feed rate: the
    /// simulator answers `error:22` if none was set.
    Move {
        motion: Motion,
        x_mm: Option<f64>,
        y_mm: Option<f64>,
        z_mm: Option<f64>,
        feed_mm_per_min: Option<f64>,
    },
    /// `G90` or `G91`.
    Distance(DistanceMode),
    /// `G21`: lengths in millimetres.
    Millimetres,
    /// `G4 P<s>`: wait; GRBL 1.1 takes the time in seconds.
    Dwell { seconds: f64 },
    /// `M8` / `M9`.
    Coolant(Coolant),
    /// `$`: list the system commands.
    Help,
    /// `$$`: print every setting as `$N=value` lines.
    ViewSettings,
    /// `$G`: print the parser state as a `[GC:...]` line.
    ViewParserState,
    /// `$I`: print `[VER:...]` and `[OPT:...]`.
    ViewBuildInfo,
    /// `$X`: leave the alarm state without homing.
    KillAlarmLock,
    /// `$H`: run the homing cycle.
    Home,
    /// `$N=value`: store one setting in EEPROM.
    SetSetting { number: u16, value: f64 },
}

impl Command {
    /// Closes the vial gripper (flood coolant on).
    pub const CLOSE_GRIPPER: Command = Command::Coolant(Coolant::Flood);
    /// Opens the vial gripper (coolant off).
    pub const OPEN_GRIPPER: Command = Command::Coolant(Coolant::Off);
}

/// Writes one command. Numbers get at most three decimals (GRBL's own precision in millimetres); a
/// non-finite number is written as `NaN`/`inf`, which GRBL refuses with `error:2` rather than moving.
pub fn encode_command(cmd: &Command, out: &mut Vec<u8>) {
    let line = match cmd {
        Command::Realtime(rt) => {
            out.push(rt.byte());
            return;
        }
        Command::Empty => String::new(),
        Command::Move {
            motion,
            x_mm,
            y_mm,
            z_mm,
            feed_mm_per_min,
        } => {
            let mut line = String::from(match motion {
                Motion::Rapid => "G0",
                Motion::Linear => "G1",
            });
            for (letter, value) in [
                ('X', x_mm),
                ('Y', y_mm),
                ('Z', z_mm),
                ('F', feed_mm_per_min),
            ] {
                if let Some(v) = value {
                    line.push(' ');
                    line.push(letter);
                    line.push_str(&short_number(*v));
                }
            }
            line
        }
        Command::Distance(DistanceMode::Absolute) => "G90".into(),
        Command::Distance(DistanceMode::Incremental) => "G91".into(),
        Command::Millimetres => "G21".into(),
        Command::Dwell { seconds } => format!("G4 P{}", short_number(*seconds)),
        Command::Coolant(Coolant::Flood) => "M8".into(),
        Command::Coolant(Coolant::Off) => "M9".into(),
        Command::Help => "$".into(),
        Command::ViewSettings => "$$".into(),
        Command::ViewParserState => "$G".into(),
        Command::ViewBuildInfo => "$I".into(),
        Command::KillAlarmLock => "$X".into(),
        Command::Home => "$H".into(),
        Command::SetSetting { number, value } => format!("${number}={}", short_number(*value)),
    };
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
}

/// A frame the controller refuses, with what it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The controller's reply, or `None` where it stays silent (bytes its serial interrupt throws away).
    pub reply: Option<ErrorCode>,
    /// True when real GRBL would accept the line but this codec does not model it (arcs, work offsets,
    /// jogging...). The reply is then `error:20`, as from a GRBL built without the feature, and the
    /// simulator should log it loudly: labctl never sends such lines.
    pub outside_subset: bool,
    /// The frame and the reason, for logs; `skip` drops exactly the refused frame.
    pub error: DecodeError,
}

/// Device side: decodes the command at the front of `buf`. A line GRBL refuses becomes a [`DecodeError`];
/// use [`check_command`] to also get the `error:N` the controller answers.
pub fn decode_command(buf: &[u8]) -> Result<Decoded<Command>, DecodeError> {
    check_command(buf).map_err(|rejection| rejection.error)
}

/// Device side, with the controller's verdict: like [`decode_command`], but a refused frame comes as a
/// [`Rejection`] carrying the exact reply GRBL sends.
///
/// A real-time byte is decoded at the front of the buffer. Real-time bytes inside a line are dropped from
/// the line, as GRBL's serial interrupt removes them before the line buffer; a simulator that must act on
/// them as they arrive calls [`pick_realtime`] on its receive buffer first, like that interrupt.
pub fn check_command(buf: &[u8]) -> Result<Decoded<Command>, Rejection> {
    let Some(&first) = buf.first() else {
        return Ok(Decoded::Incomplete);
    };
    if let Some(rt) = Realtime::from_byte(first) {
        return Ok(Decoded::Frame {
            value: Command::Realtime(rt),
            consumed: 1,
        });
    }
    if first > 0x7F {
        return Err(Rejection {
            reply: None,
            outside_subset: false,
            error: DecodeError::new(
                PROTOCOL,
                buf.get(..1).unwrap_or(buf),
                format!("byte 0x{first:02X} is not ASCII nor a real-time command; GRBL drops it"),
            ),
        });
    }
    let (raw, consumed) = match split_line(PROTOCOL, buf, true) {
        Ok(Some(line)) => line,
        Ok(None) => return Ok(Decoded::Incomplete),
        Err(error) => {
            return Err(Rejection {
                reply: Some(ErrorCode::LineOverflow),
                outside_subset: false,
                error,
            });
        }
    };
    match parse_line(raw) {
        Ok(value) => Ok(Decoded::Frame { value, consumed }),
        Err(refusal) => Err(Rejection {
            reply: Some(refusal.code),
            outside_subset: refusal.outside_subset,
            error: DecodeError::new(
                PROTOCOL,
                buf.get(..consumed).unwrap_or(buf),
                format!(
                    "error:{} ({}): {}",
                    refusal.code.code(),
                    refusal.code.message(),
                    refusal.detail
                ),
            ),
        }),
    }
}

/// Removes every real-time byte from `buf` and returns the commands in arrival order, as GRBL's serial
/// interrupt does before anything reaches the line buffer. Other bytes above 0x7F are dropped too, as the
/// interrupt does; everything else stays in order for [`check_command`].
pub fn pick_realtime(buf: &mut Vec<u8>) -> Vec<Realtime> {
    let mut picked = Vec::new();
    buf.retain(|&b| match Realtime::from_byte(b) {
        Some(rt) => {
            picked.push(rt);
            false
        }
        None => b <= 0x7F,
    });
    picked
}

/// Why a line was refused, before it is wrapped in a [`Rejection`].
struct Refusal {
    code: ErrorCode,
    outside_subset: bool,
    detail: String,
}

fn refuse(code: ErrorCode, detail: impl Into<String>) -> Refusal {
    Refusal {
        code,
        outside_subset: false,
        detail: detail.into(),
    }
}

fn outside(detail: impl Into<String>) -> Refusal {
    Refusal {
        code: ErrorCode::UnsupportedCommand,
        outside_subset: true,
        detail: format!(
            "{} is valid GRBL but outside labctl's modelled subset",
            detail.into()
        ),
    }
}

/// Normalises a line like GRBL's `protocol.c`: drops real-time and non-ASCII bytes (taken by the serial
/// interrupt), whitespace and control characters, `/`, `(...)` and `;...` comments, and upper-cases letters.
/// `None` when more than `LINE_BUFFER_SIZE - 1` characters remain, which GRBL reports as `error:11`.
fn normalize(raw: &[u8]) -> Option<Vec<u8>> {
    let mut line = Vec::with_capacity(raw.len().min(LINE_BUFFER_SIZE));
    let (mut paren, mut semicolon, mut overflow) = (false, false, false);
    for &c in raw {
        if c > 0x7F || Realtime::from_byte(c).is_some() {
            continue;
        }
        if paren || semicolon || overflow {
            if c == b')' {
                paren = false;
            }
            continue;
        }
        match c {
            0..=b' ' | b'/' => {}
            b'(' => paren = true,
            b';' => semicolon = true,
            _ if line.len() >= LINE_BUFFER_SIZE - 1 => overflow = true,
            _ => line.push(c.to_ascii_uppercase()),
        }
    }
    (!overflow).then_some(line)
}

fn parse_line(raw: &[u8]) -> Result<Command, Refusal> {
    let Some(line) = normalize(raw) else {
        return Err(refuse(
            ErrorCode::LineOverflow,
            format!(
                "more than {} characters once spaces and comments are dropped",
                LINE_BUFFER_SIZE - 1
            ),
        ));
    };
    match line.split_first() {
        None => Ok(Command::Empty),
        Some((b'$', rest)) => parse_system(rest),
        Some(_) => parse_gcode(&line),
    }
}

/// GRBL's `read_float`: optional sign, digits with at most one decimal point, at least one digit. Returns
/// the value and the index after the number.
fn read_float(s: &[u8], start: usize) -> Option<(f64, usize)> {
    let mut i = start;
    let mut text = String::new();
    match s.get(i) {
        Some(b'-') => {
            text.push('-');
            i += 1;
        }
        Some(b'+') => i += 1,
        _ => {}
    }
    let (mut digits, mut point) = (0usize, false);
    while let Some(&c) = s.get(i) {
        if c.is_ascii_digit() {
            digits += 1;
        } else if c == b'.' && !point {
            point = true;
        } else {
            break;
        }
        text.push(char::from(c));
        i += 1;
    }
    if digits == 0 {
        return None;
    }
    text.parse::<f64>().ok().map(|v| (v, i))
}

/// Setting numbers GRBL 1.1 stores (3 axes); anything else is `error:3`.
fn is_setting(number: u16) -> bool {
    matches!(number, 0..=6 | 10..=13 | 20..=27 | 30..=32 | 100..=102 | 110..=112 | 120..=122 | 130..=132)
}

/// `$` lines, following `system_execute_line` (with `rest` after the `$`).
fn parse_system(rest: &[u8]) -> Result<Command, Refusal> {
    let Some((&c, tail)) = rest.split_first() else {
        return Ok(Command::Help);
    };
    let invalid = |what: &str| {
        refuse(
            ErrorCode::InvalidStatement,
            format!("'${}' {what}", lossy(rest)),
        )
    };
    match c {
        b'J' if tail.first() == Some(&b'=') => Err(outside("$J= jogging")),
        b'J' => Err(invalid("is not '$J=...'")),
        b'$' | b'G' | b'C' | b'X' if !tail.is_empty() => {
            Err(invalid("takes nothing after the letter"))
        }
        b'$' => Ok(Command::ViewSettings),
        b'G' => Ok(Command::ViewParserState),
        b'C' => Err(outside("$C check mode")),
        b'X' => Ok(Command::KillAlarmLock),
        b'#' if tail.is_empty() => Err(outside("$# parameter report")),
        b'H' if tail.is_empty() => Ok(Command::Home),
        b'H' => Err(invalid(
            "asks for single-axis homing, which GRBL is not built with",
        )),
        b'S' if tail == b"LP" => Err(outside("$SLP sleep")),
        b'I' if tail.is_empty() => Ok(Command::ViewBuildInfo),
        b'I' if tail.first() == Some(&b'=') => Err(outside("$I= build info write")),
        b'R' if tail.len() == 4
            && tail.starts_with(b"ST=")
            && matches!(tail.get(3), Some(b'$' | b'#' | b'*')) =>
        {
            Err(outside("$RST= restore"))
        }
        b'N' if tail.is_empty() => Err(outside("$N startup line report")),
        b'N' => match read_float(tail, 0) {
            None => Err(refuse(
                ErrorCode::BadNumberFormat,
                "'$N' needs a startup line number",
            )),
            Some((_, i)) if tail.get(i) == Some(&b'=') => Err(outside("$Nx= startup line")),
            Some(_) => Err(invalid("needs '=' after the startup line number")),
        },
        b'#' | b'S' | b'I' | b'R' => Err(invalid("is not a GRBL system command")),
        _ => parse_setting(rest),
    }
}

/// `$<number>=<value>` (with `rest` after the `$`), following `system_execute_line` and
/// `settings_store_global_setting`.
fn parse_setting(rest: &[u8]) -> Result<Command, Refusal> {
    let Some((parameter, i)) = read_float(rest, 0) else {
        return Err(refuse(
            ErrorCode::BadNumberFormat,
            format!(
                "'${}' is not a system command or a setting number",
                lossy(rest)
            ),
        ));
    };
    if rest.get(i) != Some(&b'=') {
        return Err(refuse(
            ErrorCode::InvalidStatement,
            "a setting needs '=' after its number",
        ));
    }
    let Some((value, end)) = read_float(rest, i + 1) else {
        return Err(refuse(
            ErrorCode::BadNumberFormat,
            "the setting value is not a number",
        ));
    };
    if end != rest.len() || !(0.0..=255.0).contains(&parameter) {
        return Err(refuse(
            ErrorCode::InvalidStatement,
            format!("'${}' is not a setting", lossy(rest)),
        ));
    }
    if value < 0.0 {
        return Err(refuse(
            ErrorCode::NegativeValue,
            "settings cannot be negative",
        ));
    }
    // GRBL truncates the setting number to an integer, as it does here.
    let number = parameter.trunc() as u16;
    if !is_setting(number) {
        return Err(refuse(
            ErrorCode::InvalidStatement,
            format!("${number} is not a GRBL 1.1 setting"),
        ));
    }
    if number == 0 && value.trunc() < 3.0 {
        return Err(refuse(
            ErrorCode::StepPulseMin,
            "$0 step pulse must be at least 3 microseconds",
        ));
    }
    Ok(Command::SetSetting { number, value })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AxisCommand {
    None,
    NonModal,
    Motion,
    ToolLength,
}

// Modal group bits for the "two commands from one group" check (error:21).
const GROUP_G0_NON_MODAL: u8 = 0;
const GROUP_G1_MOTION: u8 = 1;
const GROUP_G2_PLANE: u8 = 2;
const GROUP_G3_DISTANCE: u8 = 3;
const GROUP_G4_ARC_DISTANCE: u8 = 4;
const GROUP_G5_FEED_MODE: u8 = 5;
const GROUP_G6_UNITS: u8 = 6;
const GROUP_G7_CUTTER: u8 = 7;
const GROUP_G8_TOOL_LENGTH: u8 = 8;
const GROUP_G12_COORD: u8 = 12;
const GROUP_G13_CONTROL: u8 = 13;
const GROUP_M4_FLOW: u8 = 14;
const GROUP_M7_SPINDLE: u8 = 15;
const GROUP_M8_COOLANT: u8 = 16;

/// Classifies a `G` word as `gc_execute_line` does: its modal group and the mantissa left after valid
/// `Gxx.x` forms are accounted for (a non-zero remainder is `error:23`).
fn g_group(int: u8, mantissa: u16, axis: &mut AxisCommand) -> Result<(u8, u16), Refusal> {
    let conflict = || {
        refuse(
            ErrorCode::AxisCommandConflict,
            format!("G{int} with another command that uses axis words"),
        )
    };
    let unsupported = || {
        refuse(
            ErrorCode::UnsupportedCommand,
            format!("G{int}.{mantissa} is not supported"),
        )
    };
    match int {
        10 | 28 | 30 | 92 | 4 | 53 => {
            if matches!(int, 10 | 28 | 30 | 92) && mantissa == 0 {
                if *axis != AxisCommand::None {
                    return Err(conflict());
                }
                *axis = AxisCommand::NonModal;
            }
            if matches!(int, 28 | 30 | 92) {
                if mantissa != 0 && mantissa != 10 {
                    return Err(unsupported());
                }
                return Ok((GROUP_G0_NON_MODAL, 0));
            }
            Ok((GROUP_G0_NON_MODAL, mantissa))
        }
        0..=3 | 38 => {
            if *axis != AxisCommand::None {
                return Err(conflict());
            }
            *axis = AxisCommand::Motion;
            if int == 38 {
                if !matches!(mantissa, 20 | 30 | 40 | 50) {
                    return Err(unsupported());
                }
                return Ok((GROUP_G1_MOTION, 0));
            }
            Ok((GROUP_G1_MOTION, mantissa))
        }
        80 => Ok((GROUP_G1_MOTION, mantissa)),
        17..=19 => Ok((GROUP_G2_PLANE, mantissa)),
        90 | 91 if mantissa == 0 => Ok((GROUP_G3_DISTANCE, 0)),
        90 | 91 => {
            if mantissa != 10 || int == 90 {
                return Err(unsupported());
            }
            Ok((GROUP_G4_ARC_DISTANCE, 0))
        }
        93 | 94 => Ok((GROUP_G5_FEED_MODE, mantissa)),
        20 | 21 => Ok((GROUP_G6_UNITS, mantissa)),
        40 => Ok((GROUP_G7_CUTTER, mantissa)),
        43 | 49 => {
            if *axis != AxisCommand::None {
                return Err(conflict());
            }
            *axis = AxisCommand::ToolLength;
            if int == 43 && mantissa != 10 {
                return Err(unsupported());
            }
            Ok((GROUP_G8_TOOL_LENGTH, 0))
        }
        54..=59 => Ok((GROUP_G12_COORD, mantissa)),
        61 if mantissa == 0 => Ok((GROUP_G13_CONTROL, 0)),
        _ => Err(refuse(
            ErrorCode::UnsupportedCommand,
            format!("G{int} is not a GRBL command"),
        )),
    }
}

/// Classifies an `M` word; a default GRBL 1.1 build has no `M7` and no `M56`.
fn m_group(int: u8, mantissa: u16) -> Result<u8, Refusal> {
    if mantissa > 0 {
        return Err(refuse(
            ErrorCode::CommandValueNotInteger,
            format!("M{int}.{mantissa} is not an integer"),
        ));
    }
    match int {
        0 | 1 | 2 | 30 => Ok(GROUP_M4_FLOW),
        3..=5 => Ok(GROUP_M7_SPINDLE),
        8 | 9 => Ok(GROUP_M8_COOLANT),
        _ => Err(refuse(
            ErrorCode::UnsupportedCommand,
            format!("M{int} is not a GRBL command"),
        )),
    }
}

fn word_index(letter: u8) -> usize {
    usize::from(letter.saturating_sub(b'A')).min(25)
}

/// A G-code block, following the word import and the stateless error checks of `gc_execute_line`.
fn parse_gcode(line: &[u8]) -> Result<Command, Refusal> {
    let mut values: [Option<f64>; 26] = [None; 26];
    let mut commands: Vec<(u8, u8, u16)> = Vec::new();
    let mut groups: u32 = 0;
    let mut axis = AxisCommand::None;

    let mut i = 0;
    while let Some(&letter) = line.get(i) {
        if !letter.is_ascii_uppercase() {
            return Err(refuse(
                ErrorCode::ExpectedCommandLetter,
                format!("'{}' where a word letter was expected", char::from(letter)),
            ));
        }
        let Some((value, next)) = read_float(line, i + 1) else {
            return Err(refuse(
                ErrorCode::BadNumberFormat,
                format!("word '{}' has no valid number", char::from(letter)),
            ));
        };
        i = next;
        match letter {
            b'G' | b'M' => {
                // GRBL keeps command numbers in a uint8; it does not wrap here, it refuses.
                if !(0.0..256.0).contains(&value) {
                    return Err(refuse(
                        ErrorCode::UnsupportedCommand,
                        format!("{}{value} is not a GRBL command", char::from(letter)),
                    ));
                }
                let whole = value.trunc();
                let mantissa = (100.0 * (value - whole)).round() as u16;
                let int = whole as u8;
                let (group, left) = if letter == b'G' {
                    g_group(int, mantissa, &mut axis)?
                } else {
                    (m_group(int, mantissa)?, 0)
                };
                if left > 0 {
                    return Err(refuse(
                        ErrorCode::CommandValueNotInteger,
                        format!("G{int}.{mantissa} needs an integer command number"),
                    ));
                }
                if groups & (1 << group) != 0 {
                    return Err(refuse(
                        ErrorCode::ModalGroupViolation,
                        format!(
                            "{}{int} repeats a modal group of the block",
                            char::from(letter)
                        ),
                    ));
                }
                groups |= 1 << group;
                commands.push((letter, int, mantissa));
            }
            b'F' | b'I' | b'J' | b'K' | b'L' | b'N' | b'P' | b'R' | b'S' | b'T' | b'X' | b'Y'
            | b'Z' => {
                if letter == b'T' && value > MAX_TOOL_NUMBER {
                    return Err(refuse(
                        ErrorCode::MaxToolNumberExceeded,
                        format!("T{value} is above 255"),
                    ));
                }
                let Some(slot) = values.get_mut(word_index(letter)) else {
                    return Err(refuse(
                        ErrorCode::UnsupportedCommand,
                        "word letter out of table",
                    ));
                };
                if slot.is_some() {
                    return Err(refuse(
                        ErrorCode::WordRepeated,
                        format!("word '{}' appears twice", char::from(letter)),
                    ));
                }
                if matches!(letter, b'F' | b'N' | b'P' | b'T' | b'S') && value < 0.0 {
                    return Err(refuse(
                        ErrorCode::NegativeValue,
                        format!("word '{}' cannot be negative", char::from(letter)),
                    ));
                }
                *slot = Some(value);
            }
            _ => {
                return Err(refuse(
                    ErrorCode::UnsupportedCommand,
                    format!("word letter '{}' is not supported", char::from(letter)),
                ));
            }
        }
    }

    let get = |letter: u8| values.get(word_index(letter)).copied().flatten();
    let any = |letters: &[u8]| letters.iter().any(|&l| get(l).is_some());
    let has_axis = any(b"XYZ");
    if let Some(n) = get(b'N')
        && n.trunc() > MAX_LINE_NUMBER
    {
        return Err(refuse(
            ErrorCode::InvalidLineNumber,
            format!("N{n} is above {MAX_LINE_NUMBER}"),
        ));
    }
    let unused = |letters: &[u8]| {
        let found: String = letters
            .iter()
            .filter(|&&l| get(l).is_some())
            .map(|&l| char::from(l))
            .collect();
        refuse(
            ErrorCode::UnusedWords,
            format!("words {found} are not used by the block"),
        )
    };

    match commands.as_slice() {
        [] if !has_axis && !any(b"FIJKLPRST") => Ok(Command::Empty),
        [] => Err(outside("a block of value words acting on the modal state")),
        [(b'G', int @ (0 | 1), 0)] => {
            let motion = if *int == 0 {
                Motion::Rapid
            } else {
                Motion::Linear
            };
            if motion == Motion::Linear && get(b'F') == Some(0.0) {
                return Err(refuse(ErrorCode::UndefinedFeedRate, "G1 with F0"));
            }
            if any(b"ST") {
                return Err(outside("S/T words"));
            }
            if any(b"IJKLPR") {
                return Err(unused(b"IJKLPR"));
            }
            Ok(Command::Move {
                motion,
                x_mm: get(b'X'),
                y_mm: get(b'Y'),
                z_mm: get(b'Z'),
                feed_mm_per_min: get(b'F'),
            })
        }
        [(b'G', 4, 0)] => {
            let Some(seconds) = get(b'P') else {
                return Err(refuse(ErrorCode::ValueWordMissing, "G4 needs a P word"));
            };
            if has_axis || any(b"FST") {
                return Err(outside("G4 with motion or F/S/T words"));
            }
            if any(b"IJKLR") {
                return Err(unused(b"IJKLR"));
            }
            Ok(Command::Dwell { seconds })
        }
        [(letter @ (b'G' | b'M'), int, 0)] => {
            let cmd = match (letter, int) {
                (b'G', 90) => Command::Distance(DistanceMode::Absolute),
                (b'G', 91) => Command::Distance(DistanceMode::Incremental),
                (b'G', 21) => Command::Millimetres,
                (b'M', 8) => Command::CLOSE_GRIPPER,
                (b'M', 9) => Command::OPEN_GRIPPER,
                _ => return Err(outside(format!("{}{int}", char::from(*letter)))),
            };
            if has_axis || any(b"FST") {
                return Err(outside("a mode change with motion or F/S/T words"));
            }
            if any(b"IJKLPR") {
                return Err(unused(b"IJKLPR"));
            }
            Ok(cmd)
        }
        _ => Err(outside(format!("block '{}'", lossy(line)))),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Error and alarm codes
// ---------------------------------------------------------------------------------------------------------

/// Generates a code enum with its numbers and the interface document's message and description, so the
/// table is written once.
macro_rules! code_table {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $code:literal, $message:literal, $description:literal;)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $(#[doc = $description] $variant,)*
            /// A code GRBL 1.1 does not define (a newer or forked firmware). Never holds a listed code.
            Unlisted(u8),
        }

        impl $name {
            /// Every listed code, in numeric order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The number on the wire.
            pub const fn code(self) -> u8 {
                match self {
                    $($name::$variant => $code,)*
                    $name::Unlisted(code) => code,
                }
            }

            /// The listed code with this number, or [`Self::Unlisted`].
            pub const fn from_code(code: u8) -> Self {
                match code {
                    $($code => $name::$variant,)*
                    other => $name::Unlisted(other),
                }
            }

            /// Short message (the text GRBL 1.0 printed instead of the number).
            pub const fn message(self) -> &'static str {
                match self {
                    $($name::$variant => $message,)*
                    $name::Unlisted(_) => "Unlisted code",
                }
            }

            /// What the code means, from the interface document.
            pub const fn description(self) -> &'static str {
                match self {
                    $($name::$variant => $description,)*
                    $name::Unlisted(_) => "Not defined by Grbl v1.1.",
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{} {}: {}", self.code(), self.message(), self.description())
            }
        }
    };
}

code_table! {
    /// `error:N` codes of Grbl v1.1.
    ErrorCode {
        ExpectedCommandLetter = 1, "Expected command letter",
            "G-code words consist of a letter and a value. Letter was not found.";
        BadNumberFormat = 2, "Bad number format",
            "Missing the expected G-code word value or numeric value format is not valid.";
        InvalidStatement = 3, "Invalid statement", "Grbl '$' system command was not recognized or supported.";
        NegativeValue = 4, "Value < 0", "Negative value received for an expected positive value.";
        SettingDisabled = 5, "Setting disabled", "Homing cycle failure. Homing is not enabled via settings.";
        StepPulseMin = 6, "Value < 3 usec", "Minimum step pulse time must be greater than 3usec.";
        SettingReadFail = 7, "EEPROM read fail. Using defaults",
            "An EEPROM read failed. Auto-restoring affected EEPROM to default values.";
        NotIdle = 8, "Not idle",
            "Grbl '$' command cannot be used unless Grbl is IDLE. Ensures smooth operation during a job.";
        GcodeLock = 9, "G-code lock", "G-code commands are locked out during alarm or jog state.";
        SoftLimitWithoutHoming = 10, "Homing not enabled",
            "Soft limits cannot be enabled without homing also enabled.";
        LineOverflow = 11, "Line overflow",
            "Max characters per line exceeded. Received command line was not executed.";
        StepRateExceeded = 12, "Step rate > 30kHz",
            "Grbl '$' setting value cause the step rate to exceed the maximum supported.";
        CheckDoor = 13, "Check Door", "Safety door detected as opened and door state initiated.";
        LineLengthExceeded = 14, "Line length exceeded",
            "Build info or startup line exceeded EEPROM line length limit. Line not stored.";
        TravelExceeded = 15, "Travel exceeded", "Jog target exceeds machine travel. Jog command has been ignored.";
        InvalidJogCommand = 16, "Invalid jog command", "Jog command has no '=' or contains prohibited g-code.";
        LaserModeRequiresPwm = 17, "Setting disabled", "Laser mode requires PWM output.";
        UnsupportedCommand = 20, "Unsupported command", "Unsupported or invalid g-code command found in block.";
        ModalGroupViolation = 21, "Modal group violation",
            "More than one g-code command from same modal group found in block.";
        UndefinedFeedRate = 22, "Undefined feed rate", "Feed rate has not yet been set or is undefined.";
        CommandValueNotInteger = 23, "Invalid gcode ID:23", "G-code command in block requires an integer value.";
        AxisCommandConflict = 24, "Invalid gcode ID:24",
            "More than one g-code command that requires axis words found in block.";
        WordRepeated = 25, "Invalid gcode ID:25", "Repeated g-code word found in block.";
        NoAxisWords = 26, "Invalid gcode ID:26",
            "No axis words found in block for g-code command or current modal state which requires them.";
        InvalidLineNumber = 27, "Invalid gcode ID:27", "Line number value is invalid.";
        ValueWordMissing = 28, "Invalid gcode ID:28", "G-code command is missing a required value word.";
        UnsupportedCoordSys = 29, "Invalid gcode ID:29", "G59.x work coordinate systems are not supported.";
        G53InvalidMotionMode = 30, "Invalid gcode ID:30", "G53 only allowed with G0 and G1 motion modes.";
        AxisWordsExist = 31, "Invalid gcode ID:31",
            "Axis words found in block when no command or current modal state uses them.";
        NoAxisWordsInPlane = 32, "Invalid gcode ID:32", "G2 and G3 arcs require at least one in-plane axis word.";
        InvalidTarget = 33, "Invalid gcode ID:33", "Motion command target is invalid.";
        ArcRadiusError = 34, "Invalid gcode ID:34", "Arc radius value is invalid.";
        NoOffsetsInPlane = 35, "Invalid gcode ID:35", "G2 and G3 arcs require at least one in-plane offset word.";
        UnusedWords = 36, "Invalid gcode ID:36", "Unused value words found in block.";
        G43DynamicAxisError = 37, "Invalid gcode ID:37",
            "G43.1 dynamic tool length offset is not assigned to configured tool length axis.";
        MaxToolNumberExceeded = 38, "Invalid gcode ID:38", "Tool number greater than max supported value.";
    }
}

code_table! {
    /// `ALARM:N` codes of Grbl v1.1. Every alarm locks G-code out until `$X` or `$H`.
    AlarmCode {
        HardLimit = 1, "Hard limit",
            "Hard limit has been triggered. Machine position is likely lost due to sudden halt. Re-homing is highly recommended.";
        SoftLimit = 2, "Soft limit",
            "Soft limit alarm. G-code motion target exceeds machine travel. Machine position retained. Alarm may be safely unlocked.";
        AbortDuringCycle = 3, "Abort during cycle",
            "Reset while in motion. Machine position is likely lost due to sudden halt. Re-homing is highly recommended.";
        ProbeFailInitial = 4, "Probe fail",
            "Probe fail. Probe is not in the expected initial state before starting probe cycle when G38.2 and G38.3 is not triggered and G38.4 and G38.5 is triggered.";
        ProbeFailContact = 5, "Probe fail",
            "Probe fail. Probe did not contact the workpiece within the programmed travel for G38.2 and G38.4.";
        HomingFailReset = 6, "Homing fail", "Homing fail. The active homing cycle was reset.";
        HomingFailDoor = 7, "Homing fail", "Homing fail. Safety door was opened during homing cycle.";
        HomingFailPulloff = 8, "Homing fail",
            "Homing fail. Pull off travel failed to clear limit switch. Try increasing pull-off setting or check wiring.";
        HomingFailApproach = 9, "Homing fail",
            "Homing fail. Could not find limit switch within search distances. Try increasing max travel, decreasing pull-off distance, or check wiring.";
        HomingFailDualApproach = 10, "Homing fail",
            "Homing fail. Second dual axis limit switch failed to trigger within configured search distance after first. Try increasing trigger fail distance or check wiring.";
    }
}

// ---------------------------------------------------------------------------------------------------------
// Responses (controller -> host)
// ---------------------------------------------------------------------------------------------------------

/// Sub-state of `Hold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldState {
    /// `Hold:0`: hold complete, ready to resume.
    Complete,
    /// `Hold:1`: decelerating; a reset now throws an alarm.
    InProgress,
}

/// Sub-state of `Door`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DoorState {
    /// `Door:0`: door closed, ready to resume.
    Closed,
    /// `Door:1`: machine stopped, door still ajar; cannot resume until closed.
    Ajar,
    /// `Door:2`: door opened, hold or parking retract in progress.
    Parking,
    /// `Door:3`: door closed and resuming, restoring from park.
    Resuming,
}

/// The first field of a status report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MachineState {
    Idle,
    Run,
    Hold(HoldState),
    Jog,
    Alarm,
    Door(DoorState),
    Check,
    Home,
    Sleep,
}

/// Three axis values in millimetres (GRBL reports millimetres while `$13=0`, as labctl configures it).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Xyz {
    pub x_mm: f64,
    pub y_mm: f64,
    pub z_mm: f64,
}

/// The position field: `$10` chooses which one GRBL sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Position {
    /// `MPos:`: machine coordinates.
    Machine(Xyz),
    /// `WPos:`: work coordinates (`MPos - WCO`).
    Work(Xyz),
}

/// `Bf:` free space in GRBL's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufferState {
    pub planner_blocks_free: u16,
    pub rx_bytes_free: u16,
}

/// `F:` or `FS:` actual feed rate and, with a variable spindle, spindle speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedSpeed {
    pub feed_mm_per_min: f64,
    /// `Some` for `FS:`, `None` for `F:`.
    pub spindle_rpm: Option<f64>,
}

/// `Pn:` input pins GRBL sees as triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pins {
    pub probe: bool,
    pub limit_x: bool,
    pub limit_y: bool,
    pub limit_z: bool,
    pub door: bool,
    pub reset: bool,
    pub feed_hold: bool,
    pub cycle_start: bool,
}

/// `Ov:` override values in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Overrides {
    pub feed_percent: u8,
    pub rapid_percent: u8,
    pub spindle_percent: u8,
}

/// `A:` accessory outputs that are on. `flood` is labctl's gripper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Accessories {
    pub spindle_cw: bool,
    pub spindle_ccw: bool,
    pub flood: bool,
    pub mist: bool,
}

/// `<...>` real-time status report. Only the state and the position are always present.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    pub state: MachineState,
    pub position: Position,
    pub buffer: Option<BufferState>,
    /// `Ln:` line number being executed.
    pub line_number: Option<u32>,
    pub feed: Option<FeedSpeed>,
    pub pins: Option<Pins>,
    /// `WCO:` work coordinate offset, sent every few reports.
    pub work_offset: Option<Xyz>,
    pub overrides: Option<Overrides>,
    pub accessories: Option<Accessories>,
    /// Fields this codec does not know, verbatim and in order, so newer firmware is not fatal.
    pub unknown: Vec<String>,
}

/// `[OPT:codes,blocks,rx]` from `$I`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Option letters such as `V` (variable spindle) or `L` (homing init lock).
    pub codes: String,
    pub planner_blocks: u16,
    pub rx_buffer_bytes: u16,
    /// Further comma-separated values some builds add.
    pub extra: Vec<String>,
}

/// `[GC:...]` parser state from `$G`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParserState {
    /// Active modal words in GRBL's order, e.g. `G0 G54 G17 G21 G90 G94 M5 M9`.
    pub modes: Vec<String>,
    pub tool: Option<u8>,
    pub feed_mm_per_min: Option<f64>,
    pub spindle_rpm: Option<f64>,
}

impl ParserState {
    /// Whether a modal word (`"G91"`, `"M8"`...) is active.
    pub fn is_active(&self, mode: &str) -> bool {
        self.modes.iter().any(|m| m == mode)
    }
}

/// One line from the controller.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `ok`: the line was parsed and executed or queued.
    Ok,
    /// `error:N`: the line was refused and nothing of it was executed.
    Error(ErrorCode),
    /// `ALARM:N`: G-code is locked out until `$X` or `$H`.
    Alarm(AlarmCode),
    Status(StatusReport),
    /// `Grbl 1.1h ['$' for help]` after power-up or reset; GRBL sends an empty line before it.
    Welcome {
        version: String,
    },
    /// `[MSG:...]` feedback.
    Message(String),
    /// `[VER:1.1h.20190825:build info]`.
    Version {
        version: String,
        build_info: String,
    },
    /// `[OPT:...]`.
    Options(BuildOptions),
    /// `[GC:...]`.
    ParserState(ParserState),
    /// Any other `[TAG:text]` feedback (`HLP`, `G54`, `PRB`, `TLO`, `echo`...), verbatim.
    Feedback {
        tag: String,
        text: String,
    },
    /// `$N=value` from `$$`.
    Setting {
        number: u16,
        value: f64,
    },
    /// `$Nx=line` from `$N`.
    StartupLine {
        index: u8,
        line: String,
    },
}

/// Writes one response exactly as GRBL prints it (fixed decimals, `\r\n`).
pub fn encode_response(resp: &Response, out: &mut Vec<u8>) {
    let line = match resp {
        Response::Ok => "ok".to_owned(),
        Response::Error(code) => format!("error:{}", code.code()),
        Response::Alarm(code) => format!("ALARM:{}", code.code()),
        Response::Status(report) => encode_status(report),
        Response::Welcome { version } => format!("\r\nGrbl {version} ['$' for help]"),
        Response::Message(text) => format!("[MSG:{text}]"),
        Response::Version {
            version,
            build_info,
        } => format!("[VER:{version}:{build_info}]"),
        Response::Options(opt) => {
            let mut line = format!(
                "[OPT:{},{},{}",
                opt.codes, opt.planner_blocks, opt.rx_buffer_bytes
            );
            for extra in &opt.extra {
                line.push(',');
                line.push_str(extra);
            }
            line.push(']');
            line
        }
        Response::ParserState(gc) => {
            let mut words = gc.modes.clone();
            if let Some(tool) = gc.tool {
                words.push(format!("T{tool}"));
            }
            if let Some(feed) = gc.feed_mm_per_min {
                words.push(format!("F{}", fixed(feed, 0)));
            }
            if let Some(speed) = gc.spindle_rpm {
                words.push(format!("S{}", fixed(speed, 0)));
            }
            format!("[GC:{}]", words.join(" "))
        }
        Response::Feedback { tag, text } => format!("[{tag}:{text}]"),
        Response::Setting { number, value } => {
            format!("${number}={}", fixed(*value, setting_decimals(*number)))
        }
        Response::StartupLine { index, line } => format!("$N{index}={line}"),
    };
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Decimals GRBL prints for each setting in `$$` (integers, 3 for lengths and rates, 0 for RPM).
fn setting_decimals(number: u16) -> usize {
    match number {
        0..=10 | 13 | 20..=23 | 26 | 30..=32 => 0,
        _ => 3,
    }
}

fn encode_xyz(xyz: &Xyz) -> String {
    format!(
        "{},{},{}",
        fixed(xyz.x_mm, 3),
        fixed(xyz.y_mm, 3),
        fixed(xyz.z_mm, 3)
    )
}

/// A status report in GRBL's field order: state, position, Bf, Ln, F/FS, Pn, WCO, Ov, A, then unknown ones.
fn encode_status(r: &StatusReport) -> String {
    let mut s = String::from("<");
    s.push_str(&match r.state {
        MachineState::Idle => "Idle".to_owned(),
        MachineState::Run => "Run".to_owned(),
        MachineState::Hold(HoldState::Complete) => "Hold:0".to_owned(),
        MachineState::Hold(HoldState::InProgress) => "Hold:1".to_owned(),
        MachineState::Jog => "Jog".to_owned(),
        MachineState::Alarm => "Alarm".to_owned(),
        MachineState::Door(door) => format!(
            "Door:{}",
            match door {
                DoorState::Closed => 0,
                DoorState::Ajar => 1,
                DoorState::Parking => 2,
                DoorState::Resuming => 3,
            }
        ),
        MachineState::Check => "Check".to_owned(),
        MachineState::Home => "Home".to_owned(),
        MachineState::Sleep => "Sleep".to_owned(),
    });
    match &r.position {
        Position::Machine(xyz) => s.push_str(&format!("|MPos:{}", encode_xyz(xyz))),
        Position::Work(xyz) => s.push_str(&format!("|WPos:{}", encode_xyz(xyz))),
    }
    if let Some(bf) = r.buffer {
        s.push_str(&format!(
            "|Bf:{},{}",
            bf.planner_blocks_free, bf.rx_bytes_free
        ));
    }
    if let Some(ln) = r.line_number {
        s.push_str(&format!("|Ln:{ln}"));
    }
    match r.feed {
        Some(FeedSpeed {
            feed_mm_per_min,
            spindle_rpm: Some(rpm),
        }) => {
            s.push_str(&format!(
                "|FS:{},{}",
                fixed(feed_mm_per_min, 0),
                fixed(rpm, 0)
            ));
        }
        Some(FeedSpeed {
            feed_mm_per_min,
            spindle_rpm: None,
        }) => {
            s.push_str(&format!("|F:{}", fixed(feed_mm_per_min, 0)));
        }
        None => {}
    }
    if let Some(p) = r.pins {
        s.push_str("|Pn:");
        for (on, c) in [
            (p.probe, 'P'),
            (p.limit_x, 'X'),
            (p.limit_y, 'Y'),
            (p.limit_z, 'Z'),
            (p.door, 'D'),
            (p.reset, 'R'),
            (p.feed_hold, 'H'),
            (p.cycle_start, 'S'),
        ] {
            if on {
                s.push(c);
            }
        }
    }
    if let Some(wco) = &r.work_offset {
        s.push_str(&format!("|WCO:{}", encode_xyz(wco)));
    }
    if let Some(ov) = r.overrides {
        s.push_str(&format!(
            "|Ov:{},{},{}",
            ov.feed_percent, ov.rapid_percent, ov.spindle_percent
        ));
    }
    if let Some(a) = r.accessories {
        s.push_str("|A:");
        for (on, c) in [
            (a.spindle_cw, 'S'),
            (a.spindle_ccw, 'C'),
            (a.flood, 'F'),
            (a.mist, 'M'),
        ] {
            if on {
                s.push(c);
            }
        }
    }
    for field in &r.unknown {
        s.push('|');
        s.push_str(field);
    }
    s.push('>');
    s
}

/// Host side: decodes the line at the front of `buf`. Empty lines (GRBL sends one before its welcome
/// banner) are absorbed into the next frame's `consumed`.
pub fn decode_response(buf: &[u8]) -> Result<Decoded<Response>, DecodeError> {
    let blank = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let rest = buf.get(blank..).unwrap_or_default();
    if rest.is_empty() {
        if blank > MAX_LINE {
            return Err(DecodeError::new(
                PROTOCOL,
                buf,
                "nothing but line terminators",
            ));
        }
        return Ok(Decoded::Incomplete);
    }
    match split_line(PROTOCOL, rest, false) {
        Ok(None) => Ok(Decoded::Incomplete),
        Err(mut error) => {
            error.skip += blank;
            Err(error)
        }
        Ok(Some((line, used))) => {
            let consumed = blank + used;
            parse_response(line)
                .map(|value| Decoded::Frame { value, consumed })
                .map_err(|reason| {
                    DecodeError::new(PROTOCOL, buf.get(..consumed).unwrap_or(buf), reason)
                })
        }
    }
}

fn parse_response(line: &[u8]) -> Result<Response, String> {
    let text = std::str::from_utf8(line).map_err(|_| "line is not UTF-8".to_owned())?;
    if text.chars().any(char::is_control) {
        return Err("control character inside a line".into());
    }
    if text == "ok" {
        return Ok(Response::Ok);
    }
    if let Some(code) = text.strip_prefix("error:") {
        return parse_uint::<u8>(code)
            .map(|c| Response::Error(ErrorCode::from_code(c)))
            .ok_or_else(|| format!("bad error code {code:?}"));
    }
    if let Some(code) = text.strip_prefix("ALARM:") {
        return parse_uint::<u8>(code)
            .map(|c| Response::Alarm(AlarmCode::from_code(c)))
            .ok_or_else(|| format!("bad alarm code {code:?}"));
    }
    if let Some(body) = text.strip_prefix('<').and_then(|t| t.strip_suffix('>')) {
        return parse_status(body).map(Response::Status);
    }
    if let Some(body) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return parse_feedback(body);
    }
    if let Some(version) = text
        .strip_prefix("Grbl ")
        .and_then(|t| t.strip_suffix(" ['$' for help]"))
    {
        if version.is_empty() || version.contains(' ') {
            return Err(format!("bad version in welcome banner {text:?}"));
        }
        return Ok(Response::Welcome {
            version: version.to_owned(),
        });
    }
    if let Some(setting) = text.strip_prefix('$') {
        let (name, value) = setting.split_once('=').ok_or("setting line without '='")?;
        if let Some(index) = name.strip_prefix('N') {
            let index = parse_uint::<u8>(index).ok_or("bad startup line index")?;
            return Ok(Response::StartupLine {
                index,
                line: value.to_owned(),
            });
        }
        let number = parse_uint::<u16>(name).ok_or("bad setting number")?;
        let value =
            parse_decimal(value).ok_or_else(|| format!("bad value in setting line {text:?}"))?;
        return Ok(Response::Setting { number, value });
    }
    Err(format!("unrecognised line {text:?}"))
}

fn parse_feedback(body: &str) -> Result<Response, String> {
    let (tag, text) = body.split_once(':').ok_or("feedback message without ':'")?;
    match tag {
        "MSG" => Ok(Response::Message(text.to_owned())),
        "VER" => {
            let (version, build_info) = text
                .split_once(':')
                .ok_or("[VER:] without ':' before build info")?;
            Ok(Response::Version {
                version: version.to_owned(),
                build_info: build_info.to_owned(),
            })
        }
        "OPT" => {
            let mut fields = text.split(',');
            let codes = fields.next().unwrap_or_default().to_owned();
            let planner_blocks = fields
                .next()
                .and_then(parse_uint::<u16>)
                .ok_or("[OPT:] without planner block count")?;
            let rx_buffer_bytes = fields
                .next()
                .and_then(parse_uint::<u16>)
                .ok_or("[OPT:] without RX buffer size")?;
            let extra = fields.map(str::to_owned).collect();
            Ok(Response::Options(BuildOptions {
                codes,
                planner_blocks,
                rx_buffer_bytes,
                extra,
            }))
        }
        "GC" => parse_parser_state(text).map(Response::ParserState),
        _ if !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric()) => {
            Ok(Response::Feedback {
                tag: tag.to_owned(),
                text: text.to_owned(),
            })
        }
        _ => Err(format!("bad feedback tag {tag:?}")),
    }
}

fn parse_parser_state(text: &str) -> Result<ParserState, String> {
    let mut gc = ParserState {
        modes: Vec::new(),
        tool: None,
        feed_mm_per_min: None,
        spindle_rpm: None,
    };
    if text.is_empty() {
        return Ok(gc);
    }
    for word in text.split(' ') {
        let Some(letter) = word.chars().next() else {
            return Err("empty word in [GC:]".into());
        };
        let value = word.get(1..).unwrap_or_default();
        let twice = || format!("word {letter} twice in [GC:]");
        match letter {
            'G' | 'M' if parse_decimal(value).is_some() => gc.modes.push(word.to_owned()),
            'T' if gc.tool.is_none() => {
                gc.tool = Some(parse_uint(value).ok_or("bad tool in [GC:]")?)
            }
            'F' if gc.feed_mm_per_min.is_none() => {
                gc.feed_mm_per_min = Some(parse_decimal(value).ok_or("bad feed in [GC:]")?);
            }
            'S' if gc.spindle_rpm.is_none() => {
                gc.spindle_rpm = Some(parse_decimal(value).ok_or("bad speed in [GC:]")?);
            }
            'T' | 'F' | 'S' => return Err(twice()),
            _ => return Err(format!("unexpected word {word:?} in [GC:]")),
        }
    }
    Ok(gc)
}

fn parse_status(body: &str) -> Result<StatusReport, String> {
    let mut fields = body.split('|');
    let state = match fields.next().unwrap_or_default() {
        "Idle" => MachineState::Idle,
        "Run" => MachineState::Run,
        "Hold:0" => MachineState::Hold(HoldState::Complete),
        "Hold:1" => MachineState::Hold(HoldState::InProgress),
        "Jog" => MachineState::Jog,
        "Alarm" => MachineState::Alarm,
        "Door:0" => MachineState::Door(DoorState::Closed),
        "Door:1" => MachineState::Door(DoorState::Ajar),
        "Door:2" => MachineState::Door(DoorState::Parking),
        "Door:3" => MachineState::Door(DoorState::Resuming),
        "Check" => MachineState::Check,
        "Home" => MachineState::Home,
        "Sleep" => MachineState::Sleep,
        other => return Err(format!("unknown machine state {other:?}")),
    };
    let mut position = None;
    let mut report = StatusReport {
        state,
        position: Position::Machine(Xyz::default()),
        buffer: None,
        line_number: None,
        feed: None,
        pins: None,
        work_offset: None,
        overrides: None,
        accessories: None,
        unknown: Vec::new(),
    };
    for field in fields {
        let Some((name, value)) = field.split_once(':') else {
            report.unknown.push(field.to_owned());
            continue;
        };
        let bad = || format!("bad status field {field:?}");
        let twice = || format!("status field {name} twice");
        match name {
            "MPos" | "WPos" => {
                if position.is_some() {
                    return Err("two position fields".into());
                }
                let xyz = parse_xyz(value).ok_or_else(bad)?;
                position = Some(if name == "MPos" {
                    Position::Machine(xyz)
                } else {
                    Position::Work(xyz)
                });
            }
            "Bf" => {
                let (blocks, bytes) = value.split_once(',').ok_or_else(bad)?;
                let bf = BufferState {
                    planner_blocks_free: parse_uint(blocks).ok_or_else(bad)?,
                    rx_bytes_free: parse_uint(bytes).ok_or_else(bad)?,
                };
                set_once(&mut report.buffer, bf).ok_or_else(twice)?;
            }
            "Ln" => set_once(&mut report.line_number, parse_uint(value).ok_or_else(bad)?)
                .ok_or_else(twice)?,
            "F" => {
                let feed = FeedSpeed {
                    feed_mm_per_min: parse_decimal(value).ok_or_else(bad)?,
                    spindle_rpm: None,
                };
                set_once(&mut report.feed, feed).ok_or_else(twice)?;
            }
            "FS" => {
                let (feed, speed) = value.split_once(',').ok_or_else(bad)?;
                let feed = FeedSpeed {
                    feed_mm_per_min: parse_decimal(feed).ok_or_else(bad)?,
                    spindle_rpm: Some(parse_decimal(speed).ok_or_else(bad)?),
                };
                set_once(&mut report.feed, feed).ok_or_else(twice)?;
            }
            "Pn" => {
                let mut pins = Pins::default();
                for c in value.chars() {
                    let pin = match c {
                        'P' => &mut pins.probe,
                        'X' => &mut pins.limit_x,
                        'Y' => &mut pins.limit_y,
                        'Z' => &mut pins.limit_z,
                        'D' => &mut pins.door,
                        'R' => &mut pins.reset,
                        'H' => &mut pins.feed_hold,
                        'S' => &mut pins.cycle_start,
                        _ => return Err(bad()),
                    };
                    *pin = true;
                }
                set_once(&mut report.pins, pins).ok_or_else(twice)?;
            }
            "WCO" => set_once(&mut report.work_offset, parse_xyz(value).ok_or_else(bad)?)
                .ok_or_else(twice)?,
            "Ov" => {
                let mut parts = value.split(',').map(parse_uint::<u8>);
                let (Some(Some(feed)), Some(Some(rapid)), Some(Some(spindle)), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad());
                };
                let ov = Overrides {
                    feed_percent: feed,
                    rapid_percent: rapid,
                    spindle_percent: spindle,
                };
                set_once(&mut report.overrides, ov).ok_or_else(twice)?;
            }
            "A" => {
                let mut acc = Accessories::default();
                for c in value.chars() {
                    let output = match c {
                        'S' => &mut acc.spindle_cw,
                        'C' => &mut acc.spindle_ccw,
                        'F' => &mut acc.flood,
                        'M' => &mut acc.mist,
                        _ => return Err(bad()),
                    };
                    *output = true;
                }
                set_once(&mut report.accessories, acc).ok_or_else(twice)?;
            }
            _ => report.unknown.push(field.to_owned()),
        }
    }
    report.position = position.ok_or("status report without MPos or WPos")?;
    Ok(report)
}

/// Stores `value` in an empty slot; `None` if the slot was already filled (a repeated field).
fn set_once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

fn parse_xyz(value: &str) -> Option<Xyz> {
    let mut parts = value.split(',').map(parse_decimal);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Some(x_mm)), Some(Some(y_mm)), Some(Some(z_mm)), None) => {
            Some(Xyz { x_mm, y_mm, z_mm })
        }
        _ => None,
    }
}

/// A plain decimal as GRBL prints it (`-12.500`, `0`, `.5`): no exponent, no `inf`/`NaN`.
fn parse_decimal(s: &str) -> Option<f64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let valid = digits.bytes().any(|b| b.is_ascii_digit())
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1;
    if valid { s.parse().ok() } else { None }
}

/// An unsigned integer made only of ASCII digits.
fn parse_uint<T: std::str::FromStr>(s: &str) -> Option<T> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Fixed decimals like GRBL's `printFloat`; a negative zero prints as `0`, as GRBL never sees one.
fn fixed(v: f64, decimals: usize) -> String {
    let v = if v == 0.0 { 0.0 } else { v };
    format!("{v:.decimals$}")
}

/// At most three decimals with trailing zeros dropped: shorter lines, same value for GRBL.
fn short_number(v: f64) -> String {
    let mut s = fixed(v, 3);
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s == "-0" { "0".to_owned() } else { s }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The decimals a status report prints its position with (`MPos:` or `WPos:`): GRBL prints every axis with
/// the same fixed number (3 in millimetres, 4 in inches: `N_DECIMAL_COORDVALUE_MM/INCH`), so a coordinate
/// with another count, or without a digit before or after its point, lost or gained bytes on the line.
/// `None` when the frame has no position field.
pub fn position_decimals(frame: &[u8]) -> Option<Result<usize, FixedPointError>> {
    let text = std::str::from_utf8(frame).ok()?;
    let start = text.find("Pos:")? + "Pos:".len();
    let rest = &text[start..];
    let field = &rest[..rest.find(['|', '>']).unwrap_or(rest.len())];
    let axis = |i: usize| {
        ["X", "Y", "Z"]
            .get(i)
            .copied()
            .unwrap_or("extra")
            .to_owned()
    };
    common_decimals(field.split(','), &['-'], axis).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_cmd(bytes: &[u8]) -> (Command, usize) {
        match decode_command(bytes) {
            Ok(Decoded::Frame { value, consumed }) => (value, consumed),
            other => panic!(
                "{:?}: expected a frame, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    fn cmd(bytes: &[u8]) -> Command {
        let (value, consumed) = decode_cmd(bytes);
        assert_eq!(
            consumed,
            bytes.len(),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
        value
    }

    fn rejected(bytes: &[u8]) -> Rejection {
        match check_command(bytes) {
            Err(rejection) => rejection,
            other => panic!(
                "{:?}: expected a rejection, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    /// The reply GRBL sends for a refused line, checking the refusal drops exactly that line.
    fn reply(bytes: &[u8]) -> u8 {
        let rejection = rejected(bytes);
        assert_eq!(rejection.error.skip, bytes.len());
        assert!(!rejection.outside_subset, "{rejection:?}");
        rejection.reply.expect("a reply").code()
    }

    fn resp(bytes: &[u8]) -> Response {
        match decode_response(bytes) {
            Ok(Decoded::Frame { value, consumed }) => {
                assert_eq!(
                    consumed,
                    bytes.len(),
                    "{:?}",
                    String::from_utf8_lossy(bytes)
                );
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

    fn moving(
        motion: Motion,
        x: Option<f64>,
        y: Option<f64>,
        z: Option<f64>,
        f: Option<f64>,
    ) -> Command {
        Command::Move {
            motion,
            x_mm: x,
            y_mm: y,
            z_mm: z,
            feed_mm_per_min: f,
        }
    }

    #[test]
    fn realtime_bytes_from_the_interface_document() {
        assert_eq!(cmd(b"?"), Command::Realtime(Realtime::StatusReport));
        assert_eq!(cmd(b"!"), Command::Realtime(Realtime::FeedHold));
        assert_eq!(cmd(b"~"), Command::Realtime(Realtime::CycleStart));
        assert_eq!(cmd(b"\x18"), Command::Realtime(Realtime::SoftReset));
        assert_eq!(cmd(b"\x85"), Command::Realtime(Realtime::JogCancel));
        assert_eq!(cmd(b"\xA0"), Command::Realtime(Realtime::FloodToggle));
        assert_eq!(
            encoded_cmd(&Command::Realtime(Realtime::StatusReport)),
            b"?"
        );
        assert_eq!(
            encoded_cmd(&Command::Realtime(Realtime::SoftReset)),
            b"\x18"
        );
        // A real-time byte needs no newline and is taken before the following line.
        assert_eq!(
            decode_cmd(b"?G0 X1\n"),
            (Command::Realtime(Realtime::StatusReport), 1)
        );
    }

    #[test]
    fn gcode_lines_decode_and_encode() {
        assert_eq!(
            cmd(b"G0 X10 Y20 Z-5\n"),
            moving(Motion::Rapid, Some(10.0), Some(20.0), Some(-5.0), None)
        );
        assert_eq!(
            cmd(b"G1 X1.5 F1500\r\n"),
            moving(Motion::Linear, Some(1.5), None, None, Some(1500.0))
        );
        assert_eq!(
            cmd(b"g1x.5f100\n"),
            moving(Motion::Linear, Some(0.5), None, None, Some(100.0))
        );
        assert_eq!(cmd(b"G0\n"), moving(Motion::Rapid, None, None, None, None));
        assert_eq!(cmd(b"G90\n"), Command::Distance(DistanceMode::Absolute));
        assert_eq!(cmd(b"G91\n"), Command::Distance(DistanceMode::Incremental));
        assert_eq!(cmd(b"G21\n"), Command::Millimetres);
        assert_eq!(cmd(b"G4 P0.5\n"), Command::Dwell { seconds: 0.5 });
        assert_eq!(cmd(b"M8\n"), Command::CLOSE_GRIPPER);
        assert_eq!(cmd(b"M9\n"), Command::OPEN_GRIPPER);
        assert_eq!(
            cmd(b"N10 G0 X1 (park) ; done\n"),
            moving(Motion::Rapid, Some(1.0), None, None, None)
        );
        assert_eq!(cmd(b"\n"), Command::Empty);
        assert_eq!(cmd(b"(just a comment)\n"), Command::Empty);

        let line = |c: &Command| String::from_utf8(encoded_cmd(c)).unwrap();
        assert_eq!(
            line(&moving(
                Motion::Linear,
                Some(10.0),
                None,
                Some(-0.25),
                Some(1500.0)
            )),
            "G1 X10 Z-0.25 F1500\n"
        );
        assert_eq!(line(&Command::Dwell { seconds: 0.5 }), "G4 P0.5\n");
        assert_eq!(line(&Command::CLOSE_GRIPPER), "M8\n");
        assert_eq!(line(&Command::Distance(DistanceMode::Incremental)), "G91\n");
        assert_eq!(line(&Command::Empty), "\n");
    }

    #[test]
    fn system_commands_decode_and_encode() {
        for (text, expected) in [
            (&b"$\n"[..], Command::Help),
            (b"$$\n", Command::ViewSettings),
            (b"$G\n", Command::ViewParserState),
            (b"$I\n", Command::ViewBuildInfo),
            (b"$X\n", Command::KillAlarmLock),
            (b"$H\n", Command::Home),
            (b"$h\n", Command::Home),
            (
                b"$100=250.000\n",
                Command::SetSetting {
                    number: 100,
                    value: 250.0,
                },
            ),
            (
                b"$22=1\n",
                Command::SetSetting {
                    number: 22,
                    value: 1.0,
                },
            ),
        ] {
            assert_eq!(cmd(text), expected);
        }
        assert_eq!(encoded_cmd(&Command::Home), b"$H\n");
        assert_eq!(encoded_cmd(&Command::ViewSettings), b"$$\n");
        assert_eq!(
            encoded_cmd(&Command::SetSetting {
                number: 11,
                value: 0.01
            }),
            b"$11=0.01\n"
        );
    }

    #[test]
    fn refused_lines_get_the_controllers_error_code() {
        assert_eq!(reply(b"G5\n"), 20); // no such G-code
        assert_eq!(reply(b"M7\n"), 20); // mist is not in a default build
        assert_eq!(reply(b"Q1\n"), 20); // unsupported word letter
        assert_eq!(reply(b"G0 G1 X1\n"), 24); // two axis commands
        assert_eq!(reply(b"G90 G91\n"), 21);
        assert_eq!(reply(b"M8 M9\n"), 21);
        assert_eq!(reply(b"1X\n"), 1);
        assert_eq!(reply(b"G0 X\n"), 2);
        assert_eq!(reply(b"G1 F-100\n"), 4);
        assert_eq!(reply(b"G4 P-1\n"), 4);
        assert_eq!(reply(b"G1 X1 X2\n"), 25);
        assert_eq!(reply(b"G1.5 X1\n"), 23);
        assert_eq!(reply(b"M8.5\n"), 23);
        assert_eq!(reply(b"T256\n"), 38);
        assert_eq!(reply(b"N10000001 G0\n"), 27);
        assert_eq!(reply(b"G4\n"), 28);
        assert_eq!(reply(b"G1 X1 F0\n"), 22);
        assert_eq!(reply(b"G0 X1 P2\n"), 36);
        assert_eq!(reply(b"M9 R1\n"), 36);
        let long = format!("G0 X{}\n", "1".repeat(80));
        assert_eq!(reply(long.as_bytes()), 11);
        assert_eq!(reply(b"$Q\n"), 2);
        assert_eq!(reply(b"$HX\n"), 3);
        assert_eq!(reply(b"$XX\n"), 3);
        assert_eq!(reply(b"$14=1\n"), 3);
        assert_eq!(reply(b"$300=1\n"), 3);
        assert_eq!(reply(b"$1\n"), 3);
        assert_eq!(reply(b"$1=-1\n"), 4);
        assert_eq!(reply(b"$0=2\n"), 6);
        assert_eq!(reply(b"$J\n"), 3);
    }

    #[test]
    fn valid_grbl_outside_the_subset_is_flagged() {
        for line in [
            &b"G2 X1 Y1 R5\n"[..],
            b"G54\n",
            b"G20\n",
            b"$J=G91 X1 F100\n",
            b"X10\n",
            b"M3 S1000\n",
        ] {
            let rejection = rejected(line);
            assert!(rejection.outside_subset, "{rejection:?}");
            assert_eq!(rejection.reply, Some(ErrorCode::UnsupportedCommand));
            assert_eq!(rejection.error.skip, line.len());
        }
    }

    #[test]
    fn realtime_bytes_inside_a_line_are_picked_off() {
        // The line never sees them (GRBL's interrupt took them) ...
        assert_eq!(
            cmd(b"G0 X1?0\n"),
            moving(Motion::Rapid, Some(10.0), None, None, None)
        );
        // ... and pick_realtime hands them over in arrival order, leaving the line intact.
        let mut buf = b"G0 X1?0!\n\xFF".to_vec();
        assert_eq!(
            pick_realtime(&mut buf),
            vec![Realtime::StatusReport, Realtime::FeedHold]
        );
        assert_eq!(buf, b"G0 X10\n");
        // A stray byte above 0x7F is dropped silently, without an error reply.
        let rejection = rejected(b"\xFFok");
        assert_eq!((rejection.reply, rejection.error.skip), (None, 1));
    }

    #[test]
    fn partial_lines_are_incomplete() {
        assert_eq!(decode_command(b"G0 X1").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_command(b"").unwrap(), Decoded::Incomplete);
        assert_eq!(
            decode_response(b"<Idle|MPos:0.000").unwrap(),
            Decoded::Incomplete
        );
        assert_eq!(decode_response(b"ok").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_response(b"\r\n").unwrap(), Decoded::Incomplete);
    }

    #[test]
    fn garbage_then_a_valid_frame() {
        let mut buf = b"%%garbage%%\nG0 X1\n".to_vec();
        let rejection = rejected(&buf);
        assert_eq!(rejection.reply, Some(ErrorCode::ExpectedCommandLetter));
        buf.drain(..rejection.error.skip);
        assert_eq!(
            cmd(&buf),
            moving(Motion::Rapid, Some(1.0), None, None, None)
        );

        let mut buf = b"\x00\x01noise\r\nok\r\n".to_vec();
        let error = decode_response(&buf).unwrap_err();
        assert_eq!(error.skip, 9);
        buf.drain(..error.skip);
        assert_eq!(resp(&buf), Response::Ok);
    }

    #[test]
    fn status_reports_interleaved_with_responses_are_separated() {
        let stream = b"ok\r\n<Run|MPos:1.000,2.000,3.000|FS:500,0>\r\nerror:22\r\n<Idle|MPos:0.000,0.000,0.000|FS:0,0>\r\nok\r\n";
        // Feed the stream in awkward chunks to check partial frames are kept.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in stream.chunks(7) {
            buf.extend_from_slice(chunk);
            while let Decoded::Frame { value, consumed } = decode_response(&buf).unwrap() {
                got.push(value);
                buf.drain(..consumed);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], Response::Ok);
        let Response::Status(run) = &got[1] else {
            panic!("{:?}", got[1])
        };
        assert_eq!(run.state, MachineState::Run);
        assert_eq!(
            run.position,
            Position::Machine(Xyz {
                x_mm: 1.0,
                y_mm: 2.0,
                z_mm: 3.0
            })
        );
        assert_eq!(got[2], Response::Error(ErrorCode::UndefinedFeedRate));
        assert!(matches!(&got[3], Response::Status(s) if s.state == MachineState::Idle));
        assert_eq!(got[4], Response::Ok);
    }

    #[test]
    fn status_reports_from_the_interface_document() {
        let Response::Status(r) = resp(b"<Idle|MPos:0.000,0.000,0.000|FS:0.0,0>\r\n") else {
            panic!()
        };
        assert_eq!(r.state, MachineState::Idle);
        assert_eq!(
            r.feed,
            Some(FeedSpeed {
                feed_mm_per_min: 0.0,
                spindle_rpm: Some(0.0)
            })
        );

        let text = b"<Hold:0|WPos:-2.500,0.000,11.000|Bf:15,128|Ln:99999|FS:500,8000|Pn:PZ|WCO:0.000,1.551,5.664|Ov:100,100,100|A:SFM>\r\n";
        let Response::Status(r) = resp(text) else {
            panic!()
        };
        assert_eq!(r.state, MachineState::Hold(HoldState::Complete));
        assert_eq!(
            r.position,
            Position::Work(Xyz {
                x_mm: -2.5,
                y_mm: 0.0,
                z_mm: 11.0
            })
        );
        assert_eq!(
            r.buffer,
            Some(BufferState {
                planner_blocks_free: 15,
                rx_bytes_free: 128
            })
        );
        assert_eq!(r.line_number, Some(99999));
        assert_eq!(
            r.feed,
            Some(FeedSpeed {
                feed_mm_per_min: 500.0,
                spindle_rpm: Some(8000.0)
            })
        );
        assert_eq!(
            r.pins,
            Some(Pins {
                probe: true,
                limit_z: true,
                ..Pins::default()
            })
        );
        assert_eq!(
            r.work_offset,
            Some(Xyz {
                x_mm: 0.0,
                y_mm: 1.551,
                z_mm: 5.664
            })
        );
        assert_eq!(
            r.overrides,
            Some(Overrides {
                feed_percent: 100,
                rapid_percent: 100,
                spindle_percent: 100
            })
        );
        assert_eq!(
            r.accessories,
            Some(Accessories {
                spindle_cw: true,
                flood: true,
                mist: true,
                ..Default::default()
            })
        );
        assert!(r.unknown.is_empty());
        // GRBL's own encoder order reproduces the document's line byte for byte.
        assert_eq!(encoded_resp(&Response::Status(r)), text);

        let Response::Status(r) = resp(b"<Door:1|MPos:0.000,-10.000,5.000|F:500|SD:3,x.nc>\r\n")
        else {
            panic!()
        };
        assert_eq!(r.state, MachineState::Door(DoorState::Ajar));
        assert_eq!(
            r.feed,
            Some(FeedSpeed {
                feed_mm_per_min: 500.0,
                spindle_rpm: None
            })
        );
        assert_eq!(r.unknown, vec!["SD:3,x.nc".to_owned()]);

        for bad in [
            &b"<Idle|FS:0,0>\r\n"[..],
            b"<Idle|MPos:0,0>\r\n",
            b"<Idle|MPos:0,0,0|MPos:0,0,0>\r\n",
            b"<Hold|MPos:0,0,0>\r\n",
            b"<Idle|MPos:0,0,NaN>\r\n",
            b"<Idle|MPos:0,0,0|Pn:Q>\r\n",
        ] {
            let error = decode_response(bad).unwrap_err();
            assert_eq!(error.skip, bad.len(), "{error}");
        }
    }

    #[test]
    fn other_responses_from_the_interface_document() {
        assert_eq!(resp(b"ok\r\n"), Response::Ok);
        assert_eq!(
            resp(b"error:20\r\n"),
            Response::Error(ErrorCode::UnsupportedCommand)
        );
        assert_eq!(
            resp(b"error:99\r\n"),
            Response::Error(ErrorCode::Unlisted(99))
        );
        assert_eq!(resp(b"ALARM:1\r\n"), Response::Alarm(AlarmCode::HardLimit));
        assert_eq!(
            resp(b"ALARM:9\r\n"),
            Response::Alarm(AlarmCode::HomingFailApproach)
        );
        assert_eq!(
            resp(b"\r\nGrbl 1.1h ['$' for help]\r\n"),
            Response::Welcome {
                version: "1.1h".into()
            }
        );
        assert_eq!(
            resp(b"[MSG:'$H'|'$X' to unlock]\r\n"),
            Response::Message("'$H'|'$X' to unlock".into())
        );
        assert_eq!(
            resp(b"[MSG:Caution: Unlocked]\r\n"),
            Response::Message("Caution: Unlocked".into())
        );
        assert_eq!(
            resp(b"[VER:1.1h.20190825:]\r\n"),
            Response::Version {
                version: "1.1h.20190825".into(),
                build_info: String::new()
            }
        );
        assert_eq!(
            resp(b"[VER:v1.1f.20170131:Some string]\r\n"),
            Response::Version {
                version: "v1.1f.20170131".into(),
                build_info: "Some string".into()
            }
        );
        assert_eq!(
            resp(b"[OPT:V,15,128]\r\n"),
            Response::Options(BuildOptions {
                codes: "V".into(),
                planner_blocks: 15,
                rx_buffer_bytes: 128,
                extra: vec![]
            })
        );
        let Response::ParserState(gc) = resp(b"[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0.0 S0]\r\n")
        else {
            panic!()
        };
        assert!(gc.is_active("G90") && gc.is_active("M9") && !gc.is_active("M8"));
        assert_eq!(
            (gc.tool, gc.feed_mm_per_min, gc.spindle_rpm),
            (Some(0), Some(0.0), Some(0.0))
        );
        assert_eq!(
            encoded_resp(&Response::ParserState(gc)),
            b"[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]\r\n"
        );
        let empty = ParserState {
            modes: vec![],
            tool: None,
            feed_mm_per_min: None,
            spindle_rpm: None,
        };
        assert_eq!(resp(b"[GC:]\r\n"), Response::ParserState(empty));
        assert!(decode_response(b"[GC:G0  T0]\r\n").is_err());
        assert_eq!(
            resp(b"[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]\r\n"),
            Response::Feedback {
                tag: "HLP".into(),
                text: "$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x".into()
            }
        );
        assert_eq!(
            resp(b"$0=10\r\n"),
            Response::Setting {
                number: 0,
                value: 10.0
            }
        );
        assert_eq!(
            resp(b"$11=0.010\r\n"),
            Response::Setting {
                number: 11,
                value: 0.01
            }
        );
        assert_eq!(
            resp(b"$132=200.000\r\n"),
            Response::Setting {
                number: 132,
                value: 200.0
            }
        );
        assert_eq!(
            resp(b"$N0=G54G20\r\n"),
            Response::StartupLine {
                index: 0,
                line: "G54G20".into()
            }
        );
        // Settings print with GRBL's decimals.
        assert_eq!(
            encoded_resp(&Response::Setting {
                number: 11,
                value: 0.01
            }),
            b"$11=0.010\r\n"
        );
        assert_eq!(
            encoded_resp(&Response::Setting {
                number: 10,
                value: 255.0
            }),
            b"$10=255\r\n"
        );
        assert_eq!(
            encoded_resp(&Response::Setting {
                number: 30,
                value: 1000.0
            }),
            b"$30=1000\r\n"
        );
        assert_eq!(
            encoded_resp(&Response::Error(ErrorCode::UnusedWords)),
            b"error:36\r\n"
        );
        assert_eq!(
            encoded_resp(&Response::Alarm(AlarmCode::SoftLimit)),
            b"ALARM:2\r\n"
        );
    }

    #[test]
    fn codes_carry_the_documented_meaning() {
        assert_eq!(ErrorCode::ALL.len(), 36);
        for &code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.code()), code);
            assert!(!matches!(code, ErrorCode::Unlisted(_)));
        }
        for &code in AlarmCode::ALL {
            assert_eq!(AlarmCode::from_code(code.code()), code);
        }
        assert_eq!(AlarmCode::ALL.len(), 10);
        assert_eq!(ErrorCode::from_code(18), ErrorCode::Unlisted(18));
        assert_eq!(
            ErrorCode::UndefinedFeedRate.to_string(),
            "22 Undefined feed rate: Feed rate has not yet been set or is undefined."
        );
        assert!(
            AlarmCode::HardLimit
                .to_string()
                .contains("Re-homing is highly recommended")
        );
    }

    // ----- property tests -----

    fn thousandths(range: std::ops::Range<i64>) -> impl Strategy<Value = f64> {
        range.prop_map(|t| t as f64 / 1000.0)
    }

    fn whole(range: std::ops::Range<u32>) -> impl Strategy<Value = f64> {
        range.prop_map(f64::from)
    }

    fn command_strategy() -> impl Strategy<Value = Command> {
        let axis = || proptest::option::of(thousandths(-99_999_999..99_999_999));
        prop_oneof![
            proptest::sample::select(Realtime::ALL.to_vec()).prop_map(Command::Realtime),
            Just(Command::Empty),
            (
                prop_oneof![Just(Motion::Rapid), Just(Motion::Linear)],
                axis(),
                axis(),
                axis(),
                proptest::option::of(thousandths(1..99_999_999)),
            )
                .prop_map(|(motion, x_mm, y_mm, z_mm, feed_mm_per_min)| {
                    Command::Move {
                        motion,
                        x_mm,
                        y_mm,
                        z_mm,
                        feed_mm_per_min,
                    }
                }),
            Just(Command::Distance(DistanceMode::Absolute)),
            Just(Command::Distance(DistanceMode::Incremental)),
            Just(Command::Millimetres),
            thousandths(0..10_000_000).prop_map(|seconds| Command::Dwell { seconds }),
            Just(Command::CLOSE_GRIPPER),
            Just(Command::OPEN_GRIPPER),
            Just(Command::Help),
            Just(Command::ViewSettings),
            Just(Command::ViewParserState),
            Just(Command::ViewBuildInfo),
            Just(Command::KillAlarmLock),
            Just(Command::Home),
            (
                proptest::sample::select(
                    (0u16..=255)
                        .filter(|&n| is_setting(n) && n != 0)
                        .collect::<Vec<_>>()
                ),
                thousandths(0..100_000_000)
            )
                .prop_map(|(number, value)| Command::SetSetting { number, value }),
            thousandths(3000..256_000).prop_map(|value| Command::SetSetting { number: 0, value }),
        ]
    }

    fn xyz_strategy() -> impl Strategy<Value = Xyz> {
        (
            thousandths(-9_999_999..9_999_999),
            thousandths(-9_999_999..9_999_999),
            thousandths(-9_999_999..9_999_999),
        )
            .prop_map(|(x_mm, y_mm, z_mm)| Xyz { x_mm, y_mm, z_mm })
    }

    fn status_strategy() -> impl Strategy<Value = StatusReport> {
        let state = proptest::sample::select(vec![
            MachineState::Idle,
            MachineState::Run,
            MachineState::Hold(HoldState::Complete),
            MachineState::Hold(HoldState::InProgress),
            MachineState::Jog,
            MachineState::Alarm,
            MachineState::Door(DoorState::Closed),
            MachineState::Door(DoorState::Ajar),
            MachineState::Door(DoorState::Parking),
            MachineState::Door(DoorState::Resuming),
            MachineState::Check,
            MachineState::Home,
            MachineState::Sleep,
        ]);
        let position = (any::<bool>(), xyz_strategy()).prop_map(|(machine, xyz)| {
            if machine {
                Position::Machine(xyz)
            } else {
                Position::Work(xyz)
            }
        });
        let feed = (whole(0..100_000), proptest::option::of(whole(0..30_000))).prop_map(
            |(feed_mm_per_min, spindle_rpm)| FeedSpeed {
                feed_mm_per_min,
                spindle_rpm,
            },
        );
        let pins = any::<[bool; 8]>().prop_map(|p| Pins {
            probe: p[0],
            limit_x: p[1],
            limit_y: p[2],
            limit_z: p[3],
            door: p[4],
            reset: p[5],
            feed_hold: p[6],
            cycle_start: p[7],
        });
        let accessories = any::<[bool; 4]>().prop_map(|a| Accessories {
            spindle_cw: a[0],
            spindle_ccw: a[1],
            flood: a[2],
            mist: a[3],
        });
        (
            state,
            position,
            proptest::option::of((any::<u16>(), any::<u16>()).prop_map(
                |(planner_blocks_free, rx_bytes_free)| BufferState {
                    planner_blocks_free,
                    rx_bytes_free,
                },
            )),
            proptest::option::of(any::<u32>()),
            proptest::option::of(feed),
            proptest::option::of(pins),
            proptest::option::of(xyz_strategy()),
            proptest::option::of(any::<(u8, u8, u8)>().prop_map(|(f, r, s)| Overrides {
                feed_percent: f,
                rapid_percent: r,
                spindle_percent: s,
            })),
            proptest::option::of(accessories),
            proptest::collection::vec("[a-z]{1,3}:[0-9a-z,.]{0,8}", 0..3),
        )
            .prop_map(
                |(
                    state,
                    position,
                    buffer,
                    line_number,
                    feed,
                    pins,
                    work_offset,
                    overrides,
                    accessories,
                    unknown,
                )| {
                    StatusReport {
                        state,
                        position,
                        buffer,
                        line_number,
                        feed,
                        pins,
                        work_offset,
                        overrides,
                        accessories,
                        unknown,
                    }
                },
            )
    }

    fn text(pattern: &'static str) -> impl Strategy<Value = String> {
        proptest::string::string_regex(pattern).expect("valid regex")
    }

    fn response_strategy() -> impl Strategy<Value = Response> {
        let setting =
            proptest::sample::select((0u16..=255).filter(|&n| is_setting(n)).collect::<Vec<_>>())
                .prop_flat_map(|number| {
                    let value = if setting_decimals(number) == 0 {
                        whole(0..256).boxed()
                    } else {
                        thousandths(0..100_000_000).boxed()
                    };
                    value.prop_map(move |value| Response::Setting { number, value })
                });
        let parser_state = (
            proptest::sample::subsequence(
                vec!["G0", "G54", "G17", "G21", "G90", "G94", "M5", "M8", "M9"],
                0..9,
            ),
            proptest::option::of(any::<u8>()),
            proptest::option::of(whole(0..100_000)),
            proptest::option::of(whole(0..30_000)),
        )
            .prop_map(|(modes, tool, feed_mm_per_min, spindle_rpm)| {
                Response::ParserState(ParserState {
                    modes: modes.into_iter().map(str::to_owned).collect(),
                    tool,
                    feed_mm_per_min,
                    spindle_rpm,
                })
            });
        prop_oneof![
            Just(Response::Ok),
            any::<u8>().prop_map(|c| Response::Error(ErrorCode::from_code(c))),
            any::<u8>().prop_map(|c| Response::Alarm(AlarmCode::from_code(c))),
            status_strategy().prop_map(Response::Status),
            text("[0-9][.0-9a-z]{0,10}").prop_map(|version| Response::Welcome { version }),
            text("[ -~]{0,40}").prop_map(Response::Message),
            (text("[0-9.a-z]{1,14}"), text("[ -~]{0,20}")).prop_map(|(version, build_info)| {
                Response::Version {
                    version,
                    build_info,
                }
            }),
            (
                text("[A-Z0-9+*$#]{0,8}"),
                any::<u16>(),
                any::<u16>(),
                proptest::collection::vec("[0-9]{1,3}", 0..3)
            )
                .prop_map(|(codes, planner_blocks, rx_buffer_bytes, extra)| {
                    Response::Options(BuildOptions {
                        codes,
                        planner_blocks,
                        rx_buffer_bytes,
                        extra,
                    })
                }),
            parser_state,
            (text("HLP|G5[4-9]|PRB|TLO|echo"), text("[ -~]{0,30}"))
                .prop_map(|(tag, text)| Response::Feedback { tag, text }),
            setting,
            (any::<u8>(), text("[ -~]{0,20}"))
                .prop_map(|(index, line)| Response::StartupLine { index, line }),
        ]
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
        fn arbitrary_bytes_never_stall_either_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            drain(&bytes, decode_command);
            drain(&bytes, decode_response);
        }

        #[test]
        fn line_like_noise_never_stalls(bytes in proptest::collection::vec(
            proptest::sample::select(b"GMXYZFPN$=.-0123456789 ()<>|:,[]\r\n?!~okerrorALARM".to_vec()), 0..200)) {
            drain(&bytes, decode_command);
            drain(&bytes, decode_response);
        }

        #[test]
        fn pick_realtime_keeps_everything_else(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = bytes.clone();
            let picked = pick_realtime(&mut buf);
            let expected_rest: Vec<u8> =
                bytes.iter().copied().filter(|&b| b <= 0x7F && Realtime::from_byte(b).is_none()).collect();
            let expected_picked: Vec<Realtime> = bytes.iter().filter_map(|&b| Realtime::from_byte(b)).collect();
            prop_assert_eq!(buf, expected_rest);
            prop_assert_eq!(picked, expected_picked);
        }
    }

    #[test]
    fn position_decimals_are_read_from_the_status_report() {
        // From the Interface document's examples.
        assert_eq!(
            position_decimals(b"<Idle|MPos:0.000,0.000,0.000|FS:0.0,0>\r\n"),
            Some(Ok(3))
        );
        assert_eq!(
            position_decimals(b"<Hold:0|WPos:-2.500,0.000,11.000|Bf:15,128|FS:500,8000>\r\n"),
            Some(Ok(3))
        );
        // Inches print four decimals.
        assert_eq!(
            position_decimals(b"<Idle|MPos:1.5000,0.0000,-0.2500|FS:0,0>"),
            Some(Ok(4))
        );
        assert_eq!(position_decimals(b"ok\r\n"), None);
        // A dropped digit after the point, a dropped point, a dropped digit before it.
        for (damaged, says) in [
            (
                &b"<Idle|MPos:40.000,20.00,10.000|FS:0,0>"[..],
                "Y \"20.00\" has 2 decimals where X has 3",
            ),
            (
                b"<Idle|MPos:40.000,20000,10.000|FS:0,0>",
                "Y \"20000\" has no decimal point",
            ),
            (
                b"<Idle|MPos:40.000,20.000,.000|FS:0,0>",
                "Z \".000\" has no digits before",
            ),
            (
                b"<Idle|MPos:40.000,20.000,10.|FS:0,0>",
                "Z \"10.\" has no digits after",
            ),
        ] {
            match position_decimals(damaged) {
                Some(Err(reason)) => assert!(reason.to_string().contains(says), "{reason}"),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(damaged)),
            }
        }
    }
}
