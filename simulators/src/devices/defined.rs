//! An instrument simulated from its definition (`labctl_protocols::instrument_def`): no code per
//! instrument. The device answers the definition's own commands:
//! - an identity query with text its reply pattern matches, filled with the definition's model,
//!   manufacturer, first listed firmware and a made-up serial (`instrument_def::sample_identity`);
//! - a reading's query with the reading's simulated value, written as its reply pattern says;
//! - an action's command (read back with `ActionSpec::command_pattern`): a parameter named like a reading
//!   becomes that reading's target, approached with a first-order lag of `simulation.tau_s` in virtual
//!   time; the action's acknowledgement, if it has one, is sent back;
//! - a safe-state or recovery command: accepted (and acknowledged like an action when it is one).
//!
//! Anything else is ignored in silence, as most ASCII instruments do. Readings carry the definition's
//! `simulation.noise`; byte-level faults (garbling, drops, latency) apply as to every simulated port, and
//! a fault's `error_code` makes the device answer every command with that text until cleared.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use labctl_codecs::MAX_LINE;
use labctl_codecs::ascii_frame::{AsciiFraming, ETX};
use labctl_protocols::instrument_def::{ActionSpec, InstrumentDefinition, sample_identity};
use labctl_protocols::pattern_text::{write, write_number};
use rand::rngs::SmallRng;
use regex::Regex;

use super::{Ctx, Device, LineSettings};
use crate::model::{InstrumentId, noise};

/// Why a definition cannot be simulated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DefinedDeviceError {
    #[error("a Modbus definition has no ASCII simulator yet")]
    Modbus,
    #[error("{what}: {reason}")]
    Pattern { what: String, reason: String },
}

/// A reading's simulated state (shared with the Modbus simulator and the dry run).
#[derive(Debug, Clone)]
pub(crate) struct Value {
    pub(crate) name: String,
    query: String,
    reply: String,
    pub(super) scale: f64,
    pub(super) offset: f64,
    /// Value at `since`, and where it is heading.
    from: f64,
    target: f64,
    since: Duration,
}

impl Value {
    /// Every reading of `definition` at its initial value.
    pub(crate) fn all(definition: &InstrumentDefinition) -> Vec<Value> {
        let sim = &definition.simulation;
        definition
            .readings
            .iter()
            .map(|r| {
                let start = sim.initial.get(&r.name).copied().unwrap_or(0.0);
                Value {
                    name: r.name.clone(),
                    query: r.query.clone().unwrap_or_default(),
                    reply: r.reply.clone().unwrap_or_default(),
                    scale: r.scale,
                    offset: r.offset,
                    from: start,
                    target: start,
                    since: Duration::ZERO,
                }
            })
            .collect()
    }

    pub(crate) fn at(&self, now: Duration, tau_s: f64) -> f64 {
        let dt = now.saturating_sub(self.since).as_secs_f64();
        self.target + (self.from - self.target) * (-dt / tau_s).exp()
    }

    pub(crate) fn set_target(&mut self, now: Duration, tau_s: f64, target: f64) {
        self.from = self.at(now, tau_s);
        self.since = now;
        self.target = target;
    }
}

/// A command the device understands, with what it does.
#[derive(Debug, Clone)]
struct Understood {
    pattern: Regex,
    /// Parameters read from the command that set a reading's target: (capture, reading index).
    targets: Vec<(String, usize)>,
    ack: Option<String>,
}

/// The simulated instrument.
#[derive(Debug)]
pub struct DefinedDevice {
    definition: Arc<InstrumentDefinition>,
    instruments: [InstrumentId; 1],
    line: LineSettings,
    identity: Vec<(String, String)>,
    values: Vec<Value>,
    commands: Vec<Understood>,
    terminator: Vec<u8>,
    /// STX/ETX and the checksum, as the definition declares them.
    framing: AsciiFraming,
    rx: Vec<u8>,
    rng: SmallRng,
}

impl DefinedDevice {
    /// The simulator of `definition`, registered in the model as `id`.
    pub fn new(
        definition: Arc<InstrumentDefinition>,
        id: InstrumentId,
        seed: u64,
    ) -> Result<DefinedDevice, DefinedDeviceError> {
        let line = definition.line.as_ref().ok_or(DefinedDeviceError::Modbus)?;
        let pattern_error =
            |what: String, reason: String| DefinedDeviceError::Pattern { what, reason };
        let sample = sample_identity(&definition);
        let sample: BTreeMap<&str, String> = sample
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let mut identity = Vec::new();
        for q in &definition.identity.queries {
            let text = write(&q.reply, &sample)
                .map_err(|e| pattern_error(format!("identity query {}", q.query), e.to_string()))?;
            identity.push((q.query.clone(), text));
        }
        if let Some(r) = definition
            .readings
            .iter()
            .find(|r| r.query.is_none() || r.reply.is_none())
        {
            return Err(pattern_error(
                format!("reading {}", r.name),
                "no query and reply".into(),
            ));
        }
        let values = Value::all(&definition);
        let mut commands = Vec::new();
        for action in &definition.actions {
            let ack = match &action.ack {
                Some(p) => Some(write(p, &BTreeMap::new()).map_err(|e| {
                    pattern_error(format!("action {} ack", action.name), e.to_string())
                })?),
                None => None,
            };
            for template in &action.commands {
                let pattern = ActionSpec::command_pattern(template)
                    .map_err(|e| pattern_error(format!("action {}", action.name), e))?;
                let targets = action
                    .params
                    .iter()
                    .filter_map(|p| {
                        let index = values.iter().position(|v| v.name == p.name)?;
                        Some((p.name.clone(), index))
                    })
                    .collect();
                commands.push(Understood {
                    pattern,
                    targets,
                    ack: ack.clone(),
                });
            }
        }
        for command in definition.safe_state.iter().chain(&definition.recovery) {
            let pattern = ActionSpec::command_pattern(command)
                .map_err(|e| pattern_error("safe state".into(), e))?;
            commands.push(Understood {
                pattern,
                targets: Vec::new(),
                ack: None,
            });
        }
        Ok(DefinedDevice {
            line: LineSettings {
                baud: line.baud,
                data_bits: line.data_bits,
                parity: line.parity,
                stop_bits: line.stop_bits,
            },
            terminator: line.terminator_in.as_bytes().to_vec(),
            framing: line.framing(),
            instruments: [id],
            identity,
            values,
            commands,
            rx: Vec::new(),
            rng: noise::stream(seed, 64),
            definition,
        })
    }

    fn answer(&mut self, ctx: &mut Ctx<'_>, text: &str) {
        let mut bytes = self.framing.wrap(text.as_bytes());
        bytes.extend_from_slice(&self.terminator);
        ctx.emit(0, bytes);
    }

    fn execute(&mut self, ctx: &mut Ctx<'_>, line: &str) {
        if let Some(code) = ctx.faults(self.instruments[0]).error_code {
            self.answer(ctx, &code);
            return;
        }
        if let Some((_, text)) = self.identity.iter().find(|(q, _)| q == line) {
            let text = text.clone();
            self.answer(ctx, &text);
            return;
        }
        let tau_s = self.definition.simulation.tau_s;
        if let Some(v) = self.values.iter().find(|v| v.query == line) {
            let sd = self.definition.simulation.noise / 4.0;
            let value = v.at(ctx.now, tau_s) + noise::gaussian(&mut self.rng, sd);
            let raw = (value - v.offset) / v.scale;
            // The definition's checker made sure this pattern can be written.
            if let Ok(text) = write_number(&v.reply, "value", raw, &BTreeMap::new()) {
                self.answer(ctx, &text);
            }
            return;
        }
        let Some(command) = self.commands.iter().find(|c| c.pattern.is_match(line)) else {
            return; // not understood: silence
        };
        let (targets, ack) = (command.targets.clone(), command.ack.clone());
        if let Some(caps) = command.pattern.captures(line) {
            for (param, index) in &targets {
                if let Some(value) = caps
                    .name(param)
                    .and_then(|m| m.as_str().parse::<f64>().ok())
                    && let Some(v) = self.values.get_mut(*index)
                {
                    v.set_target(ctx.now, tau_s, value);
                }
            }
        }
        if let Some(ack) = ack {
            self.answer(ctx, &ack);
        }
    }
}

impl Device for DefinedDevice {
    fn protocol(&self) -> &'static str {
        "definition"
    }

    fn instruments(&self) -> &[InstrumentId] {
        &self.instruments
    }

    fn line(&self) -> Option<LineSettings> {
        Some(self.line)
    }

    fn power_on(&mut self, _ctx: &mut Ctx<'_>) {
        self.rx.clear();
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, bytes: &[u8]) {
        let stx_etx = self.framing.stx_etx;
        for &b in bytes {
            let terminator = b == b'\r' || b == b'\n';
            // With STX/ETX a frame ends at ETX; line terminators between frames are ignored.
            let ends = if stx_etx { b == ETX } else { terminator };
            if stx_etx && terminator && self.rx.is_empty() {
                continue;
            }
            if ends {
                if stx_etx {
                    self.rx.push(b);
                }
                let frame = std::mem::take(&mut self.rx);
                // A frame with a bad checksum or framing is garbage: the instrument ignores it.
                if let Ok(payload) = self.framing.unwrap(&frame)
                    && !payload.is_empty()
                {
                    let line = String::from_utf8_lossy(payload).into_owned();
                    self.execute(ctx, &line);
                }
            } else if self.rx.len() < MAX_LINE {
                self.rx.push(b);
            } else {
                // An over-long line is garbage: the instrument drops it.
                self.rx.clear();
            }
        }
    }

    fn host_reset(&mut self) {
        self.rx.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LabConfig, LabModel};
    use labctl_protocols::instrument_def::check_definition;

    const IKA: &str = include_str!("../../../instruments/ika-rct-digital.toml");

    fn device(text: &str) -> (DefinedDevice, LabModel) {
        let (def, findings) = check_definition(text);
        let def = Arc::new(def.unwrap_or_else(|| panic!("{findings:?}")));
        let mut model = LabModel::new(LabConfig::sim_default(), 1).unwrap();
        let id = model.add_defined("stirrer");
        (DefinedDevice::new(def, id, 1).unwrap(), model)
    }

    fn exchange(d: &mut DefinedDevice, model: &mut LabModel, now: Duration, sent: &[u8]) -> String {
        let mut out = Vec::new();
        let mut ctx = Ctx::new(model, now, None, &mut out);
        d.receive(&mut ctx, sent);
        out.iter()
            .map(|e| String::from_utf8_lossy(&e.bytes).into_owned())
            .collect()
    }

    #[test]
    fn identity_and_readings_are_answered_as_the_definition_s_patterns_say() {
        let (mut d, mut model) = device(IKA);
        let t0 = Duration::ZERO;
        assert_eq!(
            exchange(&mut d, &mut model, t0, b"IN_NAME\r\n"),
            "RCT digital\r\n"
        );
        assert_eq!(
            exchange(&mut d, &mut model, t0, b"IN_VERSION\r\n"),
            "1.10\r\n"
        );
        assert_eq!(
            exchange(&mut d, &mut model, t0, b"IN_PV_1\r\n"),
            "22.0 1\r\n"
        );
        assert_eq!(
            exchange(&mut d, &mut model, t0, b"IN_PV_4\r\n"),
            "0.0 4\r\n"
        );
        // A line it does not know gets silence.
        assert_eq!(exchange(&mut d, &mut model, t0, b"FOO\r\n"), "");
    }

    #[test]
    fn a_setpoint_moves_its_reading_with_a_first_order_lag() {
        let (mut d, mut model) = device(IKA);
        let t0 = Duration::ZERO;
        assert_eq!(
            exchange(&mut d, &mut model, t0, b"OUT_SP_1 60.0\r\nSTART_1\r\n"),
            ""
        );
        let read = |d: &mut DefinedDevice, model: &mut LabModel, s: u64| -> f64 {
            let text = exchange(d, model, Duration::from_secs(s), b"IN_PV_1\r\n");
            text.split(' ').next().unwrap().parse().unwrap()
        };
        let tau = d.definition.simulation.tau_s;
        // After one time constant: 63 % of the way from 22 to 60.
        let one_tau = read(&mut d, &mut model, tau as u64);
        assert!((one_tau - (22.0 + 38.0 * 0.632)).abs() < 0.2, "{one_tau}");
        let later = read(&mut d, &mut model, (tau * 10.0) as u64);
        assert!((later - 60.0).abs() < 0.1, "{later}");
    }

    #[test]
    fn an_injected_error_code_answers_every_command() {
        let (mut d, mut model) = device(IKA);
        let id = d.instruments()[0];
        let faults = crate::model::FaultConfig {
            error_code: Some("E5".into()),
            ..Default::default()
        };
        model.set_faults(Duration::ZERO, id, faults).unwrap();
        assert_eq!(
            exchange(&mut d, &mut model, Duration::ZERO, b"IN_PV_1\r\n"),
            "E5\r\n"
        );
    }
}

/// Every definition shipped in `instruments/` has a simulator that answers its own queries as its reply
/// patterns say and takes every action's commands: each definition is testable end to end without its
/// instrument.
#[cfg(test)]
mod shipped {
    use super::*;
    use crate::devices::defined_modbus::DefinedModbusDevice;
    use crate::model::{LabConfig, LabModel};
    use labctl_protocols::instrument_def::check_definition;

    fn shipped() -> Vec<(String, Arc<InstrumentDefinition>)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../instruments");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("instruments/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).expect("read");
                let (def, findings) = check_definition(&text);
                let def = def.unwrap_or_else(|| panic!("{}: {findings:?}", path.display()));
                out.push((path.display().to_string(), Arc::new(def)));
            }
        }
        assert!(out.len() >= 6, "{} definitions", out.len());
        out
    }

    #[test]
    fn every_shipped_definition_has_a_simulator_that_answers_it() {
        for (name, def) in shipped() {
            let mut model = LabModel::new(LabConfig::sim_default(), 1).unwrap();
            let id = model.add_defined("x");
            if def.modbus.is_some() {
                assert!(
                    DefinedModbusDevice::new(Arc::clone(&def), id, 1).is_some(),
                    "{name}"
                );
                continue;
            }
            let mut d = DefinedDevice::new(Arc::clone(&def), id, 1)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let terminator = def.terminator_out().to_owned();
            let mut ask = |d: &mut DefinedDevice, line: &str| -> String {
                let mut out = Vec::new();
                let mut ctx = Ctx::new(&mut model, Duration::ZERO, None, &mut out);
                d.receive(&mut ctx, format!("{line}{terminator}").as_bytes());
                let text: String = out
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.bytes).into_owned())
                    .collect();
                text.trim_end_matches(['\r', '\n']).to_owned()
            };
            for q in &def.identity.queries {
                let reply = ask(&mut d, &q.query);
                assert!(
                    Regex::new(&q.reply).unwrap().is_match(&reply),
                    "{name}: {} -> {reply:?}",
                    q.query
                );
            }
            for r in &def.readings {
                let reply = ask(&mut d, r.query.as_deref().unwrap());
                r.value_from(&reply)
                    .unwrap_or_else(|e| panic!("{name}: {} -> {reply:?}: {e}", r.name));
            }
            for a in &def.actions {
                let values = a
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), (p.min + p.max) / 2.0))
                    .collect();
                for command in a.render(&values).unwrap() {
                    let reply = ask(&mut d, &command);
                    if let Some(ack) = &a.ack {
                        assert!(
                            Regex::new(ack).unwrap().is_match(&reply),
                            "{name}: {command} -> {reply:?}"
                        );
                    }
                }
            }
        }
    }
}
