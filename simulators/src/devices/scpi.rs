//! The UV-Vis spectrophotometer, SCPI / IEEE 488.2 over a raw TCP socket (lines end `\n` or `\r\n`),
//! device side.
//!
//! Program messages are parsed by the codec ([`codec::decode_command`]): short and long forms, any case,
//! `;`-separated units with SCPI's current-path rule. Then, as IEEE 488.2 and SCPI-99 require:
//! - a bad unit never gets a reply: its error goes on the error queue (read with `SYSTem:ERRor?`), sets
//!   its bit in the event status register (`*ESR?`), and the rest of the message is discarded; commands
//!   before it run;
//! - the replies to the queries of one message go out as one line, units joined by `;`; a query that fails
//!   to execute (e.g. no sample under the probe) queues an execution error and gives no unit;
//! - a measurement takes the integration time (`CONFigure:INTegration`, virtual milliseconds) before the
//!   reading is taken; messages that arrive meanwhile wait their turn (at most [`MAX_QUEUED`]);
//! - `*RST` restores the integration time; `*CLS` clears the error queue and the event status register;
//!   `*STB?` has bit 2 (error/event queue not empty).
//!
//! Injected faults (`FaultConfig::error_code`, an SCPI error number such as `-240`): every measurement
//! fails with that error on the queue (a code SCPI does not define is reported as `-300`).

use std::collections::VecDeque;
use std::time::Duration;

use labctl_codecs::scpi::{
    self as codec, Command, ErrorQueue, Fault, Identity, Message, Reply, ScpiError,
};
use labctl_codecs::{DecodeError, Decoded};
use serde::{Deserialize, Serialize};

use super::{Ctx, Device, LineSettings};
use crate::model::{InstrumentId, LabModel, SpectroError};

/// Program messages kept while a measurement runs.
pub const MAX_QUEUED: usize = 16;

/// What the spectrophotometer says about itself, and its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScpiConfig {
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    /// Integration time after power-on and `*RST` (ms).
    pub default_integration_ms: u32,
    /// Error queue capacity.
    pub error_queue: usize,
}

impl Default for ScpiConfig {
    fn default() -> Self {
        ScpiConfig {
            manufacturer: "Photon Analytics".into(),
            model: "UV-2400 Probe".into(),
            serial: "PA24-0711385".into(),
            firmware: "3.2.1".into(),
            default_integration_ms: 100,
            error_queue: 16,
        }
    }
}

/// A message in execution.
#[derive(Debug, Clone, PartialEq)]
struct Running {
    commands: VecDeque<Command>,
    replies: Vec<Reply>,
    /// The parse fault that ended the message, queued after its commands ran.
    fault: Option<Fault>,
    /// While integrating: when the reading is taken.
    integrating_until: Option<Duration>,
}

/// The spectrophotometer.
#[derive(Debug, Clone)]
pub struct Scpi {
    config: ScpiConfig,
    instruments: [InstrumentId; 1],
    rx: Vec<u8>,
    errors: ErrorQueue,
    esr: u8,
    integration_ms: u32,
    running: Option<Running>,
    queue: VecDeque<Message>,
}

impl Scpi {
    pub fn new(config: ScpiConfig) -> Scpi {
        Scpi {
            instruments: [InstrumentId::Spectro],
            rx: Vec::new(),
            errors: ErrorQueue::new(config.error_queue),
            esr: 0,
            integration_ms: config.default_integration_ms,
            running: None,
            queue: VecDeque::new(),
            config,
        }
    }

    fn push_error(&mut self, fault: Fault) {
        self.esr |= fault.error.esr_bit();
        self.errors.push(fault);
    }

    fn is_measurement(cmd: &Command) -> bool {
        matches!(
            cmd,
            Command::MeasureAbsorbance { .. } | Command::MeasureSpectrum { .. }
        )
    }

    fn injected(ctx: &Ctx<'_>) -> Option<Fault> {
        let code = ctx.faults(InstrumentId::Spectro).error_code?;
        let number = code.trim().parse::<i32>().ok();
        Some(match number.and_then(ScpiError::from_code) {
            Some(error) => Fault::new(error, "instrument fault"),
            None => Fault::new(
                ScpiError::DeviceSpecificError,
                format!("instrument fault {}", code.trim()),
            ),
        })
    }

    fn measure_fault(error: SpectroError) -> Fault {
        match error {
            SpectroError::NoVial => Fault::new(ScpiError::ExecutionError, "no sample at the probe"),
            SpectroError::InsufficientSample(ul) => Fault::new(
                ScpiError::ExecutionError,
                format!("sample of {ul:.0} uL does not cover the probe"),
            ),
            SpectroError::BadRange(a, b) => Fault::new(
                ScpiError::DataOutOfRange,
                format!("wavelength range {a}..{b} nm"),
            ),
            SpectroError::BadStep(step) => {
                Fault::new(ScpiError::DataOutOfRange, format!("step {step} nm"))
            }
            SpectroError::TooManyPoints(n) => {
                Fault::new(ScpiError::TooMuchData, format!("{n} points"))
            }
            SpectroError::GridMismatch => Fault::new(ScpiError::ExecutionError, "internal"),
        }
    }

    /// Runs one command now; `Err` is the fault to queue.
    fn execute(&mut self, ctx: &mut Ctx<'_>, cmd: Command) -> Result<Option<Reply>, Fault> {
        let now = ctx.now;
        Ok(match cmd {
            Command::Identify => Some(Reply::Identity(Identity {
                manufacturer: self.config.manufacturer.clone(),
                model: self.config.model.clone(),
                serial: self.config.serial.clone(),
                firmware: self.config.firmware.clone(),
            })),
            Command::Reset => {
                self.integration_ms = self.config.default_integration_ms;
                None
            }
            Command::OperationCompleteQuery => Some(Reply::OperationComplete),
            Command::ClearStatus => {
                self.errors.clear();
                self.esr = 0;
                None
            }
            Command::EventStatusQuery => Some(Reply::EventStatus(std::mem::take(&mut self.esr))),
            Command::StatusByteQuery => {
                let eav = if self.errors.is_empty() { 0 } else { 0x04 };
                Some(Reply::StatusByte(eav))
            }
            Command::ErrorQuery => Some(Reply::Error(self.errors.pop().to_error_reply())),
            Command::MeasureAbsorbance { wavelength_nm } => {
                if let Some(fault) = Self::injected(ctx) {
                    return Err(fault);
                }
                let spectrum = ctx
                    .model
                    .spectrum(now, wavelength_nm, wavelength_nm, 1.0)
                    .map_err(Self::measure_fault)?;
                let absorbance = spectrum
                    .absorbance
                    .first()
                    .copied()
                    .ok_or_else(|| Fault::new(ScpiError::ExecutionError, "no reading"))?;
                Some(Reply::Absorbance { absorbance })
            }
            Command::MeasureSpectrum {
                start_nm,
                stop_nm,
                step_nm,
            } => {
                if let Some(fault) = Self::injected(ctx) {
                    return Err(fault);
                }
                let spectrum = ctx
                    .model
                    .spectrum(now, start_nm, stop_nm, step_nm)
                    .map_err(Self::measure_fault)?;
                Some(Reply::Spectrum {
                    absorbances: spectrum.absorbance,
                })
            }
            Command::WavelengthRangeQuery => {
                let config = &ctx.model.config().spectro;
                Some(Reply::WavelengthRange {
                    min_nm: config.min_nm,
                    max_nm: config.max_nm,
                })
            }
            Command::SetIntegration { integration_ms } => {
                self.integration_ms = integration_ms;
                None
            }
            Command::IntegrationQuery => Some(Reply::Integration {
                integration_ms: self.integration_ms,
            }),
        })
    }

    /// Carries on with the running message (and the queued ones) as far as time allows.
    fn run(&mut self, ctx: &mut Ctx<'_>) {
        loop {
            let mut running = match self.running.take() {
                Some(running) => running,
                None => match self.queue.pop_front() {
                    Some(message) => Running {
                        commands: message.commands.into(),
                        replies: Vec::new(),
                        fault: message.fault,
                        integrating_until: None,
                    },
                    None => return,
                },
            };
            while let Some(cmd) = running.commands.front().copied() {
                if Self::is_measurement(&cmd) {
                    match running.integrating_until {
                        None => {
                            let span = Duration::from_millis(u64::from(self.integration_ms));
                            running.integrating_until = Some(ctx.now.saturating_add(span));
                            self.running = Some(running);
                            return;
                        }
                        Some(until) if ctx.now < until => {
                            self.running = Some(running);
                            return;
                        }
                        Some(_) => running.integrating_until = None,
                    }
                }
                running.commands.pop_front();
                match self.execute(ctx, cmd) {
                    Ok(Some(reply)) => running.replies.push(reply),
                    Ok(None) => {}
                    Err(fault) => self.push_error(fault),
                }
            }
            if let Some(fault) = running.fault {
                self.push_error(fault);
            }
            if !running.replies.is_empty() {
                let mut bytes = Vec::new();
                codec::encode_replies(&running.replies, &mut bytes);
                ctx.emit(0, bytes);
            }
        }
    }

    fn overrun(&mut self, error: &DecodeError) {
        self.push_error(Fault::new(
            ScpiError::InputBufferOverrun,
            format!("{} bytes without a terminator", error.skip),
        ));
    }
}

impl Device for Scpi {
    fn protocol(&self) -> &'static str {
        "scpi_spectro"
    }

    fn instruments(&self) -> &[InstrumentId] {
        &self.instruments
    }

    fn line(&self) -> Option<LineSettings> {
        None
    }

    fn power_on(&mut self, _ctx: &mut Ctx<'_>) {
        self.host_reset();
        self.errors.clear();
        self.esr = 0;
        self.integration_ms = self.config.default_integration_ms;
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, bytes: &[u8]) {
        self.run(ctx);
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            self.rx.extend_from_slice(chunk);
            while !self.rx.is_empty() {
                match codec::decode_command(&self.rx) {
                    Ok(Decoded::Incomplete) => break,
                    Ok(Decoded::Frame { value, consumed }) => {
                        self.rx.drain(..consumed.clamp(1, self.rx.len()));
                        if self.queue.len() < MAX_QUEUED {
                            self.queue.push_back(value);
                        } else {
                            self.push_error(Fault::new(
                                ScpiError::InputBufferOverrun,
                                "too many messages waiting",
                            ));
                        }
                    }
                    Err(error) => {
                        self.rx.drain(..error.skip.clamp(1, self.rx.len()));
                        self.overrun(&error);
                    }
                }
            }
            self.run(ctx);
        }
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>) {
        self.run(ctx);
    }

    fn next_wakeup(&mut self, _model: &mut LabModel, _now: Duration) -> Option<Duration> {
        self.running.as_ref().and_then(|r| r.integrating_until)
    }

    fn host_reset(&mut self) {
        self.rx.clear();
        self.running = None;
        self.queue.clear();
    }
}
