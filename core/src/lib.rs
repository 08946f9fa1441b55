//! labctl's core: everything between the faces and the instruments.
//!
//! - [`api`]: the one API every face uses (MQTT, OPC UA, command port, consoles, CLI); [`contract`] holds
//!   its plain data types (who asks, run states, event kinds, errors, replies).
//! - [`policy`]: the role table, the one place that says who may do what.
//! - [`auth`]: the lab's users and their logins, shared by all faces.
//! - [`controller`]: proposals, approval, reservations, runs, interlocks, e-stop.
//! - [`executor`]: runs one protocol as a tokio task.
//! - [`instruments`]: one tokio task per instrument owns its driver; the envelope check sits there.
//! - [`world`]: the bevy_ecs world model and the fixed-rate tick thread.
//! - [`safety`]: envelope, e-stop latch, interlocks.
//! - [`journal`]: the crash-safe SQLite journal.
//! - [`lab_runtime`]: brings a lab's instruments (and its simulators) up.
//! - [`tls`]: the certificate the faces serve TLS with.
//! - [`fake_core`]: a scripted stand-in for the controller behind a real handle, to test a face alone.
//!
//! May depend on: protocols, drivers, clock, simulators. Never on a face: faces depend on this crate.

pub mod api;
pub use labctl_contract as contract;
pub mod auth;
pub mod controller;
pub mod executor;
pub mod fake_core;
pub mod instruments;
pub mod journal;
pub mod lab_runtime;
pub mod policy;
pub mod safety;
pub mod tls;
pub mod world;
