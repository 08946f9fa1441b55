//! Hardware-in-the-loop scenarios live in `tests/`; this library holds what they share: a [`rig::Rig`]
//! that serves the simulated lab on real ptys and TCP and builds labctl's drivers against it, exactly as the
//! controller does.

pub mod rig;
