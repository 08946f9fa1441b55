//! Implementations of the `labctl` subcommands.

pub mod check;
pub mod run;
pub mod runs;
pub mod sim;
