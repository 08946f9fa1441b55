//! The MQTT face alone: the gateway and its embedded broker in front of a scripted fake controller
//! (`labctl_core::fake_core`), so what the face hands the core, as whom, and what it makes of the core's
//! answers are asserted without instruments, runs or the executor.

use std::sync::Arc;
use std::time::Duration;

use labctl_core::api::{ApiError, Face, Principal, RunInfo, RunState, SubmitReply};
use labctl_core::auth::Users;
use labctl_core::fake_core::{Call, FakeCore, Script};
use labctl_mqtt::{BrokerChoice, MqttConfig, MqttGateway};
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Publish, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

const WITHIN: Duration = Duration::from_secs(10);

/// Accepts every valid proposal as a queued run named after it.
struct AcceptAll;

impl Script for AcceptAll {
    fn submit(&mut self, report: &labctl_protocols::Report, _: &Principal) -> SubmitReply {
        let protocol = report.protocol.as_ref().expect("a valid proposal");
        SubmitReply {
            accepted: true,
            proposal_id: Some(protocol.metadata.proposal_id.clone()),
            run_id: Some(format!("run-{}", protocol.metadata.proposal_id)),
            state: Some(RunState::Queued),
            duplicate: false,
            findings: Vec::new(),
            estimated_duration_s: Some(1.0),
            approval_required_because: Vec::new(),
            planner_id: Some(protocol.metadata.planner.id.clone()),
            error: None,
        }
    }
}

struct Gateway {
    _dir: tempfile::TempDir,
    core: FakeCore,
    gateway: MqttGateway,
    addr: std::net::SocketAddr,
}

async fn face(script: impl Script) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::sim();
    let core = FakeCore::start(lab.clone(), dir.path(), script).unwrap();
    let gateway = MqttGateway::start(
        core.handle.clone(),
        MqttConfig {
            users: Arc::new(Users::from_lab(&lab).unwrap()),
            lab,
            data_dir: dir.path().to_owned(),
            broker: BrokerChoice::Embedded("127.0.0.1:0".parse().unwrap()),
            tls_listen: None,
        },
    )
    .await
    .unwrap();
    let addr = gateway.broker_addr.parse().unwrap();
    Gateway {
        _dir: dir,
        core,
        gateway,
        addr,
    }
}

/// A client logged in as `user`, subscribed (SUBACK received) to `topics`; its publishes arrive on the
/// receiver.
async fn login(
    face: &Gateway,
    user: &str,
    password: &str,
    topics: &[&str],
) -> (AsyncClient, mpsc::UnboundedReceiver<Publish>) {
    let mut opts = MqttOptions::new(format!("face-test-{user}"), "127.0.0.1", face.addr.port());
    opts.set_credentials(user, password);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Incoming::Publish(p)) => {
                    let _ = tx.send(p);
                }
                Event::Incoming(Incoming::SubAck(_)) => {
                    let _ = acks_tx.send(());
                }
                _ => {}
            }
        }
    });
    let deadline = Instant::now() + WITHIN;
    for topic in topics {
        client.subscribe(*topic, QoS::AtLeastOnce).await.unwrap();
        timeout_at(deadline, acks.recv())
            .await
            .unwrap_or_else(|_| panic!("{user}: no SUBACK for {topic}"))
            .expect("the client's event loop ended");
    }
    (client, rx)
}

/// The next message on `topic` whose JSON satisfies `want`.
async fn next_json(
    rx: &mut mpsc::UnboundedReceiver<Publish>,
    topic: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WITHIN;
    loop {
        let p = timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing wanted on {topic}"))
            .expect("the client's event loop ended");
        if p.topic == topic {
            let value: Value = serde_json::from_slice(&p.payload).unwrap();
            if want(&value) {
                return value;
            }
        }
    }
}

/// Waits until the fake core has been asked something `matches` accepts.
async fn core_asked(face: &Gateway, matches: impl Fn(&Call) -> bool) -> Call {
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some(call) = face.core.calls().into_iter().find(&matches) {
            return call;
        }
        assert!(
            Instant::now() < deadline,
            "the core was never asked; it was asked {:?}",
            face.core.calls()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn proposal(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "version": 1,
        "metadata": { "name": id, "proposal_id": id, "planner": { "id": "planner-bo" } },
        "steps": [ { "type": "measure", "instrument": "balance", "action": "weigh", "params": {},
                     "result": "m" } ]
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_reaches_the_core_as_its_mqtt_user_and_the_core_s_answer_is_the_reply() {
    let face = face(AcceptAll).await;
    let (planner, mut rx) = login(
        &face,
        "planner-bo",
        "planner-dev",
        &["labctl/sim/protocols/replies/#"],
    )
    .await;
    planner
        .publish(
            "labctl/sim/protocols/submit",
            QoS::AtLeastOnce,
            false,
            proposal("face-1"),
        )
        .await
        .unwrap();
    let reply = next_json(&mut rx, "labctl/sim/protocols/replies/face-1", |_| true).await;
    // The core's answer, word for word in the contract's terms.
    assert_eq!(reply["accepted"], true, "{reply}");
    assert_eq!(reply["run_id"], "run-face-1", "{reply}");
    assert_eq!(reply["state"], "queued", "{reply}");
    let call = core_asked(&face, |c| matches!(c, Call::Submit { .. })).await;
    assert_eq!(
        call,
        Call::Submit {
            proposal_id: Some("face-1".into()),
            principal: Principal::new("planner-bo", Role::Planner, Face::Mqtt),
        }
    );
    face.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_reaches_the_core_as_its_technician_and_a_planner_cannot_release_it() {
    let face = face(AcceptAll).await;
    let (planner, mut planner_rx) = login(
        &face,
        "planner-bo",
        "planner-dev",
        &["labctl/sim/estop/state"],
    )
    .await;
    let (alice, _alice_rx) = login(&face, "alice", "technician-dev", &[]).await;
    alice
        .publish(
            "labctl/sim/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "trigger"}"#.to_vec(),
        )
        .await
        .unwrap();
    // Every subscriber sees the latch the core recorded, and who set it.
    let latched = next_json(&mut planner_rx, "labctl/sim/estop/state", |v| {
        v["latched"] == true
    })
    .await;
    assert!(
        latched["by"]
            .as_str()
            .is_some_and(|by| by.starts_with("alice")),
        "{latched}"
    );
    core_asked(&face, |c| {
        *c == Call::EmergencyStop {
            principal: Principal::new("alice", Role::Technician, Face::Mqtt),
        }
    })
    .await;
    // The planner's release is refused under the one role table: the latch holds.
    planner
        .publish(
            "labctl/sim/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "acknowledge"}"#.to_vec(),
        )
        .await
        .unwrap();
    let refused_release = |c: &Call| matches!(c, Call::AcknowledgeEmergencyStop { principal } if principal.role == Role::Planner);
    // The face leaves the decision to the core's one role table, which refuses: the latch holds.
    core_asked(&face, refused_release).await;
    assert!(
        face.core.handle.estop_latched(),
        "a planner released the stop"
    );
    // The technician's release goes through.
    alice
        .publish(
            "labctl/sim/estop",
            QoS::AtLeastOnce,
            false,
            br#"{"action": "acknowledge"}"#.to_vec(),
        )
        .await
        .unwrap();
    next_json(&mut planner_rx, "labctl/sim/estop/state", |v| {
        v["latched"] == false
    })
    .await;
    assert!(!face.core.handle.estop_latched());
    face.gateway.shutdown().await;
}

/// A controller with one run, `run-1`, submitted by `planner-bo` and awaiting approval; whatever the role
/// table lets through is accepted.
struct OneRunOfPlannerBo;

impl Script for OneRunOfPlannerBo {
    fn submit(&mut self, report: &labctl_protocols::Report, who: &Principal) -> SubmitReply {
        AcceptAll.submit(report, who)
    }

    fn run_request(&mut self, _run_id: &str, _: &Principal) -> Result<RunState, ApiError> {
        Ok(RunState::Queued)
    }

    fn runs(&mut self) -> Vec<RunInfo> {
        vec![RunInfo {
            run_id: "run-1".into(),
            proposal_id: "p-1".into(),
            name: "soak".into(),
            planner_id: "planner-bo".into(),
            submitted_by: "planner-bo".into(),
            state: RunState::AwaitingApproval,
            current_step: None,
            reason: None,
            estimated_duration_s: Some(5400.0),
            approval_required_because: Vec::new(),
            instruments: vec!["hotplate".into()],
            results: 0,
        }]
    }
}

/// A lab user of each role on the simulated lab.
fn user_of(role: Role) -> (&'static str, &'static str) {
    match role {
        Role::Observer => ("watcher", "observer-dev"),
        Role::Planner => ("planner-bo", "planner-dev"),
        Role::Rig => ("rig-1", "rig-dev"),
        Role::Technician => ("alice", "technician-dev"),
    }
}

/// Every role against every command topic: each command is answered on the sender's MQTT 5 response topic,
/// accepted exactly when the one role table allows it (a run's control by its owner's rights), and every
/// command that reaches the core carries the sender as an MQTT principal. The face decides nothing itself
/// except what it must before the core (a submission's right, checked before validation costs anything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_on_every_command_topic_gets_what_the_role_table_allows() {
    use labctl_core::policy::{Permission, allows};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

    let face = face(OneRunOfPlannerBo).await;
    for role in Role::ALL {
        let (user, password) = user_of(role);
        let mut opts = Options5::new(format!("matrix-{user}"), "127.0.0.1", face.addr.port());
        opts.set_credentials(user, password);
        let (client, mut events) = Client5::new(opts, 16);
        let (tx, mut replies) = mpsc::unbounded_channel();
        let (acks_tx, mut acks) = mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                match event {
                    Event5::Incoming(Packet::Publish(p)) => {
                        let _ = tx.send(p);
                    }
                    Event5::Incoming(Packet::SubAck(_)) => {
                        let _ = acks_tx.send(());
                    }
                    _ => {}
                }
            }
        });
        let reply_topic = format!("labctl/sim/to/{user}/matrix");
        client
            .subscribe(reply_topic.clone(), QoS5::AtLeastOnce)
            .await
            .unwrap();
        timeout_at(Instant::now() + WITHIN, acks.recv())
            .await
            .expect("SUBACK in time")
            .expect("event loop alive");

        let owner_may = allows(role, Permission::ControlAnyRun)
            || (user == "planner-bo" && allows(role, Permission::ControlOwnRun));
        let cases: Vec<(&str, &str, Vec<u8>, bool)> = vec![
            (
                "submit",
                "labctl/sim/protocols/submit",
                proposal(&format!("matrix-{user}")),
                allows(role, Permission::Submit),
            ),
            (
                "approve",
                "labctl/sim/runs/run-1/approval",
                br#"{"decision": "approve"}"#.to_vec(),
                allows(role, Permission::Approve),
            ),
            (
                "reject",
                "labctl/sim/runs/run-1/approval",
                br#"{"decision": "reject", "reason": "not today"}"#.to_vec(),
                allows(role, Permission::Approve),
            ),
            (
                "pause planner-bo's run",
                "labctl/sim/runs/run-1/control",
                br#"{"action": "pause"}"#.to_vec(),
                owner_may,
            ),
            (
                "abort planner-bo's run",
                "labctl/sim/runs/run-1/control",
                br#"{"action": "abort"}"#.to_vec(),
                owner_may,
            ),
            (
                "override",
                "labctl/sim/interlocks/hotplate-over-temperature/override",
                br#"{"seconds": 60, "reason": "sensor checked"}"#.to_vec(),
                allows(role, Permission::OverrideInterlock),
            ),
            (
                "trigger the e-stop",
                "labctl/sim/estop",
                br#"{"action": "trigger"}"#.to_vec(),
                allows(role, Permission::TriggerEStop),
            ),
            (
                "acknowledge the e-stop",
                "labctl/sim/estop",
                br#"{"action": "acknowledge"}"#.to_vec(),
                allows(role, Permission::AcknowledgeEStop),
            ),
        ];
        for (what, topic, payload, allowed) in cases {
            let before = face.core.calls().len();
            let props = PublishProperties {
                response_topic: Some(reply_topic.clone()),
                correlation_data: Some(what.as_bytes().to_vec().into()),
                ..Default::default()
            };
            client
                .publish_with_properties(topic, QoS5::AtLeastOnce, false, payload, props)
                .await
                .unwrap();
            let deadline = Instant::now() + WITHIN;
            let reply: Value = loop {
                let p = timeout_at(deadline, replies.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{role} {what}: no answer on {reply_topic}"))
                    .expect("event loop alive");
                let corr = p
                    .properties
                    .as_ref()
                    .and_then(|pp| pp.correlation_data.clone());
                if corr.as_deref() == Some(what.as_bytes()) {
                    break serde_json::from_slice(&p.payload).unwrap();
                }
            };
            let forbidden = reply["error"] == "forbidden";
            // An override on an untripped interlock is refused for its state once the role may.
            let accepted = reply["accepted"] == true
                || (what == "override" && reply["error"] == "invalid_state");
            assert_eq!(
                accepted,
                allowed,
                "{role} may{} {what}; the answer: {reply}",
                if allowed { "" } else { " not" }
            );
            assert_eq!(forbidden, !allowed, "{role} {what}: {reply}");
            // What reached the core carries the sender, as an MQTT principal.
            let calls = face.core.calls();
            let new = &calls[before.min(calls.len())..];
            let who = Principal::new(user, role, Face::Mqtt);
            for call in new {
                let principal = match call {
                    Call::Submit { principal, .. }
                    | Call::Approve { principal, .. }
                    | Call::Reject { principal, .. }
                    | Call::Control { principal, .. }
                    | Call::EmergencyStop { principal }
                    | Call::AcknowledgeEmergencyStop { principal }
                    | Call::OverrideInterlock { principal, .. }
                    | Call::WithdrawOverride { principal, .. } => principal,
                    Call::PlannerLost { .. } => continue,
                };
                assert_eq!(principal, &who, "{role} {what}: {call:?}");
            }
            if what == "submit" && !allowed {
                assert!(
                    new.iter().all(|c| !matches!(c, Call::Submit { .. })),
                    "{role}: a submission the role may not make reached the core: {new:?}"
                );
            }
        }
        client.disconnect().await.ok();
        pump.abort();
    }
    face.gateway.shutdown().await;
}
