//! The lab file (TOML): what instruments a lab has, how to reach them, what they can do, and the safety
//! envelope that every command must stay inside.
//!
//! Loading checks the file as a whole (unique ids, envelopes inside capabilities, no clear-text passwords)
//! so that a lab that loads is a lab the validator and the controller can trust.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::capabilities::InstrumentKind;
use crate::instrument_def::{InstrumentDefinition, ModbusTransport, check_definition};
pub use crate::range::Range;
pub use crate::registry::Driver;
use crate::registry::InstrumentModel;
pub use crate::serial::{FlowControl, Parity, SerialLine};

/// The built-in simulated lab (`examples/sim-lab.toml`), used when no lab file is given.
pub const SIM_LAB_TOML: &str = include_str!("../../examples/sim-lab.toml");

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot read lab file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lab file {origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("lab file {origin}: {}", .problems.join("; "))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

/// A whole lab as the lab file describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lab {
    /// Short id used in MQTT topics and the OPC UA namespace (`urn:labctl:{lab_id}`).
    pub lab_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub approval: Approval,
    pub deck: Deck,
    pub instruments: Vec<Instrument>,
    #[serde(default)]
    pub interfaces: Interfaces,
    #[serde(default)]
    pub users: Vec<User>,
    /// Conditions checked every tick; a trip sends instruments to their safe state and pauses or fails runs.
    #[serde(default)]
    pub interlocks: Vec<Interlock>,
}

/// What a tripped interlock does to the runs using the instruments concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TripAction {
    /// Hold the run for a technician.
    Pause,
    /// Fail the run.
    #[default]
    Fail,
}

/// A condition on one instrument that must never hold while the lab runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interlock {
    pub name: String,
    pub instrument: String,
    /// Trip when this reported quantity goes above `above` or below `below`.
    #[serde(default)]
    pub quantity: Option<String>,
    #[serde(default)]
    pub above: Option<f64>,
    #[serde(default)]
    pub below: Option<f64>,
    /// Trip when the instrument reports an alarm (GRBL alarm, pump stall, hotplate watchdog).
    #[serde(default)]
    pub on_alarm: bool,
    /// Trip when the instrument has been silent past its `heartbeat_s`.
    #[serde(default)]
    pub on_silence: bool,
    #[serde(default)]
    pub action: TripAction,
    /// Instruments sent to their safe state on a trip; the interlock's own instrument when empty.
    #[serde(default)]
    pub safe_state: Vec<String>,
}

/// Limits on the quantities a command can set. The same shape serves for an instrument's capabilities
/// (what it can physically do) and its safety envelope (what this lab allows); the envelope must lie
/// inside the capabilities.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub x_mm: Option<Range>,
    pub y_mm: Option<Range>,
    pub z_mm: Option<Range>,
    pub feed_mm_per_min: Option<Range>,
    /// Pump rate.
    pub rate_ul_per_min: Option<Range>,
    /// Volume of one dispense.
    pub volume_ul: Option<Range>,
    pub temperature_c: Option<Range>,
    /// Fastest allowed rise of a temperature setpoint; the controller ramps setpoints no faster than this
    /// (see [`ramp_setpoints`]). Only a hotplate's envelope may set it.
    pub ramp_c_per_min: Option<f64>,
    pub stir_speed_rpm: Option<Range>,
    pub mass_g: Option<Range>,
    pub wavelength_nm: Option<Range>,
    /// A defined instrument's parameters, by the name its definition gives them (`flow_ml_per_min`).
    /// Any other name is refused when the lab loads (a built-in kind has only the fields above).
    #[serde(flatten)]
    pub params: BTreeMap<String, Range>,
}

impl Limits {
    /// Each range-limited quantity with its value, for uniform checks.
    pub fn ranges(&self) -> [(&'static str, Option<Range>); 10] {
        [
            ("x_mm", self.x_mm),
            ("y_mm", self.y_mm),
            ("z_mm", self.z_mm),
            ("feed_mm_per_min", self.feed_mm_per_min),
            ("rate_ul_per_min", self.rate_ul_per_min),
            ("volume_ul", self.volume_ul),
            ("temperature_c", self.temperature_c),
            ("stir_speed_rpm", self.stir_speed_rpm),
            ("mass_g", self.mass_g),
            ("wavelength_nm", self.wavelength_nm),
        ]
    }

    /// Moves ranges written under a built-in field's name (`temperature_c`) into `params`, where a defined
    /// instrument's limits live whatever their names.
    fn name_as_params(&mut self) {
        for (name, range) in self.ranges() {
            if let Some(range) = range {
                self.params.insert(name.to_owned(), range);
            }
        }
        let (params, ramp) = (std::mem::take(&mut self.params), self.ramp_c_per_min);
        *self = Limits {
            params,
            ramp_c_per_min: ramp,
            ..Limits::default()
        };
    }

    /// The range for a quantity by name (a built-in field or a defined instrument's parameter).
    pub fn range(&self, quantity: &str) -> Option<Range> {
        self.ranges()
            .into_iter()
            .find(|(n, _)| *n == quantity)
            .and_then(|(_, r)| r)
            .or_else(|| self.params.get(quantity).copied())
    }
}

/// The setpoints that raise a temperature from `from` to `to` no faster than `rate_c_per_min`: each with the
/// seconds to wait before it is sent. The first goes out at once, one increment above `from`; the last is
/// `to`. Increments are 1 degC, or a tenth of a minute's ramp when that is more. A setpoint at or below
/// `from` is one step: cooling (or holding) is the safe direction and is never delayed.
pub fn ramp_setpoints(from: f64, to: f64, rate_c_per_min: f64) -> Vec<(f64, f64)> {
    if !(from.is_finite() && to.is_finite() && rate_c_per_min.is_finite() && rate_c_per_min > 0.0)
        || to <= from
    {
        return vec![(0.0, to)];
    }
    let increment = (rate_c_per_min / 10.0).max(1.0);
    let wait_s = increment / rate_c_per_min * 60.0;
    let mut out = Vec::new();
    let mut setpoint = from;
    while setpoint + increment < to {
        setpoint += increment;
        out.push((if out.is_empty() { 0.0 } else { wait_s }, setpoint));
    }
    // The last increment may be shorter: wait only for its share.
    let last_wait = if out.is_empty() {
        0.0
    } else {
        (to - setpoint) / rate_c_per_min * 60.0
    };
    out.push((last_wait, to));
    out
}

/// How to reach an instrument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transport {
    Serial(SerialLine),
    /// Raw TCP: a serial device server or an LXI/SCPI socket, `host:port`.
    Tcp {
        address: String,
    },
    /// The built-in simulator of this instrument (`labctl run --sim`).
    Simulated,
}

/// One instrument of the lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instrument {
    pub id: String,
    pub kind: InstrumentKind,
    pub driver: Driver,
    pub transport: Transport,
    /// Network address on a shared line (NE-1000 pumps: 0-99; a Modbus instrument's unit id, 1-247).
    #[serde(default)]
    pub address: Option<u8>,
    /// For pumps: the stock the syringe holds (e.g. `red`).
    #[serde(default)]
    pub stock: Option<String>,
    /// What the instrument can physically do.
    #[serde(default)]
    pub capabilities: Limits,
    /// What this lab allows it to do.
    pub envelope: Limits,
    /// Seconds of silence after which the instrument counts as lost.
    #[serde(default = "default_heartbeat_s")]
    pub heartbeat_s: f64,
    /// For `driver = "definition"`: the instrument definition file, relative to the lab file.
    #[serde(default)]
    pub definition: Option<String>,
    /// Its model in the instrument registry, resolved when the lab loads: its definition's for
    /// `driver = "definition"`; `None` for a built-in driver, whose model is the registry's own entry.
    #[serde(skip)]
    pub model: Option<Arc<InstrumentModel>>,
    /// Firmware versions accepted beyond those the definition lists (a lab's own tested versions).
    #[serde(default)]
    pub allow_firmware: Vec<String>,
}

impl Instrument {
    /// What it takes and reports: its entry in the instrument registry.
    pub fn model(&self) -> &InstrumentModel {
        self.model
            .as_deref()
            .unwrap_or_else(|| InstrumentModel::builtin(self.driver))
    }

    /// The definition it was described by, for `driver = "definition"`.
    pub fn defined(&self) -> Option<&Arc<InstrumentDefinition>> {
        self.model().definition.as_ref()
    }

    /// Names of the `action` steps it accepts.
    pub fn action_names(&self) -> Vec<&str> {
        self.model().action_names().collect()
    }

    /// Names of the `measure` steps it accepts.
    pub fn measurement_names(&self) -> Vec<&str> {
        self.model().measurement_names().collect()
    }

    /// The quantities it reports as telemetry, with their units.
    pub fn quantities(&self) -> Vec<(&str, &str)> {
        self.model()
            .quantities
            .iter()
            .map(|q| (q.name.as_str(), q.unit.as_str()))
            .collect()
    }

    /// Whether it reports `quantity`.
    pub fn reports(&self, quantity: &str) -> bool {
        self.model().quantity(quantity).is_some()
    }

    /// The Modbus transport of an instrument defined as a Modbus instrument; `None` for any other.
    pub fn modbus_transport(&self) -> Option<ModbusTransport> {
        self.defined()
            .and_then(|d| d.modbus.as_ref())
            .map(|m| m.transport)
    }

    /// The Modbus unit id its driver addresses: the lab's `address` when it gives one (a definition
    /// describes a model, the bench sets each unit's address), else the definition's `unit_id`; `None`
    /// for an instrument that is not a Modbus one.
    pub fn modbus_unit_id(&self) -> Option<u8> {
        let settings = self.defined()?.modbus.as_ref()?;
        Some(self.address.unwrap_or(settings.unit_id))
    }
}

fn default_heartbeat_s() -> f64 {
    5.0
}

/// The deck: where vessels can stand and where the gantry can take them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deck {
    #[serde(default)]
    pub racks: Vec<Rack>,
    #[serde(default)]
    pub stations: Vec<Station>,
    /// Fraction of a vessel's capacity it may be filled to.
    #[serde(default = "default_max_fill")]
    pub max_fill_fraction: f64,
    /// Height the head travels at between positions.
    #[serde(default = "default_safe_z")]
    pub safe_z_mm: f64,
}

fn default_max_fill() -> f64 {
    0.9
}
fn default_safe_z() -> f64 {
    50.0
}

/// A rectangular rack of positions named `{row}{column}`, e.g. A1 to D6.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rack {
    /// Row letters, in order along y, e.g. `ABCD`.
    pub rows: String,
    pub columns: u32,
    pub origin_x_mm: f64,
    pub origin_y_mm: f64,
    pub pitch_mm: f64,
    #[serde(default)]
    pub z_mm: f64,
}

/// A single named position, usually on an instrument (weigh station, stir station).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Station {
    pub name: String,
    pub x_mm: f64,
    pub y_mm: f64,
    #[serde(default)]
    pub z_mm: f64,
    /// The instrument that acts on a vessel standing here.
    #[serde(default)]
    pub instrument: Option<String>,
}

/// A resolved deck position.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub name: String,
    pub x_mm: f64,
    pub y_mm: f64,
    pub z_mm: f64,
    pub instrument: Option<String>,
}

impl Deck {
    /// Every named position: rack positions then stations.
    pub fn positions(&self) -> Vec<Position> {
        let mut out = Vec::new();
        for rack in &self.racks {
            for (r, row) in rack.rows.chars().enumerate() {
                for c in 0..rack.columns {
                    out.push(Position {
                        name: format!("{row}{}", c + 1),
                        x_mm: rack.origin_x_mm + f64::from(c) * rack.pitch_mm,
                        y_mm: rack.origin_y_mm + r as f64 * rack.pitch_mm,
                        z_mm: rack.z_mm,
                        instrument: None,
                    });
                }
            }
        }
        out.extend(self.stations.iter().map(|s| Position {
            name: s.name.clone(),
            x_mm: s.x_mm,
            y_mm: s.y_mm,
            z_mm: s.z_mm,
            instrument: s.instrument.clone(),
        }));
        out
    }

    /// The position named `name` (any case), as [`Deck::positions`] lists it, without listing them all:
    /// the interpreter asks for one at every move.
    pub fn position(&self, name: &str) -> Option<Position> {
        let mut chars = name.chars();
        let row = chars.next()?;
        let column = chars.as_str();
        // Rack names are a row letter and a column number written plainly (`A1`, never `A01`).
        let column: Option<u32> = (!column.starts_with('0')
            && !column.is_empty()
            && column.bytes().all(|b| b.is_ascii_digit()))
        .then(|| column.parse().ok())
        .flatten();
        if let Some(column) = column {
            for rack in &self.racks {
                let found = rack.rows.chars().position(|r| r.eq_ignore_ascii_case(&row));
                if let Some(r) = found
                    && (1..=rack.columns).contains(&column)
                {
                    let c = column - 1;
                    return Some(Position {
                        name: format!("{}{column}", rack.rows.chars().nth(r)?),
                        x_mm: rack.origin_x_mm + f64::from(c) * rack.pitch_mm,
                        y_mm: rack.origin_y_mm + r as f64 * rack.pitch_mm,
                        z_mm: rack.z_mm,
                        instrument: None,
                    });
                }
            }
        }
        self.stations
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))
            .map(|s| Position {
                name: s.name.clone(),
                x_mm: s.x_mm,
                y_mm: s.y_mm,
                z_mm: s.z_mm,
                instrument: s.instrument.clone(),
            })
    }
}

/// How proposals are approved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    #[serde(default)]
    pub policy: ApprovalPolicy,
    /// A proposal is approved without a technician only if it stays inside all of these.
    #[serde(default)]
    pub auto_approve: AutoApproveEnvelope,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalPolicy {
    /// Approve automatically what stays inside the auto-approve envelope; ask for the rest.
    Auto,
    /// Every proposal waits for a technician.
    #[default]
    AlwaysAsk,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoApproveEnvelope {
    pub max_temperature_c: Option<f64>,
    pub max_total_volume_ul: Option<f64>,
    pub max_duration_s: Option<f64>,
    pub max_steps: Option<u64>,
}

/// Where the controller listens and connects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interfaces {
    /// Whether a listener without encryption (the embedded MQTT broker, the TCP command port, an OPC UA
    /// endpoint with security policy None) may bind an address other than loopback. Passwords travel on
    /// them in clear text: say so explicitly, for a closed lab network.
    #[serde(default)]
    pub allow_cleartext_on_network: bool,
    #[serde(default)]
    pub mqtt: MqttInterface,
    #[serde(default)]
    pub opcua: OpcUaInterface,
    #[serde(default)]
    pub command_port: CommandPortInterface,
    #[serde(default)]
    pub mcp: McpInterface,
}

/// MCP (Model Context Protocol) for AI agents, over streamable HTTP: off unless an address is given here or
/// on the command line (which wins).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpInterface {
    /// Listen address of MCP over HTTP (clear text: loopback only unless `allow_cleartext_on_network`).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// Listen address of MCP over HTTPS, with the certificate in `DATA_DIR/tls/`.
    #[serde(default)]
    pub tls_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttInterface {
    /// `mqtt://host:port` or `mqtts://host:port` of an external broker; absent: the embedded broker.
    #[serde(default)]
    pub url: Option<String>,
    /// Listen address of the embedded broker.
    #[serde(default = "default_mqtt_listen")]
    pub listen: String,
    /// A second listener of the embedded broker, MQTT over TLS (`mqtts`), with the certificate in
    /// `DATA_DIR/tls/`; absent: none.
    #[serde(default)]
    pub tls_listen: Option<String>,
}

impl Default for MqttInterface {
    fn default() -> Self {
        MqttInterface {
            url: None,
            listen: default_mqtt_listen(),
            tls_listen: None,
        }
    }
}

fn default_mqtt_listen() -> String {
    "127.0.0.1:1883".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaInterface {
    #[serde(default = "default_opcua_endpoint")]
    pub endpoint: String,
}

impl Default for OpcUaInterface {
    fn default() -> Self {
        OpcUaInterface {
            endpoint: default_opcua_endpoint(),
        }
    }
}

fn default_opcua_endpoint() -> String {
    "opc.tcp://127.0.0.1:4840".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandPortInterface {
    /// TCP listen address (SCPI raw-socket convention, port 5025).
    #[serde(default = "default_command_tcp")]
    pub tcp: Option<String>,
    /// A serial line to serve the command port on.
    #[serde(default)]
    pub serial: Option<SerialLine>,
    /// TCP listen address of the command port over TLS, with the certificate in `DATA_DIR/tls/`; absent:
    /// none.
    #[serde(default)]
    pub tls: Option<String>,
}

impl Default for CommandPortInterface {
    fn default() -> Self {
        CommandPortInterface {
            tcp: default_command_tcp(),
            serial: None,
            tls: None,
        }
    }
}

fn default_command_tcp() -> Option<String> {
    Some("127.0.0.1:5025".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything, changes nothing.
    Observer,
    /// Submits protocols and controls its own runs.
    Planner,
    /// A hardware-in-the-loop rig: submits and controls runs like a planner, from the command port.
    Rig,
    /// Approves, rejects, aborts anything, triggers and acknowledges the emergency stop.
    Technician,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Observer, Role::Planner, Role::Rig, Role::Technician];

    /// The role's name as users write it (lab file, command line, replies).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Observer => "observer",
            Role::Planner => "planner",
            Role::Rig => "rig",
            Role::Technician => "technician",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected observer, planner, rig or technician")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    /// Case-insensitive, as a command line is typed.
    fn from_str(text: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| UnknownRole(text.to_owned()))
    }
}

/// A user. Passwords are never stored in clear: a PHC hash string (argon2) or a file that holds one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl Lab {
    /// The built-in simulated lab.
    pub fn sim() -> Lab {
        // The embedded file is checked by a test, so this cannot fail in a released build.
        Lab::from_toml_str(SIM_LAB_TOML, "built-in sim lab").expect("built-in sim lab is valid")
    }

    /// Reads and checks a lab file; instrument definitions are found relative to it.
    pub fn load(path: &Path) -> Result<Lab, LabError> {
        let text = std::fs::read_to_string(path).map_err(|source| LabError::Io {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Lab::from_toml_str_in(&text, &path.display().to_string(), base)
    }

    /// Parses and checks lab file text; `origin` names it in errors. Instrument definitions are found
    /// relative to the working directory.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Lab, LabError> {
        Lab::from_toml_str_in(text, origin, Path::new("."))
    }

    /// Parses and checks lab file text whose instrument definitions are relative to `base`.
    pub fn from_toml_str_in(text: &str, origin: &str, base: &Path) -> Result<Lab, LabError> {
        let syntax = |message: String| LabError::Syntax {
            origin: origin.to_owned(),
            message,
        };
        // Refuse clear-text passwords by name before serde would call them merely "unknown".
        let raw: toml::Table = toml::from_str(text).map_err(|e| syntax(e.to_string()))?;
        let mut problems = Vec::new();
        if let Some(toml::Value::Array(users)) = raw.get("users") {
            for (i, u) in users.iter().enumerate() {
                if u.get("password").is_some() {
                    problems.push(format!(
                        "users[{i}].password: clear-text passwords are not allowed; \
                         use password_hash (an argon2 PHC string) or password_file"
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(LabError::Invalid {
                origin: origin.to_owned(),
                problems,
            });
        }
        let mut lab: Lab = toml::from_str(text).map_err(|e| syntax(e.to_string()))?;
        let mut problems = lab.read_definitions(base);
        problems.extend(lab.problems());
        if problems.is_empty() {
            Ok(lab)
        } else {
            Err(LabError::Invalid {
                origin: origin.to_owned(),
                problems,
            })
        }
    }

    /// Reads and checks each defined instrument's definition file; a problem for each that cannot be used.
    fn read_definitions(&mut self, base: &Path) -> Vec<String> {
        let mut p = Vec::new();
        for (i, inst) in self.instruments.iter_mut().enumerate() {
            let at = format!("instruments[{i}] ({})", inst.id);
            match (&inst.definition, inst.driver) {
                (None, Driver::Definition) => p.push(format!(
                    "{at}.definition: driver \"definition\" needs the definition file's path"
                )),
                (Some(_), d) if d != Driver::Definition => p.push(format!(
                    "{at}.definition: only an instrument with driver = \"definition\" takes a definition file"
                )),
                (Some(file), _) => {
                    let path = base.join(file);
                    match std::fs::read_to_string(&path) {
                        Err(e) => p.push(format!(
                            "{at}.definition: cannot read {}: {e}",
                            path.display()
                        )),
                        Ok(text) => match check_definition(&text) {
                            (Some(def), _) => {
                                // Kept resolved, so the lab means the same lab wherever it is written.
                                let resolved = std::fs::canonicalize(&path).unwrap_or(path);
                                inst.definition = Some(resolved.display().to_string());
                                inst.model = Some(Arc::new(InstrumentModel::from_definition(
                                    Arc::new(def),
                                )));
                                inst.envelope.name_as_params();
                                inst.capabilities.name_as_params();
                            }
                            (None, findings) => {
                                for f in findings.iter().filter(|f| f.is_error()) {
                                    p.push(format!(
                                        "{at}.definition: {file}: {}: {}",
                                        if f.path.is_empty() { "/" } else { &f.path },
                                        f.message
                                    ));
                                }
                            }
                        },
                    }
                }
                (None, _) => {}
            }
        }
        p
    }

    /// Every inconsistency in the lab description.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !is_identifier(&self.lab_id) {
            p.push(format!(
                "lab_id: {:?} must be 1-64 characters of letters, digits, '-' and '_' (it is used in MQTT topics)",
                self.lab_id
            ));
        }
        let mut ids = BTreeSet::new();
        for (i, inst) in self.instruments.iter().enumerate() {
            let at = format!("instruments[{i}] ({})", inst.id);
            if !is_identifier(&inst.id) {
                p.push(format!("{at}.id: must be letters, digits, '-' and '_'"));
            }
            if !ids.insert(inst.id.as_str()) {
                p.push(format!("{at}.id: duplicate instrument id"));
            }
            if inst.driver.kind() != inst.kind {
                p.push(format!(
                    "{at}.driver: driver {:?} serves {} instruments, not {}",
                    inst.driver,
                    inst.driver.kind(),
                    inst.kind
                ));
            }
            let model = inst.model();
            for q in &model.required_envelope {
                if inst.envelope.range(q).is_none() {
                    let within = model
                        .param_range(q)
                        .map(|r| format!(" within {r}"))
                        .unwrap_or_default();
                    p.push(format!(
                        "{at}.envelope.{q}: required: a {} takes {q} (a [min, max] range{within})",
                        model.model
                    ));
                }
            }
            p.extend(defined_envelope_problems(inst, &at));
            for (q, env) in inst.envelope.ranges() {
                if let (Some(env), Some(cap)) = (env, inst.capabilities.range(q))
                    && !env.within(&cap)
                {
                    p.push(format!(
                        "{at}.envelope.{q}: {env} reaches outside the instrument's capability {cap}"
                    ));
                }
            }
            if inst.heartbeat_s.is_nan() || inst.heartbeat_s <= 0.0 {
                p.push(format!("{at}.heartbeat_s: must be > 0"));
            }
            // Every safety field is enforced or refused by name: a ramp is enforced on hotplate setpoints only.
            for (limits, field) in [
                (&inst.envelope, "envelope"),
                (&inst.capabilities, "capabilities"),
            ] {
                if let Some(r) = limits.ramp_c_per_min {
                    if !(r.is_finite() && r > 0.0) {
                        p.push(format!(
                            "{at}.{field}.ramp_c_per_min: {r} must be a number > 0"
                        ));
                    } else if inst.kind != InstrumentKind::Hotplate {
                        p.push(format!(
                            "{at}.{field}.ramp_c_per_min: only a hotplate's temperature setpoints are ramped; a {} has none",
                            inst.kind
                        ));
                    }
                }
            }
            if inst.kind == InstrumentKind::SyringePump && inst.stock.is_none() {
                p.push(format!(
                    "{at}.stock: a syringe pump must name the stock it holds"
                ));
            }
            if let Some(a) = inst.address
                && a > 99
                && inst.modbus_transport().is_none()
            {
                p.push(format!("{at}.address: {a} is outside 0-99"));
            }
        }
        // Instruments sharing a serial line must be addressable apart.
        for (i, a) in self.instruments.iter().enumerate() {
            for b in &self.instruments[i + 1..] {
                if let (Transport::Serial(la), Transport::Serial(lb)) = (&a.transport, &b.transport)
                    && la.port == lb.port
                {
                    if la != lb {
                        p.push(format!(
                            "instruments {} and {} share {} with different line settings",
                            a.id, b.id, la.port
                        ));
                    }
                    // Modbus units are told apart by unit id (`modbus_line_problems`).
                    let modbus = a.modbus_transport().is_some() || b.modbus_transport().is_some();
                    if !modbus && (a.address.is_none() || a.address == b.address) {
                        p.push(format!(
                            "instruments {} and {} share {} and need distinct addresses",
                            a.id, b.id, la.port
                        ));
                    }
                }
            }
        }
        p.extend(modbus_line_problems(&self.instruments));
        let mut names = BTreeSet::new();
        for pos in self.deck.positions() {
            if !names.insert(pos.name.to_ascii_uppercase()) {
                p.push(format!("deck: position {} is defined twice", pos.name));
            }
            if let Some(inst) = &pos.instrument
                && !ids.contains(inst.as_str())
            {
                p.push(format!(
                    "deck: station {} names unknown instrument {inst}",
                    pos.name
                ));
            }
        }
        if !(self.deck.max_fill_fraction > 0.0 && self.deck.max_fill_fraction <= 1.0) {
            p.push("deck.max_fill_fraction: must be in (0, 1]".into());
        }
        for (i, il) in self.interlocks.iter().enumerate() {
            let at = format!("interlocks[{i}] ({})", il.name);
            let Some(inst) = self.instrument(&il.instrument) else {
                p.push(format!(
                    "{at}.instrument: unknown instrument {}",
                    il.instrument
                ));
                continue;
            };
            let triggers = usize::from(il.quantity.is_some())
                + usize::from(il.on_alarm)
                + usize::from(il.on_silence);
            if triggers != 1 {
                p.push(format!(
                    "{at}: give exactly one of quantity (with above/below), on_alarm, on_silence"
                ));
            }
            if let Some(q) = &il.quantity {
                if !inst.reports(q) {
                    p.push(format!("{at}.quantity: {} does not report {q}", inst.id));
                }
                if il.above.is_none() && il.below.is_none() {
                    p.push(format!("{at}: a quantity interlock needs above or below"));
                }
            }
            for s in &il.safe_state {
                if self.instrument(s).is_none() {
                    p.push(format!("{at}.safe_state: unknown instrument {s}"));
                }
            }
        }
        let mut users = BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if !users.insert(u.name.as_str()) {
                p.push(format!("users[{i}].name: duplicate user {}", u.name));
            }
            match (&u.password_hash, &u.password_file) {
                (Some(_), Some(_)) => p.push(format!("users[{i}] ({}): give password_hash or password_file, not both", u.name)),
                (None, None) => p.push(format!("users[{i}] ({}): needs password_hash or password_file", u.name)),
                (Some(h), None) if !h.starts_with('$') => p.push(format!(
                    "users[{i}].password_hash: expected a PHC string such as $argon2id$..., found something else"
                )),
                _ => {}
            }
        }
        p
    }

    pub fn instrument(&self, id: &str) -> Option<&Instrument> {
        self.instruments.iter().find(|i| i.id == id)
    }
}

/// A defined instrument's envelope names each parameter of its actions, inside the definition's range for
/// it; any other instrument's envelope names only built-in quantities.
fn defined_envelope_problems(inst: &Instrument, at: &str) -> Vec<String> {
    let mut p = Vec::new();
    if inst.defined().is_none() {
        for (limits, field) in [
            (&inst.envelope, "envelope"),
            (&inst.capabilities, "capabilities"),
        ] {
            for name in limits.params.keys() {
                p.push(format!(
                    "{at}.{field}.{name}: unknown quantity (a {} knows {})",
                    inst.kind,
                    limits
                        .ranges()
                        .iter()
                        .map(|(q, _)| *q)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        return p;
    }
    // A missing one is refused with the other required fields (`Lab::problems`).
    let model = inst.model();
    for (name, env) in &inst.envelope.params {
        if let Some(capability) = model.param_range(name)
            && !env.within(&capability)
        {
            p.push(format!(
                "{at}.envelope.{name}: {env} reaches outside what the definition says the instrument can do, {capability}"
            ));
        }
    }
    for (limits, field) in [
        (&inst.envelope, "envelope"),
        (&inst.capabilities, "capabilities"),
    ] {
        for name in limits.params.keys() {
            if model.param_range(name).is_none() {
                p.push(format!(
                    "{at}.{field}.{name}: no action of the definition takes {name}"
                ));
            }
        }
        for (q, r) in limits.ranges() {
            if r.is_some() {
                p.push(format!(
                    "{at}.{field}.{q}: a defined instrument's limits name its definition's parameters"
                ));
            }
        }
    }
    p
}

/// Modbus instruments in a lab file: 1-247 each, and several Modbus RTU units sharing one RS-485 line
/// (multi-drop) distinct on it.
fn modbus_line_problems(instruments: &[Instrument]) -> Vec<String> {
    let mut p = Vec::new();
    let at = |i: usize, inst: &Instrument| format!("instruments[{i}] ({})", inst.id);
    for (i, inst) in instruments.iter().enumerate() {
        if inst.modbus_transport().is_none() {
            continue;
        }
        if let Some(a) = inst.address
            && !(1..=247).contains(&a)
        {
            p.push(format!(
                "{}.address: {a} is outside 1-247 (the Modbus unit id of this instrument)",
                at(i, inst)
            ));
        }
    }
    // RTU units sharing a serial port: one protocol on the line and a unit id each (every slave hears
    // every request; two with the same id would both answer and garble each other).
    for (i, a) in instruments.iter().enumerate() {
        let Transport::Serial(la) = &a.transport else {
            continue;
        };
        for (j, b) in instruments.iter().enumerate().skip(i + 1) {
            let Transport::Serial(lb) = &b.transport else {
                continue;
            };
            if la.port != lb.port {
                continue;
            }
            let (ma, mb) = (a.modbus_transport(), b.modbus_transport());
            match (ma, mb) {
                (None, None) => {}
                (Some(ModbusTransport::Rtu), Some(ModbusTransport::Rtu)) => {
                    if let (Some(ua), Some(ub)) = (a.modbus_unit_id(), b.modbus_unit_id())
                        && ua == ub
                    {
                        p.push(format!(
                            "{} and {} share {} with the same Modbus unit id {ua}: give each its own `address` (1-247)",
                            at(i, a),
                            at(j, b),
                            la.port
                        ));
                    }
                }
                _ => p.push(format!(
                    "{} and {} share {}: a serial line carries one protocol, and only Modbus RTU instruments share a Modbus line",
                    at(i, a),
                    at(j, b),
                    la.port
                )),
            }
        }
    }
    p
}

/// Ids that are safe in MQTT topics, OPC UA browse names and file names.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looking one position up finds what the list of all positions holds under that name, in any case,
    /// and nothing for names it does not hold.
    #[test]
    fn a_position_looked_up_by_name_is_the_one_the_deck_lists() {
        let deck = Lab::sim().deck;
        let listed = deck.positions();
        assert!(!listed.is_empty());
        for p in &listed {
            assert_eq!(deck.position(&p.name).as_ref(), Some(p), "{}", p.name);
            assert_eq!(
                deck.position(&p.name.to_ascii_lowercase()).as_ref(),
                Some(p),
                "{}",
                p.name
            );
        }
        for name in ["", "A", "A0", "A01", "Z9", "A99", "H1x", "1A", "AA1"] {
            let expected = listed.iter().find(|p| p.name.eq_ignore_ascii_case(name));
            assert_eq!(deck.position(name).as_ref(), expected, "{name:?}");
        }
    }

    #[test]
    fn role_names_read_back_as_the_role_whatever_the_case() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(role.as_str().to_uppercase().parse::<Role>(), Ok(role));
            // The lab file's spelling is the same name.
            assert_eq!(serde_json::to_value(role).unwrap(), role.as_str());
        }
        let err = "admin".parse::<Role>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#""admin": expected observer, planner, rig or technician"#
        );
    }

    #[test]
    fn sim_lab_loads_and_has_the_five_instrument_families() {
        let lab = Lab::sim();
        assert_eq!(lab.lab_id, "sim");
        let kinds: BTreeSet<_> = lab.instruments.iter().map(|i| i.kind).collect();
        assert_eq!(kinds.len(), 5);
        assert_eq!(
            lab.instruments
                .iter()
                .filter(|i| i.kind == InstrumentKind::SyringePump)
                .count(),
            3
        );
        let names: Vec<_> = lab.deck.positions().into_iter().map(|p| p.name).collect();
        assert!(names.contains(&"A1".to_string()) && names.contains(&"D6".to_string()));
        assert!(names.contains(&"W1".to_string()) && names.contains(&"H1".to_string()));
        assert_eq!(names.len(), 26);
    }

    #[test]
    fn clear_text_password_is_refused_by_name() {
        let text = format!(
            "{SIM_LAB_TOML}\n[[users]]\nname = \"eve\"\nrole = \"planner\"\npassword = \"hunter2\"\n"
        );
        let err = Lab::from_toml_str(&text, "t").unwrap_err().to_string();
        assert!(
            err.contains("users[") && err.contains("clear-text passwords are not allowed"),
            "{err}"
        );
    }

    #[test]
    fn a_ramp_rises_no_faster_than_its_rate_and_ends_on_the_target() {
        // 10 degC/min from 22 to 25: 23 at once, 24 after 6 s, 25 after 6 s more.
        assert_eq!(
            ramp_setpoints(22.0, 25.0, 10.0),
            [(0.0, 23.0), (6.0, 24.0), (6.0, 25.0)]
        );
        let steps = ramp_setpoints(22.0, 120.0, 10.0);
        assert_eq!(steps.last(), Some(&(6.0, 120.0)));
        let total: f64 = steps.iter().map(|(w, _)| w).sum();
        // 98 degC at 10 degC/min is 588 s; the first degree goes out at once.
        assert!((total - 582.0).abs() < 1e-9, "{total}");
        for pair in steps.windows(2) {
            let (rise, wait) = (pair[1].1 - pair[0].1, pair[1].0);
            assert!(rise / wait * 60.0 <= 10.0 + 1e-9, "{pair:?}");
        }
        // A fast ramp takes bigger increments; cooling and bad rates are one step.
        assert_eq!(ramp_setpoints(20.0, 60.0, 200.0).len(), 2);
        assert_eq!(ramp_setpoints(80.0, 40.0, 10.0), [(0.0, 40.0)]);
        assert_eq!(ramp_setpoints(20.0, 40.0, 0.0), [(0.0, 40.0)]);
        assert_eq!(ramp_setpoints(f64::NAN, 40.0, 10.0), [(0.0, 40.0)]);
    }

    #[test]
    fn a_ramp_that_cannot_be_enforced_is_refused_by_name() {
        let text = include_str!("../../examples/sim-lab.toml");
        let bad = text.replace("ramp_c_per_min = 10.0", "ramp_c_per_min = -1.0");
        let err = Lab::from_toml_str(&bad, "test").unwrap_err().to_string();
        assert!(
            err.contains("envelope.ramp_c_per_min: -1 must be a number > 0"),
            "{err}"
        );
    }

    #[test]
    fn envelope_outside_capabilities_is_refused() {
        let text = SIM_LAB_TOML.replace("temperature_c = [15, 120]", "temperature_c = [15, 500]");
        assert_ne!(
            text, SIM_LAB_TOML,
            "fixture must change the hotplate envelope"
        );
        let err = Lab::from_toml_str(&text, "t").unwrap_err().to_string();
        assert!(
            err.contains("envelope.temperature_c") && err.contains("capability"),
            "{err}"
        );
    }

    #[test]
    fn missing_envelope_quantity_is_refused() {
        let text =
            SIM_LAB_TOML.replace("envelope = { wavelength_nm = [380, 780] }", "envelope = {}");
        assert_ne!(text, SIM_LAB_TOML);
        let err = Lab::from_toml_str(&text, "t").unwrap_err().to_string();
        assert!(err.contains("envelope.wavelength_nm: required"), "{err}");
    }

    #[test]
    fn toml_syntax_error_names_the_line() {
        let err = Lab::from_toml_str("lab_id = \n", "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml") && err.contains("line 1"), "{err}");
    }
}
