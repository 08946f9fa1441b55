//! The MQTT gateway end to end: the controller on fake instruments, the embedded broker on a free port,
//! and rumqttc clients as a planner, an observer and an MQTT 5 client.

mod common;
#[path = "common/mqtt_rig.rs"]
mod mqtt_rig;

use labctl::api::Face;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use labctl::api::{Principal, RunState};
use labctl::gateways::mqtt::BrokerChoice;
use labctl::journal;
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use mqtt_rig::{
    Mosquitto, Rig, SUBMIT, client, json_of, next_on, rig, rig_full, rig_on, weigh_protocol,
};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Waits until the gateway has announced itself on the broker at `addr`: its retained `online` status,
/// which it publishes after subscribing and after its other retained messages, is there.
async fn announced(addr: SocketAddr) {
    let (watcher, mut rx) = client(addr, "watcher", "observer-dev", &["labctl/sim/status"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the gateway announced itself within 10 s")
            .expect("watcher alive");
        if p.topic == "labctl/sim/status" && json_of(&p)["status"] == "online" {
            break;
        }
    }
    let _ = watcher.disconnect().await;
}

const ESTOP_STATE: &str = "labctl/sim/estop/state";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_are_retained_with_the_schema_and_a_submit_gets_its_reply() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    // A late subscriber: the retained messages are already there.
    announced(rig.addr).await;
    let (planner, mut rx) = client(
        rig.addr,
        "planner-bo",
        "planner-dev",
        &[
            "labctl/sim/capabilities",
            "labctl/sim/status",
            "labctl/sim/protocols/replies/#",
        ],
    )
    .await;
    let caps = next_on(&mut rx, "labctl/sim/capabilities").await;
    assert!(caps.retain, "capabilities must be retained");
    let caps = json_of(&caps);
    assert!(caps["protocol_schema"].is_object());
    assert_eq!(
        caps["instruments"].as_array().unwrap().len(),
        Lab::sim().instruments.len()
    );
    assert!(caps["instruments"][0]["envelope"].is_object());
    let status = json_of(&next_on(&mut rx, "labctl/sim/status").await);
    assert_eq!(status["status"], "online");

    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&weigh_protocol("mqtt-p1", 1)).unwrap(),
        )
        .await
        .unwrap();
    let reply = json_of(&next_on(&mut rx, "labctl/sim/protocols/replies/mqtt-p1").await);
    assert_eq!(reply["accepted"], true, "{reply}");
    assert!(reply["run_id"].is_string());
    assert_eq!(reply["proposal_id"], "mqtt-p1");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_arrive_at_qos_1_in_sequence_and_match_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let (planner, mut rx) = client(
        rig.addr,
        "planner-bo",
        "planner-dev",
        &[
            "labctl/sim/runs/+/results",
            "labctl/sim/runs/+/status",
            "labctl/sim/protocols/replies/#",
        ],
    )
    .await;
    let n = 5;
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&weigh_protocol("mqtt-results", n)).unwrap(),
        )
        .await
        .unwrap();
    let reply = json_of(&next_on(&mut rx, "labctl/sim/protocols/replies/mqtt-results").await);
    let run_id = reply["run_id"].as_str().expect("run id").to_owned();
    let topic = format!("labctl/sim/runs/{run_id}/results");
    let mut got = Vec::new();
    for _ in 0..n {
        let p = next_on(&mut rx, &topic).await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert!(!p.retain);
        got.push(json_of(&p));
    }
    let seqs: Vec<u64> = got.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
    let conn = journal::open_db(dir.path()).unwrap();
    let rows = journal::read::results(&conn, &run_id, 0).unwrap();
    assert_eq!(rows.len(), n);
    for (row, msg) in rows.iter().zip(&got) {
        assert_eq!(msg["name"], row.name.as_str());
        assert_eq!(msg["instrument"], "balance");
        assert_eq!(msg["value"], row.value);
        assert_eq!(msg["proposal_id"], "mqtt-results");
        assert_eq!(msg["run_id"], run_id.as_str());
    }
    // The retained status ends as completed.
    let status_topic = format!("labctl/sim/runs/{run_id}/status");
    loop {
        let s = json_of(&next_on(&mut rx, &status_topic).await);
        if s["state"] == "completed" {
            break;
        }
    }
    // Resume from a cursor: the results after seq 2 again.
    planner
        .publish(
            format!("labctl/sim/runs/{run_id}/control"),
            QoS::AtLeastOnce,
            false,
            br#"{"action": "replay", "after": 2}"#.to_vec(),
        )
        .await
        .unwrap();
    let again: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 3..=n {
            v.push(
                json_of(&next_on(&mut rx, &topic).await)["seq"]
                    .as_u64()
                    .unwrap(),
            );
        }
        v
    };
    assert_eq!(again, (3..=n as u64).collect::<Vec<_>>());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_clearly_and_labctl_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let (planner, mut rx) = client(
        rig.addr,
        "planner-bo",
        "planner-dev",
        &["labctl/sim/rejections", "labctl/sim/protocols/replies/#"],
    )
    .await;
    // Malformed JSON: no proposal id to reply to, so the rejection goes to `rejections`.
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            b"{\"version\": 1, oops".to_vec(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut rx, "labctl/sim/rejections").await);
    assert_eq!(r["accepted"], false, "{r}");
    assert!(!r["findings"].as_array().unwrap().is_empty(), "{r}");

    // Oversized payload.
    let big = vec![b' '; 1_500_000];
    planner
        .publish(SUBMIT, QoS::AtLeastOnce, false, big)
        .await
        .unwrap();
    let r = json_of(&next_on(&mut rx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "payload_too_large", "{r}");

    // Control of a run that does not exist.
    planner
        .publish(
            "labctl/sim/runs/no-such-run/control",
            QoS::AtLeastOnce,
            false,
            b"pause".to_vec(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut rx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "unknown_run", "{r}");
    assert_eq!(r["run_id"], "no-such-run");

    // A planner may not approve.
    planner
        .publish(
            "labctl/sim/runs/no-such-run/approval",
            QoS::AtLeastOnce,
            false,
            b"approve".to_vec(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut rx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "forbidden", "{r}");

    // An invalid protocol with a proposal id: its findings on its reply topic.
    let mut bad = weigh_protocol("mqtt-invalid", 1);
    bad["steps"][0]["instrument"] = json!("no-such-instrument");
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&bad).unwrap(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut rx, "labctl/sim/protocols/replies/mqtt-invalid").await);
    assert_eq!(r["accepted"], false);
    assert!(!r["findings"].as_array().unwrap().is_empty(), "{r}");

    // Still serving.
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&weigh_protocol("mqtt-after", 1)).unwrap(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut rx, "labctl/sim/protocols/replies/mqtt-after").await);
    assert_eq!(r["accepted"], true, "{r}");
    let runs = rig.controller.handle.runs().await;
    assert_eq!(
        runs.len(),
        1,
        "only the valid proposal made a run: {runs:?}"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_cannot_submit_and_a_wrong_password_cannot_connect() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let (observer, mut rx) = client(
        rig.addr,
        "watcher",
        "observer-dev",
        &["labctl/sim/protocols/replies/#"],
    )
    .await;
    observer
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&weigh_protocol("mqtt-obs", 1)).unwrap(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut rx, "labctl/sim/protocols/replies/mqtt-obs").await);
    assert_eq!(r["accepted"], false);
    assert_eq!(r["error"], "forbidden", "{r}");
    assert!(rig.controller.handle.runs().await.is_empty());

    // Nobody but labctl may publish results or statuses.
    observer
        .publish(
            "labctl/sim/status",
            QoS::AtLeastOnce,
            true,
            b"{\"status\":\"offline\"}".to_vec(),
        )
        .await
        .unwrap();

    let mut opts = MqttOptions::new("test-intruder", rig.addr.ip().to_string(), rig.addr.port());
    opts.set_credentials("planner-bo", "wrong");
    let (_c, mut ev) = AsyncClient::new(opts, 8);
    let outcome = tokio::time::timeout(Duration::from_secs(10), ev.poll())
        .await
        .unwrap();
    assert!(
        outcome.is_err(),
        "a wrong password must be refused: {outcome:?}"
    );

    let (_p, mut rx2) = client(
        rig.addr,
        "planner-bo",
        "planner-dev",
        &["labctl/sim/status"],
    )
    .await;
    let status = json_of(&next_on(&mut rx2, "labctl/sim/status").await);
    assert_eq!(
        status["status"], "online",
        "an observer's fake status must not land"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_submit_is_answered_on_its_response_topic_with_its_correlation_data() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let mut opts = Options5::new("test-v5", rig.addr.ip().to_string(), rig.addr.port());
    opts.set_credentials("planner-bo", "planner-dev");
    opts.set_max_packet_size(Some(8 << 20));
    let (client, mut ev) = Client5::new(opts, 64);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            let listened = match e {
                Event5::Incoming(Packet::Publish(p)) => tx.send(p).is_ok(),
                Event5::Incoming(Packet::SubAck(_)) => {
                    let _ = sub_tx.send(());
                    true
                }
                _ => true,
            };
            if !listened {
                return;
            }
        }
    });
    client
        .subscribe(
            "labctl/sim/to/planner-bo/test-v5",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), sub_rx.recv())
        .await
        .expect("SUBACK in time")
        .expect("event loop alive");
    let props = PublishProperties {
        response_topic: Some("labctl/sim/to/planner-bo/test-v5".into()),
        correlation_data: Some(b"corr-42".to_vec().into()),
        ..Default::default()
    };
    client
        .publish_with_properties(
            SUBMIT,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&weigh_protocol("mqtt-v5", 1)).unwrap(),
            props,
        )
        .await
        .unwrap();
    let p = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let corr = p
        .properties
        .as_ref()
        .and_then(|pp| pp.correlation_data.clone());
    assert_eq!(corr.as_deref(), Some(&b"corr-42"[..]));
    let reply: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(reply["accepted"], true, "{reply}");
    assert_eq!(reply["proposal_id"], "mqtt-v5");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_capabilities_submit_and_results_work_and_survive_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), None).await;
    let rig = rig_on(
        dir.path(),
        BrokerChoice::External {
            url: format!("mqtt://127.0.0.1:{}", broker.port),
            credentials: None,
        },
    )
    .await;
    assert_eq!(rig.addr, broker.addr());
    announced(rig.addr).await;
    let (planner, mut rx) = client(
        broker.addr(),
        "planner-bo",
        "unused",
        &[
            "labctl/sim/capabilities",
            "labctl/sim/runs/+/results",
            "labctl/sim/protocols/replies/#",
        ],
    )
    .await;
    let caps = next_on(&mut rx, "labctl/sim/capabilities").await;
    assert!(caps.retain);
    assert!(json_of(&caps)["protocol_schema"].is_object());
    let n = 3;
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&weigh_protocol("mosq-1", n)).unwrap(),
        )
        .await
        .unwrap();
    let reply = json_of(&next_on(&mut rx, "labctl/sim/protocols/replies/mosq-1").await);
    assert_eq!(reply["accepted"], true, "{reply}");
    let run_id = reply["run_id"].as_str().unwrap().to_owned();
    let topic = format!("labctl/sim/runs/{run_id}/results");
    for want in 1..=n as u64 {
        let p = next_on(&mut rx, &topic).await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(json_of(&p)["seq"], want);
    }

    // The broker goes away and comes back on the same port: labctl reconnects, subscribes again and
    // announces itself again (nothing retained survives this broker's restart).
    broker.stop();
    drop(planner);
    let broker = Mosquitto::start(dir.path(), Some(broker.port)).await;
    let (planner, mut rx) = client(
        broker.addr(),
        "planner-bo",
        "unused",
        &["labctl/sim/status", "labctl/sim/protocols/replies/#"],
    )
    .await;
    let status = json_of(&next_on(&mut rx, "labctl/sim/status").await);
    assert_eq!(status["status"], "online");
    // Re-subscribed: a submit is answered again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        planner
            .publish(
                SUBMIT,
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&weigh_protocol("mosq-2", 1)).unwrap(),
            )
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some(p)) if p.topic == "labctl/sim/protocols/replies/mosq-2" => {
                assert_eq!(json_of(&p)["accepted"], true);
                break;
            }
            _ if tokio::time::Instant::now() < deadline => continue,
            _ => panic!("no reply after the broker restart"),
        }
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labctl_submit_waits_for_the_run_and_exits_by_how_it_ended() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let file = dir.path().join("weigh.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&weigh_protocol("cli-1", 3)).unwrap(),
    )
    .unwrap();
    let url = format!("mqtt://{}", rig.addr);
    let submit = |user: &'static str, password: &'static str, wait: bool| {
        let (file, url) = (file.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_labctl"));
            cmd.arg("submit").arg(&file).args(["--mqtt", &url]);
            if wait {
                cmd.arg("--wait");
            }
            cmd.env("LABCTL_MQTT_USER", user)
                .env("LABCTL_MQTT_PASSWORD", password)
                .output()
                .unwrap()
        })
    };
    let out = submit("planner-bo", "planner-dev", true).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"accepted\": true"), "{stdout}");
    for seq in 1..=3 {
        assert!(
            stdout.contains(&format!("result {seq} m{} (balance)", seq - 1)),
            "{stdout}"
        );
    }
    assert!(stdout.contains("completed"), "{stdout}");

    let out = submit("watcher", "observer-dev", false).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "an observer's submit is rejected"
    );
    let out = submit("watcher", "wrong", false).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a refused login is a connection error"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_run_holds_when_its_planner_drops_off_and_telemetry_flows() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    rig.fakes["balance"].log.lock().unwrap().values = vec![("mass_g", 10.5)];
    let (_watcher, mut telemetry) = client(
        rig.addr,
        "watcher",
        "observer-dev",
        &[
            "labctl/sim/instruments/+/telemetry",
            "labctl/sim/instruments/+/state",
        ],
    )
    .await;
    let s = next_on(&mut telemetry, "labctl/sim/instruments/balance/state").await;
    assert_eq!(json_of(&s)["id"], "balance");
    let t = next_on(&mut telemetry, "labctl/sim/instruments/balance/telemetry").await;
    assert!(json_of(&t)["values"].is_object());

    // A planner whose connection can be cut.
    let mut opts = MqttOptions::new(
        "test-supervisor",
        rig.addr.ip().to_string(),
        rig.addr.port(),
    );
    opts.set_credentials("planner-bo", "planner-dev");
    let (planner, mut rx, task) = planner_whose_connection_can_be_cut(opts).await;
    let mut p = weigh_protocol("supervised-1", 1);
    p["metadata"]["supervised"] = json!(true);
    p["steps"] = json!([{ "type": "wait", "id": "hold", "duration_s": 3600 }]);
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&p).unwrap(),
        )
        .await
        .unwrap();
    let reply = json_of(&next_on(&mut rx, "labctl/sim/protocols/replies/supervised-1").await);
    let run_id = reply["run_id"].as_str().expect("accepted").to_owned();
    let api = rig.controller.handle.clone();
    let wait_state = |want: labctl::api::RunState| {
        let (api, run_id) = (api.clone(), run_id.clone());
        async move {
            for _ in 0..500 {
                if api.run(&run_id).await.map(|r| r.state) == Some(want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!(
                "run {run_id} never reached {want}: {:?}",
                api.run(&run_id).await
            );
        }
    };
    wait_state(labctl::api::RunState::Running).await;
    // The planner's process dies: its socket closes without a DISCONNECT.
    task.abort();
    drop(planner);
    wait_state(labctl::api::RunState::Paused).await;
    rig.stop().await;
}

/// A planner subscribed to the proposal replies, whose connection dies (no DISCONNECT) when its event-loop
/// task is aborted: its publishes, and that task.
async fn planner_whose_connection_can_be_cut(
    opts: MqttOptions,
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<rumqttc::Publish>,
    tokio::task::JoinHandle<()>,
) {
    let (planner, mut ev) = AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        while let Ok(e) = ev.poll().await {
            match e {
                Event::Incoming(Incoming::Publish(p)) => {
                    let _ = tx.send(p);
                }
                Event::Incoming(Incoming::SubAck(_)) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                _ => {}
            }
        }
    });
    planner
        .subscribe("labctl/sim/protocols/replies/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("SUBACK within 10 s")
        .unwrap();
    (planner, rx, task)
}

fn client_tool(name: &str) -> std::path::PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not installed (Debian package `mosquitto-clients`; scripts/test installs it)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_speak_3_1_1_and_5_to_the_embedded_broker_and_last_wills_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    announced(rig.addr).await;
    let port = rig.addr.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let port = port.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(client_tool("mosquitto_sub"))
                .args(["-h", "127.0.0.1", "-p", &port, "-V", version])
                .args(["-u", "watcher", "-P", "observer-dev"])
                .args(["-t", "labctl/sim/status", "-C", "1", "-W", "10", "-q", "1"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["status"], "online", "{version}");
    }
    // A wrong password is refused to mosquitto_sub too.
    let p = port.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(client_tool("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &p, "-u", "watcher", "-P", "nope"])
            .args(["-t", "labctl/sim/status", "-C", "1", "-W", "5"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());

    // A client with a last will dies; a subscriber gets the will.
    let (_observer, mut rx) = client(rig.addr, "alice", "technician-dev", &["test/will"]).await;
    let mut opts = MqttOptions::new("test-mortal", rig.addr.ip().to_string(), rig.addr.port());
    opts.set_credentials("planner-bo", "planner-dev");
    opts.set_last_will(rumqttc::LastWill::new(
        "test/will",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (mortal, mut ev) = AsyncClient::new(opts, 8);
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        while let Ok(event) = ev.poll().await {
            if let Event::Incoming(Incoming::ConnAck(_)) = event
                && let Some(tx) = connected_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    // The will is the broker's only once the connection is accepted.
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .expect("the mortal client connected within 10 s")
        .unwrap();
    task.abort();
    drop(mortal);
    let will = next_on(&mut rx, "test/will").await;
    assert_eq!(&will.payload[..], b"gone");
    rig.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package `openssl`)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labctl_submit_over_mqtts_verifies_the_broker_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=labctl-test-ca",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    // mosquitto started as root drops to its own user: let it read this test-only key.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    let tls_port = free_port();
    let broker = Mosquitto::start_with(
        d,
        None,
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
            d.display()
        ),
    )
    .await;
    let rig = rig_on(
        d,
        BrokerChoice::External {
            url: format!("mqtt://127.0.0.1:{}", broker.port),
            credentials: None,
        },
    )
    .await;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let file = d.join("weigh.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&weigh_protocol("tls-1", 2)).unwrap(),
    )
    .unwrap();
    let run = |ca: Option<std::path::PathBuf>, proposal: &'static str| {
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            if proposal != "tls-1" {
                std::fs::write(
                    &file,
                    serde_json::to_vec(&weigh_protocol(proposal, 1)).unwrap(),
                )
                .unwrap();
            }
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_labctl"));
            cmd.arg("submit")
                .arg(&file)
                .args(["--wait", "--mqtt", &format!("mqtts://127.0.0.1:{tls_port}")])
                .env_remove("LABCTL_MQTT_USER");
            match ca {
                Some(ca) => cmd.env("LABCTL_MQTT_CA", ca),
                None => cmd.env_remove("LABCTL_MQTT_CA"),
            };
            cmd.output().unwrap()
        })
    };
    let out = run(Some(d.join("ca.pem")), "tls-1").await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("result 2 m1 (balance)"), "{stdout}");
    // Without our CA the broker's certificate is not trusted: no connection, exit 2.
    let out = run(None, "tls-2").await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn technicians_approve_and_stop_over_mqtt_and_nobody_else_may() {
    use labctl::api::RunState;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let api = rig.controller.handle.clone();
    let (planner, mut prx) = client(
        rig.addr,
        "planner-bo",
        "planner-dev",
        &[
            "labctl/sim/protocols/replies/#",
            "labctl/sim/rejections",
            "labctl/sim/estop/state",
        ],
    )
    .await;
    let e = json_of(&next_on(&mut prx, ESTOP_STATE).await);
    assert_eq!(e["latched"], false, "retained at start: {e}");
    let (alice, mut arx) = client(
        rig.addr,
        "alice",
        "technician-dev",
        &["labctl/sim/runs/+/status"],
    )
    .await;
    let (rig1, _rrx) = client(rig.addr, "rig-1", "rig-dev", &[]).await;
    // Longer than the sim lab's auto-approval limit (3600 s): it waits for a technician.
    let mut p = weigh_protocol("approve-1", 1);
    p["steps"] = json!([{ "type": "wait", "id": "long", "duration_s": 4000 }]);
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&p).unwrap(),
        )
        .await
        .unwrap();
    let reply = json_of(&next_on(&mut prx, "labctl/sim/protocols/replies/approve-1").await);
    assert_eq!(reply["state"], "awaiting_approval", "{reply}");
    let run_id = reply["run_id"].as_str().unwrap().to_owned();
    // The approver's status carries what they decide on: why, the dry run and the validator's findings
    // (journaled with the decision to wait, not found again by validating twice). The first status, from
    // the run's creation, comes before the journal's decision; the one from the state change after it.
    let status_topic = format!("labctl/sim/runs/{run_id}/status");
    let approval = loop {
        let status = json_of(&next_on(&mut arx, &status_topic).await);
        if status["state"] == "awaiting_approval" && status["approval"]["dry_run"].is_object() {
            break status["approval"].clone();
        }
    };
    assert!(
        approval["because"]
            .as_array()
            .is_some_and(|b| !b.is_empty()),
        "{approval}"
    );
    assert!(approval["findings"].is_array(), "{approval}");
    assert!(approval["dry_run"].is_object(), "{approval}");
    let state = |api: labctl::api::ControllerHandle, run_id: String| async move {
        api.run(&run_id).await.map(|r| r.state)
    };
    let until = |want: fn(Option<RunState>) -> bool| {
        let (api, run_id) = (api.clone(), run_id.clone());
        async move {
            for _ in 0..500 {
                if want(state(api.clone(), run_id.clone()).await) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("run {run_id}: {:?}", state(api, run_id.clone()).await);
        }
    };

    // The planner may not approve its own proposal.
    let approval = format!("labctl/sim/runs/{run_id}/approval");
    planner
        .publish(&approval, QoS::AtLeastOnce, false, b"approve".to_vec())
        .await
        .unwrap();
    let r = json_of(&next_on(&mut prx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "forbidden", "{r}");
    // A technician does.
    alice
        .publish(
            &approval,
            QoS::AtLeastOnce,
            false,
            br#"{"decision": "approve"}"#.to_vec(),
        )
        .await
        .unwrap();
    until(|s| matches!(s, Some(RunState::Running))).await;

    // Another principal's run: a rig may not pause it (the planner's rejection topic shows it).
    rig1.publish(
        format!("labctl/sim/runs/{run_id}/control"),
        QoS::AtLeastOnce,
        false,
        b"pause".to_vec(),
    )
    .await
    .unwrap();
    let r = json_of(&next_on(&mut prx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "forbidden", "{r}");
    assert_eq!(
        state(api.clone(), run_id.clone()).await,
        Some(RunState::Running)
    );

    // The planner may not release an e-stop (it may trigger one: the role table); the technician triggers
    // it here and must acknowledge.
    planner
        .publish(
            "labctl/sim/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "acknowledge"}"#.to_vec(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut prx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "forbidden", "{r}");
    alice
        .publish(
            "labctl/sim/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "trigger"}"#.to_vec(),
        )
        .await
        .unwrap();
    until(|s| matches!(s, Some(RunState::Aborted))).await;
    // Everyone sees the latch and who set it, whichever interface they use.
    let e = json_of(&next_on(&mut prx, ESTOP_STATE).await);
    assert_eq!(e["latched"], true, "{e}");
    assert!(
        e["by"].as_str().is_some_and(|b| b.starts_with("alice ")),
        "{e}"
    );
    // While latched, a proposal is refused, not queued to start on the acknowledgement.
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&weigh_protocol("during-estop", 1)).unwrap(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut prx, "labctl/sim/protocols/replies/during-estop").await);
    assert_eq!(r["accepted"], false, "{r}");
    assert!(r["run_id"].is_null(), "{r}");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("emergency stop is latched")),
        "{r}"
    );
    alice
        .publish(
            "labctl/sim/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "acknowledge"}"#.to_vec(),
        )
        .await
        .unwrap();
    let e = json_of(&next_on(&mut prx, ESTOP_STATE).await);
    assert_eq!(e["latched"], false, "{e}");
    assert!(
        e["by"].as_str().is_some_and(|b| b.starts_with("alice ")),
        "{e}"
    );
    // Acknowledged: a new proposal runs again.
    planner
        .publish(
            SUBMIT,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&weigh_protocol("after-estop", 1)).unwrap(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut prx, "labctl/sim/protocols/replies/after-estop").await);
    assert_eq!(r["accepted"], true, "{r}");
    rig.stop().await;
}

/// Python's paho-mqtt, the client most planners are written with, over MQTT 3.1.1 and 5: the retained
/// capabilities, a submit answered on `protocols/replies/{proposal_id}` and (MQTT 5) on the response topic
/// with the correlation data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_planners_over_mqtt_3_1_1_and_5() {
    let python = std::env::var_os("LABCTL_TEST_PYTHON")
        .expect("LABCTL_TEST_PYTHON: a venv python with paho-mqtt (scripts/test sets it)");
    const SCRIPT: &str = r#"
import json, socket, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
host, port, version, protocol = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
v5 = version == "5"
pid = json.loads(protocol)["metadata"]["proposal_id"]
got, done, subscribed = {}, threading.Event(), threading.Event()
def on_message(client, userdata, msg):
    body = json.loads(msg.payload)
    if msg.topic == "labctl/sim/capabilities":
        got["schema"] = "protocol_schema" in body
    elif msg.topic == "labctl/sim/protocols/replies/" + pid:
        got["reply"] = body["accepted"]
    elif msg.topic == "labctl/sim/to/planner-bo/py":
        got["response_topic"] = body["accepted"]
        got["correlation"] = msg.properties.CorrelationData.decode()
    if "schema" in got and "reply" in got and (not v5 or "response_topic" in got):
        done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-" + version,
                protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
c.username_pw_set("planner-bo", "planner-dev")
c.on_message = on_message
c.on_subscribe = lambda *args: subscribed.set()
c.connect(host, port)
c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.subscribe([("labctl/sim/capabilities", 1), ("labctl/sim/protocols/replies/#", 1), ("labctl/sim/to/planner-bo/py", 1)])
c.loop_start()
if not subscribed.wait(10):
    sys.exit("no SUBACK within 10 s")
props = None
if v5:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "labctl/sim/to/planner-bo/py"
    props.CorrelationData = b"paho-corr"
c.publish("labctl/sim/protocols/submit", protocol, qos=1, properties=props)
ok = done.wait(10)
print(json.dumps(got))
c.loop_stop()
c.disconnect()
sys.exit(0 if ok else 1)
"#;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    announced(rig.addr).await;
    for version in ["3", "5"] {
        let protocol = weigh_protocol(&format!("paho-{version}"), 1).to_string();
        let (python, addr) = (python.clone(), rig.addr);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .args([
                    "-c",
                    SCRIPT,
                    &addr.ip().to_string(),
                    &addr.port().to_string(),
                    version,
                    &protocol,
                ])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "paho {version}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(got["schema"], true, "{got}");
        assert_eq!(got["reply"], true, "{got}");
        if version == "5" {
            assert_eq!(got["response_topic"], true, "{got}");
            assert_eq!(got["correlation"], "paho-corr", "{got}");
        }
    }
    rig.stop().await;
}

/// Runs a mosquitto client tool with `args` against the rig's broker and returns its output.
/// Weighing after a wait of `wait_s` (virtual) seconds.
fn long_wait_protocol(proposal_id: &str, wait_s: f64) -> Value {
    json!({
        "version": 1,
        "metadata": { "name": "long wait", "proposal_id": proposal_id, "planner": { "id": "planner-bo" } },
        "steps": [
            { "type": "wait", "duration_s": wait_s },
            { "type": "measure", "id": "w", "instrument": "balance", "action": "weigh", "params": {}, "result": "m" }
        ]
    })
}

async fn mosquitto_tool(rig: &Rig, tool: &'static str, args: Vec<String>) -> std::process::Output {
    let port = rig.addr.port().to_string();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(client_tool(tool))
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// What an unfriendly client on the lab network tries, with mosquitto's own clients: a submission whose
/// MQTT 5 response topic is another run's status topic is refused (nothing runs, the victim's status is
/// untouched), a planner cannot read a technician's replies, nobody can take the gateway's client id, and
/// an observer's approval is refused with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reply_topics_foreign_replies_and_the_gateways_client_id_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    // A victim run, waiting for approval (its estimated duration is beyond the auto-approve limit).
    let victim = rig
        .controller
        .handle
        .submit(
            serde_json::to_vec(&long_wait_protocol("victim", 7200.0)).unwrap(),
            Principal::new("planner-bo", Role::Planner, Face::InProcess),
        )
        .await;
    let victim_id = victim.run_id.clone().unwrap();
    assert_eq!(victim.state, Some(RunState::AwaitingApproval));
    let status_topic = format!("labctl/sim/runs/{victim_id}/status");
    let (_watch, mut watched) = client(
        rig.addr,
        "watcher",
        "observer-dev",
        &[&status_topic, "labctl/sim/protocols/replies/#"],
    )
    .await;
    let before = json_of(&next_on(&mut watched, &status_topic).await);
    assert_eq!(before["state"], "awaiting_approval");

    let forged = serde_json::to_string(&weigh_protocol("forged-reply", 1)).unwrap();
    let out = mosquitto_tool(
        &rig,
        "mosquitto_pub",
        strings(&[
            "-V",
            "mqttv5",
            "-u",
            "planner-bo",
            "-P",
            "planner-dev",
            "-q",
            "1",
            "-t",
            "labctl/sim/protocols/submit",
            "-m",
            &forged,
            "-D",
            "publish",
            "response-topic",
            &status_topic,
        ]),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refusal =
        json_of(&next_on(&mut watched, "labctl/sim/protocols/replies/forged-reply").await);
    assert_eq!(refusal["accepted"], false, "{refusal}");
    assert_eq!(refusal["error"], "bad_response_topic", "{refusal}");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap()
            .contains("labctl/sim/to/planner-bo/"),
        "{refusal}"
    );
    // Nothing was created for the forged submission, and the victim is still awaiting approval.
    let runs = rig.controller.handle.runs().await;
    assert!(
        runs.iter().all(|r| r.proposal_id != "forged-reply"),
        "{runs:?}"
    );
    assert_eq!(
        rig.controller.handle.run(&victim_id).await.unwrap().state,
        RunState::AwaitingApproval
    );

    // A planner subscribing to a technician's replies (or to everything) is refused by the broker.
    for filter in ["labctl/sim/to/alice/#", "labctl/sim/#", "#"] {
        let out = mosquitto_tool(
            &rig,
            "mosquitto_sub",
            strings(&[
                "-V",
                "mqttv5",
                "-u",
                "planner-bo",
                "-P",
                "planner-dev",
                "-t",
                filter,
                "-W",
                "3",
                "-C",
                "1",
            ]),
        )
        .await;
        // mosquitto_sub says so on standard error and exits 0.
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("denied"),
            "{filter}: the subscription was granted: {said:?}"
        );
    }
    // Its own reply prefix is fine.
    let out = mosquitto_tool(
        &rig,
        "mosquitto_sub",
        strings(&[
            "-V",
            "mqttv5",
            "-u",
            "planner-bo",
            "-P",
            "planner-dev",
            "-t",
            "labctl/sim/to/planner-bo/#",
            "-W",
            "1",
            "-C",
            "1",
        ]),
    )
    .await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !said.contains("denied") && said.contains("Timed out"),
        "{said:?}"
    );

    // Nobody but the gateway connects as labctl-sim: the gateway stays online.
    let out = mosquitto_tool(
        &rig,
        "mosquitto_sub",
        strings(&[
            "-V",
            "mqttv5",
            "-i",
            "labctl-sim",
            "-u",
            "alice",
            "-P",
            "technician-dev",
            "-t",
            "labctl/sim/status",
            "-C",
            "1",
            "-W",
            "3",
        ]),
    )
    .await;
    assert!(!out.status.success(), "the gateway's client id was taken");
    // An observer's approval is refused with its reason, and the victim still awaits approval.
    let (observer, mut refusals) = client(
        rig.addr,
        "watcher",
        "observer-dev",
        &["labctl/sim/rejections"],
    )
    .await;
    observer
        .publish(
            format!("labctl/sim/runs/{victim_id}/approval"),
            QoS::AtLeastOnce,
            false,
            r#"{"decision":"approve"}"#,
        )
        .await
        .unwrap();
    let refused = json_of(&next_on(&mut refusals, "labctl/sim/rejections").await);
    assert_eq!(refused["error"], "forbidden", "{refused}");
    assert_eq!(
        rig.controller.handle.run(&victim_id).await.unwrap().state,
        RunState::AwaitingApproval
    );
    rig.stop().await;
}

/// A technician's e-stop is never dropped and never waits behind work: while a planner floods 5,000
/// submissions and an observer 5,000 result replays (both acknowledged by the broker at QoS 1), the e-stop
/// latches, and every command that could not be taken is answered with the reason, never dropped in
/// silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_estop_latches_during_a_flood_of_submissions_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let (_watch, mut seen) = client(
        rig.addr,
        "watcher",
        "observer-dev",
        &[
            ESTOP_STATE,
            "labctl/sim/rejections",
            "labctl/sim/protocols/replies/#",
        ],
    )
    .await;
    let e = json_of(&next_on(&mut seen, ESTOP_STATE).await);
    assert_eq!(e["latched"], false, "{e}");
    let (planner, _p) = client(rig.addr, "planner-bo", "planner-dev", &[]).await;
    let (observer, _o) = client(rig.addr, "watcher", "observer-dev", &[]).await;
    let (alice, _a) = client(rig.addr, "alice", "technician-dev", &[]).await;
    const FLOOD: usize = 5000;
    let submissions = tokio::spawn(async move {
        for i in 0..FLOOD {
            let body = serde_json::to_vec(&weigh_protocol(&format!("flood-{i}"), 1)).unwrap();
            planner
                .publish(SUBMIT, QoS::AtLeastOnce, false, body)
                .await
                .unwrap();
        }
        planner
    });
    let replays = tokio::spawn(async move {
        for _ in 0..FLOOD {
            observer
                .publish(
                    "labctl/sim/runs/no-such-run/control",
                    QoS::AtLeastOnce,
                    false,
                    br#"{"action": "replay", "after": 0}"#.to_vec(),
                )
                .await
                .unwrap();
        }
        observer
    });
    // In the thick of it.
    let mut refused_for_load = 0usize;
    tokio::time::timeout(Duration::from_secs(30), async {
        while refused_for_load < 50 {
            let r = json_of(&seen.recv().await.expect("the watcher's connection"));
            if matches!(r["error"].as_str(), Some("rate_limited" | "overloaded")) {
                assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
                refused_for_load += 1;
            }
        }
    })
    .await
    .expect("no command of the flood was refused for load within 30 s");
    let sent = std::time::Instant::now();
    alice
        .publish(
            "labctl/sim/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "trigger"}"#.to_vec(),
        )
        .await
        .unwrap();
    let latched = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let p = seen.recv().await.expect("the watcher's connection");
            if p.topic == ESTOP_STATE && json_of(&p)["latched"] == true {
                return;
            }
        }
    })
    .await;
    assert!(
        latched.is_ok(),
        "the e-stop did not latch within 5 s of being sent during the flood"
    );
    println!(
        "e-stop latched {:.1} ms after it was sent, during a flood of {FLOOD} submissions and {FLOOD} replays",
        sent.elapsed().as_secs_f64() * 1000.0
    );
    let _ = submissions.await;
    let _ = replays.await;
    rig.stop().await;
}

/// The shipped mosquitto ACL (`docs/mosquitto.acl`) keeps each user's replies private on an external
/// broker: labctl answers the planner on its reply prefix, and an observer subscribed to that prefix gets
/// nothing (it does get the same reply's public copy, which labctl sends after the private one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_with_the_shipped_acl_replies_stay_private() {
    let dir = tempfile::tempdir().unwrap();
    let mosq = mosquitto_with_shipped_acl(dir.path()).await;
    let rig = rig_on(
        dir.path(),
        BrokerChoice::External {
            url: format!("mqtt://127.0.0.1:{}", mosq.port),
            credentials: Some(("labctl".into(), "labctl-pw".into())),
        },
    )
    .await;
    let private = "labctl/sim/to/planner-bo/#";
    let (_p, mut planner) = client(
        rig.addr,
        "planner-bo",
        "planner-dev",
        &[private, "labctl/sim/status"],
    )
    .await;
    // labctl announces itself after subscribing: once it is online, its subscriptions are in place.
    while json_of(&next_on(&mut planner, "labctl/sim/status").await)["status"] != "online" {}
    let (_w, mut watcher) = client(
        rig.addr,
        "watcher",
        "observer-dev",
        &[private, "labctl/sim/protocols/replies/#"],
    )
    .await;
    let body = serde_json::to_string(&weigh_protocol("acl-1", 1)).unwrap();
    let out = mosquitto_tool(
        &rig,
        "mosquitto_pub",
        strings(&[
            "-V",
            "mqttv5",
            "-u",
            "planner-bo",
            "-P",
            "planner-dev",
            "-q",
            "1",
            "-t",
            "labctl/sim/from/planner-bo/protocols/submit",
            "-m",
            &body,
            "-D",
            "publish",
            "response-topic",
            "labctl/sim/to/planner-bo/acl-test",
        ]),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mine = json_of(&next_on(&mut planner, "labctl/sim/to/planner-bo/acl-test").await);
    assert_eq!(mine["accepted"], true, "{mine}");
    // The watcher's first message is the public copy: the private one never reached it.
    let first = tokio::time::timeout(Duration::from_secs(10), watcher.recv())
        .await
        .expect("the public reply within 10 s")
        .expect("the watcher's connection");
    assert_eq!(first.topic, "labctl/sim/protocols/replies/acl-1");
    rig.stop().await;
}

/// The embedded broker's `mqtts` listener: its certificate is made on first start under the data
/// directory (the key 0600); mosquitto_sub and `labctl submit` trust that file and get in, a client that
/// does not trust it or speaks clear text does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_serves_mqtt_over_tls_with_a_certificate_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig_full(
        dir.path(),
        BrokerChoice::Embedded("127.0.0.1:0".parse().unwrap()),
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await;
    let tls = rig
        .gateway
        .as_ref()
        .and_then(|g| g.tls_addr)
        .expect("a TLS listener");
    let cert = dir.path().join("tls/server-cert.pem");
    assert!(cert.is_file());
    let sub = |cafile: std::path::PathBuf, host: &'static str| {
        let port = tls.port().to_string();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(client_tool("mosquitto_sub"))
                .args(["-h", host, "-p", &port, "--cafile"])
                .arg(cafile)
                .args(["-u", "watcher", "-P", "observer-dev"])
                .args(["-t", "labctl/sim/status", "-C", "1", "-W", "10"])
                .output()
                .unwrap()
        })
    };
    for host in ["127.0.0.1", "localhost"] {
        let out = sub(cert.clone(), host).await.unwrap();
        assert!(
            out.status.success(),
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["status"], "online");
    }
    // Another certificate authority: the handshake fails, nothing is received.
    let other = dir.path().join("other-ca.pem");
    openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=someone-else",
            "-keyout",
            "other-key.pem",
            "-out",
            "other-ca.pem",
        ],
    );
    let out = sub(other, "127.0.0.1").await.unwrap();
    assert!(!out.status.success() && out.stdout.is_empty());
    // Clear text on the TLS port gets nothing either.
    let port = tls.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(client_tool("mosquitto_sub"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-u",
                "watcher",
                "-P",
                "observer-dev",
            ])
            .args(["-t", "labctl/sim/status", "-C", "1", "-W", "5"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success() && out.stdout.is_empty());
    // labctl's own client (rustls, host name verified) submits and follows a run over it.
    let file = dir.path().join("weigh.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&weigh_protocol("mqtts-1", 1)).unwrap(),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_labctl"))
            .arg("submit")
            .arg(&file)
            .args([
                "--wait",
                "--mqtt",
                &format!("mqtts://localhost:{}", tls.port()),
            ])
            .env("LABCTL_MQTT_CA", &cert)
            .env("LABCTL_MQTT_USER", "planner-bo")
            .env("LABCTL_MQTT_PASSWORD", "planner-dev")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    rig.stop().await;
}

/// mosquitto with `docs/mosquitto.acl` and a password file for labctl and the simulated lab's users.
async fn mosquitto_with_shipped_acl(dir: &Path) -> Mosquitto {
    let passwords = dir.join("passwd");
    for (user, password) in [
        ("labctl", "labctl-pw"),
        ("planner-bo", "planner-dev"),
        ("watcher", "observer-dev"),
        ("alice", "technician-dev"),
    ] {
        let mut command = std::process::Command::new(client_tool("mosquitto_passwd"));
        if !passwords.exists() {
            command.arg("-c");
        }
        let status = command
            .arg("-b")
            .arg(&passwords)
            .args([user, password])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/mosquitto.acl");
    Mosquitto::start_with(
        dir,
        None,
        &format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n",
            passwords.display(),
            acl.display()
        ),
    )
    .await
}

/// Roles over an external broker: through mosquitto with the shipped ACL, each user sends commands under
/// `labctl/sim/from/{user}/`, which only that user may write, so labctl knows who sent them. A technician
/// approves and stops the lab over it; a planner cannot publish in the technician's name (mosquitto drops
/// it: the planner's next command, a bad one, is the first refusal labctl sends), and the latch holds until
/// the technician acknowledges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_acl_technicians_approve_and_stop_and_nobody_impersonates() {
    let dir = tempfile::tempdir().unwrap();
    let mosq = mosquitto_with_shipped_acl(dir.path()).await;
    let rig = rig_on(
        dir.path(),
        BrokerChoice::External {
            url: format!("mqtt://127.0.0.1:{}", mosq.port),
            credentials: Some(("labctl".into(), "labctl-pw".into())),
        },
    )
    .await;
    let (planner, mut prx) = client(
        rig.addr,
        "planner-bo",
        "planner-dev",
        &[
            "labctl/sim/protocols/replies/#",
            "labctl/sim/rejections",
            ESTOP_STATE,
            "labctl/sim/status",
        ],
    )
    .await;
    // labctl announces itself after subscribing: once it is online, its subscriptions are in place.
    while json_of(&next_on(&mut prx, "labctl/sim/status").await)["status"] != "online" {}
    let (alice, _arx) = client(rig.addr, "alice", "technician-dev", &[]).await;
    // A proposal that needs a technician, sent in the planner's own name.
    planner
        .publish(
            "labctl/sim/from/planner-bo/protocols/submit",
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&long_wait_protocol("ext-approve", 7200.0)).unwrap(),
        )
        .await
        .unwrap();
    let reply = json_of(&next_on(&mut prx, "labctl/sim/protocols/replies/ext-approve").await);
    assert_eq!(reply["state"], "awaiting_approval", "{reply}");
    let run_id = reply["run_id"].as_str().unwrap().to_owned();
    let info = rig.controller.handle.run(&run_id).await.unwrap();
    assert_eq!(
        info.submitted_by, "planner-bo",
        "the run is the planner's, not `mqtt`'s"
    );
    // The planner may not approve it (the controller refuses, with the reason) ...
    planner
        .publish(
            format!("labctl/sim/from/planner-bo/runs/{run_id}/approval"),
            QoS::AtLeastOnce,
            false,
            br#"{"decision": "approve"}"#.to_vec(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut prx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "forbidden", "{r}");
    // ... and the technician does, over the same broker.
    alice
        .publish(
            format!("labctl/sim/from/alice/runs/{run_id}/approval"),
            QoS::AtLeastOnce,
            false,
            br#"{"decision": "approve"}"#.to_vec(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.controller.handle.run(&run_id).await.unwrap().state == RunState::AwaitingApproval {
        assert!(
            Instant::now() < deadline,
            "the technician's approval never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The technician stops the lab.
    alice
        .publish(
            "labctl/sim/from/alice/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "trigger"}"#.to_vec(),
        )
        .await
        .unwrap();
    loop {
        let e = json_of(&next_on(&mut prx, ESTOP_STATE).await);
        if e["latched"] == true {
            assert!(
                e["by"].as_str().is_some_and(|b| b.starts_with("alice ")),
                "{e}"
            );
            break;
        }
    }
    // The planner tries to release it in alice's name: mosquitto drops it. Its next message, a malformed
    // e-stop command in its own name, takes the same path in labctl after it, and comes back refused first.
    planner
        .publish(
            "labctl/sim/from/alice/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "acknowledge"}"#.to_vec(),
        )
        .await
        .unwrap();
    planner
        .publish(
            "labctl/sim/from/planner-bo/estop",
            QoS::AtLeastOnce,
            false,
            b"not json".to_vec(),
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut prx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "malformed", "{r}");
    // Still latched: the controller refuses a technician's submission for it.
    let refused = rig
        .controller
        .handle
        .submit(
            serde_json::to_vec(&weigh_protocol("while-latched", 1)).unwrap(),
            Principal::new("alice", Role::Technician, Face::InProcess),
        )
        .await;
    assert_eq!(
        refused.error,
        Some(labctl::api::ApiError::EStopLatched),
        "{refused:?}"
    );
    alice
        .publish(
            "labctl/sim/from/alice/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "acknowledge"}"#.to_vec(),
        )
        .await
        .unwrap();
    loop {
        let e = json_of(&next_on(&mut prx, ESTOP_STATE).await);
        if e["latched"] == false {
            break;
        }
    }
    rig.stop().await;
    drop(mosq);
}

/// Where `name` stands, as the controller says.
async fn interlock_state(rig: &Rig, name: &str) -> labctl::api::InterlockState {
    rig.controller
        .handle
        .interlocks()
        .await
        .into_iter()
        .find(|i| i.name == name)
        .expect("the interlock exists")
        .state
}

async fn wait_interlock(rig: &Rig, name: &str, want: fn(&labctl::api::InterlockState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = interlock_state(rig, name).await;
        if want(&state) {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: still {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_technician_overrides_a_tripped_interlock_over_mqtt_and_nobody_else_can() {
    use labctl::api::InterlockState;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    rig.fakes["pump-red"].log.lock().unwrap().state =
        Some(labctl_drivers::DeviceState::Alarm("stall".into()));
    wait_interlock(&rig, "pump-alarm", |s| {
        matches!(s, InterlockState::Tripped { .. })
    })
    .await;
    let topic = "labctl/sim/interlocks/pump-alarm/override";
    let rejections = "labctl/sim/rejections";
    let (planner, mut planner_rx) =
        client(rig.addr, "planner-bo", "planner-dev", &[rejections]).await;
    let (alice, mut alice_rx) = client(rig.addr, "alice", "technician-dev", &[rejections]).await;
    let (_watcher, mut watcher_rx) = client(
        rig.addr,
        "watcher",
        "observer-dev",
        &["labctl/sim/interlocks"],
    )
    .await;
    // The retained list shows every interlock and where it stands, to everyone.
    let pump_alarm = |list: &Value| {
        list.as_array()
            .and_then(|l| l.iter().find(|i| i["name"] == "pump-alarm"))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let mut interlocks_until = async |want: &str| loop {
        let list = json_of(&next_on(&mut watcher_rx, "labctl/sim/interlocks").await);
        if pump_alarm(&list)["state"] == want {
            return pump_alarm(&list);
        }
    };
    interlocks_until("tripped").await;
    let set = json!({"seconds": 600, "reason": "stall sensor faulty, pump checked by hand"});
    // A planner may not override: refused by the role table, the interlock still acts.
    planner
        .publish(topic, QoS::AtLeastOnce, false, set.to_string())
        .await
        .unwrap();
    let refused = json_of(&next_on(&mut planner_rx, rejections).await);
    assert_eq!(refused["error"], "forbidden", "{refused}");
    assert!(matches!(
        interlock_state(&rig, "pump-alarm").await,
        InterlockState::Tripped { .. }
    ));
    // Every subscriber sees a refusal (an MQTT 5 response topic keeps one private): alice saw it too.
    assert_eq!(json_of(&next_on(&mut alice_rx, rejections).await), refused);
    // A technician's override without a reason is refused naming the field.
    alice
        .publish(topic, QoS::AtLeastOnce, false, r#"{"seconds": 600}"#)
        .await
        .unwrap();
    let malformed = json_of(&next_on(&mut alice_rx, rejections).await);
    assert_eq!(malformed["error"], "malformed", "{malformed}");
    assert!(
        malformed["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reason")),
        "{malformed}"
    );
    // With one, it stands, in her name.
    alice
        .publish(topic, QoS::AtLeastOnce, false, set.to_string())
        .await
        .unwrap();
    wait_interlock(&rig, "pump-alarm", |s| {
        matches!(s, InterlockState::Overridden { by, .. } if by == "alice (Technician via mqtt)")
    })
    .await;
    let shown = interlocks_until("overridden").await;
    assert_eq!(shown["by"], "alice (Technician via mqtt)", "{shown}");
    assert_eq!(
        shown["because"],
        "stall sensor faulty, pump checked by hand"
    );
    // Withdrawn while the alarm holds: the interlock trips again at once.
    alice
        .publish(topic, QoS::AtLeastOnce, false, r#"{"action": "withdraw"}"#)
        .await
        .unwrap();
    wait_interlock(&rig, "pump-alarm", |s| {
        matches!(s, InterlockState::Tripped { .. })
    })
    .await;
    interlocks_until("tripped").await;
    rig.stop().await;
}

/// The planner lease through an external broker, which tells labctl nothing of its clients' connections:
/// a planner's will on its own presence topic (`from/{user}/presence`, as `labctl submit` sets it) holds
/// its supervised run when its connection dies; another user cannot say the planner went away, because
/// the shipped ACL lets only the planner write under its own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_a_planner_s_will_holds_its_supervised_run_and_nobody_can_forge_it() {
    let dir = tempfile::tempdir().unwrap();
    let mosq = mosquitto_with_shipped_acl(dir.path()).await;
    let rig = rig_on(
        dir.path(),
        BrokerChoice::External {
            url: format!("mqtt://127.0.0.1:{}", mosq.port),
            credentials: Some(("labctl".into(), "labctl-pw".into())),
        },
    )
    .await;
    let (_watcher, mut wrx) =
        client(rig.addr, "watcher", "observer-dev", &["labctl/sim/status"]).await;
    // labctl announces itself after subscribing: once it is online, its subscriptions are in place.
    while json_of(&next_on(&mut wrx, "labctl/sim/status").await)["status"] != "online" {}

    // The planner, with its will on its presence topic.
    let mut opts = MqttOptions::new("lease-planner", rig.addr.ip().to_string(), rig.addr.port());
    opts.set_credentials("planner-bo", "planner-dev");
    opts.set_last_will(rumqttc::LastWill::new(
        "labctl/sim/from/planner-bo/presence",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (planner, mut prx, task) = planner_whose_connection_can_be_cut(opts).await;
    planner
        .publish(
            "labctl/sim/from/planner-bo/presence",
            QoS::AtLeastOnce,
            false,
            "online",
        )
        .await
        .unwrap();
    let mut p = weigh_protocol("ext-lease", 1);
    p["metadata"]["supervised"] = json!(true);
    p["steps"] = json!([{ "type": "wait", "id": "hold", "duration_s": 3000 }]);
    planner
        .publish(
            "labctl/sim/from/planner-bo/protocols/submit",
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&p).unwrap(),
        )
        .await
        .unwrap();
    let reply = json_of(&next_on(&mut prx, "labctl/sim/protocols/replies/ext-lease").await);
    let run_id = reply["run_id"].as_str().expect("accepted").to_owned();
    let api = rig.controller.handle.clone();
    let state_of = |run_id: String| {
        let api = api.clone();
        async move { api.run(&run_id).await.map(|r| r.state) }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(run_id.clone()).await != Some(RunState::Running) {
        assert!(Instant::now() < deadline, "the supervised run never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Alice says the planner went away, in the planner's name: mosquitto drops it. Her next command, on
    // her own prefix, is answered, so the gateway has seen everything she sent before it.
    let (alice, mut arx) = client(
        rig.addr,
        "alice",
        "technician-dev",
        &["labctl/sim/rejections"],
    )
    .await;
    alice
        .publish(
            "labctl/sim/from/planner-bo/presence",
            QoS::AtLeastOnce,
            false,
            "offline",
        )
        .await
        .unwrap();
    alice
        .publish(
            "labctl/sim/from/alice/runs/no-such-run/control",
            QoS::AtLeastOnce,
            false,
            "pause",
        )
        .await
        .unwrap();
    let r = json_of(&next_on(&mut arx, "labctl/sim/rejections").await);
    assert_eq!(r["error"], "unknown_run", "{r}");
    assert_eq!(
        state_of(run_id.clone()).await,
        Some(RunState::Running),
        "a forged presence held the planner's run"
    );

    // The planner's process dies: its socket closes without a DISCONNECT, mosquitto publishes its will.
    task.abort();
    drop(planner);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = api.run(&run_id).await.expect("the run");
        if info.state == RunState::Paused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not go to its safe hold when the planner's will arrived: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.stop().await;
}
