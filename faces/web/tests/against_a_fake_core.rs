//! The browser console alone, over real HTTP, in front of a scripted fake controller
//! (`labctl_core::fake_core`): logins with the lab's users, the session cookie's attributes, CSRF and origin
//! checks, what reaches the core and as whom, and refusals by the core's one role table.

use std::sync::Arc;
use std::time::Duration;

use labctl_core::api::{ApiError, Face, Principal, RunState};
use labctl_core::auth::Users;
use labctl_core::fake_core::{Call, FakeCore, Script};
use labctl_core::policy::{self, Permission};
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use labctl_web::{WebConsole, WebOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers approvals as the controller does: the core's role table first, then `run-1` is known.
struct Table;

impl Script for Table {
    fn run_request(&mut self, run_id: &str, who: &Principal) -> Result<RunState, ApiError> {
        policy::check(who, Permission::Approve)?;
        match run_id {
            "run-1" => Ok(RunState::Queued),
            other => Err(ApiError::UnknownRun(other.to_owned())),
        }
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end.
async fn request(
    console: &WebConsole,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(console.addr).await.unwrap();
    let mut text = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        console.addr
    );
    for (n, v) in headers {
        text.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(b) = body {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    text.push_str("\r\n");
    text.push_str(body.unwrap_or(""));
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .expect("the console answers within 20 s")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

struct Browser {
    cookie: String,
    csrf: String,
}

async fn login(console: &WebConsole, user: &str, password: &str) -> Result<Browser, Reply> {
    let body = serde_json::json!({"user": user, "password": password}).to_string();
    let r = request(console, "POST", "/api/login", &[], Some(&body)).await;
    if r.status != 200 {
        return Err(r);
    }
    let set_cookie = r.header("set-cookie").expect("a session cookie").to_owned();
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    Ok(Browser {
        cookie,
        csrf: r.json()["csrf"].as_str().unwrap().to_owned(),
    })
}

async fn start(dir: &std::path::Path) -> (FakeCore, WebConsole) {
    let lab = Lab::sim();
    let users = Arc::new(Users::from_lab(&lab).unwrap());
    let core = FakeCore::start(lab.clone(), dir, Table).unwrap();
    let console = labctl_web::serve(
        WebOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            allow_cleartext_on_network: false,
        },
        core.handle.clone(),
        users,
    )
    .await
    .unwrap();
    (core, console)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_gives_a_guarded_cookie_and_a_wrong_password_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_core, console) = start(dir.path()).await;
    let page = request(&console, "GET", "/", &[], None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<script src=\"/assets/app.js\">"));
    assert!(page.header("content-security-policy").is_some());

    let wrong = login(&console, "alice", "not-her-password")
        .await
        .err()
        .expect("refused");
    assert_eq!(wrong.status, 401);
    assert!(
        wrong.body.contains("wrong user name or password"),
        "{}",
        wrong.body
    );
    assert!(wrong.header("set-cookie").is_none());

    let body = serde_json::json!({"user": "alice", "password": "technician-dev"}).to_string();
    let ok = request(&console, "POST", "/api/login", &[], Some(&body)).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let cookie = ok.header("set-cookie").unwrap();
    assert!(cookie.starts_with("labctl_session="), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(
        !cookie.contains("Secure"),
        "clear text on loopback: {cookie}"
    );
    assert_eq!(ok.json()["user"], "alice");
    assert_eq!(ok.json()["role"], "technician");

    // Reads need a session.
    assert_eq!(
        request(&console, "GET", "/api/runs", &[], None)
            .await
            .status,
        401
    );
    let b = login(&console, "watcher", "observer-dev")
        .await
        .ok()
        .unwrap();
    let me = request(&console, "GET", "/api/me", &[("Cookie", &b.cookie)], None).await;
    assert_eq!(me.json()["role"], "observer");
    let lab = request(&console, "GET", "/api/lab", &[("Cookie", &b.cookie)], None).await;
    assert_eq!(lab.status, 200);
    assert_eq!(
        lab.json()["capabilities"]["instruments"]
            .as_array()
            .unwrap()
            .len(),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_need_the_csrf_token_and_this_origin() {
    let dir = tempfile::tempdir().unwrap();
    let (core, console) = start(dir.path()).await;
    let alice = login(&console, "alice", "technician-dev")
        .await
        .ok()
        .unwrap();

    let no_token = request(
        &console,
        "POST",
        "/api/runs/run-1/approve",
        &[("Cookie", &alice.cookie)],
        Some("{}"),
    )
    .await;
    assert_eq!(no_token.status, 403);
    assert!(
        no_token.body.contains("x-csrf-token: missing"),
        "{}",
        no_token.body
    );

    let wrong_token = request(
        &console,
        "POST",
        "/api/runs/run-1/approve",
        &[("Cookie", &alice.cookie), ("X-CSRF-Token", "0000")],
        Some("{}"),
    )
    .await;
    assert_eq!(wrong_token.status, 403);

    let other_site = request(
        &console,
        "POST",
        "/api/runs/run-1/approve",
        &[
            ("Cookie", &alice.cookie),
            ("X-CSRF-Token", &alice.csrf),
            ("Origin", "http://evil.example"),
        ],
        Some("{}"),
    )
    .await;
    assert_eq!(other_site.status, 403);
    assert!(
        other_site.body.contains("is not this console"),
        "{}",
        other_site.body
    );
    assert!(
        core.calls().is_empty(),
        "nothing refused here reached the core: {:?}",
        core.calls()
    );

    let origin = format!("http://{}", console.addr);
    let ok = request(
        &console,
        "POST",
        "/api/runs/run-1/approve",
        &[
            ("Cookie", &alice.cookie),
            ("X-CSRF-Token", &alice.csrf),
            ("Origin", &origin),
        ],
        Some("{}"),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["state"], "queued");
    assert_eq!(
        core.calls(),
        vec![Call::Approve {
            run_id: "run-1".into(),
            principal: Principal::new("alice", Role::Technician, Face::Web),
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_role_table_refuses_an_observer_and_the_refusal_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let (core, console) = start(dir.path()).await;
    let watcher = login(&console, "watcher", "observer-dev")
        .await
        .ok()
        .unwrap();
    let headers = [
        ("Cookie", watcher.cookie.as_str()),
        ("X-CSRF-Token", watcher.csrf.as_str()),
    ];
    let approve = request(
        &console,
        "POST",
        "/api/runs/run-1/approve",
        &headers,
        Some("{}"),
    )
    .await;
    assert_eq!(approve.status, 403, "{}", approve.body);
    // The face passed the request on as the observer; the core's table answered.
    assert_eq!(
        core.calls(),
        vec![Call::Approve {
            run_id: "run-1".into(),
            principal: Principal::new("watcher", Role::Observer, Face::Web),
        }]
    );
    let ack = request(
        &console,
        "POST",
        "/api/estop/acknowledge",
        &headers,
        Some("{}"),
    )
    .await;
    assert_eq!(ack.status, 403, "{}", ack.body);

    // A technician's stop latches, and the observer sees it on the live stream.
    let alice = login(&console, "alice", "technician-dev")
        .await
        .ok()
        .unwrap();
    let stop = request(
        &console,
        "POST",
        "/api/estop",
        &[("Cookie", &alice.cookie), ("X-CSRF-Token", &alice.csrf)],
        Some("{}"),
    )
    .await;
    assert_eq!(stop.status, 200, "{}", stop.body);
    assert_eq!(stop.json()["estop_latched"], true);
    assert!(core.handle.estop_latched());

    let bad = request(
        &console,
        "POST",
        "/api/runs/run-1/control",
        &[("Cookie", &alice.cookie), ("X-CSRF-Token", &alice.csrf)],
        Some(r#"{"control": "explode"}"#),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("control"), "{}", bad.body);
    let empty_reason = request(
        &console,
        "POST",
        "/api/runs/run-1/reject",
        &[("Cookie", &alice.cookie), ("X-CSRF-Token", &alice.csrf)],
        Some(r#"{"reason": "  "}"#),
    )
    .await;
    assert_eq!(empty_reason.status, 400);
    assert!(
        empty_reason.body.contains("reason"),
        "{}",
        empty_reason.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_sends_the_snapshot_and_the_latch_as_it_happens() {
    let dir = tempfile::tempdir().unwrap();
    let (_core, console) = start(dir.path()).await;
    let alice = login(&console, "alice", "technician-dev")
        .await
        .ok()
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(console.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /api/live HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\n\r\n",
                console.addr, alice.cookie
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let read_until = |needle: &'static str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        (needle, deadline)
    };
    let (needle, deadline) = read_until("event: snapshot");
    while !seen.contains(needle) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("a snapshot within 10 s")
            .unwrap();
        assert!(n > 0, "stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    let stop = request(
        &console,
        "POST",
        "/api/estop",
        &[("Cookie", &alice.cookie), ("X-CSRF-Token", &alice.csrf)],
        Some("{}"),
    )
    .await;
    assert_eq!(stop.status, 200);
    let (needle, deadline) = read_until("\"record\":\"e_stop_latch\"");
    while !seen.contains(needle) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the latch within 10 s")
            .unwrap();
        assert!(n > 0, "stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("\"actor\":\"alice\""), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_text_on_the_network_is_refused_unless_the_lab_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::sim();
    let core = FakeCore::start(lab.clone(), dir.path(), Table).unwrap();
    let users = Arc::new(Users::from_lab(&lab).unwrap());
    let refused = labctl_web::serve(
        WebOptions {
            listen: "0.0.0.0:0".parse().unwrap(),
            tls: None,
            allow_cleartext_on_network: false,
        },
        core.handle.clone(),
        users,
    )
    .await
    .err()
    .expect("refused");
    assert!(
        refused.to_string().contains("allow_cleartext_on_network"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filters_the_journal_by_run_instrument_user_and_kind() {
    use labctl_core::contract::{Decision, EventDetail, InterlockTrip};
    use labctl_core::journal::Record;
    let dir = tempfile::tempdir().unwrap();
    let (core, console) = start(dir.path()).await;
    let event = |run: &str, actor: &str, detail: EventDetail| Record::Event {
        run_id: Some(run.to_owned()),
        step: None,
        actor: Some(actor.to_owned()),
        detail,
        at_ms: 1,
    };
    core.journal.append(Record::Approval {
        run_id: "run-1".into(),
        actor: Some("alice (Technician via web)".into()),
        decision: Decision::Approved {
            by: None,
            estimated_duration_s: None,
        },
        at_ms: 1,
    });
    core.journal.append(event(
        "run-2",
        "alicea (Technician via mqtt)",
        EventDetail::CommandDone {
            instrument: "hotplate".into(),
            outcome: serde_json::json!({"outcome": "done"}),
        },
    ));
    core.journal.append(event(
        "run-2",
        "bob (Technician via opcua)",
        EventDetail::Interlock(InterlockTrip {
            interlock: "hotplate-over-temperature".into(),
            instrument: Some("hotplate".into()),
            reason: "131 C".into(),
            action: None,
            safe_state: None,
            runs: None,
            again: None,
        }),
    ));
    core.journal.flush().await.unwrap();
    let alice = login(&console, "alice", "technician-dev")
        .await
        .ok()
        .unwrap();
    let log = |query: &'static str| {
        let cookie = alice.cookie.clone();
        let console = &console;
        async move {
            let r = request(console, "GET", query, &[("Cookie", &cookie)], None).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    format!(
                        "{} {}",
                        e["run_id"].as_str().unwrap(),
                        e["kind"].as_str().unwrap()
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(log("/api/log?user=alice").await, ["run-1 approval"]);
    assert_eq!(
        log("/api/log?instrument=hotplate").await,
        ["run-2 interlock", "run-2 command_done"]
    );
    assert_eq!(
        log("/api/log?run=run-2&kind=interlock").await,
        ["run-2 interlock"]
    );
    assert_eq!(log("/api/log?run=&user=").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_uses_the_data_directorys_certificate_and_secure_cookies() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::sim();
    let core = FakeCore::start(lab.clone(), dir.path(), Table).unwrap();
    let files = labctl_core::tls::load_or_create(dir.path(), &["127.0.0.1".into()]).unwrap();
    let console = labctl_web::serve(
        WebOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: Some(files.config),
            allow_cleartext_on_network: false,
        },
        core.handle.clone(),
        Arc::new(Users::from_lab(&lab).unwrap()),
    )
    .await
    .unwrap();
    assert!(
        console.url().starts_with("https://127.0.0.1:"),
        "{}",
        console.url()
    );
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&files.cert_path).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(console.addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("the certificate verifies for 127.0.0.1");
    let body = r#"{"user":"alice","password":"technician-dev"}"#;
    let origin = format!("https://{}", console.addr);
    tls.write_all(
        format!(
            "POST /api/login HTTP/1.1\r\nHost: {}\r\nOrigin: {origin}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            console.addr,
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut response))
        .await
        .expect("an answer within 30 s");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let cookie = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.contains("Secure"),
        "{cookie}"
    );
}
