//! Syringe pump of the New Era NE-1000 family (RS-232 basic mode, 19200 8N1), one network address on a line
//! that several pumps may share.
//!
//! Every reply names the pump that sends it, so a reply from another pump on the line (or a late one) is
//! never taken for ours. A dispense is `DIR INF`, `RAT`, `VOL` units and value, `CLD INF`, `RUN`, then
//! status polls until the prompt says stopped, then `DIS` for what was actually dispensed. `RUN` is the one
//! request never repeated: a lost reply must not start a second dispense.

use std::time::Duration;

use labctl_protocols::InstrumentKind;
use tokio::time::{Instant, sleep};
use tracing::{debug, info, warn};

use super::{Link, sane_time_scale};
use crate::error::{DriverError, PortError};
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
use crate::port::{PortHandle, Transaction, Verdict, printable};
use labctl_codecs::ne1000::{
    self, Address, Alarm, Command, Data, Direction, DirectionSetting, PumpFloat, RateUnits,
    Request, Response, Status, VolumeUnits,
};
use labctl_codecs::{DecodeError, Decoded};

/// The pump's own time to parse a command and answer.
const PROCESSING: Duration = Duration::from_millis(150);
/// Longest reply we budget wire time for (`\x02 00 S I9999W9999UL \x03` is 18 bytes).
const MAX_REPLY: usize = 32;
/// Polls during a dispense: about this many over the expected pumping time, within the bounds below.
const POLLS_PER_DISPENSE: f64 = 20.0;
const MIN_POLL: Duration = Duration::from_millis(200);
const MAX_POLL: Duration = Duration::from_secs(2);
/// The shortest poll however fast a simulated pump runs: a status transaction takes a few ms of wire.
const MIN_POLL_WARPED: Duration = Duration::from_millis(10);
/// Retries of a request that is safe to repeat. Two, not the one other drivers allow: three pumps share
/// the line and poll it constantly, and NE-1000 replies carry no checksum, so a damaged reply is dropped
/// (and its request timed out) more often than on a line of one instrument.
const SAFE_RETRIES: u8 = 2;
/// Slack on top of 1.5x the expected pumping time before a dispense counts as stuck.
const DISPENSE_MARGIN: Duration = Duration::from_secs(10);

/// Cuts one `STX ... ETX` reply packet; bytes outside a packet are garbage the codec tells us to skip.
pub fn frame_packet(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    match ne1000::decode_response(buf)? {
        Decoded::Frame { consumed, .. } => Ok(Some(consumed)),
        Decoded::Incomplete => Ok(None),
    }
}

fn decode(frame: &[u8]) -> Option<Response> {
    match ne1000::decode_response(frame) {
        Ok(Decoded::Frame { value, .. }) => Some(value),
        _ => None,
    }
}

/// An NE-1000 pump at one address.
#[derive(Debug)]
pub struct Ne1000Pump {
    link: Link,
    /// `None` when the lab file gave an address above 99; `start` refuses it.
    address: Option<Address>,
    requested_address: u8,
    /// Seconds of the pump's own time per real second (see [`Ne1000Pump::time_scale`]).
    time_scale: f64,
}

impl Ne1000Pump {
    /// A pump at `address` on `port`; no I/O until [`Instrument::start`].
    pub fn new(id: &str, port: PortHandle, address: u8) -> Ne1000Pump {
        Ne1000Pump {
            link: Link::new(id, port),
            address: Address::new(address),
            requested_address: address,
            time_scale: 1.0,
        }
    }

    /// How many seconds of the pump's own time pass per real second: 1 for a real pump, a simulated lab's
    /// warp factor for a simulated one. A dispense is polled on the pump's time, so a warped simulator is
    /// not left finished and unpolled for seconds of real time.
    pub fn time_scale(mut self, scale: f64) -> Ne1000Pump {
        self.time_scale = sane_time_scale(scale);
        self
    }

    fn address(&self) -> Result<Address, DriverError> {
        self.address.ok_or_else(|| DriverError::Unsupported {
            instrument: self.link.id.clone(),
            what: "network address".into(),
            found: self.requested_address.to_string(),
            supported: "0-99".into(),
        })
    }

    /// Sends one request and returns the reply as the pump sent it, alarms and errors included.
    async fn raw(&self, request: Request, safe: bool) -> Result<Response, DriverError> {
        let address = self.address()?;
        let mut bytes = Vec::new();
        ne1000::encode_command(&Command::to(address, request), &mut bytes);
        let label = printable(&bytes);
        let timeout = self.link.budget(&bytes, MAX_REPLY, PROCESSING);
        let matcher = move |frame: &[u8]| match decode(frame) {
            Some(reply) if reply.address == address => Verdict::Last,
            _ => Verdict::Unrelated,
        };
        let t = Transaction::new(bytes, frame_packet, matcher)
            .timeout(timeout)
            .retries(if safe { SAFE_RETRIES } else { 0 });
        let frame = self.link.ask(t).await?;
        decode(&frame).ok_or_else(|| self.link.unexpected(&label, &frame))
    }

    /// Sends one request; an alarm prompt or a command error becomes an error.
    async fn request(&self, request: Request, safe: bool) -> Result<Response, DriverError> {
        let reply = self.raw(request, safe).await?;
        self.check(reply)
    }

    fn check(&self, reply: Response) -> Result<Response, DriverError> {
        if let Status::Alarm(alarm) = reply.status {
            return Err(self.alarm(alarm));
        }
        if let Data::Error(error) = reply.data {
            return Err(self
                .link
                .device(format!("?{}", error.code()), error.to_string()));
        }
        Ok(reply)
    }

    fn alarm(&self, alarm: Alarm) -> DriverError {
        self.link
            .alarm(format!("A?{}", char::from(alarm.code())), alarm.to_string())
    }

    async fn identify(&self) -> Result<Identity, DriverError> {
        let mut reply = self.raw(Request::QueryVersion, true).await?;
        if reply.status == Status::Alarm(Alarm::Reset) {
            // After power-up the pump reports the reset once; the report clears it. Ask again.
            info!(instrument = %self.link.id, "pump reports a power-on reset");
            reply = self.raw(Request::QueryVersion, true).await?;
        }
        let reply = self.check(reply)?;
        match reply.data {
            Data::Version(version) => Ok(Identity {
                manufacturer: "New Era Pump Systems".into(),
                model: version.split('V').next().unwrap_or_default().to_owned(),
                // The protocol has no serial number query.
                serial: String::new(),
                firmware: version,
            }),
            other => Err(DriverError::Unsupported {
                instrument: self.link.id.clone(),
                what: "pump model".into(),
                found: format!("VER reply {other:?}"),
                supported: "New Era NE-1000 family (VER reply NE...)".into(),
            }),
        }
    }

    /// Infused volume since the last clear, in µL; a reply damaged on the line is asked once more, as
    /// `DIS` is safe to repeat.
    async fn dispensed_ul(&self) -> Result<f64, DriverError> {
        match self.dispensed_ul_once().await {
            Err(e @ DriverError::DamagedReply { .. }) => {
                debug!(instrument = %self.link.id, error = %e, "damaged DIS reply; asking again");
                self.dispensed_ul_once().await
            }
            other => other,
        }
    }

    /// One `DIS`. NE-1000 replies carry no checksum: a reply of another shape lost or gained bytes on the
    /// line and kept them printable (`I150.0W>.g00UL`).
    async fn dispensed_ul_once(&self) -> Result<f64, DriverError> {
        let reply = self.request(Request::QueryDispensed, true).await?;
        match reply.data {
            Data::Dispensed { infused, units, .. } => Ok(microlitres(infused, units)),
            other => Err(self.link.damaged(
                "DIS",
                format!("{other:?}").as_bytes(),
                "not a dispensed-volume reply",
            )),
        }
    }

    /// `RUN`, which must not be sent twice. When its reply is lost on the line, whether the pump started
    /// is a safe question: running, or stopped with volume dispensed, means it did; stopped with nothing
    /// dispensed means the command never arrived, and only then is `RUN` sent once more.
    async fn start_pumping(&self) -> Result<(), DriverError> {
        let lost = match self.request(Request::Run { phase: None }, false).await {
            Ok(_) => return Ok(()),
            Err(e @ DriverError::Port(PortError::Timeout { .. })) => e,
            Err(e) => return Err(e),
        };
        let status = self.request(Request::Status, true).await?.status;
        let started = match status {
            Status::Infusing | Status::Withdrawing => true,
            Status::Stopped => self.dispensed_ul().await? > 0.0,
            _ => return Err(lost),
        };
        if started {
            info!(instrument = %self.link.id, "reply to RUN lost; the pump is running");
            return Ok(());
        }
        warn!(instrument = %self.link.id, "RUN lost before the pump heard it; sending it once more");
        self.request(Request::Run { phase: None }, false).await?;
        Ok(())
    }

    async fn dispense(
        &self,
        volume_ul: f64,
        rate_ul_per_min: f64,
        command: &DeviceCommand,
    ) -> Result<Outcome, DriverError> {
        let (rate, rate_units) =
            rate_setting(rate_ul_per_min).map_err(|reason| self.link.invalid(command, reason))?;
        let (volume, volume_units) =
            volume_setting(volume_ul).map_err(|reason| self.link.invalid(command, reason))?;
        // Settings are safe to repeat if a reply is lost; RUN is not.
        self.request(Request::SetDirection(DirectionSetting::Infuse), true)
            .await?;
        self.request(
            Request::SetRate {
                rate,
                units: Some(rate_units),
            },
            true,
        )
        .await?;
        self.request(Request::SetVolumeUnits(volume_units), true)
            .await?;
        self.request(Request::SetVolume { volume }, true).await?;
        self.request(Request::ClearDispensed(Direction::Infuse), true)
            .await?;
        self.start_pumping().await?;

        // Both the pumping time and the shortest poll follow the pump's clock; the wire does not.
        let scale = self.time_scale;
        let expected = Duration::try_from_secs_f64(volume_ul / rate_ul_per_min * 60.0 / scale)
            .unwrap_or(Duration::MAX);
        let min_poll = MIN_POLL.div_f64(scale).max(MIN_POLL_WARPED);
        let interval = expected
            .div_f64(POLLS_PER_DISPENSE)
            .clamp(min_poll, MAX_POLL);
        let allowed = expected.mul_f64(1.5).saturating_add(DISPENSE_MARGIN);
        let deadline = Instant::now().checked_add(allowed);
        loop {
            sleep(interval).await;
            let status = self.request(Request::Status, true).await?.status;
            match status {
                Status::Stopped => break,
                Status::Paused => {
                    let done = self.dispensed_ul().await.unwrap_or(f64::NAN);
                    return Err(self.link.device(
                        "P",
                        format!(
                            "dispense paused (STP or keypad) after {done} uL of {volume_ul} uL"
                        ),
                    ));
                }
                _ => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(DriverError::NotFinished {
                    instrument: self.link.id.clone(),
                    command: "dispense".into(),
                    timeout: allowed,
                });
            }
        }
        Ok(Outcome::Dispensed {
            dispensed_ul: self.dispensed_ul().await?,
        })
    }
}

/// µL from a pump volume in its units.
fn microlitres(volume: PumpFloat, units: VolumeUnits) -> f64 {
    match units {
        VolumeUnits::Microlitres => volume.as_f64(),
        VolumeUnits::Millilitres => volume.as_f64() * 1000.0,
    }
}

/// A rate in the pump's 4-digit format: µL/min while it fits, else mL/min.
fn rate_setting(rate_ul_per_min: f64) -> Result<(PumpFloat, RateUnits), String> {
    let (value, units) = if rate_ul_per_min < 9999.5 {
        (rate_ul_per_min, RateUnits::MicrolitresPerMinute)
    } else {
        (rate_ul_per_min / 1000.0, RateUnits::MillilitresPerMinute)
    };
    match PumpFloat::from_f64(value) {
        Some(rate) if rate.thousandths() > 0 => Ok((rate, units)),
        _ => Err(format!(
            "rate {rate_ul_per_min} uL/min does not fit the pump's 0.001-9999 format"
        )),
    }
}

/// A volume in the pump's 4-digit format: µL while it fits, else mL.
fn volume_setting(volume_ul: f64) -> Result<(PumpFloat, VolumeUnits), String> {
    let (value, units) = if volume_ul < 9999.5 {
        (volume_ul, VolumeUnits::Microlitres)
    } else {
        (volume_ul / 1000.0, VolumeUnits::Millilitres)
    };
    match PumpFloat::from_f64(value) {
        Some(volume) if volume.thousandths() > 0 => Ok((volume, units)),
        _ => Err(format!(
            "volume {volume_ul} uL does not fit the pump's 0.001-9999 format"
        )),
    }
}

impl Instrument for Ne1000Pump {
    fn kind(&self) -> InstrumentKind {
        InstrumentKind::SyringePump
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        self.address()?;
        self.link.connect().await?;
        self.identify().await
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::Dispense {
                volume_ul,
                rate_ul_per_min,
            } => self.dispense(*volume_ul, *rate_ul_per_min, command).await,
            DeviceCommand::StopPump => {
                self.request(Request::Stop, true).await?;
                Ok(Outcome::Done)
            }
            other => Err(self.link.wrong_kind(other, InstrumentKind::SyringePump)),
        }
    }

    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        let reply = self.raw(Request::Status, true).await?;
        let state = match reply.status {
            Status::Alarm(alarm) => DeviceState::Alarm(self.alarm(alarm).to_string()),
            Status::Stopped | Status::Paused => DeviceState::Idle,
            _ => DeviceState::Busy,
        };
        let values = vec![("dispensed_ul", self.dispensed_ul().await?)];
        Ok(Telemetry { state, values })
    }

    /// `STP`: the motor stops at once (a running program pauses).
    async fn safe_state(&mut self) -> Result<(), DriverError> {
        let reply = self.raw(Request::Stop, true).await?;
        if let Status::Alarm(alarm) = reply.status {
            // The reply that reports an alarm clears it; a pump in alarm is not pumping.
            warn!(instrument = %self.link.id, %alarm, "pump alarm reported while stopping");
        }
        if let Data::Error(error) = reply.data {
            return Err(self
                .link
                .device(format!("?{}", error.code()), error.to_string()));
        }
        Ok(())
    }

    /// Nothing to undo: the safe state is `STP`, and the next `dispense` programs the pump afresh.
    async fn recover(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    async fn stop(&mut self) {
        if self.link.port.is_open()
            && let Err(error) = self.safe_state().await
        {
            warn!(instrument = %self.link.id, %error, "STP on stop failed");
        }
        self.link.disconnect().await;
    }
}

#[cfg(test)]
mod tests;
