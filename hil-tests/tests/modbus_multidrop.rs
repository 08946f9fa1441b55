//! Several Modbus RTU instruments on one RS-485 line, end to end: the lab file puts three Bronkhorst
//! controllers on one serial port at addresses 1, 2 and 7; the simulated lab serves them as one multi-unit
//! simulator on one pty, and the drivers built from the lab file share one connection to it, each unit
//! with its own state, its own readings and its own faults.

use std::time::Duration;

use labctl_drivers::{DeviceCommand, DriverError, Instrument, Outcome, PortError, Telemetry};
use labctl_hil_tests::rig::{Rig, RigConfig, ok, step, within};
use labctl_hil_tests::system::workspace;
use labctl_protocols::Lab;
use labctl_protocols::lab::SIM_LAB_TOML;
use labctl_simulators::model::FaultConfig;

const WARP: f64 = 20.0;

fn lab() -> Lab {
    let mut text = SIM_LAB_TOML.to_owned();
    for (id, address) in [("mfc-a", 1), ("mfc-b", 2), ("mfc-c", 7)] {
        text.push_str(&format!(
            r#"
[[instruments]]
id = "{id}"
kind = "defined"
driver = "definition"
definition = "instruments/bronkhorst-el-flow-modbus.toml"
transport = {{ type = "serial", port = "/dev/ttyRS485", baud = 19200, parity = "even" }}
address = {address}
envelope = {{ flow_ln_per_min = [0, 5] }}
"#
        ));
    }
    Lab::from_toml_str_in(&text, "test lab", &workspace()).unwrap_or_else(|e| panic!("{e}"))
}

async fn rig() -> Rig {
    Rig::start(RigConfig {
        lab: Some(lab()),
        ..RigConfig::warp(WARP)
    })
    .await
}

fn flow(t: &Telemetry) -> f64 {
    t.values
        .iter()
        .find(|(n, _)| *n == "flow_ln_per_min")
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no flow in {t:?}"))
}

fn set_flow(value: f64) -> DeviceCommand {
    DeviceCommand::Defined {
        action: "set_flow".into(),
        params: [("flow_ln_per_min".to_owned(), value)].into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_on_one_line_each_follow_their_own_setpoint() {
    let mut rig = rig().await;
    // One simulated line for the three, named after the lab's port, each unit at its address.
    let endpoints: Vec<_> = ["mfc-a", "mfc-b", "mfc-c"]
        .iter()
        .map(|id| rig.sim.endpoint(id).unwrap())
        .collect();
    for e in &endpoints {
        assert_eq!(e.port, "modbus-ttyRS485", "{e:?}");
        assert_eq!(e.location(), endpoints[0].location());
    }
    let addresses: Vec<Option<u8>> = endpoints.iter().map(|e| e.network_address).collect();
    assert_eq!(addresses, [Some(1), Some(2), Some(7)]);

    let mut drivers: Vec<_> = ["mfc-a", "mfc-b", "mfc-c"]
        .iter()
        .map(|id| rig.driver(id))
        .collect();
    assert_eq!(
        rig.ports.modbus.lines().count(),
        1,
        "one connection for the line"
    );
    for d in &mut drivers {
        let identity = ok("start", step("start", d.start()).await);
        // Model and serial from the simulator's string registers.
        assert_eq!(
            (identity.model.as_str(), identity.serial.as_str()),
            ("F-201CV-SIM", "SIM0001")
        );
    }
    for (d, target) in drivers.iter_mut().zip([1.0, 2.5, 4.0]) {
        let outcome = within(
            Duration::from_secs(20),
            "set_flow",
            d.execute(&set_flow(target)),
        )
        .await;
        assert_eq!(ok("set_flow", outcome), Outcome::Done);
    }
    for (d, target) in drivers.iter_mut().zip([1.0, 2.5, 4.0]) {
        let value = flow(&ok("poll", step("poll", d.poll()).await));
        assert!((value - target).abs() < 0.05, "{value} for {target}");
    }
    // The wire tap of the shared line, read back per unit id: each setpoint went to its own unit.
    let report = labctl_hil_tests::envelope::check_lab(&rig.lab, |port| rig.sim.transcript(port));
    assert!(
        report.violations.is_empty() && report.undecodable.is_empty(),
        "{report}"
    );
    for (id, target) in [("mfc-a", 1.0), ("mfc-b", 2.5), ("mfc-c", 4.0)] {
        assert_eq!(
            report.sent(id, "flow_ln_per_min"),
            [target],
            "{id}: {report}"
        );
    }
    for d in &mut drivers {
        d.stop().await;
    }
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_unit_times_out_alone_while_the_others_keep_answering() {
    let mut rig = rig().await;
    let (mut a, mut b) = (rig.driver("mfc-a"), rig.driver("mfc-b"));
    ok("start a", step("start", a.start()).await);
    ok("start b", step("start", b.start()).await);
    rig.set_faults(
        "mfc-b",
        FaultConfig {
            no_reply: true,
            ..FaultConfig::default()
        },
    );
    let err = step("poll b", b.poll()).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::Port(PortError::Timeout { port, .. }) if port.contains("unit 2")),
        "{err:?}"
    );
    ok("poll a", step("poll a", a.poll()).await);
    rig.set_faults("mfc-b", FaultConfig::default());
    ok("poll b again", step("poll b", b.poll()).await);
    ok("poll a again", step("poll a", a.poll()).await);
    a.stop().await;
    b.stop().await;
    rig.shutdown().await;
}
