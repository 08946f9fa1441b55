//! The console's MQTT link: one task owns the rumqttc event loop, subscribes again on every ConnAck
//! (a clean session forgets subscriptions), backs off while the broker is away, and hands every message to
//! the UI. Commands go out as MQTT 5 publishes with a private response topic, so the controller's answer
//! (accepted or why not) comes back to this console alone.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

use labctl_mqtt_link::Topics;
use labctl_mqtt_link::{BrokerUrl, MAX_PACKET, backoff, tls_config};

/// What the link tells the UI.
#[derive(Debug)]
pub enum LinkEvent {
    Connected,
    Down(String),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// The controller's answer to one of this console's commands; `label` says which.
    Answer {
        label: String,
        payload: Vec<u8>,
    },
}

/// Sends commands on the link.
#[derive(Clone)]
pub struct Commander {
    client: AsyncClient,
    reply_topic: String,
}

impl Commander {
    /// Publishes a command (QoS 1, not retained) whose answer comes back as [`LinkEvent::Answer`] with `label`.
    pub async fn send(
        &self,
        topic: String,
        body: Vec<u8>,
        label: &str,
    ) -> Result<(), rumqttc::v5::ClientError> {
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(label.as_bytes().to_vec().into()),
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body, props)
            .await
    }

    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

/// What the console subscribes to: everything a technician watches, and its own replies.
pub fn filters(topics: &Topics, reply_topic: &str) -> Vec<String> {
    let p = topics.prefix();
    vec![
        topics.status(),
        format!("{p}instruments/+/state"),
        format!("{p}instruments/+/telemetry"),
        format!("{p}runs/+/status"),
        format!("{p}runs/+/events"),
        format!("{p}runs/+/results"),
        topics.rejections(),
        topics.estop_state(),
        topics.interlocks(),
        reply_topic.to_owned(),
    ]
}

/// Starts the link; it runs until the returned receiver is dropped.
pub fn start(
    broker: &BrokerUrl,
    credentials: Option<(String, String)>,
    lab_id: &str,
) -> Result<(Commander, mpsc::UnboundedReceiver<LinkEvent>), String> {
    let client_id = format!(
        "labctl-console-{}-{}",
        std::process::id(),
        labctl_contract::now_ms()
    );
    let mut opts = MqttOptions::new(client_id.clone(), broker.host.clone(), broker.port);
    // A short keep-alive notices a vanished broker within seconds.
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_start(true);
    opts.set_max_packet_size(Some(MAX_PACKET as u32));
    let user = credentials
        .as_ref()
        .map_or_else(|| "anonymous".to_owned(), |(user, _)| user.clone());
    if let Some((user, password)) = credentials {
        opts.set_credentials(user, password);
    }
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    opts.set_network_options(net);
    if broker.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            tls_config().map_err(|e| e.to_string())?,
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let topics = Topics::new(lab_id);
    // Only labctl writes under the user's reply prefix and only this user reads it: an answer there is
    // labctl's (the broker enforces it).
    let reply_topic = format!("{}{client_id}", topics.reply_prefix(&user));
    let filters = filters(&topics, &reply_topic);
    let (tx, rx) = mpsc::unbounded_channel();
    let commander = Commander {
        client: client.clone(),
        reply_topic: reply_topic.clone(),
    };
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let event = eventloop.poll().await;
            let sent = match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    for f in &filters {
                        // Queued in the client; sent in order before anything else on this connection.
                        let _ = client.try_subscribe(f.clone(), QoS::AtLeastOnce);
                    }
                    tx.send(LinkEvent::Connected)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if topic == reply_topic {
                        let label = p
                            .properties
                            .as_ref()
                            .and_then(|pp| pp.correlation_data.as_ref())
                            .map(|c| String::from_utf8_lossy(c).into_owned())
                            .unwrap_or_default();
                        tx.send(LinkEvent::Answer {
                            label,
                            payload: p.payload.to_vec(),
                        })
                    } else {
                        tx.send(LinkEvent::Message {
                            topic,
                            payload: p.payload.to_vec(),
                        })
                    }
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let r = tx.send(LinkEvent::Down(describe(&e)));
                    tokio::time::sleep(backoff(failures).max(Duration::from_millis(200))).await;
                    r
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    Ok((commander, rx))
}

/// A short reason a technician can act on.
fn describe(e: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => format!("login refused ({code:?})"),
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "broker unreachable (connection refused)".into()
        }
        other => {
            let text = other.to_string();
            if text.is_empty() {
                "connection lost".into()
            } else {
                text
            }
        }
    }
}
