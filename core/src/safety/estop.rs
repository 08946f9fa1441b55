//! The emergency-stop latch, shared by every instrument task: once triggered, every command is refused
//! until a technician acknowledges, whatever path the command comes from.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Default)]
pub struct EStop(Arc<AtomicBool>);

impl EStop {
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Clears the latch; returns whether it was latched.
    pub fn acknowledge(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }

    pub fn is_latched(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
