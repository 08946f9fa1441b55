//! The gantry driver against a scripted GRBL 1.1. Replies are quoted from the "Grbl v1.1 Interface" and
//! "Grbl v1.1 Commands" documents.

use super::*;
use crate::error::PortError;
use crate::port::PortConfig;
use crate::testing::{Fake, memory_port};
use crate::transport::{LineTiming, MemoryDevice};

const BUILD_INFO: &[u8] = b"[VER:1.1h.20190825:]\r\n[OPT:V,15,128]\r\nok\r\n";

fn gantry() -> (GrblGantry, MemoryDevice) {
    let (port, device) = memory_port(Some(LineTiming::n81(115_200)), PortConfig::default());
    (
        GrblGantry::new("gantry", port, GantryOptions::default()),
        device,
    )
}

/// Accepts the connection and answers `$I` like GRBL 1.1h.
async fn started(device: &mut MemoryDevice) -> Fake {
    let mut fake = Fake::accept(device).await;
    fake.reply(b"$I\n", BUILD_INFO).await;
    fake
}

fn idle_at(x: &str, y: &str, z: &str) -> Vec<u8> {
    format!("<Idle|MPos:{x},{y},{z}|FS:0,0>\r\n").into_bytes()
}

#[tokio::test(start_paused = true)]
async fn start_reads_build_info_after_the_welcome_banner() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        // GRBL greets after a reset (opening the port resets an Arduino).
        fake.send(b"\r\nGrbl 1.1h ['$' for help]\r\n").await;
        fake.reply(b"$I\n", BUILD_INFO).await;
        fake
    });
    let id = g.start().await.unwrap();
    assert_eq!(id.firmware, "Grbl 1.1h.20190825");
    assert_eq!(id.manufacturer, "Grbl");
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn start_refuses_firmware_other_than_grbl_11() {
    for (reply, found) in [
        (
            &b"[VER:1.0c.20161201:]\r\n[OPT:V,15,128]\r\nok\r\n"[..],
            "Grbl 1.0c.20161201",
        ),
        // Grbl 0.9 prints its build info without the VER tag.
        (b"[0.9j.20160303:]\r\nok\r\n", "[0.9j.20160303:]"),
        (b"error:3\r\n", "no build info ($I answered error:3)"),
    ] {
        let (mut g, mut device) = gantry();
        let dev = tokio::spawn(async move {
            let mut fake = Fake::accept(&mut device).await;
            fake.reply(b"$I\n", reply).await;
            fake
        });
        match g.start().await {
            Err(DriverError::Unsupported {
                what,
                found: f,
                supported,
                ..
            }) => {
                assert_eq!(what, "firmware");
                assert_eq!(f, found);
                assert_eq!(supported, "Grbl 1.1x");
            }
            other => panic!("expected Unsupported for {found}, got {other:?}"),
        }
        dev.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn move_sends_absolute_metric_g1_and_polls_until_idle_at_the_target() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"?", &idle_at("0.000", "0.000", "0.000")).await;
        fake.reply(b"G90\n", b"ok\r\n").await;
        fake.reply(b"G21\n", b"ok\r\n").await;
        // An unsolicited status report in the middle does not answer the line.
        fake.reply(
            b"G1 X10 Y20 Z5.5 F1000\n",
            b"<Run|MPos:0.100,0.200,0.055|FS:1000,0>\r\nok\r\n",
        )
        .await;
        // Garbage before a valid reply is dropped.
        fake.reply(
            b"?",
            b"\x00\xff#\r\n<Run|MPos:5.000,10.000,2.750|FS:1000,0>\r\n",
        )
        .await;
        fake.reply(b"?", &idle_at("10.000", "20.000", "5.500"))
            .await;
        fake.expect_silence(Duration::from_secs(1)).await;
    });
    g.start().await.unwrap();
    let cmd = DeviceCommand::MoveTo {
        x_mm: 10.0,
        y_mm: 20.0,
        z_mm: 5.5,
        feed_mm_per_min: 1000.0,
    };
    assert_eq!(g.execute(&cmd).await.unwrap(), Outcome::Done);
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_soft_limit_alarm_during_a_move_is_reported_with_the_manual_text() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"?", &idle_at("0.000", "0.000", "0.000")).await;
        fake.reply(b"G90\n", b"ok\r\n").await;
        fake.reply(b"G21\n", b"ok\r\n").await;
        fake.reply(b"G1 X10 Y20 Z5 F1000\n", b"ok\r\n").await;
        fake.reply(
            b"?",
            b"ALARM:2\r\n[MSG:Reset to continue]\r\n<Alarm|MPos:3.000,6.000,1.500|FS:0,0>\r\n",
        )
        .await;
    });
    g.start().await.unwrap();
    let cmd = DeviceCommand::MoveTo {
        x_mm: 10.0,
        y_mm: 20.0,
        z_mm: 5.0,
        feed_mm_per_min: 1000.0,
    };
    match g.execute(&cmd).await {
        Err(DriverError::Alarm { code, message, .. }) => {
            assert_eq!(code, "ALARM:2");
            assert!(message.contains("Soft limit alarm"), "{message}");
        }
        other => panic!("expected the soft limit alarm, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn homing_after_a_limit_alarm_soft_resets_first() {
    // After ALARM:1/ALARM:2 GRBL processes nothing but real-time bytes until ctrl-x: `$H` alone would
    // never be answered.
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"?", &idle_at("0.000", "0.000", "0.000")).await;
        fake.reply(b"G90\n", b"ok\r\n").await;
        fake.reply(b"G21\n", b"ok\r\n").await;
        fake.reply(
            b"G1 X400 Y0 Z0 F1000\n",
            b"ALARM:2\r\n[MSG:Reset to continue]\r\n",
        )
        .await;
        fake.reply(
            b"\x18",
            b"ok\r\n\r\nGrbl 1.1h ['$' for help]\r\n[MSG:'$H'|'$X' to unlock]\r\n",
        )
        .await;
        fake.reply(b"$H\n", b"ok\r\n").await;
    });
    g.start().await.unwrap();
    let cmd = DeviceCommand::MoveTo {
        x_mm: 400.0,
        y_mm: 0.0,
        z_mm: 0.0,
        feed_mm_per_min: 1000.0,
    };
    match g.execute(&cmd).await {
        Err(DriverError::Alarm { code, .. }) => assert_eq!(code, "ALARM:2"),
        other => panic!("expected the soft limit alarm, got {other:?}"),
    }
    assert_eq!(
        g.execute(&DeviceCommand::Home).await.unwrap(),
        Outcome::Done
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn error_replies_become_device_errors_with_the_manual_text() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"M8\n", b"error:9\r\n").await;
    });
    g.start().await.unwrap();
    match g.execute(&DeviceCommand::Gripper { closed: true }).await {
        Err(DriverError::Device { code, message, .. }) => {
            assert_eq!(code, "error:9");
            assert!(message.contains("G-code lock"), "{message}");
        }
        other => panic!("expected error:9, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn gripper_opens_with_m9() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"M9\n", b"ok\r\n").await;
    });
    g.start().await.unwrap();
    assert_eq!(
        g.execute(&DeviceCommand::Gripper { closed: false })
            .await
            .unwrap(),
        Outcome::Done
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn homing_waits_for_the_cycle_and_reports_a_homing_failure() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"$H\n").await;
        // GRBL answers only when the cycle has finished, far beyond a line's budget.
        tokio::time::sleep(Duration::from_secs(20)).await;
        fake.send(b"ok\r\n").await;
        fake.reply(b"$H\n", b"ALARM:9\r\n").await;
        // Homing is never retried: it is not safe to repeat blindly.
        fake.expect_silence(Duration::from_secs(300)).await;
    });
    g.start().await.unwrap();
    assert_eq!(
        g.execute(&DeviceCommand::Home).await.unwrap(),
        Outcome::Done
    );
    match g.execute(&DeviceCommand::Home).await {
        Err(DriverError::Alarm { code, message, .. }) => {
            assert_eq!(code, "ALARM:9");
            assert!(message.contains("Could not find limit switch"), "{message}");
        }
        other => panic!("expected ALARM:9, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_controller_times_out_after_one_retry_of_a_safe_line() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"M9\n").await;
        fake.expect(b"M9\n").await;
        fake.expect_silence(Duration::from_secs(60)).await;
    });
    g.start().await.unwrap();
    let err = g
        .execute(&DeviceCommand::Gripper { closed: false })
        .await
        .unwrap_err();
    assert!(
        matches!(err, DriverError::Port(PortError::Timeout { .. })),
        "{err}"
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_move_that_never_ends_is_not_finished() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"?", &idle_at("0.000", "0.000", "0.000")).await;
        fake.reply(b"G90\n", b"ok\r\n").await;
        fake.reply(b"G21\n", b"ok\r\n").await;
        fake.reply(b"G1 X10 Y0 Z0 F1000\n", b"ok\r\n").await;
        // 10 mm at 1000 mm/min is 0.6 s: 1.5 x 0.6 s + 5 s margin is 59 polls of 100 ms.
        for _ in 0..59 {
            fake.reply(b"?", b"<Run|MPos:1.000,0.000,0.000|FS:1000,0>\r\n")
                .await;
        }
        fake.expect_silence(Duration::from_secs(10)).await;
    });
    g.start().await.unwrap();
    let cmd = DeviceCommand::MoveTo {
        x_mm: 10.0,
        y_mm: 0.0,
        z_mm: 0.0,
        feed_mm_per_min: 1000.0,
    };
    match g.execute(&cmd).await {
        Err(DriverError::NotFinished {
            command, timeout, ..
        }) => {
            assert_eq!(command, "move_to");
            assert_eq!(timeout, Duration::from_millis(5900));
        }
        other => panic!("expected NotFinished, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn safe_state_is_a_bare_feed_hold_byte() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"!").await;
        fake.expect_silence(Duration::from_secs(1)).await;
    });
    g.start().await.unwrap();
    g.safe_state().await.unwrap();
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn poll_reports_position_and_alarm_state() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(
            b"?",
            b"<Run|MPos:1.500,2.250,-0.125|Bf:15,128|FS:500,0>\r\n",
        )
        .await;
        fake.send(b"ALARM:1\r\n").await;
        fake.reply(b"?", b"<Alarm|MPos:1.500,2.250,-0.125|FS:0,0>\r\n")
            .await;
    });
    g.start().await.unwrap();
    let t = g.poll().await.unwrap();
    assert_eq!(t.state, DeviceState::Busy);
    assert_eq!(
        t.values,
        vec![("x_mm", 1.5), ("y_mm", 2.25), ("z_mm", -0.125)]
    );
    let t = g.poll().await.unwrap();
    match t.state {
        DeviceState::Alarm(text) => assert!(
            text.contains("ALARM:1") && text.contains("Hard limit"),
            "{text}"
        ),
        other => panic!("expected an alarm state, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_disconnect_is_reported_and_start_reconnects() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"?").await;
        drop(fake);
        started(&mut device).await
    });
    g.start().await.unwrap();
    let err = g.poll().await.unwrap_err();
    assert!(err.is_connection_lost(), "{err}");
    g.start().await.unwrap();
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn commands_for_other_instruments_are_refused_without_io() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect_silence(Duration::from_secs(5)).await;
    });
    g.start().await.unwrap();
    let err = g.execute(&DeviceCommand::Zero).await.unwrap_err();
    assert!(matches!(err, DriverError::WrongKind { .. }), "{err}");
    let nan = DeviceCommand::MoveTo {
        x_mm: f64::NAN,
        y_mm: 0.0,
        z_mm: 0.0,
        feed_mm_per_min: 100.0,
    };
    let err = g.execute(&nan).await.unwrap_err();
    assert!(matches!(err, DriverError::InvalidCommand { .. }), "{err}");
    dev.await.unwrap();
}
