//! The words of a serial line, shared by the lab file (an instrument's transport) and instrument
//! definitions (a model's line settings).

use serde::{Deserialize, Serialize};

/// Parity bit of a serial line.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// Flow control: none, software (XON/XOFF) or hardware (RTS/CTS).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

/// Settings of a serial line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialLine {
    /// Device path, e.g. `/dev/ttyUSB0`.
    pub port: String,
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub flow_control: FlowControl,
}

pub(crate) fn default_data_bits() -> u8 {
    8
}
pub(crate) fn default_stop_bits() -> u8 {
    1
}
