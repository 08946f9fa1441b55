//! The `labctl` binary's library: its subcommands, wiring the core, the faces and the clients together.
//!
//! - [`commands`]: the `labctl` subcommands.
//! - [`gateways`]: the faces, each its own crate: MQTT with its embedded broker (`labctl-mqtt`), OPC UA
//!   (`labctl-opcua`), the command port (`labctl-command-port`), MCP (`labctl-mcp`), the browser console
//!   (`labctl-web`).
//! - [`console`] and [`submit`]: the clients over MQTT (`labctl-clients`).
//!
//! The core (crate `labctl-core`: API, policy, controller, executor, world, journal, instruments, safety) is
//! re-exported under its own module names, so `labctl::api` is `labctl_core::api`.

pub use labctl_core::{
    api, auth, contract, controller, executor, instruments, journal, lab_runtime, policy, safety,
    tls, world,
};

pub mod commands;
pub use labctl_clients::{console, submit};
pub mod gateways;
