//! Implementations of the `labctl` subcommands.

pub mod check;
