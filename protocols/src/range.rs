//! A closed interval of a quantity, as lab files and instrument models bound their parameters.

use serde::{Deserialize, Serialize};

/// A closed interval `[min, max]`, written as a two-element array in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "[f64; 2]", into = "[f64; 2]")]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

impl TryFrom<[f64; 2]> for Range {
    type Error = String;
    fn try_from([min, max]: [f64; 2]) -> Result<Self, String> {
        if !(min.is_finite() && max.is_finite()) || min > max {
            return Err(format!(
                "expected [min, max] with min <= max, found [{min}, {max}]"
            ));
        }
        Ok(Range { min, max })
    }
}

impl From<Range> for [f64; 2] {
    fn from(r: Range) -> Self {
        [r.min, r.max]
    }
}

impl Range {
    pub fn contains(&self, v: f64) -> bool {
        v >= self.min && v <= self.max
    }
    pub fn within(&self, outer: &Range) -> bool {
        self.min >= outer.min && self.max <= outer.max
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}]", self.min, self.max)
    }
}
