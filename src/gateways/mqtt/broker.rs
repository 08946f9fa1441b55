//! The embedded broker of `labctl run --sim` (and of a lab file without `interfaces.mqtt.url`): the `mqtt5`
//! crate's broker, MQTT 3.1.1 and 5 on one loopback port, no TLS, in-memory sessions and retained messages.
//!
//! Logins are checked against the lab's users ([`Users`]); the gateway itself logs in with a random
//! password made at start. The broker stamps every publish with the authenticated user name (user property
//! `x-mqtt-sender`, replacing any the client set), which is how the gateway knows who sent a command.
//! Only the gateway may publish under `labctl/{lab_id}/` except on the inbound topics, so nobody can fake
//! a result, a run status or a reply.

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

use super::topics::Topics;
use crate::auth::{AuthError, Users};

/// User name the gateway logs in with on the embedded broker.
pub const GATEWAY_USER: &str = "labctl-gateway";

/// Largest MQTT packet the embedded broker accepts (payload limit plus room for the refusal).
pub const MAX_PACKET: usize = 4 * 1024 * 1024;

struct LabAuth {
    users: Arc<Users>,
    gateway_password: String,
    topics: Topics,
}

impl LabAuth {
    fn may_publish(&self, user: Option<&str>, topic: &str) -> bool {
        if user == Some(GATEWAY_USER) {
            return true;
        }
        if !topic.starts_with("labctl/") {
            return true;
        }
        self.topics.parse_inbound(topic).is_some()
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
        _user_id: Option<&'a str>,
        _topic_filter: &'a str,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async { true })
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
    pub gateway_password: String,
    shutdown: mqtt5::broker::BrokerShutdownHandle,
    task: tokio::task::JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Binds `listen` (port 0: a free port, see [`EmbeddedBroker::addr`]) and starts serving.
    pub async fn start(
        listen: SocketAddr,
        users: Arc<Users>,
        lab_id: &str,
        presence: tokio::sync::mpsc::UnboundedSender<Presence>,
    ) -> Result<EmbeddedBroker, String> {
        let gateway_password = random_password();
        let storage = StorageConfig {
            backend: mqtt5::broker::StorageBackendType::Memory,
            enable_persistence: false,
            ..StorageConfig::default()
        };
        let config = BrokerConfig::default()
            .with_bind_address(listen)
            .with_max_packet_size(MAX_PACKET)
            // Sessions live in memory: a client that asked to keep its session gets it back within an
            // hour, not forever.
            .with_session_expiry(std::time::Duration::from_secs(3600))
            .with_sys_topics_enabled(false)
            .with_storage(storage)
            .with_event_handler(Arc::new(PresenceEvents(presence)));
        let auth = Arc::new(LabAuth {
            users,
            gateway_password: gateway_password.clone(),
            topics: Topics::new(lab_id),
        });
        let mut broker = MqttBroker::with_config(config)
            .await
            .map_err(|e| format!("embedded MQTT broker on {listen}: {e}"))?
            .with_auth_provider(auth);
        let addr = broker
            .local_addr()
            .ok_or_else(|| format!("embedded MQTT broker on {listen}: no listening address"))?;
        let shutdown = broker.shutdown_handle();
        let task = tokio::spawn(async move {
            if let Err(e) = broker.run().await {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        });
        Ok(EmbeddedBroker {
            addr,
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
