//! Framing and checksums of ASCII instruments that wrap their lines, as instrument definitions declare them
//! (`stx_etx`, `checksum` in `[line]`). One convention, documented in docs/instrument-definitions.md:
//!
//! ```text
//! [STX] payload [checksum] [ETX] terminator
//! ```
//!
//! STX (0x02) and ETX (0x03) only with `stx_etx`; the checksum is computed over the payload (the command or
//! reply text, without STX) and written as uppercase hexadecimal digits: two for `sum8` (sum of the bytes
//! modulo 256) and `xor` (XOR of the bytes), four for `crc16_modbus` (CRC-16/MODBUS, low byte first, as
//! Modbus RTU sends it). The terminator is the line's; with STX/ETX it may be empty, ETX then ends a frame.

/// Start of text.
pub const STX: u8 = 0x02;
/// End of text.
pub const ETX: u8 = 0x03;

/// A checksum over the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    None,
    Sum8,
    Xor,
    Crc16Modbus,
}

impl Check {
    /// How many hex digits it takes in a frame.
    pub fn digits(self) -> usize {
        match self {
            Check::None => 0,
            Check::Sum8 | Check::Xor => 2,
            Check::Crc16Modbus => 4,
        }
    }

    /// The checksum of `payload`, as the frame carries it.
    pub fn of(self, payload: &[u8]) -> String {
        match self {
            Check::None => String::new(),
            Check::Sum8 => format!(
                "{:02X}",
                payload.iter().fold(0u8, |a, b| a.wrapping_add(*b))
            ),
            Check::Xor => format!("{:02X}", payload.iter().fold(0u8, |a, b| a ^ b)),
            Check::Crc16Modbus => {
                let [lo, hi] = crate::modbus::crc16(payload).to_le_bytes();
                format!("{lo:02X}{hi:02X}")
            }
        }
    }
}

/// How an instrument wraps its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsciiFraming {
    pub stx_etx: bool,
    pub check: Check,
}

/// Why a received frame is not a good one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("byte 0 is {found:#04x}, expected STX (0x02)")]
    NoStx { found: u8 },
    #[error("the frame does not end with ETX (0x03)")]
    NoEtx,
    #[error("{len} byte(s) cannot hold a {digits}-digit checksum")]
    Short { len: usize, digits: usize },
    #[error("checksum {found:?}, expected {expected:?} for the payload")]
    Checksum { expected: String, found: String },
}

impl AsciiFraming {
    /// No STX/ETX and no checksum: lines are the payload.
    pub const PLAIN: AsciiFraming = AsciiFraming {
        stx_etx: false,
        check: Check::None,
    };

    /// The bytes that carry `payload` (the line's terminator is the caller's).
    pub fn wrap(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + 2 + self.check.digits());
        if self.stx_etx {
            out.push(STX);
        }
        out.extend_from_slice(payload);
        out.extend_from_slice(self.check.of(payload).as_bytes());
        if self.stx_etx {
            out.push(ETX);
        }
        out
    }

    /// The payload of a received frame (its terminator already removed), its framing and checksum checked.
    pub fn unwrap<'a>(&self, frame: &'a [u8]) -> Result<&'a [u8], FrameError> {
        let mut inner = frame;
        if self.stx_etx {
            match inner.first() {
                Some(&STX) => inner = &inner[1..],
                found => {
                    return Err(FrameError::NoStx {
                        found: found.copied().unwrap_or(0),
                    });
                }
            }
            inner = inner.strip_suffix(&[ETX]).ok_or(FrameError::NoEtx)?;
        }
        let digits = self.check.digits();
        if digits == 0 {
            return Ok(inner);
        }
        if inner.len() < digits {
            return Err(FrameError::Short {
                len: inner.len(),
                digits,
            });
        }
        let (payload, sum) = inner.split_at(inner.len() - digits);
        let expected = self.check.of(payload);
        if !sum.eq_ignore_ascii_case(expected.as_bytes()) {
            return Err(FrameError::Checksum {
                expected,
                found: String::from_utf8_lossy(sum).into_owned(),
            });
        }
        Ok(payload)
    }
}

/// The length of the first ETX-ended frame in `buf` (ETX included), when there is one: how a stream of
/// STX/ETX frames without a line terminator is split.
pub fn etx_frame_len(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == ETX).map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [AsciiFraming; 8] = [
        AsciiFraming::PLAIN,
        AsciiFraming {
            stx_etx: true,
            check: Check::None,
        },
        AsciiFraming {
            stx_etx: false,
            check: Check::Sum8,
        },
        AsciiFraming {
            stx_etx: true,
            check: Check::Sum8,
        },
        AsciiFraming {
            stx_etx: false,
            check: Check::Xor,
        },
        AsciiFraming {
            stx_etx: true,
            check: Check::Xor,
        },
        AsciiFraming {
            stx_etx: false,
            check: Check::Crc16Modbus,
        },
        AsciiFraming {
            stx_etx: true,
            check: Check::Crc16Modbus,
        },
    ];

    #[test]
    fn checksums_as_written_by_hand() {
        // "IN_PV_1": 0x49+0x4E+0x5F+0x50+0x56+0x5F+0x31 = 0x22C -> 2C; their XOR is 0x30.
        assert_eq!(Check::Sum8.of(b"IN_PV_1"), "2C");
        assert_eq!(Check::Xor.of(b"IN_PV_1"), "30");
        // CRC-16/MODBUS of "123456789" is 0x4B37, sent low byte first.
        assert_eq!(Check::Crc16Modbus.of(b"123456789"), "374B");
        let f = AsciiFraming {
            stx_etx: true,
            check: Check::Xor,
        };
        assert_eq!(f.wrap(b"IN_PV_1"), b"\x02IN_PV_130\x03");
    }

    #[test]
    fn every_framing_round_trips_and_refuses_a_changed_byte() {
        for f in ALL {
            let payload = b"OUT_SP_1 60.5";
            let frame = f.wrap(payload);
            assert_eq!(f.unwrap(&frame), Ok(&payload[..]), "{f:?}");
            if f.check != Check::None {
                let mut bad = frame.clone();
                let at = usize::from(f.stx_etx) + 4;
                bad[at] ^= 0x01;
                assert!(
                    matches!(f.unwrap(&bad), Err(FrameError::Checksum { .. })),
                    "{f:?}: {:?}",
                    f.unwrap(&bad)
                );
            }
        }
    }

    #[test]
    fn broken_frames_name_what_is_wrong() {
        let f = AsciiFraming {
            stx_etx: true,
            check: Check::Crc16Modbus,
        };
        assert_eq!(f.unwrap(b"X1\x03"), Err(FrameError::NoStx { found: b'X' }));
        assert_eq!(f.unwrap(b"\x021234"), Err(FrameError::NoEtx));
        assert_eq!(
            f.unwrap(b"\x0212\x03"),
            Err(FrameError::Short { len: 2, digits: 4 })
        );
        assert_eq!(f.unwrap(b""), Err(FrameError::NoStx { found: 0 }));
        assert_eq!(etx_frame_len(b"\x02ab\x03\x02c"), Some(4));
        assert_eq!(etx_frame_len(b"\x02ab"), None);
    }
}
