//! The driver of a Modbus instrument described by a definition (`[modbus]` in its file): readings from
//! holding or input registers or coils, actions written to a holding register or a coil, safe-state and
//! recovery steps as register writes, all through `tokio-modbus` over RTU (a serial line) or TCP.
//!
//! The driver owns its connection (one Modbus client per instrument, opened by `start` and again after a
//! transport error); every request has the definition's reply timeout. A Modbus exception reply becomes a
//! device error naming the exception.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use labctl_protocols::InstrumentKind;
use labctl_protocols::instrument_def::{
    Completion, InstrumentDefinition, ModbusTransport, Register, RegisterTable, RegisterWrite,
};
use labctl_transport::{Endpoint, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context, Reader, Writer, rtu, tcp};
use tokio_modbus::{ExceptionCode, Slave};
use tracing::warn;

use crate::error::{DriverError, PortError};
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};

/// How often a completion condition on a reading is checked.
const COMPLETION_POLL: Duration = Duration::from_millis(200);

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

/// A Modbus instrument's driver.
pub struct ModbusInstrument {
    id: String,
    endpoint: Endpoint,
    definition: Arc<InstrumentDefinition>,
    transport: ModbusTransport,
    unit: u8,
    timeout: Duration,
    context: Option<Context>,
    names: Vec<&'static str>,
    time_scale: f64,
}

impl std::fmt::Debug for ModbusInstrument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusInstrument")
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

impl ModbusInstrument {
    /// The driver for a Modbus `definition` reached at `endpoint`; no I/O until [`Instrument::start`].
    pub fn new(
        id: &str,
        endpoint: Endpoint,
        definition: Arc<InstrumentDefinition>,
    ) -> Result<ModbusInstrument, DriverError> {
        let settings = definition
            .modbus
            .clone()
            .ok_or_else(|| DriverError::Unsupported {
                instrument: id.to_owned(),
                what: "transport".into(),
                found: "a line instrument".into(),
                supported: "a definition with [modbus]".into(),
            })?;
        let names = definition
            .readings
            .iter()
            .map(|r| super::defined::intern(&r.name))
            .collect();
        Ok(ModbusInstrument {
            id: id.to_owned(),
            endpoint,
            transport: settings.transport,
            unit: settings.unit_id,
            timeout: Duration::from_millis(u64::from(settings.reply_timeout_ms)),
            definition,
            context: None,
            names,
            time_scale: 1.0,
        })
    }

    /// Seconds of the instrument's own time per real second (a simulated lab's warp).
    pub fn time_scale(mut self, scale: f64) -> ModbusInstrument {
        self.time_scale = super::sane_time_scale(scale);
        self
    }

    fn device_seconds(&self, s: f64) -> Duration {
        Duration::from_secs_f64((s / self.time_scale).clamp(0.0, 1.0e7))
    }

    async fn connect(&mut self) -> Result<(), DriverError> {
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

    async fn read(&mut self, index: usize) -> Result<f64, DriverError> {
        let definition = Arc::clone(&self.definition);
        let reading = &definition.readings[index];
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

    async fn run_action(
        &mut self,
        action: &str,
        params: &BTreeMap<String, f64>,
    ) -> Result<Outcome, DriverError> {
        let definition = Arc::clone(&self.definition);
        let id = self.id.clone();
        let invalid = |reason: String| DriverError::InvalidCommand {
            instrument: id.clone(),
            command: action.to_owned(),
            reason,
        };
        let spec = definition
            .action(action)
            .ok_or_else(|| invalid(format!("the definition has no action {action}")))?;
        // Ranges first, as for a line instrument: nothing outside the definition reaches the wire.
        spec.render(params).map_err(|e| invalid(e.to_string()))?;
        let register = spec
            .register
            .as_ref()
            .ok_or_else(|| invalid("no register".into()))?;
        let value = match (spec.params.first(), spec.value) {
            (Some(p), _) => *params
                .get(&p.name)
                .ok_or_else(|| invalid(format!("no value for {}", p.name)))?,
            (None, Some(v)) => v,
            (None, None) => return Err(invalid("nothing to write".into())),
        };
        let raw = (value - spec.offset) / spec.scale;
        let words = register.encode(raw).ok_or_else(|| {
            invalid(format!(
                "{value} does not fit a {:?} register",
                register.data_type
            ))
        })?;
        if let Err(f) = self
            .write_words(register.table, register.address, &words)
            .await
        {
            return Err(self.fail(action, f));
        }
        match &spec.completion {
            Completion::Acknowledged => {}
            Completion::AfterS(s) => tokio::time::sleep(self.device_seconds(*s)).await,
            Completion::Reading {
                reading,
                param,
                tolerance,
                timeout_s,
            } => {
                let index = definition
                    .readings
                    .iter()
                    .position(|r| &r.name == reading)
                    .ok_or_else(|| invalid(format!("no reading {reading}")))?;
                let target = *params
                    .get(param)
                    .ok_or_else(|| invalid(format!("no parameter {param}")))?;
                let deadline = Instant::now() + self.device_seconds(*timeout_s);
                loop {
                    let value = self.read(index).await?;
                    if (value - target).abs() <= *tolerance {
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(DriverError::Device {
                            instrument: self.id.clone(),
                            code: "timeout".into(),
                            message: format!(
                                "{reading} is {value}, not within {tolerance} of {target} after {timeout_s} s"
                            ),
                        });
                    }
                    tokio::time::sleep(COMPLETION_POLL).await;
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// Writes a safe-state or recovery sequence, every step even if one fails; the first error is returned.
    async fn sequence(&mut self, steps: &[String]) -> Result<(), DriverError> {
        if self.context.is_none() {
            self.connect().await?;
        }
        let mut first = Ok(());
        let definition = Arc::clone(&self.definition);
        for step in steps {
            // An action that writes a fixed value (`stop_flow`), or a raw register write.
            let fixed = definition
                .action(step)
                .and_then(|a| Some((a.register.as_ref()?, a.value?, a.scale, a.offset)))
                .and_then(|(r, v, scale, offset)| {
                    Some((r.table, r.address, r.encode((v - offset) / scale)?))
                });
            if let Some((table, address, words)) = fixed {
                let result = self.write_words(table, address, &words).await;
                if let Err(f) = result {
                    let e = self.fail(step, f);
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
                continue;
            }
            let result = match step.parse::<RegisterWrite>() {
                Ok(w) => match self.write_words(w.table, w.address, &[w.value]).await {
                    Ok(()) => Ok(()),
                    Err(f) => Err(self.fail(step, f)),
                },
                Err(reason) => Err(DriverError::InvalidCommand {
                    instrument: self.id.clone(),
                    command: step.clone(),
                    reason,
                }),
            };
            if let Err(e) = result
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

impl Instrument for ModbusInstrument {
    fn kind(&self) -> InstrumentKind {
        InstrumentKind::Defined
    }

    /// Connects and reads every reading once: a Modbus instrument reports no identity of its own, so the
    /// identity is the definition's fixed one, and the first reads prove the unit answers.
    async fn start(&mut self) -> Result<Identity, DriverError> {
        self.context = None;
        self.connect().await?;
        for index in 0..self.definition.readings.len() {
            self.read(index).await?;
        }
        let fixed = &self.definition.identity.fixed;
        let field = |name: &str| fixed.get(name).cloned().unwrap_or_default();
        Ok(Identity {
            manufacturer: field("manufacturer"),
            model: field("model"),
            serial: field("serial"),
            firmware: field("firmware"),
        })
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::Defined { action, params } => self.run_action(action, params).await,
            DeviceCommand::Read { quantity } => {
                let Some(index) = self
                    .definition
                    .readings
                    .iter()
                    .position(|r| &r.name == quantity)
                else {
                    return Err(DriverError::InvalidCommand {
                        instrument: self.id.clone(),
                        command: "read".into(),
                        reason: format!("no reading {quantity} in the definition"),
                    });
                };
                let value = self.read(index).await?;
                Ok(Outcome::Reading {
                    quantity: quantity.clone(),
                    value,
                    unit: self.definition.readings[index].unit.clone(),
                })
            }
            other => Err(DriverError::WrongKind {
                instrument: self.id.clone(),
                command: super::command_name(other),
                kind: InstrumentKind::Defined.to_string(),
            }),
        }
    }

    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        let mut values = Vec::with_capacity(self.names.len());
        for index in 0..self.names.len() {
            let value = self.read(index).await?;
            values.push((self.names[index], value));
        }
        Ok(Telemetry {
            state: DeviceState::Idle,
            values,
        })
    }

    async fn safe_state(&mut self) -> Result<(), DriverError> {
        let steps = self.definition.safe_state.clone();
        self.sequence(&steps).await
    }

    async fn recover(&mut self) -> Result<(), DriverError> {
        let steps = self.definition.recovery.clone();
        self.sequence(&steps).await
    }

    async fn stop(&mut self) {
        if self.context.is_some()
            && let Err(error) = self.safe_state().await
        {
            warn!(instrument = %self.id, %error, "safe state on stop failed");
        }
        if let Some(mut ctx) = self.context.take() {
            let _ = ctx.disconnect().await;
        }
    }
}
