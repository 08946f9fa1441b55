//! `labctl sim`: the simulated lab's instruments alone, at the wire level, on pseudo-terminals (the three
//! pumps share one) and a TCP port. Prints where each instrument is, then serves until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use labctl_simulators::{ClockConfig, Endpoint, EndpointKind, SimLab, SimLabConfig, parse_faults};

#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Seed of every random stream (measurement noise, dispensing error, fault damage).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub warp: f64,
    /// Make stable symlinks `<port>.pty` (gantry, pumps, balance, hotplate) to the ptys in this directory.
    #[arg(long)]
    pub pty_dir: Option<PathBuf>,
    /// TCP port of the spectrometer on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    pub spectro_port: u16,
    /// A TOML file of faults from the start: a table per instrument id (or `pumps`), e.g. `[balance]`
    /// with `drift_per_hour = 0.002` (fields in docs/simulators.md).
    #[arg(long, value_name = "FILE")]
    pub faults: Option<PathBuf>,
    /// Print the endpoints as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A lab file: its instruments with a `definition` are served too, each from its definition (an
    /// ASCII instrument on a pty named by its id, a Modbus RTU one on a pty, a Modbus TCP one on a port).
    #[arg(long, value_name = "LAB")]
    pub config: Option<PathBuf>,
}

pub fn run(args: SimArgs) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LABCTL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let faults = match &args.faults {
        None => Default::default(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| parse_faults(&text).map_err(|e| e.to_string()))
        {
            Ok(faults) => faults,
            Err(e) => {
                eprintln!("labctl sim: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let lab = match &args.config {
        None => labctl_protocols::Lab::sim(),
        Some(path) => match labctl_protocols::Lab::load(path) {
            Ok(lab) => lab,
            Err(e) => {
                eprintln!("labctl sim: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let config = SimLabConfig {
        lab,
        seed: args.seed,
        clock: ClockConfig::Warp(args.warp),
        pty_dir: args.pty_dir.clone(),
        spectro_addr: ([127, 0, 0, 1], args.spectro_port).into(),
        faults,
        ..SimLabConfig::default()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labctl sim: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let lab = match SimLab::start(config).await {
            Ok(lab) => lab,
            Err(e) => {
                eprintln!("labctl sim: {e}");
                return ExitCode::from(1);
            }
        };
        let endpoints = lab.endpoints();
        if args.json {
            match serde_json::to_string_pretty(&endpoints) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("labctl sim: {e}");
                    return ExitCode::from(1);
                }
            }
        } else {
            print!("{}", table(&endpoints));
        }
        eprintln!(
            "labctl sim: seed {}, warp {}; serving until SIGINT or SIGTERM",
            args.seed, args.warp
        );
        wait_for_signal().await;
        lab.shutdown().await;
        eprintln!("labctl sim: stopped");
        ExitCode::SUCCESS
    })
}

/// The endpoints as an aligned table: id, protocol, line, network address, where to connect.
pub fn table(endpoints: &[Endpoint]) -> String {
    let rows: Vec<[String; 5]> = endpoints
        .iter()
        .map(|e| {
            let place = match &e.kind {
                EndpointKind::Pty {
                    link: Some(link), ..
                } if e.open => format!("{} ({})", e.location(), link.display()),
                _ => e.location(),
            };
            [
                e.id.clone(),
                e.protocol.to_owned(),
                e.line_label(),
                e.network_address.map_or("-".into(), |a| a.to_string()),
                place,
            ]
        })
        .collect();
    let header = ["ID", "PROTOCOL", "LINE", "ADDR", "ENDPOINT"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

async fn wait_for_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labctl_simulators::devices::LineSettings;

    #[test]
    fn the_table_aligns_and_shows_links_and_addresses() {
        let pty = |id: &str, protocol, line, network_address| Endpoint {
            id: id.into(),
            port: "pumps".into(),
            protocol,
            network_address,
            open: true,
            kind: EndpointKind::Pty {
                path: Some("/dev/pts/4".into()),
                link: Some("sim/pumps.pty".into()),
                line,
            },
        };
        let endpoints = vec![
            pty("pump-red", "ne1000", LineSettings::n81(19200), Some(1)),
            Endpoint {
                id: "spectro".into(),
                port: "spectro".into(),
                protocol: "scpi_spectro",
                network_address: None,
                open: true,
                kind: EndpointKind::Tcp {
                    address: "127.0.0.1:5025".parse().unwrap(),
                },
            },
        ];
        assert_eq!(
            table(&endpoints),
            "ID        PROTOCOL      LINE       ADDR  ENDPOINT\n\
             pump-red  ne1000        19200 8N1  1     /dev/pts/4 (sim/pumps.pty)\n\
             spectro   scpi_spectro  tcp        -     127.0.0.1:5025\n"
        );
    }
}
