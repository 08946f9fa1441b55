//! Fault injection settings shared by the model and the wire front ends, and the model's fault counters.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Fault injection for one instrument; byte-level fields are applied by the wire front ends, drift by the model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Extra delay before each reply, in virtual milliseconds (real ones at warp 1) (front end).
    pub latency_ms: u64,
    /// Probability that a reply byte is dropped, 0..=1 (front end).
    pub drop_probability: f64,
    /// Probability that a reply byte is garbled, 0..=1 (front end).
    pub garble_probability: f64,
    /// The instrument receives commands but never replies (front end).
    pub no_reply: bool,
    /// The instrument is unplugged: the port closes or refuses connections (front end).
    pub disconnected: bool,
    /// An instrument error code the front end answers with instead of normal replies (e.g. "ES", "error:9").
    pub error_code: Option<String>,
    /// Sensor drift in the instrument's reading unit per virtual hour (g, C or AU; ignored by gantry and pumps).
    pub drift_per_hour: f64,
}

impl FaultConfig {
    /// Checks that probabilities lie in 0..=1 and the drift is finite.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        for (name, p) in [
            ("drop_probability", self.drop_probability),
            ("garble_probability", self.garble_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(ConfigError::invalid(
                    format!("{field}.{name}"),
                    format!("{p} is not a probability in 0..=1"),
                ));
            }
        }
        if !self.drift_per_hour.is_finite() {
            return Err(ConfigError::invalid(
                format!("{field}.drift_per_hour"),
                "must be finite",
            ));
        }
        Ok(())
    }

    /// True when no fault at all is configured.
    pub fn is_clean(&self) -> bool {
        *self == FaultConfig::default()
    }

    /// Drift accumulated over a virtual time span.
    pub(crate) fn drift_over(&self, dt: Duration) -> f64 {
        self.drift_per_hour * dt.as_secs_f64() / 3600.0
    }
}

/// Which instrument a fault setting belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstrumentId {
    /// The GRBL gantry.
    Gantry,
    /// Syringe pump by index (0 red, 1 yellow, 2 blue in the default lab).
    Pump(usize),
    /// An MT-SICS balance by index (0 on the weigh station, then `LabConfig::more_balances`).
    Balance(usize),
    /// An IKA hotplate stirrer by index (0 under the stir station, then `LabConfig::more_hotplates`).
    Hotplate(usize),
    /// The SCPI spectrometer.
    Spectro,
    /// An instrument simulated from its definition, by registration order ([`crate::LabModel::add_defined`]).
    Defined(usize),
}

/// Physical faults the model has counted so far (tests check these).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultStats {
    /// Liquid pumped with no vial under the head (uL).
    pub spilled_ul: f64,
    /// Liquid that did not fit in a full vial (uL).
    pub overflow_ul: f64,
    /// Vials released by the gripper somewhere they could not be placed.
    pub dropped_vials: u32,
    /// Liquid lost with dropped vials (uL).
    pub dropped_ul: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde::de::value::{Error as ValueError, MapDeserializer};

    #[test]
    fn deserialises_with_defaults_and_rejects_unknown_fields() {
        let fields = [("drift_per_hour", 0.5f64), ("drop_probability", 0.1)];
        let cfg =
            FaultConfig::deserialize(MapDeserializer::<_, ValueError>::new(fields.into_iter()))
                .unwrap();
        assert_eq!(cfg.drift_per_hour, 0.5);
        assert_eq!(cfg.drop_probability, 0.1);
        assert_eq!(cfg.latency_ms, 0);
        assert!(!cfg.no_reply && !cfg.disconnected && cfg.error_code.is_none());
        assert!(!cfg.is_clean());

        let empty: [(&str, f64); 0] = [];
        let cfg =
            FaultConfig::deserialize(MapDeserializer::<_, ValueError>::new(empty.into_iter()))
                .unwrap();
        assert!(cfg.is_clean());

        let bogus = [("bogus", 1.0f64)];
        assert!(
            FaultConfig::deserialize(MapDeserializer::<_, ValueError>::new(bogus.into_iter()))
                .is_err()
        );
    }

    #[test]
    fn validate_rejects_bad_probabilities() {
        let mut cfg = FaultConfig {
            garble_probability: 1.5,
            ..FaultConfig::default()
        };
        assert!(cfg.validate("balance.faults").is_err());
        cfg.garble_probability = 0.5;
        assert!(cfg.validate("balance.faults").is_ok());
        cfg.drift_per_hour = f64::NAN;
        assert!(cfg.validate("balance.faults").is_err());
    }

    #[test]
    fn drift_accumulates_per_hour() {
        let cfg = FaultConfig {
            drift_per_hour: 0.01,
            ..FaultConfig::default()
        };
        assert!((cfg.drift_over(Duration::from_secs(1800)) - 0.005).abs() < 1e-12);
    }
}
