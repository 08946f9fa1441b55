//! The instrument registry: one description per instrument model labctl can drive, whether one of its
//! built-in drivers speaks to it or an instrument definition file describes it.
//!
//! A lab-file instrument resolves its [`InstrumentModel`] when the lab loads (`lab::Instrument::model`):
//! its driver's entry for a built-in driver, its definition's for `driver = "definition"`. The validator,
//! the capabilities document and every face (OPC UA, MQTT, MCP, console, command port) read what an
//! instrument takes and reports from that one description, so none of them tells a built-in instrument
//! from a defined one.

use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Serialize};

use crate::capabilities::{InstrumentKind, param_fields, split_unit};
use crate::instrument_def::InstrumentDefinition;
use crate::range::Range;
use crate::serial::{FlowControl, Parity, SerialLine};

/// The wire protocol an instrument speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// GRBL 1.1 G-code controller.
    Grbl,
    /// New Era NE-1000 family syringe pump.
    Ne1000,
    /// Mettler Toledo MT-SICS level 0/1 balance.
    MtSics,
    /// IKA hotplate stirrer, NAMUR commands.
    IkaNamur,
    /// SCPI / IEEE 488.2 spectrophotometer.
    ScpiSpectro,
    /// The instrument definition file named by the instrument's `definition`.
    Definition,
}

impl Driver {
    /// Every driver: the five built-in ones and the definition-driven one.
    pub const ALL: [Driver; 6] = [
        Driver::Grbl,
        Driver::Ne1000,
        Driver::MtSics,
        Driver::IkaNamur,
        Driver::ScpiSpectro,
        Driver::Definition,
    ];

    /// The instrument kind this driver can serve.
    pub fn kind(self) -> InstrumentKind {
        match self {
            Driver::Grbl => InstrumentKind::Gantry,
            Driver::Ne1000 => InstrumentKind::SyringePump,
            Driver::MtSics => InstrumentKind::Balance,
            Driver::IkaNamur => InstrumentKind::Hotplate,
            Driver::ScpiSpectro => InstrumentKind::Spectrophotometer,
            Driver::Definition => InstrumentKind::Defined,
        }
    }
}

/// What one instrument model offers a protocol, and how it is reached.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstrumentModel {
    /// The driver that speaks its wire protocol.
    pub driver: Driver,
    pub kind: InstrumentKind,
    pub manufacturer: String,
    /// The model (or family) name.
    pub model: String,
    /// The document its commands and replies are taken from.
    pub manual: String,
    /// The `action` steps it accepts.
    pub actions: Vec<StepDescription>,
    /// The `measure` steps it accepts.
    pub measurements: Vec<StepDescription>,
    /// What it reports as telemetry (what `wait_until` and interlocks may test).
    pub quantities: Vec<QuantityDescription>,
    /// The envelope fields a lab must give it: a command on an unbounded quantity would have nothing to be
    /// checked against. A defined instrument's are its actions' numeric parameters.
    pub required_envelope: Vec<String>,
    /// The serial line it ships with (for a device the lab file does not describe, such as a simulator's
    /// pty); `None` when it is reached over TCP or Modbus.
    #[serde(skip)]
    pub line: Option<LineDefaults>,
    /// The definition it comes from, for `driver = "definition"`.
    #[serde(skip)]
    pub definition: Option<Arc<InstrumentDefinition>>,
}

/// An action or measurement a model accepts, with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepDescription {
    pub name: String,
    pub params: Vec<ParamDescription>,
}

/// One parameter of a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamDescription {
    pub name: String,
    pub value: ValueType,
    /// The unit of a number (`uL`, `degC`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The model's own range, when the model fixes it (a definition does; a built-in instrument's range is
    /// the lab file's `capabilities`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// What a parameter's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Number,
    /// A vessel's name (`vial_1`).
    Vessel,
    /// A deck position's name (`A1`, `spectro`).
    Position,
    /// True or false.
    Flag,
    /// A quantity the instrument reports, by name.
    Quantity,
}

/// A quantity a model reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantityDescription {
    pub name: String,
    pub unit: String,
    pub description: String,
}

/// A model's serial line settings, without the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineDefaults {
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub flow_control: FlowControl,
}

impl LineDefaults {
    /// These settings on `port`.
    pub fn on(self, port: &str) -> SerialLine {
        SerialLine {
            port: port.to_owned(),
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
            flow_control: self.flow_control,
        }
    }
}

impl InstrumentModel {
    /// The registry's entry for a built-in driver; for `Driver::Definition`, a model with nothing in it (a
    /// lab-file instrument whose definition has not been read offers nothing).
    pub fn builtin(driver: Driver) -> &'static Arc<InstrumentModel> {
        static MODELS: LazyLock<Vec<Arc<InstrumentModel>>> = LazyLock::new(|| {
            Driver::ALL
                .into_iter()
                .map(|d| Arc::new(builtin_model(d)))
                .collect()
        });
        MODELS
            .iter()
            .find(|m| m.driver == driver)
            .unwrap_or_else(|| unreachable!("every driver has a built-in entry"))
    }

    /// The model a definition file describes.
    pub fn from_definition(definition: Arc<InstrumentDefinition>) -> InstrumentModel {
        let def = &definition;
        let number = |p: &crate::instrument_def::Param| ParamDescription {
            name: p.name.clone(),
            value: ValueType::Number,
            unit: Some(p.unit.clone()),
            min: Some(p.min),
            max: Some(p.max),
        };
        let mut required_envelope: Vec<String> = Vec::new();
        for p in def.actions.iter().flat_map(|a| &a.params) {
            if !required_envelope.contains(&p.name) {
                required_envelope.push(p.name.clone());
            }
        }
        InstrumentModel {
            driver: Driver::Definition,
            kind: InstrumentKind::Defined,
            manufacturer: def.model.manufacturer.clone(),
            model: def.model.name.clone(),
            manual: def.model.manual.clone(),
            actions: def
                .actions
                .iter()
                .map(|a| StepDescription {
                    name: a.name.clone(),
                    params: a.params.iter().map(number).collect(),
                })
                .collect(),
            measurements: vec![builtin_step("read")],
            quantities: def
                .readings
                .iter()
                .map(|r| QuantityDescription {
                    name: r.name.clone(),
                    unit: r.unit.clone(),
                    description: format!("{} reading", def.model.name),
                })
                .collect(),
            required_envelope,
            line: def.line.as_ref().map(|l| LineDefaults {
                baud: l.baud,
                data_bits: l.data_bits,
                parity: l.parity,
                stop_bits: l.stop_bits,
                flow_control: l.flow_control,
            }),
            definition: Some(Arc::clone(&definition)),
        }
    }

    /// Names of the `action` steps it accepts.
    pub fn action_names(&self) -> impl Iterator<Item = &str> {
        self.actions.iter().map(|a| a.name.as_str())
    }

    /// Names of the `measure` steps it accepts.
    pub fn measurement_names(&self) -> impl Iterator<Item = &str> {
        self.measurements.iter().map(|m| m.name.as_str())
    }

    /// Whether it accepts `step` as an action or a measurement.
    pub fn offers(&self, step: &str) -> bool {
        self.action_names()
            .chain(self.measurement_names())
            .any(|n| n == step)
    }

    /// The range its own description gives the numeric parameter `name`: the narrowest where several steps
    /// take it. `None` for a parameter it does not take or does not bound (a built-in model's ranges are the
    /// lab file's `capabilities`).
    pub fn param_range(&self, name: &str) -> Option<Range> {
        let mut bounds = self
            .actions
            .iter()
            .chain(&self.measurements)
            .flat_map(|s| &s.params)
            .filter(|p| p.name == name)
            .filter_map(|p| Some((p.min?, p.max?)));
        let first = bounds.next()?;
        let (min, max) = bounds.fold(first, |(lo, hi), (min, max)| (lo.max(min), hi.min(max)));
        Some(Range { min, max })
    }

    /// The quantity it reports by `name`.
    pub fn quantity(&self, name: &str) -> Option<&QuantityDescription> {
        self.quantities.iter().find(|q| q.name == name)
    }
}

/// Every built-in model, in the order of [`Driver::ALL`] (the definition entry, empty, last).
pub fn builtin_models() -> impl Iterator<Item = &'static Arc<InstrumentModel>> {
    Driver::ALL.into_iter().map(InstrumentModel::builtin)
}

/// A built-in step with its parameters as the protocol schema names them (`capabilities::param_fields`).
fn builtin_step(name: &str) -> StepDescription {
    let params = param_fields(name)
        .unwrap_or_else(|| unreachable!("{name} is a step of the protocol schema"))
        .iter()
        .map(|field| {
            let value = match *field {
                "vessel" => ValueType::Vessel,
                "position" | "to" => ValueType::Position,
                "stable" => ValueType::Flag,
                "quantity" => ValueType::Quantity,
                _ => ValueType::Number,
            };
            let unit = match value {
                ValueType::Number => split_unit(field).1.map(|(suffix, _)| unit_symbol(suffix)),
                _ => None,
            };
            ParamDescription {
                name: (*field).to_owned(),
                value,
                unit: unit.map(str::to_owned),
                min: None,
                max: None,
            }
        })
        .collect();
    StepDescription {
        name: name.to_owned(),
        params,
    }
}

/// The unit symbol (as telemetry writes it) of a field-name suffix.
fn unit_symbol(suffix: &str) -> &'static str {
    match suffix {
        "_ul_per_min" => "uL/min",
        "_mm_per_min" => "mm/min",
        "_c_per_min" => "degC/min",
        "_ul" => "uL",
        "_mm" => "mm",
        "_rpm" => "rpm",
        "_nm" => "nm",
        "_c" => "degC",
        "_g" => "g",
        "_s" => "s",
        _ => "",
    }
}

fn quantity(name: &str, unit: &str, description: &str) -> QuantityDescription {
    QuantityDescription {
        name: name.to_owned(),
        unit: unit.to_owned(),
        description: description.to_owned(),
    }
}

const fn line(baud: u32, data_bits: u8, parity: Parity) -> LineDefaults {
    LineDefaults {
        baud,
        data_bits,
        parity,
        stop_bits: 1,
        flow_control: FlowControl::None,
    }
}

/// What each built-in driver's instruments take and report: the one table of it.
fn builtin_model(driver: Driver) -> InstrumentModel {
    let steps = |names: &[&str]| names.iter().map(|n| builtin_step(n)).collect::<Vec<_>>();
    let strings = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
    let (manufacturer, model, manual) = match driver {
        Driver::Grbl => (
            "Grbl project",
            "GRBL 1.1 G-code controller",
            "Grbl v1.1 Interface; Grbl v1.1 Commands",
        ),
        Driver::Ne1000 => (
            "New Era Pump Systems",
            "NE-1000 family syringe pump",
            "NE-1000 Syringe Pump User Manual, RS-232 basic mode",
        ),
        Driver::MtSics => (
            "Mettler Toledo",
            "MT-SICS level 0/1 balance",
            "MT-SICS Interface Commands reference manual, levels 0 and 1",
        ),
        Driver::IkaNamur => (
            "IKA",
            "hotplate stirrer (NAMUR commands)",
            "IKA operating instructions, NAMUR interface commands",
        ),
        Driver::ScpiSpectro => (
            "SCPI instrument",
            "UV-Vis spectrophotometer (SCPI, IEEE 488.2)",
            "SCPI-99; IEEE 488.2",
        ),
        Driver::Definition => ("", "a definition not yet read", ""),
    };
    let mut m = InstrumentModel {
        driver,
        kind: driver.kind(),
        manufacturer: manufacturer.into(),
        model: model.into(),
        manual: manual.into(),
        actions: Vec::new(),
        measurements: Vec::new(),
        quantities: Vec::new(),
        required_envelope: Vec::new(),
        line: None,
        definition: None,
    };
    match driver {
        Driver::Grbl => {
            m.actions = steps(&["home", "move_to", "move_xyz", "transfer"]);
            m.quantities = vec![
                quantity("x_mm", "mm", "head x position"),
                quantity("y_mm", "mm", "head y position"),
                quantity("z_mm", "mm", "head z position"),
            ];
            m.required_envelope = strings(&["x_mm", "y_mm", "z_mm", "feed_mm_per_min"]);
            m.line = Some(line(115_200, 8, Parity::None));
        }
        Driver::Ne1000 => {
            m.actions = steps(&["dispense", "stop_pump"]);
            m.quantities = vec![quantity(
                "dispensed_ul",
                "uL",
                "volume dispensed since the last clear",
            )];
            m.required_envelope = strings(&["rate_ul_per_min", "volume_ul"]);
            m.line = Some(line(19_200, 8, Parity::None));
        }
        Driver::MtSics => {
            m.actions = steps(&["tare", "zero"]);
            m.measurements = steps(&["weigh"]);
            m.quantities = vec![quantity("mass_g", "g", "net mass on the pan")];
            m.required_envelope = strings(&["mass_g"]);
            m.line = Some(line(9600, 8, Parity::None));
        }
        Driver::IkaNamur => {
            m.actions = steps(&[
                "set_temperature",
                "heater_off",
                "set_stir_speed",
                "stir_off",
            ]);
            m.measurements = steps(&["read_temperature"]);
            m.quantities = vec![
                quantity(
                    "temperature_c",
                    "degC",
                    "vessel temperature (external probe)",
                ),
                quantity("plate_temperature_c", "degC", "plate temperature"),
                quantity("stir_speed_rpm", "rpm", "stirrer speed"),
            ];
            m.required_envelope = strings(&["temperature_c", "stir_speed_rpm"]);
            m.line = Some(line(9600, 7, Parity::Even));
        }
        Driver::ScpiSpectro => {
            m.measurements = steps(&["spectrum", "absorbance"]);
            m.required_envelope = strings(&["wavelength_nm"]);
        }
        Driver::Definition => {}
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_driver_has_an_entry_of_its_own_kind() {
        for driver in Driver::ALL {
            let model = InstrumentModel::builtin(driver);
            assert_eq!(model.driver, driver);
            assert_eq!(model.kind, driver.kind());
        }
    }

    #[test]
    fn built_in_parameters_carry_the_unit_their_name_says() {
        let pump = InstrumentModel::builtin(Driver::Ne1000);
        let dispense = &pump.actions[0];
        assert_eq!(dispense.name, "dispense");
        let units: Vec<_> = dispense
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.value, p.unit.as_deref()))
            .collect();
        assert_eq!(
            units,
            [
                ("vessel", ValueType::Vessel, None),
                ("volume_ul", ValueType::Number, Some("uL")),
                ("rate_ul_per_min", ValueType::Number, Some("uL/min")),
            ]
        );
        let gantry = InstrumentModel::builtin(Driver::Grbl);
        let move_to = gantry.actions.iter().find(|a| a.name == "move_to").unwrap();
        assert_eq!(move_to.params[0].value, ValueType::Position);
        assert_eq!(move_to.params[1].unit.as_deref(), Some("mm/min"));
    }

    #[test]
    fn every_step_a_built_in_model_offers_is_a_step_of_the_schema() {
        for model in builtin_models() {
            for step in model.action_names().chain(model.measurement_names()) {
                assert!(
                    param_fields(step).is_some(),
                    "{:?} offers {step}, which the protocol schema does not define",
                    model.driver
                );
            }
        }
    }

    #[test]
    fn the_empty_definition_entry_offers_nothing() {
        let m = InstrumentModel::builtin(Driver::Definition);
        assert_eq!(m.kind, InstrumentKind::Defined);
        assert!(m.actions.is_empty() && m.measurements.is_empty() && m.quantities.is_empty());
    }
}
