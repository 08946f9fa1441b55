//! Property tests: protocols round-trip through JSON, and the validator never panics on anything.

use labctl_protocols::*;
use proptest::prelude::*;
use serde_json::Value;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9_-]{0,12}"
}

fn num() -> impl Strategy<Value = f64> {
    prop_oneof![-1.0e6..1.0e6f64, Just(0.0), 0.0..1000.0f64]
}

fn on_error() -> impl Strategy<Value = OnError> {
    prop_oneof![
        Just(OnError::Fail),
        Just(OnError::Pause),
        Just(OnError::Skip)
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        Just(Action::Home {}),
        (name(), proptest::option::of(num())).prop_map(|(position, feed_mm_per_min)| {
            Action::MoveTo(MoveToParams {
                position,
                feed_mm_per_min,
            })
        }),
        (num(), num(), num()).prop_map(|(x_mm, y_mm, z_mm)| Action::MoveXyz(MoveXyzParams {
            x_mm,
            y_mm,
            z_mm,
            feed_mm_per_min: None
        })),
        (name(), name()).prop_map(|(vessel, to)| Action::Transfer(TransferParams { vessel, to })),
        (name(), num(), num()).prop_map(|(vessel, volume_ul, rate_ul_per_min)| Action::Dispense(
            DispenseParams {
                vessel,
                volume_ul,
                rate_ul_per_min
            }
        )),
        Just(Action::StopPump {}),
        Just(Action::Tare {}),
        Just(Action::Zero {}),
        num().prop_map(
            |temperature_c| Action::SetTemperature(SetTemperatureParams { temperature_c })
        ),
        Just(Action::HeaterOff {}),
        num().prop_map(|speed_rpm| Action::SetStirSpeed(SetStirSpeedParams { speed_rpm })),
        Just(Action::StirOff {}),
    ]
}

fn measurement() -> impl Strategy<Value = Measurement> {
    prop_oneof![
        any::<bool>().prop_map(|stable| Measurement::Weigh(WeighParams { stable })),
        (num(), num(), num()).prop_map(|(start_nm, stop_nm, step_nm)| Measurement::Spectrum(
            SpectrumParams {
                start_nm,
                stop_nm,
                step_nm
            }
        )),
        num().prop_map(|wavelength_nm| Measurement::Absorbance(AbsorbanceParams { wavelength_nm })),
        Just(Measurement::ReadTemperature {}),
    ]
}

fn leaf_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            proptest::option::of(name()),
            name(),
            action(),
            proptest::option::of(num()),
            on_error()
        )
            .prop_map(
                |(id, instrument, action, timeout_s, on_error)| Step::Action(ActionStep {
                    id,
                    instrument,
                    action: action.into(),
                    timeout_s,
                    on_error
                })
            ),
        (name(), measurement(), name(), on_error()).prop_map(
            |(instrument, measurement, result, on_error)| {
                Step::Measure(MeasureStep {
                    id: None,
                    instrument,
                    measurement,
                    result,
                    timeout_s: None,
                    on_error,
                })
            }
        ),
        (num(), on_error()).prop_map(|(duration_s, on_error)| Step::Wait(WaitStep {
            id: None,
            duration_s,
            on_error
        })),
        (name(), name(), num(), proptest::option::of(num()), num()).prop_map(
            |(instrument, quantity, value, tolerance, timeout_s)| {
                Step::WaitUntil(WaitUntilStep {
                    id: None,
                    condition: Condition {
                        instrument,
                        quantity,
                        op: Comparison::Within,
                        value,
                        tolerance,
                        hold_s: None,
                    },
                    timeout_s,
                    on_error: OnError::Fail,
                })
            }
        ),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    leaf_step().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(prop::collection::vec(inner.clone(), 0..3), 0..3).prop_map(
                |branches| Step::Parallel(ParallelStep {
                    id: None,
                    branches,
                    timeout_s: None,
                    on_error: OnError::Fail
                })
            ),
            (0u32..5, prop::collection::vec(inner, 0..3)).prop_map(|(count, steps)| Step::Repeat(
                RepeatStep {
                    id: None,
                    count,
                    steps,
                    timeout_s: None,
                    on_error: OnError::Pause,
                }
            )),
        ]
    })
}

fn protocol() -> impl Strategy<Value = Protocol> {
    (
        name(),
        name(),
        prop::collection::vec(name(), 0..3),
        any::<bool>(),
        prop::collection::vec(step(), 0..6),
        prop::collection::vec((name(), name(), num(), num()), 0..3),
    )
        .prop_map(
            |(pname, proposal_id, tags, supervised, steps, labware)| Protocol {
                version: PROTOCOL_VERSION,
                metadata: Metadata {
                    name: pname,
                    objective: Some("o".into()),
                    hypothesis: None,
                    proposal_id,
                    planner: Planner {
                        id: "p".into(),
                        model: None,
                        model_version: Some("1".into()),
                    },
                    tags,
                    supervised,
                },
                labware: labware
                    .into_iter()
                    .map(|(id, location, capacity_ul, initial_volume_ul)| Labware {
                        id,
                        kind: LabwareKind::Vial,
                        location,
                        capacity_ul,
                        initial_volume_ul,
                    })
                    .collect(),
                steps,
            },
        )
}

/// Arbitrary JSON values, biased towards protocol-shaped keys so the validator's deeper paths are reached.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type".to_owned()),
        Just("steps".to_owned()),
        Just("action".to_owned()),
        Just("params".to_owned()),
        Just("instrument".to_owned()),
        Just("branches".to_owned()),
        Just("count".to_owned()),
        Just("version".to_owned()),
        Just("metadata".to_owned()),
        Just("volume_ul".to_owned()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just("repeat"),
            Just("parallel"),
            Just("action"),
            Just("dispense"),
            Just("pump-red"),
            Just("x")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_protocol_round_trips_through_json(p in protocol()) {
        let text = serde_json::to_string(&p).unwrap();
        let back: Protocol = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &p);
    }

    #[test]
    fn validating_any_protocol_value_never_panics(p in protocol()) {
        let report = validate_protocol(&p, &Lab::sim());
        // Findings always carry a JSON pointer into the document.
        for f in &report.findings {
            prop_assert!(f.path.is_empty() || f.path.starts_with('/'));
        }
    }

    #[test]
    fn validating_arbitrary_json_never_panics(v in json()) {
        let text = serde_json::to_vec(&v).unwrap();
        let report = validate_bytes(&text, &Lab::sim());
        prop_assert_eq!(report.valid, !report.findings.iter().any(|f| f.is_error()));
    }

    #[test]
    fn validating_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let report = validate_bytes(&bytes, &Lab::sim());
        prop_assert!(!report.valid || report.protocol.is_some());
    }

    #[test]
    fn mutating_an_example_never_panics(path in prop::sample::select(vec!["steps", "labware", "metadata"]), idx in 0usize..12, v in json()) {
        let mut doc: Value = serde_json::from_str(include_str!("../examples/dye-mix.json")).unwrap();
        match doc.get_mut(path) {
            Some(Value::Array(items)) if !items.is_empty() => { let n = items.len(); items[idx % n] = v; }
            Some(slot) => *slot = v,
            None => {}
        }
        let _ = validate_bytes(&serde_json::to_vec(&doc).unwrap(), &Lab::sim());
    }
}
