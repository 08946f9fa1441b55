//! The roles instruments play, the parameter names of each step, and the lab's capabilities document.
//! What each instrument model takes and reports is the registry's (`registry::InstrumentModel`).
//!
//! Instruments are described by role, not by vendor: a protocol says "dispense 200 uL", and whichever pump
//! driver the lab file names turns that into its own wire commands.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The role an instrument plays in the lab.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum InstrumentKind {
    Gantry,
    SyringePump,
    Balance,
    Hotplate,
    Spectrophotometer,
    /// An instrument described by an instrument definition file: what it takes and reports is its
    /// definition's (see `registry::InstrumentModel`).
    Defined,
}

impl InstrumentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InstrumentKind::Gantry => "gantry",
            InstrumentKind::SyringePump => "syringe_pump",
            InstrumentKind::Balance => "balance",
            InstrumentKind::Hotplate => "hotplate",
            InstrumentKind::Spectrophotometer => "spectrophotometer",
            InstrumentKind::Defined => "defined",
        }
    }
}

impl std::fmt::Display for InstrumentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parameter names of each action and measurement, as the schema defines them. Used to explain
/// "wrong unit" mistakes (`volume_ml` where `volume_ul` is expected); a test keeps it equal to the schema.
pub fn param_fields(action: &str) -> Option<&'static [&'static str]> {
    Some(match action {
        "home" | "stop_pump" | "tare" | "zero" | "heater_off" | "stir_off" | "read_temperature" => {
            &[]
        }
        "move_to" => &["position", "feed_mm_per_min"],
        "move_xyz" => &["x_mm", "y_mm", "z_mm", "feed_mm_per_min"],
        "transfer" => &["vessel", "to"],
        "dispense" => &["vessel", "volume_ul", "rate_ul_per_min"],
        "set_temperature" => &["temperature_c"],
        "set_stir_speed" => &["speed_rpm"],
        "weigh" => &["stable"],
        "spectrum" => &["start_nm", "stop_nm", "step_nm"],
        "absorbance" => &["wavelength_nm"],
        "read" => &["quantity"],
        _ => return None,
    })
}

/// Unit suffixes used in field names, longest first, with what they mean.
pub const UNIT_SUFFIXES: &[(&str, &str)] = &[
    ("_ul_per_min", "microlitres per minute"),
    ("_mm_per_min", "millimetres per minute"),
    ("_c_per_min", "degrees Celsius per minute"),
    ("_ul", "microlitres"),
    ("_mm", "millimetres"),
    ("_rpm", "revolutions per minute"),
    ("_nm", "nanometres"),
    ("_c", "degrees Celsius"),
    ("_g", "grams"),
    ("_s", "seconds"),
];

/// Splits a field name into its stem and unit suffix: `volume_ul` -> (`volume`, Some(`_ul`)).
pub fn split_unit(field: &str) -> (&str, Option<(&'static str, &'static str)>) {
    for &(suffix, meaning) in UNIT_SUFFIXES {
        if let Some(stem) = field.strip_suffix(suffix)
            && !stem.is_empty()
        {
            return (stem, Some((suffix, meaning)));
        }
    }
    (field, None)
}

/// The lab's capabilities document, as the faces publish it (MQTT's retained `capabilities`, MCP's
/// `labctl://lab/capabilities`): the lab, its deck and approval policy, and for each instrument what a
/// protocol may ask of it: its actions, measurements and quantities (with units), its stock, capabilities
/// and envelope, and for a defined instrument what its definition says it is and takes.
pub fn document(lab: &crate::Lab) -> serde_json::Value {
    use serde_json::json;
    let instruments: Vec<serde_json::Value> = lab
        .instruments
        .iter()
        .map(|i| {
            let model = i.model();
            json!({
                "id": i.id,
                "kind": i.kind,
                "driver": i.driver,
                "actions": i.action_names(),
                "measurements": i.measurement_names(),
                "quantities": model.quantities,
                "stock": i.stock,
                "capabilities": i.capabilities,
                "envelope": i.envelope,
                "model": model,
            })
        })
        .collect();
    json!({
        "lab_id": lab.lab_id,
        "name": lab.name,
        "labctl_version": env!("CARGO_PKG_VERSION"),
        "protocol_version": 1,
        "deck": lab.deck,
        "approval": lab.approval,
        "instruments": instruments,
    })
}
