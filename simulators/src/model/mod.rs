//! placeholder: the physical model of the simulated lab
