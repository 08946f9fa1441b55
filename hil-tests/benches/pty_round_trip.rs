//! Transaction round trip over a real pty against the wire simulator, wire timing ON at warp 1 (real time):
//! GRBL `?` status at 115200 baud and MT-SICS `SI` at 9600 baud, through labctl's port task (the layer every
//! driver transaction goes through). Prints p50/p99 of the round trip, the range of the wire-time limit
//! (request + reply bytes x 10 bits / baud: GRBL's status report is longer when it carries the work offset or
//! the overrides) and p50/p99 of each transaction's round trip over its own limit; the goal is within 1.2x.
//!
//! A defined instrument too: the LAUDA LOOP circulator of `instruments/lauda-loop.toml` (9600 8N1, no
//! inter-command delay), its `IN_PV_00` read through the definition-driven driver's `execute(Read)` (pattern
//! match and scaling included) against the simulator built from the same definition.
//!
//! `cargo bench -p labctl-hil-tests --bench pty_round_trip` (figures in BENCHMARKS.md).

use std::time::{Duration, Instant};

use labctl_drivers::port::{PortHandle, Transaction, Verdict, frame_line};
use labctl_drivers::{DeviceCommand, Instrument, Outcome, port_config};
use labctl_hil_tests::rig::{Rig, RigConfig};
use labctl_protocols::lab::Driver;

const TRANSACTIONS: usize = 500;
const WARM_UP: usize = 20;

struct Case {
    what: &'static str,
    id: &'static str,
    driver: Driver,
    baud: u32,
    request: &'static [u8],
    answer_starts: &'static [u8],
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let k = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn run(rig: &Rig, case: &Case) {
    let port = PortHandle::new(rig.endpoint(case.id), port_config(case.driver));
    port.acquire().await.expect("open the pty");
    let mut times = Vec::with_capacity(TRANSACTIONS);
    let mut wire = Vec::with_capacity(TRANSACTIONS);
    let mut ratios = Vec::with_capacity(TRANSACTIONS);
    for i in 0..WARM_UP + TRANSACTIONS {
        let starts = case.answer_starts;
        let t = Transaction::new(case.request.to_vec(), frame_line, move |f: &[u8]| {
            if f.starts_with(starts) {
                Verdict::Last
            } else {
                Verdict::Unrelated
            }
        })
        .timeout(Duration::from_secs(2));
        let t0 = Instant::now();
        let frames = port.transact(t).await.expect("transaction");
        let rt = t0.elapsed();
        if i >= WARM_UP {
            let bytes = case.request.len() + frames.iter().map(Vec::len).sum::<usize>();
            let limit = Duration::from_secs_f64(bytes as f64 * 10.0 / f64::from(case.baud));
            times.push(rt);
            wire.push(limit);
            ratios.push(rt.as_secs_f64() / limit.as_secs_f64());
        }
    }
    port.release().await;
    times.sort();
    wire.sort();
    ratios.sort_by(f64::total_cmp);
    let ratio = |p: f64| ratios[((ratios.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{:<34} p50 {:>8.0} us  p99 {:>8.0} us  wire limit {:>6.0}-{:<6.0} us  ratio p50 {:.2}x  p99 {:.2}x",
        case.what,
        micros(percentile(&times, 0.5)),
        micros(percentile(&times, 0.99)),
        micros(wire[0]),
        micros(wire[wire.len() - 1]),
        ratio(0.5),
        ratio(0.99),
    );
}

/// The lab of the rig: the simulated lab plus a LAUDA LOOP from its definition.
fn lab() -> labctl_protocols::Lab {
    let text = format!(
        "{}\n[[instruments]]\nid = \"bath\"\nkind = \"defined\"\ndriver = \"definition\"\n\
         definition = \"instruments/lauda-loop.toml\"\ntransport = {{ type = \"simulated\" }}\n\
         envelope = {{ temperature_c = [5, 60] }}\n",
        labctl_protocols::lab::SIM_LAB_TOML
    );
    labctl_protocols::Lab::from_toml_str_in(
        &text,
        "bench lab",
        &labctl_hil_tests::system::workspace(),
    )
    .expect("the bench lab loads")
}

/// The defined circulator's reading through its driver, against the wire time of `IN_PV_00` CR LF and the
/// reply (10 bits a character at 9600 baud).
async fn run_defined(rig: &mut Rig) {
    let mut bath = rig.driver("bath");
    bath.start().await.expect("start the circulator");
    let read = DeviceCommand::Read {
        quantity: "temperature_c".into(),
    };
    let mut times = Vec::with_capacity(TRANSACTIONS);
    let mut ratios = Vec::with_capacity(TRANSACTIONS);
    let mut limit = Duration::ZERO;
    for i in 0..WARM_UP + TRANSACTIONS {
        let t0 = Instant::now();
        let outcome = bath.execute(&read).await.expect("read");
        let rt = t0.elapsed();
        let Outcome::Reading { value, .. } = outcome else {
            panic!("{outcome:?}");
        };
        let bytes = b"IN_PV_00\r\n".len() + format!("{value:.1}\r\n").len();
        limit = Duration::from_secs_f64(bytes as f64 * 10.0 / 9600.0);
        if i >= WARM_UP {
            times.push(rt);
            ratios.push(rt.as_secs_f64() / limit.as_secs_f64());
        }
    }
    bath.stop().await;
    times.sort();
    ratios.sort_by(f64::total_cmp);
    let ratio = |p: f64| ratios[((ratios.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{:<34} p50 {:>8.0} us  p99 {:>8.0} us  wire limit {:>6.0} us         ratio p50 {:.2}x  p99 {:.2}x",
        "defined LAUDA `IN_PV_00`, 9600 8N1",
        micros(percentile(&times, 0.5)),
        micros(percentile(&times, 0.99)),
        micros(limit),
        ratio(0.5),
        ratio(0.99),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too, so keep it quick there.
    let quick = std::env::args().all(|a| a != "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let cases = [
            Case {
                what: "GRBL `?` status, 115200 8N1",
                id: "gantry",
                driver: Driver::Grbl,
                baud: 115_200,
                request: b"?",
                answer_starts: b"<",
            },
            Case {
                what: "MT-SICS `SI`, 9600 8N1",
                id: "balance",
                driver: Driver::MtSics,
                baud: 9600,
                request: b"SI\r\n",
                answer_starts: b"S ",
            },
        ];
        if quick {
            println!("pty round trip: run with `cargo bench` for figures");
            return;
        }
        // Wire timing on: what a driver sees on a real line. Off: the floor, labctl's port task, the pty and
        // the simulator's own turnaround, with the ratio against the same wire-time limit.
        for wire_timing in [true, false] {
            let mut rig = Rig::start(RigConfig {
                warp: 1.0,
                wire_timing,
                lab: Some(lab()),
                ..RigConfig::default()
            })
            .await;
            println!(
                "pty round trip, {TRANSACTIONS} transactions each after {WARM_UP} warm-up, warp 1, simulator wire timing {}",
                if wire_timing { "ON" } else { "OFF" }
            );
            for case in &cases {
                run(&rig, case).await;
            }
            run_defined(&mut rig).await;
            rig.shutdown().await;
        }
    });
}
