//! The faces of labctl besides the CLI: each one talks to the controller only through `api::ControllerHandle`.

pub mod command_port;
pub mod mqtt;
pub mod opcua;
