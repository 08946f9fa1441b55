//! XYZ gantry as a GRBL 1.1 machine: homing, soft limits, a planner queue of linear moves, feed hold,
//! soft reset and a gripper on the coolant outputs (M8 closes, M9 opens).
//!
//! Moves run at constant speed (no acceleration): travel time = distance / feed. Feed hold stops the head
//! where it is; soft reset while moving loses position (ALARM:3); a target outside the soft limits raises
//! ALARM:2, a critical alarm that needs a soft reset and then `$H` or `$X`. Like GRBL's `mc_reset`, any
//! reset or alarm switches the coolant outputs off, so the gripper opens.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::faults::FaultConfig;
use super::{ConfigError, check_finite, check_positive, secs_to_duration};

/// Machine position in millimetres, `[x, y, z]`.
pub type Position = [f64; 3];

const LIMIT_EPS_MM: f64 = 1e-9;

/// Gantry machine settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GantryConfig {
    /// Lower soft limit per axis (mm).
    pub min_mm: Position,
    /// Upper soft limit per axis (mm).
    pub max_mm: Position,
    /// Maximum feed rate; rapid (G0) moves run at it (mm/min).
    pub max_feed_mm_min: f64,
    /// Feed rate of the homing cycle (mm/min).
    pub homing_feed_mm_min: f64,
    /// Extra time of the homing cycle for switch pull-off (s).
    pub homing_pulloff_s: f64,
    /// Machine position after homing; also the power-on position (mm).
    pub home_mm: Position,
    /// Planner buffer size in blocks (GRBL reports the free count as `Bf:`).
    pub planner_blocks: usize,
    /// Fault injection for the GRBL front end.
    pub faults: FaultConfig,
}

impl Default for GantryConfig {
    fn default() -> Self {
        Self {
            min_mm: [0.0, 0.0, 0.0],
            max_mm: [300.0, 200.0, 50.0],
            max_feed_mm_min: 5000.0,
            homing_feed_mm_min: 2000.0,
            homing_pulloff_s: 0.5,
            home_mm: [0.0, 0.0, 50.0],
            planner_blocks: 15,
            faults: FaultConfig::default(),
        }
    }
}

impl GantryConfig {
    /// Checks limits, feeds and home position.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for axis in 0..3 {
            check_finite("gantry.min_mm", self.min_mm[axis])?;
            check_finite("gantry.max_mm", self.max_mm[axis])?;
            check_finite("gantry.home_mm", self.home_mm[axis])?;
            if self.min_mm[axis] >= self.max_mm[axis] {
                return Err(ConfigError::invalid("gantry.max_mm", "must exceed min_mm"));
            }
            if !(self.min_mm[axis]..=self.max_mm[axis]).contains(&self.home_mm[axis]) {
                return Err(ConfigError::invalid(
                    "gantry.home_mm",
                    "outside the soft limits",
                ));
            }
        }
        check_positive("gantry.max_feed_mm_min", self.max_feed_mm_min)?;
        check_positive("gantry.homing_feed_mm_min", self.homing_feed_mm_min)?;
        if !(self.homing_pulloff_s.is_finite() && self.homing_pulloff_s >= 0.0) {
            return Err(ConfigError::invalid(
                "gantry.homing_pulloff_s",
                "must be >= 0",
            ));
        }
        if self.planner_blocks == 0 {
            return Err(ConfigError::invalid(
                "gantry.planner_blocks",
                "must be >= 1",
            ));
        }
        self.faults.validate("gantry.faults")
    }
}

/// Why the gantry is in alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GantryAlarm {
    /// Power-on lock with homing enabled (no ALARM number; GRBL asks for `$H` or `$X`).
    HomingRequired,
    /// ALARM:2, a motion target exceeded the soft limits.
    SoftLimit,
    /// ALARM:3, reset while in motion; position lost.
    ResetWhileMoving,
    /// ALARM:6, the homing cycle was reset.
    HomingReset,
}

impl GantryAlarm {
    /// The GRBL `ALARM:N` number, if any.
    pub fn code(self) -> Option<u8> {
        match self {
            GantryAlarm::HomingRequired => None,
            GantryAlarm::SoftLimit => Some(2),
            GantryAlarm::ResetWhileMoving => Some(3),
            GantryAlarm::HomingReset => Some(6),
        }
    }
}

/// GRBL machine state as reported in `<...>` status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GantryState {
    /// Idle, ready for commands.
    Idle,
    /// Executing motion.
    Run,
    /// Feed hold: stopped where it was; `~` resumes.
    Hold,
    /// Homing cycle in progress.
    Home,
    /// Alarm lock.
    Alarm(GantryAlarm),
}

impl GantryState {
    /// The GRBL status report word ("Idle", "Run", "Hold:0", "Home", "Alarm").
    pub fn grbl_name(self) -> &'static str {
        match self {
            GantryState::Idle => "Idle",
            GantryState::Run => "Run",
            GantryState::Hold => "Hold:0",
            GantryState::Home => "Home",
            GantryState::Alarm(_) => "Alarm",
        }
    }
}

/// A gantry command that was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum GantryError {
    /// G-code locked out during alarm (GRBL error:9); home or unlock first.
    #[error("locked in alarm ({0:?}): home ($H) or unlock ($X) first")]
    Locked(GantryAlarm),
    /// A critical alarm (ALARM:2) needs a soft reset before `$H`/`$X`.
    #[error("critical alarm: soft reset required")]
    ResetRequired,
    /// The command needs the machine idle (GRBL error:8).
    #[error("command needs the machine idle")]
    NotIdle,
    /// Refused while the homing cycle runs.
    #[error("homing cycle in progress")]
    Homing,
    /// The target exceeds the soft limits; ALARM:2 was raised.
    #[error("target {0:?} outside the soft limits (ALARM:2)")]
    SoftLimit(Position),
    /// Feed rate not positive and finite (mm/min).
    #[error("invalid feed rate {0} mm/min")]
    InvalidFeed(f64),
    /// Target coordinates not finite.
    #[error("target is not a finite position")]
    InvalidTarget,
    /// The planner buffer is full; retry when a block completes.
    #[error("planner buffer full")]
    BufferFull,
}

/// Something the gantry did that the rest of the model must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GantryEvent {
    /// The gripper closed (M8) or opened (M9, reset, alarm) at the current position.
    Gripper {
        /// True when it closed.
        closed: bool,
    },
}

/// Snapshot of the gantry for status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct GantryStatus {
    /// Machine state.
    pub state: GantryState,
    /// Machine position (mm).
    pub position: Position,
    /// Current feed rate, 0 when not moving (mm/min).
    pub feed_mm_min: f64,
    /// Gripper closed (coolant flood on).
    pub gripper_closed: bool,
    /// Id of the vial in the gripper.
    pub held_vial: Option<String>,
    /// Free planner blocks.
    pub planner_free: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Block {
    Move { target: Position, feed_mm_min: f64 },
    Gripper(bool),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    from: Position,
    to: Position,
    feed_mm_min: f64,
    duration: Duration,
    done: Duration,
}

fn distance(a: Position, b: Position) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

impl Segment {
    fn linear(from: Position, to: Position, feed_mm_min: f64) -> Self {
        let duration = secs_to_duration(distance(from, to) / feed_mm_min * 60.0);
        Self::timed(from, to, feed_mm_min, duration)
    }

    fn timed(from: Position, to: Position, feed_mm_min: f64, duration: Duration) -> Self {
        Self {
            from,
            to,
            feed_mm_min,
            duration,
            done: Duration::ZERO,
        }
    }

    fn remaining(&self) -> Duration {
        self.duration.saturating_sub(self.done)
    }

    fn position(&self) -> Position {
        if self.done >= self.duration {
            return self.to;
        }
        let f = self.done.as_secs_f64() / self.duration.as_secs_f64();
        std::array::from_fn(|i| self.from[i] + (self.to[i] - self.from[i]) * f)
    }
}

/// The gantry: state machine, position, planner queue and gripper.
#[derive(Debug, Clone)]
pub struct Gantry {
    config: GantryConfig,
    state: GantryState,
    position: Position,
    segment: Option<Segment>,
    queue: VecDeque<Block>,
    gripper_closed: bool,
    reset_required: bool,
    events: Vec<GantryEvent>,
}

impl Gantry {
    /// A gantry at its home position, in the power-on alarm (homing required).
    pub fn new(config: GantryConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            position: config.home_mm,
            config,
            state: GantryState::Alarm(GantryAlarm::HomingRequired),
            segment: None,
            queue: VecDeque::new(),
            gripper_closed: false,
            reset_required: false,
            events: Vec::new(),
        })
    }

    /// The machine settings.
    pub fn config(&self) -> &GantryConfig {
        &self.config
    }

    /// Machine state.
    pub fn state(&self) -> GantryState {
        self.state
    }

    /// Current machine position (mm).
    pub fn position(&self) -> Position {
        self.position
    }

    /// Current feed rate, 0 when not moving (mm/min).
    pub fn feed_mm_min(&self) -> f64 {
        match (self.state, &self.segment) {
            (GantryState::Run | GantryState::Home, Some(s)) => s.feed_mm_min,
            _ => 0.0,
        }
    }

    /// Current head speed (mm/s).
    pub fn speed_mm_s(&self) -> f64 {
        self.feed_mm_min() / 60.0
    }

    /// True while the head is moving (running a move or homing).
    pub fn is_moving(&self) -> bool {
        matches!(self.state, GantryState::Run | GantryState::Home) && self.segment.is_some()
    }

    /// Gripper closed (M8).
    pub fn gripper_closed(&self) -> bool {
        self.gripper_closed
    }

    /// Free planner blocks.
    pub fn planner_free(&self) -> usize {
        self.config.planner_blocks.saturating_sub(self.queue.len())
    }

    /// True after a critical alarm until a soft reset.
    pub fn reset_required(&self) -> bool {
        self.reset_required
    }

    /// The current alarm, if in alarm.
    pub fn alarm(&self) -> Option<GantryAlarm> {
        match self.state {
            GantryState::Alarm(a) => Some(a),
            _ => None,
        }
    }

    /// True when a position lies within the soft limits.
    pub fn within_limits(&self, p: Position) -> bool {
        (0..3).all(|i| {
            p[i] >= self.config.min_mm[i] - LIMIT_EPS_MM
                && p[i] <= self.config.max_mm[i] + LIMIT_EPS_MM
        })
    }

    fn accepts_gcode(&self) -> Result<(), GantryError> {
        match self.state {
            GantryState::Alarm(_) if self.reset_required => Err(GantryError::ResetRequired),
            GantryState::Alarm(a) => Err(GantryError::Locked(a)),
            GantryState::Home => Err(GantryError::Homing),
            _ => Ok(()),
        }
    }

    /// `$H`: starts the homing cycle (z up, then x/y) from idle or alarm.
    pub fn home(&mut self) -> Result<(), GantryError> {
        if self.reset_required {
            return Err(GantryError::ResetRequired);
        }
        match self.state {
            GantryState::Idle | GantryState::Alarm(_) => {}
            GantryState::Home => return Err(GantryError::Homing),
            GantryState::Run | GantryState::Hold => return Err(GantryError::NotIdle),
        }
        self.queue.clear();
        let home = self.config.home_mm;
        let d = |i: usize| (self.position[i] - home[i]).abs();
        let travel = d(2) + d(0).max(d(1));
        let secs = travel / self.config.homing_feed_mm_min * 60.0 + self.config.homing_pulloff_s;
        self.segment = Some(Segment::timed(
            self.position,
            home,
            self.config.homing_feed_mm_min,
            secs_to_duration(secs),
        ));
        self.state = GantryState::Home;
        Ok(())
    }

    /// `$X`: clears the alarm lock without homing.
    pub fn unlock(&mut self) -> Result<(), GantryError> {
        if self.reset_required {
            return Err(GantryError::ResetRequired);
        }
        match self.state {
            GantryState::Alarm(_) | GantryState::Idle => {
                self.state = GantryState::Idle;
                Ok(())
            }
            GantryState::Home => Err(GantryError::Homing),
            GantryState::Run | GantryState::Hold => Err(GantryError::NotIdle),
        }
    }

    /// G0 (`feed` None, at max feed) or G1 (feed in mm/min, clamped to max) to an absolute machine target.
    pub fn move_to(
        &mut self,
        target: Position,
        feed_mm_min: Option<f64>,
    ) -> Result<(), GantryError> {
        self.accepts_gcode()?;
        if !target.iter().all(|v| v.is_finite()) {
            return Err(GantryError::InvalidTarget);
        }
        let max = self.config.max_feed_mm_min;
        let feed = match feed_mm_min {
            None => max,
            Some(f) if f.is_finite() && f > 0.0 => f.min(max),
            Some(f) => return Err(GantryError::InvalidFeed(f)),
        };
        if !self.within_limits(target) {
            self.raise_soft_limit();
            return Err(GantryError::SoftLimit(target));
        }
        self.enqueue(Block::Move {
            target,
            feed_mm_min: feed,
        })
    }

    /// M8 (close) or M9 (open), executed in order after the queued moves.
    pub fn set_gripper(&mut self, closed: bool) -> Result<(), GantryError> {
        self.accepts_gcode()?;
        self.enqueue(Block::Gripper(closed))
    }

    fn enqueue(&mut self, block: Block) -> Result<(), GantryError> {
        if self.queue.len() >= self.config.planner_blocks {
            return Err(GantryError::BufferFull);
        }
        self.queue.push_back(block);
        if self.state == GantryState::Idle {
            self.start_next();
        }
        Ok(())
    }

    /// `!` feed hold: stops where it is (Run or Idle become Hold).
    pub fn feed_hold(&mut self) {
        if matches!(self.state, GantryState::Run | GantryState::Idle) {
            self.state = GantryState::Hold;
        }
    }

    /// `~` cycle start: resumes from Hold.
    pub fn resume(&mut self) {
        if self.state == GantryState::Hold {
            if self.segment.is_some() {
                self.state = GantryState::Run;
            } else {
                self.state = GantryState::Idle;
                self.start_next();
            }
        }
    }

    /// Ctrl-X soft reset: flushes the queue, opens the gripper; in motion it loses position (ALARM:3).
    pub fn soft_reset(&mut self) {
        let was = self.state;
        self.segment = None;
        self.queue.clear();
        self.open_gripper_now();
        self.reset_required = false;
        self.state = match was {
            GantryState::Run => GantryState::Alarm(GantryAlarm::ResetWhileMoving),
            GantryState::Home => GantryState::Alarm(GantryAlarm::HomingReset),
            GantryState::Alarm(a) => GantryState::Alarm(a),
            GantryState::Idle | GantryState::Hold => GantryState::Idle,
        };
    }

    fn raise_soft_limit(&mut self) {
        self.segment = None;
        self.queue.clear();
        self.open_gripper_now();
        self.state = GantryState::Alarm(GantryAlarm::SoftLimit);
        self.reset_required = true;
    }

    fn open_gripper_now(&mut self) {
        if self.gripper_closed {
            self.gripper_closed = false;
            self.events.push(GantryEvent::Gripper { closed: false });
        }
    }

    /// Executes queued blocks: gripper blocks at once, the next move starts a segment.
    fn start_next(&mut self) {
        while let Some(block) = self.queue.pop_front() {
            match block {
                Block::Gripper(closed) => {
                    if self.gripper_closed != closed {
                        self.gripper_closed = closed;
                        self.events.push(GantryEvent::Gripper { closed });
                    }
                }
                Block::Move {
                    target,
                    feed_mm_min,
                } => {
                    let seg = Segment::linear(self.position, target, feed_mm_min);
                    if seg.duration.is_zero() {
                        self.position = target;
                        continue;
                    }
                    self.segment = Some(seg);
                    self.state = GantryState::Run;
                    return;
                }
            }
        }
        self.state = GantryState::Idle;
    }

    /// Time until the current move or homing cycle ends.
    pub fn next_event_in(&self) -> Option<Duration> {
        match self.state {
            GantryState::Run | GantryState::Home => self.segment.map(|s| s.remaining()),
            _ => None,
        }
    }

    /// Advances motion by `dt` of virtual time.
    pub fn advance(&mut self, dt: Duration) {
        let mut left = dt;
        while matches!(self.state, GantryState::Run | GantryState::Home) {
            let Some(seg) = self.segment.as_mut() else {
                self.state = GantryState::Idle;
                break;
            };
            let step = left.min(seg.remaining());
            seg.done += step;
            left -= step;
            self.position = seg.position();
            if !seg.remaining().is_zero() {
                break;
            }
            self.segment = None;
            if self.state == GantryState::Home {
                self.position = self.config.home_mm;
                self.state = GantryState::Idle;
            } else {
                self.start_next();
            }
            if left.is_zero() {
                break;
            }
        }
    }

    /// Takes the events produced since the last call.
    pub fn take_events(&mut self) -> Vec<GantryEvent> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{LabConfig, LabModel};
    use super::*;
    use labctl_clock::{Clock, ManualClock};

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn homed() -> (LabModel, ManualClock) {
        let clock = ManualClock::new();
        let mut lab = LabModel::new(LabConfig::sim_default(), 7).unwrap();
        assert_eq!(
            lab.gantry_status(clock.now()).state,
            GantryState::Alarm(GantryAlarm::HomingRequired)
        );
        lab.gantry_home(clock.now()).unwrap();
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Home);
        clock.advance(secs(0.5));
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Idle);
        assert_eq!(st.position, [0.0, 0.0, 50.0]);
        (lab, clock)
    }

    fn assert_pos(actual: Position, expected: Position) {
        for i in 0..3 {
            assert!(
                (actual[i] - expected[i]).abs() < 1e-6,
                "{actual:?} != {expected:?}"
            );
        }
    }

    #[test]
    fn travel_time_is_distance_over_feed() {
        let (mut lab, clock) = homed();
        let t0 = clock.now();
        lab.gantry_move(t0, [100.0, 0.0, 50.0], Some(1000.0))
            .unwrap();
        clock.advance(secs(3.0));
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Run);
        assert_eq!(st.feed_mm_min, 1000.0);
        assert_pos(st.position, [50.0, 0.0, 50.0]);
        clock.set(t0 + secs(5.999));
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Run);
        clock.set(t0 + secs(6.0));
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Idle);
        assert_eq!(st.feed_mm_min, 0.0);
        assert_pos(st.position, [100.0, 0.0, 50.0]);
    }

    #[test]
    fn rapid_runs_at_max_feed_and_feeds_are_clamped() {
        let (mut lab, clock) = homed();
        let t0 = clock.now();
        // 300 mm at 5000 mm/min = 3.6 s.
        lab.gantry_move(t0, [300.0, 0.0, 50.0], None).unwrap();
        assert_eq!(lab.gantry_status(t0).feed_mm_min, 5000.0);
        clock.set(t0 + secs(3.59));
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Run);
        clock.set(t0 + secs(3.6));
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Idle);
        let t1 = clock.now();
        lab.gantry_move(t1, [0.0, 0.0, 50.0], Some(1.0e6)).unwrap();
        assert_eq!(lab.gantry_status(t1).feed_mm_min, 5000.0);
        assert_eq!(
            lab.gantry_move(t1, [0.0, 0.0, 50.0], Some(0.0)),
            Err(GantryError::InvalidFeed(0.0))
        );
    }

    #[test]
    fn queued_moves_run_in_sequence() {
        let (mut lab, clock) = homed();
        let t0 = clock.now();
        lab.gantry_move(t0, [60.0, 0.0, 50.0], Some(600.0)).unwrap(); // 6 s
        lab.gantry_move(t0, [60.0, 80.0, 50.0], Some(1200.0))
            .unwrap(); // 4 s
        assert_eq!(lab.gantry_status(t0).planner_free, 14);
        clock.set(t0 + secs(8.0));
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Run);
        assert_pos(st.position, [60.0, 40.0, 50.0]);
        clock.set(t0 + secs(10.0));
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Idle);
        assert_pos(st.position, [60.0, 80.0, 50.0]);
    }

    #[test]
    fn starts_locked_and_unlock_clears_the_alarm() {
        let clock = ManualClock::new();
        let mut lab = LabModel::new(LabConfig::sim_default(), 1).unwrap();
        assert_eq!(
            lab.gantry_move(clock.now(), [10.0, 10.0, 50.0], None),
            Err(GantryError::Locked(GantryAlarm::HomingRequired))
        );
        assert_eq!(GantryAlarm::HomingRequired.code(), None);
        lab.gantry_unlock(clock.now()).unwrap();
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Idle);
        lab.gantry_move(clock.now(), [10.0, 10.0, 50.0], None)
            .unwrap();
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Run);
        assert_eq!(lab.gantry_home(clock.now()), Err(GantryError::NotIdle));
    }

    #[test]
    fn soft_limit_raises_alarm_2_and_needs_reset_then_homing() {
        let (mut lab, clock) = homed();
        let t = clock.now();
        let err = lab.gantry_move(t, [301.0, 0.0, 50.0], None).unwrap_err();
        assert_eq!(err, GantryError::SoftLimit([301.0, 0.0, 50.0]));
        let st = lab.gantry_status(t);
        assert_eq!(st.state, GantryState::Alarm(GantryAlarm::SoftLimit));
        assert_eq!(GantryAlarm::SoftLimit.code(), Some(2));
        assert_pos(st.position, [0.0, 0.0, 50.0]);
        assert_eq!(
            lab.gantry_move(t, [1.0, 0.0, 50.0], None),
            Err(GantryError::ResetRequired)
        );
        assert_eq!(lab.gantry_home(t), Err(GantryError::ResetRequired));
        lab.gantry_reset(t);
        assert_eq!(
            lab.gantry_status(t).state,
            GantryState::Alarm(GantryAlarm::SoftLimit)
        );
        assert_eq!(
            lab.gantry_move(t, [1.0, 0.0, 50.0], None),
            Err(GantryError::Locked(GantryAlarm::SoftLimit))
        );
        lab.gantry_home(t).unwrap();
        clock.advance(secs(1.0));
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Idle);
        for bad in [[0.0, -0.1, 0.0], [0.0, 0.0, 50.5], [0.0, 200.1, 10.0]] {
            lab.gantry_reset(clock.now());
            lab.gantry_unlock(clock.now()).ok();
            assert_eq!(
                lab.gantry_move(clock.now(), bad, None),
                Err(GantryError::SoftLimit(bad))
            );
            assert_eq!(
                lab.gantry_status(clock.now()).state,
                GantryState::Alarm(GantryAlarm::SoftLimit)
            );
        }
    }

    #[test]
    fn soft_limit_during_motion_stops_where_it_is() {
        let (mut lab, clock) = homed();
        lab.gantry_move(clock.now(), [100.0, 0.0, 50.0], Some(1000.0))
            .unwrap();
        clock.advance(secs(3.0));
        assert!(
            lab.gantry_move(clock.now(), [400.0, 0.0, 50.0], None)
                .is_err()
        );
        clock.advance(secs(10.0));
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Alarm(GantryAlarm::SoftLimit));
        assert_pos(st.position, [50.0, 0.0, 50.0]);
    }

    #[test]
    fn feed_hold_stops_and_resume_continues() {
        let (mut lab, clock) = homed();
        let t0 = clock.now();
        lab.gantry_move(t0, [100.0, 0.0, 50.0], Some(1000.0))
            .unwrap();
        clock.set(t0 + secs(2.0));
        lab.gantry_feed_hold(clock.now());
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Hold);
        assert_eq!(st.state.grbl_name(), "Hold:0");
        assert_eq!(st.feed_mm_min, 0.0);
        clock.set(t0 + secs(30.0));
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Hold);
        assert_pos(st.position, [100.0 / 3.0, 0.0, 50.0]);
        lab.gantry_resume(clock.now());
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Run);
        // 4 s of travel remain.
        clock.set(t0 + secs(33.9));
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Run);
        clock.set(t0 + secs(34.0));
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Idle);
        assert_pos(st.position, [100.0, 0.0, 50.0]);
    }

    #[test]
    fn reset_while_moving_loses_position_with_alarm_3() {
        let (mut lab, clock) = homed();
        lab.gantry_move(clock.now(), [100.0, 0.0, 50.0], Some(1000.0))
            .unwrap();
        clock.advance(secs(1.5));
        lab.gantry_reset(clock.now());
        let st = lab.gantry_status(clock.now());
        assert_eq!(st.state, GantryState::Alarm(GantryAlarm::ResetWhileMoving));
        assert_eq!(GantryAlarm::ResetWhileMoving.code(), Some(3));
        assert_pos(st.position, [25.0, 0.0, 50.0]);
        clock.advance(secs(10.0));
        assert_pos(lab.gantry_status(clock.now()).position, [25.0, 0.0, 50.0]);
        // Reset while idle is harmless.
        lab.gantry_home(clock.now()).unwrap();
        clock.advance(secs(60.0));
        lab.gantry_reset(clock.now());
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Idle);
    }

    #[test]
    fn homing_takes_travel_time_and_reset_during_homing_is_alarm_6() {
        let (mut lab, clock) = homed();
        lab.gantry_move(clock.now(), [100.0, 50.0, 10.0], None)
            .unwrap();
        clock.advance(secs(60.0));
        let t0 = clock.now();
        lab.gantry_home(t0).unwrap();
        // z 40 + max(x 100, y 50) = 140 mm at 2000 mm/min = 4.2 s, plus 0.5 s pull-off.
        clock.set(t0 + secs(4.69));
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Home);
        clock.set(t0 + secs(4.7));
        assert_eq!(lab.gantry_status(clock.now()).state, GantryState::Idle);
        lab.gantry_home(clock.now()).unwrap();
        lab.gantry_reset(clock.now());
        assert_eq!(
            lab.gantry_status(clock.now()).state,
            GantryState::Alarm(GantryAlarm::HomingReset)
        );
    }

    #[test]
    fn gripper_picks_only_with_head_down_and_places_in_empty_positions() {
        let (mut lab, clock) = homed();
        lab.add_vial(clock.now(), "v1", "A1").unwrap();
        lab.add_vial(clock.now(), "v2", "B2").unwrap();
        // Closing at safe height picks nothing.
        lab.gantry_move(clock.now(), [20.0, 20.0, 50.0], None)
            .unwrap();
        lab.gantry_grip(clock.now(), true).unwrap();
        clock.advance(secs(10.0));
        let st = lab.gantry_status(clock.now());
        assert!(st.gripper_closed);
        assert_eq!(st.held_vial, None);
        lab.gantry_grip(clock.now(), false).unwrap();
        // Down, close, up, over to C3, down, open.
        let t = clock.now();
        lab.gantry_move(t, [20.0, 20.0, 0.0], None).unwrap();
        lab.gantry_grip(t, true).unwrap();
        lab.gantry_move(t, [20.0, 20.0, 50.0], None).unwrap();
        lab.gantry_move(t, [60.0, 60.0, 50.0], None).unwrap();
        clock.advance(secs(2.0));
        assert_eq!(
            lab.gantry_status(clock.now()).held_vial.as_deref(),
            Some("v1")
        );
        assert!(lab.deck().vial_at("A1").is_none());
        lab.gantry_move(clock.now(), [60.0, 60.0, 0.0], None)
            .unwrap();
        lab.gantry_grip(clock.now(), false).unwrap();
        lab.advance_to(clock.advance(secs(2.0)));
        assert_eq!(lab.deck().vial_at("C3").unwrap().id, "v1");
        assert_eq!(lab.stats().dropped_vials, 0);
        // Releasing over an occupied position drops the vial.
        let t = clock.now();
        lab.gantry_grip(t, true).unwrap();
        lab.gantry_move(t, [40.0, 40.0, 0.0], None).unwrap();
        lab.gantry_grip(t, false).unwrap();
        lab.advance_to(clock.advance(secs(2.0)));
        assert!(lab.vial("v1").is_none());
        assert_eq!(lab.vial("v2").unwrap().position(), Some("B2"));
        assert_eq!(lab.stats().dropped_vials, 1);
    }

    #[test]
    fn reset_opens_the_gripper() {
        let (mut lab, clock) = homed();
        lab.add_vial(clock.now(), "v1", "A1").unwrap();
        lab.gantry_move(clock.now(), [20.0, 20.0, 0.0], None)
            .unwrap();
        lab.gantry_grip(clock.now(), true).unwrap();
        clock.advance(secs(5.0));
        assert_eq!(
            lab.gantry_status(clock.now()).held_vial.as_deref(),
            Some("v1")
        );
        lab.gantry_reset(clock.now());
        let st = lab.gantry_status(clock.now());
        assert!(!st.gripper_closed);
        assert_eq!(st.held_vial, None);
        assert_eq!(lab.vial("v1").unwrap().position(), Some("A1"));
    }

    #[test]
    fn planner_buffer_fills_up() {
        let mut g = Gantry::new(GantryConfig::default()).unwrap();
        g.unlock().unwrap();
        // The first move starts at once; the next 15 fill the buffer.
        for i in 1..=16 {
            g.move_to([f64::from(i), 0.0, 50.0], Some(100.0)).unwrap();
        }
        assert_eq!(g.planner_free(), 0);
        assert_eq!(
            g.move_to([0.0, 0.0, 0.0], None),
            Err(GantryError::BufferFull)
        );
        assert_eq!(
            g.move_to([f64::NAN, 0.0, 0.0], None),
            Err(GantryError::InvalidTarget)
        );
    }
}
