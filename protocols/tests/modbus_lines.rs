//! Modbus instruments in a lab file: the unit id is the lab's `address` (over the definition's
//! `unit_id`), 1-247, and Modbus RTU units sharing one RS-485 line are told apart by it.

use labctl_protocols::Lab;
use labctl_protocols::lab::SIM_LAB_TOML;

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
        .map(|id| lab.instrument(id).unwrap().modbus_unit_id())
        .collect();
    assert_eq!(ids, [Some(1), Some(2), Some(1)]);
    assert_eq!(lab.instrument("balance").unwrap().modbus_unit_id(), None);
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
