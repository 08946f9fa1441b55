//! The MCP face against a real controller on the simulated lab, from Rust: the HTTP logins (401 with a
//! challenge, the right password reaching MCP), and `labctl mcp`'s stdio bridge relaying a whole session
//! whose submission records the client's identity.

mod common;

use std::time::Duration;

use base64::Engine;
use common::Rig;
use labctl_mcp::bridge::{Endpoint, run as bridge};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"bridge-test","version":"0.9"}}}"#;

/// One HTTP/1.1 POST of `body` to the rig's MCP endpoint; the status line and headers, and the body.
async fn post(rig: &Rig, authorization: Option<&str>, body: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(rig.mcp.addr).await.unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_checked_before_mcp_and_a_wrong_password_gets_401() {
    let rig = Rig::start().await;
    let (head, body) = post(&rig, None, INIT).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_lowercase().contains("www-authenticate: basic"),
        "{head}"
    );
    assert!(body.contains("HTTP Basic"), "{body}");
    let (head, body) = post(&rig, Some(&basic("planner-bo", "wrong")), INIT).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(body.contains("wrong user name or password"), "{body}");
    let (head, _) = post(&rig, Some("Bearer abc"), INIT).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let (head, body) = post(&rig, Some(&basic("planner-bo", "planner-dev")), INIT).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("mcp-session-id"), "{head}");
    assert!(body.contains("\"serverInfo\""), "{body}");
    let (head, _) = post(&rig, Some(&basic("planner-bo", "planner-dev")), INIT).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "a remembered login: {head}"
    );
    // The core's throttling holds here too: after a few failures the user must wait, and is told so.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (head, body) = post(&rig, Some(&basic("alice", "guess")), INIT).await;
        statuses.push((head.lines().next().unwrap_or_default().to_owned(), body));
    }
    assert!(statuses[0].0.starts_with("HTTP/1.1 401"), "{statuses:?}");
    let (last, body) = statuses.last().unwrap();
    assert!(last.starts_with("HTTP/1.1 429"), "{statuses:?}");
    assert!(body.contains("too many failed logins for alice"), "{body}");
    rig.stop().await;
}

/// Sends `lines` through the bridge and collects its answers until `expect` of them arrived.
async fn through_bridge(
    endpoint: Endpoint,
    lines: &[String],
    expect: usize,
) -> Vec<serde_json::Value> {
    let (mut agent_in, bridge_in) = tokio::io::duplex(1 << 20);
    let (bridge_out, agent_out) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(bridge(endpoint, bridge_in, bridge_out));
    let mut answers = Vec::new();
    let mut reader = BufReader::new(agent_out).lines();
    for line in lines {
        agent_in.write_all(line.as_bytes()).await.unwrap();
        agent_in.write_all(b"\n").await.unwrap();
        // One answer per request, in order: the next request may depend on the last answer.
        if serde_json::from_str::<serde_json::Value>(line)
            .unwrap()
            .get("id")
            .is_some()
        {
            let answer = tokio::time::timeout(Duration::from_secs(30), reader.next_line())
                .await
                .expect("an answer within 30 s")
                .unwrap()
                .expect("the bridge answers");
            answers.push(serde_json::from_str(&answer).unwrap());
        }
        if answers.len() == expect {
            break;
        }
    }
    drop(agent_in);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the bridge ends when its input does")
        .unwrap()
        .unwrap();
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdio_bridge_relays_a_session_and_the_run_records_its_client() {
    let rig = Rig::start().await;
    let url = rig.mcp.url();
    let hold =
        serde_json::from_slice::<serde_json::Value>(&common::hold("bridge-hold-1", 4000)).unwrap();
    let lines = vec![
        INIT.to_owned(),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#.to_owned(),
        serde_json::json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"submit_protocol","arguments":{"protocol": hold, "agent_model": "bridge-model"}}}).to_string(),
        r#"{"jsonrpc":"2.0","id":4,"method":"resources/read","params":{"uri":"labctl://protocol/schema"}}"#.to_owned(),
    ];
    let answers = through_bridge(
        Endpoint::new(&url, "planner-bo", "planner-dev").unwrap(),
        &lines,
        4,
    )
    .await;
    assert_eq!(
        answers[0]["result"]["serverInfo"]["name"], "labctl",
        "{}",
        answers[0]
    );
    let tools = answers[1]["result"]["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 11, "{}", answers[1]);
    let submitted = &answers[2]["result"]["structuredContent"];
    assert_eq!(submitted["outcome"], "awaiting_approval", "{}", answers[2]);
    assert!(
        submitted["approval_required_because"]
            .as_array()
            .unwrap()
            .len()
            == 1,
        "{submitted}"
    );
    assert!(
        answers[3]["result"]["contents"][0]["text"]
            .as_str()
            .unwrap()
            .contains("proposal_id"),
        "{}",
        answers[3]
    );
    let run_id = submitted["run_id"].as_str().unwrap();
    let record = rig.api.run_record(run_id).await.unwrap();
    let event = record
        .events
        .iter()
        .find(|e| e.kind == "submitted")
        .unwrap();
    assert_eq!(
        event.detail["client"],
        serde_json::json!({"name": "bridge-test", "version": "0.9", "agent_model": "bridge-model"})
    );
    assert_eq!(event.detail["via"], "mcp");

    // A wrong password: the agent's request gets a JSON-RPC error naming the refusal.
    let answers = through_bridge(
        Endpoint::new(&url, "planner-bo", "nope").unwrap(),
        &[INIT.to_owned()],
        1,
    )
    .await;
    let message = answers[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("401") && message.contains("wrong user name or password"),
        "{message}"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_bounded_and_a_new_one_beyond_them_is_told_why() {
    let rig = Rig::start().await;
    let auth = basic("planner-bo", "planner-dev");
    for n in 0..labctl_mcp::http::MAX_SESSIONS {
        let (head, _) = post(&rig, Some(&auth), INIT).await;
        assert!(head.starts_with("HTTP/1.1 200"), "session {n}: {head}");
    }
    let (head, body) = post(&rig, Some(&auth), INIT).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(body.contains("MCP sessions are open"), "{body}");
    rig.stop().await;
}

/// One POST carrying a session id.
async fn post_in_session(rig: &Rig, authorization: &str, session: &str, body: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(rig.mcp.addr).await.unwrap();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nAuthorization: {authorization}\r\n\
         Mcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-06-18\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_its_openers_alone() {
    let rig = Rig::start().await;
    let bo = basic("planner-bo", "planner-dev");
    let (head, _) = post(&rig, Some(&bo), INIT).await;
    let session = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("mcp-session-id:")
                .map(|v| v.trim().to_owned())
        })
        .expect("a session id");
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let alice = basic("alice", "technician-dev");
    let answer = post_in_session(&rig, &alice, &session, list).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("opened by another user"), "{answer}");
    let answer = post_in_session(&rig, &bo, &session, list).await;
    assert!(!answer.starts_with("HTTP/1.1 403"), "{answer}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_same_endpoint_with_the_data_directorys_certificate() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let rig = Rig::start().await;
    let files = labctl_core::tls::load_or_create(rig.dir.path(), &["127.0.0.1".into()]).unwrap();
    let https = labctl_mcp::http::serve(
        labctl_mcp::http::HttpOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: Some(files.config),
            allow_cleartext_on_network: false,
        },
        rig.api.clone(),
        std::sync::Arc::new(labctl_core::auth::Users::from_lab(rig.api.lab()).unwrap()),
    )
    .await
    .unwrap();
    assert!(
        https.url().starts_with("https://127.0.0.1:"),
        "{}",
        https.url()
    );
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&files.cert_path).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    for (auth, expect) in [
        (basic("planner-bo", "wrong"), "HTTP/1.1 401"),
        (basic("planner-bo", "planner-dev"), "HTTP/1.1 200"),
    ] {
        let tcp = tokio::net::TcpStream::connect(https.addr).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .expect("the certificate verifies for 127.0.0.1");
        let request = format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\nAuthorization: {auth}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{INIT}",
            INIT.len()
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut response))
            .await
            .expect("an answer within 30 s");
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with(expect), "{text}");
    }
    https.shutdown();
    rig.stop().await;
}
