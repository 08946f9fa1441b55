//! Every shipped instrument definition against the byte strings of its manual: the definition is valid (no
//! error finding), an action rendered with given parameter values is exactly the manual's command text, the
//! rendered command reads back through `ActionSpec::command_pattern`, a reply quoted from the manual gives the
//! right value (or is refused, where the manual's format cannot be read), and the acknowledgement, error and
//! identity patterns match the manual's replies.
//!
//! One table of cases per definition file, one set of checks for all of them: a new definition in
//! `instruments/` fails `every_shipped_definition_has_manual_bytes` until its manual's bytes are added here.

use std::collections::BTreeMap;

use labctl_protocols::instrument_def::{ActionSpec, InstrumentDefinition, check_definition};
use regex::Regex;

/// An action rendered with parameter values, and the manual's command text for it.
struct Render {
    action: &'static str,
    values: &'static [(&'static str, f64)],
    commands: &'static [&'static str],
}

/// A reply line (terminator removed) quoted from the manual, and what it must give.
struct Reply {
    reading: &'static str,
    reply: &'static str,
    /// `None`: the definition must refuse the line (it cannot read it correctly).
    value: Option<f64>,
}

/// A reply to an action's command: its acknowledgement (`true`) or one of its error replies (`false`).
struct Answer {
    action: &'static str,
    reply: &'static str,
    ack: bool,
}

/// A reply to an identity query and the field it must give.
struct Identity {
    query: &'static str,
    reply: &'static str,
    field: &'static str,
    value: &'static str,
}

struct Case {
    file: &'static str,
    renders: &'static [Render],
    replies: &'static [Reply],
    answers: &'static [Answer],
    identity: &'static [Identity],
    /// The line settings the manual gives: baud, data bits, parity, stop bits, terminator out, terminator in.
    line: (u32, u8, &'static str, u8, &'static str, &'static str),
}

const CASES: &[Case] = &[
    // IKA RCT digital, NAMUR commands (docs/instrument-definitions.md and codecs/src/namur.rs): `OUT_SP_1 100.5`,
    // `IN_PV_n` answered `<value> <n>`, e.g. `25.3 1`.
    Case {
        file: "ika-rct-digital.toml",
        renders: &[
            Render {
                action: "set_temperature",
                values: &[("temperature_c", 100.5)],
                commands: &["OUT_SP_1 100.5", "START_1"],
            },
            Render {
                action: "set_stir_speed",
                values: &[("speed_rpm", 500.0)],
                commands: &["OUT_SP_4 500", "START_4"],
            },
            Render {
                action: "heater_off",
                values: &[],
                commands: &["STOP_1"],
            },
        ],
        replies: &[
            Reply {
                reading: "temperature_c",
                reply: "25.3 1",
                value: Some(25.3),
            },
            Reply {
                reading: "temperature_c",
                reply: "500 4",
                value: None,
            },
        ],
        answers: &[],
        identity: &[Identity {
            query: "IN_NAME",
            reply: "RCT digital",
            field: "model",
            value: "RCT digital",
        }],
        line: (9600, 7, "even", 1, "\r\n", "\r\n"),
    },
    // LAUDA LOOP, operation manual V3, 5.11: Table 4 `"OUT_SP_00_30.5"CRLF` answered `"OK"CRLF`; replies in
    // fixed point format "XXX.XX" / "-XXX.XX" or "ERR_X"; TYPE answered "BC_LOOP"; 1 stop bit, no parity,
    // 8 data bits, 9600 baud (factory setting), commands ended by CR, CRLF or LFCR, replies by CRLF.
    Case {
        file: "lauda-loop.toml",
        renders: &[
            Render {
                action: "set_temperature",
                values: &[("temperature_c", 30.5)],
                commands: &["OUT_SP_00_30.5", "START"],
            },
            Render {
                action: "set_temperature",
                values: &[("temperature_c", -5.0)],
                commands: &["OUT_SP_00_-5.0", "START"],
            },
            Render {
                action: "standby",
                values: &[],
                commands: &["STOP"],
            },
        ],
        replies: &[
            // "XXX.XX" and "-XXX.XX" with digits filled in.
            Reply {
                reading: "temperature_c",
                reply: "030.50",
                value: Some(30.5),
            },
            Reply {
                reading: "temperature_c",
                reply: "-005.25",
                value: Some(-5.25),
            },
            Reply {
                reading: "setpoint_c",
                reply: "030.50",
                value: Some(30.5),
            },
            Reply {
                reading: "temperature_c",
                reply: "ERR_3",
                value: None,
            },
        ],
        answers: &[
            Answer {
                action: "set_temperature",
                reply: "OK",
                ack: true,
            },
            Answer {
                action: "set_temperature",
                reply: "ERR_2",
                ack: false,
            },
            Answer {
                action: "standby",
                reply: "ERR_3",
                ack: false,
            },
        ],
        identity: &[Identity {
            query: "TYPE",
            reply: "BC_LOOP",
            field: "model",
            value: "BC_LOOP",
        }],
        line: (9600, 8, "none", 1, "\r\n", "\r\n"),
    },
    // LAUDA Proline Kryomats, operating instructions YAUE0007, 8.3: `"OUT_SP_00_30.5"CRLF` answered
    // `"OK"CRLF`; replies "XXX.XX" / "-XXX.XX" or "ERR_X", e.g. the segment reply "030.00_010.00_..." and the
    // logger reply "020.00_021.23_030.50" (bath temperature 21.23 °C).
    Case {
        file: "lauda-proline-kryomat.toml",
        renders: &[
            Render {
                action: "set_temperature",
                values: &[("temperature_c", 30.5)],
                commands: &["OUT_SP_00_30.5", "START"],
            },
            Render {
                action: "set_temperature",
                values: &[("temperature_c", -40.0)],
                commands: &["OUT_SP_00_-40.0", "START"],
            },
            Render {
                action: "standby",
                values: &[],
                commands: &["STOP"],
            },
        ],
        replies: &[
            Reply {
                reading: "temperature_c",
                reply: "021.23",
                value: Some(21.23),
            },
            Reply {
                reading: "setpoint_c",
                reply: "030.00",
                value: Some(30.0),
            },
            Reply {
                reading: "temperature_c",
                reply: "-040.00",
                value: Some(-40.0),
            },
            Reply {
                reading: "temperature_c",
                reply: "ERR_6",
                value: None,
            },
        ],
        answers: &[
            Answer {
                action: "set_temperature",
                reply: "OK",
                ack: true,
            },
            Answer {
                action: "start",
                reply: "ERR_3",
                ack: false,
            },
        ],
        identity: &[],
        line: (9600, 8, "none", 1, "\r\n", "\r\n"),
    },
    // Sartorius CP series, operating instructions, Data Interface: Esc P (print), Esc T (tare), Esc R (release
    // keys), Esc x1_ (model); 16-character output "+   123.56 g  " CR LF; 1,200 baud, odd parity, 7-bit ASCII,
    // 1 stop bit, hardware handshake.
    Case {
        file: "sartorius-cp.toml",
        renders: &[
            Render {
                action: "tare",
                values: &[],
                commands: &["\u{1b}T"],
            },
            Render {
                action: "release_keys",
                values: &[],
                commands: &["\u{1b}R"],
            },
            Render {
                action: "block_keys",
                values: &[],
                commands: &["\u{1b}O"],
            },
        ],
        replies: &[
            // Positions 1-14 of the data output example "+ 123.56 g": sign, space, "  123.56", space, "g  ".
            Reply {
                reading: "weight_g",
                reply: "+   123.56 g  ",
                value: Some(123.56),
            },
            // A negative weight (after taring): the sign stands apart from the digits, in its own capture.
            Reply {
                reading: "weight_g",
                reply: "-   123.56 g  ",
                value: Some(-123.56),
            },
        ],
        answers: &[],
        // The manual shows no reply to Esc x1_ / Esc x2_: nothing to quote.
        identity: &[],
        line: (1200, 7, "odd", 1, "\r\n", "\r\n"),
    },
    // METTLER TOLEDO Excellence, MT-SICS: "Command S ... Response S S 100.00 g", the weight right aligned in
    // 10 characters ("S S     100.00 g"); "S I" when not executable; Z answered "Z A"; "@" resets; Host factory
    // setting 9600 baud, 8 data bits/no parity, 1 stop bit, Xon/Xoff, CR LF.
    Case {
        file: "mettler-toledo-excellence.toml",
        renders: &[
            Render {
                action: "zero",
                values: &[],
                commands: &["Z"],
            },
            Render {
                action: "tare",
                values: &[],
                commands: &["T"],
            },
        ],
        replies: &[
            Reply {
                reading: "weight_g",
                reply: "S S 100.00 g",
                value: Some(100.0),
            },
            Reply {
                reading: "weight_g",
                reply: "S S     100.00 g",
                value: Some(100.0),
            },
            Reply {
                reading: "weight_g",
                reply: "S I",
                value: None,
            },
            Reply {
                reading: "weight_g",
                reply: "S +",
                value: None,
            },
        ],
        // "ES Syntax error" is quoted; "Z A" / "Z I" follow MT-SICS's "ID Status" response format with the
        // status letters the S command's replies quote (A for done, I for not executable).
        answers: &[
            Answer {
                action: "zero",
                reply: "Z A",
                ack: true,
            },
            Answer {
                action: "zero",
                reply: "Z I",
                ack: false,
            },
            Answer {
                action: "tare",
                reply: "ES",
                ack: false,
            },
        ],
        // No I2 / I3 / I4 reply is quoted in the pages found.
        identity: &[],
        line: (9600, 8, "none", 1, "\r\n", "\r\n"),
    },
];

fn instruments_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../instruments")
}

/// The definition in `file`, which must have no error finding.
fn load(file: &str) -> InstrumentDefinition {
    let path = instruments_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (definition, findings) = check_definition(&text);
    let errors: Vec<_> = findings.iter().filter(|f| f.is_error()).collect();
    assert!(errors.is_empty(), "{file}: {errors:#?}");
    definition.unwrap_or_else(|| panic!("{file}: not read"))
}

fn values(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Every ASCII-line definition in `instruments/` has a case here (its commands and replies are byte strings a
/// manual quotes); a Modbus definition (registers, no byte strings to render) must at least be valid.
#[test]
fn every_shipped_definition_has_manual_bytes() {
    let mut files: Vec<String> = std::fs::read_dir(instruments_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".toml"))
        .collect();
    files.sort();
    for case in CASES {
        assert!(
            files.iter().any(|f| f == case.file),
            "{} is not in instruments/",
            case.file
        );
    }
    let mut line_definitions = 0;
    for file in &files {
        let def = load(file);
        if def.line.is_some() {
            line_definitions += 1;
            assert!(
                CASES.iter().any(|c| c.file == file.as_str()),
                "{file}: an ASCII definition needs a case here with its manual's bytes"
            );
        }
    }
    assert!(
        line_definitions >= 5,
        "the IKA definition and at least four more"
    );
}

#[test]
fn shipped_definitions_are_valid_with_the_manuals_line_settings() {
    for case in CASES {
        let def = load(case.file);
        let line = def
            .line
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no [line]", case.file));
        let (baud, data_bits, parity, stop_bits, out, inn) = case.line;
        let parity_now = serde_json::to_value(line.parity).unwrap();
        assert_eq!(
            (
                line.baud,
                line.data_bits,
                parity_now.as_str().unwrap(),
                line.stop_bits,
                line.terminator_out.as_str(),
                line.terminator_in.as_str(),
            ),
            (baud, data_bits, parity, stop_bits, out, inn),
            "{}: line settings",
            case.file
        );
        assert!(!line.stx_etx, "{}: ASCII lines only, no STX/ETX", case.file);
        assert!(!def.safe_state.is_empty(), "{}: no safe state", case.file);
        assert!(
            !def.model.manual.trim().is_empty(),
            "{}: no manual",
            case.file
        );
    }
}

#[test]
fn actions_render_the_manuals_commands_and_read_back() {
    for case in CASES {
        let def = load(case.file);
        for r in case.renders {
            let action = def
                .action(r.action)
                .unwrap_or_else(|| panic!("{}: no action {}", case.file, r.action));
            let rendered = action
                .render(&values(r.values))
                .unwrap_or_else(|e| panic!("{}: {e}", case.file));
            assert_eq!(rendered, r.commands, "{}: {}", case.file, r.action);
            // Each rendered command is read back by its template's pattern, parameter values included.
            for (template, command) in action.commands.iter().zip(&rendered) {
                let pattern = ActionSpec::command_pattern(template)
                    .unwrap_or_else(|e| panic!("{}: {template:?}: {e}", case.file));
                let captures = pattern.captures(command).unwrap_or_else(|| {
                    panic!(
                        "{}: {command:?} does not read back through {pattern}",
                        case.file
                    )
                });
                for (name, value) in r.values {
                    if let Some(text) = captures.name(name) {
                        let back: f64 = text.as_str().parse().unwrap();
                        assert!(
                            (back - value).abs() < 1e-9,
                            "{}: {name} read back as {back}, sent {value}",
                            case.file
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn parameters_outside_the_capability_range_are_refused() {
    for case in CASES {
        let def = load(case.file);
        for action in &def.actions {
            for p in &action.params {
                assert!(
                    !p.unit.trim().is_empty(),
                    "{}: {} has no unit",
                    case.file,
                    p.name
                );
                let mut vals: BTreeMap<String, f64> = action
                    .params
                    .iter()
                    .map(|q| (q.name.clone(), q.min))
                    .collect();
                vals.insert(p.name.clone(), p.max + 1.0);
                assert!(
                    action.render(&vals).is_err(),
                    "{}: {} above its maximum was rendered",
                    case.file,
                    p.name
                );
            }
        }
    }
}

#[test]
fn readings_give_the_manuals_values() {
    for case in CASES {
        let def = load(case.file);
        for r in case.replies {
            let reading = def
                .reading(r.reading)
                .unwrap_or_else(|| panic!("{}: no reading {}", case.file, r.reading));
            match (reading.value_from(r.reply), r.value) {
                (Ok(got), Some(want)) => assert!(
                    (got - want).abs() < 1e-9,
                    "{}: {:?} gave {got}, the manual means {want}",
                    case.file,
                    r.reply
                ),
                (Err(e), Some(want)) => {
                    panic!("{}: {:?} should give {want}: {e}", case.file, r.reply)
                }
                (Ok(got), None) => {
                    panic!("{}: {:?} should be refused, gave {got}", case.file, r.reply)
                }
                (Err(_), None) => {}
            }
        }
    }
}

#[test]
fn acknowledgements_and_errors_match_the_manuals_replies() {
    for case in CASES {
        let def = load(case.file);
        for a in case.answers {
            let action = def
                .action(a.action)
                .unwrap_or_else(|| panic!("{}: no action {}", case.file, a.action));
            let acked = action
                .ack
                .as_deref()
                .is_some_and(|p| Regex::new(p).unwrap().is_match(a.reply));
            let refused = action
                .errors
                .iter()
                .any(|e| Regex::new(&e.reply).unwrap().is_match(a.reply));
            assert_eq!(
                (acked, refused),
                (a.ack, !a.ack),
                "{}: {} answered {:?}",
                case.file,
                a.action,
                a.reply
            );
        }
    }
}

#[test]
fn identity_replies_give_the_manuals_fields() {
    for case in CASES {
        let def = load(case.file);
        for i in case.identity {
            let query = def
                .identity
                .queries
                .iter()
                .find(|q| q.query == i.query)
                .unwrap_or_else(|| panic!("{}: no identity query {:?}", case.file, i.query));
            let re = Regex::new(&query.reply).unwrap();
            let got = re
                .captures(i.reply)
                .and_then(|c| c.name(i.field))
                .map(|m| m.as_str())
                .unwrap_or_else(|| panic!("{}: {:?} gives no {}", case.file, i.reply, i.field));
            assert_eq!(got, i.value, "{}: {}", case.file, i.field);
        }
    }
}
