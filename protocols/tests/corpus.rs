//! The shipped examples must be valid, and every protocol of the invalid corpus must produce the finding
//! recorded for it in `tests/invalid/expected.json`.

use std::collections::BTreeMap;
use std::path::Path;

use labctl_protocols::{Lab, validate_bytes};

fn dir(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn every_example_is_valid_against_the_sim_lab() {
    let lab = Lab::sim();
    let mut n = 0;
    for entry in std::fs::read_dir(dir("examples")).unwrap() {
        let path = entry.unwrap().path();
        let report = validate_bytes(&std::fs::read(&path).unwrap(), &lab);
        assert!(report.valid, "{}: {:#?}", path.display(), report.findings);
        assert!(
            report.findings.is_empty(),
            "{}: warnings {:#?}",
            path.display(),
            report.findings
        );
        assert!(report.protocol.is_some());
        n += 1;
    }
    assert!(n >= 4, "expected at least 4 examples, found {n}");
}

#[test]
fn examples_exercise_every_construct() {
    let mut all = String::new();
    for entry in std::fs::read_dir(dir("examples")).unwrap() {
        all.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    for needle in [
        "\"action\"",
        "\"measure\"",
        "\"wait\"",
        "\"wait_until\"",
        "\"parallel\"",
        "\"repeat\"",
        "\"pause\"",
        "\"skip\"",
        "\"within\"",
        "\"transfer\"",
        "\"supervised\"",
    ] {
        assert!(all.contains(needle), "no example uses {needle}");
    }
}

#[test]
fn invalid_corpus_gives_the_recorded_findings() {
    let lab = Lab::sim();
    let expected: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(&std::fs::read_to_string(dir("tests/invalid/expected.json")).unwrap())
            .unwrap();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir("tests/invalid")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name != "expected.json" {
            files.push(name);
        }
    }
    files.sort();
    let listed: Vec<_> = expected.keys().cloned().collect();
    assert_eq!(
        files, listed,
        "every corpus file needs an entry in expected.json and vice versa"
    );
    for (file, wanted) in &expected {
        let bytes = std::fs::read(dir("tests/invalid").join(file)).unwrap();
        let report = validate_bytes(&bytes, &lab);
        assert!(!report.valid, "{file} should be invalid");
        assert!(
            report.protocol.is_none(),
            "{file}: an invalid protocol must not be handed out"
        );
        let got: Vec<(String, String)> = report
            .findings
            .iter()
            .map(|f| {
                (
                    serde_json::to_value(f.code)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    f.path.clone(),
                )
            })
            .collect();
        for w in wanted {
            assert!(
                got.contains(w),
                "{file}: expected finding {w:?}, got {got:?}"
            );
        }
        for f in &report.findings {
            assert!(!f.message.is_empty(), "{file}: finding without a message");
        }
    }
}

/// The head goes down only where it already is: a vertical `move_xyz` below `safe_z_mm` after a move at
/// travel height is valid; the same point reached sideways, or from an unknown position, is refused.
#[test]
fn move_xyz_below_safe_z_must_be_vertical() {
    let lab = Lab::sim();
    let a1 = lab.deck.position("A1").unwrap();
    let doc = |steps: serde_json::Value| {
        serde_json::to_vec(&serde_json::json!({
            "version": 1,
            "metadata": { "name": "down", "proposal_id": "down-1", "planner": { "id": "p" } },
            "steps": steps
        }))
        .unwrap()
    };
    let down = serde_json::json!({ "type": "action", "instrument": "gantry", "action": "move_xyz",
        "params": { "x_mm": a1.x_mm, "y_mm": a1.y_mm, "z_mm": 10 } });
    let up = serde_json::json!({ "type": "action", "instrument": "gantry", "action": "move_xyz",
        "params": { "x_mm": a1.x_mm, "y_mm": a1.y_mm, "z_mm": 60 } });
    let home = serde_json::json!({ "type": "action", "instrument": "gantry", "action": "home", "params": {} });
    let to_a1 = serde_json::json!({ "type": "action", "instrument": "gantry", "action": "move_to",
        "params": { "position": "A1" } });
    let to_b2 = serde_json::json!({ "type": "action", "instrument": "gantry", "action": "move_to",
        "params": { "position": "B2" } });
    let sequence = |bytes: &[u8]| {
        validate_bytes(bytes, &lab)
            .findings
            .into_iter()
            .filter(|f| f.code == labctl_protocols::FindingCode::Sequence)
            .map(|f| f.path)
            .collect::<Vec<_>>()
    };
    // Down and up again at A1, then across at travel height: valid.
    let ok = doc(serde_json::json!([home, to_a1, down, up, to_b2]));
    assert_eq!(sequence(&ok), Vec::<String>::new());
    // Down with no known position: refused.
    assert_eq!(
        sequence(&doc(serde_json::json!([home, down]))),
        ["/steps/1/params"]
    );
    // Down at A1, then sideways to B2 while low: refused.
    let b2 = lab.deck.position("B2").unwrap();
    let sideways = serde_json::json!({ "type": "action", "instrument": "gantry", "action": "move_xyz",
        "params": { "x_mm": b2.x_mm, "y_mm": b2.y_mm, "z_mm": 60 } });
    assert_eq!(
        sequence(&doc(serde_json::json!([home, to_a1, down, sideways]))),
        ["/steps/3/params"]
    );
}

#[test]
fn a_huge_document_is_refused_without_parsing() {
    let lab = Lab::sim();
    let big = vec![b' '; labctl_protocols::validate::MAX_PROTOCOL_BYTES + 1];
    let report = validate_bytes(&big, &lab);
    assert!(!report.valid);
    assert_eq!(
        report.findings[0].code,
        labctl_protocols::FindingCode::TooLarge
    );
}

#[test]
fn invalid_utf8_names_the_byte() {
    let report = validate_bytes(b"{\"version\": 1,\n \"x\": \"\xff\"}", &Lab::sim());
    assert!(!report.valid);
    let f = &report.findings[0];
    assert_eq!((f.line, f.column), (Some(2), Some(8)), "{f}");
}

#[test]
fn approval_reasons_follow_the_lab_policy() {
    let lab = Lab::sim();
    let text = std::fs::read_to_string(dir("examples/dye-mix.json")).unwrap();
    assert!(
        validate_bytes(text.as_bytes(), &lab)
            .approval_required_because
            .is_empty()
    );
    // 80 C is inside the envelope (120 C) but above the auto-approve limit (60 C).
    let hot = text.replace(
        "{ \"type\": \"wait\", \"id\": \"mix\", \"duration_s\": 30 }",
        "{ \"type\": \"action\", \"instrument\": \"hotplate\", \"action\": \"set_temperature\", \"params\": { \"temperature_c\": 80 } }",
    );
    assert_ne!(hot, text);
    let report = validate_bytes(hot.as_bytes(), &lab);
    assert!(report.valid, "{:?}", report.findings);
    assert_eq!(
        report.approval_required_because.len(),
        1,
        "{:?}",
        report.approval_required_because
    );
    assert!(report.approval_required_because[0].contains("auto-approve limit 60"));
}

#[test]
fn a_refused_document_still_names_its_proposal_so_the_refusal_can_be_addressed() {
    let lab = labctl_protocols::Lab::sim();
    let invalid = br#"{"version": 1, "metadata": {"name": "x", "proposal_id": "p-42",
        "planner": {"id": "planner-bo"}}, "steps": [{"type": "teleport"}]}"#;
    let report = labctl_protocols::validate_bytes(invalid, &lab);
    assert!(!report.valid && report.protocol.is_none());
    assert_eq!(report.proposal_id.as_deref(), Some("p-42"));
    let unreadable = labctl_protocols::validate_bytes(b"{\"metadata\": ", &lab);
    assert_eq!(unreadable.proposal_id, None);
}
