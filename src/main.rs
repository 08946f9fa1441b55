//! The `labctl` command line: one binary for the controller, its tools and its simulators.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use labctl::commands;

#[derive(Parser)]
#[command(name = "labctl", version, about = "Autonomous robotic lab controller", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate protocols against a lab (the simulated lab unless --lab is given).
    ///
    /// Exit status: 0 all valid, 1 any invalid, 2 usage or I/O error.
    Check {
        /// Protocol files (JSON).
        #[arg(required = true)]
        protocols: Vec<PathBuf>,
        /// Lab file (TOML); the built-in simulated lab when absent.
        #[arg(long)]
        lab: Option<PathBuf>,
        /// Print machine-readable findings (JSON) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the protocol JSON Schema.
    Schema,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Check { protocols, lab, json } => commands::check::run(&protocols, lab.as_deref(), json),
        Command::Schema => {
            print!("{}", labctl_protocols::schema::protocol_schema_pretty());
            ExitCode::SUCCESS
        }
    }
}
