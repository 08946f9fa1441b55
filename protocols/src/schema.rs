//! The protocol JSON Schema, generated from the Rust types so the two cannot drift.

use crate::protocol::Protocol;

/// The committed copy, checked against the generated one by a test.
pub const COMMITTED_SCHEMA: &str = include_str!("../schema/protocol.schema.json");

/// The JSON Schema of a protocol document.
pub fn protocol_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Protocol)).unwrap_or_default();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("$id".into(), "urn:labctl:schema:protocol:1".into());
        obj.insert(
            "description".into(),
            "A labctl lab protocol (version 1): plain values only, units in field names.".into(),
        );
    }
    schema
}

/// The schema as pretty JSON with a trailing newline, as committed under `protocols/schema/`.
pub fn protocol_schema_pretty() -> String {
    let mut s = serde_json::to_string_pretty(&protocol_schema()).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regenerate with `labctl schema > protocols/schema/protocol.schema.json`.
    #[test]
    fn committed_schema_matches_the_types() {
        assert!(
            COMMITTED_SCHEMA == protocol_schema_pretty(),
            "protocols/schema/protocol.schema.json is stale: run `cargo run -q -- schema > protocols/schema/protocol.schema.json`"
        );
    }

    #[test]
    fn param_tables_match_the_schema() {
        let schema = protocol_schema();
        let defs = schema["$defs"].as_object().expect("schema has $defs");
        let mut seen = 0;
        // Action steps flatten `ActionCall`: the built-in actions, or a defined instrument's.
        for def in ["Action", "MeasureStep"] {
            for variant in defs[def]["oneOf"].as_array().expect("tagged enum is oneOf") {
                let name = variant["properties"]["action"]["const"]
                    .as_str()
                    .expect("action const");
                let params = &variant["properties"]["params"];
                let props = if let Some(r) = params["$ref"].as_str() {
                    defs[r.trim_start_matches("#/$defs/")]["properties"].clone()
                } else {
                    params["properties"].clone()
                };
                let mut from_schema: Vec<String> = props
                    .as_object()
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default();
                let mut from_table: Vec<String> = crate::capabilities::param_fields(name)
                    .unwrap_or_else(|| panic!("no param table for {name}"))
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                from_schema.sort();
                from_table.sort();
                assert_eq!(from_schema, from_table, "params of {name}");
                seen += 1;
            }
        }
        assert_eq!(seen, 17);
    }
}
