//! The wire of a Modbus instrument described by a definition (`[modbus]` in its file): readings from
//! holding or input registers or coils, actions written to a holding register or a coil, safe-state and
//! recovery steps as fixed-value actions or register writes, all through `tokio-modbus` over RTU (a serial
//! line) or TCP.
//!
//! The wire owns its connection (one Modbus client per instrument, opened by `start` and again after a
//! transport error); every request has the definition's reply timeout. A Modbus exception reply becomes a
//! device error naming the exception. A Modbus instrument reports no identity over the registers labctl
//! reads: `connect` proves the unit answers by reading every reading once, and the identity is the
//! definition's fixed one.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use labctl_protocols::instrument_def::{
    ActionSpec, InstrumentDefinition, ModbusTransport, Register, RegisterTable, RegisterWrite,
};
use labctl_transport::{Endpoint, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_modbus::client::{Client, Context, Reader, Writer, rtu, tcp};
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

/// Modbus registers over RTU or TCP.
pub struct ModbusWire {
    id: String,
    endpoint: Endpoint,
    definition: Arc<InstrumentDefinition>,
    transport: ModbusTransport,
    unit: u8,
    timeout: Duration,
    context: Option<Context>,
}

impl std::fmt::Debug for ModbusWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusWire")
            .field("id", &self.id)
            .field("endpoint", &self.endpoint.name())
            .field("connected", &self.context.is_some())
            .finish()
    }
}

/// What went wrong with one request.
enum Failure {
    /// The connection is gone or the device did not answer: reconnect before the next request.
    Transport(DriverError),
    /// The device answered with an exception.
    Exception(ExceptionCode),
}

impl ModbusWire {
    /// The wire for a Modbus `definition` reached at `endpoint`; no I/O until it connects.
    pub fn new(
        id: &str,
        endpoint: Endpoint,
        definition: Arc<InstrumentDefinition>,
    ) -> Result<ModbusWire, DriverError> {
        let settings = definition
            .modbus
            .clone()
            .ok_or_else(|| DriverError::Unsupported {
                instrument: id.to_owned(),
                what: "transport".into(),
                found: "a line instrument".into(),
                supported: "a definition with [modbus]".into(),
            })?;
        Ok(ModbusWire {
            id: id.to_owned(),
            endpoint,
            transport: settings.transport,
            unit: settings.unit_id,
            timeout: Duration::from_millis(u64::from(settings.reply_timeout_ms)),
            definition,
            context: None,
        })
    }

    async fn open(&mut self) -> Result<(), DriverError> {
        let stream = labctl_transport::open(&self.endpoint)
            .await
            .map_err(PortError::from)?;
        let transport = Transport(stream);
        let slave = Slave(self.unit);
        self.context = Some(match self.transport {
            ModbusTransport::Rtu => rtu::attach_slave(transport, slave),
            ModbusTransport::Tcp => tcp::attach_slave(transport, slave),
        });
        Ok(())
    }

    fn timed_out(&self) -> DriverError {
        DriverError::Port(PortError::Timeout {
            port: self.endpoint.name().to_owned(),
            timeout: self.timeout,
        })
    }

    fn io(&self, e: impl std::fmt::Display) -> DriverError {
        DriverError::Port(PortError::Io {
            port: self.endpoint.name().to_owned(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn exception(&self, what: &str, code: ExceptionCode) -> DriverError {
        DriverError::Device {
            instrument: self.id.clone(),
            code: format!("{code:?}"),
            message: format!("the instrument refused {what} (Modbus exception)"),
        }
    }

    /// Reads the words of `register`.
    async fn read_words(&mut self, register: &Register) -> Result<Vec<u16>, Failure> {
        let timeout = self.timeout;
        let Some(ctx) = self.context.as_mut() else {
            return Err(Failure::Transport(self.io("not connected")));
        };
        let (address, count) = (register.address, register.words());
        let call = async {
            match register.table {
                RegisterTable::Holding => ctx.read_holding_registers(address, count).await,
                RegisterTable::Input => ctx.read_input_registers(address, count).await,
                RegisterTable::Coil => ctx
                    .read_coils(address, 1)
                    .await
                    .map(|r| r.map(|coils| vec![u16::from(coils.first() == Some(&true))])),
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(Failure::Transport(self.timed_out())),
            Ok(Err(e)) => Err(Failure::Transport(self.io(e))),
            Ok(Ok(Err(code))) => Err(Failure::Exception(code)),
            Ok(Ok(Ok(words))) => Ok(words),
        }
    }

    async fn write_words(
        &mut self,
        table: RegisterTable,
        address: u16,
        words: &[u16],
    ) -> Result<(), Failure> {
        let timeout = self.timeout;
        let Some(ctx) = self.context.as_mut() else {
            return Err(Failure::Transport(self.io("not connected")));
        };
        let call = async {
            match (table, words) {
                (RegisterTable::Coil, [w]) => ctx.write_single_coil(address, *w != 0).await,
                (_, [w]) => ctx.write_single_register(address, *w).await,
                (_, many) => ctx.write_multiple_registers(address, many).await,
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(Failure::Transport(self.timed_out())),
            Ok(Err(e)) => Err(Failure::Transport(self.io(e))),
            Ok(Ok(Err(code))) => Err(Failure::Exception(code)),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }

    /// A failure as the caller sees it; a transport failure drops the connection, so the next `start`
    /// opens a fresh one (a late reply on the old one can never answer a new request).
    fn fail(&mut self, what: &str, failure: Failure) -> DriverError {
        match failure {
            Failure::Transport(e) => {
                self.context = None;
                e
            }
            Failure::Exception(code) => self.exception(what, code),
        }
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
        match self
            .write_words(register.table, register.address, &words)
            .await
        {
            Ok(()) => Ok(()),
            Err(f) => Err(self.fail(what, f)),
        }
    }
}

impl Wire for ModbusWire {
    async fn connect(&mut self) -> Result<BTreeMap<String, String>, DriverError> {
        self.context = None;
        self.open().await?;
        for index in 0..self.definition.readings.len() {
            self.read(index).await?;
        }
        Ok(BTreeMap::new())
    }

    async fn read(&mut self, index: usize) -> Result<f64, DriverError> {
        let definition = Arc::clone(&self.definition);
        let Some(reading) = definition.readings.get(index) else {
            return Err(self.io(format!("no reading {index}")));
        };
        let Some(register) = &reading.register else {
            return Err(self.io(format!("reading {} has no register", reading.name)));
        };
        let what = format!("reading {}", reading.name);
        let words = match self.read_words(register).await {
            Ok(w) => w,
            Err(f) => return Err(self.fail(&what, f)),
        };
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

    /// An action that writes a fixed value (`stop_flow`), or a raw register write.
    async fn step(&mut self, step: &str) -> Result<(), DriverError> {
        if self.context.is_none() {
            self.open().await?;
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
        match self
            .write_words(write.table, write.address, &[write.value])
            .await
        {
            Ok(()) => Ok(()),
            Err(f) => Err(self.fail(step, f)),
        }
    }

    fn connected(&self) -> bool {
        self.context.is_some()
    }

    async fn disconnect(&mut self) {
        if let Some(mut ctx) = self.context.take() {
            let _ = ctx.disconnect().await;
        }
    }
}
