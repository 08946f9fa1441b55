//! Sans-IO wire codecs, one module per instrument protocol.
//!
//! Every codec is pure: it turns typed commands into bytes and bytes into typed responses (the host side,
//! used by drivers) and the reverse (the device side, used by the simulators). Nothing here reads a clock or
//! touches a port, so every function is unit-tested with byte strings quoted from the manuals and fuzzed.
//!
//! Decoders work on the front of a receive buffer and say how many bytes they used, so a caller can keep
//! a partial frame until the rest arrives and skip exactly the garbage that could not be parsed.
//!
//! May depend on: nothing of labctl, and no async runtime (the simulators and the fuzzers link this alone).

pub mod ascii_frame;
pub mod fixed_point;
pub mod grbl;
pub mod modbus;
pub mod mtsics;
pub mod namur;
pub mod ne1000;
pub mod scpi;

/// What a decoder found at the front of a buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<T> {
    /// A complete frame; the caller drops `consumed` bytes from the front of its buffer.
    Frame { value: T, consumed: usize },
    /// Not a whole frame yet: keep the bytes and read more.
    Incomplete,
}

impl<T> Decoded<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Decoded<U> {
        match self {
            Decoded::Frame { value, consumed } => Decoded::Frame {
                value: f(value),
                consumed,
            },
            Decoded::Incomplete => Decoded::Incomplete,
        }
    }
}

/// A frame's content that is not what the protocol allows, naming the field or byte and what was expected.
/// Decoders turn it into a [`DecodeError`] with the frame; callers that parse a field alone get it as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

impl From<String> for Malformed {
    fn from(reason: String) -> Self {
        Malformed(reason)
    }
}

impl From<&str> for Malformed {
    fn from(reason: &str) -> Self {
        Malformed(reason.to_owned())
    }
}

impl From<Malformed> for String {
    fn from(malformed: Malformed) -> Self {
        malformed.0
    }
}

/// A frame that could not be decoded. `skip` bytes at the front of the buffer belong to the bad frame
/// and must be dropped before decoding again, so one garbled frame never poisons the next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{protocol}: {reason} (in frame {frame:?})")]
pub struct DecodeError {
    pub protocol: &'static str,
    /// What was wrong, naming the byte or field and what was expected.
    pub reason: String,
    /// The offending frame, lossily printed for logs and error messages.
    pub frame: String,
    /// Bytes to drop from the front of the buffer.
    pub skip: usize,
}

impl DecodeError {
    pub fn new(protocol: &'static str, frame: &[u8], reason: impl Into<String>) -> Self {
        DecodeError {
            protocol,
            reason: reason.into(),
            frame: String::from_utf8_lossy(frame).into_owned(),
            skip: frame.len(),
        }
    }

    /// The same error, dropping only `skip` bytes (a binary protocol resynchronises byte by byte).
    pub fn skip(mut self, skip: usize) -> Self {
        self.skip = skip;
        self
    }
}

/// Longest line any of our instruments sends or accepts; a longer "line" is garbage, not a frame to buffer.
pub const MAX_LINE: usize = 4096;

/// Splits the first line off `buf`. A line ends at `\n` (a preceding `\r` is stripped) or, when
/// `accept_bare_cr` is set, at a lone `\r` as some instruments send. Returns the line without its terminator
/// and the number of bytes it used, `Ok(None)` when no terminator has arrived yet, or an error when more than
/// [`MAX_LINE`] bytes arrived without one.
pub fn split_line<'a>(
    protocol: &'static str,
    buf: &'a [u8],
    accept_bare_cr: bool,
) -> Result<Option<(&'a [u8], usize)>, DecodeError> {
    let end = buf
        .iter()
        .position(|&b| b == b'\n' || (accept_bare_cr && b == b'\r'));
    match end {
        Some(i) => {
            let mut consumed = i + 1;
            // "\r\n" with accept_bare_cr: swallow the "\n" that follows the "\r" too.
            if accept_bare_cr && buf[i] == b'\r' && buf.get(i + 1) == Some(&b'\n') {
                consumed += 1;
            }
            let mut line = &buf[..i];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            Ok(Some((line, consumed)))
        }
        None if buf.len() > MAX_LINE => Err(DecodeError {
            protocol,
            reason: format!("no line terminator within {MAX_LINE} bytes"),
            frame: String::from_utf8_lossy(&buf[..64.min(buf.len())]).into_owned(),
            skip: buf.len(),
        }),
        None => Ok(None),
    }
}

/// Test support shared by every codec: decodes a whole buffer and checks that each step makes progress
/// (a frame consumed, or garbage skipped, never zero and never past the end). Returns frames and errors.
#[cfg(test)]
pub(crate) fn drain<T>(
    mut buf: &[u8],
    decode: impl Fn(&[u8]) -> Result<Decoded<T>, DecodeError>,
) -> (usize, usize) {
    let (mut frames, mut errors) = (0, 0);
    loop {
        match decode(buf) {
            Ok(Decoded::Frame { consumed, .. }) => {
                assert!(
                    consumed > 0 && consumed <= buf.len(),
                    "consumed {consumed} of {}",
                    buf.len()
                );
                buf = &buf[consumed..];
                frames += 1;
            }
            Ok(Decoded::Incomplete) => return (frames, errors),
            Err(err) => {
                assert!(
                    err.skip > 0 && err.skip <= buf.len(),
                    "skip {} of {}",
                    err.skip,
                    buf.len()
                );
                buf = &buf[err.skip..];
                errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_line_handles_crlf_lf_and_bare_cr() {
        assert_eq!(
            split_line("t", b"ok\r\nrest", false).unwrap(),
            Some((&b"ok"[..], 4))
        );
        assert_eq!(
            split_line("t", b"ok\nrest", false).unwrap(),
            Some((&b"ok"[..], 3))
        );
        assert_eq!(
            split_line("t", b"ok\rrest", true).unwrap(),
            Some((&b"ok"[..], 3))
        );
        assert_eq!(
            split_line("t", b"ok\r\n", true).unwrap(),
            Some((&b"ok"[..], 4))
        );
        assert_eq!(split_line("t", b"partial", false).unwrap(), None);
    }

    #[test]
    fn split_line_refuses_unbounded_garbage() {
        let junk = vec![b'x'; MAX_LINE + 1];
        let err = split_line("t", &junk, false).unwrap_err();
        assert_eq!(err.skip, junk.len());
    }
}
