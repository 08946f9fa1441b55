//! The wire of an ASCII instrument: the definition's commands as lines on the instrument's port task,
//! its replies read with the definition's patterns. Commands go out at least `inter_command_delay_ms`
//! apart, as many instruments' manuals require; queries are retried once (safe to repeat), commands never.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use labctl_codecs::DecodeError;
use labctl_codecs::ascii_frame::{AsciiFraming, etx_frame_len};
use labctl_protocols::instrument_def::{ActionSpec, InstrumentDefinition};
use regex::Regex;
use tokio::time::Instant;

use super::Wire;
use crate::error::DriverError;
use crate::port::{Framer, PortHandle, Transaction, Verdict, frame_line_or_cr};
use crate::roles::{Link, retries};

/// Longest reply a definition's instrument is expected to print (the port's line limit applies too).
const MAX_REPLY: usize = 256;

/// A reading's query and its reply pattern, compiled.
#[derive(Debug)]
struct CompiledReading {
    query: String,
    reply: Regex,
}

/// An action's acknowledgement and error patterns, compiled.
#[derive(Debug, Clone)]
struct CompiledReplies {
    ack: Option<Regex>,
    errors: Vec<(Regex, String)>,
}

/// ASCII lines on a port task.
#[derive(Debug)]
pub struct LineWire {
    link: Link,
    definition: Arc<InstrumentDefinition>,
    identity: Vec<(String, Regex)>,
    readings: Vec<CompiledReading>,
    /// By action name.
    replies: BTreeMap<String, CompiledReplies>,
    timeout: Duration,
    delay: Duration,
    last_sent: Option<Instant>,
    /// STX/ETX and the checksum, as the definition declares them.
    framing: AsciiFraming,
    /// How replies are split: at the line terminator, or at ETX when there is none.
    framer: Framer,
}

impl LineWire {
    /// The wire for `definition` on `port`; refuses a definition it cannot speak (Modbus; replies not ended
    /// by CR, LF, CR LF or, with STX/ETX framing, ETX), naming what.
    pub fn new(
        id: &str,
        port: PortHandle,
        definition: Arc<InstrumentDefinition>,
    ) -> Result<LineWire, DriverError> {
        let unsupported = |what: &str, found: String| DriverError::Unsupported {
            instrument: id.to_owned(),
            what: what.to_owned(),
            found,
            supported: "ASCII lines ended by CR, LF or CR LF, or STX/ETX frames".into(),
        };
        let Some(line) = &definition.line else {
            return Err(unsupported("transport", "modbus".into()));
        };
        let framer: Framer = match line.terminator_in.as_str() {
            "\r" | "\n" | "\r\n" => frame_line_or_cr,
            "" if line.stx_etx => frame_at_etx,
            other => return Err(unsupported("reply terminator", other.to_owned())),
        };
        let framing = line.framing();
        let compile = |what: &str, pattern: &str| {
            Regex::new(pattern).map_err(|e| unsupported(what, e.to_string()))
        };
        let mut identity = Vec::new();
        for q in &definition.identity.queries {
            identity.push((q.query.clone(), compile("identity pattern", &q.reply)?));
        }
        let mut readings = Vec::new();
        for r in &definition.readings {
            let (Some(query), Some(reply)) = (&r.query, &r.reply) else {
                return Err(unsupported(
                    "reading",
                    format!("{} without query and reply", r.name),
                ));
            };
            readings.push(CompiledReading {
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
        Ok(LineWire {
            link: Link::new(id, port),
            timeout: Duration::from_millis(u64::from(line.reply_timeout_ms)),
            delay: Duration::from_millis(u64::from(line.inter_command_delay_ms)),
            definition,
            identity,
            readings,
            replies,
            last_sent: None,
            framing,
            framer,
        })
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
        let mut bytes = self.framing.wrap(command.as_bytes());
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
        let framing = self.framing;
        let matcher = move |frame: &[u8]| match framing.unwrap(trim_terminator(frame)) {
            Ok(payload) if accept(reply_text(payload)) => Verdict::Last,
            Ok(_) => Verdict::Unrelated,
            // A frame damaged on the line is this request's answer, refused below by name.
            Err(_) => Verdict::Last,
        };
        let t = Transaction::new(bytes, self.framer, matcher)
            .timeout(budget)
            .retries(retries(retry));
        let frame = self.link.ask(t).await?;
        let payload = self
            .framing
            .unwrap(trim_terminator(&frame))
            .map_err(|e| self.link.damaged(command, &frame, e.to_string()))?;
        Ok(reply_text(payload).to_owned())
    }

    /// Sends a command the instrument does not answer.
    async fn tell(&mut self, command: &str) -> Result<(), DriverError> {
        self.pace().await;
        let bytes = self.request(command);
        let budget = self.link.budget(&bytes, 0, Duration::ZERO);
        self.link
            .tell(Transaction::no_reply(bytes, self.framer).timeout(budget))
            .await
    }
}

/// A received frame without its line terminator.
fn trim_terminator(frame: &[u8]) -> &[u8] {
    let end = frame
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    &frame[..end]
}

/// A reply's payload as text (bytes that are not UTF-8 make it match nothing).
fn reply_text(payload: &[u8]) -> &str {
    std::str::from_utf8(payload).unwrap_or("\u{FFFD}")
}

/// Splits STX/ETX frames that no line terminator follows: a frame ends at ETX.
fn frame_at_etx(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    Ok(etx_frame_len(buf))
}

impl Wire for LineWire {
    async fn connect(&mut self) -> Result<BTreeMap<String, String>, DriverError> {
        self.link.connect().await?;
        let mut fields = BTreeMap::new();
        for (query, re) in self.identity.clone() {
            let matcher = re.clone();
            let text = self
                .ask(&query, move |line| matcher.is_match(line), true)
                .await?;
            if let Some(caps) = re.captures(&text) {
                for name in re.capture_names().flatten() {
                    if let Some(m) = caps.name(name) {
                        fields.insert(name.to_owned(), m.as_str().trim().to_owned());
                    }
                }
            }
        }
        Ok(fields)
    }

    async fn read(&mut self, index: usize) -> Result<f64, DriverError> {
        let Some(r) = self.readings.get(index) else {
            return Err(self
                .link
                .damaged("read", b"", format!("no reading {index}")));
        };
        let (query, reply) = (r.query.clone(), r.reply.clone());
        let matcher = reply.clone();
        let text = self
            .ask(&query, move |line| matcher.is_match(line), true)
            .await?;
        self.definition.readings[index]
            .value_with(&reply, &text)
            .map_err(|e| self.link.damaged(&query, text.as_bytes(), e.to_string()))
    }

    async fn act(
        &mut self,
        action: &ActionSpec,
        params: &BTreeMap<String, f64>,
    ) -> Result<(), DriverError> {
        let lines = action
            .render(params)
            .map_err(|e| DriverError::InvalidCommand {
                instrument: self.link.id.clone(),
                command: action.name.clone(),
                reason: e.to_string(),
            })?;
        let CompiledReplies { ack, errors } =
            self.replies
                .get(&action.name)
                .cloned()
                .unwrap_or(CompiledReplies {
                    ack: None,
                    errors: Vec::new(),
                });
        for line in &lines {
            if ack.is_none() && errors.is_empty() {
                self.tell(line).await?;
                continue;
            }
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
        Ok(())
    }

    async fn step(&mut self, step: &str) -> Result<(), DriverError> {
        self.tell(step).await
    }

    fn connected(&self) -> bool {
        self.link.port.is_open()
    }

    async fn disconnect(&mut self) {
        self.link.disconnect().await;
    }
}
