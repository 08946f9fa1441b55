//! The faces of labctl besides the CLI: each one talks to the controller only through `api::ControllerHandle`.

pub use labctl_command_port as command_port;
pub use labctl_mcp as mcp;
pub use labctl_mqtt as mqtt;
pub use labctl_opcua as opcua;
pub use labctl_web as web;
