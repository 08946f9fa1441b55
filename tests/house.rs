//! The rules of the house, checked against Cargo's own view of the workspace: which labctl crate may depend
//! on which (docs/controller.md, "Architecture"). A crate that gains a forbidden dependency fails here, not in
//! a review.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Each workspace crate and the labctl crates it may depend on (normal dependencies; tests and benches may
/// use more). A crate missing from this table fails the test: a new room needs its rule.
const ALLOWED: &[(&str, &[&str])] = &[
    ("labctl-clock", &[]),
    ("labctl-codecs", &[]),
    // The protocol language reads instrument definitions, whose line framing is the codecs' (pure both).
    ("labctl-protocols", &["labctl-codecs"]),
    ("labctl-contract", &["labctl-protocols"]),
    ("labctl-transport", &["labctl-protocols"]),
    (
        "labctl-drivers",
        &["labctl-codecs", "labctl-protocols", "labctl-transport"],
    ),
    (
        "labctl-simulators",
        &["labctl-clock", "labctl-codecs", "labctl-protocols"],
    ),
    (
        "labctl-core",
        &[
            "labctl-clock",
            "labctl-contract",
            "labctl-drivers",
            "labctl-protocols",
            "labctl-simulators",
        ],
    ),
    (
        "labctl-command-port",
        &[
            "labctl-codecs",
            "labctl-core",
            "labctl-protocols",
            "labctl-transport",
        ],
    ),
    ("labctl-opcua", &["labctl-core", "labctl-protocols"]),
    ("labctl-http", &["labctl-core"]),
    (
        "labctl-mcp",
        &["labctl-core", "labctl-http", "labctl-protocols"],
    ),
    (
        "labctl-web",
        &["labctl-core", "labctl-http", "labctl-protocols"],
    ),
    ("labctl-mqtt-link", &[]),
    (
        "labctl-mqtt",
        &["labctl-core", "labctl-mqtt-link", "labctl-protocols"],
    ),
    (
        "labctl-clients",
        &["labctl-contract", "labctl-mqtt-link", "labctl-protocols"],
    ),
    (
        "labctl",
        &[
            "labctl-clients",
            "labctl-command-port",
            "labctl-mcp",
            "labctl-web",
            "labctl-mqtt",
            "labctl-mqtt-link",
            "labctl-opcua",
            "labctl-clock",
            "labctl-codecs",
            "labctl-contract",
            "labctl-core",
            "labctl-drivers",
            "labctl-protocols",
            "labctl-simulators",
            "labctl-transport",
        ],
    ),
    (
        "labctl-hil-tests",
        &[
            "labctl-codecs",
            "labctl-drivers",
            "labctl-protocols",
            "labctl-simulators",
        ],
    ),
];

/// Crates that must stay pure: no async runtime, no ports.
const PURE: &[&str] = &["labctl-clock", "labctl-codecs", "labctl-contract"];

/// Workspace crates and their normal (non-dev, non-build) dependencies, from `cargo metadata`.
fn workspace_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|package| {
            let dependencies = package["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_owned())
                .collect();
            (package["name"].as_str().unwrap().to_owned(), dependencies)
        })
        .collect()
}

#[test]
fn each_crate_depends_only_on_the_rooms_below_it() {
    let workspace = workspace_dependencies();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut broken = Vec::new();
    for (name, dependencies) in &workspace {
        let Some(rule) = allowed.get(name.as_str()) else {
            broken.push(format!("{name}: no rule in ALLOWED for this crate"));
            continue;
        };
        for dependency in dependencies.iter().filter(|d| d.starts_with("labctl")) {
            if !rule.contains(&dependency.as_str()) {
                broken.push(format!("{name} depends on {dependency}"));
            }
        }
    }
    for name in PURE {
        let dependencies = &workspace[*name];
        for forbidden in ["tokio", "tokio-serial", "serialport"] {
            if dependencies.contains(forbidden) {
                broken.push(format!("{name} must stay pure but depends on {forbidden}"));
            }
        }
    }
    // Every rule names a crate that exists: a renamed crate must not leave its rule checking nothing.
    for name in allowed.keys() {
        if !workspace.contains_key(*name) {
            broken.push(format!(
                "ALLOWED names {name}, which is not in the workspace"
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "the house rules are broken:\n{}",
        broken.join("\n")
    );
}
