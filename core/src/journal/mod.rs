//! The journal: an embedded SQLite database (WAL, `synchronous=FULL`) in the data directory that records
//! everything a run does. One thread owns the connection and commits in groups: whatever queued up while
//! the previous commit was syncing goes into the next transaction, so durability costs one fsync per batch,
//! not per record. Only committed records are published to subscribers, so anything a planner or a
//! technician has been told is already on disk.

pub mod export;
pub mod latch_block;
pub mod read;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use rusqlite::{Connection, params};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot};

use crate::contract::{Decision, EventDetail, EventKind, RunState};
use crate::instruments::DeviceCommand;

pub const DB_FILE: &str = "journal.sqlite";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("journal: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("journal: the writer thread has stopped")]
    Stopped,
    /// A commit failed (disk full, I/O error, read-only file system): nothing waited on was recorded.
    #[error("journal: cannot commit: {0}")]
    CommitFailed(String),
    #[error(
        "data directory {path} is in use by another labctl{}",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { path: PathBuf, holder: Option<u32> },
    #[error("emergency-stop latch block {path}: {source}")]
    LatchBlock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory lock {path}: {source}")]
    LockIo {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether the journal can commit. A failed commit is a safety event: the controller stops the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalHealth {
    Healthy,
    /// The last commit failed for this reason; the writer keeps retrying what was not waited on.
    Failed(String),
}

/// Milliseconds since the Unix epoch, the journal's timestamp.
pub use labctl_contract::now_ms;

/// A run as first recorded.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run_id: String,
    pub proposal_id: String,
    pub name: String,
    pub planner_id: String,
    pub planner_model: Option<String>,
    pub planner_model_version: Option<String>,
    pub submitted_by: String,
    pub protocol_json: String,
    pub protocol_sha256: String,
    pub lab_id: String,
    pub lab_sha256: String,
    pub labctl_version: String,
    pub state: RunState,
    pub estimated_duration_s: Option<f64>,
    pub submitted_at_ms: i64,
}

/// One thing to record.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    RunCreated(RunRecord),
    RunState {
        run_id: String,
        state: RunState,
        step: Option<String>,
        reason: Option<String>,
        at_ms: i64,
    },
    /// A command's intent, on disk before the command goes out: a crash leaves a record of what may have
    /// reached the instrument. Kept as a `command` event; typed here so readers need not dig it out of JSON.
    Command {
        run_id: String,
        step: String,
        instrument: String,
        command: DeviceCommand,
        at_ms: i64,
    },
    /// A decision on a proposal. Kept as an `approval` event; typed so faces read it without digging.
    Approval {
        run_id: String,
        actor: Option<String>,
        decision: Decision,
        at_ms: i64,
    },
    /// Step outcomes, operator actions, interlocks, e-stops: the kind is the detail's.
    Event {
        run_id: Option<String>,
        step: Option<String>,
        actor: Option<String>,
        detail: EventDetail,
        at_ms: i64,
    },
    /// The emergency-stop latch, kept in the `safety` table and restored at start.
    EStopLatch {
        latched: bool,
        reason: Option<String>,
        actor: Option<String>,
        at_ms: i64,
    },
    /// A technician's override of a tripped interlock (`until_ms: None` once it ends), kept in the `safety`
    /// table and restored at start while it has time left.
    InterlockOverride {
        interlock: String,
        until_ms: Option<i64>,
        reason: String,
        actor: Option<String>,
        at_ms: i64,
    },
    Result {
        run_id: String,
        seq: u64,
        name: String,
        step: String,
        instrument: String,
        identity: serde_json::Value,
        value: serde_json::Value,
        at_ms: i64,
    },
}

// Nearly every op is an Append: boxing the record to shrink the rare Flush would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Op {
    Append(Record, Ack),
    /// Answers once everything queued before it is on disk.
    Flush(oneshot::Sender<Result<(), JournalError>>),
}

impl Op {
    fn into_entry(self) -> (Option<Record>, Ack) {
        match self {
            Op::Append(record, ack) => (Some(record), ack),
            Op::Flush(tx) => (None, Ack::Notify(tx)),
        }
    }
}

/// What the writer does once a record is on disk.
enum Ack {
    Nothing,
    /// Wakes a waiter (`append_durable`).
    Notify(oneshot::Sender<Result<(), JournalError>>),
    /// Raises a counter to this value (durable result counts, read without asking the writer).
    Count(Arc<AtomicU64>, u64),
}

impl Ack {
    fn committed(self) {
        match self {
            Ack::Nothing => {}
            Ack::Notify(tx) => {
                let _ = tx.send(Ok(()));
            }
            Ack::Count(counter, value) => {
                counter.fetch_max(value, Ordering::SeqCst);
            }
        }
    }
}

/// Sends records to the journal thread. Cheap to clone.
#[derive(Clone)]
pub struct JournalHandle {
    tx: mpsc::Sender<Op>,
    committed: broadcast::Sender<Arc<Record>>,
    health: tokio::sync::watch::Receiver<JournalHealth>,
}

impl JournalHandle {
    /// Queues a record; it is committed with the next batch. Never blocks.
    pub fn append(&self, record: Record) {
        if self.tx.send(Op::Append(record, Ack::Nothing)).is_err() {
            tracing::error!("journal writer has stopped; record lost");
        }
    }

    /// Queues a record; once it is on disk, `counter` is raised to `value` (if it is not above already).
    pub fn append_counted(&self, record: Record, counter: Arc<AtomicU64>, value: u64) {
        if self
            .tx
            .send(Op::Append(record, Ack::Count(counter, value)))
            .is_err()
        {
            tracing::error!("journal writer has stopped; record lost");
        }
    }

    /// Waits until every record queued so far is on disk.
    pub async fn flush(&self) -> Result<(), JournalError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Flush(tx))
            .map_err(|_| JournalError::Stopped)?;
        committed(rx).await
    }

    /// Queues a record and waits until it is on disk.
    pub async fn append_durable(&self, record: Record) -> Result<(), JournalError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Append(record, Ack::Notify(tx)))
            .map_err(|_| JournalError::Stopped)?;
        committed(rx).await
    }

    /// Whether commits succeed; changes when one fails and when a retry succeeds again.
    pub fn health(&self) -> tokio::sync::watch::Receiver<JournalHealth> {
        self.health.clone()
    }

    /// Records as they are committed, in commit order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.committed.subscribe()
    }
}

/// A record that is a journal event, as the `events` table keeps it and the faces publish it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow<'a> {
    pub run_id: Option<&'a str>,
    pub kind: EventKind,
    pub step: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub detail: std::borrow::Cow<'a, serde_json::Value>,
    pub at_ms: i64,
}

impl Record {
    /// The events row this record is, if it is one: the one place a typed record becomes an event.
    pub fn as_event(&self) -> Option<EventRow<'_>> {
        use std::borrow::Cow;
        match self {
            Record::Command {
                run_id,
                step,
                instrument,
                command,
                at_ms,
            } => Some(EventRow {
                run_id: Some(run_id),
                kind: EventKind::Command,
                step: Some(step),
                actor: None,
                detail: Cow::Owned(
                    serde_json::json!({ "instrument": instrument, "command": command }),
                ),
                at_ms: *at_ms,
            }),
            Record::Approval {
                run_id,
                actor,
                decision,
                at_ms,
            } => Some(EventRow {
                run_id: Some(run_id),
                kind: EventKind::Approval,
                step: None,
                actor: actor.as_deref(),
                detail: Cow::Owned(serde_json::to_value(decision).unwrap_or_default()),
                at_ms: *at_ms,
            }),
            Record::Event {
                run_id,
                step,
                actor,
                detail,
                at_ms,
            } => Some(EventRow {
                run_id: run_id.as_deref(),
                kind: detail.kind(),
                step: step.as_deref(),
                actor: actor.as_deref(),
                detail: Cow::Owned(detail.to_json()),
                at_ms: *at_ms,
            }),
            Record::RunCreated(_)
            | Record::RunState { .. }
            | Record::EStopLatch { .. }
            | Record::InterlockOverride { .. }
            | Record::Result { .. } => None,
        }
    }
}

/// Waits for the writer's answer.
#[cfg(not(test))]
async fn committed(rx: oneshot::Receiver<Result<(), JournalError>>) -> Result<(), JournalError> {
    rx.await.map_err(|_| JournalError::Stopped)?
}

/// Under this crate's tests the wait is a blocking task: tokio's paused clock does not jump ahead while
/// one runs, so a test on paused time does not see timeouts fire while the disk works.
#[cfg(test)]
async fn committed(rx: oneshot::Receiver<Result<(), JournalError>>) -> Result<(), JournalError> {
    tokio::task::spawn_blocking(move || rx.blocking_recv())
        .await
        .map_err(|_| JournalError::Stopped)?
        .map_err(|_| JournalError::Stopped)?
}

/// Opens (creating if needed) the journal in `data_dir`.
pub fn open_db(data_dir: &Path) -> Result<Connection, JournalError> {
    let path = data_dir.join(DB_FILE);
    let conn = Connection::open(&path).map_err(|source| JournalError::Open {
        path: path.clone(),
        source,
    })?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    proposal_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    planner_id TEXT NOT NULL,
    planner_model TEXT,
    planner_model_version TEXT,
    submitted_by TEXT NOT NULL,
    protocol_json TEXT NOT NULL,
    protocol_sha256 TEXT NOT NULL,
    lab_id TEXT NOT NULL,
    lab_sha256 TEXT NOT NULL,
    labctl_version TEXT NOT NULL,
    state TEXT NOT NULL,
    current_step TEXT,
    reason TEXT,
    estimated_duration_s REAL,
    submitted_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step TEXT,
    actor TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, seq);
CREATE TABLE IF NOT EXISTS safety (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    actor TEXT,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    step TEXT NOT NULL,
    instrument TEXT NOT NULL,
    identity TEXT NOT NULL,
    value TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
);
";

/// Holds the data directory for one controller: a second `labctl run` on it is refused, so it can never
/// mark the first one's runs interrupted. Released when dropped (or when the process dies, by the kernel).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

pub const LOCK_FILE: &str = "labctl.lock";

/// Takes the data directory's lock (an exclusive `flock` on `labctl.lock`), without waiting.
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, JournalError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = data_dir.join(LOCK_FILE);
    let io = |source: std::io::Error| JournalError::LockIo {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared with the kernel.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        return Err(JournalError::Locked {
            path: data_dir.to_owned(),
            holder: text.trim().parse().ok(),
        });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DataDirLock { _file: file })
}

/// The emergency-stop latch as the last process left it: `Some(reason)` when latched.
pub fn estop_latched(conn: &Connection) -> Result<Option<String>, JournalError> {
    use rusqlite::OptionalExtension;
    let value: Option<String> = conn
        .query_row("SELECT value FROM safety WHERE key = 'estop'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(value) = value else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&value).unwrap_or_default();
    // Anything unreadable counts as latched: on doubt the lab stays stopped.
    if v.get("latched").and_then(|l| l.as_bool()) == Some(false) {
        return Ok(None);
    }
    Ok(Some(
        v.get("reason")
            .and_then(|r| r.as_str())
            .unwrap_or("latched before the restart")
            .to_owned(),
    ))
}

/// Where an interlock override lives in the `safety` table: this prefix and the interlock's name.
const OVERRIDE_KEY: &str = "override:";

/// An interlock override a previous process left in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOverride {
    pub interlock: String,
    pub until_ms: i64,
    pub reason: String,
    pub actor: Option<String>,
}

/// Interlock overrides still in force at `now_ms` as the last process left them. An unreadable entry is
/// left out: on doubt the interlock acts again.
pub fn interlock_overrides(
    conn: &Connection,
    now_ms: i64,
) -> Result<Vec<StoredOverride>, JournalError> {
    let mut stmt =
        conn.prepare("SELECT key, value, actor FROM safety WHERE key LIKE 'override:%'")?;
    let rows: Vec<(String, String, Option<String>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(key, value, actor)| {
            let v: serde_json::Value = serde_json::from_str(&value).ok()?;
            let until_ms = v.get("until_ms")?.as_i64().filter(|u| *u > now_ms)?;
            Some(StoredOverride {
                interlock: key.strip_prefix(OVERRIDE_KEY)?.to_owned(),
                until_ms,
                reason: v.get("reason")?.as_str()?.to_owned(),
                actor,
            })
        })
        .collect())
}

/// Runs left `running`, `paused` or `queued` by a previous process: marks them `interrupted` (never resumed
/// silently) and returns their ids.
pub fn mark_interrupted(conn: &Connection) -> Result<Vec<String>, JournalError> {
    let mut stmt =
        conn.prepare("SELECT run_id FROM runs WHERE state IN ('running', 'paused', 'queued')")?;
    let ids: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let now = now_ms();
    for id in &ids {
        conn.execute(
            "UPDATE runs SET state = 'interrupted', reason = 'controller stopped while the run was active', updated_at_ms = ?2 WHERE run_id = ?1",
            params![id, now],
        )?;
        conn.execute(
            "INSERT INTO events (run_id, at_ms, kind, detail) VALUES (?1, ?2, 'interrupted', ?3)",
            params![id, now, r#"{"reason":"controller restarted; instruments sent to safe state; run not resumed"}"#],
        )?;
    }
    Ok(ids)
}

/// Starts the writer thread on an open connection.
pub fn start(conn: Connection) -> JournalHandle {
    let (tx, rx) = mpsc::channel();
    let (committed, _) = broadcast::channel(4096);
    let (health_tx, health) = tokio::sync::watch::channel(JournalHealth::Healthy);
    let publisher = committed.clone();
    std::thread::Builder::new()
        .name("labctl-journal".into())
        .spawn(move || writer(conn, rx, publisher, health_tx))
        .expect("spawning the journal thread");
    JournalHandle {
        tx,
        committed,
        health,
    }
}

/// Most records in one transaction, so one huge burst cannot delay the first acks forever.
const MAX_BATCH: usize = 4096;

/// How long a writer whose last commit failed waits for new records before it tries again.
const RETRY_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_millis(250);

fn writer(
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    publish: broadcast::Sender<Arc<Record>>,
    health: tokio::sync::watch::Sender<JournalHealth>,
) {
    let mut batch: Vec<(Option<Record>, Ack)> = Vec::with_capacity(256);
    loop {
        // After a failed commit the batch still holds what nobody waited on: retry it on the next record
        // or after a pause, whichever comes first.
        let next = if batch.is_empty() {
            rx.recv().map(Some).map_err(|_| ())
        } else {
            match rx.recv_timeout(RETRY_AFTER_FAILURE) {
                Ok(op) => Ok(Some(op)),
                Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
            }
        };
        match next {
            Err(()) => return,
            Ok(Some(op)) => batch.push(op.into_entry()),
            Ok(None) => {}
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op.into_entry()),
                Err(_) => break,
            }
        }
        if let Err(e) = commit(&mut conn, &batch) {
            let reason = e.to_string();
            tracing::error!(error = %reason, records = batch.len(), "journal commit failed");
            // Waiters hear the failure at once and their records are dropped: nobody is told "recorded" of
            // something that is not on disk. Everything else is kept and retried.
            let mut kept = Vec::with_capacity(batch.len());
            for (record, ack) in batch.drain(..) {
                match ack {
                    Ack::Notify(tx) => {
                        let _ = tx.send(Err(JournalError::CommitFailed(reason.clone())));
                    }
                    ack => kept.push((record, ack)),
                }
            }
            batch = kept;
            health.send_if_modified(|h| {
                let changed = *h != JournalHealth::Failed(reason.clone());
                *h = JournalHealth::Failed(reason);
                changed
            });
            continue;
        }
        health.send_if_modified(|h| {
            let changed = *h != JournalHealth::Healthy;
            *h = JournalHealth::Healthy;
            changed
        });
        for (record, ack) in batch.drain(..) {
            ack.committed();
            if let Some(record) = record {
                let _ = publish.send(Arc::new(record));
            }
        }
    }
}

fn commit(conn: &mut Connection, batch: &[(Option<Record>, Ack)]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    for record in batch.iter().filter_map(|(record, _)| record.as_ref()) {
        match record {
            Record::RunCreated(r) => {
                tx.execute(
                    "INSERT OR IGNORE INTO runs (run_id, proposal_id, name, planner_id, planner_model, planner_model_version,
                        submitted_by, protocol_json, protocol_sha256, lab_id, lab_sha256, labctl_version, state,
                        estimated_duration_s, submitted_at_ms, updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15)",
                    params![
                        r.run_id, r.proposal_id, r.name, r.planner_id, r.planner_model, r.planner_model_version,
                        r.submitted_by, r.protocol_json, r.protocol_sha256, r.lab_id, r.lab_sha256, r.labctl_version,
                        r.state.as_str(), r.estimated_duration_s, r.submitted_at_ms
                    ],
                )?;
            }
            Record::RunState {
                run_id,
                state,
                step,
                reason,
                at_ms,
            } => {
                tx.prepare_cached(
                    "UPDATE runs SET state = ?2, current_step = ?3, reason = COALESCE(?4, reason), updated_at_ms = ?5 WHERE run_id = ?1",
                )?
                .execute(params![run_id, state.as_str(), step, reason, at_ms])?;
            }
            Record::Command { .. } | Record::Approval { .. } | Record::Event { .. } => {
                if let Some(row) = record.as_event() {
                    tx.prepare_cached(
                        "INSERT INTO events (run_id, at_ms, kind, step, actor, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![
                        row.run_id,
                        row.at_ms,
                        row.kind.as_str(),
                        row.step,
                        row.actor,
                        row.detail.to_string()
                    ])?;
                }
            }
            Record::EStopLatch {
                latched,
                reason,
                actor,
                at_ms,
            } => {
                let value = serde_json::json!({ "latched": latched, "reason": reason }).to_string();
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO safety (key, value, actor, at_ms) VALUES ('estop', ?1, ?2, ?3)",
                )?
                .execute(params![value, actor, at_ms])?;
            }
            Record::InterlockOverride {
                interlock,
                until_ms,
                reason,
                actor,
                at_ms,
            } => {
                let key = format!("{OVERRIDE_KEY}{interlock}");
                let value =
                    serde_json::json!({ "until_ms": until_ms, "reason": reason }).to_string();
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO safety (key, value, actor, at_ms) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![key, value, actor, at_ms])?;
            }
            Record::Result {
                run_id,
                seq,
                name,
                step,
                instrument,
                identity,
                value,
                at_ms,
            } => {
                tx.prepare_cached(
                    "INSERT INTO results (run_id, seq, name, step, instrument, identity, value, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![run_id, *seq as i64, name, step, instrument, identity.to_string(), value.to_string(), at_ms])?;
            }
        }
    }
    tx.commit()
}
