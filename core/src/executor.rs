//! Runs one protocol. Each run is a tokio task that walks its steps; a finished step starts the next at once
//! (no tick in between). Commands go to instrument tasks, which apply the envelope check. Every step's intent
//! is journaled before its command goes out and its outcome after; results are journaled and published only
//! once durable.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use labctl_clock::VirtualClock;
use labctl_drivers::{DeviceCommand, Outcome};
use labctl_protocols::interpret::{self, Expansion};
use labctl_protocols::lab::Lab;
use labctl_protocols::{Action, Condition, OnError, Protocol, Step};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::api::Control;
use crate::contract::EventDetail;
use crate::instruments::InstrumentHandle;
use crate::journal::{JournalHandle, Record, now_ms};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    Completed,
    Failed(String),
    Aborted(String),
}

/// What a run task tells the controller while it runs.
#[derive(Debug, Clone)]
pub enum RunUpdate {
    Step {
        run_id: String,
        step: String,
    },
    /// An `on_error: pause` step failed, or a pause request reached a safe point.
    Paused {
        run_id: String,
        reason: String,
    },
    Resumed {
        run_id: String,
    },
    /// A vessel now stands at a new deck position (after a transfer).
    Vessel {
        run_id: String,
        vessel: String,
        position: String,
    },
    Finished {
        run_id: String,
        end: RunEnd,
    },
}

/// Everything a run task needs, shared by its parallel branches.
pub struct RunContext {
    pub run_id: String,
    pub proposal_id: String,
    pub lab: Arc<Lab>,
    pub instruments: Arc<BTreeMap<String, InstrumentHandle>>,
    pub journal: JournalHandle,
    pub clock: VirtualClock,
    step_timeout_floor: Duration,
    pub control: watch::Receiver<Control>,
    pub updates: mpsc::UnboundedSender<RunUpdate>,
    pub estop: crate::safety::EStop,
    /// Results so far; the next result's sequence number is one more. Shared with the controller.
    pub results: Arc<AtomicU64>,
    /// Results on disk: raised by the journal as each commits; what the API reports, so nobody is told of
    /// a result a crash could still lose.
    pub durable_results: Arc<AtomicU64>,
    /// Deck position of each vessel, updated as transfers finish.
    vessels: Mutex<BTreeMap<String, String>>,
    /// Every instrument the protocol uses.
    uses: Vec<String>,
}

/// The safe-state epoch of each of the run's instruments, read at a safe point after the controller last
/// let the run go on. A command carries its instrument's epoch; one issued before a later safe-state
/// request is refused by the instrument task, so a run stopped by anyone never moves anything again.
struct Armed(BTreeMap<String, u64>);

impl Armed {
    fn epoch(&self, instrument: &str) -> u64 {
        // Not one of the run's instruments: an epoch no instrument is at, so the command is refused.
        self.0.get(instrument).copied().unwrap_or(u64::MAX)
    }
}

enum StepError {
    Failed(String),
    Aborted(String),
}

type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<(), StepError>> + Send + 'a>>;

impl RunContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run_id: String,
        protocol: &Protocol,
        lab: Arc<Lab>,
        instruments: Arc<BTreeMap<String, InstrumentHandle>>,
        journal: JournalHandle,
        clock: VirtualClock,
        step_timeout_floor: Duration,
        control: watch::Receiver<Control>,
        updates: mpsc::UnboundedSender<RunUpdate>,
        estop: crate::safety::EStop,
    ) -> Self {
        let vessels = interpret::initial_vessels(protocol);
        let mut uses = std::collections::BTreeSet::new();
        collect_instruments(&protocol.steps, &mut uses);
        RunContext {
            uses: uses.into_iter().collect(),
            run_id,
            proposal_id: protocol.metadata.proposal_id.clone(),
            lab,
            instruments,
            journal,
            clock,
            step_timeout_floor,
            control,
            updates,
            estop,
            results: Arc::new(AtomicU64::new(0)),
            durable_results: Arc::new(AtomicU64::new(0)),
            vessels: Mutex::new(vessels),
        }
    }

    fn event(&self, step: &str, detail: EventDetail) {
        self.journal.append(Record::Event {
            run_id: Some(self.run_id.clone()),
            step: Some(step.to_owned()),
            actor: None,
            detail,
            at_ms: now_ms(),
        });
    }

    /// Waits while paused; returns an error when aborted. Called before every step: the safe points. Returns
    /// the epochs the step's commands go out under.
    async fn checkpoint(&self) -> Result<Armed, StepError> {
        let mut control = self.control.clone();
        let mut announced = false;
        loop {
            // Epochs first, the controller's word second: the controller sets the control before it asks
            // for a safe state, so a `Resume` read here means no safe state was requested before these
            // epochs were read, and a later one makes them stale.
            let armed = Armed(
                self.uses
                    .iter()
                    .filter_map(|id| Some((id.clone(), self.instruments.get(id)?.epoch())))
                    .collect(),
            );
            let current = *control.borrow_and_update();
            match current {
                Control::Abort => return Err(StepError::Aborted("aborted".into())),
                Control::Resume => {
                    if announced {
                        let _ = self.updates.send(RunUpdate::Resumed {
                            run_id: self.run_id.clone(),
                        });
                    }
                    return Ok(armed);
                }
                Control::Pause => {
                    if !announced {
                        announced = true;
                        let _ = self.updates.send(RunUpdate::Paused {
                            run_id: self.run_id.clone(),
                            reason: "pause requested".into(),
                        });
                    }
                    if control.changed().await.is_err() {
                        return Err(StepError::Aborted("controller stopped".into()));
                    }
                }
            }
        }
    }

    /// After an `on_error: pause` failure: hold until a technician resumes (continue with the next step) or
    /// aborts.
    async fn hold_after_failure(&self, reason: String) -> Result<(), StepError> {
        let mut control = self.control.clone();
        let _ = self.updates.send(RunUpdate::Paused {
            run_id: self.run_id.clone(),
            reason,
        });
        // The run holds until someone says otherwise, whatever the control said before the failure.
        control.mark_unchanged();
        loop {
            if control.changed().await.is_err() {
                return Err(StepError::Aborted("controller stopped".into()));
            }
            match *control.borrow_and_update() {
                Control::Abort => {
                    return Err(StepError::Aborted(
                        "aborted while held after a failure".into(),
                    ));
                }
                Control::Resume => {
                    let _ = self.updates.send(RunUpdate::Resumed {
                        run_id: self.run_id.clone(),
                    });
                    return Ok(());
                }
                Control::Pause => {}
            }
        }
    }

    fn virtual_to_real(&self, seconds: f64) -> Duration {
        self.clock
            .to_real(Duration::from_secs_f64(seconds.clamp(0.0, 1.0e9)))
    }

    /// A step's timeout in real time: warped like the physics it waits for, but never below the wire's
    /// real-time floor (nor above the unwarped timeout).
    fn step_timeout_real(&self, seconds: f64) -> Duration {
        let unwarped =
            Duration::try_from_secs_f64(seconds.clamp(0.0, 1.0e9)).unwrap_or(Duration::MAX);
        self.virtual_to_real(seconds)
            .max(self.step_timeout_floor.min(unwarped))
    }

    /// Runs a list of steps in order. `suffix` numbers results inside `repeat` (e.g. `_2_1`).
    fn steps<'a>(
        self: &'a Arc<Self>,
        steps: &'a [Step],
        path: String,
        suffix: String,
    ) -> StepFuture<'a> {
        Box::pin(async move {
            for (i, step) in steps.iter().enumerate() {
                let armed = self.checkpoint().await?;
                let step_path = format!("{path}/{i}");
                let _ = self.updates.send(RunUpdate::Step {
                    run_id: self.run_id.clone(),
                    step: step_path.clone(),
                });
                let timeout = step.timeout_or_default_s(&self.lab);
                let run = self.step(step, step_path.clone(), suffix.clone(), &armed);
                let outcome = match timeout {
                    Some(t) => match tokio::time::timeout(self.step_timeout_real(t), run).await {
                        Ok(r) => r,
                        Err(_) => {
                            // The dropped step may have left a command in flight: make its instruments safe.
                            self.safe_state_of(step);
                            Err(StepError::Failed(format!(
                                "step {step_path} timed out after {t} s"
                            )))
                        }
                    },
                    None => run.await,
                };
                match outcome {
                    // Leaf commands journal their own intent and outcome; blocks say when they end.
                    Ok(()) if interpret::is_block(step) => {
                        self.event(&step_path, EventDetail::StepFinished {})
                    }
                    Ok(()) => {}
                    Err(StepError::Aborted(r)) => return Err(StepError::Aborted(r)),
                    Err(StepError::Failed(reason)) => {
                        self.event(
                            &step_path,
                            EventDetail::StepFailed {
                                reason: reason.clone(),
                                on_error: step.on_error(),
                            },
                        );
                        // An emergency stop ends the run as aborted, whatever the step's policy.
                        if self.estop.is_latched() {
                            return Err(StepError::Aborted(format!("emergency stop: {reason}")));
                        }
                        // A step interrupted because the run is being paused (an interlock, a lost planner) or
                        // aborted ends the way the controller asked, not by the step's own policy.
                        let control = *self.control.borrow();
                        match control {
                            Control::Abort => return Err(StepError::Aborted(reason)),
                            Control::Pause => {
                                self.hold_after_failure(reason).await?;
                                continue;
                            }
                            Control::Resume => {}
                        }
                        match step.on_error() {
                            OnError::Fail => return Err(StepError::Failed(reason)),
                            OnError::Skip => {
                                self.event(&step_path, EventDetail::StepSkipped { reason })
                            }
                            OnError::Pause => self.hold_after_failure(reason).await?,
                        }
                    }
                }
            }
            Ok(())
        })
    }

    fn safe_state_of(&self, step: &Step) {
        let mut ids = std::collections::BTreeSet::new();
        collect_instruments(std::slice::from_ref(step), &mut ids);
        for id in ids {
            if let Some(h) = self.instruments.get(&id) {
                h.request_safe_state();
            }
        }
    }

    async fn step(
        self: &Arc<Self>,
        step: &Step,
        path: String,
        suffix: String,
        armed: &Armed,
    ) -> Result<(), StepError> {
        if interpret::is_block(step) {
            self.event(
                &path,
                EventDetail::StepStarted {
                    step_type: step.type_name().to_owned(),
                },
            );
        }
        match step {
            Step::Action(a) => {
                let expansion = interpret::expand(&self.lab, &a.instrument, &a.action, |v| {
                    self.vessels.lock().ok().and_then(|m| m.get(v).cloned())
                })
                .map_err(|e| StepError::Failed(e.to_string()))?;
                let commands = match expansion {
                    Expansion::Ramp {
                        target_c,
                        rate_c_per_min,
                    } => {
                        return self
                            .ramp(&a.instrument, target_c, rate_c_per_min, &path)
                            .await;
                    }
                    Expansion::Commands(commands) => commands,
                };
                for (instrument, cmd) in commands {
                    if let Some(rise) = self.rise_before(&instrument, &cmd) {
                        self.command(&instrument, rise, &path, armed).await?;
                    }
                    self.command(&instrument, cmd, &path, armed).await?;
                }
                if let Some(Action::Transfer(t)) = a.action.builtin()
                    && let Ok(mut v) = self.vessels.lock()
                {
                    let position = t.to.to_ascii_uppercase();
                    v.insert(t.vessel.clone(), position.clone());
                    let _ = self.updates.send(RunUpdate::Vessel {
                        run_id: self.run_id.clone(),
                        vessel: t.vessel.clone(),
                        position,
                    });
                }
                Ok(())
            }
            Step::Measure(m) => {
                let cmd = interpret::measurement_command(&m.measurement);
                let outcome = self.command(&m.instrument, cmd, &path, armed).await?;
                self.result(
                    &format!("{}{suffix}", m.result),
                    &path,
                    &m.instrument,
                    &outcome,
                );
                Ok(())
            }
            Step::Wait(w) => self.wait(self.virtual_to_real(w.duration_s)).await,
            Step::WaitUntil(w) => self.wait_until(&w.condition).await,
            Step::Parallel(p) => {
                let mut set = tokio::task::JoinSet::new();
                for (j, branch) in p.branches.iter().enumerate() {
                    let ctx = Arc::clone(self);
                    let branch = branch.clone();
                    let bpath = format!("{path}/branches/{j}");
                    let suffix = suffix.clone();
                    set.spawn(async move { ctx.steps(&branch, bpath, suffix).await });
                }
                let mut first_error = None;
                while let Some(joined) = set.join_next().await {
                    let r = joined
                        .unwrap_or_else(|e| Err(StepError::Failed(format!("branch crashed: {e}"))));
                    if let Err(e) = r {
                        // One failed branch ends the block: stop the others where they are, and leave
                        // their instruments safe (a cancelled branch may have a command in flight).
                        if first_error.is_none() {
                            set.abort_all();
                            self.safe_state_of(step);
                        }
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), Err)
            }
            Step::Repeat(r) => {
                for k in 1..=r.count {
                    self.steps(&r.steps, format!("{path}/steps"), format!("{suffix}_{k}"))
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// Raises a temperature setpoint no faster than the envelope's `ramp_c_per_min`, from the plate's
    /// measured temperature (`lab::ramp_setpoints`; cooling is one step). The waits between setpoints are
    /// safe points: a pause holds the ramp, and each setpoint goes out under the epochs read after it.
    async fn ramp(
        &self,
        instrument: &str,
        target_c: f64,
        rate_c_per_min: f64,
        path: &str,
    ) -> Result<(), StepError> {
        let plate_c = self.instruments.get(instrument).and_then(|h| {
            h.view()
                .values
                .iter()
                .find(|(q, _)| *q == "plate_temperature_c")
                .map(|(_, v)| *v)
        });
        for (wait_s, setpoint) in
            interpret::ramp(&self.lab, instrument, plate_c, target_c, rate_c_per_min)
        {
            if wait_s > 0.0 {
                self.wait(self.virtual_to_real(wait_s)).await?;
            }
            let armed = self.checkpoint().await?;
            let cmd = DeviceCommand::SetTemperature {
                temperature_c: setpoint,
            };
            self.command(instrument, cmd, path, &armed).await?;
        }
        Ok(())
    }

    /// Where the head must rise first before `cmd` (see [`interpret::rise_before`]), from its last reading.
    fn rise_before(&self, instrument: &str, cmd: &DeviceCommand) -> Option<DeviceCommand> {
        let view = self.instruments.get(instrument)?.view();
        let at = |axis: &str| {
            view.values
                .iter()
                .find(|(name, _)| *name == axis)
                .map(|(_, v)| *v)
        };
        interpret::rise_before(&self.lab, [at("x_mm")?, at("y_mm")?, at("z_mm")?], cmd)
    }

    /// Sends one command: its intent is on disk before it goes out (a crash leaves a record of what may
    /// have reached the instrument), its outcome is journaled after.
    async fn command(
        &self,
        instrument: &str,
        cmd: DeviceCommand,
        step: &str,
        armed: &Armed,
    ) -> Result<Outcome, StepError> {
        let Some(handle) = self.instruments.get(instrument) else {
            return Err(StepError::Failed(format!(
                "instrument {instrument} is not connected to this controller"
            )));
        };
        let intent = Record::Command {
            run_id: self.run_id.clone(),
            step: step.to_owned(),
            instrument: instrument.to_owned(),
            command: cmd.clone(),
            at_ms: now_ms(),
        };
        // A command that changes the lab goes out only once its intent is on disk. A read changes nothing
        // a crash could leave unexplained: its intent is queued in order, ahead of its result, without
        // waiting for the disk (a measurement-heavy run is not held to one fsync per reading).
        if cmd.only_reads() {
            self.journal.append(intent);
        } else if let Err(e) = self.journal.append_durable(intent).await {
            return Err(StepError::Failed(format!(
                "{instrument}: command not sent: its intent could not be recorded: {e}"
            )));
        }
        match handle.execute_in_epoch(cmd, armed.epoch(instrument)).await {
            Ok(outcome) => {
                self.event(
                    step,
                    EventDetail::CommandDone {
                        instrument: instrument.to_owned(),
                        outcome: outcome_summary(&outcome),
                    },
                );
                Ok(outcome)
            }
            Err(e) => Err(StepError::Failed(e.to_string())),
        }
    }

    fn result(&self, name: &str, step: &str, instrument: &str, outcome: &Outcome) {
        let seq = self.results.fetch_add(1, Ordering::SeqCst) + 1;
        let identity = self
            .instruments
            .get(instrument)
            .and_then(|h| h.view().identity.clone())
            .map(|i| serde_json::to_value(i).unwrap_or_default())
            .unwrap_or(serde_json::Value::Null);
        self.journal.append_counted(
            Record::Result {
                run_id: self.run_id.clone(),
                seq,
                name: name.to_owned(),
                step: step.to_owned(),
                instrument: instrument.to_owned(),
                identity,
                value: serde_json::to_value(outcome).unwrap_or_default(),
                at_ms: now_ms(),
            },
            Arc::clone(&self.durable_results),
            seq,
        );
    }

    /// A wait is a safe point: a pause takes effect at once, and the rest of the wait follows the resume.
    async fn wait(&self, span: Duration) -> Result<(), StepError> {
        let mut until = tokio::time::Instant::now() + span;
        let mut control = self.control.clone();
        control.mark_unchanged();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(()),
                changed = control.changed() => {
                    if changed.is_err() {
                        return Err(StepError::Aborted("controller stopped".into()));
                    }
                    let now = tokio::time::Instant::now();
                    let remaining = until.saturating_duration_since(now);
                    self.checkpoint().await?;
                    until = tokio::time::Instant::now() + remaining;
                }
            }
        }
    }

    async fn wait_until(&self, c: &Condition) -> Result<(), StepError> {
        let Some(handle) = self.instruments.get(&c.instrument) else {
            return Err(StepError::Failed(format!(
                "instrument {} is not connected",
                c.instrument
            )));
        };
        let mut view = handle.subscribe();
        let hold = self.virtual_to_real(c.hold_s.unwrap_or(0.0));
        let mut holding_since: Option<tokio::time::Instant> = None;
        loop {
            let reading = view
                .borrow_and_update()
                .values
                .iter()
                .find(|(q, _)| *q == c.quantity)
                .map(|(_, v)| *v);
            let met = reading.is_some_and(|r| c.op.holds(r, c.value, c.tolerance));
            let now = tokio::time::Instant::now();
            if met {
                let since = *holding_since.get_or_insert(now);
                if now.duration_since(since) >= hold {
                    return Ok(());
                }
            } else {
                holding_since = None;
            }
            // Wake on the next reading, or when the hold time would be complete.
            let wake = holding_since
                .map(|s| s + hold)
                .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                changed = view.changed() => if changed.is_err() {
                    return Err(StepError::Failed(format!("{} went away", c.instrument)));
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// A short form of an outcome for the event log (a full spectrum belongs in the results table only).
fn outcome_summary(o: &Outcome) -> serde_json::Value {
    match o {
        Outcome::Spectrum { wavelengths_nm, .. } => {
            json!({ "outcome": "spectrum", "points": wavelengths_nm.len() })
        }
        other => serde_json::to_value(other).unwrap_or_default(),
    }
}

/// Every instrument a list of steps commands or reads (the run reserves them and makes them safe).
pub fn collect_instruments(steps: &[Step], out: &mut std::collections::BTreeSet<String>) {
    labctl_protocols::protocol::collect_instruments(
        steps,
        labctl_protocols::protocol::InstrumentUse::CommandedOrWatched,
        out,
    );
}

/// Runs a whole protocol and reports how it ended.
pub async fn run_protocol(ctx: Arc<RunContext>, protocol: Arc<Protocol>) {
    let end = match ctx
        .steps(&protocol.steps, "/steps".into(), String::new())
        .await
    {
        Ok(()) => RunEnd::Completed,
        Err(StepError::Failed(r)) => RunEnd::Failed(r),
        Err(StepError::Aborted(r)) => RunEnd::Aborted(r),
    };
    if end != RunEnd::Completed {
        let mut ids = std::collections::BTreeSet::new();
        collect_instruments(&protocol.steps, &mut ids);
        for id in ids {
            if let Some(h) = ctx.instruments.get(&id) {
                h.request_safe_state();
            }
        }
    }
    // Nobody hears that the run ended before its results are on disk: a client that sees `completed`
    // finds every result in the journal.
    if let Err(e) = ctx.journal.flush().await {
        tracing::error!(run_id = %ctx.run_id, error = %e, "journal not flushed at the end of the run");
    }
    let _ = ctx.updates.send(RunUpdate::Finished {
        run_id: ctx.run_id.clone(),
        end,
    });
}

#[cfg(test)]
mod tests;
