//! The gantry's GRBL 1.1h controller (serial 115200 8N1), device side.
//!
//! Lines are framed and checked by the codec's [`codec::check_command`]; what the codec leaves to the
//! simulator (machine state) follows GRBL 1.1h's `protocol.c`, `system.c` and `report.c`:
//! - real-time bytes act as they arrive, even mid-line or while a line is blocked; other bytes above 0x7F
//!   are dropped, as GRBL's serial interrupt does;
//! - a line is answered `ok` or `error:N` once executed. Like GRBL, `$H` answers after the homing cycle,
//!   `G4` after the planner has emptied and the dwell has passed, `M8`/`M9` after the planner has emptied,
//!   and a motion line waits for a free planner block. While a line waits, further input stays in the
//!   128-byte receive buffer; bytes beyond it are lost, as on the real board;
//! - in alarm, `$` commands work and every other non-empty line gets `error:9`;
//! - a move beyond the soft limits raises `ALARM:2` and `[MSG:Reset to continue]`; until a soft reset
//!   (0x18) nothing but real-time commands is processed; the reset then answers the line with `ok`;
//! - a soft reset prints `ALARM:3`/`ALARM:6` when it interrupted motion or homing, `ok` for a line it
//!   interrupted, the welcome banner, and `[MSG:'$H'|'$X' to unlock]` when in alarm;
//! - status reports carry `WCO:` on the first report and then every 10 (idle) or 30 (busy) reports, and
//!   `Ov:` (with `A:F` while the gripper is closed) on the next one and every 10/20, or right after the
//!   gripper changed, following GRBL's refresh counters.
//!
//! Settings (`$N=value`) are checked and stored like GRBL's EEPROM. `$10` (report mask) and `$22` (homing
//! enable) change behaviour; the machine limits and rates come from the physical model and are reported
//! by `$$`, but changing them does not reconfigure the model.
//!
//! Injected faults (`FaultConfig::error_code`): `ALARM:1` (hard limit: motion stops, critical alarm until
//! reset), `ALARM:N` (other alarms: motion stops, alarm until `$X`/`$H`), `error:N` (every non-empty line
//! is answered `error:N` and not executed).

use std::collections::BTreeMap;
use std::time::Duration;

use labctl_codecs::grbl::{
    self as codec, AlarmCode, BufferState, BuildOptions, Command, Coolant, DistanceMode, ErrorCode,
    FeedSpeed, HoldState, MachineState, Motion, Overrides, ParserState, Position, Realtime,
    Rejection, Response, StatusReport, Xyz,
};
use labctl_codecs::{Decoded, MAX_LINE};
use serde::{Deserialize, Serialize};

use super::{Ctx, Device, LineSettings};
use crate::model::{GantryError, GantryState, InstrumentId, LabModel};

/// GRBL's serial receive buffer on an ATmega328p (`[OPT:...,128]`).
pub const RX_BUFFER_SIZE: usize = 128;

const WCO_REFRESH_BUSY: u8 = 30;
const WCO_REFRESH_IDLE: u8 = 10;
const OVR_REFRESH_BUSY: u8 = 20;
const OVR_REFRESH_IDLE: u8 = 10;
/// GRBL's `MAX_STEP_RATE_HZ`.
const MAX_STEP_RATE_HZ: f64 = 30_000.0;

const HELP: &str = "$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x";
const MSG_UNLOCK: &str = "'$H'|'$X' to unlock";
const MSG_UNLOCKED: &str = "Caution: Unlocked";
const MSG_RESET: &str = "Reset to continue";

/// What the controller says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrblConfig {
    /// Firmware version in the banner and `[VER:]`.
    pub version: String,
    /// Build date in `[VER:]`.
    pub build_date: String,
    /// The build info string stored with `$I=` (the integrator's machine name and serial).
    pub build_info: String,
}

impl Default for GrblConfig {
    fn default() -> Self {
        GrblConfig {
            version: "1.1h".into(),
            build_date: "20190825".into(),
            build_info: "LabCNC XYZ-300 SN 2211-0417".into(),
        }
    }
}

/// A line GRBL has taken but not yet answered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wait {
    /// `$H`: `ok` when the homing cycle ends.
    Homing,
    /// Held in `protocol_buffer_synchronize` until the planner is empty.
    Sync(AfterSync),
    /// `G4`: dwelling until this virtual time.
    Dwell(Duration),
    /// A move waiting for a free planner block.
    Planner { target: [f64; 3], feed: Option<f64> },
    /// The line that raised a critical alarm; answered at the reset.
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AfterSync {
    Coolant(bool),
    Dwell(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Modal {
    motion: Motion,
    distance: DistanceMode,
    flood: bool,
    feed: Option<f64>,
}

impl Default for Modal {
    fn default() -> Self {
        Modal {
            motion: Motion::Rapid,
            distance: DistanceMode::Absolute,
            flood: false,
            feed: None,
        }
    }
}

/// The GRBL controller of the gantry.
#[derive(Debug, Clone)]
pub struct Grbl {
    config: GrblConfig,
    instruments: [InstrumentId; 1],
    settings: BTreeMap<u16, f64>,
    planner_blocks: u16,
    rx: Vec<u8>,
    /// The last line ended with a bare CR at the end of the input so far: a following LF belongs to it.
    swallow_lf: bool,
    /// A line longer than any buffer is being thrown away up to its end (then `error:11`).
    discard_line: bool,
    wait: Option<Wait>,
    /// After a critical alarm: nothing but real-time commands until a soft reset.
    critical: bool,
    modal: Modal,
    /// The parser's idea of where the last programmed move ends (GRBL's `gc_state.position`).
    gc_position: [f64; 3],
    /// An injected alarm on top of the model's state, until `$X`/`$H`.
    injected_alarm: Option<u8>,
    last_error_code: Option<String>,
    wco_counter: u8,
    ovr_counter: u8,
}

impl Grbl {
    /// A controller for the model's gantry, with settings that describe the model's machine.
    pub fn new(config: GrblConfig, model: &LabModel) -> Grbl {
        let gantry = model.gantry().config();
        let mut settings = BTreeMap::new();
        for (number, value) in [
            (0u16, 10.0),
            (1, 25.0),
            (2, 0.0),
            (3, 0.0),
            (4, 0.0),
            (5, 0.0),
            (6, 0.0),
            (10, 1.0),
            (11, 0.010),
            (12, 0.002),
            (13, 0.0),
            (20, 1.0),
            (21, 0.0),
            (22, 1.0),
            (23, 0.0),
            (24, gantry.homing_feed_mm_min / 10.0),
            (25, gantry.homing_feed_mm_min),
            (26, 250.0),
            (27, 1.0),
            (30, 1000.0),
            (31, 0.0),
            (32, 0.0),
        ] {
            settings.insert(number, value);
        }
        for axis in 0..3u16 {
            let i = usize::from(axis);
            settings.insert(100 + axis, 250.0);
            settings.insert(110 + axis, gantry.max_feed_mm_min);
            settings.insert(120 + axis, 10.0);
            settings.insert(130 + axis, gantry.max_mm[i] - gantry.min_mm[i]);
        }
        Grbl {
            config,
            instruments: [InstrumentId::Gantry],
            settings,
            planner_blocks: u16::try_from(gantry.planner_blocks).unwrap_or(u16::MAX),
            rx: Vec::new(),
            swallow_lf: false,
            discard_line: false,
            wait: None,
            critical: false,
            modal: Modal::default(),
            gc_position: model.gantry().position(),
            injected_alarm: None,
            last_error_code: None,
            wco_counter: 0,
            ovr_counter: 0,
        }
    }

    fn setting(&self, number: u16) -> f64 {
        self.settings.get(&number).copied().unwrap_or(0.0)
    }

    fn send(ctx: &mut Ctx<'_>, resp: &Response) {
        let mut bytes = Vec::new();
        codec::encode_response(resp, &mut bytes);
        ctx.emit(0, bytes);
    }

    fn ok(ctx: &mut Ctx<'_>) {
        Self::send(ctx, &Response::Ok);
    }

    fn error(ctx: &mut Ctx<'_>, code: ErrorCode) {
        Self::send(ctx, &Response::Error(code));
    }

    fn message(ctx: &mut Ctx<'_>, text: &str) {
        Self::send(ctx, &Response::Message(text.into()));
    }

    fn blocked(&self) -> bool {
        self.wait.is_some() || self.critical
    }

    fn state(ctx: &mut Ctx<'_>) -> GantryState {
        ctx.model.gantry_status(ctx.now).state
    }

    fn in_alarm(&self, ctx: &mut Ctx<'_>) -> bool {
        self.injected_alarm.is_some() || matches!(Self::state(ctx), GantryState::Alarm(_))
    }

    fn banner(&self, ctx: &mut Ctx<'_>) {
        Self::send(
            ctx,
            &Response::Welcome {
                version: self.config.version.clone(),
            },
        );
        if self.in_alarm(ctx) {
            Self::message(ctx, MSG_UNLOCK);
        }
    }

    // ----- input -----

    fn take_byte(&mut self, ctx: &mut Ctx<'_>, b: u8) {
        if let Some(rt) = Realtime::from_byte(b) {
            self.realtime(ctx, rt);
            return;
        }
        if b > 0x7F {
            return;
        }
        if std::mem::take(&mut self.swallow_lf) && b == b'\n' {
            return;
        }
        if self.discard_line {
            if b == b'\n' || b == b'\r' {
                self.discard_line = false;
                self.swallow_lf = b == b'\r';
                Self::error(ctx, ErrorCode::LineOverflow);
            }
            return;
        }
        if self.blocked() && self.rx.len() >= RX_BUFFER_SIZE {
            return;
        }
        self.rx.push(b);
        if !self.blocked() && (b == b'\n' || b == b'\r' || self.rx.len() > MAX_LINE) {
            self.process_lines(ctx);
        }
    }

    fn process_lines(&mut self, ctx: &mut Ctx<'_>) {
        while !self.blocked() && !self.rx.is_empty() {
            match codec::check_command(&self.rx) {
                Ok(Decoded::Incomplete) => break,
                Ok(Decoded::Frame { value, consumed }) => {
                    let line = self.take_line(consumed);
                    self.execute(ctx, &line, Ok(value));
                }
                Err(rejection) => {
                    let terminated = self.rx.iter().any(|&b| b == b'\n' || b == b'\r');
                    if !terminated {
                        // Longer than any line buffer and still going: drop it up to its end.
                        self.rx.clear();
                        self.discard_line = true;
                        break;
                    }
                    let line = self.take_line(rejection.error.skip);
                    self.execute(ctx, &line, Err(rejection));
                }
            }
        }
        if self.blocked() {
            self.rx.truncate(RX_BUFFER_SIZE);
        }
    }

    /// Takes `n` bytes (at least one) off the receive buffer.
    fn take_line(&mut self, n: usize) -> Vec<u8> {
        let n = n.clamp(1, self.rx.len());
        let line: Vec<u8> = self.rx.drain(..n).collect();
        self.swallow_lf = self.rx.is_empty() && line.last() == Some(&b'\r');
        line
    }

    // ----- lines -----

    fn execute(&mut self, ctx: &mut Ctx<'_>, raw: &[u8], parsed: Result<Command, Rejection>) {
        if let Err(rejection) = &parsed
            && rejection.reply == Some(ErrorCode::LineOverflow)
        {
            Self::error(ctx, ErrorCode::LineOverflow);
            return;
        }
        let Some(first) = first_significant(raw) else {
            Self::ok(ctx);
            return;
        };
        if let Some(code) = injected_error(&ctx.faults(InstrumentId::Gantry)) {
            Self::error(ctx, code);
            return;
        }
        if first == b'$' {
            match parsed {
                Ok(cmd) => self.system(ctx, cmd),
                Err(rejection) => Self::refused(ctx, &rejection),
            }
            return;
        }
        if self.in_alarm(ctx) {
            Self::error(ctx, ErrorCode::GcodeLock);
            return;
        }
        match parsed {
            Ok(cmd) => self.gcode(ctx, cmd),
            Err(rejection) => Self::refused(ctx, &rejection),
        }
    }

    fn refused(ctx: &mut Ctx<'_>, rejection: &Rejection) {
        if rejection.outside_subset {
            tracing::warn!(
                "gantry simulator: {} (valid GRBL outside the simulated subset)",
                rejection.error
            );
        }
        if let Some(code) = rejection.reply {
            Self::error(ctx, code);
        }
    }

    fn idle_or_alarm(&self, ctx: &mut Ctx<'_>) -> bool {
        self.injected_alarm.is_some()
            || matches!(Self::state(ctx), GantryState::Idle | GantryState::Alarm(_))
    }

    fn system(&mut self, ctx: &mut Ctx<'_>, cmd: Command) {
        match cmd {
            Command::Help => {
                Self::send(
                    ctx,
                    &Response::Feedback {
                        tag: "HLP".into(),
                        text: HELP.into(),
                    },
                );
                Self::ok(ctx);
            }
            Command::ViewSettings => {
                if matches!(Self::state(ctx), GantryState::Run | GantryState::Hold) {
                    Self::error(ctx, ErrorCode::NotIdle);
                    return;
                }
                for (&number, &value) in &self.settings {
                    Self::send(ctx, &Response::Setting { number, value });
                }
                Self::ok(ctx);
            }
            Command::ViewParserState => {
                Self::send(ctx, &Response::ParserState(self.parser_state()));
                Self::ok(ctx);
            }
            Command::ViewBuildInfo => {
                if !self.idle_or_alarm(ctx) {
                    Self::error(ctx, ErrorCode::NotIdle);
                    return;
                }
                Self::send(
                    ctx,
                    &Response::Version {
                        version: format!("{}.{}", self.config.version, self.config.build_date),
                        build_info: self.config.build_info.clone(),
                    },
                );
                Self::send(
                    ctx,
                    &Response::Options(BuildOptions {
                        codes: "V".into(),
                        planner_blocks: self.planner_blocks,
                        rx_buffer_bytes: RX_BUFFER_SIZE as u16,
                        extra: Vec::new(),
                    }),
                );
                Self::ok(ctx);
            }
            Command::KillAlarmLock => {
                if self.in_alarm(ctx) {
                    self.injected_alarm = None;
                    if matches!(Self::state(ctx), GantryState::Alarm(_)) {
                        // Cannot fail: no critical alarm is pending while lines are processed.
                        let _ = ctx.model.gantry_unlock(ctx.now);
                    }
                    Self::message(ctx, MSG_UNLOCKED);
                }
                Self::ok(ctx);
            }
            Command::Home => {
                if !self.idle_or_alarm(ctx) {
                    Self::error(ctx, ErrorCode::NotIdle);
                    return;
                }
                if self.setting(22) == 0.0 {
                    Self::error(ctx, ErrorCode::SettingDisabled);
                    return;
                }
                match ctx.model.gantry_home(ctx.now) {
                    Ok(()) => self.wait = Some(Wait::Homing),
                    Err(_) => Self::error(ctx, ErrorCode::NotIdle),
                }
            }
            Command::SetSetting { number, value } => {
                if !self.idle_or_alarm(ctx) {
                    Self::error(ctx, ErrorCode::NotIdle);
                    return;
                }
                match self.store_setting(number, value) {
                    Ok(()) => Self::ok(ctx),
                    Err(code) => Self::error(ctx, code),
                }
            }
            // The codec only yields these for lines that do not start with '$'.
            other => self.gcode(ctx, other),
        }
    }

    /// `settings_store_global_setting`: the checks GRBL makes before writing EEPROM.
    fn store_setting(&mut self, number: u16, value: f64) -> Result<(), ErrorCode> {
        let int_value = value.trunc();
        let axis_of = |base: u16| number.checked_sub(base).filter(|a| *a < 3);
        if let Some(axis) = axis_of(100) {
            if value * self.setting(110 + axis) > MAX_STEP_RATE_HZ * 60.0 {
                return Err(ErrorCode::StepRateExceeded);
            }
        } else if let Some(axis) = axis_of(110)
            && value * self.setting(100 + axis) > MAX_STEP_RATE_HZ * 60.0
        {
            return Err(ErrorCode::StepRateExceeded);
        }
        match number {
            20 if int_value != 0.0 && self.setting(22) == 0.0 => {
                return Err(ErrorCode::SoftLimitWithoutHoming);
            }
            22 if int_value == 0.0 => {
                // Disabling homing forces soft limits off, as GRBL does.
                self.settings.insert(20, 0.0);
            }
            _ => {}
        }
        let stored = if is_integer_setting(number) {
            int_value
        } else {
            value
        };
        self.settings.insert(number, stored);
        Ok(())
    }

    fn parser_state(&self) -> ParserState {
        let modes = [
            match self.modal.motion {
                Motion::Rapid => "G0",
                Motion::Linear => "G1",
            },
            "G54",
            "G17",
            "G21",
            match self.modal.distance {
                DistanceMode::Absolute => "G90",
                DistanceMode::Incremental => "G91",
            },
            "G94",
            "M5",
            if self.modal.flood { "M8" } else { "M9" },
        ];
        ParserState {
            modes: modes.iter().map(|m| (*m).to_owned()).collect(),
            tool: Some(0),
            feed_mm_per_min: Some(self.modal.feed.unwrap_or(0.0)),
            spindle_rpm: Some(0.0),
        }
    }

    fn gcode(&mut self, ctx: &mut Ctx<'_>, cmd: Command) {
        match cmd {
            Command::Empty | Command::Millimetres => Self::ok(ctx),
            Command::Distance(mode) => {
                self.modal.distance = mode;
                Self::ok(ctx);
            }
            Command::Move {
                motion,
                x_mm,
                y_mm,
                z_mm,
                feed_mm_per_min,
            } => {
                let feed = feed_mm_per_min.or(self.modal.feed);
                if motion == Motion::Linear && feed.is_none_or(|f| f <= 0.0) {
                    Self::error(ctx, ErrorCode::UndefinedFeedRate);
                    return;
                }
                self.modal.motion = motion;
                if feed_mm_per_min.is_some() {
                    self.modal.feed = feed_mm_per_min;
                }
                let words = [x_mm, y_mm, z_mm];
                if words.iter().all(Option::is_none) {
                    Self::ok(ctx);
                    return;
                }
                let target: [f64; 3] =
                    std::array::from_fn(|i| match (words[i], self.modal.distance) {
                        (None, _) => self.gc_position[i],
                        (Some(v), DistanceMode::Absolute) => v,
                        (Some(v), DistanceMode::Incremental) => self.gc_position[i] + v,
                    });
                let feed = match motion {
                    Motion::Rapid => None,
                    Motion::Linear => feed,
                };
                self.try_move(ctx, target, feed);
            }
            Command::Dwell { seconds } => self.wait = Some(Wait::Sync(AfterSync::Dwell(seconds))),
            Command::Coolant(coolant) => {
                let flood = coolant == Coolant::Flood;
                if flood == self.modal.flood {
                    Self::ok(ctx);
                } else {
                    self.wait = Some(Wait::Sync(AfterSync::Coolant(flood)));
                }
            }
            // '$' commands are dispatched before G-code; the codec never gives them for other lines.
            Command::Realtime(_)
            | Command::Help
            | Command::ViewSettings
            | Command::ViewParserState
            | Command::ViewBuildInfo
            | Command::KillAlarmLock
            | Command::Home
            | Command::SetSetting { .. } => Self::error(ctx, ErrorCode::InvalidStatement),
        }
    }

    /// Queues a move in the model; the line is answered now, later (planner full) or at the reset (soft
    /// limit).
    fn try_move(&mut self, ctx: &mut Ctx<'_>, target: [f64; 3], feed: Option<f64>) {
        match ctx.model.gantry_move(ctx.now, target, feed) {
            Ok(()) => {
                self.gc_position = target;
                self.wait = None;
                Self::ok(ctx);
            }
            Err(GantryError::BufferFull) => self.wait = Some(Wait::Planner { target, feed }),
            Err(GantryError::SoftLimit(_)) => {
                Self::send(ctx, &Response::Alarm(AlarmCode::SoftLimit));
                Self::message(ctx, MSG_RESET);
                self.critical = true;
                self.wait = Some(Wait::Critical);
                self.modal.flood = false;
            }
            Err(GantryError::InvalidTarget) => {
                self.wait = None;
                Self::error(ctx, ErrorCode::BadNumberFormat);
            }
            Err(GantryError::InvalidFeed(_)) => {
                self.wait = None;
                Self::error(ctx, ErrorCode::UndefinedFeedRate);
            }
            Err(GantryError::NotIdle | GantryError::Homing) => {
                self.wait = None;
                Self::error(ctx, ErrorCode::NotIdle);
            }
            Err(GantryError::Locked(_) | GantryError::ResetRequired) => {
                self.wait = None;
                Self::error(ctx, ErrorCode::GcodeLock);
            }
        }
    }

    /// Moves a waiting line on as far as the machine allows, then reads further lines.
    fn advance_wait(&mut self, ctx: &mut Ctx<'_>) {
        for _ in 0..4 {
            let Some(wait) = self.wait else {
                break;
            };
            match wait {
                Wait::Critical => return,
                Wait::Homing => {
                    if Self::state(ctx) == GantryState::Home {
                        return;
                    }
                    self.gc_position = ctx.model.gantry().position();
                    self.injected_alarm = None;
                    self.wait = None;
                    Self::ok(ctx);
                }
                Wait::Sync(after) => {
                    if Self::state(ctx) != GantryState::Idle {
                        return;
                    }
                    match after {
                        AfterSync::Coolant(flood) => {
                            self.wait = None;
                            match ctx.model.gantry_grip(ctx.now, flood) {
                                Ok(()) => {
                                    self.modal.flood = flood;
                                    self.ovr_counter = 0;
                                    Self::ok(ctx);
                                }
                                Err(_) => Self::error(ctx, ErrorCode::GcodeLock),
                            }
                        }
                        AfterSync::Dwell(seconds) => {
                            let span =
                                Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX);
                            self.wait = Some(Wait::Dwell(ctx.now.saturating_add(span)));
                        }
                    }
                }
                Wait::Dwell(until) => {
                    if ctx.now < until {
                        return;
                    }
                    self.wait = None;
                    Self::ok(ctx);
                }
                Wait::Planner { target, feed } => {
                    if ctx.model.gantry_status(ctx.now).planner_free == 0 {
                        return;
                    }
                    self.try_move(ctx, target, feed);
                }
            }
        }
        if !self.blocked() {
            self.process_lines(ctx);
        }
    }

    // ----- real-time commands -----

    fn realtime(&mut self, ctx: &mut Ctx<'_>, rt: Realtime) {
        match rt {
            Realtime::StatusReport => {
                let report = self.status_report(ctx);
                Self::send(ctx, &Response::Status(report));
            }
            Realtime::FeedHold if !self.in_alarm(ctx) => ctx.model.gantry_feed_hold(ctx.now),
            Realtime::CycleStart => {
                ctx.model.gantry_resume(ctx.now);
                self.advance_wait(ctx);
            }
            Realtime::SoftReset => self.soft_reset(ctx),
            Realtime::FloodToggle
                if Self::state(ctx) == GantryState::Idle && !self.in_alarm(ctx) =>
            {
                let flood = !self.modal.flood;
                if ctx.model.gantry_grip(ctx.now, flood).is_ok() {
                    self.modal.flood = flood;
                    self.ovr_counter = 0;
                }
            }
            // Overrides, safety door, jog cancel, spindle and mist are not part of this machine.
            _ => {}
        }
    }

    fn soft_reset(&mut self, ctx: &mut Ctx<'_>) {
        let before = Self::state(ctx);
        ctx.model.gantry_reset(ctx.now);
        let after = Self::state(ctx);
        if let GantryState::Alarm(alarm) = after
            && !matches!(before, GantryState::Alarm(_))
            && let Some(code) = alarm.code()
        {
            Self::send(ctx, &Response::Alarm(AlarmCode::from_code(code)));
        }
        if self.wait.is_some() {
            // The interrupted line returns to GRBL's main loop, which answers it before re-initialising.
            Self::ok(ctx);
        }
        self.wait = None;
        self.critical = false;
        self.rx.clear();
        self.swallow_lf = false;
        self.discard_line = false;
        self.modal = Modal::default();
        self.gc_position = ctx.model.gantry().position();
        self.wco_counter = 0;
        self.ovr_counter = 0;
        self.banner(ctx);
    }

    fn status_report(&mut self, ctx: &mut Ctx<'_>) -> StatusReport {
        let status = ctx.model.gantry_status(ctx.now);
        let state = match (self.injected_alarm, status.state) {
            (Some(_), _) | (_, GantryState::Alarm(_)) => MachineState::Alarm,
            (None, GantryState::Idle) => MachineState::Idle,
            (None, GantryState::Run) => MachineState::Run,
            (None, GantryState::Hold) => MachineState::Hold(HoldState::Complete),
            (None, GantryState::Home) => MachineState::Home,
        };
        let busy = matches!(
            state,
            MachineState::Run | MachineState::Hold(_) | MachineState::Home
        );
        let [x_mm, y_mm, z_mm] = status.position;
        let xyz = Xyz { x_mm, y_mm, z_mm };
        let mask = self.setting(10) as u32;
        let position = if mask & 1 == 1 {
            Position::Machine(xyz)
        } else {
            Position::Work(xyz)
        };
        let buffer = (mask & 2 == 2).then(|| BufferState {
            planner_blocks_free: u16::try_from(status.planner_free).unwrap_or(u16::MAX),
            rx_bytes_free: (RX_BUFFER_SIZE - self.rx.len().min(RX_BUFFER_SIZE)) as u16,
        });
        let mut report = StatusReport {
            state,
            position,
            buffer,
            line_number: None,
            feed: Some(FeedSpeed {
                feed_mm_per_min: status.feed_mm_min.round(),
                spindle_rpm: Some(0.0),
            }),
            pins: None,
            work_offset: None,
            overrides: None,
            accessories: None,
            unknown: Vec::new(),
        };
        if self.wco_counter > 0 {
            self.wco_counter -= 1;
        } else {
            self.wco_counter = if busy {
                WCO_REFRESH_BUSY
            } else {
                WCO_REFRESH_IDLE
            } - 1;
            if self.ovr_counter == 0 {
                self.ovr_counter = 1;
            }
            report.work_offset = Some(Xyz::default());
        }
        if self.ovr_counter > 0 {
            self.ovr_counter -= 1;
        } else {
            self.ovr_counter = if busy {
                OVR_REFRESH_BUSY
            } else {
                OVR_REFRESH_IDLE
            } - 1;
            report.overrides = Some(Overrides {
                feed_percent: 100,
                rapid_percent: 100,
                spindle_percent: 100,
            });
            if status.gripper_closed {
                report.accessories = Some(codec::Accessories {
                    flood: true,
                    ..Default::default()
                });
            }
        }
        report
    }

    // ----- injected faults -----

    fn check_injected(&mut self, ctx: &mut Ctx<'_>) {
        let code = ctx.faults(InstrumentId::Gantry).error_code;
        if code == self.last_error_code {
            return;
        }
        self.last_error_code = code.clone();
        let Some(alarm) = code
            .as_deref()
            .and_then(|c| c.trim().strip_prefix("ALARM:"))
            .and_then(|n| n.parse::<u8>().ok())
        else {
            return;
        };
        // Like GRBL's mc_reset: motion stops at once, the gripper opens.
        let before = Self::state(ctx);
        if matches!(
            before,
            GantryState::Run | GantryState::Home | GantryState::Hold
        ) {
            ctx.model.gantry_reset(ctx.now);
        }
        self.modal.flood = false;
        self.injected_alarm = Some(alarm);
        Self::send(ctx, &Response::Alarm(AlarmCode::from_code(alarm)));
        if alarm == AlarmCode::HardLimit.code() {
            // Critical: everything waits for a soft reset, which answers a waiting line.
            Self::message(ctx, MSG_RESET);
            self.critical = true;
            if self.wait.is_some() {
                self.wait = Some(Wait::Critical);
            }
        } else if self.wait.take().is_some() {
            // The aborted line returns to the main loop, which reports it.
            Self::ok(ctx);
        }
    }
}

/// Setting numbers GRBL stores as integers (printed without decimals).
fn is_integer_setting(number: u16) -> bool {
    matches!(number, 0..=10 | 13 | 20..=23 | 26 | 30..=32)
}

/// The injected `error:N` reply, if the fault settings ask for one.
fn injected_error(faults: &crate::model::FaultConfig) -> Option<ErrorCode> {
    faults
        .error_code
        .as_deref()
        .and_then(|c| c.trim().strip_prefix("error:"))
        .and_then(|n| n.parse::<u8>().ok())
        .map(ErrorCode::from_code)
}

/// The first character GRBL's line buffer would hold: whitespace, control characters, block delete and
/// comments are dropped first. `None` for a line that is empty to GRBL.
fn first_significant(raw: &[u8]) -> Option<u8> {
    let mut paren = false;
    for &c in raw {
        if paren {
            paren = c != b')';
            continue;
        }
        match c {
            0..=b' ' | b'/' | 0x7F.. => {}
            b'(' => paren = true,
            b';' => return None,
            _ => return Some(c.to_ascii_uppercase()),
        }
    }
    None
}

impl Device for Grbl {
    fn protocol(&self) -> &'static str {
        "grbl"
    }

    fn instruments(&self) -> &[InstrumentId] {
        &self.instruments
    }

    fn line(&self) -> Option<LineSettings> {
        Some(LineSettings::n81(115_200))
    }

    fn power_on(&mut self, ctx: &mut Ctx<'_>) {
        self.rx.clear();
        self.wait = None;
        self.critical = false;
        self.wco_counter = 0;
        self.ovr_counter = 0;
        self.banner(ctx);
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, bytes: &[u8]) {
        self.check_injected(ctx);
        for &b in bytes {
            self.take_byte(ctx, b);
        }
        self.advance_wait(ctx);
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>) {
        self.check_injected(ctx);
        self.advance_wait(ctx);
    }

    fn next_wakeup(&mut self, model: &mut LabModel, now: Duration) -> Option<Duration> {
        let gantry = model.gantry();
        let ready = match self.wait? {
            Wait::Critical => return None,
            Wait::Dwell(until) => return Some(until),
            Wait::Homing => gantry.state() != GantryState::Home,
            Wait::Sync(_) => gantry.state() == GantryState::Idle,
            Wait::Planner { .. } => gantry.planner_free() > 0,
        };
        if ready {
            return Some(now);
        }
        // The machine changes state when its current move (or homing cycle) ends; held: only `~` helps.
        gantry
            .next_event_in()
            .map(|d| model.now().saturating_add(d).max(now))
    }
}
