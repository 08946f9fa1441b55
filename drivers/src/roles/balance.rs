//! Analytical balance speaking Mettler Toledo MT-SICS level 0/1 (9600 8N1, lines end CR LF).
//!
//! Every MT-SICS reply starts with the ID of the command it answers (`S S 100.00 g` answers `S`), except
//! `ES`/`ET`/`EL`, which answer whatever was sent last; so the matcher only takes a reply with the right ID
//! or one of those three.

use std::time::Duration;

use labctl_protocols::InstrumentKind;
use tracing::debug;

use super::{LearnedShape, Link, retries};
use crate::error::DriverError;
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
use crate::port::{PortHandle, Transaction, Verdict, frame_line, printable};
use labctl_codecs::Decoded;
use labctl_codecs::mtsics::{self, Command, MassUnit, Refusal, ReplyId, Response, Stability};

/// Time to answer a query that does not wait for stability.
const QUERY_PROCESSING: Duration = Duration::from_secs(1);
/// `S`, `Z` and `T` wait for a stable reading; the balance itself gives up (`S I`) after its own timeout,
/// which this must exceed so that we hear its verdict rather than time out first.
const STABLE_PROCESSING: Duration = Duration::from_secs(30);
/// Longest reply we budget wire time for.
const MAX_REPLY: usize = 64;

fn decode(frame: &[u8]) -> Option<Response> {
    match mtsics::decode_response(frame) {
        Ok(Decoded::Frame { value, .. }) => Some(value),
        _ => None,
    }
}

/// The ID a reply names, or `None` for `ES`/`ET`/`EL`, which answer any command.
fn reply_id(reply: &Response) -> Option<ReplyId> {
    Some(match reply {
        Response::Level { .. } => ReplyId::Level,
        Response::BalanceData(_) => ReplyId::BalanceData,
        Response::SoftwareVersion(_) => ReplyId::SoftwareVersion,
        Response::SerialNumber(_) => ReplyId::SerialNumber,
        Response::Weight { .. } => ReplyId::Weight,
        Response::Zeroed => ReplyId::Zero,
        Response::ZeroedImmediately { .. } => ReplyId::ZeroImmediate,
        Response::Tared { .. } => ReplyId::Tare,
        Response::TareValue { .. } => ReplyId::TareValue,
        Response::TareCleared => ReplyId::ClearTare,
        Response::Refused { id, .. } => *id,
        Response::SyntaxError | Response::TransmissionError | Response::LogicalError => {
            return None;
        }
    })
}

/// The reply ID that answers `cmd` (`S` answers `S`, `SI` and `SIR`; `I4` answers `@`).
fn expected_id(cmd: &Command) -> ReplyId {
    match cmd {
        Command::QueryLevel => ReplyId::Level,
        Command::QueryBalanceData => ReplyId::BalanceData,
        Command::QuerySoftwareVersion => ReplyId::SoftwareVersion,
        Command::QuerySerialNumber | Command::Reset => ReplyId::SerialNumber,
        Command::StableWeight | Command::ImmediateWeight | Command::RepeatImmediateWeight => {
            ReplyId::Weight
        }
        Command::Zero => ReplyId::Zero,
        Command::ZeroImmediate => ReplyId::ZeroImmediate,
        Command::Tare => ReplyId::Tare,
        Command::QueryTare | Command::PresetTare { .. } => ReplyId::TareValue,
        Command::ClearTare => ReplyId::ClearTare,
    }
}

/// The manual's meaning of a refusal status.
fn refusal_text(reason: Refusal) -> &'static str {
    match reason {
        Refusal::NotExecutable => {
            "not executable: the balance is busy or found no stable weight in time"
        }
        Refusal::Overload => "overload: the weight is above the weighing range",
        Refusal::Underload => {
            "underload: the weight is below the weighing range (is the pan in place?)"
        }
        Refusal::InvalidParameter => "a parameter is wrong",
    }
}

/// `I2 A "XS204 Excellence 220.0090 g"`: the type is the text before the capacity and unit.
fn model_of(balance_data: &str) -> String {
    let words: Vec<&str> = balance_data.split_whitespace().collect();
    match words.as_slice() {
        [model @ .., capacity, unit]
            if !model.is_empty()
                && capacity.parse::<f64>().is_ok()
                && MassUnit::from_symbol(unit.as_bytes()).is_some() =>
        {
            model.join(" ")
        }
        _ => balance_data.trim().to_owned(),
    }
}

/// A Mettler Toledo balance.
#[derive(Debug)]
pub struct MtSicsBalance {
    link: Link,
    /// The width of the balance's padded weight field.
    weight_width: std::sync::Mutex<LearnedShape>,
}

impl MtSicsBalance {
    /// A balance on `port`; no I/O until [`Instrument::start`].
    pub fn new(id: &str, port: PortHandle) -> MtSicsBalance {
        MtSicsBalance {
            link: Link::new(id, port),
            weight_width: std::sync::Mutex::new(LearnedShape::default()),
        }
    }

    /// Sends one command and returns its reply; `ES`/`ET`/`EL` and refusals become device errors.
    async fn request(
        &self,
        cmd: Command,
        processing: Duration,
        safe: bool,
    ) -> Result<Response, DriverError> {
        let reply = self.raw(cmd, processing, safe).await?;
        self.check(reply)
    }

    async fn raw(
        &self,
        cmd: Command,
        processing: Duration,
        safe: bool,
    ) -> Result<Response, DriverError> {
        let mut bytes = Vec::new();
        mtsics::encode_command(&cmd, &mut bytes);
        let label = printable(&bytes);
        let expected = expected_id(&cmd);
        let matcher = move |frame: &[u8]| match decode(frame).map(|r| reply_id(&r)) {
            Some(None) => Verdict::Last,
            Some(Some(id)) if id == expected => Verdict::Last,
            _ => Verdict::Unrelated,
        };
        let timeout = self.link.budget(&bytes, MAX_REPLY, processing);
        let t = Transaction::new(bytes, frame_line, matcher)
            .timeout(timeout)
            .retries(retries(safe));
        let frame = self.link.ask(t).await?;
        let reply = decode(&frame).ok_or_else(|| self.link.unexpected(&label, &frame))?;
        self.check_weight_width(&label, &frame)?;
        Ok(reply)
    }

    /// MT-SICS carries no checksum; a padded weight line of another width than the balance always prints
    /// lost or gained bytes on the line, and its number cannot be trusted.
    fn check_weight_width(&self, label: &str, frame: &[u8]) -> Result<(), DriverError> {
        let Some((width, true)) = mtsics::weight_field_width(frame) else {
            return Ok(());
        };
        let mut learned = self
            .weight_width
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        learned.observe(width).map_err(|expected| {
            self.link.damaged(
                label,
                frame,
                format!(
                    "weight field {width} characters wide where this balance prints {expected}"
                ),
            )
        })
    }

    fn check(&self, reply: Response) -> Result<Response, DriverError> {
        match reply {
            Response::Refused { id, reason } => Err(self.link.device(
                format!("{} {}", id.id(), char::from(reason.status())),
                refusal_text(reason),
            )),
            Response::SyntaxError => Err(self.link.device(
                "ES",
                "syntax error: the balance did not recognise the command",
            )),
            Response::TransmissionError => Err(self.link.device(
                "ET",
                "transmission error: the balance received a corrupted command",
            )),
            Response::LogicalError => Err(self
                .link
                .device("EL", "logical error: the command cannot be executed")),
            other => Ok(other),
        }
    }

    async fn text(&self, cmd: Command) -> Result<String, DriverError> {
        let reply = self.request(cmd, QUERY_PROCESSING, true).await?;
        match reply {
            Response::BalanceData(t) | Response::SoftwareVersion(t) | Response::SerialNumber(t) => {
                Ok(t)
            }
            other => Err(self
                .link
                .unexpected(cmd.mnemonic(), format!("{other:?}").as_bytes())),
        }
    }

    async fn weigh(&self, stable: bool) -> Result<Outcome, DriverError> {
        let (cmd, processing) = if stable {
            (Command::StableWeight, STABLE_PROCESSING)
        } else {
            (Command::ImmediateWeight, QUERY_PROCESSING)
        };
        match self.request(cmd, processing, true).await? {
            Response::Weight { stability, mass } => Ok(Outcome::Mass {
                mass_g: mass.grams(),
                stable: stability == Stability::Stable,
            }),
            other => Err(self
                .link
                .unexpected(cmd.mnemonic(), format!("{other:?}").as_bytes())),
        }
    }
}

impl Instrument for MtSicsBalance {
    fn kind(&self) -> InstrumentKind {
        InstrumentKind::Balance
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        // Another balance may be on the line after a reconnect.
        *self
            .weight_width
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = LearnedShape::default();
        self.link.connect().await?;
        let data = self.text(Command::QueryBalanceData).await?;
        let firmware = self.text(Command::QuerySoftwareVersion).await?;
        let serial = self.text(Command::QuerySerialNumber).await?;
        debug!(instrument = %self.link.id, balance = %data, "balance identified");
        Ok(Identity {
            manufacturer: "Mettler Toledo".into(),
            model: model_of(&data),
            serial,
            firmware,
        })
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::Weigh { stable } => self.weigh(*stable).await,
            DeviceCommand::Zero => match self
                .request(Command::Zero, STABLE_PROCESSING, false)
                .await?
            {
                Response::Zeroed => Ok(Outcome::Done),
                other => Err(self.link.unexpected("Z", format!("{other:?}").as_bytes())),
            },
            DeviceCommand::Tare => match self
                .request(Command::Tare, STABLE_PROCESSING, false)
                .await?
            {
                Response::Tared { .. } => Ok(Outcome::Done),
                other => Err(self.link.unexpected("T", format!("{other:?}").as_bytes())),
            },
            other => Err(self.link.wrong_kind(other, InstrumentKind::Balance)),
        }
    }

    /// `SI`: the weight now. Overload and underload are states that need attention, not failures.
    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        let reply = self
            .raw(Command::ImmediateWeight, QUERY_PROCESSING, true)
            .await?;
        let (state, values) = match reply {
            Response::Weight { mass, .. } => (DeviceState::Idle, vec![("mass_g", mass.grams())]),
            Response::Refused {
                reason: Refusal::NotExecutable,
                ..
            } => (DeviceState::Busy, Vec::new()),
            Response::Refused {
                reason: reason @ (Refusal::Overload | Refusal::Underload),
                ..
            } => (
                DeviceState::Alarm(refusal_text(reason).to_owned()),
                Vec::new(),
            ),
            other => {
                self.check(other.clone())?;
                return Err(self.link.unexpected("SI", format!("{other:?}").as_bytes()));
            }
        };
        Ok(Telemetry { state, values })
    }

    /// A balance has nothing that moves or heats.
    async fn safe_state(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Nothing to undo: a balance has no motion or heat; its safe state changes nothing.
    async fn recover(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    async fn stop(&mut self) {
        self.link.disconnect().await;
    }
}

#[cfg(test)]
mod tests;
