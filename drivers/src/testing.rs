//! Scripted fake devices on the in-memory duplex, for port and driver tests.
//!
//! A test spawns the device side as a task that reads exactly the bytes it expects and writes the replies
//! the manual gives; any difference panics that task, and the test fails when it joins it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::port::{PortConfig, PortHandle, printable};
use labctl_transport::{self as transport, LineTiming, MemoryDevice};

/// How long a fake waits for the host (virtual time in paused-clock tests).
const EXPECT_WAIT: Duration = Duration::from_secs(3600);

/// A port on an in-memory line and the device end to accept connections on.
pub(crate) fn memory_port(
    timing: Option<LineTiming>,
    config: PortConfig,
) -> (PortHandle, MemoryDevice) {
    let (endpoint, device) = transport::memory("fake-line", timing);
    (PortHandle::new(endpoint, config), device)
}

pub(crate) struct Fake {
    io: DuplexStream,
}

impl Fake {
    /// The next connection the host opens.
    pub(crate) async fn accept(device: &mut MemoryDevice) -> Fake {
        let io = tokio::time::timeout(EXPECT_WAIT, device.accept())
            .await
            .expect("host never opened the line")
            .expect("endpoint dropped before opening");
        Fake { io }
    }

    /// Reads exactly `want`; panics with what came instead.
    pub(crate) async fn expect(&mut self, want: &[u8]) {
        let mut got = Vec::with_capacity(want.len());
        while got.len() < want.len() {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(EXPECT_WAIT, self.io.read(&mut byte)).await {
                Ok(Ok(1)) => got.extend_from_slice(&byte),
                _ => break,
            }
            if !want.starts_with(&got) {
                break;
            }
        }
        assert_eq!(
            printable(&got),
            printable(want),
            "device expected {:?}, host sent {:?}",
            printable(want),
            printable(&got)
        );
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.io
            .write_all(bytes)
            .await
            .expect("host closed the line");
    }

    /// Expects a request, then answers it.
    pub(crate) async fn reply(&mut self, want: &[u8], answer: &[u8]) {
        self.expect(want).await;
        self.send(answer).await;
    }

    /// Reads one byte from the host.
    pub(crate) async fn read_byte(&mut self) -> u8 {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(EXPECT_WAIT, self.io.read(&mut byte)).await {
            Ok(Ok(1)) => byte[0],
            other => panic!("host sent nothing more: {other:?}"),
        }
    }

    /// Reads one request line up to and including `\n`.
    pub(crate) async fn read_line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(EXPECT_WAIT, self.io.read(&mut byte)).await {
                Ok(Ok(1)) => line.extend_from_slice(&byte),
                _ => panic!("host sent {:?} and no end of line", printable(&line)),
            }
        }
        line
    }

    /// Asserts that the host sends nothing for `wait`.
    pub(crate) async fn expect_silence(&mut self, wait: Duration) {
        let mut byte = [0u8; 1];
        if let Ok(Ok(n)) = tokio::time::timeout(wait, self.io.read(&mut byte)).await {
            assert_eq!(
                n,
                0,
                "host sent {:?} where silence was expected",
                printable(&byte)
            );
        }
    }

    /// Waits until the host closes its end (reads EOF), discarding what it sends on the way.
    pub(crate) async fn expect_closed(&mut self) {
        let mut sink = [0u8; 64];
        loop {
            match tokio::time::timeout(EXPECT_WAIT, self.io.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => panic!("host never closed the line"),
            }
        }
    }
}
