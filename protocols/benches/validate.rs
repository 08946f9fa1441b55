//! Validation cost of a large protocol: `cargo bench -p labctl-protocols --bench validate`.

use criterion::{Criterion, criterion_group, criterion_main};
use labctl_protocols::{Lab, validate_bytes};
use serde_json::json;

/// A 10,000-step protocol: the dye-mix moves, dispenses and measurements over and over.
fn big_protocol(steps: usize) -> Vec<u8> {
    let mut list =
        vec![json!({"type": "action", "instrument": "gantry", "action": "home", "params": {}})];
    let mut i = 0;
    while list.len() < steps {
        let pos = format!("{}{}", ["A", "B", "C", "D"][i % 4], 1 + (i / 4) % 6);
        list.push(json!({"type": "action", "instrument": "gantry", "action": "move_to", "params": {"position": pos}}));
        list.push(json!({"type": "action", "instrument": "pump-red", "action": "dispense",
            "params": {"vessel": format!("v{}", i % 24), "volume_ul": 1.0, "rate_ul_per_min": 500}}));
        list.push(
            json!({"type": "measure", "instrument": "spectro", "action": "absorbance",
            "params": {"wavelength_nm": 520}, "result": format!("a{i}")}),
        );
        list.push(json!({"type": "wait", "duration_s": 1}));
        i += 1;
    }
    list.truncate(steps);
    let labware: Vec<_> = (0..24)
        .map(|k| json!({"id": format!("v{k}"), "kind": "vial", "location": format!("{}{}", ["A", "B", "C", "D"][k % 4], 1 + (k / 4) % 6), "capacity_ul": 20000}))
        .collect();
    serde_json::to_vec(&json!({
        "version": 1,
        "metadata": {"name": "bench", "proposal_id": "bench-1", "planner": {"id": "bench"}},
        "labware": labware,
        "steps": list,
    }))
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let lab = Lab::sim();
    let doc = big_protocol(10_000);
    let report = validate_bytes(&doc, &lab);
    assert!(
        report.valid,
        "{:?}",
        &report.findings[..report.findings.len().min(3)]
    );
    let mut group = c.benchmark_group("validate");
    group.sample_size(20);
    group.bench_function("10k_steps", |b| {
        b.iter(|| validate_bytes(std::hint::black_box(&doc), &lab))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
