//! Driver errors, layered as in rumqtt: codec errors inside port errors inside driver errors, so the
//! controller can act on the kind (retry, safe state, mark the instrument lost) without parsing text.

use std::time::Duration;

use labctl_codecs::DecodeError;

/// Errors of the task that owns a port.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(transparent)]
    Open(#[from] labctl_transport::OpenError),
    #[error("I/O on {port}: {source}")]
    Io {
        port: String,
        source: std::io::Error,
    },
    /// The device went away: EOF, EIO on a pty master, a reset TCP connection.
    #[error("{port}: device disconnected")]
    Disconnected { port: String },
    #[error("{port}: no reply within {timeout:?}")]
    Timeout { port: String, timeout: Duration },
    #[error("{port}: port task has stopped")]
    Closed { port: String },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Errors an instrument driver reports to the controller.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Port(#[from] PortError),
    /// The instrument answered, but not something this driver can use.
    #[error("{instrument}: unexpected reply {reply:?} to {command}")]
    UnexpectedReply {
        instrument: String,
        command: String,
        reply: String,
    },
    /// A reply that decodes but fails a consistency check the protocol allows (field widths, value counts):
    /// bytes were lost or changed on the line. Safe to ask again.
    #[error("{instrument}: reply {reply:?} to {command} was damaged on the line: {reason}")]
    DamagedReply {
        instrument: String,
        command: String,
        reply: String,
        reason: String,
    },
    /// The instrument refused or failed a command with its own error code.
    #[error("{instrument}: device error {code}: {message}")]
    Device {
        instrument: String,
        code: String,
        message: String,
    },
    /// The instrument is in an alarm state that needs attention.
    #[error("{instrument}: alarm {code}: {message}")]
    Alarm {
        instrument: String,
        code: String,
        message: String,
    },
    /// Identity or firmware is not one this driver supports.
    #[error("{instrument}: unsupported {what}: found {found:?}, supported: {supported}")]
    Unsupported {
        instrument: String,
        what: String,
        found: String,
        supported: String,
    },
    /// The command is not one this kind of instrument accepts.
    #[error("{instrument}: command {command} is not for a {kind}")]
    WrongKind {
        instrument: String,
        command: String,
        kind: String,
    },
    /// The command did not finish in time (e.g. a move that never reached Idle).
    #[error("{instrument}: {command} did not finish within {timeout:?}")]
    NotFinished {
        instrument: String,
        command: String,
        timeout: Duration,
    },
    /// The command cannot be put on this instrument's wire (a value the protocol cannot encode, such as a
    /// NaN or a volume beyond the pump's 4-digit format); nothing was sent.
    #[error("{instrument}: cannot send {command}: {reason}")]
    InvalidCommand {
        instrument: String,
        command: String,
        reason: String,
    },
}

impl DriverError {
    /// Whether the instrument must be considered lost (reconnect, safe state of the rest).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            DriverError::Port(
                PortError::Disconnected { .. } | PortError::Closed { .. } | PortError::Io { .. }
            )
        )
    }
}
