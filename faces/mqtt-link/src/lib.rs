//! The client side of labctl's MQTT, shared by the gateway (when it connects to an external broker) and
//! the clients (`labctl console`, `labctl submit`): the topic contract ([`topics`]), broker URLs, TLS to a
//! broker, credentials from the environment and the reconnect backoff.
//!
//! May depend on: nothing of labctl (the payloads' types are in the contract crate).

pub mod topics;

use std::sync::Arc;
use std::time::Duration;

pub use topics::{Inbound, Presence, Topics};

/// Largest MQTT packet labctl sends or accepts: the embedded broker's limit and every client's (the payload
/// limit plus room for the refusal).
pub const MAX_PACKET: usize = 4 * 1024 * 1024;

/// Why a broker link cannot be set up; each names the URL, variable or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{url}: expected mqtt://host:port or mqtts://host:port")]
    Scheme { url: String },
    #[error("{url}: bad port {port:?} (expected 1-65535)")]
    Port { url: String, port: String },
    #[error("{url}: no host")]
    NoHost { url: String },
    #[error("LABCTL_MQTT_CA {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("mqtts://: no system root certificates; set LABCTL_MQTT_CA to a PEM file")]
    NoRootCertificates,
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("LABCTL_MQTT_PASSWORD_FILE {path}: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "LABCTL_MQTT_USER is set but neither LABCTL_MQTT_PASSWORD nor LABCTL_MQTT_PASSWORD_FILE"
    )]
    NoPassword,
}

/// A broker address from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883, TLS).
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, LinkError> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else {
        return Err(LinkError::Scheme { url: url.into() });
    };
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = split_host_port(url, rest, default_port)?;
    Ok(BrokerUrl { host, port, tls })
}

fn split_host_port(url: &str, rest: &str, default_port: u16) -> Result<(String, u16), LinkError> {
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|port| *port > 0)
                .ok_or_else(|| LinkError::Port {
                    url: url.into(),
                    port: p.into(),
                })?,
        ),
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(LinkError::NoHost { url: url.into() });
    }
    Ok((host.to_owned(), port))
}

/// TLS to an external broker: the CA certificates of LABCTL_MQTT_CA (a PEM file) when set, else the
/// system's roots. rustls with ring; certificates and host names are always verified.
pub fn tls_config() -> Result<rumqttc::TlsConfiguration, LinkError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match std::env::var("LABCTL_MQTT_CA") {
        Ok(path) => {
            let ca_error = |reason: String| LinkError::CaFile {
                path: path.clone(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(&path)
                .map_err(|e| ca_error(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ca_error("no certificate in it".into()));
            }
        }
        Err(_) => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(LinkError::NoRootCertificates);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

/// Reconnect delay after `failures` consecutive failures: exponential from 100 ms up to 10 s, with
/// jitter (50-100 % of the step) so a fleet of clients does not reconnect in lockstep.
pub fn backoff(failures: u32) -> Duration {
    let step_ms = 100u64
        .saturating_mul(1 << failures.saturating_sub(1).min(7))
        .min(10_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = 0.5 + f64::from(nanos % 1000) / 2000.0;
    Duration::from_millis((step_ms as f64 * jitter) as u64)
}

/// Credentials for a broker from the environment: LABCTL_MQTT_USER with LABCTL_MQTT_PASSWORD or
/// LABCTL_MQTT_PASSWORD_FILE (never the command line).
pub fn credentials_from_env() -> Result<Option<(String, String)>, LinkError> {
    let Ok(user) = std::env::var("LABCTL_MQTT_USER") else {
        return Ok(None);
    };
    let password = match std::env::var("LABCTL_MQTT_PASSWORD") {
        Ok(p) => p,
        Err(_) => match std::env::var("LABCTL_MQTT_PASSWORD_FILE") {
            Ok(path) => std::fs::read_to_string(&path)
                .map_err(|source| LinkError::PasswordFile {
                    path: path.clone(),
                    source,
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            Err(_) => return Err(LinkError::NoPassword),
        },
    };
    Ok(Some((user, password)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b = parse_broker_url("mqtt://broker.lab").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.tls),
            ("broker.lab", 1883, false)
        );
        let b = parse_broker_url("mqtts://broker.lab").unwrap();
        assert_eq!((b.port, b.tls), (8883, true));
        let b = parse_broker_url("mqtt://127.0.0.1:1884/").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 1884));
        let b = parse_broker_url("mqtt://[::1]:1885").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 1885));
        assert!(matches!(
            parse_broker_url("tcp://x:1"),
            Err(LinkError::Scheme { .. })
        ));
        assert!(matches!(
            parse_broker_url("mqtt://"),
            Err(LinkError::NoHost { .. })
        ));
        for bad in ["mqtt://x:port", "mqtt://x:70000", "mqtt://x:0"] {
            let err = parse_broker_url(bad).expect_err(bad);
            assert!(matches!(&err, LinkError::Port { .. }), "{bad}: {err}");
            assert!(err.to_string().starts_with(bad), "{err}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(1) >= Duration::from_millis(50));
        assert!(backoff(30) <= Duration::from_secs(10));
        assert!(backoff(30) >= Duration::from_secs(5));
    }
}
