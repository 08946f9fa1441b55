//! labctl's Model Context Protocol face, for AI agents: tools to read the lab, validate, dry-run and submit
//! protocols and follow their runs, the protocol schema and the lab's capabilities as resources, and a
//! prompt that teaches the protocol language. Built on `rmcp`, the official Rust SDK.
//!
//! Like every face it goes through the core's one API ([`labctl_core::api::ControllerHandle`]) as an
//! authenticated lab user, held to the same role table: an agent cannot do what its user may not, and no
//! tool bypasses the protocol language (no device commands, no approvals, no emergency-stop release).
//!
//! Transports: streamable HTTP ([`http::serve`], from `labctl run --mcp ADDR`), and any byte stream for a
//! server acting as one user ([`serve_stream`], used by tests; `labctl mcp` bridges stdio to the HTTP
//! endpoint, see docs/mcp.md).

pub mod bridge;
pub mod http;
pub mod server;
pub mod tools;

pub use server::{Authenticated, CAPABILITIES_URI, LabMcp, PROMPT_NAME, SCHEMA_URI};

use labctl_core::api::{ControllerHandle, Principal};
use rmcp::ServiceExt;

/// Serves MCP on one byte stream (stdio, a pipe, an in-memory duplex) acting as `principal`, until the
/// peer closes it.
pub async fn serve_stream<R, W>(
    api: ControllerHandle,
    principal: Principal,
    read: R,
    write: W,
) -> Result<(), std::io::Error>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
    W: tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let running = LabMcp::acting_as(api, principal)
        .serve((read, write))
        .await
        .map_err(std::io::Error::other)?;
    running.waiting().await.map_err(std::io::Error::other)?;
    Ok(())
}
