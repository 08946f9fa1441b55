//! The MCP face fed arbitrary bytes: an `Authorization` header as the HTTP face reads it, or the JSON-RPC
//! lines an agent sends after a valid `initialize`, as `labctl mcp` and the HTTP transport hand them to
//! the server: never a panic, every answer a JSON line, and an observer's session never gets a submission
//! to the controller.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use labctl_core::api::{Face, Principal};
use labctl_core::fake_core::{Call, Defaults, FakeCore};
use labctl_protocols::lab::Role;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INIT: &[u8] = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"fuzz","version":"1"}}}
{"jsonrpc":"2.0","method":"notifications/initialized"}
"#;

struct Rig {
    rt: tokio::runtime::Runtime,
    core: FakeCore,
    _dir: std::path::PathBuf,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("labctl-fuzz-mcp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let core = rt
            .block_on(async { FakeCore::start(labctl_protocols::Lab::sim(), &dir, Defaults) })
            .unwrap();
        Rig {
            rt,
            core,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 4 == 0 {
        let _ = labctl_mcp::http::basic_credentials(&String::from_utf8_lossy(rest));
        return;
    }
    let rig = rig();
    let watcher = Principal::new("watcher", Role::Observer, Face::InProcess);
    rig.rt.block_on(async {
        let (mut agent_in, server_in) = tokio::io::duplex(1 << 16);
        let (server_out, mut agent_out) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(labctl_mcp::serve_stream(
            rig.core.handle.clone(),
            watcher,
            server_in,
            server_out,
        ));
        let _ = agent_in.write_all(INIT).await;
        let _ = agent_in.write_all(rest).await;
        let _ = agent_in.write_all(b"\n").await;
        drop(agent_in);
        let mut answers = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), agent_out.read_to_end(&mut answers));
        let _ = read.await;
        server.abort();
        for line in answers.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            assert!(
                serde_json::from_slice::<serde_json::Value>(line).is_ok(),
                "an answer that is not JSON: {}",
                String::from_utf8_lossy(line)
            );
        }
    });
    assert!(
        !rig.core
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Submit { .. })),
        "an observer's submission reached the controller"
    );
});
