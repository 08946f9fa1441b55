//! The console's HTTP API. Reads need a session; anything that changes the lab needs a session, its CSRF
//! token in [`CSRF_HEADER`], and (when the browser says where the request comes from) an `Origin` of this
//! server. Every action goes to the core's API as the session's user through [`Face::Web`]: the core's role
//! table decides, here nothing is allowed or refused by role.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, extract::DefaultBodyLimit};
use labctl_core::api::{ApiError, Control, ControllerHandle, Face, Principal};
use labctl_core::auth::{AuthError, Source, Users};
use labctl_core::journal::read::EventFilter;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::session::{self, CSRF_HEADER, Session, Sessions};

/// Largest request body (logins, reasons).
pub const MAX_BODY: usize = 16 * 1024;
/// Log lines answered at most per request.
pub const MAX_LOG: usize = 500;
/// Results a run's page reads at most (the downloads have all of them).
pub const MAX_RESULTS: usize = 5000;
/// Recent runs listed.
pub const RECENT_RUNS: usize = 50;
/// Longest rejection reason.
pub const MAX_REASON: usize = 1000;

/// The peer's address, put on each request by the server.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

pub struct Console {
    pub api: ControllerHandle,
    pub users: Arc<Users>,
    pub sessions: Sessions,
    /// Cookies get `Secure` under TLS.
    pub tls: bool,
    pub live: watch::Receiver<Arc<str>>,
    /// Each awaiting proposal's validation, dry run and evidence, worked out once (they depend only on the
    /// protocol and the lab): every open page asks again whenever a run changes state.
    pub evidence: std::sync::Mutex<std::collections::HashMap<String, Arc<Value>>>,
}

/// Proposals whose evidence is kept at most (more than the per-user quota of awaiting runs times a few
/// users); beyond it the table starts again.
pub const MAX_EVIDENCE: usize = 256;

type AppState = Arc<Console>;

/// An API failure: a status and a message a person can read, as JSON `{"error": ...}`.
#[derive(Debug)]
pub struct Failure(pub StatusCode, pub String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        let status = match &e {
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::UnknownRun(_) | ApiError::UnknownInterlock(_) => StatusCode::NOT_FOUND,
            ApiError::BadArgument(_) => StatusCode::BAD_REQUEST,
            ApiError::Unavailable | ApiError::Journal(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::CONFLICT,
        };
        Failure(status, e.to_string())
    }
}

fn unavailable(what: &str) -> Failure {
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what}: the journal cannot be read now"),
    )
}

/// A logged-in browser (any request).
pub struct User {
    pub token: String,
    pub session: Session,
}

impl User {
    fn principal(&self) -> Principal {
        self.session.principal.clone()
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Failure> {
        let token = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session::token_in)
            .ok_or_else(|| Failure(StatusCode::UNAUTHORIZED, "log in first".into()))?;
        let session = state.sessions.get(token).ok_or_else(|| {
            Failure(
                StatusCode::UNAUTHORIZED,
                "the session has ended; log in again".into(),
            )
        })?;
        Ok(User {
            token: token.to_owned(),
            session,
        })
    }
}

/// A logged-in browser asking to change something: its CSRF token and origin are checked.
pub struct Acting(pub User);

/// Refuses a request another site's page may have made: an `Origin` (or `Sec-Fetch-Site`) that is not
/// this server.
fn same_origin(headers: &HeaderMap, tls: bool) -> Result<(), Failure> {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "cross-site" || s == "same-site")
    {
        return Err(Failure(
            StatusCode::FORBIDDEN,
            "a request from another site's page is refused".into(),
        ));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let scheme = if tls { "https" } else { "http" };
    if origin.to_str().ok() == Some(&format!("{scheme}://{host}")) {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::FORBIDDEN,
            format!(
                "Origin {:?} is not this console ({scheme}://{host})",
                origin.to_str().unwrap_or("?")
            ),
        ))
    }
}

impl FromRequestParts<AppState> for Acting {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Failure> {
        let user = User::from_request_parts(parts, state).await?;
        same_origin(&parts.headers, state.tls)?;
        let sent = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Failure(
                    StatusCode::FORBIDDEN,
                    format!("{CSRF_HEADER}: missing; reload the page"),
                )
            })?;
        if !session::same_token(sent, &user.session.csrf) {
            return Err(Failure(
                StatusCode::FORBIDDEN,
                format!("{CSRF_HEADER}: not this session's token; reload the page"),
            ));
        }
        Ok(Acting(user))
    }
}

pub fn router(console: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/lab", get(lab))
        .route("/api/live", get(live))
        .route("/api/approvals", get(approvals))
        .route("/api/runs", get(runs))
        .route("/api/runs/{run}", get(run))
        .route("/api/runs/{run}/results.jsonl", get(results_jsonl))
        .route("/api/runs/{run}/results.csv", get(results_csv))
        .route("/api/runs/{run}/approve", post(approve))
        .route("/api/runs/{run}/reject", post(reject))
        .route("/api/runs/{run}/control", post(control))
        .route("/api/estop", post(estop))
        .route("/api/estop/acknowledge", post(estop_acknowledge))
        .route("/api/log", get(log))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(console)
}

async fn not_found() -> Failure {
    Failure(StatusCode::NOT_FOUND, "no such page".into())
}

/// Headers every page gets: no framing by other sites, no sniffing, scripts only from here.
fn page_headers() -> [(header::HeaderName, HeaderValue); 4] {
    [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ]
}

async fn index() -> impl IntoResponse {
    (page_headers(), Html(crate::assets::INDEX))
}

async fn asset(Path(file): Path<String>) -> Response {
    match crate::assets::find(&file) {
        Some(a) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(a.content_type),
                ),
                (
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
                // Part of the binary: a new version is a new process, and a reload gets it.
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            a.body,
        )
            .into_response(),
        None => not_found().await.into_response(),
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    pub user: String,
    pub password: String,
}

fn me_json(session: &Session) -> Value {
    json!({
        "user": session.principal.name,
        "role": session.principal.role,
        "csrf": session.csrf,
    })
}

async fn login(
    State(console): State<AppState>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    headers: HeaderMap,
    Json(form): Json<LoginForm>,
) -> Result<Response, Failure> {
    // A login from another site's page would log this browser in as someone else.
    same_origin(&headers, console.tls)?;
    let role = console
        .users
        .login(&form.user, &form.password, Source::from(peer))
        .await
        .map_err(|e| {
            let status = match e {
                AuthError::Denied | AuthError::TooLong { .. } => StatusCode::UNAUTHORIZED,
                AuthError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
                AuthError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            };
            Failure(status, e.to_string())
        })?;
    let principal = Principal::new(&form.user, role, Face::Web);
    let (token, session) = console.sessions.open(principal);
    tracing::info!(user = %form.user, %peer, "web: logged in");
    Ok((
        [(header::SET_COOKIE, session::set_cookie(&token, console.tls))],
        Json(me_json(&session)),
    )
        .into_response())
}

async fn logout(State(console): State<AppState>, Acting(user): Acting) -> Response {
    console.sessions.close(&user.token);
    (
        [(header::SET_COOKIE, session::clear_cookie(console.tls))],
        Json(json!({"ok": true})),
    )
        .into_response()
}

async fn me(user: User) -> Json<Value> {
    Json(me_json(&user.session))
}

async fn lab(State(console): State<AppState>, _user: User) -> Json<Value> {
    let api = &console.api;
    Json(json!({
        "capabilities": labctl_protocols::capabilities::document(api.lab()),
        "interlocks": api.interlocks().await,
        "interlock_definitions": api.lab().interlocks,
        "estop_latched": api.estop_latched(),
    }))
}

async fn live(State(console): State<AppState>, _user: User) -> impl IntoResponse {
    let stream = crate::live::stream(console.live.clone(), console.api.events());
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )
}

/// Every proposal awaiting a decision, with what a person needs to decide: who proposed it with which
/// model, the protocol as steps, why it needs approval, the validator's findings and the dry run.
async fn approvals(State(console): State<AppState>, _user: User) -> Result<Json<Value>, Failure> {
    let api = &console.api;
    let mut out = Vec::new();
    for run in api
        .runs()
        .await
        .into_iter()
        .filter(|r| matches!(r.state, labctl_core::api::RunState::AwaitingApproval))
    {
        let cached = console
            .evidence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&run.run_id)
            .cloned();
        let worked_out = match cached {
            Some(v) => v,
            None => {
                let v = Arc::new(work_out(api, &run.run_id).await);
                let mut table = console.evidence.lock().unwrap_or_else(|p| p.into_inner());
                if table.len() >= MAX_EVIDENCE {
                    table.clear();
                }
                table.insert(run.run_id.clone(), Arc::clone(&v));
                v
            }
        };
        let mut entry = (*worked_out).clone();
        entry["run"] = json!(run);
        out.push(entry);
    }
    Ok(Json(Value::Array(out)))
}

/// What a person needs to decide on a proposal, besides its run: who proposed it with which model, the
/// protocol's objective and hypothesis, the validator's report, the dry run and the evidence.
async fn work_out(api: &ControllerHandle, run_id: &str) -> Value {
    let record = api.run_record(run_id).await;
    let protocol = record
        .as_ref()
        .map(|r| r.protocol.clone())
        .unwrap_or(Value::Null);
    let checked = match serde_json::to_vec(&protocol) {
        Ok(bytes) if !protocol.is_null() => api.check(bytes).await,
        _ => None,
    };
    let (report, dry_run) = match checked {
        Some((report, dry)) => (serde_json::to_value(&report).ok(), dry),
        None => (None, None),
    };
    json!({
        "planner_model": record.as_ref().and_then(|r| r.planner_model.clone()),
        "planner_model_version": record.as_ref().and_then(|r| r.planner_model_version.clone()),
        "objective": protocol["metadata"]["objective"],
        "hypothesis": protocol["metadata"]["hypothesis"],
        "protocol_sha256": record.as_ref().map(|r| r.protocol_sha256.clone()),
        "submitted_at_ms": record.as_ref().map(|r| r.summary.submitted_at_ms),
        "validation": report,
        "dry_run": dry_run,
        "evidence": crate::evidence::of(&protocol, api.lab()),
    })
}

async fn runs(State(console): State<AppState>, _user: User) -> Result<Json<Value>, Failure> {
    let active = console.api.runs().await;
    let recent = console
        .api
        .recent_runs(RECENT_RUNS)
        .await
        .ok_or_else(|| unavailable("runs"))?;
    Ok(Json(json!({ "active": active, "recent": recent })))
}

async fn run(
    State(console): State<AppState>,
    _user: User,
    Path(run_id): Path<String>,
) -> Result<Json<Value>, Failure> {
    let record = console
        .api
        .run_record(&run_id)
        .await
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("unknown run {run_id}")))?;
    let results = console
        .api
        .results(&run_id, 0, MAX_RESULTS)
        .await
        .ok_or_else(|| unavailable("results"))?;
    let live = console.api.run(&run_id).await;
    Ok(Json(
        json!({ "record": record, "results": results, "live": live }),
    ))
}

async fn results_file(console: &Console, run_id: &str, csv: bool) -> Result<Response, Failure> {
    if console.api.run_record(run_id).await.is_none() {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            format!("unknown run {run_id}"),
        ));
    }
    let rows = console
        .api
        .results(run_id, 0, usize::MAX)
        .await
        .ok_or_else(|| unavailable("results"))?;
    let mut body = Vec::new();
    let written = if csv {
        labctl_core::journal::export::write_csv(&rows, &mut body)
    } else {
        labctl_core::journal::export::write_jsonl(&rows, &mut body)
    };
    written.map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (kind, ext) = if csv {
        ("text/csv; charset=utf-8", "csv")
    } else {
        ("application/x-ndjson", "jsonl")
    };
    // Run ids are identifiers (letters, digits, '-', '_'); anything else is left out of the file name.
    let safe: String = run_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    Ok((
        [
            (header::CONTENT_TYPE, kind.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{safe}-results.{ext}\""),
            ),
        ],
        body,
    )
        .into_response())
}

async fn results_jsonl(
    State(console): State<AppState>,
    _user: User,
    Path(run_id): Path<String>,
) -> Result<Response, Failure> {
    results_file(&console, &run_id, false).await
}

async fn results_csv(
    State(console): State<AppState>,
    _user: User,
    Path(run_id): Path<String>,
) -> Result<Response, Failure> {
    results_file(&console, &run_id, true).await
}

async fn approve(
    State(console): State<AppState>,
    Acting(user): Acting,
    Path(run_id): Path<String>,
) -> Result<Json<Value>, Failure> {
    let state = console.api.approve(&run_id, user.principal()).await?;
    Ok(Json(json!({ "run_id": run_id, "state": state })))
}

#[derive(Deserialize)]
pub struct RejectForm {
    pub reason: String,
}

async fn reject(
    State(console): State<AppState>,
    Acting(user): Acting,
    Path(run_id): Path<String>,
    Json(form): Json<RejectForm>,
) -> Result<Json<Value>, Failure> {
    let reason = form.reason.trim();
    if reason.is_empty() || reason.len() > MAX_REASON {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("reason: say why, in 1 to {MAX_REASON} bytes"),
        ));
    }
    let state = console
        .api
        .reject(&run_id, reason, user.principal())
        .await?;
    Ok(Json(json!({ "run_id": run_id, "state": state })))
}

#[derive(Deserialize)]
pub struct ControlForm {
    pub control: String,
}

async fn control(
    State(console): State<AppState>,
    Acting(user): Acting,
    Path(run_id): Path<String>,
    Json(form): Json<ControlForm>,
) -> Result<Json<Value>, Failure> {
    let control = match form.control.as_str() {
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        "abort" => Control::Abort,
        other => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                format!("control: {other:?} is not one of pause, resume, abort"),
            ));
        }
    };
    let state = console
        .api
        .control(&run_id, control, user.principal())
        .await?;
    Ok(Json(json!({ "run_id": run_id, "state": state })))
}

async fn estop(
    State(console): State<AppState>,
    Acting(user): Acting,
) -> Result<Json<Value>, Failure> {
    console.api.emergency_stop(user.principal()).await?;
    Ok(Json(
        json!({ "estop_latched": console.api.estop_latched() }),
    ))
}

async fn estop_acknowledge(
    State(console): State<AppState>,
    Acting(user): Acting,
) -> Result<Json<Value>, Failure> {
    console
        .api
        .acknowledge_emergency_stop(user.principal())
        .await?;
    Ok(Json(
        json!({ "estop_latched": console.api.estop_latched() }),
    ))
}

#[derive(Deserialize, Default)]
pub struct LogQuery {
    pub run: Option<String>,
    pub instrument: Option<String>,
    pub user: Option<String>,
    pub kind: Option<String>,
    pub before: Option<i64>,
}

async fn log(
    State(console): State<AppState>,
    _user: User,
    Query(q): Query<LogQuery>,
) -> Result<Json<Value>, Failure> {
    let given = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let filter = EventFilter {
        run_id: given(q.run),
        instrument: given(q.instrument),
        actor: given(q.user),
        kind: given(q.kind),
        before_seq: q.before,
    };
    let rows = console
        .api
        .journal_events(filter, MAX_LOG)
        .await
        .ok_or_else(|| unavailable("log"))?;
    Ok(Json(json!(rows)))
}
