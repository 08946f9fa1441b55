//! What the technician is doing in the console: the current view, selections, the open dialog, and what a
//! key press asks for. Pure: a key and the model in, a [`Command`] out; no I/O.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use serde_json::{Value, json};

use super::state::{EStop, Level, Link, Model};
use labctl_contract::{InterlockState, RunState};
use labctl_mqtt_link::Topics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Instruments,
    Runs,
    Approvals,
    Results,
    Log,
}

impl Tab {
    pub const ALL: [Tab; 5] = [
        Tab::Instruments,
        Tab::Runs,
        Tab::Approvals,
        Tab::Results,
        Tab::Log,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Instruments => "Instruments",
            Tab::Runs => "Runs",
            Tab::Approvals => "Approvals",
            Tab::Results => "Results",
            Tab::Log => "Log",
        }
    }

    fn index(self) -> usize {
        Tab::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// A dialog over the view; it takes every key until it closes.
#[derive(Debug, Clone, PartialEq)]
pub enum Dialog {
    Help,
    ConfirmEStop,
    ConfirmAcknowledge,
    ConfirmApprove {
        run_id: String,
    },
    RejectReason {
        run_id: String,
        reason: String,
    },
    ConfirmAbort {
        run_id: String,
    },
    /// An override of a tripped interlock: how many minutes, and why (typed).
    Override {
        interlock: String,
        minutes: u32,
        reason: String,
    },
    ConfirmWithdraw {
        interlock: String,
    },
}

/// Something to send to the controller.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Control {
        run_id: String,
        action: &'static str,
    },
    Approve {
        run_id: String,
    },
    Reject {
        run_id: String,
        reason: String,
    },
    EStop,
    AcknowledgeEStop,
    /// Let runs use a tripped interlock's instruments for a while (technicians).
    OverrideInterlock {
        interlock: String,
        seconds: u32,
        reason: String,
    },
    WithdrawOverride {
        interlock: String,
    },
    /// Publish the run's results after `after` again (any user may).
    Replay {
        run_id: String,
        after: u64,
    },
}

impl Command {
    /// The topic, the JSON body and the label its answer comes back with.
    pub fn message(&self, topics: &Topics) -> (String, Vec<u8>, String) {
        let body = |v: Value| serde_json::to_vec(&v).unwrap_or_default();
        match self {
            Command::Control { run_id, action } => (
                topics.run_control(run_id),
                body(json!({ "action": action })),
                format!("{action} {run_id}"),
            ),
            Command::Approve { run_id } => (
                topics.run_approval(run_id),
                body(json!({ "decision": "approve" })),
                format!("approve {run_id}"),
            ),
            Command::Reject { run_id, reason } => (
                topics.run_approval(run_id),
                body(json!({ "decision": "reject", "reason": reason })),
                format!("reject {run_id}"),
            ),
            Command::EStop => (
                topics.estop(),
                body(json!({ "action": "trigger" })),
                "emergency stop".into(),
            ),
            Command::AcknowledgeEStop => (
                topics.estop(),
                body(json!({ "action": "acknowledge" })),
                "acknowledge emergency stop".into(),
            ),
            Command::OverrideInterlock {
                interlock,
                seconds,
                reason,
            } => (
                topics.interlock_override(interlock),
                body(json!({ "seconds": seconds, "reason": reason })),
                format!("override {interlock}"),
            ),
            Command::WithdrawOverride { interlock } => (
                topics.interlock_override(interlock),
                body(json!({ "action": "withdraw" })),
                format!("withdraw override {interlock}"),
            ),
            Command::Replay { run_id, after } => (
                topics.run_control(run_id),
                body(json!({ "action": "replay", "after": after })),
                format!("replay {run_id}"),
            ),
        }
    }
}

/// The first interlock in `state` after `after` (wrapping around), by the order the controller lists them.
fn next_interlock(
    model: &Model,
    after: Option<&str>,
    state: impl Fn(&InterlockState) -> bool,
) -> Option<String> {
    let matching: Vec<&str> = model
        .interlocks
        .iter()
        .filter(|i| state(&i.state))
        .map(|i| i.name.as_str())
        .collect();
    let at = after
        .and_then(|a| matching.iter().position(|n| *n == a))
        .map_or(0, |i| i + 1);
    matching
        .get(at)
        .or(matching.first())
        .map(|n| (*n).to_owned())
}

/// What a key press leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Nothing,
    Send(Command),
    Quit,
}

/// Longest rejection or override reason accepted in a dialog.
pub const MAX_REASON: usize = 200;
/// An override's length when the dialog opens, and its bounds (the controller allows at most an hour).
pub const OVERRIDE_MINUTES: u32 = 15;
pub const MAX_OVERRIDE_MINUTES: u32 = 60;

#[derive(Debug)]
pub struct Ui {
    pub tab: Tab,
    pub dialog: Option<Dialog>,
    pub instrument: usize,
    pub run: usize,
    pub approval: usize,
    /// Lines scrolled down in the proposal under the cursor (long protocols do not fit).
    pub approval_scroll: u16,
    /// The run whose results are shown (the selected run when none was chosen).
    pub results_run: Option<String>,
    pub result: usize,
    /// Lines scrolled back from the newest in the log.
    pub log_back: usize,
    /// The latest answer or refusal, shown in the footer.
    pub notice: Option<(Level, String)>,
}

impl Default for Ui {
    fn default() -> Self {
        Ui {
            tab: Tab::Runs,
            dialog: None,
            instrument: 0,
            run: 0,
            approval: 0,
            approval_scroll: 0,
            results_run: None,
            result: 0,
            log_back: 0,
            notice: None,
        }
    }
}

impl Ui {
    /// The run id under the cursor in the Runs view.
    pub fn selected_run(&self, model: &Model) -> Option<String> {
        let runs = model.runs_newest_first();
        runs.get(self.run.min(runs.len().saturating_sub(1)))
            .map(|r| r.run_id.clone())
    }

    pub fn selected_approval(&self, model: &Model) -> Option<String> {
        let queue = model.pending_approvals();
        queue
            .get(self.approval.min(queue.len().saturating_sub(1)))
            .map(|r| r.run_id.clone())
    }

    /// The run the Results view shows.
    pub fn results_run_id(&self, model: &Model) -> Option<String> {
        self.results_run
            .clone()
            .filter(|id| model.runs.contains_key(id))
            .or_else(|| self.selected_run(model))
    }

    fn notice(&mut self, level: Level, text: impl Into<String>) {
        self.notice = Some((level, text.into()));
    }

    /// Handles one key press.
    pub fn on_key(&mut self, key: KeyEvent, model: &mut Model) -> Outcome {
        if key.kind == KeyEventKind::Release {
            return Outcome::Nothing;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Outcome::Quit;
        }
        if let Some(dialog) = self.dialog.take() {
            return self.on_dialog_key(dialog, key, model);
        }
        match key.code {
            KeyCode::Char('q') => return Outcome::Quit,
            KeyCode::Char('?') | KeyCode::F(1) => self.dialog = Some(Dialog::Help),
            KeyCode::Char(c @ '1'..='5') => {
                self.tab = Tab::ALL[(c as usize) - ('1' as usize)];
            }
            KeyCode::Tab | KeyCode::Right => {
                self.tab = Tab::ALL[(self.tab.index() + 1) % Tab::ALL.len()]
            }
            KeyCode::BackTab | KeyCode::Left => {
                self.tab = Tab::ALL[(self.tab.index() + Tab::ALL.len() - 1) % Tab::ALL.len()]
            }
            KeyCode::Up | KeyCode::Char('k') => self.move_cursor(model, -1),
            KeyCode::Down | KeyCode::Char('j') => self.move_cursor(model, 1),
            // In the approval queue the page keys scroll the proposal instead.
            KeyCode::PageUp if self.tab == Tab::Approvals => {
                self.approval_scroll = self.approval_scroll.saturating_sub(10)
            }
            KeyCode::PageDown if self.tab == Tab::Approvals => {
                self.approval_scroll = self.approval_scroll.saturating_add(10).min(10_000)
            }
            KeyCode::PageUp => self.move_cursor(model, -10),
            KeyCode::PageDown => self.move_cursor(model, 10),
            // One key from anywhere; the dialog asks once.
            KeyCode::Char('!') | KeyCode::F(12) => self.dialog = Some(Dialog::ConfirmEStop),
            KeyCode::Char('K') => {
                if model.estop == EStop::Clear {
                    self.notice(
                        Level::Info,
                        "the controller reports no emergency stop latched; K acknowledges anyway",
                    );
                }
                self.dialog = Some(Dialog::ConfirmAcknowledge);
            }
            _ => return self.on_view_key(key, model),
        }
        Outcome::Nothing
    }

    fn move_cursor(&mut self, model: &Model, by: i64) {
        let step = |at: usize, len: usize| -> usize {
            if len == 0 {
                return 0;
            }
            (at.min(len - 1) as i64 + by).clamp(0, len as i64 - 1) as usize
        };
        match self.tab {
            Tab::Instruments => self.instrument = step(self.instrument, model.instruments.len()),
            Tab::Runs => self.run = step(self.run, model.runs.len()),
            Tab::Approvals => {
                self.approval = step(self.approval, model.pending_approvals().len());
                self.approval_scroll = 0;
            }
            Tab::Results => {
                let n = self
                    .results_run_id(model)
                    .and_then(|id| model.runs.get(&id))
                    .map_or(0, |r| r.results.len());
                self.result = step(self.result, n);
            }
            // Up goes back in time.
            Tab::Log => {
                self.log_back =
                    (self.log_back as i64 - by).clamp(0, model.log.len() as i64) as usize
            }
        }
    }

    fn on_view_key(&mut self, key: KeyEvent, model: &mut Model) -> Outcome {
        let control = |run_id: Option<String>, action| match run_id {
            Some(run_id) => Outcome::Send(Command::Control { run_id, action }),
            None => Outcome::Nothing,
        };
        match (self.tab, key.code) {
            (Tab::Runs, KeyCode::Char('p')) => control(self.selected_run(model), "pause"),
            (Tab::Runs, KeyCode::Char('u')) => control(self.selected_run(model), "resume"),
            (Tab::Runs, KeyCode::Char('x')) => {
                if let Some(run_id) = self.selected_run(model) {
                    self.dialog = Some(Dialog::ConfirmAbort { run_id });
                }
                Outcome::Nothing
            }
            (Tab::Runs, KeyCode::Enter) => {
                self.results_run = self.selected_run(model);
                self.result = 0;
                self.tab = Tab::Results;
                self.replay(model, false)
            }
            (Tab::Results, KeyCode::Char('l')) => self.replay(model, true),
            (Tab::Instruments, KeyCode::Char('o')) => {
                match next_interlock(model, None, |s| matches!(s, InterlockState::Tripped { .. })) {
                    Some(interlock) => {
                        self.dialog = Some(Dialog::Override {
                            interlock,
                            minutes: OVERRIDE_MINUTES,
                            reason: String::new(),
                        })
                    }
                    None => self.notice(Level::Info, "no tripped interlock to override"),
                }
                Outcome::Nothing
            }
            (Tab::Instruments, KeyCode::Char('w')) => {
                match next_interlock(model, None, |s| {
                    matches!(s, InterlockState::Overridden { .. })
                }) {
                    Some(interlock) => self.dialog = Some(Dialog::ConfirmWithdraw { interlock }),
                    None => self.notice(Level::Info, "no interlock is overridden"),
                }
                Outcome::Nothing
            }
            (Tab::Approvals, KeyCode::Char('a')) => {
                if let Some(run_id) = self.selected_approval(model) {
                    self.dialog = Some(Dialog::ConfirmApprove { run_id });
                }
                Outcome::Nothing
            }
            (Tab::Approvals, KeyCode::Char('r')) => {
                if let Some(run_id) = self.selected_approval(model) {
                    self.dialog = Some(Dialog::RejectReason {
                        run_id,
                        reason: String::new(),
                    });
                }
                Outcome::Nothing
            }
            _ => Outcome::Nothing,
        }
    }

    /// Asks for the results a console that started late has not seen: when opening a run that has none
    /// or has gaps (once per run), or whenever the technician asks (`always`).
    fn replay(&mut self, model: &mut Model, always: bool) -> Outcome {
        let Some(run) = self
            .results_run_id(model)
            .and_then(|id| model.runs.get_mut(&id))
        else {
            return Outcome::Nothing;
        };
        let missing = run.results.is_empty() || (run.results.len() as u64) < run.last_seq;
        if matches!(
            run.state,
            Some(RunState::AwaitingApproval | RunState::Queued)
        ) || (!always && (run.replay_asked || !missing))
        {
            return Outcome::Nothing;
        }
        run.replay_asked = true;
        Outcome::Send(Command::Replay {
            run_id: run.run_id.clone(),
            after: 0,
        })
    }

    fn on_dialog_key(&mut self, dialog: Dialog, key: KeyEvent, model: &mut Model) -> Outcome {
        let yes = matches!(key.code, KeyCode::Char('y') | KeyCode::Char('Y'));
        match dialog {
            Dialog::Help => Outcome::Nothing,
            Dialog::ConfirmEStop => {
                // Enter confirms too: in an emergency nobody should hunt for a key.
                if yes || key.code == KeyCode::Enter {
                    model.estop = EStop::Requested;
                    Outcome::Send(Command::EStop)
                } else {
                    self.notice(Level::Info, "emergency stop not sent");
                    Outcome::Nothing
                }
            }
            Dialog::ConfirmAcknowledge => {
                if yes {
                    model.estop = EStop::Acknowledging;
                    Outcome::Send(Command::AcknowledgeEStop)
                } else {
                    Outcome::Nothing
                }
            }
            Dialog::ConfirmApprove { run_id } => {
                if yes {
                    Outcome::Send(Command::Approve { run_id })
                } else {
                    Outcome::Nothing
                }
            }
            Dialog::ConfirmAbort { run_id } => {
                if yes {
                    Outcome::Send(Command::Control {
                        run_id,
                        action: "abort",
                    })
                } else {
                    Outcome::Nothing
                }
            }
            Dialog::ConfirmWithdraw { interlock } => {
                if yes {
                    Outcome::Send(Command::WithdrawOverride { interlock })
                } else {
                    Outcome::Nothing
                }
            }
            Dialog::Override {
                interlock,
                mut minutes,
                mut reason,
            } => {
                match key.code {
                    KeyCode::Esc => return Outcome::Nothing,
                    KeyCode::Enter if reason.trim().is_empty() => {
                        self.notice(Level::Warn, "an override needs a reason");
                    }
                    KeyCode::Enter => {
                        return Outcome::Send(Command::OverrideInterlock {
                            interlock,
                            seconds: minutes * 60,
                            reason: reason.trim().to_owned(),
                        });
                    }
                    KeyCode::Up => minutes = (minutes + 5).min(MAX_OVERRIDE_MINUTES),
                    KeyCode::Down => minutes = minutes.saturating_sub(5).max(1),
                    // Another tripped interlock, when several are.
                    KeyCode::Tab => {
                        let next = next_interlock(model, Some(&interlock), |s| {
                            matches!(s, InterlockState::Tripped { .. })
                        });
                        if let Some(next) = next {
                            self.dialog = Some(Dialog::Override {
                                interlock: next,
                                minutes,
                                reason,
                            });
                            return Outcome::Nothing;
                        }
                    }
                    KeyCode::Backspace => {
                        reason.pop();
                    }
                    KeyCode::Char(c) if !c.is_control() && reason.chars().count() < MAX_REASON => {
                        reason.push(c)
                    }
                    _ => {}
                }
                self.dialog = Some(Dialog::Override {
                    interlock,
                    minutes,
                    reason,
                });
                Outcome::Nothing
            }
            Dialog::RejectReason { run_id, mut reason } => match key.code {
                KeyCode::Esc => Outcome::Nothing,
                KeyCode::Enter if reason.trim().is_empty() => {
                    self.notice(Level::Warn, "a rejection needs a reason");
                    self.dialog = Some(Dialog::RejectReason { run_id, reason });
                    Outcome::Nothing
                }
                KeyCode::Enter => Outcome::Send(Command::Reject {
                    run_id,
                    reason: reason.trim().to_owned(),
                }),
                KeyCode::Backspace => {
                    reason.pop();
                    self.dialog = Some(Dialog::RejectReason { run_id, reason });
                    Outcome::Nothing
                }
                KeyCode::Char(c) if !c.is_control() => {
                    if reason.chars().count() < MAX_REASON {
                        reason.push(c);
                    }
                    self.dialog = Some(Dialog::RejectReason { run_id, reason });
                    Outcome::Nothing
                }
                _ => {
                    self.dialog = Some(Dialog::RejectReason { run_id, reason });
                    Outcome::Nothing
                }
            },
        }
    }

    /// A command is about to go out: refused here while the broker is away (it would go out later, when
    /// nobody expects it any more).
    pub fn may_send(&mut self, model: &mut Model, command: &Command) -> bool {
        if model.link == Link::Connected {
            return true;
        }
        if matches!(command, Command::EStop) {
            model.estop = EStop::Clear;
        }
        self.notice(
            Level::Error,
            "not connected to the broker: nothing sent (use the hardware stop if it is urgent)",
        );
        false
    }

    /// The controller's answer to one of this console's commands.
    pub fn on_answer(&mut self, model: &mut Model, label: &str, payload: &[u8], now_ms: i64) {
        let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let accepted = v["accepted"] == Value::Bool(true);
        let (level, text) = if accepted {
            // A pause or resume is answered before the executor has acted on it (the state is still the
            // old one); the run's status shows the change.
            let settles_later = label.starts_with("pause ") || label.starts_with("resume ");
            let state = v["state"]
                .as_str()
                .filter(|_| !settles_later)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            (Level::Info, format!("{label} accepted{state}"))
        } else {
            let why = v["message"]
                .as_str()
                .or_else(|| v["error"].as_str())
                .unwrap_or("unreadable answer");
            (Level::Error, format!("{label} refused: {why}"))
        };
        match (label, accepted) {
            ("emergency stop", true) => model.estop = EStop::Latched,
            ("emergency stop", false) => model.estop = EStop::Clear,
            ("acknowledge emergency stop", true) => model.estop = EStop::Clear,
            ("acknowledge emergency stop", false) => model.estop = EStop::Latched,
            _ => {}
        }
        model.say(now_ms, level, format!("{} {text}", model.user));
        self.notice(level, text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn a_technician_overrides_a_tripped_interlock_with_a_time_and_a_reason_and_withdraws_it() {
        let mut m = Model::new("sim", "alice");
        m.link = Link::Connected;
        m.apply(
            "labctl/sim/interlocks",
            json!([
                {"name": "gantry-alarm", "state": "tripped", "reason": "gantry: alarm"},
                {"name": "pump-alarm", "state": "tripped", "reason": "pump-red: alarm: stall"},
                {"name": "balance-overload", "state": "overridden", "reason": "mass_g = 230",
                 "by": "bo", "because": "known", "until_ms": 9},
                {"name": "hotplate-silent", "state": "clear"}
            ])
            .to_string()
            .as_bytes(),
            1,
        );
        let mut ui = Ui {
            tab: Tab::Instruments,
            ..Ui::default()
        };
        assert_eq!(ui.on_key(key(KeyCode::Char('o')), &mut m), Outcome::Nothing);
        assert!(
            matches!(&ui.dialog, Some(Dialog::Override { interlock, minutes: 15, .. }) if interlock == "gantry-alarm"),
            "{:?}",
            ui.dialog
        );
        // Without a reason nothing is sent and the dialog stays.
        assert_eq!(ui.on_key(key(KeyCode::Enter), &mut m), Outcome::Nothing);
        assert!(ui.dialog.is_some());
        for c in "checked".chars() {
            ui.on_key(key(KeyCode::Char(c)), &mut m);
        }
        ui.on_key(key(KeyCode::Up), &mut m);
        ui.on_key(key(KeyCode::Up), &mut m);
        // The next tripped one (the overridden and the clear ones are skipped).
        ui.on_key(key(KeyCode::Tab), &mut m);
        let sent = ui.on_key(key(KeyCode::Enter), &mut m);
        let override_pump = Command::OverrideInterlock {
            interlock: "pump-alarm".into(),
            seconds: 25 * 60,
            reason: "checked".into(),
        };
        assert_eq!(sent, Outcome::Send(override_pump.clone()));
        let (topic, body, _) = override_pump.message(&Topics::new("sim"));
        assert_eq!(topic, "labctl/sim/interlocks/pump-alarm/override");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"seconds": 1500, "reason": "checked"})
        );
        // Never past an hour.
        ui.on_key(key(KeyCode::Char('o')), &mut m);
        for _ in 0..20 {
            ui.on_key(key(KeyCode::Up), &mut m);
        }
        assert!(matches!(
            &ui.dialog,
            Some(Dialog::Override { minutes: 60, .. })
        ));
        ui.on_key(key(KeyCode::Esc), &mut m);
        // Withdrawing asks once.
        ui.on_key(key(KeyCode::Char('w')), &mut m);
        assert_eq!(
            ui.on_key(key(KeyCode::Char('y')), &mut m),
            Outcome::Send(Command::WithdrawOverride {
                interlock: "balance-overload".into()
            })
        );
    }

    fn model_with_pending() -> Model {
        let mut m = Model::new("sim", "alice");
        m.link = Link::Connected;
        m.apply(
            "labctl/sim/runs/run-1-1/status",
            br#"{"run_id":"run-1-1","state":"awaiting_approval","at_ms":1}"#,
            1,
        );
        m
    }

    #[test]
    fn approving_takes_a_confirmation() {
        let mut m = model_with_pending();
        let mut ui = Ui::default();
        ui.on_key(key(KeyCode::Char('3')), &mut m);
        assert_eq!(ui.tab, Tab::Approvals);
        assert_eq!(ui.on_key(key(KeyCode::Char('a')), &mut m), Outcome::Nothing);
        assert!(matches!(ui.dialog, Some(Dialog::ConfirmApprove { .. })));
        assert_eq!(
            ui.on_key(key(KeyCode::Char('y')), &mut m),
            Outcome::Send(Command::Approve {
                run_id: "run-1-1".into()
            })
        );
        // Any other key cancels.
        ui.on_key(key(KeyCode::Char('a')), &mut m);
        assert_eq!(ui.on_key(key(KeyCode::Char('n')), &mut m), Outcome::Nothing);
        assert_eq!(ui.dialog, None);
    }

    #[test]
    fn rejecting_needs_a_typed_reason() {
        let mut m = model_with_pending();
        let mut ui = Ui {
            tab: Tab::Approvals,
            ..Ui::default()
        };
        ui.on_key(key(KeyCode::Char('r')), &mut m);
        assert_eq!(ui.on_key(key(KeyCode::Enter), &mut m), Outcome::Nothing);
        assert!(matches!(ui.dialog, Some(Dialog::RejectReason { .. })));
        for c in "quite hott".chars() {
            ui.on_key(key(KeyCode::Char(c)), &mut m);
        }
        ui.on_key(key(KeyCode::Backspace), &mut m);
        // 'q' inside the dialog is text, not quit.
        assert_eq!(
            ui.on_key(key(KeyCode::Enter), &mut m),
            Outcome::Send(Command::Reject {
                run_id: "run-1-1".into(),
                reason: "quite hot".into()
            })
        );
    }

    #[test]
    fn emergency_stop_is_one_key_and_a_confirmation_and_tracks_its_answer() {
        let mut m = model_with_pending();
        let mut ui = Ui {
            tab: Tab::Log,
            ..Ui::default()
        };
        ui.on_key(key(KeyCode::Char('!')), &mut m);
        assert_eq!(ui.dialog, Some(Dialog::ConfirmEStop));
        assert_eq!(
            ui.on_key(key(KeyCode::Enter), &mut m),
            Outcome::Send(Command::EStop)
        );
        assert_eq!(m.estop, EStop::Requested);
        ui.on_answer(
            &mut m,
            "emergency stop",
            br#"{"accepted":true,"topic":"labctl/sim/estop"}"#,
            5,
        );
        assert_eq!(m.estop, EStop::Latched);
        assert!(
            m.log
                .back()
                .unwrap()
                .text
                .starts_with("alice emergency stop accepted")
        );
        ui.on_key(key(KeyCode::Char('K')), &mut m);
        assert_eq!(
            ui.on_key(key(KeyCode::Char('y')), &mut m),
            Outcome::Send(Command::AcknowledgeEStop)
        );
        ui.on_answer(
            &mut m,
            "acknowledge emergency stop",
            br#"{"accepted":true}"#,
            6,
        );
        assert_eq!(m.estop, EStop::Clear);
    }

    #[test]
    fn refusals_are_shown_and_nothing_goes_out_while_the_broker_is_away() {
        let mut m = model_with_pending();
        let mut ui = Ui::default();
        ui.on_answer(
            &mut m,
            "pause run-1-1",
            br#"{"accepted":false,"error":"invalid_state","message":"run-1-1 is awaiting_approval"}"#,
            1,
        );
        assert_eq!(
            ui.notice,
            Some((
                Level::Error,
                "pause run-1-1 refused: run-1-1 is awaiting_approval".into()
            ))
        );
        ui.on_answer(
            &mut m,
            "pause run-1-1",
            br#"{"accepted":true,"run_id":"run-1-1","state":"running"}"#,
            1,
        );
        assert_eq!(
            ui.notice,
            Some((Level::Info, "pause run-1-1 accepted".into()))
        );
        ui.on_answer(
            &mut m,
            "approve run-1-1",
            br#"{"accepted":true,"run_id":"run-1-1","state":"queued"}"#,
            1,
        );
        assert_eq!(
            ui.notice,
            Some((Level::Info, "approve run-1-1 accepted: queued".into()))
        );
        m.link_down(2, "broker unreachable");
        assert!(!ui.may_send(&mut m, &Command::EStop));
        assert_eq!(m.estop, EStop::Clear);
    }

    #[test]
    fn run_controls_act_on_the_selected_run() {
        let mut m = model_with_pending();
        m.apply(
            "labctl/sim/runs/run-2-1/status",
            br#"{"run_id":"run-2-1","state":"running","at_ms":2}"#,
            2,
        );
        let mut ui = Ui::default();
        assert_eq!(ui.tab, Tab::Runs);
        // Newest first: run-2-1 is on top.
        assert_eq!(
            ui.on_key(key(KeyCode::Char('p')), &mut m),
            Outcome::Send(Command::Control {
                run_id: "run-2-1".into(),
                action: "pause"
            })
        );
        ui.on_key(key(KeyCode::Down), &mut m);
        ui.on_key(key(KeyCode::Char('x')), &mut m);
        assert_eq!(
            ui.on_key(key(KeyCode::Char('y')), &mut m),
            Outcome::Send(Command::Control {
                run_id: "run-1-1".into(),
                action: "abort"
            })
        );
        assert_eq!(ui.on_key(key(KeyCode::Char('q')), &mut m), Outcome::Quit);
    }

    #[test]
    fn opening_a_run_asks_for_its_results_only_when_some_are_missing() {
        let mut m = model_with_pending();
        m.apply(
            "labctl/sim/runs/run-2-1/status",
            br#"{"run_id":"run-2-1","state":"completed","at_ms":2}"#,
            2,
        );
        let mut ui = Ui::default();
        let replay = Outcome::Send(Command::Replay {
            run_id: "run-2-1".into(),
            after: 0,
        });
        assert_eq!(ui.on_key(key(KeyCode::Enter), &mut m), replay);
        assert_eq!(ui.tab, Tab::Results);
        // Asked once; `l` asks again on purpose.
        ui.tab = Tab::Runs;
        assert_eq!(ui.on_key(key(KeyCode::Enter), &mut m), Outcome::Nothing);
        assert_eq!(ui.on_key(key(KeyCode::Char('l')), &mut m), replay);
        // A run whose results all arrived needs nothing.
        m.apply(
            "labctl/sim/runs/run-3-1/results",
            br#"{"run_id":"run-3-1","seq":1,"name":"m","step":"s","instrument":"balance","value":{},"at_ms":3}"#,
            3,
        );
        m.apply(
            "labctl/sim/runs/run-3-1/status",
            br#"{"run_id":"run-3-1","state":"completed","at_ms":3}"#,
            3,
        );
        ui.tab = Tab::Runs;
        ui.run = 0;
        assert_eq!(ui.on_key(key(KeyCode::Enter), &mut m), Outcome::Nothing);
        assert_eq!(ui.results_run.as_deref(), Some("run-3-1"));
    }

    #[test]
    fn commands_follow_the_topic_contract() {
        let t = Topics::new("sim");
        let (topic, body, label) = Command::Reject {
            run_id: "r1".into(),
            reason: "no".into(),
        }
        .message(&t);
        assert_eq!(topic, "labctl/sim/runs/r1/approval");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"decision": "reject", "reason": "no"})
        );
        assert_eq!(label, "reject r1");
        let (topic, body, _) = Command::EStop.message(&t);
        assert_eq!(topic, "labctl/sim/estop");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"action": "trigger"})
        );
        let (topic, body, _) = Command::Replay {
            run_id: "r1".into(),
            after: 0,
        }
        .message(&t);
        assert_eq!(topic, "labctl/sim/runs/r1/control");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"action": "replay", "after": 0})
        );
    }
}
