//! Instrument drivers by role, each turning [`DeviceCommand`]s into one wire protocol on a shared
//! [`PortHandle`].
//!
//! Every driver follows the same rules: requests are built with the codec's encoder and answers read with
//! its decoder; a matcher picks the frame that answers this request (so unsolicited or late frames never
//! answer it); only requests that are safe to repeat are retried; and device error codes become
//! [`DriverError::Device`] / [`DriverError::Alarm`] with the manual's text.

mod balance;
mod gantry;
mod hotplate;
mod pump;
mod spectro;

use std::time::Duration;

use labctl_protocols::InstrumentKind;

pub use balance::MtSicsBalance;
pub use gantry::{GantryOptions, GrblGantry};
pub use hotplate::{HotplateOptions, IkaHotplate};
pub use pump::{Ne1000Pump, PumpOptions, frame_packet};
pub use spectro::ScpiSpectro;

use crate::error::DriverError;
use crate::instrument::DeviceCommand;
use crate::port::{Frame, PortHandle, Transaction, printable};

/// A driver's port and whether it has registered as one of the port's users.
#[derive(Debug)]
pub(crate) struct Link {
    /// The instrument's id from the lab file, for errors and logs.
    pub id: String,
    pub port: PortHandle,
    held: bool,
}

impl Link {
    pub fn new(id: &str, port: PortHandle) -> Link {
        Link {
            id: id.to_owned(),
            port,
            held: false,
        }
    }

    /// Registers with the port (once) and opens it if it is not running, e.g. after a disconnect.
    pub async fn connect(&mut self) -> Result<(), DriverError> {
        if self.held {
            self.port.ensure_open().await?;
        } else {
            self.port.acquire().await?;
            self.held = true;
        }
        Ok(())
    }

    /// Gives the port back; the last user closes it.
    pub async fn disconnect(&mut self) {
        if self.held {
            self.held = false;
            self.port.release().await;
        }
    }

    /// Runs a transaction that expects an answer and returns its first frame.
    pub async fn ask(&self, transaction: Transaction) -> Result<Frame, DriverError> {
        let label = printable(&transaction.request);
        let frames = self.port.transact(transaction).await?;
        frames
            .into_iter()
            .next()
            .ok_or_else(|| self.unexpected(&label, b"(no frame)"))
    }

    /// Runs a transaction and returns every frame of the answer.
    pub async fn ask_all(&self, transaction: Transaction) -> Result<Vec<Frame>, DriverError> {
        Ok(self.port.transact(transaction).await?)
    }

    /// Writes a request that has no answer.
    pub async fn tell(&self, transaction: Transaction) -> Result<(), DriverError> {
        self.port.transact(transaction).await?;
        Ok(())
    }

    /// Time budget on this line for a request, a reply of at most `reply_bytes` and the device's own
    /// processing time.
    pub fn budget(&self, request: &[u8], reply_bytes: usize, processing: Duration) -> Duration {
        self.port.budget(request.len(), reply_bytes, processing)
    }

    pub fn unexpected(&self, command: &str, reply: &[u8]) -> DriverError {
        DriverError::UnexpectedReply {
            instrument: self.id.clone(),
            command: command
                .trim_end_matches(['\r', '\n'])
                .replace("\\r", "")
                .replace("\\n", ""),
            reply: printable(reply),
        }
    }

    pub fn wrong_kind(&self, command: &DeviceCommand, kind: InstrumentKind) -> DriverError {
        DriverError::WrongKind {
            instrument: self.id.clone(),
            command: command_name(command),
            kind: kind.to_string(),
        }
    }

    pub fn invalid(&self, command: &DeviceCommand, reason: impl Into<String>) -> DriverError {
        DriverError::InvalidCommand {
            instrument: self.id.clone(),
            command: command_name(command),
            reason: reason.into(),
        }
    }

    pub fn device(&self, code: impl Into<String>, message: impl Into<String>) -> DriverError {
        DriverError::Device {
            instrument: self.id.clone(),
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn alarm(&self, code: impl Into<String>, message: impl Into<String>) -> DriverError {
        DriverError::Alarm {
            instrument: self.id.clone(),
            code: code.into(),
            message: message.into(),
        }
    }
}

/// A command's name for errors: its serde tag, e.g. `dispense`.
pub(crate) fn command_name(command: &DeviceCommand) -> String {
    use DeviceCommand::*;
    match command {
        Home => "home",
        MoveTo { .. } => "move_to",
        Gripper { .. } => "gripper",
        Dispense { .. } => "dispense",
        StopPump => "stop_pump",
        Zero => "zero",
        Tare => "tare",
        Weigh { .. } => "weigh",
        SetTemperature { .. } => "set_temperature",
        HeaterOff => "heater_off",
        SetStirSpeed { .. } => "set_stir_speed",
        StirOff => "stir_off",
        ReadTemperature => "read_temperature",
        Spectrum { .. } => "spectrum",
        Absorbance { .. } => "absorbance",
    }
    .to_owned()
}

/// Retries for a request: one for what is safe to repeat, none for the rest.
pub(crate) fn retries(safe_to_repeat: bool) -> u8 {
    u8::from(safe_to_repeat)
}

/// A shape an instrument prints every reading in (a field width, a number of decimals) without checksums
/// to protect it: learned from the replies, so a reply of another shape is known to have lost or gained
/// bytes on the line. A shape is trusted once two readings in a row agree, so one damaged reply while
/// learning cannot lock in a wrong one; an instrument reconfigured to another shape is followed after
/// [`LearnedShape::RELEARN`] readings in a row in the new shape (each refused meanwhile).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct LearnedShape {
    trusted: Option<usize>,
    candidate: Option<(usize, u32)>,
}

impl LearnedShape {
    const RELEARN: u32 = 3;

    /// Takes one reading's shape: `Err(expected)` when it contradicts the trusted shape.
    pub(crate) fn observe(&mut self, shape: usize) -> Result<(), usize> {
        if self.trusted == Some(shape) {
            self.candidate = None;
            return Ok(());
        }
        let seen = match self.candidate {
            Some((s, n)) if s == shape => n + 1,
            _ => 1,
        };
        self.candidate = Some((shape, seen));
        match self.trusted {
            None if seen >= 2 => {
                self.trusted = Some(shape);
                Ok(())
            }
            None => Ok(()),
            Some(expected) if seen >= Self::RELEARN => {
                self.trusted = Some(shape);
                Err(expected)
            }
            Some(expected) => Err(expected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_is_trusted_after_two_agreeing_readings_and_relearned_after_three() {
        let mut w = LearnedShape::default();
        // Learning: nothing is refused, one odd reading does not lock in.
        assert_eq!(w.observe(10), Ok(()));
        assert_eq!(w.observe(11), Ok(()));
        assert_eq!(w.observe(11), Ok(()));
        assert_eq!(w.trusted, Some(11));
        // A reading that lost a byte.
        assert_eq!(w.observe(10), Err(11));
        assert_eq!(w.observe(11), Ok(()));
        // An instrument reconfigured to a wider field: refused until seen three times in a row.
        assert_eq!(w.observe(12), Err(11));
        assert_eq!(w.observe(12), Err(11));
        assert_eq!(w.observe(12), Err(11));
        assert_eq!(w.trusted, Some(12));
        assert_eq!(w.observe(12), Ok(()));
    }

    #[test]
    fn command_names_are_the_serde_tags() {
        assert_eq!(command_name(&DeviceCommand::Home), "home");
        let d = DeviceCommand::Dispense {
            volume_ul: 1.0,
            rate_ul_per_min: 2.0,
        };
        assert_eq!(command_name(&d), "dispense");
    }
}
