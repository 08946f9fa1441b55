//! Safety: the envelope check every command passes just before it reaches a driver, the emergency-stop
//! latch, and the interlocks evaluated every tick.

pub mod envelope;
pub mod estop;
pub mod interlock;

pub use envelope::{SafetyViolation, check_command};
pub use estop::EStop;
