//! labctl core: the controller behind the `labctl` binary.

pub mod commands;
