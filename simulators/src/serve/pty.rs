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

use std::fs::File;
use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::task::Poll;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio_serial::{SerialPort, SerialStream};

use super::IoEvent;
use crate::devices::LineSettings;

/// How often a port without a client looks whether one has opened the slave (real time).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Bytes read from the master at a time.
const READ_CHUNK: usize = 4096;

/// The master end of a device's pty.
///
/// I/O goes through a duplicate of the master descriptor in our own [`AsyncFd`], registered afresh each
/// time a client arrives: once the master has seen a hang-up, tokio keeps its "read closed" readiness for
/// good, which would make every later read attempt spin.
pub struct PtyPort {
    settings: LineSettings,
    link: Option<PathBuf>,
    /// Owns the pty (with `io`) and answers termios queries (the client's baud rate).
    serial: Option<SerialStream>,
    io: Option<AsyncFd<File>>,
    path: Option<PathBuf>,
    client: bool,
    rbuf: Box<[u8; READ_CHUNK]>,
}

/// What one look at the master found.
enum Look {
    Data(usize),
    /// EIO: nobody has the slave open.
    Nobody,
    /// "Would block": a client is there and quiet.
    Quiet,
}

impl PtyPort {
    pub fn new(settings: LineSettings, link: Option<PathBuf>) -> PtyPort {
        PtyPort {
            settings,
            link,
            serial: None,
            io: None,
            path: None,
            client: false,
            rbuf: Box::new([0; READ_CHUNK]),
        }
    }

    /// Makes a new pty (and points the symlink at its slave).
    pub fn open(&mut self) -> io::Result<()> {
        self.close();
        let (master, mut slave) = SerialStream::pair().map_err(io::Error::other)?;
        close_on_exec(master.as_raw_fd())?;
        // Raw mode is set by `pair`; the baud rate is what a client that does not set one sees.
        slave
            .set_baud_rate(self.settings.baud)
            .map_err(io::Error::other)?;
        let path = slave
            .name()
            .map(PathBuf::from)
            .ok_or_else(|| io::Error::other("the pty has no slave path"))?;
        drop(slave);
        let io = register(dup_master(&master)?)?;
        if let Some(link) = &self.link {
            replace_symlink(&path, link)?;
        }
        self.serial = Some(master);
        self.io = Some(io);
        self.path = Some(path);
        self.client = false;
        Ok(())
    }

    /// Unplugs: closes every descriptor of the master (clients read EOF) and removes the symlink.
    pub fn close(&mut self) {
        self.io = None;
        self.serial = None;
        self.path = None;
        self.client = false;
        if let Some(link) = &self.link
            && std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink())
        {
            let _ = std::fs::remove_file(link);
        }
    }

    pub fn is_open(&self) -> bool {
        self.serial.is_some()
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
        self.serial.as_ref().and_then(|m| m.baud_rate().ok())
    }

    /// Registers the master afresh, forgetting readiness left from an earlier client.
    fn rearm(&mut self) -> io::Result<()> {
        if let Some(io) = self.io.take() {
            self.io = Some(register(io.into_inner())?);
        }
        Ok(())
    }

    /// One non-blocking read, outside the readiness machinery.
    fn look(&mut self) -> Look {
        let Some(io) = &self.io else {
            return Look::Nobody;
        };
        match io.get_ref().read(&mut self.rbuf[..]) {
            Ok(0) => Look::Nobody,
            Ok(n) => Look::Data(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Look::Quiet,
            Err(_) => Look::Nobody,
        }
    }

    /// The next thing that happens on the port: bytes from the client, bytes written, a client coming or
    /// going. Never resolves while the port is closed. Cancel-safe: it returns as soon as anything has
    /// been read or written.
    pub async fn next_event(&mut self, tx: &[u8]) -> IoEvent {
        if self.io.is_none() {
            return std::future::pending().await;
        }
        if !self.client {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let event = match self.look() {
                Look::Nobody => return IoEvent::NoClient,
                Look::Quiet => IoEvent::ClientCame,
                Look::Data(n) => IoEvent::Read(self.rbuf[..n].to_vec()),
            };
            if self.rearm().is_err() {
                self.close();
                return IoEvent::HostGone;
            }
            return event;
        }
        let PtyPort { io, rbuf, .. } = self;
        let Some(io) = io.as_ref() else {
            return std::future::pending().await;
        };
        poll_fn(|cx| {
            if !tx.is_empty()
                && let Poll::Ready(guard) = io.poll_write_ready(cx)
            {
                let Ok(mut guard) = guard else {
                    return Poll::Ready(IoEvent::HostGone);
                };
                match guard.try_io(|fd| fd.get_ref().write(tx)) {
                    Ok(Ok(n)) if n > 0 => return Poll::Ready(IoEvent::Wrote(n)),
                    Ok(_) => return Poll::Ready(IoEvent::HostGone),
                    Err(_would_block) => {}
                }
            }
            loop {
                let Poll::Ready(guard) = io.poll_read_ready(cx) else {
                    return Poll::Pending;
                };
                let Ok(mut guard) = guard else {
                    return Poll::Ready(IoEvent::HostGone);
                };
                let closed = guard.ready().is_read_closed();
                match guard.try_io(|fd| fd.get_ref().read(&mut rbuf[..])) {
                    Ok(Ok(0)) | Ok(Err(_)) => return Poll::Ready(IoEvent::HostGone),
                    Ok(Ok(n)) => return Poll::Ready(IoEvent::Read(rbuf[..n].to_vec())),
                    // The hang-up of a client that has since been replaced: start over.
                    Err(_would_block) if closed => return Poll::Ready(IoEvent::Rearm),
                    Err(_would_block) => continue,
                }
            }
        })
        .await
    }

    /// Records what [`PtyPort::next_event`] found out about the client.
    pub fn note(&mut self, event: &IoEvent) {
        match event {
            IoEvent::ClientCame | IoEvent::Read(_) | IoEvent::Wrote(_) => self.client = true,
            IoEvent::NoClient | IoEvent::HostGone => self.client = false,
            IoEvent::Rearm => {
                if self.rearm().is_err() {
                    self.close();
                }
            }
            IoEvent::Accepted(_) => {}
        }
    }
}

impl Drop for PtyPort {
    fn drop(&mut self) {
        self.close();
    }
}

/// Registers a descriptor with the runtime's reactor.
fn register(file: File) -> io::Result<AsyncFd<File>> {
    // SAFETY: the `File` owns its descriptor, which stays open and the same until the `AsyncFd` is
    // dropped or hands the `File` back with `into_inner`.
    Ok(unsafe { AsyncFd::register(file) }?)
}

/// A second descriptor for the master, for our own readiness registration.
fn dup_master(master: &SerialStream) -> io::Result<File> {
    let raw = master.as_raw_fd();
    // SAFETY: `raw` is the master descriptor owned by `master`, open for the whole borrow; it is only
    // duplicated here, never closed.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// The master must not leak into programs this process starts (a HIL suite starts `labctl` beside its
/// simulators): an inherited copy keeps the pty alive after an unplug, and the client never reads EOF.
/// `pair` opens it without `O_CLOEXEC`; a program started in the instant between is not covered.
fn close_on_exec(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor this port owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
