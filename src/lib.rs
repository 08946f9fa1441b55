//! The `labctl` binary's library: its subcommands, its faces and the terminal console, on top of the core.
//!
//! - [`commands`]: the `labctl` subcommands.
//! - [`gateways`]: the faces: MQTT (with its embedded broker), OPC UA, the command port.
//! - [`console`]: `labctl console`, the technicians' terminal UI over MQTT.
//!
//! The core (crate `labctl-core`: API, policy, controller, executor, world, journal, instruments, safety) is
//! re-exported under its own module names, so `labctl::api` is `labctl_core::api`.

pub use labctl_core::{
    api, auth, contract, controller, executor, instruments, journal, lab_runtime, policy, safety,
    tls, world,
};

pub mod commands;
pub mod console;
pub mod gateways;
