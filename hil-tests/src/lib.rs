//! Hardware-in-the-loop scenarios live in `tests/`; this library holds what they share:
//! - [`rig::Rig`]: the simulated lab served on real ptys and TCP, with labctl's drivers built against it
//!   (driver-level tests);
//! - [`rig_file`]: the rig file that says which bench the whole-system scenarios run on;
//! - [`system`]: `labctl run` as a process on that bench, its command port and journal, the simulators'
//!   faults and physical model;
//! - [`envelope`]: what the instruments were sent, decoded from the wire taps and checked against the
//!   lab's safety envelope;
//! - [`tmpfs`]: a small file system to fill, for a full disk under the journal;
//! - [`terminal`]: a real terminal (tmux) for the consoles' end-to-end tests.

pub mod envelope;
pub mod rig;
pub mod rig_file;
pub mod system;
pub mod terminal;
pub mod tmpfs;
