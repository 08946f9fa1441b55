//! Controller figures for BENCHMARKS.md: `cargo bench --bench controller`.
//!
//! - step overhead: a 10,000-step protocol on zero-latency in-process instruments, journal on (fsync'd
//!   group commits), steps per second;
//! - tick lateness at 100 Hz while 100 instruments stream telemetry (p50/p99/max), beside `cyclictest` at the
//!   same period when it is installed (Debian `rt-tests`): the machine's floor.

#[path = "common/mod.rs"]
mod common;

use labctl::api::Face;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use labctl::api::{Principal, RunState};
use labctl::controller::start;
use labctl::instruments::fake::FakeInstrument;
use labctl::instruments::{self, TaskTiming};
use labctl::safety::EStop;
use labctl_clock::VirtualClock;
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use serde_json::json;

fn step_protocol(steps: usize) -> Vec<u8> {
    // Alternating commands and measurements, as a scan would: every measurement is a journaled result.
    let list: Vec<_> = (0..steps)
        .map(|i| {
            if i % 2 == 0 {
                json!({"type": "action", "instrument": "hotplate", "action": "set_stir_speed", "params": {"speed_rpm": 100 + (i % 500)}})
            } else {
                json!({"type": "measure", "instrument": "hotplate", "action": "read_temperature", "params": {}, "result": format!("t{i}")})
            }
        })
        .collect();
    serde_json::to_vec(&json!({
        "version": 1,
        "metadata": {"name": "overhead", "proposal_id": format!("overhead-{steps}-{}", std::process::id()), "planner": {"id": "bench"}},
        "steps": list
    }))
    .unwrap()
}

/// A controller on zero-latency in-process instruments of `lab` (polled hourly: only commands count).
async fn controller_on_fakes(lab: Lab, dir: &std::path::Path) -> labctl::controller::Controller {
    let estop = EStop::default();
    let mut handles = BTreeMap::new();
    for inst in &lab.instruments {
        let fake = FakeInstrument::new(&inst.id, inst.kind);
        let timing = TaskTiming {
            poll: Duration::from_secs(3600),
            reconnect: Duration::from_millis(20),
        };
        handles.insert(
            inst.id.clone(),
            instruments::spawn(inst.clone(), fake, estop.clone(), timing),
        );
    }
    let config = common::bench_controller_config(lab, dir);
    start(config, handles, estop).await.unwrap()
}

async fn step_overhead() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::sim();
    lab.approval.auto_approve.max_steps = None;
    lab.approval.auto_approve.max_duration_s = None;
    // The controller's own cost per step: setpoints go out at once, not ramped in (virtual) time.
    for inst in &mut lab.instruments {
        inst.envelope.ramp_c_per_min = None;
    }
    let controller = controller_on_fakes(lab, dir.path()).await;
    let api = controller.handle.clone();
    let mut events = api.events();
    let steps = 10_000;
    let doc = step_protocol(steps);
    let started = Instant::now();
    let reply = api
        .submit(doc, Principal::new("bench", Role::Planner, Face::InProcess))
        .await;
    assert!(reply.accepted, "{reply:?}");
    let run_id = reply.run_id.clone().unwrap();
    if reply.state == Some(RunState::AwaitingApproval) {
        println!(
            "step_overhead: approving ({:?})",
            reply.approval_required_because
        );
        api.approve(
            &run_id,
            Principal::new("tech", Role::Technician, Face::InProcess),
        )
        .await
        .unwrap();
    }
    let submitted = started.elapsed();
    let mut durable_results = 0;
    // Count results as the journal publishes them (i.e. once durable), until the run's final state is durable.
    loop {
        match events.recv().await {
            Ok(rec) => match &*rec {
                labctl::journal::Record::Result { run_id: r, .. } if *r == run_id => {
                    durable_results += 1
                }
                labctl::journal::Record::RunState {
                    run_id: r, state, ..
                } if *r == run_id && *state == RunState::Completed => break,
                labctl::journal::Record::RunState {
                    run_id: r, state, ..
                } if *r == run_id && *state == RunState::Failed => {
                    panic!("run failed: {:?}", api.run(&run_id).await)
                }
                _ => {}
            },
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(api.run(&run_id).await.unwrap().state, RunState::Completed);
    println!(
        "step_overhead: submit (validation + dry run on the model) took {:.3} s",
        submitted.as_secs_f64()
    );
    common::figure(
        "controller.submit_10k_ms",
        format!("{:.0}", submitted.as_secs_f64() * 1e3),
        "ms",
    );
    let elapsed = elapsed - submitted;
    let per_step = elapsed / steps as u32;
    println!(
        "step_overhead: {steps} steps in {:.3} s = {:.0} steps/s, {:.1} us/step; {durable_results} results durable (fsync'd group commits)",
        elapsed.as_secs_f64(),
        steps as f64 / elapsed.as_secs_f64(),
        per_step.as_secs_f64() * 1e6
    );
    common::figure(
        "controller.steps_10k_s",
        format!("{:.3}", elapsed.as_secs_f64()),
        "s",
    );
    common::figure(
        "controller.steps_per_s",
        format!("{:.0}", steps as f64 / elapsed.as_secs_f64()),
        "/s",
    );
    common::figure(
        "controller.us_per_step",
        format!("{:.1}", per_step.as_secs_f64() * 1e6),
        "us",
    );
    controller.shutdown().await;
}

async fn tick_lateness(seconds: u64) -> u64 {
    tick_lateness_under(seconds, None).await
}

/// Resident memory of this process now and at its peak, in MB (VmRSS, VmHWM).
fn resident_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The tick of [`tick_lateness`] with the embedded MQTT broker up, while `clients` concurrent clients keep
/// sending CONNECTs with random user names and passwords (each argon2 check costs 19 MiB and tens of
/// milliseconds); beside the same without them.
async fn login_storm(seconds: u64, clients: usize) {
    let (idle_rss, _) = resident_mb();
    let idle = tick_lateness_under(seconds, Some(0)).await;
    let (after_idle_rss, _) = resident_mb();
    let storm = tick_lateness_under(seconds, Some(clients)).await;
    let (rss, hwm) = resident_mb();
    println!(
        "login_storm: tick p99 {idle} us without logins, {storm} us with {clients} clients logging in; \
         resident {idle_rss:.1} MB before, {after_idle_rss:.1} MB after the quiet run, {rss:.1} MB after the storm (peak {hwm:.1} MB)"
    );
    common::figure("controller.login_storm_tick_p99_idle_us", idle, "us");
    common::figure("controller.login_storm_tick_p99_us", storm, "us");
    common::figure("controller.login_storm_rss_mb", format!("{rss:.1}"), "MB");
    common::figure(
        "controller.login_storm_peak_rss_mb",
        format!("{hwm:.1}"),
        "MB",
    );
}

/// An MQTT 3.1.1 CONNECT with a user name and password (clean session, keep-alive 10 s), by hand: the
/// storm's clients must cost this process nothing but a socket, so the resident memory measured is the
/// controller's.
fn connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let field = |out: &mut Vec<u8>, text: &str| {
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    };
    let mut body = Vec::new();
    field(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0b1100_0010, 0, 10]);
    field(&mut body, client_id);
    field(&mut body, user);
    field(&mut body, password);
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// CONNECTs with random names from one client until `until`; returns (attempts, outcomes by CONNACK code).
async fn storm_client(
    addr: std::net::SocketAddr,
    n: usize,
    until: Instant,
) -> (u64, BTreeMap<String, u64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut attempts = 0u64;
    let mut outcomes = BTreeMap::new();
    while Instant::now() < until {
        attempts += 1;
        let packet = connect_packet(
            &format!("storm-{n}-{attempts}"),
            &format!("nobody-{n}-{attempts}"),
            "guess",
        );
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(&packet).await?;
            let mut ack = [0u8; 4];
            s.read_exact(&mut ack).await?;
            Ok::<_, std::io::Error>(ack[3])
        })
        .await;
        let key = match outcome {
            Ok(Ok(0)) => "accepted".to_owned(),
            Ok(Ok(code)) => format!("refused {code:#04x}"),
            Ok(Err(e)) => format!("error: {}", e.kind()),
            Err(_) => "no answer in 10 s".into(),
        };
        *outcomes.entry(key).or_insert(0) += 1;
    }
    (attempts, outcomes)
}

async fn tick_lateness_under(seconds: u64, storm: Option<usize>) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::sim();
    let template = lab
        .instruments
        .iter()
        .find(|i| i.id == "hotplate")
        .unwrap()
        .clone();
    lab.interlocks.clear();
    lab.instruments.clear();
    let estop = EStop::default();
    let mut handles = BTreeMap::new();
    for n in 0..100 {
        let mut inst = template.clone();
        inst.id = format!("hotplate-{n:03}");
        lab.instruments.push(inst.clone());
        let fake = FakeInstrument::new(&inst.id, inst.kind);
        fake.log.lock().unwrap().values = vec![("temperature_c", 20.0 + n as f64)];
        // Each instrument publishes a reading every 10 ms: 10,000 readings/s into the world model.
        let timing = TaskTiming {
            poll: Duration::from_millis(10),
            reconnect: Duration::from_millis(20),
        };
        handles.insert(
            inst.id.clone(),
            instruments::spawn(inst, fake, estop.clone(), timing),
        );
    }
    let users = std::sync::Arc::new(labctl::auth::Users::from_lab(&lab).unwrap());
    let config = common::bench_controller_config(lab.clone(), dir.path());
    let controller = start(config, handles, estop).await.unwrap();
    let gateway = match storm {
        None => None,
        Some(_) => Some(
            labctl::gateways::mqtt::MqttGateway::start(
                controller.handle.clone(),
                labctl::gateways::mqtt::MqttConfig {
                    lab,
                    data_dir: dir.path().to_owned(),
                    broker: labctl::gateways::mqtt::BrokerChoice::Embedded(
                        "127.0.0.1:0".parse().unwrap(),
                    ),
                    users,
                    tls_listen: None,
                },
            )
            .await
            .unwrap(),
        ),
    };
    let until = Instant::now() + Duration::from_secs(seconds);
    match (storm, &gateway) {
        (Some(clients), Some(gw)) if clients > 0 => {
            let addr: std::net::SocketAddr = gw.broker_addr.parse().unwrap();
            let mut set = tokio::task::JoinSet::new();
            for n in 0..clients {
                set.spawn(storm_client(addr, n, until));
            }
            let (mut attempts, mut outcomes) = (0u64, BTreeMap::<String, u64>::new());
            while let Some(r) = set.join_next().await {
                let (a, o) = r.unwrap();
                attempts += a;
                for (k, v) in o {
                    *outcomes.entry(k).or_insert(0) += v;
                }
            }
            println!(
                "login_storm: {clients} clients, {attempts} CONNECTs in {seconds} s: {outcomes:?}"
            );
        }
        _ => tokio::time::sleep_until(until.into()).await,
    }
    if let Some(gw) = gateway {
        gw.shutdown().await;
    }
    let stats = controller.shutdown().await.unwrap();
    let s = stats.summary();
    println!(
        "tick_lateness (100 Hz, 100 instruments streaming at 100 Hz, {seconds} s): ticks {} skipped {} p50 {} us p99 {} us max {} us",
        s.ticks, s.skipped, s.p50_us, s.p99_us, s.max_us
    );
    common::figure("controller.tick_p50_us", s.p50_us, "us");
    common::figure("controller.tick_p99_us", s.p99_us, "us");
    common::figure("controller.tick_max_us", s.max_us, "us");
    common::figure("controller.tick_skipped", s.skipped, "");
    s.p99_us
}

fn cyclictest(seconds: u64, tick_p99_us: u64) {
    match common::cyclictest_run(seconds * 100, None) {
        Ok(c) => {
            println!(
                "cyclictest (10 ms period, {seconds} s, same machine): samples {} p50 {} us p99 {} us max {} us",
                c.samples, c.p50_us, c.p99_us, c.max_us
            );
            common::figure("controller.cyclictest_p50_us", c.p50_us, "us");
            common::figure("controller.cyclictest_p99_us", c.p99_us, "us");
            common::figure("controller.cyclictest_max_us", c.max_us, "us");
            common::figure(
                "controller.tick_p99_over_cyclictest_p99",
                format!("{:.2}", tick_p99_us as f64 / c.p99_us.max(1) as f64),
                "",
            );
        }
        Err(e) => println!("cyclictest: {e} - no floor measured"),
    }
}

/// Emergency stop on the simulated lab over real ptys (wire timing on, warp 1): from the e-stop request to
/// the last instrument's driver confirming its safe-state command, while the gantry moves and the hotplate
/// heats.
async fn estop_latency(rounds: usize) {
    let lab = Lab::sim();
    let options = labctl::lab_runtime::RuntimeOptions {
        seed: 1,
        ..Default::default()
    };
    let clock = VirtualClock::new(1.0).unwrap();
    let estop = EStop::default();
    let runtime = labctl::lab_runtime::connect(&lab, &options, clock, &estop)
        .await
        .unwrap();
    let handles = runtime.instruments.clone();
    // Let every instrument connect.
    for _ in 0..200 {
        if handles
            .values()
            .all(|h| h.view().connection == labctl::instruments::Connection::Online)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut samples = Vec::new();
    for _ in 0..rounds {
        estop.acknowledge();
        let _ = handles["hotplate"]
            .execute(labctl_drivers::DeviceCommand::SetTemperature {
                temperature_c: 60.0,
            })
            .await;
        let t0 = Instant::now();
        estop.trigger();
        let confirmations = handles
            .values()
            .cloned()
            .map(|h| async move { h.safe_state(Duration::from_secs(5)).await });
        let all = futures_join_all(confirmations).await;
        let dt = t0.elapsed();
        assert!(
            all.iter().all(|ok| *ok),
            "an instrument did not confirm its safe state"
        );
        samples.push(dt);
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "estop_latency (7 instruments on 5 lines, wire timing on, {rounds} rounds): p50 {:.1} ms p99 {:.1} ms max {:.1} ms (tick period 10 ms; the slowest line is IKA NAMUR at 9600 7E1: STOP_1 + STOP_4)",
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3
    );
    common::figure(
        "controller.estop_p50_ms",
        format!("{:.1}", p(0.5).as_secs_f64() * 1e3),
        "ms",
    );
    common::figure(
        "controller.estop_p99_ms",
        format!("{:.1}", p(0.99).as_secs_f64() * 1e3),
        "ms",
    );
    drop(handles);
    runtime.shutdown().await;
}

/// Awaits all futures concurrently (no extra dependency for one helper).
async fn futures_join_all<F: std::future::Future<Output = bool> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<bool> {
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap_or(false));
    }
    out
}

/// How cost grows with a long campaign: `runs` one-step runs (a weighing) through one controller on
/// zero-latency in-process instruments, submitted one after another as a planner would (each waits for the
/// previous one to end). At 1,000, 10,000 and 100,000 runs: resident memory, the p99 of submit-to-reply
/// over the last window, and the journal's size on disk.
async fn long_campaign(runs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::sim();
    let controller = controller_on_fakes(lab, dir.path()).await;
    let api = controller.handle.clone();
    let mut events = api.events();
    let who = Principal::new("bench", Role::Planner, Face::InProcess);
    let journal_mb = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0) as f64
            / 1e6
    };
    let marks = [1_000, 10_000, 100_000];
    let mut window: Vec<Duration> = Vec::new();
    let started = Instant::now();
    for n in 1..=runs {
        let doc = serde_json::to_vec(&json!({
            "version": 1,
            "metadata": {"name": "weigh", "proposal_id": format!("long-{n}"), "planner": {"id": "bench"}},
            "steps": [{"type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m"}]
        }))
        .unwrap();
        let t0 = Instant::now();
        let reply = api.submit(doc, who.clone()).await;
        window.push(t0.elapsed());
        assert!(reply.accepted, "{reply:?}");
        let run_id = reply.run_id.unwrap();
        loop {
            match events.recv().await {
                Ok(rec) => {
                    if let labctl::journal::Record::RunState {
                        run_id: r, state, ..
                    } = &*rec
                        && *r == run_id
                        && state.is_terminal()
                    {
                        assert_eq!(*state, RunState::Completed);
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        if marks.contains(&n) || n == runs {
            window.sort();
            let p99 = window[(window.len() * 99 / 100).min(window.len() - 1)];
            let (rss, _) = resident_mb();
            let journal = journal_mb(dir.path());
            println!(
                "long_campaign: {n} runs in {:.0} s: resident {rss:.1} MB, submit-to-reply p99 {:.2} ms over the last {} runs, journal {journal:.1} MB ({:.2} kB per run), {} runs in memory",
                started.elapsed().as_secs_f64(),
                p99.as_secs_f64() * 1000.0,
                window.len(),
                journal * 1000.0 / n as f64,
                api.runs().await.len()
            );
            common::figure(
                &format!("controller.long_campaign_{n}_rss_mb"),
                format!("{rss:.1}"),
                "MB",
            );
            common::figure(
                &format!("controller.long_campaign_{n}_submit_p99_ms"),
                format!("{:.2}", p99.as_secs_f64() * 1000.0),
                "ms",
            );
            common::figure(
                &format!("controller.long_campaign_{n}_journal_mb"),
                format!("{journal:.1}"),
                "MB",
            );
            window.clear();
        }
    }
    controller.shutdown().await.unwrap();
}

fn main() {
    // As labctl's own main does: argon2's 19 MiB blocks must not raise glibc's mmap threshold.
    // SAFETY: mallopt only adjusts allocator tuning; called first thing, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let parts = common::Parts::from_args();
    parts.check(&[
        "step_overhead",
        "estop_latency",
        "tick_lateness",
        "login_storm",
        "long_campaign",
    ]);
    let want = |name: &str| parts.want(name);
    let rt = common::runtime();
    if want("step_overhead") {
        rt.block_on(step_overhead());
    }
    let seconds = std::env::var("LABCTL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    if want("estop_latency") {
        rt.block_on(estop_latency(20));
    }
    if want("tick_lateness") {
        let p99 = rt.block_on(tick_lateness(seconds));
        cyclictest(seconds, p99);
    }
    if want("login_storm") {
        rt.block_on(login_storm(seconds, 1000));
    }
    // Not in the default set: 100,000 runs take minutes.
    if parts.named("long_campaign") {
        let runs = std::env::var("LABCTL_BENCH_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100_000);
        rt.block_on(long_campaign(runs));
    }
}
