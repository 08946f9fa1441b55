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

use super::{Continuity, LearnedShape, Link, retries, sane_time_scale};
use crate::error::{DriverError, PortError};
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
use crate::port::{Frame, PortHandle, Transaction, Verdict, frame_line, printable};
use labctl_codecs::Decoded;
use labctl_codecs::grbl::{
    self, AlarmCode, Command, DistanceMode, DoorState, ErrorCode, HoldState, MachineState, Motion,
    Position, Realtime, Response, StatusReport, Xyz,
};

/// Time GRBL takes to parse a line and answer (it answers from its main loop, well under this).
const LINE_PROCESSING: Duration = Duration::from_millis(100);
/// Longest reply line we budget wire time for (a full status report).
const MAX_REPLY: usize = 128;
/// `$I` answers with up to three lines.
const BUILD_INFO_FRAMES: usize = 4;
/// `$$` prints about 34 settings on GRBL 1.1 (3 axes), then `ok`.
const SETTINGS_FRAMES: usize = 64;
/// An idle machine does not move: GRBL reports its step counter, which only motion changes, so two idle
/// reports with no command in between print the same position (half a printed count of slack, for the
/// parse: a single digit changed on the line is refused).
const STATIONARY_SLACK_MM: f64 = 0.0005;
/// Physical motion limits for the position checks: `$110-$112` max rates (mm/min) and `$130-$132` max
/// travel (mm) per axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GantryLimits {
    pub max_rate_mm_per_min: [f64; 3],
    pub max_travel_mm: [f64; 3],
}

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
    /// The machine's max rates and travel, when the lab knows them better than the controller's `$$`
    /// (read at every connect otherwise).
    pub limits: Option<GantryLimits>,
}

impl Default for GantryOptions {
    fn default() -> Self {
        GantryOptions {
            homing_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_millis(100),
            tolerance_mm: 0.02,
            move_margin: Duration::from_secs(5),
            limits: None,
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
    /// Seconds of the machine's time per real second (a warped simulator's factor, else 1).
    time_scale: f64,
    /// Max rates and travel in force: the options', else the last `$$` that read consistently.
    limits: Option<GantryLimits>,
    /// The decimals GRBL prints positions with.
    decimals: LearnedShape,
    /// The position must move continuously, no faster than the max rates.
    continuity: Continuity<3>,
    /// The last accepted report was `Idle`.
    last_idle: bool,
    /// A line that can move the machine was sent since the last accepted report.
    commanded: bool,
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

fn axes(p: Xyz) -> [f64; 3] {
    [p.x_mm, p.y_mm, p.z_mm]
}

/// `$$`: `$N=value` lines, then `ok`.
fn settings_list(frame: &[u8]) -> Verdict {
    match decode(frame) {
        Some(Response::Ok | Response::Error(_) | Response::Alarm(_)) => Verdict::Last,
        Some(Response::Setting { .. }) => Verdict::Part,
        _ => Verdict::Unrelated,
    }
}

/// Reads `$13`, `$110-$112` and `$130-$132` from a `$$` listing. GRBL prints rates and travel with three
/// decimals; one printed otherwise lost bytes on the line.
fn parse_limits(frames: &[Frame]) -> Result<(GantryLimits, bool), String> {
    let mut rate = [None; 3];
    let mut travel = [None; 3];
    let mut inches = false;
    for frame in frames {
        let Some(Response::Setting { number, value }) = decode(frame) else {
            continue;
        };
        let text = String::from_utf8_lossy(frame).trim().to_owned();
        let slot = match number {
            13 => {
                inches = value != 0.0;
                continue;
            }
            110..=112 => &mut rate[usize::from(number - 110)],
            130..=132 => &mut travel[usize::from(number - 130)],
            _ => continue,
        };
        let decimals = text.split_once('.').map_or(0, |(_, f)| f.len());
        if decimals != 3 || !(value.is_finite() && value > 0.0) {
            return Err(format!("{text:?} is not a rate or length GRBL prints"));
        }
        *slot = Some(value);
    }
    let all = |v: [Option<f64>; 3], first: u16| -> Result<[f64; 3], String> {
        let mut out = [0.0; 3];
        for (i, (x, number)) in v.iter().zip(first..).enumerate() {
            out[i] = x.ok_or_else(|| format!("no ${number} in $$"))?;
        }
        Ok(out)
    };
    Ok((
        GantryLimits {
            max_rate_mm_per_min: all(rate, 110)?,
            max_travel_mm: all(travel, 130)?,
        },
        inches,
    ))
}

impl GrblGantry {
    /// A gantry on `port`; no I/O until [`Instrument::start`].
    pub fn new(id: &str, port: PortHandle, options: GantryOptions) -> GrblGantry {
        GrblGantry {
            link: Link::new(id, port),
            unsolicited: None,
            last_alarm: None,
            time_scale: 1.0,
            limits: options.limits,
            decimals: LearnedShape::default(),
            continuity: Continuity::default(),
            last_idle: false,
            commanded: false,
            options,
        }
    }

    /// Seconds of the machine's own time per real second: a simulated lab's warp factor, so the rate
    /// checks follow a machine that moves faster than real time. 1 (the default) for hardware.
    pub fn time_scale(mut self, scale: f64) -> GrblGantry {
        self.time_scale = sane_time_scale(scale);
        self
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
        self.commanded = true;
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
                Ok(frame) => match decode(&frame) {
                    Some(Response::Alarm(code)) => {
                        warn!(instrument = %self.link.id, alarm = code.code(), "GRBL alarm");
                        self.last_alarm = Some(code);
                    }
                    // GRBL reset itself (a DTR reset when the port reopened, power, a reset from
                    // elsewhere): whatever alarm it had is gone, and so is any position we trusted.
                    Some(Response::Welcome { .. }) => {
                        warn!(instrument = %self.link.id, "GRBL reset (welcome banner)");
                        self.last_alarm = None;
                        self.continuity.forget();
                        self.last_idle = false;
                    }
                    _ => {}
                },
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    debug!(instrument = %self.link.id, lost = n, "unsolicited frames overflowed");
                }
                Err(_) => return,
            }
        }
    }

    /// One `?` status report. A status query is always safe to repeat, so a damaged report is asked once
    /// more.
    async fn status(&mut self) -> Result<StatusReport, DriverError> {
        match self.status_once().await {
            Err(e @ DriverError::DamagedReply { .. }) => {
                debug!(instrument = %self.link.id, error = %e, "damaged status report; asking again");
                self.status_once().await
            }
            other => other,
        }
    }

    async fn status_once(&mut self) -> Result<StatusReport, DriverError> {
        self.collect_alarms();
        let request = encode(&Command::Realtime(Realtime::StatusReport));
        let timeout = self.link.budget(&request, MAX_REPLY, LINE_PROCESSING);
        let t = Transaction::new(request, frame_line, status_report)
            .timeout(timeout)
            .retries(1);
        let sent = Instant::now();
        let frame = self.link.ask(t).await?;
        let received = Instant::now();
        let report = match decode(&frame) {
            Some(Response::Status(report)) => report,
            _ => return Err(self.link.unexpected("?", &frame)),
        };
        self.collect_alarms();
        self.check_position(&frame, &report, sent, received)?;
        if report.state != MachineState::Alarm {
            self.last_alarm = None;
        }
        Ok(report)
    }

    /// GRBL has no checksum, so a report that lost a digit still decodes. It is refused (as
    /// [`DriverError::DamagedReply`]) when it is not physically possible: coordinates printed with another
    /// number of decimals than this controller prints; a machine position outside the axis travel
    /// (`$130-$132`: GRBL's machine space spans at most the travel from the home corner, whichever
    /// direction it homes to); a move faster than the axis max rate (`$110-$112`) since the last accepted
    /// report; or an idle machine that moved with no command sent.
    fn check_position(
        &mut self,
        frame: &[u8],
        report: &StatusReport,
        sent: Instant,
        received: Instant,
    ) -> Result<(), DriverError> {
        let damaged = |reason: String| self.link.damaged("?", frame, reason);
        match grbl::position_decimals(frame) {
            None => {}
            Some(Err(reason)) => return Err(damaged(reason.to_string())),
            Some(Ok(decimals)) => self.decimals.observe(decimals).map_err(|expected| {
                damaged(format!(
                    "position printed with {decimals} decimals where this controller prints {expected}"
                ))
            })?,
        }
        let at = axes(xyz(report));
        let tol = self.options.tolerance_mm;
        if let (Some(limits), Position::Machine(_)) = (self.limits, report.position) {
            for (i, name) in ["X", "Y", "Z"].iter().enumerate() {
                let travel = limits.max_travel_mm[i];
                if at[i].abs() > travel + tol {
                    return Err(damaged(format!(
                        "machine {name} {} is beyond the axis travel of {travel} mm",
                        at[i]
                    )));
                }
            }
        }
        let stationary = self.last_idle && report.state == MachineState::Idle && !self.commanded;
        let (scale, limits) = (self.time_scale, self.limits);
        self.continuity
            .observe(at, sent, received, |axis, longest| {
                if stationary {
                    STATIONARY_SLACK_MM
                } else if let Some(l) = limits {
                    l.max_rate_mm_per_min[axis] / 60.0 * longest.as_secs_f64() * scale + tol
                } else {
                    f64::INFINITY
                }
            })
            .map_err(|reason| {
                let why = if stationary {
                    "idle with no command sent"
                } else {
                    "faster than the max rate"
                };
                damaged(format!("{why}: {reason}"))
            })?;
        self.last_idle = report.state == MachineState::Idle;
        self.commanded = false;
        Ok(())
    }

    /// `$$`, read until two listings agree (a damaged listing cannot set the limits): max rates, travel
    /// and the report unit. Options given in the lab take precedence.
    async fn read_limits(&mut self) -> Result<(), DriverError> {
        if self.options.limits.is_some() {
            self.limits = self.options.limits;
            return Ok(());
        }
        let mut previous = None;
        let mut last_reason = String::new();
        for _ in 0..3 {
            let request = encode(&Command::ViewSettings);
            let timeout = self
                .link
                .budget(&request, MAX_REPLY * SETTINGS_FRAMES, LINE_PROCESSING);
            let t = Transaction::new(request, frame_line, settings_list)
                .frames(SETTINGS_FRAMES)
                .timeout(timeout)
                .retries(1);
            let frames = self.link.ask_all(t).await?;
            if let Some(last) = frames.last() {
                match decode(last) {
                    Some(Response::Error(code)) => return Err(self.error(code)),
                    Some(Response::Alarm(code)) => return Err(self.alarm(code)),
                    _ => {}
                }
            }
            match parse_limits(&frames) {
                Ok((_, true)) => {
                    return Err(DriverError::Unsupported {
                        instrument: self.link.id.clone(),
                        what: "report units".into(),
                        found: "inches ($13=1)".into(),
                        supported: "millimetres ($13=0)".into(),
                    });
                }
                Ok((limits, false)) if previous == Some(limits) => {
                    self.limits = Some(limits);
                    return Ok(());
                }
                Ok((limits, false)) => previous = Some(limits),
                Err(reason) => last_reason = reason,
            }
        }
        Err(self.link.damaged(
            "$$",
            b"",
            format!("no two listings agreed {last_reason}").trim_end(),
        ))
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
        self.commanded = true;
        self.link.ask(t).await?;
        // A reset during motion loses the position (GRBL says so with an alarm).
        self.continuity.forget();
        self.last_idle = false;
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
                // Refused because the machine is not idle (held or moving): not a firmware question.
                Some(Response::Error(ErrorCode::NotIdle)) => {
                    return Err(DriverError::Device {
                        instrument: self.link.id.clone(),
                        code: "error:8".into(),
                        message: "Not idle: $I refused while the machine is held or moving".into(),
                    });
                }
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
            let report = match self.status().await {
                Ok(report) => report,
                // Twice damaged: the move goes on; the deadline still bounds it.
                Err(e @ DriverError::DamagedReply { .. }) => {
                    debug!(instrument = %self.link.id, error = %e, "damaged reports during a move");
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(e);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
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
        // A reconnect knows nothing of the machine: not which alarm locked it, not where it stands.
        self.last_alarm = None;
        self.continuity.forget();
        self.last_idle = false;
        self.link.connect().await?;
        let identity = match self.identify().await {
            // After a hard or soft limit GRBL answers nothing but real-time bytes until a soft reset
            // (`[MSG:Reset to continue]`), and a driver that reconnects never saw that alarm. `?` is
            // real-time: in Alarm nothing moves, so the reset moves nothing, and GRBL comes back locked
            // (`[MSG:'$H'|'$X' to unlock]`) until homed.
            Err(timeout @ DriverError::Port(PortError::Timeout { .. })) => {
                let report = self.status_once().await?;
                if report.state != MachineState::Alarm {
                    return Err(timeout);
                }
                warn!(instrument = %self.link.id, "no answer in Alarm: resetting GRBL");
                self.soft_reset().await?;
                self.identify().await?
            }
            // Left held or moving by an earlier connection (a controller killed after a feed hold): `$I` is
            // refused until the machine is idle. Hold it (it is safe), wait for the hold to complete, then
            // reset as `recover` does: the held motion is discarded, the position kept.
            Err(DriverError::Device { code, .. }) if code == "error:8" => {
                warn!(instrument = %self.link.id, "not idle at connect (held or moving): feed hold, then reset");
                self.safe_state().await?;
                self.recover().await?;
                self.identify().await?
            }
            other => other?,
        };
        match self.read_limits().await {
            Err(e @ DriverError::Unsupported { .. }) => return Err(e),
            // `$$` is refused while the machine runs (error:8): keep the limits read before, if any.
            Err(e) => warn!(instrument = %self.link.id, error = %e, "no limits from $$"),
            Ok(()) => {}
        }
        Ok(identity)
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::Home => {
                // After a hard or soft limit GRBL ignores every line until a soft reset, so `$H` alone
                // would never be answered. After a reconnect the driver cannot know which alarm locked
                // the machine, so any alarm state is reset first: in Alarm nothing moves, so the reset
                // moves nothing, and GRBL comes back locked (`[MSG:'$H'|'$X' to unlock]`) for `$H`.
                let state = self.status().await.map(|r| r.state);
                let limit_alarm = self
                    .last_alarm
                    .is_some_and(|a| matches!(a, AlarmCode::HardLimit | AlarmCode::SoftLimit));
                if limit_alarm || matches!(state, Ok(MachineState::Alarm)) {
                    self.soft_reset().await?;
                }
                self.line(&Command::Home, Some(self.options.homing_timeout), false)
                    .await?;
                self.last_alarm = None;
                // Homing sets the machine position: the position jumps on purpose.
                self.continuity.forget();
                self.last_idle = false;
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
        self.commanded = true;
        let request = encode(&Command::Realtime(Realtime::FeedHold));
        let timeout = self.link.budget(&request, 0, LINE_PROCESSING);
        self.link
            .tell(Transaction::no_reply(request, frame_line).timeout(timeout))
            .await
    }

    /// Out of a feed hold: wait for the hold to complete, then a soft reset discards the held motion.
    /// GRBL keeps the position when reset in a completed hold (no alarm); a machine that was reset while
    /// moving comes back in Alarm, and the next `home` clears it (homing is then required before motion).
    async fn recover(&mut self) -> Result<(), DriverError> {
        let deadline = Instant::now() + self.options.move_margin + Duration::from_secs(5);
        loop {
            let report = self.status().await?;
            match report.state {
                MachineState::Hold(HoldState::Complete) | MachineState::Door(DoorState::Closed) => {
                    warn!(instrument = %self.link.id, "recovering from a feed hold: soft reset");
                    return self.soft_reset().await;
                }
                // A person opened the door: nothing resets the machine until it is closed.
                MachineState::Door(_) => {
                    return Err(self
                        .link
                        .unexpected("?", b"Door open: close the safety door to recover"));
                }
                // Still decelerating into the hold: a reset now would lose the position.
                MachineState::Hold(_) | MachineState::Run | MachineState::Jog
                    if Instant::now() < deadline =>
                {
                    sleep(self.options.poll_interval).await;
                }
                MachineState::Hold(_) | MachineState::Run | MachineState::Jog => {
                    return Err(DriverError::NotFinished {
                        instrument: self.link.id.clone(),
                        command: "recover from feed hold".into(),
                        timeout: self.options.move_margin + Duration::from_secs(5),
                    });
                }
                // Idle, Alarm (home clears it), Home, Check, Sleep: nothing to undo here.
                _ => return Ok(()),
            }
        }
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
