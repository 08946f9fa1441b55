//! What an instrument reports about itself, in the words every room shares: the drivers read it off the
//! wire, the controller keeps it, the faces publish it and the clients read it back.

use serde::{Deserialize, Serialize};

/// What an instrument says it is, read from the instrument at connect time (never from the lab file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub firmware: String,
}

/// Coarse device state, as every role reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum DeviceState {
    Idle,
    Busy,
    /// The instrument raised an alarm that needs attention (GRBL ALARM, pump stall, hotplate watchdog).
    Alarm(String),
    /// Not a fault: the instrument refuses motion until it is referenced (GRBL's power-up homing lock).
    Locked(String),
}

impl DeviceState {
    /// The state's word as published (`idle`, `busy`, `alarm`, `locked`).
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceState::Idle => "idle",
            DeviceState::Busy => "busy",
            DeviceState::Alarm(_) => "alarm",
            DeviceState::Locked(_) => "locked",
        }
    }

    /// What the instrument said about an alarm or a lock.
    pub fn detail(&self) -> Option<&str> {
        match self {
            DeviceState::Alarm(why) | DeviceState::Locked(why) => Some(why),
            DeviceState::Idle | DeviceState::Busy => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_s_word_is_its_serialised_tag() {
        for state in [
            DeviceState::Idle,
            DeviceState::Busy,
            DeviceState::Alarm("stall".into()),
            DeviceState::Locked("homing".into()),
        ] {
            let json = serde_json::to_value(&state).unwrap();
            assert_eq!(json["state"], state.as_str());
            assert_eq!(json.get("detail").and_then(|d| d.as_str()), state.detail());
            assert_eq!(serde_json::from_value::<DeviceState>(json).unwrap(), state);
        }
    }
}
