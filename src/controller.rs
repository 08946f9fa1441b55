//! The controller: validates and approves proposals, reserves instruments, starts and supervises runs,
//! reacts to interlocks, the emergency stop and lost planners. One tokio task owns this state; every
//! interface talks to it through [`ControllerHandle`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use labctl_protocols::Protocol;
use labctl_protocols::lab::{Lab, Role, TripAction};
use labctl_simulators::model::VirtualClock;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{
    ApiError, Checked, Control, ControllerHandle, Principal, Request, RunInfo, RunState,
    SubmitReply,
};
use crate::executor::{RunContext, RunEnd, RunUpdate, collect_instruments, run_protocol};
use crate::instruments::InstrumentHandle;
use crate::journal::{self, JournalHandle, Record, RunRecord, now_ms};
use crate::safety::EStop;
use crate::world::{LabSnapshot, RunComponent, TickConfig, TickIo, TickThread, Trip, start_tick};

/// Puts a run's labware where its protocol says it stands, before the run starts. In a real lab the
/// technician does this (and the loader has nothing to do); the simulated lab places fresh vials itself.
pub trait LabwareLoader: Send + Sync {
    fn load(&self, run_id: &str, protocol: &Protocol) -> Result<(), String>;
}

pub struct ControllerConfig {
    pub lab: Lab,
    /// SHA-256 of the lab file text, recorded with every run.
    pub lab_sha256: String,
    pub data_dir: PathBuf,
    pub clock: VirtualClock,
    /// Real time a step's timeout never drops below when the clock is warped (capped at the step's own
    /// timeout): wire I/O to simulated instruments runs in real time whatever the warp. Zero for
    /// in-process fakes, which have no wire.
    pub step_timeout_floor: Duration,
    pub tick: TickConfig,
    pub labware: Option<Arc<dyn LabwareLoader>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

/// A running controller.
pub struct Controller {
    pub handle: ControllerHandle,
    /// Runs the previous process left active, now marked `interrupted`.
    pub interrupted: Vec<String>,
    tick: Option<TickThread>,
    task: JoinHandle<()>,
}

impl Controller {
    /// Stops the controller: runs end, instruments go safe, the tick stops. Returns the tick statistics.
    pub async fn shutdown(mut self) -> Option<crate::world::TickStats> {
        self.handle.shutdown().await;
        let _ = (&mut self.task).await;
        self.tick.take().and_then(TickThread::stop)
    }

    /// Starts the tick's lateness statistics afresh (what the snapshots and `shutdown` report from then).
    pub fn restart_tick_stats(&self) {
        if let Some(tick) = &self.tick {
            tick.restart_stats();
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Starts the controller on instrument tasks that are already running.
pub async fn start(
    config: ControllerConfig,
    instruments: BTreeMap<String, InstrumentHandle>,
    estop: EStop,
) -> Result<Controller, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let conn = journal::open_db(&config.data_dir)?;
    let interrupted = journal::mark_interrupted(&conn)?;
    let proposals = journal::read::proposals(&conn)?;
    let journal = journal::start(conn);
    journal.append(Record::Event {
        run_id: None,
        kind: "controller_started".into(),
        step: None,
        actor: None,
        detail: json!({ "version": env!("CARGO_PKG_VERSION"), "lab_id": config.lab.lab_id, "lab_sha256": config.lab_sha256, "interrupted_runs": interrupted }),
        at_ms: now_ms(),
    });
    // Reconcile, after `controller_started` so the journal reads in order: whatever state the last process
    // left the instruments in, each is made safe and the outcome journaled before anything new runs on it
    // (the instrument task serialises this safe state ahead of any later command; one still connecting
    // answers once its connect has made it safe).
    for h in instruments.values() {
        let (h, journal) = (h.clone(), journal.clone());
        tokio::spawn(async move {
            let ok = h.safe_state(Duration::from_secs(10)).await;
            journal.append(Record::Event {
                run_id: None,
                kind: "instrument_safe".into(),
                step: None,
                actor: None,
                detail: json!({ "instrument": h.id, "confirmed": ok }),
                at_ms: now_ms(),
            });
        });
    }
    let (trips_tx, trips_rx) = mpsc::unbounded_channel();
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(LabSnapshot::default()));
    let (mirror_tx, mirror_rx) = mpsc::unbounded_channel();
    let handles: Vec<InstrumentHandle> = instruments.values().cloned().collect();
    let tick = start_tick(
        &config.lab,
        &handles,
        TickIo {
            trips: trips_tx,
            snapshot: snapshot_tx,
            run_updates: mirror_rx,
            estop: estop.clone(),
        },
        config.tick,
    );
    let (tx, rx) = mpsc::channel(256);
    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let lab = Arc::new(config.lab);
    let instruments = Arc::new(instruments);
    let core = Core {
        lab: Arc::clone(&lab),
        lab_sha256: config.lab_sha256,
        clock: config.clock,
        step_timeout_floor: config.step_timeout_floor,
        instruments: Arc::clone(&instruments),
        estop: estop.clone(),
        journal: journal.clone(),
        runs: BTreeMap::new(),
        order: Vec::new(),
        proposals: proposals.into_iter().map(|(p, r, s)| (p, (r, s))).collect(),
        reserved: BTreeMap::new(),
        labware: config.labware,
        updates: updates_tx,
        mirror: mirror_tx,
        next_id: 0,
    };
    let task = tokio::spawn(core.run(rx, updates_rx, trips_rx));
    Ok(Controller {
        handle: ControllerHandle {
            tx,
            journal,
            snapshot: snapshot_rx,
            lab,
            estop,
            instruments,
            data_dir: config.data_dir.clone(),
        },
        interrupted,
        tick: Some(tick),
        task,
    })
}

struct RunEntry {
    run_id: String,
    proposal_id: String,
    name: String,
    planner_id: String,
    submitted_by: String,
    supervised: bool,
    protocol: Arc<Protocol>,
    protocol_sha256: String,
    state: RunState,
    current_step: Option<String>,
    reason: Option<String>,
    estimated_duration_s: Option<f64>,
    approval_required_because: Vec<String>,
    instruments: BTreeSet<String>,
    /// Results on disk so far (raised by the journal as each commits).
    results: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// vessel -> deck position, as the run last reported.
    vessels: BTreeMap<String, String>,
    control: watch::Sender<Control>,
    task: Option<JoinHandle<()>>,
}

struct Core {
    lab: Arc<Lab>,
    lab_sha256: String,
    clock: VirtualClock,
    step_timeout_floor: Duration,
    instruments: Arc<BTreeMap<String, InstrumentHandle>>,
    estop: EStop,
    journal: JournalHandle,
    runs: BTreeMap<String, RunEntry>,
    /// Submission order, for the queue.
    order: Vec<String>,
    /// proposal id -> (run id, state as last known); includes runs of earlier processes.
    proposals: BTreeMap<String, (String, String)>,
    /// instrument -> the run holding it.
    reserved: BTreeMap<String, String>,
    labware: Option<Arc<dyn LabwareLoader>>,
    updates: mpsc::UnboundedSender<RunUpdate>,
    mirror: mpsc::UnboundedSender<RunComponent>,
    next_id: u32,
}

impl Core {
    async fn run(
        mut self,
        mut api: mpsc::Receiver<Request>,
        mut updates: mpsc::UnboundedReceiver<RunUpdate>,
        mut trips: mpsc::UnboundedReceiver<Trip>,
    ) {
        loop {
            tokio::select! {
                biased;
                Some(trip) = trips.recv() => self.on_trip(trip),
                Some(update) = updates.recv() => self.on_update(update),
                request = api.recv() => match request {
                    Some(Request::Shutdown { reply }) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(r) => self.on_request(r).await,
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
            }
        }
    }

    fn event(
        &self,
        run_id: Option<&str>,
        kind: &str,
        actor: Option<&Principal>,
        detail: serde_json::Value,
    ) {
        self.journal.append(Record::Event {
            run_id: run_id.map(str::to_owned),
            kind: kind.to_owned(),
            step: None,
            actor: actor.map(|p| format!("{} ({:?} via {})", p.name, p.role, p.via)),
            detail,
            at_ms: now_ms(),
        });
    }

    /// Records a state change: journal, world model, and the proposal index.
    fn set_state(&mut self, run_id: &str, state: RunState, reason: Option<String>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.state = state;
        if reason.is_some() {
            run.reason = reason.clone();
        }
        self.proposals.insert(
            run.proposal_id.clone(),
            (run.run_id.clone(), state.as_str().to_owned()),
        );
        self.journal.append(Record::RunState {
            run_id: run_id.to_owned(),
            state: state.as_str().to_owned(),
            step: run.current_step.clone(),
            reason,
            at_ms: now_ms(),
        });
        let _ = self.mirror.send(mirror_of(run));
        if state.is_terminal() {
            if let Some(task) = run.task.take() {
                task.abort();
            }
            self.reserved.retain(|_, holder| holder != run_id);
        }
    }

    async fn on_request(&mut self, request: Request) {
        match request {
            Request::Submit {
                checked,
                principal,
                reply,
            } => {
                let r = self.submit(*checked, principal).await;
                let _ = reply.send(r);
                self.start_queued();
            }
            Request::Approve {
                run_id,
                principal,
                reply,
            } => {
                let r = self.approve(&run_id, &principal, None);
                let _ = reply.send(r);
                self.start_queued();
            }
            Request::Reject {
                run_id,
                reason,
                principal,
                reply,
            } => {
                let _ = reply.send(self.approve(&run_id, &principal, Some(reason)));
            }
            Request::Control {
                run_id,
                control,
                principal,
                reply,
            } => {
                let _ = reply.send(self.control(&run_id, control, &principal));
                self.start_queued();
            }
            Request::EStop { principal, reply } => {
                let _ = reply.send(self.emergency_stop(&principal));
            }
            Request::EStopAck { principal, reply } => {
                let r = if principal.role != Role::Technician {
                    Err(ApiError::Forbidden(format!(
                        "{} may not acknowledge an emergency stop: technicians only",
                        principal.name
                    )))
                } else {
                    let was = self.estop.acknowledge();
                    self.event(
                        None,
                        "estop_acknowledged",
                        Some(&principal),
                        json!({ "was_latched": was }),
                    );
                    Ok(())
                };
                let _ = reply.send(r);
                self.start_queued();
            }
            Request::PlannerLost { planner_id } => self.planner_lost(&planner_id),
            Request::Runs { reply } => {
                let _ = reply.send(
                    self.order
                        .iter()
                        .filter_map(|id| self.runs.get(id))
                        .map(info)
                        .collect(),
                );
            }
            Request::Shutdown { .. } => {}
        }
    }

    async fn submit(&mut self, checked: Checked, principal: Principal) -> SubmitReply {
        let Checked {
            bytes,
            mut report,
            dry_run,
        } = checked;
        // The dry run on the simulation model gives the estimate an approver sees; its conflicts send the
        // proposal to a technician whatever the policy says.
        if let Some(dry) = &dry_run {
            report.estimated_duration_s = Some(dry.estimated_duration_s);
            if !dry.problems.is_empty() {
                report.approval_required_because.push(format!(
                    "the dry run on the simulation model found {} conflict(s), first at {}: {}",
                    dry.problems.len(),
                    dry.problems[0].path,
                    dry.problems[0].message
                ));
            }
        }
        let proposal_id = report
            .protocol
            .as_ref()
            .map(|p| p.metadata.proposal_id.clone());
        let Some(protocol) = report.protocol.clone() else {
            // Try to name the proposal in the refusal even when the document is invalid.
            let pid = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| {
                    v.pointer("/metadata/proposal_id")
                        .and_then(|p| p.as_str())
                        .map(str::to_owned)
                });
            self.event(
                None,
                "proposal_rejected",
                Some(&principal),
                json!({ "proposal_id": pid, "findings": report.findings.len() }),
            );
            return SubmitReply {
                accepted: false,
                proposal_id: pid,
                run_id: None,
                state: Some(RunState::Rejected),
                duplicate: false,
                findings: report.findings,
                estimated_duration_s: None,
                approval_required_because: Vec::new(),
                error: None,
            };
        };
        let sha = sha256_hex(&bytes);
        let pid = protocol.metadata.proposal_id.clone();
        if let Some((run_id, state)) = self.proposals.get(&pid).cloned() {
            let same = self
                .runs
                .get(&run_id)
                .is_none_or(|r| r.protocol_sha256 == sha);
            if !same {
                return SubmitReply::refused(
                    proposal_id,
                    format!(
                        "proposal id {pid} was already used for a different protocol (run {run_id})"
                    ),
                );
            }
            let state = self
                .runs
                .get(&run_id)
                .map(|r| r.state)
                .or_else(|| parse_state(&state));
            return SubmitReply {
                accepted: true,
                proposal_id,
                run_id: Some(run_id),
                state,
                duplicate: true,
                findings: report.findings,
                estimated_duration_s: report.estimated_duration_s,
                approval_required_because: report.approval_required_because,
                error: None,
            };
        }
        // While the emergency stop is latched nothing new is accepted, from any interface: a run queued
        // now would start the moment the latch is acknowledged, which nobody at the bench asked for.
        if self.estop.is_latched() {
            self.event(
                None,
                "proposal_rejected",
                Some(&principal),
                json!({ "proposal_id": pid, "reason": "estop_latched" }),
            );
            return SubmitReply::refused(proposal_id, ApiError::EStopLatched.to_string());
        }
        self.next_id += 1;
        let run_id = format!("run-{}-{}", now_ms(), self.next_id);
        let auto = report.approval_required_because.is_empty();
        let state = if auto {
            RunState::Queued
        } else {
            RunState::AwaitingApproval
        };
        let mut instruments = BTreeSet::new();
        collect_instruments(&protocol.steps, &mut instruments);
        let record = RunRecord {
            run_id: run_id.clone(),
            proposal_id: pid.clone(),
            name: protocol.metadata.name.clone(),
            planner_id: protocol.metadata.planner.id.clone(),
            planner_model: protocol.metadata.planner.model.clone(),
            planner_model_version: protocol.metadata.planner.model_version.clone(),
            submitted_by: principal.name.clone(),
            protocol_json: String::from_utf8_lossy(&bytes).into_owned(),
            protocol_sha256: sha.clone(),
            lab_id: self.lab.lab_id.clone(),
            lab_sha256: self.lab_sha256.clone(),
            labctl_version: env!("CARGO_PKG_VERSION").into(),
            state: state.as_str().into(),
            estimated_duration_s: report.estimated_duration_s,
            submitted_at_ms: now_ms(),
        };
        // The planner is told "accepted" only once the run is on disk.
        if let Err(e) = self
            .journal
            .append_durable(Record::RunCreated(record))
            .await
        {
            return SubmitReply::refused(proposal_id, format!("cannot record the run: {e}"));
        }
        let approval_detail = if auto {
            json!({ "decision": "approved", "by": "policy", "estimated_duration_s": report.estimated_duration_s })
        } else {
            json!({ "decision": "awaiting_approval", "because": report.approval_required_because, "estimated_duration_s": report.estimated_duration_s })
        };
        self.event(
            Some(&run_id),
            "submitted",
            Some(&principal),
            json!({ "proposal_id": pid, "protocol_sha256": sha }),
        );
        if let Some(dry) = &dry_run {
            self.event(
                Some(&run_id),
                "dry_run",
                None,
                json!({ "estimated_duration_s": dry.estimated_duration_s, "problems": dry.problems, "notes": dry.notes, "steps_simulated": dry.steps_simulated }),
            );
        }
        self.event(Some(&run_id), "approval", None, approval_detail);
        let (control, _) = watch::channel(Control::Resume);
        let protocol_vessels = protocol
            .labware
            .iter()
            .map(|l| (l.id.clone(), l.location.to_ascii_uppercase()))
            .collect();
        self.runs.insert(
            run_id.clone(),
            RunEntry {
                run_id: run_id.clone(),
                proposal_id: pid.clone(),
                name: protocol.metadata.name.clone(),
                planner_id: protocol.metadata.planner.id.clone(),
                submitted_by: principal.name.clone(),
                supervised: protocol.metadata.supervised,
                protocol: Arc::new(protocol),
                protocol_sha256: sha,
                state,
                current_step: None,
                reason: None,
                estimated_duration_s: report.estimated_duration_s,
                approval_required_because: report.approval_required_because.clone(),
                instruments,
                results: None,
                vessels: protocol_vessels,
                control,
                task: None,
            },
        );
        self.order.push(run_id.clone());
        self.set_state(&run_id, state, None);
        SubmitReply {
            accepted: true,
            proposal_id,
            run_id: Some(run_id),
            state: Some(state),
            duplicate: false,
            findings: report.findings,
            estimated_duration_s: report.estimated_duration_s,
            approval_required_because: report.approval_required_because,
            error: None,
        }
    }

    /// Approves (`reject` = None) or rejects a run awaiting approval.
    fn approve(
        &mut self,
        run_id: &str,
        who: &Principal,
        reject: Option<String>,
    ) -> Result<RunState, ApiError> {
        if who.role != Role::Technician {
            return Err(ApiError::Forbidden(format!(
                "{} may not approve or reject runs: technicians only",
                who.name
            )));
        }
        let run = self
            .runs
            .get(run_id)
            .ok_or_else(|| ApiError::UnknownRun(run_id.to_owned()))?;
        if run.state != RunState::AwaitingApproval {
            return Err(ApiError::InvalidState(format!(
                "run {run_id} is {}, not awaiting approval",
                run.state
            )));
        }
        if reject.is_none() && self.estop.is_latched() {
            return Err(ApiError::EStopLatched);
        }
        let (state, detail) = match &reject {
            None => (RunState::Queued, json!({ "decision": "approved" })),
            Some(reason) => (
                RunState::Rejected,
                json!({ "decision": "rejected", "reason": reason }),
            ),
        };
        self.event(Some(run_id), "approval", Some(who), detail);
        self.set_state(run_id, state, reject);
        Ok(state)
    }

    fn control(
        &mut self,
        run_id: &str,
        control: Control,
        who: &Principal,
    ) -> Result<RunState, ApiError> {
        let run = self
            .runs
            .get(run_id)
            .ok_or_else(|| ApiError::UnknownRun(run_id.to_owned()))?;
        let allowed = match who.role {
            Role::Technician => true,
            Role::Planner | Role::Rig => run.submitted_by == who.name,
            Role::Observer => false,
        };
        if !allowed {
            return Err(ApiError::Forbidden(format!(
                "{} may not control run {run_id}: it belongs to {}",
                who.name, run.submitted_by
            )));
        }
        let state = run.state;
        let result = match (control, state) {
            (Control::Pause, RunState::Running) => {
                run.control.send_replace(Control::Pause);
                Ok(RunState::Running)
            }
            (Control::Resume, RunState::Paused) if self.estop.is_latched() => {
                Err(ApiError::EStopLatched)
            }
            (Control::Resume, RunState::Paused) => {
                run.control.send_replace(Control::Resume);
                Ok(RunState::Paused)
            }
            (Control::Abort, RunState::Running | RunState::Paused) => {
                run.control.send_replace(Control::Abort);
                self.safe_state_of_run(run_id);
                self.set_state(
                    run_id,
                    RunState::Aborted,
                    Some(format!("aborted by {}", who.name)),
                );
                Ok(RunState::Aborted)
            }
            (Control::Abort, RunState::Queued | RunState::AwaitingApproval) => {
                self.set_state(
                    run_id,
                    RunState::Aborted,
                    Some(format!("aborted by {} before it started", who.name)),
                );
                Ok(RunState::Aborted)
            }
            (c, s) => Err(ApiError::InvalidState(
                format!("cannot {c:?} run {run_id}: it is {s}").to_lowercase(),
            )),
        };
        if result.is_ok() {
            self.event(
                Some(run_id),
                "operator_action",
                Some(who),
                json!({ "control": control }),
            );
        }
        result
    }

    fn safe_state_of_run(&self, run_id: &str) {
        if let Some(run) = self.runs.get(run_id) {
            for id in &run.instruments {
                if let Some(h) = self.instruments.get(id) {
                    h.request_safe_state();
                }
            }
        }
    }

    fn emergency_stop(&mut self, who: &Principal) -> Result<(), ApiError> {
        if who.role != Role::Technician {
            return Err(ApiError::Forbidden(format!(
                "{} may not trigger the emergency stop: technicians only",
                who.name
            )));
        }
        // Latch first: from here every instrument task refuses commands, whatever is in flight.
        self.estop.trigger();
        for h in self.instruments.values() {
            h.request_safe_state();
        }
        let active: Vec<String> = self
            .runs
            .values()
            .filter(|r| {
                matches!(
                    r.state,
                    RunState::Running | RunState::Paused | RunState::Queued
                )
            })
            .map(|r| r.run_id.clone())
            .collect();
        for id in &active {
            if let Some(run) = self.runs.get(id) {
                run.control.send_replace(Control::Abort);
            }
            self.set_state(
                id,
                RunState::Aborted,
                Some(format!("emergency stop by {}", who.name)),
            );
        }
        self.event(
            None,
            "estop_triggered",
            Some(who),
            json!({ "aborted_runs": active }),
        );
        Ok(())
    }

    fn planner_lost(&mut self, planner_id: &str) {
        let held: Vec<String> = self
            .runs
            .values()
            .filter(|r| r.supervised && r.planner_id == planner_id && r.state == RunState::Running)
            .map(|r| r.run_id.clone())
            .collect();
        for id in held {
            if let Some(run) = self.runs.get(&id) {
                run.control.send_replace(Control::Pause);
            }
            self.safe_state_of_run(&id);
            self.event(
                Some(&id),
                "planner_lost",
                None,
                json!({ "planner_id": planner_id, "action": "safe hold" }),
            );
        }
    }

    fn on_trip(&mut self, trip: Trip) {
        for id in &trip.safe_state {
            if let Some(h) = self.instruments.get(id) {
                h.request_safe_state();
            }
        }
        let concerned: BTreeSet<&String> = trip
            .safe_state
            .iter()
            .chain(std::iter::once(&trip.instrument))
            .collect();
        let affected: Vec<String> = self
            .runs
            .values()
            .filter(|r| matches!(r.state, RunState::Running | RunState::Paused))
            .filter(|r| r.instruments.iter().any(|i| concerned.contains(i)))
            .map(|r| r.run_id.clone())
            .collect();
        self.event(
            None,
            "interlock",
            None,
            json!({ "interlock": trip.interlock, "reason": trip.reason, "action": trip.action, "safe_state": trip.safe_state, "runs": affected }),
        );
        for id in affected {
            self.event(
                Some(&id),
                "interlock",
                None,
                json!({ "interlock": trip.interlock, "reason": trip.reason }),
            );
            match trip.action {
                TripAction::Pause => {
                    if let Some(run) = self.runs.get(&id) {
                        run.control.send_replace(Control::Pause);
                    }
                }
                TripAction::Fail => {
                    if let Some(run) = self.runs.get(&id) {
                        run.control.send_replace(Control::Abort);
                    }
                    self.set_state(
                        &id,
                        RunState::Failed,
                        Some(format!("interlock {}: {}", trip.interlock, trip.reason)),
                    );
                }
            }
        }
        self.start_queued();
    }

    fn on_update(&mut self, update: RunUpdate) {
        match update {
            RunUpdate::Step { run_id, step } => {
                // The journal has the step's own events; only the live model follows every step.
                if let Some(run) = self.runs.get_mut(&run_id)
                    && !run.state.is_terminal()
                {
                    run.current_step = Some(step);
                    let _ = self.mirror.send(mirror_of(run));
                }
            }
            RunUpdate::Paused { run_id, reason } => {
                if self
                    .runs
                    .get(&run_id)
                    .is_some_and(|r| r.state == RunState::Running)
                {
                    self.set_state(&run_id, RunState::Paused, Some(reason));
                }
            }
            RunUpdate::Vessel {
                run_id,
                vessel,
                position,
            } => {
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.vessels.insert(vessel, position);
                    let _ = self.mirror.send(mirror_of(run));
                }
            }
            RunUpdate::Resumed { run_id } => {
                if let Some(run) = self.runs.get_mut(&run_id)
                    && run.state == RunState::Paused
                {
                    // The pause's reason no longer describes the run.
                    run.reason = None;
                    self.set_state(&run_id, RunState::Running, None);
                }
            }
            RunUpdate::Finished { run_id, end } => {
                if self
                    .runs
                    .get(&run_id)
                    .is_some_and(|r| !r.state.is_terminal())
                {
                    let (state, reason) = match end {
                        RunEnd::Completed => (RunState::Completed, None),
                        RunEnd::Failed(r) => (RunState::Failed, Some(r)),
                        RunEnd::Aborted(r) => (RunState::Aborted, Some(r)),
                    };
                    self.set_state(&run_id, state, reason);
                }
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.task = None;
                }
                self.start_queued();
            }
        }
    }

    /// Starts queued runs, in submission order, whose instruments are all free. Nothing starts while the
    /// emergency stop is latched.
    fn start_queued(&mut self) {
        if self.estop.is_latched() {
            return;
        }
        let queued: Vec<String> = self
            .order
            .iter()
            .filter(|id| {
                self.runs
                    .get(*id)
                    .is_some_and(|r| r.state == RunState::Queued)
            })
            .cloned()
            .collect();
        for id in queued {
            let Some(run) = self.runs.get(&id) else {
                continue;
            };
            if run
                .instruments
                .iter()
                .any(|i| self.reserved.contains_key(i))
            {
                continue;
            }
            let missing: Vec<&String> = run
                .instruments
                .iter()
                .filter(|i| !self.instruments.contains_key(*i))
                .collect();
            if !missing.is_empty() {
                let reason = format!("instruments not connected to this controller: {missing:?}");
                self.set_state(&id, RunState::Failed, Some(reason));
                continue;
            }
            if let Some(loader) = &self.labware
                && let Err(e) = loader.load(&id, &run.protocol)
            {
                self.set_state(
                    &id,
                    RunState::Failed,
                    Some(format!("cannot load labware: {e}")),
                );
                continue;
            }
            for i in &run.instruments {
                self.reserved.insert(i.clone(), id.clone());
            }
            run.control.send_replace(Control::Resume);
            let ctx = Arc::new(RunContext::new(
                id.clone(),
                &run.protocol,
                Arc::clone(&self.lab),
                Arc::clone(&self.instruments),
                self.journal.clone(),
                self.clock,
                self.step_timeout_floor,
                run.control.subscribe(),
                self.updates.clone(),
                self.estop.clone(),
            ));
            let protocol = Arc::clone(&run.protocol);
            let results = Arc::clone(&ctx.durable_results);
            let task = tokio::spawn(run_protocol(ctx, protocol));
            if let Some(run) = self.runs.get_mut(&id) {
                run.task = Some(task);
                run.results = Some(results);
            }
            self.event(Some(&id), "started", None, json!({}));
            self.set_state(&id, RunState::Running, None);
        }
    }

    async fn shutdown(&mut self) {
        let active: Vec<String> = self
            .runs
            .values()
            .filter(|r| !r.state.is_terminal() && r.state != RunState::AwaitingApproval)
            .map(|r| r.run_id.clone())
            .collect();
        for id in active {
            if let Some(run) = self.runs.get(&id) {
                run.control.send_replace(Control::Abort);
            }
            self.set_state(&id, RunState::Aborted, Some("controller shut down".into()));
        }
        // All at once: an instrument that does not answer must not delay the others.
        let confirmations: Vec<_> = self
            .instruments
            .values()
            .map(|h| {
                let h = h.clone();
                tokio::spawn(async move { (h.safe_state(Duration::from_secs(3)).await, h.id) })
            })
            .collect();
        for confirmation in confirmations {
            if let Ok((false, id)) = confirmation.await {
                tracing::error!(instrument = %id, "could not confirm the safe state at shutdown");
            }
        }
        self.event(None, "controller_stopped", None, json!({}));
        // Make sure everything above is on disk before the process exits.
        let _ = self
            .journal
            .append_durable(Record::Event {
                run_id: None,
                kind: "journal_closed".into(),
                step: None,
                actor: None,
                detail: json!({}),
                at_ms: now_ms(),
            })
            .await;
    }
}

/// The run as the world model holds it.
fn mirror_of(run: &RunEntry) -> RunComponent {
    RunComponent {
        run_id: run.run_id.clone(),
        proposal_id: run.proposal_id.clone(),
        state: run.state,
        current_step: run.current_step.clone(),
        instruments: run.instruments.iter().cloned().collect(),
        vessels: run
            .vessels
            .iter()
            .map(|(v, p)| (v.clone(), p.clone()))
            .collect(),
    }
}

fn parse_state(s: &str) -> Option<RunState> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

fn info(r: &RunEntry) -> RunInfo {
    RunInfo {
        run_id: r.run_id.clone(),
        proposal_id: r.proposal_id.clone(),
        name: r.name.clone(),
        planner_id: r.planner_id.clone(),
        submitted_by: r.submitted_by.clone(),
        state: r.state,
        current_step: r.current_step.clone(),
        reason: r.reason.clone(),
        estimated_duration_s: r.estimated_duration_s,
        approval_required_because: r.approval_required_because.clone(),
        instruments: r.instruments.iter().cloned().collect(),
        results: r
            .results
            .as_ref()
            .map_or(0, |n| n.load(std::sync::atomic::Ordering::SeqCst)),
    }
}
