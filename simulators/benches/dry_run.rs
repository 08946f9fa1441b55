//! The dry run and the validator on a lab of 50 defined instruments: a 10,000-step protocol spread over
//! them (setpoints and reads of LAUDA LOOP circulators described by `instruments/lauda-loop.toml`, so every
//! step goes through a definition: its action's parameters, ranges and duration model). Prints the time to
//! load the lab, to validate (`validate_bytes`: parse, decode, semantic checks against the definitions and
//! the envelope) and to dry-run (`dry_run`: the walk over the model, durations from the definitions), best
//! of five runs each.
//!
//! `cargo bench -p labctl-simulators --bench dry_run` (figures in BENCHMARKS.md).

use std::path::Path;
use std::time::{Duration, Instant};

use labctl_protocols::Lab;
use labctl_protocols::lab::SIM_LAB_TOML;

const INSTRUMENTS: usize = 50;
const STEPS: usize = 10_000;
const RUNS: usize = 5;

fn lab() -> Lab {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text = SIM_LAB_TOML.to_owned();
    for k in 0..INSTRUMENTS {
        text.push_str(&format!(
            "\n[[instruments]]\nid = \"bath-{k}\"\nkind = \"defined\"\ndriver = \"definition\"\n\
             definition = \"instruments/lauda-loop.toml\"\ntransport = {{ type = \"simulated\" }}\n\
             envelope = {{ temperature_c = [5, 60] }}\n"
        ));
    }
    Lab::from_toml_str_in(&text, "bench lab", &root).expect("the bench lab loads")
}

fn protocol() -> String {
    let steps: Vec<serde_json::Value> = (0..STEPS)
        .map(|i| {
            let id = format!("bath-{}", i % INSTRUMENTS);
            if i % 2 == 0 {
                serde_json::json!({ "type": "action", "instrument": id, "action": "set_temperature",
                                    "params": { "temperature_c": 20.0 + (i % 30) as f64 } })
            } else {
                serde_json::json!({ "type": "measure", "instrument": id, "action": "read",
                                    "params": { "quantity": "temperature_c" }, "result": format!("t{i}") })
            }
        })
        .collect();
    serde_json::json!({
        "version": 1,
        "metadata": { "name": "10,000 steps on 50 defined instruments", "proposal_id": "bench",
                      "planner": { "id": "bench", "model": "bench" } },
        "labware": [],
        "steps": steps,
    })
    .to_string()
}

fn best(mut f: impl FnMut()) -> Duration {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    // `cargo test --benches` runs this too: keep it quick there.
    if std::env::args().all(|a| a != "--bench") {
        println!("dry run: run with `cargo bench` for figures");
        return;
    }
    let load = best(|| {
        lab();
    });
    let lab = lab();
    let text = protocol();
    let mut report = None;
    let validate = best(|| report = Some(labctl_protocols::validate_bytes(text.as_bytes(), &lab)));
    let report = report.expect("validated");
    assert!(report.valid, "{:?}", report.findings.first());
    let protocol = report.protocol.expect("a valid protocol");
    let mut estimate = 0.0;
    let dry = best(|| {
        let r = labctl_simulators::dry_run::dry_run(&protocol, &lab, 1);
        estimate = r.estimated_duration_s;
    });
    println!(
        "{STEPS} steps on {INSTRUMENTS} defined instruments ({} bytes): lab load {:.1} ms, validate {:.1} ms, dry run {:.1} ms (estimated duration {:.0} s); best of {RUNS}",
        text.len(),
        load.as_secs_f64() * 1e3,
        validate.as_secs_f64() * 1e3,
        dry.as_secs_f64() * 1e3,
        estimate
    );
}
