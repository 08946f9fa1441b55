//! Instrument drivers by role, each turning [`DeviceCommand`]s into one wire protocol on a shared
//! [`PortHandle`].
//!
//! Every driver follows the same rules: requests are built with the codec's encoder and answers read with
//! its decoder; a matcher picks the frame that answers this request (so unsolicited or late frames never
//! answer it); only requests that are safe to repeat are retried; and device error codes become
//! [`DriverError::Device`] / [`DriverError::Alarm`] with the manual's text.

mod balance;
mod defined;
mod gantry;
mod hotplate;
mod pump;
mod spectro;

use std::time::Duration;

use labctl_protocols::InstrumentKind;

pub use balance::MtSicsBalance;
pub use defined::{
    DefinedInstrument, LineInstrument, LineWire, ModbusInstrument, ModbusLine, ModbusLines,
    ModbusWire, Wire, definition_of,
};
pub use gantry::{GantryLimits, GantryOptions, GrblGantry};
pub use hotplate::{HotplateOptions, IkaHotplate};
pub use pump::{Ne1000Pump, frame_packet};
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

    /// A reply that decoded but cannot be what the instrument printed (see [`DriverError::DamagedReply`]).
    pub fn damaged(&self, command: &str, reply: &[u8], reason: impl Into<String>) -> DriverError {
        DriverError::DamagedReply {
            instrument: self.id.clone(),
            command: command.trim_end().to_owned(),
            reply: printable(reply),
            reason: reason.into(),
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
        Defined { action, .. } => return action.clone(),
        Read { .. } => "read",
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

/// A time scale that can be trusted: finite and at least 1 (a simulator runs faster than real time, never
/// slower); anything else is 1.
pub(crate) fn sane_time_scale(scale: f64) -> f64 {
    if scale.is_finite() && scale >= 1.0 {
        scale
    } else {
        1.0
    }
}

/// Physical continuity of a reading without a checksum: between two readings a quantity cannot change by
/// more than its fastest physical rate allows in the time that can have passed between them. A reading is
/// taken somewhere between the moment its request was sent and the moment its reply arrived, so the longest
/// time between two readings is from the first one's request to the second one's reply: a bound that holds
/// however late or queued the replies were. A reading that breaks it lost or changed bytes on the line,
/// unless the quantity really jumped (someone else moved the machine): so a refused reading is remembered,
/// and a second reading that agrees with it (continuous from it) is accepted and becomes the new baseline.
/// Two damaged readings that agree with each other need the same damage twice.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Continuity<const N: usize> {
    /// The last accepted reading and when its request was sent.
    last: Option<([f64; N], tokio::time::Instant)>,
    /// A refused reading, waiting for a second one to confirm it.
    refused: Option<([f64; N], tokio::time::Instant)>,
}

impl<const N: usize> Default for Continuity<N> {
    fn default() -> Self {
        Continuity {
            last: None,
            refused: None,
        }
    }
}

impl<const N: usize> Continuity<N> {
    /// Forgets the baseline: after a reconnect, a reset or a jump the instrument makes on purpose (homing
    /// sets the machine position).
    pub(crate) fn forget(&mut self) {
        *self = Continuity::default();
    }

    /// Judges a reading taken between `sent` and `received`; `allowed(axis, longest)` is the most that
    /// component can change in `longest` (real time). `Err` names the first component that jumped.
    pub(crate) fn observe(
        &mut self,
        value: [f64; N],
        sent: tokio::time::Instant,
        received: tokio::time::Instant,
        allowed: impl Fn(usize, Duration) -> f64,
    ) -> Result<(), String> {
        let jump = |from: &([f64; N], tokio::time::Instant)| {
            let longest = received.saturating_duration_since(from.1);
            (0..N).find_map(|i| {
                let change = (value[i] - from.0[i]).abs();
                let most = allowed(i, longest);
                // NaN never passes.
                let within = change <= most;
                (!within).then(|| {
                    format!(
                        "component {} changed by {change} in at most {longest:?}, where {most} is possible",
                        i + 1
                    )
                })
            })
        };
        let verdict = match &self.last {
            None => None,
            Some(last) => jump(last),
        };
        // Largest component difference.
        let distance = |other: &[f64; N]| {
            (0..N)
                .map(|i| (value[i] - other[i]).abs())
                .fold(0.0, f64::max)
        };
        // The refused reading is confirmed by this one when this one follows on from it, or lies far
        // closer to it than to the baseline (the quantity keeps moving fast: a sensor running away must
        // reach the interlocks, not be hidden as damage). Damage does not repeat itself like that.
        let confirmed = self.refused.as_ref().is_some_and(|r| {
            jump(r).is_none()
                || self
                    .last
                    .as_ref()
                    .is_some_and(|last| 2.0 * distance(&r.0) < distance(&last.0))
        });
        match verdict {
            Some(reason) if !confirmed => {
                self.refused = Some((value, sent));
                Err(reason)
            }
            _ => {
                self.last = Some((value, sent));
                self.refused = None;
                Ok(())
            }
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

    #[tokio::test(start_paused = true)]
    async fn continuity_refuses_a_jump_faster_than_physics_and_accepts_it_when_confirmed() {
        use tokio::time::{Instant, advance};
        // 1 unit per second, plus 0.05 of resolution.
        let rate = |_: usize, d: Duration| d.as_secs_f64() + 0.05;
        let mut c = Continuity::<1>::default();
        let t0 = Instant::now();
        assert_eq!(c.observe([22.0], t0, t0, rate), Ok(()));
        advance(Duration::from_millis(500)).await;
        let t1 = Instant::now();
        // 22.0 printed as 2.0 (a digit lost): 20 units in 0.5 s.
        let err = c.observe([2.0], t1, t1, rate).unwrap_err();
        assert!(err.contains("changed by 20"), "{err}");
        // The true value again: accepted against the baseline, the refused one forgotten.
        assert_eq!(c.observe([22.3], t1, t1, rate), Ok(()));
        assert_eq!(c.refused, None);
        // A real jump (the sensor was moved): refused once, then confirmed by a second reading near it.
        let err = c.observe([80.0], t1, t1, rate);
        assert!(err.is_err());
        advance(Duration::from_millis(100)).await;
        let t2 = Instant::now();
        assert_eq!(c.observe([80.1], t2, t2, rate), Ok(()));
        assert_eq!(c.last.map(|(v, _)| v), Some([80.1]));
        // A quantity that keeps running away faster than physics (a drifting sensor): each reading is
        // refused once, then believed when the next one is far closer to it than to the baseline.
        assert!(c.observe([90.0], t2, t2, rate).is_err());
        assert_eq!(c.observe([92.0], t2, t2, rate), Ok(()));
        // ...not when the next reading is back at the baseline (the refused one was damage)...
        assert!(c.observe([9.2], t2, t2, rate).is_err());
        assert_eq!(c.observe([92.0], t2, t2, rate), Ok(()));
        // ...nor when it is just as far from both (two damaged readings, or noise on a jump).
        assert!(c.observe([50.0], t2, t2, rate).is_err());
        assert!(c.observe([71.0], t2, t2, rate).is_err());
        assert_eq!(c.last.map(|(v, _)| v), Some([92.0]));
        // Slow enough change over a long time is fine; NaN never is.
        advance(Duration::from_secs(60)).await;
        let t3 = Instant::now();
        assert_eq!(c.observe([40.0], t3, t3, rate), Ok(()));
        assert!(c.observe([f64::NAN], t3, t3, rate).is_err());
        // The window runs from the baseline's request to this reply, not between replies.
        let mut c = Continuity::<1>::default();
        let sent = Instant::now();
        advance(Duration::from_secs(2)).await;
        let got = Instant::now();
        assert_eq!(c.observe([0.0], sent, got, rate), Ok(()));
        assert_eq!(c.observe([1.9], got, got, rate), Ok(()));
        c.forget();
        assert_eq!(c.observe([1000.0], got, got, rate), Ok(()));
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
