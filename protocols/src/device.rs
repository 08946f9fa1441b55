//! What an instrument is told and what it reports about itself, in the words every room shares: the
//! interpreter turns protocol steps into [`DeviceCommand`]s, the drivers put them on the wire and read
//! identity and state off it, the dry run applies them to the physical model, the controller keeps what
//! comes back, the faces publish it and the clients read it back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::InstrumentKind;

/// What an instrument says it is, read from the instrument at connect time (never from the lab file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub firmware: String,
}

/// Coarse device state, as every role reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum DeviceState {
    Idle,
    Busy,
    /// The instrument raised an alarm that needs attention (GRBL ALARM, pump stall, hotplate watchdog).
    Alarm(String),
    /// Not a fault: the instrument refuses motion until it is referenced (GRBL's power-up homing lock).
    Locked(String),
}

impl DeviceState {
    /// The state's word as published (`idle`, `busy`, `alarm`, `locked`).
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceState::Idle => "idle",
            DeviceState::Busy => "busy",
            DeviceState::Alarm(_) => "alarm",
            DeviceState::Locked(_) => "locked",
        }
    }

    /// What the instrument said about an alarm or a lock.
    pub fn detail(&self) -> Option<&str> {
        match self {
            DeviceState::Alarm(why) | DeviceState::Locked(why) => Some(why),
            DeviceState::Idle | DeviceState::Busy => None,
        }
    }
}

/// A command to one instrument, in engineering units. Every command passes the safety envelope check
/// (in the controller) before it reaches the driver.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum DeviceCommand {
    /// Gantry: homing cycle.
    Home,
    /// Gantry: move the head to machine coordinates, ending when the move has finished.
    MoveTo {
        x_mm: f64,
        y_mm: f64,
        z_mm: f64,
        feed_mm_per_min: f64,
    },
    /// Gantry: close (grip) or open (release) the head's vial gripper.
    Gripper {
        closed: bool,
    },
    /// Pump: dispense a volume at a rate, ending when the pump has stopped.
    Dispense {
        volume_ul: f64,
        rate_ul_per_min: f64,
    },
    /// Pump: stop now.
    StopPump,
    /// Balance: zero the empty pan.
    Zero,
    /// Balance: tare with what is on the pan.
    Tare,
    /// Balance: read the mass, waiting for stability when `stable`.
    Weigh {
        stable: bool,
    },
    /// Hotplate: heat towards a setpoint.
    SetTemperature {
        temperature_c: f64,
    },
    HeaterOff,
    /// Hotplate: stir at a speed.
    SetStirSpeed {
        speed_rpm: f64,
    },
    StirOff,
    /// Hotplate: read the vessel temperature.
    ReadTemperature,
    /// Spectrophotometer: absorbance spectrum of the vessel under the probe.
    Spectrum {
        start_nm: f64,
        stop_nm: f64,
        step_nm: f64,
    },
    /// Spectrophotometer: absorbance at one wavelength.
    Absorbance {
        wavelength_nm: f64,
    },
    /// A defined instrument: one of its definition's actions, with its parameters by name.
    Defined {
        action: String,
        params: BTreeMap<String, f64>,
    },
    /// A defined instrument: the current value of one of its readings.
    Read {
        quantity: String,
    },
}

impl DeviceCommand {
    /// The instrument kind that accepts this command.
    pub fn kind(&self) -> InstrumentKind {
        use DeviceCommand::*;
        match self {
            Home | MoveTo { .. } | Gripper { .. } => InstrumentKind::Gantry,
            Dispense { .. } | StopPump => InstrumentKind::SyringePump,
            Zero | Tare | Weigh { .. } => InstrumentKind::Balance,
            SetTemperature { .. } | HeaterOff | SetStirSpeed { .. } | StirOff | ReadTemperature => {
                InstrumentKind::Hotplate
            }
            Spectrum { .. } | Absorbance { .. } => InstrumentKind::Spectrophotometer,
            Defined { .. } | Read { .. } => InstrumentKind::Defined,
        }
    }

    /// Whether sending it twice does no harm (a retry after a lost reply must not dispense twice).
    pub fn idempotent(&self) -> bool {
        use DeviceCommand::*;
        // A definition does not say whether its actions may be repeated: never assume it.
        !matches!(self, Dispense { .. } | Home | Zero | Tare | Defined { .. })
    }

    /// Whether it only reads: nothing in the lab moves, heats, pours or changes what later readings mean.
    /// (Zero and tare change every later weighing, so they are not reads.)
    pub fn only_reads(&self) -> bool {
        use DeviceCommand::*;
        match self {
            Weigh { .. } | ReadTemperature | Spectrum { .. } | Absorbance { .. } | Read { .. } => {
                true
            }
            Home
            | MoveTo { .. }
            | Gripper { .. }
            | Dispense { .. }
            | StopPump
            | Zero
            | Tare
            | SetTemperature { .. }
            | HeaterOff
            | SetStirSpeed { .. }
            | StirOff
            | Defined { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_s_word_is_its_serialised_tag() {
        for state in [
            DeviceState::Idle,
            DeviceState::Busy,
            DeviceState::Alarm("stall".into()),
            DeviceState::Locked("homing".into()),
        ] {
            let json = serde_json::to_value(&state).unwrap();
            assert_eq!(json["state"], state.as_str());
            assert_eq!(json.get("detail").and_then(|d| d.as_str()), state.detail());
            assert_eq!(serde_json::from_value::<DeviceState>(json).unwrap(), state);
        }
    }
}
