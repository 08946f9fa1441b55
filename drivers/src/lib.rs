//! Instrument drivers for labctl.
//!
//! Layers, bottom up (the rumqtt way: no I/O below the transport):
//! - [`codec`]: one sans-IO codec per wire protocol. Pure functions from bytes to typed frames and back, on
//!   both sides of the line (host and device), so the simulators speak exactly what the drivers parse.
//! - transports and port tasks (later): tokio tasks that own a serial port or TCP socket.
//! - instrument roles (later): gantry, syringe pump, balance, hotplate, spectrophotometer.

pub mod codec;
pub mod error;
pub mod instrument;
pub mod port;
pub mod roles;
pub mod transport;

#[cfg(test)]
pub(crate) mod testing;

pub use error::{DriverError, PortError};
pub use instrument::{DeviceCommand, DeviceState, Identity, Instrument, Outcome, Telemetry};
