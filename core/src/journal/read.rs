//! Reading the journal back: `labctl runs list | show | export`, and catch-up for planners.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::JournalError;

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub proposal_id: String,
    pub name: String,
    pub planner_id: String,
    pub state: String,
    pub current_step: Option<String>,
    pub reason: Option<String>,
    pub submitted_at_ms: i64,
    pub updated_at_ms: i64,
    pub results: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResultRow {
    pub run_id: String,
    pub seq: i64,
    pub name: String,
    pub step: String,
    pub instrument: String,
    pub identity: serde_json::Value,
    pub value: serde_json::Value,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub seq: i64,
    pub at_ms: i64,
    pub kind: String,
    pub step: Option<String>,
    pub actor: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub planner_model: Option<String>,
    pub planner_model_version: Option<String>,
    pub submitted_by: String,
    pub protocol_sha256: String,
    pub lab_id: String,
    pub lab_sha256: String,
    pub labctl_version: String,
    pub estimated_duration_s: Option<f64>,
    pub protocol: serde_json::Value,
    pub events: Vec<EventRow>,
}

const SUMMARY: &str =
    "SELECT r.run_id, r.proposal_id, r.name, r.planner_id, r.state, r.current_step, r.reason,
    r.submitted_at_ms, r.updated_at_ms, (SELECT COUNT(*) FROM results x WHERE x.run_id = r.run_id)
    FROM runs r";

fn summary(row: &rusqlite::Row) -> rusqlite::Result<RunSummary> {
    Ok(RunSummary {
        run_id: row.get(0)?,
        proposal_id: row.get(1)?,
        name: row.get(2)?,
        planner_id: row.get(3)?,
        state: row.get(4)?,
        current_step: row.get(5)?,
        reason: row.get(6)?,
        submitted_at_ms: row.get(7)?,
        updated_at_ms: row.get(8)?,
        results: row.get(9)?,
    })
}

fn json(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

pub fn list_runs(conn: &Connection) -> Result<Vec<RunSummary>, JournalError> {
    let mut stmt = conn.prepare(&format!("{SUMMARY} ORDER BY r.submitted_at_ms, r.run_id"))?;
    Ok(stmt.query_map([], summary)?.collect::<Result<_, _>>()?)
}

/// The `limit` most recently submitted runs, newest first.
pub fn recent_runs(conn: &Connection, limit: usize) -> Result<Vec<RunSummary>, JournalError> {
    let mut stmt = conn.prepare(&format!(
        "{SUMMARY} ORDER BY r.submitted_at_ms DESC, r.run_id DESC LIMIT ?1"
    ))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    Ok(stmt
        .query_map(params![limit], summary)?
        .collect::<Result<_, _>>()?)
}

pub fn run_detail(conn: &Connection, run_id: &str) -> Result<Option<RunDetail>, JournalError> {
    let mut stmt = conn.prepare(&format!("{SUMMARY} WHERE r.run_id = ?1"))?;
    let Some(s) = stmt.query_row(params![run_id], summary).optional()? else {
        return Ok(None);
    };
    let detail = conn.query_row(
        "SELECT planner_model, planner_model_version, submitted_by, protocol_sha256, lab_id, lab_sha256, labctl_version,
                estimated_duration_s, protocol_json FROM runs WHERE run_id = ?1",
        params![run_id],
        |r| {
            Ok(RunDetail {
                summary: s.clone(),
                planner_model: r.get(0)?,
                planner_model_version: r.get(1)?,
                submitted_by: r.get(2)?,
                protocol_sha256: r.get(3)?,
                lab_id: r.get(4)?,
                lab_sha256: r.get(5)?,
                labctl_version: r.get(6)?,
                estimated_duration_s: r.get(7)?,
                protocol: json(r.get(8)?),
                events: Vec::new(),
            })
        },
    )?;
    let mut stmt = conn.prepare(
        "SELECT seq, at_ms, kind, step, actor, detail FROM events WHERE run_id = ?1 ORDER BY seq",
    )?;
    let events = stmt
        .query_map(params![run_id], |r| {
            Ok(EventRow {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                kind: r.get(2)?,
                step: r.get(3)?,
                actor: r.get(4)?,
                detail: json(r.get(5)?),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(RunDetail { events, ..detail }))
}

/// Results of a run with a sequence number above `after` (a planner's resume cursor), in order.
pub fn results(
    conn: &Connection,
    run_id: &str,
    after: i64,
) -> Result<Vec<ResultRow>, JournalError> {
    let mut stmt = conn.prepare(
        "SELECT run_id, seq, name, step, instrument, identity, value, at_ms FROM results WHERE run_id = ?1 AND seq > ?2 ORDER BY seq",
    )?;
    Ok(stmt
        .query_map(params![run_id, after], |r| {
            Ok(ResultRow {
                run_id: r.get(0)?,
                seq: r.get(1)?,
                name: r.get(2)?,
                step: r.get(3)?,
                instrument: r.get(4)?,
                identity: json(r.get(5)?),
                value: json(r.get(6)?),
                at_ms: r.get(7)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

/// Every proposal id with its run, so a restarted controller still answers duplicates with the same run.
/// Every proposal id the journal holds, with its run, the run's state and the protocol's SHA-256: a
/// proposal id stays bound to its protocol across restarts.
pub struct ProposalRow {
    pub proposal_id: String,
    pub run_id: String,
    pub state: String,
    pub protocol_sha256: String,
}

/// The run a proposal id was given to, by any process (the id is unique in the journal).
pub fn proposal(conn: &Connection, proposal_id: &str) -> Result<Option<ProposalRow>, JournalError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .prepare_cached(
            "SELECT proposal_id, run_id, state, protocol_sha256 FROM runs WHERE proposal_id = ?1",
        )?
        .query_row([proposal_id], |r| {
            Ok(ProposalRow {
                proposal_id: r.get(0)?,
                run_id: r.get(1)?,
                state: r.get(2)?,
                protocol_sha256: r.get(3)?,
            })
        })
        .optional()?)
}

/// A run's state as the journal has it, if the run exists.
pub fn run_state(conn: &Connection, run_id: &str) -> Result<Option<String>, JournalError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .prepare_cached("SELECT state FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |r| r.get(0))
        .optional()?)
}

/// A run that was awaiting a technician's decision when the last process stopped.
pub struct PendingRow {
    pub run_id: String,
    pub submitted_by: String,
    pub protocol_json: String,
    pub protocol_sha256: String,
}

pub fn awaiting_approval(conn: &Connection) -> Result<Vec<PendingRow>, JournalError> {
    let mut stmt = conn.prepare(
        "SELECT run_id, submitted_by, protocol_json, protocol_sha256 FROM runs
         WHERE state = 'awaiting_approval' ORDER BY submitted_at_ms, run_id",
    )?;
    Ok(stmt
        .query_map([], |r| {
            Ok(PendingRow {
                run_id: r.get(0)?,
                submitted_by: r.get(1)?,
                protocol_json: r.get(2)?,
                protocol_sha256: r.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

/// Which journal events a reader wants (a console's log): every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub run_id: Option<String>,
    /// The instrument the event's detail names (`detail.instrument`).
    pub instrument: Option<String>,
    /// Who acted: a user's name (matching the journal's `name (Role via face)`) or a whole actor string.
    pub actor: Option<String>,
    pub kind: Option<String>,
    /// Only events older than this sequence number (paging back).
    pub before_seq: Option<i64>,
}

/// A journal event with the run it belongs to, if any.
#[derive(Debug, Clone, Serialize)]
pub struct LogRow {
    pub run_id: Option<String>,
    #[serde(flatten)]
    pub event: EventRow,
}

/// The newest `limit` events matching `filter`, newest first.
pub fn events(
    conn: &Connection,
    filter: &EventFilter,
    limit: usize,
) -> Result<Vec<LogRow>, JournalError> {
    let mut stmt = conn.prepare(
        "SELECT seq, at_ms, kind, step, actor, detail, run_id FROM events
         WHERE (?1 IS NULL OR run_id = ?1)
           AND (?2 IS NULL OR (json_valid(detail) AND json_extract(detail, '$.instrument') = ?2))
           AND (?3 IS NULL OR actor = ?3 OR substr(actor, 1, length(?3) + 2) = ?3 || ' (')
           AND (?4 IS NULL OR kind = ?4)
           AND (?5 IS NULL OR seq < ?5)
         ORDER BY seq DESC LIMIT ?6",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt
        .query_map(
            params![
                filter.run_id,
                filter.instrument,
                filter.actor,
                filter.kind,
                filter.before_seq,
                limit
            ],
            |r| {
                Ok(LogRow {
                    event: EventRow {
                        seq: r.get(0)?,
                        at_ms: r.get(1)?,
                        kind: r.get(2)?,
                        step: r.get(3)?,
                        actor: r.get(4)?,
                        detail: json(r.get(5)?),
                    },
                    run_id: r.get(6)?,
                })
            },
        )?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}
