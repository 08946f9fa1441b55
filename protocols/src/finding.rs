//! Validation findings: each names where (a JSON pointer), what was found and what was expected.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The protocol must not run.
    Error,
    /// The protocol may run, but probably does not do what its author meant.
    Warning,
}

/// Machine-readable kind of a finding, stable for planners to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingCode {
    /// Not JSON at all (with line and column).
    Syntax,
    /// Bigger, deeper or longer than the lab accepts.
    TooLarge,
    /// Valid JSON that does not fit the protocol schema.
    Schema,
    UnsupportedVersion,
    /// A field whose unit is missing or not the one expected (`volume_ml` for `volume_ul`).
    Unit,
    UnknownInstrument,
    /// The instrument exists but cannot do this action or measurement.
    UnknownAction,
    /// The instrument does not report this quantity.
    UnknownQuantity,
    UnknownVessel,
    UnknownPosition,
    /// A value the instrument cannot physically do.
    OutOfRange,
    /// A value the instrument could do but the lab's safety envelope forbids.
    OutsideEnvelope,
    /// A vessel would hold more than its allowed fill.
    Overfill,
    /// One instrument used in two branches of a `parallel` block.
    ParallelConflict,
    DuplicateId,
    DuplicateResult,
    /// A value that makes no sense whatever the lab (negative duration, zero count).
    InvalidValue,
    /// Steps in an order that cannot work (dispensing where no vessel is under the head).
    Sequence,
}

/// One problem found in a protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: FindingCode,
    /// JSON pointer to the offending value, e.g. `/steps/3/params/volume_ul` (`""` is the whole document).
    pub path: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// For syntax errors: 1-based line and column in the submitted text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

impl Finding {
    pub fn error(code: FindingCode, path: impl Into<String>, message: impl Into<String>) -> Self {
        Finding {
            severity: Severity::Error,
            code,
            path: path.into(),
            message: message.into(),
            found: None,
            expected: None,
            line: None,
            column: None,
        }
    }

    pub fn warning(code: FindingCode, path: impl Into<String>, message: impl Into<String>) -> Self {
        Finding {
            severity: Severity::Warning,
            ..Finding::error(code, path, message)
        }
    }

    pub fn found(mut self, found: impl std::fmt::Display) -> Self {
        self.found = Some(found.to_string());
        self
    }

    pub fn expected(mut self, expected: impl std::fmt::Display) -> Self {
        self.expected = Some(expected.to_string());
        self
    }

    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.line = Some(line);
        self.column = Some(column);
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(
            f,
            "{sev}[{}] {path}",
            serde_json::to_value(self.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        )?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, " (line {l}, column {c})")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(found) = &self.found {
            write!(f, "; found {found}")?;
        }
        if let Some(expected) = &self.expected {
            write!(f, "; expected {expected}")?;
        }
        Ok(())
    }
}

/// One conflict the dry run found on the simulation model, located by a JSON pointer into the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunProblem {
    /// JSON pointer of the step (or labware entry), e.g. `/steps/3` or `/steps/2/branches/0/1`.
    pub path: String,
    /// What would go wrong, in words for whoever approves the run.
    pub message: String,
}
