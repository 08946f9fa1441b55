//! The `Lab` object and everything under it (see `docs/opcua.md`), shaped after OPC UA LADS (OPC 30500-1)
//! and DI: `Lab/Devices/{id}` with its DI identification, state, and one functional unit whose functions
//! carry the telemetry as analog items with engineering units and ranges; `Lab/Runs/{run_id}`; the `Lab`
//! methods. Every node id is the node's browse path as a string in the lab's namespace
//! (`ns=<urn:labctl:{lab_id}>;s=Lab/Devices/hotplate/State`), so clients can address nodes without browsing.

use labctl_protocols::InstrumentKind;
use labctl_protocols::lab::{Instrument, Lab, Range};
use labctl_protocols::registry::QuantityDescription;
use opcua::server::address_space::{AddressSpace, MethodBuilder, ObjectBuilder, VariableBuilder};
use opcua::types::{
    DataTypeId, EUInformation, LocalizedText, NodeId, ObjectId, ObjectTypeId, QualifiedName,
    VariableTypeId, Variant,
};

use super::devices::{self, DeviceMethod};
use super::methods::LabMethod;
use super::names::{
    DEVICES, ESTOP_LATCHED, LAB, RUNS, TARGET_VALUE, device, device_variable, function,
    identification, method, run, run_variable, sensor_value, target_value,
};
use labctl_core::api::RunInfo;

/// The variables of a run, with their data types.
pub const RUN_VARIABLES: [(&str, DataTypeId); 8] = [
    ("State", DataTypeId::String),
    ("CurrentStep", DataTypeId::String),
    ("SupervisoryJobId", DataTypeId::String),
    ("Name", DataTypeId::String),
    ("SubmittedBy", DataTypeId::String),
    ("Reason", DataTypeId::String),
    ("ResultCount", DataTypeId::UInt64),
    ("LastResult", DataTypeId::String),
];

/// Node ids and names in the lab's namespace.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    pub ns: u16,
}

impl Names {
    pub fn id(&self, path: &str) -> NodeId {
        NodeId::new(self.ns, path)
    }

    fn qn(&self, name: &str) -> QualifiedName {
        QualifiedName::new(self.ns, name)
    }

    fn object(&self, space: &mut AddressSpace, path: &str, name: &str, parent: &NodeId) {
        ObjectBuilder::new(&self.id(path), self.qn(name), name)
            .has_type_definition(ObjectTypeId::BaseObjectType)
            .component_of(parent.clone())
            .insert(space);
    }

    fn folder(&self, space: &mut AddressSpace, path: &str, name: &str, parent: &NodeId) {
        ObjectBuilder::new(&self.id(path), self.qn(name), name)
            .has_type_definition(ObjectTypeId::FolderType)
            .organized_by(parent.clone())
            .insert(space);
    }

    fn variable(
        &self,
        space: &mut AddressSpace,
        path: &str,
        name: &str,
        data_type: DataTypeId,
        value: Variant,
        parent: &NodeId,
    ) {
        VariableBuilder::new(&self.id(path), self.qn(name), name)
            .data_type(data_type)
            .value(value)
            .has_type_definition(VariableTypeId::BaseDataVariableType)
            .component_of(parent.clone())
            .insert(space);
    }

    fn property(
        &self,
        space: &mut AddressSpace,
        path: &str,
        name: &str,
        data_type: impl Into<NodeId>,
        value: Variant,
        parent: &NodeId,
    ) {
        // Properties of standard types (EngineeringUnits, EURange) are namespace-0 names.
        let browse = if matches!(name, "EngineeringUnits" | "EURange") {
            QualifiedName::new(0, name)
        } else {
            self.qn(name)
        };
        VariableBuilder::new(&self.id(path), browse, name)
            .data_type(data_type)
            .value(value)
            .has_type_definition(VariableTypeId::PropertyType)
            .property_of(parent.clone())
            .insert(space);
    }
}

/// The UNECE unit of a quantity's unit, as OPC UA's EngineeringUnits carries it.
pub fn engineering_units(unit: &str) -> EUInformation {
    let (code, display, description) = match unit {
        "mm" => ("MMT", "mm", "millimetre"),
        "uL" => ("4G", "µL", "microlitre"),
        "g" => ("GRM", "g", "gram"),
        "degC" => ("CEL", "°C", "degree Celsius"),
        "rpm" => ("RPM", "r/min", "revolutions per minute"),
        "nm" => ("C45", "nm", "nanometre"),
        other => ("", other, other),
    };
    // UNECE Recommendation 20 codes packed into an Int32, as OPC UA Part 8 prescribes.
    let unit_id = code.bytes().fold(0i32, |id, b| (id << 8) | i32::from(b));
    EUInformation {
        namespace_uri: "http://www.opcfoundation.org/UA/units/un/cefact".into(),
        unit_id: if code.is_empty() { -1 } else { unit_id },
        display_name: LocalizedText::new("", display),
        description: LocalizedText::new("", description),
    }
}

/// The range a reading can take: the instrument's capability for that quantity (the plate temperature
/// shares the temperature's).
pub fn quantity_range(instrument: &Instrument, quantity: &str) -> Option<Range> {
    let own = instrument.capabilities.range(quantity);
    own.or_else(|| {
        quantity
            .strip_prefix("plate_")
            .and_then(|q| instrument.capabilities.range(q))
    })
}

/// Builds `Lab` with its devices and methods under `Objects`. Runs are added as they appear.
pub fn build_lab(space: &mut AddressSpace, names: Names, lab: &Lab) {
    let objects: NodeId = ObjectId::ObjectsFolder.into();
    ObjectBuilder::new(&names.id(LAB), names.qn("Lab"), "Lab")
        .description(match &lab.name {
            Some(name) => format!("{name} ({})", lab.lab_id),
            None => lab.lab_id.clone(),
        })
        .has_type_definition(ObjectTypeId::BaseObjectType)
        .organized_by(objects)
        .insert(space);
    let lab_node = names.id(LAB);
    names.property(
        space,
        "Lab/LabId",
        "LabId",
        DataTypeId::String,
        Variant::from(lab.lab_id.as_str()),
        &lab_node,
    );
    names.variable(
        space,
        ESTOP_LATCHED,
        "EmergencyStopLatched",
        DataTypeId::Boolean,
        Variant::from(false),
        &lab_node,
    );
    names.folder(space, DEVICES, "Devices", &lab_node);
    names.folder(space, RUNS, "Runs", &lab_node);
    for instrument in &lab.instruments {
        build_device(space, names, instrument);
    }
    for m in LabMethod::ALL {
        let id = names.id(&method(m));
        let mut builder = MethodBuilder::new(&id, names.qn(m.name()), m.name())
            .description(m.description())
            .executable(true)
            .user_executable(true)
            .component_of(lab_node.clone());
        let inputs = m.inputs();
        if !inputs.is_empty() {
            builder = builder.input_args(
                space,
                &names.id(&format!("{}/InputArguments", method(m))),
                &inputs,
            );
        }
        let outputs = m.outputs();
        if !outputs.is_empty() {
            builder = builder.output_args(
                space,
                &names.id(&format!("{}/OutputArguments", method(m))),
                &outputs,
            );
        }
        builder.insert(space);
    }
}

fn build_device(space: &mut AddressSpace, names: Names, instrument: &Instrument) {
    let id = instrument.id.as_str();
    let kind = instrument.kind;
    let device_node = names.id(&device(id));
    ObjectBuilder::new(&device_node, names.qn(id), id)
        .description(format!(
            "{} ({:?} driver)",
            kind.as_str(),
            instrument.driver
        ))
        .has_type_definition(ObjectTypeId::BaseObjectType)
        .organized_by(names.id(DEVICES))
        .insert(space);
    let ident = format!("{}/Identification", device(id));
    names.object(space, &ident, "Identification", &device_node);
    let ident_node = names.id(&ident);
    for property in ["Manufacturer", "Model", "SerialNumber", "SoftwareRevision"] {
        names.property(
            space,
            &identification(id, property),
            property,
            DataTypeId::String,
            Variant::from(""),
            &ident_node,
        );
    }
    for (name, initial) in [
        ("ConnectionState", "connecting"),
        ("DeviceState", "unknown"),
    ] {
        names.variable(
            space,
            &device_variable(id, name),
            name,
            DataTypeId::String,
            Variant::from(initial),
            &device_node,
        );
    }
    names.property(
        space,
        &format!("{}/Kind", device(id)),
        "Kind",
        DataTypeId::String,
        Variant::from(kind.as_str()),
        &device_node,
    );
    // One functional unit per device (LADS): the instrument itself, with one function per quantity.
    let units = format!("{}/FunctionalUnitSet", device(id));
    names.object(space, &units, "FunctionalUnitSet", &device_node);
    let unit = format!("{units}/{id}");
    names.object(space, &unit, id, &names.id(&units));
    let functions = format!("{unit}/FunctionSet");
    names.object(space, &functions, "FunctionSet", &names.id(&unit));
    for q in &instrument.model().quantities {
        build_sensor(space, names, instrument, kind, q, &names.id(&functions));
    }
    for (quantity, _) in devices::setpoints(instrument) {
        if let Some(q) = instrument.model().quantity(quantity) {
            build_setpoint(space, names, instrument, q);
        }
    }
    // The instrument's actions and measurements, for technicians (see `devices`); a defined instrument's
    // actions by their definition's names.
    for m in DeviceMethod::of_model(instrument.model()) {
        let path = devices::method_path(id, m);
        let inputs = m.input_arguments();
        build_method(
            space,
            names,
            &device_node,
            &path,
            m.name(),
            &m.description(),
            &inputs,
        );
    }
    for action in instrument.defined().iter().flat_map(|d| &d.actions) {
        let path = format!("{}/{}", device(id), action.name);
        let description = format!("{} (from the instrument's definition)", action.name);
        let inputs = devices::defined_input_arguments(action);
        build_method(
            space,
            names,
            &device_node,
            &path,
            &action.name,
            &description,
            &inputs,
        );
    }
}

/// A device method node at `path`, executable by technicians, with its input arguments and the one-step
/// run's outputs.
fn build_method(
    space: &mut AddressSpace,
    names: Names,
    device_node: &NodeId,
    path: &str,
    name: &str,
    description: &str,
    inputs: &[opcua::types::Argument],
) {
    let mut builder = MethodBuilder::new(&names.id(path), names.qn(name), name)
        .description(description)
        .executable(true)
        .user_executable(true)
        .component_of(device_node.clone());
    if !inputs.is_empty() {
        builder = builder.input_args(space, &names.id(&format!("{path}/InputArguments")), inputs);
    }
    builder = builder.output_args(
        space,
        &names.id(&format!("{path}/OutputArguments")),
        &DeviceMethod::output_arguments(),
    );
    builder.insert(space);
}

/// A setpoint: `TargetValue` beside the function's `SensorValue` (a LADS controller function's target),
/// writable by technicians; a write runs the action that sets it (see `devices`).
fn build_setpoint(
    space: &mut AddressSpace,
    names: Names,
    instrument: &Instrument,
    q: &QuantityDescription,
) {
    let id = instrument.id.as_str();
    let path = target_value(id, &q.name);
    let node = names.id(&path);
    VariableBuilder::new(&node, names.qn(TARGET_VALUE), TARGET_VALUE)
        .description(format!(
            "{} setpoint ({}): the last one the instrument took (NaN: none); technicians write it",
            q.description, q.unit
        ))
        .data_type(DataTypeId::Double)
        .value(Variant::from(f64::NAN))
        .writable()
        .has_type_definition(VariableTypeId::AnalogItemType)
        .component_of(names.id(&function(id, &q.name)))
        .insert(space);
    names.property(
        space,
        &format!("{path}/EngineeringUnits"),
        "EngineeringUnits",
        DataTypeId::EUInformation,
        Variant::from(engineering_units(&q.unit)),
        &node,
    );
    for (name, range) in [
        ("EURange", instrument.capabilities.range(&q.name)),
        ("EnvelopeRange", instrument.envelope.range(&q.name)),
    ] {
        if let Some(range) = range {
            names.property(
                space,
                &format!("{path}/{name}"),
                name,
                DataTypeId::Range,
                Variant::from(opcua::types::Range {
                    low: range.min,
                    high: range.max,
                }),
                &node,
            );
        }
    }
}

fn build_sensor(
    space: &mut AddressSpace,
    names: Names,
    instrument: &Instrument,
    kind: InstrumentKind,
    q: &QuantityDescription,
    functions: &NodeId,
) {
    let id = instrument.id.as_str();
    let function_path = function(id, &q.name);
    names.object(space, &function_path, &q.name, functions);
    let value_path = sensor_value(id, &q.name);
    let value_node = names.id(&value_path);
    VariableBuilder::new(&value_node, names.qn("SensorValue"), "SensorValue")
        .description(format!("{} {} ({})", kind.as_str(), q.description, q.unit))
        .data_type(DataTypeId::Double)
        .value(Variant::from(f64::NAN))
        .has_type_definition(VariableTypeId::AnalogItemType)
        .component_of(names.id(&function_path))
        .insert(space);
    names.property(
        space,
        &format!("{value_path}/EngineeringUnits"),
        "EngineeringUnits",
        DataTypeId::EUInformation,
        Variant::from(engineering_units(&q.unit)),
        &value_node,
    );
    if let Some(range) = quantity_range(instrument, &q.name) {
        names.property(
            space,
            &format!("{value_path}/EURange"),
            "EURange",
            DataTypeId::Range,
            Variant::from(opcua::types::Range {
                low: range.min,
                high: range.max,
            }),
            &value_node,
        );
    }
    // The safety envelope: what a protocol may ask of this quantity (a LADS controller function's target
    // range). Readings outside it are possible (a balance shows what is on it), commands are not.
    if let Some(range) = instrument.envelope.range(&q.name) {
        names.property(
            space,
            &format!("{value_path}/EnvelopeRange"),
            "EnvelopeRange",
            DataTypeId::Range,
            Variant::from(opcua::types::Range {
                low: range.min,
                high: range.max,
            }),
            &value_node,
        );
    }
}

/// The values of a run's variables as the controller reports them (`LastResult` comes from the journal).
pub fn run_values(run: &RunInfo) -> Vec<(&'static str, Variant)> {
    vec![
        ("State", Variant::from(run.state.as_str())),
        (
            "CurrentStep",
            Variant::from(run.current_step.clone().unwrap_or_default()),
        ),
        ("SupervisoryJobId", Variant::from(run.proposal_id.as_str())),
        ("Name", Variant::from(run.name.as_str())),
        ("SubmittedBy", Variant::from(run.submitted_by.as_str())),
        (
            "Reason",
            Variant::from(run.reason.clone().unwrap_or_default()),
        ),
        ("ResultCount", Variant::from(run.results)),
    ]
}

/// Adds `Lab/Runs/{run_id}` with its variables holding the run's current values, unless it is there
/// already. Node and values appear together, under one lock. Returns whether it was added.
pub fn add_run(space: &mut AddressSpace, names: Names, run: &RunInfo) -> bool {
    let run_node = names.id(&self::run(&run.run_id));
    if space.node_exists(&run_node) {
        return false;
    }
    ObjectBuilder::new(&run_node, names.qn(&run.run_id), run.run_id.as_str())
        .description(run.name.as_str())
        .has_type_definition(ObjectTypeId::BaseObjectType)
        .organized_by(names.id(RUNS))
        .insert(space);
    let values = run_values(run);
    for (name, data_type) in RUN_VARIABLES {
        let initial = values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| {
                if data_type == DataTypeId::UInt64 {
                    Variant::from(0u64)
                } else {
                    Variant::from("")
                }
            });
        names.variable(
            space,
            &run_variable(&run.run_id, name),
            name,
            data_type,
            initial,
            &run_node,
        );
    }
    true
}

/// Removes `Lab/Runs/{run_id}` and its variables.
pub fn remove_run(space: &mut AddressSpace, names: Names, run_id: &str) {
    for (name, _) in RUN_VARIABLES {
        space.delete(&names.id(&run_variable(run_id, name)), true);
    }
    space.delete(&names.id(&run(run_id)), true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engineering_units_carry_the_unece_code_as_opc_ua_packs_it() {
        // Part 8: "CEL" = 0x43454C.
        assert_eq!(engineering_units("degC").unit_id, 0x43454C);
        assert_eq!(engineering_units("mm").unit_id, 0x4D4D54);
        assert_eq!(engineering_units("furlong").unit_id, -1);
    }

    #[test]
    fn plate_temperature_shares_the_temperature_range() {
        let lab = Lab::sim();
        let hotplate = lab.instrument("hotplate").unwrap();
        let range = quantity_range(hotplate, "plate_temperature_c").unwrap();
        assert_eq!((range.min, range.max), (0.0, 340.0));
        let pump = lab.instrument("pump-red").unwrap();
        assert!(quantity_range(pump, "dispensed_ul").is_none());
    }
}
