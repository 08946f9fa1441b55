//! The balance driver against a scripted MT-SICS balance. Replies are quoted from the MT-SICS reference
//! manual (level 0/1 commands `I2`, `I3`, `I4`, `S`, `SI`, `Z`, `T` and the `ES`/`ET`/`EL` errors).

use super::*;
use crate::error::PortError;
use crate::port::PortConfig;
use crate::testing::{Fake, memory_port};
use labctl_transport::{LineTiming, MemoryDevice};

fn balance() -> (MtSicsBalance, MemoryDevice) {
    let (port, device) = memory_port(Some(LineTiming::n81(9600)), PortConfig::default());
    (MtSicsBalance::new("balance", port), device)
}

async fn started(device: &mut MemoryDevice) -> Fake {
    let mut fake = Fake::accept(device).await;
    fake.reply(b"I2\r\n", b"I2 A \"XS204 Excellence 220.0090 g\"\r\n")
        .await;
    fake.reply(b"I3\r\n", b"I3 A \"2.10 10.28.0.493.142\"\r\n")
        .await;
    fake.reply(b"I4\r\n", b"I4 A \"B021002593\"\r\n").await;
    fake
}

#[tokio::test(start_paused = true)]
async fn start_reads_type_software_and_serial() {
    let (mut b, mut device) = balance();
    let dev = tokio::spawn(async move { started(&mut device).await });
    let id = b.start().await.unwrap();
    assert_eq!(
        id,
        Identity {
            manufacturer: "Mettler Toledo".into(),
            model: "XS204 Excellence".into(),
            serial: "B021002593".into(),
            firmware: "2.10 10.28.0.493.142".into(),
        }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn stable_and_immediate_weights() {
    let (mut b, mut device) = balance();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        // A stale zero acknowledgement and garbage come first; neither answers `S`.
        fake.reply(b"S\r\n", b"Z A\r\n\x00\xff%%\r\nS S     100.00 g\r\n")
            .await;
        fake.reply(b"SI\r\n", b"S D    1234.5 mg\r\n").await;
    });
    b.start().await.unwrap();
    let stable = b
        .execute(&DeviceCommand::Weigh { stable: true })
        .await
        .unwrap();
    assert_eq!(
        stable,
        Outcome::Mass {
            mass_g: 100.0,
            stable: true
        }
    );
    match b
        .execute(&DeviceCommand::Weigh { stable: false })
        .await
        .unwrap()
    {
        Outcome::Mass { mass_g, stable } => {
            assert!((mass_g - 1.2345).abs() < 1e-12, "{mass_g}");
            assert!(!stable);
        }
        other => panic!("expected a mass, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn overload_underload_and_no_stable_weight_are_typed_device_errors() {
    let (mut b, mut device) = balance();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"S\r\n", b"S +\r\n").await;
        fake.reply(b"S\r\n", b"S -\r\n").await;
        fake.reply(b"S\r\n", b"S I\r\n").await;
    });
    b.start().await.unwrap();
    for (code, text) in [
        ("S +", "overload"),
        ("S -", "underload"),
        ("S I", "not executable"),
    ] {
        match b.execute(&DeviceCommand::Weigh { stable: true }).await {
            Err(DriverError::Device {
                code: c, message, ..
            }) => {
                assert_eq!(c, code);
                assert!(message.starts_with(text), "{message}");
            }
            other => panic!("expected {code}, got {other:?}"),
        }
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn zero_and_tare_and_the_error_replies() {
    let (mut b, mut device) = balance();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"Z\r\n", b"Z A\r\n").await;
        fake.reply(b"T\r\n", b"T S      10.00 g\r\n").await;
        fake.reply(b"T\r\n", b"EL\r\n").await;
        fake.reply(b"Z\r\n", b"ES\r\n").await;
        fake.reply(b"Z\r\n", b"Z +\r\n").await;
    });
    b.start().await.unwrap();
    assert_eq!(
        b.execute(&DeviceCommand::Zero).await.unwrap(),
        Outcome::Done
    );
    assert_eq!(
        b.execute(&DeviceCommand::Tare).await.unwrap(),
        Outcome::Done
    );
    for (cmd, want) in [
        (DeviceCommand::Tare, "EL"),
        (DeviceCommand::Zero, "ES"),
        (DeviceCommand::Zero, "Z +"),
    ] {
        match b.execute(&cmd).await {
            Err(DriverError::Device { code, .. }) => assert_eq!(code, want),
            other => panic!("expected {want}, got {other:?}"),
        }
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_zero_reply_is_not_repeated_but_a_weight_query_is() {
    let (mut b, mut device) = balance();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"Z\r\n").await;
        // The next bytes after the timeout are the weight query, not a second zero.
        fake.reply(b"SI\r\n", b"S S      0.00 g\r\n").await;
    });
    b.start().await.unwrap();
    let err = b.execute(&DeviceCommand::Zero).await.unwrap_err();
    match err {
        // The budget is the balance's own stability wait plus 3 + 64 characters of 10 bits at 9600 baud.
        DriverError::Port(PortError::Timeout { timeout, .. }) => {
            assert_eq!(timeout, Duration::from_micros(30_069_792));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let weight = b
        .execute(&DeviceCommand::Weigh { stable: false })
        .await
        .unwrap();
    assert_eq!(
        weight,
        Outcome::Mass {
            mass_g: 0.0,
            stable: true
        }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn poll_reports_mass_and_overload_as_a_state() {
    let (mut b, mut device) = balance();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"SI\r\n", b"S D      5.25 g\r\n").await;
        fake.reply(b"SI\r\n", b"S +\r\n").await;
        fake.expect_silence(Duration::from_secs(5)).await;
    });
    b.start().await.unwrap();
    let t = b.poll().await.unwrap();
    assert_eq!(t.values, vec![("mass_g", 5.25)]);
    let t = b.poll().await.unwrap();
    assert!(
        matches!(&t.state, DeviceState::Alarm(s) if s.starts_with("overload")),
        "{t:?}"
    );
    // Nothing to make safe on a balance: no bytes go out.
    b.safe_state().await.unwrap();
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_balance_that_hangs_up_is_lost() {
    let (mut b, mut device) = balance();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"S\r\n").await;
    });
    b.start().await.unwrap();
    let err = b
        .execute(&DeviceCommand::Weigh { stable: true })
        .await
        .unwrap_err();
    dev.await.unwrap();
    assert!(err.is_connection_lost(), "{err}");
    let err = b.execute(&DeviceCommand::Tare).await.unwrap_err();
    assert!(err.is_connection_lost(), "{err}");
}

#[test]
fn model_is_the_type_without_capacity_and_unit() {
    assert_eq!(model_of("XS204 Excellence 220.0090 g"), "XS204 Excellence");
    assert_eq!(model_of("WKC204C"), "WKC204C");
    assert_eq!(model_of("220.0 g"), "220.0 g");
}

#[tokio::test(start_paused = true)]
async fn a_weight_line_that_lost_a_byte_is_refused_as_damaged() {
    let (mut b, mut device) = balance();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"S\r\n", b"S S     100.00 g\r\n").await;
        fake.reply(b"S\r\n", b"S S     100.01 g\r\n").await;
        // `100.00` with its first `0` dropped on the line reads as a plausible 10 g.
        fake.reply(b"S\r\n", b"S S     10.00 g\r\n").await;
        fake.reply(b"S\r\n", b"S S     100.02 g\r\n").await;
    });
    b.start().await.unwrap();
    let weigh = DeviceCommand::Weigh { stable: true };
    b.execute(&weigh).await.unwrap();
    b.execute(&weigh).await.unwrap();
    let err = b.execute(&weigh).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::DamagedReply { reason, .. } if reason.contains("10 characters wide where this balance prints 11")),
        "{err}"
    );
    assert_eq!(
        b.execute(&weigh).await.unwrap(),
        Outcome::Mass {
            mass_g: 100.02,
            stable: true
        }
    );
    dev.await.unwrap();
}
