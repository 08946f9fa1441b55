//! `labctl check-instrument`: check instrument definition files (docs/instrument-definitions.md).

use std::path::PathBuf;
use std::process::ExitCode;

use labctl_protocols::Finding;
use labctl_protocols::instrument_def::check_definition;
use serde::Serialize;

/// Definitions are a few kilobytes; anything this large is not one.
const MAX_DEFINITION_BYTES: u64 = 1024 * 1024;

#[derive(Serialize)]
struct FileReport {
    file: String,
    valid: bool,
    findings: Vec<Finding>,
}

pub fn run(files: &[PathBuf], json: bool) -> ExitCode {
    let mut reports = Vec::new();
    let mut io_error = false;
    for path in files {
        let text = match std::fs::metadata(path) {
            Ok(m) if m.len() > MAX_DEFINITION_BYTES => {
                eprintln!(
                    "labctl check-instrument: {}: {} bytes, more than a definition can be ({MAX_DEFINITION_BYTES})",
                    path.display(),
                    m.len()
                );
                io_error = true;
                continue;
            }
            _ => match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!(
                        "labctl check-instrument: cannot read {}: {e}",
                        path.display()
                    );
                    io_error = true;
                    continue;
                }
            },
        };
        let (definition, findings) = check_definition(&text);
        reports.push(FileReport {
            file: path.display().to_string(),
            valid: definition.is_some(),
            findings,
        });
    }
    if json {
        match serde_json::to_string_pretty(&reports) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("labctl check-instrument: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        for r in &reports {
            let errors = r.findings.iter().filter(|f| f.is_error()).count();
            if r.valid {
                println!("{}: valid", r.file);
            } else {
                println!(
                    "{}: invalid ({errors} error{})",
                    r.file,
                    if errors == 1 { "" } else { "s" }
                );
            }
            for f in &r.findings {
                println!("  {f}");
            }
        }
    }
    if io_error {
        ExitCode::from(2)
    } else if reports.iter().any(|r| !r.valid) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
