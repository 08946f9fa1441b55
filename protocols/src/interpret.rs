//! The one interpreter of the protocol language: what each step asks of which instrument, as device
//! commands.
//!
//! The executor (`labctl-core`) sends these commands to the lab's instruments through their drivers; the
//! dry run (`labctl-simulators`) applies the very same commands to model-backed instruments. Each walks
//! the step tree in its own time (the executor with pauses, safe-state epochs and the journal; the dry run
//! in virtual time), and both ask this module, and only this module, what a step means:
//! - how an action expands into commands ([`expand`]), with the lab's defaults ([`feed_default`]);
//! - how a setpoint is ramped ([`Expansion::Ramp`], [`ramp`]);
//! - where the head rises before a lateral move ([`rise_before`]);
//! - which command a measurement is ([`measurement_command`]);
//! - how long a step may take ([`crate::Step::timeout_or_default_s`]) and which instruments a run uses
//!   ([`crate::protocol::collect_instruments`]).

use std::collections::BTreeMap;

use crate::device::DeviceCommand;
use crate::lab::Lab;
use crate::{Action, ActionCall, Measurement, Step};

/// Fastest default feed for gantry moves that name none, whatever the envelope allows (mm/min).
const FEED_DEFAULT_CAP_MM_PER_MIN: f64 = 3000.0;
/// Feed for a gantry without a feed envelope (the lab file check refuses one; a backstop).
const FEED_FALLBACK_MM_PER_MIN: f64 = 1000.0;

/// What an action step sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Expansion {
    /// Commands sent in order, each to its instrument; the first that fails ends the step.
    Commands(Vec<(String, DeviceCommand)>),
    /// A temperature setpoint raised no faster than the envelope's `ramp_c_per_min`: the setpoints of
    /// [`ramp`], each a [`DeviceCommand::SetTemperature`] to the step's instrument after its wait.
    Ramp { target_c: f64, rate_c_per_min: f64 },
}

/// Why an action cannot be expanded where the run stands now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpandError {
    #[error("{instrument} has no action {action}")]
    NoSuchAction { instrument: String, action: String },
    #[error("unknown deck position {0}")]
    UnknownPosition(String),
    #[error("unknown vessel {0}")]
    UnknownVessel(String),
    /// A defined instrument's parameter that is not a number.
    #[error("{0}")]
    Parameter(String),
}

/// Turns an action into what goes to the instruments, using the deck and where each vessel stands now
/// (`vessel_at`: the deck position of a vessel, as transfers have left it).
pub fn expand(
    lab: &Lab,
    instrument: &str,
    action: &ActionCall,
    vessel_at: impl Fn(&str) -> Option<String>,
) -> Result<Expansion, ExpandError> {
    let inst = lab.instrument(instrument);
    // A defined instrument takes its definition's action as it is: its driver renders the commands.
    if inst.is_some_and(|i| i.defined().is_some()) {
        let params = action.numeric_params().map_err(ExpandError::Parameter)?;
        return Ok(Expansion::Commands(vec![(
            instrument.to_owned(),
            DeviceCommand::Defined {
                action: action.name().to_owned(),
                params,
            },
        )]));
    }
    let Some(builtin) = action.builtin() else {
        return Err(ExpandError::NoSuchAction {
            instrument: instrument.to_owned(),
            action: action.name().to_owned(),
        });
    };
    if let Action::SetTemperature(t) = builtin
        && let Some(rate) = inst.and_then(|i| i.envelope.ramp_c_per_min)
    {
        return Ok(Expansion::Ramp {
            target_c: t.temperature_c,
            rate_c_per_min: rate,
        });
    }
    let feed = feed_default(lab, instrument);
    let safe_z = lab.deck.safe_z_mm;
    let position = |name: &str| {
        lab.deck
            .position(name)
            .ok_or_else(|| ExpandError::UnknownPosition(name.to_owned()))
    };
    let at = |name: &str, z: f64| -> Result<DeviceCommand, ExpandError> {
        let p = position(name)?;
        Ok(DeviceCommand::MoveTo {
            x_mm: p.x_mm,
            y_mm: p.y_mm,
            z_mm: z,
            feed_mm_per_min: feed,
        })
    };
    let commands = match builtin {
        Action::Home {} => vec![DeviceCommand::Home],
        Action::MoveTo(m) => {
            let p = position(&m.position)?;
            vec![DeviceCommand::MoveTo {
                x_mm: p.x_mm,
                y_mm: p.y_mm,
                z_mm: safe_z,
                feed_mm_per_min: m.feed_mm_per_min.unwrap_or(feed),
            }]
        }
        Action::MoveXyz(m) => vec![DeviceCommand::MoveTo {
            x_mm: m.x_mm,
            y_mm: m.y_mm,
            z_mm: m.z_mm,
            feed_mm_per_min: m.feed_mm_per_min.unwrap_or(feed),
        }],
        // Over the vessel, down, grip, up, over the target, down, release, up.
        Action::Transfer(t) => {
            let from =
                vessel_at(&t.vessel).ok_or_else(|| ExpandError::UnknownVessel(t.vessel.clone()))?;
            let from_z = position(&from)?.z_mm;
            let to_z = position(&t.to)?.z_mm;
            vec![
                at(&from, safe_z)?,
                at(&from, from_z)?,
                DeviceCommand::Gripper { closed: true },
                at(&from, safe_z)?,
                at(&t.to, safe_z)?,
                at(&t.to, to_z)?,
                DeviceCommand::Gripper { closed: false },
                at(&t.to, safe_z)?,
            ]
        }
        Action::Dispense(d) => vec![DeviceCommand::Dispense {
            volume_ul: d.volume_ul,
            rate_ul_per_min: d.rate_ul_per_min,
        }],
        Action::StopPump {} => vec![DeviceCommand::StopPump],
        Action::Tare {} => vec![DeviceCommand::Tare],
        Action::Zero {} => vec![DeviceCommand::Zero],
        Action::SetTemperature(t) => vec![DeviceCommand::SetTemperature {
            temperature_c: t.temperature_c,
        }],
        Action::HeaterOff {} => vec![DeviceCommand::HeaterOff],
        Action::SetStirSpeed(s) => vec![DeviceCommand::SetStirSpeed {
            speed_rpm: s.speed_rpm,
        }],
        Action::StirOff {} => vec![DeviceCommand::StirOff],
    };
    Ok(Expansion::Commands(
        commands
            .into_iter()
            .map(|c| (instrument.to_owned(), c))
            .collect(),
    ))
}

/// The feed of gantry moves that name none: the envelope's maximum, at most 3000 mm/min.
pub fn feed_default(lab: &Lab, instrument: &str) -> f64 {
    lab.instrument(instrument)
        .and_then(|i| i.envelope.feed_mm_per_min)
        .map(|r| r.max.min(FEED_DEFAULT_CAP_MM_PER_MIN))
        .unwrap_or(FEED_FALLBACK_MM_PER_MIN)
}

/// The setpoints of a ramp to `target_c` and the seconds to wait before each
/// ([`crate::lab::ramp_setpoints`]). It starts from the plate's measured temperature, or with no reading
/// from the envelope's minimum (the longest, safest ramp), or else at the target itself (one step).
pub fn ramp(
    lab: &Lab,
    instrument: &str,
    plate_c: Option<f64>,
    target_c: f64,
    rate_c_per_min: f64,
) -> Vec<(f64, f64)> {
    let from = plate_c
        .or_else(|| {
            lab.instrument(instrument)
                .and_then(|i| i.envelope.temperature_c)
                .map(|r| r.min)
        })
        .unwrap_or(target_c);
    crate::lab::ramp_setpoints(from, target_c, rate_c_per_min)
}

/// A straight move from a head below the deck's safe height would sweep through what stands on the deck:
/// the validator only knows where a protocol leaves the head, not where an aborted run left it. For a
/// lateral move from below `safe_z_mm`, the head first rises straight up where it is (`head_mm`).
pub fn rise_before(lab: &Lab, head_mm: [f64; 3], cmd: &DeviceCommand) -> Option<DeviceCommand> {
    const SAME_MM: f64 = 0.01;
    let DeviceCommand::MoveTo {
        x_mm,
        y_mm,
        feed_mm_per_min,
        ..
    } = cmd
    else {
        return None;
    };
    let [x, y, z] = head_mm;
    let safe_z = lab.deck.safe_z_mm;
    let lateral = (x - x_mm).abs() > SAME_MM || (y - y_mm).abs() > SAME_MM;
    (lateral && z < safe_z - SAME_MM).then_some(DeviceCommand::MoveTo {
        x_mm: x,
        y_mm: y,
        z_mm: safe_z,
        feed_mm_per_min: *feed_mm_per_min,
    })
}

/// The command a measurement is.
pub fn measurement_command(m: &Measurement) -> DeviceCommand {
    match m {
        Measurement::Weigh(w) => DeviceCommand::Weigh { stable: w.stable },
        Measurement::Spectrum(s) => DeviceCommand::Spectrum {
            start_nm: s.start_nm,
            stop_nm: s.stop_nm,
            step_nm: s.step_nm,
        },
        Measurement::Absorbance(a) => DeviceCommand::Absorbance {
            wavelength_nm: a.wavelength_nm,
        },
        Measurement::ReadTemperature {} => DeviceCommand::ReadTemperature,
        Measurement::Read(r) => DeviceCommand::Read {
            quantity: r.quantity.clone(),
        },
    }
}

/// Steps that are more than a single instrument command: a block, a wait, or an action expanding into
/// several commands (a transfer). A single command is journaled as its command and outcome instead.
pub fn is_block(step: &Step) -> bool {
    match step {
        Step::Measure(_) => false,
        Step::Action(a) => matches!(a.action.builtin(), Some(Action::Transfer(_))),
        Step::Wait(_) | Step::WaitUntil(_) | Step::Parallel(_) | Step::Repeat(_) => true,
    }
}

/// Where each vessel of a protocol stands before its first step, by id (positions upper-cased).
pub fn initial_vessels(protocol: &crate::Protocol) -> BTreeMap<String, String> {
    protocol
        .labware
        .iter()
        .map(|l| (l.id.clone(), l.location.to_ascii_uppercase()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DispenseParams, MoveXyzParams, SetTemperatureParams, TransferParams};

    fn lab() -> Lab {
        Lab::sim()
    }

    fn commands(e: Expansion) -> Vec<DeviceCommand> {
        match e {
            Expansion::Commands(c) => c.into_iter().map(|(_, c)| c).collect(),
            Expansion::Ramp { .. } => panic!("expected commands, got {e:?}"),
        }
    }

    #[test]
    fn a_transfer_lifts_moves_and_lowers_at_the_deck_s_safe_height() {
        let lab = lab();
        let action = ActionCall::Builtin(Action::Transfer(TransferParams {
            vessel: "v1".into(),
            to: "H1".into(),
        }));
        let sent = commands(expand(&lab, "gantry", &action, |_| Some("A1".into())).unwrap());
        let a1 = lab.deck.position("A1").unwrap();
        let h1 = lab.deck.position("H1").unwrap();
        let safe = lab.deck.safe_z_mm;
        let feed = feed_default(&lab, "gantry");
        let at = |p: &crate::lab::Position, z| DeviceCommand::MoveTo {
            x_mm: p.x_mm,
            y_mm: p.y_mm,
            z_mm: z,
            feed_mm_per_min: feed,
        };
        assert_eq!(
            sent,
            vec![
                at(&a1, safe),
                at(&a1, a1.z_mm),
                DeviceCommand::Gripper { closed: true },
                at(&a1, safe),
                at(&h1, safe),
                at(&h1, h1.z_mm),
                DeviceCommand::Gripper { closed: false },
                at(&h1, safe),
            ]
        );
    }

    #[test]
    fn a_transfer_of_an_unknown_vessel_or_to_nowhere_is_refused_by_name() {
        let lab = lab();
        let to = |to: &str| {
            ActionCall::Builtin(Action::Transfer(TransferParams {
                vessel: "v1".into(),
                to: to.into(),
            }))
        };
        assert_eq!(
            expand(&lab, "gantry", &to("H1"), |_| None),
            Err(ExpandError::UnknownVessel("v1".into()))
        );
        assert_eq!(
            expand(&lab, "gantry", &to("Z9"), |_| Some("A1".into())),
            Err(ExpandError::UnknownPosition("Z9".into()))
        );
    }

    #[test]
    fn a_setpoint_ramps_only_where_the_envelope_sets_a_rate() {
        let mut lab = lab();
        let set = ActionCall::Builtin(Action::SetTemperature(SetTemperatureParams {
            temperature_c: 60.0,
        }));
        let rate = lab
            .instrument("hotplate")
            .and_then(|i| i.envelope.ramp_c_per_min)
            .expect("the sim lab ramps its hotplate");
        assert_eq!(
            expand(&lab, "hotplate", &set, |_| None),
            Ok(Expansion::Ramp {
                target_c: 60.0,
                rate_c_per_min: rate
            })
        );
        for i in &mut lab.instruments {
            i.envelope.ramp_c_per_min = None;
        }
        assert_eq!(
            commands(expand(&lab, "hotplate", &set, |_| None).unwrap()),
            vec![DeviceCommand::SetTemperature {
                temperature_c: 60.0
            }]
        );
    }

    #[test]
    fn moves_without_a_feed_take_the_envelope_s_capped_maximum() {
        let lab = lab();
        let envelope_max = lab
            .instrument("gantry")
            .and_then(|i| i.envelope.feed_mm_per_min)
            .unwrap()
            .max;
        assert_eq!(feed_default(&lab, "gantry"), envelope_max.min(3000.0));
        let action = ActionCall::Builtin(Action::MoveXyz(MoveXyzParams {
            x_mm: 10.0,
            y_mm: 20.0,
            z_mm: 30.0,
            feed_mm_per_min: None,
        }));
        assert_eq!(
            commands(expand(&lab, "gantry", &action, |_| None).unwrap()),
            vec![DeviceCommand::MoveTo {
                x_mm: 10.0,
                y_mm: 20.0,
                z_mm: 30.0,
                feed_mm_per_min: feed_default(&lab, "gantry"),
            }]
        );
    }

    #[test]
    fn the_head_rises_before_a_lateral_move_from_below_the_safe_height_only() {
        let lab = lab();
        let safe = lab.deck.safe_z_mm;
        let to = DeviceCommand::MoveTo {
            x_mm: 100.0,
            y_mm: 100.0,
            z_mm: safe,
            feed_mm_per_min: 500.0,
        };
        assert_eq!(
            rise_before(&lab, [20.0, 20.0, 0.0], &to),
            Some(DeviceCommand::MoveTo {
                x_mm: 20.0,
                y_mm: 20.0,
                z_mm: safe,
                feed_mm_per_min: 500.0,
            })
        );
        // Already at the safe height, or straight down/up: no extra move.
        assert_eq!(rise_before(&lab, [20.0, 20.0, safe], &to), None);
        assert_eq!(rise_before(&lab, [100.0, 100.0, 0.0], &to), None);
        assert_eq!(
            rise_before(&lab, [20.0, 20.0, 0.0], &DeviceCommand::Home),
            None
        );
    }

    #[test]
    fn a_defined_action_on_a_built_in_instrument_is_refused_and_a_dispense_is_one_command() {
        let lab = lab();
        let dispense = ActionCall::Builtin(Action::Dispense(DispenseParams {
            vessel: "v1".into(),
            volume_ul: 100.0,
            rate_ul_per_min: 500.0,
        }));
        assert_eq!(
            commands(expand(&lab, "pump-red", &dispense, |_| None).unwrap()),
            vec![DeviceCommand::Dispense {
                volume_ul: 100.0,
                rate_ul_per_min: 500.0
            }]
        );
        let defined = ActionCall::Defined(crate::DefinedAction {
            action: "switch_valve".into(),
            params: BTreeMap::new(),
        });
        assert_eq!(
            expand(&lab, "pump-red", &defined, |_| None),
            Err(ExpandError::NoSuchAction {
                instrument: "pump-red".into(),
                action: "switch_valve".into()
            })
        );
    }
}
