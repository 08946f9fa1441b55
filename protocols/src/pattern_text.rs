//! Writing the text a reply pattern matches: an instrument definition gives each reply as a regular
//! expression with named captures (`^(?P<value>-?\d+(\.\d+)?) 1$`); a simulator of the instrument answers
//! with text that pattern matches, its captures filled with the simulated values. The text outside the
//! captures is written from the pattern itself: literals as they are, a class as one of its characters (a
//! space where the class has one), a repetition at its minimum, an alternation as its first branch.
//!
//! Used by the definition simulator and by the definition checker (a pattern no simulator could answer is
//! refused, so every definition can be tested end to end without its instrument).

use std::collections::BTreeMap;

use regex::Regex;
use regex_syntax::hir::{Class, Hir, HirKind};

/// Why no text could be written for a pattern.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatternTextError {
    #[error("not a regular expression: {0}")]
    Syntax(String),
    #[error("the text written for it, {text:?}, does not match it")]
    NoMatch { text: String },
    #[error("no number format of {value} matches the capture `{capture}`")]
    NoNumberFormat { capture: String, value: f64 },
    #[error("the shortest text it matches is longer than a line ({MAX_TEXT} bytes)")]
    TooLong,
}

/// The longest text written: an instrument's line is never longer, and a pattern of nested repetitions
/// must not make the writer build gigabytes.
pub const MAX_TEXT: usize = 4096;

/// Text matching `pattern`, with each named capture in `values` replaced by its text.
pub fn write(pattern: &str, values: &BTreeMap<&str, String>) -> Result<String, PatternTextError> {
    let hir = regex_syntax::parse(pattern).map_err(|e| PatternTextError::Syntax(e.to_string()))?;
    let mut out = String::new();
    render(&hir, values, &mut out);
    if out.len() > MAX_TEXT {
        return Err(PatternTextError::TooLong);
    }
    let re = Regex::new(pattern).map_err(|e| PatternTextError::Syntax(e.to_string()))?;
    if re.is_match(&out) {
        Ok(out)
    } else {
        Err(PatternTextError::NoMatch { text: out })
    }
}

/// The capture that holds the sign of a number written apart from its digits (`+   123.56 g`): `-` makes
/// the number negative; `+` or a space leaves it positive.
pub const SIGN: &str = "sign";

/// Whether `pattern` writes its numbers' signs apart from their digits (it has a [`SIGN`] capture).
pub fn has_sign(re: &Regex) -> bool {
    re.capture_names().flatten().any(|n| n == SIGN)
}

/// Text matching `pattern` whose capture `capture` reads back as `value`: the number is written with the
/// fewest decimals (up to 6) the pattern accepts, rounded to them. With a [`SIGN`] capture the sign goes
/// there (`+` or `-`) and the digits into `capture`.
pub fn write_number(
    pattern: &str,
    capture: &str,
    value: f64,
    others: &BTreeMap<&str, String>,
) -> Result<String, PatternTextError> {
    let re = Regex::new(pattern).map_err(|e| PatternTextError::Syntax(e.to_string()))?;
    let (digits, sign) = if has_sign(&re) {
        let sign = if value.is_sign_negative() { "-" } else { "+" };
        (value.abs(), Some(sign))
    } else {
        (value, None)
    };
    for decimals in [1usize, 0, 2, 3, 4, 5, 6] {
        let mut values = others.clone();
        values.insert(capture, format!("{digits:.decimals$}"));
        if let Some(sign) = sign {
            values.insert(SIGN, sign.to_owned());
        }
        if let Ok(text) = write(pattern, &values)
            && re
                .captures(&text)
                .and_then(|c| c.name(capture))
                .is_some_and(|m| m.as_str() == values[capture])
        {
            return Ok(text);
        }
    }
    Err(PatternTextError::NoNumberFormat {
        capture: capture.to_owned(),
        value,
    })
}

fn render(hir: &Hir, values: &BTreeMap<&str, String>, out: &mut String) {
    if out.len() > MAX_TEXT {
        return;
    }
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => {}
        HirKind::Literal(lit) => out.push_str(&String::from_utf8_lossy(&lit.0)),
        HirKind::Class(class) => {
            if let Some(c) = class_char(class) {
                out.push(c);
            }
        }
        HirKind::Repetition(rep) => {
            for _ in 0..rep.min.min(64) {
                render(&rep.sub, values, out);
            }
        }
        HirKind::Capture(cap) => match cap.name.as_deref().and_then(|n| values.get(n)) {
            Some(text) => out.push_str(text),
            None => render(&cap.sub, values, out),
        },
        HirKind::Concat(parts) => parts.iter().for_each(|p| render(p, values, out)),
        HirKind::Alternation(branches) => {
            if let Some(first) = branches.first() {
                render(first, values, out);
            }
        }
    }
}

/// A character of the class: a space if it has one, else a printable one, else its first.
fn class_char(class: &Class) -> Option<char> {
    match class {
        Class::Unicode(u) => {
            let ranges = u.ranges();
            let has = |c: char| ranges.iter().any(|r| r.start() <= c && c <= r.end());
            if has(' ') {
                return Some(' ');
            }
            ranges
                .iter()
                .flat_map(|r| [r.start(), r.end()])
                .find(|c| c.is_ascii_graphic())
                .or_else(|| ranges.first().map(|r| r.start()))
        }
        Class::Bytes(b) => {
            let ranges = b.ranges();
            let has = |c: u8| ranges.iter().any(|r| r.start() <= c && c <= r.end());
            if has(b' ') {
                return Some(' ');
            }
            ranges
                .iter()
                .flat_map(|r| [r.start(), r.end()])
                .find(u8::is_ascii_graphic)
                .or_else(|| ranges.first().map(|r| r.start()))
                .map(char::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sartorius SBI prints the sign apart from the digits (`+   123.56 g`): the sign goes into its own
    /// capture and reads back with the value.
    #[test]
    fn a_sign_written_apart_from_the_digits_goes_into_its_capture() {
        let signed = r"^(?P<sign>[-+ ]) +(?P<value>\d+(\.\d+)?) g +$";
        assert_eq!(
            write_number(signed, "value", -123.5, &none()).unwrap(),
            "- 123.5 g "
        );
        assert_eq!(
            write_number(signed, "value", 1.5, &none()).unwrap(),
            "+ 1.5 g "
        );
    }

    fn none() -> BTreeMap<&'static str, String> {
        BTreeMap::new()
    }

    #[test]
    fn a_namur_reading_is_written_as_the_manual_prints_it() {
        let text = write_number(r"^(?P<value>-?\d+(\.\d+)?) 1$", "value", 25.34, &none()).unwrap();
        assert_eq!(text, "25.3 1");
        // An integer-only capture gets no decimals.
        let text = write_number(r"^(?P<value>\d+) 4$", "value", 300.2, &none()).unwrap();
        assert_eq!(text, "300 4");
    }

    #[test]
    fn literal_text_classes_and_alternations_around_captures_are_written_from_the_pattern() {
        let values = BTreeMap::from([("model", "RCT digital".to_owned())]);
        assert_eq!(write(r"^(?P<model>.+)$", &values).unwrap(), "RCT digital");
        let text = write_number(
            r"^in_pv_00\s+(?P<value>[-+]?\d+\.\d{2})\s*(C|K)$",
            "value",
            21.5,
            &none(),
        )
        .unwrap();
        // `\s*` is written at its minimum: nothing.
        assert_eq!(text, "in_pv_00 21.50C");
    }

    #[test]
    fn a_pattern_nothing_can_match_is_an_error_not_a_wrong_reply() {
        let err = write(r"^a\bb$", &none()).unwrap_err();
        assert!(matches!(err, PatternTextError::NoMatch { .. }), "{err}");
        assert!(matches!(
            write("(", &none()),
            Err(PatternTextError::Syntax(_))
        ));
        let err = write_number(r"^(?P<value>[a-z]+)$", "value", 1.0, &none()).unwrap_err();
        assert!(
            matches!(err, PatternTextError::NoNumberFormat { .. }),
            "{err}"
        );
        // Nested repetitions would write 64^5 bytes: the writer stops at a line's length.
        let err = write(r"((((a{64}){64}){64}){64}){64}", &none()).unwrap_err();
        assert_eq!(err, PatternTextError::TooLong);
    }
}
