//! One command-port session as a pure state machine: bytes in, reply lines out. It holds the session's
//! login, its SCPI error queue and its partial input line, and reaches the lab only through a
//! [`Backend`], so it is unit-tested without a controller.
//!
//! Parsing is the drivers' generic SCPI parser ([`parse_program_message`], [`header_matches`]): units split
//! at `;`, short and long forms, any case, raw JSON kept whole for `RUN:SUBM`.

use labctl_codecs::scpi::{
    ErrorQueue, Fault, Mnemonic, ProgramUnit, ScpiError, format_number, format_string,
    parse_program_message, parse_string, split_fields,
};
use labctl_core::instruments::DeviceState;

use super::Backend;
use labctl_core::api::{ApiError, Control, InterlockState, Principal};
use labctl_core::auth::Source;
use labctl_core::contract::Face;
use labctl_core::instruments::Connection;
use labctl_core::policy::{self, Permission};

/// Longest program message accepted (a whole protocol fits in a `RUN:SUBM` line many times over).
pub const MAX_LINE: usize = 64 * 1024;
/// SCPI error queue depth per session; when full the newest entry becomes `-350,"Queue overflow"`.
pub const ERROR_QUEUE_DEPTH: usize = 32;
/// The face recorded with every action taken through the command port.
pub const VIA: Face = Face::CommandPort;

/// What the line is: on TCP a client must log in; a serial line is trusted as a configured principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Anonymous until `SYST:LOGIN`. `anonymous` is the principal used when the lab has no users at all
    /// (read-only: an observer).
    Tcp,
    /// A local line has no login: it acts as this principal until a `SYST:LOGIN` replaces it.
    Serial(Principal),
}

/// Fixed facts of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The `*IDN?` answer: `labctl,{lab_id},{serial},{version}`.
    pub idn: String,
    pub link: Link,
    pub max_line: usize,
    /// Where logins come from (failed ones are counted per user and source).
    pub peer: Source,
}

/// The `*IDN?` answer for a controller.
pub fn idn(lab_id: &str, serial: &str) -> String {
    format!("labctl,{lab_id},{serial},{}", env!("CARGO_PKG_VERSION"))
}

/// Splits a byte stream into lines (`\n`; a `\r` before it is white space to the parser), never holding
/// more than `max` bytes: a longer line is dropped up to its end and reported once.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
    discarding: bool,
}

/// A line, or the news that one was too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Line(Vec<u8>),
    Overrun,
}

impl LineBuffer {
    pub fn new(max: usize) -> LineBuffer {
        LineBuffer {
            buf: Vec::new(),
            max: max.max(1),
            discarding: false,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Input> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (chunk, ended) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let chunk = &bytes[..i];
                    bytes = &bytes[i + 1..];
                    (chunk, true)
                }
                None => {
                    let chunk = bytes;
                    bytes = &[];
                    (chunk, false)
                }
            };
            if !self.discarding {
                if self.buf.len() + chunk.len() > self.max {
                    self.buf = Vec::new();
                    self.discarding = true;
                    out.push(Input::Overrun);
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            if ended {
                if self.discarding {
                    self.discarding = false;
                } else {
                    out.push(Input::Line(std::mem::take(&mut self.buf)));
                }
            }
        }
        out
    }

    /// Bytes held for the line in progress.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Idn,
    Opc,
    OpcQuery,
    Rst,
    Wai,
    Cls,
    EsrQuery,
    ErrQuery,
    ErrCount,
    Login,
    Logout,
    WhoQuery,
    EStop,
    EStopAck,
    EStopQuery,
    IntlOverride,
    IntlOverrideClear,
    IntlState,
    InstList,
    InstStat,
    Meas,
    RunSubmit,
    RunStat,
    RunControl(Control),
    RunApprove,
    RunReject,
}

/// The command tree in SCPI notation: upper case is the short form.
const COMMANDS: &[(&str, Cmd)] = &[
    ("*IDN?", Cmd::Idn),
    ("*OPC", Cmd::Opc),
    ("*OPC?", Cmd::OpcQuery),
    ("*RST", Cmd::Rst),
    ("*WAI", Cmd::Wai),
    ("*CLS", Cmd::Cls),
    ("*ESR?", Cmd::EsrQuery),
    ("SYSTem:ERRor[:NEXT]?", Cmd::ErrQuery),
    ("SYSTem:ERRor:COUNt?", Cmd::ErrCount),
    ("SYSTem:LOGin", Cmd::Login),
    ("SYSTem:LOGout", Cmd::Logout),
    ("SYSTem:LOGin?", Cmd::WhoQuery),
    ("SYSTem:ESTOP", Cmd::EStop),
    ("SYSTem:ESTOP:ACKnowledge", Cmd::EStopAck),
    ("SYSTem:ESTOP?", Cmd::EStopQuery),
    ("SYSTem:INTerlock:OVERride", Cmd::IntlOverride),
    ("SYSTem:INTerlock:OVERride:CLEar", Cmd::IntlOverrideClear),
    ("SYSTem:INTerlock:STATe?", Cmd::IntlState),
    ("INSTrument:LIST?", Cmd::InstList),
    ("INSTrument:CATalog?", Cmd::InstList),
    ("INSTrument:STATe?", Cmd::InstStat),
    ("MEASure?", Cmd::Meas),
    ("RUN:SUBMit", Cmd::RunSubmit),
    ("RUN:STATe?", Cmd::RunStat),
    ("RUN:PAUSe", Cmd::RunControl(Control::Pause)),
    ("RUN:RESume", Cmd::RunControl(Control::Resume)),
    ("RUN:ABORt", Cmd::RunControl(Control::Abort)),
    ("RUN:APPRove", Cmd::RunApprove),
    ("RUN:REJect", Cmd::RunReject),
];

/// One client's session.
pub struct Session {
    config: SessionConfig,
    principal: Option<Principal>,
    errors: ErrorQueue,
    /// IEEE 488.2 standard event status register (only OPC, QYE, DDE, EXE, CME are used).
    esr: u8,
    input: LineBuffer,
}

impl Session {
    pub fn new(config: SessionConfig) -> Session {
        let principal = match &config.link {
            Link::Serial(p) => Some(p.clone()),
            Link::Tcp => None,
        };
        let input = LineBuffer::new(config.max_line);
        Session {
            config,
            principal,
            errors: ErrorQueue::new(ERROR_QUEUE_DEPTH),
            esr: 0,
            input,
        }
    }

    /// Who the session acts as now, if anyone.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    /// Feeds received bytes; returns the reply lines (each without its `\n`) for every complete program
    /// message among them, in order.
    pub async fn feed<B: Backend>(&mut self, backend: &B, bytes: &[u8]) -> Vec<String> {
        let mut replies = Vec::new();
        for input in self.input.push(bytes) {
            let reply = match input {
                Input::Line(line) => self.execute(backend, &line).await,
                Input::Overrun => {
                    self.push(Fault::new(
                        ScpiError::InputBufferOverrun,
                        format!(
                            "line longer than {} bytes dropped up to its end",
                            self.config.max_line
                        ),
                    ));
                    None
                }
            };
            replies.extend(reply);
        }
        replies
    }

    fn push(&mut self, fault: Fault) {
        tracing::debug!(%fault, "command port: error queued");
        self.esr |= fault.error.esr_bit();
        self.errors.push(fault);
    }

    /// Runs one program message. Query responses are joined with `;` into one reply line (IEEE 488.2);
    /// a message without a successful query answers nothing. A command error (-1xx) discards the rest
    /// of the message; an execution error (-2xx) is queued and the next unit still runs.
    pub async fn execute<B: Backend>(&mut self, backend: &B, line: &[u8]) -> Option<String> {
        let parsed = parse_program_message(line);
        let mut responses: Vec<String> = Vec::new();
        let mut path: Vec<Mnemonic> = Vec::new();
        let mut stopped = false;
        for unit in &parsed.units {
            let Some((cmd, new_path)) = lookup(unit, &path) else {
                self.push(Fault::new(
                    ScpiError::UndefinedHeader,
                    unit.header.to_string(),
                ));
                stopped = true;
                break;
            };
            if let Some(p) = new_path {
                path = p;
            }
            match self.run(backend, cmd, unit).await {
                Ok(Some(response)) => responses.push(response),
                Ok(None) => {}
                Err(fault) => {
                    let command_error = (-199..=-100).contains(&fault.error.code());
                    self.push(fault);
                    if command_error {
                        stopped = true;
                        break;
                    }
                }
            }
        }
        if !stopped && let Some(fault) = parsed.fault {
            self.push(fault);
        }
        (!responses.is_empty()).then(|| responses.join(";"))
    }

    fn require_login(&self, what: &str) -> Result<&Principal, Fault> {
        self.principal.as_ref().ok_or_else(|| {
            Fault::new(
                ScpiError::CommandProtected,
                format!("{what}: log in first with SYST:LOGIN user,password"),
            )
        })
    }

    /// Reading the lab needs a login on TCP whenever the lab has users (anonymous access is refused);
    /// a lab without users lets anyone read.
    fn may_read<B: Backend>(&self, backend: &B, what: &str) -> Result<(), Fault> {
        if self.principal.is_none() && backend.users_configured() {
            self.require_login(what)?;
        }
        Ok(())
    }

    /// The principal for an action that changes the lab: logged in, allowed by the role table, and (unless
    /// it only makes things safer) not while the emergency stop is latched.
    fn may_change<B: Backend>(
        &self,
        backend: &B,
        what: &str,
        permission: Permission,
        allowed_while_latched: bool,
    ) -> Result<Principal, Fault> {
        let who = self.require_login(what)?;
        if let Err(refused) = policy::check(who, permission) {
            return Err(Fault::new(
                ScpiError::CommandProtected,
                format!("{what}: {refused}"),
            ));
        }
        if !allowed_while_latched && backend.snapshot().estop_latched {
            return Err(Fault::new(
                ScpiError::ExecutionError,
                format!("{what}: emergency stop is latched; acknowledge it first (SYST:ESTOP:ACK)"),
            ));
        }
        Ok(who.clone())
    }

    async fn run<B: Backend>(
        &mut self,
        backend: &B,
        cmd: Cmd,
        unit: &ProgramUnit,
    ) -> Result<Option<String>, Fault> {
        if takes_no_params(cmd) && unit.has_params() {
            return Err(Fault::new(
                ScpiError::ParameterNotAllowed,
                format!("{} takes no parameters", unit.header),
            ));
        }
        match cmd {
            Cmd::Idn => Ok(Some(self.config.idn.clone())),
            Cmd::Opc => {
                self.esr |= 0x01;
                Ok(None)
            }
            // Every command has finished by the time the next one is read.
            Cmd::OpcQuery => Ok(Some("1".into())),
            // Nothing in a session has settings to reset; the lab, its runs and the login are untouched.
            Cmd::Rst => Ok(None),
            // Commands run one after another: there is never anything pending to wait for.
            Cmd::Wai => Ok(None),
            Cmd::Cls => {
                self.errors.clear();
                self.esr = 0;
                Ok(None)
            }
            Cmd::EsrQuery => Ok(Some(std::mem::take(&mut self.esr).to_string())),
            Cmd::ErrQuery => Ok(Some(self.errors.pop().to_string())),
            Cmd::ErrCount => Ok(Some(self.errors.len().to_string())),
            Cmd::Login => {
                let [user, password] = exact_args(unit)?;
                match backend.login(&user, &password, self.config.peer).await {
                    Ok(role) => {
                        tracing::info!(user, role = role.as_str(), "command port: logged in");
                        self.principal = Some(Principal::new(&user, role, VIA));
                        Ok(None)
                    }
                    Err(e) => Err(Fault::new(
                        ScpiError::ExecutionError,
                        format!("login refused: {e}"),
                    )),
                }
            }
            Cmd::Logout => {
                self.principal = match &self.config.link {
                    Link::Serial(p) => Some(p.clone()),
                    Link::Tcp => None,
                };
                Ok(None)
            }
            Cmd::WhoQuery => Ok(Some(match &self.principal {
                Some(p) => format!("{},{}", format_string(&p.name), p.role),
                None => format!("{},none", format_string("")),
            })),
            Cmd::EStop => {
                let who = self.may_change(backend, "SYST:ESTOP", Permission::TriggerEStop, true)?;
                backend
                    .emergency_stop(who)
                    .await
                    .map_err(|e| api_fault("SYST:ESTOP", e))?;
                Ok(None)
            }
            Cmd::EStopAck => {
                let who = self.may_change(
                    backend,
                    "SYST:ESTOP:ACK",
                    Permission::AcknowledgeEStop,
                    true,
                )?;
                backend
                    .acknowledge_emergency_stop(who)
                    .await
                    .map_err(|e| api_fault("SYST:ESTOP:ACK", e))?;
                Ok(None)
            }
            Cmd::EStopQuery => Ok(Some(
                if backend.snapshot().estop_latched {
                    "1"
                } else {
                    "0"
                }
                .into(),
            )),
            Cmd::IntlOverride => {
                // Allowed while the e-stop is latched: it changes what may run later, commands nothing.
                let who = self.may_change(
                    backend,
                    "SYST:INT:OVER",
                    Permission::OverrideInterlock,
                    true,
                )?;
                let [name, seconds, reason] = exact_args(unit)?;
                let seconds: f64 = seconds.parse().ok().filter(|s: &f64| s.is_finite() && *s > 0.0).ok_or_else(|| {
                    Fault::new(
                        ScpiError::DataOutOfRange,
                        format!("SYST:INT:OVER: seconds: expected a positive number, got {seconds:?}"),
                    )
                })?;
                let duration = std::time::Duration::try_from_secs_f64(seconds)
                    .unwrap_or(std::time::Duration::MAX);
                backend
                    .override_interlock(&name, duration, &reason, who)
                    .await
                    .map_err(|e| api_fault("SYST:INT:OVER", e))?;
                Ok(None)
            }
            Cmd::IntlOverrideClear => {
                let who = self.may_change(
                    backend,
                    "SYST:INT:OVER:CLE",
                    Permission::OverrideInterlock,
                    true,
                )?;
                let [name] = exact_args(unit)?;
                backend
                    .withdraw_override(&name, who)
                    .await
                    .map_err(|e| api_fault("SYST:INT:OVER:CLE", e))?;
                Ok(None)
            }
            Cmd::IntlState => {
                self.may_read(backend, "SYST:INT:STAT?")?;
                let [name] = exact_args(unit)?;
                let status = backend
                    .interlocks()
                    .await
                    .into_iter()
                    .find(|i| i.name == name)
                    .ok_or_else(|| {
                        Fault::new(ScpiError::DataOutOfRange, format!("no interlock {name}"))
                    })?;
                Ok(Some(match status.state {
                    InterlockState::Clear => format!("CLE,{}", format_string("")),
                    InterlockState::Tripped { reason } => {
                        format!("TRIP,{}", format_string(&reason))
                    }
                    InterlockState::Overridden {
                        reason,
                        by,
                        because,
                        ..
                    } => format!(
                        "OVER,{},{},{}",
                        format_string(&reason),
                        format_string(&by),
                        format_string(&because)
                    ),
                }))
            }
            Cmd::InstList => {
                self.may_read(backend, "INST:LIST?")?;
                let snapshot = backend.snapshot();
                Ok(Some(list(
                    snapshot.instruments.iter().map(|i| format_string(&i.id)),
                )))
            }
            Cmd::InstStat => {
                self.may_read(backend, "INST:STAT?")?;
                let [id] = exact_args(unit)?;
                let snapshot = backend.snapshot();
                let view = snapshot
                    .instruments
                    .iter()
                    .find(|i| i.id == id)
                    .ok_or_else(|| unknown_instrument(&id))?;
                let (connection, mut detail) = match &view.connection {
                    Connection::Connecting => ("connecting", String::new()),
                    Connection::Online => ("online", String::new()),
                    Connection::Lost(why) => ("lost", why.clone()),
                };
                let state = match &view.state {
                    None => "unknown",
                    Some(DeviceState::Idle) => "idle",
                    Some(DeviceState::Busy) => "busy",
                    Some(DeviceState::Alarm(why)) | Some(DeviceState::Locked(why)) => {
                        if !detail.is_empty() {
                            detail.push_str("; ");
                        }
                        detail.push_str(why);
                        if matches!(view.state, Some(DeviceState::Alarm(_))) {
                            "alarm"
                        } else {
                            "locked"
                        }
                    }
                };
                Ok(Some(format!(
                    "{connection},{state},{},{}",
                    u8::from(view.busy),
                    format_string(&detail)
                )))
            }
            Cmd::Meas => {
                self.may_read(backend, "MEAS?")?;
                let [id, quantity] = exact_args(unit)?;
                let snapshot = backend.snapshot();
                let view = snapshot
                    .instruments
                    .iter()
                    .find(|i| i.id == id)
                    .ok_or_else(|| unknown_instrument(&id))?;
                if view.connection != Connection::Online {
                    return Err(Fault::new(
                        ScpiError::DataCorruptOrStale,
                        format!("{id} is not online; its last readings are stale"),
                    ));
                }
                let value = view
                    .values
                    .iter()
                    .find(|(q, _)| q.eq_ignore_ascii_case(&quantity))
                    .map(|(_, v)| *v)
                    .ok_or_else(|| {
                        let known: Vec<&str> = view.values.iter().map(|(q, _)| *q).collect();
                        Fault::new(
                            ScpiError::DataOutOfRange,
                            format!(
                                "{id} has no reading of {quantity}; it reports: {}",
                                if known.is_empty() {
                                    "nothing yet".to_owned()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        )
                    })?;
                Ok(Some(format_number(value)))
            }
            Cmd::RunSubmit => {
                let who = self.may_change(backend, "RUN:SUBM", Permission::Submit, false)?;
                let raw = unit.raw_params();
                if raw.is_empty() {
                    return Err(Fault::new(
                        ScpiError::MissingParameter,
                        "RUN:SUBM takes the protocol as JSON",
                    ));
                }
                // The JSON as sent; a quoted string is accepted too and unquoted first.
                let json = if raw.starts_with(['"', '\'']) {
                    parse_string(raw).ok_or_else(|| {
                        Fault::new(ScpiError::InvalidStringData, "unterminated quoted protocol")
                    })?
                } else {
                    raw.to_owned()
                };
                let reply = backend.submit(json.into_bytes(), who).await;
                match (&reply.run_id, reply.accepted) {
                    (Some(run_id), true) => Ok(Some(format_string(run_id))),
                    _ => {
                        let why = if let Some(error) = &reply.error {
                            error.to_string()
                        } else if let Some(f) = reply
                            .findings
                            .iter()
                            .find(|f| f.severity == labctl_protocols::Severity::Error)
                            .or(reply.findings.first())
                        {
                            let path = if f.path.is_empty() { "/" } else { &f.path };
                            format!(
                                "protocol refused ({} finding(s)); first: {path}: {}",
                                reply.findings.len(),
                                f.message
                            )
                        } else {
                            "protocol refused".to_owned()
                        };
                        Err(Fault::new(ScpiError::ExecutionError, why))
                    }
                }
            }
            Cmd::RunStat => {
                self.may_read(backend, "RUN:STAT?")?;
                let [run_id] = exact_args(unit)?;
                let info = backend.run(&run_id).await.ok_or_else(|| {
                    Fault::new(ScpiError::DataOutOfRange, format!("unknown run {run_id}"))
                })?;
                Ok(Some(format!(
                    "{},{},{},{}",
                    info.state,
                    format_string(info.current_step.as_deref().unwrap_or("")),
                    info.results,
                    format_string(info.reason.as_deref().unwrap_or(""))
                )))
            }
            Cmd::RunControl(control) => {
                let what = match control {
                    Control::Pause => "RUN:PAUS",
                    Control::Resume => "RUN:RES",
                    Control::Abort => "RUN:ABOR",
                };
                // Aborting only makes things safer: allowed while the emergency stop is latched.
                let who = self.may_change(
                    backend,
                    what,
                    Permission::ControlOwnRun,
                    control == Control::Abort,
                )?;
                let [run_id] = exact_args(unit)?;
                backend
                    .control(&run_id, control, who)
                    .await
                    .map_err(|e| api_fault(what, e))?;
                Ok(None)
            }
            Cmd::RunApprove => {
                let who = self.may_change(backend, "RUN:APPR", Permission::Approve, false)?;
                let [run_id] = exact_args(unit)?;
                backend
                    .approve(&run_id, who)
                    .await
                    .map_err(|e| api_fault("RUN:APPR", e))?;
                Ok(None)
            }
            Cmd::RunReject => {
                // Rejecting only makes things safer: allowed while the emergency stop is latched.
                let who = self.may_change(backend, "RUN:REJ", Permission::Approve, true)?;
                let [run_id, reason] = exact_args(unit)?;
                if reason.trim().is_empty() {
                    return Err(Fault::new(
                        ScpiError::IllegalParameterValue,
                        "RUN:REJ: reason: expected why the run is rejected, got an empty string",
                    ));
                }
                backend
                    .reject(&run_id, &reason, who)
                    .await
                    .map_err(|e| api_fault("RUN:REJ", e))?;
                Ok(None)
            }
        }
    }
}

fn takes_no_params(cmd: Cmd) -> bool {
    !matches!(
        cmd,
        Cmd::InstStat
            | Cmd::RunStat
            | Cmd::RunControl(_)
            | Cmd::RunApprove
            | Cmd::RunReject
            | Cmd::Login
            | Cmd::Meas
            | Cmd::RunSubmit
            | Cmd::IntlOverride
            | Cmd::IntlOverrideClear
            | Cmd::IntlState
    )
}

/// Finds the command a unit names: under the path of the previous unit first (`RUN:PAUS r1;RES r1`), then
/// from the root. Returns the new path for the next unit (unchanged after a common command).
fn lookup(unit: &ProgramUnit, path: &[Mnemonic]) -> Option<(Cmd, Option<Vec<Mnemonic>>)> {
    let header = &unit.header;
    let mut candidates = Vec::with_capacity(2);
    if !header.common && !header.absolute && !path.is_empty() {
        let mut relative = header.clone();
        relative.mnemonics = path.iter().chain(&header.mnemonics).cloned().collect();
        candidates.push(relative);
    }
    candidates.push(header.clone());
    for candidate in &candidates {
        for (pattern, cmd) in COMMANDS {
            if labctl_codecs::scpi::header_matches(candidate, pattern) {
                let new_path = (!candidate.common).then(|| {
                    candidate
                        .mnemonics
                        .split_last()
                        .map(|(_, p)| p.to_vec())
                        .unwrap_or_default()
                });
                return Some((*cmd, new_path));
            }
        }
    }
    None
}

/// The unit's comma-separated arguments: each a quoted string (`"pump-red"`, `'a,b'`) or a bare token
/// without white space (`pump-red`, `run-17-3`).
fn args(unit: &ProgramUnit) -> Result<Vec<String>, Fault> {
    let raw = unit.raw_params();
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    split_fields(raw)
        .into_iter()
        .map(|field| {
            let field = field.trim_matches(|c: char| c != '\n' && c <= ' ');
            if field.is_empty() {
                Err(Fault::new(ScpiError::SyntaxError, "empty parameter"))
            } else if field.starts_with(['"', '\'']) {
                let value = parse_string(field).ok_or_else(|| {
                    Fault::new(
                        ScpiError::InvalidStringData,
                        format!("string parameter {field:?}"),
                    )
                })?;
                // Ids, names and passwords never hold control characters; refusing them keeps terminal
                // escapes out of error messages and logs.
                match value.chars().find(|c| c.is_control()) {
                    Some(c) => Err(Fault::new(
                        ScpiError::InvalidCharacter,
                        format!("{c:?} in string parameter"),
                    )),
                    None => Ok(value),
                }
            } else if let Some(c) = field.chars().find(|c| c.is_control() || *c == ' ') {
                Err(Fault::new(
                    ScpiError::SyntaxError,
                    format!("{c:?} in parameter {field:?}; quote it"),
                ))
            } else {
                Ok(field.to_owned())
            }
        })
        .collect()
}

fn exact_args<const N: usize>(unit: &ProgramUnit) -> Result<[String; N], Fault> {
    let args = args(unit)?;
    let count = args.len();
    args.try_into().map_err(|_| {
        let error = if count < N {
            ScpiError::MissingParameter
        } else {
            ScpiError::ParameterNotAllowed
        };
        Fault::new(
            error,
            format!("{} takes {N} parameter(s), got {count}", unit.header),
        )
    })
}

fn list(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(",")
}

fn unknown_instrument(id: &str) -> Fault {
    Fault::new(ScpiError::DataOutOfRange, format!("no instrument {id}"))
}

/// How a refusal from the controller reads in the error queue.
fn api_fault(what: &str, e: ApiError) -> Fault {
    let error = match &e {
        ApiError::Forbidden(_) => ScpiError::CommandProtected,
        ApiError::UnknownRun(_) | ApiError::UnknownInterlock(_) | ApiError::BadArgument(_) => {
            ScpiError::DataOutOfRange
        }
        ApiError::InvalidState(_) | ApiError::ProposalReused { .. } => ScpiError::SettingsConflict,
        ApiError::OverQuota(_) => ScpiError::ExecutionError,
        ApiError::EStopLatched
        | ApiError::Unavailable
        | ApiError::Interlocked(_)
        | ApiError::Journal(_) => ScpiError::ExecutionError,
    };
    Fault::new(error, format!("{what}: {e}"))
}

#[cfg(test)]
mod tests;
