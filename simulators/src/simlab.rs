//! The whole simulated lab in one call: every instrument of `sim-lab.md` served at the wire level on real
//! ptys (the three pumps on one shared line) and the spectrometer on TCP, over one [`LabModel`], one clock
//! and one seed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), labctl_simulators::SimLabError> {
//! use labctl_simulators::{SimLab, SimLabConfig};
//! let lab = SimLab::start(SimLabConfig::default()).await?;
//! for endpoint in lab.endpoints() {
//!     println!("{} {:?}", endpoint.id, endpoint.kind);
//! }
//! lab.faults("balance").unwrap().unplug().await?; // the balance's pty closes: clients read EOF
//! lab.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use labctl_protocols::Lab;
use labctl_protocols::instrument_def::ModbusTransport;
use labctl_protocols::lab::Transport;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::devices::defined::DefinedDevice;
use crate::devices::defined_modbus::DefinedModbusDevice;
use crate::devices::grbl::{Grbl, GrblConfig};
use crate::devices::mtsics::{MtSics, MtSicsConfig};
use crate::devices::namur::{Namur, NamurConfig};
use crate::devices::ne1000::{Ne1000, Ne1000Config, PumpWiring};
use crate::devices::scpi::{Scpi, ScpiConfig};
use crate::devices::{Device, LineSettings};
use crate::model::{
    ConfigError, DeckPosition, FaultConfig, InstrumentId, LabConfig, LabModel, Stationed,
};
use crate::serve::tap::WireTap;
use crate::serve::{self, Listen, PortSpec, PortStatus, SharedLab};
use labctl_clock::{Clock, ClockError, LabClock, ManualClock, VirtualClock};

/// Port name of the shared pump line (also accepted where an instrument id is expected: all pumps).
pub const PUMP_LINE: &str = "pumps";

/// How long [`FaultHandle::unplug`] and [`FaultHandle::replug`] wait for the port to follow (real time).
const PLUG_TIMEOUT: Duration = Duration::from_secs(5);

/// A simulated lab that cannot start or be changed.
#[derive(Debug, Error)]
pub enum SimLabError {
    #[error("invalid simulated lab: {0}")]
    Config(#[from] ConfigError),
    #[error("invalid clock: {0}")]
    Clock(#[from] ClockError),
    #[error(
        "unknown instrument {0:?} (expected gantry, pumps, a pump's id, balance, hotplate or spectro)"
    )]
    UnknownInstrument(String),
    #[error("fault file: {0}")]
    FaultFile(String),
    #[error("cannot serve {port}: {source}")]
    Io {
        port: String,
        #[source]
        source: std::io::Error,
    },
    #[error("port {0} did not follow the fault change in time")]
    Timeout(String),
    #[error("{instrument}: cannot simulate its definition: {reason}")]
    Definition { instrument: String, reason: String },
}

/// The clock of the lab.
#[derive(Debug, Clone)]
pub enum ClockConfig {
    /// Real time times this warp factor (1 = real time).
    Warp(f64),
    /// A test clock the caller advances; clones share the time.
    Manual(ManualClock),
}

/// Identity strings and behaviour settings of each simulated instrument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Identities {
    pub gantry: GrblConfig,
    pub pumps: Ne1000Config,
    pub balance: MtSicsConfig,
    pub hotplate: NamurConfig,
    pub spectro: ScpiConfig,
}

/// Fault settings by instrument id (`pumps` means every pump), as in a `--faults` TOML file:
///
/// ```toml
/// [balance]
/// drift_per_hour = 0.002
/// [pump-blue]
/// error_code = "S"
/// [spectro]
/// latency_ms = 200
/// ```
pub type FaultsById = BTreeMap<String, FaultConfig>;

/// Parses a faults file.
pub fn parse_faults(text: &str) -> Result<FaultsById, SimLabError> {
    toml::from_str(text).map_err(|e| SimLabError::FaultFile(e.to_string()))
}

/// Everything [`SimLab::start`] needs.
#[derive(Debug, Clone)]
pub struct SimLabConfig {
    /// The physical model.
    pub model: LabConfig,
    /// The lab file: instrument ids and the pumps' network addresses.
    pub lab: Lab,
    /// Seed of every random stream (model noise and byte-level fault damage).
    pub seed: u64,
    pub clock: ClockConfig,
    /// Directory for stable symlinks `<port>.pty` to the ptys (`gantry.pty`, `pumps.pty`, `balance.pty`,
    /// `hotplate.pty`).
    pub pty_dir: Option<PathBuf>,
    /// Where the spectrometer listens (port 0 picks a free one).
    pub spectro_addr: SocketAddr,
    /// Faults from the start, by instrument id.
    pub faults: FaultsById,
    /// Delay serial output by its wire time (characters × bits / baud).
    pub wire_timing: bool,
    pub identities: Identities,
}

impl Default for SimLabConfig {
    fn default() -> Self {
        SimLabConfig {
            model: LabConfig::sim_default(),
            lab: Lab::sim(),
            seed: 0,
            clock: ClockConfig::Warp(1.0),
            pty_dir: None,
            spectro_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            faults: FaultsById::new(),
            wire_timing: true,
            identities: Identities::default(),
        }
    }
}

/// How a client reaches an instrument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum EndpointKind {
    /// A pseudo-terminal: open `link` (stable) or `path`, set the line settings.
    Pty {
        path: Option<PathBuf>,
        link: Option<PathBuf>,
        line: LineSettings,
    },
    /// A raw TCP socket.
    Tcp { address: SocketAddr },
}

/// Where one instrument is, right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Instrument id, as in the lab file.
    pub id: String,
    /// The port serving it (`pumps` for the shared pump line, else the id).
    pub port: String,
    /// Wire protocol, as the lab file's `driver`.
    pub protocol: &'static str,
    /// Network address on a shared line (NE-1000 pumps), as the lab file's `address`.
    pub network_address: Option<u8>,
    /// Plugged in.
    pub open: bool,
    #[serde(flatten)]
    pub kind: EndpointKind,
}

impl Endpoint {
    /// The lab-file transport a driver uses to reach this endpoint (the symlink when there is one).
    pub fn transport(&self) -> Option<Transport> {
        match &self.kind {
            EndpointKind::Pty { path, link, line } => {
                let port = link.as_ref().or(path.as_ref())?;
                Some(Transport::Serial(line.serial_line(&port.to_string_lossy())))
            }
            EndpointKind::Tcp { address } => Some(Transport::Tcp {
                address: address.to_string(),
            }),
        }
    }

    /// The pty or TCP address as one string (`/dev/pts/3`, `127.0.0.1:5025`), `-` when unplugged.
    pub fn location(&self) -> String {
        match &self.kind {
            EndpointKind::Pty { path: Some(p), .. } if self.open => p.display().to_string(),
            EndpointKind::Tcp { address } if self.open => address.to_string(),
            _ => "-".into(),
        }
    }

    /// `115200 8N1`, or `tcp`.
    pub fn line_label(&self) -> String {
        match &self.kind {
            EndpointKind::Pty { line, .. } => line.label(),
            EndpointKind::Tcp { .. } => "tcp".into(),
        }
    }
}

struct PortInfo {
    name: String,
    protocol: &'static str,
    line: Option<LineSettings>,
    instruments: Vec<InstrumentId>,
    status: watch::Receiver<PortStatus>,
    control: Arc<Notify>,
    tap: WireTap,
}

struct InstrumentInfo {
    id: String,
    /// The model's part it is.
    part: InstrumentId,
    port: usize,
    address: Option<u8>,
}

/// Starts simulated labs.
pub struct SimLab;

impl SimLab {
    /// Builds the model, applies the initial faults and serves every instrument. Call inside a tokio
    /// runtime; the ports run as tasks until [`SimLabHandle::shutdown`] (or until the handle is dropped).
    pub async fn start(config: SimLabConfig) -> Result<SimLabHandle, SimLabError> {
        let clock = match &config.clock {
            ClockConfig::Warp(warp) => LabClock::Virtual(VirtualClock::new(*warp)?),
            ClockConfig::Manual(manual) => LabClock::Manual(manual.clone()),
        };
        let mut model = LabModel::new(
            with_more_stationed(&config.model, &config.lab)?,
            config.seed,
        )?;
        let now = clock.now();
        for inst in config
            .lab
            .instruments
            .iter()
            .filter(|i| i.defined().is_some())
        {
            model.add_defined(&inst.id);
        }
        let lab_names = lab_names(&config.lab);
        for (name, faults) in &config.faults {
            faults.validate(&format!("faults.{name}"))?;
            for id in resolve(&model, &lab_names, name)? {
                model.set_faults(now, id, faults.clone())?;
            }
        }
        let wiring: Vec<PumpWiring> = (0..model.pump_count())
            .map(|index| {
                let id = &model.config().pumps[index].id;
                let address = config
                    .lab
                    .instrument(id)
                    .and_then(|i| i.address)
                    .unwrap_or(index as u8 + 1);
                PumpWiring { index, address }
            })
            .collect();
        let identities = &config.identities;
        let mut devices: Vec<(String, Box<dyn Device>)> = vec![
            (
                "gantry".into(),
                Box::new(Grbl::new(identities.gantry.clone(), &model)),
            ),
            (
                PUMP_LINE.into(),
                Box::new(Ne1000::new(identities.pumps.clone(), &wiring)),
            ),
            (
                "balance".into(),
                Box::new(MtSics::new(identities.balance.clone())),
            ),
            (
                "hotplate".into(),
                Box::new(Namur::new(identities.hotplate.clone())),
            ),
            (
                "spectro".into(),
                Box::new(Scpi::new(identities.spectro.clone())),
            ),
        ];
        // Each further balance of the lab is an MT-SICS balance on a port of its own, named by its id.
        for (k, more) in model.config().more_balances.clone().iter().enumerate() {
            let Some(inst) = config.lab.instrument(&more.id) else {
                continue;
            };
            // Its own serial number, so provenance tells the balances apart.
            let identity = MtSicsConfig {
                serial: format!("{}-{}", identities.balance.serial, k + 2),
                ..identities.balance.clone()
            };
            devices.push((
                inst.id.clone(),
                Box::new(MtSics::of_balance(identity, k + 1)),
            ));
        }
        // And each further hotplate an IKA NAMUR hotplate stirrer.
        for (k, more) in model.config().more_hotplates.clone().iter().enumerate() {
            let Some(inst) = config.lab.instrument(&more.id) else {
                continue;
            };
            devices.push((
                inst.id.clone(),
                Box::new(Namur::of_hotplate(identities.hotplate.clone(), k + 1)),
            ));
        }
        let mut defined_names: HashMap<InstrumentId, (String, Option<u8>)> = HashMap::new();
        let mut buses: Vec<RtuBus> = Vec::new();
        // Each instrument with a definition gets its simulator from the definition, on a port of its own.
        // Modbus RTU instruments the lab file puts on one serial port share one simulated RS-485 line.
        for (k, inst) in config.lab.instruments.iter().enumerate() {
            if let Some(definition) = inst.defined() {
                let id = model.add_defined(&inst.id);
                let seed = config.seed ^ (k as u64 + 101);
                let unit = inst.modbus_unit_id();
                defined_names.insert(id, (inst.id.clone(), unit));
                if let (Transport::Serial(line), Some(ModbusTransport::Rtu), Some(unit)) =
                    (&inst.transport, inst.modbus_transport(), unit)
                {
                    let member = (Arc::clone(definition), id, unit, seed);
                    match buses.iter_mut().find(|b| b.port == line.port) {
                        Some(bus) => {
                            bus.members.push(member);
                            bus.ids.push(inst.id.clone());
                        }
                        None => buses.push(RtuBus {
                            port: line.port.clone(),
                            line: LineSettings {
                                baud: line.baud,
                                data_bits: line.data_bits,
                                parity: line.parity,
                                stop_bits: line.stop_bits,
                            },
                            members: vec![member],
                            ids: vec![inst.id.clone()],
                        }),
                    }
                    continue;
                }
                let device: Box<dyn Device> =
                    match DefinedModbusDevice::new(Arc::clone(definition), id, seed) {
                        Some(modbus) => Box::new(modbus.at_unit(unit.unwrap_or(1))),
                        None => Box::new(
                            DefinedDevice::new(Arc::clone(definition), id, seed).map_err(|e| {
                                SimLabError::Definition {
                                    instrument: inst.id.clone(),
                                    reason: e.to_string(),
                                }
                            })?,
                        ),
                    };
                devices.push((inst.id.clone(), device));
            }
        }
        for bus in buses {
            // One instrument keeps its id as the port's name; a shared line is named after its port.
            let name = match bus.ids.as_slice() {
                [one] => one.clone(),
                _ => bus_port_name(&bus.port),
            };
            let device = DefinedModbusDevice::bus(bus.members, bus.line).map_err(|reason| {
                SimLabError::Definition {
                    instrument: bus.ids.join(", "),
                    reason,
                }
            })?;
            devices.push((name, Box::new(device)));
        }
        let mut instruments = Vec::new();
        for (port, (port_name, device)) in devices.iter().enumerate() {
            for id in device.instruments() {
                let (name, address) = match *id {
                    InstrumentId::Pump(i) => (
                        model.config().pumps[i].id.clone(),
                        wiring.iter().find(|w| w.index == i).map(|w| w.address),
                    ),
                    InstrumentId::Defined(_) => defined_names
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| (port_name.clone(), None)),
                    InstrumentId::Balance(1..) | InstrumentId::Hotplate(1..) => {
                        (port_name.clone(), None)
                    }
                    other => (
                        lab_names
                            .get(&other)
                            .cloned()
                            .unwrap_or_else(|| instrument_name(other).to_owned()),
                        None,
                    ),
                };
                instruments.push(InstrumentInfo {
                    id: name,
                    part: *id,
                    port,
                    address,
                });
            }
        }
        if let Some(dir) = &config.pty_dir {
            std::fs::create_dir_all(dir).map_err(|source| SimLabError::Io {
                port: format!("pty directory {}", dir.display()),
                source,
            })?;
        }
        let lab = SharedLab {
            model: Arc::new(Mutex::new(model)),
            clock,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut handle = SimLabHandle {
            lab: lab.clone(),
            ports: Vec::new(),
            instruments,
            shutdown,
            tasks: Vec::new(),
        };
        for (k, (name, device)) in devices.into_iter().enumerate() {
            let listen = match device.line() {
                Some(_) => Listen::Pty {
                    link: config
                        .pty_dir
                        .as_ref()
                        .map(|d| d.join(format!("{name}.pty"))),
                },
                // The spectrophotometer where the caller asked; a Modbus TCP instrument on a free port.
                None if name == "spectro" => Listen::Tcp(config.spectro_addr),
                None => Listen::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            };
            let protocol = device.protocol();
            let line = device.line();
            let instruments = device.instruments().to_vec();
            let spec = PortSpec {
                name: name.to_owned(),
                device,
                listen,
                wire_timing: config.wire_timing,
                seed: config.seed ^ (k as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F),
            };
            let port = serve::spawn_port(spec, lab.clone(), shutdown_rx.clone())
                .await
                .map_err(|source| SimLabError::Io {
                    port: name.to_owned(),
                    source,
                })?;
            handle.ports.push(PortInfo {
                name: port.name,
                protocol,
                line,
                instruments,
                status: port.status,
                control: port.control,
                tap: port.tap,
            });
            handle.tasks.push(port.task);
        }
        Ok(handle)
    }
}

/// Modbus RTU units a lab file puts on one serial port.
struct RtuBus {
    port: String,
    line: LineSettings,
    members: Vec<(
        Arc<labctl_protocols::instrument_def::InstrumentDefinition>,
        InstrumentId,
        u8,
        u64,
    )>,
    ids: Vec<String>,
}

/// `modbus-ttyUSB0` for `/dev/ttyUSB0`: the simulated line's port name (never an instrument id, so a fault
/// set by instrument id stays that unit's).
fn bus_port_name(port: &str) -> String {
    let base = port.rsplit(['/', '\\']).next().unwrap_or(port);
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("modbus-{clean}")
}

fn instrument_name(id: InstrumentId) -> &'static str {
    match id {
        InstrumentId::Gantry => "gantry",
        InstrumentId::Balance(_) => "balance",
        InstrumentId::Hotplate(_) => "hotplate",
        InstrumentId::Spectro => "spectro",
        InstrumentId::Pump(_) => PUMP_LINE,
        InstrumentId::Defined(_) => "defined",
    }
}

/// `model` with a balance and a hotplate for each of the lab's balances and hotplates beyond the first of
/// each kind, each on the lab's deck station for it (added to the model's deck where the model has no
/// position of that name).
fn with_more_stationed(model: &LabConfig, lab: &Lab) -> Result<LabConfig, SimLabError> {
    use labctl_protocols::InstrumentKind;
    let mut model = model.clone();
    let spots = lab.deck.positions();
    for kind in [InstrumentKind::Balance, InstrumentKind::Hotplate] {
        let further = lab.instruments.iter().filter(|i| i.kind == kind).skip(1);
        for inst in further {
            let more = match kind {
                InstrumentKind::Balance => &model.more_balances,
                _ => &model.more_hotplates,
            };
            if more.iter().any(|b| b.id == inst.id) {
                continue;
            }
            let Some(spot) = spots
                .iter()
                .find(|p| p.instrument.as_deref() == Some(inst.id.as_str()))
            else {
                return Err(SimLabError::Config(ConfigError::invalid(
                    format!("deck.stations (for {})", inst.id),
                    format!(
                        "a simulated second {kind} needs a deck station naming it (where it stands)"
                    ),
                )));
            };
            if !model.deck.positions.iter().any(|p| p.name == spot.name) {
                model.deck.positions.push(DeckPosition::new(
                    spot.name.clone(),
                    spot.x_mm,
                    spot.y_mm,
                    spot.z_mm,
                ));
            }
            let stationed = Stationed {
                id: inst.id.clone(),
                station: spot.name.clone(),
            };
            match kind {
                InstrumentKind::Balance => model.more_balances.push(stationed),
                _ => model.more_hotplates.push(stationed),
            }
        }
    }
    Ok(model)
}

/// The lab file's ids of the parts the model has a first one of (its first gantry, balance, hotplate and
/// spectrophotometer), whatever the lab calls them: a lab's `scale` is the model's balance 0.
fn lab_names(lab: &Lab) -> HashMap<InstrumentId, String> {
    use labctl_protocols::InstrumentKind;
    [
        (InstrumentKind::Gantry, InstrumentId::Gantry),
        (InstrumentKind::Balance, InstrumentId::Balance(0)),
        (InstrumentKind::Hotplate, InstrumentId::Hotplate(0)),
        (InstrumentKind::Spectrophotometer, InstrumentId::Spectro),
    ]
    .into_iter()
    .filter_map(|(kind, part)| {
        let first = lab.instruments.iter().find(|i| i.kind == kind)?;
        Some((part, first.id.clone()))
    })
    .collect()
}

/// The model instruments a name stands for (`pumps`: every pump; a lab id of a first part: that part).
fn resolve(
    model: &LabModel,
    lab_names: &HashMap<InstrumentId, String>,
    name: &str,
) -> Result<Vec<InstrumentId>, SimLabError> {
    if name == PUMP_LINE {
        return Ok((0..model.pump_count()).map(InstrumentId::Pump).collect());
    }
    if let Some((part, _)) = lab_names.iter().find(|(_, id)| *id == name) {
        return Ok(vec![*part]);
    }
    model
        .instrument_id(name)
        .map(|id| vec![id])
        .ok_or_else(|| SimLabError::UnknownInstrument(name.to_owned()))
}

/// A running simulated lab.
pub struct SimLabHandle {
    lab: SharedLab,
    ports: Vec<PortInfo>,
    instruments: Vec<InstrumentInfo>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SimLabHandle {
    /// Every instrument's endpoint, in lab order (gantry, pumps, balance, hotplate, spectro).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.instruments
            .iter()
            .filter_map(|i| self.endpoint_of(i))
            .collect()
    }

    /// One instrument's endpoint.
    pub fn endpoint(&self, id: &str) -> Option<Endpoint> {
        self.instruments
            .iter()
            .find(|i| i.id == id)
            .and_then(|i| self.endpoint_of(i))
    }

    fn endpoint_of(&self, info: &InstrumentInfo) -> Option<Endpoint> {
        let port = self.ports.get(info.port)?;
        let status = port.status.borrow().clone();
        let kind = match (port.line, status.tcp) {
            (_, Some(address)) => EndpointKind::Tcp { address },
            (Some(line), None) => EndpointKind::Pty {
                path: status.pty,
                link: status.link,
                line,
            },
            (None, None) => return None,
        };
        Some(Endpoint {
            id: info.id.clone(),
            port: port.name.clone(),
            protocol: port.protocol,
            network_address: info.address,
            open: status.open,
            kind,
        })
    }

    /// The recording of what the host sent a port (`gantry`, `pumps`, `balance`, `hotplate`, `spectro`)
    /// or an instrument's port (`pump-red` gives the shared pump line), kept across unplug and replug.
    pub fn tap(&self, port_or_instrument: &str) -> Option<WireTap> {
        let port = match self.ports.iter().find(|p| p.name == port_or_instrument) {
            Some(port) => port,
            None => {
                let info = self
                    .instruments
                    .iter()
                    .find(|i| i.id == port_or_instrument)?;
                self.ports.get(info.port)?
            }
        };
        Some(port.tap.clone())
    }

    /// The last [`crate::serve::tap::DEFAULT_TAP_CAPACITY`] bytes the host sent a port (see
    /// [`SimLabHandle::tap`]), oldest first; empty for an unknown name.
    pub fn transcript(&self, port_or_instrument: &str) -> Vec<u8> {
        self.tap(port_or_instrument)
            .map(|t| t.contents())
            .unwrap_or_default()
    }

    /// Waits (real time, at most `timeout`) until the port's device has received and processed at least
    /// `bytes` bytes in all. With a manual clock this is how a test knows at which virtual time a command
    /// was taken.
    pub async fn wait_received(
        &self,
        port: &str,
        bytes: u64,
        timeout: Duration,
    ) -> Result<PortStatus, SimLabError> {
        self.wait_status(port, timeout, |s| s.received >= bytes)
            .await
    }

    /// Waits (real time, at most `timeout`) until the port has read at least `bytes` bytes from the host
    /// in all, whether or not they have crossed the line to the device yet: the virtual time a command
    /// started on the wire.
    pub async fn wait_heard(
        &self,
        port: &str,
        bytes: u64,
        timeout: Duration,
    ) -> Result<PortStatus, SimLabError> {
        self.wait_status(port, timeout, |s| s.heard >= bytes).await
    }

    async fn wait_status(
        &self,
        port: &str,
        timeout: Duration,
        done: impl FnMut(&PortStatus) -> bool,
    ) -> Result<PortStatus, SimLabError> {
        let mut status = self
            .ports
            .iter()
            .find(|p| p.name == port)
            .map(|p| p.status.clone())
            .ok_or_else(|| SimLabError::UnknownInstrument(port.to_owned()))?;
        match tokio::time::timeout(timeout, status.wait_for(done)).await {
            Ok(Ok(s)) => Ok(s.clone()),
            _ => Err(SimLabError::Timeout(port.to_owned())),
        }
    }

    /// The lab file with each instrument's transport pointing at its simulator (serial line on the pty,
    /// or TCP), so drivers can connect to it like to hardware.
    pub fn lab_file(&self, lab: &Lab) -> Lab {
        let mut lab = lab.clone();
        for instrument in &mut lab.instruments {
            if let Some(transport) = self.endpoint(&instrument.id).and_then(|e| e.transport()) {
                instrument.transport = transport;
            }
        }
        lab
    }

    /// Fault controls of an instrument, or of the whole pump line (`pumps`).
    pub fn faults(&self, id: &str) -> Option<FaultHandle> {
        let (ids, port) = if let Some(port) = self.ports.iter().find(|p| p.name == id) {
            (port.instruments.clone(), port)
        } else {
            let info = self.instruments.iter().find(|i| i.id == id)?;
            let port = self.ports.get(info.port)?;
            (vec![info.part], port)
        };
        Some(FaultHandle {
            name: id.to_owned(),
            ids,
            port_instruments: port.instruments.clone(),
            lab: self.lab.clone(),
            control: port.control.clone(),
            status: port.status.clone(),
        })
    }

    /// The shared model (for tests to inspect vials, spills, temperatures). Lock it only briefly.
    pub fn model(&self) -> Arc<Mutex<LabModel>> {
        self.lab.model.clone()
    }

    /// Runs `f` on the model at the current virtual time.
    pub fn with_model<R>(&self, f: impl FnOnce(&mut LabModel, Duration) -> R) -> R {
        let now = self.lab.clock.now();
        let mut model = self.lab.lock();
        f(&mut model, now)
    }

    pub fn clock(&self) -> &LabClock {
        &self.lab.clock
    }

    /// Current virtual time.
    pub fn now(&self) -> Duration {
        self.lab.clock.now()
    }

    /// Stops every port: ptys close, symlinks go, the socket stops listening.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for SimLabHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Changes one instrument's (or the pump line's) faults while the lab runs.
#[derive(Clone)]
pub struct FaultHandle {
    name: String,
    ids: Vec<InstrumentId>,
    port_instruments: Vec<InstrumentId>,
    lab: SharedLab,
    control: Arc<Notify>,
    status: watch::Receiver<PortStatus>,
}

impl FaultHandle {
    /// The current settings (of the first instrument, for the pump line).
    pub fn get(&self) -> FaultConfig {
        let model = self.lab.lock();
        self.ids
            .first()
            .and_then(|id| model.faults(*id).cloned())
            .unwrap_or_default()
    }

    /// Replaces the settings; the port applies them at once.
    pub fn set(&self, faults: FaultConfig) -> Result<(), SimLabError> {
        self.update(|f| *f = faults.clone())
    }

    /// Changes the settings in place.
    pub fn update(&self, change: impl Fn(&mut FaultConfig)) -> Result<(), SimLabError> {
        {
            let now = self.lab.clock.now();
            let mut model = self.lab.lock();
            for &id in &self.ids {
                let mut faults = model.faults(id).cloned().unwrap_or_default();
                change(&mut faults);
                model.set_faults(now, id, faults)?;
            }
        }
        self.control.notify_one();
        Ok(())
    }

    /// Back to no faults at all (plugged in).
    pub fn clear(&self) -> Result<(), SimLabError> {
        self.set(FaultConfig::default())
    }

    /// Pulls the cable: the instrument stops hearing and answering; when no instrument of its port is
    /// left, the pty closes (clients read EOF, the symlink goes) or the socket stops listening. Returns
    /// once the port has done so.
    pub async fn unplug(&self) -> Result<(), SimLabError> {
        self.update(|f| f.disconnected = true)?;
        let closes = {
            let model = self.lab.lock();
            self.port_instruments
                .iter()
                .all(|id| model.faults(*id).is_some_and(|f| f.disconnected))
        };
        if closes {
            self.wait_for(|s| !s.open).await?;
        }
        Ok(())
    }

    /// Plugs the cable back; returns the port's new status once it is open (a pty gets a new
    /// `/dev/pts/N`; the symlink follows).
    pub async fn replug(&self) -> Result<PortStatus, SimLabError> {
        self.update(|f| f.disconnected = false)?;
        self.wait_for(|s| s.open).await
    }

    async fn wait_for(
        &self,
        ready: impl Fn(&PortStatus) -> bool,
    ) -> Result<PortStatus, SimLabError> {
        let mut status = self.status.clone();
        match tokio::time::timeout(PLUG_TIMEOUT, status.wait_for(|s| ready(s))).await {
            Ok(Ok(s)) => Ok(s.clone()),
            _ => Err(SimLabError::Timeout(self.name.clone())),
        }
    }
}
