//! OPC UA server figures for BENCHMARKS.md: `LABCTL_TEST_PYTHON=.venv/bin/python cargo bench --bench opcua`
//! (a venv python with `asyncua`, as `scripts/test` makes it; the one part is `beside_asyncua`).
//!
//! labctl's server beside a Python `asyncua` server serving the same number of variables, both measured with
//! the same native client (async-opcua, SecurityPolicy None, loopback): Read requests per second for one
//! variable and for a batch of 100, one at a time (the round trip) and with several in flight on one
//! session (what the server can serve), and the latency of data-change notifications for 1,000 monitored
//! items at 100 ms (from the value's source timestamp, written by the server when the value changed, to the
//! client's callback). The rig (controller on fake instruments, server, client login) is the OPC UA tests'
//! own.

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/opcua_rig.rs"]
mod opcua_rig;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench::figure;
use labctl_protocols::Lab;
use labctl_protocols::registry::InstrumentModel;
use opcua::client::{ClientBuilder, DataChangeCallback, Session};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    MessageSecurityMode, MonitoredItemCreateRequest, NodeId, ReadValueId, StatusCode,
    TimestampsToReturn, UserTokenPolicy,
};
use opcua_rig::{Rig, identity, rig_as};

/// labctl's server, then asyncua's, measured the same way.
async fn beside_asyncua() {
    let Some(python) = std::env::var_os("LABCTL_TEST_PYTHON") else {
        eprintln!(
            "opcua: LABCTL_TEST_PYTHON is not set: a venv python with asyncua (scripts/test makes .venv)"
        );
        std::process::exit(2);
    };

    // labctl: the sim lab on fake instruments; its ten telemetry variables change every 100 ms.
    let (dir, rig, c) = rig_as("watcher", "observer-dev").await;
    drop(c);
    let pki = dir.path().join("client-pki");
    let lab = Lab::sim();
    let mut variables = Vec::new();
    for instrument in &lab.instruments {
        for q in &InstrumentModel::builtin(instrument.driver).quantities {
            variables.push((instrument.id.clone(), q.name.as_str()));
        }
    }
    let nodes: Vec<NodeId> = variables
        .iter()
        .map(|(id, q)| {
            rig.id(&format!(
                "Lab/Devices/{id}/FunctionalUnitSet/{id}/FunctionSet/{q}/SensorValue"
            ))
        })
        .collect();
    let fakes: Vec<_> = rig
        .fakes
        .iter()
        .map(|(id, f)| (id.clone(), f.log.clone()))
        .collect();
    let quantities: BTreeMap<String, Vec<&'static str>> = lab
        .instruments
        .iter()
        .map(|i| {
            (
                i.id.clone(),
                InstrumentModel::builtin(i.driver)
                    .quantities
                    .iter()
                    .map(|q| q.name.as_str())
                    .collect(),
            )
        })
        .collect();
    let changer = tokio::spawn(async move {
        let mut k = 0.0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            k += 1.0;
            for (id, log) in &fakes {
                log.lock().unwrap().values = quantities[id]
                    .iter()
                    .enumerate()
                    .map(|(i, q)| (*q, k * 100.0 + i as f64))
                    .collect();
            }
        }
    });
    let ours = measure_on_own_thread(
        rig.server.endpoint.clone(),
        Some(("watcher", "observer-dev")),
        nodes.clone(),
        pki.clone(),
    )
    .await;
    changer.abort();
    let Rig {
        controller, server, ..
    } = rig;
    server.shutdown().await;
    controller.shutdown().await;

    // asyncua: the same number of variables, written every 100 ms with a source timestamp.
    const SERVER: &str = r#"
import asyncio, sys
from datetime import datetime, timezone
from asyncua import Server, ua

async def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:bench")
    obj = await server.nodes.objects.add_object(idx, "Bench")
    variables = [await obj.add_variable(ua.NodeId(f"v{i}", idx), f"v{i}", 0.0) for i in range(n)]
    async with server:
        print(f"READY {idx}", flush=True)
        k = 0
        while True:
            await asyncio.sleep(0.1)
            k += 1
            now = datetime.now(timezone.utc)
            for i, v in enumerate(variables):
                await v.write_value(ua.DataValue(Value=ua.Variant(float(k * 100 + i), ua.VariantType.Double),
                                                 SourceTimestamp=now, ServerTimestamp=now))

asyncio.run(main())
"#;
    let script = dir.path().join("asyncua_server.py");
    std::fs::write(&script, SERVER).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(port.to_string())
        .arg(nodes.len().to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("asyncua server ready")
        .unwrap()
        .unwrap();
    let ns: u16 = ready.strip_prefix("READY ").unwrap().parse().unwrap();
    let theirs_nodes: Vec<NodeId> = (0..nodes.len())
        .map(|i| NodeId::new(ns, format!("v{i}")))
        .collect();
    let theirs = measure_on_own_thread(
        format!("opc.tcp://127.0.0.1:{port}/"),
        None,
        theirs_nodes,
        pki.clone(),
    )
    .await;
    let _ = child.kill().await;

    let floor = tokio::task::spawn_blocking(tcp_echo_round_trips)
        .await
        .unwrap();
    print_figures(nodes.len(), &ours, &theirs, floor);
    assert!(ours.notifications > 0 && theirs.notifications > 0);
}

/// The figures as a table (as BENCHMARKS.md has them) and as `FIGURE` lines for `scripts/bench-report`.
fn print_figures(variables: usize, ours: &Figures, theirs: &Figures, floor: f64) {
    println!("| what | labctl | asyncua | ratio |");
    println!("|---|---|---|---|");
    let row = |what: &str, key: &str, a: f64, b: f64, unit: &str| {
        println!("| {what} | {a:.0} {unit} | {b:.0} {unit} | {:.1}x |", a / b);
        figure(&format!("opcua.labctl_{key}"), format!("{a:.0}"), unit);
        figure(&format!("opcua.asyncua_{key}"), format!("{b:.0}"), unit);
    };
    row(
        "Read, one variable, one request at a time",
        "read_single_per_s",
        ours.single,
        theirs.single,
        "reads/s",
    );
    println!(
        "| floor: 100 bytes echoed over loopback TCP, one at a time (no OPC UA) | {floor:.0} round trips/s | | |"
    );
    figure(
        "opcua.loopback_floor_per_s",
        format!("{floor:.0}"),
        "round-trips/s",
    );
    row(
        &format!("Read, one variable, one session with {IN_FLIGHT} requests in flight"),
        "read_in_flight_per_s",
        ours.pipelined,
        theirs.pipelined,
        "reads/s",
    );
    row(
        &format!(
            "Read, one variable, {CONCURRENT_SESSIONS} clients each with one request at a time"
        ),
        "read_concurrent_per_s",
        ours.concurrent,
        theirs.concurrent,
        "reads/s",
    );
    row(
        "Read, a batch of 100 variables per request, one at a time",
        "batch_per_s",
        ours.batch,
        theirs.batch,
        "requests/s",
    );
    row(
        &format!("Read, a batch of 100 variables, {BATCHES_IN_FLIGHT} requests in flight"),
        "batch_in_flight_per_s",
        ours.batch_pipelined,
        theirs.batch_pipelined,
        "requests/s",
    );
    row(
        "the same, values",
        "batch_in_flight_values_per_s",
        ours.batch_pipelined * 100.0,
        theirs.batch_pipelined * 100.0,
        "values/s",
    );
    println!(
        "| notification latency, {variables} variables x {ITEMS} monitored items at 100 ms | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} notifications) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} notifications) | |",
        ours.latency.0,
        ours.latency.1,
        ours.latency.2,
        ours.notifications,
        theirs.latency.0,
        theirs.latency.1,
        theirs.latency.2,
        theirs.notifications,
    );
    for (server, f) in [("labctl", ours), ("asyncua", theirs)] {
        let name = format!("opcua.{server}_notification");
        figure(
            &format!("{name}_p50_ms"),
            format!("{:.1}", f.latency.0),
            "ms",
        );
        figure(
            &format!("{name}_p99_ms"),
            format!("{:.1}", f.latency.1),
            "ms",
        );
        figure(
            &format!("{name}_max_ms"),
            format!("{:.1}", f.latency.2),
            "ms",
        );
        figure(&format!("{name}s"), f.notifications, "notifications");
    }
    // What the rows above were measured with, for the report's wording.
    figure("opcua.variables", variables, "variables");
    figure("opcua.monitored_items", ITEMS, "items");
    figure("opcua.in_flight", IN_FLIGHT, "requests");
    figure("opcua.batches_in_flight", BATCHES_IN_FLIGHT, "requests");
    figure("opcua.concurrent_sessions", CONCURRENT_SESSIONS, "clients");
}

const ITEMS: usize = 1000;

/// Clients reading at once for the concurrent figure (a SCADA server, an HMI, a historian...).
const CONCURRENT_SESSIONS: usize = 8;

/// Reads one session keeps outstanding for the pipelined figure: the server's capacity on one connection
/// (a SCADA driver polling several tags without waiting for each answer), not the round trip's latency.
const IN_FLIGHT: usize = 16;

/// The same for 100-variable Reads (each answer is about 3 KB).
const BATCHES_IN_FLIGHT: usize = 4;

struct Figures {
    single: f64,
    /// Single-variable reads per second from one session with [`IN_FLIGHT`] Reads outstanding.
    pipelined: f64,
    /// Single-variable reads per second with [`CONCURRENT_SESSIONS`] clients.
    concurrent: f64,
    batch: f64,
    /// 100-variable Read requests per second with [`BATCHES_IN_FLIGHT`] outstanding.
    batch_pipelined: f64,
    /// p50, p99, max in milliseconds.
    latency: (f64, f64, f64),
    notifications: usize,
}

/// The floor under any single-request figure on this machine: round trips per second of 100 bytes echoed
/// over loopback TCP, server and client each on a thread of its own, one at a time, for 3 s.
fn tcp_echo_round_trips() -> f64 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        let mut buf = [0u8; 100];
        while stream.read_exact(&mut buf).is_ok() {
            if stream.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut buf = [7u8; 100];
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < Duration::from_secs(3) {
        stream.write_all(&buf).unwrap();
        stream.read_exact(&mut buf).unwrap();
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(stream);
    echo.join().unwrap();
    rate
}

/// [`measure`] with the client on a thread of its own (a single-threaded runtime), so its request path
/// stays on one thread and does not compete with labctl's server for the test's workers.
async fn measure_on_own_thread(
    url: String,
    user: Option<(&'static str, &'static str)>,
    nodes: Vec<NodeId>,
    pki: std::path::PathBuf,
) -> Figures {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(measure(&url, user, &nodes, &pki))
    })
    .await
    .unwrap()
}

/// A session of the measuring client (async-opcua, SecurityPolicy None) and its event loop.
async fn bench_session(
    url: &str,
    user: Option<(&str, &str)>,
    pki: &Path,
) -> (Arc<Session>, tokio::task::JoinHandle<StatusCode>) {
    let mut client = ClientBuilder::new()
        .application_name("labctl bench")
        .application_uri("urn:labctl:bench")
        .product_uri("urn:labctl:bench")
        .pki_dir(pki)
        .trust_server_certs(true)
        .session_retry_limit(0)
        .max_array_length(100_000)
        .max_message_size(64 * 1024 * 1024)
        .max_chunk_count(4096)
        .client()
        .unwrap();
    let (session, event_loop) = client
        .connect_to_matching_endpoint(
            (
                url,
                SecurityPolicy::None.to_str(),
                MessageSecurityMode::None,
                UserTokenPolicy::anonymous(),
            ),
            identity(user),
        )
        .await
        .unwrap();
    let event_loop = event_loop.spawn();
    assert!(session.wait_for_connection().await);
    (session, event_loop)
}

/// Single-variable reads per second with `sessions` clients, each with one Read in flight at a time.
async fn concurrent_reads(
    url: &str,
    user: Option<(&str, &str)>,
    node: &NodeId,
    pki: &Path,
    sessions: usize,
) -> f64 {
    let mut clients = Vec::new();
    for _ in 0..sessions {
        clients.push(bench_session(url, user, pki).await);
    }
    let start = Instant::now();
    let readers: Vec<_> = clients
        .iter()
        .map(|(session, _)| {
            let (session, one) = (session.clone(), [ReadValueId::from(node)]);
            tokio::spawn(async move { reads_until(&session, &one, start + READING).await })
        })
        .collect();
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap();
    }
    let rate = reads as f64 / start.elapsed().as_secs_f64();
    for (session, event_loop) in clients {
        let _ = session.disconnect().await;
        event_loop.abort();
    }
    rate
}

/// How long each read figure reads.
const READING: Duration = Duration::from_secs(3);

/// Read requests of `ids`, one at a time until `end`; how many were answered (each with every value).
async fn reads_until(session: &Session, ids: &[ReadValueId], end: Instant) -> u64 {
    let mut n = 0;
    while Instant::now() < end {
        let values = session
            .read(ids, TimestampsToReturn::Both, 0.0)
            .await
            .unwrap();
        assert_eq!(values.len(), ids.len());
        assert!(values.iter().all(|v| v.value.is_some()));
        n += 1;
    }
    n
}

/// Read requests of `ids` per second over [`READING`], with `in_flight` of them outstanding on `session`.
async fn requests_per_second(session: &Arc<Session>, ids: &[ReadValueId], in_flight: usize) -> f64 {
    let start = Instant::now();
    let readers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (session, ids) = (session.clone(), ids.to_vec());
            tokio::spawn(async move { reads_until(&session, &ids, start + READING).await })
        })
        .collect();
    let mut requests = 0;
    for reader in readers {
        requests += reader.await.unwrap();
    }
    requests as f64 / start.elapsed().as_secs_f64()
}

/// Reads for 3 s each way, then 1,000 monitored items over `nodes` (spread evenly) for 10 s.
async fn measure(url: &str, user: Option<(&str, &str)>, nodes: &[NodeId], pki: &Path) -> Figures {
    let concurrent = concurrent_reads(url, user, &nodes[0], pki, CONCURRENT_SESSIONS).await;
    let (session, event_loop) = bench_session(url, user, pki).await;

    let one = [ReadValueId::from(&nodes[0])];
    let hundred: Vec<ReadValueId> = (0..100)
        .map(|i| ReadValueId::from(&nodes[i % nodes.len()]))
        .collect();
    let single = requests_per_second(&session, &one, 1).await;
    let pipelined = requests_per_second(&session, &one, IN_FLIGHT).await;
    let batch = requests_per_second(&session, &hundred, 1).await;
    let batch_pipelined = requests_per_second(&session, &hundred, BATCHES_IN_FLIGHT).await;

    // Latency in 100 ns ticks of OPC UA's DateTime, from the source timestamp to the callback.
    let samples: Arc<Mutex<Vec<i64>>> = Arc::default();
    let recording = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sink, on) = (samples.clone(), recording.clone());
    let subscription = session
        .create_subscription(
            Duration::from_millis(100),
            300,
            30,
            0,
            0,
            true,
            DataChangeCallback::new(move |dv, _| {
                if let Some(ts) = dv.source_timestamp
                    && on.load(std::sync::atomic::Ordering::Relaxed)
                {
                    sink.lock()
                        .unwrap()
                        .push(opcua::types::DateTime::now().ticks() - ts.ticks());
                }
            }),
        )
        .await
        .unwrap();
    let items: Vec<MonitoredItemCreateRequest> = (0..ITEMS)
        .map(|i| {
            let mut item = MonitoredItemCreateRequest::from(nodes[i % nodes.len()].clone());
            item.requested_parameters.sampling_interval = 100.0;
            item.requested_parameters.queue_size = 10;
            item
        })
        .collect();
    let created = session
        .create_monitored_items(subscription, TimestampsToReturn::Both, items)
        .await
        .unwrap();
    assert!(created.iter().all(|c| c.result.status_code.is_good()));
    // Skip the initial values, then record 10 s of changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    recording.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    recording.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = session.disconnect().await;
    event_loop.abort();
    let mut samples = samples.lock().unwrap().clone();
    samples.sort_unstable();
    let ms = |q: f64| {
        samples
            .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
            .map(|t| *t as f64 / 10_000.0)
            .unwrap_or(f64::NAN)
    };
    Figures {
        single,
        pipelined,
        concurrent,
        batch,
        batch_pipelined,
        latency: (ms(0.5), ms(0.99), ms(1.0)),
        notifications: samples.len(),
    }
}

fn main() {
    let parts = bench::Parts::from_args();
    parts.check(&["beside_asyncua"]);
    if parts.want("beside_asyncua") {
        bench::runtime().block_on(beside_asyncua());
    }
}
