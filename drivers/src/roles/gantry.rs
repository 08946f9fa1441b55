//! XYZ gantry on a GRBL 1.1 controller (serial 115200 8N1).
//!
//! GRBL answers each line with `ok`/`error:N` but pushes `ALARM:N`, `[MSG:..]` and status reports whenever
//! it likes, and its `ok` for a move only means "queued". So a move is `G90`, `G21`, `G1 ...` (the
//! controller's parser takes one command per block), then `?` status polls until the machine is `Idle` at
//! the target. Alarms that arrive between polls reach us through the port's unsolicited frames.

use std::time::Duration;

use labctl_protocols::InstrumentKind;
use tokio::sync::broadcast;
use tokio::time::{Instant, sleep};
use tracing::{debug, warn};

use super::{Link, retries};
use crate::codec::Decoded;
use crate::codec::grbl::{
    self, AlarmCode, Command, DistanceMode, ErrorCode, MachineState, Motion, Position, Realtime,
    Response, StatusReport, Xyz,
};
use crate::error::DriverError;
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
use crate::port::{Frame, PortHandle, Transaction, Verdict, frame_line, printable};

/// Time GRBL takes to parse a line and answer (it answers from its main loop, well under this).
const LINE_PROCESSING: Duration = Duration::from_millis(100);
/// Longest reply line we budget wire time for (a full status report).
const MAX_REPLY: usize = 128;
/// `$I` answers with up to three lines.
const BUILD_INFO_FRAMES: usize = 4;

/// Tunables of the gantry driver; the defaults suit the simulated lab's gantry.
#[derive(Debug, Clone, PartialEq)]
pub struct GantryOptions {
    /// Longest homing cycle before giving up.
    pub homing_timeout: Duration,
    /// Time between `?` polls while a move runs.
    pub poll_interval: Duration,
    /// How close to the target (mm, each axis) counts as arrived; GRBL reports 3 decimals of a stepped
    /// position.
    pub tolerance_mm: f64,
    /// Slack on top of 1.5x the travel time at the programmed feed before a move counts as stuck.
    pub move_margin: Duration,
}

impl Default for GantryOptions {
    fn default() -> Self {
        GantryOptions {
            homing_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_millis(100),
            tolerance_mm: 0.02,
            move_margin: Duration::from_secs(5),
        }
    }
}

/// A GRBL 1.1 gantry. The vial gripper hangs on the flood coolant output (`M8` closes, `M9` opens).
#[derive(Debug)]
pub struct GrblGantry {
    link: Link,
    options: GantryOptions,
    /// Frames no transaction claimed, to catch `ALARM:N` pushed between polls.
    unsolicited: Option<broadcast::Receiver<Frame>>,
    last_alarm: Option<AlarmCode>,
}

fn encode(cmd: &Command) -> Vec<u8> {
    let mut out = Vec::new();
    grbl::encode_command(cmd, &mut out);
    out
}

fn decode(frame: &[u8]) -> Option<Response> {
    match grbl::decode_response(frame) {
        Ok(Decoded::Frame { value, .. }) => Some(value),
        _ => None,
    }
}

/// A line's answer: `ok`, `error:N`, or the `ALARM:N` that replaces it when the line trips an alarm.
fn ack(frame: &[u8]) -> Verdict {
    match decode(frame) {
        Some(Response::Ok | Response::Error(_) | Response::Alarm(_)) => Verdict::Last,
        _ => Verdict::Unrelated,
    }
}

fn status_report(frame: &[u8]) -> Verdict {
    match decode(frame) {
        Some(Response::Status(_)) => Verdict::Last,
        _ => Verdict::Unrelated,
    }
}

/// `$I`: `[VER:..]`, `[OPT:..]`, then `ok`. Bracketed lines the codec cannot read (pre-1.1 firmware sends
/// `[0.9j.20160303:]`) are kept so the version check can name them.
fn build_info(frame: &[u8]) -> Verdict {
    match decode(frame) {
        Some(Response::Ok | Response::Error(_) | Response::Alarm(_)) => Verdict::Last,
        Some(
            Response::Version { .. }
            | Response::Options(_)
            | Response::Feedback { .. }
            | Response::Message(_),
        ) => Verdict::Part,
        Some(_) => Verdict::Unrelated,
        None if frame.starts_with(b"[") => Verdict::Part,
        None => Verdict::Unrelated,
    }
}

fn xyz(report: &StatusReport) -> Xyz {
    match report.position {
        Position::Machine(p) | Position::Work(p) => p,
    }
}

impl GrblGantry {
    /// A gantry on `port`; no I/O until [`Instrument::start`].
    pub fn new(id: &str, port: PortHandle, options: GantryOptions) -> GrblGantry {
        GrblGantry {
            link: Link::new(id, port),
            options,
            unsolicited: None,
            last_alarm: None,
        }
    }

    fn line_transaction(
        &self,
        cmd: &Command,
        timeout: Option<Duration>,
        safe: bool,
    ) -> Transaction {
        let request = encode(cmd);
        let timeout =
            timeout.unwrap_or_else(|| self.link.budget(&request, MAX_REPLY, LINE_PROCESSING));
        Transaction::new(request, frame_line, ack)
            .timeout(timeout)
            .retries(retries(safe))
    }

    /// Sends one line and maps its answer.
    async fn line(
        &mut self,
        cmd: &Command,
        timeout: Option<Duration>,
        safe: bool,
    ) -> Result<(), DriverError> {
        let t = self.line_transaction(cmd, timeout, safe);
        let label = printable(&t.request);
        let frame = self.link.ask(t).await?;
        match decode(&frame) {
            Some(Response::Ok) => Ok(()),
            Some(Response::Error(code)) => Err(self.error(code)),
            Some(Response::Alarm(code)) => {
                self.last_alarm = Some(code);
                Err(self.alarm(code))
            }
            _ => Err(self.link.unexpected(&label, &frame)),
        }
    }

    fn error(&self, code: ErrorCode) -> DriverError {
        self.link.device(
            format!("error:{}", code.code()),
            format!("{}: {}", code.message(), code.description()),
        )
    }

    fn alarm(&self, code: AlarmCode) -> DriverError {
        self.link.alarm(
            format!("ALARM:{}", code.code()),
            format!("{}: {}", code.message(), code.description()),
        )
    }

    /// The machine is in `Alarm`: report the last `ALARM:N` we saw, or the bare state.
    fn alarm_state(&self) -> DriverError {
        match self.last_alarm {
            Some(code) => self.alarm(code),
            None => self.link.alarm(
                "Alarm",
                "GRBL is in the alarm state; home ($H) or unlock ($X) first",
            ),
        }
    }

    /// Reads `ALARM:N` lines that arrived outside a transaction.
    fn collect_alarms(&mut self) {
        let Some(rx) = self.unsolicited.as_mut() else {
            return;
        };
        loop {
            match rx.try_recv() {
                Ok(frame) => {
                    if let Some(Response::Alarm(code)) = decode(&frame) {
                        warn!(instrument = %self.link.id, alarm = code.code(), "GRBL alarm");
                        self.last_alarm = Some(code);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    debug!(instrument = %self.link.id, lost = n, "unsolicited frames overflowed");
                }
                Err(_) => return,
            }
        }
    }

    /// One `?` status report. A status query is always safe to repeat.
    async fn status(&mut self) -> Result<StatusReport, DriverError> {
        self.collect_alarms();
        let request = encode(&Command::Realtime(Realtime::StatusReport));
        let timeout = self.link.budget(&request, MAX_REPLY, LINE_PROCESSING);
        let t = Transaction::new(request, frame_line, status_report)
            .timeout(timeout)
            .retries(1);
        let frame = self.link.ask(t).await?;
        let report = match decode(&frame) {
            Some(Response::Status(report)) => report,
            _ => return Err(self.link.unexpected("?", &frame)),
        };
        self.collect_alarms();
        if report.state != MachineState::Alarm {
            self.last_alarm = None;
        }
        Ok(report)
    }

    /// Ctrl-X: GRBL resets and answers with its welcome banner.
    async fn soft_reset(&mut self) -> Result<(), DriverError> {
        let request = encode(&Command::Realtime(Realtime::SoftReset));
        let timeout = self.link.budget(&request, MAX_REPLY, LINE_PROCESSING);
        let banner = |frame: &[u8]| match decode(frame) {
            Some(Response::Welcome { .. }) => Verdict::Last,
            _ => Verdict::Unrelated,
        };
        // A reset is safe to repeat: it only ever leaves the controller idle or locked.
        let t = Transaction::new(request, frame_line, banner)
            .timeout(timeout)
            .retries(1);
        self.link.ask(t).await?;
        Ok(())
    }

    async fn identify(&mut self) -> Result<Identity, DriverError> {
        let request = encode(&Command::ViewBuildInfo);
        let timeout = self
            .link
            .budget(&request, MAX_REPLY * BUILD_INFO_FRAMES, LINE_PROCESSING);
        let t = Transaction::new(request, frame_line, build_info)
            .frames(BUILD_INFO_FRAMES)
            .timeout(timeout)
            .retries(1);
        let frames = self.link.ask_all(t).await?;
        let unsupported = |found: String| DriverError::Unsupported {
            instrument: self.link.id.clone(),
            what: "firmware".into(),
            found,
            supported: "Grbl 1.1x".into(),
        };
        let mut version = None;
        for frame in &frames {
            match decode(frame) {
                Some(Response::Version {
                    version: v,
                    build_info,
                }) => version = Some((v, build_info)),
                Some(Response::Error(code)) => {
                    return Err(unsupported(format!(
                        "no build info ($I answered error:{})",
                        code.code()
                    )));
                }
                Some(Response::Alarm(code)) => return Err(self.alarm(code)),
                None if version.is_none() => {
                    // Not a 1.1 `[VER:...]` line: show what the firmware said instead.
                    let text = String::from_utf8_lossy(frame).trim().to_owned();
                    return Err(unsupported(text));
                }
                _ => {}
            }
        }
        let Some((version, build_info)) = version else {
            let said: Vec<String> = frames.iter().map(|f| printable(f)).collect();
            return Err(unsupported(format!("no [VER:] line in {said:?}")));
        };
        if !version.starts_with("1.1") {
            return Err(unsupported(format!("Grbl {version}")));
        }
        Ok(Identity {
            manufacturer: "Grbl".into(),
            model: if build_info.is_empty() {
                "Grbl CNC controller".into()
            } else {
                build_info.clone()
            },
            // GRBL has no serial number; the `$I=` build string is the only per-machine text it keeps.
            serial: build_info,
            firmware: format!("Grbl {version}"),
        })
    }

    async fn move_to(
        &mut self,
        target: Xyz,
        feed: f64,
        command: &DeviceCommand,
    ) -> Result<Outcome, DriverError> {
        for (name, v) in [
            ("x_mm", target.x_mm),
            ("y_mm", target.y_mm),
            ("z_mm", target.z_mm),
        ] {
            if !v.is_finite() {
                return Err(self
                    .link
                    .invalid(command, format!("{name} {v} is not a finite number")));
            }
        }
        if !(feed.is_finite() && feed > 0.0) {
            return Err(self
                .link
                .invalid(command, format!("feed {feed} mm/min is not > 0")));
        }
        let start = self.status().await?;
        if start.state == MachineState::Alarm {
            return Err(self.alarm_state());
        }
        let safe = command.idempotent();
        self.line(&Command::Distance(DistanceMode::Absolute), None, safe)
            .await?;
        self.line(&Command::Millimetres, None, safe).await?;
        let g1 = Command::Move {
            motion: Motion::Linear,
            x_mm: Some(target.x_mm),
            y_mm: Some(target.y_mm),
            z_mm: Some(target.z_mm),
            feed_mm_per_min: Some(feed),
        };
        self.line(&g1, None, safe).await?;

        let from = xyz(&start);
        let distance = ((target.x_mm - from.x_mm).powi(2)
            + (target.y_mm - from.y_mm).powi(2)
            + (target.z_mm - from.z_mm).powi(2))
        .sqrt();
        let travel = Duration::try_from_secs_f64(distance / feed * 60.0).unwrap_or(Duration::MAX);
        let allowed = travel.mul_f64(1.5).saturating_add(self.options.move_margin);
        let deadline = Instant::now().checked_add(allowed);
        let mut idle_elsewhere = 0;
        loop {
            sleep(self.options.poll_interval).await;
            let report = self.status().await?;
            match report.state {
                MachineState::Idle => {
                    let at = xyz(&report);
                    let tol = self.options.tolerance_mm;
                    if (at.x_mm - target.x_mm).abs() <= tol
                        && (at.y_mm - target.y_mm).abs() <= tol
                        && (at.z_mm - target.z_mm).abs() <= tol
                    {
                        return Ok(Outcome::Done);
                    }
                    // Idle before the planner started the block is possible once; idle for good is not.
                    idle_elsewhere += 1;
                    if idle_elsewhere >= 3 {
                        let reply = format!(
                            "Idle at X{} Y{} Z{}, target X{} Y{} Z{}",
                            at.x_mm, at.y_mm, at.z_mm, target.x_mm, target.y_mm, target.z_mm
                        );
                        return Err(self.link.unexpected("?", reply.as_bytes()));
                    }
                }
                MachineState::Alarm => return Err(self.alarm_state()),
                MachineState::Check | MachineState::Sleep => {
                    return Err(self
                        .link
                        .unexpected("?", format!("{:?} during a move", report.state).as_bytes()));
                }
                // Run, Jog, Home, and Hold/Door (a feed hold or an open door pauses, it does not cancel).
                _ => idle_elsewhere = 0,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(DriverError::NotFinished {
                    instrument: self.link.id.clone(),
                    command: "move_to".into(),
                    timeout: allowed,
                });
            }
        }
    }
}

impl Instrument for GrblGantry {
    fn kind(&self) -> InstrumentKind {
        InstrumentKind::Gantry
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        self.unsolicited = Some(self.link.port.subscribe());
        self.last_alarm = None;
        self.link.connect().await?;
        self.identify().await
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::Home => {
                // After a hard or soft limit GRBL ignores every line until a soft reset, so `$H` alone
                // would never be answered. Motion has already stopped, so the reset moves nothing.
                self.collect_alarms();
                if self
                    .last_alarm
                    .is_some_and(|a| matches!(a, AlarmCode::HardLimit | AlarmCode::SoftLimit))
                {
                    self.soft_reset().await?;
                }
                self.line(&Command::Home, Some(self.options.homing_timeout), false)
                    .await?;
                self.last_alarm = None;
                Ok(Outcome::Done)
            }
            DeviceCommand::MoveTo {
                x_mm,
                y_mm,
                z_mm,
                feed_mm_per_min,
            } => {
                let target = Xyz {
                    x_mm: *x_mm,
                    y_mm: *y_mm,
                    z_mm: *z_mm,
                };
                self.move_to(target, *feed_mm_per_min, command).await
            }
            DeviceCommand::Gripper { closed } => {
                let cmd = if *closed {
                    Command::CLOSE_GRIPPER
                } else {
                    Command::OPEN_GRIPPER
                };
                self.line(&cmd, None, command.idempotent()).await?;
                Ok(Outcome::Done)
            }
            other => Err(self.link.wrong_kind(other, InstrumentKind::Gantry)),
        }
    }

    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        let report = self.status().await?;
        let state = match report.state {
            MachineState::Idle => DeviceState::Idle,
            // Without an ALARM:N since connect, this is the power-up lock that homing clears, not a fault.
            MachineState::Alarm if self.last_alarm.is_none() => {
                DeviceState::Locked("homing required ($H) after power-up".into())
            }
            MachineState::Alarm => DeviceState::Alarm(self.alarm_state().to_string()),
            _ => DeviceState::Busy,
        };
        let p = xyz(&report);
        Ok(Telemetry {
            state,
            values: vec![("x_mm", p.x_mm), ("y_mm", p.y_mm), ("z_mm", p.z_mm)],
        })
    }

    /// Feed hold: GRBL decelerates to a controlled stop without losing position.
    async fn safe_state(&mut self) -> Result<(), DriverError> {
        let request = encode(&Command::Realtime(Realtime::FeedHold));
        let timeout = self.link.budget(&request, 0, LINE_PROCESSING);
        self.link
            .tell(Transaction::no_reply(request, frame_line).timeout(timeout))
            .await
    }

    async fn stop(&mut self) {
        if self.link.port.is_open()
            && let Err(error) = self.safe_state().await
        {
            warn!(instrument = %self.link.id, %error, "feed hold on stop failed");
        }
        self.unsolicited = None;
        self.link.disconnect().await;
    }
}

#[cfg(test)]
mod tests;
