//! Implementations of the `labctl` subcommands.

pub mod check;
pub mod check_instrument;
pub mod mcp;
pub mod run;
pub mod runs;
pub mod sim;
