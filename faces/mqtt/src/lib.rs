//! The MQTT gateway: planners, consoles and observers talk to labctl over MQTT (topics and
//! payloads in `docs/mqtt.md`).
//!
//! May depend on: the core's API, the MQTT link and the lab language. Never on the drivers or another face.
//!
//! - [`payload`] is pure: JSON payloads, size limits, rejections; the topic names are the link's
//!   (crate `labctl-mqtt-link`), shared with the clients.
//! - [`broker`] is the embedded broker (MQTT 3.1.1 and 5 on one port), used unless `--mqtt URL` names an
//!   external one.
//! - This module runs the I/O: one task owns the rumqttc event loop (re-subscribes and announces itself on
//!   every ConnAck, backs off with jitter while the broker is away), one forwards the journal's committed
//!   records (run status, events, results with their per-run `seq`; a lag is caught up from the journal),
//!   one publishes instrument states when they change. Inbound commands take two paths: e-stop triggers and
//!   acknowledgements have their own queue and task, ahead of everything; the rest wait in a bounded queue
//!   fair between senders ([`fair_queue`]) and are handled one at a time, each sender's in order.
//!   Submissions and replays are rate-limited per sender. A command that cannot be queued or is over its
//!   sender's rate gets a refusal (`overloaded`, `rate_limited`), never a silent drop.
//!
//! Who sent a command: the embedded broker stamps each publish with the authenticated user
//! (`x-mqtt-sender`), and the gateway takes the role from the lab's users. An external broker cannot be
//! trusted to do that, so there every sender is the one principal `mqtt` with the planner role: it may
//! submit and control runs submitted over MQTT, never approve or release an e-stop; restrict who may
//! publish and read with the broker's ACL (`docs/mosquitto.acl`, tested against mosquitto).

pub mod broker;
pub mod fair_queue;
pub mod payload;

use labctl_core::api::Face;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use self::broker::{EmbeddedBroker, GATEWAY_USER};
use self::fair_queue::{FairQueue, Full};
use self::payload::{ControlRequest, Decision, EStopAction, Outbound, OverrideRequest, Rejection};
use labctl_core::api::{ApiError, ControllerHandle, Principal, RunState};
use labctl_core::auth::Users;
use labctl_core::contract::messages::{EStopState, InstrumentState};
use labctl_core::journal::{self, Record};
use labctl_core::world::LabSnapshot;
use labctl_mqtt_link::{Inbound, Presence, Topics, backoff, parse_broker_url, tls_config};

/// Where the gateway connects.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// Start the embedded broker on this address (port 0: a free port).
    Embedded(SocketAddr),
    /// An external broker: `mqtt://host:port`, with optional credentials.
    External {
        url: String,
        credentials: Option<(String, String)>,
    },
}

pub struct MqttConfig {
    pub lab: Lab,
    pub data_dir: PathBuf,
    pub broker: BrokerChoice,
    pub users: Arc<Users>,
    /// The embedded broker's MQTT-over-TLS listener (port 0: a free one), if any.
    pub tls_listen: Option<SocketAddr>,
}

struct Shared {
    api: ControllerHandle,
    topics: Topics,
    client: AsyncClient,
    lab_id: String,
    started_at_ms: i64,
    capabilities: Vec<u8>,
    users: Arc<Users>,
    /// The embedded broker vouches for `x-mqtt-sender`.
    trust_sender: bool,
    stopping: AtomicBool,
    data_dir: PathBuf,
    /// Planner ids each MQTT user has submitted runs for (the planner lease of supervised runs).
    planners: std::sync::Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    /// The last `estop/state` published, published again on every ConnAck (an external broker may have
    /// lost its retained messages).
    estop_state: std::sync::Mutex<Vec<u8>>,
    /// Submissions and replays each sender may still send now.
    rates: std::sync::Mutex<HashMap<String, TokenBucket>>,
}

/// Commands waiting for the gateway: e-stops on their own path, the rest fair between senders.
struct InboundQueues {
    estop: mpsc::Sender<Publish>,
    fair: Arc<std::sync::Mutex<FairQueue<Publish>>>,
    ready: Arc<tokio::sync::Notify>,
}

/// E-stop messages waiting at most (each is handled in microseconds: only a flood of them fills it).
pub const ESTOP_QUEUE: usize = 256;
/// Commands one sender may have waiting, and all senders together.
pub const PER_SENDER_QUEUE: usize = 64;
pub const INBOUND_QUEUE: usize = 1024;
/// Submissions and replays per second a sender may send on average, and in a burst.
pub const WORK_RATE_PER_S: f64 = 20.0;
pub const WORK_BURST: f64 = 200.0;

/// A per-sender allowance of costly commands (submissions: validation, a dry run and an fsync each;
/// replays: a journal read and a publish per result).
struct TokenBucket {
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    fn take(&mut self, now: std::time::Instant) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * WORK_RATE_PER_S;
        self.tokens = (self.tokens + refill).min(WORK_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A running MQTT gateway (and the embedded broker, when it started one).
pub struct MqttGateway {
    /// Where clients connect: the embedded broker's address, or the external broker's host and port.
    pub broker_addr: String,
    /// The embedded broker's MQTT-over-TLS address, when it serves one.
    pub tls_addr: Option<SocketAddr>,
    pub embedded: bool,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    broker: Option<EmbeddedBroker>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The external broker's URL, TLS or credentials.
    #[error(transparent)]
    Link(#[from] labctl_mqtt_link::LinkError),
    /// The embedded broker's TLS certificate.
    #[error("embedded MQTT broker TLS: {0}")]
    Tls(#[from] labctl_core::tls::TlsError),
    #[error("embedded MQTT broker on {listen}: {reason}")]
    Broker { listen: SocketAddr, reason: String },
}

impl MqttGateway {
    pub async fn start(
        api: ControllerHandle,
        config: MqttConfig,
    ) -> Result<MqttGateway, StartError> {
        let lab_id = config.lab.lab_id.clone();
        let topics = Topics::new(&lab_id);
        let (presence_tx, presence_rx) = mpsc::unbounded_channel();
        let mut tls = None;
        let mut tls_addr = None;
        let (broker, host, port, credentials, trust_sender) = match &config.broker {
            BrokerChoice::Embedded(listen) => {
                let tls = match config.tls_listen {
                    Some(addr) => {
                        let files = labctl_core::tls::load_or_create(
                            &config.data_dir,
                            &[addr.ip().to_string()],
                        )?;
                        Some((addr, files.cert_path, files.key_path))
                    }
                    None => None,
                };
                let b =
                    EmbeddedBroker::start(*listen, tls, config.users.clone(), &lab_id, presence_tx)
                        .await?;
                tls_addr = b.tls_addr;
                let host = b.addr.ip().to_string();
                let port = b.addr.port();
                let creds = Some((GATEWAY_USER.to_owned(), b.gateway_password.clone()));
                (Some(b), host, port, creds, true)
            }
            BrokerChoice::External { url, credentials } => {
                let b = parse_broker_url(url)?;
                if b.tls {
                    tls = Some(tls_config()?);
                }
                (None, b.host, b.port, credentials.clone(), false)
            }
        };
        let broker_addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let started_at_ms = journal::now_ms();
        let mut opts = MqttOptions::new(broker::gateway_client_id(&lab_id), host, port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_start(true);
        opts.set_max_packet_size(Some(labctl_mqtt_link::MAX_PACKET as u32));
        opts.set_request_channel_capacity(4096);
        opts.set_last_will(LastWill::new(
            topics.status(),
            payload::status(false, &lab_id, started_at_ms),
            QoS::AtLeastOnce,
            true,
            None,
        ));
        if let Some((u, p)) = credentials {
            opts.set_credentials(u, p);
        }
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        opts.set_network_options(net);
        if let Some(tls) = tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(tls));
        }
        let (client, eventloop) = AsyncClient::new(opts, 4096);
        let shared = Arc::new(Shared {
            api: api.clone(),
            topics,
            client,
            lab_id,
            started_at_ms,
            capabilities: payload::capabilities(&config.lab),
            users: config.users.clone(),
            trust_sender,
            stopping: AtomicBool::new(false),
            data_dir: config.data_dir.clone(),
            planners: std::sync::Mutex::new(HashMap::new()),
            estop_state: std::sync::Mutex::new(to_vec(&payload::estop_state(
                api.estop_latched(),
                None,
                None,
            ))),
            rates: std::sync::Mutex::new(HashMap::new()),
        });
        // Subscribe to the journal before anything can happen, so no committed record is missed.
        let records = api.events();
        let (estop_tx, estop_rx) = mpsc::channel(ESTOP_QUEUE);
        let queues = InboundQueues {
            estop: estop_tx,
            fair: Arc::new(std::sync::Mutex::new(FairQueue::new(
                PER_SENDER_QUEUE,
                INBOUND_QUEUE,
            ))),
            ready: Arc::new(tokio::sync::Notify::new()),
        };
        let (fair, ready) = (queues.fair.clone(), queues.ready.clone());
        let tasks = vec![
            tokio::spawn(run_event_loop(eventloop, shared.clone(), queues)),
            tokio::spawn(handle_estops(estop_rx, shared.clone())),
            tokio::spawn(handle_inbound(fair, ready, shared.clone())),
            tokio::spawn(forward_journal(records, shared.clone())),
            tokio::spawn(publish_instruments(api.watch_snapshot(), shared.clone())),
            tokio::spawn(publish_interlocks(
                api.watch_snapshot(),
                api.events(),
                shared.clone(),
            )),
            tokio::spawn(planner_lease(presence_rx, shared.clone())),
        ];
        Ok(MqttGateway {
            broker_addr,
            tls_addr,
            embedded: broker.is_some(),
            shared,
            tasks,
            broker,
        })
    }

    /// Publishes `offline`, disconnects, and stops the embedded broker.
    pub async fn shutdown(self) {
        let s = &self.shared;
        s.stopping.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = s
                .client
                .publish(
                    s.topics.status(),
                    QoS::AtLeastOnce,
                    true,
                    payload::status(false, &s.lab_id, s.started_at_ms),
                )
                .await;
            // Give the event loop a moment to send it before the disconnect.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = s.client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        })
        .await;
        for t in &self.tasks {
            t.abort();
        }
        if let Some(b) = self.broker {
            b.stop().await;
        }
    }
}

async fn run_event_loop(mut eventloop: EventLoop, shared: Arc<Shared>, inbound: InboundQueues) {
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if failures > 0 {
                    tracing::info!("mqtt: connected again");
                }
                failures = 0;
                let s = shared.clone();
                tokio::spawn(async move { announce(&s).await });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => enqueue(&shared, &inbound, p),
            Ok(_) => {}
            Err(e) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                failures = failures.saturating_add(1);
                let delay = backoff(failures);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "mqtt: broker connection lost");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// On every ConnAck: subscribe again (rumqttc does not) and publish `online` and the capabilities.
async fn announce(s: &Shared) {
    let presence = (!s.trust_sender).then(|| s.topics.presence_filter());
    for filter in s.topics.inbound_filters().into_iter().chain(presence) {
        if let Err(e) = s.client.subscribe(filter, QoS::AtLeastOnce).await {
            tracing::warn!(error = %e, "mqtt: subscribe failed");
        }
    }
    publish(s, s.topics.capabilities(), true, s.capabilities.clone()).await;
    let estop = s
        .estop_state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    publish(s, s.topics.estop_state(), true, estop).await;
    publish(
        s,
        s.topics.status(),
        true,
        payload::status(true, &s.lab_id, s.started_at_ms),
    )
    .await;
}

async fn publish(s: &Shared, topic: String, retain: bool, payload: Vec<u8>) {
    if let Err(e) = s
        .client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
    {
        if s.stopping.load(Ordering::SeqCst) {
            tracing::debug!(error = %e, "mqtt: publish after shutdown dropped");
        } else {
            tracing::warn!(error = %e, "mqtt: publish failed");
        }
    }
}

/// Committed journal records become run status, events and results.
async fn forward_journal(mut records: broadcast::Receiver<Arc<Record>>, s: Arc<Shared>) {
    let mut proposals: HashMap<String, String> = HashMap::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut context = payload::RunContext::default();
    loop {
        match records.recv().await {
            Ok(record) => {
                context.observe(&record);
                if let Record::RunCreated(r) = &*record {
                    proposals.insert(r.run_id.clone(), r.proposal_id.clone());
                }
                let run_id = match &*record {
                    Record::RunCreated(r) => Some(r.run_id.as_str()),
                    Record::RunState { run_id, .. }
                    | Record::Result { run_id, .. }
                    | Record::Command { run_id, .. }
                    | Record::Approval { run_id, .. } => Some(run_id.as_str()),
                    Record::Event { run_id, .. } => run_id.as_deref(),
                    Record::EStopLatch { .. } | Record::InterlockOverride { .. } => None,
                };
                if let Some(id) = run_id
                    && (!proposals.contains_key(id) || !context.knows(id))
                    && let Some(info) = s.api.run(id).await
                {
                    context.fill_from(&info);
                    proposals.insert(id.to_owned(), info.proposal_id);
                }
                let pid = run_id.and_then(|id| proposals.get(id)).map(String::as_str);
                match payload::from_record(&record, pid) {
                    Some(Outbound::Status(mut status)) => {
                        context.decorate(&mut status);
                        let run_id = status.run_id.clone();
                        publish(&s, s.topics.run_status(&run_id), true, to_vec(&status)).await;
                        if status.state.is_terminal() {
                            proposals.remove(&run_id);
                            last_seq.remove(&run_id);
                            context.forget(&run_id);
                        }
                    }
                    Some(Outbound::Event(event)) => {
                        let topic = s.topics.run_events(&event.run_id);
                        publish(&s, topic, false, to_vec(&event)).await;
                    }
                    Some(Outbound::Result(result)) => {
                        let last = last_seq.entry(result.run_id.clone()).or_insert(0);
                        if result.seq > *last {
                            *last = result.seq;
                            let topic = s.topics.run_results(&result.run_id);
                            publish(&s, topic, false, to_vec(&result)).await;
                        }
                    }
                    Some(Outbound::EStop(state)) => publish_estop(&s, &state).await,
                    None => {}
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    skipped = n,
                    "mqtt: journal records skipped; catching up from the journal"
                );
                catch_up(&s, &mut last_seq, &context).await;
                // A skipped latch change: publish the latch as it is now (who changed it is in the journal).
                let latched = s.api.estop_latched();
                let published = serde_json::from_slice::<EStopState>(
                    &s.estop_state.lock().unwrap_or_else(|p| p.into_inner()),
                )
                .ok()
                .map(|state| state.latched);
                if published != Some(latched) {
                    publish_estop(&s, &payload::estop_state(latched, None, None)).await;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Publishes the retained `estop/state` and remembers it for the next ConnAck.
async fn publish_estop(s: &Shared, state: &EStopState) {
    let bytes = to_vec(state);
    *s.estop_state.lock().unwrap_or_else(|p| p.into_inner()) = bytes.clone();
    publish(s, s.topics.estop_state(), true, bytes).await;
}

/// After a lag: every live run's status again, and the results past each run's last published `seq`.
async fn catch_up(s: &Shared, last_seq: &mut HashMap<String, u64>, context: &payload::RunContext) {
    let runs = s.api.runs().await;
    let wanted: Vec<(String, String, u64)> = runs
        .iter()
        .filter(|r| !r.state.is_terminal() || last_seq.contains_key(&r.run_id))
        .map(|r| {
            (
                r.run_id.clone(),
                r.proposal_id.clone(),
                last_seq.get(&r.run_id).copied().unwrap_or(0),
            )
        })
        .collect();
    let dir = s.data_dir.clone();
    let query = wanted.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let conn = journal::open_db(&dir).ok()?;
        let mut out = Vec::new();
        for (run_id, _, after) in &query {
            out.push(journal::read::results(&conn, run_id, *after as i64).ok()?);
        }
        Some(out)
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default();
    for ((run_id, pid, _), rows) in wanted.iter().zip(rows) {
        for row in rows {
            let seq = row.seq.max(0) as u64;
            let result = payload::result_from_row(run_id, Some(pid), &row);
            publish(s, s.topics.run_results(run_id), false, to_vec(&result)).await;
            last_seq.insert(run_id.clone(), seq);
        }
    }
    for r in runs {
        let mut status = payload::run_status(
            &r.run_id,
            Some(&r.proposal_id),
            r.state,
            r.current_step.as_deref(),
            r.reason.as_deref(),
            journal::now_ms(),
        );
        status.name = Some(r.name.clone());
        status.submitted_by = Some(r.submitted_by.clone());
        status.estimated_duration_s = r.estimated_duration_s;
        context.decorate(&mut status);
        publish(s, s.topics.run_status(&r.run_id), true, to_vec(&status)).await;
    }
}

fn to_vec(message: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(message).unwrap_or_default()
}

/// Retained `interlocks` whenever where an interlock stands may have changed: a trip or a clear (the
/// snapshot's tripped set), or an override set, ended or restored (the journal).
async fn publish_interlocks(
    mut snapshots: watch::Receiver<Arc<LabSnapshot>>,
    mut records: tokio::sync::broadcast::Receiver<Arc<Record>>,
    s: Arc<Shared>,
) {
    let mut last: Option<Vec<u8>> = None;
    let mut tripped = None;
    loop {
        let bytes = to_vec(&s.api.interlocks().await);
        if last.as_ref() != Some(&bytes) {
            publish(&s, s.topics.interlocks(), true, bytes.clone()).await;
            last = Some(bytes);
        }
        loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = snapshots.borrow_and_update().interlocks_tripped.clone();
                    if tripped.as_ref() != Some(&now) {
                        tripped = Some(now);
                        break;
                    }
                }
                record = records.recv() => match record {
                    Ok(r) if matches!(&*r, Record::InterlockOverride { .. }) => break,
                    Ok(_) => {}
                    // Missed records may have held an override: look again.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

/// Retained `instruments/{id}/state` when an instrument's view changes, and `instruments/{id}/telemetry`
/// (QoS 0, not retained) when a new reading has arrived; at most 10 times a second.
async fn publish_instruments(mut snapshots: watch::Receiver<Arc<LabSnapshot>>, s: Arc<Shared>) {
    let mut last: HashMap<String, Vec<u8>> = HashMap::new();
    let mut last_seen: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        for inst in &snap.instruments {
            let bytes = to_vec(&InstrumentState::from(&**inst));
            if last.get(&inst.id) != Some(&bytes) {
                publish(&s, s.topics.instrument_state(&inst.id), true, bytes.clone()).await;
                last.insert(inst.id.clone(), bytes);
            }
            if let Some(seen) = inst.last_seen
                && !inst.values.is_empty()
                && last_seen.get(&inst.id) != Some(&seen)
            {
                let values: serde_json::Map<String, serde_json::Value> = inst
                    .values
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
                    .collect();
                let body = serde_json::json!({
                    "id": inst.id, "at_ms": journal::now_ms(), "values": values,
                });
                if let Err(e) = s
                    .client
                    .publish(
                        s.topics.instrument_telemetry(&inst.id),
                        QoS::AtMostOnce,
                        false,
                        to_vec(&body),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "mqtt: publish failed");
                }
                last_seen.insert(inst.id.clone(), seen);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// When the last connection of an MQTT user closes, its supervised runs go to a safe hold: the controller
/// is told its planner (the user's name, and every planner id it submitted runs for) is lost.
async fn planner_lease(mut presence: mpsc::UnboundedReceiver<broker::Presence>, s: Arc<Shared>) {
    let mut open: HashMap<String, u32> = HashMap::new();
    while let Some(event) = presence.recv().await {
        match event {
            broker::Presence::Connected(user) => *open.entry(user).or_insert(0) += 1,
            broker::Presence::Disconnected(user) => {
                let n = open.entry(user.clone()).or_insert(1);
                *n = n.saturating_sub(1);
                if *n > 0 || user == GATEWAY_USER {
                    continue;
                }
                open.remove(&user);
                planner_gone(&s, &user).await;
            }
        }
    }
}

/// Tells the controller that `user`'s planners are gone: the user's name and every planner id it
/// submitted runs for, whose supervised runs go to a safe hold.
async fn planner_gone(s: &Shared, user: &str) {
    let mut ids = s
        .planners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(user)
        .cloned()
        .unwrap_or_default();
    ids.insert(user.to_owned());
    for id in ids {
        tracing::info!(user, planner_id = id, "mqtt: planner connection lost");
        s.api.planner_lost(&id).await;
    }
}

/// The sender of an inbound message as the broker vouches for it: the stamped user on the embedded broker;
/// on an external broker the user of a `from/{user}/` topic (its ACL lets only that user write there), else
/// the one principal `mqtt`.
fn sender_of(s: &Shared, p: &Publish) -> String {
    if !s.trust_sender {
        let topic = String::from_utf8_lossy(&p.topic);
        return match s.topics.parse_inbound_from(&topic) {
            Some((_, Some(user))) => user,
            _ => "mqtt".into(),
        };
    }
    p.properties
        .as_ref()
        .and_then(|pp| {
            pp.user_properties
                .iter()
                .rev()
                .find(|(k, _)| k == "x-mqtt-sender")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| "anonymous".into())
}

/// Puts an inbound message on its path; one that does not fit is answered `overloaded` at once.
fn enqueue(s: &Arc<Shared>, queues: &InboundQueues, p: Publish) {
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    // Through an external broker a planner's will says it went away (the embedded broker reports its
    // connections itself, so there its presence messages change nothing).
    if let Some(user) = s.topics.parse_presence(&topic) {
        if !s.trust_sender && !p.retain && Presence::parse(&p.payload) == Some(Presence::Offline) {
            let s = s.clone();
            tokio::spawn(async move { planner_gone(&s, &user).await });
        }
        return;
    }
    let refusal = if s.topics.parse_inbound(&topic) == Some(Inbound::EStop) {
        match queues.estop.try_send(p) {
            Ok(()) => return,
            Err(e) => Some((
                e.into_inner(),
                format!("{ESTOP_QUEUE} e-stop messages are waiting; send it again"),
            )),
        }
    } else {
        let sender = sender_of(s, &p);
        let pushed = queues
            .fair
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(&sender, p);
        match pushed {
            Ok(()) => {
                queues.ready.notify_one();
                return;
            }
            Err((Full::Sender, p)) => Some((
                p,
                format!("{sender} has {PER_SENDER_QUEUE} commands waiting; nothing was done"),
            )),
            Err((Full::Queue, p)) => Some((
                p,
                format!(
                    "{INBOUND_QUEUE} commands are waiting; nothing was done, try again shortly"
                ),
            )),
        }
    };
    if let Some((p, why)) = refusal {
        tracing::warn!(topic, why, "mqtt: command refused for load");
        let s = s.clone();
        tokio::spawn(async move { refuse(&s, &p, &topic, "overloaded", why).await });
    }
}

/// Answers a refused message where everyone may read it: its proposal's reply topic for a submission,
/// else `rejections` (its response topic is not checked yet, so it is not used).
async fn refuse(s: &Shared, p: &Publish, topic: &str, code: &'static str, why: String) {
    let pid = match s.topics.parse_inbound(topic) {
        Some(Inbound::Submit) => payload::proposal_id_of(&p.payload),
        _ => None,
    };
    let r = Rejection {
        proposal_id: pid.clone(),
        ..Rejection::new(code, why, topic)
    };
    let none = ReplyTo {
        response_topic: None,
        correlation: None,
    };
    reply(s, &none, pid.as_deref(), r.to_json(), true).await;
}

/// E-stop triggers and acknowledgements, ahead of every other command.
async fn handle_estops(mut rx: mpsc::Receiver<Publish>, s: Arc<Shared>) {
    while let Some(p) = rx.recv().await {
        handle_one(&s, p).await;
    }
}

/// Other inbound messages, one at a time, senders in turn, each sender's in arrival order (a pause then a
/// resume stay in that order).
async fn handle_inbound(
    fair: Arc<std::sync::Mutex<FairQueue<Publish>>>,
    ready: Arc<tokio::sync::Notify>,
    s: Arc<Shared>,
) {
    loop {
        let next = fair.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match next {
            Some(p) => handle_one(&s, p).await,
            None => ready.notified().await,
        }
    }
}

/// Whether `sender` may send another submission or replay now.
fn within_rate(s: &Shared, sender: &str) -> bool {
    let now = std::time::Instant::now();
    s.rates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(sender.to_owned())
        .or_insert(TokenBucket {
            tokens: WORK_BURST,
            last: now,
        })
        .take(now)
}

struct ReplyTo {
    response_topic: Option<String>,
    correlation: Option<Vec<u8>>,
}

async fn handle_one(s: &Shared, p: Publish) {
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    if p.retain {
        // A retained command would fire again on every reconnect: never act on one.
        tracing::warn!(topic, "mqtt: retained command ignored");
        return;
    }
    let props = p.properties.as_ref();
    let asked_reply_topic = props
        .and_then(|pp| pp.response_topic.clone())
        .filter(|t| !t.is_empty());
    let mut reply_to = ReplyTo {
        response_topic: None,
        correlation: props.and_then(|pp| pp.correlation_data.as_ref().map(|c| c.to_vec())),
    };
    let sender = props.and_then(|pp| {
        pp.user_properties
            .iter()
            .rev()
            .find(|(k, _)| k == "x-mqtt-sender")
            .map(|(_, v)| v.clone())
    });
    let costly = match s.topics.parse_inbound(&topic) {
        Some(Inbound::Submit) => true,
        Some(Inbound::Control { .. }) => payload::parse_control_request(&p.payload, &topic)
            .is_ok_and(|c| matches!(c, ControlRequest::Replay { .. })),
        _ => false,
    };
    if costly && !within_rate(s, &sender_of(s, &p)) {
        let why = format!(
            "more than {WORK_BURST} submissions and replays at once or {WORK_RATE_PER_S} a second; nothing was done"
        );
        refuse(s, &p, &topic, "rate_limited", why).await;
        return;
    }
    let Some((inbound, from)) = s.topics.parse_inbound_from(&topic) else {
        return;
    };
    let principal = match principal_for(s, sender.as_deref(), from.as_deref(), &topic) {
        Ok(p) => p,
        Err(r) => {
            let pid = match inbound {
                Inbound::Submit => payload::proposal_id_of(&p.payload),
                _ => None,
            };
            let r = Rejection {
                proposal_id: pid.clone(),
                ..r
            };
            reply(s, &reply_to, pid.as_deref(), r.to_json(), true).await;
            return;
        }
    };
    // Answers go only under the sender's own reply prefix: never onto another topic of the contract (a run's
    // status), nor anywhere labctl's rights would let it write for someone else.
    if let Some(asked) = asked_reply_topic {
        let vouched = if s.trust_sender {
            Some(principal.name.as_str())
        } else {
            from.as_deref()
        };
        if !s.topics.is_reply_topic(&asked, vouched) {
            let pid = match inbound {
                Inbound::Submit => payload::proposal_id_of(&p.payload),
                _ => None,
            };
            let expected = match vouched {
                Some(user) => s.topics.reply_prefix(user),
                None => s.topics.reply_prefix("{user}"),
            };
            tracing::warn!(user = %principal.name, response_topic = %asked, "mqtt: command refused: response topic outside the sender's reply prefix");
            let r = Rejection {
                proposal_id: pid.clone(),
                ..Rejection::new(
                    "bad_response_topic",
                    format!(
                        "response topic {asked:?}: expected a topic under {expected} (nothing was done)"
                    ),
                    &topic,
                )
            };
            reply(s, &reply_to, pid.as_deref(), r.to_json(), true).await;
            return;
        }
        reply_to.response_topic = Some(asked);
    }
    match inbound {
        Inbound::Submit => submit(s, &topic, &p.payload, principal, &reply_to).await,
        Inbound::Control { run_id } => {
            let outcome = match payload::parse_control_request(&p.payload, &topic) {
                Err(r) => Err(r.for_run(&run_id)),
                Ok(ControlRequest::Replay { after }) => {
                    // Reading is everyone's right: observers may replay too.
                    let (body, rejected) = match replay(s, &run_id, after).await {
                        Ok(n) => (
                            to_vec(&serde_json::json!({
                                "accepted": true, "run_id": run_id, "replayed": n, "after": after,
                            })),
                            false,
                        ),
                        Err(r) => (r.to_json(), true),
                    };
                    reply(s, &reply_to, None, body, rejected).await;
                    return;
                }
                // Who may control which run is the controller's decision (the role table).
                Ok(ControlRequest::Run(c)) => {
                    api_outcome(s.api.control(&run_id, c, principal).await, &topic, &run_id)
                }
            };
            answer(s, &reply_to, &run_id, outcome).await;
        }
        Inbound::Approval { run_id } => {
            let outcome = match payload::parse_approval(&p.payload, &topic) {
                Err(r) => Err(r.for_run(&run_id)),
                Ok(Decision::Approve) => {
                    api_outcome(s.api.approve(&run_id, principal).await, &topic, &run_id)
                }
                Ok(Decision::Reject { reason }) => api_outcome(
                    s.api.reject(&run_id, &reason, principal).await,
                    &topic,
                    &run_id,
                ),
            };
            answer(s, &reply_to, &run_id, outcome).await;
        }
        Inbound::EStop => {
            let outcome = match payload::parse_estop(&p.payload, &topic) {
                Err(r) => Err(r),
                Ok(EStopAction::Trigger) => s
                    .api
                    .emergency_stop(principal)
                    .await
                    .map_err(|e| api_rejection(e, &topic)),
                Ok(EStopAction::Acknowledge) => s
                    .api
                    .acknowledge_emergency_stop(principal)
                    .await
                    .map_err(|e| api_rejection(e, &topic)),
            };
            let (body, rejected) = match outcome {
                Ok(()) => (
                    to_vec(&serde_json::json!({"accepted": true, "topic": topic})),
                    false,
                ),
                Err(r) => (r.to_json(), true),
            };
            reply(s, &reply_to, None, body, rejected).await;
        }
        Inbound::Override { interlock } => {
            // Who may override is the controller's decision (the role table): technicians.
            let outcome = match payload::parse_override(&p.payload, &topic) {
                Err(r) => Err(r),
                Ok(OverrideRequest::Set { duration, reason }) => s
                    .api
                    .override_interlock(&interlock, duration, &reason, principal)
                    .await
                    .map_err(|e| api_rejection(e, &topic)),
                Ok(OverrideRequest::Withdraw) => s
                    .api
                    .withdraw_override(&interlock, principal)
                    .await
                    .map_err(|e| api_rejection(e, &topic)),
            };
            let (body, rejected) = match outcome {
                Ok(()) => (
                    to_vec(&serde_json::json!({
                        "accepted": true, "topic": topic, "interlock": interlock,
                    })),
                    false,
                ),
                Err(r) => (r.to_json(), true),
            };
            reply(s, &reply_to, None, body, rejected).await;
        }
    }
}

/// Publishes the run's results after `after` again, from the journal; returns how many.
async fn replay(s: &Shared, run_id: &str, after: u64) -> Result<usize, Rejection> {
    let topic = s.topics.run_control(run_id);
    let known = s.api.run(run_id).await;
    let dir = s.data_dir.clone();
    let id = run_id.to_owned();
    let rows = tokio::task::spawn_blocking(move || {
        let conn = journal::open_db(&dir).map_err(|e| e.to_string())?;
        journal::read::results(&conn, &id, i64::try_from(after).unwrap_or(i64::MAX))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(|e| Rejection::new("unavailable", e, &topic).for_run(run_id))?;
    if known.is_none() && rows.is_empty() {
        return Err(
            Rejection::new("unknown_run", format!("unknown run {run_id}"), &topic).for_run(run_id),
        );
    }
    let pid = known.map(|r| r.proposal_id);
    let n = rows.len();
    for row in rows {
        let result = payload::result_from_row(run_id, pid.as_deref(), &row);
        publish(s, s.topics.run_results(run_id), false, to_vec(&result)).await;
    }
    Ok(n)
}

/// Who sent a command: on the embedded broker its stamped sender (who must be the user of a `from/{user}/`
/// topic); on an external broker the user of a `from/{user}/` topic, whom its ACL vouches for, with that
/// user's role from the lab file; else the one planner `mqtt`.
fn principal_for(
    s: &Shared,
    sender: Option<&str>,
    from: Option<&str>,
    topic: &str,
) -> Result<Principal, Rejection> {
    if !s.trust_sender {
        return match from {
            None => Ok(Principal::new("mqtt", Role::Planner, Face::Mqtt)),
            Some(user) => match s.users.role_of(user) {
                Some(role) => Ok(Principal::new(user, role, Face::Mqtt)),
                None => Err(Rejection::new(
                    "forbidden",
                    format!("{user} is not a user of this lab"),
                    topic,
                )),
            },
        };
    }
    if let Some(user) = from
        && sender != Some(user)
    {
        return Err(Rejection::new(
            "forbidden",
            format!("only {user} sends under its own from/ prefix"),
            topic,
        ));
    }
    match sender {
        Some(GATEWAY_USER) => Err(Rejection::new(
            "forbidden",
            "the gateway's own identity sends no commands",
            topic,
        )),
        Some(name) => match s.users.role_of(name) {
            Some(role) => Ok(Principal::new(name, role, Face::Mqtt)),
            None => Err(Rejection::new(
                "forbidden",
                format!("unknown user {name}"),
                topic,
            )),
        },
        None if s.users.is_empty() => Ok(Principal::new("anonymous", Role::Planner, Face::Mqtt)),
        None => Err(Rejection::new("forbidden", "sender unknown", topic)),
    }
}

fn api_rejection(e: ApiError, topic: &str) -> Rejection {
    let code = match &e {
        ApiError::Forbidden(_) => "forbidden",
        ApiError::UnknownRun(_) => "unknown_run",
        ApiError::InvalidState(_) => "invalid_state",
        ApiError::EStopLatched => "estop_latched",
        ApiError::Interlocked(_) => "interlocked",
        ApiError::Journal(_) => "journal_unavailable",
        ApiError::UnknownInterlock(_) => "unknown_interlock",
        ApiError::BadArgument(_) => "bad_argument",
        ApiError::Unavailable => "unavailable",
        ApiError::ProposalReused { .. } => "proposal_id_reused",
        ApiError::OverQuota(_) => "over_quota",
    };
    Rejection::new(code, e.to_string(), topic)
}

fn api_outcome(
    r: Result<RunState, ApiError>,
    topic: &str,
    run_id: &str,
) -> Result<RunState, Rejection> {
    r.map_err(|e| api_rejection(e, topic).for_run(run_id))
}

async fn answer(s: &Shared, to: &ReplyTo, run_id: &str, outcome: Result<RunState, Rejection>) {
    let (body, rejected) = match outcome {
        Ok(state) => (
            to_vec(&serde_json::json!({"accepted": true, "run_id": run_id, "state": state})),
            false,
        ),
        Err(r) => (r.to_json(), true),
    };
    reply(s, to, None, body, rejected).await;
}

async fn submit(s: &Shared, topic: &str, bytes: &[u8], principal: Principal, to: &ReplyTo) {
    if let Err(r) = payload::check_size(bytes, topic) {
        reply(s, to, None, r.to_json(), true).await;
        return;
    }
    let pid = payload::proposal_id_of(bytes);
    if let Err(e) = labctl_core::policy::check(&principal, labctl_core::policy::Permission::Submit)
    {
        let r = Rejection {
            proposal_id: pid.clone(),
            ..Rejection::new("forbidden", e.to_string(), topic)
        };
        reply(s, to, pid.as_deref(), r.to_json(), true).await;
        return;
    }
    let user = principal.name.clone();
    let answer = s.api.submit(bytes.to_vec(), principal).await;
    if answer.accepted
        && let Some(planner_id) = answer.planner_id.clone()
    {
        s.planners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user)
            .or_default()
            .insert(planner_id);
    }
    let pid = answer
        .proposal_id
        .clone()
        .filter(|p| labctl_mqtt_link::topics::is_topic_level(p))
        .or(pid);
    let body = serde_json::to_vec(&answer).unwrap_or_default();
    reply(s, to, pid.as_deref(), body, !answer.accepted).await;
}

/// Sends a reply to the MQTT 5 response topic (with its correlation data) when there is one, to
/// `protocols/replies/{proposal_id}` when there is a proposal id, and, for a refusal, to `rejections` when
/// neither (an acceptance without a response topic needs no answer: the run's status shows it).
async fn reply(s: &Shared, to: &ReplyTo, proposal_id: Option<&str>, body: Vec<u8>, rejected: bool) {
    if let Some(rt) = &to.response_topic {
        let props = PublishProperties {
            correlation_data: to.correlation.clone().map(Into::into),
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        if let Err(e) = s
            .client
            .publish_with_properties(rt.clone(), QoS::AtLeastOnce, false, body.clone(), props)
            .await
        {
            tracing::warn!(error = %e, "mqtt: reply failed");
        }
    }
    match proposal_id {
        Some(pid) => publish(s, s.topics.reply(pid), false, body).await,
        None if to.response_topic.is_none() && rejected => {
            publish(s, s.topics.rejections(), false, body).await
        }
        None => {}
    }
}
