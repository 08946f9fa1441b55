//! IKA hotplate stirrer over the NAMUR command set (9600 7E1, CR LF).
//!
//! NAMUR replies do not name the command they answer and setpoint commands get no reply at all, so each
//! query's matcher accepts only a reply of the right shape (`25.3 1` for `IN_PV_1`, never `500 4`), and a
//! setpoint cannot be confirmed on the wire. The device's own watchdog (`OUT_WD1@<s>`) is what makes that
//! safe: armed at start and re-armed on every poll, it switches heater and motor off when labctl goes quiet.

use std::time::Duration;

use labctl_protocols::InstrumentKind;
use tracing::{debug, warn};

use super::{Link, retries};
use crate::codec::Decoded;
use crate::codec::namur::{self, Command, Reply, Sensor, WATCHDOG_RANGE_S};
use crate::error::{DriverError, PortError};
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
use crate::port::{PortHandle, Transaction, Verdict, frame_line_or_cr, printable};

/// The device's time to answer a query.
const PROCESSING: Duration = Duration::from_millis(500);
/// NAMUR caps a reply at 80 characters plus CR LF.
const MAX_REPLY: usize = namur::MAX_NAMUR_LINE + 2;

/// Tunables of the hotplate driver.
#[derive(Debug, Clone, PartialEq)]
pub struct HotplateOptions {
    /// `OUT_WD1@<s>`: seconds without a command after which the device switches heater and motor off. The
    /// controller must poll more often than this. The device accepts 20 to 1500 s.
    pub watchdog_s: u16,
}

impl Default for HotplateOptions {
    fn default() -> Self {
        HotplateOptions { watchdog_s: 30 }
    }
}

/// An IKA hotplate stirrer (RCT digital, C-MAG HS...).
#[derive(Debug)]
pub struct IkaHotplate {
    link: Link,
    options: HotplateOptions,
}

impl IkaHotplate {
    /// A hotplate on `port`; no I/O until [`Instrument::start`].
    pub fn new(id: &str, port: PortHandle, options: HotplateOptions) -> IkaHotplate {
        IkaHotplate {
            link: Link::new(id, port),
            options,
        }
    }

    fn encode(cmd: &Command) -> Vec<u8> {
        let mut out = Vec::new();
        namur::encode_command(cmd, &mut out);
        out
    }

    /// A query, answered by one line that must make sense as the answer to `cmd`.
    async fn query(&self, cmd: Command, retry: bool) -> Result<Reply, DriverError> {
        let bytes = Self::encode(&cmd);
        let label = printable(&bytes);
        let matcher = move |frame: &[u8]| match namur::decode_reply(&cmd, frame) {
            Ok(Decoded::Frame { .. }) => Verdict::Last,
            _ => Verdict::Unrelated,
        };
        let timeout = self.link.budget(&bytes, MAX_REPLY, PROCESSING);
        let t = Transaction::new(bytes, frame_line_or_cr, matcher)
            .timeout(timeout)
            .retries(retries(retry));
        let frame = self.link.ask(t).await?;
        match namur::decode_reply(&cmd, &frame) {
            Ok(Decoded::Frame { value, .. }) => Ok(value),
            _ => Err(self.link.unexpected(&label, &frame)),
        }
    }

    /// A command the device never answers.
    async fn send(&self, cmd: Command) -> Result<(), DriverError> {
        let bytes = Self::encode(&cmd);
        let timeout = self.link.budget(&bytes, 0, PROCESSING);
        self.link
            .tell(Transaction::no_reply(bytes, frame_line_or_cr).timeout(timeout))
            .await
    }

    async fn temperature(&self, sensor: Sensor) -> Result<f64, DriverError> {
        match self.query(Command::ReadTemperature(sensor), true).await? {
            Reply::Temperature { temperature_c, .. } => Ok(temperature_c),
            other => Err(self
                .link
                .unexpected("IN_PV", format!("{other:?}").as_bytes())),
        }
    }

    async fn speed(&self) -> Result<f64, DriverError> {
        match self.query(Command::ReadSpeed, true).await? {
            Reply::Speed { speed_rpm } => Ok(speed_rpm),
            other => Err(self
                .link
                .unexpected("IN_PV_4", format!("{other:?}").as_bytes())),
        }
    }

    /// Arms (or re-arms) watchdog mode 1 and checks the device echoes the time.
    async fn feed_watchdog(&self) -> Result<(), DriverError> {
        let timeout_s = self.options.watchdog_s;
        match self.query(Command::Watchdog1 { timeout_s }, true).await? {
            Reply::WatchdogTime { timeout_s: echoed } if echoed == timeout_s => Ok(()),
            other => Err(self.link.unexpected(
                &format!("OUT_WD1@{timeout_s}"),
                format!("{other:?}").as_bytes(),
            )),
        }
    }
}

impl Instrument for IkaHotplate {
    fn kind(&self) -> InstrumentKind {
        InstrumentKind::Hotplate
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        if !WATCHDOG_RANGE_S.contains(&self.options.watchdog_s) {
            return Err(DriverError::Unsupported {
                instrument: self.link.id.clone(),
                what: "watchdog time".into(),
                found: format!("{} s", self.options.watchdog_s),
                supported: format!("{}-{} s", WATCHDOG_RANGE_S.start(), WATCHDOG_RANGE_S.end()),
            });
        }
        self.link.connect().await?;
        let model = match self.query(Command::ReadName, true).await? {
            Reply::Name(name) => name,
            other => {
                return Err(self
                    .link
                    .unexpected("IN_NAME", format!("{other:?}").as_bytes()));
            }
        };
        // Older models do not know IN_VERSION and stay silent.
        let firmware = match self.query(Command::ReadVersion, false).await {
            Ok(Reply::Version(version)) => version,
            Ok(other) => {
                return Err(self
                    .link
                    .unexpected("IN_VERSION", format!("{other:?}").as_bytes()));
            }
            Err(DriverError::Port(PortError::Timeout { .. })) => {
                debug!(instrument = %self.link.id, "no IN_VERSION on this model");
                "unknown (no IN_VERSION)".into()
            }
            Err(other) => return Err(other),
        };
        self.feed_watchdog().await?;
        Ok(Identity {
            manufacturer: "IKA".into(),
            model,
            serial: String::new(),
            firmware,
        })
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::SetTemperature { temperature_c } => {
                if !temperature_c.is_finite() {
                    return Err(self.link.invalid(
                        command,
                        format!("temperature {temperature_c} is not finite"),
                    ));
                }
                self.send(Command::SetTemperature {
                    temperature_c: *temperature_c,
                })
                .await?;
                self.send(Command::StartHeater).await?;
                Ok(Outcome::Done)
            }
            DeviceCommand::HeaterOff => {
                self.send(Command::StopHeater).await?;
                Ok(Outcome::Done)
            }
            DeviceCommand::SetStirSpeed { speed_rpm } => {
                let rpm = speed_rpm.round();
                if !(rpm.is_finite() && (0.0..=f64::from(u32::MAX)).contains(&rpm)) {
                    return Err(self
                        .link
                        .invalid(command, format!("speed {speed_rpm} rpm is not a speed")));
                }
                // In range by the check above, so the cast neither wraps nor truncates.
                self.send(Command::SetSpeed {
                    speed_rpm: rpm as u32,
                })
                .await?;
                self.send(Command::StartMotor).await?;
                Ok(Outcome::Done)
            }
            DeviceCommand::StirOff => {
                self.send(Command::StopMotor).await?;
                Ok(Outcome::Done)
            }
            DeviceCommand::ReadTemperature => Ok(Outcome::Temperature {
                temperature_c: self.temperature(Sensor::External).await?,
            }),
            other => Err(self.link.wrong_kind(other, InstrumentKind::Hotplate)),
        }
    }

    /// Re-arms the watchdog, then reads vessel and plate temperature and stirrer speed.
    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        self.feed_watchdog().await?;
        let vessel = self.temperature(Sensor::External).await?;
        let plate = self.temperature(Sensor::Hotplate).await?;
        let speed = self.speed().await?;
        Ok(Telemetry {
            state: DeviceState::Idle,
            values: vec![
                ("temperature_c", vessel),
                ("plate_temperature_c", plate),
                ("stir_speed_rpm", speed),
            ],
        })
    }

    /// Heater off and motor off; both are sent even if the first fails.
    async fn safe_state(&mut self) -> Result<(), DriverError> {
        let heater = self.send(Command::StopHeater).await;
        let motor = self.send(Command::StopMotor).await;
        heater.and(motor)
    }

    async fn stop(&mut self) {
        if self.link.port.is_open()
            && let Err(error) = self.safe_state().await
        {
            warn!(instrument = %self.link.id, %error, "STOP_1/STOP_4 on stop failed");
        }
        self.link.disconnect().await;
    }
}

#[cfg(test)]
mod tests;
