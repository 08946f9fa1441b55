//! The console's model of the lab, built only from what arrives over MQTT (docs/mqtt.md). Pure: the
//! connection task feeds it decoded messages, the views read it, and tests drive it with payloads alone.
//! A payload it cannot read becomes a line in the event log; nothing here panics on network input.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;

use labctl_contract::messages::{self, EStopState, LabStatus, Presence, RunEvent, RunStatus};
use labctl_contract::{EventKind, InterlockState, InterlockStatus, RunState, Severity};

/// A message as the contract's type for its topic; the error names the field that is wrong.
fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.into_inner())
    })
}

/// Readings kept per quantity for the sparklines (at 10 Hz telemetry, the last 12 s or so).
pub const HISTORY: usize = 120;
/// Lines kept in the event log.
pub const LOG_LINES: usize = 500;
/// Results kept per run (a spectrum is one result; long titrations have hundreds).
pub const RESULTS_PER_RUN: usize = 2000;
/// Runs kept; the oldest ended ones go first (every run's status is retained on the broker).
pub const MAX_RUNS: usize = 300;

/// The MQTT link from the console to the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    Connecting,
    Connected,
    /// Lost or refused; the connection task keeps trying.
    Down(String),
}

/// What the controller says about itself (the retained `status`, whose last will is `offline`).
#[derive(Debug, Clone, PartialEq)]
pub enum Controller {
    Unknown,
    Online { version: String, started_at_ms: i64 },
    Offline,
}

pub use labctl_protocols::device::Identity;

#[derive(Debug, Clone, Default)]
pub struct Instrument {
    pub id: String,
    /// `online`, `connecting`, `lost`.
    pub connection: String,
    /// Why the connection is lost, when it is.
    pub connection_detail: Option<String>,
    pub identity: Option<Identity>,
    /// `idle`, `busy`, `alarm`, `locked`, or empty when unknown.
    pub state: String,
    pub state_detail: Option<String>,
    pub busy: bool,
    /// The latest value of each quantity, in the instrument's order.
    pub values: Vec<(String, f64)>,
    /// Recent readings per quantity, oldest first.
    pub history: BTreeMap<String, VecDeque<f64>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    pub seq: u64,
    pub name: String,
    pub step: String,
    pub instrument: String,
    pub value: Value,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct Run {
    pub run_id: String,
    pub proposal_id: String,
    pub name: String,
    /// `None` until its first status arrives.
    pub state: Option<RunState>,
    /// The step of the last event (more current than the status's `step`).
    pub step: Option<String>,
    pub reason: Option<String>,
    pub submitted_by: Option<String>,
    pub estimated_duration_s: Option<f64>,
    pub started_at_ms: Option<i64>,
    /// When the run entered its current state.
    pub state_since_ms: i64,
    /// What an approver decides on, while the run awaits approval (the status's `approval`).
    pub approval: Option<Value>,
    pub results: Vec<RunResult>,
    pub last_seq: u64,
    /// A replay of its results was asked for (once per console session).
    pub replay_asked: bool,
}

impl Run {
    pub fn is_terminal(&self) -> bool {
        self.state.is_some_and(RunState::is_terminal)
    }

    /// Seconds since the run started (to its end once it has ended).
    pub fn elapsed_s(&self, now_ms: i64) -> Option<f64> {
        let start = self.started_at_ms?;
        let end = if self.is_terminal() {
            self.state_since_ms
        } else {
            now_ms
        };
        Some(((end - start).max(0)) as f64 / 1000.0)
    }

    /// Fraction done by the estimate: 1 once completed, `None` without an estimate or a start.
    pub fn progress(&self, now_ms: i64) -> Option<f64> {
        if self.state == Some(RunState::Completed) {
            return Some(1.0);
        }
        let estimate = self.estimated_duration_s.filter(|e| *e > 0.0)?;
        Some((self.elapsed_s(now_ms)? / estimate).clamp(0.0, 0.99))
    }

    /// Seconds left by the estimate, for a run that is going.
    pub fn remaining_s(&self, now_ms: i64) -> Option<f64> {
        if self.is_terminal() {
            return None;
        }
        let estimate = self.estimated_duration_s?;
        Some((estimate - self.elapsed_s(now_ms)?).max(0.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub at_ms: i64,
    pub level: Level,
    pub text: String,
}

/// The emergency stop as this console knows it: the controller's retained `estop/state` (whoever set the
/// latch), and in between its own commands' answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EStop {
    #[default]
    Clear,
    /// Sent, no answer yet.
    Requested,
    Latched,
    /// Acknowledgement sent, no answer yet.
    Acknowledging,
}

/// Everything the console shows.
#[derive(Debug)]
pub struct Model {
    pub lab_id: String,
    pub user: String,
    pub link: Link,
    pub controller: Controller,
    pub instruments: BTreeMap<String, Instrument>,
    pub runs: BTreeMap<String, Run>,
    pub log: VecDeque<LogLine>,
    pub estop: EStop,
    /// Every interlock and where it stands, as the controller last published it.
    pub interlocks: Vec<InterlockStatus>,
    prefix: String,
}

impl Model {
    pub fn new(lab_id: &str, user: &str) -> Self {
        Model {
            lab_id: lab_id.to_owned(),
            user: user.to_owned(),
            link: Link::Connecting,
            controller: Controller::Unknown,
            instruments: BTreeMap::new(),
            runs: BTreeMap::new(),
            log: VecDeque::new(),
            estop: EStop::Clear,
            interlocks: Vec::new(),
            prefix: format!("labctl/{lab_id}/"),
        }
    }

    pub fn say(&mut self, at_ms: i64, level: Level, text: impl Into<String>) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(LogLine {
            at_ms,
            level,
            text: text.into(),
        });
    }

    /// Runs newest first (run ids start with their creation time in ms; ties by id).
    pub fn runs_newest_first(&self) -> Vec<&Run> {
        let mut runs: Vec<&Run> = self.runs.values().collect();
        runs.sort_by(|a, b| run_order_key(&b.run_id).cmp(&run_order_key(&a.run_id)));
        runs
    }

    /// Runs awaiting approval, oldest first (the order they should be decided in).
    pub fn pending_approvals(&self) -> Vec<&Run> {
        let mut runs: Vec<&Run> = self
            .runs
            .values()
            .filter(|r| r.state == Some(RunState::AwaitingApproval))
            .collect();
        runs.sort_by_key(|r| run_order_key(&r.run_id));
        runs
    }

    pub fn link_up(&mut self, now_ms: i64) {
        if self.link != Link::Connected {
            self.say(now_ms, Level::Info, "connected to the broker");
        }
        self.link = Link::Connected;
    }

    pub fn link_down(&mut self, now_ms: i64, why: &str) {
        if !matches!(&self.link, Link::Down(w) if w == why) {
            self.say(now_ms, Level::Warn, format!("broker connection: {why}"));
        }
        self.link = Link::Down(why.to_owned());
        // Without the broker nothing says whether the controller is there.
        self.controller = Controller::Unknown;
    }

    /// One message from the broker.
    pub fn apply(&mut self, topic: &str, payload: &[u8], now_ms: i64) {
        let Some(rest) = topic.strip_prefix(self.prefix.as_str()) else {
            return;
        };
        let rest = rest.to_owned();
        let parsed = match serde_json::from_slice::<Value>(payload) {
            Ok(v) => v,
            Err(e) => {
                self.say(
                    now_ms,
                    Level::Error,
                    format!("unreadable message on {topic}: {e}"),
                );
                return;
            }
        };
        let levels: Vec<&str> = rest.split('/').collect();
        let outcome = match levels.as_slice() {
            ["status"] => self.on_status(&parsed, now_ms),
            ["instruments", id, "state"] => self.on_instrument_state(id, &parsed),
            ["instruments", id, "telemetry"] => self.on_telemetry(id, &parsed),
            ["runs", id, "status"] => self.on_run_status(id, &parsed),
            ["runs", id, "events"] => self.on_run_event(id, &parsed),
            ["runs", id, "results"] => self.on_result(id, &parsed),
            ["estop", "state"] => self.on_estop_state(&parsed, now_ms),
            ["interlocks"] => self.on_interlocks(&parsed, now_ms),
            ["rejections"] => {
                let text = format!(
                    "refused ({}): {}",
                    parsed["error"].as_str().unwrap_or("?"),
                    parsed["message"].as_str().unwrap_or("")
                );
                self.say(now_ms, Level::Warn, text);
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(why) = outcome {
            self.say(
                now_ms,
                Level::Error,
                format!("unreadable message on {topic}: {why}"),
            );
        }
    }

    fn on_status(&mut self, v: &Value, now_ms: i64) -> Result<(), String> {
        let status: LabStatus = parse(v)?;
        let next = match status.status {
            Presence::Online => Controller::Online {
                version: status.labctl_version,
                started_at_ms: status.started_at_ms,
            },
            Presence::Offline => Controller::Offline,
        };
        if next != self.controller {
            match &next {
                Controller::Online { version, .. } => self.say(
                    now_ms,
                    Level::Info,
                    format!("controller online (labctl {version})"),
                ),
                _ => self.say(now_ms, Level::Warn, "controller offline"),
            }
        }
        self.controller = next;
        Ok(())
    }

    /// The latch as the controller holds it, whoever set it (this console, OPC UA, the command port).
    fn on_estop_state(&mut self, v: &Value, now_ms: i64) -> Result<(), String> {
        let state: EStopState = parse(v)?;
        let by = state.by.map(|b| format!(" by {b}")).unwrap_or_default();
        match (state.latched, self.estop) {
            (true, EStop::Latched) | (false, EStop::Clear) => {}
            (true, _) => {
                self.say(now_ms, Level::Error, format!("EMERGENCY STOP latched{by}"));
                self.estop = EStop::Latched;
            }
            (false, _) => {
                self.say(
                    now_ms,
                    Level::Info,
                    format!("emergency stop acknowledged{by}"),
                );
                self.estop = EStop::Clear;
            }
        }
        Ok(())
    }

    fn on_instrument_state(&mut self, id: &str, v: &Value) -> Result<(), String> {
        let state: messages::InstrumentState = parse(v)?;
        let inst = self.instruments.entry(id.to_owned()).or_default();
        inst.id = id.to_owned();
        inst.connection = state.connection.as_str().to_owned();
        inst.connection_detail = state.connection.detail().map(str::to_owned);
        inst.state = state
            .state
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        inst.state_detail = state
            .state
            .as_ref()
            .and_then(|s| s.detail())
            .map(str::to_owned);
        inst.busy = state.busy;
        inst.identity = state.identity;
        inst.values = state.values;
        Ok(())
    }

    /// The interlocks as published; a change of where one stands is logged.
    fn on_interlocks(&mut self, v: &Value, now_ms: i64) -> Result<(), String> {
        let interlocks: Vec<InterlockStatus> = parse(v)?;
        for now in &interlocks {
            let before = self.interlocks.iter().find(|i| i.name == now.name);
            if before.map(|b| &b.state) == Some(&now.state)
                || before.is_none() && now.state == InterlockState::Clear
            {
                continue;
            }
            let (level, text) = match &now.state {
                InterlockState::Clear => (Level::Info, format!("interlock {} clear", now.name)),
                InterlockState::Tripped { reason } => (
                    Level::Warn,
                    format!("interlock {} tripped: {reason}", now.name),
                ),
                InterlockState::Overridden { by, because, .. } => (
                    Level::Warn,
                    format!("interlock {} overridden by {by}: {because}", now.name),
                ),
            };
            self.say(now_ms, level, text);
        }
        self.interlocks = interlocks;
        Ok(())
    }

    fn on_telemetry(&mut self, id: &str, v: &Value) -> Result<(), String> {
        let values = pairs(&v["values"]);
        if values.is_empty() {
            return Err("no values".into());
        }
        let inst = self.instruments.entry(id.to_owned()).or_default();
        inst.id = id.to_owned();
        for (name, value) in values {
            let h = inst.history.entry(name.clone()).or_default();
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(value);
            match inst.values.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = value,
                None => inst.values.push((name, value)),
            }
        }
        Ok(())
    }

    fn on_run_status(&mut self, id: &str, v: &Value) -> Result<(), String> {
        let status: RunStatus = parse(v)?;
        let state = status.state;
        let at_ms = status.at_ms;
        let run = self.runs.entry(id.to_owned()).or_default();
        let previous = run.state.replace(state);
        run.run_id = id.to_owned();
        if let Some(p) = status.proposal_id {
            run.proposal_id = p;
        }
        if let Some(n) = status.name {
            run.name = n;
        }
        if status.submitted_by.is_some() {
            run.submitted_by = status.submitted_by;
        }
        if status.estimated_duration_s.is_some() {
            run.estimated_duration_s = status.estimated_duration_s;
        }
        if status.started_at_ms.is_some() {
            run.started_at_ms = status.started_at_ms;
        } else if state == RunState::Running && run.started_at_ms.is_none() {
            run.started_at_ms = Some(at_ms);
        }
        if status.step.is_some() {
            run.step = status.step;
        }
        run.reason = status.reason;
        run.state_since_ms = at_ms;
        run.approval = status
            .approval
            .filter(|a| state == RunState::AwaitingApproval && a.is_object());
        if let Some(previous) = previous.filter(|p| *p != state) {
            let reason = run
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let level = match state {
                RunState::Failed
                | RunState::Aborted
                | RunState::Interrupted
                | RunState::Rejected => Level::Warn,
                _ => Level::Info,
            };
            let line = format!("run {id}: {previous} -> {state}{reason}");
            self.say(at_ms, level, line);
        }
        self.prune_runs();
        Ok(())
    }

    fn on_run_event(&mut self, id: &str, v: &Value) -> Result<(), String> {
        let event: RunEvent = parse(v)?;
        if let Some(run) = self.runs.get_mut(id)
            && event.step.is_some()
        {
            run.step.clone_from(&event.step);
        }
        // Commands are many and routine; the log keeps what a technician acts on. A kind this console
        // does not know (a newer controller) is shown as information.
        let severity = event
            .known_kind()
            .map_or(Severity::Info, EventKind::severity);
        if severity == Severity::Routine {
            return Ok(());
        }
        let actor = event
            .actor
            .as_ref()
            .map(|a| format!(" by {a}"))
            .unwrap_or_default();
        let step = event
            .step
            .as_ref()
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        let detail = summarise_detail(&event.detail);
        let level = if severity == Severity::Warning {
            Level::Warn
        } else {
            Level::Info
        };
        let kind = &event.kind;
        self.say(
            event.at_ms,
            level,
            format!("run {id}: {kind}{step}{actor}{detail}"),
        );
        Ok(())
    }

    fn on_result(&mut self, id: &str, v: &Value) -> Result<(), String> {
        let message: messages::RunResult = parse(v)?;
        let seq = message.seq;
        let run = self.runs.entry(id.to_owned()).or_default();
        run.run_id = id.to_owned();
        // A replay repeats what this console may already have.
        if run.results.iter().any(|r| r.seq == seq) {
            return Ok(());
        }
        let result = RunResult {
            seq,
            name: message.name,
            step: message.step,
            instrument: message.instrument,
            value: message.value,
            at_ms: message.at_ms,
        };
        let at = run.results.partition_point(|r| r.seq < seq);
        run.results.insert(at, result);
        if run.results.len() > RESULTS_PER_RUN {
            run.results.remove(0);
        }
        run.last_seq = run.last_seq.max(seq);
        Ok(())
    }

    /// Keeps at most [`MAX_RUNS`], dropping the oldest ended runs first.
    fn prune_runs(&mut self) {
        while self.runs.len() > MAX_RUNS {
            let oldest_ended = self
                .runs
                .values()
                .filter(|r| r.is_terminal())
                .min_by(|a, b| run_order_key(&a.run_id).cmp(&run_order_key(&b.run_id)))
                .map(|r| r.run_id.clone());
            match oldest_ended {
                Some(id) => {
                    self.runs.remove(&id);
                }
                None => return,
            }
        }
    }
}

/// Run ids are `run-{created_ms}-{n}`: order by those numbers, then by the id itself.
fn run_order_key(run_id: &str) -> (u64, u64, &str) {
    let mut parts = run_id
        .split('-')
        .skip(1)
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), run_id)
}

/// `[["mass_g", 1.5], ...]` or `{"mass_g": 1.5, ...}`: the numeric pairs, in order.
fn pairs(v: &Value) -> Vec<(String, f64)> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|p| Some((p.get(0)?.as_str()?.to_owned(), p.get(1)?.as_f64()?)))
            .collect(),
        Value::Object(m) => m
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// A short `: key=value, ...` of an event's detail for the log.
fn summarise_detail(detail: &Value) -> String {
    let Value::Object(m) = detail else {
        return String::new();
    };
    let parts: Vec<String> = m
        .iter()
        .filter(|(_, v)| !v.is_null() && !v.is_array() && !v.is_object())
        .take(4)
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            Value::Number(n) if n.is_f64() => {
                format!(
                    "{k}={}",
                    (n.as_f64().unwrap_or(0.0) * 1000.0).round() / 1000.0
                )
            }
            other => format!("{k}={other}"),
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        let mut text = format!(": {}", parts.join(", "));
        if text.chars().count() > 160 {
            text = text.chars().take(157).collect::<String>() + "...";
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> Model {
        Model::new("sim", "alice")
    }

    fn feed(m: &mut Model, topic: &str, v: Value) {
        m.apply(
            &format!("labctl/sim/{topic}"),
            &serde_json::to_vec(&v).unwrap(),
            1_000,
        );
    }

    #[test]
    fn the_latch_follows_the_controller_whoever_set_it() {
        let mut m = model();
        feed(&mut m, "estop/state", json!({"latched": false, "by": null}));
        assert_eq!(m.estop, EStop::Clear);
        assert!(m.log.is_empty(), "no change, nothing to say");
        feed(&mut m, "estop/state", json!({"latched": true, "by": "bob"}));
        assert_eq!(m.estop, EStop::Latched);
        assert!(
            m.log
                .iter()
                .any(|l| l.text == "EMERGENCY STOP latched by bob")
        );
        feed(
            &mut m,
            "estop/state",
            json!({"latched": false, "by": "alice"}),
        );
        assert_eq!(m.estop, EStop::Clear);
        assert!(
            m.log
                .iter()
                .any(|l| l.text == "emergency stop acknowledged by alice")
        );
        feed(&mut m, "estop/state", json!({"latched": "yes"}));
        assert_eq!(m.estop, EStop::Clear, "an unreadable state changes nothing");
        assert!(m.log.back().unwrap().text.contains("latched"));
    }

    #[test]
    fn controller_status_follows_the_retained_status_and_its_last_will() {
        let mut m = model();
        assert_eq!(m.controller, Controller::Unknown);
        feed(
            &mut m,
            "status",
            json!({"status": "online", "lab_id": "sim", "labctl_version": "0.1.0", "started_at_ms": 5}),
        );
        assert_eq!(
            m.controller,
            Controller::Online {
                version: "0.1.0".into(),
                started_at_ms: 5
            }
        );
        feed(
            &mut m,
            "status",
            json!({"status": "offline", "lab_id": "sim", "labctl_version": "0.1.0", "started_at_ms": 5}),
        );
        assert_eq!(m.controller, Controller::Offline);
        assert!(m.log.iter().any(|l| l.text == "controller offline"));
        // The broker gone: nothing is known of the controller until the link is back.
        feed(
            &mut m,
            "status",
            json!({"status": "online", "lab_id": "sim", "labctl_version": "0.1.0", "started_at_ms": 6}),
        );
        m.link_down(2_000, "connection refused");
        assert_eq!(m.controller, Controller::Unknown);
        assert_eq!(m.link, Link::Down("connection refused".into()));
        m.link_up(3_000);
        assert_eq!(m.link, Link::Connected);
    }

    #[test]
    fn instrument_state_and_telemetry_fill_values_and_history() {
        let mut m = model();
        feed(
            &mut m,
            "instruments/hotplate/state",
            json!({"id": "hotplate", "connection": {"connection": "online"},
                   "identity": {"manufacturer": "IKA", "model": "RCT", "serial": "H1", "firmware": "2.0"},
                   "state": {"state": "idle"}, "values": [["plate_temperature_c", 24.5]], "busy": false, "armed": true}),
        );
        let h = &m.instruments["hotplate"];
        assert_eq!(h.connection, "online");
        assert_eq!(h.state, "idle");
        assert_eq!(h.identity.as_ref().unwrap().serial, "H1");
        assert_eq!(h.values, vec![("plate_temperature_c".to_owned(), 24.5)]);
        for t in [25.0, 26.0, 27.0] {
            feed(
                &mut m,
                "instruments/hotplate/telemetry",
                json!({"id": "hotplate", "at_ms": 1, "values": {"plate_temperature_c": t}}),
            );
        }
        let h = &m.instruments["hotplate"];
        assert_eq!(h.values[0].1, 27.0);
        assert_eq!(
            h.history["plate_temperature_c"]
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            vec![25.0, 26.0, 27.0]
        );
        feed(
            &mut m,
            "instruments/hotplate/state",
            json!({"id": "hotplate", "connection": {"connection": "lost", "detail": "port closed"},
                   "identity": null, "state": {"state": "alarm", "detail": "watchdog"}, "values": [], "busy": false, "armed": false}),
        );
        let h = &m.instruments["hotplate"];
        assert_eq!(
            (h.connection.as_str(), h.connection_detail.as_deref()),
            ("lost", Some("port closed"))
        );
        assert_eq!(h.state_detail.as_deref(), Some("watchdog"));
        // History survives a state message.
        assert_eq!(h.history["plate_temperature_c"].len(), 3);
        // A state message that is not the contract's is refused with the field that is wrong.
        feed(
            &mut m,
            "instruments/hotplate/state",
            json!({"id": "hotplate", "connection": {"connection": "online"}, "identity": null,
                   "state": null, "values": [], "busy": "no", "armed": true}),
        );
        let refusal = &m.log.back().unwrap().text;
        assert!(refusal.contains("busy"), "{refusal}");
        assert_eq!(m.instruments["hotplate"].connection, "lost");
    }

    #[test]
    fn history_is_bounded() {
        let mut m = model();
        for i in 0..(HISTORY + 10) {
            feed(
                &mut m,
                "instruments/balance/telemetry",
                json!({"values": {"mass_g": i as f64}}),
            );
        }
        let h = &m.instruments["balance"].history["mass_g"];
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h.front().copied(), Some(10.0));
    }

    #[test]
    fn a_run_awaiting_approval_is_in_the_queue_until_decided() {
        let mut m = model();
        feed(
            &mut m,
            "runs/run-100-1/status",
            json!({"run_id": "run-100-1", "proposal_id": "p1", "state": "awaiting_approval", "name": "long wait",
                   "submitted_by": "planner-bo", "estimated_duration_s": 4000.0, "at_ms": 100,
                   "approval": {"because": ["longer than 3600 s"], "protocol": {"steps": []}}}),
        );
        feed(
            &mut m,
            "runs/run-50-2/status",
            json!({"run_id": "run-50-2", "state": "awaiting_approval", "at_ms": 50}),
        );
        let queue: Vec<&str> = m
            .pending_approvals()
            .iter()
            .map(|r| r.run_id.as_str())
            .collect();
        assert_eq!(queue, ["run-50-2", "run-100-1"]);
        let r = &m.runs["run-100-1"];
        assert_eq!(
            r.approval.as_ref().unwrap()["because"][0],
            "longer than 3600 s"
        );
        assert_eq!(r.submitted_by.as_deref(), Some("planner-bo"));
        feed(
            &mut m,
            "runs/run-100-1/status",
            json!({"run_id": "run-100-1", "state": "queued", "at_ms": 200}),
        );
        assert_eq!(m.pending_approvals().len(), 1);
        assert!(m.runs["run-100-1"].approval.is_none());
        assert!(
            m.log
                .iter()
                .any(|l| l.text == "run run-100-1: awaiting_approval -> queued")
        );
    }

    #[test]
    fn progress_and_remaining_time_come_from_the_estimate() {
        let mut m = model();
        feed(
            &mut m,
            "runs/run-1-1/status",
            json!({"run_id": "run-1-1", "state": "running", "estimated_duration_s": 100.0,
                   "started_at_ms": 10_000, "at_ms": 10_000}),
        );
        let r = &m.runs["run-1-1"];
        assert_eq!(r.elapsed_s(35_000), Some(25.0));
        assert_eq!(r.progress(35_000), Some(0.25));
        assert_eq!(r.remaining_s(35_000), Some(75.0));
        // Past the estimate: not done until it says so.
        assert_eq!(r.progress(500_000), Some(0.99));
        feed(
            &mut m,
            "runs/run-1-1/status",
            json!({"run_id": "run-1-1", "state": "completed", "at_ms": 90_000}),
        );
        let r = &m.runs["run-1-1"];
        assert_eq!(r.progress(500_000), Some(1.0));
        assert_eq!(r.elapsed_s(500_000), Some(80.0));
        assert_eq!(r.remaining_s(500_000), None);
    }

    #[test]
    fn results_are_kept_in_seq_order_once_each_and_events_move_the_step() {
        let mut m = model();
        for seq in [2, 1, 2] {
            feed(
                &mut m,
                "runs/run-1-1/results",
                json!({"run_id": "run-1-1", "seq": seq, "name": format!("m{seq}"), "step": "s",
                       "instrument": "balance", "value": {"mass_g": seq}, "at_ms": seq}),
            );
        }
        let r = &m.runs["run-1-1"];
        assert_eq!(r.results.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(r.last_seq, 2);
        feed(
            &mut m,
            "runs/run-1-1/events",
            json!({"run_id": "run-1-1", "kind": "step_started", "step": "heat", "actor": null,
                   "detail": {"type": "action", "estimated_s": 134.80522854}, "at_ms": 3}),
        );
        assert_eq!(m.runs["run-1-1"].step.as_deref(), Some("heat"));
        assert_eq!(
            m.log.back().unwrap().text,
            "run run-1-1: step_started heat: estimated_s=134.805, type=action"
        );
        assert_eq!(m.log.back().unwrap().level, Level::Info);
        // The event kind decides the line's level: a command is not worth one, a failed step warns, a
        // kind from a newer controller informs.
        let lines = m.log.len();
        let event = |kind: &str| {
            json!({"run_id": "run-1-1", "kind": kind, "step": "heat", "actor": null,
                   "detail": {}, "at_ms": 4})
        };
        feed(&mut m, "runs/run-1-1/events", event("command"));
        assert_eq!(m.log.len(), lines, "a routine command made a log line");
        feed(&mut m, "runs/run-1-1/events", event("step_failed"));
        assert_eq!(m.log.back().unwrap().level, Level::Warn);
        feed(&mut m, "runs/run-1-1/events", event("step_rehearsed"));
        assert_eq!(m.log.back().unwrap().level, Level::Info);
        assert_eq!(m.log.len(), lines + 2);
    }

    #[test]
    fn malformed_payloads_become_log_lines_not_panics() {
        let mut m = model();
        for (topic, payload) in [
            ("labctl/sim/status", &b"\xff\xfe"[..]),
            ("labctl/sim/runs/r/status", b"{\"state\": 5}"),
            ("labctl/sim/runs/r/results", b"[]"),
            ("labctl/sim/instruments/x/state", b"42"),
            (
                "labctl/sim/instruments/x/telemetry",
                b"{\"values\": \"hot\"}",
            ),
            ("labctl/sim/runs/r/events", b"null"),
        ] {
            m.apply(topic, payload, 1);
        }
        assert_eq!(
            m.log.iter().filter(|l| l.level == Level::Error).count(),
            6,
            "{:?}",
            m.log
        );
        // Another lab's topics are not ours.
        m.apply("labctl/other/status", b"garbage", 1);
        assert_eq!(m.log.len(), 6);
    }

    #[test]
    fn the_log_and_the_run_list_are_bounded() {
        let mut m = model();
        for i in 0..(LOG_LINES + 5) {
            m.say(i as i64, Level::Info, format!("{i}"));
        }
        assert_eq!(m.log.len(), LOG_LINES);
        assert_eq!(m.log.front().unwrap().text, "5");
        for i in 0..(MAX_RUNS + 3) {
            let id = format!("run-{i}-1");
            feed(
                &mut m,
                &format!("runs/{id}/status"),
                json!({"run_id": id, "state": "completed", "at_ms": i}),
            );
        }
        assert_eq!(m.runs.len(), MAX_RUNS);
        assert!(!m.runs.contains_key("run-0-1"));
        assert!(m.runs.contains_key(&format!("run-{}-1", MAX_RUNS + 2)));
    }
}
