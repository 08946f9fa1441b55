//! MCP's streamable HTTP transport, served by `labctl run --mcp ADDR` (and `--mcp-tls ADDR`): every request
//! carries a lab user's name and password (HTTP Basic), checked with the core's logins (the same limits and
//! throttling as every face) before the MCP server sees it.
//!
//! A checked `Authorization` header is remembered for a short while (its SHA-256 with the client's address,
//! never the password), so the requests of one conversation do not each cost an argon2 verification.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use labctl_core::api::{ControllerHandle, Face, Principal};
use labctl_core::auth::{AuthError, Source, Users};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::server::{Authenticated, LabMcp};

/// The path the MCP endpoint answers on.
pub const MCP_PATH: &str = "/mcp";
/// Largest request body accepted (a protocol may be 1 MiB; the JSON-RPC envelope around it).
pub const MAX_REQUEST_BODY: usize = 2 * 1024 * 1024;
/// HTTP connections served at once; beyond it a new connection is closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// MCP sessions open at once (an idle one ends after 5 minutes); beyond it a new `initialize` is answered
/// 503.
pub const MAX_SESSIONS: usize = 64;
/// How long a checked `Authorization` header is trusted without checking the password again.
pub const LOGIN_REMEMBERED: Duration = Duration::from_secs(300);
/// Checked headers remembered at most.
pub const MAX_REMEMBERED: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum McpHttpError {
    #[error(transparent)]
    Serve(#[from] labctl_http::ServeError),
}

/// Where and how to serve.
pub struct HttpOptions {
    pub listen: SocketAddr,
    /// TLS (the data directory's certificate); `None` serves clear text.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The lab file's `interfaces.allow_cleartext_on_network`: clear text on a non-loopback address.
    pub allow_cleartext_on_network: bool,
}

/// The running HTTP face: stops when shut down or dropped.
pub struct McpHttp {
    /// The bound address (the port taken when 0 was asked).
    pub addr: SocketAddr,
    pub tls: bool,
    server: labctl_http::Server,
}

impl McpHttp {
    /// The endpoint's URL, e.g. `http://127.0.0.1:40123/mcp`.
    pub fn url(&self) -> String {
        format!("{}{MCP_PATH}", self.server.origin())
    }

    /// Stops serving: every connection and MCP session ends (dropping it does the same).
    pub fn shutdown(self) {
        drop(self.server);
    }
}

/// Logins recently checked, by the SHA-256 of (client address, `Authorization` header).
struct Remembered {
    users: Arc<Users>,
    checked: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
    /// Who opened each MCP session: another user may not use it (its client identity, recorded with what
    /// is submitted, is the opener's).
    owners: Mutex<HashMap<String, String>>,
}

impl Remembered {
    /// Whether `user` may use the session `id` (an unknown session is for the MCP server to answer).
    fn may_use(&self, id: &str, user: &str) -> bool {
        let owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.get(id).is_none_or(|owner| owner == user)
    }

    /// Records the opener of a new session, forgetting sessions that have ended when the table is full.
    async fn opened(&self, id: &str, user: &str, sessions: &LocalSessionManager) {
        let live: Option<std::collections::HashSet<String>> = {
            let full =
                self.owners.lock().unwrap_or_else(|p| p.into_inner()).len() >= 2 * MAX_SESSIONS;
            if full {
                Some(
                    sessions
                        .sessions
                        .read()
                        .await
                        .keys()
                        .map(|k| k.to_string())
                        .collect(),
                )
            } else {
                None
            }
        };
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = live {
            owners.retain(|id, _| live.contains(id));
        }
        owners.insert(id.to_owned(), user.to_owned());
    }
}

/// Why a request was refused before MCP.
enum Refusal {
    Missing,
    Malformed(&'static str),
    Auth(AuthError),
}

impl Remembered {
    async fn principal(
        &self,
        header: Option<&str>,
        peer: SocketAddr,
    ) -> Result<Principal, Refusal> {
        let header = header.ok_or(Refusal::Missing)?;
        let key: [u8; 32] = Sha256::new()
            .chain_update(peer.ip().to_string())
            .chain_update([0])
            .chain_update(header)
            .finalize()
            .into();
        if let Some((p, at)) = self.lock().get(&key)
            && at.elapsed() < LOGIN_REMEMBERED
        {
            return Ok(p.clone());
        }
        let (user, password) = basic_credentials(header)?;
        let role = self
            .users
            .login(&user, &password, Source::from(peer))
            .await
            .map_err(Refusal::Auth)?;
        let principal = Principal::new(&user, role, Face::Mcp);
        let mut checked = self.lock();
        if checked.len() >= MAX_REMEMBERED {
            checked.retain(|_, (_, at)| at.elapsed() < LOGIN_REMEMBERED);
            if checked.len() >= MAX_REMEMBERED {
                checked.clear();
            }
        }
        checked.insert(key, (principal.clone(), Instant::now()));
        Ok(principal)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Principal, Instant)>> {
        self.checked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The user name and password of an `Authorization: Basic ...` header.
pub fn basic_credentials(header: &str) -> Result<(String, String), &'static str> {
    let (scheme, rest) = header
        .trim()
        .split_once(' ')
        .ok_or("Authorization: expected `Basic <base64 of user:password>`")?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(
            "Authorization: only the Basic scheme is accepted (a lab user's name and password)",
        );
    }
    if rest.len() > 1024 {
        return Err("Authorization: too long");
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| "Authorization: the Basic credentials are not base64")?;
    let text =
        String::from_utf8(decoded).map_err(|_| "Authorization: the credentials are not UTF-8")?;
    let (user, password) = text
        .split_once(':')
        .ok_or("Authorization: the credentials have no `:` between user and password")?;
    Ok((user.to_owned(), password.to_owned()))
}

impl From<&'static str> for Refusal {
    fn from(m: &'static str) -> Self {
        Refusal::Malformed(m)
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn refuse(refusal: Refusal) -> Response<Body> {
    let (status, message) = match refusal {
        Refusal::Missing => (
            StatusCode::UNAUTHORIZED,
            "log in with a lab user's name and password (HTTP Basic)".to_owned(),
        ),
        Refusal::Malformed(m) => (StatusCode::UNAUTHORIZED, m.to_owned()),
        Refusal::Auth(e @ AuthError::Denied) | Refusal::Auth(e @ AuthError::TooLong { .. }) => {
            (StatusCode::UNAUTHORIZED, e.to_string())
        }
        Refusal::Auth(e @ AuthError::Throttled { .. }) => {
            (StatusCode::TOO_MANY_REQUESTS, e.to_string())
        }
        Refusal::Auth(e @ AuthError::Busy) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"labctl\", charset=\"UTF-8\""),
        );
    }
    response
}

fn session_of_another() -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(
            b"{\"error\":\"this MCP session was opened by another user; initialize a session of your own\"}",
        ))
        .boxed(),
    );
    *response.status_mut() = StatusCode::FORBIDDEN;
    response
}

fn too_many_sessions() -> Response<Body> {
    let body = format!(
        "{{\"error\":\"{MAX_SESSIONS} MCP sessions are open; close one (DELETE) or wait for an idle one to end\"}}"
    );
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
}

fn not_found() -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(
            b"{\"error\":\"the MCP endpoint is /mcp\"}",
        ))
        .boxed(),
    );
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

/// Serves MCP over streamable HTTP at `/mcp` on `options.listen` (port 0 takes a free one: see
/// [`McpHttp::addr`]). Clear text is refused on a non-loopback address unless the lab file allows it.
pub async fn serve(
    options: HttpOptions,
    api: ControllerHandle,
    users: Arc<Users>,
) -> Result<McpHttp, McpHttpError> {
    let cancel = CancellationToken::new();
    let mut config =
        StreamableHttpServerConfig::default().with_max_request_body_bytes(MAX_REQUEST_BODY);
    config.cancellation_token = cancel.child_token();
    // The Host check guards unauthenticated local servers against DNS rebinding; every request here
    // carries a lab user's password, and a lab-network address is reached by its own name or address.
    if !options.listen.ip().is_loopback() {
        config = config.disable_allowed_hosts();
    }
    let sessions = Arc::new(LocalSessionManager::default());
    let mcp = StreamableHttpService::new(
        move || Ok(LabMcp::new(api.clone())),
        Arc::clone(&sessions),
        config,
    );
    let remembered = Arc::new(Remembered {
        users,
        checked: Mutex::new(HashMap::new()),
        owners: Mutex::new(HashMap::new()),
    });
    let server = labctl_http::serve(
        labctl_http::ServeOptions {
            what: "MCP over HTTP",
            listen: options.listen,
            tls: options.tls,
            allow_cleartext_on_network: options.allow_cleartext_on_network,
            max_connections: MAX_CONNECTIONS,
        },
        cancel,
        move |peer| {
            let (mcp, remembered, sessions) =
                (mcp.clone(), Arc::clone(&remembered), Arc::clone(&sessions));
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let (mcp, remembered, sessions) =
                    (mcp.clone(), Arc::clone(&remembered), Arc::clone(&sessions));
                answer(req, peer, mcp, remembered, sessions)
            })
        },
    )
    .await?;
    Ok(McpHttp {
        addr: server.addr,
        tls: server.tls,
        server,
    })
}

/// One request: the path, the login, the session limit and the session's owner, then MCP itself.
async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    mut mcp: StreamableHttpService<LabMcp, LocalSessionManager>,
    remembered: Arc<Remembered>,
    sessions: Arc<LocalSessionManager>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() != MCP_PATH {
        return Ok(not_found());
    }
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match remembered.principal(header, peer).await {
        Ok(_)
            if req.method() == http::Method::POST
                && !req.headers().contains_key("mcp-session-id")
                && sessions.sessions.read().await.len() >= MAX_SESSIONS =>
        {
            Ok(too_many_sessions())
        }
        Ok(principal) => {
            let session = req
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(id) = &session
                && !remembered.may_use(id, &principal.name)
            {
                return Ok(session_of_another());
            }
            let user = principal.name.clone();
            let mut req = req;
            req.extensions_mut().insert(Authenticated(principal));
            use tower_service::Service;
            let response = mcp.call(req).await;
            if session.is_none()
                && let Ok(r) = &response
                && let Some(id) = r
                    .headers()
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
            {
                remembered.opened(id, &user, &sessions).await;
            }
            response
        }
        Err(refusal) => Ok(refuse(refusal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_read_and_anything_else_is_named() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("planner-bo:pass:with:colons")
        );
        assert_eq!(
            basic_credentials(&header),
            Ok(("planner-bo".into(), "pass:with:colons".into()))
        );
        assert!(
            basic_credentials("Bearer abc")
                .unwrap_err()
                .contains("only the Basic scheme")
        );
        assert!(
            basic_credentials("Basic !!!")
                .unwrap_err()
                .contains("not base64")
        );
        let no_colon = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("nobody")
        );
        assert!(basic_credentials(&no_colon).unwrap_err().contains("no `:`"));
        assert!(basic_credentials("Basic").is_err());
        assert!(basic_credentials(&format!("Basic {}", "A".repeat(5000))).is_err());
    }
}
