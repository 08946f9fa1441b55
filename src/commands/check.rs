//! `labctl check`: validate protocol files against a lab, for people (text) and planners (`--json`).

use std::path::Path;
use std::process::ExitCode;

use labctl_protocols::validate::{MAX_PROTOCOL_BYTES, Report, read_protocol_file, validate_bytes};
use labctl_protocols::{Finding, FindingCode, Lab};
use serde::Serialize;

/// One file's outcome, as printed by `--json`.
#[derive(Serialize)]
struct FileReport<'a> {
    file: String,
    #[serde(flatten)]
    report: &'a Report,
}

pub fn run(protocols: &[std::path::PathBuf], lab_path: Option<&Path>, json: bool) -> ExitCode {
    let lab = match lab_path {
        Some(p) => match Lab::load(p) {
            Ok(lab) => lab,
            Err(e) => {
                eprintln!("labctl check: {e}");
                return ExitCode::from(2);
            }
        },
        None => Lab::sim(),
    };
    let mut any_invalid = false;
    let mut io_error = false;
    let mut reports = Vec::new();
    for path in protocols {
        let report = match read_protocol_file(path) {
            Ok(bytes) if bytes.len() > MAX_PROTOCOL_BYTES => {
                let f = Finding::error(FindingCode::TooLarge, "", "protocol document too large")
                    .found(format!("more than {MAX_PROTOCOL_BYTES} bytes"))
                    .expected(format!("at most {MAX_PROTOCOL_BYTES} bytes"));
                Report::from_findings(vec![f])
            }
            Ok(bytes) => validate_bytes(&bytes, &lab),
            Err(e) => {
                eprintln!("labctl check: cannot read {}: {e}", path.display());
                io_error = true;
                continue;
            }
        };
        any_invalid |= !report.valid;
        reports.push((path.display().to_string(), report));
    }
    if json {
        let out: Vec<FileReport> = reports
            .iter()
            .map(|(file, report)| FileReport {
                file: file.clone(),
                report,
            })
            .collect();
        match serde_json::to_string_pretty(&out) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("labctl check: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        for (file, report) in &reports {
            print_text(file, report);
        }
    }
    if io_error {
        ExitCode::from(2)
    } else if any_invalid {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_text(file: &str, report: &Report) {
    if report.valid {
        let duration = report
            .estimated_duration_s
            .map(|d| format!(", about {d:.0} s"))
            .unwrap_or_default();
        let approval = if report.approval_required_because.is_empty() {
            "auto-approvable".to_owned()
        } else {
            format!(
                "needs approval: {}",
                report.approval_required_because.join("; ")
            )
        };
        println!(
            "{file}: valid ({} steps{duration}; {approval})",
            report.expanded_steps
        );
    } else {
        let errors = report.findings.iter().filter(|f| f.is_error()).count();
        println!(
            "{file}: invalid ({errors} error{})",
            if errors == 1 { "" } else { "s" }
        );
    }
    for f in &report.findings {
        println!("  {f}");
    }
}
