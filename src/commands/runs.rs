//! `labctl runs list | show RUN | export RUN --format jsonl|csv`: the journal, read back. Opens the database
//! read-only-in-spirit (WAL lets it read while a controller writes).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::journal::{self, export, read};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

fn open(data_dir: &Path) -> Result<rusqlite::Connection, String> {
    let path = data_dir.join(journal::DB_FILE);
    if !path.exists() {
        return Err(format!(
            "no journal at {} (use --data-dir to point at the controller's data directory)",
            path.display()
        ));
    }
    journal::open_db(data_dir).map_err(|e| e.to_string())
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("labctl runs: {msg}");
    ExitCode::from(2)
}

pub fn list(data_dir: &Path, json: bool) -> ExitCode {
    let conn = match open(data_dir) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let runs = match read::list_runs(&conn) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&runs).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<28} {:<18} {:>7}  {:<28} NAME",
        "RUN", "STATE", "RESULTS", "PROPOSAL"
    );
    for r in runs {
        println!(
            "{:<28} {:<18} {:>7}  {:<28} {}",
            r.run_id, r.state, r.results, r.proposal_id, r.name
        );
    }
    ExitCode::SUCCESS
}

pub fn show(data_dir: &Path, run_id: &str, json: bool) -> ExitCode {
    let conn = match open(data_dir) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let detail = match read::run_detail(&conn, run_id) {
        Ok(Some(d)) => d,
        Ok(None) => return fail(format!("no run {run_id} in the journal")),
        Err(e) => return fail(e),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&detail).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let s = &detail.summary;
    println!("run        {}", s.run_id);
    println!("name       {}", s.name);
    println!(
        "state      {}{}",
        s.state,
        s.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!("proposal   {}", s.proposal_id);
    println!(
        "planner    {} {} {}",
        s.planner_id,
        detail.planner_model.as_deref().unwrap_or(""),
        detail.planner_model_version.as_deref().unwrap_or("")
    );
    println!(
        "submitted  by {} at {}",
        detail.submitted_by, s.submitted_at_ms
    );
    println!("protocol   sha256 {}", detail.protocol_sha256);
    println!("lab        {} sha256 {}", detail.lab_id, detail.lab_sha256);
    println!("labctl     {}", detail.labctl_version);
    println!("results    {}", s.results);
    println!("events:");
    for e in &detail.events {
        println!(
            "  {:>6} {} {:<16} {:<22} {}{}",
            e.seq,
            e.at_ms,
            e.kind,
            e.step.as_deref().unwrap_or("-"),
            e.actor
                .as_deref()
                .map(|a| format!("[{a}] "))
                .unwrap_or_default(),
            e.detail
        );
    }
    ExitCode::SUCCESS
}

/// Writes a run's results: JSON Lines (one result per line, as journaled), or CSV in long form (one row per
/// scalar value, so a spectrum becomes one row per wavelength).
pub fn export(
    data_dir: &Path,
    run_id: &str,
    format: ExportFormat,
    out: &mut dyn Write,
) -> ExitCode {
    let conn = match open(data_dir) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match read::run_detail(&conn, run_id) {
        Ok(Some(_)) => {}
        Ok(None) => return fail(format!("no run {run_id} in the journal")),
        Err(e) => return fail(e),
    }
    let rows = match read::results(&conn, run_id, 0) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let written = match format {
        ExportFormat::Jsonl => export::write_jsonl(&rows, out),
        ExportFormat::Csv => export::write_csv(&rows, out),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        // `| head` closing the pipe is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
