//! The SCPI command port: a plain text line (IEEE 488.2 / SCPI style) for serial terminals, LabVIEW/PLC
//! rigs and test harnesses, on TCP (the raw-socket convention, port 5025) and on a serial line. Every
//! connection is its own [`session::Session`] with its own login and error queue. See
//! `docs/command-port.md`.
//!
//! - [`session`]: the pure state machine (bytes in, reply lines out) over a [`Backend`].
//! - [`ControllerBackend`]: the [`Backend`] of a running controller ([`ControllerHandle`] plus the lab's
//!   users).
//! - [`start`]: the TCP listener and the serial line of `labctl run`.
//!
//! May depend on: the core's API, the contract, the SCPI codec (for parsing program messages) and the
//! transport (for its own serial line). Never on the drivers.

pub mod session;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use labctl_protocols::Lab;
use labctl_protocols::lab::{Role, SerialLine};
use labctl_transport::{self as transport, Endpoint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use labctl_core::api::{
    ApiError, Control, ControllerHandle, InterlockStatus, Principal, RunInfo, RunState, SubmitReply,
};
use labctl_core::auth::{AuthError, Source, Users};
use labctl_core::world::LabSnapshot;
use session::{Link, MAX_LINE, Session, SessionConfig, VIA};

/// Clients served at once on TCP; further connections are closed at once.
pub const MAX_CLIENTS: usize = 64;
/// How long a serial line that went away waits before it is opened again.
const SERIAL_REOPEN: Duration = Duration::from_secs(1);

/// What a session needs of the lab. [`ControllerBackend`] is the real one; tests use fakes.
pub trait Backend: Send + Sync + 'static {
    /// The world model as of the last tick; never waits on an instrument.
    fn snapshot(&self) -> Arc<LabSnapshot>;
    fn submit(&self, bytes: Vec<u8>, who: Principal) -> impl Future<Output = SubmitReply> + Send;
    fn run(&self, run_id: &str) -> impl Future<Output = Option<RunInfo>> + Send;
    fn control(
        &self,
        run_id: &str,
        control: Control,
        who: Principal,
    ) -> impl Future<Output = Result<RunState, ApiError>> + Send;
    /// A technician's approval of a run awaiting it (the core's role table decides).
    fn approve(
        &self,
        run_id: &str,
        who: Principal,
    ) -> impl Future<Output = Result<RunState, ApiError>> + Send;
    fn reject(
        &self,
        run_id: &str,
        reason: &str,
        who: Principal,
    ) -> impl Future<Output = Result<RunState, ApiError>> + Send;
    fn emergency_stop(&self, who: Principal) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn acknowledge_emergency_stop(
        &self,
        who: Principal,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn override_interlock(
        &self,
        interlock: &str,
        duration: Duration,
        reason: &str,
        who: Principal,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn withdraw_override(
        &self,
        interlock: &str,
        who: Principal,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn interlocks(&self) -> impl Future<Output = Vec<InterlockStatus>> + Send;
    /// Checks a password (within the lab's login limits, see [`Users::login`]).
    fn login(
        &self,
        user: &str,
        password: &str,
        source: Source,
    ) -> impl Future<Output = Result<Role, AuthError>> + Send;
    /// Whether the lab has users (then reading needs a login too).
    fn users_configured(&self) -> bool;
}

/// A running controller and the lab's users.
#[derive(Clone)]
pub struct ControllerBackend {
    handle: ControllerHandle,
    users: Arc<Users>,
}

impl ControllerBackend {
    pub fn new(handle: ControllerHandle, users: Arc<Users>) -> ControllerBackend {
        ControllerBackend { handle, users }
    }

    /// Waits (briefly) until the published snapshot shows the latch as `latched`, so the next command
    /// of the same client sees what its `SYST:ESTOP` / `SYST:ESTOP:ACK` did.
    async fn settle_latch(&self, latched: bool) {
        let mut rx = self.handle.watch_snapshot();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            rx.wait_for(|s| s.estop_latched == latched),
        )
        .await;
    }
}

impl Backend for ControllerBackend {
    fn snapshot(&self) -> Arc<LabSnapshot> {
        self.handle.snapshot()
    }

    fn submit(&self, bytes: Vec<u8>, who: Principal) -> impl Future<Output = SubmitReply> + Send {
        self.handle.submit(bytes, who)
    }

    fn run(&self, run_id: &str) -> impl Future<Output = Option<RunInfo>> + Send {
        self.handle.run(run_id)
    }

    fn control(
        &self,
        run_id: &str,
        control: Control,
        who: Principal,
    ) -> impl Future<Output = Result<RunState, ApiError>> + Send {
        self.handle.control(run_id, control, who)
    }

    fn approve(
        &self,
        run_id: &str,
        who: Principal,
    ) -> impl Future<Output = Result<RunState, ApiError>> + Send {
        self.handle.approve(run_id, who)
    }

    fn reject(
        &self,
        run_id: &str,
        reason: &str,
        who: Principal,
    ) -> impl Future<Output = Result<RunState, ApiError>> + Send {
        self.handle.reject(run_id, reason, who)
    }

    async fn emergency_stop(&self, who: Principal) -> Result<(), ApiError> {
        self.handle.emergency_stop(who).await?;
        self.settle_latch(true).await;
        Ok(())
    }

    async fn acknowledge_emergency_stop(&self, who: Principal) -> Result<(), ApiError> {
        self.handle.acknowledge_emergency_stop(who).await?;
        self.settle_latch(false).await;
        Ok(())
    }

    fn override_interlock(
        &self,
        interlock: &str,
        duration: Duration,
        reason: &str,
        who: Principal,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        self.handle
            .override_interlock(interlock, duration, reason, who)
    }

    fn withdraw_override(
        &self,
        interlock: &str,
        who: Principal,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        self.handle.withdraw_override(interlock, who)
    }

    fn interlocks(&self) -> impl Future<Output = Vec<InterlockStatus>> + Send {
        self.handle.interlocks()
    }

    async fn login(&self, user: &str, password: &str, source: Source) -> Result<Role, AuthError> {
        self.users.login(user, password, source).await
    }

    fn users_configured(&self) -> bool {
        !self.users.is_empty()
    }
}

/// `labctl run` options of the command port.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommandPortArgs {
    /// TCP address of the SCPI command port; port 0 picks a free one (printed at start); `off` disables
    /// it. Default: the lab file's `interfaces.command_port.tcp` (127.0.0.1:5025).
    #[arg(long = "command-port", value_name = "ADDR")]
    pub command_port: Option<String>,
    /// TCP address of the command port over TLS (certificate in DATA_DIR/tls/, made on first start); port
    /// 0 picks a free one (printed at start). Default: the lab file's `interfaces.command_port.tls`, else
    /// none.
    #[arg(long = "command-port-tls", value_name = "ADDR")]
    pub command_port_tls: Option<String>,
    /// Serve the command port on this serial line too (default: the lab file's
    /// `interfaces.command_port.serial`, if any).
    #[arg(long = "command-serial", value_name = "PATH")]
    pub command_serial: Option<String>,
    /// Baud rate of --command-serial (8N1); default the lab file's, else 9600.
    #[arg(long = "command-serial-baud", value_name = "BAUD")]
    pub command_serial_baud: Option<u32>,
    /// Who the serial line acts as (it has no login): observer, planner, rig or technician [default: rig].
    #[arg(long = "command-serial-role", value_name = "ROLE")]
    pub command_serial_role: Option<Role>,
}

/// The running command port: its tasks stop when this is dropped.
pub struct CommandPort {
    /// The bound TCP address, if the TCP port runs.
    pub tcp: Option<SocketAddr>,
    /// The bound address of the command port over TLS, if it runs.
    pub tls: Option<SocketAddr>,
    /// The serial line and who it acts as, if one is served.
    pub serial: Option<Principal>,
    tasks: Vec<JoinHandle<()>>,
}

impl CommandPort {
    /// One line per endpoint, for the start-up banner.
    pub fn endpoints(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(addr) = self.tcp {
            lines.push(format!("command port: tcp {addr}"));
        }
        if let Some(addr) = self.tls {
            lines.push(format!("command port: tls {addr}"));
        }
        if let Some(p) = &self.serial {
            lines.push(format!("command port: {} (as {})", p.name, p.role));
        }
        lines
    }
}

impl Drop for CommandPort {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A stable id of this controller for `*IDN?`: derived from the host name and the data directory, so it
/// stays the same across restarts and differs between two controllers on one machine.
pub fn controller_serial(data_dir: &Path) -> String {
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let digest =
        labctl_core::controller::sha256_hex(format!("{host}\n{}", dir.display()).as_bytes());
    format!("{host}-{}", &digest[..8])
        .chars()
        .map(|c| {
            if c == ',' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Why the command port could not start; each names the listener or line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{listener} {address}: {source}")]
    Bind {
        listener: &'static str,
        address: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cleartext(#[from] labctl_core::auth::CleartextListener),
    #[error("command port over TLS: {0}")]
    Tls(#[from] labctl_core::tls::TlsError),
    #[error("command port serial line: {0}")]
    Serial(#[from] labctl_transport::OpenError),
}

/// Starts the command port of `labctl run`: TCP unless `off`, and the serial line if one is given.
/// An address given on the command line must bind; the lab file's default only warns when it is taken.
pub async fn start(
    args: &CommandPortArgs,
    lab: &Lab,
    data_dir: &Path,
    handle: ControllerHandle,
    users: Arc<Users>,
) -> Result<CommandPort, StartError> {
    let bind_error = |listener: &'static str, address: &str| {
        let address = address.to_owned();
        move |source| StartError::Bind {
            listener,
            address,
            source,
        }
    };
    let backend = ControllerBackend::new(handle, users);
    let idn = session::idn(&lab.lab_id, &controller_serial(data_dir));
    let mut port = CommandPort {
        tcp: None,
        tls: None,
        serial: None,
        tasks: Vec::new(),
    };
    let (address, explicit) = match &args.command_port {
        Some(a) => (Some(a.clone()), true),
        None => (lab.interfaces.command_port.tcp.clone(), false),
    };
    if let Some(address) = address.filter(|a| !a.eq_ignore_ascii_case("off")) {
        match TcpListener::bind(address.as_str()).await {
            Ok(listener) => {
                let local = listener
                    .local_addr()
                    .map_err(bind_error("command port", &address))?;
                labctl_core::auth::check_cleartext_listener(
                    "the TCP command port",
                    local,
                    lab.interfaces.allow_cleartext_on_network,
                )?;
                port.tcp = Some(local);
                port.tasks.push(tokio::spawn(accept_loop(
                    listener,
                    backend.clone(),
                    idn.clone(),
                    None,
                )));
            }
            Err(e) if explicit => return Err(bind_error("--command-port", &address)(e)),
            Err(e) => {
                tracing::warn!(%address, error = %e, "command port not started (use --command-port ADDR)")
            }
        }
    }
    if let Some(address) = args
        .command_port_tls
        .clone()
        .or_else(|| lab.interfaces.command_port.tls.clone())
    {
        let listener = TcpListener::bind(address.as_str())
            .await
            .map_err(bind_error("command port over TLS", &address))?;
        let local = listener
            .local_addr()
            .map_err(bind_error("command port over TLS", &address))?;
        let host = address
            .rsplit_once(':')
            .map(|(h, _)| h.to_owned())
            .unwrap_or_default();
        let files = labctl_core::tls::load_or_create(data_dir, &[host])?;
        let acceptor = tokio_rustls::TlsAcceptor::from(files.config);
        port.tls = Some(local);
        port.tasks.push(tokio::spawn(accept_loop(
            listener,
            backend.clone(),
            idn.clone(),
            Some(acceptor),
        )));
    }
    let line = match (&args.command_serial, &lab.interfaces.command_port.serial) {
        (Some(path), lab_line) => Some(SerialLine {
            port: path.clone(),
            baud: args
                .command_serial_baud
                .or(lab_line.as_ref().map(|l| l.baud))
                .unwrap_or(9600),
            data_bits: 8,
            parity: Default::default(),
            stop_bits: 1,
            flow_control: Default::default(),
        }),
        (None, Some(line)) => Some(SerialLine {
            baud: args.command_serial_baud.unwrap_or(line.baud),
            ..line.clone()
        }),
        (None, None) => None,
    };
    if let Some(line) = line {
        let who = Principal::new(
            &format!("serial:{}", line.port),
            args.command_serial_role.unwrap_or(Role::Rig),
            VIA,
        );
        let stream = transport::open(&Endpoint::Serial(line.clone())).await?;
        let config = SessionConfig {
            idn,
            link: Link::Serial(who.clone()),
            max_line: MAX_LINE,
            peer: Source::Local,
        };
        port.tasks
            .push(tokio::spawn(serial_loop(line, stream, backend, config)));
        port.serial = Some(who);
    }
    Ok(port)
}

/// Serves one connection until it closes: reads bytes, answers each program message as it completes.
/// Bad input only ever adds to the session's error queue; I/O errors end the connection.
pub async fn serve_stream<S, B>(mut stream: S, backend: &B, config: SessionConfig) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Backend,
{
    let mut session = Session::new(config);
    let mut buf = vec![0u8; 8192];
    let mut out = Vec::new();
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        out.clear();
        for reply in session.feed(backend, &buf[..n]).await {
            out.extend_from_slice(reply.as_bytes());
            out.push(b'\n');
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
    }
}

/// How long a TLS client may take over its handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

async fn accept_loop<B: Backend + Clone>(
    listener: TcpListener,
    backend: B,
    idn: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "command port: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "command port: {MAX_CLIENTS} clients already; connection closed");
            continue;
        };
        // Short request/reply lines: Nagle would add tens of milliseconds to each.
        let _ = stream.set_nodelay(true);
        let backend = backend.clone();
        let config = SessionConfig {
            idn: idn.clone(),
            link: Link::Tcp,
            max_line: MAX_LINE,
            peer: peer.into(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            tracing::debug!(%peer, "command port: client connected");
            let served = match tls {
                None => serve_stream(stream, &backend, config).await,
                // The handshake runs in the connection's own task: a slow client holds only its slot.
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_stream(stream, &backend, config).await,
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no TLS handshake within 10 s",
                        )),
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "command port: connection ended");
            }
            drop(slot);
        });
    }
}

async fn serial_loop<B: Backend>(
    line: SerialLine,
    mut stream: transport::Stream,
    backend: B,
    config: SessionConfig,
) {
    loop {
        match serve_stream(&mut stream, &backend, config.clone()).await {
            Ok(()) => tracing::warn!(port = %line.port, "command port: serial line closed"),
            Err(e) => {
                tracing::warn!(port = %line.port, error = %e, "command port: serial line failed")
            }
        }
        stream = loop {
            tokio::time::sleep(SERIAL_REOPEN).await;
            match transport::open(&Endpoint::Serial(line.clone())).await {
                Ok(s) => break s,
                Err(e) => tracing::debug!(port = %line.port, error = %e, "command port: reopening"),
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_serial_is_stable_per_data_directory() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let serial = controller_serial(a.path());
        assert_eq!(serial, controller_serial(a.path()));
        assert_ne!(serial, controller_serial(b.path()));
        assert!(!serial.contains([',', ' ', '\n']), "{serial}");
    }

    #[test]
    fn the_serial_role_on_the_command_line_is_a_role_name() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            port: CommandPortArgs,
        }
        let role = |name: &str| {
            Cli::try_parse_from(["labctl", "--command-serial-role", name])
                .map(|cli| cli.port.command_serial_role)
        };
        assert_eq!(role("Technician").unwrap(), Some(Role::Technician));
        assert_eq!(role("rig").unwrap(), Some(Role::Rig));
        let refused = role("admin").unwrap_err().to_string();
        assert!(
            refused.contains("expected observer, planner, rig or technician"),
            "{refused}"
        );
    }
}
