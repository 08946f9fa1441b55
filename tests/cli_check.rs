//! `labctl check` and `labctl schema` as a user runs them: real process, real files, exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn labctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_labctl"))
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn valid_examples_exit_zero() {
    let out = labctl()
        .arg("check")
        .arg(repo("protocols/examples/dye-mix.json"))
        .arg(repo("protocols/examples/titration-series.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("dye-mix.json: valid"), "{stdout}");
}

#[test]
fn an_invalid_protocol_exits_one_and_names_the_path() {
    let out = labctl()
        .arg("check")
        .arg(repo("protocols/tests/invalid/volume-in-ml.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("/steps/2/params/volume_ml") && stdout.contains("volume_ul"),
        "{stdout}"
    );
}

#[test]
fn json_output_has_every_finding_of_every_file() {
    let out = labctl()
        .args(["check", "--json"])
        .arg(repo(
            "protocols/tests/invalid/two-findings-both-reported.json",
        ))
        .arg(repo("protocols/examples/dye-mix.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let files = v.as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["valid"], false);
    let paths: Vec<&str> = files[0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"/steps/2/params/volume_ul")
            && paths.contains(&"/steps/6/params/speed_rpm"),
        "{paths:?}"
    );
    assert_eq!(files[1]["valid"], true);
}

#[test]
fn a_missing_file_or_bad_usage_exits_two() {
    let out = labctl()
        .args(["check", "/definitely/not/here.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /definitely/not/here.json"));
    let out = labctl().args(["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = labctl()
        .args(["check", "--lab", "/no/lab.toml"])
        .arg(repo("protocols/examples/dye-mix.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_100_mb_file_is_refused_quickly_without_reading_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.json");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(100 * 1024 * 1024).unwrap();
    let out = labctl()
        .args(["check", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["findings"][0]["code"], "too_large");
}

#[test]
fn check_against_a_custom_lab_file() {
    let dir = tempfile::tempdir().unwrap();
    let lab = std::fs::read_to_string(repo("examples/sim-lab.toml"))
        .unwrap()
        .replace(
            "envelope = { temperature_c = [15, 120]",
            "envelope = { temperature_c = [15, 40]",
        );
    let lab_path = dir.path().join("cold-lab.toml");
    std::fs::write(&lab_path, lab).unwrap();
    let out = labctl()
        .args(["check", "--lab"])
        .arg(&lab_path)
        .arg(repo("protocols/examples/heat-and-hold.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("outside_envelope") && stdout.contains("temperature_c within [15, 40]"),
        "{stdout}"
    );
}

#[test]
fn schema_command_prints_the_committed_schema() {
    let out = labctl().arg("schema").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let committed = std::fs::read(repo("protocols/schema/protocol.schema.json")).unwrap();
    assert_eq!(out.stdout, committed);
}

#[test]
fn check_instrument_passes_a_shipped_definition_and_names_the_field_of_a_broken_one() {
    let out = labctl()
        .arg("check-instrument")
        .arg(repo("instruments/ika-rct-digital.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("ika-rct-digital.toml: valid"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    let text = std::fs::read_to_string(repo("instruments/ika-rct-digital.toml"))
        .unwrap()
        .replacen(r#"safe_state = ["STOP_1", "STOP_4"]"#, "safe_state = []", 1);
    std::fs::write(&broken, text).unwrap();
    let out = labctl()
        .args(["check-instrument", "--json"])
        .arg(&broken)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports[0]["valid"], false);
    assert_eq!(reports[0]["findings"][0]["path"], "/safe_state", "{stdout}");

    let out = labctl()
        .arg("check-instrument")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The real bench's lab file loads (serial devices by their by-id names, the LAUDA circulator from its
/// definition beside the built-in drivers, production users), and a protocol for the defined circulator is
/// validated against the definition and this lab's envelope with no Rust of labctl knowing the instrument.
#[test]
fn the_bench_lab_file_loads_and_validates_its_defined_instrument() {
    let dir = tempfile::tempdir().unwrap();
    let protocol = |temperature_c: f64| {
        serde_json::json!({
            "version": 1,
            "metadata": { "name": "warm the bath", "proposal_id": "bench-1",
                          "planner": { "id": "planner-bo", "model": "manual" } },
            "labware": [],
            "steps": [
                { "type": "action", "instrument": "circulator", "action": "set_temperature",
                  "params": { "temperature_c": temperature_c } },
                { "type": "measure", "instrument": "circulator", "action": "read",
                  "params": { "quantity": "temperature_c" }, "result": "bath" },
                { "type": "wait_until", "condition": { "instrument": "circulator",
                  "quantity": "temperature_c", "op": "within", "value": temperature_c, "tolerance": 0.5 },
                  "timeout_s": 1800 }
            ]
        })
        .to_string()
    };
    let warm = dir.path().join("warm.json");
    std::fs::write(&warm, protocol(35.0)).unwrap();
    let out = labctl()
        .args(["check", "--lab"])
        .arg(repo("examples/bench-lab.toml"))
        .arg(&warm)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let hot = dir.path().join("hot.json");
    std::fs::write(&hot, protocol(70.0)).unwrap();
    let out = labctl()
        .args(["check", "--lab"])
        .arg(repo("examples/bench-lab.toml"))
        .arg(&hot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("outside_envelope") && stdout.contains("/steps/0/params/temperature_c"),
        "{stdout}"
    );
}
