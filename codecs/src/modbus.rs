//! Modbus application protocol (Modbus Application Protocol Specification V1.1b3) in its two framings:
//! TCP (an MBAP header: transaction id, protocol id 0, length, unit id; Modbus Messaging on TCP/IP
//! Implementation Guide V1.0b, section 3.1.3) and RTU (address, PDU, CRC-16 low byte first; Modbus over
//! Serial Line V1.02, section 2.5.1).
//!
//! This is the device side (requests in, responses out), used by the simulators of Modbus instrument
//! definitions and by the HIL wire tap. labctl's driver speaks Modbus through `tokio-modbus`, so the
//! simulators and the driver are two independent implementations of the same specification.
//!
//! Function codes: 0x01 read coils, 0x03 read holding registers, 0x04 read input registers, 0x05 write
//! single coil, 0x06 write single register, 0x10 write multiple registers. Anything else gets exception
//! 0x01 (illegal function), as the specification asks.

use crate::{DecodeError, Decoded};

const PROTOCOL: &str = "modbus";
/// The longest PDU (specification, section 4.1).
pub const MAX_PDU: usize = 253;
/// Most registers one read may ask for (0x7D) and one write may carry (0x7B).
pub const MAX_READ_REGISTERS: u16 = 125;
pub const MAX_WRITE_REGISTERS: u16 = 123;
/// Most coils one read may ask for (0x7D0).
pub const MAX_READ_COILS: u16 = 2000;

/// A request, as a device receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    ReadCoils { address: u16, count: u16 },
    ReadHoldingRegisters { address: u16, count: u16 },
    ReadInputRegisters { address: u16, count: u16 },
    WriteSingleCoil { address: u16, on: bool },
    WriteSingleRegister { address: u16, value: u16 },
    WriteMultipleRegisters { address: u16, values: Vec<u16> },
}

/// Why a device refuses a request: the specification's exception codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    IllegalFunction = 0x01,
    IllegalDataAddress = 0x02,
    IllegalDataValue = 0x03,
    ServerDeviceFailure = 0x04,
}

/// A device's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Coils(Vec<bool>),
    Registers(Vec<u16>),
    /// A write's echo (0x05, 0x06: address and value; 0x10: address and count).
    Echo {
        address: u16,
        value: u16,
    },
    Exception(Exception),
}

impl Request {
    /// The function code.
    pub fn function(&self) -> u8 {
        match self {
            Request::ReadCoils { .. } => 0x01,
            Request::ReadHoldingRegisters { .. } => 0x03,
            Request::ReadInputRegisters { .. } => 0x04,
            Request::WriteSingleCoil { .. } => 0x05,
            Request::WriteSingleRegister { .. } => 0x06,
            Request::WriteMultipleRegisters { .. } => 0x10,
        }
    }
}

fn word(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Decodes a request PDU (function code and data). `Err` is the exception the device answers with.
pub fn decode_request(pdu: &[u8]) -> Result<Request, Exception> {
    let Some(&function) = pdu.first() else {
        return Err(Exception::IllegalFunction);
    };
    let data = &pdu[1..];
    let fixed = |len: usize| {
        if data.len() == len {
            Ok(())
        } else {
            Err(Exception::IllegalDataValue)
        }
    };
    match function {
        0x01 | 0x03 | 0x04 => {
            fixed(4)?;
            let (address, count) = (word(data, 0), word(data, 2));
            let max = if function == 0x01 {
                MAX_READ_COILS
            } else {
                MAX_READ_REGISTERS
            };
            if count == 0 || count > max {
                return Err(Exception::IllegalDataValue);
            }
            Ok(match function {
                0x01 => Request::ReadCoils { address, count },
                0x03 => Request::ReadHoldingRegisters { address, count },
                _ => Request::ReadInputRegisters { address, count },
            })
        }
        0x05 => {
            fixed(4)?;
            let on = match word(data, 2) {
                0xFF00 => true,
                0x0000 => false,
                _ => return Err(Exception::IllegalDataValue),
            };
            Ok(Request::WriteSingleCoil {
                address: word(data, 0),
                on,
            })
        }
        0x06 => {
            fixed(4)?;
            Ok(Request::WriteSingleRegister {
                address: word(data, 0),
                value: word(data, 2),
            })
        }
        0x10 => {
            if data.len() < 5 {
                return Err(Exception::IllegalDataValue);
            }
            let (address, count, bytes) = (word(data, 0), word(data, 2), usize::from(data[4]));
            if count == 0
                || count > MAX_WRITE_REGISTERS
                || bytes != usize::from(count) * 2
                || data.len() != 5 + bytes
            {
                return Err(Exception::IllegalDataValue);
            }
            let values = (0..usize::from(count))
                .map(|i| word(data, 5 + 2 * i))
                .collect();
            Ok(Request::WriteMultipleRegisters { address, values })
        }
        _ => Err(Exception::IllegalFunction),
    }
}

/// Encodes the response PDU to a request with function code `function`.
pub fn encode_response(function: u8, response: &Response, out: &mut Vec<u8>) {
    match response {
        Response::Exception(e) => {
            out.push(function | 0x80);
            out.push(*e as u8);
        }
        Response::Coils(coils) => {
            out.push(function);
            let bytes = coils.len().div_ceil(8);
            out.push(bytes as u8);
            for chunk in coils.chunks(8) {
                let byte = chunk
                    .iter()
                    .enumerate()
                    .fold(0u8, |b, (i, on)| b | (u8::from(*on) << i));
                out.push(byte);
            }
        }
        Response::Registers(words) => {
            out.push(function);
            out.push((words.len() * 2) as u8);
            for w in words {
                out.extend_from_slice(&w.to_be_bytes());
            }
        }
        Response::Echo { address, value } => {
            out.push(function);
            out.extend_from_slice(&address.to_be_bytes());
            out.extend_from_slice(&value.to_be_bytes());
        }
    }
}

/// A request frame with its framing: the MBAP transaction id (TCP) or nothing (RTU), and the unit id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub transaction: Option<u16>,
    pub unit: u8,
    pub pdu: Vec<u8>,
}

/// Cuts one Modbus TCP frame (MBAP header and PDU) off the front of `buf`.
pub fn decode_tcp(buf: &[u8]) -> Result<Decoded<Frame>, DecodeError> {
    if buf.len() < 7 {
        return Ok(Decoded::Incomplete);
    }
    let (transaction, protocol, length) = (word(buf, 0), word(buf, 2), usize::from(word(buf, 4)));
    if protocol != 0 {
        return Err(DecodeError::new(
            PROTOCOL,
            &buf[..7],
            format!("MBAP bytes 2-3: protocol id {protocol}, expected 0 (Modbus)"),
        )
        .skip(1));
    }
    if !(2..=MAX_PDU + 1).contains(&length) {
        return Err(DecodeError::new(
            PROTOCOL,
            &buf[..7],
            format!(
                "MBAP bytes 4-5: length {length}, expected 2 to {}",
                MAX_PDU + 1
            ),
        )
        .skip(1));
    }
    let total = 6 + length;
    if buf.len() < total {
        return Ok(Decoded::Incomplete);
    }
    Ok(Decoded::Frame {
        value: Frame {
            transaction: Some(transaction),
            unit: buf[6],
            pdu: buf[7..total].to_vec(),
        },
        consumed: total,
    })
}

/// Encodes a TCP response frame answering `request`.
pub fn encode_tcp(request: &Frame, pdu: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&request.transaction.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    out.push(request.unit);
    out.extend_from_slice(pdu);
}

/// CRC-16/MODBUS (polynomial 0xA001 reflected, initial 0xFFFF).
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Cuts one RTU request frame (address, PDU, CRC) off the front of `buf`. The request's length follows
/// from its function code; a frame whose CRC does not match is dropped a byte at a time (a device
/// resynchronises on the next good frame).
pub fn decode_rtu_request(buf: &[u8]) -> Result<Decoded<Frame>, DecodeError> {
    if buf.len() < 2 {
        return Ok(Decoded::Incomplete);
    }
    let total = match buf[1] {
        0x01 | 0x03 | 0x04 | 0x05 | 0x06 => 8,
        0x10 => {
            if buf.len() < 7 {
                return Ok(Decoded::Incomplete);
            }
            9 + usize::from(buf[6])
        }
        other => {
            return Err(DecodeError::new(
                PROTOCOL,
                &buf[..2],
                format!(
                    "byte 1: function code {other:#04x}, expected one labctl's simulators serve"
                ),
            )
            .skip(1));
        }
    };
    if buf.len() < total {
        return Ok(Decoded::Incomplete);
    }
    let crc = u16::from_le_bytes([buf[total - 2], buf[total - 1]]);
    if crc16(&buf[..total - 2]) != crc {
        return Err(DecodeError::new(
            PROTOCOL,
            &buf[..total],
            format!(
                "last two bytes: CRC {crc:#06x}, expected {:#06x}",
                crc16(&buf[..total - 2])
            ),
        )
        .skip(1));
    }
    Ok(Decoded::Frame {
        value: Frame {
            transaction: None,
            unit: buf[0],
            pdu: buf[1..total - 2].to_vec(),
        },
        consumed: total,
    })
}

/// Encodes an RTU response frame from unit `unit`.
pub fn encode_rtu(unit: u8, pdu: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.push(unit);
    out.extend_from_slice(pdu);
    let crc = crc16(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specification_s_read_holding_registers_example_decodes() {
        // Modbus Application Protocol V1.1b3, 6.3: read registers 108-110 (0x006B, 3 registers).
        let req = decode_request(&[0x03, 0x00, 0x6B, 0x00, 0x03]).unwrap();
        assert_eq!(
            req,
            Request::ReadHoldingRegisters {
                address: 0x6B,
                count: 3
            }
        );
        // ... answered with 0x022B, 0x0000, 0x0064.
        let mut out = Vec::new();
        encode_response(0x03, &Response::Registers(vec![0x022B, 0, 0x64]), &mut out);
        assert_eq!(out, [0x03, 0x06, 0x02, 0x2B, 0x00, 0x00, 0x00, 0x64]);
    }

    #[test]
    fn writes_decode_and_echo_as_the_specification_shows() {
        // 6.5: write coil 173 (0x00AC) ON; 6.6: register 2 (0x0001) = 0x0003; 6.12: registers 2-3 = 0x000A, 0x0102.
        assert_eq!(
            decode_request(&[0x05, 0x00, 0xAC, 0xFF, 0x00]),
            Ok(Request::WriteSingleCoil {
                address: 0xAC,
                on: true
            })
        );
        assert_eq!(
            decode_request(&[0x06, 0x00, 0x01, 0x00, 0x03]),
            Ok(Request::WriteSingleRegister {
                address: 1,
                value: 3
            })
        );
        assert_eq!(
            decode_request(&[0x10, 0x00, 0x01, 0x00, 0x02, 0x04, 0x00, 0x0A, 0x01, 0x02]),
            Ok(Request::WriteMultipleRegisters {
                address: 1,
                values: vec![0x000A, 0x0102]
            })
        );
        assert_eq!(
            decode_request(&[0x05, 0x00, 0xAC, 0x12, 0x34]),
            Err(Exception::IllegalDataValue)
        );
        assert_eq!(decode_request(&[0x2B]), Err(Exception::IllegalFunction));
        let mut out = Vec::new();
        encode_response(
            0x03,
            &Response::Exception(Exception::IllegalDataAddress),
            &mut out,
        );
        assert_eq!(out, [0x83, 0x02]);
    }

    #[test]
    fn coils_pack_low_bit_first() {
        // 6.1: coils 20-38 read back as 0xCD 0x6B 0x05.
        let bits = [1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1];
        let coils: Vec<bool> = bits.iter().map(|b| *b == 1).collect();
        let mut out = Vec::new();
        encode_response(0x01, &Response::Coils(coils), &mut out);
        assert_eq!(out, [0x01, 0x03, 0xCD, 0x6B, 0x05]);
    }

    #[test]
    fn tcp_frames_are_cut_by_their_mbap_length() {
        let frame = [
            0x00, 0x01, 0x00, 0x00, 0x00, 0x06, 0x11, 0x03, 0x00, 0x6B, 0x00, 0x03,
        ];
        assert_eq!(decode_tcp(&frame[..9]).unwrap(), Decoded::Incomplete);
        let Decoded::Frame { value, consumed } = decode_tcp(&frame).unwrap() else {
            panic!("a whole frame");
        };
        assert_eq!(
            (value.transaction, value.unit, consumed),
            (Some(1), 0x11, 12)
        );
        let mut out = Vec::new();
        encode_tcp(&value, &[0x03, 0x02, 0x00, 0x2A], &mut out);
        assert_eq!(
            out,
            [
                0x00, 0x01, 0x00, 0x00, 0x00, 0x05, 0x11, 0x03, 0x02, 0x00, 0x2A
            ]
        );
        let err = decode_tcp(&[0, 1, 0, 9, 0, 6, 1, 3]).unwrap_err();
        assert!(err.reason.contains("protocol id 9"), "{err}");
    }

    #[test]
    fn rtu_frames_carry_the_crc_low_byte_first() {
        // Modbus over Serial Line V1.02, 6.2.2: the CRC of 02 07 is 0x1241, sent 41 12.
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
        let mut out = Vec::new();
        encode_rtu(0x11, &[0x03, 0x00, 0x6B, 0x00, 0x03], &mut out);
        assert_eq!(out, [0x11, 0x03, 0x00, 0x6B, 0x00, 0x03, 0x76, 0x87]);
        let Decoded::Frame { value, consumed } = decode_rtu_request(&out).unwrap() else {
            panic!("a whole frame");
        };
        assert_eq!((value.unit, value.pdu.len(), consumed), (0x11, 5, 8));
        out[7] ^= 1;
        let err = decode_rtu_request(&out).unwrap_err();
        assert!(err.reason.contains("CRC"), "{err}");
    }
}
