//! Instrument drivers for labctl.
//!
//! Layers, bottom up (the rumqtt way: no I/O below the transport):
//! - the codecs (crate `labctl-codecs`): one sans-IO codec per wire protocol, pure functions from bytes to
//!   typed frames and back on both sides of the line, so the simulators speak exactly what the drivers
//!   parse (they depend on the codecs alone, not on this crate).
//! - the transport (crate `labctl-transport`): byte streams over serial lines, raw TCP, or an in-memory
//!   duplex for tests.
//! - [`port`]: one tokio task owns each port and runs transactions on it one at a time, for every
//!   instrument sharing that line.
//! - [`roles`]: the drivers, one per wire protocol, behind the [`Instrument`] trait.
//! - [`connect`] (in [`setup`]): a driver for each lab-file instrument, with shared lines grouped onto one
//!   port task.
//!
//! May depend on: codecs, protocols. Never on the core, a face or the simulators.

pub mod error;
pub mod instrument;
pub mod port;
pub mod roles;
pub mod setup;

#[cfg(test)]
pub(crate) mod testing;

pub use error::{DriverError, PortError};
pub use instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
pub use labctl_transport::Endpoint;
pub use port::{PortConfig, PortHandle};
pub use setup::{AnyInstrument, DriverOptions, Ports, connect, driver_for, port_config};
