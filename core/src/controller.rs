//! The controller: validates and approves proposals, reserves instruments, starts and supervises runs,
//! reacts to interlocks, the emergency stop and lost planners. One tokio task owns this state; every
//! interface talks to it through [`ControllerHandle`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use labctl_clock::VirtualClock;
use labctl_protocols::Protocol;
use labctl_protocols::lab::{Lab, TripAction};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{
    ApiError, Checked, Control, ControllerHandle, InterlockState, InterlockStatus, Principal,
    Request, RunInfo, RunState, SubmitReply,
};
use crate::contract::{Decision, EventDetail, InterlockTrip, ProposalRejection, RejectionReason};
use crate::executor::{RunContext, RunEnd, RunUpdate, collect_instruments, run_protocol};
use crate::instruments::InstrumentHandle;
use crate::journal::latch_block::{LatchBlock, LatchState};
use crate::journal::{self, JournalHandle, JournalHealth, Record, RunRecord, now_ms};
use crate::policy::{self, Permission};
use crate::safety::EStop;
use crate::world::{
    InterlockEvent, LabSnapshot, RunComponent, TickConfig, TickDriver, TickIo, TickThread, Trip,
    start_tick_on,
};

/// Puts a run's labware where its protocol says it stands, before the run starts. In a real lab the
/// technician does this (and the loader has nothing to do); the simulated lab places fresh vials itself.
pub trait LabwareLoader: Send + Sync {
    fn load(&self, run_id: &str, protocol: &Protocol) -> Result<(), LabwareError>;
}

/// A vessel that could not be put where its protocol says it stands.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LabwareError {
    #[error("{vessel}: {reason}")]
    Placement { vessel: String, reason: String },
    /// The loader's own state is unusable (the simulated lab's model lock is poisoned).
    #[error("{0}")]
    Unavailable(&'static str),
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
    start_on(config, instruments, estop, TickDriver::Thread).await
}

async fn start_on(
    config: ControllerConfig,
    instruments: BTreeMap<String, InstrumentHandle>,
    estop: EStop,
    tick_driver: TickDriver,
) -> Result<Controller, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    // The latch's own block first: a stop the journal could not record (a full disk) is there.
    let (latch_block, block_state) = LatchBlock::open(&config.data_dir)?;
    let conn = journal::open_db(&config.data_dir)?;
    let interrupted = journal::mark_interrupted(&conn)?;
    let pending = journal::read::awaiting_approval(&conn)?;
    // The latch as the last process left it, restored before any instrument takes a command and before any
    // face opens: a stop survives a crash and a restart, and only a technician releases it. Latched when
    // either record says so.
    let latched_before = match (journal::estop_latched(&conn)?, block_state) {
        (Some(reason), _) | (None, LatchState::Latched { reason }) => Some(reason),
        (None, LatchState::Released) => None,
    };
    if let Some(reason) = &latched_before {
        estop.trigger();
        latch_block
            .record(&LatchState::Latched {
                reason: reason.clone(),
            })
            .map_err(|source| journal::JournalError::LatchBlock {
                path: latch_block.path().to_owned(),
                source,
            })?;
    }
    // A technician's override stands for the time it was given, across a restart.
    let restored_overrides = journal::interlock_overrides(&conn, now_ms())?;
    let journal = journal::start(conn);
    journal.append(Record::Event {
        run_id: None,
        step: None,
        actor: None,
        detail: EventDetail::ControllerStarted {
            version: env!("CARGO_PKG_VERSION").into(),
            lab_id: config.lab.lab_id.clone(),
            lab_sha256: config.lab_sha256.clone(),
            interrupted_runs: interrupted.clone(),
        },
        at_ms: now_ms(),
    });
    if let Some(reason) = &latched_before {
        tracing::warn!(%reason, "the emergency stop was latched when labctl last stopped: it stays latched until a technician acknowledges it");
        journal.append(Record::Event {
            run_id: None,
            step: None,
            actor: None,
            detail: EventDetail::EstopRestored {
                reason: reason.clone(),
            },
            at_ms: now_ms(),
        });
    }
    // Reconcile, after `controller_started` so the journal reads in order: whatever state the last process
    // left the instruments in, each is made safe and the outcome journaled before anything new runs on it
    // (the instrument task serialises this safe state ahead of any later command; one still connecting
    // answers once its connect has made it safe).
    for h in instruments.values() {
        // Requested here, so no command issued before start returned can follow it.
        let confirmed = h.safe_state(Duration::from_secs(10));
        let (id, journal) = (h.id.clone(), journal.clone());
        tokio::spawn(async move {
            let ok = confirmed.await;
            journal.append(Record::Event {
                run_id: None,
                step: None,
                actor: None,
                detail: EventDetail::InstrumentSafe {
                    instrument: id.clone(),
                    confirmed: ok,
                },
                at_ms: now_ms(),
            });
        });
    }
    for h in instruments.values() {
        tokio::spawn(journal_arming(h.id.clone(), h.subscribe(), journal.clone()));
    }
    let (trips_tx, trips_rx) = mpsc::unbounded_channel();
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(LabSnapshot::default()));
    let (mirror_tx, mirror_rx) = mpsc::unbounded_channel();
    let handles: Vec<InstrumentHandle> = instruments.values().cloned().collect();
    let tick = start_tick_on(
        &config.lab,
        &handles,
        TickIo {
            trips: trips_tx,
            snapshot: snapshot_tx,
            run_updates: mirror_rx,
            estop: estop.clone(),
        },
        config.tick,
        tick_driver,
    );
    let (tx, rx) = mpsc::channel(256);
    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let lab = Arc::new(config.lab);
    let instruments = Arc::new(instruments);
    let mut core = Core {
        lab: Arc::clone(&lab),
        lab_sha256: config.lab_sha256,
        clock: config.clock,
        step_timeout_floor: config.step_timeout_floor,
        instruments: Arc::clone(&instruments),
        estop: estop.clone(),
        journal: journal.clone(),
        runs: BTreeMap::new(),
        order: Vec::new(),
        proposals: BTreeMap::new(),
        reserved: BTreeMap::new(),
        tripped: BTreeMap::new(),
        overrides: BTreeMap::new(),
        journal_failure: None,
        latch_block,
        labware: config.labware,
        updates: updates_tx,
        mirror: mirror_tx,
        next_id: 0,
    };
    core.restore_pending(pending);
    core.restore_overrides(restored_overrides);
    let health = journal.health();
    let task = tokio::spawn(core.run(rx, updates_rx, trips_rx, health));
    Ok(Controller {
        handle: ControllerHandle {
            tx,
            journal,
            snapshot: snapshot_rx,
            lab,
            estop,
            instruments,
            data_dir: config.data_dir.clone(),
            reader: Arc::default(),
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
    /// Why the controller asked the run to hold (an interlock, a lost planner): the pause's reason.
    hold_reason: Option<String>,
}

/// A proposal id as the controller knows it: bound to one run and one protocol, across restarts.
#[derive(Clone)]
struct KnownProposal {
    run_id: String,
    state: Option<RunState>,
    protocol_sha256: String,
}

impl RunEntry {
    fn new(
        run_id: String,
        protocol: Protocol,
        protocol_sha256: String,
        submitted_by: String,
        state: RunState,
        report: &labctl_protocols::Report,
    ) -> Self {
        let mut instruments = BTreeSet::new();
        collect_instruments(&protocol.steps, &mut instruments);
        let (control, _) = watch::channel(Control::Resume);
        let vessels = protocol
            .labware
            .iter()
            .map(|l| (l.id.clone(), l.location.to_ascii_uppercase()))
            .collect();
        RunEntry {
            proposal_id: protocol.metadata.proposal_id.clone(),
            name: protocol.metadata.name.clone(),
            planner_id: protocol.metadata.planner.id.clone(),
            submitted_by,
            supervised: protocol.metadata.supervised,
            protocol: Arc::new(protocol),
            protocol_sha256,
            state,
            current_step: None,
            reason: None,
            estimated_duration_s: report.estimated_duration_s,
            approval_required_because: report.approval_required_because.clone(),
            instruments,
            results: None,
            vessels,
            control,
            task: None,
            hold_reason: None,
            run_id,
        }
    }
}

/// Journals each instrument's arming (its recovery before a command) and disarming (a safe state), so the
/// journal tells when each instrument could move or heat (as the view shows it: a change undone before
/// the view was read again is not seen). Holds no handle, so it ends with the instrument's task.
async fn journal_arming(
    instrument: String,
    mut views: watch::Receiver<Arc<crate::instruments::InstrumentView>>,
    journal: JournalHandle,
) {
    let mut armed = views.borrow_and_update().armed;
    while views.changed().await.is_ok() {
        let now = views.borrow_and_update().armed;
        if now != armed {
            armed = now;
            journal.append(Record::Event {
                run_id: None,
                step: None,
                actor: None,
                detail: if armed {
                    EventDetail::InstrumentArmed {
                        instrument: instrument.clone(),
                    }
                } else {
                    EventDetail::InstrumentDisarmed {
                        instrument: instrument.clone(),
                    }
                },
                at_ms: now_ms(),
            });
        }
    }
}

/// Finished runs kept in memory; older ones are read from the journal.
pub const KEEP_FINISHED_RUNS: usize = 1000;
/// Runs one user may have awaiting approval, and queued, at once.
pub const MAX_AWAITING_APPROVAL_PER_USER: usize = 20;
pub const MAX_QUEUED_PER_USER: usize = 100;

/// An interlock override in force.
struct ActiveOverride {
    by: String,
    because: String,
    until_ms: i64,
    deadline: tokio::time::Instant,
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
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
    /// proposal id -> its run, for the runs in memory; older ones are looked up in the journal with each
    /// submission ([`Checked::stored`]).
    proposals: BTreeMap<String, KnownProposal>,
    /// instrument -> the run holding it.
    reserved: BTreeMap<String, String>,
    /// Interlocks whose condition holds now, by name: their instruments are inhibited.
    tripped: BTreeMap<String, Trip>,
    /// Technicians' overrides by interlock: while one is in force, its trips inhibit nothing.
    overrides: BTreeMap<String, ActiveOverride>,
    /// Why the journal cannot commit, while it cannot: nothing is dispatched.
    journal_failure: Option<String>,
    /// The latch's reserved block: written before anything else on a stop, so a stop holds across a
    /// restart even when the journal cannot commit.
    latch_block: LatchBlock,
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
        mut trips: mpsc::UnboundedReceiver<InterlockEvent>,
        mut health: watch::Receiver<JournalHealth>,
    ) {
        loop {
            tokio::select! {
                biased;
                Ok(()) = health.changed() => {
                    let now = health.borrow_and_update().clone();
                    self.on_journal_health(now);
                }
                Some(event) = trips.recv() => match event {
                    InterlockEvent::Tripped(trip) => self.on_trip(trip),
                    InterlockEvent::Cleared { interlock } => self.on_interlock_cleared(&interlock),
                },
                Some(update) = updates.recv() => self.on_update(update),
                () = until(self.overrides.values().map(|o| o.deadline).min()) => self.expire_overrides(),
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

    fn event(&self, run_id: Option<&str>, actor: Option<&Principal>, detail: EventDetail) {
        self.journal.append(Record::Event {
            run_id: run_id.map(str::to_owned),
            step: None,
            actor: actor.map(actor_of),
            detail,
            at_ms: now_ms(),
        });
    }

    fn decide(&self, run_id: &str, who: Option<&Principal>, decision: Decision) {
        self.journal.append(Record::Approval {
            run_id: run_id.to_owned(),
            actor: who.map(actor_of),
            decision,
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
            KnownProposal {
                run_id: run.run_id.clone(),
                state: Some(state),
                protocol_sha256: run.protocol_sha256.clone(),
            },
        );
        self.journal.append(Record::RunState {
            run_id: run_id.to_owned(),
            state,
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
            self.forget_old_finished_runs();
        }
    }

    /// Finished runs leave memory beyond the most recent [`KEEP_FINISHED_RUNS`] (with their protocols, up
    /// to 4 MiB each): the journal keeps them, and readers of older runs ask it.
    fn forget_old_finished_runs(&mut self) {
        let finished = self
            .order
            .iter()
            .filter(|id| self.runs.get(*id).is_some_and(|r| r.state.is_terminal()))
            .count();
        let mut excess = finished.saturating_sub(KEEP_FINISHED_RUNS);
        if excess == 0 {
            return;
        }
        let (runs, proposals) = (&mut self.runs, &mut self.proposals);
        self.order.retain(|id| {
            if excess > 0 && runs.get(id).is_some_and(|r| r.state.is_terminal()) {
                if let Some(run) = runs.remove(id) {
                    proposals.remove(&run.proposal_id);
                }
                excess -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Why `user` may not add another run now (awaiting approval or queued), if so.
    fn over_quota(&self, user: &str, needs_approval: bool) -> Option<String> {
        let (state, limit) = if needs_approval {
            (RunState::AwaitingApproval, MAX_AWAITING_APPROVAL_PER_USER)
        } else {
            (RunState::Queued, MAX_QUEUED_PER_USER)
        };
        let held = self
            .runs
            .values()
            .filter(|r| r.submitted_by == user && r.state == state)
            .count();
        (held >= limit).then(|| {
            format!(
                "{user} already has {held} runs {state} (at most {limit}); wait for them or abort some"
            )
        })
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
                let r = self.decide_durably(&run_id, &principal, None).await;
                let _ = reply.send(r);
                self.start_queued();
            }
            Request::Reject {
                run_id,
                reason,
                principal,
                reply,
            } => {
                let _ = reply.send(self.decide_durably(&run_id, &principal, Some(reason)).await);
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
                let _ = reply.send(self.emergency_stop(&principal).await);
            }
            Request::EStopAck { principal, reply } => {
                let _ = reply.send(self.acknowledge_emergency_stop(&principal).await);
                self.start_queued();
            }
            Request::OverrideInterlock {
                interlock,
                duration,
                reason,
                principal,
                reply,
            } => {
                let r = self
                    .override_interlock(&interlock, duration, &reason, &principal)
                    .await;
                let _ = reply.send(r);
                self.start_queued();
            }
            Request::WithdrawOverride {
                interlock,
                principal,
                reply,
            } => {
                let _ = reply.send(self.withdraw_override(&interlock, &principal).await);
            }
            Request::Interlocks { reply } => {
                let _ = reply.send(self.interlock_status());
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
            stored,
            consent,
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
            // The refusal names the proposal even when the document is invalid.
            let pid = report.proposal_id.clone();
            self.event(
                None,
                Some(&principal),
                EventDetail::ProposalRejected(ProposalRejection {
                    proposal_id: pid.clone(),
                    findings: Some(report.findings.len()),
                    ..Default::default()
                }),
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
                planner_id: None,
                error: None,
            };
        };
        let sha = sha256_hex(&bytes);
        let pid = protocol.metadata.proposal_id.clone();
        // A consent covers the protocol the operator was shown, byte for byte, and nothing else.
        if let Some(consent) = &consent
            && consent.protocol_sha256 != sha
        {
            return SubmitReply::refused(
                Some(pid),
                ApiError::BadArgument(format!(
                    "the operator consented to protocol sha256 {}, not to this one ({sha}): nothing was submitted",
                    consent.protocol_sha256
                )),
            );
        }
        let known = self.proposals.get(&pid).cloned().or_else(|| {
            stored.map(|row| KnownProposal {
                run_id: row.run_id,
                state: row.state.parse().ok(),
                protocol_sha256: row.protocol_sha256,
            })
        });
        if let Some(known) = known {
            let run_id = known.run_id.clone();
            // Idempotent for the same protocol only, whichever process recorded it first.
            if known.protocol_sha256 != sha {
                self.event(
                    None,
                    Some(&principal),
                    EventDetail::ProposalRejected(ProposalRejection {
                        proposal_id: Some(pid.clone()),
                        reason: Some(RejectionReason::ProposalIdReused),
                        run_id: Some(run_id.clone()),
                        ..Default::default()
                    }),
                );
                return SubmitReply::refused(
                    proposal_id,
                    ApiError::ProposalReused {
                        proposal_id: pid,
                        run_id,
                    },
                );
            }
            let state = self.runs.get(&run_id).map(|r| r.state).or(known.state);
            return SubmitReply {
                accepted: true,
                proposal_id,
                run_id: Some(run_id),
                state,
                duplicate: true,
                findings: report.findings,
                estimated_duration_s: report.estimated_duration_s,
                approval_required_because: report.approval_required_because,
                planner_id: Some(protocol.metadata.planner.id.clone()),
                error: None,
            };
        }
        if let Some(over) = self.over_quota(
            &principal.name,
            !report.approval_required_because.is_empty(),
        ) {
            self.event(
                None,
                Some(&principal),
                EventDetail::ProposalRejected(ProposalRejection {
                    proposal_id: Some(pid.clone()),
                    reason: Some(RejectionReason::Quota),
                    detail: Some(over.clone()),
                    ..Default::default()
                }),
            );
            return SubmitReply::refused(proposal_id, ApiError::OverQuota(over));
        }
        // While the emergency stop is latched nothing new is accepted, from any interface: a run queued
        // now would start the moment the latch is acknowledged, which nobody at the bench asked for.
        if self.estop.is_latched() {
            self.event(
                None,
                Some(&principal),
                EventDetail::ProposalRejected(ProposalRejection {
                    proposal_id: Some(pid.clone()),
                    reason: Some(RejectionReason::EstopLatched),
                    ..Default::default()
                }),
            );
            return SubmitReply::refused(proposal_id, ApiError::EStopLatched);
        }
        self.next_id += 1;
        let run_id = format!("run-{}-{}", now_ms(), self.next_id);
        let auto = report.approval_required_because.is_empty();
        let state = if auto {
            RunState::Queued
        } else {
            RunState::AwaitingApproval
        };
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
            state,
            estimated_duration_s: report.estimated_duration_s,
            submitted_at_ms: now_ms(),
        };
        // The planner is told "accepted" only once the run is on disk.
        if let Err(e) = self
            .journal
            .append_durable(Record::RunCreated(record))
            .await
        {
            return SubmitReply::refused(
                proposal_id,
                ApiError::Journal(format!("cannot record the run: {e}")),
            );
        }
        let decision = if auto {
            Decision::Approved {
                by: Some("policy".into()),
                estimated_duration_s: report.estimated_duration_s,
            }
        } else {
            // The validator's findings (warnings only: the proposal was accepted) travel with the decision
            // to wait, so every face shows an approver what was found without validating again.
            Decision::AwaitingApproval {
                because: report.approval_required_because.clone(),
                findings: report.findings.clone(),
                estimated_duration_s: report.estimated_duration_s,
            }
        };
        self.event(
            Some(&run_id),
            Some(&principal),
            submitted_detail(&pid, &sha, &principal),
        );
        // Used once, by this new run; recorded as the operator's consent, beside (never instead of) the
        // approval decision below.
        if let Some(consent) = &consent {
            self.event(
                Some(&run_id),
                Some(&principal),
                EventDetail::OperatorConsent(consent.clone()),
            );
        }
        if let Some(dry) = &dry_run {
            self.event(
                Some(&run_id),
                None,
                EventDetail::DryRun {
                    estimated_duration_s: dry.estimated_duration_s,
                    problems: dry.problems.clone(),
                    notes: dry.notes.clone(),
                    steps_simulated: dry.steps_simulated,
                },
            );
        }
        self.decide(&run_id, None, decision);
        let planner_id = protocol.metadata.planner.id.clone();
        let entry = RunEntry::new(
            run_id.clone(),
            protocol,
            sha,
            principal.name.clone(),
            state,
            &report,
        );
        self.runs.insert(run_id.clone(), entry);
        self.order.push(run_id.clone());
        self.set_state(&run_id, state, None);
        // Its provenance (face, client, the operator's consent) and the decision are on disk before the
        // submitter hears of the run, like the run itself. A failure here is the journal failing, which
        // stops the lab on its own; the run is recorded either way.
        if let Err(e) = self.journal.flush().await {
            tracing::error!(run_id, error = %e, "the run's provenance could not be recorded");
        }
        SubmitReply {
            accepted: true,
            proposal_id,
            run_id: Some(run_id),
            state: Some(state),
            duplicate: false,
            findings: report.findings,
            estimated_duration_s: report.estimated_duration_s,
            approval_required_because: report.approval_required_because,
            planner_id: Some(planner_id),
            error: None,
        }
    }

    /// A technician's decision is answered only once it is on disk: a restart never asks again for a
    /// decision reported as taken, nor forgets a rejection.
    async fn decide_durably(
        &mut self,
        run_id: &str,
        who: &Principal,
        reject: Option<String>,
    ) -> Result<RunState, ApiError> {
        let state = self.approve(run_id, who, reject)?;
        self.journal.flush().await.map_err(|e| {
            ApiError::Journal(format!(
                "the decision on run {run_id} could not be recorded: {e}"
            ))
        })?;
        Ok(state)
    }

    /// Approves (`reject` = None) or rejects a run awaiting approval.
    fn approve(
        &mut self,
        run_id: &str,
        who: &Principal,
        reject: Option<String>,
    ) -> Result<RunState, ApiError> {
        policy::check(who, Permission::Approve)?;
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
        let (state, decision) = match &reject {
            None => (
                RunState::Queued,
                Decision::Approved {
                    by: None,
                    estimated_duration_s: None,
                },
            ),
            Some(reason) => (
                RunState::Rejected,
                Decision::Rejected {
                    reason: reason.clone(),
                },
            ),
        };
        self.decide(run_id, Some(who), decision);
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
        policy::check_run_control(who, &run.submitted_by, run_id)?;
        let state = run.state;
        let interlocked = self.interlocks_holding(&run.instruments);
        let result = match (control, state) {
            (Control::Pause, RunState::Running) => {
                run.control.send_replace(Control::Pause);
                Ok(RunState::Running)
            }
            (Control::Resume, RunState::Paused) if self.estop.is_latched() => {
                Err(ApiError::EStopLatched)
            }
            (Control::Resume, RunState::Paused) if self.journal_failure.is_some() => {
                Err(ApiError::Journal(self.journal_failure_message()))
            }
            (Control::Resume, RunState::Paused) if !interlocked.is_empty() => {
                Err(ApiError::Interlocked(format!(
                    "cannot resume run {run_id}: interlock {} still holds",
                    interlocked.join(", ")
                )))
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
                Some(who),
                EventDetail::OperatorAction { control },
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

    async fn emergency_stop(&mut self, who: &Principal) -> Result<(), ApiError> {
        policy::check(who, Permission::TriggerEStop)?;
        let reason = format!("emergency stop by {}", who.name);
        self.stop_everything(&reason);
        self.event(None, Some(who), EventDetail::EstopTriggered {});
        // Acknowledged only once the latch is on disk: a restart finds it latched.
        self.record_latch(true, Some(reason), who)
            .await
            .map_err(|e| {
                ApiError::Journal(format!(
                    "the emergency stop is latched, but the journal could not record it: {e}"
                ))
            })
    }

    /// Writes the latch's state to the journal's `safety` table and waits until it is on disk.
    async fn record_latch(
        &self,
        latched: bool,
        reason: Option<String>,
        who: &Principal,
    ) -> Result<(), journal::JournalError> {
        self.journal
            .append_durable(Record::EStopLatch {
                latched,
                reason,
                actor: Some(actor_of(who)),
                at_ms: now_ms(),
            })
            .await
    }

    /// Latches the stop (in memory: every instrument task refuses commands from here), makes every
    /// instrument safe and aborts every run that is running, paused or queued.
    fn stop_everything(&mut self, reason: &str) {
        self.estop.trigger();
        // A page rewritten in place: one small synchronous write, needing no new space on the disk.
        if let Err(e) = self.latch_block.record(&LatchState::Latched {
            reason: reason.to_owned(),
        }) {
            tracing::error!(error = %e, path = %self.latch_block.path().display(), "the emergency-stop latch block could not be written; the journal's record is the only one");
        }
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
            self.set_state(id, RunState::Aborted, Some(reason.to_owned()));
        }
    }

    async fn acknowledge_emergency_stop(&mut self, who: &Principal) -> Result<(), ApiError> {
        policy::check(who, Permission::AcknowledgeEStop)?;
        // Released only once the release is on disk; while the journal cannot commit, the stop holds.
        self.record_latch(false, None, who).await.map_err(|e| {
            ApiError::Journal(format!(
                "the emergency stop stays latched: the journal could not record its release: {e}"
            ))
        })?;
        self.latch_block
            .record(&LatchState::Released)
            .map_err(|e| {
                ApiError::Journal(format!(
                    "the emergency stop stays latched: its latch block {} could not record the release: {e}",
                    self.latch_block.path().display()
                ))
            })?;
        let was = self.estop.acknowledge();
        self.event(
            None,
            Some(who),
            EventDetail::EstopAcknowledged { was_latched: was },
        );
        Ok(())
    }

    /// A failed journal commit is a safety event: the lab stops (the e-stop latch, so a technician's
    /// acknowledgement, which itself needs the journal, is the way back) and nothing is dispatched until
    /// commits succeed again.
    fn on_journal_health(&mut self, health: JournalHealth) {
        match health {
            JournalHealth::Failed(reason) => {
                tracing::error!(%reason, "the journal cannot commit: stopping the lab");
                let why = format!("journal failure: {reason}");
                self.journal_failure = Some(reason.clone());
                self.stop_everything(&why);
                // Kept by the writer and committed once the journal works again.
                self.event(
                    None,
                    None,
                    EventDetail::JournalFailed {
                        reason: reason.clone(),
                    },
                );
                self.journal.append(Record::EStopLatch {
                    latched: true,
                    reason: Some(why),
                    actor: None,
                    at_ms: now_ms(),
                });
            }
            JournalHealth::Healthy => {
                if let Some(reason) = self.journal_failure.take() {
                    tracing::warn!(was = %reason, "the journal commits again; the emergency stop stays latched until a technician acknowledges it");
                    self.event(
                        None,
                        None,
                        EventDetail::JournalRecovered {
                            was: reason.clone(),
                        },
                    );
                }
            }
        }
    }

    fn journal_failure_message(&self) -> String {
        format!(
            "the journal cannot commit ({}): nothing runs until it can",
            self.journal_failure.as_deref().unwrap_or("unknown")
        )
    }

    /// The interlocks whose condition holds now on any of `instruments`.
    fn interlocks_holding(&self, instruments: &BTreeSet<String>) -> Vec<String> {
        self.tripped
            .values()
            .filter(|t| !self.overrides.contains_key(&t.interlock))
            .filter(|t| {
                instruments.contains(&t.instrument)
                    || t.safe_state.iter().any(|i| instruments.contains(i))
            })
            .map(|t| t.interlock.clone())
            .collect()
    }

    /// Runs awaiting a technician's decision when the last process stopped: validated again against the
    /// lab as it is now and dry-run again, then awaiting approval again, with the same run id.
    fn restore_pending(&mut self, pending: Vec<journal::read::PendingRow>) {
        for row in pending {
            let bytes = row.protocol_json.into_bytes();
            let mut report = labctl_protocols::validate_bytes(&bytes, &self.lab);
            let Some(protocol) = report.protocol.clone() else {
                let reason = format!(
                    "no longer valid for this lab after a restart: {} finding(s)",
                    report.findings.len()
                );
                self.journal.append(Record::RunState {
                    run_id: row.run_id.clone(),
                    state: RunState::Rejected,
                    step: None,
                    reason: Some(reason),
                    at_ms: now_ms(),
                });
                continue;
            };
            let dry = labctl_simulators::dry_run::dry_run(&protocol, &self.lab, 1);
            report.estimated_duration_s = Some(dry.estimated_duration_s);
            report
                .approval_required_because
                .push("awaiting approval when the controller restarted".into());
            self.event(
                Some(&row.run_id),
                None,
                EventDetail::ApprovalRestored {
                    because: report.approval_required_because.clone(),
                    estimated_duration_s: dry.estimated_duration_s,
                    problems: dry.problems.clone(),
                },
            );
            let entry = RunEntry::new(
                row.run_id.clone(),
                protocol,
                row.protocol_sha256,
                row.submitted_by,
                RunState::AwaitingApproval,
                &report,
            );
            let _ = self.mirror.send(mirror_of(&entry));
            self.order.push(row.run_id.clone());
            self.runs.insert(row.run_id, entry);
        }
    }

    fn planner_lost(&mut self, planner_id: &str) {
        let held: Vec<String> = self
            .runs
            .values()
            .filter(|r| r.supervised && r.planner_id == planner_id && r.state == RunState::Running)
            .map(|r| r.run_id.clone())
            .collect();
        for id in held {
            if let Some(run) = self.runs.get_mut(&id) {
                run.hold_reason = Some(format!("planner {planner_id} lost: safe hold"));
                run.control.send_replace(Control::Pause);
            }
            self.safe_state_of_run(&id);
            self.event(
                Some(&id),
                None,
                EventDetail::PlannerLost {
                    planner_id: planner_id.to_owned(),
                    action: "safe hold".into(),
                },
            );
        }
    }

    fn on_trip(&mut self, trip: Trip) {
        if let Some(o) = self.overrides.get(&trip.interlock) {
            self.event(
                None,
                None,
                EventDetail::InterlockOverridden {
                    interlock: trip.interlock.clone(),
                    reason: trip.reason.clone(),
                    override_by: o.by.clone(),
                    until_ms: o.until_ms,
                },
            );
            self.tripped.insert(trip.interlock.clone(), trip);
            return;
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
        let again = self.tripped.contains_key(&trip.interlock);
        // The runs hear the decision before the instruments go safe, so none issues a new command in between
        // (a command already issued is refused by the instrument's safe-state epoch).
        for id in &affected {
            if let Some(run) = self.runs.get_mut(id) {
                run.hold_reason = Some(format!("interlock {}: {}", trip.interlock, trip.reason));
                run.control.send_replace(match trip.action {
                    TripAction::Pause => Control::Pause,
                    TripAction::Fail => Control::Abort,
                });
            }
        }
        for id in &trip.safe_state {
            if let Some(h) = self.instruments.get(id) {
                h.request_safe_state();
            }
        }
        self.event(
            None,
            None,
            EventDetail::Interlock(InterlockTrip {
                interlock: trip.interlock.clone(),
                instrument: Some(trip.instrument.clone()),
                reason: trip.reason.clone(),
                action: Some(trip.action),
                safe_state: Some(trip.safe_state.clone()),
                runs: Some(affected.to_vec()),
                again: Some(again),
            }),
        );
        for id in affected {
            self.event(
                Some(&id),
                None,
                EventDetail::Interlock(InterlockTrip {
                    interlock: trip.interlock.clone(),
                    instrument: Some(trip.instrument.clone()),
                    reason: trip.reason.clone(),
                    action: None,
                    safe_state: None,
                    runs: None,
                    again: None,
                }),
            );
            if trip.action == TripAction::Fail {
                self.set_state(
                    &id,
                    RunState::Failed,
                    Some(format!("interlock {}: {}", trip.interlock, trip.reason)),
                );
            }
        }
        self.tripped.insert(trip.interlock.clone(), trip);
        self.start_queued();
    }

    /// The condition no longer holds: its instruments may serve runs again (paused runs wait for a resume).
    fn on_interlock_cleared(&mut self, interlock: &str) {
        // An override is for the condition it was given for: the next trip acts again.
        if self.overrides.remove(interlock).is_some() {
            self.record_override_end(interlock, "the condition cleared");
        }
        if self.tripped.remove(interlock).is_some() {
            self.event(
                None,
                None,
                EventDetail::InterlockCleared {
                    interlock: interlock.to_owned(),
                },
            );
            self.start_queued();
        }
    }

    async fn override_interlock(
        &mut self,
        interlock: &str,
        duration: Duration,
        reason: &str,
        who: &Principal,
    ) -> Result<(), ApiError> {
        policy::check(who, Permission::OverrideInterlock)?;
        if !self.lab.interlocks.iter().any(|i| i.name == interlock) {
            return Err(ApiError::UnknownInterlock(interlock.to_owned()));
        }
        if reason.trim().is_empty() {
            return Err(ApiError::BadArgument(
                "reason: an override needs a reason for the journal".into(),
            ));
        }
        if duration.is_zero() || duration > crate::api::MAX_OVERRIDE {
            return Err(ApiError::BadArgument(format!(
                "duration: expected more than 0 s and at most {} s, got {} s",
                crate::api::MAX_OVERRIDE.as_secs(),
                duration.as_secs_f64()
            )));
        }
        let Some(trip) = self.tripped.get(interlock) else {
            return Err(ApiError::InvalidState(format!(
                "interlock {interlock} is not tripped: there is nothing to override"
            )));
        };
        let trip_reason = trip.reason.clone();
        let until_ms = now_ms() + i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        // In force only once it is on disk.
        self.journal
            .append_durable(Record::InterlockOverride {
                interlock: interlock.to_owned(),
                until_ms: Some(until_ms),
                reason: reason.to_owned(),
                actor: Some(actor_of(who)),
                at_ms: now_ms(),
            })
            .await
            .map_err(|e| {
                ApiError::Journal(format!(
                    "the override was not set: the journal could not record it: {e}"
                ))
            })?;
        tracing::warn!(interlock, by = %who.name, reason, seconds = duration.as_secs_f64(), "interlock overridden");
        self.event(
            None,
            Some(who),
            EventDetail::InterlockOverride {
                interlock: interlock.to_owned(),
                because: reason.to_owned(),
                condition: trip_reason.clone(),
                until_ms,
            },
        );
        self.overrides.insert(
            interlock.to_owned(),
            ActiveOverride {
                by: actor_of(who),
                because: reason.to_owned(),
                until_ms,
                deadline: tokio::time::Instant::now() + duration,
            },
        );
        Ok(())
    }

    async fn withdraw_override(
        &mut self,
        interlock: &str,
        who: &Principal,
    ) -> Result<(), ApiError> {
        policy::check(who, Permission::OverrideInterlock)?;
        if !self.overrides.contains_key(interlock) {
            return Err(ApiError::InvalidState(format!(
                "interlock {interlock} is not overridden"
            )));
        }
        self.overrides.remove(interlock);
        self.record_override_end(interlock, &format!("withdrawn by {}", who.name));
        self.trip_again(interlock);
        Ok(())
    }

    /// Overrides whose time is up end; an interlock whose condition still holds trips again at once.
    fn expire_overrides(&mut self) {
        let now = tokio::time::Instant::now();
        let expired: Vec<String> = self
            .overrides
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            self.overrides.remove(&name);
            self.record_override_end(&name, "its time ran out");
            self.trip_again(&name);
        }
    }

    fn trip_again(&mut self, interlock: &str) {
        if let Some(trip) = self.tripped.get(interlock).cloned() {
            self.on_trip(trip);
        }
    }

    /// An override ending makes the lab safer, so it takes effect at once; the record follows.
    fn record_override_end(&self, interlock: &str, why: &str) {
        tracing::warn!(interlock, why, "interlock override ended");
        self.journal.append(Record::InterlockOverride {
            interlock: interlock.to_owned(),
            until_ms: None,
            reason: why.to_owned(),
            actor: None,
            at_ms: now_ms(),
        });
        self.event(
            None,
            None,
            EventDetail::InterlockOverrideEnded {
                interlock: interlock.to_owned(),
                why: why.to_owned(),
            },
        );
    }

    fn restore_overrides(&mut self, stored: Vec<journal::StoredOverride>) {
        let now = now_ms();
        for o in stored {
            if !self.lab.interlocks.iter().any(|i| i.name == o.interlock) {
                continue;
            }
            let left = Duration::from_millis(u64::try_from(o.until_ms - now).unwrap_or(0));
            self.event(
                None,
                None,
                EventDetail::InterlockOverrideRestored {
                    interlock: o.interlock.clone(),
                    by: o.actor.clone(),
                    because: o.reason.clone(),
                    until_ms: o.until_ms,
                },
            );
            self.overrides.insert(
                o.interlock,
                ActiveOverride {
                    by: o.actor.unwrap_or_default(),
                    because: o.reason,
                    until_ms: o.until_ms,
                    deadline: tokio::time::Instant::now() + left,
                },
            );
        }
    }

    fn interlock_status(&self) -> Vec<InterlockStatus> {
        self.lab
            .interlocks
            .iter()
            .map(|il| {
                let state = match (self.tripped.get(&il.name), self.overrides.get(&il.name)) {
                    (None, _) => InterlockState::Clear,
                    (Some(t), None) => InterlockState::Tripped {
                        reason: t.reason.clone(),
                    },
                    (Some(t), Some(o)) => InterlockState::Overridden {
                        reason: t.reason.clone(),
                        by: o.by.clone(),
                        because: o.because.clone(),
                        until_ms: o.until_ms,
                    },
                };
                InterlockStatus {
                    name: il.name.clone(),
                    state,
                }
            })
            .collect()
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
                if let Some(run) = self.runs.get_mut(&run_id)
                    && run.state == RunState::Running
                {
                    let reason = run.hold_reason.take().unwrap_or(reason);
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
        if self.estop.is_latched() || self.journal_failure.is_some() {
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
            // Busy instruments, and instruments an interlock holds safe: the run waits in the queue.
            if run
                .instruments
                .iter()
                .any(|i| self.reserved.contains_key(i))
                || !self.interlocks_holding(&run.instruments).is_empty()
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
            self.event(Some(&id), None, EventDetail::Started {});
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
                let (confirmed, id) = (h.safe_state(Duration::from_secs(3)), h.id.clone());
                tokio::spawn(async move { (confirmed.await, id) })
            })
            .collect();
        for confirmation in confirmations {
            if let Ok((false, id)) = confirmation.await {
                tracing::error!(instrument = %id, "could not confirm the safe state at shutdown");
            }
        }
        self.event(None, None, EventDetail::ControllerStopped {});
        // Make sure everything above is on disk before the process exits.
        let _ = self
            .journal
            .append_durable(Record::Event {
                run_id: None,
                step: None,
                actor: None,
                detail: EventDetail::JournalClosed {},
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

/// The `submitted` event's detail: the proposal, the digest of its exact bytes, and its provenance: the
/// face it came through and, when the face knows it, the client program and the agent's declared model.
fn submitted_detail(proposal_id: &str, sha: &str, principal: &Principal) -> EventDetail {
    EventDetail::Submitted {
        proposal_id: proposal_id.to_owned(),
        protocol_sha256: sha.to_owned(),
        via: principal.via,
        client: principal.client.clone(),
    }
}

/// How the journal names who did something.
fn actor_of(p: &Principal) -> String {
    format!("{} ({:?} via {})", p.name, p.role, p.via)
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

#[cfg(test)]
mod tests;
