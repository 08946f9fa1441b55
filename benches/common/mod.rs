//! Helpers shared by the bench targets (`#[path]`-included; not a bench target of its own).
//!
//! Every figure a bench reports is also printed as one machine-readable line,
//! `FIGURE <name> <value> <unit>`, which `scripts/bench-report` collects into BENCHMARKS.md.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};

/// Prints one machine-readable figure line.
pub fn figure(name: &str, value: impl std::fmt::Display, unit: &str) {
    println!("FIGURE {name} {value} {unit}");
}

/// The parts of a bench binary its command line asks for: `cargo bench --bench NAME -- PART...`. Flags
/// (`cargo bench` passes `--bench`) are not parts; no part asks for every part of the default set.
pub struct Parts(Vec<String>);

impl Parts {
    pub fn from_args() -> Parts {
        Parts(
            std::env::args()
                .skip(1)
                .filter(|a| !a.starts_with("--"))
                .collect(),
        )
    }

    /// Whether the part `name` of the default set runs: no filter, or a filter that is part of its name.
    pub fn want(&self, name: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|f| name.contains(f.as_str()))
    }

    /// Whether the part `name` was asked for by its full name (for parts outside the default set).
    pub fn named(&self, name: &str) -> bool {
        self.0.iter().any(|f| f == name)
    }

    /// Says so when the filter matched none of `names` (a typo would otherwise measure nothing, silently).
    pub fn check(&self, names: &[&str]) {
        if !names.iter().any(|n| self.want(n)) {
            eprintln!(
                "no part matches {:?}; the parts: {}",
                self.0,
                names.join(", ")
            );
            std::process::exit(2);
        }
    }
}

/// The runtime a bench part runs on: two workers, as the machine has two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// cyclictest's view of the machine at one period: wake-up latency quantiles in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Cyclic {
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// The cyclictest command the benches run: one thread, 10 ms period, `loops` wake-ups, histogram to
/// 20 ms, memory locked (Debian `rt-tests`).
pub fn cyclictest_command(loops: u64, priority: Option<u8>) -> Command {
    let mut c = Command::new("cyclictest");
    if let Some(p) = priority {
        c.args(["-p", &p.to_string()]);
    }
    c.args([
        "-q",
        "-i",
        "10000",
        "-l",
        &loops.to_string(),
        "-h",
        "20000",
        "-m",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Starts cyclictest in the background (to run beside a load); `None` when it is not installed.
/// With `priority`, its thread runs under SCHED_FIFO at that priority (as a tick with one does).
pub fn cyclictest_spawn(loops: u64, priority: Option<u8>) -> Option<Child> {
    cyclictest_command(loops, priority).spawn().ok()
}

/// Waits for a background cyclictest and reads its histogram.
pub fn cyclictest_finish(child: Child) -> Result<Cyclic, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    parse_cyclictest(&String::from_utf8_lossy(&out.stdout))
}

/// Runs cyclictest in the foreground for `loops` periods of 10 ms.
pub fn cyclictest_run(loops: u64, priority: Option<u8>) -> Result<Cyclic, String> {
    let child = cyclictest_spawn(loops, priority)
        .ok_or_else(|| "cyclictest not installed (apt-get install rt-tests)".to_owned())?;
    cyclictest_finish(child)
}

/// Quantiles from cyclictest's `-h` histogram ("usec count" lines; summary lines start with '#').
pub fn parse_cyclictest(text: &str) -> Result<Cyclic, String> {
    let mut hist = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(a), Some(b)) = (it.next(), it.next())
            && let (Ok(us), Ok(n)) = (a.parse::<u64>(), b.parse::<u64>())
        {
            hist.push((us, n));
        }
    }
    let total: u64 = hist.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return Err("cyclictest printed no histogram".into());
    }
    let q = |p: f64| {
        let mut seen = 0;
        for (us, n) in &hist {
            seen += n;
            if seen as f64 >= p * total as f64 {
                return *us;
            }
        }
        0
    };
    let max_us = text
        .lines()
        .find(|l| l.starts_with("# Max Latencies"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| hist.iter().rev().find(|(_, n)| *n > 0).map_or(0, |h| h.0));
    Ok(Cyclic {
        samples: total,
        p50_us: q(0.5),
        p99_us: q(0.99),
        max_us,
    })
}

/// CPU time (user + system) of a process or thread from its `/proc/.../stat`, in seconds.
pub fn cpu_seconds(stat_path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux this runs on (no libc call needed for a bench).
fn clock_ticks_per_second() -> f64 {
    std::env::var("LABCTL_CLK_TCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100.0)
}

/// A `Vm*` line of `/proc/<pid>/status`, in kB.
pub fn vm_kb(status_path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(status_path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The scheduling policy of a thread from its `/proc/.../stat` (field 41): "SCHED_FIFO" or "normal".
pub fn thread_policy(stat_path: &str) -> Option<&'static str> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = text.rsplit_once(')')?.1;
    let policy: u32 = rest.split_whitespace().nth(38)?.parse().ok()?;
    Some(match policy {
        1 => "SCHED_FIFO",
        2 => "SCHED_RR",
        _ => "normal",
    })
}

/// The `/proc/self/task/<tid>/stat` of this process's thread named `name`.
pub fn thread_stat_path(name: &str) -> Option<String> {
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = entry.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name) {
            return Some(dir.join("stat").to_string_lossy().into_owned());
        }
    }
    None
}

/// The controller configuration every bench runs with: real time, a 100 Hz tick without spinning, no step
/// timeout floor.
pub fn bench_controller_config(
    lab: labctl_protocols::Lab,
    data_dir: &std::path::Path,
) -> labctl::controller::ControllerConfig {
    labctl::controller::ControllerConfig {
        lab,
        lab_sha256: "bench".into(),
        data_dir: data_dir.to_owned(),
        clock: labctl_clock::VirtualClock::new(1.0).unwrap(),
        step_timeout_floor: std::time::Duration::ZERO,
        tick: labctl::world::TickConfig {
            period: std::time::Duration::from_millis(10),
            spin: std::time::Duration::ZERO,
            realtime_priority: None,
        },
        labware: None,
    }
}
