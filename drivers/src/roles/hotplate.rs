//! IKA hotplate stirrer over the NAMUR command set (9600 7E1, CR LF).
//!
//! NAMUR replies do not name the command they answer and setpoint commands get no reply at all, so each
//! query's matcher accepts only a reply of the right shape (`25.3 1` for `IN_PV_1`, never `500 4`), and a
//! setpoint cannot be confirmed on the wire. The device's own watchdog (`OUT_WD1@<s>`) is what makes that
//! safe: armed at start and re-armed on every poll, it switches heater and motor off when labctl goes quiet.

use std::time::Duration;

use labctl_protocols::InstrumentKind;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Continuity, LearnedShape, Link, retries, sane_time_scale};
use crate::error::{DriverError, PortError};
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
use crate::port::{Frame, PortHandle, Transaction, Verdict, frame_line_or_cr, printable};
use labctl_codecs::Decoded;
use labctl_codecs::namur::{self, Command, Reply, Sensor, WATCHDOG_RANGE_S};

/// The device's time to answer a query.
const PROCESSING: Duration = Duration::from_millis(500);
/// NAMUR caps a reply at 80 characters plus CR LF.
const MAX_REPLY: usize = namur::MAX_NAMUR_LINE + 2;
/// The fastest a hotplate temperature reading can change, in kelvin per second of the device's time. The
/// fastest thing on a laboratory hotplate is its own top: an IKA RCT digital puts 600 W into an aluminium
/// plate of about 1 kg (900 J/kg K), under 0.7 K/s, and a 1000 W ceramic C-MAG HS top reaches about 2 K/s;
/// a vessel heats far slower (IKA quotes about 5-7 K/min for 1 l of water). 5 K/s leaves a margin of more
/// than twice the fastest plate, and still refuses a lost leading digit (22.0 read as 2.0 is 20 K) unless
/// 4 s have passed. What can beat it is a probe moved by hand (a cold probe plunged into a hot bath
/// follows it within seconds): those readings are refused until two of them agree, never accepted wrong.
const MAX_RATE_K_PER_S: f64 = 5.0;
/// Change allowed between readings however close together: a count of the last printed digit and noise.
const READING_SLACK_K: f64 = 0.2;
/// The fastest the stirrer speed reading can change, in rpm per second of the device's time. IKA's motors
/// soft-start (about 1 s from rest to the 1500 rpm top of an RCT digital) and brake no faster; 5,000 rpm/s
/// is three times that, and between two polls 100 ms apart still refuses a lost or gained leading digit
/// (500 read as 1500 or 0).
const MAX_SPEED_RATE_RPM_PER_S: f64 = 5_000.0;
/// Speed change allowed between readings however close together (the motor's regulation and the print).
const SPEED_SLACK_RPM: f64 = 20.0;

/// How fast a reading can physically change: `per_s` per second of the device's time, plus `slack` however
/// close together two readings are; `what` names the physics in the error.
#[derive(Debug, Clone, Copy)]
struct RateLimit {
    per_s: f64,
    slack: f64,
    what: &'static str,
}

/// Decimals of the value a NAMUR reply prints first (`25.3 1` has 1). `None` when it is not a number.
fn value_decimals(frame: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(frame).ok()?;
    let value = text.split_whitespace().next()?;
    let digits = value.strip_prefix(['-', '+']).unwrap_or(value);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let numeric = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    (!whole.is_empty() && numeric(whole) && numeric(fraction)).then_some(fraction.len())
}

fn sensor_index(sensor: Sensor) -> usize {
    match sensor {
        Sensor::External => 0,
        Sensor::Hotplate => 1,
    }
}

/// Index of the stirrer speed's learned shape.
const SPEED: usize = 2;

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
    /// Seconds of the device's time per real second (a warped simulator's factor, else 1).
    time_scale: f64,
    /// The decimals the device prints each reading with: vessel, plate, stirrer speed.
    shapes: [LearnedShape; 3],
    /// Vessel and plate temperatures change no faster than [`MAX_RATE_K_PER_S`], the stirrer speed no
    /// faster than [`MAX_SPEED_RATE_RPM_PER_S`] (indexed like `shapes`).
    continuity: [Continuity<1>; 3],
}

impl IkaHotplate {
    /// A hotplate on `port`; no I/O until [`Instrument::start`].
    pub fn new(id: &str, port: PortHandle, options: HotplateOptions) -> IkaHotplate {
        IkaHotplate {
            link: Link::new(id, port),
            options,
            time_scale: 1.0,
            shapes: Default::default(),
            continuity: Default::default(),
        }
    }

    /// Seconds of the device's own time per real second: a simulated lab's warp factor, so the rate check
    /// follows a plate that heats faster than real time. 1 (the default) for hardware.
    pub fn time_scale(mut self, scale: f64) -> IkaHotplate {
        self.time_scale = sane_time_scale(scale);
        self
    }

    fn encode(cmd: &Command) -> Vec<u8> {
        let mut out = Vec::new();
        namur::encode_command(cmd, &mut out);
        out
    }

    /// A query, answered by one line that must make sense as the answer to `cmd`.
    async fn query(&self, cmd: Command, retry: bool) -> Result<Reply, DriverError> {
        Ok(self.query_frame(cmd, retry).await?.0)
    }

    /// A query's typed reply and the line it came in.
    async fn query_frame(&self, cmd: Command, retry: bool) -> Result<(Reply, Frame), DriverError> {
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
            Ok(Decoded::Frame { value, .. }) => Ok((value, frame)),
            _ => Err(self.link.unexpected(&label, &frame)),
        }
    }

    /// NAMUR carries no checksum: a reading printed with another number of decimals than this device
    /// prints that channel with lost or gained bytes on the line.
    fn check_shape(
        &mut self,
        index: usize,
        command: &str,
        frame: &[u8],
    ) -> Result<(), DriverError> {
        let Some(decimals) = value_decimals(frame) else {
            return Err(self
                .link
                .damaged(command, frame, "the value is not a number"));
        };
        self.shapes[index].observe(decimals).map_err(|expected| {
            self.link.damaged(
                command,
                frame,
                format!("{decimals} decimals where this device prints {expected}"),
            )
        })
    }

    /// A command the device never answers.
    async fn send(&self, cmd: Command) -> Result<(), DriverError> {
        let bytes = Self::encode(&cmd);
        let timeout = self.link.budget(&bytes, 0, PROCESSING);
        self.link
            .tell(Transaction::no_reply(bytes, frame_line_or_cr).timeout(timeout))
            .await
    }

    /// A temperature; a reading damaged on the line (see [`IkaHotplate::temperature_once`]) is asked once
    /// more, as reading is safe to repeat.
    async fn temperature(&mut self, sensor: Sensor) -> Result<f64, DriverError> {
        match self.temperature_once(sensor).await {
            Err(e @ DriverError::DamagedReply { .. }) => {
                debug!(instrument = %self.link.id, error = %e, "damaged temperature; asking again");
                self.temperature_once(sensor).await
            }
            other => other,
        }
    }

    /// One temperature reading, refused when its decimals differ from the channel's or when it implies a
    /// change faster than [`MAX_RATE_K_PER_S`] since the last accepted reading.
    async fn temperature_once(&mut self, sensor: Sensor) -> Result<f64, DriverError> {
        let command = format!("IN_PV_{}", sensor.channel());
        let sent = Instant::now();
        let (reply, frame) = self
            .query_frame(Command::ReadTemperature(sensor), true)
            .await?;
        let received = Instant::now();
        let temperature_c = match reply {
            Reply::Temperature { temperature_c, .. } => temperature_c,
            other => {
                return Err(self
                    .link
                    .unexpected(&command, format!("{other:?}").as_bytes()));
            }
        };
        let index = sensor_index(sensor);
        self.check_shape(index, &command, &frame)?;
        let limit = RateLimit {
            per_s: MAX_RATE_K_PER_S,
            slack: READING_SLACK_K,
            what: "a hotplate heats or cools",
        };
        self.check_rate(
            index,
            temperature_c,
            (sent, received),
            limit,
            &command,
            &frame,
        )?;
        Ok(temperature_c)
    }

    /// Refuses a reading of channel `index` that changed faster than `limit` (on the device's clock) since
    /// the channel's last accepted one, unless a second reading confirms it (see [`Continuity`]).
    fn check_rate(
        &mut self,
        index: usize,
        value: f64,
        (sent, received): (Instant, Instant),
        limit: RateLimit,
        command: &str,
        frame: &[u8],
    ) -> Result<(), DriverError> {
        let scale = self.time_scale;
        let jump = self.continuity[index].observe([value], sent, received, |_, longest| {
            limit.per_s * longest.as_secs_f64() * scale + limit.slack
        });
        jump.map_err(|reason| {
            self.link.damaged(
                command,
                frame,
                format!("faster than {}: {reason}", limit.what),
            )
        })
    }

    /// The stirrer speed, held to the decimals the device prints it with and to the rate a motor changes
    /// speed at (asked once more when not).
    async fn speed(&mut self) -> Result<f64, DriverError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let sent = Instant::now();
            let (reply, frame) = self.query_frame(Command::ReadSpeed, true).await?;
            let received = Instant::now();
            let speed_rpm = match reply {
                Reply::Speed { speed_rpm } => speed_rpm,
                other => {
                    return Err(self
                        .link
                        .unexpected("IN_PV_4", format!("{other:?}").as_bytes()));
                }
            };
            let limit = RateLimit {
                per_s: MAX_SPEED_RATE_RPM_PER_S,
                slack: SPEED_SLACK_RPM,
                what: "a stirrer motor changes speed",
            };
            let checked = self.check_shape(SPEED, "IN_PV_4", &frame).and_then(|()| {
                self.check_rate(SPEED, speed_rpm, (sent, received), limit, "IN_PV_4", &frame)
            });
            match checked {
                Ok(()) => return Ok(speed_rpm),
                Err(e) if attempts < 2 => {
                    debug!(instrument = %self.link.id, error = %e, "damaged speed; asking again");
                }
                Err(e) => return Err(e),
            }
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
        // Readings before a reconnect say nothing of how long the device was away.
        self.continuity = Default::default();
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

    /// Nothing to undo: the safe state is heater and stirrer off, the next setpoint starts them again, and
    /// the watchdog stays armed by the polls.
    async fn recover(&mut self) -> Result<(), DriverError> {
        Ok(())
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
