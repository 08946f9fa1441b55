//! The hotplate driver against a scripted IKA device. Commands and replies are those of the NAMUR table in
//! the IKA RCT digital / C-MAG HS operating manuals (`IN_PV_1` -> `25.3 1`; setpoints get no reply).

use super::*;
use crate::port::PortConfig;
use crate::testing::{Fake, memory_port};
use labctl_transport::{LineTiming, MemoryDevice};

fn hotplate(options: HotplateOptions) -> (IkaHotplate, MemoryDevice) {
    let config = PortConfig {
        framer: frame_line_or_cr,
        ..PortConfig::default()
    };
    // 7E1: 1 start + 7 data + parity + 1 stop = 10 bits a character.
    let timing = LineTiming {
        baud: 9600,
        bits_per_char: 10,
    };
    let (port, device) = memory_port(Some(timing), config);
    (IkaHotplate::new("hotplate", port, options), device)
}

async fn started(device: &mut MemoryDevice) -> Fake {
    let mut fake = Fake::accept(device).await;
    fake.reply(b"IN_NAME\r\n", b"RCT digital\r\n").await;
    fake.reply(b"IN_VERSION\r\n", b"1.12\r\n").await;
    fake.reply(b"OUT_WD1@30\r\n", b"30\r\n").await;
    fake
}

#[tokio::test(start_paused = true)]
async fn start_reads_name_and_version_and_arms_the_watchdog() {
    let (mut h, mut device) = hotplate(HotplateOptions::default());
    let dev = tokio::spawn(async move { started(&mut device).await });
    let id = h.start().await.unwrap();
    assert_eq!(id.manufacturer, "IKA");
    assert_eq!(id.model, "RCT digital");
    assert_eq!(id.firmware, "1.12");
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_model_without_in_version_still_starts() {
    let (mut h, mut device) = hotplate(HotplateOptions { watchdog_s: 60 });
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"IN_NAME\r\n", b"C-MAG HS 7\r\n").await;
        // Unknown commands get no answer at all; IN_VERSION is not retried.
        fake.expect(b"IN_VERSION\r\n").await;
        fake.reply(b"OUT_WD1@60\r\n", b"60\r\n").await;
    });
    let id = h.start().await.unwrap();
    assert_eq!(id.model, "C-MAG HS 7");
    assert!(id.firmware.starts_with("unknown"), "{}", id.firmware);
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_watchdog_time_the_device_refuses_fails_before_any_io() {
    let (mut h, _device) = hotplate(HotplateOptions { watchdog_s: 5 });
    let err = h.start().await.unwrap_err();
    assert!(
        matches!(&err, DriverError::Unsupported { what, .. } if what == "watchdog time"),
        "{err}"
    );
    assert!(!h.link.port.is_open());
}

#[tokio::test(start_paused = true)]
async fn a_wrong_watchdog_echo_is_refused() {
    let (mut h, mut device) = hotplate(HotplateOptions::default());
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"IN_NAME\r\n", b"RCT digital\r\n").await;
        fake.reply(b"IN_VERSION\r\n", b"1.12\r\n").await;
        fake.reply(b"OUT_WD1@30\r\n", b"20\r\n").await;
    });
    let err = h.start().await.unwrap_err();
    assert!(matches!(err, DriverError::UnexpectedReply { .. }), "{err}");
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn setpoints_are_sent_and_started_without_waiting_for_replies() {
    let (mut h, mut device) = hotplate(HotplateOptions::default());
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"OUT_SP_1 60.5\r\nSTART_1\r\n").await;
        fake.expect(b"OUT_SP_4 500\r\nSTART_4\r\n").await;
        fake.expect(b"STOP_1\r\n").await;
        fake.expect(b"STOP_4\r\n").await;
    });
    h.start().await.unwrap();
    let ok = Outcome::Done;
    assert_eq!(
        h.execute(&DeviceCommand::SetTemperature {
            temperature_c: 60.5
        })
        .await
        .unwrap(),
        ok
    );
    assert_eq!(
        h.execute(&DeviceCommand::SetStirSpeed { speed_rpm: 499.6 })
            .await
            .unwrap(),
        ok
    );
    assert_eq!(h.execute(&DeviceCommand::HeaterOff).await.unwrap(), ok);
    assert_eq!(h.execute(&DeviceCommand::StirOff).await.unwrap(), ok);
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_reading_of_another_channel_never_answers_a_temperature_query() {
    let (mut h, mut device) = hotplate(HotplateOptions::default());
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"IN_PV_1\r\n", b"500 4\r\n\x7f?\r\n25.3 1\r\n")
            .await;
    });
    h.start().await.unwrap();
    let t = h.execute(&DeviceCommand::ReadTemperature).await.unwrap();
    assert_eq!(
        t,
        Outcome::Temperature {
            temperature_c: 25.3
        }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn poll_feeds_the_watchdog_and_reads_all_three_values() {
    let (mut h, mut device) = hotplate(HotplateOptions::default());
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"OUT_WD1@30\r\n", b"30\r\n").await;
        fake.reply(b"IN_PV_1\r\n", b"25.3 1\r\n").await;
        fake.reply(b"IN_PV_2\r\n", b"80.1 2\r\n").await;
        fake.reply(b"IN_PV_4\r\n", b"500 4\r\n").await;
    });
    h.start().await.unwrap();
    let t = h.poll().await.unwrap();
    assert_eq!(t.state, DeviceState::Idle);
    assert_eq!(
        t.values,
        vec![
            ("temperature_c", 25.3),
            ("plate_temperature_c", 80.1),
            ("stir_speed_rpm", 500.0)
        ]
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn safe_state_stops_heater_and_motor() {
    let (mut h, mut device) = hotplate(HotplateOptions::default());
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"STOP_1\r\nSTOP_4\r\n").await;
        fake.expect_silence(Duration::from_secs(5)).await;
    });
    h.start().await.unwrap();
    h.safe_state().await.unwrap();
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_device_times_out_after_one_retry() {
    let (mut h, mut device) = hotplate(HotplateOptions::default());
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"IN_PV_1\r\n").await;
        fake.expect(b"IN_PV_1\r\n").await;
        fake.expect_silence(Duration::from_secs(30)).await;
    });
    h.start().await.unwrap();
    let err = h
        .execute(&DeviceCommand::ReadTemperature)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DriverError::Port(PortError::Timeout { .. })),
        "{err}"
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn values_that_cannot_be_sent_are_refused_and_a_hang_up_is_lost() {
    let (mut h, mut device) = hotplate(HotplateOptions::default());
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"IN_PV_1\r\n").await;
    });
    h.start().await.unwrap();
    for cmd in [
        DeviceCommand::SetTemperature {
            temperature_c: f64::INFINITY,
        },
        DeviceCommand::SetStirSpeed { speed_rpm: -10.0 },
    ] {
        let err = h.execute(&cmd).await.unwrap_err();
        assert!(matches!(err, DriverError::InvalidCommand { .. }), "{err}");
    }
    let err = h
        .execute(&DeviceCommand::ReadTemperature)
        .await
        .unwrap_err();
    dev.await.unwrap();
    assert!(err.is_connection_lost(), "{err}");
}

// ----- readings damaged on the line (NAMUR has no checksum) -----

/// Runs `script` as the device after a normal start, while `host` drives the hotplate; then the device
/// expects silence (nothing asked beyond the script).
async fn scripted<T>(
    options: HotplateOptions,
    scale: f64,
    script: impl AsyncFnOnce(&mut Fake),
    host: impl AsyncFnOnce(&mut IkaHotplate) -> T,
) -> T {
    let (h, mut device) = hotplate(options);
    let mut h = h.time_scale(scale);
    let dev = async move {
        let mut fake = started(&mut device).await;
        script(&mut fake).await;
        fake.expect_silence(Duration::from_secs(5)).await;
    };
    let host = async {
        h.start().await.unwrap();
        host(&mut h).await
    };
    let ((), out) = tokio::join!(dev, host);
    out
}

async fn read(h: &mut IkaHotplate) -> Result<f64, DriverError> {
    match h.execute(&DeviceCommand::ReadTemperature).await? {
        Outcome::Temperature { temperature_c } => Ok(temperature_c),
        other => panic!("expected a temperature, got {other:?}"),
    }
}

fn damaged_reason(e: &DriverError) -> &str {
    match e {
        DriverError::DamagedReply { reason, .. } => reason,
        other => panic!("expected a damaged reply, got {other:?}"),
    }
}

#[test]
fn value_decimals_reads_the_printed_resolution() {
    assert_eq!(value_decimals(b"25.3 1\r\n"), Some(1));
    assert_eq!(value_decimals(b"500 4\r\n"), Some(0));
    assert_eq!(value_decimals(b"-5.25 2"), Some(2));
    assert_eq!(value_decimals(b"253 1"), Some(0));
    assert_eq!(value_decimals(b".3 1"), None);
    assert_eq!(value_decimals(b"RCT digital"), None);
}

#[tokio::test(start_paused = true)]
async fn a_temperature_that_lost_a_leading_digit_is_refused_and_asked_again() {
    let seen = scripted(
        HotplateOptions::default(),
        1.0,
        async |fake| {
            fake.reply(b"IN_PV_1\r\n", b"22.0 1\r\n").await;
            // `22.0` lost a `2`: the same decimals, a change of 20 K in a fraction of a second.
            fake.reply(b"IN_PV_1\r\n", b"2.0 1\r\n").await;
            fake.reply(b"IN_PV_1\r\n", b"22.1 1\r\n").await;
        },
        async |h| (read(h).await.unwrap(), read(h).await.unwrap()),
    )
    .await;
    assert_eq!(seen, (22.0, 22.1));
}

#[tokio::test(start_paused = true)]
async fn a_temperature_damaged_twice_is_a_typed_error_not_a_value() {
    let err = scripted(
        HotplateOptions::default(),
        1.0,
        async |fake| {
            fake.reply(b"IN_PV_1\r\n", b"22.0 1\r\n").await;
            fake.reply(b"IN_PV_1\r\n", b"22.0 1\r\n").await;
            fake.reply(b"IN_PV_1\r\n", b"2.0 1\r\n").await;
            // The point lost the second time.
            fake.reply(b"IN_PV_1\r\n", b"220 1\r\n").await;
        },
        async |h| {
            read(h).await.unwrap();
            read(h).await.unwrap();
            read(h).await.unwrap_err()
        },
    )
    .await;
    assert!(
        damaged_reason(&err).contains("0 decimals where this device prints 1"),
        "{err}"
    );
    assert!(!err.is_connection_lost());
}

#[tokio::test(start_paused = true)]
async fn a_fast_change_is_plausible_after_long_enough_and_on_a_warped_clock() {
    let seen = scripted(
        HotplateOptions::default(),
        1.0,
        async |fake| {
            fake.reply(b"IN_PV_2\r\n", b"22.0 2\r\n").await;
            // 30 K after 10 s is 3 K/s: a hot plate top can do that.
            fake.reply(b"IN_PV_2\r\n", b"52.0 2\r\n").await;
        },
        async |h| {
            let a = h.temperature(Sensor::Hotplate).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            (a, h.temperature(Sensor::Hotplate).await.unwrap())
        },
    )
    .await;
    assert_eq!(seen, (22.0, 52.0));
    // A simulator at warp 50: 10 K in 0.2 real seconds is 10 s of its time, 1 K/s.
    let seen = scripted(
        HotplateOptions::default(),
        50.0,
        async |fake| {
            fake.reply(b"IN_PV_2\r\n", b"22.0 2\r\n").await;
            fake.reply(b"IN_PV_2\r\n", b"32.0 2\r\n").await;
        },
        async |h| {
            let a = h.temperature(Sensor::Hotplate).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            (a, h.temperature(Sensor::Hotplate).await.unwrap())
        },
    )
    .await;
    assert_eq!(seen, (22.0, 32.0));
}

#[tokio::test(start_paused = true)]
async fn a_stirrer_speed_printed_with_other_decimals_is_asked_again() {
    let seen = scripted(
        HotplateOptions::default(),
        1.0,
        async |fake| {
            for (want, answer) in [
                (&b"OUT_WD1@30\r\n"[..], &b"30\r\n"[..]),
                (b"IN_PV_1\r\n", b"25.3 1\r\n"),
                (b"IN_PV_2\r\n", b"80.1 2\r\n"),
                (b"IN_PV_4\r\n", b"500.0 4\r\n"),
                (b"OUT_WD1@30\r\n", b"30\r\n"),
                (b"IN_PV_1\r\n", b"25.3 1\r\n"),
                (b"IN_PV_2\r\n", b"80.1 2\r\n"),
                (b"IN_PV_4\r\n", b"500.0 4\r\n"),
                (b"OUT_WD1@30\r\n", b"30\r\n"),
                (b"IN_PV_1\r\n", b"25.3 1\r\n"),
                (b"IN_PV_2\r\n", b"80.1 2\r\n"),
                // The point lost: 5000 rpm.
                (b"IN_PV_4\r\n", b"5000 4\r\n"),
                (b"IN_PV_4\r\n", b"500.0 4\r\n"),
            ] {
                fake.reply(want, answer).await;
            }
        },
        async |h| {
            let mut speeds = Vec::new();
            for _ in 0..3 {
                speeds.push(h.poll().await.unwrap().values[2].1);
            }
            speeds
        },
    )
    .await;
    assert_eq!(seen, vec![500.0, 500.0, 500.0]);
}

#[tokio::test(start_paused = true)]
async fn a_stirrer_speed_that_lost_a_digit_is_refused_by_the_motors_rate_and_asked_again() {
    let seen = scripted(
        HotplateOptions::default(),
        1.0,
        async |fake| {
            fake.reply(b"IN_PV_4\r\n", b"500.0 4\r\n").await;
            // `500.0` lost a `0`: the same decimals, 450 rpm slower within a fraction of a second.
            fake.reply(b"IN_PV_4\r\n", b"50.0 4\r\n").await;
            fake.reply(b"IN_PV_4\r\n", b"501.0 4\r\n").await;
        },
        async |h| (h.speed().await.unwrap(), h.speed().await.unwrap()),
    )
    .await;
    assert_eq!(seen, (500.0, 501.0));
}

#[tokio::test(start_paused = true)]
async fn a_stirrer_that_spins_up_at_a_motors_pace_is_read_as_it_goes() {
    let seen = scripted(
        HotplateOptions::default(),
        1.0,
        async |fake| {
            fake.reply(b"IN_PV_4\r\n", b"0.0 4\r\n").await;
            // 1000 rpm one second later: a soft start.
            fake.reply(b"IN_PV_4\r\n", b"1000.0 4\r\n").await;
            // Then damaged twice: not a value.
            fake.reply(b"IN_PV_4\r\n", b"100.0 4\r\n").await;
            fake.reply(b"IN_PV_4\r\n", b"1100.0 4\r\n").await;
        },
        async |h| {
            let a = h.speed().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let b = h.speed().await.unwrap();
            (a, b, h.speed().await.unwrap_err())
        },
    )
    .await;
    assert_eq!((seen.0, seen.1), (0.0, 1000.0));
    assert!(
        damaged_reason(&seen.2).contains("faster than a stirrer motor changes speed"),
        "{}",
        seen.2
    );
}

#[tokio::test(start_paused = true)]
async fn a_temperature_running_away_faster_than_physics_reaches_the_caller_once_confirmed() {
    // A sensor fault or a runaway heater: the over-temperature interlock must see it, not a damaged line.
    let seen = scripted(
        HotplateOptions::default(),
        1.0,
        async |fake| {
            fake.reply(b"IN_PV_2\r\n", b"122.0 2\r\n").await;
            fake.reply(b"IN_PV_2\r\n", b"152.0 2\r\n").await;
            // Asked again: far closer to the refused reading than to the one before it.
            fake.reply(b"IN_PV_2\r\n", b"153.0 2\r\n").await;
        },
        async |h| {
            let a = h.temperature(Sensor::Hotplate).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            (a, h.temperature(Sensor::Hotplate).await.unwrap())
        },
    )
    .await;
    assert_eq!(seen, (122.0, 153.0));
}
