//! IKA hotplate stirrers (C-MAG HS, RCT digital, RET control-visc) over the NAMUR command set:
//! 9600 baud, 7 data bits, even parity, 1 stop bit. Commands are upper case, parameters follow a space
//! (or an `@` for the watchdog family), every line ends CR LF (the devices also accept a lone CR) and is at
//! most 80 characters long.
//!
//! What the device sends back depends on the command, and the reply does not name it:
//! - `IN_NAME`, `IN_VERSION`: a line of text, e.g. `RCT digital`;
//! - `IN_PV_n`, `IN_SP_n`: `<value> <n>`, e.g. `25.3 1`;
//! - `OUT_WD1@m`, `OUT_WD2@m`, `OUT_SP_12@n`, `OUT_SP_42@n`: an echo of the value just set, e.g. `30`;
//! - `OUT_SP_1`, `OUT_SP_4`, `START_n`, `STOP_n`, `RESET`: nothing at all;
//! - an unknown or malformed command: nothing either (the device only ever talks when asked and has no
//!   error reply), so the simulator stays silent when [`decode_command`] rejects a line.
//!
//! So [`decode_response`] gives a context-free [`Response`] and [`interpret`] / [`decode_reply`] turn it into
//! a typed [`Reply`] given the command it answers; [`expects_reply`] says whether to wait for one at all.

use super::{DecodeError, Decoded, MAX_LINE, Malformed, split_line};

const PROTOCOL: &str = "NAMUR";

/// NAMUR caps a command or reply at 80 characters, terminator excluded.
pub const MAX_NAMUR_LINE: usize = 80;

/// Watchdog times the devices accept, in seconds (0 only for `OUT_WD2@0`, which cancels mode 2).
pub const WATCHDOG_RANGE_S: std::ops::RangeInclusive<u16> = 20..=1500;

/// The temperature sensors: NAMUR channel 1 is the external probe (PT1000), channel 2 the hotplate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sensor {
    External,
    Hotplate,
}

impl Sensor {
    pub fn channel(self) -> u8 {
        match self {
            Sensor::External => 1,
            Sensor::Hotplate => 2,
        }
    }
}

/// NAMUR channel 4: the stirring motor.
pub const SPEED_CHANNEL: u8 = 4;

/// Host -> device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    /// `IN_NAME`.
    ReadName,
    /// `IN_VERSION`: firmware version, on devices that support it.
    ReadVersion,
    /// `IN_PV_1` / `IN_PV_2`: actual temperature.
    ReadTemperature(Sensor),
    /// `IN_PV_4`: actual stirring speed.
    ReadSpeed,
    /// `IN_SP_1` / `IN_SP_2`: temperature setpoint.
    ReadTemperatureSetpoint(Sensor),
    /// `IN_SP_4`: speed setpoint.
    ReadSpeedSetpoint,
    /// `OUT_SP_1 <value>`: set the temperature setpoint.
    SetTemperature { temperature_c: f64 },
    /// `OUT_SP_4 <value>`: set the speed setpoint.
    SetSpeed { speed_rpm: u32 },
    /// `START_1`.
    StartHeater,
    /// `STOP_1`.
    StopHeater,
    /// `START_4`.
    StartMotor,
    /// `STOP_4`.
    StopMotor,
    /// `RESET`: back to local (front panel) control, heater and motor off.
    Reset,
    /// `OUT_WD1@<m>`: if no command arrives within `timeout_s`, heater and motor switch off and the device
    /// shows an error. Must be re-sent within the time to keep it from firing.
    Watchdog1 { timeout_s: u16 },
    /// `OUT_WD2@<m>`: like mode 1 but falls back to the safety setpoints; `OUT_WD2@0` cancels it.
    Watchdog2 { timeout_s: u16 },
    /// `OUT_SP_12@<n>`: the safety temperature watchdog mode 2 falls back to.
    SetSafetyTemperature { temperature_c: f64 },
    /// `OUT_SP_42@<n>`: the safety speed watchdog mode 2 falls back to.
    SetSafetySpeed { speed_rpm: u32 },
}

/// Whether the device answers `cmd` with a line (see the module docs). A driver that waits for a reply to a
/// command that has none would only ever time out.
pub fn expects_reply(cmd: &Command) -> bool {
    !matches!(
        cmd,
        Command::SetTemperature { .. }
            | Command::SetSpeed { .. }
            | Command::StartHeater
            | Command::StopHeater
            | Command::StartMotor
            | Command::StopMotor
            | Command::Reset
    )
}

/// Writes a command line, CR LF included. Values are written exactly (shortest round-trip decimal); a
/// non-finite temperature is written as-is, which the device rejects.
pub fn encode_command(cmd: &Command, out: &mut Vec<u8>) {
    let text = match cmd {
        Command::ReadName => "IN_NAME".to_string(),
        Command::ReadVersion => "IN_VERSION".to_string(),
        Command::ReadTemperature(sensor) => format!("IN_PV_{}", sensor.channel()),
        Command::ReadSpeed => format!("IN_PV_{SPEED_CHANNEL}"),
        Command::ReadTemperatureSetpoint(sensor) => format!("IN_SP_{}", sensor.channel()),
        Command::ReadSpeedSetpoint => format!("IN_SP_{SPEED_CHANNEL}"),
        Command::SetTemperature { temperature_c } => format!("OUT_SP_1 {}", number(*temperature_c)),
        Command::SetSpeed { speed_rpm } => format!("OUT_SP_4 {speed_rpm}"),
        Command::StartHeater => "START_1".to_string(),
        Command::StopHeater => "STOP_1".to_string(),
        Command::StartMotor => "START_4".to_string(),
        Command::StopMotor => "STOP_4".to_string(),
        Command::Reset => "RESET".to_string(),
        Command::Watchdog1 { timeout_s } => format!("OUT_WD1@{timeout_s}"),
        Command::Watchdog2 { timeout_s } => format!("OUT_WD2@{timeout_s}"),
        Command::SetSafetyTemperature { temperature_c } => {
            format!("OUT_SP_12@{}", number(*temperature_c))
        }
        Command::SetSafetySpeed { speed_rpm } => format!("OUT_SP_42@{speed_rpm}"),
    };
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Device side: decodes the command line at the front of `buf`. Blank lines are skipped (a CR LF split
/// across reads leaves a lone LF). An error means the device ignores the line and sends nothing.
/// Setpoint ranges depend on the model: check them with [`Limits::check`].
pub fn decode_command(buf: &[u8]) -> Result<Decoded<Command>, DecodeError> {
    decode_line(buf, parse_command)
}

/// Writes a reply line, CR LF included.
pub fn encode_response(resp: &Response, out: &mut Vec<u8>) {
    match resp {
        Response::Value { value, channel } => {
            out.extend_from_slice(format!("{} {channel}", number(*value)).as_bytes());
        }
        Response::Text(text) => {
            out.extend(text.chars().map(|c| match c {
                ' '..='~' => c as u8,
                c if c.is_control() => b' ',
                _ => b'?',
            }));
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Host side: decodes the reply line at the front of `buf` without knowing the command; see [`interpret`].
pub fn decode_response(buf: &[u8]) -> Result<Decoded<Response>, DecodeError> {
    decode_line(buf, parse_response)
}

/// Host side with context: decodes the reply to `cmd` at the front of `buf` into a typed [`Reply`].
pub fn decode_reply(cmd: &Command, buf: &[u8]) -> Result<Decoded<Reply>, DecodeError> {
    decode_line(buf, |line| {
        parse_response(line).and_then(|resp| reply_to(cmd, &resp))
    })
}

/// A reply line as it appears on the wire, before knowing which command it answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `<value> <channel>`, e.g. `25.3 1`: answers `IN_PV_n` and `IN_SP_n`.
    Value { value: f64, channel: u8 },
    /// Any other line: a name, a version, or the echo of a watchdog command.
    Text(String),
}

/// A reply typed by the command it answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `IN_NAME`.
    Name(String),
    /// `IN_VERSION`.
    Version(String),
    /// `IN_PV_1/2`, `IN_SP_1/2`.
    Temperature { sensor: Sensor, temperature_c: f64 },
    /// `IN_PV_4`, `IN_SP_4`.
    Speed { speed_rpm: f64 },
    /// Echo of `OUT_WD1@m` / `OUT_WD2@m`.
    WatchdogTime { timeout_s: u16 },
    /// Echo of `OUT_SP_12@n`.
    SafetyTemperature { temperature_c: f64 },
    /// Echo of `OUT_SP_42@n`.
    SafetySpeed { speed_rpm: f64 },
}

impl Reply {
    /// The line the device sends for this reply.
    pub fn to_response(&self) -> Response {
        match self {
            Reply::Name(text) | Reply::Version(text) => Response::Text(text.clone()),
            Reply::Temperature {
                sensor,
                temperature_c,
            } => Response::Value {
                value: *temperature_c,
                channel: sensor.channel(),
            },
            Reply::Speed { speed_rpm } => Response::Value {
                value: *speed_rpm,
                channel: SPEED_CHANNEL,
            },
            Reply::WatchdogTime { timeout_s } => Response::Text(timeout_s.to_string()),
            Reply::SafetyTemperature { temperature_c } => Response::Text(number(*temperature_c)),
            Reply::SafetySpeed { speed_rpm } => Response::Text(number(*speed_rpm)),
        }
    }
}

/// Device side: writes the line for a typed reply.
pub fn encode_reply(reply: &Reply, out: &mut Vec<u8>) {
    encode_response(&reply.to_response(), out);
}

/// Types `resp` as the answer to `cmd`. Fails when it cannot be that answer (e.g. `500 4` for `IN_PV_1`), which
/// is how a driver notices a reply that belongs to an earlier, timed-out command.
pub fn interpret(cmd: &Command, resp: &Response) -> Result<Reply, Malformed> {
    reply_to(cmd, resp).map_err(Malformed)
}

fn reply_to(cmd: &Command, resp: &Response) -> Result<Reply, String> {
    let value_on = |channel: u8| match resp {
        Response::Value {
            value,
            channel: got,
        } if *got == channel => Ok(*value),
        other => Err(format!("expected `<value> {channel}`, got {other:?}")),
    };
    let echo = || match resp {
        Response::Text(text) => {
            parse_decimal(text).ok_or_else(|| format!("expected an echoed number, got {text:?}"))
        }
        other => Err(format!("expected an echoed number, got {other:?}")),
    };
    let text = || match resp {
        Response::Text(text) => Ok(text.clone()),
        other => Err(format!("expected text, got {other:?}")),
    };
    match cmd {
        Command::ReadName => text().map(Reply::Name),
        Command::ReadVersion => text().map(Reply::Version),
        Command::ReadTemperature(sensor) | Command::ReadTemperatureSetpoint(sensor) => {
            value_on(sensor.channel()).map(|temperature_c| Reply::Temperature {
                sensor: *sensor,
                temperature_c,
            })
        }
        Command::ReadSpeed | Command::ReadSpeedSetpoint => {
            value_on(SPEED_CHANNEL).map(|speed_rpm| Reply::Speed { speed_rpm })
        }
        Command::Watchdog1 { .. } | Command::Watchdog2 { .. } => {
            let seconds = echo()?;
            let timeout_s = whole(seconds)
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| {
                    format!("watchdog echo {seconds} is not a whole number of seconds")
                })?;
            Ok(Reply::WatchdogTime { timeout_s })
        }
        Command::SetSafetyTemperature { .. } => {
            echo().map(|temperature_c| Reply::SafetyTemperature { temperature_c })
        }
        Command::SetSafetySpeed { .. } => echo().map(|speed_rpm| Reply::SafetySpeed { speed_rpm }),
        Command::SetTemperature { .. }
        | Command::SetSpeed { .. }
        | Command::StartHeater
        | Command::StopHeater
        | Command::StartMotor
        | Command::StopMotor
        | Command::Reset => Err(format!("{cmd:?} has no reply, got {resp:?}")),
    }
}

/// Parses a `<value> <channel>` reply line (terminator already removed), e.g. `25.3 1` -> `(25.3, 1)`.
pub fn parse_value_reply(line: &[u8]) -> Result<(f64, u8), Malformed> {
    match parse_response(line)? {
        Response::Value { value, channel } => Ok((value, channel)),
        Response::Text(text) => Err(Malformed(format!("{text:?} is not `<value> <channel>`"))),
    }
}

/// A setpoint the device model does not accept.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum OutsideLimits {
    #[error("temperature {temperature_c} °C outside {min_c}..={max_c} °C")]
    Temperature {
        temperature_c: f64,
        min_c: f64,
        max_c: f64,
    },
    #[error("speed {speed_rpm} rpm above {max_rpm} rpm")]
    Speed { speed_rpm: u32, max_rpm: u32 },
}

/// Setpoint ranges of one device model, which the NAMUR syntax itself does not limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub min_temperature_c: f64,
    pub max_temperature_c: f64,
    pub max_speed_rpm: u32,
}

impl Limits {
    /// RCT digital: `OUT_SP_1` 0..=310 °C, `OUT_SP_4` 0..=1500 rpm (operating manual, NAMUR table).
    pub const RCT_DIGITAL: Limits = Limits {
        min_temperature_c: 0.0,
        max_temperature_c: 310.0,
        max_speed_rpm: 1500,
    };
    /// C-MAG HS 7: hotplate up to 500 °C, 0..=1500 rpm.
    pub const C_MAG_HS7: Limits = Limits {
        min_temperature_c: 0.0,
        max_temperature_c: 500.0,
        max_speed_rpm: 1500,
    };

    /// Whether the device accepts `cmd`'s setpoints; what it does not accept it ignores.
    pub fn check(&self, cmd: &Command) -> Result<(), OutsideLimits> {
        let temperature = |t: f64| {
            if (self.min_temperature_c..=self.max_temperature_c).contains(&t) {
                Ok(())
            } else {
                Err(OutsideLimits::Temperature {
                    temperature_c: t,
                    min_c: self.min_temperature_c,
                    max_c: self.max_temperature_c,
                })
            }
        };
        let speed = |s: u32| {
            if s <= self.max_speed_rpm {
                Ok(())
            } else {
                Err(OutsideLimits::Speed {
                    speed_rpm: s,
                    max_rpm: self.max_speed_rpm,
                })
            }
        };
        match cmd {
            Command::SetTemperature { temperature_c }
            | Command::SetSafetyTemperature { temperature_c } => temperature(*temperature_c),
            Command::SetSpeed { speed_rpm } | Command::SetSafetySpeed { speed_rpm } => {
                speed(*speed_rpm)
            }
            _ => Ok(()),
        }
    }
}

/// A byte whose parity bit does not match its 7 data bits: a corrupted character on a 7E1 link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("parity error in byte 0x{byte:02X}")]
pub struct ParityError {
    pub byte: u8,
}

/// For 8-bit links that carry the raw 7E1 characters (a serial-over-TCP server, a pty): puts the even parity
/// bit of the 7 data bits of `byte` into bit 7. Bit 7 of the input is ignored.
pub fn add_even_parity(byte: u8) -> u8 {
    let data = byte & 0x7F;
    if !data.count_ones().is_multiple_of(2) {
        data | 0x80
    } else {
        data
    }
}

/// The inverse of [`add_even_parity`]: the 7 data bits, or an error when the parity bit is wrong.
pub fn check_even_parity(byte: u8) -> Result<u8, ParityError> {
    if byte.count_ones().is_multiple_of(2) {
        Ok(byte & 0x7F)
    } else {
        Err(ParityError { byte })
    }
}

/// Splits off one line after skipping blank lines, and parses it. Errors drop the blank prefix too.
fn decode_line<T>(
    buf: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Decoded<T>, DecodeError> {
    let blank = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if blank > MAX_LINE {
        return Err(DecodeError::new(
            PROTOCOL,
            &buf[..blank],
            "run of blank lines",
        ));
    }
    let Some((line, used)) = split_line(PROTOCOL, &buf[blank..], true).map_err(|mut err| {
        err.skip += blank;
        err
    })?
    else {
        return Ok(Decoded::Incomplete);
    };
    let consumed = blank + used;
    match parse(line) {
        Ok(value) => Ok(Decoded::Frame { value, consumed }),
        Err(reason) => Err(DecodeError::new(PROTOCOL, &buf[..consumed], reason)),
    }
}

/// Checks length and character set and trims the trailing blanks some firmware sends before CR LF.
fn clean_line(line: &[u8]) -> Result<&str, String> {
    if line.len() > MAX_NAMUR_LINE {
        return Err(format!(
            "line of {} characters, NAMUR allows {MAX_NAMUR_LINE}",
            line.len()
        ));
    }
    if let Some(&b) = line.iter().find(|&&b| !(b' '..=b'~').contains(&b)) {
        return Err(format!("byte 0x{b:02X} is not printable 7-bit ASCII"));
    }
    // Printable ASCII is valid UTF-8.
    let text = std::str::from_utf8(line).map_err(|e| e.to_string())?;
    Ok(text.trim_end_matches(' '))
}

fn parse_command(line: &[u8]) -> Result<Command, String> {
    let text = clean_line(line)?;
    let (word, arg) = match text.split_once(' ') {
        Some((word, arg)) => (word, arg.trim_start_matches(' ')),
        None => (text, ""),
    };
    if let Some((head, value)) = word.split_once('@') {
        if !arg.is_empty() {
            return Err(format!("unexpected {arg:?} after {word}"));
        }
        return parse_at_command(head, value);
    }
    let plain = |cmd: Command| {
        if arg.is_empty() {
            Ok(cmd)
        } else {
            Err(format!("{word} takes no parameter"))
        }
    };
    let needs_arg = || {
        if arg.is_empty() {
            Err(format!("{word} needs a value"))
        } else {
            Ok(arg)
        }
    };
    match word {
        "IN_NAME" => plain(Command::ReadName),
        "IN_VERSION" => plain(Command::ReadVersion),
        "IN_PV_1" => plain(Command::ReadTemperature(Sensor::External)),
        "IN_PV_2" => plain(Command::ReadTemperature(Sensor::Hotplate)),
        "IN_PV_4" => plain(Command::ReadSpeed),
        "IN_SP_1" => plain(Command::ReadTemperatureSetpoint(Sensor::External)),
        "IN_SP_2" => plain(Command::ReadTemperatureSetpoint(Sensor::Hotplate)),
        "IN_SP_4" => plain(Command::ReadSpeedSetpoint),
        "START_1" => plain(Command::StartHeater),
        "STOP_1" => plain(Command::StopHeater),
        "START_4" => plain(Command::StartMotor),
        "STOP_4" => plain(Command::StopMotor),
        "RESET" => plain(Command::Reset),
        "OUT_SP_1" => temperature_arg(needs_arg()?)
            .map(|temperature_c| Command::SetTemperature { temperature_c }),
        "OUT_SP_4" => speed_arg(needs_arg()?).map(|speed_rpm| Command::SetSpeed { speed_rpm }),
        _ => Err(format!(
            "unknown command {word:?} (commands are upper case)"
        )),
    }
}

fn parse_at_command(head: &str, value: &str) -> Result<Command, String> {
    match head {
        "OUT_WD1" => {
            let timeout_s = watchdog_arg(value)?;
            if !WATCHDOG_RANGE_S.contains(&timeout_s) {
                return Err(format!("watchdog time {timeout_s} s outside 20..=1500 s"));
            }
            Ok(Command::Watchdog1 { timeout_s })
        }
        "OUT_WD2" => {
            let timeout_s = watchdog_arg(value)?;
            if timeout_s != 0 && !WATCHDOG_RANGE_S.contains(&timeout_s) {
                return Err(format!(
                    "watchdog time {timeout_s} s outside 20..=1500 s (or 0 to cancel)"
                ));
            }
            Ok(Command::Watchdog2 { timeout_s })
        }
        "OUT_SP_12" => temperature_arg(value)
            .map(|temperature_c| Command::SetSafetyTemperature { temperature_c }),
        "OUT_SP_42" => speed_arg(value).map(|speed_rpm| Command::SetSafetySpeed { speed_rpm }),
        _ => Err(format!("unknown command {head:?}@")),
    }
}

fn temperature_arg(text: &str) -> Result<f64, String> {
    parse_decimal(text).ok_or_else(|| format!("temperature {text:?} is not a decimal number"))
}

/// Speeds are whole rpm; a decimal is rounded as the devices do.
fn speed_arg(text: &str) -> Result<u32, String> {
    let value =
        parse_decimal(text).ok_or_else(|| format!("speed {text:?} is not a decimal number"))?;
    whole(value.round())
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("speed {text:?} is not a valid rpm"))
}

/// Watchdog times are whole seconds; drivers in the wild send `30.0`, so a decimal is rounded.
fn watchdog_arg(text: &str) -> Result<u16, String> {
    let value =
        parse_decimal(text).ok_or_else(|| format!("watchdog time {text:?} is not a number"))?;
    whole(value.round())
        .and_then(|v| u16::try_from(v).ok())
        .ok_or_else(|| format!("watchdog time {text:?} out of range"))
}

fn parse_response(line: &[u8]) -> Result<Response, String> {
    let text = clean_line(line)?.trim_start_matches(' ');
    if text.is_empty() {
        return Err("empty reply".to_string());
    }
    if let Some((value, channel)) = text.split_once(' ')
        && let Some(value) = parse_decimal(value)
        && !channel.is_empty()
        && channel.bytes().all(|b| b.is_ascii_digit())
        && let Ok(channel) = channel.parse::<u8>()
    {
        return Ok(Response::Value { value, channel });
    }
    Ok(Response::Text(text.to_string()))
}

/// `-?digits(.digits)?`: the only number shape IKA devices send or accept; no exponent, no `+`.
fn parse_decimal(text: &str) -> Option<f64> {
    let body = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match body.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (body, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !frac.is_none_or(digits) {
        return None;
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// `value` as an integer when it is one (and fits in an i64).
fn whole(value: f64) -> Option<i64> {
    (value.fract() == 0.0 && value.abs() < 9.0e18).then_some(value as i64)
}

/// The exact shortest decimal, with `.0` on whole numbers as the devices print them (`25.0 1`).
fn number(value: f64) -> String {
    let text = value.to_string();
    if value.is_finite() && !text.contains('.') {
        format!("{text}.0")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame<T: std::fmt::Debug>(decoded: Result<Decoded<T>, DecodeError>, len: usize) -> T {
        match decoded.unwrap() {
            Decoded::Frame { value, consumed } => {
                assert_eq!(consumed, len);
                value
            }
            Decoded::Incomplete => panic!("incomplete"),
        }
    }

    fn encoded_command(cmd: &Command) -> Vec<u8> {
        let mut out = Vec::new();
        encode_command(cmd, &mut out);
        out
    }

    fn encoded_reply(reply: &Reply) -> Vec<u8> {
        let mut out = Vec::new();
        encode_reply(reply, &mut out);
        out
    }

    /// Every command of the brief, with the bytes from the IKA manuals and what the device answers.
    /// Command bytes, command, and the reply bytes and reply if the device answers.
    type Exchange = (&'static [u8], Command, Option<(&'static [u8], Reply)>);

    fn manual_exchanges() -> Vec<Exchange> {
        use Command as C;
        vec![
            (
                b"IN_NAME\r\n",
                C::ReadName,
                Some((b"RCT digital\r\n", Reply::Name("RCT digital".into()))),
            ),
            (
                b"IN_VERSION\r\n",
                C::ReadVersion,
                Some((b"1.10\r\n", Reply::Version("1.10".into()))),
            ),
            (
                b"IN_PV_1\r\n",
                C::ReadTemperature(Sensor::External),
                Some((
                    b"25.3 1\r\n",
                    Reply::Temperature {
                        sensor: Sensor::External,
                        temperature_c: 25.3,
                    },
                )),
            ),
            (
                b"IN_PV_2\r\n",
                C::ReadTemperature(Sensor::Hotplate),
                Some((
                    b"101.5 2\r\n",
                    Reply::Temperature {
                        sensor: Sensor::Hotplate,
                        temperature_c: 101.5,
                    },
                )),
            ),
            (
                b"IN_PV_4\r\n",
                C::ReadSpeed,
                Some((b"500.0 4\r\n", Reply::Speed { speed_rpm: 500.0 })),
            ),
            (
                b"IN_SP_1\r\n",
                C::ReadTemperatureSetpoint(Sensor::External),
                Some((
                    b"60.0 1\r\n",
                    Reply::Temperature {
                        sensor: Sensor::External,
                        temperature_c: 60.0,
                    },
                )),
            ),
            (
                b"IN_SP_2\r\n",
                C::ReadTemperatureSetpoint(Sensor::Hotplate),
                Some((
                    b"-10.5 2\r\n",
                    Reply::Temperature {
                        sensor: Sensor::Hotplate,
                        temperature_c: -10.5,
                    },
                )),
            ),
            (
                b"IN_SP_4\r\n",
                C::ReadSpeedSetpoint,
                Some((b"0.0 4\r\n", Reply::Speed { speed_rpm: 0.0 })),
            ),
            (
                b"OUT_SP_1 100.5\r\n",
                C::SetTemperature {
                    temperature_c: 100.5,
                },
                None,
            ),
            (b"OUT_SP_4 500\r\n", C::SetSpeed { speed_rpm: 500 }, None),
            (b"START_1\r\n", C::StartHeater, None),
            (b"STOP_1\r\n", C::StopHeater, None),
            (b"START_4\r\n", C::StartMotor, None),
            (b"STOP_4\r\n", C::StopMotor, None),
            (b"RESET\r\n", C::Reset, None),
            (
                b"OUT_WD1@30\r\n",
                C::Watchdog1 { timeout_s: 30 },
                Some((b"30\r\n", Reply::WatchdogTime { timeout_s: 30 })),
            ),
            (
                b"OUT_WD2@1500\r\n",
                C::Watchdog2 { timeout_s: 1500 },
                Some((b"1500\r\n", Reply::WatchdogTime { timeout_s: 1500 })),
            ),
            (
                b"OUT_WD2@0\r\n",
                C::Watchdog2 { timeout_s: 0 },
                Some((b"0\r\n", Reply::WatchdogTime { timeout_s: 0 })),
            ),
            (
                b"OUT_SP_12@50.0\r\n",
                C::SetSafetyTemperature {
                    temperature_c: 50.0,
                },
                Some((
                    b"50.0\r\n",
                    Reply::SafetyTemperature {
                        temperature_c: 50.0,
                    },
                )),
            ),
            (
                b"OUT_SP_42@100\r\n",
                C::SetSafetySpeed { speed_rpm: 100 },
                Some((b"100.0\r\n", Reply::SafetySpeed { speed_rpm: 100.0 })),
            ),
        ]
    }

    #[test]
    fn manual_exchanges_both_directions() {
        for (cmd_bytes, cmd, reply) in manual_exchanges() {
            let shown = String::from_utf8_lossy(cmd_bytes);
            assert_eq!(encoded_command(&cmd), cmd_bytes, "{shown}");
            assert_eq!(
                frame(decode_command(cmd_bytes), cmd_bytes.len()),
                cmd,
                "{shown}"
            );
            assert_eq!(expects_reply(&cmd), reply.is_some(), "{shown}");
            if let Some((reply_bytes, reply)) = reply {
                assert_eq!(encoded_reply(&reply), reply_bytes, "{shown}");
                assert_eq!(
                    frame(decode_reply(&cmd, reply_bytes), reply_bytes.len()),
                    reply,
                    "{shown}"
                );
            } else {
                // Even a plausible line is not a reply to a command that has none.
                assert!(decode_reply(&cmd, b"25.3 1\r\n").is_err());
            }
        }
    }

    #[test]
    fn generic_replies() {
        assert_eq!(
            frame(decode_response(b"25.3 1\r\n"), 8),
            Response::Value {
                value: 25.3,
                channel: 1
            }
        );
        assert_eq!(
            frame(decode_response(b"C-MAG HS7\r\n"), 11),
            Response::Text("C-MAG HS7".into())
        );
        assert_eq!(
            frame(decode_response(b"30\r\n"), 4),
            Response::Text("30".into())
        );
        // "Blank CR LF": some firmware puts a space before the terminator.
        assert_eq!(
            frame(decode_response(b"25.3 1 \r\n"), 9),
            Response::Value {
                value: 25.3,
                channel: 1
            }
        );
        assert_eq!(parse_value_reply(b"-3.0 2"), Ok((-3.0, 2)));
        assert!(parse_value_reply(b"RCT digital").is_err());
        assert!(parse_value_reply(b"1e3 1").is_err());
    }

    #[test]
    fn replies_that_do_not_fit_the_command_are_errors() {
        let stale_speed = b"500.0 4\r\n";
        let err =
            decode_reply(&Command::ReadTemperature(Sensor::External), stale_speed).unwrap_err();
        assert_eq!(err.skip, stale_speed.len());
        assert!(decode_reply(&Command::ReadName, b"25.3 1\r\n").is_err());
        assert!(decode_reply(&Command::Watchdog1 { timeout_s: 30 }, b"RCT digital\r\n").is_err());
        assert!(decode_reply(&Command::Watchdog1 { timeout_s: 30 }, b"30.5\r\n").is_err());
        assert_eq!(
            frame(
                decode_reply(&Command::Watchdog1 { timeout_s: 30 }, b"30.0\r\n"),
                6
            ),
            Reply::WatchdogTime { timeout_s: 30 }
        );
    }

    #[test]
    fn device_accepts_lone_cr_blank_and_decimal_variants() {
        assert_eq!(
            frame(decode_command(b"IN_PV_1\r"), 8),
            Command::ReadTemperature(Sensor::External)
        );
        assert_eq!(
            frame(decode_command(b"IN_PV_1\n"), 8),
            Command::ReadTemperature(Sensor::External)
        );
        // The LF of a CR LF that was split across reads, then the next command.
        assert_eq!(
            frame(decode_command(b"\nSTOP_4\r\n"), 9),
            Command::StopMotor
        );
        assert_eq!(
            frame(decode_command(b"OUT_SP_4   250 \r\n"), 17),
            Command::SetSpeed { speed_rpm: 250 }
        );
        assert_eq!(
            frame(decode_command(b"OUT_SP_4 249.6\r\n"), 16),
            Command::SetSpeed { speed_rpm: 250 }
        );
        assert_eq!(
            frame(decode_command(b"OUT_WD1@30.0\r\n"), 14),
            Command::Watchdog1 { timeout_s: 30 }
        );
        assert_eq!(
            frame(decode_command(b"OUT_SP_1 -5\r\n"), 13),
            Command::SetTemperature {
                temperature_c: -5.0
            }
        );
    }

    #[test]
    fn device_ignores_what_it_does_not_accept() {
        for bad in [
            &b"in_pv_1\r\n"[..],
            b"IN_PV_3\r\n",
            b"IN_PV_1 5\r\n",
            b"OUT_SP_1\r\n",
            b"OUT_SP_1 abc\r\n",
            b"OUT_SP_1 1e2\r\n",
            b"OUT_SP_1 +5\r\n",
            b"OUT_SP_1 NaN\r\n",
            b"OUT_SP_4 -100\r\n",
            b"OUT_SP_4 99999999999\r\n",
            b"OUT_WD1@19\r\n",
            b"OUT_WD1@1501\r\n",
            b"OUT_WD1@0\r\n",
            b"OUT_WD2@10\r\n",
            b"OUT_WD1@\r\n",
            b"OUT_WD1@30 5\r\n",
            b"OUT_WD3@30\r\n",
            b"START_1\x07\r\n",
            b"START_\xC3\x84\r\n",
        ] {
            let err = decode_command(bad).unwrap_err();
            assert_eq!(err.skip, bad.len(), "{}", String::from_utf8_lossy(bad));
        }
        let long = [b"OUT_SP_1 1.".as_slice(), &[b'0'; 80], b"\r\n"].concat();
        assert!(decode_command(&long).unwrap_err().reason.contains("80"));
    }

    #[test]
    fn model_limits() {
        let rct = Limits::RCT_DIGITAL;
        assert_eq!(
            rct.check(&Command::SetTemperature {
                temperature_c: 310.0
            }),
            Ok(())
        );
        assert_eq!(
            rct.check(&Command::SetTemperature {
                temperature_c: 310.1
            }),
            Err(OutsideLimits::Temperature {
                temperature_c: 310.1,
                min_c: 0.0,
                max_c: 310.0
            })
        );
        assert!(
            rct.check(&Command::SetTemperature {
                temperature_c: -1.0
            })
            .is_err()
        );
        assert!(
            rct.check(&Command::SetTemperature {
                temperature_c: f64::NAN
            })
            .is_err()
        );
        assert_eq!(
            rct.check(&Command::SetSafetySpeed { speed_rpm: 1501 }),
            Err(OutsideLimits::Speed {
                speed_rpm: 1501,
                max_rpm: 1500
            })
        );
        assert_eq!(rct.check(&Command::SetSpeed { speed_rpm: 1500 }), Ok(()));
        assert_eq!(
            Limits::C_MAG_HS7.check(&Command::SetTemperature {
                temperature_c: 450.0
            }),
            Ok(())
        );
        assert_eq!(rct.check(&Command::StartHeater), Ok(()));
    }

    #[test]
    fn parity_helpers() {
        assert_eq!(add_even_parity(b'A'), b'A'); // 0x41: two ones
        assert_eq!(add_even_parity(b'C'), 0xC3); // 0x43: three ones
        assert_eq!(add_even_parity(b'\r'), 0x8D); // 0x0D: three ones
        assert_eq!(add_even_parity(b'\n'), 0x0A); // 0x0A: two ones
        assert_eq!(
            add_even_parity(0xC3),
            0xC3,
            "bit 7 of the input is recomputed"
        );
        assert_eq!(add_even_parity(0x80 | b'A'), b'A');
        for data in 0u8..0x80 {
            let wire = add_even_parity(data);
            assert_eq!(wire.count_ones() % 2, 0);
            assert_eq!(check_even_parity(wire), Ok(data));
            for bit in 0..8 {
                let flipped = wire ^ (1 << bit);
                assert_eq!(
                    check_even_parity(flipped),
                    Err(ParityError { byte: flipped })
                );
            }
        }
    }

    #[test]
    fn partial_frames_are_incomplete() {
        assert_eq!(decode_command(b"IN_PV").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_command(b"\r\n\r\n").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_response(b"25.3 ").unwrap(), Decoded::Incomplete);
        assert_eq!(
            decode_reply(&Command::ReadSpeed, b"").unwrap(),
            Decoded::Incomplete
        );
    }

    #[test]
    fn garbage_then_a_valid_frame() {
        let buf = b"\xFF\x00junk\r\nIN_PV_2\r\n";
        let err = decode_command(buf).unwrap_err();
        assert_eq!(err.skip, 8);
        assert_eq!(
            frame(decode_command(&buf[8..]), 9),
            Command::ReadTemperature(Sensor::Hotplate)
        );

        let buf = b"\r\n\x80\x81\r\n42.0 4\r\n";
        let err = decode_response(buf).unwrap_err();
        assert_eq!(err.skip, 6, "the blank line goes with the bad frame");
        assert_eq!(
            frame(decode_response(&buf[6..]), 8),
            Response::Value {
                value: 42.0,
                channel: 4
            }
        );
    }

    #[test]
    fn unbounded_input_is_dropped_not_buffered() {
        let blanks = vec![b'\n'; MAX_LINE + 1];
        let err = decode_command(&blanks).unwrap_err();
        assert_eq!(err.skip, blanks.len());
        // A blank line, then more than MAX_LINE bytes without a terminator: both go.
        let mut junk = vec![b'\r'];
        junk.extend(std::iter::repeat_n(b'x', MAX_LINE + 1));
        let err = decode_response(&junk).unwrap_err();
        assert_eq!(err.skip, junk.len());
    }

    #[test]
    fn text_cannot_break_framing() {
        let mut out = Vec::new();
        encode_response(&Response::Text("a\r\nb°".into()), &mut out);
        assert_eq!(out, b"a  b?\r\n");
    }

    fn tenths(range: std::ops::RangeInclusive<i32>) -> impl Strategy<Value = f64> {
        range.prop_map(|t| f64::from(t) / 10.0)
    }

    fn sensor_strategy() -> impl Strategy<Value = Sensor> {
        prop_oneof![Just(Sensor::External), Just(Sensor::Hotplate)]
    }

    fn command_strategy() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just(Command::ReadName),
            Just(Command::ReadVersion),
            sensor_strategy().prop_map(Command::ReadTemperature),
            Just(Command::ReadSpeed),
            sensor_strategy().prop_map(Command::ReadTemperatureSetpoint),
            Just(Command::ReadSpeedSetpoint),
            // Any finite value survives exactly, not just the device's 0.1 K steps.
            (-1.0e6f64..1.0e6).prop_map(|temperature_c| Command::SetTemperature { temperature_c }),
            any::<u32>().prop_map(|speed_rpm| Command::SetSpeed { speed_rpm }),
            Just(Command::StartHeater),
            Just(Command::StopHeater),
            Just(Command::StartMotor),
            Just(Command::StopMotor),
            Just(Command::Reset),
            WATCHDOG_RANGE_S.prop_map(|timeout_s| Command::Watchdog1 { timeout_s }),
            prop_oneof![Just(0u16), WATCHDOG_RANGE_S]
                .prop_map(|timeout_s| Command::Watchdog2 { timeout_s }),
            tenths(-2000..=5000)
                .prop_map(|temperature_c| Command::SetSafetyTemperature { temperature_c }),
            any::<u32>().prop_map(|speed_rpm| Command::SetSafetySpeed { speed_rpm }),
        ]
    }

    /// A command and a reply it can get, for commands that have one.
    fn exchange_strategy() -> impl Strategy<Value = (Command, Reply)> {
        prop_oneof![
            "[A-Za-z]([A-Za-z0-9 .-]{0,30}[A-Za-z0-9.-])?"
                .prop_map(|name| (Command::ReadName, Reply::Name(name))),
            "[0-9A-Za-z][0-9A-Za-z.-]{0,20}"
                .prop_map(|v| (Command::ReadVersion, Reply::Version(v))),
            (sensor_strategy(), tenths(-1000..=5000), any::<bool>()).prop_map(
                |(sensor, temperature_c, setpoint)| {
                    let cmd = if setpoint {
                        Command::ReadTemperatureSetpoint(sensor)
                    } else {
                        Command::ReadTemperature(sensor)
                    };
                    (
                        cmd,
                        Reply::Temperature {
                            sensor,
                            temperature_c,
                        },
                    )
                }
            ),
            (0u32..=2000, any::<bool>()).prop_map(|(rpm, setpoint)| {
                let cmd = if setpoint {
                    Command::ReadSpeedSetpoint
                } else {
                    Command::ReadSpeed
                };
                (
                    cmd,
                    Reply::Speed {
                        speed_rpm: f64::from(rpm),
                    },
                )
            }),
            WATCHDOG_RANGE_S.prop_map(|timeout_s| (
                Command::Watchdog1 { timeout_s },
                Reply::WatchdogTime { timeout_s }
            )),
            tenths(0..=5000).prop_map(|temperature_c| (
                Command::SetSafetyTemperature { temperature_c },
                Reply::SafetyTemperature { temperature_c }
            )),
            (0u32..=2000).prop_map(|speed_rpm| (
                Command::SetSafetySpeed { speed_rpm },
                Reply::SafetySpeed {
                    speed_rpm: f64::from(speed_rpm)
                }
            )),
        ]
    }

    fn response_strategy() -> impl Strategy<Value = Response> {
        prop_oneof![
            (-1.0e6f64..1.0e6, any::<u8>())
                .prop_map(|(value, channel)| Response::Value { value, channel }),
            "[A-Za-z][ -~]{0,40}[!-~]".prop_map(Response::Text),
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
        fn reply_round_trip((cmd, reply) in exchange_strategy()) {
            prop_assert!(expects_reply(&cmd));
            let bytes = encoded_reply(&reply);
            prop_assert_eq!(decode_reply(&cmd, &bytes).unwrap(), Decoded::Frame { value: reply, consumed: bytes.len() });
        }

        #[test]
        fn response_round_trip(resp in response_strategy()) {
            let mut bytes = Vec::new();
            encode_response(&resp, &mut bytes);
            prop_assert_eq!(decode_response(&bytes).unwrap(), Decoded::Frame { value: resp, consumed: bytes.len() });
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_make_progress(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            drain(&bytes, decode_command);
            drain(&bytes, decode_response);
            drain(&bytes, |b| decode_reply(&Command::ReadSpeed, b));
        }

        #[test]
        fn parity_round_trips_any_line(cmd in command_strategy()) {
            // What a 7E1 line carries, as seen through an 8-bit serial-over-TCP bridge.
            let wire: Vec<u8> = encoded_command(&cmd).into_iter().map(add_even_parity).collect();
            let data: Vec<u8> = wire.iter().map(|&b| check_even_parity(b).unwrap()).collect();
            prop_assert_eq!(decode_command(&data).unwrap(), Decoded::Frame { value: cmd, consumed: data.len() });
        }
    }
}
