//! labctl protocols
