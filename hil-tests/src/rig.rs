//! A test rig: the simulated lab served on real pseudo-terminals (the three pumps on one shared pty) and a
//! TCP port, with labctl's drivers built from the lab file against it.
//!
//! The ptys get stable symlinks in a private directory, so a driver reconnects to the new `/dev/pts/N` after
//! a simulated unplug and replug, as it would to a udev link such as `/dev/serial/by-id/...`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use labctl_drivers::roles::{GantryOptions, HotplateOptions};
use labctl_drivers::{AnyInstrument, DriverError, DriverOptions, Endpoint, Ports};
use labctl_protocols::Lab;
use labctl_protocols::lab::Transport;
use labctl_simulators::model::{FaultConfig, LabModel};
use labctl_simulators::{ClockConfig, FaultHandle, FaultsById, SimLab, SimLabConfig, SimLabHandle};

/// How the rig's lab runs.
#[derive(Debug, Clone)]
pub struct RigConfig {
    /// Virtual seconds per real second.
    pub warp: f64,
    /// Delay serial replies by their wire time (in virtual time).
    pub wire_timing: bool,
    pub seed: u64,
    /// Faults from the start, by instrument id (`pumps` for the whole pump line).
    pub faults: FaultsById,
    /// The lab (default: the simulated lab of `sim-lab.md`); instruments with a definition get their
    /// simulator from it.
    pub lab: Option<Lab>,
}

impl Default for RigConfig {
    fn default() -> Self {
        RigConfig {
            warp: 50.0,
            wire_timing: true,
            seed: 7,
            faults: FaultsById::new(),
            lab: None,
        }
    }
}

impl RigConfig {
    /// The default rig at another warp factor.
    pub fn warp(warp: f64) -> RigConfig {
        RigConfig {
            warp,
            ..RigConfig::default()
        }
    }
}

/// A directory removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> ScratchDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("labctl-hil-{}-{n}", std::process::id()));
        // A leftover from an earlier process with the same pid is stale.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the rig's pty directory");
        ScratchDir(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The simulated lab and the lab file wired to it.
pub struct Rig {
    pub sim: SimLabHandle,
    /// The lab file with every transport pointing at its simulator.
    pub lab: Lab,
    /// Port tasks, one per line, shared by every driver the rig builds.
    pub ports: Ports,
    pub options: DriverOptions,
    pub warp: f64,
    dir: ScratchDir,
}

impl Rig {
    /// Serves the simulated lab of `sim-lab.md` (must run inside a tokio runtime).
    pub async fn start(config: RigConfig) -> Rig {
        let dir = ScratchDir::new();
        let base = config.lab.unwrap_or_else(Lab::sim);
        let sim = SimLab::start(SimLabConfig {
            lab: base.clone(),
            seed: config.seed,
            clock: ClockConfig::Warp(config.warp),
            pty_dir: Some(dir.0.clone()),
            faults: config.faults,
            wire_timing: config.wire_timing,
            ..SimLabConfig::default()
        })
        .await
        .expect("start the simulated lab");
        let lab = sim.lab_file(&base);
        let options = DriverOptions {
            gantry: GantryOptions {
                // A homing cycle that does not answer (a critical alarm) must fail a test, not stall it.
                homing_timeout: Duration::from_secs(10),
                ..GantryOptions::default()
            },
            hotplate: HotplateOptions {
                // Virtual seconds: at warp 50 the device switches off after 12 real seconds of silence.
                watchdog_s: 600,
            },
            time_scale: config.warp,
        };
        Rig {
            sim,
            lab,
            ports: Ports::new(),
            options,
            warp: config.warp,
            dir,
        }
    }

    /// Where the ptys' stable symlinks live.
    pub fn pty_dir(&self) -> &Path {
        &self.dir.0
    }

    /// How a driver reaches instrument `id` (the pty's symlink, or the TCP address).
    pub fn endpoint(&self, id: &str) -> Endpoint {
        let instrument = self.lab.instrument(id).expect("instrument in the sim lab");
        match &instrument.transport {
            Transport::Serial(line) => Endpoint::Serial(line.clone()),
            Transport::Tcp { address } => Endpoint::Tcp {
                address: address.clone(),
            },
            Transport::Simulated => panic!("{id}: not wired to a simulator"),
        }
    }

    /// A driver for `id` on the rig's shared port tasks (a second driver for the same line shares it).
    pub fn driver(&mut self, id: &str) -> AnyInstrument {
        let endpoint = self.endpoint(id);
        self.driver_with(id, &endpoint)
    }

    /// A driver for `id` reached at `endpoint`.
    pub fn driver_with(&mut self, id: &str, endpoint: &Endpoint) -> AnyInstrument {
        let instrument = self
            .lab
            .instrument(id)
            .expect("instrument in the sim lab")
            .clone();
        labctl_drivers::connect(&instrument, endpoint, &mut self.ports, &self.options)
            .expect("build the driver")
    }

    /// Damage the port task of `id`'s line has absorbed so far: frames it dropped as unrelated or
    /// undecodable, bytes it discarded, and timeouts (each retried or reported).
    pub fn line_damage(&self, id: &str) -> u64 {
        let endpoint = self.endpoint(id);
        self.ports
            .handles()
            .filter(|h| h.endpoint().same_line(&endpoint))
            .map(|h| {
                let s = h.stats();
                s.unrelated_frames.load(Ordering::Relaxed)
                    + s.discarded_bytes.load(Ordering::Relaxed)
                    + s.timeouts.load(Ordering::Relaxed)
            })
            .sum()
    }

    /// Fault controls of `id` (or `pumps`).
    pub fn faults(&self, id: &str) -> FaultHandle {
        self.sim.faults(id).expect("fault handle")
    }

    /// Sets `id`'s faults.
    pub fn set_faults(&self, id: &str, faults: FaultConfig) {
        self.faults(id).set(faults).expect("valid faults");
    }

    /// Runs `f` on the physical model at the current virtual time.
    pub fn model<R>(&self, f: impl FnOnce(&mut LabModel, Duration) -> R) -> R {
        self.sim.with_model(f)
    }

    /// Real time for a span of virtual time.
    pub fn real(&self, virtual_span: Duration) -> Duration {
        virtual_span.div_f64(self.warp)
    }

    /// Virtual milliseconds that last `real_ms` real milliseconds (fault latency is virtual).
    pub fn virtual_ms(&self, real_ms: u64) -> u64 {
        (real_ms as f64 * self.warp).round() as u64
    }

    pub async fn shutdown(self) {
        let Rig { sim, dir, .. } = self;
        sim.shutdown().await;
        drop(dir);
    }
}

/// Awaits `fut`, failing the test (with `what`) when it takes longer than `limit`: a hang is a failure,
/// never a stuck CI job.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: no answer within {limit:?} (hang)"),
    }
}

/// [`within`] with the rig's generous default of 30 s.
pub async fn step<F: Future>(what: &str, fut: F) -> F::Output {
    within(Duration::from_secs(30), what, fut).await
}

/// A driver result that must be a success, with the error shown when it is not.
pub fn ok<T>(what: &str, result: Result<T, DriverError>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e} ({e:?})"),
    }
}
