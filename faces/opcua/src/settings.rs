//! Server settings: the endpoint URL, which security policies are offered, the certificate store, and the
//! limits that keep a hostile or broken client from exhausting the controller.

use std::fmt;
use std::path::PathBuf;

use opcua::crypto::SecurityPolicy;
use opcua::server::{ServerBuilder, ServerEndpoint};
use opcua::types::{BuildInfo, DateTime, MessageSecurityMode};

/// Which security policies the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Basic256Sha256, Aes128Sha256RsaOaep and Aes256Sha256RsaPss, each with Sign and SignAndEncrypt.
    Secure,
    /// The secure ones and SecurityPolicy None: `--sim` and the explicit development flag only.
    WithNone,
}

impl Security {
    pub fn describe(self) -> &'static str {
        match self {
            Security::Secure => {
                "Basic256Sha256, Aes128Sha256RsaOaep, Aes256Sha256RsaPss; Sign and SignAndEncrypt"
            }
            Security::WithNone => {
                "None (development) and Basic256Sha256, Aes128Sha256RsaOaep, Aes256Sha256RsaPss; Sign and SignAndEncrypt"
            }
        }
    }
}

/// Host and port of `opc.tcp://host:port[/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

/// An OPC UA endpoint URL that is not `opc.tcp://host:port[/path]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("{url:?}: expected opc.tcp://host:port")]
    Scheme { url: String },
    #[error("{url:?}: expected opc.tcp://host:port (the port is missing)")]
    NoPort { url: String },
    #[error("{url:?}: the host is missing")]
    NoHost { url: String },
    #[error("{url:?}: port {port:?} is not a number from 0 to 65535")]
    Port { url: String, port: String },
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, EndpointError> {
        let rest = url
            .strip_prefix("opc.tcp://")
            .ok_or_else(|| EndpointError::Scheme { url: url.into() })?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| EndpointError::NoPort { url: url.into() })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(EndpointError::NoHost { url: url.into() });
        }
        let port = port.parse().map_err(|_| EndpointError::Port {
            url: url.into(),
            port: port.into(),
        })?;
        Ok(Endpoint {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "opc.tcp://{}:{}", self.host, self.port)
    }
}

pub struct ServerSettings {
    pub lab_id: String,
    pub host: String,
    /// The port actually bound (the endpoint descriptions carry it).
    pub port: u16,
    pub pki_dir: PathBuf,
    pub security: Security,
}

/// Sessions at once; further CreateSession requests are refused.
pub const MAX_SESSIONS: usize = 32;
/// The largest message: a protocol of the largest accepted size (4 MiB) plus room for the envelope.
pub const MAX_MESSAGE_SIZE: usize = labctl_protocols::validate::MAX_PROTOCOL_BYTES + 64 * 1024;
/// Chunks of one message (with 64 KiB buffers, enough for [`MAX_MESSAGE_SIZE`]).
pub const MAX_CHUNK_COUNT: usize = MAX_MESSAGE_SIZE / 8192 + 1;
/// Elements of one array (a read of many nodes, many monitored items at once).
pub const MAX_ARRAY_LENGTH: usize = 10_000;
/// Monitored items per subscription and subscriptions per session.
pub const MAX_MONITORED_ITEMS_PER_SUBSCRIPTION: usize = 10_000;
pub const MAX_SUBSCRIPTIONS_PER_SESSION: usize = 10;
/// The fastest sampling and publishing intervals offered, in milliseconds.
pub const MIN_INTERVAL_MS: f64 = 100.0;
/// How often subscriptions are checked for notifications to send: well under the fastest interval, so a
/// change reaches a 100 ms subscription within about one interval.
pub const SUBSCRIPTION_POLL_MS: u64 = 10;
/// A session with no request for this long is closed.
pub const MAX_SESSION_TIMEOUT_MS: u64 = 60_000;

/// The server's discovery URL, as FindServers and every endpoint description give it.
pub fn discovery_url(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("opc.tcp://[{host}]:{port}/")
    } else {
        format!("opc.tcp://{host}:{port}/")
    }
}

/// The configured builder, without node managers or authenticator.
pub fn server_builder(settings: &ServerSettings) -> ServerBuilder {
    let application_uri = format!("urn:labctl:{}:server", settings.lab_id);
    let mut builder = ServerBuilder::new()
        .application_name(format!("labctl {}", settings.lab_id))
        .application_uri(application_uri)
        .product_uri("urn:labctl")
        .build_info(BuildInfo {
            product_uri: "urn:labctl".into(),
            manufacturer_name: "labctl".into(),
            product_name: "labctl".into(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            build_number: env!("CARGO_PKG_VERSION").into(),
            build_date: DateTime::now(),
        })
        .host(settings.host.clone())
        .port(settings.port)
        .pki_dir(settings.pki_dir.clone())
        // Created on first start under pki/own and pki/private; kept across restarts.
        .create_sample_keypair(true)
        // Unknown client certificates land in pki/rejected until an administrator moves them to
        // pki/trusted.
        .trust_client_certs(false)
        .check_cert_time(true)
        // Clients that follow discovery URLs need the whole address, not the endpoint's path.
        .discovery_urls(vec![discovery_url(&settings.host, settings.port)])
        .max_sessions(MAX_SESSIONS)
        .max_session_timeout_ms(MAX_SESSION_TIMEOUT_MS)
        .max_message_size(MAX_MESSAGE_SIZE)
        .max_chunk_count(MAX_CHUNK_COUNT)
        .max_array_length(MAX_ARRAY_LENGTH)
        .max_string_length(labctl_protocols::validate::MAX_PROTOCOL_BYTES)
        .max_byte_string_length(64 * 1024)
        .subscription_poll_interval_ms(SUBSCRIPTION_POLL_MS)
        .diagnostics_enabled(false);
    {
        let limits = builder.limits_mut();
        limits.subscriptions.max_monitored_items_per_sub = MAX_MONITORED_ITEMS_PER_SUBSCRIPTION;
        limits.subscriptions.max_subscriptions_per_session = MAX_SUBSCRIPTIONS_PER_SESSION;
        limits.subscriptions.min_sampling_interval_ms = MIN_INTERVAL_MS;
        limits.subscriptions.min_publishing_interval_ms = MIN_INTERVAL_MS;
        limits.operational.max_monitored_items_per_call = MAX_MONITORED_ITEMS_PER_SUBSCRIPTION;
    }
    // Every endpoint accepts the tokens the authenticator offers (user names when the lab has users).
    let no_tokens: &[&str] = &[];
    let mut endpoints: Vec<(&str, SecurityPolicy, MessageSecurityMode)> = vec![
        (
            "basic256sha256_sign",
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::Sign,
        ),
        (
            "basic256sha256_sign_encrypt",
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
        ),
        (
            "aes128sha256rsaoaep_sign",
            SecurityPolicy::Aes128Sha256RsaOaep,
            MessageSecurityMode::Sign,
        ),
        (
            "aes128sha256rsaoaep_sign_encrypt",
            SecurityPolicy::Aes128Sha256RsaOaep,
            MessageSecurityMode::SignAndEncrypt,
        ),
        (
            "aes256sha256rsapss_sign",
            SecurityPolicy::Aes256Sha256RsaPss,
            MessageSecurityMode::Sign,
        ),
        (
            "aes256sha256rsapss_sign_encrypt",
            SecurityPolicy::Aes256Sha256RsaPss,
            MessageSecurityMode::SignAndEncrypt,
        ),
    ];
    if settings.security == Security::WithNone {
        endpoints.push(("none", SecurityPolicy::None, MessageSecurityMode::None));
    }
    for (id, policy, mode) in endpoints {
        builder = builder.add_endpoint(id, ServerEndpoint::from(("/", policy, mode, no_tokens)));
    }
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_parse_with_their_errors_named() {
        assert_eq!(
            Endpoint::parse("opc.tcp://127.0.0.1:4840"),
            Ok(Endpoint {
                host: "127.0.0.1".into(),
                port: 4840
            })
        );
        assert_eq!(
            Endpoint::parse("opc.tcp://[::1]:0/labctl").map(|e| (e.host, e.port)),
            Ok(("::1".into(), 0))
        );
        assert!(matches!(
            Endpoint::parse("http://x:1"),
            Err(EndpointError::Scheme { .. })
        ));
        assert!(
            Endpoint::parse("opc.tcp://host")
                .unwrap_err()
                .to_string()
                .contains("port is missing")
        );
        let err = Endpoint::parse("opc.tcp://host:99999").unwrap_err();
        assert_eq!(
            err,
            EndpointError::Port {
                url: "opc.tcp://host:99999".into(),
                port: "99999".into()
            }
        );
        assert!(err.to_string().contains("99999"), "{err}");
    }

    #[test]
    fn security_policy_none_is_offered_only_when_asked_for() {
        let settings = |security| ServerSettings {
            lab_id: "t".into(),
            host: "127.0.0.1".into(),
            port: 4840,
            pki_dir: PathBuf::from("pki"),
            security,
        };
        let secure = server_builder(&settings(Security::Secure));
        assert!(
            secure
                .config()
                .endpoints
                .values()
                .all(|e| e.security_policy() != SecurityPolicy::None)
        );
        assert!(
            secure
                .config()
                .endpoints
                .values()
                .any(|e| e.security_policy() == SecurityPolicy::Basic256Sha256
                    && e.message_security_mode() == MessageSecurityMode::SignAndEncrypt)
        );
        let dev = server_builder(&settings(Security::WithNone));
        assert!(
            dev.config()
                .endpoints
                .values()
                .any(|e| e.security_policy() == SecurityPolicy::None)
        );
    }
}
