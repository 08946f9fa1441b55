//! Serving devices on real transports: each device gets a port task that owns its pseudo-terminal
//! ([`pty`]) or TCP socket ([`tcp`]), feeds the device what arrives, polls it at the virtual times it asks
//! for, and sends its output through the [`wire`] (faults, baud check, latency, wire time).
//!
//! All devices share one [`LabModel`] behind a `std::sync::Mutex`, locked only for the duration of one
//! device call (never across an await), and one clock ([`LabClock`]).
//!
//! Faults are read from the model's per-instrument [`FaultConfig`]s: a port closes when all its
//! instruments are `disconnected` and opens again when one is not; a poke on the port's control
//! [`Notify`] makes it look at once.
//!
//! What the host sends each port is recorded in its [`tap::WireTap`], for tests that check what an
//! instrument was told.

pub mod pty;
pub mod tap;
pub mod tcp;
pub mod wire;
pub mod wire_clock;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::devices::{Ctx, Device, Emit, LineSettings, received_as};
use crate::model::{FaultConfig, InstrumentId, LabModel};
use labctl_clock::{Clock, LabClock};
use pty::PtyPort;
use tap::WireTap;
use tcp::TcpPort;
use wire::Wire;

/// How long before a deadline a port task stops sleeping and starts yielding until it.
const SPIN_LEAD: Duration = Duration::from_micros(500);

/// Longest real sleep of a port task between looks at the clock.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// What a transport reports.
pub enum IoEvent {
    /// Bytes from the host.
    Read(Vec<u8>),
    /// This many bytes of the transmit buffer went out.
    Wrote(usize),
    /// The host closed its end (pty EIO, TCP EOF or error).
    HostGone,
    /// A client has opened the pty's slave.
    ClientCame,
    /// Still nobody has the pty's slave open.
    NoClient,
    /// A new TCP client.
    Accepted(TcpStream),
    /// The pty's readiness is stale (an old hang-up); register it again.
    Rearm,
}

/// Where a device is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A new pty, with an optional stable symlink to its slave.
    Pty { link: Option<PathBuf> },
    /// A TCP listener (port 0 picks a free port).
    Tcp(SocketAddr),
}

/// What a port offers right now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortStatus {
    /// Plugged in: the pty exists or the socket listens.
    pub open: bool,
    /// The pty's slave (`/dev/pts/N`); it changes when the port is plugged back.
    pub pty: Option<PathBuf>,
    /// The stable symlink to the slave, if any.
    pub link: Option<PathBuf>,
    /// The TCP address.
    pub tcp: Option<SocketAddr>,
    /// Counts the times the port has been plugged in.
    pub generation: u64,
    /// Bytes read from the host, including those still crossing the line to the device.
    pub heard: u64,
    /// Bytes the device has received and processed.
    pub received: u64,
    /// Bytes written to the host.
    pub sent: u64,
}

/// The model and the clock every device of a lab shares.
#[derive(Clone)]
pub struct SharedLab {
    pub model: Arc<Mutex<LabModel>>,
    pub clock: LabClock,
}

impl SharedLab {
    /// Locks the model (recovering it if a panicking thread poisoned the lock).
    pub fn lock(&self) -> MutexGuard<'_, LabModel> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A device to serve.
pub struct PortSpec {
    /// Port name (an instrument id, or `pumps` for the shared pump line).
    pub name: String,
    pub device: Box<dyn Device>,
    pub listen: Listen,
    /// Delay output by its wire time at the device's baud rate.
    pub wire_timing: bool,
    /// Seed of the byte-level fault damage.
    pub seed: u64,
}

/// A running port.
pub struct PortHandle {
    pub name: String,
    pub status: watch::Receiver<PortStatus>,
    /// Poke after changing faults, so the port applies them at once.
    pub control: Arc<Notify>,
    /// Everything the host sent, as the device received it.
    pub tap: WireTap,
    pub task: JoinHandle<()>,
}

enum Transport {
    Pty(PtyPort),
    Tcp(TcpPort),
}

impl Transport {
    async fn open(&mut self) -> io::Result<()> {
        match self {
            Transport::Pty(p) => p.open(),
            Transport::Tcp(t) => t.open().await,
        }
    }

    fn close(&mut self) {
        match self {
            Transport::Pty(p) => p.close(),
            Transport::Tcp(t) => t.close(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Transport::Pty(p) => p.is_open(),
            Transport::Tcp(t) => t.is_open(),
        }
    }

    fn has_client(&self) -> bool {
        match self {
            Transport::Pty(p) => p.has_client(),
            Transport::Tcp(t) => t.has_client(),
        }
    }

    fn host_baud(&self) -> Option<u32> {
        match self {
            Transport::Pty(p) => p.host_baud(),
            Transport::Tcp(_) => None,
        }
    }

    async fn next_event(&mut self, tx: &[u8]) -> IoEvent {
        match self {
            Transport::Pty(p) => p.next_event(tx).await,
            Transport::Tcp(t) => t.next_event(tx).await,
        }
    }

    fn status(&self, generation: u64) -> PortStatus {
        match self {
            Transport::Pty(p) => PortStatus {
                open: p.is_open(),
                pty: p.path().map(PathBuf::from),
                link: p.link().map(PathBuf::from),
                tcp: None,
                generation,
                ..PortStatus::default()
            },
            Transport::Tcp(t) => PortStatus {
                open: t.is_open(),
                pty: None,
                link: None,
                tcp: Some(t.addr()),
                generation,
                ..PortStatus::default()
            },
        }
    }
}

/// What woke the port task.
enum Wake {
    Shutdown,
    Control,
    Timer,
    Io(IoEvent),
}

/// One served device.
struct Port {
    device: Box<dyn Device>,
    instruments: Vec<InstrumentId>,
    lab: SharedLab,
    wire: Wire,
    wire_timing: bool,
    transport: Transport,
    status: watch::Sender<PortStatus>,
    tap: WireTap,
    generation: u64,
    heard: u64,
    received: u64,
    sent: u64,
}

impl Port {
    /// Runs the device with the model locked; returns its output with each source's faults.
    fn run_device(
        &mut self,
        host_baud: Option<u32>,
        f: impl FnOnce(&mut dyn Device, &mut Ctx<'_>),
    ) -> (Duration, Vec<(Emit, FaultConfig)>) {
        let now = self.lab.clock.now();
        let mut out = Vec::new();
        let mut model = self.lab.lock();
        {
            let mut ctx = Ctx::new(&mut model, now, host_baud, &mut out);
            f(self.device.as_mut(), &mut ctx);
        }
        let emits = out
            .into_iter()
            .map(|emit| {
                let faults = self
                    .instruments
                    .get(emit.source)
                    .and_then(|id| model.faults(*id).cloned())
                    .unwrap_or_default();
                (emit, faults)
            })
            .collect();
        (now, emits)
    }

    /// Calls the device and puts its output on the wire.
    fn drive(&mut self, f: impl FnOnce(&mut dyn Device, &mut Ctx<'_>)) {
        let host_baud = self.transport.host_baud();
        let (now, emits) = self.run_device(host_baud, f);
        let line = self.device.line();
        if self.wire_timing {
            self.wire.set_timing(line);
        }
        for (mut emit, faults) in emits {
            // A host at another baud rate reads framing errors.
            if let (Some(line), Some(host)) = (line, host_baud) {
                for b in &mut emit.bytes {
                    *b = received_as(line.baud, host, *b);
                }
            }
            self.wire.send(now, &emit.bytes, &faults);
        }
    }

    /// Hands the device what has crossed the line from the host by `now`.
    fn deliver_arrived(&mut self, now: Duration) {
        let mut any = false;
        while let Some(bytes) = self.wire.arrived(now) {
            self.tap.record(&bytes);
            self.drive(|d, ctx| d.receive(ctx, &bytes));
            self.received += bytes.len() as u64;
            any = true;
        }
        if any {
            self.publish();
        }
    }

    fn wants_open(&self) -> bool {
        let model = self.lab.lock();
        self.instruments
            .iter()
            .any(|id| !model.faults(*id).is_some_and(|f| f.disconnected))
    }

    /// Plugs or unplugs the transport as the faults say; publishes the new status.
    async fn sync_connection(&mut self) {
        let wanted = self.wants_open();
        if wanted == self.transport.is_open() {
            return;
        }
        if wanted {
            match self.transport.open().await {
                Ok(()) => self.generation += 1,
                Err(e) => tracing::warn!("simulator port could not be plugged back: {e}"),
            }
        } else {
            self.transport.close();
            self.wire.clear();
            self.device.host_reset();
        }
        self.publish();
    }

    fn publish(&self) {
        let status = PortStatus {
            heard: self.heard,
            received: self.received,
            sent: self.sent,
            ..self.transport.status(self.generation)
        };
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    fn handle_io(&mut self, event: IoEvent) {
        if let Transport::Pty(p) = &mut self.transport {
            p.note(&event);
        }
        match event {
            IoEvent::Read(bytes) => {
                let host_baud = self.transport.host_baud();
                let bytes = match (self.device.line(), host_baud) {
                    (Some(line), Some(host)) => bytes
                        .into_iter()
                        .map(|b| received_as(host, line.baud, b))
                        .collect(),
                    _ => bytes,
                };
                let now = self.lab.clock.now();
                self.heard += bytes.len() as u64;
                self.wire.receive(now, bytes);
                self.deliver_arrived(now);
                self.publish();
            }
            IoEvent::Wrote(n) => {
                self.wire.written(n);
                self.sent += n as u64;
                self.publish();
            }
            IoEvent::HostGone => {
                self.wire.clear();
                if let Transport::Tcp(t) = &mut self.transport {
                    t.client_gone();
                    self.device.host_reset();
                }
            }
            IoEvent::ClientCame | IoEvent::NoClient | IoEvent::Rearm => {}
            IoEvent::Accepted(stream) => {
                if let Transport::Tcp(t) = &mut self.transport {
                    t.accept(stream);
                }
                self.wire.clear();
                self.device.host_reset();
            }
        }
    }

    async fn run(mut self, control: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        let mut idle_spins = 0u32;
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.sync_connection().await;
            let now = self.lab.clock.now();
            self.deliver_arrived(now);
            self.wire.release(now, self.transport.has_client());
            let device_wakeup = {
                let mut model = self.lab.lock();
                self.device.next_wakeup(&mut model, now)
            };
            let deadline = match (device_wakeup, self.wire.next_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep_for = deadline.map(|at| {
                let wait = self.lab.clock.real_wait(now, at).min(MAX_SLEEP);
                // A deadline that keeps being due without anything happening must not spin the CPU.
                if wait.is_zero() && idle_spins > 2 {
                    Duration::from_millis(1)
                } else {
                    wait
                }
            });
            let tx = self.wire.tx();
            let wake = tokio::select! {
                _ = shutdown.changed() => Wake::Shutdown,
                _ = control.notified() => Wake::Control,
                _ = sleep_opt(sleep_for) => Wake::Timer,
                event = self.transport.next_event(tx) => Wake::Io(event),
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Control | Wake::Timer => {
                    idle_spins = if matches!(wake, Wake::Timer) && sleep_for == Some(Duration::ZERO)
                    {
                        idle_spins + 1
                    } else {
                        0
                    };
                    self.drive(|d, ctx| d.poll(ctx));
                }
                Wake::Io(event) => {
                    idle_spins = 0;
                    self.handle_io(event);
                }
            }
        }
        self.transport.close();
        self.publish();
    }
}

/// Sleeps `span` to the tens of microseconds, or for ever. The [`wire_clock`] wakes the task a little before
/// the deadline (waking a parked worker can take a few hundred microseconds on a virtual machine), and the
/// task yields until the deadline itself: at most [`SPIN_LEAD`] of busy waiting per wait.
async fn sleep_opt(span: Option<Duration>) {
    match span {
        Some(span) => {
            let at = std::time::Instant::now() + span;
            if span > SPIN_LEAD {
                wire_clock::sleep_until(at - SPIN_LEAD).await;
            }
            while std::time::Instant::now() < at {
                tokio::task::yield_now().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Powers the device on, plugs its transport in (unless its faults say unplugged) and starts its task.
pub async fn spawn_port(
    spec: PortSpec,
    lab: SharedLab,
    shutdown: watch::Receiver<bool>,
) -> io::Result<PortHandle> {
    let line = spec.device.line();
    let transport = match (&spec.listen, line) {
        (Listen::Pty { link }, Some(line)) => Transport::Pty(PtyPort::new(line, link.clone())),
        (Listen::Pty { link }, None) => {
            Transport::Pty(PtyPort::new(LineSettings::n81(9600), link.clone()))
        }
        (Listen::Tcp(addr), _) => Transport::Tcp(TcpPort::new(*addr)),
    };
    let timing = if spec.wire_timing { line } else { None };
    let (status_tx, status_rx) = watch::channel(PortStatus::default());
    let tap = WireTap::default();
    let mut port = Port {
        instruments: spec.device.instruments().to_vec(),
        device: spec.device,
        lab,
        wire: Wire::new(spec.seed, timing),
        wire_timing: spec.wire_timing,
        transport,
        status: status_tx,
        tap: tap.clone(),
        generation: 0,
        heard: 0,
        received: 0,
        sent: 0,
    };
    port.drive(|d, ctx| d.power_on(ctx));
    if port.wants_open() {
        port.transport.open().await?;
        port.generation = 1;
    }
    port.publish();
    let control = Arc::new(Notify::new());
    let task = tokio::spawn(port.run(control.clone(), shutdown));
    Ok(PortHandle {
        name: spec.name,
        status: status_rx,
        control,
        tap,
        task,
    })
}
