//! What each kind of instrument can be asked to do and what it reports.
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
    /// An instrument described by an instrument definition file: its actions, measurements and
    /// quantities are the definition's (see `lab::Instrument::action_names`), not the kind's.
    Defined,
}

/// A quantity an instrument reports as telemetry, with its unit in its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Quantity {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
}

impl InstrumentKind {
    /// The built-in roles (a defined instrument's abilities come from its definition).
    pub const ALL: [InstrumentKind; 5] = [
        InstrumentKind::Gantry,
        InstrumentKind::SyringePump,
        InstrumentKind::Balance,
        InstrumentKind::Hotplate,
        InstrumentKind::Spectrophotometer,
    ];

    /// Names of the `action` steps this kind accepts.
    pub fn actions(self) -> &'static [&'static str] {
        match self {
            InstrumentKind::Gantry => &["home", "move_to", "move_xyz", "transfer"],
            InstrumentKind::SyringePump => &["dispense", "stop_pump"],
            InstrumentKind::Balance => &["tare", "zero"],
            InstrumentKind::Hotplate => &[
                "set_temperature",
                "heater_off",
                "set_stir_speed",
                "stir_off",
            ],
            InstrumentKind::Spectrophotometer | InstrumentKind::Defined => &[],
        }
    }

    /// Names of the `measure` steps this kind accepts.
    pub fn measurements(self) -> &'static [&'static str] {
        match self {
            InstrumentKind::Gantry | InstrumentKind::SyringePump => &[],
            InstrumentKind::Defined => &["read"],
            InstrumentKind::Balance => &["weigh"],
            InstrumentKind::Hotplate => &["read_temperature"],
            InstrumentKind::Spectrophotometer => &["spectrum", "absorbance"],
        }
    }

    /// Quantities this kind reports as live telemetry (what `wait_until` may test).
    pub fn quantities(self) -> &'static [Quantity] {
        const fn q(name: &'static str, unit: &'static str, description: &'static str) -> Quantity {
            Quantity {
                name,
                unit,
                description,
            }
        }
        const GANTRY: &[Quantity] = &[
            q("x_mm", "mm", "head x position"),
            q("y_mm", "mm", "head y position"),
            q("z_mm", "mm", "head z position"),
        ];
        const PUMP: &[Quantity] = &[q(
            "dispensed_ul",
            "uL",
            "volume dispensed since the last clear",
        )];
        const BALANCE: &[Quantity] = &[q("mass_g", "g", "net mass on the pan")];
        const HOTPLATE: &[Quantity] = &[
            q(
                "temperature_c",
                "degC",
                "vessel temperature (external probe)",
            ),
            q("plate_temperature_c", "degC", "plate temperature"),
            q("stir_speed_rpm", "rpm", "stirrer speed"),
        ];
        match self {
            InstrumentKind::Gantry => GANTRY,
            InstrumentKind::SyringePump => PUMP,
            InstrumentKind::Balance => BALANCE,
            InstrumentKind::Hotplate => HOTPLATE,
            InstrumentKind::Spectrophotometer | InstrumentKind::Defined => &[],
        }
    }

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
            let quantities = match &i.defined {
                Some(def) => def
                    .readings
                    .iter()
                    .map(|r| {
                        json!({ "name": r.name, "unit": r.unit,
                                "description": format!("{} reading", def.model.name) })
                    })
                    .collect(),
                None => json!(i.kind.quantities()),
            };
            json!({
                "id": i.id,
                "kind": i.kind,
                "actions": i.action_names(),
                "measurements": i.measurement_names(),
                "quantities": quantities,
                "stock": i.stock,
                "capabilities": i.capabilities,
                "envelope": i.envelope,
                "definition": i.defined.as_ref().map(|d| json!({
                    "manufacturer": d.model.manufacturer,
                    "model": d.model.name,
                    "manual": d.model.manual,
                    "actions": d.actions.iter().map(|a| json!({
                        "name": a.name,
                        "params": a.params.iter().map(|p| json!({
                            "name": p.name, "unit": p.unit, "min": p.min, "max": p.max,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })),
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
