//! labctl's clients: programs that reach a running lab over MQTT like any planner or technician would.
//!
//! - [`console`]: `labctl console`, the technicians' terminal UI.
//! - [`submit`]: `labctl submit`, a protocol file to the lab and its run followed to the end.
//!
//! May depend on: the contract, the MQTT link and the lab language. Never on the core or a face: a client
//! knows only what crosses the wire.

pub mod console;
pub mod submit;
