//! Modbus instruments in a lab file: each unit's id (the lab's `address`, over the definition's
//! `unit_id`: a definition describes a model, the bench sets each unit's address), and the checks that let
//! several Modbus RTU instruments share one RS-485 line (multi-drop): 1-247 each, and distinct on a line.

use crate::instrument_def::ModbusTransport;
use crate::lab::{Instrument, Transport};

/// The Modbus transport of an instrument defined as a Modbus instrument; `None` for any other.
pub fn modbus_transport(inst: &Instrument) -> Option<ModbusTransport> {
    inst.defined()
        .and_then(|d| d.modbus.as_ref())
        .map(|m| m.transport)
}

/// The unit id the driver addresses: the lab's `address` when it gives one, else the definition's
/// `unit_id`; `None` for an instrument that is not a Modbus one.
pub fn unit_id(inst: &Instrument) -> Option<u8> {
    let settings = inst.defined()?.modbus.as_ref()?;
    Some(inst.address.unwrap_or(settings.unit_id))
}

/// The lab file's problems with its Modbus instruments, each naming the field.
pub(crate) fn problems(instruments: &[Instrument]) -> Vec<String> {
    let mut p = Vec::new();
    let at = |i: usize, inst: &Instrument| format!("instruments[{i}] ({})", inst.id);
    for (i, inst) in instruments.iter().enumerate() {
        if modbus_transport(inst).is_none() {
            continue;
        }
        if let Some(a) = inst.address
            && !(1..=247).contains(&a)
        {
            p.push(format!(
                "{}.address: {a} is outside 1-247 (the Modbus unit id of this instrument)",
                at(i, inst)
            ));
        }
    }
    // RTU units sharing a serial port: one protocol on the line and a unit id each (every slave hears
    // every request; two with the same id would both answer and garble each other).
    for (i, a) in instruments.iter().enumerate() {
        let Transport::Serial(la) = &a.transport else {
            continue;
        };
        for (j, b) in instruments.iter().enumerate().skip(i + 1) {
            let Transport::Serial(lb) = &b.transport else {
                continue;
            };
            if la.port != lb.port {
                continue;
            }
            let (ma, mb) = (modbus_transport(a), modbus_transport(b));
            match (ma, mb) {
                (None, None) => {}
                (Some(ModbusTransport::Rtu), Some(ModbusTransport::Rtu)) => {
                    if let (Some(ua), Some(ub)) = (unit_id(a), unit_id(b))
                        && ua == ub
                    {
                        p.push(format!(
                            "{} and {} share {} with the same Modbus unit id {ua}: give each its own `address` (1-247)",
                            at(i, a),
                            at(j, b),
                            la.port
                        ));
                    }
                }
                _ => p.push(format!(
                    "{} and {} share {}: a serial line carries one protocol, and only Modbus RTU instruments share a Modbus line",
                    at(i, a),
                    at(j, b),
                    la.port
                )),
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use crate::Lab;
    use crate::lab::SIM_LAB_TOML;

    /// The simulated lab plus Bronkhorst controllers, each `(id, address, port)`.
    fn lab(mfcs: &[(&str, Option<u8>, &str)]) -> Result<Lab, String> {
        let mut text = SIM_LAB_TOML.to_owned();
        for (id, address, port) in mfcs {
            let address = address.map_or(String::new(), |a| format!("address = {a}\n"));
            text.push_str(&format!(
                r#"
[[instruments]]
id = "{id}"
kind = "defined"
driver = "definition"
definition = "instruments/bronkhorst-el-flow-modbus.toml"
transport = {{ type = "serial", port = "{port}", baud = 19200, parity = "even" }}
{address}envelope = {{ flow_ln_per_min = [0, 5] }}
"#
            ));
        }
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Lab::from_toml_str_in(&text, "test lab", &workspace).map_err(|e| e.to_string())
    }

    #[test]
    fn modbus_units_on_one_line_load_with_their_own_addresses() {
        let lab = lab(&[
            ("mfc-a", Some(1), "/dev/ttyUSB0"),
            ("mfc-b", Some(2), "/dev/ttyUSB0"),
            // Another line may reuse an id; without an address the definition's unit_id (1) is used.
            ("mfc-c", None, "/dev/ttyUSB1"),
        ])
        .unwrap();
        let ids: Vec<Option<u8>> = ["mfc-a", "mfc-b", "mfc-c"]
            .iter()
            .map(|id| super::unit_id(lab.instrument(id).unwrap()))
            .collect();
        assert_eq!(ids, [Some(1), Some(2), Some(1)]);
        assert_eq!(super::unit_id(lab.instrument("balance").unwrap()), None);
    }

    #[test]
    fn two_units_with_one_id_on_a_line_are_refused_naming_both() {
        let err = lab(&[
            ("mfc-a", Some(3), "/dev/ttyUSB0"),
            ("mfc-b", Some(3), "/dev/ttyUSB0"),
        ])
        .unwrap_err();
        assert!(
            err.contains("(mfc-a) and instruments[")
                && err.contains("(mfc-b) share /dev/ttyUSB0 with the same Modbus unit id 3"),
            "{err}"
        );
        // The definition's unit_id for one, the same number as the lab's address for the other.
        let err = lab(&[
            ("mfc-a", None, "/dev/ttyUSB0"),
            ("mfc-b", Some(1), "/dev/ttyUSB0"),
        ])
        .unwrap_err();
        assert!(err.contains("same Modbus unit id 1"), "{err}");
    }

    #[test]
    fn a_unit_id_outside_1_to_247_is_refused_naming_the_address() {
        for bad in [0u8, 248, 255] {
            let err = lab(&[("mfc-a", Some(bad), "/dev/ttyUSB0")]).unwrap_err();
            assert!(
                err.contains(&format!("(mfc-a).address: {bad} is outside 1-247")),
                "{bad}: {err}"
            );
        }
        // 100-247 are Modbus ids (the NE-1000 limit of 99 is not theirs).
        lab(&[("mfc-a", Some(200), "/dev/ttyUSB0")]).unwrap();
    }

    #[test]
    fn units_with_different_line_settings_on_one_port_are_refused() {
        let mut text = SIM_LAB_TOML.to_owned();
        for (id, baud, address) in [("mfc-a", 19200, 1), ("mfc-b", 9600, 2)] {
            text.push_str(&format!(
                r#"
[[instruments]]
id = "{id}"
kind = "defined"
driver = "definition"
definition = "instruments/bronkhorst-el-flow-modbus.toml"
transport = {{ type = "serial", port = "/dev/ttyUSB0", baud = {baud}, parity = "even" }}
address = {address}
envelope = {{ flow_ln_per_min = [0, 5] }}
"#
            ));
        }
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let err = Lab::from_toml_str_in(&text, "test lab", &workspace)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mfc-a and mfc-b share /dev/ttyUSB0 with different line settings"),
            "{err}"
        );
    }
}
