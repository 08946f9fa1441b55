//! The embedded broker of `labctl run --sim` (and of a lab file without `interfaces.mqtt.url`): the `mqtt5`
//! crate's broker, MQTT 3.1.1 and 5 on one loopback port, no TLS, in-memory sessions and retained messages.
//!
//! Logins are checked against the lab's users ([`Users`]); the gateway itself logs in with a random
//! password made at start. The broker stamps every publish with the authenticated user name (user property
//! `x-mqtt-sender`, replacing any the client set), which is how the gateway knows who sent a command.
//! Only the gateway may publish under `labctl/{lab_id}/` except on the inbound topics, so nobody can fake
//! a result, a run status or a reply (the role table decides what each may ask on the inbound topics, and
//! the gateway answers a refusal with its reason). Nobody but a user reads that
//! user's replies (`labctl/{lab}/to/{user}/`), and nobody but the gateway connects as `labctl-{lab}`.
//! Retained messages are bounded in count and size.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use mqtt5::broker::{
    AuthProvider, AuthResult, BrokerConfig, BrokerEventHandler, ClientConnectEvent,
    ClientDisconnectEvent, MqttBroker, StorageConfig,
};
use mqtt5::packet::connect::ConnectPacket;
use mqtt5::protocol::v5::reason_codes::ReasonCode;

use labctl_core::auth::{AuthError, Users};
use labctl_mqtt_link::Topics;

/// The client id the gateway connects with; reserved on the embedded broker.
pub fn gateway_client_id(lab_id: &str) -> String {
    format!("labctl-{lab_id}")
}

/// User name the gateway logs in with on the embedded broker.
pub const GATEWAY_USER: &str = "labctl-gateway";

/// Retained messages the embedded broker keeps at most, and the largest it keeps (larger ones are delivered,
/// not retained).
pub const MAX_RETAINED_MESSAGES: usize = 20_000;
pub const MAX_RETAINED_BYTES: usize = 256 * 1024;

struct LabAuth {
    users: Arc<Users>,
    gateway_password: String,
    topics: Topics,
    /// The gateway's client id: nobody else may use it (it would take the gateway offline).
    gateway_client_id: String,
}

impl LabAuth {
    /// Under `labctl/{lab}/` only the gateway publishes, except on the inbound topics, which are open to
    /// every authenticated user: what each role may ask is the controller's decision, answered with a
    /// named refusal (a broker drop would leave an MQTT 3.1.1 client without an answer).
    fn may_publish(&self, user: Option<&str>, topic: &str) -> bool {
        if user == Some(GATEWAY_USER) {
            return true;
        }
        if !topic.starts_with("labctl/") {
            return true;
        }
        // Under `from/{user}/` only that user writes: nobody sends a command in someone else's name, nor
        // says someone else went away.
        if let Some(owner) = self.topics.parse_presence(topic) {
            return user == Some(owner.as_str());
        }
        match self.topics.parse_inbound_from(topic) {
            Some((_, Some(owner))) => user == Some(owner.as_str()),
            Some((_, None)) => true,
            None => false,
        }
    }

    fn may_subscribe(&self, user: Option<&str>, filter: &str) -> bool {
        user == Some(GATEWAY_USER)
            || self
                .topics
                .may_subscribe(filter, user.unwrap_or("anonymous"))
    }
}

impl AuthProvider for LabAuth {
    fn authenticate<'a>(
        &'a self,
        connect: &'a ConnectPacket,
        client_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = mqtt5::Result<AuthResult>> + Send + 'a>> {
        Box::pin(async move {
            let user = connect.username.clone();
            if connect.client_id == self.gateway_client_id && user.as_deref() != Some(GATEWAY_USER)
            {
                tracing::warn!(user = ?user, client_id = %connect.client_id, "mqtt: the gateway's client id is reserved; connection refused");
                return Ok(AuthResult::fail_with_reason(
                    ReasonCode::ClientIdentifierNotValid,
                    "this client id is reserved for labctl",
                ));
            }
            let password = connect
                .password
                .as_deref()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            match (user, password) {
                (Some(u), Some(p)) if u == GATEWAY_USER => {
                    if p == self.gateway_password {
                        Ok(AuthResult::success_with_user(u))
                    } else {
                        Ok(AuthResult::fail(ReasonCode::BadUsernameOrPassword))
                    }
                }
                (Some(u), Some(p)) => match self.users.login(&u, &p, client_addr.into()).await {
                    Ok(_role) => Ok(AuthResult::success_with_user(u)),
                    Err(e @ AuthError::Busy) => Ok(AuthResult::fail_with_reason(
                        ReasonCode::ServerBusy,
                        e.to_string(),
                    )),
                    Err(e) => Ok(AuthResult::fail_with_reason(
                        ReasonCode::BadUsernameOrPassword,
                        e.to_string(),
                    )),
                },
                (None, _) if self.users.is_empty() => Ok(AuthResult::success()),
                _ => Ok(AuthResult::fail_with_reason(
                    ReasonCode::NotAuthorized,
                    "user name and password required",
                )),
            }
        })
    }

    fn authorize_publish<'a>(
        &'a self,
        _client_id: &str,
        user_id: Option<&'a str>,
        topic: &'a str,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        let ok = self.may_publish(user_id, topic);
        if !ok {
            tracing::warn!(user = user_id, topic, "mqtt: publish refused by the broker");
        }
        Box::pin(async move { ok })
    }

    fn authorize_subscribe<'a>(
        &'a self,
        _client_id: &str,
        user_id: Option<&'a str>,
        topic_filter: &'a str,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        let ok = self.may_subscribe(user_id, topic_filter);
        if !ok {
            tracing::warn!(
                user = user_id,
                topic_filter,
                "mqtt: subscription refused by the broker (another user's replies)"
            );
        }
        Box::pin(async move { ok })
    }
}

/// A user's connection opened or closed (for the planner lease of supervised runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    Connected(String),
    Disconnected(String),
}

struct PresenceEvents(tokio::sync::mpsc::UnboundedSender<Presence>);

impl BrokerEventHandler for PresenceEvents {
    fn on_client_connect<'a>(
        &'a self,
        event: ClientConnectEvent,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        if let Some(user) = event.user_id {
            let _ = self.0.send(Presence::Connected(user.to_string()));
        }
        Box::pin(async {})
    }

    fn on_client_disconnect<'a>(
        &'a self,
        event: ClientDisconnectEvent,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        if let Some(user) = event.user_id {
            let _ = self.0.send(Presence::Disconnected(user.to_string()));
        }
        Box::pin(async {})
    }
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
    /// The MQTT-over-TLS listener's address, when there is one.
    pub tls_addr: Option<SocketAddr>,
    pub gateway_password: String,
    shutdown: mqtt5::broker::BrokerShutdownHandle,
    task: tokio::task::JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Binds `listen` (port 0: a free port, see [`EmbeddedBroker::addr`]) and starts serving.
    /// `tls`: a second listener for MQTT over TLS, with the certificate and key files to serve.
    pub async fn start(
        listen: SocketAddr,
        tls: Option<(SocketAddr, std::path::PathBuf, std::path::PathBuf)>,
        users: Arc<Users>,
        lab_id: &str,
        presence: tokio::sync::mpsc::UnboundedSender<Presence>,
    ) -> Result<EmbeddedBroker, super::StartError> {
        let gateway_password = random_password();
        let storage = StorageConfig {
            backend: mqtt5::broker::StorageBackendType::Memory,
            enable_persistence: false,
            ..StorageConfig::default()
        };
        let mut config = BrokerConfig::default()
            .with_bind_address(listen)
            .with_max_packet_size(labctl_mqtt_link::MAX_PACKET)
            // Sessions live in memory: a client that asked to keep its session gets it back within an
            // hour, not forever.
            .with_session_expiry(std::time::Duration::from_secs(3600))
            .with_sys_topics_enabled(false)
            .with_max_retained_messages(MAX_RETAINED_MESSAGES)
            .with_max_retained_message_size(MAX_RETAINED_BYTES)
            .with_storage(storage)
            .with_event_handler(Arc::new(PresenceEvents(presence)));
        if let Some((addr, cert, key)) = tls {
            config = config
                .with_tls(mqtt5::broker::config::TlsConfig::new(cert, key).with_bind_address(addr));
        }
        let auth = Arc::new(LabAuth {
            users,
            gateway_password: gateway_password.clone(),
            topics: Topics::new(lab_id),
            gateway_client_id: gateway_client_id(lab_id),
        });
        let mut broker = MqttBroker::with_config(config)
            .await
            .map_err(|e| super::StartError::Broker {
                listen,
                reason: e.to_string(),
            })?
            .with_auth_provider(auth);
        let addr = broker
            .local_addr()
            .ok_or_else(|| super::StartError::Broker {
                listen,
                reason: "no listening address".into(),
            })?;
        let tls_addr = broker.tls_local_addr();
        let shutdown = broker.shutdown_handle();
        let task = tokio::spawn(async move {
            if let Err(e) = broker.run().await {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        });
        Ok(EmbeddedBroker {
            addr,
            tls_addr,
            gateway_password,
            shutdown,
            task,
        })
    }

    pub async fn stop(self) {
        self.shutdown.shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.task).await;
    }
}

fn random_password() -> String {
    use argon2::password_hash::SaltString;
    SaltString::generate(&mut password_hash::rand_core::OsRng)
        .as_str()
        .to_owned()
}
