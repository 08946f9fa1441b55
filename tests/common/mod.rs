//! What the integration tests share: the controller on the lab's fake instruments (in process), and
//! `labctl run --sim` as a child process. Each test crate compiles this module for itself and uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use labctl::api::ControllerHandle;
use labctl::controller::{Controller, ControllerConfig, start};
use labctl::instruments::fake::{FakeInstrument, spawn_lab};
use labctl::instruments::{Connection, InstrumentHandle, TaskTiming};
use labctl::safety::EStop;
use labctl::world::TickConfig;
use labctl_protocols::Lab;
use labctl_simulators::model::VirtualClock;

pub type Fakes = BTreeMap<String, FakeInstrument>;

/// The controller on fake instruments of `lab`, journalling into `dir`, with the fakes set up by `prepare`
/// before it starts (on a current-thread runtime, before any instrument task first runs). The clock runs
/// at 1000x (a 30 s wait takes 30 ms), the tick every 10 ms, each instrument is polled every 5 ms.
pub async fn controller_on_fakes(
    dir: &Path,
    lab: Lab,
    prepare: impl FnOnce(&Fakes),
) -> (Controller, Fakes, BTreeMap<String, InstrumentHandle>) {
    let estop = EStop::default();
    let timing = TaskTiming {
        poll: Duration::from_millis(5),
        reconnect: Duration::from_millis(20),
    };
    let (handles, fakes) = spawn_lab(&lab, &estop, timing);
    prepare(&fakes);
    let config = ControllerConfig {
        lab,
        lab_sha256: "test".into(),
        data_dir: dir.to_owned(),
        clock: VirtualClock::new(1000.0).unwrap(),
        step_timeout_floor: Duration::ZERO,
        tick: TickConfig {
            period: Duration::from_millis(10),
            spin: Duration::ZERO,
            realtime_priority: None,
        },
        labware: None,
    };
    let controller = start(config, handles.clone(), estop).await.unwrap();
    (controller, fakes, handles)
}

/// Gives the hotplate's fake a plate temperature, for tests that read one back through a gateway.
pub fn plate_at_42_5(fakes: &Fakes) {
    fakes["hotplate"].log.lock().unwrap().values = vec![("plate_temperature_c", 42.5)];
}

/// Returns once every instrument is online in the published snapshot, so a client asking about them
/// sees them all; panics after `within`.
pub async fn wait_all_online(api: &ControllerHandle, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let snapshot = api.snapshot();
        if !snapshot.instruments.is_empty()
            && snapshot
                .instruments
                .iter()
                .all(|i| i.connection == Connection::Online)
        {
            return;
        }
        assert!(Instant::now() < deadline, "instruments never online");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A `labctl` child process, killed when dropped.
pub struct Labctl(pub Child);

impl Drop for Labctl {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `labctl run --sim --warp WARP --mqtt-port MQTT_PORT --command-port 127.0.0.1:0 --data-dir DIR`
/// (`MQTT_PORT` 0 picks a free one) and returns it with the embedded broker's port from its banner.
pub fn start_labctl_sim(data_dir: &Path, warp: &str, mqtt_port: u16) -> (Labctl, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args(["run", "--sim", "--warp", warp, "--mqtt-port"])
        .arg(mqtt_port.to_string())
        .args(["--command-port", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("LABCTL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn labctl");
    let stdout = child.stdout.take().unwrap();
    let labctl = Labctl(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("mqtt: ") {
                let port = rest
                    .split_whitespace()
                    .next()
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                let _ = tx.send(port);
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("labctl printed its MQTT port within 30 s")
        .expect("a port number");
    (labctl, port)
}
