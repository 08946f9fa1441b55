//! A stand-in for the controller behind a real [`ControllerHandle`], so that a face is tested alone: the
//! face talks to the same handle it gets in production (submissions are validated and dry-run in the
//! handle as always), and what reaches the controller is answered by a [`Script`] and recorded as a
//! [`Call`], with who asked. Nothing runs and no instrument exists; the journal is real (in the given
//! directory), so a test can also play the records a face publishes from.
//!
//! A [`Script`]'s defaults are the safe answers: submissions refused, run requests about unknown runs.
//! Every request passes the one role table first, as in the controller (a run's owner is whoever the
//! script's runs say submitted it); the emergency stop is latched and acknowledged as the controller does,
//! and journaled, so faces see the latch.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::api::{
    ApiError, Control, ControllerHandle, InterlockStatus, Principal, Request, RunInfo, RunState,
    SubmitReply,
};
use crate::journal::{self, JournalHandle, Record};
use crate::policy::{self, Permission};
use crate::safety::EStop;
use crate::world::LabSnapshot;

/// What the controller was asked, and by whom.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// A submission that reached the controller: its proposal id (none when it did not validate).
    Submit {
        proposal_id: Option<String>,
        principal: Principal,
    },
    Approve {
        run_id: String,
        principal: Principal,
    },
    Reject {
        run_id: String,
        reason: String,
        principal: Principal,
    },
    Control {
        run_id: String,
        control: Control,
        principal: Principal,
    },
    EmergencyStop {
        principal: Principal,
    },
    AcknowledgeEmergencyStop {
        principal: Principal,
    },
    OverrideInterlock {
        interlock: String,
        principal: Principal,
    },
    WithdrawOverride {
        interlock: String,
        principal: Principal,
    },
    PlannerLost {
        planner_id: String,
    },
}

/// How the fake controller answers. Each method has the safe default; a test overrides what it needs.
pub trait Script: Send + 'static {
    fn submit(&mut self, report: &labctl_protocols::Report, _principal: &Principal) -> SubmitReply {
        let proposal_id = report
            .protocol
            .as_ref()
            .map(|p| p.metadata.proposal_id.clone());
        SubmitReply::refused(
            proposal_id,
            ApiError::InvalidState("the fake controller runs nothing".into()),
        )
    }

    fn run_request(&mut self, run_id: &str, _principal: &Principal) -> Result<RunState, ApiError> {
        Err(ApiError::UnknownRun(run_id.to_owned()))
    }

    fn runs(&mut self) -> Vec<RunInfo> {
        Vec::new()
    }

    fn interlocks(&mut self) -> Vec<InterlockStatus> {
        Vec::new()
    }
}

/// The script with every default.
pub struct Defaults;

impl Script for Defaults {}

/// The fake controller: its handle for the face, and what it was asked.
pub struct FakeCore {
    pub handle: ControllerHandle,
    /// Feeds the snapshots faces read (instruments, runs, interlocks), as the tick would.
    pub snapshot: watch::Sender<Arc<LabSnapshot>>,
    /// The journal faces subscribe to: append records to play what the controller would record.
    pub journal: JournalHandle,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl FakeCore {
    /// Starts the fake on `lab`, journalling into `data_dir`.
    pub fn start(
        lab: labctl_protocols::Lab,
        data_dir: &Path,
        script: impl Script,
    ) -> Result<FakeCore, journal::JournalError> {
        let journal = journal::start(journal::open_db(data_dir)?);
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(LabSnapshot::default()));
        let (tx, rx) = mpsc::channel(256);
        let estop = EStop::default();
        let calls = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(answer(
            rx,
            script,
            Arc::clone(&calls),
            estop.clone(),
            journal.clone(),
        ));
        let handle = ControllerHandle {
            tx,
            journal: journal.clone(),
            snapshot: snapshot_rx,
            lab: Arc::new(lab),
            estop,
            instruments: Arc::new(BTreeMap::new()),
            data_dir: data_dir.to_owned(),
            reader: Arc::default(),
        };
        Ok(FakeCore {
            handle,
            snapshot,
            journal,
            calls,
        })
    }

    /// Everything the controller was asked so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

async fn answer(
    mut rx: mpsc::Receiver<Request>,
    mut script: impl Script,
    calls: Arc<Mutex<Vec<Call>>>,
    estop: EStop,
    journal: JournalHandle,
) {
    let record = |call: Call| {
        calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(call);
    };
    let latch = |latched: bool, principal: &Principal| {
        journal.append(Record::EStopLatch {
            latched,
            reason: None,
            actor: Some(principal.name.clone()),
            at_ms: journal::now_ms(),
        });
    };
    while let Some(request) = rx.recv().await {
        match request {
            Request::Submit {
                checked,
                principal,
                reply,
            } => {
                let proposal_id = checked
                    .report
                    .protocol
                    .as_ref()
                    .map(|p| p.metadata.proposal_id.clone());
                let answer = script.submit(&checked.report, &principal);
                record(Call::Submit {
                    proposal_id,
                    principal,
                });
                let _ = reply.send(answer);
            }
            Request::Approve {
                run_id,
                principal,
                reply,
            } => {
                let answer = policy::check(&principal, Permission::Approve)
                    .and_then(|()| script.run_request(&run_id, &principal));
                let _ = reply.send(answer);
                record(Call::Approve { run_id, principal });
            }
            Request::Reject {
                run_id,
                reason,
                principal,
                reply,
            } => {
                let answer = policy::check(&principal, Permission::Approve)
                    .and_then(|()| script.run_request(&run_id, &principal));
                let _ = reply.send(answer);
                record(Call::Reject {
                    run_id,
                    reason,
                    principal,
                });
            }
            Request::Control {
                run_id,
                control,
                principal,
                reply,
            } => {
                // Ownership as the script's runs say (a run it does not list is the script's to answer).
                let owner = script
                    .runs()
                    .into_iter()
                    .find(|r| r.run_id == run_id)
                    .map(|r| r.submitted_by);
                let allowed = match &owner {
                    Some(owner) => policy::check_run_control(&principal, owner, &run_id),
                    None => policy::check(&principal, Permission::ControlOwnRun),
                };
                let _ = reply.send(allowed.and_then(|()| script.run_request(&run_id, &principal)));
                record(Call::Control {
                    run_id,
                    control,
                    principal,
                });
            }
            // The latch as the controller keeps it, under the one role table.
            Request::EStop { principal, reply } => {
                let allowed = policy::check(&principal, Permission::TriggerEStop);
                if allowed.is_ok() {
                    estop.trigger();
                    latch(true, &principal);
                }
                let _ = reply.send(allowed);
                record(Call::EmergencyStop { principal });
            }
            Request::EStopAck { principal, reply } => {
                let allowed = policy::check(&principal, Permission::AcknowledgeEStop);
                if allowed.is_ok() && estop.acknowledge() {
                    latch(false, &principal);
                }
                let _ = reply.send(allowed);
                record(Call::AcknowledgeEmergencyStop { principal });
            }
            Request::OverrideInterlock {
                interlock,
                principal,
                reply,
                ..
            } => {
                let _ = reply.send(
                    policy::check(&principal, Permission::OverrideInterlock).and_then(|()| {
                        Err(ApiError::InvalidState(format!(
                            "interlock {interlock} is not tripped"
                        )))
                    }),
                );
                record(Call::OverrideInterlock {
                    interlock,
                    principal,
                });
            }
            Request::WithdrawOverride {
                interlock,
                principal,
                reply,
            } => {
                let _ = reply.send(
                    policy::check(&principal, Permission::OverrideInterlock).and_then(|()| {
                        Err(ApiError::InvalidState(format!(
                            "interlock {interlock} is not overridden"
                        )))
                    }),
                );
                record(Call::WithdrawOverride {
                    interlock,
                    principal,
                });
            }
            Request::Interlocks { reply } => {
                let _ = reply.send(script.interlocks());
            }
            Request::PlannerLost { planner_id } => record(Call::PlannerLost { planner_id }),
            Request::Runs { reply } => {
                let _ = reply.send(script.runs());
            }
            Request::Shutdown { reply } => {
                let _ = reply.send(());
                return;
            }
        }
    }
}
