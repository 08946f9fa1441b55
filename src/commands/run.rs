//! `labctl run`: the controller on the simulated lab (`--sim`) or on the instruments of a lab file
//! (`--config LAB.toml`). Runs until SIGINT or SIGTERM, then leaves every instrument safe.

use crate::api::Face;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use labctl_clock::VirtualClock;
use labctl_protocols::Lab;
use labctl_protocols::lab::{Role, SIM_LAB_TOML};

use crate::api::Principal;
use crate::controller::{ControllerConfig, sha256_hex, start};
pub use crate::gateways::command_port::CommandPortArgs;
pub use crate::gateways::opcua::OpcUaArgs;
use crate::instruments::InstrumentHandle;
use crate::safety::EStop;
use crate::world::TickConfig;

/// Prints a line to standard output, ignoring a closed pipe: a controller must never die because whoever
/// read its console went away.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Run on the built-in simulated lab (wire-level simulators on pseudo-terminals and TCP).
    #[arg(long, conflicts_with = "config")]
    pub sim: bool,
    /// Lab file describing real instruments.
    #[arg(long, required_unless_present = "sim")]
    pub config: Option<PathBuf>,
    /// Where the journal lives.
    #[arg(long, default_value = "./labctl-data")]
    pub data_dir: PathBuf,
    /// Lab id (MQTT topics, OPC UA namespace); defaults to the lab file's (`sim` with --sim).
    #[arg(long)]
    pub lab_id: Option<String>,
    /// Simulated time runs this many times faster than real time (--sim, or --config with
    /// --simulated-instruments).
    #[arg(long, default_value_t = 1.0)]
    pub warp: f64,
    /// With --config: the lab file's instruments are simulators (`labctl sim`, a test rig) running at
    /// --warp, so protocol waits, step timeouts and driver timing follow their clock. Never on hardware.
    #[arg(long, requires = "config")]
    pub simulated_instruments: bool,
    /// Seed of the simulated lab's noise (--sim only).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Tick rate of the world model.
    #[arg(long, default_value_t = 100.0)]
    pub tick_hz: f64,
    /// Spin this many microseconds before each tick deadline instead of sleeping (lower jitter, burns CPU).
    #[arg(long, default_value_t = 0)]
    pub tick_spin_us: u64,
    /// Run the tick thread under SCHED_FIFO at this priority (1-99), ahead of every ordinary thread.
    /// Needs CAP_SYS_NICE (or root); without it the tick stays at normal priority and the log says so.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub tick_priority: Option<u8>,
    /// Submit these protocols at start, as the local operator (a technician at this machine).
    #[arg(long)]
    pub submit: Vec<PathBuf>,
    /// With --sim: make symlinks to the simulators' pseudo-terminals in this directory.
    #[arg(long)]
    pub pty_dir: Option<PathBuf>,
}

/// MCP options of `labctl run`: off unless asked (docs/mcp.md).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct McpArgs {
    /// Serve MCP (Model Context Protocol, streamable HTTP at /mcp) for AI agents on this address, e.g.
    /// 127.0.0.1:8765; port 0 picks a free one and prints it. Clear text: loopback only unless the lab
    /// file sets interfaces.allow_cleartext_on_network. Off by default, unless the lab file's
    /// interfaces.mcp.listen sets it (this option wins).
    #[arg(long = "mcp", value_name = "ADDR")]
    pub mcp: Option<std::net::SocketAddr>,
    /// Serve MCP over HTTPS on this address (certificate in DATA_DIR/tls/, made on first start); port 0
    /// picks a free one and prints it. Off by default, unless the lab file's interfaces.mcp.tls_listen sets
    /// it (this option wins).
    #[arg(long = "mcp-tls", value_name = "ADDR")]
    pub mcp_tls: Option<std::net::SocketAddr>,
}

impl McpArgs {
    /// The command line's addresses, or else the lab file's (`interfaces.mcp`).
    pub fn or_lab(self, lab: &labctl_protocols::lab::McpInterface) -> McpArgs {
        McpArgs {
            mcp: self.mcp.or(lab.listen),
            mcp_tls: self.mcp_tls.or(lab.tls_listen),
        }
    }
}

/// The default address of the browser console (docs/console.md).
pub const DEFAULT_WEB: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// Browser console options of `labctl run`: on by default at http://127.0.0.1:8080/ (docs/console.md).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WebArgs {
    /// Serve the technicians' console in the browser on this address (default 127.0.0.1:8080); port 0
    /// picks a free one and prints it. Clear text: loopback only unless the lab file sets
    /// interfaces.allow_cleartext_on_network.
    #[arg(long = "web", value_name = "ADDR", conflicts_with = "no_web")]
    pub web: Option<std::net::SocketAddr>,
    /// Serve the console over HTTPS on this address (certificate in DATA_DIR/tls/, made on first start);
    /// port 0 picks a free one and prints it. Without --web, the console is then served over HTTPS only.
    #[arg(long = "web-tls", value_name = "ADDR", conflicts_with = "no_web")]
    pub web_tls: Option<std::net::SocketAddr>,
    /// Do not serve the browser console.
    #[arg(long)]
    pub no_web: bool,
}

impl WebArgs {
    /// The clear-text address to serve, and whether it was asked for (not the default).
    fn cleartext(&self) -> Option<(std::net::SocketAddr, bool)> {
        match (self.no_web, self.web, self.web_tls) {
            (true, _, _) => None,
            (false, Some(addr), _) => Some((addr, true)),
            (false, None, Some(_)) => None,
            (false, None, None) => Some((DEFAULT_WEB, false)),
        }
    }
}

/// MQTT options of `labctl run` (separate from [`RunArgs`] so code that builds a `RunArgs` is unaffected).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MqttArgs {
    /// An external MQTT broker (`mqtt://host:port`) instead of the embedded one; credentials from
    /// LABCTL_MQTT_USER and LABCTL_MQTT_PASSWORD (or LABCTL_MQTT_PASSWORD_FILE).
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Port of the embedded MQTT broker (default: the lab file's, 1883); 0 picks a free port and prints it.
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// Port of the embedded broker's MQTT-over-TLS listener (on the lab file's `interfaces.mqtt.tls_listen`
    /// host, else 127.0.0.1); 0 picks a free port and prints it. Default: the lab file's, else none.
    #[arg(long)]
    pub mqtt_tls_port: Option<u16>,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LABCTL_LOG").unwrap_or_else(|_| {
        "info,mqtt5=warn,opcua_server=warn,opcua_core=warn,opcua_crypto=warn".into()
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(
    args: RunArgs,
    mqtt: MqttArgs,
    command_port: CommandPortArgs,
    opcua: OpcUaArgs,
    mcp: McpArgs,
    web: WebArgs,
) -> ExitCode {
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labctl run: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run_async(args, mqtt, command_port, opcua, mcp, web)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labctl run: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_async(
    args: RunArgs,
    mqtt_args: MqttArgs,
    command_port_args: CommandPortArgs,
    opcua_args: OpcUaArgs,
    mcp_args: McpArgs,
    web_args: WebArgs,
) -> Result<(), String> {
    let signals = shutdown_signal();
    let (mut lab, text) = if args.sim {
        (Lab::sim(), SIM_LAB_TOML.to_owned())
    } else {
        let path = args
            .config
            .clone()
            .ok_or("--config LAB.toml or --sim is required")?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        (
            Lab::from_toml_str(&text, &path.display().to_string()).map_err(|e| e.to_string())?,
            text,
        )
    };
    if let Some(id) = &args.lab_id {
        if !labctl_protocols::lab::is_identifier(id) {
            return Err(format!(
                "--lab-id {id:?}: letters, digits, '-' and '_' only"
            ));
        }
        lab.lab_id = id.clone();
    }
    if !(args.tick_hz > 0.0 && args.tick_hz <= 10_000.0) {
        return Err(format!(
            "--tick-hz {}: expected more than 0 and at most 10000",
            args.tick_hz
        ));
    }
    if args.config.is_some() && args.warp != 1.0 && !args.simulated_instruments {
        return Err(format!(
            "--warp {} with --config: real instruments run in real time; add --simulated-instruments \
             only if the lab file's instruments are simulators running at that warp",
            args.warp
        ));
    }
    let mcp_args = mcp_args.or_lab(&lab.interfaces.mcp);
    if let Some(listen) = mcp_args.mcp {
        // Refused before any instrument is touched.
        crate::auth::check_cleartext_listener(
            "MCP over HTTP",
            listen,
            lab.interfaces.allow_cleartext_on_network,
        )
        .map_err(|e| e.to_string())?;
    }
    if let Some((listen, _)) = web_args.cleartext() {
        crate::auth::check_cleartext_listener(
            "browser console over HTTP",
            listen,
            lab.interfaces.allow_cleartext_on_network,
        )
        .map_err(|e| e.to_string())?;
    }
    let warped = args.sim || args.simulated_instruments;
    // One table of users for every face: the login limits hold for the controller as a whole.
    let users = std::sync::Arc::new(crate::auth::Users::from_lab(&lab).map_err(|e| e.to_string())?);
    if !warped {
        // The development passwords are in the documentation: on real instruments they open the lab to
        // anyone who has read it.
        let checked = users.clone();
        let dev = tokio::task::spawn_blocking(move || checked.with_development_passwords())
            .await
            .map_err(|e| format!("checking the users' passwords: {e}"))?;
        if !dev.is_empty() {
            return Err(format!(
                "user(s) {} have a development password of the simulated lab (docs/lab-file.md); on real \
                 instruments give each a password of its own (labctl passwd)",
                dev.join(", ")
            ));
        }
    }
    let clock = VirtualClock::new(if warped { args.warp } else { 1.0 })
        .map_err(|e| format!("--warp: {e}"))?;
    // One controller per data directory, decided before any instrument is touched: a second one would
    // mark the first one's runs interrupted and fight it for the ports.
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("data directory {}: {e}", args.data_dir.display()))?;
    let _data_dir_lock =
        crate::journal::lock_data_dir(&args.data_dir).map_err(|e| e.to_string())?;
    let estop = EStop::default();
    let runtime_options = crate::lab_runtime::RuntimeOptions {
        seed: args.seed,
        pty_dir: args.pty_dir.clone(),
        simulated_instruments: args.simulated_instruments,
    };
    let runtime = crate::lab_runtime::connect(&lab, &runtime_options, clock, &estop)
        .await
        .map_err(|e| e.to_string())?;
    let config = ControllerConfig {
        lab: lab.clone(),
        lab_sha256: sha256_hex(text.as_bytes()),
        data_dir: args.data_dir.clone(),
        clock,
        // Simulated instruments answer over real ptys and sockets whatever the warp.
        step_timeout_floor: if runtime.sim.is_some() || args.simulated_instruments {
            Duration::from_secs(10)
        } else {
            Duration::ZERO
        },
        tick: TickConfig {
            period: Duration::from_secs_f64(1.0 / args.tick_hz),
            spin: Duration::from_micros(args.tick_spin_us),
            realtime_priority: args.tick_priority,
        },
        labware: runtime.labware_loader(),
    };
    let instruments: BTreeMap<String, InstrumentHandle> = runtime.instruments.clone();
    let controller = start(config, instruments, estop)
        .await
        .map_err(|e| e.to_string())?;
    if !controller.interrupted.is_empty() {
        tracing::warn!(runs = ?controller.interrupted, "runs active when the controller last stopped are now interrupted; they will not resume");
    }
    say!(
        "labctl {} running lab {} (data in {})",
        env!("CARGO_PKG_VERSION"),
        lab.lab_id,
        args.data_dir.display()
    );
    for line in &runtime.endpoints {
        say!("  {line}");
    }
    let api = controller.handle.clone();
    // Durable run states and results, one line each, for rigs and people watching the console.
    let mut committed = api.events();
    tokio::spawn(async move {
        use crate::journal::Record;
        loop {
            match committed.recv().await {
                Ok(record) => match &*record {
                    Record::Result {
                        run_id,
                        seq,
                        name,
                        instrument,
                        ..
                    } => {
                        say!("result {run_id} {seq} {name} {instrument}")
                    }
                    Record::RunState {
                        run_id,
                        state,
                        reason,
                        ..
                    } => {
                        say!(
                            "run {run_id} {state}{}",
                            reason
                                .as_deref()
                                .map(|r| format!(" ({r})"))
                                .unwrap_or_default()
                        )
                    }
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    say!("(skipped {n} journal lines)")
                }
                Err(_) => return,
            }
        }
    });
    let mqtt = start_mqtt(&args, &mqtt_args, &lab, api.clone(), users.clone()).await?;
    let command_port = crate::gateways::command_port::start(
        &command_port_args,
        &lab,
        &args.data_dir,
        api.clone(),
        users.clone(),
    )
    .await
    .map_err(|e| e.to_string())?;
    for line in command_port.endpoints() {
        say!("  {line}");
    }
    let mcp = start_mcp(&mcp_args, &lab, &args.data_dir, &api, &users).await?;
    for server in &mcp {
        say!("  mcp: {}", server.url());
    }
    let web = start_web(&web_args, &lab, &args.data_dir, &api, &users).await?;
    for console in &web {
        say!("  web: {}", console.url());
    }
    let local = Principal::new("local-operator", Role::Technician, Face::Cli);
    for path in &args.submit {
        let bytes = labctl_protocols::validate::read_protocol_file(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let reply = api.submit(bytes, local.clone()).await;
        say!(
            "submitted {}: {}",
            path.display(),
            serde_json::to_string(&reply).unwrap_or_default()
        );
    }
    // After the submissions: the first start creates the server's RSA key, which must not delay them.
    let opcua = crate::gateways::opcua::start_for_run(
        &opcua_args,
        args.sim,
        &lab,
        &args.data_dir,
        api.clone(),
        users,
    )
    .await
    .map_err(|e| e.to_string())?;
    match &opcua {
        Some(server) => say!("  {}", server.banner()),
        None if !opcua_args.no_opcua => say!("  opcua: not started (see the log)"),
        None => {}
    }
    signals.await;
    say!("labctl: shutting down, leaving instruments safe");
    controller.shutdown().await;
    // After the controller: the aborted runs' last states reach MQTT before `offline`.
    if let Some(gw) = mqtt {
        gw.shutdown().await;
    }
    if let Some(server) = opcua {
        server.shutdown().await;
    }
    for server in mcp {
        server.shutdown();
    }
    drop(web);
    runtime.shutdown().await;
    Ok(())
}

/// Starts the browser console: over HTTP (`--web`, else the default address unless `--no-web` or only
/// `--web-tls`) and over HTTPS (`--web-tls`). The default address being taken is not fatal (another
/// controller on this machine may hold it): the log says so and `--web ADDR` picks another.
async fn start_web(
    args: &WebArgs,
    lab: &Lab,
    data_dir: &std::path::Path,
    api: &crate::api::ControllerHandle,
    users: &std::sync::Arc<crate::auth::Users>,
) -> Result<Vec<crate::gateways::web::WebConsole>, String> {
    use crate::gateways::web::{WebOptions, serve};
    let mut consoles = Vec::new();
    if let Some((listen, asked)) = args.cleartext() {
        let options = WebOptions {
            listen,
            tls: None,
            allow_cleartext_on_network: lab.interfaces.allow_cleartext_on_network,
        };
        match serve(options, api.clone(), users.clone()).await {
            Ok(console) => consoles.push(console),
            Err(e) if !asked => {
                tracing::warn!(error = %e, "browser console not started; choose an address with --web ADDR");
                say!("  web: not started ({e})");
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    if let Some(listen) = args.web_tls {
        let files = crate::tls::load_or_create(data_dir, &[listen.ip().to_string()])
            .map_err(|e| format!("--web-tls: {e}"))?;
        let options = WebOptions {
            listen,
            tls: Some(files.config),
            allow_cleartext_on_network: lab.interfaces.allow_cleartext_on_network,
        };
        consoles.push(
            serve(options, api.clone(), users.clone())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(consoles)
}

/// Starts MCP over streamable HTTP (`--mcp`) and over HTTPS (`--mcp-tls`), when asked.
async fn start_mcp(
    args: &McpArgs,
    lab: &Lab,
    data_dir: &std::path::Path,
    api: &crate::api::ControllerHandle,
    users: &std::sync::Arc<crate::auth::Users>,
) -> Result<Vec<crate::gateways::mcp::http::McpHttp>, String> {
    use crate::gateways::mcp::http::{HttpOptions, serve};
    let mut servers = Vec::new();
    if let Some(listen) = args.mcp {
        let options = HttpOptions {
            listen,
            tls: None,
            allow_cleartext_on_network: lab.interfaces.allow_cleartext_on_network,
        };
        servers.push(
            serve(options, api.clone(), users.clone())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    if let Some(listen) = args.mcp_tls {
        let files = crate::tls::load_or_create(data_dir, &[listen.ip().to_string()])
            .map_err(|e| format!("--mcp-tls: {e}"))?;
        let options = HttpOptions {
            listen,
            tls: Some(files.config),
            allow_cleartext_on_network: lab.interfaces.allow_cleartext_on_network,
        };
        servers.push(
            serve(options, api.clone(), users.clone())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(servers)
}

/// Starts the MQTT gateway: on an external broker (`--mqtt` or the lab file's `interfaces.mqtt.url`) or on
/// the embedded one. When the embedded broker cannot bind its default port (another labctl has it), the
/// controller runs without MQTT and says so; a port given with --mqtt-port must bind.
async fn start_mqtt(
    args: &RunArgs,
    mqtt: &MqttArgs,
    lab: &Lab,
    api: crate::api::ControllerHandle,
    users: std::sync::Arc<crate::auth::Users>,
) -> Result<Option<crate::gateways::mqtt::MqttGateway>, String> {
    use crate::gateways::mqtt::{BrokerChoice, MqttConfig, MqttGateway};
    let url = mqtt
        .mqtt
        .clone()
        .or_else(|| lab.interfaces.mqtt.url.clone());
    let broker = match url {
        Some(url) => BrokerChoice::External {
            url,
            credentials: labctl_mqtt_link::credentials_from_env().map_err(|e| e.to_string())?,
        },
        None => {
            let mut listen: std::net::SocketAddr =
                lab.interfaces.mqtt.listen.parse().map_err(|e| {
                    format!(
                        "interfaces.mqtt.listen {:?}: {e}",
                        lab.interfaces.mqtt.listen
                    )
                })?;
            if let Some(port) = mqtt.mqtt_port {
                listen.set_port(port);
            }
            crate::auth::check_cleartext_listener(
                "the embedded MQTT broker",
                listen,
                lab.interfaces.allow_cleartext_on_network,
            )
            .map_err(|e| e.to_string())?;
            BrokerChoice::Embedded(listen)
        }
    };
    let embedded = matches!(broker, BrokerChoice::Embedded(_));
    let tls_listen = match (&lab.interfaces.mqtt.tls_listen, mqtt.mqtt_tls_port) {
        _ if !embedded => None,
        (Some(text), port) => {
            let mut addr: std::net::SocketAddr = text
                .parse()
                .map_err(|e| format!("interfaces.mqtt.tls_listen {text:?}: {e}"))?;
            if let Some(port) = port {
                addr.set_port(port);
            }
            Some(addr)
        }
        (None, Some(port)) => Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        (None, None) => None,
    };
    let config = MqttConfig {
        lab: lab.clone(),
        data_dir: args.data_dir.clone(),
        broker,
        users,
        tls_listen,
    };
    match MqttGateway::start(api, config).await {
        Ok(gw) => {
            say!(
                "  mqtt: {} ({})",
                gw.broker_addr,
                if embedded {
                    "embedded broker"
                } else {
                    "external broker"
                }
            );
            if let Some(addr) = gw.tls_addr {
                say!(
                    "  mqtts: {addr} (embedded broker, TLS; clients trust {})",
                    args.data_dir
                        .join(crate::tls::TLS_DIR)
                        .join(crate::tls::CERT_FILE)
                        .display()
                );
            }
            Ok(Some(gw))
        }
        Err(e) if embedded && mqtt.mqtt_port.is_none() => {
            tracing::error!(error = %e, "MQTT gateway not started; the controller runs without it");
            say!("  mqtt: not started ({e})");
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Registers the SIGINT and SIGTERM handlers at once, so that a signal arriving while the controller is
/// still starting (the OPC UA server builds its address space last) stops it cleanly instead of killing
/// it; the returned future completes at the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        async move {
            let term = async move {
                match term {
                    Some(mut term) => {
                        term.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let interrupt = async move {
                match interrupt {
                    Some(mut interrupt) => {
                        interrupt.recv().await;
                    }
                    None => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            tokio::select! {
                _ = term => {}
                _ = interrupt => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
