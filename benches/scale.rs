//! Scale figures for BENCHMARKS.md: `cargo bench --bench scale`.
//!
//! 1,000 simulated instruments on one controller: the wire-level simulators (`simulators/`: GRBL, NE-1000,
//! MT-SICS, IKA NAMUR and SCPI devices over the physical model) served on TCP by a second process (this
//! bench binary re-run with `LABCTL_SCALE_SIMS` set), and labctl's real drivers (`drivers/`) reaching them
//! over TCP, one instrument task each, polled at the controller's default 100 ms, the world model ticking at
//! 100 Hz. The simulated lab's seven instruments are copied 143 times (gantry, three pumps on one shared
//! NE-1000 line, balance, hotplate, spectrophotometer: five lines per copy) and the first 1,000 instruments
//! are connected. The simulators run in their own process so that the controller's CPU and memory are its
//! own; on this 2-core machine they still take CPU beside it, which real instruments would not.
//!
//! Why TCP and not ptys: one pty pair per line means 715 ptys (the kernel's default `pty.max` is 4096, but
//! every pty also costs a pair of file descriptors and a kernel tty with its line discipline) and a pty's
//! simulated wire would be the same serial framing; TCP reaches the same simulators and drivers with one
//! socket per line and no system limits to raise. The simulators' wire timing (characters x bits / baud)
//! is off: their replies come at once, so each line answers as fast as the simulator can.
//!
//! Printed: tick lateness (p50/p99/max) over the measured window (the tick's statistics restart when it
//! opens, after the start's safe state to every instrument; the whole life, shutdown included, is printed
//! beside it), cyclictest beside the load and then alone (the floor),
//! CPU of the controller process, of its tick thread and of the simulator process over the window, VmHWM,
//! and the telemetry rate through the world model: readings counted in the snapshots the tick publishes
//! (each instrument's `last_seen` changing), against the nominal rate (instruments / poll period).
//!
//! Environment: `LABCTL_BENCH_SECONDS` (window, default 30), `LABCTL_SCALE_INSTRUMENTS` (default 1000),
//! `LABCTL_SCALE_POLL_MS` (default 100), `LABCTL_SCALE_SIM_WORKERS` (simulator process threads, default 1),
//! `LABCTL_SCALE_TICK_PRIORITY` (the tick thread's SCHED_FIFO priority, as `labctl run --tick-priority`;
//! default 80, 0 for normal priority), `LABCTL_SCALE_WEB_CLIENTS` (browser-console sessions open during the
//! window, default 0: each logs in as alice and reads the console's live stream, as a page does; run it
//! with 0 and with 20 to see what they cost the tick). cyclictest runs at the tick's priority, so the floor is like for
//! like; with a priority, the normal-priority floor is printed too.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cpu_seconds, figure, thread_stat_path, vm_kb};
use labctl::controller::start;
use labctl::instruments::{self, Connection, TaskTiming};
use labctl::safety::EStop;
use labctl_clock::{LabClock, VirtualClock};
use labctl_drivers::setup::Ports;
use labctl_drivers::{DriverOptions, Endpoint};
use labctl_protocols::Lab;
use labctl_protocols::lab::Transport;
use labctl_simulators::devices::Device;
use labctl_simulators::devices::grbl::{Grbl, GrblConfig};
use labctl_simulators::devices::mtsics::{MtSics, MtSicsConfig};
use labctl_simulators::devices::namur::{Namur, NamurConfig};
use labctl_simulators::devices::ne1000::{Ne1000, Ne1000Config, PumpWiring};
use labctl_simulators::devices::scpi::{Scpi, ScpiConfig};
use labctl_simulators::model::{LabConfig, LabModel};
use labctl_simulators::serve::{Listen, PortSpec, SharedLab, spawn_port};

/// The simulated lab's lines, in the order the sim process serves them; each serves these lab-file ids.
const LINES: [(&str, &[&str]); 5] = [
    ("gantry", &["gantry"]),
    ("pumps", &["pump-red", "pump-yellow", "pump-blue"]),
    ("balance", &["balance"]),
    ("hotplate", &["hotplate"]),
    ("spectro", &["spectro"]),
];

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The simulator process: serves `copies` copies of the simulated lab on TCP, prints `PORT copy line
/// address` lines and `READY`, and runs until its stdin closes.
fn serve_sims(copies: usize) {
    let workers = env_or("LABCTL_SCALE_SIM_WORKERS", 1usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let clock = LabClock::Virtual(VirtualClock::new(1.0).unwrap());
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        let stdout = std::io::stdout();
        for copy in 0..copies {
            let model = LabModel::new(LabConfig::sim_default(), copy as u64 + 1).unwrap();
            let wiring: Vec<PumpWiring> = (0..model.pump_count())
                .map(|index| PumpWiring {
                    index,
                    address: index as u8 + 1,
                })
                .collect();
            let devices: Vec<Box<dyn Device>> = vec![
                Box::new(Grbl::new(GrblConfig::default(), &model)),
                Box::new(Ne1000::new(Ne1000Config::default(), &wiring)),
                Box::new(MtSics::new(MtSicsConfig::default())),
                Box::new(Namur::new(NamurConfig::default())),
                Box::new(Scpi::new(ScpiConfig::default())),
            ];
            let lab = SharedLab {
                model: Arc::new(Mutex::new(model)),
                clock: clock.clone(),
            };
            for (k, device) in devices.into_iter().enumerate() {
                let spec = PortSpec {
                    name: LINES[k].0.to_owned(),
                    device,
                    listen: Listen::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
                    wire_timing: false,
                    seed: (copy * 8 + k) as u64,
                };
                let port = spawn_port(spec, lab.clone(), shutdown_rx.clone())
                    .await
                    .unwrap();
                let addr = port.status.borrow().tcp.unwrap();
                writeln!(stdout.lock(), "PORT {copy} {k} {addr}").unwrap();
                tasks.push(port.task);
            }
        }
        writeln!(stdout.lock(), "READY").unwrap();
        stdout.lock().flush().unwrap();
        // Until the controller side closes our stdin (or dies).
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
        let _ = shutdown_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// The controller's lab: `n` instruments from copies of the sim lab's, each on its simulator's TCP address,
/// with each copy's interlocks (renamed to the copy's instruments).
fn scaled_lab(n: usize, addresses: &BTreeMap<(usize, usize), String>) -> Lab {
    let sim = Lab::sim();
    let mut lab = sim.clone();
    lab.lab_id = "scale".into();
    lab.instruments.clear();
    lab.interlocks.clear();
    let copies = n.div_ceil(sim.instruments.len());
    'copies: for copy in 0..copies {
        let rename = |id: &str| format!("c{copy:03}-{id}");
        for (line, (_, ids)) in LINES.iter().enumerate() {
            for id in *ids {
                if lab.instruments.len() == n {
                    break 'copies;
                }
                let mut inst = sim.instrument(id).unwrap().clone();
                inst.id = rename(id);
                inst.transport = Transport::Tcp {
                    address: addresses[&(copy, line)].clone(),
                };
                lab.instruments.push(inst);
            }
        }
        for il in &sim.interlocks {
            let mut il = il.clone();
            il.name = rename(&il.name);
            il.instrument = rename(&il.instrument);
            il.safe_state = il.safe_state.iter().map(|s| rename(s)).collect();
            lab.interlocks.push(il);
        }
    }
    let ids: std::collections::BTreeSet<String> =
        lab.instruments.iter().map(|i| i.id.clone()).collect();
    lab.interlocks
        .retain(|il| ids.contains(&il.instrument) && il.safe_state.iter().all(|s| ids.contains(s)));
    lab
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn scale(n: usize, seconds: u64, poll: Duration, priority: Option<u8>) {
    let per_copy = Lab::sim().instruments.len();
    let copies = n.div_ceil(per_copy);
    println!("scale: load average at start {}", load_average());
    figure(
        "scale.load_average_1min",
        load_average().split(' ').next().unwrap_or("0"),
        "",
    );
    // The simulators, in their own process.
    let exe = std::env::current_exe().unwrap();
    let mut sims = Command::new(exe)
        .env("LABCTL_SCALE_SIMS", copies.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sim_pid = sims.id();
    let mut addresses = BTreeMap::new();
    let started = Instant::now();
    for line in BufReader::new(sims.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line == "READY" {
            break;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if let ["PORT", copy, k, addr] = f[..] {
            addresses.insert((copy.parse().unwrap(), k.parse().unwrap()), addr.to_owned());
        }
    }
    println!(
        "scale: {} simulator lines ({copies} copies of the sim lab) listening on TCP after {:.1} s (pid {sim_pid})",
        addresses.len(),
        started.elapsed().as_secs_f64()
    );
    let lab = scaled_lab(n, &addresses);
    let lines: std::collections::BTreeSet<&str> = lab
        .instruments
        .iter()
        .map(|i| match &i.transport {
            Transport::Tcp { address } => address.as_str(),
            _ => "",
        })
        .collect();
    figure("scale.instruments", lab.instruments.len(), "");
    figure("scale.tcp_lines", lines.len(), "");
    figure("scale.interlocks", lab.interlocks.len(), "");

    // Drivers and instrument tasks, as `labctl run` builds them.
    let estop = EStop::default();
    let mut ports = Ports::new();
    let options = DriverOptions::default();
    let mut handles = BTreeMap::new();
    let timing = TaskTiming {
        poll,
        ..TaskTiming::default()
    };
    let connect_started = Instant::now();
    for inst in &lab.instruments {
        let Transport::Tcp { address } = &inst.transport else {
            unreachable!()
        };
        let endpoint = Endpoint::Tcp {
            address: address.clone(),
        };
        let driver = labctl_drivers::connect(inst, &endpoint, &mut ports, &options).unwrap();
        handles.insert(
            inst.id.clone(),
            instruments::spawn(inst.clone(), driver, estop.clone(), timing),
        );
    }
    let online = |handles: &BTreeMap<String, instruments::InstrumentHandle>| {
        handles
            .values()
            .filter(|h| h.view().connection == Connection::Online)
            .count()
    };
    let mut up = 0;
    for _ in 0..1200 {
        up = online(&handles);
        if up == handles.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    println!(
        "scale: {up} of {} instruments online after {connect_s:.1} s",
        handles.len()
    );
    figure("scale.connect_s", format!("{connect_s:.1}"), "s");
    assert_eq!(up, handles.len(), "not every instrument came online");

    let dir = tempfile::tempdir().unwrap();
    let mut config = common::bench_controller_config(lab.clone(), dir.path());
    config.tick.realtime_priority = priority;
    let controller = start(config, handles.clone(), estop).await.unwrap();

    // Readings through the world model: each instrument's `last_seen` changing between the snapshots the
    // tick publishes (snapshots list instruments sorted by id, the same set every time).
    let counting = Arc::new(AtomicBool::new(false));
    let readings = Arc::new(AtomicU64::new(0));
    let snapshots = Arc::new(AtomicU64::new(0));
    let mut rx = controller.handle.watch_snapshot();
    let observer = {
        let (counting, readings, snapshots) =
            (counting.clone(), readings.clone(), snapshots.clone());
        tokio::spawn(async move {
            let mut last: Vec<Option<Instant>> = Vec::new();
            while rx.changed().await.is_ok() {
                let snap = rx.borrow_and_update().clone();
                last.resize(snap.instruments.len(), None);
                let on = counting.load(Ordering::Relaxed);
                let mut changed = 0;
                for (seen, view) in last.iter_mut().zip(&snap.instruments) {
                    if view.last_seen.is_some() && *seen != view.last_seen {
                        *seen = view.last_seen;
                        changed += 1;
                    }
                }
                if on {
                    readings.fetch_add(changed, Ordering::Relaxed);
                    snapshots.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // Browser-console sessions, as `labctl run` serves them (same runtime), reading the live stream.
    let web_clients = env_or("LABCTL_SCALE_WEB_CLIENTS", 0usize);
    let web_events = Arc::new(AtomicU64::new(0));
    let web_bytes = Arc::new(AtomicU64::new(0));
    let (_web, web_tasks) = if web_clients > 0 {
        let users = Arc::new(labctl::auth::Users::from_lab(&lab).unwrap());
        let console = labctl::gateways::web::serve(
            labctl::gateways::web::WebOptions {
                listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                tls: None,
                allow_cleartext_on_network: false,
            },
            controller.handle.clone(),
            users,
        )
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..web_clients {
            let cookie = web_login(console.addr).await;
            let (events, bytes, counting) =
                (web_events.clone(), web_bytes.clone(), counting.clone());
            tasks.push(tokio::spawn(web_live(
                console.addr,
                cookie,
                events,
                bytes,
                counting,
            )));
        }
        println!(
            "scale: {web_clients} browser-console sessions reading {}api/live",
            console.url()
        );
        (Some(console), tasks)
    } else {
        (None, Vec::new())
    };

    // Settle (the start's safe state to every instrument), then the window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tick_stat = thread_stat_path("labctl-tick");
    figure("scale.tick_priority", priority.unwrap_or(0), "");
    println!(
        "scale: tick thread scheduling: {} (asked for {})",
        tick_stat
            .as_deref()
            .and_then(common::thread_policy)
            .unwrap_or("unknown"),
        describe(priority)
    );
    let sim_stat = format!("/proc/{sim_pid}/stat");
    let cpu0 = cpu_seconds("/proc/self/stat").unwrap_or(0.0);
    let tick0 = tick_stat.as_deref().and_then(cpu_seconds).unwrap_or(0.0);
    let sim0 = cpu_seconds(&sim_stat).unwrap_or(0.0);
    let beside = common::cyclictest_spawn(seconds * 100, priority);
    let t0 = Instant::now();
    controller.restart_tick_stats();
    counting.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    counting.store(false, Ordering::Relaxed);
    let window = t0.elapsed().as_secs_f64();
    // The tick publishes a snapshot every tick while telemetry flows, so this is the window's last tick.
    let s = controller.handle.snapshot().tick.clone();
    let cpu = cpu_seconds("/proc/self/stat").unwrap_or(0.0) - cpu0;
    let tick_cpu = tick_stat.as_deref().and_then(cpu_seconds).unwrap_or(0.0) - tick0;
    let sim_cpu = cpu_seconds(&sim_stat).unwrap_or(0.0) - sim0;
    let sim_hwm = vm_kb(&format!("/proc/{sim_pid}/status"), "VmHWM:").unwrap_or(0);
    let up_end = online(&handles);
    let beside = beside.map(|c| tokio::task::block_in_place(|| common::cyclictest_finish(c)));

    for t in &web_tasks {
        t.abort();
    }
    if web_clients > 0 {
        let events = web_events.load(Ordering::Relaxed);
        let bytes = web_bytes.load(Ordering::Relaxed);
        println!(
            "scale: {web_clients} browser sessions received {:.1} live events/s each, {:.0} kB/s in all",
            events as f64 / window / web_clients as f64,
            bytes as f64 / window / 1000.0
        );
        figure("scale.web_clients", web_clients, "");
        figure(
            "scale.web_events_per_client_per_s",
            format!("{:.1}", events as f64 / window / web_clients as f64),
            "",
        );
        figure(
            "scale.web_kbytes_per_s",
            format!("{:.0}", bytes as f64 / window / 1000.0),
            "kB/s",
        );
    }
    let after = controller.shutdown().await.unwrap().summary();
    observer.abort();
    let hwm = vm_kb("/proc/self/status", "VmHWM:").unwrap_or(0);
    let rss = vm_kb("/proc/self/status", "VmRSS:").unwrap_or(0);
    let readings = readings.load(Ordering::Relaxed);
    let nominal = lab.instruments.len() as f64 / poll.as_secs_f64();
    let rate = readings as f64 / window;

    println!(
        "scale: tick at 100 Hz over the window ({} instruments polled every {} ms, {seconds} s): ticks {} skipped {} p50 {} us p99 {} us max {} us",
        lab.instruments.len(),
        poll.as_millis(),
        s.ticks,
        s.skipped,
        s.p50_us,
        s.p99_us,
        s.max_us
    );
    figure("scale.ticks", s.ticks, "");
    figure("scale.tick_skipped", s.skipped, "");
    figure("scale.tick_p50_us", s.p50_us, "us");
    figure("scale.tick_p99_us", s.p99_us, "us");
    figure("scale.tick_max_us", s.max_us, "us");
    println!(
        "scale: tick from the window's start to the end of shutdown: ticks {} skipped {} p50 {} us p99 {} us max {} us",
        after.ticks, after.skipped, after.p50_us, after.p99_us, after.max_us
    );
    println!(
        "scale: CPU over the window: controller process {:.1}% of one core (tick thread {:.2}%, {:.0} us per tick), simulator process {:.1}%",
        100.0 * cpu / window,
        100.0 * tick_cpu / window,
        tick_cpu / (window * 100.0) * 1e6,
        100.0 * sim_cpu / window
    );
    figure(
        "scale.cpu_percent",
        format!("{:.1}", 100.0 * cpu / window),
        "%",
    );
    figure(
        "scale.tick_thread_cpu_percent",
        format!("{:.2}", 100.0 * tick_cpu / window),
        "%",
    );
    figure(
        "scale.tick_cpu_us_per_tick",
        format!("{:.0}", tick_cpu / (window * 100.0) * 1e6),
        "us",
    );
    figure(
        "scale.sim_cpu_percent",
        format!("{:.1}", 100.0 * sim_cpu / window),
        "%",
    );
    println!(
        "scale: memory: controller VmHWM {:.1} MB (VmRSS at the end {:.1} MB); simulator process VmHWM {:.1} MB",
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0,
        sim_hwm as f64 / 1024.0
    );
    figure(
        "scale.vmhwm_mb",
        format!("{:.1}", hwm as f64 / 1024.0),
        "MB",
    );
    figure(
        "scale.sim_vmhwm_mb",
        format!("{:.1}", sim_hwm as f64 / 1024.0),
        "MB",
    );
    println!(
        "scale: telemetry through the world model: {readings} readings in {window:.1} s = {rate:.0} readings/s (nominal {nominal:.0}/s); {} snapshots seen; {up_end} of {} instruments online at the end",
        snapshots.load(Ordering::Relaxed),
        lab.instruments.len()
    );
    figure("scale.readings_per_s", format!("{rate:.0}"), "/s");
    figure(
        "scale.readings_nominal_per_s",
        format!("{nominal:.0}"),
        "/s",
    );
    figure("scale.online_at_end", up_end, "");

    match beside {
        Some(Ok(c)) => {
            println!(
                "scale: cyclictest beside the load (10 ms period, {seconds} s, {}): samples {} p50 {} us p99 {} us max {} us",
                describe(priority),
                c.samples,
                c.p50_us,
                c.p99_us,
                c.max_us
            );
            figure("scale.cyclictest_beside_p50_us", c.p50_us, "us");
            figure("scale.cyclictest_beside_p99_us", c.p99_us, "us");
            figure("scale.cyclictest_beside_max_us", c.max_us, "us");
        }
        Some(Err(e)) => println!("scale: cyclictest beside the load failed: {e}"),
        None => println!("scale: cyclictest not installed (apt-get install rt-tests)"),
    }

    // The simulators and the instruments go; then the floor, on the machine without this load.
    drop(handles);
    drop(sims.stdin.take());
    let _ = tokio::task::block_in_place(|| sims.wait());
    if priority.is_some() {
        // The floor of an ordinary thread too, for comparison with runs at normal priority.
        match tokio::task::block_in_place(|| common::cyclictest_run(seconds * 100, None)) {
            Ok(c) => {
                println!(
                    "scale: cyclictest alone after the run (10 ms period, {seconds} s, normal priority): samples {} p50 {} us p99 {} us max {} us",
                    c.samples, c.p50_us, c.p99_us, c.max_us
                );
                figure("scale.cyclictest_normal_p99_us", c.p99_us, "us");
            }
            Err(e) => println!("scale: no normal-priority floor measured: {e}"),
        }
    }
    match tokio::task::block_in_place(|| common::cyclictest_run(seconds * 100, priority)) {
        Ok(c) => {
            println!(
                "scale: cyclictest alone after the run, the floor (10 ms period, {seconds} s, {}): samples {} p50 {} us p99 {} us max {} us",
                describe(priority),
                c.samples,
                c.p50_us,
                c.p99_us,
                c.max_us
            );
            figure("scale.cyclictest_p50_us", c.p50_us, "us");
            figure("scale.cyclictest_p99_us", c.p99_us, "us");
            figure("scale.cyclictest_max_us", c.max_us, "us");
            let ratio = s.p99_us as f64 / c.p99_us.max(1) as f64;
            println!(
                "scale: tick p99 / cyclictest p99 = {ratio:.2} (goal under 1.2: {}); VmHWM {:.1} MB (goal under 200 MB: {})",
                if ratio < 1.2 { "met" } else { "not met" },
                hwm as f64 / 1024.0,
                if hwm < 200 * 1024 { "met" } else { "not met" }
            );
            figure(
                "scale.tick_p99_over_cyclictest_p99",
                format!("{ratio:.2}"),
                "",
            );
        }
        Err(e) => println!("scale: no floor measured: {e}"),
    }
    println!("scale: load average at the end {}", load_average());
}

/// How a thread was scheduled, for the printed figures.
/// Logs in to the browser console as alice over HTTP/1.1; the session cookie.
async fn web_login(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"user":"alice","password":"technician-dev"}"#;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /api/login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    reply
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

/// Reads the console's live stream as a page does, counting its events and bytes while `counting`.
async fn web_live(
    addr: SocketAddr,
    cookie: String,
    events: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    counting: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET /api/live HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if counting.load(Ordering::Relaxed) {
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            let text = &buf[..n];
            let found = text.windows(7).filter(|w| w == b"event: ").count();
            events.fetch_add(found as u64, Ordering::Relaxed);
        }
    }
}

fn describe(priority: Option<u8>) -> String {
    priority.map_or("normal priority".to_owned(), |p| format!("SCHED_FIFO {p}"))
}

fn main() {
    // As labctl's own main does: argon2's 19 MiB blocks (the browser sessions' logins) must not raise
    // glibc's mmap threshold, or they stay resident and the controller's memory is misread.
    // SAFETY: mallopt only adjusts allocator tuning; called first thing, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    if let Ok(copies) = std::env::var("LABCTL_SCALE_SIMS") {
        serve_sims(copies.parse().unwrap());
        return;
    }
    // `cargo bench` passes --bench; nothing else to filter here.
    let n = env_or("LABCTL_SCALE_INSTRUMENTS", 1000usize);
    let seconds = env_or("LABCTL_BENCH_SECONDS", 30u64);
    let poll = Duration::from_millis(env_or("LABCTL_SCALE_POLL_MS", 100u64));
    // 0: normal priority.
    let priority = Some(env_or("LABCTL_SCALE_TICK_PRIORITY", 80u8)).filter(|p| *p > 0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(scale(n, seconds, poll, priority));
}
