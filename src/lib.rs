//! labctl core
