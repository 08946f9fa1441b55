//! A command-port session fed arbitrary bytes, as a serial line or an unauthenticated TCP client would
//! send them: never a panic, replies stay bounded, and an anonymous TCP session never reaches an action.
#![no_main]

use std::sync::Arc;

use labctl_command_port::Backend;
use labctl_command_port::session::{Link, Session, SessionConfig};
use labctl_core::api::{ApiError, Control, Face, Principal, RunInfo, RunState, SubmitReply};
use labctl_core::auth::AuthError;
use labctl_core::world::LabSnapshot;
use labctl_protocols::lab::Role;
use libfuzzer_sys::fuzz_target;

/// A lab that refuses every action and counts the attempts that reached it.
#[derive(Default)]
struct Refusing {
    actions: std::sync::atomic::AtomicUsize,
}

impl Refusing {
    fn acted(&self) {
        self.actions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Backend for Refusing {
    fn snapshot(&self) -> Arc<LabSnapshot> {
        Arc::new(LabSnapshot::default())
    }
    async fn submit(&self, _bytes: Vec<u8>, _who: Principal) -> SubmitReply {
        self.acted();
        SubmitReply::refused(None, ApiError::InvalidState("fuzzing".into()))
    }
    async fn run(&self, _run_id: &str) -> Option<RunInfo> {
        None
    }
    async fn control(
        &self,
        run_id: &str,
        _c: Control,
        _who: Principal,
    ) -> Result<RunState, ApiError> {
        self.acted();
        Err(ApiError::UnknownRun(run_id.to_owned()))
    }
    async fn approve(&self, run_id: &str, _who: Principal) -> Result<RunState, ApiError> {
        self.acted();
        Err(ApiError::UnknownRun(run_id.to_owned()))
    }
    async fn reject(
        &self,
        run_id: &str,
        _reason: &str,
        _who: Principal,
    ) -> Result<RunState, ApiError> {
        self.acted();
        Err(ApiError::UnknownRun(run_id.to_owned()))
    }
    async fn emergency_stop(&self, _who: Principal) -> Result<(), ApiError> {
        self.acted();
        Ok(())
    }
    async fn acknowledge_emergency_stop(&self, _who: Principal) -> Result<(), ApiError> {
        self.acted();
        Ok(())
    }
    async fn override_interlock(
        &self,
        interlock: &str,
        _duration: std::time::Duration,
        _reason: &str,
        _who: Principal,
    ) -> Result<(), ApiError> {
        self.acted();
        Err(ApiError::UnknownInterlock(interlock.to_owned()))
    }
    async fn withdraw_override(&self, interlock: &str, _who: Principal) -> Result<(), ApiError> {
        self.acted();
        Err(ApiError::UnknownInterlock(interlock.to_owned()))
    }
    async fn interlocks(&self) -> Vec<labctl_core::api::InterlockStatus> {
        Vec::new()
    }
    async fn login(
        &self,
        _user: &str,
        _password: &str,
        _source: labctl_core::auth::Source,
    ) -> Result<Role, AuthError> {
        Err(AuthError::Denied)
    }
    fn users_configured(&self) -> bool {
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let max_line = 256;
    for link in [
        Link::Tcp,
        Link::Serial(Principal::new("rig", Role::Technician, Face::InProcess)),
    ] {
        let tcp = link == Link::Tcp;
        let backend = Refusing::default();
        let mut session = Session::new(SessionConfig {
            idn: "labctl,sim,0,0".into(),
            link,
            max_line,
            peer: labctl_core::auth::Source::Local,
        });
        // Fed in two pieces: a line split across reads must behave as one.
        let (a, b) = data.split_at(data.len() / 2);
        let replies = rt.block_on(async {
            let mut r = session.feed(&backend, a).await;
            r.extend(session.feed(&backend, b).await);
            r
        });
        assert!(replies.len() <= data.len() + 1);
        if tcp {
            // Every login is denied, so nothing that changes state may reach the lab.
            assert_eq!(
                backend.actions.load(std::sync::atomic::Ordering::Relaxed),
                0
            );
        }
    }
});
