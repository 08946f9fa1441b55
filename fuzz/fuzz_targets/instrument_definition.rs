//! Instrument definitions from untrusted text (`labctl check-instrument`, a lab file's `definition`): the
//! checker never panics, and a definition it accepts renders its actions, reads replies with its patterns
//! and has a simulator that writes every reply its patterns describe, whatever the file says.
#![no_main]

use std::collections::BTreeMap;

use labctl_protocols::instrument_def::{ActionSpec, check_definition};
use labctl_protocols::pattern_text;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A reply pattern alone (the first line), as the simulator writes it.
    if let Some(pattern) = text.lines().next() {
        let _ = pattern_text::write(pattern, &BTreeMap::new());
        let _ = pattern_text::write_number(pattern, "value", 1.5, &BTreeMap::new());
    }
    let (Some(def), _) = check_definition(text) else {
        return;
    };
    for action in &def.actions {
        let values = action
            .params
            .iter()
            .map(|p| (p.name.clone(), p.min))
            .collect();
        if let Ok(commands) = action.render(&values) {
            for (command, template) in commands.iter().zip(&action.commands) {
                if let Ok(re) = ActionSpec::command_pattern(template) {
                    assert!(re.is_match(command), "{template:?} does not read back {command:?}");
                }
            }
        }
    }
    for reading in &def.readings {
        if let Some(reply) = &reading.reply {
            // The checker made sure the simulator can answer every reading's pattern.
            let written = pattern_text::write_number(reply, "value", 1.0, &BTreeMap::new());
            assert!(written.is_ok(), "{reply:?}: {written:?}");
        }
    }
});
