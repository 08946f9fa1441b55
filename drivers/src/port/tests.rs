use std::sync::atomic::Ordering;
use tokio::io::AsyncReadExt as _;

use super::*;
use crate::testing::{Fake, memory_port};

/// A toy addressed protocol: requests `Q<addr>\n`, replies `R<addr>:<data>\n`.
fn addressed(addr: u8) -> impl FnMut(&[u8]) -> Verdict + Send + 'static {
    move |frame| {
        if frame.starts_with(format!("R{addr}:").as_bytes()) {
            Verdict::Last
        } else {
            Verdict::Unrelated
        }
    }
}

fn query(addr: u8) -> Transaction {
    Transaction::new(
        format!("Q{addr}\n").into_bytes(),
        frame_line,
        addressed(addr),
    )
}

async fn opened() -> (PortHandle, labctl_transport::MemoryDevice) {
    let (port, device) = memory_port(None, PortConfig::default());
    (port, device)
}

#[tokio::test(start_paused = true)]
async fn matching_frame_is_returned_and_the_rest_published() {
    let (port, mut device) = opened().await;
    let mut unsolicited = port.subscribe();
    port.acquire().await.unwrap();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.expect(b"Q1\n").await;
        fake.send(b"<Idle|MPos:0.000,0.000,0.000>\r\nR2:other\r\nR1:42\r\n")
            .await;
        fake
    });
    let frames = port.transact(query(1)).await.unwrap();
    assert_eq!(frames, vec![b"R1:42\r\n".to_vec()]);
    assert_eq!(
        unsolicited.recv().await.unwrap(),
        b"<Idle|MPos:0.000,0.000,0.000>\r\n".to_vec()
    );
    assert_eq!(unsolicited.recv().await.unwrap(), b"R2:other\r\n".to_vec());
    assert_eq!(port.stats().unrelated_frames.load(Ordering::Relaxed), 2);
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn several_frames_make_one_answer() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"$I\n", b"[VER:1.1h.20190825:]\r\n[OPT:V,15,128]\r\nok\r\n")
            .await;
        fake
    });
    let t = Transaction::new(b"$I\n".to_vec(), frame_line, |f: &[u8]| {
        if f.starts_with(b"ok") {
            Verdict::Last
        } else {
            Verdict::Part
        }
    })
    .frames(3);
    let frames = port.transact(t).await.unwrap();
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[2], b"ok\r\n".to_vec());
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_command_without_reply_only_writes() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.expect(b"STOP_1\r\n").await;
        fake.reply(b"Q1\n", b"R1:x\n").await;
    });
    let frames = port
        .transact(Transaction::no_reply(b"STOP_1\r\n".to_vec(), frame_line))
        .await
        .unwrap();
    assert!(frames.is_empty());
    assert_eq!(
        port.transact(query(1)).await.unwrap(),
        vec![b"R1:x\n".to_vec()]
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_late_reply_is_never_taken_for_the_next_answer() {
    let (port, mut device) = opened().await;
    let mut unsolicited = port.subscribe();
    port.acquire().await.unwrap();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.expect(b"Q1\n").await;
        // Answers after the host gave up, right when the next request would go out.
        tokio::time::sleep(Duration::from_millis(1050)).await;
        fake.send(b"R1:late\n").await;
        fake.reply(b"Q1\n", b"R1:fresh\n").await;
    });
    let t = query(1).timeout(Duration::from_secs(1));
    match port.transact(t).await {
        Err(PortError::Timeout { timeout, .. }) => assert_eq!(timeout, Duration::from_secs(1)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Sent at once after the timeout: the port waits for the line to go quiet first.
    let frames = port.transact(query(1)).await.unwrap();
    assert_eq!(frames, vec![b"R1:fresh\n".to_vec()]);
    assert_eq!(unsolicited.recv().await.unwrap(), b"R1:late\n".to_vec());
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn safe_requests_are_retried_after_a_timeout() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.expect(b"Q1\n").await; // lost
        fake.reply(b"Q1\n", b"R1:ok\n").await;
    });
    let frames = port.transact(query(1).retries(1)).await.unwrap();
    assert_eq!(frames, vec![b"R1:ok\n".to_vec()]);
    assert_eq!(port.stats().timeouts.load(Ordering::Relaxed), 1);
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn unsafe_requests_are_sent_once() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.expect(b"Q1\n").await;
        fake.expect_silence(Duration::from_secs(30)).await;
    });
    let err = port.transact(query(1)).await.unwrap_err();
    assert!(matches!(err, PortError::Timeout { .. }), "{err}");
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_device_that_hangs_up_is_disconnected_until_reopened() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let mut fake = Fake::accept(&mut device).await;
    let dev = tokio::spawn(async move {
        fake.expect(b"Q1\n").await;
        drop(fake);
    });
    let err = port.transact(query(1)).await.unwrap_err();
    assert!(matches!(err, PortError::Disconnected { .. }), "{err}");
    dev.await.unwrap();
    assert!(!port.is_open());
    let err = port.transact(query(1)).await.unwrap_err();
    assert!(
        matches!(err, PortError::Disconnected { .. }),
        "after the end: {err}"
    );

    port.ensure_open().await.unwrap();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.reply(b"Q1\n", b"R1:back\n").await;
    });
    assert_eq!(
        port.transact(query(1)).await.unwrap(),
        vec![b"R1:back\n".to_vec()]
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_hang_up_while_idle_ends_the_task() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    drop(Fake::accept(&mut device).await);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!port.is_open());
    let err = port.transact(query(1)).await.unwrap_err();
    assert!(matches!(err, PortError::Disconnected { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn endless_garbage_costs_bounded_memory() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        fake.expect(b"Q1\n").await;
        let junk = vec![b'x'; 1000];
        for _ in 0..100 {
            fake.send(&junk).await;
        }
        fake.send(b"\nR1:ok\n").await;
    });
    let frames = port
        .transact(query(1).timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(frames, vec![b"R1:ok\n".to_vec()]);
    let peak = port.stats().peak_buffered.load(Ordering::Relaxed);
    assert!(
        peak <= (MAX_BUFFER + READ_CHUNK) as u64,
        "buffer grew to {peak}"
    );
    // All but the last line's worth of garbage was dropped unread.
    assert!(port.stats().discarded_bytes.load(Ordering::Relaxed) >= (100_000 - MAX_BUFFER) as u64);
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_partial_frame_before_the_request_is_not_part_of_the_answer() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let mut fake = Fake::accept(&mut device).await;
    fake.send(b"R1:par").await;
    // Let the port task read it while idle.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let dev = tokio::spawn(async move {
        fake.reply(b"Q1\n", b"R1:new\n").await;
    });
    assert_eq!(
        port.transact(query(1)).await.unwrap(),
        vec![b"R1:new\n".to_vec()]
    );
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn users_of_a_shared_line_get_one_transaction_at_a_time() {
    let (port, mut device) = opened().await;
    let handles: Vec<PortHandle> = (0..3).map(|_| port.clone()).collect();
    for h in &handles {
        h.acquire().await.unwrap();
    }
    let dev = tokio::spawn(async move {
        let mut fake = Fake::accept(&mut device).await;
        for _ in 0..3 {
            let line = fake.read_line().await;
            // Nothing else may arrive while this request is pending.
            fake.expect_silence(Duration::from_millis(200)).await;
            let addr = line.get(1).copied().unwrap_or(b'?');
            fake.send(&[b'R', addr, b':', b'o', b'k', b'\n']).await;
        }
    });
    let mut tasks = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let addr = i as u8 + 1;
        tasks.push(tokio::spawn(async move { h.transact(query(addr)).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let frames = t.await.unwrap().unwrap();
        assert_eq!(frames, vec![format!("R{}:ok\n", i + 1).into_bytes()]);
    }
    dev.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_last_user_closes_the_line() {
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    port.acquire().await.unwrap();
    let mut fake = Fake::accept(&mut device).await;
    port.release().await;
    assert!(port.is_open(), "one user is left");
    port.release().await;
    fake.expect_closed().await;
    let err = port.transact(query(1)).await.unwrap_err();
    assert!(matches!(err, PortError::Closed { .. }), "{err}");
}

#[test]
fn budget_counts_both_directions_at_the_line_speed_plus_processing() {
    // 10 + 86 characters of 10 bits at 9600 baud = 100 ms on the wire.
    let t = budget(
        Some(LineTiming::n81(9600)),
        10,
        86,
        Duration::from_millis(50),
    );
    assert_eq!(t, Duration::from_millis(150));
    assert_eq!(
        budget(None, 10, 86, Duration::from_millis(50)),
        Duration::from_millis(50)
    );
}

#[test]
fn printable_escapes_and_truncates() {
    assert_eq!(printable(b"ok\r\n"), "ok\\r\\n");
    assert_eq!(printable(&[0x02, b'0', 0x03]), "\\x020\\x03");
    assert!(printable(&[b'x'; 500]).ends_with("...(500 bytes)"));
}

#[tokio::test]
async fn a_real_pty_whose_device_end_closes_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_serial::SerialPort;
    let (mut master, slave) = tokio_serial::SerialStream::pair().expect("this machine has ptys");
    let path = slave.name().expect("pty slave has a name");
    let line = labctl_protocols::lab::SerialLine {
        port: path,
        baud: 115_200,
        data_bits: 8,
        parity: labctl_protocols::lab::Parity::None,
        stop_bits: 1,
        flow_control: labctl_protocols::lab::FlowControl::None,
    };
    let port = PortHandle::new(Endpoint::Serial(line), PortConfig::default());
    port.acquire().await.unwrap();
    drop(slave);
    let t = query(1).timeout(Duration::from_secs(5));
    let (answer, ()) = tokio::join!(port.transact(t), async {
        let mut buf = [0u8; 3];
        master.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"Q1\n");
        master.write_all(b"R1:pty\n").await.unwrap();
    });
    assert_eq!(answer.unwrap(), vec![b"R1:pty\n".to_vec()]);
    // The simulator unplugs: the slave side reads EOF or EIO, both mean the device is gone.
    drop(master);
    let err = port
        .transact(query(1).timeout(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::Disconnected { .. }), "{err}");
}

/// A port task over a dead in-memory stream, to drive its framing by hand.
fn bare_task() -> PortTask {
    let (host, _device) = tokio::io::duplex(16);
    let (unsolicited, _) = broadcast::channel(4);
    PortTask {
        name: "t".into(),
        stream: Box::new(host),
        buf: Vec::new(),
        framer: frame_line,
        quiet: Duration::from_millis(100),
        max_drain: Duration::from_secs(1),
        unsolicited,
        stats: Arc::new(PortStats::default()),
        stale_since: None,
        last_rx: None,
        state: Arc::new(AtomicU8::new(RUNNING)),
    }
}

/// Framers that lie about lengths must not panic or stall the port.
fn liar_zero(_: &[u8]) -> Result<Option<usize>, DecodeError> {
    Ok(Some(0))
}
fn liar_huge(_: &[u8]) -> Result<Option<usize>, DecodeError> {
    Ok(Some(usize::MAX))
}
fn liar_skip(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    let mut e = DecodeError::new("t", buf, "liar");
    e.skip = if buf.len().is_multiple_of(2) {
        0
    } else {
        usize::MAX
    };
    Err(e)
}

mod framing {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_through_any_framer_never_panic_and_always_drain(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
        ) {
            let framers: [Framer; 6] = [
                frame_line,
                frame_line_or_cr,
                crate::roles::frame_packet,
                liar_zero,
                liar_huge,
                liar_skip,
            ];
            for framer in framers {
                let mut task = bare_task();
                for chunk in &chunks {
                    task.buf.extend_from_slice(chunk);
                    let before = task.buf.len();
                    let mut frames = 0;
                    while let Some(frame) = task.next_frame(framer) {
                        prop_assert!(!frame.is_empty());
                        frames += 1;
                        prop_assert!(frames <= before, "more frames than bytes");
                    }
                    prop_assert!(task.buf.len() <= before);
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_reopen_waits_until_the_last_task_has_let_go_of_the_device() {
    // A serial port is exclusive (TIOCEXCL): the new task may open it only once the old one, still
    // finishing a queued transaction after the last user left, has dropped it.
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let mut old = device.accept().await.unwrap();
    let asked = {
        let port = port.clone();
        tokio::spawn(async move {
            port.transact(query(1).timeout(Duration::from_millis(500)))
                .await
        })
    };
    let mut request = [0u8; 3];
    old.read_exact(&mut request).await.unwrap();
    assert_eq!(&request, b"Q1\n");
    port.release().await;
    assert!(!port.is_open());

    let reopened = {
        let port = port.clone();
        tokio::spawn(async move { port.acquire().await })
    };
    let _new = device.accept().await.unwrap();
    // By the time the new connection exists, the old one is closed: it reads end of file.
    let mut rest = [0u8; 1];
    assert_eq!(
        tokio::time::timeout(Duration::ZERO, old.read(&mut rest))
            .await
            .expect("the old connection must already be closed")
            .unwrap(),
        0
    );
    reopened.await.unwrap().unwrap();
    let err = asked.await.unwrap().unwrap_err();
    assert!(matches!(err, PortError::Timeout { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_last_release_returns_once_the_device_is_let_go() {
    // Whoever unplugs the device next (a simulator stopping, a technician) must not find the line still
    // open, or the driver's task would report it lost in an orderly stop.
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let mut conn = device.accept().await.unwrap();
    port.release().await;
    let mut rest = [0u8; 1];
    assert_eq!(
        tokio::time::timeout(Duration::ZERO, conn.read(&mut rest))
            .await
            .expect("the connection must be closed when release returns")
            .unwrap(),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn a_caller_told_disconnected_finds_the_port_closed() {
    // The task records its end before it answers: a driver that reconnects at once must open the
    // line afresh, not queue on the dying task (which would answer "disconnected" again).
    let (port, mut device) = opened().await;
    port.acquire().await.unwrap();
    let conn = device.accept().await.unwrap();
    let running = lock(&port.inner.running)
        .as_ref()
        .map(|r| r.state.clone())
        .unwrap();
    drop(conn);
    let err = port.transact(query(1)).await.unwrap_err();
    assert!(matches!(err, PortError::Disconnected { .. }), "{err}");
    assert_eq!(running.load(Ordering::Acquire), LOST);
    assert!(!port.is_open());
}
