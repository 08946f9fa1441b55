//! The driver of an instrument described by an instrument definition (`labctl_protocols::instrument_def`):
//! an ASCII instrument on a serial line or a socket, spoken to with the definition's commands and read
//! with its reply patterns. No code per instrument: the definition is the protocol.
//!
//! What it does with a definition:
//! - `start`: sends the identity queries, reads manufacturer, model, serial and firmware from their named
//!   captures (or the definition's fixed values), and refuses firmware the definition does not list unless
//!   the lab file allows it;
//! - `execute`: renders an action's commands with its parameters (each within the definition's range;
//!   the controller has checked the lab's envelope), waits for the acknowledgement when the definition
//!   gives one (an error reply becomes a device error with the definition's message), then waits for the
//!   action's completion (a reading reaching the parameter, a fixed time, or the acknowledgement);
//! - `poll`: reads every reading; `safe_state` and `recover` send the definition's sequences.
//!
//! Commands go out at least `inter_command_delay_ms` apart, as many instruments' manuals require.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use labctl_protocols::InstrumentKind;
use labctl_protocols::instrument_def::{Completion, InstrumentDefinition, Reading};
use regex::Regex;
use tokio::time::Instant;
use tracing::warn;

use super::{Link, retries};
use crate::error::DriverError;
use crate::instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
use crate::port::{PortHandle, Transaction, Verdict, frame_line_or_cr};

/// Longest reply a definition's instrument is expected to print (the port's line limit applies too).
const MAX_REPLY: usize = 256;
/// How often a completion condition on a reading is checked.
const COMPLETION_POLL: Duration = Duration::from_millis(200);

/// A definition's reading names live as long as the process, like the built-in drivers' quantity names:
/// each distinct name is kept once, however many times a lab is loaded.
pub(super) fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// A reading with its pattern compiled.
#[derive(Debug)]
struct CompiledReading {
    name: &'static str,
    spec: Reading,
    query: String,
    reply: Regex,
}

/// An action's acknowledgement and error patterns, compiled.
#[derive(Debug, Clone)]
struct CompiledReplies {
    ack: Option<Regex>,
    errors: Vec<(Regex, String)>,
}

/// A defined instrument's driver.
#[derive(Debug)]
pub struct DefinedInstrument {
    link: Link,
    definition: Arc<InstrumentDefinition>,
    allow_firmware: Vec<String>,
    readings: Vec<CompiledReading>,
    /// By action name.
    replies: BTreeMap<String, CompiledReplies>,
    timeout: Duration,
    delay: Duration,
    last_sent: Option<Instant>,
    time_scale: f64,
}

impl DefinedInstrument {
    /// The driver for `definition` on `port`; no I/O until [`Instrument::start`]. Refuses a definition this
    /// driver cannot speak (Modbus, STX/ETX framing or a checksum: not yet), naming what.
    pub fn new(
        id: &str,
        port: PortHandle,
        definition: Arc<InstrumentDefinition>,
        allow_firmware: Vec<String>,
    ) -> Result<DefinedInstrument, DriverError> {
        let unsupported = |what: &str, found: String| DriverError::Unsupported {
            instrument: id.to_owned(),
            what: what.to_owned(),
            found,
            supported: "ASCII lines ended by CR, LF or CR LF, without STX/ETX or checksum".into(),
        };
        let Some(line) = &definition.line else {
            return Err(unsupported("transport", "modbus".into()));
        };
        if line.stx_etx {
            return Err(unsupported("framing", "stx_etx".into()));
        }
        if line.checksum != labctl_protocols::instrument_def::Checksum::None {
            return Err(unsupported("checksum", format!("{:?}", line.checksum)));
        }
        if !matches!(line.terminator_in.as_str(), "\r" | "\n" | "\r\n") {
            return Err(unsupported(
                "reply terminator",
                format!("{:?}", line.terminator_in),
            ));
        }
        let compile = |what: &str, pattern: &str| {
            Regex::new(pattern).map_err(|e| unsupported(what, e.to_string()))
        };
        let mut readings = Vec::new();
        for r in &definition.readings {
            let (Some(query), Some(reply)) = (&r.query, &r.reply) else {
                return Err(unsupported(
                    "reading",
                    format!("{} without query and reply", r.name),
                ));
            };
            readings.push(CompiledReading {
                name: intern(&r.name),
                spec: r.clone(),
                query: query.clone(),
                reply: compile(&format!("reading {}", r.name), reply)?,
            });
        }
        let mut replies = BTreeMap::new();
        for a in &definition.actions {
            let what = format!("action {}", a.name);
            let ack = match &a.ack {
                Some(p) => Some(compile(&what, p)?),
                None => None,
            };
            let mut errors = Vec::new();
            for e in &a.errors {
                errors.push((compile(&what, &e.reply)?, e.message.clone()));
            }
            replies.insert(a.name.clone(), CompiledReplies { ack, errors });
        }
        Ok(DefinedInstrument {
            link: Link::new(id, port),
            replies,
            timeout: Duration::from_millis(u64::from(line.reply_timeout_ms)),
            delay: Duration::from_millis(u64::from(line.inter_command_delay_ms)),
            definition,
            allow_firmware,
            readings,
            last_sent: None,
            time_scale: 1.0,
        })
    }

    /// Seconds of the instrument's own time per real second (a simulated lab's warp): completion waits
    /// (`after_s`, `timeout_s`) are the instrument's seconds.
    pub fn time_scale(mut self, scale: f64) -> DefinedInstrument {
        self.time_scale = super::sane_time_scale(scale);
        self
    }

    fn device_seconds(&self, s: f64) -> Duration {
        Duration::from_secs_f64((s / self.time_scale).clamp(0.0, 1.0e7))
    }

    /// Waits out the definition's gap since the last command.
    async fn pace(&mut self) {
        // Only a gap still to wait sleeps: a timer, even one already due, waits for the timer's next tick.
        if let Some(last) = self.last_sent
            && last + self.delay > Instant::now()
        {
            tokio::time::sleep_until(last + self.delay).await;
        }
        self.last_sent = Some(Instant::now());
    }

    fn request(&self, command: &str) -> Vec<u8> {
        let mut bytes = command.as_bytes().to_vec();
        bytes.extend_from_slice(self.definition.terminator_out().as_bytes());
        bytes
    }

    /// Sends `command` and returns the first reply line that `accept` takes (terminator removed).
    async fn ask(
        &mut self,
        command: &str,
        accept: impl Fn(&str) -> bool + Send + 'static,
        retry: bool,
    ) -> Result<String, DriverError> {
        self.pace().await;
        let bytes = self.request(command);
        let budget = self.link.budget(&bytes, MAX_REPLY, self.timeout);
        let matcher = move |frame: &[u8]| {
            if accept(reply_text(frame)) {
                Verdict::Last
            } else {
                Verdict::Unrelated
            }
        };
        let t = Transaction::new(bytes, frame_line_or_cr, matcher)
            .timeout(budget)
            .retries(retries(retry));
        let frame = self.link.ask(t).await?;
        Ok(reply_text(&frame).to_owned())
    }

    /// Sends a command the instrument does not answer.
    async fn tell(&mut self, command: &str) -> Result<(), DriverError> {
        self.pace().await;
        let bytes = self.request(command);
        let budget = self.link.budget(&bytes, 0, Duration::ZERO);
        self.link
            .tell(Transaction::no_reply(bytes, frame_line_or_cr).timeout(budget))
            .await
    }

    async fn read(&mut self, index: usize) -> Result<f64, DriverError> {
        let (query, reply) = {
            let r = &self.readings[index];
            (r.query.clone(), r.reply.clone())
        };
        let text = self
            .ask(&query, move |line| reply.is_match(line), true)
            .await?;
        let r = &self.readings[index];
        r.spec
            .value_with(&r.reply, &text)
            .map_err(|e| self.link.damaged(&query, text.as_bytes(), e.to_string()))
    }

    fn reading_index(&self, name: &str) -> Option<usize> {
        self.readings.iter().position(|r| r.spec.name == name)
    }

    async fn run_action(
        &mut self,
        command: &DeviceCommand,
        action: &str,
        params: &BTreeMap<String, f64>,
    ) -> Result<Outcome, DriverError> {
        let definition = Arc::clone(&self.definition);
        let Some(spec) = definition.action(action) else {
            return Err(self.link.invalid(
                command,
                format!(
                    "the definition of {} {} has no action {action}",
                    definition.model.manufacturer, definition.model.name
                ),
            ));
        };
        let lines = spec
            .render(params)
            .map_err(|e| self.link.invalid(command, e.to_string()))?;
        let CompiledReplies { ack, errors } =
            self.replies
                .get(action)
                .cloned()
                .unwrap_or(CompiledReplies {
                    ack: None,
                    errors: Vec::new(),
                });
        for line in &lines {
            match &ack {
                None if errors.is_empty() => self.tell(line).await?,
                _ => {
                    let (ack, patterns) = (
                        ack.clone(),
                        errors.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
                    );
                    let reply = self
                        .ask(
                            line,
                            move |text| {
                                ack.as_ref().is_some_and(|a| a.is_match(text))
                                    || patterns.iter().any(|p| p.is_match(text))
                            },
                            false,
                        )
                        .await?;
                    if let Some((_, message)) = errors.iter().find(|(re, _)| re.is_match(&reply)) {
                        return Err(self.link.device(reply.clone(), message.clone()));
                    }
                }
            }
        }
        match &spec.completion {
            Completion::Acknowledged => {}
            Completion::AfterS(s) => tokio::time::sleep(self.device_seconds(*s)).await,
            Completion::Reading {
                reading,
                param,
                tolerance,
                timeout_s,
            } => {
                let (Some(index), Some(target)) = (self.reading_index(reading), params.get(param))
                else {
                    return Err(self.link.invalid(
                        command,
                        format!("completion on reading {reading} for parameter {param}"),
                    ));
                };
                let deadline = Instant::now() + self.device_seconds(*timeout_s);
                loop {
                    let value = self.read(index).await?;
                    if (value - target).abs() <= *tolerance {
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(self.link.device(
                            "timeout",
                            format!(
                                "{reading} is {value}, not within {tolerance} of {target} after {timeout_s} s"
                            ),
                        ));
                    }
                    tokio::time::sleep(COMPLETION_POLL).await;
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// Sends a safety or recovery sequence, every command even if one fails; the first error is returned.
    async fn sequence(&mut self, commands: &[String]) -> Result<(), DriverError> {
        let mut first = Ok(());
        for command in commands {
            if let Err(e) = self.tell(command).await
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

/// A reply line without its terminator, as text (bytes that are not UTF-8 make it match nothing).
fn reply_text(frame: &[u8]) -> &str {
    std::str::from_utf8(frame)
        .unwrap_or("\u{FFFD}")
        .trim_end_matches(['\r', '\n'])
}

impl Instrument for DefinedInstrument {
    fn kind(&self) -> InstrumentKind {
        InstrumentKind::Defined
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        self.link.connect().await?;
        let definition = Arc::clone(&self.definition);
        let mut fields: BTreeMap<String, String> = definition.identity.fixed.clone();
        for q in &definition.identity.queries {
            let re = Regex::new(&q.reply).map_err(|e| DriverError::Unsupported {
                instrument: self.link.id.clone(),
                what: "identity pattern".into(),
                found: e.to_string(),
                supported: "a regular expression".into(),
            })?;
            let matcher = re.clone();
            let text = self
                .ask(&q.query, move |line| matcher.is_match(line), true)
                .await?;
            if let Some(caps) = re.captures(&text) {
                for name in re.capture_names().flatten() {
                    if let Some(m) = caps.name(name) {
                        fields.insert(name.to_owned(), m.as_str().trim().to_owned());
                    }
                }
            }
        }
        let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
        let identity = Identity {
            manufacturer: field("manufacturer"),
            model: field("model"),
            serial: field("serial"),
            firmware: field("firmware"),
        };
        let known = &definition.identity.firmware;
        if !known.contains(&identity.firmware) && !self.allow_firmware.contains(&identity.firmware)
        {
            return Err(DriverError::Unsupported {
                instrument: self.link.id.clone(),
                what: "firmware".into(),
                found: identity.firmware,
                supported: format!(
                    "{} (the definition's; a lab file adds its own with allow_firmware)",
                    known
                        .iter()
                        .chain(&self.allow_firmware)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(identity)
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        match command {
            DeviceCommand::Defined { action, params } => {
                self.run_action(command, action, params).await
            }
            DeviceCommand::Read { quantity } => {
                let Some(index) = self.reading_index(quantity) else {
                    return Err(self
                        .link
                        .invalid(command, format!("no reading {quantity} in the definition")));
                };
                let value = self.read(index).await?;
                Ok(Outcome::Reading {
                    quantity: quantity.clone(),
                    value,
                    unit: self.readings[index].spec.unit.clone(),
                })
            }
            other => Err(self.link.wrong_kind(other, InstrumentKind::Defined)),
        }
    }

    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        let mut values = Vec::with_capacity(self.readings.len());
        for index in 0..self.readings.len() {
            let value = self.read(index).await?;
            values.push((self.readings[index].name, value));
        }
        Ok(Telemetry {
            state: DeviceState::Idle,
            values,
        })
    }

    async fn safe_state(&mut self) -> Result<(), DriverError> {
        let commands = self.definition.safe_state.clone();
        self.sequence(&commands).await
    }

    async fn recover(&mut self) -> Result<(), DriverError> {
        let commands = self.definition.recovery.clone();
        self.sequence(&commands).await
    }

    async fn stop(&mut self) {
        if self.link.port.is_open()
            && let Err(error) = self.safe_state().await
        {
            warn!(instrument = %self.link.id, %error, "safe state on stop failed");
        }
        self.link.disconnect().await;
    }
}

#[cfg(test)]
mod tests;
