//! Closed-loop reference planner over MQTT only: a (1+1)-ES on three dye volumes matches a target spectrum.
//!
//! ```text
//! LABCTL_MQTT_USER=planner-bo LABCTL_MQTT_PASSWORD=planner-dev \
//! cargo run --release --example planner -- --mqtt mqtt://127.0.0.1:PORT \
//!     --target-red 300 --target-yellow 150 --target-blue 450 --budget 40
//! ```
//!
//! The hidden volumes only make the target spectrum (`labctl_simulators::model`); the optimiser sees the
//! spectrum alone. Exit 0 when the RMS error falls below `--threshold` (default 0.02 AU) within the budget,
//! 1 when it does not, 2 on usage or connection errors. `--max-ul` (default 150; at most 1500) bounds each volume; the
//! spectrum of a dye-only mix depends on the volume ratios alone, so a smaller bound finds the same mix
//! with less pumping, and the sim lab's 10 mL syringes (no refill) last a budget of 40. `--seed`, `--lab-id` (default `sim`) and `--threshold` as named.

mod planner_core;

use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let mut mqtt = "mqtt://127.0.0.1:1883".to_owned();
    let mut hidden = [300.0, 150.0, 450.0];
    let mut budget = 40usize;
    let mut threshold = 0.02;
    let mut seed = 1u64;
    let mut max_ul = planner_core::MAX_UL;
    let mut lab_id = "sim".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            eprintln!("planner: {flag} needs a value");
            return ExitCode::from(2);
        };
        let num = || value.parse::<f64>().ok();
        let ok = match flag.as_str() {
            "--mqtt" => {
                mqtt = value.clone();
                true
            }
            "--lab-id" => {
                lab_id = value.clone();
                true
            }
            "--target-red" => num().map(|v| hidden[0] = v).is_some(),
            "--target-yellow" => num().map(|v| hidden[1] = v).is_some(),
            "--target-blue" => num().map(|v| hidden[2] = v).is_some(),
            "--max-ul" => num().map(|v| max_ul = v).is_some(),
            "--threshold" => num().map(|v| threshold = v).is_some(),
            "--budget" => value.parse().map(|v| budget = v).is_ok(),
            "--seed" => value.parse().map(|v| seed = v).is_ok(),
            _ => false,
        };
        if !ok {
            eprintln!("planner: bad argument {flag} {value}");
            return ExitCode::from(2);
        }
    }
    let hostport = mqtt.trim_start_matches("mqtt://").trim_end_matches('/');
    let Some((host, port)) = hostport
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
    else {
        eprintln!("planner: --mqtt {mqtt}: expected mqtt://host:port");
        return ExitCode::from(2);
    };
    let cfg = planner_core::PlannerConfig {
        host,
        port,
        user: std::env::var("LABCTL_MQTT_USER").unwrap_or_else(|_| "planner-bo".into()),
        password: std::env::var("LABCTL_MQTT_PASSWORD").unwrap_or_default(),
        lab_id,
        target: planner_core::target_absorbance(hidden),
        budget,
        max_ul,
        threshold,
        seed,
        per_experiment: Duration::from_secs(120),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    match rt.block_on(planner_core::run(cfg)) {
        Ok(o) => {
            println!(
                "{} after {} experiments in {:.1} s: best red {:.0} yellow {:.0} blue {:.0} uL, rmse {:.4} AU (threshold {threshold})",
                if o.converged {
                    "converged"
                } else {
                    "not converged"
                },
                o.experiments,
                started.elapsed().as_secs_f64(),
                o.best_ul[0],
                o.best_ul[1],
                o.best_ul[2],
                o.best_rmse
            );
            if o.converged {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("planner: {e}");
            ExitCode::from(2)
        }
    }
}
