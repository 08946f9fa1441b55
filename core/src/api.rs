//! The one internal API every face of labctl uses (MQTT, OPC UA, command port, console, CLI), so the four
//! faces never disagree: submit, approve or reject, control runs, emergency stop, and subscribe.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use crate::contract::{
    ApiError, ClientInfo, Control, Face, InterlockState, InterlockStatus, MAX_OVERRIDE,
    OperatorConsent, Principal, RunInfo, RunState, SubmitReply, UnknownRunState,
};
use crate::journal::{JournalHandle, Record};
use crate::world::LabSnapshot;
pub use labctl_simulators::dry_run::{DryRunProblem, DryRunReport};

/// A submission already validated and dry-run by the caller's task, so the controller task never spends
/// that time (an emergency stop must not queue behind a dry run).
pub(crate) struct Checked {
    pub bytes: Vec<u8>,
    pub report: labctl_protocols::Report,
    pub dry_run: Option<labctl_simulators::dry_run::DryRunReport>,
    /// The run the journal already has for this proposal id (any process), looked up here too: the
    /// controller keeps only the proposals of runs in memory.
    pub stored: Option<crate::journal::read::ProposalRow>,
    /// The agent's operator's consent to this exact protocol, when a face asked for it.
    pub consent: Option<OperatorConsent>,
}

pub(crate) enum Request {
    Submit {
        checked: Box<Checked>,
        principal: Principal,
        reply: oneshot::Sender<SubmitReply>,
    },
    Approve {
        run_id: String,
        principal: Principal,
        reply: oneshot::Sender<Result<RunState, ApiError>>,
    },
    Reject {
        run_id: String,
        reason: String,
        principal: Principal,
        reply: oneshot::Sender<Result<RunState, ApiError>>,
    },
    Control {
        run_id: String,
        control: Control,
        principal: Principal,
        reply: oneshot::Sender<Result<RunState, ApiError>>,
    },
    EStop {
        principal: Principal,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    EStopAck {
        principal: Principal,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    OverrideInterlock {
        interlock: String,
        duration: std::time::Duration,
        reason: String,
        principal: Principal,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    WithdrawOverride {
        interlock: String,
        principal: Principal,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Interlocks {
        reply: oneshot::Sender<Vec<InterlockStatus>>,
    },
    PlannerLost {
        planner_id: String,
    },
    Runs {
        reply: oneshot::Sender<Vec<RunInfo>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A cheap, cloneable handle on the running controller.
#[derive(Clone)]
pub struct ControllerHandle {
    pub(crate) tx: mpsc::Sender<Request>,
    pub(crate) journal: JournalHandle,
    pub(crate) snapshot: watch::Receiver<Arc<LabSnapshot>>,
    pub(crate) lab: Arc<labctl_protocols::Lab>,
    pub(crate) estop: crate::safety::EStop,
    pub(crate) instruments:
        Arc<std::collections::BTreeMap<String, crate::instruments::InstrumentHandle>>,
    /// Where the journal lives: runs of earlier processes are read from it.
    pub(crate) data_dir: std::path::PathBuf,
    /// A reading connection to the journal, opened on first use (lookups off the controller's task).
    pub(crate) reader: Arc<std::sync::Mutex<Option<rusqlite::Connection>>>,
}

impl ControllerHandle {
    /// Runs `read` on the journal's reading connection, on a blocking thread; `None` when the journal
    /// cannot be read.
    async fn read_journal<T: Send + 'static>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> Option<T> + Send + 'static,
    ) -> Option<T> {
        let (reader, dir) = (Arc::clone(&self.reader), self.data_dir.clone());
        tokio::task::spawn_blocking(move || {
            let mut guard = reader.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = crate::journal::open_db(&dir).ok();
            }
            read(guard.as_ref()?)
        })
        .await
        .ok()
        .flatten()
    }

    /// An error for a run the controller does not hold: the journal may know it (finished earlier).
    async fn not_held(&self, e: ApiError) -> ApiError {
        let ApiError::UnknownRun(run_id) = e else {
            return e;
        };
        let id = run_id.clone();
        match self
            .read_journal(move |c| crate::journal::read::run_state(c, &id).ok().flatten())
            .await
        {
            Some(state) => ApiError::InvalidState(format!("run {run_id} is {state}")),
            None => ApiError::UnknownRun(run_id),
        }
    }

    /// Asks about a run; a run the controller does not hold is looked up in the journal for the answer.
    async fn ask_run(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<RunState, ApiError>>) -> Request,
    ) -> Result<RunState, ApiError> {
        match self.ask(make).await.unwrap_or(Err(ApiError::Unavailable)) {
            Err(e) => Err(self.not_held(e).await),
            ok => ok,
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Validates, dry-runs on the simulation model, and submits a protocol (raw bytes as received).
    pub async fn submit(&self, bytes: Vec<u8>, principal: Principal) -> SubmitReply {
        self.submit_with(bytes, principal, None).await
    }

    /// Submits a protocol the agent's operator consented to (see [`OperatorConsent`]): the consent is
    /// journaled with the run when its digest is that of `bytes`, and the submission is refused otherwise.
    /// It is no approval: the lab's approval policy applies as to any submission.
    pub async fn submit_with_consent(
        &self,
        bytes: Vec<u8>,
        principal: Principal,
        consent: OperatorConsent,
    ) -> SubmitReply {
        self.submit_with(bytes, principal, Some(consent)).await
    }

    async fn submit_with(
        &self,
        bytes: Vec<u8>,
        principal: Principal,
        consent: Option<OperatorConsent>,
    ) -> SubmitReply {
        if let Err(e) = crate::policy::check(&principal, crate::policy::Permission::Submit) {
            return SubmitReply::refused(None, e);
        }
        let lab = Arc::clone(&self.lab);
        let checked = tokio::task::spawn_blocking(move || {
            let report = labctl_protocols::validate_bytes(&bytes, &lab);
            let dry_run = report
                .protocol
                .as_ref()
                .map(|p| labctl_simulators::dry_run::dry_run(p, &lab, 1));
            Checked {
                bytes,
                report,
                dry_run,
                stored: None,
                consent,
            }
        })
        .await;
        let Ok(mut checked) = checked else {
            return SubmitReply::refused(None, ApiError::Unavailable);
        };
        if let Some(pid) = checked
            .report
            .protocol
            .as_ref()
            .map(|p| p.metadata.proposal_id.clone())
        {
            checked.stored = self
                .read_journal(move |c| crate::journal::read::proposal(c, &pid).ok().flatten())
                .await;
        }
        self.ask(|reply| Request::Submit {
            checked: Box::new(checked),
            principal,
            reply,
        })
        .await
        .unwrap_or_else(|| SubmitReply::refused(None, ApiError::Unavailable))
    }

    /// Validates a protocol (raw bytes) and, when valid, dry-runs it on the lab's physical model, off the
    /// async threads; nothing reaches the controller or the journal. `None` when the work could not run.
    pub async fn check(
        &self,
        bytes: Vec<u8>,
    ) -> Option<(labctl_protocols::Report, Option<DryRunReport>)> {
        let lab = Arc::clone(&self.lab);
        tokio::task::spawn_blocking(move || {
            let report = labctl_protocols::validate_bytes(&bytes, &lab);
            let dry_run = report
                .protocol
                .as_ref()
                .map(|p| labctl_simulators::dry_run::dry_run(p, &lab, 1));
            (report, dry_run)
        })
        .await
        .ok()
    }

    pub async fn approve(&self, run_id: &str, principal: Principal) -> Result<RunState, ApiError> {
        let run_id = run_id.to_owned();
        self.ask_run(|reply| Request::Approve {
            run_id,
            principal,
            reply,
        })
        .await
    }

    pub async fn reject(
        &self,
        run_id: &str,
        reason: &str,
        principal: Principal,
    ) -> Result<RunState, ApiError> {
        let (run_id, reason) = (run_id.to_owned(), reason.to_owned());
        self.ask_run(|reply| Request::Reject {
            run_id,
            reason,
            principal,
            reply,
        })
        .await
    }

    pub async fn control(
        &self,
        run_id: &str,
        control: Control,
        principal: Principal,
    ) -> Result<RunState, ApiError> {
        let run_id = run_id.to_owned();
        self.ask_run(|reply| Request::Control {
            run_id,
            control,
            principal,
            reply,
        })
        .await
    }

    /// Latches the emergency stop and sends every instrument to its safe state right here, in the caller's
    /// task, then tells the controller to abort the runs and record the latch: the stop never waits behind
    /// other requests.
    pub async fn emergency_stop(&self, principal: Principal) -> Result<(), ApiError> {
        if crate::policy::allows(principal.role, crate::policy::Permission::TriggerEStop) {
            self.estop.trigger();
            for h in self.instruments.values() {
                h.request_safe_state();
            }
        }
        self.ask(|reply| Request::EStop { principal, reply })
            .await
            .unwrap_or(Err(ApiError::Unavailable))
    }

    pub async fn acknowledge_emergency_stop(&self, principal: Principal) -> Result<(), ApiError> {
        self.ask(|reply| Request::EStopAck { principal, reply })
            .await
            .unwrap_or(Err(ApiError::Unavailable))
    }

    /// Lets runs use the instruments of a tripped interlock for `duration` (at most [`MAX_OVERRIDE`]) while
    /// its condition holds: a technician's explicit, journaled decision with a reason. It ends early when
    /// the condition clears or the technician withdraws it; then the interlock acts again.
    pub async fn override_interlock(
        &self,
        interlock: &str,
        duration: std::time::Duration,
        reason: &str,
        principal: Principal,
    ) -> Result<(), ApiError> {
        let (interlock, reason) = (interlock.to_owned(), reason.to_owned());
        self.ask(|reply| Request::OverrideInterlock {
            interlock,
            duration,
            reason,
            principal,
            reply,
        })
        .await
        .unwrap_or(Err(ApiError::Unavailable))
    }

    /// Ends an override: if the condition still holds, the interlock trips again at once.
    pub async fn withdraw_override(
        &self,
        interlock: &str,
        principal: Principal,
    ) -> Result<(), ApiError> {
        let interlock = interlock.to_owned();
        self.ask(|reply| Request::WithdrawOverride {
            interlock,
            principal,
            reply,
        })
        .await
        .unwrap_or(Err(ApiError::Unavailable))
    }

    /// Every interlock of the lab file and where it stands.
    pub async fn interlocks(&self) -> Vec<InterlockStatus> {
        self.ask(|reply| Request::Interlocks { reply })
            .await
            .unwrap_or_default()
    }

    /// The planner's connection is gone: supervised runs of that planner go to a safe hold.
    pub async fn planner_lost(&self, planner_id: &str) {
        let _ = self
            .tx
            .send(Request::PlannerLost {
                planner_id: planner_id.to_owned(),
            })
            .await;
    }

    pub async fn runs(&self) -> Vec<RunInfo> {
        self.ask(|reply| Request::Runs { reply })
            .await
            .unwrap_or_default()
    }

    /// A run of this process, or else of an earlier one (interrupted, finished), as the journal holds it.
    pub async fn run(&self, run_id: &str) -> Option<RunInfo> {
        if let Some(run) = self.runs().await.into_iter().find(|r| r.run_id == run_id) {
            return Some(run);
        }
        let id = run_id.to_owned();
        self.read_journal(move |conn| {
            let d = crate::journal::read::run_detail(conn, &id).ok()??;
            Some(RunInfo {
                state: d.summary.state.parse().ok()?,
                run_id: d.summary.run_id,
                proposal_id: d.summary.proposal_id,
                name: d.summary.name,
                planner_id: d.summary.planner_id,
                submitted_by: d.submitted_by,
                current_step: d.summary.current_step,
                reason: d.summary.reason,
                estimated_duration_s: d.estimated_duration_s,
                approval_required_because: Vec::new(),
                instruments: Vec::new(),
                results: u64::try_from(d.summary.results).unwrap_or(0),
            })
        })
        .await
    }

    /// A run's results with a sequence number above `after` (a reader's resume cursor), in order, at most
    /// `limit` of them, as the journal holds them; `None` when the journal cannot be read.
    pub async fn results(
        &self,
        run_id: &str,
        after: u64,
        limit: usize,
    ) -> Option<Vec<crate::journal::read::ResultRow>> {
        let id = run_id.to_owned();
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.read_journal(move |c| {
            let mut rows = crate::journal::read::results(c, &id, after).ok()?;
            rows.truncate(limit);
            Some(rows)
        })
        .await
    }

    /// A run as the journal records it: provenance, protocol and every event; `None` for a run the journal
    /// does not hold (or cannot read).
    pub async fn run_record(&self, run_id: &str) -> Option<crate::journal::read::RunDetail> {
        let id = run_id.to_owned();
        self.read_journal(move |c| crate::journal::read::run_detail(c, &id).ok().flatten())
            .await
    }

    /// The `limit` most recently submitted runs the journal holds (this process's and earlier ones), newest
    /// first; `None` when the journal cannot be read.
    pub async fn recent_runs(&self, limit: usize) -> Option<Vec<crate::journal::read::RunSummary>> {
        self.read_journal(move |c| crate::journal::read::recent_runs(c, limit).ok())
            .await
    }

    /// The newest `limit` journal events matching `filter`, newest first (a console's log).
    pub async fn journal_events(
        &self,
        filter: crate::journal::read::EventFilter,
        limit: usize,
    ) -> Option<Vec<crate::journal::read::LogRow>> {
        self.read_journal(move |c| crate::journal::read::events(c, &filter, limit).ok())
            .await
    }

    /// Journal records as they become durable: run states, step events, results.
    pub fn events(&self) -> broadcast::Receiver<Arc<Record>> {
        self.journal.subscribe()
    }

    /// The world model as of the last tick that changed it. Never waits on an instrument.
    pub fn snapshot(&self) -> Arc<LabSnapshot> {
        self.snapshot.borrow().clone()
    }

    pub fn watch_snapshot(&self) -> watch::Receiver<Arc<LabSnapshot>> {
        self.snapshot.clone()
    }

    /// The lab file the controller runs.
    pub fn lab(&self) -> &Arc<labctl_protocols::Lab> {
        &self.lab
    }

    /// Whether the emergency stop is latched now (read without asking the controller task).
    pub fn estop_latched(&self) -> bool {
        self.estop.is_latched()
    }

    /// Leaves every instrument safe and stops the controller.
    pub async fn shutdown(&self) {
        let _ = self.ask(|reply| Request::Shutdown { reply }).await;
    }
}
