//! Wire-compatible simulated instruments and the one physical model of the lab behind them.

pub mod model;
