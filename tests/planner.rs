//! The closed loop end to end: the real `labctl run --sim` binary with its embedded broker, and the
//! reference planner of `examples/planner` (in process, over MQTT only) matching a target spectrum.

mod common;

#[allow(dead_code)]
#[path = "../examples/planner/planner_core.rs"]
mod planner_core;

use std::time::{Duration, Instant};

#[test]
fn the_reference_planner_matches_the_target_spectrum_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    // Warp 200: step timeouts keep a real-time floor for the wire (docs/mqtt.md, "Planners").
    let (labctl, port) = common::start_labctl_sim(dir.path(), "200", 0);
    // 0.02 AU within 30 experiments, about 1.8 s each at warp 200 on 2 cores. Seed 1 needs 22 experiments
    // both on the noise-free model and live (40 s); over 20 seeds offline the mean is 30 and the worst 59 (the
    // test below), so another seed may need a larger budget than this test can afford.
    let threshold = 0.02;
    let budget = 30;
    let cfg = planner_core::PlannerConfig {
        host: "127.0.0.1".into(),
        port,
        user: "planner-bo".into(),
        password: "planner-dev".into(),
        lab_id: "sim".into(),
        target: planner_core::target_absorbance([300.0, 150.0, 450.0]),
        budget,
        max_ul: planner_core::MAX_UL,
        threshold,
        seed: 1,
        per_experiment: Duration::from_secs(30),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let outcome = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(120), planner_core::run(cfg)).await
        })
        .expect("the planner finished within 120 s")
        .expect("the planner ran");
    drop(labctl);
    println!(
        "{} experiments, rmse {:.4} AU, {:.1} s",
        outcome.experiments,
        outcome.best_rmse,
        started.elapsed().as_secs_f64()
    );
    assert!(
        outcome.converged && outcome.best_rmse < threshold,
        "no convergence: best rmse {:.4} AU after {} experiments",
        outcome.best_rmse,
        outcome.experiments
    );
    assert!(outcome.experiments <= budget);
}

/// The optimiser alone on the noise-free model, 20 seeds: every one under 0.02 AU within 100
/// experiments (measured: mean 30, worst 59).
#[test]
fn the_optimiser_reaches_two_hundredths_of_an_au_offline() {
    let target = planner_core::target_absorbance([300.0, 150.0, 450.0]);
    let mut worst = 0;
    let mut total = 0;
    for seed in 1..=20 {
        let mut es = planner_core::OnePlusOne::new(1500.0, seed);
        let mut n = 0;
        let mut best = f64::INFINITY;
        while n < 100 && best >= 0.02 {
            let x = es.ask();
            let f = planner_core::rmse(&planner_core::target_absorbance(x), &target);
            es.tell(f);
            best = best.min(f);
            n += 1;
        }
        println!("seed {seed}: {n} experiments, rmse {best:.4} AU");
        assert!(best < 0.02, "seed {seed}: rmse {best:.4} AU after {n}");
        worst = worst.max(n);
        total += n;
    }
    println!("mean {:.1} worst {worst}", total as f64 / 20.0);
    assert!(total <= 20 * 40, "mean {} experiments", total as f64 / 20.0);
}
