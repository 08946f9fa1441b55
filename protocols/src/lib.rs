//! The labctl lab protocol language.
//!
//! - [`protocol`]: the types of a protocol (what a planner proposes), serde + JSON Schema from one source.
//! - [`lab`]: the lab file (TOML): instruments, transports, capabilities, safety envelope, users.
//! - [`capabilities`]: what each kind of instrument can do and report.
//! - [`device`]: what an instrument reports about itself (identity, coarse state).
//! - [`validate`]: the one validator every interface calls (CLI, MQTT, OPC UA, command port).
//! - [`schema`]: the JSON Schema a planner writes against.
//! - [`instrument_def`]: instrument definitions (one TOML file per instrument model) and their checker.
//! - [`registry`]: one description per instrument model, built-in or defined, that everything else reads.
//! - [`pattern_text`]: the text a reply pattern matches, written from values (for simulators and checks).
//!
//! May depend on: nothing of labctl (every other crate reads the lab file and protocols through it).

pub mod capabilities;
pub mod device;
pub mod finding;
pub mod instrument_def;
pub mod interpret;
pub mod lab;
pub mod pattern_text;
pub mod protocol;
pub mod range;
pub mod registry;
pub mod schema;
pub mod serial;
pub mod validate;

pub use capabilities::InstrumentKind;
pub use finding::{Finding, FindingCode, Severity};
pub use lab::Lab;
pub use protocol::*;
pub use validate::{Report, validate_bytes, validate_protocol};
