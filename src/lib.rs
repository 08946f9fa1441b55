//! labctl core: the controller behind the `labctl` binary.
//!
//! - [`controller`]: proposals, approval, reservations, runs, interlocks, e-stop; [`api`] is its one API.
//! - [`executor`]: runs one protocol as a tokio task.
//! - [`instruments`]: one tokio task per instrument owns its driver; the envelope check sits there.
//! - [`world`]: the bevy_ecs world model and the fixed-rate tick thread.
//! - [`safety`]: envelope, e-stop latch, interlocks.
//! - [`journal`]: the crash-safe SQLite journal.
//! - [`commands`]: the `labctl` subcommands.
//! - [`console`]: `labctl console`, the technicians' terminal UI over MQTT.

pub mod api;
pub mod auth;
pub mod commands;
pub mod console;
pub mod contract;
pub mod controller;
pub mod executor;
pub mod gateways;
pub mod instruments;
pub mod journal;
pub mod lab_runtime;
pub mod policy;
pub mod safety;
pub mod tls;
pub mod world;
