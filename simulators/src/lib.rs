//! Wire-compatible simulated instruments and the one physical model of the lab behind them.
//!
//! - [`model`]: the physical model of the dye-mixing lab, in virtual time.
//! - [`devices`]: one device-side state machine per instrument protocol (GRBL, NE-1000, MT-SICS, IKA
//!   NAMUR, SCPI), pure: bytes in, bytes out, given the model and the time.
//! - [`serve`]: serves devices on real pseudo-terminals and TCP ports, with wire timing and fault
//!   injection.
//! - [`simlab`]: the whole simulated lab in one call: [`SimLab::start`] gives a [`SimLabHandle`] with the
//!   endpoints, fault handles, the model and `shutdown()`.
//!
//! May depend on: clock, codecs, protocols. Never on the drivers (a simulator speaks the wire through the
//! codecs, so it cannot borrow a driver's mistakes), the core or a face.

pub mod devices;
pub mod dry_run;
pub mod model;
pub mod serve;
pub mod simlab;

pub use simlab::{
    ClockConfig, Endpoint, EndpointKind, FaultHandle, FaultsById, Identities, SimLab, SimLabConfig,
    SimLabError, SimLabHandle, parse_faults,
};
