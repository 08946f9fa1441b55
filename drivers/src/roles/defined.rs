//! The driver of an instrument described by an instrument definition (`labctl_protocols::instrument_def`):
//! no code per instrument, the definition is the protocol. One driver, [`DefinedInstrument`], holds what
//! every definition means whatever its wire; a [`Wire`] carries it: ASCII lines on a serial line or a
//! socket ([`line`]), or Modbus registers over RTU or TCP ([`modbus`]).
//!
//! What the driver does with a definition:
//! - `start`: connects, reads the identity (the wire's answers over the definition's fixed fields), and
//!   refuses firmware the definition does not list unless the lab file allows it;
//! - `execute`: checks an action's parameters against the definition's ranges (the controller has checked
//!   the lab's envelope), has the wire carry it out (an error reply becomes a device error with the
//!   definition's message), then waits for the action's completion: a reading reaching the parameter, a
//!   fixed time in the instrument's seconds, or the acknowledgement; `Read` reads one reading;
//! - `poll`: reads every reading; `safe_state` and `recover` send every step of the definition's sequence,
//!   even after one fails, and report the first failure.

pub mod line;
pub mod modbus;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use labctl_protocols::InstrumentKind;
use labctl_protocols::instrument_def::{ActionSpec, Completion, InstrumentDefinition};
use tokio::time::Instant;
use tracing::warn;

use crate::error::DriverError;
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};

pub use line::LineWire;
pub use modbus::{ModbusLine, ModbusLines, ModbusWire};

/// How often a completion condition on a reading is checked.
const COMPLETION_POLL: Duration = Duration::from_millis(200);

/// A definition's reading names live as long as the process, like the built-in drivers' quantity names:
/// each distinct name is kept once, however many times a lab is loaded.
fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// What a definition-driven driver needs from its wire. Futures are `Send`: the driver lives in its
/// instrument's task.
pub trait Wire: Send + 'static {
    /// Opens the connection and reads what identity the wire can: fields by name (`model`, `firmware`, ...).
    fn connect(
        &mut self,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, DriverError>> + Send;

    /// The value of reading `index` of the definition, in its unit.
    fn read(&mut self, index: usize) -> impl Future<Output = Result<f64, DriverError>> + Send;

    /// Carries out `action` with `params` (in range): its commands or its register write, with its
    /// acknowledgement and error replies.
    fn act(
        &mut self,
        action: &ActionSpec,
        params: &BTreeMap<String, f64>,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// One step of the safe-state or recovery sequence.
    fn step(&mut self, step: &str) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Whether the connection is open (a safe state on stop needs one).
    fn connected(&self) -> bool;

    fn disconnect(&mut self) -> impl Future<Output = ()> + Send;
}

/// A defined instrument's driver over its wire.
#[derive(Debug)]
pub struct DefinedInstrument<W> {
    id: String,
    definition: Arc<InstrumentDefinition>,
    allow_firmware: Vec<String>,
    wire: W,
    names: Vec<&'static str>,
    time_scale: f64,
}

/// An ASCII instrument from its definition.
pub type LineInstrument = DefinedInstrument<LineWire>;
/// A Modbus instrument from its definition.
pub type ModbusInstrument = DefinedInstrument<ModbusWire>;

/// The definition a lab-file instrument was loaded with (`Lab::load` reads it); an error naming the
/// instrument when there is none.
pub fn definition_of(
    instrument: &labctl_protocols::lab::Instrument,
) -> Result<Arc<InstrumentDefinition>, DriverError> {
    instrument
        .defined()
        .cloned()
        .ok_or_else(|| DriverError::Unsupported {
            instrument: instrument.id.clone(),
            what: "definition".into(),
            found: "none loaded".into(),
            supported: "a lab loaded with Lab::load, which reads the definition file".into(),
        })
}

impl<W: Wire> DefinedInstrument<W> {
    /// The driver of `definition` for instrument `id` over `wire`; no I/O until [`Instrument::start`].
    pub fn new(
        id: &str,
        definition: Arc<InstrumentDefinition>,
        allow_firmware: Vec<String>,
        wire: W,
    ) -> DefinedInstrument<W> {
        let names = definition
            .readings
            .iter()
            .map(|r| intern(&r.name))
            .collect();
        DefinedInstrument {
            id: id.to_owned(),
            definition,
            allow_firmware,
            wire,
            names,
            time_scale: 1.0,
        }
    }

    /// Seconds of the instrument's own time per real second (a simulated lab's warp): completion waits
    /// (`after_s`, `timeout_s`) are the instrument's seconds.
    pub fn time_scale(mut self, scale: f64) -> DefinedInstrument<W> {
        self.time_scale = super::sane_time_scale(scale);
        self
    }

    fn device_seconds(&self, s: f64) -> Duration {
        Duration::from_secs_f64((s / self.time_scale).clamp(0.0, 1.0e7))
    }

    fn invalid(&self, command: &str, reason: impl Into<String>) -> DriverError {
        DriverError::InvalidCommand {
            instrument: self.id.clone(),
            command: command.to_owned(),
            reason: reason.into(),
        }
    }

    fn reading_index(&self, name: &str) -> Option<usize> {
        self.definition.readings.iter().position(|r| r.name == name)
    }

    async fn run_action(
        &mut self,
        action: &str,
        params: &BTreeMap<String, f64>,
    ) -> Result<Outcome, DriverError> {
        let definition = Arc::clone(&self.definition);
        let Some(spec) = definition.action(action) else {
            return Err(self.invalid(
                action,
                format!(
                    "the definition of {} {} has no action {action}",
                    definition.model.manufacturer, definition.model.name
                ),
            ));
        };
        // Every value within the definition's range before anything reaches the wire.
        spec.render(params)
            .map_err(|e| self.invalid(action, e.to_string()))?;
        self.wire.act(spec, params).await?;
        match &spec.completion {
            Completion::Acknowledged => {}
            Completion::AfterS(s) => tokio::time::sleep(self.device_seconds(*s)).await,
            Completion::Reading {
                reading,
                param,
                tolerance,
                timeout_s,
            } => {
                let (Some(index), Some(target)) = (self.reading_index(reading), params.get(param))
                else {
                    return Err(self.invalid(
                        action,
                        format!("completion on reading {reading} for parameter {param}"),
                    ));
                };
                let deadline = Instant::now() + self.device_seconds(*timeout_s);
                loop {
                    let value = self.wire.read(index).await?;
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

    /// Sends a safety or recovery sequence, every step even if one fails; the first error is returned.
    async fn sequence(&mut self, steps: &[String]) -> Result<(), DriverError> {
        let mut first = Ok(());
        for step in steps {
            if let Err(e) = self.wire.step(step).await
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

impl<W: Wire> Instrument for DefinedInstrument<W> {
    fn kind(&self) -> InstrumentKind {
        InstrumentKind::Defined
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        let mut fields = self.definition.identity.fixed.clone();
        fields.extend(self.wire.connect().await?);
        let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
        let identity = Identity {
            manufacturer: field("manufacturer"),
            model: field("model"),
            serial: field("serial"),
            firmware: field("firmware"),
        };
        let known = &self.definition.identity.firmware;
        if !known.contains(&identity.firmware) && !self.allow_firmware.contains(&identity.firmware)
        {
            return Err(DriverError::Unsupported {
                instrument: self.id.clone(),
                what: "firmware".into(),
                found: identity.firmware,
                supported: format!(
                    "{} (the definition's; a lab file adds its own with allow_firmware)",
                    known
                        .iter()
                        .chain(&self.allow_firmware)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(identity)
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::Defined { action, params } => self.run_action(action, params).await,
            DeviceCommand::Read { quantity } => {
                let Some(index) = self.reading_index(quantity) else {
                    return Err(
                        self.invalid("read", format!("no reading {quantity} in the definition"))
                    );
                };
                let value = self.wire.read(index).await?;
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
            let value = self.wire.read(index).await?;
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
        if self.wire.connected()
            && let Err(error) = self.safe_state().await
        {
            warn!(instrument = %self.id, %error, "safe state on stop failed");
        }
        self.wire.disconnect().await;
    }
}

#[cfg(test)]
mod tests;
