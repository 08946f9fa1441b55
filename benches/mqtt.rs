//! MQTT gateway figures for BENCHMARKS.md: `cargo bench --bench mqtt [-- PART]`, each part through the
//! embedded broker and through mosquitto (Debian `mosquitto`, which `scripts/test` installs):
//!
//! - `submit_latency`: 200 sequential submits (MQTT 5, response topic) to the reply, and to the first
//!   command reaching the (fake) balance;
//! - `broker_ceiling`: messages per second one native (rumqttc) publisher gets through to one subscriber,
//!   QoS 0 and 1: the ceiling labctl's result stream is measured against;
//! - `result_stream_rate`: labctl's own result stream, a 5,000-step weighing protocol on zero-latency fake
//!   instruments, each result journaled (durable group commit) and then published at QoS 1 to
//!   `runs/{run_id}/results`, one subscriber counting them; beside it, in the same run on the same broker,
//!   the QoS 1 ceiling of one native publisher.
//!
//! The rig (controller on fake instruments, gateway, clients, mosquitto) is the MQTT tests' own.

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/mqtt_rig.rs"]
mod mqtt_rig;

use labctl::api::Face;
use std::path::Path;
use std::time::{Duration, Instant};

use bench::figure;
use labctl::api::{Principal, RunState};
use labctl::gateways::mqtt::BrokerChoice;
use labctl_protocols::lab::Role;
use mqtt_rig::{Mosquitto, Rig, SUBMIT, client, json_of, next_on, rig, rig_on, weigh_protocol};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

/// The brokers every part runs through, in this order.
const BROKERS: [&str; 2] = ["embedded", "mosquitto"];

/// Starts a rig on the embedded broker or on a fresh mosquitto (kept alive by the returned guard).
async fn rig_via(via: &str, dir: &Path) -> (Rig, Option<Mosquitto>) {
    if via == "embedded" {
        return (rig(dir).await, None);
    }
    let mosq = Mosquitto::start(dir, None).await;
    let rig = rig_on(
        dir,
        BrokerChoice::External {
            url: format!("mqtt://{}", mosq.addr()),
            credentials: None,
        },
    )
    .await;
    (rig, Some(mosq))
}

/// Milliseconds, two decimals, for a figure.
fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Submit (MQTT 5, response topic) to the reply, and to the first command reaching the (fake) balance.
async fn submit_latency() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
    for via in BROKERS {
        let dir = tempfile::tempdir().unwrap();
        let (rig, _mosq) = rig_via(via, dir.path()).await;
        let mut opts = Options5::new("bench", rig.addr.ip().to_string(), rig.addr.port());
        opts.set_credentials("planner-bo", "planner-dev");
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        opts.set_network_options(net);
        let (client, mut ev) = Client5::new(opts, 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(e) = ev.poll().await {
                if let Event5::Incoming(Packet::Publish(p)) = e {
                    let _ = tx.send(p);
                }
            }
        });
        client
            .subscribe(
                "labctl/sim/to/planner-bo/bench",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let api = rig.controller.handle.clone();
        let (mut to_reply, mut to_command) = (Vec::new(), Vec::new());
        for i in 0..200 {
            let body = serde_json::to_vec(&weigh_protocol(&format!("bench-{via}-{i}"), 1)).unwrap();
            let before = rig.fakes["balance"].log.lock().unwrap().commands.len();
            let props = PublishProperties {
                response_topic: Some("labctl/sim/to/planner-bo/bench".into()),
                ..Default::default()
            };
            let t0 = Instant::now();
            client
                .publish_with_properties(
                    SUBMIT,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    body,
                    props,
                )
                .await
                .unwrap();
            let reply = rx.recv().await.unwrap();
            to_reply.push(t0.elapsed());
            loop {
                if rig.fakes["balance"].log.lock().unwrap().commands.len() > before {
                    to_command.push(t0.elapsed());
                    break;
                }
                if t0.elapsed() > Duration::from_secs(5) {
                    panic!("no command");
                }
                tokio::task::yield_now().await;
            }
            let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
            let run_id = reply["run_id"].as_str().unwrap().to_owned();
            while !api.run(&run_id).await.unwrap().state.is_terminal() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for (what, key, mut v) in [
            ("reply", "reply", to_reply),
            ("first command", "first_command", to_command),
        ] {
            v.sort();
            let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
            println!(
                "{via}: submit -> {what}: p50 {:?} p99 {:?} max {:?} (n={})",
                p(0.5),
                p(0.99),
                v[v.len() - 1],
                v.len()
            );
            let name = format!("mqtt.submit_{via}_{key}");
            figure(&format!("{name}_p50_ms"), ms(p(0.5)), "ms");
            figure(&format!("{name}_p99_ms"), ms(p(0.99)), "ms");
            figure(&format!("{name}_max_ms"), ms(v[v.len() - 1]), "ms");
        }
        rig.stop().await;
    }
}

/// Messages per second one native (rumqttc) publisher gets through the rig's broker to one subscriber.
async fn ceiling(rig: &Rig, label: &str, qos: QoS, n: usize) -> f64 {
    let topic = format!("bench/{label}/{qos:?}");
    let (_sub, mut rx) = client(rig.addr, "watcher", "observer-dev", &[&topic]).await;
    let mut opts = MqttOptions::new(
        format!("pub-{label}-{qos:?}"),
        rig.addr.ip().to_string(),
        rig.addr.port(),
    );
    opts.set_credentials("planner-bo", "planner-dev");
    opts.set_inflight(100);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    let (publisher, mut ev) = AsyncClient::new(opts, 1000);
    ev.set_network_options(net);
    tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let payload = vec![b'x'; 200];
    let t0 = Instant::now();
    let topic2 = topic.clone();
    tokio::spawn(async move {
        for _ in 0..n {
            if publisher
                .publish(&topic2, qos, false, payload.clone())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(_)) => got += 1,
            _ => break,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{label} {qos:?}: {got}/{n} messages in {secs:.2} s: {:.0} msg/s",
        got as f64 / secs
    );
    got as f64 / secs
}

/// The QoS 0 and QoS 1 ceilings of each broker.
async fn broker_ceiling() {
    for via in BROKERS {
        let dir = tempfile::tempdir().unwrap();
        let (rig, _mosq) = rig_via(via, dir.path()).await;
        for (qos, level) in [(QoS::AtMostOnce, 0), (QoS::AtLeastOnce, 1)] {
            let rate = ceiling(&rig, via, qos, 20_000).await;
            figure(
                &format!("mqtt.ceiling_{via}_qos{level}_msg_s"),
                format!("{rate:.0}"),
                "msg/s",
            );
        }
        rig.stop().await;
    }
}

/// labctl's own result stream, and the QoS 1 ceiling beside it on the same broker.
async fn result_stream_rate() {
    const N: usize = 5_000;
    for via in BROKERS {
        let dir = tempfile::tempdir().unwrap();
        let (rig, _mosq) = rig_via(via, dir.path()).await;
        let (_sub, mut rx) = client(
            rig.addr,
            "watcher",
            "observer-dev",
            &["labctl/sim/runs/+/results", "labctl/sim/status"],
        )
        .await;
        // The retained status comes back once the later subscription is in place, so the results one is too.
        next_on(&mut rx, "labctl/sim/status").await;
        let t0 = Instant::now();
        let reply = rig
            .controller
            .handle
            .submit(
                serde_json::to_vec(&weigh_protocol(&format!("rate-{via}"), N)).unwrap(),
                Principal::new("planner-bo", Role::Planner, Face::InProcess),
            )
            .await;
        assert!(reply.accepted, "{reply:?}");
        if reply.state == Some(RunState::AwaitingApproval) {
            // More steps than the sim lab approves on its own.
            let alice = Principal::new("alice", Role::Technician, Face::InProcess);
            rig.controller
                .handle
                .approve(reply.run_id.as_deref().unwrap(), alice)
                .await
                .unwrap();
        }
        let mut seqs = Vec::with_capacity(N);
        let mut first = None;
        while seqs.len() < N {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(p)) => {
                    first.get_or_insert_with(Instant::now);
                    seqs.push(json_of(&p)["seq"].as_u64().unwrap_or(0));
                }
                _ => break,
            }
        }
        let last = Instant::now();
        let streaming = first.map_or(0.0, |f| (last - f).as_secs_f64());
        let in_order = seqs.windows(2).all(|w| w[1] == w[0] + 1);
        let rate = seqs.len() as f64 / streaming;
        println!(
            "{via}: {}/{N} results, seq 1..{} {}, {rate:.0} results/s while streaming ({streaming:.2} s), {:.2} s from submit to the last",
            seqs.len(),
            seqs.last().copied().unwrap_or(0),
            if in_order {
                "in order, no gaps"
            } else {
                "OUT OF ORDER OR GAPS"
            },
            (last - t0).as_secs_f64()
        );
        let name = format!("mqtt.results_{via}");
        figure(&format!("{name}_per_s"), format!("{rate:.0}"), "results/s");
        figure(&format!("{name}_received"), seqs.len(), "results");
        figure(&format!("{name}_of"), N, "results");
        figure(&format!("{name}_in_order"), in_order, "");
        figure(
            &format!("{name}_streaming_s"),
            format!("{streaming:.2}"),
            "s",
        );
        let beside = ceiling(&rig, via, QoS::AtLeastOnce, 20_000).await;
        figure(
            &format!("{name}_ceiling_qos1_msg_s"),
            format!("{beside:.0}"),
            "msg/s",
        );
        rig.stop().await;
    }
}

fn main() {
    let parts = bench::Parts::from_args();
    parts.check(&["submit_latency", "broker_ceiling", "result_stream_rate"]);
    // Each part on a runtime of its own, as each was a test of its own: clients it leaves behind end with it.
    if parts.want("submit_latency") {
        bench::runtime().block_on(submit_latency());
    }
    if parts.want("broker_ceiling") {
        bench::runtime().block_on(broker_ceiling());
    }
    if parts.want("result_stream_rate") {
        bench::runtime().block_on(result_stream_rate());
    }
}
