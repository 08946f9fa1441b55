//! `labctl mcp`: MCP over stdio for a local agent, bridged to the streamable HTTP endpoint of a running
//! `labctl run --mcp ADDR`.
//!
//! Why a bridge: the controller, its journal and its instruments belong to the one `labctl run` process
//! (one controller per data directory), and the core's API is in-process only. A stdio server in another
//! process must reach it over a face; bridging to MCP's own HTTP transport keeps one MCP server, one login
//! path (the core's users and throttling) and one role policy, with nothing MCP-specific here: each line
//! from the agent is POSTed as it is, and each message of the answer (JSON or server-sent events) is
//! written back as one line. The protocol itself is rmcp's, on the server.

use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Longest line accepted from the agent (a protocol may be 1 MiB).
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// Longest answer read back from the server.
pub const MAX_ANSWER: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("--url {0:?}: expected http://HOST:PORT/PATH (the address `labctl run --mcp` printed)")]
    Url(String),
    #[error("reading standard input: {0}")]
    Stdin(std::io::Error),
}

/// Where the bridge sends, and as whom.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub authority: String,
    pub path: String,
    /// The `Authorization` header's value.
    pub authorization: String,
}

impl Endpoint {
    /// Parses `http://host:port/path`; logs in as `user` with `password` (HTTP Basic).
    pub fn new(url: &str, user: &str, password: &str) -> Result<Endpoint, BridgeError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| BridgeError::Url(url.to_owned()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/mcp"),
        };
        if authority.is_empty() || !authority.contains(':') {
            return Err(BridgeError::Url(url.to_owned()));
        }
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Endpoint {
            authority: authority.to_owned(),
            path: path.to_owned(),
            authorization: format!("Basic {token}"),
        })
    }
}

/// What the server told the bridge to send back with every request: its session, and the protocol version
/// the client negotiated.
#[derive(Default)]
struct Session {
    id: Option<String>,
    protocol_version: Option<String>,
}

/// Bridges `input` (one JSON-RPC message a line) to `endpoint` and the answers to `output`, until `input`
/// ends and every request sent has been answered.
pub async fn run<R, W>(endpoint: Endpoint, input: R, mut output: W) -> Result<(), BridgeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if output.write_all(line.as_bytes()).await.is_err()
                || output.write_all(b"\n").await.is_err()
                || output.flush().await.is_err()
            {
                return;
            }
        }
    });
    let session = Arc::new(Mutex::new(Session::default()));
    let endpoint = Arc::new(endpoint);
    let mut lines = BufReader::new(input);
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(BridgeError::Stdin)?;
        if n == 0 {
            break;
        }
        if buf.len() > MAX_LINE {
            eprintln!("labctl mcp: a message longer than {MAX_LINE} bytes was dropped");
            // Skip the rest of that line.
            loop {
                buf.clear();
                let n = (&mut lines)
                    .take(64 * 1024)
                    .read_until(b'\n', &mut buf)
                    .await
                    .map_err(BridgeError::Stdin)?;
                if n == 0 || buf.ends_with(b"\n") {
                    break;
                }
            }
            continue;
        }
        let text = String::from_utf8_lossy(&buf).trim().to_owned();
        if text.is_empty() {
            continue;
        }
        let message: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                let _ = tx
                    .send(error_line(
                        &serde_json::Value::Null,
                        -32700,
                        &format!("parse error: {e}"),
                    ))
                    .await;
                continue;
            }
        };
        let initialize = message.get("method").and_then(|m| m.as_str()) == Some("initialize");
        let job = post(
            Arc::clone(&endpoint),
            Arc::clone(&session),
            text,
            message,
            tx.clone(),
        );
        if initialize {
            // Later messages carry the session the answer gives.
            job.await;
        } else {
            tasks.spawn(job);
        }
    }
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
    Ok(())
}

fn error_line(id: &serde_json::Value, code: i64, message: &str) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
        .to_string()
}

/// POSTs one message and writes back every message of the answer; a failure becomes a JSON-RPC error for
/// a request (a notification's failure is only logged).
async fn post(
    endpoint: Arc<Endpoint>,
    session: Arc<Mutex<Session>>,
    text: String,
    message: serde_json::Value,
    out: mpsc::Sender<String>,
) {
    let id = message.get("id").cloned();
    let is_request = id.is_some() && message.get("method").is_some();
    if let Err(why) = exchange(&endpoint, &session, text, &message, &out).await {
        eprintln!("labctl mcp: {why}");
        if is_request && let Some(id) = id {
            let _ = out
                .send(error_line(&id, -32000, &format!("labctl: {why}")))
                .await;
        }
    }
}

async fn exchange(
    endpoint: &Endpoint,
    session: &Mutex<Session>,
    text: String,
    message: &serde_json::Value,
    out: &mpsc::Sender<String>,
) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(&endpoint.authority)
        .await
        .map_err(|e| {
            format!(
                "cannot reach {} ({e}): is `labctl run --mcp` running?",
                endpoint.authority
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let mut request = http::Request::post(&endpoint.path)
        .header(http::header::HOST, &endpoint.authority)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream")
        .header(http::header::AUTHORIZATION, &endpoint.authorization);
    {
        let s = session.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = &s.id {
            request = request.header("mcp-session-id", id);
        }
        if let Some(v) = &s.protocol_version {
            request = request.header("mcp-protocol-version", v);
        }
    }
    let request = request
        .body(Full::new(Bytes::from(text)))
        .map_err(|e| format!("HTTP request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status();
    if let Some(id) = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
    {
        session.lock().unwrap_or_else(|p| p.into_inner()).id = Some(id.to_owned());
    }
    let event_stream = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = read_all(&mut body).await.unwrap_or_default();
        let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(format!("HTTP {status}: {detail}"));
    }
    let initialize = message.get("method").and_then(|m| m.as_str()) == Some("initialize");
    let forward = |line: String| {
        if initialize
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && let Some(version) = v
                .pointer("/result/protocolVersion")
                .and_then(|x| x.as_str())
        {
            session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .protocol_version = Some(version.to_owned());
        }
        line
    };
    if !event_stream {
        let bytes = read_all(&mut body).await?;
        let text = String::from_utf8_lossy(&bytes).trim().to_owned();
        if !text.is_empty() {
            let _ = out.send(forward(text)).await;
        }
        return Ok(());
    }
    // Server-sent events: each event's data lines make one message; priming events carry none.
    let mut pending = String::new();
    let mut data = String::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("HTTP body: {e}"))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        total += chunk.len();
        if total > MAX_ANSWER {
            return Err(format!("answer longer than {MAX_ANSWER} bytes"));
        }
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if !data.trim().is_empty() {
                    let _ = out.send(forward(std::mem::take(&mut data))).await;
                }
                data.clear();
            } else if let Some(d) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
    }
    if !data.trim().is_empty() {
        let _ = out.send(forward(data)).await;
    }
    Ok(())
}

async fn read_all(body: &mut hyper::body::Incoming) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("HTTP body: {e}"))?;
        if let Ok(chunk) = frame.into_data() {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_ANSWER {
                return Err(format!("answer longer than {MAX_ANSWER} bytes"));
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_an_http_url_with_a_port() {
        let e = Endpoint::new("http://127.0.0.1:8765/mcp", "u", "p").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.path.as_str()),
            ("127.0.0.1:8765", "/mcp")
        );
        assert_eq!(e.authorization, "Basic dTpw");
        let bare = Endpoint::new("http://localhost:9000", "u", "p").unwrap();
        assert_eq!(bare.path, "/mcp");
        for bad in [
            "https://127.0.0.1:8765/mcp",
            "127.0.0.1:8765",
            "http://localhost/mcp",
            "http:///mcp",
        ] {
            assert!(Endpoint::new(bad, "u", "p").is_err(), "{bad}");
        }
    }
}
