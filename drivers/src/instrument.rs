//! The instrument abstraction: instruments by role (gantry, pump, balance, hotplate, spectrophotometer),
//! not by vendor. The controller only ever sees these types; each driver turns them into its wire protocol.
//!
//! Lifecycle, as in copper-rs: `new` (from the lab file, no I/O) -> [`Instrument::start`] (connect, probe
//! identity and firmware, refuse what is unsupported) -> [`Instrument::execute`] / [`Instrument::poll`] ->
//! [`Instrument::stop`]. [`Instrument::safe_state`] may be called at any time after `start`.

use std::future::Future;

use labctl_protocols::InstrumentKind;
use serde::Serialize;

use crate::error::DriverError;

pub use labctl_protocols::device::{DeviceCommand, DeviceState, Identity};

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Done,
    Mass {
        mass_g: f64,
        stable: bool,
    },
    Temperature {
        temperature_c: f64,
    },
    Spectrum {
        wavelengths_nm: Vec<f64>,
        absorbance: Vec<f64>,
    },
    Absorbance {
        wavelength_nm: f64,
        absorbance: f64,
    },
    /// A pump's dispensed volume when it stopped.
    Dispensed {
        dispensed_ul: f64,
    },
    /// A defined instrument's reading.
    Reading {
        quantity: String,
        value: f64,
        unit: String,
    },
}

/// One poll of an instrument: its state and its current readings, by quantity name
/// (`labctl_protocols::InstrumentKind::quantities`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Telemetry {
    pub state: DeviceState,
    pub values: Vec<(&'static str, f64)>,
}

/// An instrument driver. Futures are `Send` so each instrument can live in its own tokio task.
pub trait Instrument: Send + 'static {
    fn kind(&self) -> InstrumentKind;

    /// Connects, probes identity and firmware, and refuses an unsupported instrument with
    /// [`DriverError::Unsupported`]. Arms the instrument's own watchdog where it has one.
    fn start(&mut self) -> impl Future<Output = Result<Identity, DriverError>> + Send;

    /// Runs one command to completion.
    fn execute(
        &mut self,
        command: &DeviceCommand,
    ) -> impl Future<Output = Result<Outcome, DriverError>> + Send;

    /// Reads state and telemetry; also feeds the instrument's watchdog.
    fn poll(&mut self) -> impl Future<Output = Result<Telemetry, DriverError>> + Send;

    /// Puts the instrument in its safe state (pump stopped, heater and stirrer off, gantry feed hold).
    fn safe_state(&mut self) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Brings the instrument from its safe state back to ready for the next command, without a power
    /// cycle. Called before the first command after a safe state. No default: every driver says what its
    /// way back is (docs/controller.md has the table), and a wrapper cannot forget to forward it.
    fn recover(&mut self) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Leaves the instrument safe and releases the port.
    fn stop(&mut self) -> impl Future<Output = ()> + Send;
}

#[cfg(test)]
mod tests {
    use super::DeviceCommand::{self, *};

    #[test]
    fn only_measurements_are_reads_and_no_read_is_unsafe_to_repeat() {
        let all = [
            Home,
            MoveTo {
                x_mm: 0.0,
                y_mm: 0.0,
                z_mm: 0.0,
                feed_mm_per_min: 100.0,
            },
            Gripper { closed: true },
            Dispense {
                volume_ul: 1.0,
                rate_ul_per_min: 1.0,
            },
            StopPump,
            Zero,
            Tare,
            Weigh { stable: true },
            SetTemperature {
                temperature_c: 30.0,
            },
            HeaterOff,
            SetStirSpeed { speed_rpm: 100.0 },
            StirOff,
            ReadTemperature,
            Spectrum {
                start_nm: 400.0,
                stop_nm: 700.0,
                step_nm: 10.0,
            },
            Absorbance {
                wavelength_nm: 500.0,
            },
        ];
        let reads: Vec<&DeviceCommand> = all.iter().filter(|c| c.only_reads()).collect();
        assert_eq!(
            reads,
            [
                &Weigh { stable: true },
                &ReadTemperature,
                &Spectrum {
                    start_nm: 400.0,
                    stop_nm: 700.0,
                    step_nm: 10.0
                },
                &Absorbance {
                    wavelength_nm: 500.0
                }
            ]
        );
        assert!(reads.iter().all(|c| c.idempotent()));
    }
}
