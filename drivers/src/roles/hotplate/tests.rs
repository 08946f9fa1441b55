//! The hotplate driver against a scripted IKA device. Commands and replies are those of the NAMUR table in
//! the IKA RCT digital / C-MAG HS operating manuals (`IN_PV_1` -> `25.3 1`; setpoints get no reply).

use super::*;
use crate::port::PortConfig;
use crate::testing::{Fake, memory_port};
use crate::transport::{LineTiming, MemoryDevice};

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
