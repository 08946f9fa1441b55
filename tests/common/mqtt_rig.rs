//! The MQTT rig the integration tests (tests/mqtt.rs) and the MQTT bench (benches/mqtt.rs) share: the
//! controller on fake instruments with the MQTT gateway on the embedded broker or on mosquitto, rumqttc
//! clients, and a mosquitto broker of its own. Included with `#[path]` next to `tests/common/mod.rs`
//! (as `common`), whose controller it starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use labctl::controller::Controller;
use labctl::gateways::mqtt::{BrokerChoice, MqttConfig, MqttGateway};
use labctl::instruments::fake::FakeInstrument;
use labctl_protocols::Lab;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The controller on the sim lab's fake instruments and the MQTT gateway; [`Rig::stop`] shuts both down.
pub struct Rig {
    pub controller: Controller,
    pub fakes: BTreeMap<String, FakeInstrument>,
    /// Its `tls_addr` is the embedded broker's MQTT-over-TLS listener, when [`rig_full`] asked for one.
    pub gateway: Option<MqttGateway>,
    /// The broker's plain MQTT address.
    pub addr: SocketAddr,
}

impl Rig {
    pub async fn stop(mut self) {
        if let Some(gw) = self.gateway.take() {
            gw.shutdown().await;
        }
        self.controller.shutdown().await;
    }
}

/// The rig on the embedded broker, on a free loopback port.
pub async fn rig(dir: &Path) -> Rig {
    rig_on(dir, BrokerChoice::Embedded("127.0.0.1:0".parse().unwrap())).await
}

/// The rig with the gateway on `broker`.
pub async fn rig_on(dir: &Path, broker: BrokerChoice) -> Rig {
    rig_full(dir, broker, None).await
}

/// [`rig_on`], with the embedded broker's MQTT-over-TLS listener on `tls_listen` when given.
pub async fn rig_full(dir: &Path, broker: BrokerChoice, tls_listen: Option<SocketAddr>) -> Rig {
    let lab = Lab::sim();
    let (controller, fakes, _) = crate::common::controller_on_fakes(dir, lab.clone(), |_| {}).await;
    let users = Arc::new(labctl::auth::Users::from_lab(&lab).unwrap());
    let gateway = MqttGateway::start(
        controller.handle.clone(),
        MqttConfig {
            lab,
            data_dir: dir.to_owned(),
            broker,
            users,
            tls_listen,
        },
    )
    .await
    .unwrap();
    let addr: SocketAddr = gateway.broker_addr.parse().unwrap();
    assert_ne!(addr.port(), 0);
    Rig {
        controller,
        fakes,
        gateway: Some(gateway),
        addr,
    }
}

/// An MQTT 3.1.1 client; returns once connected, with the messages it receives.
pub async fn client(
    addr: SocketAddr,
    user: &str,
    password: &str,
    subscriptions: &[&str],
) -> (AsyncClient, mpsc::UnboundedReceiver<rumqttc::Publish>) {
    let mut opts = MqttOptions::new(
        format!("test-{user}-{}", rand_suffix()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_credentials(user, password);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
    let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    let _ = conn_tx.send(Ok(ack.code));
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    let _ = sub_tx.send(ack.return_codes);
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = conn_tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    let connected = tokio::time::timeout(Duration::from_secs(10), conn_rx.recv())
        .await
        .expect("connack in time")
        .expect("event loop alive");
    assert!(connected.is_ok(), "{user} could not connect: {connected:?}");
    for s in subscriptions {
        client.subscribe(*s, QoS::AtLeastOnce).await.unwrap();
    }
    // The broker has the subscriptions once it acknowledged them: only then may the test publish.
    for s in subscriptions {
        let codes = tokio::time::timeout(Duration::from_secs(10), sub_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{user}: no SUBACK for {s} in time"))
            .expect("event loop alive");
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            "{user}: the broker refused a subscription among {subscriptions:?}: {codes:?}"
        );
    }
    (client, rx)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The next message on `topic` (others are skipped).
pub async fn next_on(
    rx: &mut mpsc::UnboundedReceiver<rumqttc::Publish>,
    topic: &str,
) -> rumqttc::Publish {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing on {topic} within 10 s"))
            .expect("client alive");
        if p.topic == topic {
            return p;
        }
    }
}

/// A message's payload as JSON.
pub fn json_of(p: &rumqttc::Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.topic))
}

/// A protocol of `n` weighings with its own proposal id.
pub fn weigh_protocol(proposal_id: &str, n: usize) -> Value {
    let steps: Vec<Value> = (0..n)
        .map(|i| json!({ "type": "measure", "id": format!("w{i}"), "instrument": "balance", "action": "weigh", "params": {}, "result": format!("m{i}") }))
        .collect();
    json!({
        "version": 1,
        "metadata": { "name": "weigh", "proposal_id": proposal_id, "planner": { "id": "planner-bo" } },
        "steps": steps
    })
}

/// Where planners submit protocols to the sim lab.
pub const SUBMIT: &str = "labctl/sim/protocols/submit";

/// A mosquitto broker of its own on a free loopback port, started from a config file (the `-p` form can
/// silently bind only `[::1]`), killed on drop.
pub struct Mosquitto {
    child: std::process::Child,
    pub port: u16,
    conf: std::path::PathBuf,
}

fn mosquitto_binary() -> std::path::PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return p;
        }
    }
    panic!("mosquitto is not installed (Debian package `mosquitto`; scripts/test installs it)");
}

impl Mosquitto {
    pub async fn start(dir: &Path, port: Option<u16>) -> Mosquitto {
        Self::start_with(dir, port, "").await
    }

    /// With more configuration lines after the plain listener (e.g. a TLS listener).
    pub async fn start_with(dir: &Path, port: Option<u16>, extra: &str) -> Mosquitto {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "allow_anonymous true\npersistence false\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\n{extra}"
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto");
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Mosquitto { child, port, conf };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("mosquitto did not listen on 127.0.0.1:{port}");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.conf);
    }
}
