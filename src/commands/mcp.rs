//! `labctl mcp`: MCP over stdio for a local agent, bridged to the streamable HTTP endpoint of a running
//! `labctl run --mcp ADDR` (why a bridge: `labctl_mcp::bridge`).

use std::process::ExitCode;

use crate::gateways::mcp::bridge::{Endpoint, run as bridge};

pub fn run(url: &str) -> ExitCode {
    let credentials = match labctl_mqtt_link::credentials_from_env() {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!(
                "labctl mcp: set LABCTL_MQTT_USER with LABCTL_MQTT_PASSWORD or LABCTL_MQTT_PASSWORD_FILE \
                 (a lab user, a planner usually)"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("labctl mcp: {e}");
            return ExitCode::from(2);
        }
    };
    let endpoint = match Endpoint::new(url, &credentials.0, &credentials.1) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("labctl mcp: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labctl mcp: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(bridge(endpoint, tokio::io::stdin(), tokio::io::stdout())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labctl mcp: {e}");
            ExitCode::from(2)
        }
    }
}
