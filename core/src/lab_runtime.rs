//! Brings a lab's instruments up: starts the wire-level simulators for instruments whose transport is
//! `simulated`, builds each driver on its line (instruments sharing a serial port share one port task),
//! and spawns one instrument task per instrument.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use labctl_clock::VirtualClock;
use labctl_drivers::roles::HotplateOptions;
use labctl_drivers::{DriverOptions, Endpoint, setup::Ports};
use labctl_protocols::Lab;
use labctl_protocols::lab::Transport;
use labctl_simulators::simlab::{ClockConfig, SimLab, SimLabConfig, SimLabHandle};

use crate::instruments::{self, InstrumentHandle, TaskTiming};
use crate::safety::EStop;

/// Places a protocol's vessels on the simulated deck before its run: a fresh vial where the protocol says
/// it stands (what a technician does in a real lab).
struct SimLabware {
    model: std::sync::Arc<std::sync::Mutex<labctl_simulators::model::LabModel>>,
    clock: labctl_clock::LabClock,
}

impl crate::controller::LabwareLoader for SimLabware {
    fn load(
        &self,
        run_id: &str,
        protocol: &labctl_protocols::Protocol,
    ) -> Result<(), crate::controller::LabwareError> {
        use labctl_clock::Clock;
        let now = self.clock.now();
        let mut model = self.model.lock().map_err(|_| {
            crate::controller::LabwareError::Unavailable("simulated lab model is poisoned")
        })?;
        for lw in &protocol.labware {
            let position = lw.location.to_ascii_uppercase();
            // A fresh vessel: take away whatever stands there and any earlier vessel with this id.
            let stale: Vec<String> = model
                .deck()
                .vials()
                .iter()
                .filter(|v| {
                    v.id == lw.id
                        || model
                            .deck()
                            .vial_at(&position)
                            .is_some_and(|o| o.id == v.id)
                })
                .map(|v| v.id.clone())
                .collect();
            for id in stale {
                let _ = model.remove_vial(now, &id);
            }
            model.add_vial(now, &lw.id, &position).map_err(|e| {
                crate::controller::LabwareError::Placement {
                    vessel: lw.id.clone(),
                    reason: e.to_string(),
                }
            })?;
            tracing::info!(run = run_id, vessel = %lw.id, %position, "simulated lab: fresh vessel placed");
        }
        Ok(())
    }
}

/// How long an orderly stop waits for the instrument tasks to close their ports.
const INSTRUMENTS_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub struct LabRuntime {
    pub instruments: BTreeMap<String, InstrumentHandle>,
    /// One line per instrument: where it is and how it is reached, for the start-up banner.
    pub endpoints: Vec<String>,
    pub sim: Option<SimLabHandle>,
}

impl LabRuntime {
    /// The labware loader for the controller: the simulated deck's, when the lab is simulated.
    pub fn labware_loader(&self) -> Option<std::sync::Arc<dyn crate::controller::LabwareLoader>> {
        let sim = self.sim.as_ref()?;
        Some(std::sync::Arc::new(SimLabware {
            model: sim.model(),
            clock: sim.clock().clone(),
        }))
    }

    pub async fn shutdown(self) {
        // Stop the instrument tasks (their drivers close the ports) before the simulators unplug anything:
        // otherwise every driver reports its line lost in an orderly stop. Gateways may still hold handles.
        let mut stops = tokio::task::JoinSet::new();
        for handle in self.instruments.into_values() {
            stops.spawn(async move { handle.stop(INSTRUMENTS_STOP_WAIT).await });
        }
        if !stops.join_all().await.into_iter().all(|ended| ended) {
            tracing::warn!(
                "an instrument's task did not stop in time; its port is closed under it"
            );
        }
        if let Some(sim) = self.sim {
            sim.shutdown().await;
        }
    }
}

/// Driver settings for a simulator running `warp` times faster than real time: the pump is polled on its
/// own (warped) time, and the hotplate's watchdog, counted by the device in its own seconds, is stretched
/// so that it still allows the same real time between polls (within the 20-1500 s the device accepts).
fn simulated_driver_options(warp: f64) -> DriverOptions {
    let real = DriverOptions::default();
    let watchdog_s = (f64::from(real.hotplate.watchdog_s) * warp).clamp(20.0, 1500.0) as u16;
    DriverOptions {
        time_scale: warp,
        hotplate: HotplateOptions { watchdog_s },
        ..real
    }
}

/// What bringing a lab up needs besides the lab file.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Seed of the simulated lab's physical model.
    pub seed: u64,
    /// Where the simulators' pseudo-terminal links go (`None`: a fresh temporary directory).
    pub pty_dir: Option<std::path::PathBuf>,
    /// Every instrument is served by a simulator: drivers take the simulated timing even for
    /// instruments the lab file puts on serial lines.
    pub simulated_instruments: bool,
}

/// Why a lab's instruments could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot start the simulated lab: {0}")]
    Simulators(#[from] labctl_simulators::SimLabError),
    #[error("{instrument}: no simulator serves this instrument")]
    NoSimulator { instrument: String },
    #[error("{instrument}: {source}")]
    Driver {
        instrument: String,
        source: labctl_drivers::DriverError,
    },
}

/// Starts what the lab needs and connects every instrument.
pub async fn connect(
    lab: &Lab,
    options: &RuntimeOptions,
    clock: VirtualClock,
    estop: &EStop,
) -> Result<LabRuntime, RuntimeError> {
    let needs_sim = lab
        .instruments
        .iter()
        .any(|i| i.transport == Transport::Simulated);
    let (sim, wired) = if needs_sim {
        let config = SimLabConfig {
            lab: lab.clone(),
            seed: options.seed,
            clock: ClockConfig::Warp(clock.warp()),
            pty_dir: options.pty_dir.clone(),
            spectro_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ..SimLabConfig::default()
        };
        let sim = SimLab::start(config).await?;
        let wired = sim.lab_file(lab);
        (Some(sim), wired)
    } else {
        (None, lab.clone())
    };
    let mut ports = Ports::new();
    let real_options = DriverOptions::default();
    let simulated_options = simulated_driver_options(clock.warp());
    let mut handles = BTreeMap::new();
    let mut endpoints = Vec::new();
    for (config, wired) in lab.instruments.iter().zip(&wired.instruments) {
        let Some(endpoint) = Endpoint::from_transport(&wired.transport) else {
            return Err(RuntimeError::NoSimulator {
                instrument: config.id.clone(),
            });
        };
        let driver_options =
            if config.transport == Transport::Simulated || options.simulated_instruments {
                &simulated_options
            } else {
                &real_options
            };
        let driver = labctl_drivers::connect(wired, &endpoint, &mut ports, driver_options)
            .map_err(|source| RuntimeError::Driver {
                instrument: config.id.clone(),
                source,
            })?;
        let place = match &wired.transport {
            Transport::Serial(line) => format!("{} {} baud", line.port, line.baud),
            Transport::Tcp { address } => format!("tcp {address}"),
            Transport::Simulated => String::new(),
        };
        let sim_note = if config.transport == Transport::Simulated {
            " (simulated)"
        } else {
            ""
        };
        endpoints.push(format!(
            "{:<12} {:<13} {place}{sim_note}",
            config.id,
            format!("{:?}", config.driver)
        ));
        handles.insert(
            config.id.clone(),
            instruments::spawn(config.clone(), driver, estop.clone(), TaskTiming::default()),
        );
    }
    Ok(LabRuntime {
        instruments: handles,
        endpoints,
        sim,
    })
}
