//! The OPC UA server: the lab for technicians and plant systems (SCADA, HMI, historians), on async-opcua.
//! See `docs/opcua.md`.
//!
//! - [`address_space`]: the `Lab` object, LADS/DI-shaped; [`names`]: its node ids.
//! - [`node_manager`]: the lab's namespace; method calls go to the controller.
//! - [`methods`]: the `Lab` methods, who may call them, what they answer.
//! - [`devices`]: instrument actions as device methods and setpoints as writable variables (technicians).
//! - [`updater`]: keeps values true from the world model and the journal.
//! - [`authenticator`]: the lab file's users and roles.
//! - [`settings`]: endpoints, security policies, certificates, limits.
//!
//! May depend on: the core's API and the lab language. Never on the drivers or another face.

pub mod address_space;
pub mod authenticator;
pub mod devices;
pub mod methods;
pub mod names;
pub mod node_manager;
pub mod runs;
pub mod settings;
pub mod updater;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use labctl_protocols::Lab;
use opcua::core::config::Config as _;
use opcua::server::ServerHandle;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use address_space::Names;
use labctl_core::api::ControllerHandle;
use labctl_core::auth::Users;
use node_manager::LabNodeManager;
pub use settings::{Endpoint, Security};

/// `labctl run` options of the OPC UA server.
#[derive(Debug, Clone, clap::Args)]
pub struct OpcUaArgs {
    /// Port of the OPC UA server (default: the lab file's `interfaces.opcua.endpoint`, 4840); 0 picks a
    /// free port and prints the endpoint.
    #[arg(long = "opcua-port", value_name = "PORT")]
    pub opcua_port: Option<u16>,
    /// Do not start the OPC UA server.
    #[arg(long = "no-opcua", conflicts_with = "opcua_port")]
    pub no_opcua: bool,
    /// Also offer SecurityPolicy None (no signature, no encryption, passwords in clear) without --sim.
    /// For development only; --sim offers it anyway.
    #[arg(long = "opcua-insecure-dev")]
    pub opcua_insecure_dev: bool,
    /// Finished runs kept under the OPC UA `Lab/Runs` folder, newest first (active runs are always there;
    /// the journal keeps them all).
    #[arg(long = "opcua-keep-runs", value_name = "N", default_value_t = runs::DEFAULT_KEEP_FINISHED_RUNS)]
    pub opcua_keep_runs: usize,
}

impl Default for OpcUaArgs {
    fn default() -> Self {
        OpcUaArgs {
            opcua_port: None,
            no_opcua: false,
            opcua_insecure_dev: false,
            opcua_keep_runs: runs::DEFAULT_KEEP_FINISHED_RUNS,
        }
    }
}

/// Everything the server needs besides the controller.
#[derive(Clone)]
pub struct OpcUaConfig {
    pub lab: Lab,
    /// Where `pki/` lives (the server certificate, trusted and rejected client certificates).
    pub data_dir: PathBuf,
    /// Host and port to listen on; port 0 picks a free one.
    pub listen: Endpoint,
    pub security: Security,
    pub users: Arc<Users>,
    /// Finished runs that keep their node under `Lab/Runs` (the most recent ones); active runs always do.
    pub keep_finished_runs: usize,
}

/// The running server; stops when [`OpcUaServer::shutdown`] is called or it is dropped.
pub struct OpcUaServer {
    /// `opc.tcp://host:port/`, with the port actually bound.
    pub endpoint: String,
    pub addr: SocketAddr,
    pub security: Security,
    pub pki_dir: PathBuf,
    handle: ServerHandle,
    /// Resolves when the server's thread has stopped.
    server: Option<oneshot::Receiver<()>>,
    updater: JoinHandle<()>,
}

impl OpcUaServer {
    /// One line for the start-up banner.
    pub fn banner(&self) -> String {
        format!("opcua: {} ({})", self.endpoint, self.security.describe())
    }

    /// Closes every session and stops listening.
    pub async fn shutdown(mut self) {
        self.handle.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        }
        self.updater.abort();
    }
}

impl Drop for OpcUaServer {
    fn drop(&mut self) {
        // The server's thread sees the cancellation, closes its sessions and ends.
        self.handle.cancel();
        self.updater.abort();
    }
}

/// Namespace of the lab's nodes (`interfaces.md`).
pub fn namespace_uri(lab_id: &str) -> String {
    format!("urn:labctl:{lab_id}")
}

/// Starts the server: binds, creates the server certificate on first start, builds the address space and
/// starts following the controller.
/// Why the OPC UA server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("OPC UA endpoint {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("interfaces.opcua.endpoint: {0}")]
    Endpoint(#[from] settings::EndpointError),
    #[error(transparent)]
    Cleartext(#[from] labctl_core::auth::CleartextListener),
    #[error("OPC UA private key directory {path}: {source}")]
    PrivateKeyDirectory {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The server could not be built or run (async-opcua's own message).
    #[error("OPC UA server: {0}")]
    Server(String),
}

pub async fn start(api: ControllerHandle, config: OpcUaConfig) -> Result<OpcUaServer, StartError> {
    let listener = TcpListener::bind((config.listen.host.as_str(), config.listen.port))
        .await
        .map_err(|source| StartError::Bind {
            endpoint: config.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        endpoint: config.listen.to_string(),
        source,
    })?;
    let pki_dir = config.data_dir.join("pki");
    let lab = Arc::new(config.lab.clone());
    let namespace = namespace_uri(&lab.lab_id);
    let builder = settings::server_builder(&settings::ServerSettings {
        lab_id: lab.lab_id.clone(),
        host: config.listen.host.clone(),
        port: addr.port(),
        pki_dir: pki_dir.clone(),
        security: config.security,
    })
    .with_authenticator(Arc::new(authenticator::LabAuthenticator::new(
        config.users.clone(),
    )))
    .with_node_manager(node_manager::builder(
        namespace.clone(),
        Arc::clone(&lab),
        api.clone(),
        config.users.clone(),
        config.keep_finished_runs,
    ));
    // The first start generates the server's RSA key: CPU work, off the async threads. Building the
    // server afterwards only reads it.
    let description = builder.config().application_description();
    let store_dir = pki_dir.clone();
    tokio::task::spawn_blocking(move || {
        // The key is readable by labctl's user only, whatever the umask: the directory exists (0700)
        // before the key is written into it, and the files are made 0600 after.
        restrict_private_dir(&store_dir)?;
        opcua::crypto::CertificateStore::new_with_x509_data(
            &store_dir,
            false,
            None,
            None,
            Some(description),
        );
        restrict_private_dir(&store_dir)
    })
    .await
    .map_err(|e| StartError::Server(format!("certificate: {e}")))??;
    let (server, handle) = builder.build().map_err(StartError::Server)?;
    if handle.info().server_certificate.is_none() || handle.info().server_pkey.is_none() {
        return Err(StartError::Server(format!(
            "no usable certificate and private key under {} (see docs/opcua.md, Certificates)",
            pki_dir.display()
        )));
    }
    let manager = handle
        .node_managers()
        .get_of_type::<LabNodeManager>()
        .ok_or_else(|| StartError::Server("the lab's node manager is missing".into()))?;
    let ns = handle
        .get_namespace_index(&namespace)
        .ok_or_else(|| StartError::Server("the lab's namespace is missing".into()))?;
    let server_thread = serve_on_own_thread(server, listener)?;
    let updater = updater::Updater::new(manager, handle.subscriptions().clone(), Names { ns });
    let updater = tokio::spawn(updater.run(api));
    let endpoint = format!("opc.tcp://{}:{}/", config.listen.host, addr.port());
    tracing::info!(%endpoint, security = %config.security.describe(), "OPC UA server listening");
    Ok(OpcUaServer {
        endpoint,
        addr,
        security: config.security,
        pki_dir,
        handle,
        server: Some(server_thread),
        updater,
    })
}

/// `pki/private` (the server's private key): created 0700 if missing, every file in it made 0600.
fn restrict_private_dir(pki_dir: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let private = pki_dir.join("private");
    let fail = |source: std::io::Error| StartError::PrivateKeyDirectory {
        path: private.clone(),
        source,
    };
    if !private.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&private)
            .map_err(fail)?;
    }
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    for entry in std::fs::read_dir(&private).map_err(fail)? {
        let path = entry.map_err(fail)?.path();
        if path.is_file() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(fail)?;
        }
    }
    Ok(())
}

/// Runs the server on its own thread with a single-threaded runtime. A request hops from the connection
/// to the session to a service task and back: on one thread those hops are queue pushes, not wake-ups of
/// another worker, and OPC UA load never competes with the controller's I/O tasks for the shared workers.
/// The returned receiver resolves when the server has stopped.
fn serve_on_own_thread(
    server: opcua::server::Server,
    listener: TcpListener,
) -> Result<oneshot::Receiver<()>, StartError> {
    let listener = listener
        .into_std()
        .map_err(|e| StartError::Server(format!("endpoint: {e}")))?;
    // Sockets and timers only: the process and signal drivers would be checked at every park.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .thread_name("opcua")
        .build()
        .map_err(|e| StartError::Server(format!("runtime: {e}")))?;
    let (stopped_tx, stopped_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("opcua".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        if let Err(e) = server.run_with(listener).await {
                            tracing::error!(error = %e, "OPC UA server stopped");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "OPC UA endpoint"),
                }
            });
            // Service tasks still running (a method waiting on the controller) end with the runtime.
            runtime.shutdown_timeout(Duration::from_secs(1));
            let _ = stopped_tx.send(());
        })
        .map_err(|e| StartError::Server(format!("thread: {e}")))?;
    Ok(stopped_rx)
}

/// Starts the server of `labctl run`, or not (`--no-opcua`). An endpoint's port given with --opcua-port
/// must bind; when the lab file's default is taken, the controller runs without OPC UA and says so.
pub async fn start_for_run(
    args: &OpcUaArgs,
    sim: bool,
    lab: &Lab,
    data_dir: &Path,
    api: ControllerHandle,
    users: Arc<Users>,
) -> Result<Option<OpcUaServer>, StartError> {
    if args.no_opcua {
        return Ok(None);
    }
    let mut listen = Endpoint::parse(&lab.interfaces.opcua.endpoint)?;
    if let Some(port) = args.opcua_port {
        listen.port = port;
    }
    let security = if sim || args.opcua_insecure_dev {
        Security::WithNone
    } else {
        Security::Secure
    };
    if security == Security::WithNone {
        // Security policy None carries passwords in clear: loopback only, unless the lab file says so.
        let host = listen.host.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = match host {
            "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
            other => other
                .parse()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
        };
        labctl_core::auth::check_cleartext_listener(
            "the OPC UA endpoint with security policy None",
            std::net::SocketAddr::new(ip, listen.port),
            lab.interfaces.allow_cleartext_on_network,
        )?;
    }
    let config = OpcUaConfig {
        lab: lab.clone(),
        data_dir: data_dir.to_owned(),
        listen,
        security,
        users,
        keep_finished_runs: args.opcua_keep_runs,
    };
    match start(api, config).await {
        Ok(server) => Ok(Some(server)),
        Err(e) if args.opcua_port.is_none() => {
            tracing::error!(error = %e, "OPC UA server not started; the controller runs without it (use --opcua-port PORT)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
