//! Instrument definitions: the shipped ones are valid, the committed schema is the types', and every kind of
//! broken definition is refused with a finding that names its field.

use labctl_protocols::instrument_def::{
    COMMITTED_SCHEMA, check_definition, instrument_schema_pretty,
};

fn shipped() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../instruments");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no definitions in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_shipped_definition_is_valid() {
    for (file, text) in shipped() {
        let (definition, findings) = check_definition(&text);
        assert!(definition.is_some(), "{file}: {findings:#?}");
        assert!(findings.is_empty(), "{file}: {findings:#?}");
    }
}

/// Regenerate with `cargo run -q -- schema --instrument > protocols/schema/instrument.schema.json`.
#[test]
fn the_committed_schema_is_the_types() {
    assert!(
        COMMITTED_SCHEMA == instrument_schema_pretty(),
        "protocols/schema/instrument.schema.json is stale: run `cargo run -q -- schema --instrument > protocols/schema/instrument.schema.json`"
    );
}

/// The IKA definition with one edit: `from` replaced by `to`.
fn edited(from: &str, to: &str) -> String {
    let (_, text) = shipped()
        .into_iter()
        .find(|(f, _)| f.ends_with("ika-rct-digital.toml"))
        .unwrap();
    assert!(text.contains(from), "the IKA definition has no {from:?}");
    text.replacen(from, to, 1)
}

#[test]
fn broken_definitions_are_refused_naming_the_field() {
    let cases = [
        // A pattern that cannot compile, and one without the capture its reading needs.
        (
            edited(
                r"'^(?P<value>-?\d+(\.\d+)?) 1$'",
                r"'^(?P<value>-?\d+(\.\d+)? 1$'",
            ),
            "/readings/0/reply",
            "not a regular expression",
        ),
        (
            edited(r"'^(?P<value>-?\d+(\.\d+)?) 2$'", r"'^(-?\d+(\.\d+)?) 2$'"),
            "/readings/1/reply",
            "no named capture `value`",
        ),
        // A range without a unit, and an empty range.
        (
            edited(
                r#"unit = "rpm", min = 0.0, max = 1500.0"#,
                r#"unit = "", min = 0.0, max = 1500.0"#,
            ),
            "/actions/2/params/0/unit",
            "needs its unit",
        ),
        (
            edited("min = 0.0, max = 310.0", "min = 310.0, max = 0.0"),
            "/actions/0/params/0/min",
            "min <= max",
        ),
        // A template naming a parameter that does not exist.
        (
            edited("OUT_SP_4 {speed_rpm}", "OUT_SP_4 {speed}"),
            "/actions/2/commands/0",
            "{speed} is not a parameter",
        ),
        // A placeholder that is never closed.
        (
            edited("OUT_SP_1 {temperature_c}", "OUT_SP_1 {temperature_c"),
            "/actions/0/commands/0",
            "expected {parameter}",
        ),
        // No safe state.
        (
            edited(r#"safe_state = ["STOP_1", "STOP_4"]"#, "safe_state = []"),
            "/safe_state",
            "no safe state",
        ),
        // Completion on a reading that does not exist.
        (
            edited(
                r#"reading = "temperature_c", param"#,
                r#"reading = "vessel_c", param"#,
            ),
            "/actions/0/completion/reading/reading",
            "no reading named vessel_c",
        ),
        // An identity field neither read nor fixed.
        (
            edited(r#"serial = "not reported" "#, ""),
            "/identity",
            "serial: neither captured",
        ),
        // Both a line and Modbus.
        (
            edited(
                "[identity]",
                "[modbus]\ntransport = \"tcp\"\nunit_id = 1\nreply_timeout_ms = 500\n\n[identity]",
            ),
            "",
            "exactly one of [line]",
        ),
        // A field the format does not have (a typo) is not silently ignored.
        (
            edited("poll_ms = 1000", "poll_ms = 1000\npoll_every_ms = 5"),
            "",
            "unknown field `poll_every_ms`",
        ),
    ];
    for (text, path, says) in cases {
        let (definition, findings) = check_definition(&text);
        assert!(definition.is_none(), "{path}: accepted");
        assert!(
            findings
                .iter()
                .any(|f| f.is_error() && f.path == path && f.message.contains(says)),
            "expected an error at {path:?} saying {says:?}, got {findings:#?}"
        );
    }
}

#[test]
fn a_toml_mistake_gives_its_line_and_column() {
    let (_, findings) = check_definition("version = 1\n[model\nname = \"x\"\n");
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0].line, Some(2), "{findings:#?}");
    assert!(findings[0].column.is_some());
}

fn ika() -> labctl_protocols::instrument_def::InstrumentDefinition {
    let (_, text) = shipped()
        .into_iter()
        .find(|(f, _)| f.ends_with("ika-rct-digital.toml"))
        .unwrap();
    check_definition(&text)
        .0
        .expect("the IKA definition is valid")
}

/// The replies and commands below are the manual's, as quoted in codecs/src/namur.rs's tests.
#[test]
fn the_ika_definition_reads_and_writes_the_manuals_bytes() {
    use labctl_protocols::instrument_def::DefinitionError;
    let def = ika();
    let reading = |name: &str| def.readings.iter().find(|r| r.name == name).unwrap();
    assert_eq!(reading("temperature_c").value_from("25.3 1"), Ok(25.3));
    assert_eq!(
        reading("plate_temperature_c").value_from("101.5 2"),
        Ok(101.5)
    );
    assert_eq!(
        reading("plate_temperature_c").value_from("-10.5 2"),
        Ok(-10.5)
    );
    assert_eq!(reading("stir_speed_rpm").value_from("500.0 4"), Ok(500.0));
    // A reply for another channel (an earlier command's, late) is not this reading's.
    assert!(matches!(
        reading("temperature_c").value_from("101.5 2"),
        Err(DefinitionError::NoMatch { .. })
    ));
    let action = |name: &str| def.actions.iter().find(|a| a.name == name).unwrap();
    let values = |pairs: &[(&str, f64)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        action("set_temperature").render(&values(&[("temperature_c", 100.5)])),
        Ok(vec!["OUT_SP_1 100.5".to_owned(), "START_1".to_owned()])
    );
    assert_eq!(
        action("set_stir_speed").render(&values(&[("speed_rpm", 500.0)])),
        Ok(vec!["OUT_SP_4 500".to_owned(), "START_4".to_owned()])
    );
    assert_eq!(
        action("heater_off").render(&values(&[])),
        Ok(vec!["STOP_1".to_owned()])
    );
    // Outside what the instrument can do, or missing: nothing is written.
    assert!(matches!(
        action("set_temperature").render(&values(&[("temperature_c", 350.0)])),
        Err(DefinitionError::OutOfRange { .. })
    ));
    assert!(matches!(
        action("set_temperature").render(&values(&[("temperature_c", f64::NAN)])),
        Err(DefinitionError::OutOfRange { .. })
    ));
    assert!(matches!(
        action("set_temperature").render(&values(&[])),
        Err(DefinitionError::MissingParam { .. })
    ));
}

/// A lab with the IKA definition's stirrer beside the simulated lab's instruments.
fn lab_with_stirrer(envelope: &str) -> labctl_protocols::Lab {
    let text = format!(
        "{}\n[[instruments]]\nid = \"stirrer\"\nkind = \"defined\"\ndriver = \"definition\"\n\
         definition = \"instruments/ika-rct-digital.toml\"\ntransport = {{ type = \"simulated\" }}\n\
         envelope = {envelope}\n",
        labctl_protocols::lab::SIM_LAB_TOML
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    labctl_protocols::Lab::from_toml_str_in(&text, "test lab", &root)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn steps(steps: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "version": 1,
        "metadata": { "name": "t", "proposal_id": "t", "planner": { "id": "p" } },
        "steps": steps,
    }))
    .unwrap()
}

/// The validator's estimate takes each defined action's duration model, a `per_unit` one counting the
/// change a setpoint asks for: the IKA definition's 6 s per degree from the simulated start (22 degC) to
/// 40, nothing for 40 again, 10 degrees down to 30.
#[test]
fn a_defined_setpoint_s_duration_counts_the_change_it_asks_for() {
    let lab = lab_with_stirrer("{ temperature_c = [15, 80], speed_rpm = [0, 1000] }");
    let set = |t: f64| {
        serde_json::json!({ "type": "action", "instrument": "stirrer", "action": "set_temperature",
                            "params": { "temperature_c": t } })
    };
    let report = labctl_protocols::validate_bytes(
        &steps(serde_json::json!([set(40.0), set(40.0), set(30.0)])),
        &lab,
    );
    assert!(report.valid, "{:?}", report.findings);
    let estimate = report.estimated_duration_s.unwrap();
    assert!(
        (estimate - (18.0 + 0.0 + 10.0) * 6.0).abs() < 1e-9,
        "{estimate}"
    );
}

/// Every way a protocol can get a defined instrument wrong is refused with the field's path: an action the
/// definition lacks, a parameter it does not take or leaves out, a value beyond the definition's range or
/// the lab's envelope, a reading it does not have.
#[test]
fn a_defined_instrument_s_mistakes_are_refused_by_path() {
    let lab = lab_with_stirrer("{ temperature_c = [15, 80], speed_rpm = [0, 1000] }");
    let cases = [
        (
            serde_json::json!({ "type": "action", "instrument": "stirrer", "action": "dispense", "params": {} }),
            "/steps/0/action",
            "unknown_action",
        ),
        (
            serde_json::json!({ "type": "action", "instrument": "stirrer", "action": "set_temperature",
                             "params": { "temperature_c": 40.0, "ramp": 1.0 } }),
            "/steps/0/params/ramp",
            "",
        ),
        (
            serde_json::json!({ "type": "action", "instrument": "stirrer", "action": "set_temperature", "params": {} }),
            "/steps/0/params/temperature_c",
            "",
        ),
        (
            serde_json::json!({ "type": "action", "instrument": "stirrer", "action": "set_temperature",
                             "params": { "temperature_c": 400.0 } }),
            "/steps/0/params/temperature_c",
            "out_of_range",
        ),
        (
            serde_json::json!({ "type": "action", "instrument": "stirrer", "action": "set_temperature",
                             "params": { "temperature_c": 90.0 } }),
            "/steps/0/params/temperature_c",
            "outside_envelope",
        ),
        (
            serde_json::json!({ "type": "measure", "instrument": "stirrer", "action": "read",
                             "params": { "quantity": "mass_g" }, "result": "m" }),
            "/steps/0/params/quantity",
            "unknown_quantity",
        ),
    ];
    for (step, path, code) in cases {
        let report = labctl_protocols::validate_bytes(&steps(serde_json::json!([step])), &lab);
        assert!(!report.valid, "{step}");
        let finding = report
            .findings
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("{step}: no finding at {path}: {:?}", report.findings));
        if !code.is_empty() {
            assert_eq!(
                serde_json::to_value(finding.code).unwrap(),
                code,
                "{step}: {finding:?}"
            );
        }
    }
}

/// A lab's envelope for a defined instrument names the definition's parameters, each inside the
/// definition's range: anything else is refused when the lab loads, by name.
#[test]
fn a_defined_instrument_s_envelope_is_held_to_its_definition() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (envelope, problem) in [
        (
            "{ temperature_c = [15, 80] }",
            "envelope.speed_rpm: required",
        ),
        (
            "{ temperature_c = [15, 400], speed_rpm = [0, 1000] }",
            "envelope.temperature_c: [15, 400] reaches outside",
        ),
        (
            "{ temperature_c = [15, 80], speed_rpm = [0, 1000], volume_ul = [0, 1] }",
            "envelope.volume_ul: no action of the definition takes volume_ul",
        ),
    ] {
        let text = format!(
            "{}\n[[instruments]]\nid = \"stirrer\"\nkind = \"defined\"\ndriver = \"definition\"\n\
             definition = \"instruments/ika-rct-digital.toml\"\ntransport = {{ type = \"simulated\" }}\n\
             envelope = {envelope}\n",
            labctl_protocols::lab::SIM_LAB_TOML
        );
        let err = labctl_protocols::Lab::from_toml_str_in(&text, "test lab", &root)
            .unwrap_err()
            .to_string();
        assert!(err.contains(problem), "{envelope}: {err}");
    }
    // A definition file that does not exist, or does not check, is named.
    let text = format!(
        "{}\n[[instruments]]\nid = \"x\"\nkind = \"defined\"\ndriver = \"definition\"\n\
         definition = \"instruments/nope.toml\"\ntransport = {{ type = \"simulated\" }}\nenvelope = {{}}\n",
        labctl_protocols::lab::SIM_LAB_TOML
    );
    let err = labctl_protocols::Lab::from_toml_str_in(&text, "test lab", &root)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("instruments[7] (x).definition: cannot read"),
        "{err}"
    );
}

/// A defined instrument's temperature setpoint (a parameter in degC) counts toward the lab's auto-approval
/// limit like a built-in hotplate's: 75 degC on the stirrer waits for a technician under a 60 degC limit.
#[test]
fn a_defined_temperature_setpoint_above_the_auto_approval_limit_needs_a_technician() {
    let lab = lab_with_stirrer("{ temperature_c = [15, 80], speed_rpm = [0, 1000] }");
    let set = |t: f64| {
        serde_json::json!([{ "type": "action", "instrument": "stirrer", "action": "set_temperature",
                             "params": { "temperature_c": t } }])
    };
    let hot = labctl_protocols::validate_bytes(&steps(set(75.0)), &lab);
    assert!(hot.valid, "{:?}", hot.findings);
    assert!(
        hot.approval_required_because
            .iter()
            .any(|r| r.contains("temperature 75 C exceeds the auto-approve limit 60 C")),
        "{:?}",
        hot.approval_required_because
    );
    let warm = labctl_protocols::validate_bytes(&steps(set(45.0)), &lab);
    assert!(
        warm.approval_required_because.is_empty(),
        "{:?}",
        warm.approval_required_because
    );
}

/// Built-in and defined instruments are described by one registry: the capabilities document gives every
/// instrument a `model` of the same shape, the hotplate's from its driver's entry and the stirrer's from
/// its definition, and what a protocol may ask of each (`actions`, `measurements`, `quantities`) is that
/// model's.
#[test]
fn built_in_and_defined_instruments_are_described_by_one_registry() {
    let lab = lab_with_stirrer("{ temperature_c = [15, 80], speed_rpm = [0, 1000] }");
    let doc = labctl_protocols::capabilities::document(&lab);
    let instruments = doc["instruments"].as_array().unwrap();
    let by_id = |id: &str| instruments.iter().find(|i| i["id"] == id).unwrap().clone();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let (hotplate, stirrer) = (by_id("hotplate"), by_id("stirrer"));
    assert_eq!(keys(&hotplate["model"]), keys(&stirrer["model"]));
    for instrument in instruments {
        let model = &instrument["model"];
        let names = |list: &serde_json::Value| -> Vec<serde_json::Value> {
            list.as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].clone())
                .collect()
        };
        assert_eq!(
            names(&model["actions"]),
            *instrument["actions"].as_array().unwrap()
        );
        assert_eq!(
            names(&model["measurements"]),
            *instrument["measurements"].as_array().unwrap()
        );
        assert_eq!(model["quantities"], instrument["quantities"]);
        assert_eq!(model["driver"], instrument["driver"]);
    }
    // The built-in hotplate's parameter carries the unit its name says; its range is the lab's
    // capabilities. The definition's carries the definition's unit and range.
    let set_temperature = |v: &serde_json::Value| {
        v["model"]["actions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "set_temperature")
            .unwrap()["params"][0]
            .clone()
    };
    assert_eq!(
        set_temperature(&hotplate),
        serde_json::json!({ "name": "temperature_c", "value": "number", "unit": "degC" })
    );
    let stirrer_param = set_temperature(&stirrer);
    assert_eq!(stirrer_param["unit"], "degC");
    assert!(
        stirrer_param["max"].as_f64().unwrap() > 100.0,
        "{stirrer_param}"
    );
    assert_eq!(stirrer["model"]["manufacturer"], "IKA");
    assert_eq!(
        hotplate["model"]["required_envelope"],
        serde_json::json!(["temperature_c", "stir_speed_rpm"])
    );
    // The pump's dispense names its vessel, not a number.
    let pump = by_id("pump-red");
    assert_eq!(pump["model"]["actions"][0]["params"][0]["value"], "vessel");
}

/// The shipped Modbus definition with one edit.
fn modbus_edited(from: &str, to: &str) -> String {
    let (_, text) = shipped()
        .into_iter()
        .find(|(f, _)| f.ends_with("bronkhorst-el-flow-modbus.toml"))
        .unwrap();
    assert!(
        text.contains(from),
        "the Bronkhorst definition has no {from:?}"
    );
    text.replacen(from, to, 1)
}

#[test]
fn string_registers_are_identity_only_and_need_a_count() {
    let flow = r#"register = { table = "holding", address = 41216, data_type = "f32", word_order = "big" }"#;
    let setpoint = r#"register = { table = "holding", address = 41240, data_type = "f32", word_order = "big" }
completion = { reading"#;
    let serial = r#"registers.serial = { table = "holding", address = 61720, data_type = "string", count = 8 }"#;
    let cases = [
        (
            modbus_edited(
                flow,
                r#"register = { table = "holding", address = 41216, data_type = "string", count = 2 }"#,
            ),
            "/readings/0/register/data_type",
            "string register can only be read as identity",
        ),
        (
            modbus_edited(
                setpoint,
                r#"register = { table = "holding", address = 41240, data_type = "string", count = 2 }
completion = { reading"#,
            ),
            "/actions/0/register/data_type",
            "string register can only be read as identity",
        ),
        (
            modbus_edited(
                serial,
                r#"registers.serial = { table = "holding", address = 61720, data_type = "string" }"#,
            ),
            "/identity/registers/serial/count",
            "missing",
        ),
        (
            modbus_edited(
                serial,
                r#"registers.serial = { table = "holding", address = 61720, data_type = "string", count = 126 }"#,
            ),
            "/identity/registers/serial/count",
            "expected 1 to 125",
        ),
        (
            modbus_edited(
                flow,
                r#"register = { table = "holding", address = 41216, data_type = "f32", count = 2 }"#,
            ),
            "/readings/0/register/count",
            "only a string register takes a count",
        ),
        (
            modbus_edited(
                serial,
                r#"registers.serial_no = { table = "holding", address = 61720, data_type = "string", count = 8 }"#,
            ),
            "/identity/registers/serial_no",
            "expected manufacturer, model, serial or firmware",
        ),
        (
            modbus_edited(
                r#"fixed = { manufacturer = "Bronkhorst","#,
                r#"fixed = { manufacturer = "Bronkhorst", serial = "X","#,
            ),
            "/identity/fixed/serial",
            "also read from a register",
        ),
        (
            edited(
                "[identity]\n",
                "[identity]\nregisters.serial = { table = \"holding\", address = 1, data_type = \"string\", count = 4 }\n",
            ),
            "/identity/registers/serial",
            "a line instrument has no registers",
        ),
    ];
    for (text, path, says) in cases {
        let (definition, findings) = check_definition(&text);
        assert!(definition.is_none(), "{path}: accepted");
        assert!(
            findings
                .iter()
                .any(|f| f.path == path && f.message.contains(says)),
            "{path}: expected {says:?} in {findings:#?}"
        );
    }
}

#[test]
fn string_registers_decode_two_characters_per_register_high_byte_first() {
    let (definition, findings) = check_definition(&modbus_edited("", ""));
    let definition = definition.unwrap_or_else(|| panic!("{findings:?}"));
    let serial = &definition.identity.registers["serial"];
    assert_eq!(serial.words(), 8);
    // "M1234567A" padded with NULs to 16 bytes, as the manual describes.
    let words = serial.encode_text("M1234567A").unwrap();
    assert_eq!(words.len(), 8);
    assert_eq!(words[0], u16::from_be_bytes([b'M', b'1']));
    assert_eq!(words[4], u16::from_be_bytes([b'A', 0]));
    assert_eq!(serial.decode_text(&words).as_deref(), Some("M1234567A"));
    // Trailing spaces are padding too; a string cut at the register's length.
    let spaced = serial.encode_text("AB  ").unwrap();
    assert_eq!(serial.decode_text(&spaced).as_deref(), Some("AB"));
    let long = serial.encode_text("0123456789abcdefXYZ").unwrap();
    assert_eq!(
        serial.decode_text(&long).as_deref(),
        Some("0123456789abcdef")
    );
    // Too few words, or bytes that are not text, are no string.
    assert_eq!(serial.decode_text(&words[..3]), None);
    let mut binary = words.clone();
    binary[1] = 0x01FF;
    assert_eq!(serial.decode_text(&binary), None);
}
