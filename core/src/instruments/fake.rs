//! An in-process instrument with no wire: it answers at once (or after a set delay) with plausible values
//! and records every command it was given. Used by the executor tests and by the step-overhead benchmark
//! ("zero-latency instruments"), where only the controller's own cost should be measured.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use labctl_drivers::{
    DeviceCommand, DeviceState, DriverError, Identity, Instrument, Outcome, PortError, Telemetry,
};
use labctl_protocols::InstrumentKind;

/// What a fake's driver was asked to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum FakeEvent {
    Command(DeviceCommand),
    /// A safe state, done.
    Safe,
    /// A recovery from the safe state, done.
    Recover,
}

/// Shared, inspectable state of a fake instrument.
#[derive(Debug, Default)]
pub struct FakeLog {
    pub commands: Vec<DeviceCommand>,
    pub safe_states: usize,
    /// Commands, safe states and recoveries in the order the driver saw them.
    pub history: Vec<FakeEvent>,
    /// Values reported by `poll`.
    pub values: Vec<(&'static str, f64)>,
    pub state: Option<DeviceState>,
    /// Make every following `execute` fail with this device error.
    pub fail_with: Option<String>,
    /// Make `start` and every call fail as if unplugged.
    pub unplugged: bool,
    /// Connected but silent, like a device that stopped answering: polls time out, and commands that
    /// expect no reply (setpoints, as NAMUR writes) still "succeed".
    pub mute: bool,
    /// Delay of every `execute`.
    pub delay: Duration,
    /// The task has called the driver's `stop`.
    pub stopped: bool,
}

#[derive(Clone)]
pub struct FakeInstrument {
    kind: InstrumentKind,
    id: String,
    pub log: Arc<Mutex<FakeLog>>,
}

impl FakeInstrument {
    pub fn new(id: &str, kind: InstrumentKind) -> Self {
        FakeInstrument {
            kind,
            id: id.to_owned(),
            log: Arc::new(Mutex::new(FakeLog::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeLog> {
        // A poisoned log only means a test thread panicked; the data is still what we want to see.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unplugged(&self) -> Result<(), DriverError> {
        if self.lock().unplugged {
            return Err(PortError::Disconnected {
                port: format!("fake:{}", self.id),
            }
            .into());
        }
        Ok(())
    }
}

impl Instrument for FakeInstrument {
    fn kind(&self) -> InstrumentKind {
        self.kind
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        self.unplugged()?;
        Ok(Identity {
            manufacturer: "labctl".into(),
            model: format!("fake-{}", self.kind),
            serial: format!("FAKE-{}", self.id),
            firmware: "0.0.0".into(),
        })
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        self.unplugged()?;
        let delay = {
            let mut log = self.lock();
            log.commands.push(command.clone());
            log.history.push(FakeEvent::Command(command.clone()));
            if let Some(msg) = &log.fail_with {
                return Err(DriverError::Device {
                    instrument: self.id.clone(),
                    code: "FAKE".into(),
                    message: msg.clone(),
                });
            }
            log.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(match *command {
            DeviceCommand::Weigh { stable } => Outcome::Mass {
                mass_g: 10.5,
                stable,
            },
            DeviceCommand::ReadTemperature => Outcome::Temperature {
                temperature_c: 22.0,
            },
            DeviceCommand::Absorbance { wavelength_nm } => Outcome::Absorbance {
                wavelength_nm,
                absorbance: 0.5,
            },
            DeviceCommand::Spectrum {
                start_nm,
                stop_nm,
                step_nm,
            } => {
                let n = if step_nm > 0.0 {
                    ((stop_nm - start_nm) / step_nm).floor() as usize + 1
                } else {
                    1
                };
                let wavelengths_nm: Vec<f64> = (0..n.min(10_000))
                    .map(|i| start_nm + i as f64 * step_nm)
                    .collect();
                let absorbance = wavelengths_nm.iter().map(|w| 0.1 + (w / 1000.0)).collect();
                Outcome::Spectrum {
                    wavelengths_nm,
                    absorbance,
                }
            }
            DeviceCommand::Dispense { volume_ul, .. } => Outcome::Dispensed {
                dispensed_ul: volume_ul,
            },
            _ => Outcome::Done,
        })
    }

    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        self.unplugged()?;
        let log = self.lock();
        if log.mute {
            return Err(PortError::Timeout {
                port: format!("fake:{}", self.id),
                timeout: Duration::from_millis(1),
            }
            .into());
        }
        Ok(Telemetry {
            state: log.state.clone().unwrap_or(DeviceState::Idle),
            values: log.values.clone(),
        })
    }

    async fn safe_state(&mut self) -> Result<(), DriverError> {
        self.unplugged()?;
        let mut log = self.lock();
        log.safe_states += 1;
        log.history.push(FakeEvent::Safe);
        Ok(())
    }

    async fn recover(&mut self) -> Result<(), DriverError> {
        self.unplugged()?;
        self.lock().history.push(FakeEvent::Recover);
        Ok(())
    }

    async fn stop(&mut self) {
        self.lock().stopped = true;
    }
}

/// Spawns one fake instrument task per instrument of `lab`: the handles the controller takes, and the fakes
/// to script and inspect. Shared by the tests and the benchmarks.
pub fn spawn_lab(
    lab: &labctl_protocols::Lab,
    estop: &crate::safety::EStop,
    timing: super::TaskTiming,
) -> (
    std::collections::BTreeMap<String, super::InstrumentHandle>,
    std::collections::BTreeMap<String, FakeInstrument>,
) {
    let mut handles = std::collections::BTreeMap::new();
    let mut fakes = std::collections::BTreeMap::new();
    for inst in &lab.instruments {
        let fake = FakeInstrument::new(&inst.id, inst.kind);
        handles.insert(
            inst.id.clone(),
            super::spawn(inst.clone(), fake.clone(), estop.clone(), timing),
        );
        fakes.insert(inst.id.clone(), fake);
    }
    (handles, fakes)
}
