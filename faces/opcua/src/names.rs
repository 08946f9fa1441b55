//! Node naming: every node id in the lab's namespace is the node's browse path as a string
//! (`Lab/Devices/hotplate/State`), built and recognised here and nowhere else.

use super::methods::LabMethod;

pub const LAB: &str = "Lab";
pub const DEVICES: &str = "Lab/Devices";
pub const RUNS: &str = "Lab/Runs";
pub const ESTOP_LATCHED: &str = "Lab/EmergencyStopLatched";

pub fn device(id: &str) -> String {
    format!("{DEVICES}/{id}")
}

/// A DI identification property of a device: `Manufacturer`, `Model`, `SerialNumber`, `SoftwareRevision`.
pub fn identification(id: &str, property: &str) -> String {
    format!("{DEVICES}/{id}/Identification/{property}")
}

/// `ConnectionState` (`connecting`, `online`, `lost: why`) or `DeviceState` (`idle`, `busy`,
/// `alarm: ...`, `locked: ...`, `unknown`).
pub fn device_variable(id: &str, name: &str) -> String {
    format!("{DEVICES}/{id}/{name}")
}

/// The LADS function of one telemetry quantity.
pub fn function(id: &str, quantity: &str) -> String {
    format!("{DEVICES}/{id}/FunctionalUnitSet/{id}/FunctionSet/{quantity}")
}

/// The live reading of one quantity (an AnalogItem).
pub fn sensor_value(id: &str, quantity: &str) -> String {
    format!("{}/SensorValue", function(id, quantity))
}

pub fn run(run_id: &str) -> String {
    format!("{RUNS}/{run_id}")
}

pub fn run_variable(run_id: &str, name: &str) -> String {
    format!("{RUNS}/{run_id}/{name}")
}

pub fn method(m: LabMethod) -> String {
    format!("{LAB}/{}", m.name())
}

pub const TARGET_VALUE: &str = "TargetValue";

/// The node id string of a setpoint: the `TargetValue` beside the function's `SensorValue`.
pub fn target_value(instrument: &str, quantity: &str) -> String {
    format!("{}/{TARGET_VALUE}", function(instrument, quantity))
}

/// Whether a method node path is a device method's: only technicians call those.
pub fn is_device_method(path: &str) -> bool {
    path.starts_with(DEVICES)
}

/// Whether a variable node path is a setpoint's: only technicians write those.
pub fn is_setpoint(path: &str) -> bool {
    path.starts_with(DEVICES) && path.ends_with(&format!("/{TARGET_VALUE}"))
}
