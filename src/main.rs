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
    /// Run the controller: on the simulated lab (--sim) or on the instruments of a lab file (--config).
    Run {
        // Boxed: the other commands are small, and the run's options are many.
        #[command(flatten)]
        args: Box<commands::run::RunArgs>,
        #[command(flatten)]
        mqtt: commands::run::MqttArgs,
        #[command(flatten)]
        command_port: labctl::gateways::command_port::CommandPortArgs,
        #[command(flatten)]
        opcua: labctl::gateways::opcua::OpcUaArgs,
        #[command(flatten)]
        mcp: commands::run::McpArgs,
        #[command(flatten)]
        web: commands::run::WebArgs,
    },
    /// Serve the simulated lab's instruments alone, wire-level on pseudo-terminals and TCP, until
    /// SIGINT or SIGTERM; prints where each instrument is.
    Sim(commands::sim::SimArgs),
    /// Submit a protocol over MQTT as a planner would and print the reply; with --wait, follow the run.
    ///
    /// Exit status: 0 accepted (completed with --wait), 1 rejected, 3 failed, 4 aborted or interrupted,
    /// 2 usage, I/O or connection error.
    Submit(labctl::submit::SubmitArgs),
    /// The technicians' terminal UI: instruments, runs, approvals, results and the event log of a running
    /// controller, over MQTT; approve, reject, pause, resume, abort, emergency stop.
    ///
    /// Credentials from LABCTL_MQTT_USER with LABCTL_MQTT_PASSWORD or LABCTL_MQTT_PASSWORD_FILE (a
    /// technician to act; any user to watch). Exit status: 0 quit, 2 usage or terminal error.
    Console(labctl::console::ConsoleArgs),
    /// Check instrument definition files (TOML, docs/instrument-definitions.md): every finding names its
    /// field.
    ///
    /// Exit status: 0 all valid, 1 any invalid, 2 usage or I/O error.
    CheckInstrument {
        /// Instrument definition files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print machine-readable findings (JSON) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// MCP (Model Context Protocol) over stdio for a local AI agent, bridged to a running
    /// `labctl run --mcp ADDR` (docs/mcp.md).
    ///
    /// Credentials from LABCTL_MQTT_USER with LABCTL_MQTT_PASSWORD or LABCTL_MQTT_PASSWORD_FILE, as
    /// `labctl submit` takes them (a planner's, usually). Exit status: 0 when the agent closed stdin, 2
    /// usage or I/O error.
    Mcp {
        /// The MCP endpoint `labctl run --mcp` printed.
        #[arg(long, default_value = "http://127.0.0.1:8765/mcp")]
        url: String,
    },
    /// Print the protocol JSON Schema (or, with --instrument, the instrument definitions' schema).
    Schema {
        #[arg(long)]
        instrument: bool,
    },
    /// Read a password from standard input and print its argon2id hash for a lab file's `password_hash`.
    Passwd,
    /// Read the journal: runs, their events and results.
    Runs {
        /// The controller's data directory.
        #[arg(long, default_value = "./labctl-data", global = true)]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: RunsCommand,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Every run in the journal.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One run: provenance, state and its events.
    Show {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// One run's results as JSON Lines or CSV.
    Export {
        run: String,
        #[arg(long, value_enum)]
        format: commands::runs::ExportFormat,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    keep_large_allocations_off_the_heap();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Check {
            protocols,
            lab,
            json,
        } => commands::check::run(&protocols, lab.as_deref(), json),
        Command::Runs { data_dir, command } => match command {
            RunsCommand::List { json } => commands::runs::list(&data_dir, json),
            RunsCommand::Show { run, json } => commands::runs::show(&data_dir, &run, json),
            RunsCommand::Export {
                run,
                format,
                output,
            } => match output {
                Some(path) => match std::fs::File::create(&path) {
                    Ok(mut f) => commands::runs::export(&data_dir, &run, format, &mut f),
                    Err(e) => {
                        eprintln!("labctl runs export: cannot create {}: {e}", path.display());
                        ExitCode::from(2)
                    }
                },
                None => {
                    commands::runs::export(&data_dir, &run, format, &mut std::io::stdout().lock())
                }
            },
        },
        Command::Run {
            args,
            mqtt,
            command_port,
            opcua,
            mcp,
            web,
        } => commands::run::run(*args, mqtt, command_port, opcua, mcp, web),
        Command::Sim(args) => commands::sim::run(args),
        Command::Mcp { url } => commands::mcp::run(&url),
        Command::Submit(args) => labctl::submit::run(args),
        Command::Console(args) => labctl::console::run(args),
        Command::Passwd => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err()
                || line.trim_end_matches(['\r', '\n']).is_empty()
            {
                eprintln!("labctl passwd: give the password on standard input (one line)");
                return ExitCode::from(2);
            }
            match labctl::auth::hash_password(line.trim_end_matches(['\r', '\n'])) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("labctl passwd: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckInstrument { files, json } => commands::check_instrument::run(&files, json),
        Command::Schema { instrument: false } => {
            print!("{}", labctl_protocols::schema::protocol_schema_pretty());
            ExitCode::SUCCESS
        }
        Command::Schema { instrument: true } => {
            print!(
                "{}",
                labctl_protocols::instrument_def::instrument_schema_pretty()
            );
            ExitCode::SUCCESS
        }
    }
}

/// Every argon2 password check allocates 19 MiB and frees it. glibc raises its mmap threshold to the size of
/// the largest freed mapping, so from the second check on those blocks come from the heap and stay resident
/// (36 MB of a 55 MB controller, measured). A fixed threshold keeps them as mappings returned on free.
fn keep_large_allocations_off_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning; called first thing in main, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
