//! The last line of defence: a command is checked against the instrument's safety envelope in the task that
//! owns the instrument, right before the driver sees it, whoever sent it (protocol, console, OPC UA method,
//! command port). Validation at submit time is the first line, not the last.

use labctl_drivers::DeviceCommand;
use labctl_protocols::lab::{Instrument, Range};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SafetyViolation {
    #[error("{instrument}: {quantity} = {value} is outside the safety envelope {range}")]
    OutsideEnvelope {
        instrument: String,
        quantity: String,
        value: f64,
        range: Range,
    },
    #[error("{instrument}: {quantity} = {value} is not a finite number")]
    NotFinite {
        instrument: String,
        quantity: String,
        value: f64,
    },
    #[error("{instrument}: {quantity} has no envelope in the lab file, so it cannot be commanded")]
    NoEnvelope {
        instrument: String,
        quantity: String,
    },
    #[error("{instrument}: a {kind} does not accept {command}")]
    WrongKind {
        instrument: String,
        kind: String,
        command: String,
    },
    #[error("emergency stop is latched: nothing moves until a technician acknowledges it")]
    EStopLatched,
}

/// The quantities a command sets, with their values (a defined instrument's action: each parameter).
fn commanded_values(cmd: &DeviceCommand) -> Vec<(&str, f64)> {
    use DeviceCommand::*;
    match *cmd {
        Defined { ref params, .. } => params.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
        MoveTo {
            x_mm,
            y_mm,
            z_mm,
            feed_mm_per_min,
        } => {
            vec![
                ("x_mm", x_mm),
                ("y_mm", y_mm),
                ("z_mm", z_mm),
                ("feed_mm_per_min", feed_mm_per_min),
            ]
        }
        Dispense {
            volume_ul,
            rate_ul_per_min,
        } => vec![
            ("volume_ul", volume_ul),
            ("rate_ul_per_min", rate_ul_per_min),
        ],
        SetTemperature { temperature_c } => vec![("temperature_c", temperature_c)],
        SetStirSpeed { speed_rpm } => vec![("stir_speed_rpm", speed_rpm)],
        Spectrum {
            start_nm, stop_nm, ..
        } => vec![("wavelength_nm", start_nm), ("wavelength_nm", stop_nm)],
        Absorbance { wavelength_nm } => vec![("wavelength_nm", wavelength_nm)],
        Home
        | Gripper { .. }
        | StopPump
        | Zero
        | Tare
        | Weigh { .. }
        | HeaterOff
        | StirOff
        | ReadTemperature
        | Read { .. } => Vec::new(),
    }
}

/// Checks one command against the instrument's envelope. Commands that only make things safer (stop, heater
/// off, reads) always pass; a setpoint on a quantity without an envelope is refused, not waved through.
pub fn check_command(instrument: &Instrument, cmd: &DeviceCommand) -> Result<(), SafetyViolation> {
    if cmd.kind() != instrument.kind {
        return Err(SafetyViolation::WrongKind {
            instrument: instrument.id.clone(),
            kind: instrument.kind.to_string(),
            command: format!("{cmd:?}"),
        });
    }
    for (quantity, value) in commanded_values(cmd) {
        if !value.is_finite() {
            return Err(SafetyViolation::NotFinite {
                instrument: instrument.id.clone(),
                quantity: quantity.to_owned(),
                value,
            });
        }
        let Some(range) = instrument.envelope.range(quantity) else {
            return Err(SafetyViolation::NoEnvelope {
                instrument: instrument.id.clone(),
                quantity: quantity.to_owned(),
            });
        };
        if !range.contains(value) {
            return Err(SafetyViolation::OutsideEnvelope {
                instrument: instrument.id.clone(),
                quantity: quantity.to_owned(),
                value,
                range,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use labctl_protocols::Lab;

    fn inst(id: &str) -> Instrument {
        Lab::sim().instrument(id).unwrap().clone()
    }

    #[test]
    fn inside_the_envelope_passes() {
        let cmd = DeviceCommand::SetTemperature {
            temperature_c: 60.0,
        };
        assert_eq!(check_command(&inst("hotplate"), &cmd), Ok(()));
        let mv = DeviceCommand::MoveTo {
            x_mm: 20.0,
            y_mm: 20.0,
            z_mm: 50.0,
            feed_mm_per_min: 3000.0,
        };
        assert_eq!(check_command(&inst("gantry"), &mv), Ok(()));
    }

    #[test]
    fn outside_the_envelope_is_refused_with_the_quantity_named() {
        let cmd = DeviceCommand::SetTemperature {
            temperature_c: 121.0,
        };
        let err = check_command(&inst("hotplate"), &cmd).unwrap_err();
        assert!(
            matches!(
                &err,
                SafetyViolation::OutsideEnvelope { quantity, .. } if quantity == "temperature_c"
            ),
            "{err}"
        );
        let mv = DeviceCommand::MoveTo {
            x_mm: 20.0,
            y_mm: 20.0,
            z_mm: 50.0,
            feed_mm_per_min: 4000.0,
        };
        let err = check_command(&inst("gantry"), &mv).unwrap_err();
        assert!(err.to_string().contains("feed_mm_per_min = 4000"), "{err}");
        let d = DeviceCommand::Dispense {
            volume_ul: 6000.0,
            rate_ul_per_min: 100.0,
        };
        assert!(check_command(&inst("pump-red"), &d).is_err());
    }

    #[test]
    fn nan_and_wrong_kind_are_refused() {
        let cmd = DeviceCommand::SetStirSpeed {
            speed_rpm: f64::NAN,
        };
        assert!(matches!(
            check_command(&inst("hotplate"), &cmd),
            Err(SafetyViolation::NotFinite { .. })
        ));
        let cmd = DeviceCommand::SetTemperature {
            temperature_c: 30.0,
        };
        assert!(matches!(
            check_command(&inst("pump-red"), &cmd),
            Err(SafetyViolation::WrongKind { .. })
        ));
    }

    #[test]
    fn safe_commands_always_pass() {
        for cmd in [
            DeviceCommand::HeaterOff,
            DeviceCommand::StirOff,
            DeviceCommand::ReadTemperature,
        ] {
            assert_eq!(check_command(&inst("hotplate"), &cmd), Ok(()));
        }
        assert_eq!(
            check_command(&inst("pump-blue"), &DeviceCommand::StopPump),
            Ok(())
        );
    }
}
