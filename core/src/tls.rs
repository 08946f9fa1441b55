//! The certificate of the faces that serve TLS (the embedded MQTT broker's `mqtts` listener and the TLS
//! command port): `DATA_DIR/tls/server-cert.pem` and `server-key.pem`, generated on first start (ECDSA
//! P-256, self-signed, for `localhost`, the loopback addresses, this host's name and the listen
//! addresses) or replaced by the lab's own. The key is readable by labctl's user only. Clients trust the
//! certificate file (mosquitto_sub `--cafile`, `LABCTL_MQTT_CA`, openssl `-CAfile`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the TLS files live under the data directory.
pub const TLS_DIR: &str = "tls";
pub const CERT_FILE: &str = "server-cert.pem";
pub const KEY_FILE: &str = "server-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating the TLS certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {why}")]
    Unreadable { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The server certificate and key, ready to serve.
pub struct ServerTls {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub config: Arc<rustls::ServerConfig>,
}

/// Loads `DATA_DIR/tls/`, creating the certificate first if it is missing; `hosts` are the listen
/// addresses' hosts, added to the certificate's names when it is created.
pub fn load_or_create(data_dir: &Path, hosts: &[String]) -> Result<ServerTls, TlsError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = data_dir.join(TLS_DIR);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { path, source }
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
    }
    let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if !cert_path.exists() || !key_path.exists() {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        if let Some(host) = host_name() {
            names.push(host);
        }
        for h in hosts {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            let unspecified = h
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified());
            if !h.is_empty() && !unspecified && !names.iter().any(|n| n == h) {
                names.push(h.to_owned());
            }
        }
        let generated = rcgen::generate_simple_self_signed(names)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_path)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, generated.key_pair.serialize_pem().as_bytes())
            })
            .map_err(io(&key_path))?;
        std::fs::write(&cert_path, generated.cert.pem()).map_err(io(&cert_path))?;
        tracing::info!(cert = %cert_path.display(), "TLS certificate created");
    }
    // A key put there by hand keeps labctl's user as its only reader too.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&key_path))?;
    let unreadable = |path: &Path| {
        let path = path.to_owned();
        move |e: rustls::pki_types::pem::Error| TlsError::Unreadable {
            path,
            why: e.to_string(),
        }
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .map_err(unreadable(&cert_path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable(&cert_path))?;
    if certs.is_empty() {
        return Err(TlsError::Unreadable {
            path: cert_path,
            why: "no certificate in it".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(unreadable(&key_path))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(ServerTls {
        cert_path,
        key_path,
        config: Arc::new(config),
    })
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer this function owns.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim().to_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_is_created_once_with_a_private_key_only_labctl_reads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), &["192.0.2.7".into()]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&first.key_path), 0o600);
        assert_eq!(mode(&dir.path().join(TLS_DIR)), 0o700);
        let pem = std::fs::read(&first.cert_path).unwrap();
        let again = load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(std::fs::read(&again.cert_path).unwrap(), pem, "made again");
        std::fs::write(&first.cert_path, "not a certificate").unwrap();
        let err = load_or_create(dir.path(), &[]).err().unwrap().to_string();
        assert!(err.contains(CERT_FILE), "{err}");
    }
}
