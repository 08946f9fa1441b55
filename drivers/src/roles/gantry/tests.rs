//! The gantry driver against a scripted GRBL 1.1. Replies are quoted from the "Grbl v1.1 Interface" and
//! "Grbl v1.1 Commands" documents.

use super::*;
use crate::error::PortError;
use crate::port::PortConfig;
use crate::testing::{Fake, memory_port};
use labctl_transport::{LineTiming, MemoryDevice};

const BUILD_INFO: &[u8] = b"[VER:1.1h.20190825:]\r\n[OPT:V,15,128]\r\nok\r\n";
/// Part of a `$$` listing as the "Grbl v1.1 Configuration" document prints it, with this machine's max
/// rates (`$110-$112`, mm/min) and travel (`$130-$132`, mm).
const SETTINGS: &[u8] = b"$0=10\r\n$1=25\r\n$13=0\r\n$20=0\r\n$21=0\r\n$22=1\r\n$100=250.000\r\n\
$101=250.000\r\n$102=250.000\r\n$110=5000.000\r\n$111=5000.000\r\n$112=500.000\r\n$120=10.000\r\n\
$121=10.000\r\n$122=10.000\r\n$130=300.000\r\n$131=200.000\r\n$132=50.000\r\nok\r\n";

fn gantry() -> (GrblGantry, MemoryDevice) {
    let (port, device) = memory_port(Some(LineTiming::n81(115_200)), PortConfig::default());
    (
        GrblGantry::new("gantry", port, GantryOptions::default()),
        device,
    )
}

/// Accepts the connection and answers `$I` like GRBL 1.1h, and `$$` twice (the driver reads its limits
/// until two listings agree).
async fn started(device: &mut MemoryDevice) -> Fake {
    let mut fake = Fake::accept(device).await;
    fake.reply(b"$I\n", BUILD_INFO).await;
    fake.reply(b"$$\n", SETTINGS).await;
    fake.reply(b"$$\n", SETTINGS).await;
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
        fake.reply(b"$$\n", SETTINGS).await;
        fake.reply(b"$$\n", SETTINGS).await;
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
            b"\x00\xff#\r\n<Run|MPos:0.714,1.429,0.393|FS:1000,0>\r\n",
        )
        .await;
        // 22.9 mm at 1000 mm/min take 1.4 s: 1.6 mm per poll.
        for i in 2..14 {
            let f = f64::from(i) / 14.0;
            let report = format!(
                "<Run|MPos:{:.3},{:.3},{:.3}|FS:1000,0>\r\n",
                10.0 * f,
                20.0 * f,
                5.5 * f
            );
            fake.reply(b"?", report.as_bytes()).await;
        }
        // Idle with a digit of Y lost on the line: 18.6 mm back in one poll is faster than $111 allows,
        // so it is asked again at once, never taken for "idle elsewhere" or for arrived.
        fake.reply(b"?", &idle_at("10.000", "2.000", "5.500")).await;
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
            b"ALARM:2\r\n[MSG:Reset to continue]\r\n<Alarm|MPos:0.700,1.400,0.350|FS:0,0>\r\n",
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
        fake.reply(b"?", b"<Alarm|MPos:0.000,0.000,0.000|FS:0,0>\r\n")
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
        fake.reply(b"?", &idle_at("0.000", "0.000", "0.000")).await;
        fake.expect(b"$H\n").await;
        // GRBL answers only when the cycle has finished, far beyond a line's budget.
        tokio::time::sleep(Duration::from_secs(20)).await;
        fake.send(b"ok\r\n").await;
        fake.reply(b"?", &idle_at("0.000", "0.000", "0.000")).await;
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

// ----- physically implausible status reports (GRBL has no checksum) -----

/// Runs `script` as the device after a normal start, while `host` drives the gantry; then the device
/// expects silence (nothing asked beyond the script).
async fn scripted<T>(
    script: impl AsyncFnOnce(&mut Fake),
    host: impl AsyncFnOnce(&mut GrblGantry) -> T,
) -> T {
    let (mut g, mut device) = gantry();
    let dev = async move {
        let mut fake = started(&mut device).await;
        script(&mut fake).await;
        fake.expect_silence(Duration::from_secs(1)).await;
    };
    let host = async {
        g.start().await.unwrap();
        host(&mut g).await
    };
    let ((), out) = tokio::join!(dev, host);
    out
}

fn position(t: &Telemetry) -> Vec<f64> {
    t.values.iter().map(|(_, v)| *v).collect()
}

fn damaged_reason(e: &DriverError) -> &str {
    match e {
        DriverError::DamagedReply { reason, .. } => reason,
        other => panic!("expected a damaged reply, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn start_reads_max_rates_and_travel_from_settings() {
    let limits = scripted(async |_| {}, async |g| g.limits).await;
    assert_eq!(
        limits,
        Some(GantryLimits {
            max_rate_mm_per_min: [5000.0, 5000.0, 500.0],
            max_travel_mm: [300.0, 200.0, 50.0],
        })
    );
}

#[tokio::test(start_paused = true)]
async fn settings_are_read_until_two_listings_agree() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"$I\n", BUILD_INFO).await;
        // A digit of $110 lost on the line: 500.000 instead of 5000.000.
        let damaged = String::from_utf8_lossy(SETTINGS).replace("$110=5000.000", "$110=500.000");
        fake.reply(b"$$\n", damaged.as_bytes()).await;
        fake.reply(b"$$\n", SETTINGS).await;
        fake.reply(b"$$\n", SETTINGS).await;
        fake.expect_silence(Duration::from_secs(1)).await;
    });
    g.start().await.unwrap();
    assert_eq!(
        g.limits.map(|l| l.max_rate_mm_per_min),
        Some([5000.0, 5000.0, 500.0])
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_controller_reporting_inches_is_refused() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"$I\n", BUILD_INFO).await;
        let inches = String::from_utf8_lossy(SETTINGS).replace("$13=0", "$13=1");
        fake.reply(b"$$\n", inches.as_bytes()).await;
    });
    match g.start().await {
        Err(DriverError::Unsupported { what, found, .. }) => {
            assert_eq!(what, "report units");
            assert_eq!(found, "inches ($13=1)");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_idle_report_that_lost_a_digit_is_refused_and_asked_again() {
    let seen = scripted(
        async |fake| {
            fake.reply(b"?", &idle_at("40.000", "20.000", "10.000"))
                .await;
            // Y lost its leading 2: still three decimals, only physics can tell.
            fake.reply(b"?", &idle_at("40.000", "0.000", "10.000"))
                .await;
            fake.reply(b"?", &idle_at("40.000", "20.000", "10.000"))
                .await;
        },
        async |g| {
            let first = position(&g.poll().await.unwrap());
            let second = position(&g.poll().await.unwrap());
            (first, second)
        },
    )
    .await;
    assert_eq!(seen.0, vec![40.0, 20.0, 10.0]);
    assert_eq!(seen.1, vec![40.0, 20.0, 10.0]);
}

#[tokio::test(start_paused = true)]
async fn a_report_damaged_twice_is_a_typed_error_not_a_position() {
    let err = scripted(
        async |fake| {
            fake.reply(b"?", &idle_at("40.000", "20.000", "10.000"))
                .await;
            fake.reply(b"?", &idle_at("4.000", "20.000", "10.000"))
                .await;
            // Another damage on the second try: a digit after the point lost.
            fake.reply(b"?", &idle_at("40.000", "20.00", "10.000"))
                .await;
        },
        async |g| {
            g.poll().await.unwrap();
            g.poll().await.unwrap_err()
        },
    )
    .await;
    assert!(
        damaged_reason(&err).contains("Y \"20.00\" has 2 decimals"),
        "{err}"
    );
    assert!(!err.is_connection_lost());
}

#[tokio::test(start_paused = true)]
async fn decimals_are_learned_and_held() {
    let err = scripted(
        async |fake| {
            fake.reply(b"?", &idle_at("40.000", "20.000", "10.000"))
                .await;
            fake.reply(b"?", &idle_at("40.000", "20.000", "10.000"))
                .await;
            // Every axis lost its last digit alike: consistent within the line, not with the machine.
            fake.reply(b"?", &idle_at("40.00", "20.00", "10.00")).await;
            fake.reply(b"?", &idle_at("40.00", "20.00", "10.00")).await;
        },
        async |g| {
            g.poll().await.unwrap();
            g.poll().await.unwrap();
            g.poll().await.unwrap_err()
        },
    )
    .await;
    assert!(
        damaged_reason(&err).contains("2 decimals where this controller prints 3"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_position_beyond_the_travel_is_refused() {
    let err = scripted(
        async |fake| {
            // No baseline yet: only the travel ($130=300) can tell 4000.000 (a lost point) is wrong.
            fake.reply(b"?", &idle_at("4000.000", "20.000", "10.000"))
                .await;
            fake.reply(b"?", &idle_at("4000.000", "20.000", "10.000"))
                .await;
        },
        async |g| g.poll().await.unwrap_err(),
    )
    .await;
    assert!(
        damaged_reason(&err).contains("machine X 4000 is beyond the axis travel of 300 mm"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_jump_faster_than_the_max_rate_is_refused_while_running() {
    let seen = scripted(
        async |fake| {
            fake.reply(b"?", b"<Run|MPos:100.000,20.000,10.000|FS:3000,0>\r\n")
                .await;
            // 90 mm in 100 ms: $110 is 5000 mm/min, 8.3 mm per 100 ms.
            fake.reply(b"?", b"<Run|MPos:10.000,20.000,10.000|FS:3000,0>\r\n")
                .await;
            fake.reply(b"?", b"<Run|MPos:100.500,20.000,10.000|FS:3000,0>\r\n")
                .await;
            // 1.1 s later, 89.5 mm further on is possible (5000 mm/min is 83 mm/s).
            fake.reply(b"?", b"<Run|MPos:190.000,20.000,10.000|FS:3000,0>\r\n")
                .await;
        },
        async |g| {
            let mut seen = vec![position(&g.poll().await.unwrap())[0]];
            // Polled every 100 ms, as during a move.
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen.push(position(&g.poll().await.unwrap())[0]);
            tokio::time::sleep(Duration::from_millis(1100)).await;
            seen.push(position(&g.poll().await.unwrap())[0]);
            seen
        },
    )
    .await;
    assert_eq!(seen, vec![100.0, 100.5, 190.0]);
}

#[tokio::test(start_paused = true)]
async fn a_real_jump_is_accepted_once_a_second_report_confirms_it() {
    // Something else moved an idle machine (or the report before was the damaged one): two reports in a
    // row that agree are believed.
    let seen = scripted(
        async |fake| {
            fake.reply(b"?", &idle_at("40.000", "20.000", "10.000"))
                .await;
            fake.reply(b"?", &idle_at("60.000", "20.000", "10.000"))
                .await;
            fake.reply(b"?", &idle_at("60.000", "20.000", "10.000"))
                .await;
        },
        async |g| {
            g.poll().await.unwrap();
            position(&g.poll().await.unwrap())
        },
    )
    .await;
    assert_eq!(seen, vec![60.0, 20.0, 10.0]);
}

#[tokio::test(start_paused = true)]
async fn homing_after_a_reconnect_into_an_alarm_resets_first() {
    // A fresh driver (a reconnect) knows no ALARM:N: the machine may be waiting for a reset after a limit
    // (`[MSG:Reset to continue]`), where `$H` alone is never answered.
    scripted(
        async |fake| {
            fake.reply(b"?", b"<Alarm|MPos:0.000,0.000,0.000|FS:0,0>\r\n")
                .await;
            fake.reply(
                b"\x18",
                b"\r\nGrbl 1.1h ['$' for help]\r\n[MSG:'$H'|'$X' to unlock]\r\n",
            )
            .await;
            fake.reply(b"$H\n", b"ok\r\n").await;
            // Homing set the machine position: no jump check against the report before it.
            fake.reply(b"?", &idle_at("300.000", "200.000", "50.000"))
                .await;
        },
        async |g| {
            assert_eq!(
                g.execute(&DeviceCommand::Home).await.unwrap(),
                Outcome::Done
            );
            assert_eq!(position(&g.poll().await.unwrap()), vec![300.0, 200.0, 50.0]);
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn start_after_a_reconnect_into_a_critical_alarm_resets_then_identifies() {
    // The machine hit a limit while another connection drove it: it answers nothing but real-time bytes
    // until ctrl-x, so `$I` is met with silence; `?` tells why.
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.expect(b"$I\n").await;
        fake.expect(b"$I\n").await;
        fake.reply(b"?", b"<Alarm|MPos:300.000,20.000,10.000|FS:0,0>\r\n")
            .await;
        fake.reply(
            b"\x18",
            b"\r\nGrbl 1.1h ['$' for help]\r\n[MSG:'$H'|'$X' to unlock]\r\n",
        )
        .await;
        fake.reply(b"$I\n", BUILD_INFO).await;
        fake.reply(b"$$\n", SETTINGS).await;
        fake.reply(b"$$\n", SETTINGS).await;
        // Still locked after the reset: homing required, and homing resets it once more first.
        fake.reply(b"?", b"<Alarm|MPos:300.000,20.000,10.000|FS:0,0>\r\n")
            .await;
        fake.reply(b"?", b"<Alarm|MPos:300.000,20.000,10.000|FS:0,0>\r\n")
            .await;
        fake.reply(
            b"\x18",
            b"\r\nGrbl 1.1h ['$' for help]\r\n[MSG:'$H'|'$X' to unlock]\r\n",
        )
        .await;
        fake.reply(b"$H\n", b"ok\r\n").await;
        fake.expect_silence(Duration::from_secs(1)).await;
    });
    assert_eq!(g.start().await.unwrap().firmware, "Grbl 1.1h.20190825");
    let t = g.poll().await.unwrap();
    assert_eq!(
        t.state,
        DeviceState::Locked("homing required ($H) after power-up".into())
    );
    assert_eq!(
        g.execute(&DeviceCommand::Home).await.unwrap(),
        Outcome::Done
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_controller_that_is_not_in_alarm_fails_start_with_the_timeout() {
    let (mut g, mut device) = gantry();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.expect(b"$I\n").await;
        fake.expect(b"$I\n").await;
        fake.reply(b"?", &idle_at("0.000", "0.000", "0.000")).await;
        fake.expect_silence(Duration::from_secs(1)).await;
    });
    let err = g.start().await.unwrap_err();
    assert!(
        matches!(err, DriverError::Port(PortError::Timeout { .. })),
        "{err}"
    );
    dev.await.unwrap();
}
