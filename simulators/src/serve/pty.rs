//! A device's serial port as a real pseudo-terminal.
//!
//! The server keeps the master end; the slave end is a `/dev/pts/N` any serial program opens (a driver,
//! pyserial, `screen`, plain `open(2)`), optionally reached through a stable symlink such as
//! `<dir>/gantry.pty`. The slave is put in raw mode at the device's baud rate when the pty is made, so a
//! plain `open` sees what a real port at the right settings would deliver.
//!
//! The server closes its own copy of the slave at once, so the master reads EIO whenever no client has the
//! slave open: that is how the port notices a client coming and going (it looks again every
//! [`PROBE_INTERVAL`] while nobody is there). The pty itself stays across client reconnects. Output while
//! nobody listens is thrown away, as a real device's bytes are when no host has the port open.
//!
//! Unplugging ([`PtyPort::close`]) drops the master: an open client reads EOF (and EIO on write), the
//! symlink disappears. Plugging back makes a new pty (a new `/dev/pts/N`) and points the symlink at it.
//!
//! Only the baud rate of the client's settings can be seen from the master: Linux forces a pty to 8 data
//! bits without parity whatever the client asks, so data bits and parity cannot be checked.

use std::future::poll_fn;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_serial::{SerialPort, SerialStream};

use super::IoEvent;
use crate::devices::LineSettings;

/// How often a port without a client looks whether one has opened the slave (real time).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Bytes read from the master at a time.
const READ_CHUNK: usize = 4096;

/// The master end of a device's pty.
pub struct PtyPort {
    settings: LineSettings,
    link: Option<PathBuf>,
    master: Option<SerialStream>,
    path: Option<PathBuf>,
    client: bool,
    rbuf: Box<[u8; READ_CHUNK]>,
}

impl PtyPort {
    pub fn new(settings: LineSettings, link: Option<PathBuf>) -> PtyPort {
        PtyPort {
            settings,
            link,
            master: None,
            path: None,
            client: false,
            rbuf: Box::new([0; READ_CHUNK]),
        }
    }

    /// Makes a new pty (and points the symlink at its slave).
    pub fn open(&mut self) -> io::Result<()> {
        self.close();
        let (master, mut slave) = SerialStream::pair().map_err(io::Error::other)?;
        // Raw mode is set by `pair`; the baud rate is what a client that does not set one sees.
        slave
            .set_baud_rate(self.settings.baud)
            .map_err(io::Error::other)?;
        let path = slave
            .name()
            .map(PathBuf::from)
            .ok_or_else(|| io::Error::other("the pty has no slave path"))?;
        drop(slave);
        if let Some(link) = &self.link {
            replace_symlink(&path, link)?;
        }
        self.master = Some(master);
        self.path = Some(path);
        self.client = false;
        Ok(())
    }

    /// Unplugs: drops the master (clients read EOF) and removes the symlink.
    pub fn close(&mut self) {
        self.master = None;
        self.path = None;
        self.client = false;
        if let Some(link) = &self.link
            && std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink())
        {
            let _ = std::fs::remove_file(link);
        }
    }

    pub fn is_open(&self) -> bool {
        self.master.is_some()
    }

    /// Whether a client has the slave open (as far as the port has noticed).
    pub fn has_client(&self) -> bool {
        self.client
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn link(&self) -> Option<&Path> {
        self.link.as_deref()
    }

    /// The baud rate the client has set on the slave.
    pub fn host_baud(&self) -> Option<u32> {
        self.master.as_ref().and_then(|m| m.baud_rate().ok())
    }

    /// The client went away (or was never there).
    pub fn client_gone(&mut self) {
        self.client = false;
    }

    /// The next thing that happens on the port: bytes from the client, bytes written, a client coming or
    /// going. Never resolves while the port is closed. Cancel-safe: it returns as soon as anything has
    /// been read or written.
    pub async fn next_event(&mut self, tx: &[u8]) -> IoEvent {
        let PtyPort {
            master,
            client,
            rbuf,
            ..
        } = self;
        let Some(master) = master.as_mut() else {
            return std::future::pending().await;
        };
        if !*client {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let mut buf = ReadBuf::new(&mut rbuf[..]);
            // One look: EIO means still nobody; "would block" means a client has opened the slave.
            let polled =
                poll_fn(|cx| Poll::Ready(Pin::new(&mut *master).poll_read(cx, &mut buf))).await;
            return match polled {
                Poll::Pending => IoEvent::ClientCame,
                Poll::Ready(Ok(())) if buf.filled().is_empty() => IoEvent::NoClient,
                Poll::Ready(Ok(())) => IoEvent::Read(buf.filled().to_vec()),
                Poll::Ready(Err(_)) => IoEvent::NoClient,
            };
        }
        poll_fn(|cx| {
            if !tx.is_empty()
                && let Poll::Ready(result) = Pin::new(&mut *master).poll_write(cx, tx)
            {
                return Poll::Ready(match result {
                    Ok(n) => IoEvent::Wrote(n),
                    Err(_) => IoEvent::HostGone,
                });
            }
            let mut buf = ReadBuf::new(&mut rbuf[..]);
            match Pin::new(&mut *master).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(IoEvent::HostGone),
                Poll::Ready(Ok(())) => Poll::Ready(IoEvent::Read(buf.filled().to_vec())),
                Poll::Ready(Err(_)) => Poll::Ready(IoEvent::HostGone),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Records what [`PtyPort::next_event`] found out about the client.
    pub fn note(&mut self, event: &IoEvent) {
        match event {
            IoEvent::ClientCame | IoEvent::Read(_) | IoEvent::Wrote(_) => self.client = true,
            IoEvent::NoClient | IoEvent::HostGone => self.client = false,
            IoEvent::Accepted(_) => {}
        }
    }
}

impl Drop for PtyPort {
    fn drop(&mut self) {
        self.close();
    }
}

/// Points `link` at `target`, replacing an older symlink (but never a regular file).
fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(link) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(link)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a symlink", link.display()),
            ));
        }
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, link)
}
