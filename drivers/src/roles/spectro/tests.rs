//! The spectrophotometer driver against a scripted SCPI instrument (IEEE 488.2 common commands, SCPI-99
//! `SYSTem:ERRor?` entries such as `-222,"Data out of range"`).

use super::*;
use crate::port::PortConfig;
use crate::testing::{Fake, memory_port};
use labctl_transport::{Endpoint, MemoryDevice};

const IDN: &[u8] = b"Labctl Instruments,UV-1 Sim,SN000123,1.4.2\n";

fn spectro() -> (ScpiSpectro, MemoryDevice) {
    // A TCP socket: no baud, so only the processing time counts.
    let (port, device) = memory_port(None, PortConfig::default());
    (ScpiSpectro::new("spectro", port), device)
}

async fn started(device: &mut MemoryDevice) -> Fake {
    let mut fake = Fake::accept(device).await;
    fake.reply(b"*IDN?\n", IDN).await;
    fake.expect(b"*CLS\n").await;
    fake.expect(b"*RST\n").await;
    fake.reply(b"SYST:ERR?\n", b"0,\"No error\"\n").await;
    fake
}

#[tokio::test(start_paused = true)]
async fn start_identifies_clears_resets_and_checks_the_error_queue() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move { started(&mut device).await });
    let id = s.start().await.unwrap();
    assert_eq!(
        id,
        Identity {
            manufacturer: "Labctl Instruments".into(),
            model: "UV-1 Sim".into(),
            serial: "SN000123".into(),
            firmware: "1.4.2".into(),
        }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_reset_is_reported_from_the_error_queue() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"*IDN?\n", IDN).await;
        fake.expect(b"*CLS\n*RST\n").await;
        fake.reply(b"SYST:ERR?\n", b"-240,\"Hardware error;lamp failed\"\n")
            .await;
        fake.reply(b"SYST:ERR?\n", b"0,\"No error\"\n").await;
    });
    match s.start().await {
        Err(DriverError::Device { code, message, .. }) => {
            assert_eq!(code, "-240");
            assert_eq!(message, "Hardware error;lamp failed");
        }
        other => panic!("expected the -240 error, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn spectrum_pairs_each_absorbance_with_its_wavelength() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        // A stray line that is not a spectrum is not the answer.
        fake.reply(
            b"MEAS:SPEC? 400,420,10\n",
            b"garbage\n0.1234,0.2345,0.3456\n",
        )
        .await;
    });
    s.start().await.unwrap();
    let cmd = DeviceCommand::Spectrum {
        start_nm: 400.0,
        stop_nm: 420.0,
        step_nm: 10.0,
    };
    assert_eq!(
        s.execute(&cmd).await.unwrap(),
        Outcome::Spectrum {
            wavelengths_nm: vec![400.0, 410.0, 420.0],
            absorbance: vec![0.1234, 0.2345, 0.3456]
        }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_spectrum_with_the_wrong_number_of_points_is_refused() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"MEAS:SPEC? 400,420,10\n", b"0.1234,0.2345\n")
            .await;
    });
    s.start().await.unwrap();
    let cmd = DeviceCommand::Spectrum {
        start_nm: 400.0,
        stop_nm: 420.0,
        step_nm: 10.0,
    };
    let err = s.execute(&cmd).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::UnexpectedReply { reply, .. } if reply.contains("2 values for 3")),
        "{err}"
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_query_the_instrument_refuses_is_explained_by_syst_err() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        // A bad query gets no answer at all; the error waits in the queue.
        fake.expect(b"MEAS:ABS? 900\n").await;
        fake.reply(
            b"SYST:ERR?\n",
            b"-222,\"Data out of range;wavelength 900 nm outside 380-780 nm\"\n",
        )
        .await;
        fake.reply(b"SYST:ERR?\n", b"0,\"No error\"\n").await;
        fake.expect_silence(Duration::from_secs(30)).await;
    });
    s.start().await.unwrap();
    match s
        .execute(&DeviceCommand::Absorbance {
            wavelength_nm: 900.0,
        })
        .await
    {
        Err(DriverError::Device { code, message, .. }) => {
            assert_eq!(code, "-222");
            assert!(message.starts_with("Data out of range"), "{message}");
        }
        other => panic!("expected -222, got {other:?}"),
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_with_an_empty_error_queue_is_asked_again() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"MEAS:ABS? 520.5\n").await;
        fake.reply(b"SYST:ERR?\n", b"0,\"No error\"\n").await;
        fake.reply(b"MEAS:ABS? 520.5\n", b"1.2345\n").await;
    });
    s.start().await.unwrap();
    let got = s
        .execute(&DeviceCommand::Absorbance {
            wavelength_nm: 520.5,
        })
        .await
        .unwrap();
    assert_eq!(
        got,
        Outcome::Absorbance {
            wavelength_nm: 520.5,
            absorbance: 1.2345
        }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_implausible_absorbance_is_asked_again_and_never_returned() {
    // A decimal point lost on the line turns 2.4967 into 24967: no spectrometer reads that.
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"MEAS:ABS? 520\n", b"24967\n").await;
        fake.reply(b"MEAS:ABS? 520\n", b"2.4967\n").await;
        fake.reply(b"MEAS:ABS? 520\n", b"24967\n").await;
        fake.reply(b"MEAS:ABS? 520\n", b"-24.967\n").await;
        fake.reply(b"MEAS:SPEC? 400,410,10\n", b"0.1234,12345\n")
            .await;
        fake.reply(b"MEAS:SPEC? 400,410,10\n", b"0.1234,1.2345\n")
            .await;
    });
    s.start().await.unwrap();
    let cmd = DeviceCommand::Absorbance {
        wavelength_nm: 520.0,
    };
    assert_eq!(
        s.execute(&cmd).await.unwrap(),
        Outcome::Absorbance {
            wavelength_nm: 520.0,
            absorbance: 2.4967
        }
    );
    match s.execute(&cmd).await {
        Err(DriverError::UnexpectedReply { reply, .. }) => {
            assert!(reply.contains("24.967"), "{reply}")
        }
        other => panic!("two implausible replies must fail: {other:?}"),
    }
    let spectrum = s
        .execute(&DeviceCommand::Spectrum {
            start_nm: 400.0,
            stop_nm: 410.0,
            step_nm: 10.0,
        })
        .await
        .unwrap();
    assert_eq!(
        spectrum,
        Outcome::Spectrum {
            wavelengths_nm: vec![400.0, 410.0],
            absorbance: vec![0.1234, 1.2345]
        }
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn poll_and_safe_state_and_impossible_scans() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"*OPC?\n", b"1\n").await;
        fake.expect_silence(Duration::from_secs(5)).await;
    });
    s.start().await.unwrap();
    assert_eq!(s.poll().await.unwrap().state, DeviceState::Idle);
    s.safe_state().await.unwrap();
    for step_nm in [0.0, -1.0, 0.1, f64::NAN] {
        let cmd = DeviceCommand::Spectrum {
            start_nm: 380.0,
            stop_nm: 780.0,
            step_nm,
        };
        let err = s.execute(&cmd).await.unwrap_err();
        assert!(
            matches!(err, DriverError::InvalidCommand { .. }),
            "step {step_nm}: {err}"
        );
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_closed_socket_is_a_lost_connection() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.expect(b"*OPC?\n").await;
    });
    s.start().await.unwrap();
    let err = s.poll().await.unwrap_err();
    dev.await.unwrap();
    assert!(err.is_connection_lost(), "{err}");
}

#[tokio::test]
async fn works_over_a_real_tcp_socket() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let dev = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            let reply: &[u8] = match line.as_str() {
                "*IDN?" => IDN,
                "SYST:ERR?" => b"0,\"No error\"\n",
                "MEAS:ABS? 430" => b"0.5000\n",
                _ => b"",
            };
            write.write_all(reply).await.unwrap();
            seen.push(line);
        }
        seen
    });
    let port = PortHandle::new(Endpoint::Tcp { address }, PortConfig::default());
    let mut s = ScpiSpectro::new("spectro", port);
    s.start().await.unwrap();
    let got = s
        .execute(&DeviceCommand::Absorbance {
            wavelength_nm: 430.0,
        })
        .await
        .unwrap();
    assert_eq!(
        got,
        Outcome::Absorbance {
            wavelength_nm: 430.0,
            absorbance: 0.5
        }
    );
    s.stop().await;
    assert_eq!(
        dev.await.unwrap(),
        ["*IDN?", "*CLS", "*RST", "SYST:ERR?", "MEAS:ABS? 430"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_reading_that_lost_a_digit_is_asked_again() {
    let (mut s, mut device) = spectro();
    let dev = tokio::spawn(async move {
        let mut fake = started(&mut device).await;
        fake.reply(b"MEAS:ABS? 520\n", b"0.4321\n").await;
        fake.reply(b"MEAS:ABS? 520\n", b"0.4322\n").await;
        // `0.4323` with its last digit dropped: plausible, but not at the instrument's resolution.
        fake.reply(b"MEAS:ABS? 520\n", b"0.432\n").await;
        fake.reply(b"MEAS:ABS? 520\n", b"0.4323\n").await;
        // A spectrum whose second value lost its leading zero.
        fake.reply(b"MEAS:SPEC? 400,410,10\n", b"0.1234,.2345\n")
            .await;
        fake.reply(b"MEAS:SPEC? 400,410,10\n", b"0.1234,0.2345\n")
            .await;
    });
    s.start().await.unwrap();
    let cmd = DeviceCommand::Absorbance {
        wavelength_nm: 520.0,
    };
    let read = |o: Outcome| match o {
        Outcome::Absorbance { absorbance, .. } => absorbance,
        other => panic!("expected an absorbance, got {other:?}"),
    };
    assert_eq!(read(s.execute(&cmd).await.unwrap()), 0.4321);
    assert_eq!(read(s.execute(&cmd).await.unwrap()), 0.4322);
    assert_eq!(read(s.execute(&cmd).await.unwrap()), 0.4323);
    let spectrum = s
        .execute(&DeviceCommand::Spectrum {
            start_nm: 400.0,
            stop_nm: 410.0,
            step_nm: 10.0,
        })
        .await
        .unwrap();
    assert_eq!(
        spectrum,
        Outcome::Spectrum {
            wavelengths_nm: vec![400.0, 410.0],
            absorbance: vec![0.1234, 0.2345]
        }
    );
    dev.await.unwrap();
}
