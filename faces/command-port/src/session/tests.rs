//! The session against a fake lab: every command, the error queue, login and roles, garbage and
//! over-long lines.

use std::sync::{Arc, Mutex};

use labctl_core::instruments::DeviceState;
use labctl_protocols::lab::Role;
use labctl_protocols::{Finding, FindingCode};

use super::*;
use crate::Backend;
use labctl_core::api::{ApiError, Control, Principal, RunInfo, RunState, SubmitReply};
use labctl_core::auth::AuthError;
use labctl_core::instruments::{Connection, InstrumentView};
use labctl_core::world::LabSnapshot;

struct Fake {
    snapshot: Mutex<Arc<LabSnapshot>>,
    runs: Mutex<Vec<RunInfo>>,
    calls: Mutex<Vec<String>>,
    users: bool,
}

fn view(id: &str, connection: Connection, values: Vec<(&'static str, f64)>) -> InstrumentView {
    InstrumentView {
        id: id.into(),
        connection,
        identity: None,
        state: Some(DeviceState::Idle),
        values,
        last_seen: None,
        busy: false,
        armed: true,
    }
}

fn run_info(run_id: &str, state: RunState, by: &str) -> RunInfo {
    RunInfo {
        run_id: run_id.into(),
        proposal_id: "p".into(),
        name: "n".into(),
        planner_id: "planner".into(),
        submitted_by: by.into(),
        state,
        current_step: Some("mix".into()),
        reason: None,
        estimated_duration_s: None,
        approval_required_because: Vec::new(),
        instruments: Vec::new(),
        results: 3,
    }
}

impl Fake {
    fn new() -> Fake {
        let mut hotplate = view(
            "hotplate",
            Connection::Online,
            vec![("plate_temperature_c", 25.5), ("stir_rpm", 0.0)],
        );
        hotplate.state = Some(DeviceState::Alarm("watchdog".into()));
        let mut pump = view("pump-red", Connection::Lost("no reply".into()), vec![]);
        pump.state = None;
        let snapshot = LabSnapshot {
            lab_id: "sim".into(),
            instruments: vec![hotplate.into(), pump.into()],
            ..Default::default()
        };
        Fake {
            snapshot: Mutex::new(Arc::new(snapshot)),
            runs: Mutex::new(vec![
                run_info("run-7", RunState::Running, "rig-1"),
                run_info("done-1", RunState::Completed, "serial:/dev/ttyS1"),
                run_info("soak-2", RunState::AwaitingApproval, "planner-bo"),
            ]),
            calls: Mutex::new(Vec::new()),
            users: true,
        }
    }

    fn set_latched(&self, latched: bool) {
        let mut s = self.snapshot.lock().unwrap();
        let mut next = (**s).clone();
        next.estop_latched = latched;
        *s = Arc::new(next);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// A decision on a run awaiting approval, under the core's role table.
    fn decide(&self, run_id: &str, who: &Principal, to: RunState) -> Result<RunState, ApiError> {
        labctl_core::policy::check(who, labctl_core::policy::Permission::Approve)?;
        let mut runs = self.runs.lock().unwrap();
        let run = runs
            .iter_mut()
            .find(|r| r.run_id == run_id)
            .ok_or_else(|| ApiError::UnknownRun(run_id.into()))?;
        if run.state != RunState::AwaitingApproval {
            return Err(ApiError::InvalidState(format!(
                "run {run_id} is {}, not awaiting approval",
                run.state
            )));
        }
        run.state = to;
        Ok(to)
    }
}

impl Backend for Fake {
    fn snapshot(&self) -> Arc<LabSnapshot> {
        self.snapshot.lock().unwrap().clone()
    }

    async fn submit(&self, bytes: Vec<u8>, who: Principal) -> SubmitReply {
        self.calls.lock().unwrap().push(format!(
            "submit {} {}",
            who.name,
            String::from_utf8_lossy(&bytes)
        ));
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if value.get("bad").is_some() {
            let mut reply = SubmitReply::refused(None, ApiError::Unavailable);
            reply.error = None;
            reply.findings = vec![
                Finding::error(
                    FindingCode::Schema,
                    "/steps/0/params/volume_ul",
                    "volume 90000 uL is above the capacity 10000 uL",
                ),
                Finding::error(FindingCode::Schema, "/steps/1", "second"),
            ];
            return reply;
        }
        let mut reply = SubmitReply::refused(Some("p".into()), ApiError::Unavailable);
        reply.error = None;
        reply.accepted = true;
        reply.run_id = Some("run-1".into());
        reply.state = Some(RunState::Queued);
        reply
    }

    async fn run(&self, run_id: &str) -> Option<RunInfo> {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.run_id == run_id)
            .cloned()
    }

    async fn control(
        &self,
        run_id: &str,
        control: Control,
        who: Principal,
    ) -> Result<RunState, ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{control:?} {run_id} {}", who.name));
        let runs = self.runs.lock().unwrap();
        let run = runs
            .iter()
            .find(|r| r.run_id == run_id)
            .ok_or_else(|| ApiError::UnknownRun(run_id.into()))?;
        labctl_core::policy::check_run_control(&who, &run.submitted_by, run_id)?;
        if run.state.is_terminal() {
            return Err(ApiError::InvalidState(format!(
                "cannot {control:?} run {run_id}: it is {}",
                run.state
            )));
        }
        Ok(run.state)
    }

    async fn approve(&self, run_id: &str, who: Principal) -> Result<RunState, ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("approve {run_id} {}", who.name));
        self.decide(run_id, &who, RunState::Queued)
    }

    async fn reject(
        &self,
        run_id: &str,
        reason: &str,
        who: Principal,
    ) -> Result<RunState, ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("reject {run_id} {reason:?} {}", who.name));
        self.decide(run_id, &who, RunState::Rejected)
    }

    async fn emergency_stop(&self, who: Principal) -> Result<(), ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("estop {}", who.name));
        self.set_latched(true);
        Ok(())
    }

    async fn acknowledge_emergency_stop(&self, who: Principal) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push(format!("ack {}", who.name));
        self.set_latched(false);
        Ok(())
    }

    async fn override_interlock(
        &self,
        interlock: &str,
        duration: std::time::Duration,
        reason: &str,
        who: Principal,
    ) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push(format!(
            "override {interlock} {}s {reason:?} {}",
            duration.as_secs_f64(),
            who.name
        ));
        if interlock != "pump-alarm" {
            return Err(ApiError::UnknownInterlock(interlock.into()));
        }
        Ok(())
    }

    async fn withdraw_override(&self, interlock: &str, who: Principal) -> Result<(), ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("withdraw {interlock} {}", who.name));
        Ok(())
    }

    async fn interlocks(&self) -> Vec<labctl_core::api::InterlockStatus> {
        use labctl_core::api::{InterlockState, InterlockStatus};
        vec![
            InterlockStatus {
                name: "hotplate-overtemp".into(),
                state: InterlockState::Clear,
            },
            InterlockStatus {
                name: "pump-alarm".into(),
                state: InterlockState::Overridden {
                    reason: "pump-red: alarm: stalled".into(),
                    by: "alice".into(),
                    because: "sensor fault, checked by hand".into(),
                    until_ms: 1,
                },
            },
        ]
    }

    async fn login(
        &self,
        user: &str,
        password: &str,
        _source: labctl_core::auth::Source,
    ) -> Result<Role, AuthError> {
        match (user, password) {
            ("alice", "technician-dev") => Ok(Role::Technician),
            ("rig-1", "rig-dev") => Ok(Role::Rig),
            ("watcher", "observer-dev") => Ok(Role::Observer),
            ("locked", _) => Err(AuthError::Throttled {
                user: "locked".into(),
                retry_in_s: 8,
            }),
            _ => Err(AuthError::Denied),
        }
    }

    fn users_configured(&self) -> bool {
        self.users
    }
}

const IDN: &str = "labctl,sim,host-1234,0.1.0";

fn tcp() -> Session {
    Session::new(SessionConfig {
        idn: IDN.into(),
        link: Link::Tcp,
        max_line: MAX_LINE,
        peer: labctl_core::auth::Source::Local,
    })
}

fn serial(role: Role) -> Session {
    Session::new(SessionConfig {
        idn: IDN.into(),
        link: Link::Serial(Principal::new("serial:/dev/ttyS1", role, VIA)),
        max_line: MAX_LINE,
        peer: labctl_core::auth::Source::Local,
    })
}

async fn say(s: &mut Session, lab: &Fake, text: &str) -> Vec<String> {
    s.feed(lab, format!("{text}\n").as_bytes()).await
}

/// Drains the error queue, oldest first.
async fn errors(s: &mut Session, lab: &Fake) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let reply = say(s, lab, "SYST:ERR?").await;
        assert_eq!(reply.len(), 1, "{reply:?}");
        if reply[0] == "0,\"No error\"" {
            return out;
        }
        out.push(reply[0].clone());
        assert!(out.len() <= ERROR_QUEUE_DEPTH, "queue never empties");
    }
}

fn codes(errors: &[String]) -> Vec<i32> {
    errors
        .iter()
        .map(|e| e.split(',').next().unwrap().parse().unwrap())
        .collect()
}

async fn login(s: &mut Session, lab: &Fake, user: &str, password: &str) {
    assert!(
        say(s, lab, &format!("SYST:LOGIN {user},{password}"))
            .await
            .is_empty()
    );
    assert_eq!(errors(s, lab).await, Vec::<String>::new());
}

#[tokio::test]
async fn common_commands_answer_and_queries_in_one_message_share_a_line() {
    let lab = Fake::new();
    let mut s = tcp();
    assert_eq!(say(&mut s, &lab, "*IDN?").await, [IDN]);
    assert_eq!(say(&mut s, &lab, "*idn?;*OPC?").await, [format!("{IDN};1")]);
    assert!(say(&mut s, &lab, "*RST").await.is_empty());
    assert!(say(&mut s, &lab, "*WAI").await.is_empty());
    assert!(say(&mut s, &lab, "*OPC").await.is_empty());
    assert_eq!(say(&mut s, &lab, "*ESR?").await, ["1"]);
    assert_eq!(say(&mut s, &lab, "*ESR?").await, ["0"]);
    assert_eq!(say(&mut s, &lab, "SYST:ERR?").await, ["0,\"No error\""]);
    // \r\n, several lines in one read, blank lines and a trailing `;`
    assert_eq!(
        s.feed(&lab, b"*OPC?\r\n\r\n*IDN?;\n").await,
        ["1".to_owned(), IDN.to_owned()]
    );
    // A line split over several reads.
    assert!(s.feed(&lab, b"*ID").await.is_empty());
    assert_eq!(s.feed(&lab, b"N?\n").await, [IDN]);
}

#[tokio::test]
async fn the_error_queue_is_oldest_first_and_cleared_by_cls() {
    let lab = Fake::new();
    let mut s = tcp();
    assert!(say(&mut s, &lab, "FOO:BAR").await.is_empty());
    assert!(say(&mut s, &lab, "*IDN? 5").await.is_empty());
    assert!(say(&mut s, &lab, "INST:STAT?").await.is_empty()); // needs login first: -203
    assert_eq!(say(&mut s, &lab, "SYST:ERR:COUN?").await, ["3"]);
    assert_eq!(
        say(&mut s, &lab, "SYST:ERR?").await,
        ["-113,\"Undefined header;FOO:BAR\""]
    );
    assert_eq!(
        say(&mut s, &lab, "system:error:next?").await,
        ["-108,\"Parameter not allowed;*IDN? takes no parameters\""]
    );
    let rest = errors(&mut s, &lab).await;
    assert_eq!(codes(&rest), [-203]);
    assert!(rest[0].contains("log in first"), "{rest:?}");
    assert_eq!(say(&mut s, &lab, "SYST:ERR?").await, ["0,\"No error\""]);

    assert_eq!(say(&mut s, &lab, "*ESR?").await, ["48"]); // CME and EXE so far
    say(&mut s, &lab, "NOPE").await;
    assert_eq!(say(&mut s, &lab, "*ESR?").await, ["32"]); // CME
    say(&mut s, &lab, "NOPE").await;
    assert!(say(&mut s, &lab, "*CLS").await.is_empty());
    assert_eq!(
        say(&mut s, &lab, ":SYSTem:ERRor?").await,
        ["0,\"No error\""]
    );
}

#[tokio::test]
async fn a_full_queue_keeps_the_oldest_and_says_it_overflowed() {
    let lab = Fake::new();
    let mut s = tcp();
    for _ in 0..ERROR_QUEUE_DEPTH + 5 {
        say(&mut s, &lab, "BAD").await;
    }
    let all = errors(&mut s, &lab).await;
    assert_eq!(all.len(), ERROR_QUEUE_DEPTH);
    assert_eq!(all[0], "-113,\"Undefined header;BAD\"");
    assert_eq!(all.last().unwrap(), "-350,\"Queue overflow\"");
}

#[tokio::test]
async fn a_command_error_drops_the_rest_of_the_line_an_execution_error_does_not() {
    let lab = Fake::new();
    let mut s = serial(Role::Rig);
    assert!(say(&mut s, &lab, "FOO;*IDN?").await.is_empty());
    assert_eq!(codes(&errors(&mut s, &lab).await), [-113]);
    assert_eq!(say(&mut s, &lab, "MEAS? nope,x;*IDN?").await, [IDN]);
    assert_eq!(codes(&errors(&mut s, &lab).await), [-222]);
    // A parse error after good units: the good ones ran.
    assert_eq!(
        say(&mut s, &lab, "*OPC?;*IDN?;BAD)").await,
        [format!("1;{IDN}")]
    );
    assert_eq!(codes(&errors(&mut s, &lab).await), [-111]);
    // Control characters in a quoted parameter never reach an error message or a log.
    assert!(
        say(&mut s, &lab, "INST:STAT? \"a\x1b[2J\";*IDN?")
            .await
            .is_empty()
    );
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-101], "{errs:?}");
    assert!(!errs[0].contains('\x1b'), "{errs:?}");
}

#[tokio::test]
async fn garbage_only_adds_errors_and_the_session_goes_on() {
    let lab = Fake::new();
    let mut s = tcp();
    let garbage: &[&[u8]] = &[
        b"\xff\xfe\x00\x01\n",
        b":::\n",
        b";;;\n",
        b"*\n",
        b"?\n",
        b"RUN:STAT? \"unterminated\n",
        b"SYST:LOGIN a b c\n",
        b"MEAS? a,,b\n",
        b"12345\n",
        b"{\"json\": true}\n",
        b"\x1b[A\x1b[B\n",
        b"SYST:ERR?extra\n",
        b"VERYLONGMNEMONICNAME?\n",
        b"RUN:STAT? \"run-\x1b[2J\"\n",
    ];
    for g in garbage {
        let reply = s.feed(&lab, g).await;
        assert!(reply.is_empty(), "{g:?} answered {reply:?}");
    }
    let codes = codes(&errors(&mut s, &lab).await);
    assert_eq!(codes.len(), garbage.len(), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| (-199..=-100).contains(c) || *c == -203),
        "{codes:?}"
    );
    assert_eq!(say(&mut s, &lab, "*IDN?").await, [IDN]);
}

#[tokio::test]
async fn an_over_long_line_is_refused_and_never_buffered_whole() {
    let lab = Fake::new();
    let mut s = tcp();
    let chunk = vec![b'A'; 8192];
    for _ in 0..20 {
        assert!(s.feed(&lab, &chunk).await.is_empty());
        assert!(s.input.pending() <= MAX_LINE);
    }
    // The end of the long line, then a good one.
    assert_eq!(s.feed(&lab, b"AAAA\n*IDN?\n").await, [IDN]);
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-363], "{errs:?}");
    // A line of exactly the limit is fine.
    let mut line = b"*IDN?".to_vec();
    line.resize(MAX_LINE, b' ');
    line.push(b'\n');
    assert_eq!(s.feed(&lab, &line).await, [IDN]);
}

#[test]
fn the_line_buffer_splits_and_bounds() {
    let mut b = LineBuffer::new(4);
    assert_eq!(b.push(b"ab\ncd"), [Input::Line(b"ab".to_vec())]);
    assert_eq!(b.push(b"e\n"), [Input::Line(b"cde".to_vec())]);
    assert_eq!(b.push(b"toolong"), [Input::Overrun]);
    assert_eq!(b.pending(), 0);
    assert_eq!(b.push(b"more"), []);
    assert_eq!(b.push(b"x\nok\n"), [Input::Line(b"ok".to_vec())]);
}

#[tokio::test]
async fn short_and_long_forms_in_any_case() {
    let lab = Fake::new();
    let mut s = serial(Role::Observer);
    let list = "\"hotplate\",\"pump-red\"";
    for cmd in [
        "INST:LIST?",
        "inst:list?",
        "INSTRUMENT:LIST?",
        ":Instrument:List?",
        "INST:CAT?",
    ] {
        assert_eq!(say(&mut s, &lab, cmd).await, [list], "{cmd}");
    }
    assert_eq!(
        say(&mut s, &lab, "measure? hotplate,plate_temperature_c").await,
        ["25.5"]
    );
    assert_eq!(
        say(&mut s, &lab, "RUN:STATE? run-7;STAT? run-7").await,
        ["running,\"mix\",3,\"\";running,\"mix\",3,\"\""]
    );
    assert!(errors(&mut s, &lab).await.is_empty());
}

#[tokio::test]
async fn instruments_and_measurements_come_from_the_snapshot() {
    let lab = Fake::new();
    let mut s = tcp();
    login(&mut s, &lab, "watcher", "observer-dev").await;
    assert_eq!(
        say(&mut s, &lab, "INST:STAT? hotplate").await,
        ["online,alarm,0,\"watchdog\""]
    );
    assert_eq!(
        say(&mut s, &lab, "INST:STAT? \"pump-red\"").await,
        ["lost,unknown,0,\"no reply\""]
    );
    assert_eq!(
        say(&mut s, &lab, "MEAS? 'hotplate', \"stir_rpm\"").await,
        ["0"]
    );
    assert!(say(&mut s, &lab, "INST:STAT? nope").await.is_empty());
    assert!(say(&mut s, &lab, "MEAS? pump-red,flow").await.is_empty());
    assert!(
        say(&mut s, &lab, "MEAS? hotplate,volume_ul")
            .await
            .is_empty()
    );
    assert!(say(&mut s, &lab, "MEAS? hotplate").await.is_empty());
    assert!(say(&mut s, &lab, "MEAS? a,b,c").await.is_empty());
    assert!(say(&mut s, &lab, "INST:LIST? x").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(
        codes(&errs),
        [-222, -230, -222, -109, -108, -108],
        "{errs:?}"
    );
    assert!(errs[0].contains("no instrument nope"));
    assert!(
        errs[2].contains("it reports: plate_temperature_c, stir_rpm"),
        "{errs:?}"
    );
}

#[tokio::test]
async fn on_tcp_nothing_but_identification_before_login() {
    let lab = Fake::new();
    let mut s = tcp();
    assert_eq!(say(&mut s, &lab, "SYST:LOGIN?").await, ["\"\",none"]);
    for cmd in [
        "RUN:SUBM {}",
        "RUN:PAUS run-7",
        "SYST:ESTOP",
        "SYST:ESTOP:ACK",
        "MEAS? hotplate,stir_rpm",
        "RUN:STAT? run-7",
        "INST:LIST?",
    ] {
        assert!(say(&mut s, &lab, cmd).await.is_empty(), "{cmd}");
    }
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-203; 7], "{errs:?}");
    assert!(lab.calls().is_empty(), "{:?}", lab.calls());
    // Without users in the lab, anyone may read but still change nothing.
    let mut open = Fake::new();
    open.users = false;
    assert_eq!(say(&mut s, &open, "INST:LIST?").await.len(), 1);
    assert!(say(&mut s, &open, "RUN:ABOR run-7").await.is_empty());
    assert_eq!(codes(&errors(&mut s, &open).await), [-203]);
}

#[tokio::test]
async fn a_wrong_password_is_an_error_and_the_session_stays() {
    let lab = Fake::new();
    let mut s = tcp();
    assert!(say(&mut s, &lab, "SYST:LOGIN alice,wrong").await.is_empty());
    assert!(say(&mut s, &lab, "SYST:LOGIN locked,x").await.is_empty());
    assert!(say(&mut s, &lab, "SYST:LOGIN alice").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-200, -200, -109], "{errs:?}");
    assert!(errs[0].contains("login refused: wrong user name or password"));
    assert!(errs[1].contains("too many failed logins"));
    assert_eq!(say(&mut s, &lab, "SYST:LOGIN?").await, ["\"\",none"]);
    // Quoted credentials, then log out.
    login(&mut s, &lab, "\"alice\"", "'technician-dev'").await;
    assert_eq!(
        say(&mut s, &lab, "SYST:LOGIN?").await,
        ["\"alice\",technician"]
    );
    assert!(say(&mut s, &lab, "SYST:LOGOUT").await.is_empty());
    assert_eq!(say(&mut s, &lab, "SYST:LOG?").await, ["\"\",none"]);
}

#[tokio::test]
async fn roles_decide_what_changes_are_allowed() {
    let lab = Fake::new();
    // Observer: reads only.
    let mut s = tcp();
    login(&mut s, &lab, "watcher", "observer-dev").await;
    assert_eq!(say(&mut s, &lab, "RUN:STAT? run-7").await.len(), 1);
    assert!(say(&mut s, &lab, "RUN:SUBM {\"x\":1}").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:ABOR run-7").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-203, -203]);
    assert!(errs[0].contains("watcher is a observer") || errs[0].contains("observer"));

    // Rig: submits and controls its own runs, not others'; may stop the lab but not release it.
    let mut s = tcp();
    login(&mut s, &lab, "rig-1", "rig-dev").await;
    assert_eq!(say(&mut s, &lab, "RUN:SUBM {\"x\":1}").await, ["\"run-1\""]);
    assert!(say(&mut s, &lab, "RUN:PAUS run-7").await.is_empty());
    assert!(say(&mut s, &lab, "SYST:ESTOP").await.is_empty());
    assert!(say(&mut s, &lab, "SYST:ESTOP:ACK").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-203], "{errs:?}");
    assert!(
        errs[0].contains("may not acknowledge the emergency stop"),
        "{errs:?}"
    );
    assert_eq!(say(&mut s, &lab, "SYST:ESTOP?").await, ["1"]);
    let mut alice = tcp();
    login(&mut alice, &lab, "alice", "technician-dev").await;
    assert!(say(&mut alice, &lab, "SYST:ESTOP:ACK").await.is_empty());
    let mut other = serial(Role::Planner);
    assert!(say(&mut other, &lab, "RUN:ABOR run-7").await.is_empty());
    let errs = errors(&mut other, &lab).await;
    assert_eq!(codes(&errs), [-203]);
    assert!(errs[0].contains("it belongs to rig-1"), "{errs:?}");

    // Technician: anything.
    let mut s = tcp();
    login(&mut s, &lab, "alice", "technician-dev").await;
    assert!(
        say(&mut s, &lab, "RUN:PAUS run-7;RES run-7;ABOR run-7")
            .await
            .is_empty()
    );
    assert!(errors(&mut s, &lab).await.is_empty());
    assert_eq!(
        lab.calls(),
        [
            "submit rig-1 {\"x\":1}",
            "Pause run-7 rig-1",
            "estop rig-1",
            "ack alice",
            "Abort run-7 serial:/dev/ttyS1",
            "Pause run-7 alice",
            "Resume run-7 alice",
            "Abort run-7 alice",
        ]
    );
}

#[tokio::test]
async fn runs_are_submitted_queried_and_controlled() {
    let lab = Fake::new();
    let mut s = serial(Role::Rig);
    let json = r#"{"metadata": {"name": "a; b"}, "steps": [{"op": "wait", "params": {"s": 1}}]}"#;
    assert_eq!(
        say(&mut s, &lab, &format!("RUN:SUBM {json}")).await,
        ["\"run-1\""]
    );
    assert_eq!(
        say(&mut s, &lab, &format!("run:submit {json};*OPC?")).await,
        ["\"run-1\";1"]
    );
    assert!(lab.calls()[0].ends_with(json), "{:?}", lab.calls());
    assert_eq!(
        say(&mut s, &lab, "RUN:STAT? run-7").await,
        ["running,\"mix\",3,\"\""]
    );
    assert!(say(&mut s, &lab, "RUN:SUBM {\"bad\": 1}").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:SUBM").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:STAT? nope").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:ABOR done-1").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:PAUS nope").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:PAUS").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(
        codes(&errs),
        [-200, -109, -222, -221, -222, -109],
        "{errs:?}"
    );
    assert!(
        errs[0].contains("2 finding(s)); first: /steps/0/params/volume_ul: volume 90000 uL"),
        "{errs:?}"
    );
    assert!(errs[2].contains("unknown run nope"));
    assert!(errs[3].contains("it is completed"), "{errs:?}");
}

#[tokio::test]
async fn the_emergency_stop_refuses_changes_until_acknowledged() {
    let lab = Fake::new();
    let mut s = tcp();
    login(&mut s, &lab, "alice", "technician-dev").await;
    assert_eq!(say(&mut s, &lab, "SYST:ESTOP?").await, ["0"]);
    assert!(say(&mut s, &lab, "SYST:ESTOP").await.is_empty());
    assert_eq!(say(&mut s, &lab, "SYST:ESTOP?").await, ["1"]);
    assert!(say(&mut s, &lab, "RUN:SUBM {\"x\":1}").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:RES run-7").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:PAUS run-7").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-200, -200, -200], "{errs:?}");
    assert!(errs[0].contains("emergency stop is latched"));
    // Aborting only makes things safer, reading goes on.
    assert!(say(&mut s, &lab, "RUN:ABOR run-7").await.is_empty());
    assert_eq!(say(&mut s, &lab, "MEAS? hotplate,stir_rpm").await, ["0"]);
    assert!(say(&mut s, &lab, "SYST:ESTOP:ACKNOWLEDGE").await.is_empty());
    assert_eq!(say(&mut s, &lab, "SYST:ESTOP?").await, ["0"]);
    assert_eq!(say(&mut s, &lab, "RUN:SUBM {\"x\":1}").await, ["\"run-1\""]);
    assert!(errors(&mut s, &lab).await.is_empty());
}

#[tokio::test]
async fn a_technician_approves_and_rejects_runs_awaiting_approval() {
    let lab = Fake::new();
    let mut s = tcp();
    login(&mut s, &lab, "alice", "technician-dev").await;
    // Each mistake is named, and nothing reaches the lab.
    assert!(say(&mut s, &lab, "RUN:APPR").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:REJ soak-2").await.is_empty());
    assert!(say(&mut s, &lab, "RUN:REJ soak-2,\"  \"").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-109, -109, -224], "{errs:?}");
    assert!(errs[2].contains("reason"), "{errs:?}");
    assert!(lab.calls().is_empty(), "{:?}", lab.calls());
    // While the stop is latched a rejection goes through, an approval does not.
    say(&mut s, &lab, "SYST:ESTOP").await;
    assert!(say(&mut s, &lab, "RUN:APPR soak-2").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-200], "{errs:?}");
    assert!(errs[0].contains("emergency stop is latched"), "{errs:?}");
    say(&mut s, &lab, "SYST:ESTOP:ACK").await;
    assert!(say(&mut s, &lab, "run:approve soak-2").await.is_empty());
    assert!(errors(&mut s, &lab).await.is_empty());
    assert_eq!(
        say(&mut s, &lab, "RUN:STAT? soak-2").await,
        ["queued,\"mix\",3,\"\""]
    );
    // A decided run is not decided again; a running one was never awaiting.
    assert!(
        say(&mut s, &lab, "RUN:REJ soak-2,\"changed my mind\"")
            .await
            .is_empty()
    );
    assert!(say(&mut s, &lab, "RUN:APPR run-7").await.is_empty());
    let errs = errors(&mut s, &lab).await;
    assert_eq!(codes(&errs), [-221, -221], "{errs:?}");
    assert!(
        errs[0].contains("is queued, not awaiting approval"),
        "{errs:?}"
    );
    assert_eq!(
        lab.calls(),
        [
            "estop alice",
            "ack alice",
            "approve soak-2 alice",
            "reject soak-2 \"changed my mind\" alice",
            "approve run-7 alice",
        ]
    );
}

#[tokio::test]
async fn a_serial_line_acts_as_its_configured_principal_and_may_log_in() {
    let lab = Fake::new();
    let mut s = serial(Role::Rig);
    assert_eq!(
        say(&mut s, &lab, "SYST:LOGIN?").await,
        ["\"serial:/dev/ttyS1\",rig"]
    );
    assert_eq!(say(&mut s, &lab, "RUN:SUBM {\"x\":1}").await, ["\"run-1\""]);
    login(&mut s, &lab, "alice", "technician-dev").await;
    assert!(say(&mut s, &lab, "SYST:ESTOP").await.is_empty());
    assert!(errors(&mut s, &lab).await.is_empty());
    assert!(say(&mut s, &lab, "SYST:LOGOUT").await.is_empty());
    assert_eq!(
        say(&mut s, &lab, "SYST:LOGIN?").await,
        ["\"serial:/dev/ttyS1\",rig"]
    );
    assert!(say(&mut s, &lab, "SYST:ESTOP:ACK").await.is_empty());
    assert_eq!(codes(&errors(&mut s, &lab).await), [-203]);
}

/// The command port asks the role table and nothing else: for every role, each change is accepted exactly
/// when `policy::allows` says so.
#[tokio::test]
async fn the_command_port_follows_the_role_table() {
    use labctl_core::policy::{Permission, allows};
    let cases = [
        ("RUN:SUBM {\"x\":1}", Permission::Submit),
        ("SYST:ESTOP", Permission::TriggerEStop),
        ("SYST:ESTOP:ACK", Permission::AcknowledgeEStop),
        (
            "SYST:INT:OVER \"pump-alarm\",60,\"sensor fault\"",
            Permission::OverrideInterlock,
        ),
        (
            "SYST:INT:OVER:CLE \"pump-alarm\"",
            Permission::OverrideInterlock,
        ),
        ("RUN:APPR soak-2", Permission::Approve),
        ("RUN:REJ soak-2,\"too long\"", Permission::Approve),
    ];
    for role in [Role::Observer, Role::Planner, Role::Rig, Role::Technician] {
        for (line, permission) in cases {
            let lab = Fake::new();
            let mut s = serial(role);
            say(&mut s, &lab, line).await;
            let errs = errors(&mut s, &lab).await;
            let refused = codes(&errs).contains(&-203);
            assert_eq!(
                !refused,
                allows(role, permission),
                "{role:?} {line}: {errs:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_technician_overrides_an_interlock_with_a_time_and_a_reason() {
    let lab = Fake::new();
    let mut s = serial(Role::Technician);
    say(
        &mut s,
        &lab,
        "SYST:INT:OVER \"pump-alarm\",90,\"sensor fault, checked by hand\"",
    )
    .await;
    assert_eq!(errors(&mut s, &lab).await, Vec::<String>::new());
    assert_eq!(
        lab.calls(),
        vec!["override pump-alarm 90s \"sensor fault, checked by hand\" serial:/dev/ttyS1"]
    );
    // Each bad argument is named, and nothing reaches the lab.
    for (line, expect) in [
        ("SYST:INT:OVER \"pump-alarm\",0,\"x\"", "seconds"),
        ("SYST:INT:OVER \"pump-alarm\",soon,\"x\"", "seconds"),
        ("SYST:INT:OVER \"pump-alarm\",60", "takes 3 parameter"),
    ] {
        say(&mut s, &lab, line).await;
        let errs = errors(&mut s, &lab).await;
        assert!(
            errs.len() == 1 && errs[0].contains(expect),
            "{line}: {errs:?}"
        );
    }
    assert_eq!(lab.calls().len(), 1);
    say(&mut s, &lab, "SYST:INT:OVER \"no-such\",60,\"x\"").await;
    let errs = errors(&mut s, &lab).await;
    assert!(errs[0].contains("unknown interlock no-such"), "{errs:?}");
    assert_eq!(
        say(
            &mut s,
            &lab,
            "SYST:INT:STAT? \"pump-alarm\";STAT? \"hotplate-overtemp\""
        )
        .await,
        vec![
            "OVER,\"pump-red: alarm: stalled\",\"alice\",\"sensor fault, checked by hand\";CLE,\"\""
        ]
    );
    say(&mut s, &lab, "SYST:INT:OVER:CLE \"pump-alarm\"").await;
    assert_eq!(
        lab.calls().last().unwrap(),
        "withdraw pump-alarm serial:/dev/ttyS1"
    );
}
