//! A real controller on the simulated lab (wire-level simulators on ptys and TCP, warped time), with MCP
//! served over streamable HTTP on a free loopback port.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use labctl_clock::VirtualClock;
use labctl_core::api::{ControllerHandle, Face, Principal};
use labctl_core::auth::Users;
use labctl_core::controller::{Controller, ControllerConfig, start};
use labctl_core::lab_runtime::{LabRuntime, RuntimeOptions};
use labctl_core::safety::EStop;
use labctl_core::world::TickConfig;
use labctl_mcp::http::{HttpOptions, McpHttp, serve};
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;

pub const DYE_MIX: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../protocols/examples/dye-mix.json"
);

pub struct Rig {
    pub api: ControllerHandle,
    pub mcp: McpHttp,
    pub controller: Controller,
    pub runtime: LabRuntime,
    pub dir: tempfile::TempDir,
}

impl Rig {
    pub async fn start() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::sim();
        let clock = VirtualClock::new(20.0).unwrap();
        let estop = EStop::default();
        let options = RuntimeOptions {
            seed: 7,
            ..RuntimeOptions::default()
        };
        let runtime = labctl_core::lab_runtime::connect(&lab, &options, clock, &estop)
            .await
            .unwrap();
        let config = ControllerConfig {
            lab: lab.clone(),
            lab_sha256: "sim".into(),
            data_dir: dir.path().to_owned(),
            clock,
            step_timeout_floor: Duration::from_secs(10),
            tick: TickConfig {
                period: Duration::from_millis(10),
                spin: Duration::ZERO,
                realtime_priority: None,
            },
            labware: runtime.labware_loader(),
        };
        let controller = start(config, runtime.instruments.clone(), estop)
            .await
            .unwrap();
        let api = controller.handle.clone();
        let users = Arc::new(Users::from_lab(&lab).unwrap());
        let mcp = serve(
            HttpOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                tls: None,
                allow_cleartext_on_network: false,
            },
            api.clone(),
            users,
        )
        .await
        .unwrap();
        Rig {
            api,
            mcp,
            controller,
            runtime,
            dir,
        }
    }

    pub async fn stop(self) {
        self.mcp.shutdown();
        self.api.shutdown().await;
        self.runtime.shutdown().await;
    }
}

pub fn technician() -> Principal {
    Principal::new("alice", Role::Technician, Face::InProcess)
}

/// A protocol that waits `seconds`: beyond the simulated lab's auto-approve duration (3600 s) it waits for
/// a technician, and holds no instrument.
pub fn hold(proposal_id: &str, seconds: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "version": 1,
        "metadata": {
            "name": "long hold",
            "objective": "wait",
            "proposal_id": proposal_id,
            "planner": { "id": "planner-bo" }
        },
        "labware": [],
        "steps": [ { "type": "wait", "id": "hold", "duration_s": seconds } ]
    }))
    .unwrap()
}
