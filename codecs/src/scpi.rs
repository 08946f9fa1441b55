//! SCPI / IEEE 488.2 program messages, error queue and response formatting, plus the UV-Vis
//! spectrophotometer command set built on them (raw TCP socket, lines end `\n` or `\r\n`).
//!
//! Two layers, because labctl's own SCPI command port reuses the first:
//! - generic: [`parse_program_message`] splits a line into [`ProgramUnit`]s (`;`-separated), each with a
//!   parsed [`Header`] and its parameters kept raw until asked for ([`ProgramUnit::params`]), so a unit can
//!   also carry raw JSON ([`ProgramUnit::raw_params`]). [`header_matches`] compares a header with a pattern
//!   in SCPI notation (`[SENSe:]WAVelength:RANGe?`). Errors are [`Fault`]s carrying a [`ScpiError`] number.
//! - the instrument: [`Command`], [`Reply`] and the `encode_*` / `decode_*` functions.
//!
//! The device side of a SCPI instrument never answers a bad command with a reply: it queues an error that
//! the host reads with `SYSTem:ERRor?`. So [`decode_command`] returns a [`Message`]: the commands before the
//! first bad unit, and that unit's [`Fault`] for the simulator to push on its [`ErrorQueue`] (IEEE 488.2
//! discards the rest of a message after a command error). Only a line too long to buffer is a
//! [`DecodeError`]; report it as [`ScpiError::InputBufferOverrun`].

use std::collections::VecDeque;
use std::fmt;

use super::fixed_point::{FixedPointError, common_decimals};
use super::{DecodeError, Decoded, Malformed, split_line};

const PROTOCOL: &str = "SCPI";

/// IEEE 488.2 limits a program mnemonic to 12 characters.
const MAX_MNEMONIC: usize = 12;

/// SCPI-99 caps the error description string at 255 characters.
const MAX_ERROR_STRING: usize = 255;

macro_rules! scpi_errors {
    ($($name:ident = $code:expr, $message:literal;)*) => {
        /// The standard SCPI-99 / IEEE 488.2 error and event numbers.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ScpiError {
            $($name,)*
        }

        impl ScpiError {
            pub const ALL: &'static [ScpiError] = &[$(ScpiError::$name,)*];

            pub fn code(self) -> i16 {
                match self {
                    $(ScpiError::$name => $code,)*
                }
            }

            /// The standard message, e.g. `Undefined header`.
            pub fn message(self) -> &'static str {
                match self {
                    $(ScpiError::$name => $message,)*
                }
            }
        }
    };
}

scpi_errors! {
    NoError = 0, "No error";
    CommandError = -100, "Command error";
    InvalidCharacter = -101, "Invalid character";
    SyntaxError = -102, "Syntax error";
    InvalidSeparator = -103, "Invalid separator";
    DataTypeError = -104, "Data type error";
    GetNotAllowed = -105, "GET not allowed";
    ParameterNotAllowed = -108, "Parameter not allowed";
    MissingParameter = -109, "Missing parameter";
    CommandHeaderError = -110, "Command header error";
    HeaderSeparatorError = -111, "Header separator error";
    ProgramMnemonicTooLong = -112, "Program mnemonic too long";
    UndefinedHeader = -113, "Undefined header";
    HeaderSuffixOutOfRange = -114, "Header suffix out of range";
    UnexpectedNumberOfParameters = -115, "Unexpected number of parameters";
    NumericDataError = -120, "Numeric data error";
    InvalidCharacterInNumber = -121, "Invalid character in number";
    ExponentTooLarge = -123, "Exponent too large";
    TooManyDigits = -124, "Too many digits";
    NumericDataNotAllowed = -128, "Numeric data not allowed";
    SuffixError = -130, "Suffix error";
    InvalidSuffix = -131, "Invalid suffix";
    SuffixTooLong = -134, "Suffix too long";
    SuffixNotAllowed = -138, "Suffix not allowed";
    CharacterDataError = -140, "Character data error";
    InvalidCharacterData = -141, "Invalid character data";
    CharacterDataTooLong = -144, "Character data too long";
    CharacterDataNotAllowed = -148, "Character data not allowed";
    StringDataError = -150, "String data error";
    InvalidStringData = -151, "Invalid string data";
    StringDataNotAllowed = -158, "String data not allowed";
    BlockDataError = -160, "Block data error";
    InvalidBlockData = -161, "Invalid block data";
    BlockDataNotAllowed = -168, "Block data not allowed";
    ExpressionError = -170, "Expression error";
    InvalidExpression = -171, "Invalid expression";
    ExpressionDataNotAllowed = -178, "Expression data not allowed";
    ExecutionError = -200, "Execution error";
    CommandProtected = -203, "Command protected";
    ParameterError = -220, "Parameter error";
    SettingsConflict = -221, "Settings conflict";
    DataOutOfRange = -222, "Data out of range";
    TooMuchData = -223, "Too much data";
    IllegalParameterValue = -224, "Illegal parameter value";
    DataCorruptOrStale = -230, "Data corrupt or stale";
    HardwareError = -240, "Hardware error";
    HardwareMissing = -241, "Hardware missing";
    DeviceSpecificError = -300, "Device-specific error";
    SystemError = -310, "System error";
    QueueOverflow = -350, "Queue overflow";
    InputBufferOverrun = -363, "Input buffer overrun";
    QueryError = -400, "Query error";
    QueryInterrupted = -410, "Query INTERRUPTED";
    QueryUnterminated = -420, "Query UNTERMINATED";
    QueryDeadlocked = -430, "Query DEADLOCKED";
    QueryUnterminatedAfterIndefiniteResponse = -440, "Query UNTERMINATED after indefinite response";
}

impl ScpiError {
    pub fn from_code(code: i32) -> Option<ScpiError> {
        ScpiError::ALL
            .iter()
            .copied()
            .find(|e| i32::from(e.code()) == code)
    }

    /// The standard event status register bit the error sets (IEEE 488.2 11.5.1): CME, EXE, DDE or QYE.
    pub fn esr_bit(self) -> u8 {
        match self.code() {
            0 => 0,
            -199..=-100 => 0x20,
            -299..=-200 => 0x10,
            -499..=-400 => 0x04,
            _ => 0x08,
        }
    }
}

impl fmt::Display for ScpiError {
    /// `-113,"Undefined header"`, as `SYSTem:ERRor?` answers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.code(), format_string(self.message()))
    }
}

/// An error with the device-dependent detail SCPI appends after `;` in the message, so the person reading
/// the error queue learns which value was wrong and not only that one was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub error: ScpiError,
    pub detail: String,
}

impl Fault {
    pub fn new(error: ScpiError, detail: impl Into<String>) -> Fault {
        Fault {
            error,
            detail: detail.into(),
        }
    }

    /// The queue entry: standard message, `;detail` when there is one, capped at 255 characters.
    pub fn to_error_reply(&self) -> ErrorReply {
        let mut message = self.error.message().to_string();
        if !self.detail.is_empty() {
            message.push(';');
            message.push_str(&self.detail);
        }
        if let Some((cut, _)) = message.char_indices().nth(MAX_ERROR_STRING) {
            message.truncate(cut);
        }
        ErrorReply {
            code: i32::from(self.error.code()),
            message,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_error_reply().fmt(f)
    }
}

/// An error queue entry as read back over the wire. The code stays a number: instruments add their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: i32,
    pub message: String,
}

impl ErrorReply {
    pub fn known(&self) -> Option<ScpiError> {
        ScpiError::from_code(self.code)
    }

    /// Parses `<code>,"<message>"`.
    pub fn parse(unit: &str) -> Result<ErrorReply, Malformed> {
        Self::from_unit(unit).map_err(Malformed)
    }

    fn from_unit(unit: &str) -> Result<ErrorReply, String> {
        let (code, message) = unit
            .split_once(',')
            .ok_or_else(|| format!("{unit:?} is not `<code>,\"<message>\"`"))?;
        let code = trim_ws(code);
        let digits = code.strip_prefix(['-', '+']).unwrap_or(code);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("error code {code:?} is not an integer"));
        }
        let code = code
            .parse::<i32>()
            .map_err(|e| format!("error code {code:?}: {e}"))?;
        let message = parse_string(message)
            .ok_or_else(|| format!("error message {message:?} is not a quoted string"))?;
        Ok(ErrorReply { code, message })
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.code, format_string(&self.message))
    }
}

/// The SCPI error/event queue: first in, first out; when full, the newest entry is replaced by -350 so the
/// host learns that errors were lost (SCPI-99 21.8.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorQueue {
    entries: VecDeque<Fault>,
    capacity: usize,
}

impl ErrorQueue {
    /// `capacity` is at least 1, to hold the overflow entry.
    pub fn new(capacity: usize) -> ErrorQueue {
        ErrorQueue {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn push(&mut self, fault: Fault) {
        if self.entries.len() < self.capacity {
            self.entries.push_back(fault);
        } else if let Some(last) = self.entries.back_mut() {
            *last = Fault::new(ScpiError::QueueOverflow, "");
        }
    }

    /// The oldest entry, or `0,"No error"` when empty.
    pub fn pop(&mut self) -> Fault {
        self.entries
            .pop_front()
            .unwrap_or_else(|| Fault::new(ScpiError::NoError, ""))
    }

    /// `*CLS`.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Program messages
// ---------------------------------------------------------------------------------------------------------

/// One header node: the name as sent, upper-cased, and its numeric suffix (`CHANnel2` -> `CHAN`, 2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mnemonic {
    pub name: String,
    pub suffix: Option<u32>,
}

/// A parsed program header: `*IDN?`, `MEAS:ABS?`, `:CONF:INT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// `*XXX` IEEE 488.2 common command.
    pub common: bool,
    /// Leading `:`: starts from the root instead of the current path.
    pub absolute: bool,
    pub mnemonics: Vec<Mnemonic>,
    pub query: bool,
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.common {
            f.write_str("*")?;
        } else if self.absolute {
            f.write_str(":")?;
        }
        for (i, m) in self.mnemonics.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            f.write_str(&m.name)?;
            if let Some(suffix) = m.suffix {
                write!(f, "{suffix}")?;
            }
        }
        if self.query {
            f.write_str("?")?;
        }
        Ok(())
    }
}

/// One `;`-separated unit of a program message. Parameters stay raw until [`ProgramUnit::params`] so that
/// a command can take the rest of the unit verbatim (raw JSON) instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramUnit {
    pub header: Header,
    params: String,
}

impl ProgramUnit {
    /// Everything after the header and its separating whitespace, trimmed, exactly as sent.
    pub fn raw_params(&self) -> &str {
        &self.params
    }

    pub fn has_params(&self) -> bool {
        !self.params.is_empty()
    }

    /// Parses the comma-separated parameters.
    pub fn params(&self) -> Result<Vec<Param>, Fault> {
        parse_params(&self.params)
    }

    /// [`header_matches`] on this unit's header.
    pub fn matches(&self, pattern: &str) -> bool {
        header_matches(&self.header, pattern)
    }
}

/// A program data element.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// Decimal (`-1.5E3`) or non-decimal (`#HFF`, `#Q17`, `#B101`) numeric data, with an optional suffix
    /// unit, upper-cased (`500NM`, `500 nm` -> `NM`).
    Number { value: f64, suffix: Option<String> },
    /// `'...'` or `"..."`, doubled quotes unescaped.
    Str(String),
    /// Character data (`MAXimum`, `ON`), as sent.
    Word(String),
    /// `( ... )` expression data, e.g. a channel list, without the outer parentheses.
    Expression(String),
}

impl Param {
    /// Whether this is character data naming `pattern` (long or short form, any case), e.g. `MAXimum`.
    pub fn is_word(&self, pattern: &str) -> bool {
        match self {
            Param::Word(word) => {
                let node = PatternNode::new(pattern, false);
                let word = word.to_ascii_uppercase();
                word == node.short || word == node.long
            }
            _ => false,
        }
    }
}

/// A program message: its units, and the fault that stopped parsing it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedMessage {
    pub units: Vec<ProgramUnit>,
    pub fault: Option<Fault>,
}

/// Device side, generic: frames and parses the program message at the front of `buf`.
pub fn decode_program_message(buf: &[u8]) -> Result<Decoded<ParsedMessage>, DecodeError> {
    let Some((line, consumed)) = split_line(PROTOCOL, buf, false)? else {
        return Ok(Decoded::Incomplete);
    };
    Ok(Decoded::Frame {
        value: parse_program_message(line),
        consumed,
    })
}

/// Parses one program message (terminator removed). Units are split at `;` outside strings, parentheses
/// and JSON (`{...}`, `[...]`, with JSON string escapes), so quoted or raw JSON passes intact. A trailing `;`
/// is tolerated; parsing stops at the first bad unit.
pub fn parse_program_message(line: &[u8]) -> ParsedMessage {
    let Ok(text) = std::str::from_utf8(line) else {
        return ParsedMessage {
            units: Vec::new(),
            fault: Some(Fault::new(
                ScpiError::InvalidCharacter,
                "message is not valid UTF-8",
            )),
        };
    };
    let mut units = Vec::new();
    if trim_ws(text).is_empty() {
        return ParsedMessage { units, fault: None };
    }
    let (pieces, _) = split_top_level(text, b';');
    let last = pieces.len() - 1;
    for (i, piece) in pieces.into_iter().enumerate() {
        if i == last && i > 0 && trim_ws(piece).is_empty() {
            break;
        }
        match parse_unit(piece) {
            Ok(unit) => units.push(unit),
            Err(fault) => {
                return ParsedMessage {
                    units,
                    fault: Some(fault),
                };
            }
        }
    }
    ParsedMessage { units, fault: None }
}

fn parse_unit(text: &str) -> Result<ProgramUnit, Fault> {
    let text = trim_ws(text);
    if text.is_empty() {
        return Err(Fault::new(
            ScpiError::SyntaxError,
            "empty program message unit",
        ));
    }
    let end = text.find(is_ws).unwrap_or(text.len());
    let (header, params) = text.split_at(end);
    Ok(ProgramUnit {
        header: parse_header(header)?,
        params: trim_ws(params).to_string(),
    })
}

fn parse_header(text: &str) -> Result<Header, Fault> {
    if let Some((i, c)) = text
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '*' | '?')))
    {
        let error = if !c.is_ascii() || c.is_ascii_control() {
            ScpiError::InvalidCharacter
        } else if i > 0 {
            ScpiError::HeaderSeparatorError
        } else {
            ScpiError::SyntaxError
        };
        return Err(Fault::new(error, format!("{c:?} in header {text:?}")));
    }
    let (body, query) = match text.strip_suffix('?') {
        Some(body) => (body, true),
        None => (text, false),
    };
    if body.contains('?') {
        return Err(Fault::new(
            ScpiError::HeaderSeparatorError,
            format!("`?` inside header {text:?}"),
        ));
    }
    let (common, absolute, body) = if let Some(rest) = body.strip_prefix('*') {
        (true, false, rest)
    } else if let Some(rest) = body.strip_prefix(':') {
        (false, true, rest)
    } else {
        (false, false, body)
    };
    if body.contains('*') || (common && body.contains(':')) {
        return Err(Fault::new(
            ScpiError::SyntaxError,
            format!("misplaced `*` or `:` in header {text:?}"),
        ));
    }
    let mnemonics = body
        .split(':')
        .map(parse_mnemonic)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Header {
        common,
        absolute,
        mnemonics,
        query,
    })
}

fn parse_mnemonic(text: &str) -> Result<Mnemonic, Fault> {
    match text.chars().next() {
        None => return Err(Fault::new(ScpiError::SyntaxError, "empty header mnemonic")),
        Some(c) if !c.is_ascii_alphabetic() => {
            return Err(Fault::new(
                ScpiError::SyntaxError,
                format!("mnemonic {text:?} must start with a letter"),
            ));
        }
        Some(_) => {}
    }
    let name_len = text.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (name, digits) = text.split_at(name_len);
    if name.len() > MAX_MNEMONIC {
        return Err(Fault::new(
            ScpiError::ProgramMnemonicTooLong,
            format!("{name:?}"),
        ));
    }
    let suffix = if digits.is_empty() {
        None
    } else {
        let value = digits.parse::<u32>().map_err(|_| {
            Fault::new(
                ScpiError::HeaderSuffixOutOfRange,
                format!("suffix {digits}"),
            )
        })?;
        Some(value)
    };
    Ok(Mnemonic {
        name: name.to_ascii_uppercase(),
        suffix,
    })
}

fn parse_params(text: &str) -> Result<Vec<Param>, Fault> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let (pieces, _) = split_top_level(text, b',');
    pieces
        .into_iter()
        .map(|piece| {
            let piece = trim_ws(piece);
            if piece.is_empty() {
                Err(Fault::new(ScpiError::SyntaxError, "empty parameter"))
            } else {
                parse_param(piece)
            }
        })
        .collect()
}

fn parse_param(text: &str) -> Result<Param, Fault> {
    let Some(first) = text.chars().next() else {
        return Err(Fault::new(ScpiError::SyntaxError, "empty parameter"));
    };
    match first {
        '"' | '\'' => {
            let (value, rest) = parse_quoted(text)?;
            if trim_ws(rest).is_empty() {
                Ok(Param::Str(value))
            } else {
                Err(Fault::new(
                    ScpiError::InvalidSeparator,
                    format!("{rest:?} after a string"),
                ))
            }
        }
        '(' => parse_expression(text),
        '#' => parse_non_decimal(text),
        '0'..='9' | '+' | '-' | '.' => parse_decimal(text),
        c if c.is_ascii_alphabetic() => {
            if let Some(bad) = text
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
            {
                Err(Fault::new(
                    ScpiError::InvalidCharacterData,
                    format!("{bad:?} in {text:?}"),
                ))
            } else if text.len() > MAX_MNEMONIC {
                Err(Fault::new(
                    ScpiError::CharacterDataTooLong,
                    format!("{text:?}"),
                ))
            } else {
                Ok(Param::Word(text.to_string()))
            }
        }
        c if !c.is_ascii() || c.is_ascii_control() => Err(Fault::new(
            ScpiError::InvalidCharacter,
            format!("{c:?} in parameter"),
        )),
        _ => Err(Fault::new(
            ScpiError::SyntaxError,
            format!("parameter {text:?}"),
        )),
    }
}

/// `'...'` or `"..."` at the start of `text`, with the quote doubled inside; returns the value and the rest.
fn parse_quoted(text: &str) -> Result<(String, &str), Fault> {
    let mut chars = text.char_indices();
    let Some((_, quote)) = chars.next() else {
        return Err(Fault::new(ScpiError::InvalidStringData, "empty string"));
    };
    let mut value = String::new();
    let mut chars = chars.peekable();
    while let Some((i, c)) = chars.next() {
        if c == quote {
            if chars.peek().is_some_and(|&(_, next)| next == quote) {
                chars.next();
                value.push(quote);
                continue;
            }
            return Ok((value, &text[i + c.len_utf8()..]));
        }
        value.push(c);
    }
    Err(Fault::new(
        ScpiError::InvalidStringData,
        "unterminated string",
    ))
}

fn parse_expression(text: &str) -> Result<Param, Fault> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return if i + 1 == text.len() {
                        Ok(Param::Expression(text[1..i].to_string()))
                    } else {
                        Err(Fault::new(
                            ScpiError::InvalidExpression,
                            format!("{:?} after `)`", &text[i + 1..]),
                        ))
                    };
                }
            }
            _ => {}
        }
    }
    Err(Fault::new(
        ScpiError::InvalidExpression,
        "unbalanced parentheses",
    ))
}

fn parse_non_decimal(text: &str) -> Result<Param, Fault> {
    let rest = &text[1..];
    let radix = match rest.chars().next() {
        Some('H' | 'h') => 16,
        Some('Q' | 'q') => 8,
        Some('B' | 'b') => 2,
        Some('0'..='9') => {
            return Err(Fault::new(
                ScpiError::BlockDataNotAllowed,
                "arbitrary block data is not supported",
            ));
        }
        _ => return Err(Fault::new(ScpiError::SyntaxError, format!("{text:?}"))),
    };
    let digits = &rest[1..];
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return Err(Fault::new(
            ScpiError::InvalidCharacterInNumber,
            format!("{text:?}"),
        ));
    }
    let value = u64::from_str_radix(digits, radix)
        .map_err(|_| Fault::new(ScpiError::InvalidCharacterInNumber, format!("{text:?}")))?;
    Ok(Param::Number {
        value: value as f64,
        suffix: None,
    })
}

/// `[+-](digits[.digits] | .digits)[(E|e)[+-]digits]`, then optionally whitespace and a suffix unit.
fn parse_decimal(text: &str) -> Result<Param, Fault> {
    let bytes = text.as_bytes();
    let digits_from = |mut i: usize| {
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = usize::from(matches!(bytes.first(), Some(b'+' | b'-')));
    let int_end = digits_from(i);
    let mut digits = int_end - i;
    i = int_end;
    if bytes.get(i) == Some(&b'.') {
        let frac_end = digits_from(i + 1);
        digits += frac_end - (i + 1);
        i = frac_end;
    }
    let bad = |why: &str| {
        Fault::new(
            ScpiError::InvalidCharacterInNumber,
            format!("{text:?}: {why}"),
        )
    };
    if digits == 0 {
        return Err(bad("no digits"));
    }
    if matches!(bytes.get(i), Some(b'E' | b'e')) {
        let sign = usize::from(matches!(bytes.get(i + 1), Some(b'+' | b'-')));
        let exp_end = digits_from(i + 1 + sign);
        if exp_end == i + 1 + sign {
            return Err(bad("exponent without digits"));
        }
        i = exp_end;
    }
    let value: f64 = text[..i].parse().map_err(|_| bad("not a number"))?;
    if !value.is_finite() {
        return Err(Fault::new(ScpiError::ExponentTooLarge, format!("{text:?}")));
    }
    let suffix = trim_ws(&text[i..]);
    if suffix.is_empty() {
        return Ok(Param::Number {
            value,
            suffix: None,
        });
    }
    let starts_ok = suffix.starts_with(|c: char| c.is_ascii_alphabetic() || c == '/');
    if !starts_ok {
        return Err(bad("unexpected character after the number"));
    }
    if !suffix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-'))
    {
        return Err(Fault::new(ScpiError::InvalidSuffix, format!("{suffix:?}")));
    }
    if suffix.len() > MAX_MNEMONIC {
        return Err(Fault::new(ScpiError::SuffixTooLong, format!("{suffix:?}")));
    }
    Ok(Param::Number {
        value,
        suffix: Some(suffix.to_ascii_uppercase()),
    })
}

/// Splits at `separator` outside quotes, parentheses and JSON; also says whether everything was closed.
fn split_top_level(text: &str, separator: u8) -> (Vec<&str>, bool) {
    let bytes = text.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quote: Option<u8> = None;
    let mut json_string = false;
    let mut json_depth = 0usize;
    let mut parens = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if json_string {
            match b {
                b'\\' => i += 1,
                b'"' => json_string = false,
                _ => {}
            }
        } else if let Some(q) = quote {
            if b == q {
                if bytes.get(i + 1) == Some(&q) {
                    i += 1;
                } else {
                    quote = None;
                }
            }
        } else if json_depth > 0 {
            match b {
                b'"' => json_string = true,
                b'{' | b'[' => json_depth += 1,
                b'}' | b']' => json_depth -= 1,
                _ => {}
            }
        } else {
            match b {
                b'"' | b'\'' => quote = Some(b),
                b'(' => parens += 1,
                b')' => parens = parens.saturating_sub(1),
                b'{' | b'[' => json_depth = 1,
                _ if b == separator && parens == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    parts.push(&text[start..]);
    let closed = quote.is_none() && !json_string && json_depth == 0 && parens == 0;
    (parts, closed)
}

/// IEEE 488.2 white space: every byte 0x00..=0x20 except the line feed that ends a message.
fn is_ws(c: char) -> bool {
    c != '\n' && c <= ' '
}

fn trim_ws(text: &str) -> &str {
    text.trim_matches(is_ws)
}

// ---------------------------------------------------------------------------------------------------------
// Header patterns
// ---------------------------------------------------------------------------------------------------------

/// One node of a pattern such as `MEASure`: short form = its upper-case part.
struct PatternNode {
    short: String,
    long: String,
    optional: bool,
    suffix: bool,
}

impl PatternNode {
    fn new(text: &str, optional: bool) -> PatternNode {
        let (text, suffix) = match text.strip_suffix('#') {
            Some(text) => (text, true),
            None => (text, false),
        };
        PatternNode {
            short: text.chars().filter(|c| !c.is_ascii_lowercase()).collect(),
            long: text.to_ascii_uppercase(),
            optional,
            suffix,
        }
    }

    fn matches(&self, m: &Mnemonic, strict_suffix: bool) -> bool {
        (m.name == self.short || m.name == self.long)
            && (!strict_suffix || self.suffix || m.suffix.is_none())
    }
}

struct Pattern {
    common: bool,
    nodes: Vec<PatternNode>,
    query: bool,
}

/// Parses SCPI pattern notation: `*IDN?`, `MEASure:ABSorbance?`, `[SENSe:]WAVelength:RANGe?`,
/// `SYSTem:ERRor[:NEXT]?`; `#` after a node (`CHANnel#`) allows a numeric suffix there.
fn parse_pattern(pattern: &str) -> Pattern {
    let (body, query) = match pattern.strip_suffix('?') {
        Some(body) => (body, true),
        None => (pattern, false),
    };
    let (body, common) = match body.strip_prefix('*') {
        Some(body) => (body, true),
        None => (body.strip_prefix(':').unwrap_or(body), false),
    };
    let mut nodes = Vec::new();
    let mut current = String::new();
    let mut current_optional = false;
    let mut depth = 0usize;
    for c in body.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ':' => {
                if !current.is_empty() {
                    nodes.push(PatternNode::new(&current, current_optional));
                    current.clear();
                }
            }
            _ => {
                if current.is_empty() {
                    current_optional = depth > 0;
                }
                current.push(c);
            }
        }
    }
    if !current.is_empty() {
        nodes.push(PatternNode::new(&current, current_optional));
    }
    Pattern {
        common,
        nodes,
        query,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderMatch {
    Yes,
    /// Matches except for a numeric suffix the node does not take: -114, not -113.
    SuffixOutOfRange,
    No,
}

fn match_header(header: &Header, pattern: &str) -> HeaderMatch {
    let pattern = parse_pattern(pattern);
    if header.common != pattern.common || header.query != pattern.query {
        return HeaderMatch::No;
    }
    if match_nodes(&pattern.nodes, &header.mnemonics, true) {
        HeaderMatch::Yes
    } else if match_nodes(&pattern.nodes, &header.mnemonics, false) {
        HeaderMatch::SuffixOutOfRange
    } else {
        HeaderMatch::No
    }
}

fn match_nodes(nodes: &[PatternNode], mnemonics: &[Mnemonic], strict_suffix: bool) -> bool {
    let Some((node, rest)) = nodes.split_first() else {
        return mnemonics.is_empty();
    };
    (node.optional && match_nodes(rest, mnemonics, strict_suffix))
        || mnemonics.split_first().is_some_and(|(m, ms)| {
            node.matches(m, strict_suffix) && match_nodes(rest, ms, strict_suffix)
        })
}

/// Whether `header` names the command `pattern` in SCPI notation: each node in its short form (the
/// upper-case part) or long form, any case, optional `[...]` nodes present or not, a leading `:` either way.
/// `header_matches(h, "MEASure:ABSorbance?")` holds for `MEAS:ABS?`, `measure:absorbance?`, `:MEAS:ABS?`.
/// The current-path rule for later units of a message is applied by the caller (see [`resolve`]).
pub fn header_matches(header: &Header, pattern: &str) -> bool {
    match_header(header, pattern) == HeaderMatch::Yes
}

// ---------------------------------------------------------------------------------------------------------
// Response formatting and parsing
// ---------------------------------------------------------------------------------------------------------

/// SCPI-99 7.2.1.5 / 7.2.1.4: how NaN and infinities go over the wire.
pub const SCPI_NAN: f64 = 9.91e37;
pub const SCPI_INFINITY: f64 = 9.9e37;

fn non_finite(value: f64) -> Option<String> {
    if value.is_nan() {
        Some("9.91E+37".to_string())
    } else if value.is_infinite() {
        Some(if value > 0.0 { "9.9E+37" } else { "-9.9E+37" }.to_string())
    } else {
        None
    }
}

/// NR1: an integer, `-12`.
pub fn format_nr1(value: i64) -> String {
    value.to_string()
}

/// NR2: fixed point with `decimals` digits, `-12.500`.
pub fn format_nr2(value: f64, decimals: usize) -> String {
    non_finite(value).unwrap_or_else(|| format!("{value:.decimals$}"))
}

/// NR3: scientific with `decimals` mantissa digits and a signed two-digit exponent, `1.2500E+02`.
pub fn format_nr3(value: f64, decimals: usize) -> String {
    if let Some(text) = non_finite(value) {
        return text;
    }
    let text = format!("{value:.decimals$E}");
    let (mantissa, exponent) = text.split_once('E').unwrap_or((&text, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}E{sign}{:02}", exponent.unsigned_abs())
}

/// The shortest decimal that reads back as exactly `value` (NR1 or NR2 shape, never an exponent).
pub fn format_number(value: f64) -> String {
    non_finite(value).unwrap_or_else(|| value.to_string())
}

/// String response data: double quotes, inner `"` doubled. Line feeds become spaces because the link is
/// framed by lines.
pub fn format_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\"\""),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Comma-separated response data elements.
pub fn format_list<I, S>(items: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item.as_ref());
    }
    out
}

/// Splits a response unit into its comma-separated fields, outside quotes. When the quotes do not pair up
/// (an apostrophe in arbitrary ASCII such as `*IDN?`), they are not quotes: split at every comma.
pub fn split_fields(unit: &str) -> Vec<&str> {
    match split_top_level(unit, b',') {
        (fields, true) => fields,
        (_, false) => unit.split(',').collect(),
    }
}

/// Parses an NR1/NR2/NR3 field strictly; SCPI's 9.91E37 / ±9.9E37 come back as NaN / ±infinity.
pub fn parse_number(field: &str) -> Option<f64> {
    let field = trim_ws(field);
    match parse_decimal(field) {
        Ok(Param::Number {
            value,
            suffix: None,
        }) => Some(if value == SCPI_NAN {
            f64::NAN
        } else if value.abs() == SCPI_INFINITY {
            value.signum() * f64::INFINITY
        } else {
            value
        }),
        _ => None,
    }
}

/// Parses a quoted string field, either quote, doubled quotes unescaped.
pub fn parse_string(field: &str) -> Option<String> {
    let field = trim_ws(field);
    if !field.starts_with(['"', '\'']) {
        return None;
    }
    match parse_quoted(field) {
        Ok((value, rest)) if trim_ws(rest).is_empty() => Some(value),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------------
// The spectrophotometer
// ---------------------------------------------------------------------------------------------------------

pub const MIN_WAVELENGTH_NM: f64 = 380.0;
pub const MAX_WAVELENGTH_NM: f64 = 780.0;
pub const MIN_INTEGRATION_MS: u32 = 1;
pub const MAX_INTEGRATION_MS: u32 = 10_000;
/// One point per nanometre over the whole range. Also keeps a spectrum reply (8 bytes a value) well inside
/// the 4096-byte line limit every codec shares.
pub const MAX_SPECTRUM_POINTS: usize = 401;
/// Absorbances go out with 4 decimals, the photometric resolution of the instrument.
pub const ABSORBANCE_DECIMALS: usize = 4;

/// Host -> spectrophotometer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    /// `*IDN?` -> `Manufacturer,Model,Serial,Firmware`.
    Identify,
    /// `*RST`.
    Reset,
    /// `*OPC?` -> `1` once everything before it has finished.
    OperationCompleteQuery,
    /// `*CLS`: clears the error queue and the event status register.
    ClearStatus,
    /// `*ESR?`.
    EventStatusQuery,
    /// `*STB?`.
    StatusByteQuery,
    /// `SYSTem:ERRor[:NEXT]?` -> `<code>,"<message>"`.
    ErrorQuery,
    /// `MEASure:ABSorbance? <wavelength>` -> one absorbance.
    MeasureAbsorbance { wavelength_nm: f64 },
    /// `MEASure:SPECtrum? <start>,<stop>,<step>` -> absorbances at start, start+step, ... <= stop.
    MeasureSpectrum {
        start_nm: f64,
        stop_nm: f64,
        step_nm: f64,
    },
    /// `[SENSe:]WAVelength:RANGe?` -> `380,780`.
    WavelengthRangeQuery,
    /// `CONFigure:INTegration <ms>`.
    SetIntegration { integration_ms: u32 },
    /// `CONFigure:INTegration?`.
    IntegrationQuery,
}

/// One program message as the device understood it: the commands to run in order, then the fault that
/// ended it (to queue after running them), if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub commands: Vec<Command>,
    pub fault: Option<Fault>,
}

/// The wavelength points of a spectrum scan, capped at [`MAX_SPECTRUM_POINTS`]; empty when the scan is
/// invalid. Shared so the simulator and the driver agree on which wavelengths a reply's values belong to.
pub fn spectrum_wavelengths(start_nm: f64, stop_nm: f64, step_nm: f64) -> Vec<f64> {
    let points = spectrum_points(start_nm, stop_nm, step_nm).min(MAX_SPECTRUM_POINTS);
    (0..points).map(|i| start_nm + i as f64 * step_nm).collect()
}

/// How many points `start..=stop` in `step` has (0 when invalid); tolerant of float error at the end.
pub fn spectrum_points(start_nm: f64, stop_nm: f64, step_nm: f64) -> usize {
    let valid = start_nm.is_finite()
        && stop_nm.is_finite()
        && step_nm.is_finite()
        && step_nm > 0.0
        && stop_nm >= start_nm;
    if !valid {
        return 0;
    }
    // `as` saturates, so an absurd step count cannot wrap.
    (((stop_nm - start_nm) / step_nm + 1e-9).floor() + 1.0) as usize
}

/// Writes one command as a program message, `\n` included.
pub fn encode_command(cmd: &Command, out: &mut Vec<u8>) {
    encode_commands(std::slice::from_ref(cmd), out);
}

/// Writes several commands as one program message; later units start with `:` so none depends on the
/// current path left by the one before.
pub fn encode_commands(cmds: &[Command], out: &mut Vec<u8>) {
    for (i, cmd) in cmds.iter().enumerate() {
        let text = command_text(cmd);
        if i > 0 {
            out.push(b';');
            if !text.starts_with('*') {
                out.push(b':');
            }
        }
        out.extend_from_slice(text.as_bytes());
    }
    out.push(b'\n');
}

fn command_text(cmd: &Command) -> String {
    match cmd {
        Command::Identify => "*IDN?".to_string(),
        Command::Reset => "*RST".to_string(),
        Command::OperationCompleteQuery => "*OPC?".to_string(),
        Command::ClearStatus => "*CLS".to_string(),
        Command::EventStatusQuery => "*ESR?".to_string(),
        Command::StatusByteQuery => "*STB?".to_string(),
        Command::ErrorQuery => "SYST:ERR?".to_string(),
        Command::MeasureAbsorbance { wavelength_nm } => {
            format!("MEAS:ABS? {}", format_number(*wavelength_nm))
        }
        Command::MeasureSpectrum {
            start_nm,
            stop_nm,
            step_nm,
        } => format!(
            "MEAS:SPEC? {}",
            format_list([*start_nm, *stop_nm, *step_nm].map(format_number))
        ),
        Command::WavelengthRangeQuery => "SENS:WAV:RANG?".to_string(),
        Command::SetIntegration { integration_ms } => format!("CONF:INT {integration_ms}"),
        Command::IntegrationQuery => "CONF:INT?".to_string(),
    }
}

/// Device side: decodes the program message at the front of `buf` into spectrophotometer commands.
pub fn decode_command(buf: &[u8]) -> Result<Decoded<Message>, DecodeError> {
    Ok(decode_program_message(buf)?.map(|parsed| resolve(&parsed)))
}

type Build = fn(&ProgramUnit) -> Result<Command, Fault>;

/// The command tree: pattern, then how to build the command from the unit.
const COMMANDS: &[(&str, Build)] = &[
    ("*IDN?", |u| no_params(u, Command::Identify)),
    ("*RST", |u| no_params(u, Command::Reset)),
    ("*OPC?", |u| no_params(u, Command::OperationCompleteQuery)),
    ("*CLS", |u| no_params(u, Command::ClearStatus)),
    ("*ESR?", |u| no_params(u, Command::EventStatusQuery)),
    ("*STB?", |u| no_params(u, Command::StatusByteQuery)),
    ("SYSTem:ERRor[:NEXT]?", |u| {
        no_params(u, Command::ErrorQuery)
    }),
    ("MEASure:ABSorbance?", |u| {
        let [wavelength] = exact_params(u)?;
        Ok(Command::MeasureAbsorbance {
            wavelength_nm: wavelength_nm(&wavelength, "wavelength")?,
        })
    }),
    ("MEASure:SPECtrum?", |u| {
        let [start, stop, step] = exact_params(u)?;
        let start_nm = wavelength_nm(&start, "start")?;
        let stop_nm = wavelength_nm(&stop, "stop")?;
        let step_nm = nanometres(&step, "step")?;
        let span = MAX_WAVELENGTH_NM - MIN_WAVELENGTH_NM;
        if !(step_nm > 0.0 && step_nm <= span) {
            return Err(Fault::new(
                ScpiError::DataOutOfRange,
                format!("step {step_nm} nm outside (0, {span}] nm"),
            ));
        }
        if start_nm > stop_nm {
            return Err(Fault::new(
                ScpiError::SettingsConflict,
                format!("start {start_nm} nm is above stop {stop_nm} nm"),
            ));
        }
        let points = spectrum_points(start_nm, stop_nm, step_nm);
        if points > MAX_SPECTRUM_POINTS {
            return Err(Fault::new(
                ScpiError::TooMuchData,
                format!("{points} points, at most {MAX_SPECTRUM_POINTS}"),
            ));
        }
        Ok(Command::MeasureSpectrum {
            start_nm,
            stop_nm,
            step_nm,
        })
    }),
    ("[SENSe:]WAVelength:RANGe?", |u| {
        no_params(u, Command::WavelengthRangeQuery)
    }),
    ("CONFigure:INTegration", |u| {
        let [time] = exact_params(u)?;
        Ok(Command::SetIntegration {
            integration_ms: integration_ms(&time)?,
        })
    }),
    ("CONFigure:INTegration?", |u| {
        no_params(u, Command::IntegrationQuery)
    }),
];

/// Types the units of a parsed message. A unit without a leading `:` is first looked up under the path of
/// the previous command (`MEAS:ABS? 500;SPEC? 400,500,10`), then from the root, which is lenient but
/// never ambiguous for this command tree.
pub fn resolve(parsed: &ParsedMessage) -> Message {
    let mut path: Vec<Mnemonic> = Vec::new();
    let mut commands = Vec::new();
    for unit in &parsed.units {
        match resolve_unit(unit, &path) {
            Ok((cmd, new_path)) => {
                commands.push(cmd);
                if let Some(new_path) = new_path {
                    path = new_path;
                }
            }
            Err(fault) => {
                return Message {
                    commands,
                    fault: Some(fault),
                };
            }
        }
    }
    Message {
        commands,
        fault: parsed.fault.clone(),
    }
}

fn resolve_unit(
    unit: &ProgramUnit,
    path: &[Mnemonic],
) -> Result<(Command, Option<Vec<Mnemonic>>), Fault> {
    let header = &unit.header;
    let mut candidates = Vec::with_capacity(2);
    if !header.common && !header.absolute && !path.is_empty() {
        let mut relative = header.clone();
        relative.mnemonics = path.iter().chain(&header.mnemonics).cloned().collect();
        candidates.push(relative);
    }
    candidates.push(header.clone());
    let mut suffix_out_of_range = false;
    for candidate in &candidates {
        for (pattern, build) in COMMANDS {
            match match_header(candidate, pattern) {
                HeaderMatch::Yes => {
                    let cmd = build(unit)?;
                    let new_path = (!candidate.common).then(|| {
                        candidate
                            .mnemonics
                            .split_last()
                            .map(|(_, p)| p.to_vec())
                            .unwrap_or_default()
                    });
                    return Ok((cmd, new_path));
                }
                HeaderMatch::SuffixOutOfRange => suffix_out_of_range = true,
                HeaderMatch::No => {}
            }
        }
    }
    let error = if suffix_out_of_range {
        ScpiError::HeaderSuffixOutOfRange
    } else {
        ScpiError::UndefinedHeader
    };
    Err(Fault::new(error, header.to_string()))
}

fn no_params(unit: &ProgramUnit, cmd: Command) -> Result<Command, Fault> {
    if unit.has_params() {
        Err(Fault::new(
            ScpiError::ParameterNotAllowed,
            format!("{} takes no parameters", unit.header),
        ))
    } else {
        Ok(cmd)
    }
}

fn exact_params<const N: usize>(unit: &ProgramUnit) -> Result<[Param; N], Fault> {
    let params = unit.params()?;
    let count = params.len();
    params.try_into().map_err(|_| {
        let error = if count < N {
            ScpiError::MissingParameter
        } else {
            ScpiError::ParameterNotAllowed
        };
        Fault::new(
            error,
            format!("{} takes {N} parameter(s), got {count}", unit.header),
        )
    })
}

/// A length in nanometres: a number without suffix or with `NM`.
fn nanometres(param: &Param, what: &str) -> Result<f64, Fault> {
    match param {
        Param::Number {
            value,
            suffix: None,
        } => Ok(*value),
        Param::Number {
            value,
            suffix: Some(suffix),
        } if suffix == "NM" => Ok(*value),
        Param::Number {
            suffix: Some(suffix),
            ..
        } => Err(Fault::new(
            ScpiError::InvalidSuffix,
            format!("{what}: {suffix} is not NM"),
        )),
        other => Err(Fault::new(
            ScpiError::DataTypeError,
            format!("{what} must be a number, got {other:?}"),
        )),
    }
}

fn wavelength_nm(param: &Param, what: &str) -> Result<f64, Fault> {
    let nm = if param.is_word("MINimum") {
        MIN_WAVELENGTH_NM
    } else if param.is_word("MAXimum") {
        MAX_WAVELENGTH_NM
    } else {
        nanometres(param, what)?
    };
    if (MIN_WAVELENGTH_NM..=MAX_WAVELENGTH_NM).contains(&nm) {
        Ok(nm)
    } else {
        Err(Fault::new(
            ScpiError::DataOutOfRange,
            format!("{what} {nm} nm outside {MIN_WAVELENGTH_NM}-{MAX_WAVELENGTH_NM} nm"),
        ))
    }
}

/// Integration time: milliseconds by default, `MS`, `S` or `US` suffixes, MIN/MAX; rounded to whole ms.
fn integration_ms(param: &Param) -> Result<u32, Fault> {
    let ms = match param {
        p if p.is_word("MINimum") => return Ok(MIN_INTEGRATION_MS),
        p if p.is_word("MAXimum") => return Ok(MAX_INTEGRATION_MS),
        Param::Number { value, suffix } => match suffix.as_deref() {
            None | Some("MS") => *value,
            Some("S") => value * 1000.0,
            Some("US") => value / 1000.0,
            Some(other) => {
                return Err(Fault::new(
                    ScpiError::InvalidSuffix,
                    format!("integration time in {other}"),
                ));
            }
        },
        other => {
            return Err(Fault::new(
                ScpiError::DataTypeError,
                format!("integration time must be a number, got {other:?}"),
            ));
        }
    };
    let rounded = ms.round();
    if (f64::from(MIN_INTEGRATION_MS)..=f64::from(MAX_INTEGRATION_MS)).contains(&rounded) {
        Ok(rounded as u32)
    } else {
        Err(Fault::new(
            ScpiError::DataOutOfRange,
            format!("integration {ms} ms outside {MIN_INTEGRATION_MS}-{MAX_INTEGRATION_MS} ms"),
        ))
    }
}

/// `*IDN?`: four fields of arbitrary ASCII.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub firmware: String,
}

/// A response unit typed by the query it answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Identity(Identity),
    /// `*OPC?` -> `1`.
    OperationComplete,
    /// `*ESR?`.
    EventStatus(u8),
    /// `*STB?`.
    StatusByte(u8),
    /// `SYSTem:ERRor?`.
    Error(ErrorReply),
    /// `MEASure:ABSorbance?`: absorbance (dimensionless, log10 of I0/I).
    Absorbance {
        absorbance: f64,
    },
    /// `MEASure:SPECtrum?`: one absorbance per point of [`spectrum_wavelengths`].
    Spectrum {
        absorbances: Vec<f64>,
    },
    /// `[SENSe:]WAVelength:RANGe?`.
    WavelengthRange {
        min_nm: f64,
        max_nm: f64,
    },
    /// `CONFigure:INTegration?`.
    Integration {
        integration_ms: u32,
    },
}

impl Reply {
    /// The response unit text. Identity fields lose `,`, `;` and control characters (to spaces): they
    /// would otherwise split the reply.
    pub fn to_unit(&self) -> String {
        let absorbance = |a: f64| format_nr2(a, ABSORBANCE_DECIMALS);
        match self {
            Reply::Identity(id) => {
                let clean = |s: &str| -> String {
                    s.chars()
                        .map(|c| {
                            if c == ',' || c == ';' || c.is_control() {
                                ' '
                            } else {
                                c
                            }
                        })
                        .collect()
                };
                format_list(
                    [&id.manufacturer, &id.model, &id.serial, &id.firmware].map(|s| clean(s)),
                )
            }
            Reply::OperationComplete => "1".to_string(),
            Reply::EventStatus(v) | Reply::StatusByte(v) => format_nr1(i64::from(*v)),
            Reply::Error(e) => e.to_string(),
            Reply::Absorbance { absorbance: a } => absorbance(*a),
            Reply::Spectrum { absorbances } => {
                format_list(absorbances.iter().map(|a| absorbance(*a)))
            }
            Reply::WavelengthRange { min_nm, max_nm } => {
                format_list([format_number(*min_nm), format_number(*max_nm)])
            }
            Reply::Integration { integration_ms } => format_nr1(i64::from(*integration_ms)),
        }
    }
}

/// The decimals every number of a reading reply is printed with (`0.4321,0.4310,...` gives 4), for an
/// instrument that prints fixed point (NR2). SCPI has no checksum; an instrument prints its readings at a
/// fixed resolution, so a field with another number of decimals, or none before the point (`.4321`: a
/// dropped `0`), lost or gained bytes on the line. `None` when the reply is not all fixed point (NR1, NR3:
/// nothing to hold it to); `Some(Err)` names the damaged field.
pub fn reading_decimals(line: &[u8]) -> Option<Result<usize, FixedPointError>> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.trim_end_matches(['\r', '\n']).trim();
    if text.is_empty() || text.contains(['E', 'e']) {
        return None;
    }
    let fields = text.split(',').map(str::trim);
    common_decimals(fields, &['-', '+'], |i| format!("field {}", i + 1)).transpose()
}

/// Parses the response unit answering `cmd`.
pub fn parse_reply(cmd: &Command, unit: &str) -> Result<Reply, Malformed> {
    reply_from_fields(cmd, unit).map_err(Malformed)
}

fn reply_from_fields(cmd: &Command, unit: &str) -> Result<Reply, String> {
    let number =
        |field: &str| parse_number(field).ok_or_else(|| format!("{field:?} is not a number"));
    let integer = |field: &str, max: f64| -> Result<f64, String> {
        let value = number(field)?;
        if value.fract() == 0.0 && (0.0..=max).contains(&value) {
            Ok(value)
        } else {
            Err(format!("{field:?} is not an integer in 0..={max}"))
        }
    };
    let fields = split_fields(unit);
    let single = || match fields.as_slice() {
        [field] => Ok(*field),
        _ => Err(format!("expected one value, got {unit:?}")),
    };
    match cmd {
        Command::Identify => match fields.as_slice() {
            [manufacturer, model, serial, firmware] => Ok(Reply::Identity(Identity {
                manufacturer: trim_ws(manufacturer).to_string(),
                model: trim_ws(model).to_string(),
                serial: trim_ws(serial).to_string(),
                firmware: trim_ws(firmware).to_string(),
            })),
            _ => Err(format!("*IDN? reply {unit:?} does not have 4 fields")),
        },
        Command::OperationCompleteQuery => match number(single()?)? {
            1.0 => Ok(Reply::OperationComplete),
            other => Err(format!("*OPC? answered {other}, not 1")),
        },
        Command::EventStatusQuery => Ok(Reply::EventStatus(integer(single()?, 255.0)? as u8)),
        Command::StatusByteQuery => Ok(Reply::StatusByte(integer(single()?, 255.0)? as u8)),
        Command::ErrorQuery => ErrorReply::from_unit(unit).map(Reply::Error),
        Command::MeasureAbsorbance { .. } => Ok(Reply::Absorbance {
            absorbance: number(single()?)?,
        }),
        Command::MeasureSpectrum { .. } => {
            let absorbances = fields
                .iter()
                .map(|f| number(f))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Reply::Spectrum { absorbances })
        }
        Command::WavelengthRangeQuery => match fields.as_slice() {
            [min, max] => Ok(Reply::WavelengthRange {
                min_nm: number(min)?,
                max_nm: number(max)?,
            }),
            _ => Err(format!("expected `<min>,<max>`, got {unit:?}")),
        },
        Command::IntegrationQuery => Ok(Reply::Integration {
            integration_ms: integer(single()?, f64::from(u32::MAX))? as u32,
        }),
        Command::Reset | Command::ClearStatus | Command::SetIntegration { .. } => {
            Err(format!("{cmd:?} is not a query and has no reply"))
        }
    }
}

/// A response message: one unit per query of the program message, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub units: Vec<String>,
}

/// Writes a response message, `\n` included; units are joined with `;`, line breaks inside become spaces.
pub fn encode_response(resp: &Response, out: &mut Vec<u8>) {
    for (i, unit) in resp.units.iter().enumerate() {
        if i > 0 {
            out.push(b';');
        }
        out.extend(
            unit.bytes()
                .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
    }
    out.push(b'\n');
}

/// Device side: writes the replies to the queries of one message as one response message.
pub fn encode_replies(replies: &[Reply], out: &mut Vec<u8>) {
    encode_response(
        &Response {
            units: replies.iter().map(Reply::to_unit).collect(),
        },
        out,
    );
}

/// Host side: decodes the response message at the front of `buf` into its units (split at `;` outside
/// strings and JSON; a line whose quotes do not pair up, e.g. an apostrophe in `*IDN?`, stays one unit).
pub fn decode_response(buf: &[u8]) -> Result<Decoded<Response>, DecodeError> {
    let Some((line, consumed)) = split_line(PROTOCOL, buf, false)? else {
        return Ok(Decoded::Incomplete);
    };
    parse_response(line)
        .map(|value| Decoded::Frame { value, consumed })
        .map_err(|reason| DecodeError::new(PROTOCOL, &buf[..consumed], reason))
}

fn parse_response(line: &[u8]) -> Result<Response, String> {
    let text = std::str::from_utf8(line).map_err(|_| "response is not valid UTF-8".to_string())?;
    if let Some(c) = text.chars().find(|&c| c.is_control() && c != '\t') {
        return Err(format!("control character {c:?} in response"));
    }
    if trim_ws(text).is_empty() {
        return Err("empty response message".to_string());
    }
    let (units, closed) = split_top_level(text, b';');
    let units = if closed {
        units.into_iter().map(str::to_string).collect()
    } else {
        vec![text.to_string()]
    };
    Ok(Response { units })
}

/// Host side, one query: decodes the response to `cmd` at the front of `buf`.
pub fn decode_reply(cmd: &Command, buf: &[u8]) -> Result<Decoded<Reply>, DecodeError> {
    let Some((line, consumed)) = split_line(PROTOCOL, buf, false)? else {
        return Ok(Decoded::Incomplete);
    };
    let frame = &buf[..consumed];
    let response =
        parse_response(line).map_err(|reason| DecodeError::new(PROTOCOL, frame, reason))?;
    let [unit] = response.units.as_slice() else {
        let reason = format!("expected one response unit, got {}", response.units.len());
        return Err(DecodeError::new(PROTOCOL, frame, reason));
    };
    parse_reply(cmd, unit)
        .map(|value| Decoded::Frame { value, consumed })
        .map_err(|reason| DecodeError::new(PROTOCOL, frame, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_decimals_holds_every_field_to_one_fixed_point_shape() {
        assert_eq!(reading_decimals(b"0.4321\n"), Some(Ok(4)));
        assert_eq!(reading_decimals(b"0.4321,1.2000,-0.0012\r\n"), Some(Ok(4)));
        // Bytes lost on the line.
        assert!(
            matches!(reading_decimals(b".4321\n"), Some(Err(e)) if e.to_string().contains("no digits before"))
        );
        assert!(
            matches!(reading_decimals(b"04321\n"), Some(Err(e)) if e.to_string().contains("no decimal point"))
        );
        assert!(
            matches!(reading_decimals(b"0.4321,0.431,0.4300\n"), Some(Err(e)) if e.to_string().contains("field 2") && e.to_string().contains("3 decimals"))
        );
        assert!(matches!(
            reading_decimals(b"0.4321,,0.4300\n"),
            Some(Err(_))
        ));
        // Scientific notation, or nothing: no shape to hold it to.
        assert_eq!(reading_decimals(b"4.321E-01\n"), None);
        assert_eq!(reading_decimals(b"\n"), None);
        assert_eq!(reading_decimals(b"\xff\n"), None);
    }
    use proptest::prelude::*;

    fn message(bytes: &[u8]) -> Message {
        match decode_command(bytes).unwrap() {
            Decoded::Frame { value, consumed } => {
                assert_eq!(consumed, bytes.len(), "{}", String::from_utf8_lossy(bytes));
                value
            }
            Decoded::Incomplete => panic!("incomplete: {}", String::from_utf8_lossy(bytes)),
        }
    }

    fn single(bytes: &[u8]) -> Command {
        let msg = message(bytes);
        assert_eq!(msg.fault, None, "{}", String::from_utf8_lossy(bytes));
        assert_eq!(msg.commands.len(), 1, "{}", String::from_utf8_lossy(bytes));
        msg.commands[0]
    }

    fn fault_code(bytes: &[u8]) -> i16 {
        message(bytes)
            .fault
            .unwrap_or_else(|| panic!("no fault for {}", String::from_utf8_lossy(bytes)))
            .error
            .code()
    }

    fn header(text: &str) -> Header {
        parse_header(text).unwrap()
    }

    fn unit(text: &str) -> ProgramUnit {
        parse_unit(text).unwrap()
    }

    #[test]
    fn header_matches_short_long_case_and_leading_colon() {
        for text in [
            "MEAS:ABS?",
            "measure:absorbance?",
            ":MEAS:ABS?",
            "MeAsUrE:aBs?",
            "meas:ABSORBANCE?",
        ] {
            assert!(
                header_matches(&header(text), "MEASure:ABSorbance?"),
                "{text}"
            );
        }
        for text in [
            "MEAS:ABS",
            "MEASU:ABS?",
            "MEA:ABS?",
            "MEAS:ABS:X?",
            "ABS?",
            "MEAS2:ABS?",
            "*MEAS?",
        ] {
            assert!(
                !header_matches(&header(text), "MEASure:ABSorbance?"),
                "{text}"
            );
        }
        assert!(header_matches(&header("*idn?"), "*IDN?"));
        assert!(!header_matches(&header("*IDN"), "*IDN?"));
        assert!(!header_matches(&header("IDN?"), "*IDN?"));
        // Optional nodes, in front and at the end.
        for text in [
            "WAV:RANG?",
            "SENS:WAV:RANG?",
            "sense:wavelength:range?",
            ":SENSE:WAV:RANGE?",
        ] {
            assert!(
                header_matches(&header(text), "[SENSe:]WAVelength:RANGe?"),
                "{text}"
            );
        }
        assert!(header_matches(&header("SYST:ERR?"), "SYSTem:ERRor[:NEXT]?"));
        assert!(header_matches(
            &header("SYST:ERR:NEXT?"),
            "SYSTem:ERRor[:NEXT]?"
        ));
        // Numeric suffixes only where the pattern has `#`.
        assert!(header_matches(&header("OUTP2:STAT?"), "OUTPut#:STATe?"));
        assert!(header_matches(&header("OUTP:STAT?"), "OUTPut#:STATe?"));
        assert_eq!(
            match_header(&header("MEAS2:ABS?"), "MEASure:ABSorbance?"),
            HeaderMatch::SuffixOutOfRange
        );
    }

    #[test]
    fn program_message_structure() {
        let parsed = parse_program_message(b"*RST; :MEAS:ABS? 500 NM ;*opc?;");
        assert_eq!(parsed.fault, None);
        assert_eq!(parsed.units.len(), 3);
        assert_eq!(parsed.units[0].header.to_string(), "*RST");
        assert!(!parsed.units[0].has_params());
        let abs = &parsed.units[1];
        assert_eq!(abs.header.to_string(), ":MEAS:ABS?");
        assert!(abs.header.absolute && abs.header.query && !abs.header.common);
        assert_eq!(abs.raw_params(), "500 NM");
        assert_eq!(
            abs.params().unwrap(),
            vec![Param::Number {
                value: 500.0,
                suffix: Some("NM".into())
            }]
        );
        assert!(parsed.units[2].matches("*OPC?"));
        assert_eq!(
            parse_program_message(b"CHAN12:VOLT3?").units[0]
                .header
                .mnemonics,
            vec![
                Mnemonic {
                    name: "CHAN".into(),
                    suffix: Some(12)
                },
                Mnemonic {
                    name: "VOLT".into(),
                    suffix: Some(3)
                }
            ]
        );
        assert_eq!(parse_program_message(b"  \t").units, vec![]);
    }

    #[test]
    fn parameter_kinds() {
        let number = |value: f64| Param::Number {
            value,
            suffix: None,
        };
        let cases: Vec<(&str, Vec<Param>)> = vec![
            (
                "1, -2.5, +.5, 5., 1.5E3, 2e-3, 1E+2",
                vec![
                    number(1.0),
                    number(-2.5),
                    number(0.5),
                    number(5.0),
                    number(1500.0),
                    number(0.002),
                    number(100.0),
                ],
            ),
            (
                "500NM, 500 nm, 10 ms, 3 M/S2",
                vec![
                    Param::Number {
                        value: 500.0,
                        suffix: Some("NM".into()),
                    },
                    Param::Number {
                        value: 500.0,
                        suffix: Some("NM".into()),
                    },
                    Param::Number {
                        value: 10.0,
                        suffix: Some("MS".into()),
                    },
                    Param::Number {
                        value: 3.0,
                        suffix: Some("M/S2".into()),
                    },
                ],
            ),
            (
                "#HFF,#q17,#B101",
                vec![number(255.0), number(15.0), number(5.0)],
            ),
            (
                r#"'it''s', "say ""hi""", "a,b;c", ''"#,
                vec![
                    Param::Str("it's".into()),
                    Param::Str("say \"hi\"".into()),
                    Param::Str("a,b;c".into()),
                    Param::Str(String::new()),
                ],
            ),
            (
                "MAX, on, Chan_2",
                vec![
                    Param::Word("MAX".into()),
                    Param::Word("on".into()),
                    Param::Word("Chan_2".into()),
                ],
            ),
            (
                "(@1,2:4), 7",
                vec![Param::Expression("@1,2:4".into()), number(7.0)],
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                unit(&format!("X {text}")).params().unwrap(),
                expected,
                "{text}"
            );
        }
        assert!(Param::Word("max".into()).is_word("MAXimum"));
        assert!(Param::Word("MAXIMUM".into()).is_word("MAXimum"));
        assert!(!Param::Word("MAXI".into()).is_word("MAXimum"));
        assert!(!Param::Str("MAX".into()).is_word("MAXimum"));
    }

    #[test]
    fn parameter_syntax_errors_have_their_numbers() {
        let cases: [(&str, ScpiError); 16] = [
            ("1,,2", ScpiError::SyntaxError),
            ("1,", ScpiError::SyntaxError),
            ("'abc", ScpiError::InvalidStringData),
            ("'abc'def", ScpiError::InvalidSeparator),
            ("1.2.3", ScpiError::InvalidCharacterInNumber),
            ("-", ScpiError::InvalidCharacterInNumber),
            ("1E", ScpiError::InvalidCharacterInNumber),
            ("1E999", ScpiError::ExponentTooLarge),
            ("5 N*M", ScpiError::InvalidSuffix),
            ("5 ABCDEFGHIJKLM", ScpiError::SuffixTooLong),
            ("AB-C", ScpiError::InvalidCharacterData),
            ("ABCDEFGHIJKLM", ScpiError::CharacterDataTooLong),
            ("#15hello", ScpiError::BlockDataNotAllowed),
            ("#HXYZ", ScpiError::InvalidCharacterInNumber),
            ("(1,2", ScpiError::InvalidExpression),
            ("{\"a\":1}", ScpiError::SyntaxError),
        ];
        for (text, error) in cases {
            assert_eq!(
                unit(&format!("X {text}")).params().unwrap_err().error,
                error,
                "{text}"
            );
        }
        assert_eq!(
            unit("X é").params().unwrap_err().error,
            ScpiError::InvalidCharacter
        );
    }

    #[test]
    fn header_syntax_errors_have_their_numbers() {
        let cases: [(&[u8], ScpiError); 10] = [
            (b"MEAS:ABS?500", ScpiError::HeaderSeparatorError),
            (b"MEAS:ABS\"x\"", ScpiError::HeaderSeparatorError),
            (b"MEAS?:ABS", ScpiError::HeaderSeparatorError),
            (b"MEAS::ABS?", ScpiError::SyntaxError),
            (b"MEAS:ABS:?", ScpiError::SyntaxError),
            (b"1MEAS?", ScpiError::SyntaxError),
            (b"*IDN:X?", ScpiError::SyntaxError),
            (b"ABCDEFGHIJKLMN?", ScpiError::ProgramMnemonicTooLong),
            (b"MEAS\xC3\xA9?", ScpiError::InvalidCharacter),
            (b"\xFF\xFE", ScpiError::InvalidCharacter),
        ];
        for (bytes, error) in cases {
            let parsed = parse_program_message(bytes);
            assert_eq!(
                parsed.fault.map(|f| f.error),
                Some(error),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        let parsed = parse_program_message(b"*RST;;*CLS");
        assert_eq!(parsed.units.len(), 1, "units before the bad one are kept");
        assert_eq!(parsed.fault.map(|f| f.error), Some(ScpiError::SyntaxError));
    }

    #[test]
    fn json_survives_raw_or_quoted() {
        let json = r#"{"name":"it's; \"x\", (y)","steps":[{"t":1},{"t":2}],"n":null}"#;
        let line = format!("RUN:SUBM {json};*OPC?");
        let parsed = parse_program_message(line.as_bytes());
        assert_eq!(parsed.fault, None);
        assert_eq!(parsed.units.len(), 2);
        assert!(parsed.units[0].matches("RUN:SUBMit"));
        assert_eq!(parsed.units[0].raw_params(), json);
        assert!(parsed.units[1].matches("*OPC?"));

        // Quoted: the string comes back exactly once the SCPI doubling is undone.
        let quoted = format_string(json);
        let line = format!("RUN:SUBM {quoted};*OPC?");
        let parsed = parse_program_message(line.as_bytes());
        assert_eq!(parsed.units.len(), 2);
        assert_eq!(
            parsed.units[0].params().unwrap(),
            vec![Param::Str(json.to_string())]
        );
        let single_quoted = format!("RUN:SUBM '{}'", json.replace('\'', "''"));
        let parsed = parse_program_message(single_quoted.as_bytes());
        assert_eq!(
            parsed.units[0].params().unwrap(),
            vec![Param::Str(json.to_string())]
        );
    }

    #[test]
    fn spectrophotometer_commands_both_directions() {
        let cases: [(&[u8], Command); 12] = [
            (b"*IDN?\n", Command::Identify),
            (b"*RST\n", Command::Reset),
            (b"*OPC?\n", Command::OperationCompleteQuery),
            (b"*CLS\n", Command::ClearStatus),
            (b"*ESR?\n", Command::EventStatusQuery),
            (b"*STB?\n", Command::StatusByteQuery),
            (b"SYST:ERR?\n", Command::ErrorQuery),
            (
                b"MEAS:ABS? 500\n",
                Command::MeasureAbsorbance {
                    wavelength_nm: 500.0,
                },
            ),
            (
                b"MEAS:SPEC? 400,500,2.5\n",
                Command::MeasureSpectrum {
                    start_nm: 400.0,
                    stop_nm: 500.0,
                    step_nm: 2.5,
                },
            ),
            (b"SENS:WAV:RANG?\n", Command::WavelengthRangeQuery),
            (
                b"CONF:INT 100\n",
                Command::SetIntegration {
                    integration_ms: 100,
                },
            ),
            (b"CONF:INT?\n", Command::IntegrationQuery),
        ];
        for (bytes, cmd) in cases {
            let mut out = Vec::new();
            encode_command(&cmd, &mut out);
            assert_eq!(out, bytes);
            assert_eq!(single(bytes), cmd, "{}", String::from_utf8_lossy(bytes));
        }
        let mut out = Vec::new();
        encode_commands(
            &[
                Command::Reset,
                Command::MeasureAbsorbance {
                    wavelength_nm: 450.5,
                },
                Command::Identify,
            ],
            &mut out,
        );
        assert_eq!(out, b"*RST;:MEAS:ABS? 450.5;*IDN?\n");
    }

    #[test]
    fn spellings_of_the_same_command() {
        let abs = Command::MeasureAbsorbance {
            wavelength_nm: 500.0,
        };
        for text in [
            "MEAS:ABS? 500",
            "measure:absorbance? 500",
            ":MEAS:ABS? 500",
            "Meas:Abs?\t500",
            "MEAS:ABS? 500NM",
            "MEAS:ABS? 500 nm",
            "MEAS:ABS? 5.0E2",
            "MEAS:ABS? 0.5e3 NM",
            "MEAS:ABS? +500.000",
            "  MEAS:ABS?  500  ",
            "MEAS:ABS? 500\r",
        ] {
            assert_eq!(single(format!("{text}\n").as_bytes()), abs, "{text}");
        }
        assert_eq!(single(b"MEAS:ABS? 500\r\n"), abs);
        assert_eq!(
            single(b"MEAS:ABS? MIN\n"),
            Command::MeasureAbsorbance {
                wavelength_nm: 380.0
            }
        );
        assert_eq!(
            single(b"MEAS:ABS? maximum\n"),
            Command::MeasureAbsorbance {
                wavelength_nm: 780.0
            }
        );
        assert_eq!(single(b"WAV:RANG?\n"), Command::WavelengthRangeQuery);
        assert_eq!(single(b"SYSTEM:ERROR:NEXT?\n"), Command::ErrorQuery);
        assert_eq!(
            single(b"CONF:INT 0.25 S\n"),
            Command::SetIntegration {
                integration_ms: 250
            }
        );
        assert_eq!(
            single(b"CONF:INT 99.6\n"),
            Command::SetIntegration {
                integration_ms: 100
            }
        );
        assert_eq!(
            single(b"CONF:INT 5000 US\n"),
            Command::SetIntegration { integration_ms: 5 }
        );
        assert_eq!(
            single(b"CONF:INT MAX\n"),
            Command::SetIntegration {
                integration_ms: 10_000
            }
        );
    }

    #[test]
    fn several_units_and_the_current_path() {
        let msg = message(b"*RST;MEAS:ABS? 500;SPEC? 400,410,5;*OPC?;ABS? 600;:SYST:ERR?\n");
        assert_eq!(msg.fault, None);
        assert_eq!(
            msg.commands,
            vec![
                Command::Reset,
                Command::MeasureAbsorbance {
                    wavelength_nm: 500.0
                },
                Command::MeasureSpectrum {
                    start_nm: 400.0,
                    stop_nm: 410.0,
                    step_nm: 5.0
                },
                Command::OperationCompleteQuery,
                // Common commands leave the path alone.
                Command::MeasureAbsorbance {
                    wavelength_nm: 600.0
                },
                Command::ErrorQuery,
            ]
        );
        // Not under the path: found from the root (lenient), and the path follows.
        let msg = message(b"CONF:INT 10;MEAS:ABS? 500;INT?\n");
        assert_eq!(
            msg.commands[1],
            Command::MeasureAbsorbance {
                wavelength_nm: 500.0
            }
        );
        assert_eq!(
            msg.fault.map(|f| f.error),
            Some(ScpiError::UndefinedHeader),
            "INT? is not under MEAS"
        );
    }

    #[test]
    fn parameter_errors_map_to_scpi_numbers() {
        let cases: [(&[u8], i16); 22] = [
            (b"MEAS:ABS? 900\n", -222),
            (b"MEAS:ABS? 379.9\n", -222),
            (b"MEAS:ABS?\n", -109),
            (b"MEAS:ABS? 500,600\n", -108),
            (b"MEAS:ABS? 'abc'\n", -104),
            (b"MEAS:ABS? ON\n", -104),
            (b"MEAS:ABS? 500 HZ\n", -131),
            (b"MEAS:ABS? 'abc\n", -151),
            (b"MEAS:ABS?500\n", -111),
            (b"MEAS:ABS 500\n", -113),
            (b"MEASU:ABS? 500\n", -113),
            (b"FOO?\n", -113),
            (b"*RST?\n", -113),
            (b"MEAS2:ABS? 500\n", -114),
            (b"*RST 1\n", -108),
            (b"*IDN? x\n", -108),
            (b"MEAS:SPEC? 600,500,10\n", -221),
            (b"MEAS:SPEC? 380,780,0.5\n", -223),
            (b"MEAS:SPEC? 380,780,0\n", -222),
            (b"MEAS:SPEC? 380,780\n", -109),
            (b"CONF:INT 0\n", -222),
            (b"CONF:INT 20001 MS\n", -222),
        ];
        for (bytes, code) in cases {
            assert_eq!(
                fault_code(bytes),
                code,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        // Units before the bad one run; the rest of the message is discarded.
        let msg = message(b"*CLS;MEAS:ABS? 900;*RST\n");
        assert_eq!(msg.commands, vec![Command::ClearStatus]);
        let fault = msg.fault.unwrap();
        assert_eq!(fault.error, ScpiError::DataOutOfRange);
        assert_eq!(
            fault.to_string(),
            r#"-222,"Data out of range;wavelength 900 nm outside 380-780 nm""#
        );
    }

    #[test]
    fn error_numbers_and_messages() {
        let expected = [
            (ScpiError::CommandError, r#"-100,"Command error""#),
            (ScpiError::SyntaxError, r#"-102,"Syntax error""#),
            (ScpiError::DataTypeError, r#"-104,"Data type error""#),
            (
                ScpiError::ParameterNotAllowed,
                r#"-108,"Parameter not allowed""#,
            ),
            (ScpiError::MissingParameter, r#"-109,"Missing parameter""#),
            (ScpiError::UndefinedHeader, r#"-113,"Undefined header""#),
            (ScpiError::SettingsConflict, r#"-221,"Settings conflict""#),
            (ScpiError::DataOutOfRange, r#"-222,"Data out of range""#),
            (ScpiError::TooMuchData, r#"-223,"Too much data""#),
            (ScpiError::ExecutionError, r#"-200,"Execution error""#),
            (ScpiError::QueueOverflow, r#"-350,"Queue overflow""#),
            (ScpiError::QueryInterrupted, r#"-410,"Query INTERRUPTED""#),
            (ScpiError::NoError, r#"0,"No error""#),
        ];
        for (error, text) in expected {
            assert_eq!(error.to_string(), text);
            let reply = ErrorReply::parse(text).unwrap();
            assert_eq!(reply.known(), Some(error));
            assert_eq!(reply.message, error.message());
        }
        let mut codes: Vec<i16> = ScpiError::ALL.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ScpiError::ALL.len(), "codes are unique");
        for &error in ScpiError::ALL {
            assert_eq!(ScpiError::from_code(i32::from(error.code())), Some(error));
        }
        assert_eq!(ScpiError::from_code(-999), None);
        assert_eq!(ScpiError::SyntaxError.esr_bit(), 0x20);
        assert_eq!(ScpiError::DataOutOfRange.esr_bit(), 0x10);
        assert_eq!(ScpiError::QueueOverflow.esr_bit(), 0x08);
        assert_eq!(ScpiError::QueryInterrupted.esr_bit(), 0x04);
        assert_eq!(ScpiError::NoError.esr_bit(), 0);
        let long = Fault::new(ScpiError::ExecutionError, "x".repeat(1000)).to_error_reply();
        assert_eq!(long.message.chars().count(), 255);
        assert!(ErrorReply::parse("-113").is_err());
        assert!(ErrorReply::parse("abc,\"x\"").is_err());
        assert!(ErrorReply::parse("-113,Undefined header").is_err());
        assert_eq!(
            ErrorReply::parse(r#"+7, "Lamp ""A"" cold""#),
            Ok(ErrorReply {
                code: 7,
                message: "Lamp \"A\" cold".into()
            })
        );
    }

    #[test]
    fn error_queue_is_fifo_and_reports_overflow() {
        let mut queue = ErrorQueue::new(3);
        assert_eq!(queue.pop().error, ScpiError::NoError);
        for error in [
            ScpiError::SyntaxError,
            ScpiError::DataOutOfRange,
            ScpiError::UndefinedHeader,
            ScpiError::TooMuchData,
        ] {
            queue.push(Fault::new(error, ""));
        }
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.pop().error, ScpiError::SyntaxError);
        assert_eq!(queue.pop().error, ScpiError::DataOutOfRange);
        assert_eq!(queue.pop().error, ScpiError::QueueOverflow);
        assert!(queue.is_empty());
        queue.push(Fault::new(ScpiError::SyntaxError, ""));
        queue.clear();
        assert_eq!(queue.pop().to_string(), r#"0,"No error""#);
    }

    #[test]
    fn response_formatting_helpers() {
        assert_eq!(format_nr1(-12), "-12");
        assert_eq!(format_nr2(12.5, 3), "12.500");
        assert_eq!(format_nr2(-0.00004, 4), "-0.0000");
        assert_eq!(format_nr3(125.0, 4), "1.2500E+02");
        assert_eq!(format_nr3(-0.00012, 2), "-1.20E-04");
        assert_eq!(format_nr3(0.0, 1), "0.0E+00");
        assert_eq!(format_nr3(1e300, 0), "1E+300");
        assert_eq!(format_number(380.0), "380");
        assert_eq!(format_number(0.1), "0.1");
        let formats: [fn(f64) -> String; 3] =
            [format_number, |v| format_nr2(v, 2), |v| format_nr3(v, 2)];
        for format in formats {
            assert_eq!(format(f64::NAN), "9.91E+37");
            assert_eq!(format(f64::INFINITY), "9.9E+37");
            assert_eq!(format(f64::NEG_INFINITY), "-9.9E+37");
        }
        assert_eq!(format_string(r#"say "hi""#), r#""say ""hi""""#);
        assert_eq!(format_string("a\nb"), "\"a b\"");
        assert_eq!(format_list(["1", "2", "3"]), "1,2,3");
        assert_eq!(format_list(Vec::<String>::new()), "");

        assert_eq!(parse_number(" 1.2500E+02 "), Some(125.0));
        assert_eq!(parse_number("-12"), Some(-12.0));
        assert!(parse_number("9.91E+37").unwrap().is_nan());
        assert_eq!(parse_number("-9.9E37"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_number("12 NM"), None);
        assert_eq!(parse_number("abc"), None);
        assert_eq!(
            parse_string(r#""say ""hi""""#).as_deref(),
            Some(r#"say "hi""#)
        );
        assert_eq!(parse_string("'x'").as_deref(), Some("x"));
        assert_eq!(parse_string("x"), None);
        assert_eq!(parse_string("\"x\"y"), None);
        assert_eq!(split_fields(r#"1,"a,b",3"#), vec!["1", r#""a,b""#, "3"]);
    }

    fn reply_bytes(replies: &[Reply]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_replies(replies, &mut out);
        out
    }

    fn reply(cmd: &Command, bytes: &[u8]) -> Reply {
        match decode_reply(cmd, bytes).unwrap() {
            Decoded::Frame { value, consumed } => {
                assert_eq!(consumed, bytes.len());
                value
            }
            Decoded::Incomplete => panic!("incomplete"),
        }
    }

    #[test]
    fn spectrophotometer_replies_both_directions() {
        let identity = Identity {
            manufacturer: "Acme Photonics".into(),
            model: "UV-1800".into(),
            serial: "SN0012345".into(),
            firmware: "1.4.2".into(),
        };
        let cases: Vec<(Command, &[u8], Reply)> = vec![
            (
                Command::Identify,
                b"Acme Photonics,UV-1800,SN0012345,1.4.2\n",
                Reply::Identity(identity),
            ),
            (
                Command::OperationCompleteQuery,
                b"1\n",
                Reply::OperationComplete,
            ),
            (Command::EventStatusQuery, b"32\n", Reply::EventStatus(32)),
            (Command::StatusByteQuery, b"0\n", Reply::StatusByte(0)),
            (
                Command::ErrorQuery,
                b"-113,\"Undefined header\"\n",
                Reply::Error(ErrorReply {
                    code: -113,
                    message: "Undefined header".into(),
                }),
            ),
            (
                Command::ErrorQuery,
                b"0,\"No error\"\n",
                Reply::Error(ErrorReply {
                    code: 0,
                    message: "No error".into(),
                }),
            ),
            (
                Command::MeasureAbsorbance {
                    wavelength_nm: 500.0,
                },
                b"0.4321\n",
                Reply::Absorbance { absorbance: 0.4321 },
            ),
            (
                Command::MeasureSpectrum {
                    start_nm: 400.0,
                    stop_nm: 410.0,
                    step_nm: 5.0,
                },
                b"0.1000,0.2000,-0.0100\n",
                Reply::Spectrum {
                    absorbances: vec![0.1, 0.2, -0.01],
                },
            ),
            (
                Command::WavelengthRangeQuery,
                b"380,780\n",
                Reply::WavelengthRange {
                    min_nm: 380.0,
                    max_nm: 780.0,
                },
            ),
            (
                Command::IntegrationQuery,
                b"100\n",
                Reply::Integration {
                    integration_ms: 100,
                },
            ),
        ];
        for (cmd, bytes, expected) in cases {
            assert_eq!(
                reply_bytes(std::slice::from_ref(&expected)),
                bytes,
                "{expected:?}"
            );
            assert_eq!(
                reply(&cmd, bytes),
                expected,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        // Other instruments write NR3; the host reads it too.
        assert_eq!(
            reply(
                &Command::MeasureAbsorbance {
                    wavelength_nm: 500.0
                },
                b"4.321000E-01\r\n"
            ),
            Reply::Absorbance { absorbance: 0.4321 }
        );
        // Several queries in one message: one response message.
        let both = reply_bytes(&[
            Reply::OperationComplete,
            Reply::Integration { integration_ms: 5 },
        ]);
        assert_eq!(both, b"1;5\n");
        let Decoded::Frame { value, .. } = decode_response(&both).unwrap() else {
            panic!()
        };
        assert_eq!(value.units, vec!["1", "5"]);
    }

    #[test]
    fn replies_that_do_not_fit_the_query_are_errors() {
        let abs = Command::MeasureAbsorbance {
            wavelength_nm: 500.0,
        };
        for (cmd, bytes) in [
            (abs, &b"0.1,0.2\n"[..]),
            (abs, b"\"x\"\n"),
            (abs, b"1;2\n"),
            (Command::Identify, b"Acme,UV\n"),
            (Command::OperationCompleteQuery, b"0\n"),
            (Command::EventStatusQuery, b"256\n"),
            (Command::IntegrationQuery, b"1.5\n"),
            (Command::ErrorQuery, b"Undefined header\n"),
            (Command::Reset, b"1\n"),
            (Command::WavelengthRangeQuery, b"380\n"),
        ] {
            let err = decode_reply(&cmd, bytes).unwrap_err();
            assert_eq!(err.skip, bytes.len(), "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn identity_with_an_apostrophe_stays_one_unit() {
        let bytes = b"O'Brien Optics,UV-1,7,2.0\n";
        let Reply::Identity(id) = reply(&Command::Identify, bytes) else {
            panic!()
        };
        assert_eq!(id.manufacturer, "O'Brien Optics");
        // Separators cannot leak out of a field.
        let id = Identity {
            manufacturer: "A, B; C".into(),
            model: "M".into(),
            serial: "S".into(),
            firmware: "F".into(),
        };
        assert_eq!(reply_bytes(&[Reply::Identity(id)]), b"A  B  C,M,S,F\n");
    }

    #[test]
    fn spectrum_wavelengths_are_shared() {
        assert_eq!(
            spectrum_wavelengths(400.0, 410.0, 5.0),
            vec![400.0, 405.0, 410.0]
        );
        assert_eq!(spectrum_points(400.0, 500.0, 0.1), 1001);
        assert_eq!(spectrum_points(380.0, 780.0, 1.0), MAX_SPECTRUM_POINTS);
        assert_eq!(spectrum_points(500.0, 400.0, 1.0), 0);
        assert_eq!(spectrum_points(400.0, 500.0, 0.0), 0);
        assert_eq!(spectrum_points(400.0, 500.0, f64::NAN), 0);
        assert_eq!(
            spectrum_wavelengths(380.0, 780.0, 1e-300).len(),
            MAX_SPECTRUM_POINTS
        );
    }

    #[test]
    fn partial_frames_are_incomplete() {
        assert_eq!(decode_command(b"MEAS:ABS? 5").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_program_message(b"").unwrap(), Decoded::Incomplete);
        assert_eq!(decode_response(b"0.12").unwrap(), Decoded::Incomplete);
        assert_eq!(
            decode_reply(&Command::Identify, b"Acme,").unwrap(),
            Decoded::Incomplete
        );
    }

    #[test]
    fn garbage_then_a_valid_frame() {
        // Device side: the garbage is a message whose fault goes on the error queue.
        let buf = b"\xFF@@\n*OPC?\n";
        let Decoded::Frame { value, consumed } = decode_command(buf).unwrap() else {
            panic!()
        };
        assert_eq!(consumed, 4);
        assert_eq!(value.commands, vec![]);
        assert_eq!(
            value.fault.map(|f| f.error),
            Some(ScpiError::InvalidCharacter)
        );
        assert_eq!(single(&buf[consumed..]), Command::OperationCompleteQuery);

        // Host side: a DecodeError that skips the bad line.
        let buf = b"\x01\x02junk\r\n0.5000\n";
        let err = decode_response(buf).unwrap_err();
        assert_eq!(err.skip, 8);
        assert_eq!(
            reply(
                &Command::MeasureAbsorbance {
                    wavelength_nm: 400.0
                },
                &buf[8..]
            ),
            Reply::Absorbance { absorbance: 0.5 }
        );
        let err = decode_response(b"\n1\n").unwrap_err();
        assert_eq!(err.skip, 1, "an empty response line is an error of its own");
    }

    // --- property tests ---

    fn tenths(range: std::ops::RangeInclusive<u32>) -> impl Strategy<Value = f64> {
        range.prop_map(|t| f64::from(t) / 10.0)
    }

    fn command_strategy() -> impl Strategy<Value = Command> {
        prop_oneof![
            proptest::sample::select(vec![
                Command::Identify,
                Command::Reset,
                Command::OperationCompleteQuery,
                Command::ClearStatus,
                Command::EventStatusQuery,
                Command::StatusByteQuery,
                Command::ErrorQuery,
                Command::WavelengthRangeQuery,
                Command::IntegrationQuery,
            ]),
            (MIN_WAVELENGTH_NM..=MAX_WAVELENGTH_NM)
                .prop_map(|wavelength_nm| Command::MeasureAbsorbance { wavelength_nm }),
            (tenths(3800..=7800), tenths(0..=4000), tenths(10..=4000)).prop_map(
                |(start_nm, span, step_nm)| {
                    Command::MeasureSpectrum {
                        start_nm,
                        stop_nm: (start_nm + span).min(MAX_WAVELENGTH_NM),
                        step_nm,
                    }
                }
            ),
            (MIN_INTEGRATION_MS..=MAX_INTEGRATION_MS)
                .prop_map(|integration_ms| Command::SetIntegration { integration_ms }),
        ]
    }

    fn field_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9][A-Za-z0-9 ._-]{0,15}[A-Za-z0-9._-]"
    }

    fn absorbance_strategy() -> impl Strategy<Value = f64> {
        (-40_000i32..=40_000).prop_map(|a| f64::from(a) / 10_000.0)
    }

    /// A query and a reply it can get.
    fn exchange_strategy() -> impl Strategy<Value = (Command, Reply)> {
        prop_oneof![
            (
                field_strategy(),
                field_strategy(),
                field_strategy(),
                field_strategy()
            )
                .prop_map(|(manufacturer, model, serial, firmware)| (
                    Command::Identify,
                    Reply::Identity(Identity {
                        manufacturer,
                        model,
                        serial,
                        firmware
                    })
                )),
            Just((Command::OperationCompleteQuery, Reply::OperationComplete)),
            any::<u8>().prop_map(|v| (Command::EventStatusQuery, Reply::EventStatus(v))),
            any::<u8>().prop_map(|v| (Command::StatusByteQuery, Reply::StatusByte(v))),
            (
                proptest::sample::select(ScpiError::ALL.to_vec()),
                "[ -~]{0,40}"
            )
                .prop_map(|(error, detail)| {
                    (
                        Command::ErrorQuery,
                        Reply::Error(Fault::new(error, detail).to_error_reply()),
                    )
                }),
            absorbance_strategy().prop_map(|absorbance| (
                Command::MeasureAbsorbance {
                    wavelength_nm: 500.0
                },
                Reply::Absorbance { absorbance }
            )),
            proptest::collection::vec(absorbance_strategy(), 1..=MAX_SPECTRUM_POINTS).prop_map(
                |absorbances| (
                    Command::MeasureSpectrum {
                        start_nm: 380.0,
                        stop_nm: 780.0,
                        step_nm: 1.0
                    },
                    Reply::Spectrum { absorbances }
                )
            ),
            (any::<f64>(), any::<f64>())
                .prop_filter("finite", |(a, b)| a.is_finite() && b.is_finite())
                .prop_map(|(min_nm, max_nm)| (
                    Command::WavelengthRangeQuery,
                    Reply::WavelengthRange { min_nm, max_nm }
                )),
            any::<u32>().prop_map(|integration_ms| (
                Command::IntegrationQuery,
                Reply::Integration { integration_ms }
            )),
        ]
    }

    /// How to spell one node: short or long form, then a case per character.
    fn spell(long: &str, use_long: bool, case: &[bool], offset: usize) -> String {
        let form: String = if use_long {
            long.to_string()
        } else {
            long.chars().filter(|c| !c.is_ascii_lowercase()).collect()
        };
        form.chars()
            .enumerate()
            .map(|(i, c)| {
                if case[(offset + i) % case.len()] {
                    c.to_ascii_lowercase()
                } else {
                    c.to_ascii_uppercase()
                }
            })
            .collect()
    }

    use crate::drain;

    proptest! {
        #[test]
        fn command_round_trip(cmd in command_strategy()) {
            let mut bytes = Vec::new();
            encode_command(&cmd, &mut bytes);
            prop_assert_eq!(
                decode_command(&bytes).unwrap(),
                Decoded::Frame { value: Message { commands: vec![cmd], fault: None }, consumed: bytes.len() }
            );
        }

        #[test]
        fn several_commands_round_trip(cmds in proptest::collection::vec(command_strategy(), 1..6)) {
            let mut bytes = Vec::new();
            encode_commands(&cmds, &mut bytes);
            prop_assert_eq!(message(&bytes), Message { commands: cmds, fault: None });
        }

        #[test]
        fn reply_round_trip((cmd, reply) in exchange_strategy()) {
            let bytes = reply_bytes(std::slice::from_ref(&reply));
            prop_assert_eq!(decode_reply(&cmd, &bytes).unwrap(), Decoded::Frame { value: reply, consumed: bytes.len() });
        }

        #[test]
        fn response_round_trip(units in proptest::collection::vec(
            prop_oneof!["[A-Za-z0-9+.-][A-Za-z0-9 ,+.-]{0,20}", "[ -~]{0,20}".prop_map(|s| format_string(&s))],
            1..5,
        )) {
            let resp = Response { units };
            let mut bytes = Vec::new();
            encode_response(&resp, &mut bytes);
            prop_assert_eq!(decode_response(&bytes).unwrap(), Decoded::Frame { value: resp, consumed: bytes.len() });
        }

        #[test]
        fn short_long_and_case_variants_parse_the_same(
            which in 0usize..11,
            forms in proptest::collection::vec(any::<bool>(), 4),
            case in proptest::collection::vec(any::<bool>(), 1..40),
            colon in any::<bool>(),
            optional in any::<bool>(),
        ) {
            let (nodes, query, params, expected): (&[&str], bool, &str, Command) = [
                (&["MEASure", "ABSorbance"][..], true, " 500", Command::MeasureAbsorbance { wavelength_nm: 500.0 }),
                (&["MEASure", "SPECtrum"], true, " 400,500,10", Command::MeasureSpectrum { start_nm: 400.0, stop_nm: 500.0, step_nm: 10.0 }),
                (&["SENSe", "WAVelength", "RANGe"], true, "", Command::WavelengthRangeQuery),
                (&["CONFigure", "INTegration"], false, " 100", Command::SetIntegration { integration_ms: 100 }),
                (&["CONFigure", "INTegration"], true, "", Command::IntegrationQuery),
                (&["SYSTem", "ERRor", "NEXT"], true, "", Command::ErrorQuery),
                (&["*IDN"], true, "", Command::Identify),
                (&["*RST"], false, "", Command::Reset),
                (&["*OPC"], true, "", Command::OperationCompleteQuery),
                (&["*CLS"], false, "", Command::ClearStatus),
                (&["*ESR"], true, "", Command::EventStatusQuery),
            ][which];
            let common = nodes[0].starts_with('*');
            let mut spelled = Vec::new();
            let mut offset = 0;
            for (i, node) in nodes.iter().enumerate() {
                let optional_node = (node == &"SENSe" || node == &"NEXT") && optional;
                if optional_node {
                    continue;
                }
                let name = node.trim_start_matches('*');
                spelled.push(spell(name, forms[i], &case, offset));
                offset += name.len();
            }
            let mut text = String::new();
            if common {
                text.push('*');
            } else if colon {
                text.push(':');
            }
            text.push_str(&spelled.join(":"));
            if query {
                text.push('?');
            }
            text.push_str(params);
            text.push('\n');
            prop_assert_eq!(single(text.as_bytes()), expected, "{}", text);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_make_progress(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            drain(&bytes, decode_command);
            drain(&bytes, decode_response);
            drain(&bytes, |b| decode_reply(&Command::MeasureSpectrum { start_nm: 400.0, stop_nm: 410.0, step_nm: 5.0 }, b));
        }

        #[test]
        fn arbitrary_scpi_like_text_never_panics(text in "[ -~\t]{0,80}") {
            let parsed = parse_program_message(text.as_bytes());
            for unit in &parsed.units {
                let _ = unit.params();
            }
            let _ = resolve(&parsed);
            let _ = header_matches(&Header { common: false, absolute: false, mnemonics: vec![], query: false }, &text);
            let _ = parse_string(&text);
            let _ = parse_number(&text);
            let _ = ErrorReply::parse(&text);
        }
    }
}
