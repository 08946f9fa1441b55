//! The definition-driven driver against a scripted device, with the IKA RCT digital definition shipped in
//! `instruments/` (NAMUR commands: `IN_PV_1` -> `25.3 1`, setpoints unanswered), so the same bytes as the
//! built-in hotplate driver's tests are exchanged without any IKA code.

use super::*;
use crate::port::{PortConfig, frame_line_or_cr};
use crate::testing::{Fake, memory_port};
use labctl_protocols::instrument_def::check_definition;
use labctl_transport::{LineTiming, MemoryDevice};

const IKA: &str = include_str!("../../../../instruments/ika-rct-digital.toml");

fn definition(text: &str) -> Arc<InstrumentDefinition> {
    let (def, findings) = check_definition(text);
    Arc::new(def.unwrap_or_else(|| panic!("{findings:?}")))
}

fn driver(text: &str, allow_firmware: &[&str]) -> (LineInstrument, MemoryDevice) {
    let config = PortConfig {
        framer: frame_line_or_cr,
        ..PortConfig::default()
    };
    let timing = LineTiming {
        baud: 9600,
        bits_per_char: 10,
    };
    let (port, device) = memory_port(Some(timing), config);
    let allow = allow_firmware.iter().map(|s| s.to_string()).collect();
    let definition = definition(text);
    let wire = LineWire::new("stirrer", port, Arc::clone(&definition)).unwrap();
    (
        DefinedInstrument::new("stirrer", definition, allow, wire),
        device,
    )
}

async fn identified(device: &mut MemoryDevice, firmware: &str) -> Fake {
    let mut fake = Fake::accept(device).await;
    fake.reply(b"IN_NAME\r\n", b"RCT digital\r\n").await;
    fake.reply(b"IN_VERSION\r\n", format!("{firmware}\r\n").as_bytes())
        .await;
    fake
}

#[tokio::test(start_paused = true)]
async fn start_reads_identity_from_the_definition_s_captures_and_fixed_fields() {
    let (mut d, mut device) = driver(IKA, &[]);
    let dev = tokio::spawn(async move { identified(&mut device, "1.10").await });
    let id = d.start().await.unwrap();
    assert_eq!(
        (
            id.manufacturer.as_str(),
            id.model.as_str(),
            id.firmware.as_str()
        ),
        ("IKA", "RCT digital", "1.10")
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn firmware_the_definition_does_not_know_is_refused_unless_the_lab_allows_it() {
    let (mut d, mut device) = driver(IKA, &[]);
    let dev = tokio::spawn(async move { identified(&mut device, "2.0").await });
    let err = d.start().await.unwrap_err().to_string();
    assert!(
        err.contains("unsupported firmware") && err.contains("2.0"),
        "{err}"
    );
    dev.await.unwrap();

    let (mut d, mut device) = driver(IKA, &["2.0"]);
    let dev = tokio::spawn(async move { identified(&mut device, "2.0").await });
    assert_eq!(d.start().await.unwrap().firmware, "2.0");
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_poll_reads_every_reading_with_its_pattern() {
    let (mut d, mut device) = driver(IKA, &[]);
    let dev = tokio::spawn(async move {
        let mut fake = identified(&mut device, "1.10").await;
        fake.reply(b"IN_PV_1\r\n", b"25.3 1\r\n").await;
        fake.reply(b"IN_PV_2\r\n", b"31.0 2\r\n").await;
        fake.reply(b"IN_PV_4\r\n", b"300 4\r\n").await;
    });
    d.start().await.unwrap();
    let t = d.poll().await.unwrap();
    assert_eq!(
        t.values,
        [
            ("temperature_c", 25.3),
            ("plate_temperature_c", 31.0),
            ("stir_speed_rpm", 300.0)
        ]
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_action_sends_its_rendered_commands_and_completes_on_its_reading() {
    let (mut d, mut device) = driver(IKA, &[]);
    let dev = tokio::spawn(async move {
        let mut fake = identified(&mut device, "1.10").await;
        fake.expect(b"OUT_SP_1 40.0\r\n").await;
        fake.expect(b"START_1\r\n").await;
        // Not there yet, then within the tolerance of 1 degC.
        fake.reply(b"IN_PV_1\r\n", b"35.0 1\r\n").await;
        fake.reply(b"IN_PV_1\r\n", b"39.5 1\r\n").await;
    });
    d.start().await.unwrap();
    let cmd = DeviceCommand::Defined {
        action: "set_temperature".into(),
        params: [("temperature_c".to_owned(), 40.0)].into(),
    };
    assert_eq!(d.execute(&cmd).await.unwrap(), Outcome::Done);
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_parameter_outside_the_definition_s_range_never_reaches_the_line() {
    let (mut d, mut device) = driver(IKA, &[]);
    let dev = tokio::spawn(async move {
        let mut fake = identified(&mut device, "1.10").await;
        fake.expect_silence(Duration::from_secs(5)).await;
    });
    d.start().await.unwrap();
    let cmd = DeviceCommand::Defined {
        action: "set_temperature".into(),
        params: [("temperature_c".to_owned(), 400.0)].into(),
    };
    let err = d.execute(&cmd).await.unwrap_err().to_string();
    assert!(
        err.contains("temperature_c = 400") && err.contains("0..=310"),
        "{err}"
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_error_reply_becomes_the_definition_s_message_and_the_ack_is_awaited() {
    let text = IKA.replace(
        "commands = [\"STOP_4\"]",
        "commands = [\"STOP_4\"]\nack = '^OK$'\nerrors = [{ reply = '^E(?P<code>\\d+)$', message = \"motor blocked\" }]",
    );
    assert_ne!(text, IKA);
    let (mut d, mut device) = driver(&text, &[]);
    let dev = tokio::spawn(async move {
        let mut fake = identified(&mut device, "1.10").await;
        fake.reply(b"STOP_4\r\n", b"OK\r\n").await;
        fake.reply(b"STOP_4\r\n", b"E3\r\n").await;
    });
    d.start().await.unwrap();
    let cmd = DeviceCommand::Defined {
        action: "stir_off".into(),
        params: BTreeMap::new(),
    };
    assert_eq!(d.execute(&cmd).await.unwrap(), Outcome::Done);
    let err = d.execute(&cmd).await.unwrap_err().to_string();
    assert!(err.contains("E3") && err.contains("motor blocked"), "{err}");
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn safe_state_sends_the_whole_sequence_paced_by_the_inter_command_delay() {
    let (mut d, mut device) = driver(IKA, &[]);
    let dev = tokio::spawn(async move {
        let mut fake = identified(&mut device, "1.10").await;
        fake.expect(b"STOP_1\r\n").await;
        let first = Instant::now();
        fake.expect(b"STOP_4\r\n").await;
        first.elapsed()
    });
    d.start().await.unwrap();
    d.safe_state().await.unwrap();
    let gap = dev.await.unwrap();
    assert!(gap >= Duration::from_millis(50), "{gap:?}");
}

#[test]
fn what_this_driver_cannot_speak_is_refused_by_name() {
    let (port, _device) = memory_port(None, PortConfig::default());
    // A prompt character instead of a line end (some instruments answer `>`): not a line this wire splits.
    let text = IKA.replace("terminator_in = \"\\r\\n\"", "terminator_in = \">\"");
    assert_ne!(text, IKA);
    let err = LineWire::new("x", port, definition(&text)).unwrap_err();
    assert!(
        err.to_string().contains("reply terminator") && err.to_string().contains("\">\""),
        "{err}"
    );
}

/// The hotplate's lines framed with STX/ETX and an XOR checksum (bytes built by the codec, as the
/// definition's framing says).
fn framed(text: &str) -> Vec<u8> {
    let framing = labctl_codecs::ascii_frame::AsciiFraming {
        stx_etx: true,
        check: labctl_codecs::ascii_frame::Check::Xor,
    };
    let mut bytes = framing.wrap(text.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    bytes
}

#[tokio::test(start_paused = true)]
async fn a_framed_reply_with_a_wrong_checksum_is_refused_as_damaged_and_a_good_one_is_read() {
    let text = IKA.replace(
        "terminator_in = \"\\r\\n\"",
        "terminator_in = \"\\r\\n\"\nstx_etx = true\nchecksum = \"xor\"",
    );
    assert_ne!(text, IKA);
    let (mut d, mut device) = driver(&text, &[]);
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(&framed("IN_NAME"), &framed("RCT digital")).await;
        fake.reply(&framed("IN_VERSION"), &framed("1.10")).await;
        // One payload byte changed on the line: its checksum no longer fits.
        let mut damaged = framed("25.3 1");
        damaged[3] ^= 0x01;
        fake.reply(&framed("IN_PV_1"), &damaged).await;
        fake.reply(&framed("IN_PV_1"), &framed("25.3 1")).await;
    });
    d.start().await.unwrap();
    let read = DeviceCommand::Read {
        quantity: "temperature_c".into(),
    };
    let err = d.execute(&read).await.unwrap_err();
    assert!(
        matches!(err, DriverError::DamagedReply { .. }) && err.to_string().contains("checksum"),
        "{err}"
    );
    match d.execute(&read).await.unwrap() {
        Outcome::Reading { value, .. } => assert_eq!(value, 25.3),
        other => panic!("{other:?}"),
    }
    dev.await.unwrap();
}
