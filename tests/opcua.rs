//! The OPC UA server end to end: the controller on in-process fake instruments (warped time), the server on
//! a free port, and async-opcua's own client over TCP: browse, identification and telemetry with their units,
//! a subscription that sees a change, the dye mix submitted with `SubmitProtocol` and followed to completion
//! under `Lab/Runs`, the emergency stop and its acknowledgement, refused logins and refused method calls,
//! the certificate trust procedure on the secure endpoints; and the Python `asyncua` client as an
//! independent peer.

#![cfg(unix)]

mod common;
#[path = "common/opcua_rig.rs"]
mod opcua_rig;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use labctl::gateways::opcua::Security;
use labctl_drivers::DeviceCommand;
use opcua::client::{ClientBuilder, DataChangeCallback};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    BrowseDescription, BrowseDirection, BrowseResultMask, CallMethodRequest, DataValue,
    EUInformation, ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest, NodeClassMask,
    NodeId, ReferenceTypeId, StatusCode, TimestampsToReturn, Variant,
};
use opcua_rig::{
    Client, Rig, WAIT, connect, lab_namespace, login, read, rig, rig_as, rig_with,
    trust_the_rejected_client,
};

async fn read_string(c: &Client, node: &NodeId) -> String {
    match read(c, node).await.value {
        Some(Variant::String(s)) => s.as_ref().to_owned(),
        other => panic!("{node}: expected a string, got {other:?}"),
    }
}

/// Polls a variable until `accept` says yes (the server's values follow the controller asynchronously).
async fn wait_for_value(c: &Client, node: &NodeId, accept: impl Fn(&Variant) -> bool) -> Variant {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = read(c, node).await.value.unwrap_or_default();
        if accept(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{node} stayed {value:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn browse_names(c: &Client, node: &NodeId) -> Vec<String> {
    let result = c
        .session
        .browse(
            &[BrowseDescription {
                node_id: node.clone(),
                browse_direction: BrowseDirection::Forward,
                reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                include_subtypes: true,
                node_class_mask: NodeClassMask::all().bits(),
                result_mask: BrowseResultMask::All as u32,
            }],
            1000,
            None,
        )
        .await
        .unwrap()
        .remove(0);
    assert!(
        result.status_code.is_good(),
        "browse {node}: {}",
        result.status_code
    );
    result
        .references
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.browse_name.name.as_ref().to_owned())
        .collect()
}

async fn call(
    c: &Client,
    rig: &Rig,
    method: &str,
    args: Vec<Variant>,
) -> Result<Vec<Variant>, StatusCode> {
    let result = c
        .session
        .call_one(CallMethodRequest {
            object_id: rig.id("Lab"),
            method_id: rig.id(&format!("Lab/{method}")),
            input_arguments: Some(args),
        })
        .await
        .map_err(|e| e.status())?;
    if result.status_code.is_good() {
        Ok(result.output_arguments.unwrap_or_default())
    } else {
        Err(result.status_code)
    }
}

fn text(v: &Variant) -> String {
    match v {
        Variant::String(s) => s.as_ref().to_owned(),
        other => panic!("expected a string, got {other:?}"),
    }
}

/// A protocol of one step (JSON) with its own proposal id.
fn one_step(proposal_id: &str, step: serde_json::Value) -> String {
    serde_json::json!({
        "version": 1,
        "metadata": {
            "name": format!("one step {proposal_id}"),
            "proposal_id": proposal_id,
            "planner": { "id": "tests" }
        },
        "steps": [step]
    })
    .to_string()
}

/// The dye-mix example with its own proposal id.
fn dye_mix(proposal_id: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocols/examples/dye-mix.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["metadata"]["proposal_id"] = proposal_id.into();
    serde_json::to_string(&v).unwrap()
}

const SENSOR: &str =
    "Lab/Devices/hotplate/FunctionalUnitSet/hotplate/FunctionSet/plate_temperature_c/SensorValue";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_browses_reads_identification_and_telemetry_and_sees_a_change() {
    let (dir, rig, c) = rig_as("watcher", "observer-dev").await;
    assert_ne!(rig.ns, 0);
    // The server's private key is labctl's alone, whatever the umask.
    {
        use std::os::unix::fs::PermissionsExt;
        let private = dir.path().join("pki/private");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&private), 0o700);
        let keys: Vec<_> = std::fs::read_dir(&private)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!keys.is_empty());
        for key in keys {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
    }

    // Browse: Objects -> Lab -> Devices -> every instrument, and the Lab methods.
    let objects = browse_names(&c, &NodeId::objects_folder_id()).await;
    assert!(objects.contains(&"Lab".to_owned()), "{objects:?}");
    let lab = browse_names(&c, &rig.id("Lab")).await;
    for name in [
        "Devices",
        "Runs",
        "SubmitProtocol",
        "EmergencyStop",
        "EmergencyStopLatched",
    ] {
        assert!(lab.contains(&name.to_owned()), "{name} not in {lab:?}");
    }
    let mut devices = browse_names(&c, &rig.id("Lab/Devices")).await;
    devices.sort();
    assert_eq!(
        devices,
        [
            "balance",
            "gantry",
            "hotplate",
            "pump-blue",
            "pump-red",
            "pump-yellow",
            "spectro"
        ]
    );
    let hotplate = browse_names(&c, &rig.id("Lab/Devices/hotplate")).await;
    for name in [
        "Identification",
        "ConnectionState",
        "DeviceState",
        "FunctionalUnitSet",
    ] {
        assert!(
            hotplate.contains(&name.to_owned()),
            "{name} not in {hotplate:?}"
        );
    }

    // Identification as the instrument reported it at connect.
    let ident = |p: &str| rig.id(&format!("Lab/Devices/hotplate/Identification/{p}"));
    assert_eq!(
        wait_for_value(&c, &ident("Manufacturer"), |v| v
            == &Variant::from("labctl"))
        .await,
        Variant::from("labctl")
    );
    assert_eq!(read_string(&c, &ident("Model")).await, "fake-hotplate");
    assert_eq!(
        read_string(&c, &ident("SerialNumber")).await,
        "FAKE-hotplate"
    );
    assert_eq!(
        read_string(&c, &rig.id("Lab/Devices/hotplate/ConnectionState")).await,
        "online"
    );

    // Telemetry, with its unit and range.
    let sensor = rig.id(SENSOR);
    wait_for_value(&c, &sensor, |v| v == &Variant::from(42.5)).await;
    let units = read(&c, &rig.id(&format!("{SENSOR}/EngineeringUnits"))).await;
    let Some(Variant::ExtensionObject(units)) = units.value else {
        panic!("EngineeringUnits: {units:?}")
    };
    let units: Box<EUInformation> = ExtensionObject::into_inner_as(units).expect("EUInformation");
    assert_eq!(units.display_name.text.as_ref(), "°C");
    assert_eq!(units.unit_id, 0x43454C); // UNECE "CEL"
    let range = read(&c, &rig.id(&format!("{SENSOR}/EURange"))).await;
    let Some(Variant::ExtensionObject(range)) = range.value else {
        panic!("EURange: {range:?}")
    };
    let range: Box<opcua::types::Range> = range.into_inner_as().expect("Range");
    assert_eq!((range.low, range.high), (0.0, 340.0));

    // A subscription at 100 ms sees the reading change.
    let seen: Arc<Mutex<Vec<f64>>> = Arc::default();
    let sink = seen.clone();
    let subscription = c
        .session
        .create_subscription(
            Duration::from_millis(100),
            30,
            10,
            0,
            0,
            true,
            DataChangeCallback::new(move |dv, _item| {
                if let Some(Variant::Double(v)) = dv.value {
                    sink.lock().unwrap().push(v);
                }
            }),
        )
        .await
        .unwrap();
    let mut item = MonitoredItemCreateRequest::from(sensor.clone());
    item.requested_parameters.sampling_interval = 100.0;
    let created = c
        .session
        .create_monitored_items(subscription, TimestampsToReturn::Both, vec![item])
        .await
        .unwrap();
    assert!(created[0].result.status_code.is_good());
    let wait_for_notification = |value: f64| {
        let seen = seen.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while !seen.lock().unwrap().contains(&value) {
                assert!(
                    Instant::now() < deadline,
                    "no notification of {value}: {:?}",
                    seen.lock().unwrap()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // The first notification is the value at creation; then each change.
    wait_for_notification(42.5).await;
    rig.fakes["hotplate"].log.lock().unwrap().values = vec![("plate_temperature_c", 55.25)];
    wait_for_notification(55.25).await;
    assert_eq!(*seen.lock().unwrap(), [42.5, 55.25]);

    // An observer reads but calls nothing, and the lab is unchanged by the attempt.
    assert_eq!(
        call(&c, &rig, "EmergencyStop", vec![]).await,
        Err(StatusCode::BadUserAccessDenied)
    );
    assert_eq!(
        call(
            &c,
            &rig,
            "SubmitProtocol",
            vec![dye_mix("observer-1").into()]
        )
        .await,
        Err(StatusCode::BadUserAccessDenied)
    );
    assert!(!rig.controller.handle.snapshot().estop_latched);
    assert!(rig.controller.handle.runs().await.is_empty());
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dye_mix_submitted_over_opc_ua_runs_to_completion_under_lab_runs() {
    let (_dir, rig, planner) = rig_as("planner-bo", "planner-dev").await;

    let out = call(
        &planner,
        &rig,
        "SubmitProtocol",
        vec![dye_mix("opcua-dye-1").into()],
    )
    .await
    .unwrap();
    assert_eq!(out.len(), 3, "{out:?}");
    let run_id = text(&out[0]);
    assert!(run_id.starts_with("run-"), "{out:?}");
    let reply: serde_json::Value = serde_json::from_str(&text(&out[2])).unwrap();
    assert_eq!(reply["accepted"], true, "{reply}");

    // The run's node is there as soon as the call returns: no waiting for the journal.
    let state = rig.id(&format!("Lab/Runs/{run_id}/State"));
    let at_once = read(&planner, &state).await;
    assert!(
        at_once.status.is_none_or(|s| s.is_good()),
        "{run_id} not readable right after SubmitProtocol: {at_once:?}"
    );
    assert!(
        matches!(&at_once.value, Some(Variant::String(s)) if !s.is_empty()),
        "{at_once:?}"
    );
    assert!(
        browse_names(&planner, &rig.id("Lab/Runs"))
            .await
            .contains(&run_id)
    );
    assert_eq!(
        read_string(&planner, &rig.id(&format!("Lab/Runs/{run_id}/SubmittedBy"))).await,
        "planner-bo"
    );

    // The run runs to completion.
    wait_for_value(&planner, &state, |v| v == &Variant::from("completed")).await;
    assert!(
        browse_names(&planner, &rig.id("Lab/Runs"))
            .await
            .contains(&run_id)
    );
    assert_eq!(
        read_string(
            &planner,
            &rig.id(&format!("Lab/Runs/{run_id}/SupervisoryJobId"))
        )
        .await,
        "opcua-dye-1"
    );
    assert_eq!(
        read_string(&planner, &rig.id(&format!("Lab/Runs/{run_id}/SubmittedBy"))).await,
        "planner-bo"
    );
    let results = read(&planner, &rig.id(&format!("Lab/Runs/{run_id}/ResultCount"))).await;
    let journal_results = rig.controller.handle.run(&run_id).await.unwrap().results;
    assert!(journal_results > 0);
    assert_eq!(results.value, Some(Variant::from(journal_results)));
    let last: serde_json::Value = serde_json::from_str(
        &read_string(&planner, &rig.id(&format!("Lab/Runs/{run_id}/LastResult"))).await,
    )
    .unwrap();
    assert_eq!(last["seq"].as_u64(), Some(journal_results));

    // The same proposal id gives the same run; an invalid protocol is rejected with its findings.
    let again = call(
        &planner,
        &rig,
        "SubmitProtocol",
        vec![dye_mix("opcua-dye-1").into()],
    )
    .await
    .unwrap();
    assert_eq!(text(&again[0]), run_id);
    let bad = call(
        &planner,
        &rig,
        "SubmitProtocol",
        vec!["{\"version\": 1}".into()],
    )
    .await
    .unwrap();
    assert_eq!(
        (text(&bad[0]).as_str(), text(&bad[1]).as_str()),
        ("", "rejected")
    );
    let findings: serde_json::Value = serde_json::from_str(&text(&bad[2])).unwrap();
    assert!(
        !findings["findings"].as_array().unwrap().is_empty(),
        "{findings}"
    );

    // A planner neither approves nor releases a stop (the role table); wrong argument types are refused,
    // not guessed at.
    assert_eq!(
        call(&planner, &rig, "ApproveRun", vec![run_id.clone().into()]).await,
        Err(StatusCode::BadUserAccessDenied)
    );
    assert_eq!(
        call(&planner, &rig, "AcknowledgeEmergencyStop", vec![]).await,
        Err(StatusCode::BadUserAccessDenied)
    );
    assert!(
        call(&planner, &rig, "SubmitProtocol", vec![Variant::from(7i32)])
            .await
            .is_err()
    );
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_technician_stops_the_lab_and_acknowledges_and_runs_are_controlled_by_run_id() {
    let (_dir, rig, tech) = rig_as("alice", "technician-dev").await;
    let latched = rig.id("Lab/EmergencyStopLatched");
    assert_eq!(
        read(&tech, &latched).await.value,
        Some(Variant::from(false))
    );

    call(&tech, &rig, "EmergencyStop", vec![]).await.unwrap();
    wait_for_value(&tech, &latched, |v| v == &Variant::from(true)).await;
    // Variables are read-only, even for a technician: the latch is released by the method alone.
    let written = tech
        .session
        .write(&[opcua::types::WriteValue {
            node_id: latched.clone(),
            attribute_id: opcua::types::AttributeId::Value as u32,
            index_range: Default::default(),
            value: DataValue::new_now(false),
        }])
        .await;
    assert!(
        !written.as_ref().is_ok_and(|s| s[0].is_good()),
        "{written:?}"
    );
    assert!(rig.controller.handle.snapshot().estop_latched);
    assert!(rig.fakes["hotplate"].log.lock().unwrap().safe_states > 0);
    // While latched nothing new is accepted (as on every interface): the submission is refused with the
    // reason in the reply, and nothing moves.
    let refused = call(
        &tech,
        &rig,
        "SubmitProtocol",
        vec![dye_mix("opcua-latched").into()],
    )
    .await
    .unwrap();
    assert_eq!(
        (text(&refused[0]).as_str(), text(&refused[1]).as_str()),
        ("", "rejected"),
        "{refused:?}"
    );
    assert!(text(&refused[2]).contains("latched"), "{refused:?}");
    assert!(rig.fakes["gantry"].log.lock().unwrap().commands.is_empty());

    call(&tech, &rig, "AcknowledgeEmergencyStop", vec![])
        .await
        .unwrap();
    wait_for_value(&tech, &latched, |v| v == &Variant::from(false)).await;

    // Run control by id: unknown runs are not found; a finished run cannot be paused.
    assert_eq!(
        call(&tech, &rig, "PauseRun", vec!["run-nope".into()]).await,
        Err(StatusCode::BadNotFound)
    );
    let out = call(
        &tech,
        &rig,
        "SubmitProtocol",
        vec![dye_mix("opcua-after").into()],
    )
    .await
    .unwrap();
    let run_id = text(&out[0]);
    wait_for_value(&tech, &rig.id(&format!("Lab/Runs/{run_id}/State")), |v| {
        v == &Variant::from("completed")
    })
    .await;
    assert_eq!(
        call(&tech, &rig, "PauseRun", vec![run_id.into()]).await,
        Err(StatusCode::BadInvalidState)
    );
    rig.controller.shutdown().await;
}

/// A run's node exists by the time `SubmitProtocol` returns: a client that reads or browses right after the
/// call finds it, every time (before, the node appeared only once the journal's record reached the
/// server's updater, a moment later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_s_node_exists_as_soon_as_submit_protocol_returns() {
    let (_dir, rig, tech) = rig_as("alice", "technician-dev").await;
    for i in 0..60 {
        let out = call(
            &tech,
            &rig,
            "SubmitProtocol",
            vec![
                one_step(
                    &format!("at-once-{i}"),
                    serde_json::json!({"type": "action", "instrument": "balance",
                        "action": "tare", "params": {}}),
                )
                .into(),
            ],
        )
        .await
        .unwrap();
        let run_id = text(&out[0]);
        let state = read(&tech, &rig.id(&format!("Lab/Runs/{run_id}/State"))).await;
        assert!(
            state.status.is_none_or(|s| s.is_good())
                && matches!(&state.value, Some(Variant::String(s)) if !s.is_empty()),
            "submission {i}: {run_id} not there right after SubmitProtocol: {state:?}"
        );
    }
    rig.controller.shutdown().await;
}

/// Approves a run awaiting approval and waits until it has completed.
async fn approve_and_wait(tech: &Client, rig: &Rig, run_id: &str) {
    let state = call(tech, rig, "ApproveRun", vec![run_id.into()]).await;
    assert!(state.is_ok(), "{run_id}: {state:?}");
    wait_for_value(tech, &rig.id(&format!("Lab/Runs/{run_id}/State")), |v| {
        v == &Variant::from("completed")
    })
    .await;
}

/// Calls a method of an instrument's device node.
async fn call_device(
    c: &Client,
    rig: &Rig,
    instrument: &str,
    method: &str,
    args: Vec<Variant>,
) -> Result<Vec<Variant>, StatusCode> {
    let result = c
        .session
        .call_one(CallMethodRequest {
            object_id: rig.id(&format!("Lab/Devices/{instrument}")),
            method_id: rig.id(&format!("Lab/Devices/{instrument}/{method}")),
            input_arguments: Some(args),
        })
        .await
        .map_err(|e| e.status())?;
    if result.status_code.is_good() {
        Ok(result.output_arguments.unwrap_or_default())
    } else {
        Err(result.status_code)
    }
}

async fn write_value(c: &Client, node: &NodeId, value: Variant) -> StatusCode {
    c.session
        .write(&[opcua::types::WriteValue {
            node_id: node.clone(),
            attribute_id: opcua::types::AttributeId::Value as u32,
            index_range: Default::default(),
            value: DataValue::new_now(value),
        }])
        .await
        .map(|s| s[0])
        .unwrap_or_else(|e| e.status())
}

fn commands(rig: &Rig, instrument: &str) -> Vec<DeviceCommand> {
    rig.fakes[instrument].log.lock().unwrap().commands.clone()
}

const TARGET_TEMPERATURE: &str =
    "Lab/Devices/hotplate/FunctionalUnitSet/hotplate/FunctionSet/temperature_c/TargetValue";
const TARGET_STIR: &str =
    "Lab/Devices/hotplate/FunctionalUnitSet/hotplate/FunctionSet/stir_speed_rpm/TargetValue";

/// The hotplate's setpoints are variables a technician writes: the value goes through validation, the
/// safety envelope and the approval policy as a one-step run; outside the envelope the write is refused
/// and nothing reaches the instrument; an observer's write is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_technician_writes_setpoints_inside_the_envelope_and_nobody_else_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig(dir.path(), Security::WithNone).await;
    let pki = dir.path().join("client-pki");
    let tech = login(&rig, "alice", "technician-dev", &pki).await;
    let watcher = login(&rig, "watcher", "observer-dev", &pki).await;
    let planner = login(&rig, "planner-bo", "planner-dev", &pki).await;
    rig.ns = lab_namespace(&tech).await;
    let target = rig.id(TARGET_TEMPERATURE);

    // The setpoint sits beside the reading, with its unit, and the envelope a write must stay in.
    let function = browse_names(
        &tech,
        &rig.id("Lab/Devices/hotplate/FunctionalUnitSet/hotplate/FunctionSet/temperature_c"),
    )
    .await;
    assert!(function.contains(&"TargetValue".to_owned()), "{function:?}");
    let envelope = read(
        &tech,
        &rig.id(&format!("{TARGET_TEMPERATURE}/EnvelopeRange")),
    )
    .await;
    let Some(Variant::ExtensionObject(envelope)) = envelope.value else {
        panic!("EnvelopeRange: {envelope:?}")
    };
    let envelope: Box<opcua::types::Range> = envelope.into_inner_as().expect("Range");
    assert_eq!((envelope.low, envelope.high), (15.0, 120.0));
    assert!(matches!(read(&tech, &target).await.value, Some(Variant::Double(v)) if v.is_nan()));

    // A technician's write inside the envelope reaches the hotplate, as a run of theirs.
    assert_eq!(
        write_value(&tech, &target, Variant::from(45.0)).await,
        StatusCode::Good
    );
    let sent = commands(&rig, "hotplate");
    assert_eq!(
        sent.iter()
            .rev()
            .find(|c| matches!(c, DeviceCommand::SetTemperature { .. })),
        Some(&DeviceCommand::SetTemperature {
            temperature_c: 45.0
        }),
        "{sent:?}"
    );
    assert_eq!(read(&tech, &target).await.value, Some(Variant::from(45.0)));
    let runs = rig.controller.handle.runs().await;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].submitted_by.as_str(), runs[0].state.as_str()),
        ("alice", "completed")
    );
    assert!(
        browse_names(&tech, &rig.id("Lab/Runs"))
            .await
            .contains(&runs[0].run_id)
    );

    // Outside the envelope (possible for the instrument, 0-340 °C): refused, nothing sent, no run.
    assert_eq!(
        write_value(&tech, &target, Variant::from(150.0)).await,
        StatusCode::BadOutOfRange
    );
    // Beyond the instrument's capabilities: refused as well.
    assert_eq!(
        write_value(&tech, &target, Variant::from(400.0)).await,
        StatusCode::BadOutOfRange
    );
    // Not a number: refused by type.
    assert_ne!(
        write_value(&tech, &target, Variant::from("hot")).await,
        StatusCode::Good
    );
    assert_eq!(commands(&rig, "hotplate"), sent);
    assert_eq!(rig.controller.handle.runs().await.len(), 1);
    assert_eq!(read(&tech, &target).await.value, Some(Variant::from(45.0)));

    // An observer and a planner may read the setpoint, not write it; nothing is sent.
    for c in [&watcher, &planner] {
        assert_eq!(
            write_value(c, &target, Variant::from(50.0)).await,
            StatusCode::BadUserAccessDenied
        );
        assert_eq!(read(c, &target).await.value, Some(Variant::from(45.0)));
    }
    assert_eq!(commands(&rig, "hotplate"), sent);
    assert_eq!(rig.controller.handle.runs().await.len(), 1);

    // Above the lab's auto-approval temperature (60 °C): accepted, but it waits for a technician's
    // approval like any protocol, and nothing is sent until then.
    assert_eq!(
        write_value(&tech, &target, Variant::from(100.0)).await,
        StatusCode::GoodCompletesAsynchronously
    );
    assert_eq!(commands(&rig, "hotplate"), sent);
    let waiting = rig.controller.handle.runs().await;
    assert_eq!(waiting.last().unwrap().state.as_str(), "awaiting_approval");

    // The stirrer's setpoint likewise.
    assert_eq!(
        write_value(&tech, &rig.id(TARGET_STIR), Variant::from(300.0)).await,
        StatusCode::Good
    );
    assert!(
        commands(&rig, "hotplate").contains(&DeviceCommand::SetStirSpeed { speed_rpm: 300.0 }),
        "{:?}",
        commands(&rig, "hotplate")
    );
    assert_eq!(
        write_value(&tech, &rig.id(TARGET_STIR), Variant::from(1300.0)).await,
        StatusCode::BadOutOfRange
    );
    rig.controller.shutdown().await;
}

/// A setpoint set by a protocol (a planner's run, not a technician's write) shows in `TargetValue` once the
/// hotplate has taken it; switching the heater off leaves no setpoint (NaN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_value_follows_setpoints_set_by_protocols() {
    let (_dir, rig, planner) = rig_as("planner-bo", "planner-dev").await;
    let (temperature, stir) = (rig.id(TARGET_TEMPERATURE), rig.id(TARGET_STIR));
    assert!(
        matches!(read(&planner, &temperature).await.value, Some(Variant::Double(v)) if v.is_nan())
    );
    for (i, step, node, expected) in [
        (
            0,
            serde_json::json!({"type": "action", "instrument": "hotplate",
                "action": "set_temperature", "params": {"temperature_c": 40}}),
            &temperature,
            40.0,
        ),
        (
            1,
            serde_json::json!({"type": "action", "instrument": "hotplate",
                "action": "set_stir_speed", "params": {"speed_rpm": 250}}),
            &stir,
            250.0,
        ),
        (
            2,
            serde_json::json!({"type": "action", "instrument": "hotplate",
                "action": "heater_off", "params": {}}),
            &temperature,
            f64::NAN,
        ),
    ] {
        let out = call(
            &planner,
            &rig,
            "SubmitProtocol",
            vec![one_step(&format!("setpoint-{i}"), step).into()],
        )
        .await
        .unwrap();
        assert_eq!(text(&out[1]), "queued", "{}", text(&out[2]));
        wait_for_value(&planner, node, |v| match v {
            Variant::Double(v) if expected.is_nan() => v.is_nan(),
            Variant::Double(v) => *v == expected,
            _ => false,
        })
        .await;
    }
    // The stirrer's setpoint was left alone by the heater's commands.
    assert_eq!(
        read(&planner, &stir).await.value,
        Some(Variant::from(250.0))
    );
    rig.controller.shutdown().await;
}

/// Every instrument's actions are methods of its device node, for technicians: each goes through
/// validation and the safety envelope as a one-step run; outside the envelope the call is refused and
/// nothing reaches the instrument; observers and planners are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_technician_calls_instrument_methods_inside_the_envelope_and_nobody_else_calls_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig(dir.path(), Security::WithNone).await;
    let pki = dir.path().join("client-pki");
    let tech = login(&rig, "alice", "technician-dev", &pki).await;
    let watcher = login(&rig, "watcher", "observer-dev", &pki).await;
    let planner = login(&rig, "planner-bo", "planner-dev", &pki).await;
    rig.ns = lab_namespace(&tech).await;

    // Each device has the methods of its kind's actions and measurements.
    for (device, methods) in [
        ("gantry", &["Home", "MoveTo", "MoveXyz"][..]),
        ("pump-red", &["Dispense", "StopPump"]),
        ("balance", &["Tare", "Zero", "Weigh"]),
        (
            "hotplate",
            &[
                "SetTemperature",
                "HeaterOff",
                "SetStirSpeed",
                "StirOff",
                "ReadTemperature",
            ],
        ),
        ("spectro", &["Spectrum", "Absorbance"]),
    ] {
        let names = browse_names(&tech, &rig.id(&format!("Lab/Devices/{device}"))).await;
        for m in methods {
            assert!(
                names.contains(&(*m).to_owned()),
                "{device}: {m} not in {names:?}"
            );
        }
    }

    // A measurement answers with its result.
    let out = call_device(&tech, &rig, "balance", "Weigh", vec![])
        .await
        .unwrap();
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(text(&out[0]).starts_with("run-"), "{out:?}");
    assert_eq!(text(&out[1]), "completed", "{out:?}");
    let result: serde_json::Value = serde_json::from_str(&text(&out[2])).unwrap();
    assert_eq!(result["mass_g"], 10.5, "{result}");
    assert!(
        browse_names(&tech, &rig.id("Lab/Runs"))
            .await
            .contains(&text(&out[0]))
    );
    let out = call_device(&tech, &rig, "balance", "Tare", vec![])
        .await
        .unwrap();
    assert_eq!(text(&out[1]), "completed", "{out:?}");
    assert_eq!(text(&out[2]), "");
    assert!(commands(&rig, "balance").contains(&DeviceCommand::Tare));

    // A gantry move inside the envelope: the dry run finds the gantry not homed at the start of a run, so
    // it waits for a technician's approval like any such protocol; nothing moves until then.
    let gantry_before = commands(&rig, "gantry");
    let out = call_device(
        &tech,
        &rig,
        "gantry",
        "MoveXyz",
        vec![10.0.into(), 20.0.into(), 50.0.into()],
    )
    .await
    .unwrap();
    assert_eq!(text(&out[1]), "awaiting_approval", "{out:?}");
    assert_eq!(commands(&rig, "gantry"), gantry_before);
    approve_and_wait(&tech, &rig, &text(&out[0])).await;
    assert!(
        commands(&rig, "gantry").iter().any(|c| matches!(c,
            DeviceCommand::MoveTo { x_mm, y_mm, z_mm, .. } if (*x_mm, *y_mm, *z_mm) == (10.0, 20.0, 50.0))),
        "{:?}",
        commands(&rig, "gantry")
    );

    // Dispensing moves the head above the vessel first, then dispenses.
    let out = call_device(
        &tech,
        &rig,
        "pump-red",
        "Dispense",
        vec!["A1".into(), 300.0.into(), 600.0.into(), 2000.0.into()],
    )
    .await
    .unwrap();
    assert_eq!(text(&out[1]), "awaiting_approval", "{out:?}");
    approve_and_wait(&tech, &rig, &text(&out[0])).await;
    assert!(
        commands(&rig, "pump-red").contains(&DeviceCommand::Dispense {
            volume_ul: 300.0,
            rate_ul_per_min: 600.0
        }),
        "{:?}",
        commands(&rig, "pump-red")
    );
    let out = call_device(
        &tech,
        &rig,
        "spectro",
        "Absorbance",
        vec!["A1".into(), 520.0.into()],
    )
    .await
    .unwrap();
    approve_and_wait(&tech, &rig, &text(&out[0])).await;
    let last: serde_json::Value = serde_json::from_str(
        &read_string(
            &tech,
            &rig.id(&format!("Lab/Runs/{}/LastResult", text(&out[0]))),
        )
        .await,
    )
    .unwrap();
    assert_eq!(last["value"]["absorbance"], 0.5, "{last}");

    // A hotplate measurement that needs no approval answers with its result at once.
    let out = call_device(&tech, &rig, "hotplate", "ReadTemperature", vec![]).await;
    assert!(out.is_ok(), "{out:?}");

    // Outside the envelope, or beyond what the instrument can do: refused, and nothing is sent.
    let before: Vec<_> = ["gantry", "pump-red", "balance", "hotplate"]
        .iter()
        .map(|i| commands(&rig, i))
        .collect();
    let runs = rig.controller.handle.runs().await.len();
    assert_eq!(
        call_device(
            &tech,
            &rig,
            "pump-red",
            "Dispense",
            vec!["A1".into(), 6000.0.into(), 600.0.into(), 20000.0.into()],
        )
        .await,
        Err(StatusCode::BadOutOfRange)
    );
    assert_eq!(
        call_device(
            &tech,
            &rig,
            "gantry",
            "MoveXyz",
            vec![10.0.into(), 20.0.into(), 500.0.into()],
        )
        .await,
        Err(StatusCode::BadOutOfRange)
    );
    assert_eq!(
        call_device(
            &tech,
            &rig,
            "hotplate",
            "SetTemperature",
            vec![150.0.into()]
        )
        .await,
        Err(StatusCode::BadOutOfRange)
    );
    // An unknown position and an argument of the wrong type are the caller's errors.
    assert_eq!(
        call_device(&tech, &rig, "gantry", "MoveTo", vec!["Z99".into()]).await,
        Err(StatusCode::BadInvalidArgument)
    );
    assert_eq!(
        call_device(
            &tech,
            &rig,
            "hotplate",
            "SetTemperature",
            vec!["hot".into()]
        )
        .await,
        Err(StatusCode::BadTypeMismatch)
    );

    // Observers and planners call none of them.
    for c in [&watcher, &planner] {
        assert_eq!(
            call_device(c, &rig, "balance", "Tare", vec![]).await,
            Err(StatusCode::BadUserAccessDenied)
        );
        assert_eq!(
            call_device(c, &rig, "hotplate", "SetTemperature", vec![40.0.into()]).await,
            Err(StatusCode::BadUserAccessDenied)
        );
    }
    let after: Vec<_> = ["gantry", "pump-red", "balance", "hotplate"]
        .iter()
        .map(|i| commands(&rig, i))
        .collect();
    assert_eq!(after, before);
    assert_eq!(rig.controller.handle.runs().await.len(), runs);
    rig.controller.shutdown().await;
}

/// `Lab/Runs` keeps every active run and only the most recent finished ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_runs_keeps_active_runs_and_the_most_recent_finished_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_with(dir.path(), Security::WithNone, 2).await;
    let tech = login(
        &rig,
        "alice",
        "technician-dev",
        &dir.path().join("client-pki"),
    )
    .await;
    rig.ns = lab_namespace(&tech).await;
    // Above the lab's auto-approval temperature: it waits for a technician, active all along.
    let waiting = call(
        &tech,
        &rig,
        "SubmitProtocol",
        vec![
            one_step(
                "keep-waiting",
                serde_json::json!({"type": "action", "instrument": "hotplate",
                    "action": "set_temperature", "params": {"temperature_c": 100}}),
            )
            .into(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(text(&waiting[1]), "awaiting_approval", "{waiting:?}");
    let waiting = text(&waiting[0]);
    let mut finished = Vec::new();
    for i in 0..4 {
        let out = call(
            &tech,
            &rig,
            "SubmitProtocol",
            vec![
                one_step(
                    &format!("keep-{i}"),
                    serde_json::json!({"type": "action", "instrument": "gantry",
                        "action": "home", "params": {}}),
                )
                .into(),
            ],
        )
        .await
        .unwrap();
        let run_id = text(&out[0]);
        assert_eq!(text(&out[1]), "queued", "{}", text(&out[2]));
        wait_for_value(&tech, &rig.id(&format!("Lab/Runs/{run_id}/State")), |v| {
            v == &Variant::from("completed")
        })
        .await;
        finished.push(run_id);
    }
    // The two oldest finished runs lose their nodes once the two newer ones finish.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut runs = browse_names(&tech, &rig.id("Lab/Runs")).await;
        runs.sort();
        let mut expected = vec![waiting.clone(), finished[2].clone(), finished[3].clone()];
        expected.sort();
        if runs == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Lab/Runs is {runs:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for old in &finished[..2] {
        let gone = read(&tech, &rig.id(&format!("Lab/Runs/{old}/State"))).await;
        assert_eq!(gone.status, Some(StatusCode::BadNodeIdUnknown), "{old}");
    }
    assert_eq!(
        read_string(&tech, &rig.id(&format!("Lab/Runs/{waiting}/State"))).await,
        "awaiting_approval"
    );
    // The journal keeps them all.
    assert_eq!(rig.controller.handle.runs().await.len(), 5);
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_and_anonymous_sessions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Security::WithNone).await;
    let pki = dir.path().join("client-pki");
    let url = rig.server.endpoint.clone();
    let none = (SecurityPolicy::None, MessageSecurityMode::None);
    let wrong = connect(&url, none.0, none.1, Some(("alice", "wrong")), &pki).await;
    assert!(wrong.is_err(), "a wrong password opened a session");
    let unknown = connect(&url, none.0, none.1, Some(("mallory", "x")), &pki).await;
    assert!(unknown.is_err(), "an unknown user opened a session");
    let anonymous = connect(&url, none.0, none.1, None, &pki).await;
    assert!(
        anonymous.is_err(),
        "an anonymous session was opened on a lab with users"
    );
    // The right password still works (one failure is below the throttle).
    let c = connect(
        &url,
        none.0,
        none.1,
        Some(("alice", "technician-dev")),
        &pki,
    )
    .await;
    assert!(c.is_ok());
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_endpoints_only_and_unknown_client_certificates_wait_in_rejected_until_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Security::Secure).await;
    let pki = dir.path().join("client-pki");
    let url = rig.server.endpoint.clone();
    // The server's certificate was created on first start.
    assert!(rig.server.pki_dir.join("own/cert.der").is_file());

    // No SecurityPolicy None without --sim or the development flag.
    let none = connect(
        &url,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        Some(("alice", "technician-dev")),
        &pki,
    )
    .await;
    assert!(none.is_err(), "SecurityPolicy None was accepted");

    let secure = || {
        connect(
            &url,
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            Some(("alice", "technician-dev")),
            &pki,
        )
    };
    // An unknown client certificate is refused and kept in pki/rejected ...
    assert!(
        secure().await.is_err(),
        "an unknown client certificate was trusted"
    );
    // ... until an administrator moves it to pki/trusted.
    trust_the_rejected_client(&rig.server.pki_dir);
    let c = secure().await.expect("a trusted client certificate");
    // Discovery gives the whole address, which clients that follow discovery URLs can use.
    let endpoints = ClientBuilder::new()
        .application_name("labctl tests")
        .application_uri("urn:labctl:tests")
        .pki_dir(&pki)
        .trust_server_certs(true)
        .client()
        .unwrap()
        .get_server_endpoints_from_url(url.as_str())
        .await
        .unwrap();
    assert!(!endpoints.is_empty());
    for e in &endpoints {
        let urls = e.server.discovery_urls.clone().unwrap_or_default();
        assert!(
            !urls.is_empty() && urls.iter().all(|u| u.as_ref() == url.as_str()),
            "{urls:?} instead of {url}"
        );
    }
    // A Sign-only channel would carry the password readable on the wire: no user name tokens there.
    let sign_only = connect(
        &url,
        SecurityPolicy::Basic256Sha256,
        MessageSecurityMode::Sign,
        Some(("alice", "technician-dev")),
        &pki,
    )
    .await;
    assert!(
        sign_only.is_err(),
        "a password was accepted on a Sign-only endpoint"
    );
    let array = read(
        &c,
        &NodeId::from(opcua::types::VariableId::Server_NamespaceArray),
    )
    .await;
    assert!(format!("{array:?}").contains("urn:labctl:sim"));
    rig.controller.shutdown().await;
}

/// The Python `asyncua` client (an independent OPC UA stack) against the server: browse, identification
/// and telemetry, a subscription that sees the emergency stop latch and release, the dye mix submitted and
/// followed to completion, a wrong password refused, an observer's method call refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_asyncua_browses_subscribes_runs_the_dye_mix_and_meets_the_emergency_stop() {
    let python = std::env::var_os("LABCTL_TEST_PYTHON")
        .expect("LABCTL_TEST_PYTHON: a venv python with asyncua (scripts/test sets it)");
    const SCRIPT: &str = r#"
import asyncio, json, sys
from asyncua import Client, ua

url, protocol = sys.argv[1], open(sys.argv[2]).read()
out = {}

class Latch:
    def __init__(self):
        self.values = []
    def datachange_notification(self, node, val, data):
        self.values.append(val)

async def until(predicate, what, seconds=60):
    for _ in range(seconds * 20):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise SystemExit("timed out waiting for " + what)

def client(user, password):
    c = Client(url=url, timeout=30)
    c.set_user(user)
    c.set_password(password)
    return c

async def main():
    try:
        await client("alice", "wrong").connect()
        out["wrong_password"] = "accepted"
    except Exception as e:
        out["wrong_password"] = type(e).__name__

    watcher = client("watcher", "observer-dev")
    await watcher.connect()
    ns = await watcher.get_namespace_index("urn:labctl:sim")
    lab = await watcher.nodes.objects.get_child(f"{ns}:Lab")
    devices = await (await lab.get_child(f"{ns}:Devices")).get_children()
    out["devices"] = sorted([(await d.read_browse_name()).Name for d in devices])
    hotplate = await lab.get_child([f"{ns}:Devices", f"{ns}:hotplate"])
    ident = await hotplate.get_child(f"{ns}:Identification")
    out["manufacturer"] = await (await ident.get_child(f"{ns}:Manufacturer")).read_value()
    out["serial"] = await (await ident.get_child(f"{ns}:SerialNumber")).read_value()
    sensor = watcher.get_node(ua.NodeId(
        "Lab/Devices/hotplate/FunctionalUnitSet/hotplate/FunctionSet/plate_temperature_c/SensorValue", ns))
    out["plate_temperature_c"] = await sensor.read_value()
    units = await (await sensor.get_child("0:EngineeringUnits")).read_value()
    out["unit"] = units.DisplayName.Text
    try:
        await lab.call_method(f"{ns}:EmergencyStop")
        out["observer_call"] = "accepted"
    except ua.UaStatusCodeError as e:
        out["observer_call"] = ua.StatusCode(e.code).name

    latched = watcher.get_node(ua.NodeId("Lab/EmergencyStopLatched", ns))
    handler = Latch()
    sub = await watcher.create_subscription(100, handler)
    await sub.subscribe_data_change(latched)
    # The subscription's first notification carries the latch as it is now (released); wait for it so
    # that the stop below is a change the subscription must report, not the value it starts from.
    async def initial():
        return len(handler.values) > 0
    await until(initial, "the initial latch notification")

    alice = client("alice", "technician-dev")
    await alice.connect()
    alice_lab = alice.get_node(ua.NodeId("Lab", ns))
    run_id, state, reply = await alice_lab.call_method(f"{ns}:SubmitProtocol", protocol)
    out["submitted_state"] = state
    run_state = alice.get_node(ua.NodeId(f"Lab/Runs/{run_id}/State", ns))
    # The run's node exists as soon as the method returns.
    out["state_at_once"] = await run_state.read_value()
    async def finished():
        return await run_state.read_value() in ("completed", "failed", "aborted")
    await until(finished, "the run to finish")
    out["run_state"] = await run_state.read_value()
    out["job_id"] = await alice.get_node(ua.NodeId(f"Lab/Runs/{run_id}/SupervisoryJobId", ns)).read_value()

    await alice_lab.call_method(f"{ns}:EmergencyStop")
    async def seen(value):
        return value in handler.values
    await until(lambda: seen(True), "the latch notification")
    await alice_lab.call_method(f"{ns}:AcknowledgeEmergencyStop")
    async def released():
        return handler.values and handler.values[-1] is False and True in handler.values
    await until(released, "the release notification")
    out["latch_notifications"] = handler.values

    await alice.disconnect()
    await watcher.disconnect()
    print(json.dumps(out))

asyncio.run(main())
"#;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Security::WithNone).await;
    let script = dir.path().join("interop.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let protocol = dir.path().join("dye-mix.json");
    std::fs::write(&protocol, dye_mix("asyncua-dye-1")).unwrap();
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&rig.server.endpoint)
        .arg(&protocol)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "asyncua script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
    assert_ne!(out["wrong_password"], "accepted", "{out}");
    assert_eq!(
        out["devices"],
        serde_json::json!([
            "balance",
            "gantry",
            "hotplate",
            "pump-blue",
            "pump-red",
            "pump-yellow",
            "spectro"
        ])
    );
    assert_eq!(out["manufacturer"], "labctl");
    assert_eq!(out["serial"], "FAKE-hotplate");
    assert_eq!(out["plate_temperature_c"], 42.5);
    assert_eq!(out["unit"], "°C");
    assert_eq!(out["observer_call"], "BadUserAccessDenied", "{out}");
    assert!(
        ["queued", "running", "completed"].contains(&out["state_at_once"].as_str().unwrap_or("")),
        "{out}"
    );
    assert_eq!(out["run_state"], "completed", "{out}");
    assert_eq!(out["job_id"], "asyncua-dye-1");
    let notifications = out["latch_notifications"].as_array().unwrap();
    assert_eq!(
        notifications.first(),
        Some(&serde_json::json!(false)),
        "{out}"
    );
    assert!(notifications.contains(&serde_json::json!(true)), "{out}");
    assert_eq!(
        notifications.last(),
        Some(&serde_json::json!(false)),
        "{out}"
    );
    assert!(!rig.controller.handle.snapshot().estop_latched);
    rig.controller.shutdown().await;
}

/// `labctl run --sim --opcua-port 0` picks a free port, prints the endpoint, and serves the sim lab there;
/// the server certificate is created in the data directory on this first start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labctl_run_prints_the_endpoint_it_picked_and_serves_the_lab_there() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args([
            "run",
            "--sim",
            "--warp",
            "20",
            "--opcua-port",
            "0",
            "--mqtt-port",
            "0",
        ])
        .args(["--command-port", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("LABCTL_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let endpoint = tokio::time::timeout(WAIT * 3, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.trim().strip_prefix("opcua: ") {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("labctl run ended without printing its OPC UA endpoint")
    })
    .await
    .expect("an opcua: line");
    assert!(endpoint.starts_with("opc.tcp://127.0.0.1:"), "{endpoint}");
    assert!(!endpoint.ends_with(":0/"), "{endpoint}");
    assert!(data.join("pki/own/cert.der").is_file());
    let c = connect(
        &endpoint,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        Some(("watcher", "observer-dev")),
        &dir.path().join("client-pki"),
    )
    .await
    .unwrap();
    let ns = lab_namespace(&c).await;
    let lab_id = read(&c, &NodeId::new(ns, "Lab/LabId")).await;
    assert_eq!(lab_id.value, Some(Variant::from("sim")));
    let _ = child.kill().await;
}

/// The Python `asyncua` client on the secure endpoints: its certificate is refused and kept in
/// `pki/rejected/` until moved to `pki/trusted/`; then a technician signs in with SignAndEncrypt on each
/// policy, reads, and calls a method; a Sign-only channel takes no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_asyncua_on_the_secure_endpoints_after_its_certificate_is_trusted() {
    let python = std::env::var_os("LABCTL_TEST_PYTHON")
        .expect("LABCTL_TEST_PYTHON: a venv python with asyncua (scripts/test sets it)");
    const SCRIPT: &str = r#"
import asyncio, pathlib, sys
from asyncua import Client, ua
from asyncua.crypto import security_policies
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

url, workdir, policy_name, mode_name = sys.argv[1:5]
key = pathlib.Path(workdir) / "asyncua-key.pem"
cert = pathlib.Path(workdir) / "asyncua-cert.der"
app_uri = "urn:labctl:tests:asyncua"

async def main():
    await setup_self_signed_certificate(key, cert, app_uri, "localhost",
                                        [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "labctl asyncua test"})
    c = Client(url=url, timeout=10)
    c.application_uri = app_uri
    c.set_user("alice")
    c.set_password("technician-dev")
    policy = getattr(security_policies, "SecurityPolicy" + policy_name)
    await c.set_security(policy, str(cert), str(key), mode=getattr(ua.MessageSecurityMode, mode_name))
    try:
        await c.connect()
    except Exception as e:
        print("REFUSED", type(e).__name__)
        return
    ns = await c.get_namespace_index("urn:labctl:sim")
    lab_id = await c.get_node(ua.NodeId("Lab/LabId", ns)).read_value()
    await c.get_node(ua.NodeId("Lab", ns)).call_method(f"{ns}:AcknowledgeEmergencyStop")
    print("CONNECTED", lab_id)
    await c.disconnect()

asyncio.run(main())
"#;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path(), Security::Secure).await;
    let script = dir.path().join("secure.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let run = |policy: &'static str, mode: &'static str| {
        let (python, script, url, work) = (
            python.clone(),
            script.clone(),
            rig.server.endpoint.clone(),
            dir.path().to_owned(),
        );
        async move {
            let out = tokio::process::Command::new(python)
                .arg(script)
                .arg(url)
                .arg(work)
                .args([policy, mode])
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "asyncua script failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    };
    let first = run("Basic256Sha256", "SignAndEncrypt").await;
    assert!(first.starts_with("REFUSED"), "{first}");
    trust_the_rejected_client(&rig.server.pki_dir);
    assert_eq!(
        run("Basic256Sha256", "SignAndEncrypt").await,
        "CONNECTED sim"
    );
    assert_eq!(
        run("Aes256Sha256RsaPss", "SignAndEncrypt").await,
        "CONNECTED sim"
    );
    assert_eq!(
        run("Aes128Sha256RsaOaep", "SignAndEncrypt").await,
        "CONNECTED sim"
    );
    // A Sign-only channel offers no user name token: the password never travels readable.
    let sign_only = run("Aes256Sha256RsaPss", "Sign").await;
    assert!(sign_only.starts_with("REFUSED"), "{sign_only}");
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_technician_overrides_a_tripped_interlock_through_the_lab_methods() {
    use labctl::api::InterlockState;
    let (_dir, rig, tech) = rig_as("alice", "technician-dev").await;
    let state = || async {
        rig.controller
            .handle
            .interlocks()
            .await
            .into_iter()
            .find(|i| i.name == "pump-alarm")
            .expect("the sim lab's pump-alarm interlock")
            .state
    };
    let wait = |want: fn(&InterlockState) -> bool| async move {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = state().await;
            if want(&now) {
                return;
            }
            assert!(Instant::now() < deadline, "pump-alarm: still {now:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let args = |seconds: f64| {
        vec![
            Variant::from("pump-alarm"),
            Variant::Double(seconds),
            Variant::from("stall sensor faulty, pump checked by hand"),
        ]
    };
    // Nothing to override before the trip: an override is never given in advance.
    assert_eq!(
        call(&tech, &rig, "OverrideInterlock", args(600.0)).await,
        Err(StatusCode::BadInvalidState)
    );
    rig.fakes["pump-red"].log.lock().unwrap().state =
        Some(labctl_drivers::DeviceState::Alarm("stall".into()));
    wait(|s| matches!(s, InterlockState::Tripped { .. })).await;
    // Longer than an hour is refused; an hour or less stands, in her name.
    assert_eq!(
        call(&tech, &rig, "OverrideInterlock", args(7200.0)).await,
        Err(StatusCode::BadInvalidArgument)
    );
    call(&tech, &rig, "OverrideInterlock", args(600.0))
        .await
        .unwrap();
    wait(|s| matches!(s, InterlockState::Overridden { by, .. } if by == "alice (Technician via opcua)"))
        .await;
    call(
        &tech,
        &rig,
        "WithdrawInterlockOverride",
        vec![Variant::from("pump-alarm")],
    )
    .await
    .unwrap();
    wait(|s| matches!(s, InterlockState::Tripped { .. })).await;
    rig.controller.shutdown().await;
}
