//! The pump driver against scripted NE-1000 pumps. Packets are quoted from the NE-1000 user manual,
//! "RS-232 Protocol: Basic Mode" (`STX`, two-digit address, prompt, data, `ETX`).

use super::*;
use crate::error::PortError;
use crate::port::PortConfig;
use crate::testing::{Fake, memory_port};
use labctl_transport::{LineTiming, MemoryDevice};

fn line() -> (PortHandle, MemoryDevice) {
    let config = PortConfig {
        framer: frame_packet,
        ..PortConfig::default()
    };
    memory_port(Some(LineTiming::n81(19_200)), config)
}

fn pump(address: u8) -> (Ne1000Pump, MemoryDevice) {
    let (port, device) = line();
    (Ne1000Pump::new("pump-red", port, address), device)
}

async fn started(device: &mut MemoryDevice) -> Fake {
    let mut fake = Fake::accept(device).await;
    fake.reply(b"1VER\r", b"\x0201SNE1000V3.928\x03").await;
    fake
}

#[tokio::test(start_paused = true)]
async fn start_reads_the_version() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move { started(&mut device).await });
    let id = p.start().await.unwrap();
    assert_eq!(id.model, "NE1000");
    assert_eq!(id.firmware, "NE1000V3.928");
    assert_eq!(id.manufacturer, "New Era Pump Systems");
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn start_clears_a_power_on_reset_alarm_and_asks_again() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"1VER\r", b"\x0201A?R\x03").await;
        fake.reply(b"1VER\r", b"\x0201SNE1000V3.928\x03").await;
    });
    assert_eq!(p.start().await.unwrap().firmware, "NE1000V3.928");
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn start_refuses_a_pump_that_is_not_an_ne1000() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"1VER\r", b"\x0201SXYZ-200 V1.0\x03").await;
    });
    let err = p.start().await.unwrap_err();
    assert!(
        matches!(&err, DriverError::Unsupported { what, .. } if what == "pump model"),
        "{err}"
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn dispense_sets_up_runs_polls_and_reads_the_dispensed_volume() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"1DIRINF\r", b"\x0201S\x03").await;
        fake.reply(b"1RAT600.0UM\r", b"\x0201S\x03").await;
        fake.reply(b"1VOLUL\r", b"\x0201S\x03").await;
        fake.reply(b"1VOL10.00\r", b"\x0201S\x03").await;
        fake.reply(b"1CLDINF\r", b"\x0201S\x03").await;
        fake.reply(b"1RUN\r", b"\x0201I\x03").await;
        // 10 uL at 600 uL/min takes one second.
        let running = tokio::time::Instant::now();
        loop {
            fake.expect(b"1\r").await;
            if running.elapsed() >= Duration::from_secs(1) {
                fake.send(b"\x0201S\x03").await;
                break;
            }
            // Garbage before a valid packet is skipped.
            fake.send(b"\xff\xfe\x0201I\x03").await;
        }
        // A reply from another pump on the line is not ours.
        fake.reply(
            b"1DIS\r",
            b"\x0202SI5.000W0.000UL\x03\x0201SI9.990W0.000UL\x03",
        )
        .await;
        fake.expect_silence(Duration::from_secs(5)).await;
    });
    p.start().await.unwrap();
    let cmd = DeviceCommand::Dispense {
        volume_ul: 10.0,
        rate_ul_per_min: 600.0,
    };
    assert_eq!(
        p.execute(&cmd).await.unwrap(),
        Outcome::Dispensed { dispensed_ul: 9.99 }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn large_volumes_and_rates_switch_to_millilitres() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"1DIRINF\r", b"\x0201S\x03").await;
        fake.reply(b"1RAT20.00MM\r", b"\x0201S\x03").await;
        fake.reply(b"1VOLML\r", b"\x0201S\x03").await;
        fake.reply(b"1VOL12.50\r", b"\x0201S\x03").await;
        fake.reply(b"1CLDINF\r", b"\x0201S\x03").await;
        fake.reply(b"1RUN\r", b"\x0201I\x03").await;
        fake.reply(b"1\r", b"\x0201S\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI12.50W0.000ML\x03").await;
    });
    p.start().await.unwrap();
    let cmd = DeviceCommand::Dispense {
        volume_ul: 12_500.0,
        rate_ul_per_min: 20_000.0,
    };
    assert_eq!(
        p.execute(&cmd).await.unwrap(),
        Outcome::Dispensed {
            dispensed_ul: 12_500.0
        }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stall_alarm_during_a_dispense_is_an_alarm() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        for (req, rep) in [
            (&b"1DIRINF\r"[..], &b"\x0201S\x03"[..]),
            (b"1RAT100.0UM\r", b"\x0201S\x03"),
            (b"1VOLUL\r", b"\x0201S\x03"),
            (b"1VOL100.0\r", b"\x0201S\x03"),
            (b"1CLDINF\r", b"\x0201S\x03"),
            (b"1RUN\r", b"\x0201I\x03"),
            (b"1\r", b"\x0201A?S\x03"),
        ] {
            fake.reply(req, rep).await;
        }
    });
    p.start().await.unwrap();
    let cmd = DeviceCommand::Dispense {
        volume_ul: 100.0,
        rate_ul_per_min: 100.0,
    };
    match p.execute(&cmd).await {
        Err(DriverError::Alarm { code, message, .. }) => {
            assert_eq!(code, "A?S");
            assert_eq!(message, "Pump motor stalled");
        }
        other => panic!("expected the stall alarm, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn command_errors_carry_the_manual_text() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"1DIRINF\r", b"\x0201S\x03").await;
        fake.reply(b"1RAT1500UM\r", b"\x0201S?OOR\x03").await;
    });
    p.start().await.unwrap();
    let cmd = DeviceCommand::Dispense {
        volume_ul: 100.0,
        rate_ul_per_min: 1500.0,
    };
    match p.execute(&cmd).await {
        Err(DriverError::Device { code, message, .. }) => {
            assert_eq!(code, "?OOR");
            assert_eq!(message, "Command data is out of range");
        }
        other => panic!("expected ?OOR, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_run_reply_is_never_repeated() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        for (req, rep) in [
            (&b"1DIRINF\r"[..], &b"\x0201S\x03"[..]),
            (b"1RAT100.0UM\r", b"\x0201S\x03"),
            (b"1VOLUL\r", b"\x0201S\x03"),
            (b"1VOL100.0\r", b"\x0201S\x03"),
            (b"1CLDINF\r", b"\x0201S\x03"),
        ] {
            fake.reply(req, rep).await;
        }
        fake.expect(b"1RUN\r").await;
        // Whether the pump started is asked (and asked again, twice: a status query is safe); RUN never is.
        for _ in 0..3 {
            fake.expect(b"1\r").await;
        }
        fake.expect_silence(Duration::from_secs(60)).await;
    });
    p.start().await.unwrap();
    let cmd = DeviceCommand::Dispense {
        volume_ul: 100.0,
        rate_ul_per_min: 100.0,
    };
    let err = p.execute(&cmd).await.unwrap_err();
    assert!(
        matches!(err, DriverError::Port(PortError::Timeout { .. })),
        "{err}"
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn values_the_four_digit_format_cannot_hold_are_refused_before_sending() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect_silence(Duration::from_secs(5)).await;
    });
    p.start().await.unwrap();
    for cmd in [
        DeviceCommand::Dispense {
            volume_ul: 1e9,
            rate_ul_per_min: 100.0,
        },
        DeviceCommand::Dispense {
            volume_ul: 100.0,
            rate_ul_per_min: f64::NAN,
        },
        DeviceCommand::Dispense {
            volume_ul: 0.0001,
            rate_ul_per_min: 100.0,
        },
    ] {
        let err = p.execute(&cmd).await.unwrap_err();
        assert!(matches!(err, DriverError::InvalidCommand { .. }), "{err}");
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn pumps_sharing_a_line_each_get_their_own_replies() {
    let (port, mut device) = line();
    let mut pumps: Vec<Ne1000Pump> = (1..=3)
        .map(|a| Ne1000Pump::new(&format!("pump-{a}"), port.clone(), a))
        .collect();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        for _ in 0..3 {
            let mut request = Vec::new();
            while !request.ends_with(b"\r") {
                request.push(fake.read_byte().await);
            }
            let address = request.first().copied().unwrap_or(b'?');
            // Every pump hears every command; answer with the addressed pump's own version.
            let reply = format!(
                "\x020{}SNE1000V3.9{}\x03",
                char::from(address),
                char::from(address)
            );
            fake.send(reply.as_bytes()).await;
        }
    });
    let mut tasks = Vec::new();
    for mut p in pumps.drain(..) {
        tasks.push(tokio::spawn(async move { (p.start().await, p) }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (id, _pump) = t.await.unwrap();
        assert_eq!(id.unwrap().firmware, format!("NE1000V3.9{}", i + 1));
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn safe_state_is_stp_and_poll_reports_status_and_volume() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"1\r", b"\x0201I\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI0.500W0.000ML\x03").await;
        fake.reply(b"1STP\r", b"\x0201P\x03").await;
        fake.reply(b"1\r", b"\x0201A?S\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI0.600W0.000ML\x03").await;
    });
    p.start().await.unwrap();
    let t = p.poll().await.unwrap();
    assert_eq!(t.state, DeviceState::Busy);
    assert_eq!(t.values, vec![("dispensed_ul", 500.0)]);
    p.safe_state().await.unwrap();
    let t = p.poll().await.unwrap();
    assert!(
        matches!(&t.state, DeviceState::Alarm(text) if text.contains("Pump motor stalled")),
        "{t:?}"
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_pump_line_that_hangs_up_is_lost_until_restarted() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"1\r").await;
        drop(fake);
        started(&mut device).await
    });
    p.start().await.unwrap();
    let err = p.poll().await.unwrap_err();
    assert!(err.is_connection_lost(), "{err}");
    p.start().await.unwrap();
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_run_reply_is_settled_by_asking_whether_the_pump_runs() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        let setup = [
            (&b"1DIRINF\r"[..], &b"\x0201S\x03"[..]),
            (b"1RAT600.0UM\r", b"\x0201S\x03"),
            (b"1VOLUL\r", b"\x0201S\x03"),
            (b"1VOL10.00\r", b"\x0201S\x03"),
            (b"1CLDINF\r", b"\x0201S\x03"),
        ];
        // First dispense: the pump heard RUN and is infusing; its reply was lost.
        for (req, rep) in setup {
            fake.reply(req, rep).await;
        }
        fake.expect(b"1RUN\r").await;
        fake.reply(b"1\r", b"\x0201I\x03").await;
        fake.reply(b"1\r", b"\x0201S\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI10.00W0.000UL\x03").await;
        // Second dispense: RUN never arrived (stopped, nothing dispensed): sent once more.
        for (req, rep) in setup {
            fake.reply(req, rep).await;
        }
        fake.expect(b"1RUN\r").await;
        fake.reply(b"1\r", b"\x0201S\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI0.000W0.000UL\x03").await;
        fake.reply(b"1RUN\r", b"\x0201I\x03").await;
        fake.reply(b"1\r", b"\x0201S\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI10.00W0.000UL\x03").await;
        fake.expect_silence(Duration::from_secs(5)).await;
    });
    p.start().await.unwrap();
    let cmd = DeviceCommand::Dispense {
        volume_ul: 10.0,
        rate_ul_per_min: 600.0,
    };
    for _ in 0..2 {
        assert_eq!(
            p.execute(&cmd).await.unwrap(),
            Outcome::Dispensed { dispensed_ul: 10.0 }
        );
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dis_reply_damaged_into_other_printable_bytes_is_asked_again() {
    // NE-1000 replies carry no checksum: `0.000` garbled into `>.g00` still decodes, as text. `DIS` is
    // safe to repeat, so the driver asks again rather than failing the dispense or the poll.
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"1\r", b"\x0201S\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI150.0W>.g00UL\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI150.0W0.000UL\x03").await;
        // Damaged twice in a row is an error, not a guess.
        fake.reply(b"1\r", b"\x0201S\x03").await;
        for _ in 0..2 {
            fake.reply(b"1DIS\r", b"\x0201SI1#0.0W0.000UL\x03").await;
        }
    });
    p.start().await.unwrap();
    let t = p.poll().await.unwrap();
    assert_eq!(t.values, vec![("dispensed_ul", 150.0)]);
    let err = p.poll().await.unwrap_err();
    assert!(
        matches!(&err, DriverError::DamagedReply { command, .. } if command == "DIS"),
        "{err}"
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_safe_request_is_sent_up_to_three_times_when_replies_are_lost() {
    let (mut p, mut device) = pump(1);
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"1\r").await;
        fake.expect(b"1\r").await;
        fake.reply(b"1\r", b"\x0201S\x03").await;
        fake.reply(b"1DIS\r", b"\x0201SI0.000W0.000UL\x03").await;
    });
    p.start().await.unwrap();
    assert_eq!(p.poll().await.unwrap().state, DeviceState::Idle);
    dev.await.unwrap();
}
