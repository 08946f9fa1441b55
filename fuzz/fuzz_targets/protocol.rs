//! The protocol parser and validator on arbitrary bytes, against the built-in simulated lab: never a
//! panic, and a report that is valid exactly when it holds no error (and then carries the protocol).
#![no_main]

use std::sync::LazyLock;

use labctl_protocols::{Lab, Severity};
use libfuzzer_sys::fuzz_target;

static LAB: LazyLock<Lab> = LazyLock::new(Lab::sim);

fuzz_target!(|data: &[u8]| {
    let report = labctl_protocols::validate_bytes(data, &LAB);
    let has_error = report
        .findings
        .iter()
        .any(|f| f.severity == Severity::Error);
    assert_eq!(report.valid, !has_error, "{:?}", report.findings);
    assert!(!report.valid || report.protocol.is_some());
});
