//! UV-Vis spectrophotometer over SCPI / IEEE 488.2 (raw TCP socket, lines end `\n`).
//!
//! A SCPI instrument never answers a bad command: it queues an error and stays silent. So when a query
//! gets no answer, or after a command that has none (`*RST`), the driver reads `SYSTem:ERRor?`: an error
//! there is the device's verdict; an empty queue means the query was lost, and a query is safe to ask once
//! more.

use std::time::Duration;

use labctl_protocols::InstrumentKind;
use tracing::debug;

use super::{LearnedShape, Link};
use crate::error::{DriverError, PortError};
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
use crate::port::{PortHandle, Transaction, Verdict, frame_line, printable};
use labctl_codecs::Decoded;
use labctl_codecs::scpi::{self, Command, ErrorReply, MAX_SPECTRUM_POINTS, Reply};

/// Time to answer a plain query or run `*RST`.
const PROCESSING: Duration = Duration::from_secs(1);
/// One absorbance reading, integration included.
const ABSORBANCE_PROCESSING: Duration = Duration::from_secs(5);
/// A full scan of up to 401 points.
const SPECTRUM_PROCESSING: Duration = Duration::from_secs(15);
/// Most errors read from the queue after a failure; the queue's depth bounds it on a sane instrument.
const MAX_ERRORS: usize = 16;
/// No absorbance spectrometer reads beyond this (10 AU is a transmittance of 1e-10); a reply outside
/// ±this is a damaged line (a lost decimal point turns `2.4967` into `24967`), never a measurement.
const MAX_PLAUSIBLE_AU: f64 = 10.0;

fn plausible(absorbance: f64) -> bool {
    absorbance.is_finite() && absorbance.abs() <= MAX_PLAUSIBLE_AU
}

/// A SCPI spectrophotometer.
#[derive(Debug)]
pub struct ScpiSpectro {
    link: Link,
    /// The decimals the instrument prints its readings with.
    reading_decimals: std::sync::Mutex<LearnedShape>,
}

fn encode(cmd: &Command) -> Vec<u8> {
    let mut out = Vec::new();
    scpi::encode_command(cmd, &mut out);
    out
}

impl ScpiSpectro {
    /// A spectrophotometer on `port`; no I/O until [`Instrument::start`].
    pub fn new(id: &str, port: PortHandle) -> ScpiSpectro {
        ScpiSpectro {
            link: Link::new(id, port),
            reading_decimals: std::sync::Mutex::new(LearnedShape::default()),
        }
    }

    /// One attempt at a query: its typed reply.
    async fn ask(&self, cmd: Command, processing: Duration) -> Result<Reply, DriverError> {
        let bytes = encode(&cmd);
        let label = printable(&bytes);
        let matcher = move |frame: &[u8]| match scpi::decode_reply(&cmd, frame) {
            Ok(Decoded::Frame { .. }) => Verdict::Last,
            _ => Verdict::Unrelated,
        };
        let timeout = self.link.budget(&bytes, 0, processing);
        let frame = self
            .link
            .ask(Transaction::new(bytes, frame_line, matcher).timeout(timeout))
            .await?;
        let reply = match scpi::decode_reply(&cmd, &frame) {
            Ok(Decoded::Frame { value, .. }) => value,
            _ => return Err(self.link.unexpected(&label, &frame)),
        };
        if matches!(reply, Reply::Absorbance { .. } | Reply::Spectrum { .. }) {
            self.check_reading_shape(&label, &frame)?;
        }
        Ok(reply)
    }

    /// A reading printed at another resolution than the instrument's own lost or gained bytes on the line.
    fn check_reading_shape(&self, label: &str, frame: &[u8]) -> Result<(), DriverError> {
        let damaged = |reason: String| self.link.damaged(label, frame, reason);
        let decimals = match scpi::reading_decimals(frame) {
            None => return Ok(()),
            Some(Err(reason)) => return Err(damaged(reason.to_string())),
            Some(Ok(decimals)) => decimals,
        };
        self.reading_decimals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe(decimals)
            .map_err(|expected| {
                damaged(format!(
                    "{decimals} decimals where this instrument prints {expected}"
                ))
            })
    }

    /// A query; silence is explained by the error queue, or the query is asked once more.
    async fn query(&self, cmd: Command, processing: Duration) -> Result<Reply, DriverError> {
        match self.ask(cmd, processing).await {
            Err(DriverError::Port(PortError::Timeout { .. })) => {
                self.check_errors().await?;
                self.ask(cmd, processing).await
            }
            other => other,
        }
    }

    /// A command without a reply, then the error queue.
    async fn command(&self, cmd: Command) -> Result<(), DriverError> {
        let bytes = encode(&cmd);
        let timeout = self.link.budget(&bytes, 0, PROCESSING);
        self.link
            .tell(Transaction::no_reply(bytes, frame_line).timeout(timeout))
            .await?;
        self.check_errors().await
    }

    /// Reads the error queue until it is empty; the first error fails the command, the rest are named.
    async fn check_errors(&self) -> Result<(), DriverError> {
        let mut errors: Vec<ErrorReply> = Vec::new();
        for _ in 0..MAX_ERRORS {
            match self.ask(Command::ErrorQuery, PROCESSING).await? {
                Reply::Error(e) if e.code == 0 => break,
                Reply::Error(e) => errors.push(e),
                other => {
                    return Err(self
                        .link
                        .unexpected("SYST:ERR?", format!("{other:?}").as_bytes()));
                }
            }
        }
        let Some(first) = errors.first() else {
            return Ok(());
        };
        let mut message = first.message.clone();
        for more in errors.iter().skip(1) {
            message.push_str(&format!("; then {},{}", more.code, more.message));
        }
        Err(self.link.device(first.code.to_string(), message))
    }

    async fn spectrum(
        &self,
        start_nm: f64,
        stop_nm: f64,
        step_nm: f64,
        command: &DeviceCommand,
    ) -> Result<Outcome, DriverError> {
        let points = scpi::spectrum_points(start_nm, stop_nm, step_nm);
        if points == 0 || points > MAX_SPECTRUM_POINTS {
            return Err(self.link.invalid(
                command,
                format!("{start_nm}-{stop_nm} nm in steps of {step_nm} nm is not a scan of 1-{MAX_SPECTRUM_POINTS} points"),
            ));
        }
        let cmd = Command::MeasureSpectrum {
            start_nm,
            stop_nm,
            step_nm,
        };
        // A measurement is safe to repeat: an implausible (damaged) reply is asked once more.
        let mut attempts = 0;
        let absorbance = loop {
            attempts += 1;
            match self.query(cmd, SPECTRUM_PROCESSING).await {
                Ok(Reply::Spectrum { absorbances })
                    if absorbances.iter().all(|a| plausible(*a)) =>
                {
                    break absorbances;
                }
                Err(e @ DriverError::DamagedReply { .. }) if attempts < 2 => {
                    debug!(instrument = %self.link.id, error = %e, "damaged spectrum; asking again");
                }
                Err(e) => return Err(e),
                other if attempts < 2 => {
                    debug!(instrument = %self.link.id, reply = ?other, "implausible spectrum; asking again");
                }
                other => {
                    return Err(self
                        .link
                        .unexpected("MEAS:SPEC?", format!("{other:?}").as_bytes()));
                }
            }
        };
        let wavelengths_nm = scpi::spectrum_wavelengths(start_nm, stop_nm, step_nm);
        if absorbance.len() != wavelengths_nm.len() {
            let reply = format!(
                "{} values for {} wavelengths",
                absorbance.len(),
                wavelengths_nm.len()
            );
            return Err(self.link.unexpected("MEAS:SPEC?", reply.as_bytes()));
        }
        Ok(Outcome::Spectrum {
            wavelengths_nm,
            absorbance,
        })
    }
}

impl Instrument for ScpiSpectro {
    fn kind(&self) -> InstrumentKind {
        InstrumentKind::Spectrophotometer
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        // Another instrument may answer after a reconnect.
        *self
            .reading_decimals
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = LearnedShape::default();
        self.link.connect().await?;
        let id = match self.query(Command::Identify, PROCESSING).await? {
            Reply::Identity(id) => id,
            other => {
                return Err(self
                    .link
                    .unexpected("*IDN?", format!("{other:?}").as_bytes()));
            }
        };
        // Clear what an earlier session left in the queue, so the check after *RST reads only its errors.
        let clear = encode(&Command::ClearStatus);
        let timeout = self.link.budget(&clear, 0, PROCESSING);
        self.link
            .tell(Transaction::no_reply(clear, frame_line).timeout(timeout))
            .await?;
        self.command(Command::Reset).await?;
        Ok(Identity {
            manufacturer: id.manufacturer,
            model: id.model,
            serial: id.serial,
            firmware: id.firmware,
        })
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::Spectrum {
                start_nm,
                stop_nm,
                step_nm,
            } => self.spectrum(*start_nm, *stop_nm, *step_nm, command).await,
            DeviceCommand::Absorbance { wavelength_nm } => {
                if !wavelength_nm.is_finite() {
                    return Err(self
                        .link
                        .invalid(command, format!("wavelength {wavelength_nm} is not finite")));
                }
                let cmd = Command::MeasureAbsorbance {
                    wavelength_nm: *wavelength_nm,
                };
                // A measurement is safe to repeat: an implausible (damaged) reply is asked once more.
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match self.query(cmd, ABSORBANCE_PROCESSING).await {
                        Ok(Reply::Absorbance { absorbance }) if plausible(absorbance) => {
                            return Ok(Outcome::Absorbance {
                                wavelength_nm: *wavelength_nm,
                                absorbance,
                            });
                        }
                        Err(e @ DriverError::DamagedReply { .. }) if attempts < 2 => {
                            debug!(instrument = %self.link.id, error = %e, "damaged absorbance; asking again");
                        }
                        Err(e) => return Err(e),
                        other if attempts < 2 => {
                            debug!(instrument = %self.link.id, reply = ?other, "implausible absorbance; asking again");
                        }
                        other => {
                            return Err(self
                                .link
                                .unexpected("MEAS:ABS?", format!("{other:?}").as_bytes()));
                        }
                    }
                }
            }
            other => Err(self
                .link
                .wrong_kind(other, InstrumentKind::Spectrophotometer)),
        }
    }

    /// `*OPC?`: the instrument answers once everything before has finished; a live link is all we learn.
    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        match self
            .query(Command::OperationCompleteQuery, PROCESSING)
            .await?
        {
            Reply::OperationComplete => Ok(Telemetry {
                state: DeviceState::Idle,
                values: Vec::new(),
            }),
            other => Err(self
                .link
                .unexpected("*OPC?", format!("{other:?}").as_bytes())),
        }
    }

    /// Nothing on a spectrophotometer moves or heats.
    async fn safe_state(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Nothing to undo: the safe state starts no scan, and the next command configures its own.
    async fn recover(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    async fn stop(&mut self) {
        self.link.disconnect().await;
    }
}

#[cfg(test)]
mod tests;
