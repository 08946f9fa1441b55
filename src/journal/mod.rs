//! The journal: an embedded SQLite database (WAL, `synchronous=FULL`) in the data directory that records
//! everything a run does. One thread owns the connection and commits in groups: whatever queued up while
//! the previous commit was syncing goes into the next transaction, so durability costs one fsync per batch,
//! not per record. Only committed records are published to subscribers, so anything a planner or a
//! technician has been told is already on disk.

pub mod read;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot};

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
}

/// Milliseconds since the Unix epoch, the journal's timestamp.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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
    pub state: String,
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
        state: String,
        step: Option<String>,
        reason: Option<String>,
        at_ms: i64,
    },
    /// Step intents and outcomes, approvals, operator actions, interlocks, e-stops.
    Event {
        run_id: Option<String>,
        kind: String,
        step: Option<String>,
        actor: Option<String>,
        detail: serde_json::Value,
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
    Flush(oneshot::Sender<()>),
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
    Notify(oneshot::Sender<()>),
    /// Raises a counter to this value (durable result counts, read without asking the writer).
    Count(Arc<AtomicU64>, u64),
}

impl Ack {
    fn committed(self) {
        match self {
            Ack::Nothing => {}
            Ack::Notify(tx) => {
                let _ = tx.send(());
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
        rx.await.map_err(|_| JournalError::Stopped)
    }

    /// Queues a record and waits until it is on disk.
    pub async fn append_durable(&self, record: Record) -> Result<(), JournalError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Append(record, Ack::Notify(tx)))
            .map_err(|_| JournalError::Stopped)?;
        rx.await.map_err(|_| JournalError::Stopped)
    }

    /// Records as they are committed, in commit order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.committed.subscribe()
    }
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
    let publisher = committed.clone();
    std::thread::Builder::new()
        .name("labctl-journal".into())
        .spawn(move || writer(conn, rx, publisher))
        .expect("spawning the journal thread");
    JournalHandle { tx, committed }
}

/// Most records in one transaction, so one huge burst cannot delay the first acks forever.
const MAX_BATCH: usize = 4096;

fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>, publish: broadcast::Sender<Arc<Record>>) {
    let mut batch: Vec<(Option<Record>, Ack)> = Vec::with_capacity(256);
    while let Ok(first) = rx.recv() {
        batch.push(first.into_entry());
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op.into_entry()),
                Err(_) => break,
            }
        }
        if let Err(e) = commit(&mut conn, &batch) {
            // Do not acknowledge what is not on disk: the waiters see the journal as stopped.
            tracing::error!(error = %e, records = batch.len(), "journal commit failed");
            batch.clear();
            continue;
        }
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
                        r.state, r.estimated_duration_s, r.submitted_at_ms
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
                .execute(params![run_id, state, step, reason, at_ms])?;
            }
            Record::Event {
                run_id,
                kind,
                step,
                actor,
                detail,
                at_ms,
            } => {
                tx.prepare_cached(
                    "INSERT INTO events (run_id, at_ms, kind, step, actor, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![run_id, at_ms, kind, step, actor, detail.to_string()])?;
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
