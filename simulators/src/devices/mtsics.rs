//! The analytical balance, Mettler Toledo MT-SICS level 0/1 (serial 9600 8N1, CR LF), device side.
//!
//! Commands are framed and checked by the codec ([`codec::decode_command`]); a line it refuses gets the
//! balance's own reply ([`codec::error_reply`]: `ES`, `ET`, `TA L`). Then, as the MT-SICS reference
//! describes:
//! - `S`, `Z` and `T` wait for a stable reading; if none comes within the stability timeout the answer is
//!   `S I`, `Z I`, `T I`. Commands that arrive meanwhile are queued and run afterwards (at most
//!   [`MAX_QUEUED`]); `@` cancels everything and answers at once;
//! - `SI` answers at once, `S S` or `S D`; `SIR` repeats that at the balance's update rate until the next
//!   command;
//! - overload and underload give `S +` / `S -` (and `Z`/`T` likewise); zero and tare outside their ranges
//!   give `+` / `-`;
//! - `@` cancels pending commands and `SIR`, clears the tare and answers like `I4`.
//!
//! Injected faults (`FaultConfig::error_code`): `+`, `-`, `I` (every weighing, zero and tare command is
//! answered `<ID> +` etc.: overload, underload, not executable), `ES`, `ET`, `EL` (every command is answered
//! with that error).

use std::collections::VecDeque;
use std::time::Duration;

use labctl_codecs::mtsics::{
    self as codec, Command, Mass, MassUnit, Refusal, ReplyId, Response, Stability,
};
use labctl_codecs::{DecodeError, Decoded};
use serde::{Deserialize, Serialize};

use super::{Ctx, Device, LineSettings};
use crate::model::{BalanceError, InstrumentId, LabModel, LoadState};

/// Commands kept while `S`, `Z` or `T` waits for stability.
pub const MAX_QUEUED: usize = 8;

/// What the balance says about itself, and its timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MtSicsConfig {
    /// Balance type as `I2` reports it, before capacity and unit.
    pub model: String,
    /// `I3` software version.
    pub software: String,
    /// `I4` serial number.
    pub serial: String,
    /// `I1` versions of MT-SICS levels 0 to 3 (empty for levels not implemented).
    pub level_versions: [String; 4],
    /// Longest wait for a stable reading before `S I` (virtual seconds).
    pub stable_timeout_s: f64,
    /// Interval of `SIR` readings (virtual seconds).
    pub update_interval_s: f64,
}

impl Default for MtSicsConfig {
    fn default() -> Self {
        MtSicsConfig {
            model: "XS204 Excellence".into(),
            software: "2.20 10.28.0.493.142".into(),
            serial: "B021002593".into(),
            level_versions: ["2.20".into(), "2.20".into(), String::new(), String::new()],
            stable_timeout_s: 10.0,
            update_interval_s: 0.125,
        }
    }
}

/// A command waiting for a stable reading.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    command: Command,
    deadline: Duration,
}

/// The balance.
#[derive(Debug, Clone)]
pub struct MtSics {
    config: MtSicsConfig,
    instruments: [InstrumentId; 1],
    rx: Vec<u8>,
    pending: Option<Pending>,
    queue: VecDeque<Result<Command, Response>>,
    /// Next `SIR` reading.
    sir: Option<Duration>,
}

impl MtSics {
    /// The lab's first balance (on the weigh station).
    pub fn new(config: MtSicsConfig) -> MtSics {
        MtSics::of_balance(config, 0)
    }

    /// The model's balance `index` (`LabModel::balance_count`).
    pub fn of_balance(config: MtSicsConfig, index: usize) -> MtSics {
        MtSics {
            config,
            instruments: [InstrumentId::Balance(index)],
            rx: Vec::new(),
            pending: None,
            queue: VecDeque::new(),
            sir: None,
        }
    }

    fn send(ctx: &mut Ctx<'_>, resp: &Response) {
        let mut bytes = Vec::new();
        codec::encode_response(resp, &mut bytes);
        ctx.emit(0, bytes);
    }

    fn span(seconds: f64) -> Duration {
        Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX)
    }

    /// The balance's display: grams with as many decimals as its readability.
    fn mass(ctx: &Ctx<'_>, grams: f64) -> Mass {
        let readability = ctx.model.config().balance.readability_g;
        let decimals = (-readability.log10()).round().clamp(0.0, 9.0) as u8;
        let digits = (grams * 10f64.powi(i32::from(decimals))).round();
        let digits = if digits.is_finite() {
            digits.clamp(-9e17, 9e17) as i64
        } else {
            0
        };
        Mass::new(digits, decimals, MassUnit::Gram)
    }

    fn refused(id: ReplyId, reason: Refusal) -> Response {
        Response::Refused { id, reason }
    }

    fn index(&self) -> usize {
        match self.instruments[0] {
            InstrumentId::Balance(index) => index,
            _ => 0,
        }
    }

    /// The tare of this balance as the display shows it.
    fn tare(&self, ctx: &Ctx<'_>) -> Mass {
        Self::mass(ctx, ctx.model.balance_tare_g(self.index()).unwrap_or(0.0))
    }

    fn injected(&self, ctx: &Ctx<'_>) -> Option<String> {
        ctx.faults(self.instruments[0])
            .error_code
            .map(|c| c.trim().to_owned())
    }

    /// Executes one command; `None` when it must wait for stability.
    fn execute(
        &mut self,
        ctx: &mut Ctx<'_>,
        command: Command,
        deadline: Duration,
    ) -> Option<Response> {
        let injected = self.injected(ctx);
        match injected.as_deref() {
            Some("ES") => return Some(Response::SyntaxError),
            Some("ET") => return Some(Response::TransmissionError),
            Some("EL") => return Some(Response::LogicalError),
            _ => {}
        }
        let injected_refusal = match injected.as_deref() {
            Some("+") => Some(Refusal::Overload),
            Some("-") => Some(Refusal::Underload),
            Some("I") => Some(Refusal::NotExecutable),
            _ => None,
        };
        let weighing_id = match command {
            Command::StableWeight | Command::ImmediateWeight | Command::RepeatImmediateWeight => {
                Some(ReplyId::Weight)
            }
            Command::Zero => Some(ReplyId::Zero),
            Command::ZeroImmediate => Some(ReplyId::ZeroImmediate),
            Command::Tare => Some(ReplyId::Tare),
            _ => None,
        };
        if let (Some(reason), Some(id)) = (injected_refusal, weighing_id) {
            return Some(Self::refused(id, reason));
        }
        let now = ctx.now;
        let balance = self.index();
        Some(match command {
            Command::Reset => {
                self.cancel_all();
                // Cannot fail: the lab built this device for one of its balances.
                let _ = ctx.model.balance_clear_tare(now, balance);
                Response::SerialNumber(self.config.serial.clone())
            }
            Command::QueryLevel => {
                let levels: String = self
                    .config
                    .level_versions
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(i, _)| char::from(b'0' + i as u8))
                    .collect();
                Response::Level {
                    level: levels,
                    versions: self.config.level_versions.to_vec(),
                }
            }
            Command::QueryBalanceData => {
                let capacity = Self::mass(ctx, ctx.model.config().balance.capacity_g);
                Response::BalanceData(format!("{} {capacity}", self.config.model))
            }
            Command::QuerySoftwareVersion => {
                Response::SoftwareVersion(self.config.software.clone())
            }
            Command::QuerySerialNumber => Response::SerialNumber(self.config.serial.clone()),
            Command::ImmediateWeight | Command::RepeatImmediateWeight => {
                let Ok(reading) = ctx.model.balance_read(now, balance) else {
                    return Some(Self::refused(ReplyId::Weight, Refusal::NotExecutable));
                };
                match reading.load {
                    LoadState::Overload => Self::refused(ReplyId::Weight, Refusal::Overload),
                    LoadState::Underload => Self::refused(ReplyId::Weight, Refusal::Underload),
                    LoadState::InRange => Response::Weight {
                        stability: if reading.stable {
                            Stability::Stable
                        } else {
                            Stability::Dynamic
                        },
                        mass: Self::mass(ctx, reading.value_g),
                    },
                }
            }
            Command::StableWeight => {
                let Ok(reading) = ctx.model.balance_read(now, balance) else {
                    return Some(Self::refused(ReplyId::Weight, Refusal::NotExecutable));
                };
                match reading.load {
                    LoadState::Overload => Self::refused(ReplyId::Weight, Refusal::Overload),
                    LoadState::Underload => Self::refused(ReplyId::Weight, Refusal::Underload),
                    LoadState::InRange if reading.stable => Response::Weight {
                        stability: Stability::Stable,
                        mass: Self::mass(ctx, reading.value_g),
                    },
                    LoadState::InRange if now >= deadline => {
                        Self::refused(ReplyId::Weight, Refusal::NotExecutable)
                    }
                    LoadState::InRange => return None,
                }
            }
            Command::Zero | Command::ZeroImmediate => {
                let immediate = command == Command::ZeroImmediate;
                let id = if immediate {
                    ReplyId::ZeroImmediate
                } else {
                    ReplyId::Zero
                };
                let stable = ctx
                    .model
                    .balance_stable_at(now, balance)
                    .is_ok_and(|at| at <= now);
                match ctx.model.balance_zero(now, balance, immediate) {
                    Ok(()) if immediate => Response::ZeroedImmediately {
                        stability: if stable {
                            Stability::Stable
                        } else {
                            Stability::Dynamic
                        },
                    },
                    Ok(()) => Response::Zeroed,
                    Err(BalanceError::Unstable) if now >= deadline => {
                        Self::refused(id, Refusal::NotExecutable)
                    }
                    Err(BalanceError::Unstable) => return None,
                    Err(error) => Self::refused(id, range_refusal(&error)),
                }
            }
            Command::Tare => match ctx.model.balance_tare(now, balance, false) {
                Ok(()) => Response::Tared {
                    mass: self.tare(ctx),
                },
                Err(BalanceError::Unstable) if now >= deadline => {
                    Self::refused(ReplyId::Tare, Refusal::NotExecutable)
                }
                Err(BalanceError::Unstable) => return None,
                Err(error) => Self::refused(ReplyId::Tare, range_refusal(&error)),
            },
            Command::QueryTare => Response::TareValue {
                mass: self.tare(ctx),
            },
            Command::PresetTare { mass } => {
                match ctx.model.balance_preset_tare(now, balance, mass.grams()) {
                    Ok(()) => Response::TareValue {
                        mass: self.tare(ctx),
                    },
                    Err(_) => Self::refused(ReplyId::TareValue, Refusal::InvalidParameter),
                }
            }
            Command::ClearTare => {
                let _ = ctx.model.balance_clear_tare(now, balance);
                Response::TareCleared
            }
        })
    }

    fn cancel_all(&mut self) {
        self.pending = None;
        self.queue.clear();
        self.sir = None;
    }

    /// Runs a command that arrived now (or was queued), starting its stability wait if it needs one.
    fn start(&mut self, ctx: &mut Ctx<'_>, command: Command) {
        self.sir = None;
        let deadline = ctx
            .now
            .saturating_add(Self::span(self.config.stable_timeout_s));
        match self.execute(ctx, command, deadline) {
            Some(resp) => {
                Self::send(ctx, &resp);
                if command == Command::RepeatImmediateWeight {
                    self.sir = Some(
                        ctx.now
                            .saturating_add(Self::span(self.config.update_interval_s)),
                    );
                }
            }
            None => self.pending = Some(Pending { command, deadline }),
        }
    }

    /// Runs queued commands until one has to wait.
    fn drain_queue(&mut self, ctx: &mut Ctx<'_>) {
        while self.pending.is_none() {
            let Some(next) = self.queue.pop_front() else {
                break;
            };
            match next {
                Ok(command) => self.start(ctx, command),
                Err(reply) => Self::send(ctx, &reply),
            }
        }
    }

    fn on_line(&mut self, ctx: &mut Ctx<'_>, parsed: Result<Command, Response>) {
        if parsed == Ok(Command::Reset) {
            self.cancel_all();
            self.start(ctx, Command::Reset);
            return;
        }
        if self.pending.is_some() {
            if self.queue.len() < MAX_QUEUED {
                self.queue.push_back(parsed);
            }
            return;
        }
        match parsed {
            Ok(command) => self.start(ctx, command),
            Err(reply) => {
                // Any command, even a refused one, ends SIR.
                self.sir = None;
                Self::send(ctx, &reply);
            }
        }
    }

    fn reply_to_bad_frame(&self, error: &DecodeError) -> Response {
        let frame = self.rx.get(..error.skip).unwrap_or(&self.rx);
        codec::error_reply(frame).unwrap_or(Response::SyntaxError)
    }
}

/// `+` for a value above the allowed range, `-` below it.
fn range_refusal(error: &BalanceError) -> Refusal {
    match error {
        BalanceError::Overload => Refusal::Overload,
        BalanceError::Underload => Refusal::Underload,
        BalanceError::ZeroRange(g) | BalanceError::TareRange(g) if *g < 0.0 => Refusal::Underload,
        BalanceError::ZeroRange(_) | BalanceError::TareRange(_) => Refusal::Overload,
        BalanceError::Unstable | BalanceError::NoSuchBalance(_) => Refusal::NotExecutable,
    }
}

impl Device for MtSics {
    fn protocol(&self) -> &'static str {
        "mt_sics"
    }

    fn instruments(&self) -> &[InstrumentId] {
        &self.instruments
    }

    fn line(&self) -> Option<LineSettings> {
        Some(LineSettings::n81(9600))
    }

    fn power_on(&mut self, _ctx: &mut Ctx<'_>) {
        self.rx.clear();
        self.cancel_all();
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, bytes: &[u8]) {
        self.poll(ctx);
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            self.rx.extend_from_slice(chunk);
            loop {
                match codec::decode_command(&self.rx) {
                    Ok(Decoded::Incomplete) => break,
                    Ok(Decoded::Frame { value, consumed }) => {
                        self.rx.drain(..consumed.clamp(1, self.rx.len()));
                        self.on_line(ctx, Ok(value));
                    }
                    Err(error) => {
                        let reply = self.reply_to_bad_frame(&error);
                        self.rx.drain(..error.skip.clamp(1, self.rx.len()));
                        self.on_line(ctx, Err(reply));
                    }
                }
                if self.rx.is_empty() {
                    break;
                }
            }
        }
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(pending) = self.pending {
            match self.execute(ctx, pending.command, pending.deadline) {
                Some(resp) => {
                    self.pending = None;
                    Self::send(ctx, &resp);
                }
                None => return,
            }
        }
        self.drain_queue(ctx);
        if let Some(at) = self.sir
            && ctx.now >= at
        {
            if let Some(resp) = self.execute(ctx, Command::ImmediateWeight, ctx.now) {
                Self::send(ctx, &resp);
            }
            let interval = Self::span(self.config.update_interval_s).max(Duration::from_millis(1));
            // Readings are taken on the balance's own cadence; missed ones are not made up.
            let mut next = at.saturating_add(interval);
            if next <= ctx.now {
                next = ctx.now.saturating_add(interval);
            }
            self.sir = Some(next);
        }
    }

    fn next_wakeup(&mut self, model: &mut LabModel, now: Duration) -> Option<Duration> {
        let pending = self.pending.map(|p| {
            let stable_at = model.balance_stable_at(now, self.index()).unwrap_or(now);
            stable_at.max(now).min(p.deadline)
        });
        match (pending, self.sir) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
