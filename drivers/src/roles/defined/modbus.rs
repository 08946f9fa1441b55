//! The wire of a Modbus instrument described by a definition (`[modbus]` in its file): readings from
//! holding or input registers or coils, actions written to a holding register or a coil, safe-state and
//! recovery steps as fixed-value actions or register writes, identity fields from string or integer
//! registers, all through `tokio-modbus` over RTU (a serial line) or TCP.
//!
//! The connection is a [`ModbusLine`]: Modbus RTU units on one serial line (multi-drop RS-485) share one,
//! with their requests serialised and the unit id switched per request (`set_slave`); a Modbus TCP
//! instrument has one of its own. One tokio task owns each line's connection and does its I/O, as a port
//! task owns an ASCII line; the instruments send it requests and wait for its answers. Every request has its instrument's reply timeout. A unit that does not
//! answer in time gets its own timeout and the line stays open for the others (a silent RS-485 slave does
//! not disturb the bus); on TCP the connection is dropped instead, so a late reply cannot answer the next
//! request. An I/O or framing error drops the line's connection: the next request on it opens it again,
//! once for all its instruments, and every other instrument on the line gets an error of its own on its
//! next request (so the controller makes each one safe). A Modbus exception reply becomes a device error
//! naming the exception. `connect` reads the definition's identity registers, then every reading once.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use labctl_protocols::instrument_def::{
    ActionSpec, InstrumentDefinition, ModbusTransport, Register, RegisterTable, RegisterWrite,
};
use labctl_transport::{Endpoint, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_modbus::client::{Client, Context, Reader, Writer, rtu, tcp};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use super::Wire;
use crate::error::{DriverError, PortError};

/// labctl's byte stream (serial, TCP or in-memory), as `tokio-modbus` takes a transport.
struct Transport(Stream);

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transport")
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// One Modbus connection (a serial line or a socket) and the instruments that use it. The connection
/// lives in the line's task ([`LineTask`]), started by the first request.
pub struct ModbusLine {
    endpoint: Endpoint,
    transport: ModbusTransport,
    /// The line task's inbox, once it runs.
    task: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    /// Bumped each time a transport error drops the connection: a wire that attached before then has
    /// missed the reset. Shared with the task, which bumps it.
    generation: Arc<AtomicU64>,
    /// Whether the task holds an open connection (for tests and diagnostics).
    open: Arc<std::sync::atomic::AtomicBool>,
    /// Wires attached (started and not stopped): the connection closes with the last one.
    users: AtomicUsize,
}

impl std::fmt::Debug for ModbusLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusLine")
            .field("endpoint", &self.endpoint.name())
            .field("transport", &self.transport)
            .field("generation", &self.generation.load(Ordering::SeqCst))
            .finish()
    }
}

/// What the line's task is asked to do.
enum Job {
    /// One request to `unit`, answered with the words read (or none) and the line's generation after it.
    Transact {
        unit: u8,
        timeout: Duration,
        request: Request,
        reply: oneshot::Sender<Result<(Vec<u16>, u64), Failure>>,
    },
    /// Close the connection (the last instrument left); answered once it is closed.
    Close { done: oneshot::Sender<()> },
}

/// The task that owns a line's connection: it opens it on demand, does every request in turn, drops the
/// connection on a transport error and closes it when asked. It ends when its line is dropped.
struct LineTask {
    endpoint: Endpoint,
    transport: ModbusTransport,
    context: Option<Context>,
    generation: Arc<AtomicU64>,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl LineTask {
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(job) = jobs.recv().await {
            match job {
                Job::Transact {
                    unit,
                    timeout,
                    request,
                    reply,
                } => {
                    let result = self.transact(unit, timeout, &request).await;
                    self.open.store(self.context.is_some(), Ordering::SeqCst);
                    // The instrument may have given up waiting (its own task stopped): nothing to tell.
                    let _ = reply.send(result);
                }
                Job::Close { done } => {
                    if let Some(mut ctx) = self.context.take() {
                        let _ = ctx.disconnect().await;
                    }
                    self.open.store(false, Ordering::SeqCst);
                    let _ = done.send(());
                }
            }
        }
        if let Some(mut ctx) = self.context.take() {
            let _ = ctx.disconnect().await;
        }
    }

    fn io(&self, e: impl std::fmt::Display) -> DriverError {
        DriverError::Port(PortError::Io {
            port: self.endpoint.name().to_owned(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn drop_connection(&mut self) {
        self.context = None;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// One request to `unit`, alone on the line until it is answered or times out.
    async fn transact(
        &mut self,
        unit: u8,
        timeout: Duration,
        request: &Request,
    ) -> Result<(Vec<u16>, u64), Failure> {
        if self.context.is_none() {
            let stream = labctl_transport::open(&self.endpoint)
                .await
                .map_err(|e| Failure::Transport(PortError::from(e).into()))?;
            let transport = Transport(stream);
            self.context = Some(match self.transport {
                ModbusTransport::Rtu => rtu::attach_slave(transport, Slave(unit)),
                ModbusTransport::Tcp => tcp::attach_slave(transport, Slave(unit)),
            });
        }
        let Some(ctx) = self.context.as_mut() else {
            return Err(Failure::Transport(self.io("not connected")));
        };
        ctx.set_slave(Slave(unit));
        let call = async {
            match request {
                Request::Read {
                    table: RegisterTable::Holding,
                    address,
                    count,
                } => ctx.read_holding_registers(*address, *count).await,
                Request::Read {
                    table: RegisterTable::Input,
                    address,
                    count,
                } => ctx.read_input_registers(*address, *count).await,
                Request::Read {
                    table: RegisterTable::Coil,
                    address,
                    ..
                } => ctx
                    .read_coils(*address, 1)
                    .await
                    .map(|r| r.map(|coils| vec![u16::from(coils.first() == Some(&true))])),
                Request::Write {
                    table,
                    address,
                    words,
                } => match (table, words.as_slice()) {
                    (RegisterTable::Coil, [w]) => ctx.write_single_coil(*address, *w != 0).await,
                    (_, [w]) => ctx.write_single_register(*address, *w).await,
                    (_, many) => ctx.write_multiple_registers(*address, many).await,
                }
                .map(|r| r.map(|()| Vec::new())),
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                // A silent RTU unit leaves the bus usable (tokio-modbus clears what arrived before the
                // next request and checks the unit id of every reply); a TCP socket that stops answering
                // is dropped.
                if self.transport == ModbusTransport::Tcp {
                    self.drop_connection();
                }
                Err(Failure::Timeout)
            }
            Ok(Err(e)) => {
                let error = self.io(e);
                self.drop_connection();
                Err(Failure::Transport(error))
            }
            Ok(Ok(Err(code))) => Err(Failure::Exception(code)),
            // The generation read in the task: a reset by another unit's later request is not missed.
            Ok(Ok(Ok(words))) => Ok((words, self.generation.load(Ordering::SeqCst))),
        }
    }
}

/// What a request asks of the line.
#[derive(Debug, Clone)]
enum Request {
    Read {
        table: RegisterTable,
        address: u16,
        count: u16,
    },
    Write {
        table: RegisterTable,
        address: u16,
        words: Vec<u16>,
    },
}

/// What went wrong with one request.
enum Failure {
    /// The unit did not answer within its timeout.
    Timeout,
    /// The connection failed (I/O, a damaged or foreign reply, or it could not be opened).
    Transport(DriverError),
    /// The device answered with an exception.
    Exception(ExceptionCode),
}

impl ModbusLine {
    /// A line reached at `endpoint`; no I/O (and no task) until a request.
    pub fn new(endpoint: Endpoint, transport: ModbusTransport) -> Arc<ModbusLine> {
        Arc::new(ModbusLine {
            endpoint,
            transport,
            task: std::sync::Mutex::new(None),
            generation: Arc::new(AtomicU64::new(0)),
            open: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            users: AtomicUsize::new(0),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn transport(&self) -> ModbusTransport {
        self.transport
    }

    /// Whether the line's task holds an open connection now.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn io(&self, e: impl std::fmt::Display) -> DriverError {
        DriverError::Port(PortError::Io {
            port: self.endpoint.name().to_owned(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// The line task's inbox, starting the task on first use (inside the runtime, from a request).
    fn inbox(&self) -> mpsc::Sender<Job> {
        let mut task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = task.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        // Requests queue behind the one in progress; each instrument has at most one outstanding.
        let (tx, rx) = mpsc::channel(16);
        let line = LineTask {
            endpoint: self.endpoint.clone(),
            transport: self.transport,
            context: None,
            generation: Arc::clone(&self.generation),
            open: Arc::clone(&self.open),
        };
        tokio::spawn(line.run(rx));
        *task = Some(tx.clone());
        tx
    }

    /// One request to `unit`, done by the line's task alone on the line.
    async fn transact(
        &self,
        unit: u8,
        timeout: Duration,
        request: &Request,
    ) -> Result<(Vec<u16>, u64), Failure> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Transact {
            unit,
            timeout,
            request: request.clone(),
            reply,
        };
        if self.inbox().send(job).await.is_err() {
            return Err(Failure::Transport(self.io("the line's task has stopped")));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Failure::Transport(self.io("the line's task has stopped"))))
    }

    /// One wire fewer on the line; the last one closes the connection.
    async fn leave(&self) {
        if self.users.fetch_sub(1, Ordering::SeqCst) == 1 {
            let tx = self
                .task
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if let Some(tx) = tx {
                let (done, closed) = oneshot::channel();
                if tx.send(Job::Close { done }).await.is_ok() {
                    let _ = closed.await;
                }
            }
        }
    }
}

/// The Modbus lines of a lab: one per serial port (its RTU units share it), one per TCP instrument.
#[derive(Debug, Default)]
pub struct ModbusLines {
    lines: Vec<Arc<ModbusLine>>,
}

impl ModbusLines {
    /// The line for an instrument reached at `endpoint`: the RTU line already open on that serial port
    /// (refused when its settings differ), else a new one. Every TCP instrument gets its own.
    pub fn line(
        &mut self,
        instrument: &str,
        endpoint: &Endpoint,
        transport: ModbusTransport,
    ) -> Result<Arc<ModbusLine>, DriverError> {
        if transport == ModbusTransport::Rtu
            && let Some(line) = self
                .lines
                .iter()
                .find(|l| l.transport == ModbusTransport::Rtu && l.endpoint.same_line(endpoint))
        {
            if let (Endpoint::Serial(open), Endpoint::Serial(asked)) = (&line.endpoint, endpoint)
                && open != asked
            {
                return Err(DriverError::Unsupported {
                    instrument: instrument.to_owned(),
                    what: format!("line settings on {}", endpoint.name()),
                    found: line_label(asked),
                    supported: format!(
                        "the settings of the Modbus units already on it, {}",
                        line_label(open)
                    ),
                });
            }
            return Ok(Arc::clone(line));
        }
        let line = ModbusLine::new(endpoint.clone(), transport);
        self.lines.push(Arc::clone(&line));
        Ok(line)
    }

    /// The wire of a lab-file Modbus instrument reached at `endpoint`: on its line, addressed by the lab's
    /// `address` (the bench's unit id) or else the definition's `unit_id`.
    pub fn wire(
        &mut self,
        instrument: &labctl_protocols::lab::Instrument,
        endpoint: &Endpoint,
    ) -> Result<ModbusWire, DriverError> {
        let id = instrument.id.as_str();
        let definition = super::definition_of(instrument)?;
        let transport = ModbusWire::settings(id, &definition)?.transport;
        let line = self.line(id, endpoint, transport)?;
        ModbusWire::on_line(id, line, definition, instrument.address)
    }

    /// Whether a Modbus line is open on (or reserved for) `endpoint`'s port.
    pub fn uses(&self, endpoint: &Endpoint) -> bool {
        self.lines.iter().any(|l| l.endpoint.same_line(endpoint))
    }

    pub fn lines(&self) -> impl Iterator<Item = &Arc<ModbusLine>> {
        self.lines.iter()
    }
}

/// `19200 8E1`.
fn line_label(line: &labctl_protocols::lab::SerialLine) -> String {
    let parity = match line.parity {
        labctl_protocols::lab::Parity::None => 'N',
        labctl_protocols::lab::Parity::Even => 'E',
        labctl_protocols::lab::Parity::Odd => 'O',
    };
    format!("{} {}{parity}{}", line.baud, line.data_bits, line.stop_bits)
}

/// Modbus registers over RTU or TCP, for one unit on its line.
pub struct ModbusWire {
    id: String,
    line: Arc<ModbusLine>,
    definition: Arc<InstrumentDefinition>,
    unit: u8,
    timeout: Duration,
    /// Counted among the line's users (from `connect` or a step until `disconnect`).
    attached: bool,
    /// The line's generation when this wire last knew it good; `None` after a failure until it
    /// reconnects.
    seen: Option<u64>,
}

impl std::fmt::Debug for ModbusWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusWire")
            .field("id", &self.id)
            .field("endpoint", &self.line.endpoint.name())
            .field("unit", &self.unit)
            .field("connected", &self.seen.is_some())
            .finish()
    }
}

impl ModbusWire {
    /// The wire for a Modbus `definition` on a line of its own reached at `endpoint`; no I/O until it
    /// connects.
    pub fn new(
        id: &str,
        endpoint: Endpoint,
        definition: Arc<InstrumentDefinition>,
    ) -> Result<ModbusWire, DriverError> {
        let transport = Self::settings(id, &definition)?.transport;
        ModbusWire::on_line(id, ModbusLine::new(endpoint, transport), definition, None)
    }

    /// The wire for unit `unit` (the definition's `unit_id` when `None`) on a shared `line`.
    pub fn on_line(
        id: &str,
        line: Arc<ModbusLine>,
        definition: Arc<InstrumentDefinition>,
        unit: Option<u8>,
    ) -> Result<ModbusWire, DriverError> {
        let settings = Self::settings(id, &definition)?;
        Ok(ModbusWire {
            id: id.to_owned(),
            line,
            unit: unit.unwrap_or(settings.unit_id),
            timeout: Duration::from_millis(u64::from(settings.reply_timeout_ms)),
            definition,
            attached: false,
            seen: None,
        })
    }

    fn settings(
        id: &str,
        definition: &InstrumentDefinition,
    ) -> Result<labctl_protocols::instrument_def::ModbusSettings, DriverError> {
        definition
            .modbus
            .clone()
            .ok_or_else(|| DriverError::Unsupported {
                instrument: id.to_owned(),
                what: "transport".into(),
                found: "a line instrument".into(),
                supported: "a definition with [modbus]".into(),
            })
    }

    /// Joins the line (counted as a user) and takes its current state as good.
    fn attach(&mut self) {
        if !self.attached {
            self.line.users.fetch_add(1, Ordering::SeqCst);
            self.attached = true;
        }
        self.seen = Some(self.line.generation());
    }

    fn timed_out(&self) -> DriverError {
        DriverError::Port(PortError::Timeout {
            port: format!("{} (unit {})", self.line.endpoint.name(), self.unit),
            timeout: self.timeout,
        })
    }

    fn exception(&self, what: &str, code: ExceptionCode) -> DriverError {
        DriverError::Device {
            instrument: self.id.clone(),
            code: format!("{code:?}"),
            message: format!("the instrument refused {what} (Modbus exception)"),
        }
    }

    /// One request for this unit. Refused without I/O when the wire is not connected, or when the line
    /// was reset by another unit's transport error since this wire last used it (its error is this
    /// instrument's own: the controller makes it safe, and its next start or step goes on).
    async fn request(&mut self, what: &str, request: Request) -> Result<Vec<u16>, DriverError> {
        match self.seen {
            None => return Err(self.line.io(format!("{}: not connected", self.id))),
            Some(seen) if seen != self.line.generation() => {
                self.seen = None;
                return Err(self.line.io(format!(
                    "{}: the line was reset after a transport error; reconnect",
                    self.id
                )));
            }
            Some(_) => {}
        }
        match self.line.transact(self.unit, self.timeout, &request).await {
            Ok((words, generation)) => {
                self.seen = Some(generation);
                Ok(words)
            }
            Err(Failure::Timeout) => {
                if self.line.transport == ModbusTransport::Tcp {
                    self.seen = None;
                }
                Err(self.timed_out())
            }
            Err(Failure::Transport(e)) => {
                self.seen = None;
                Err(e)
            }
            Err(Failure::Exception(code)) => Err(self.exception(what, code)),
        }
    }

    /// Reads the words of `register`.
    async fn read_words(
        &mut self,
        what: &str,
        register: &Register,
    ) -> Result<Vec<u16>, DriverError> {
        let request = Request::Read {
            table: register.table,
            address: register.address,
            count: register.words(),
        };
        self.request(what, request).await
    }

    /// Writes `value` to `register` as `(value - offset) / scale` in its type.
    async fn write_value(
        &mut self,
        what: &str,
        register: &Register,
        value: f64,
        scale: f64,
        offset: f64,
    ) -> Result<(), DriverError> {
        let words = register.encode((value - offset) / scale).ok_or_else(|| {
            DriverError::InvalidCommand {
                instrument: self.id.clone(),
                command: what.to_owned(),
                reason: format!("{value} does not fit a {:?} register", register.data_type),
            }
        })?;
        let request = Request::Write {
            table: register.table,
            address: register.address,
            words,
        };
        self.request(what, request).await.map(|_| ())
    }
}

impl Wire for ModbusWire {
    async fn connect(&mut self) -> Result<BTreeMap<String, String>, DriverError> {
        self.attach();
        let definition = Arc::clone(&self.definition);
        let mut identity = BTreeMap::new();
        for (field, register) in &definition.identity.registers {
            let what = format!("identity {field}");
            let words = self.read_words(&what, register).await?;
            let text = register
                .decode_text(&words)
                .ok_or_else(|| DriverError::DamagedReply {
                    instrument: self.id.clone(),
                    command: what.clone(),
                    reply: format!("{words:?}"),
                    reason: format!(
                        "not a {:?} register's value (strings are printable ASCII)",
                        register.data_type
                    ),
                })?;
            identity.insert(field.clone(), text);
        }
        for index in 0..definition.readings.len() {
            self.read(index).await?;
        }
        Ok(identity)
    }

    async fn read(&mut self, index: usize) -> Result<f64, DriverError> {
        let definition = Arc::clone(&self.definition);
        let Some(reading) = definition.readings.get(index) else {
            return Err(self.line.io(format!("no reading {index}")));
        };
        let Some(register) = &reading.register else {
            return Err(self
                .line
                .io(format!("reading {} has no register", reading.name)));
        };
        let what = format!("reading {}", reading.name);
        let words = self.read_words(&what, register).await?;
        let raw = register
            .decode(&words)
            .ok_or_else(|| DriverError::DamagedReply {
                instrument: self.id.clone(),
                command: what.clone(),
                reply: format!("{words:?}"),
                reason: format!("{} words for a {:?}", words.len(), register.data_type),
            })?;
        Ok(raw * reading.scale + reading.offset)
    }

    async fn act(
        &mut self,
        action: &ActionSpec,
        params: &BTreeMap<String, f64>,
    ) -> Result<(), DriverError> {
        let invalid = |reason: String| DriverError::InvalidCommand {
            instrument: self.id.clone(),
            command: action.name.clone(),
            reason,
        };
        let register = action
            .register
            .as_ref()
            .ok_or_else(|| invalid("no register".into()))?;
        let value = match (action.params.first(), action.value) {
            (Some(p), _) => *params
                .get(&p.name)
                .ok_or_else(|| invalid(format!("no value for {}", p.name)))?,
            (None, Some(v)) => v,
            (None, None) => return Err(invalid("nothing to write".into())),
        };
        self.write_value(&action.name, register, value, action.scale, action.offset)
            .await
    }

    /// An action that writes a fixed value (`stop_flow`), or a raw register write. A safety step goes
    /// out even on a wire that lost its connection: it reconnects first.
    async fn step(&mut self, step: &str) -> Result<(), DriverError> {
        if !self.connected() {
            self.attach();
        }
        let definition = Arc::clone(&self.definition);
        if let Some(action) = definition.action(step)
            && let (Some(register), Some(value)) = (&action.register, action.value)
        {
            return self
                .write_value(step, register, value, action.scale, action.offset)
                .await;
        }
        let write =
            step.parse::<RegisterWrite>()
                .map_err(|reason| DriverError::InvalidCommand {
                    instrument: self.id.clone(),
                    command: step.to_owned(),
                    reason,
                })?;
        let request = Request::Write {
            table: write.table,
            address: write.address,
            words: vec![write.value],
        };
        self.request(step, request).await.map(|_| ())
    }

    fn connected(&self) -> bool {
        self.seen == Some(self.line.generation())
    }

    async fn disconnect(&mut self) {
        self.seen = None;
        if std::mem::take(&mut self.attached) {
            self.line.leave().await;
        }
    }
}

#[cfg(test)]
mod tests;
