//! Every instrument wire codec's decoders (Modbus TCP and RTU framing and requests, ASCII STX/ETX framing and checksums included) on arbitrary bytes: the first byte picks the codec and the side
//! (what a driver decodes from the instrument, what a simulator decodes from the controller). A decoder
//! must never panic, and a frame it returns must consume at least one byte and no more than it was given.
#![no_main]

use labctl_codecs::ascii_frame::{AsciiFraming, Check, etx_frame_len};
use labctl_codecs::{DecodeError, Decoded, grbl, modbus, mtsics, namur, ne1000, scpi};
use libfuzzer_sys::fuzz_target;

fn check<T>(input: &[u8], decoded: Result<Decoded<T>, DecodeError>) {
    if let Ok(Decoded::Frame { consumed, .. }) = decoded {
        assert!(
            consumed >= 1 && consumed <= input.len(),
            "consumed {consumed} of {}",
            input.len()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    match selector % 15 {
        0 => check(input, grbl::decode_response(input)),
        1 => check(input, grbl::decode_command(input)),
        2 => check(input, ne1000::decode_response(input)),
        3 => check(input, ne1000::decode_command(input)),
        4 => check(input, mtsics::decode_response(input)),
        5 => check(input, mtsics::decode_command(input)),
        6 => check(input, namur::decode_response(input)),
        7 => check(input, namur::decode_command(input)),
        8 => check(input, scpi::decode_response(input)),
        9 => check(input, scpi::decode_command(input)),
        10 => check(input, modbus::decode_tcp(input)),
        11 => check(input, modbus::decode_rtu_request(input)),
        12 => {
            // A request a device decodes gets an answer it can encode, whatever the request.
            let function = input.first().copied().unwrap_or(0);
            let response = match modbus::decode_request(input) {
                Ok(_) => modbus::Response::Registers(vec![0; 2]),
                Err(e) => modbus::Response::Exception(e),
            };
            let mut out = Vec::new();
            modbus::encode_response(function, &response, &mut out);
            assert!(!out.is_empty());
        }
        13 => {
            // ASCII framings: an unwrapped payload re-wraps to the same frame; ETX splitting stays inside.
            let checks = [Check::None, Check::Sum8, Check::Xor, Check::Crc16Modbus];
            let framing = AsciiFraming {
                stx_etx: selector & 0x80 != 0,
                check: checks[usize::from(selector >> 5) % checks.len()],
            };
            if let Ok(payload) = framing.unwrap(input) {
                let again = framing.wrap(payload);
                assert!(again.eq_ignore_ascii_case(input), "{framing:?}: {input:?} -> {again:?}");
            }
            if let Some(n) = etx_frame_len(input) {
                assert!(n >= 1 && n <= input.len());
            }
        }
        _ => {
            let _ = scpi::parse_program_message(input);
            let _ = namur::parse_value_reply(input);
        }
    }
});
