//! The MCP face alone, in front of a scripted fake controller (`labctl_core::fake_core`), over an in-memory
//! stdio-framed stream: what reaches the core and as whom (the face, the MCP client's identity, the agent's
//! model), which requests the core's policy refuses before the controller hears of them, and how refusals
//! become tool errors an agent can read.

use std::time::Duration;

use labctl_core::api::{ApiError, ClientInfo, Control, Face, Principal, RunState, SubmitReply};
use labctl_core::fake_core::{Call, FakeCore, Script};
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

const DYE_MIX: &str = include_str!("../../../protocols/examples/dye-mix.json");

/// Accepts every valid proposal as `run-1`, waiting for approval; `mine` is the agent's running run,
/// `theirs` is alice's.
struct Lab1;

impl Script for Lab1 {
    fn submit(&mut self, report: &labctl_protocols::Report, _: &Principal) -> SubmitReply {
        let protocol = report.protocol.as_ref().expect("a valid proposal");
        SubmitReply {
            accepted: true,
            proposal_id: Some(protocol.metadata.proposal_id.clone()),
            run_id: Some("run-1".into()),
            state: Some(RunState::AwaitingApproval),
            duplicate: false,
            findings: Vec::new(),
            estimated_duration_s: Some(3.0),
            approval_required_because: vec!["always_ask".into()],
            planner_id: Some(protocol.metadata.planner.id.clone()),
            error: None,
        }
    }

    fn run_request(&mut self, run_id: &str, who: &Principal) -> Result<RunState, ApiError> {
        match run_id {
            "mine" => Ok(RunState::Running),
            "theirs" => Err(ApiError::Forbidden(format!(
                "{} may not control run theirs: it belongs to alice",
                who.name
            ))),
            other => Err(ApiError::UnknownRun(other.to_owned())),
        }
    }
}

struct Agent {
    to_server: DuplexStream,
    from_server: Lines<BufReader<DuplexStream>>,
    next_id: u64,
}

impl Agent {
    /// Connects to a server acting as `principal` and initializes as the MCP client `fake-agent` 2.0.
    async fn connect(core: &FakeCore, principal: Principal) -> Agent {
        let (to_server, server_in) = tokio::io::duplex(1 << 20);
        let (server_out, from_server) = tokio::io::duplex(1 << 20);
        tokio::spawn(labctl_mcp::serve_stream(
            core.handle.clone(),
            principal,
            server_in,
            server_out,
        ));
        let mut agent = Agent {
            to_server,
            from_server: BufReader::new(from_server).lines(),
            next_id: 0,
        };
        let init = agent
            .request(
                "initialize",
                json!({"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "fake-agent", "version": "2.0"}}),
            )
            .await;
        assert_eq!(init["result"]["serverInfo"]["name"], "labctl", "{init}");
        agent
            .send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        agent
    }

    async fn send(&mut self, message: Value) {
        let mut line = message.to_string();
        line.push('\n');
        self.to_server.write_all(line.as_bytes()).await.unwrap();
    }

    async fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), self.from_server.next_line())
                .await
                .expect("an answer within 10 s")
                .unwrap()
                .expect("the server answers");
            let message: Value = serde_json::from_str(&line).unwrap();
            if message["id"] == json!(id) {
                return message;
            }
        }
    }

    async fn call(&mut self, tool: &str, arguments: Value) -> Value {
        let answer = self
            .request("tools/call", json!({"name": tool, "arguments": arguments}))
            .await;
        answer["result"].clone()
    }
}

fn planner() -> Principal {
    Principal::new("planner-bo", Role::Planner, Face::InProcess)
}

#[tokio::test]
async fn a_submission_reaches_the_core_over_mcp_with_the_clients_identity_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let core = FakeCore::start(Lab::sim(), dir.path(), Lab1).unwrap();
    let mut agent = Agent::connect(&core, planner()).await;
    let protocol: Value = serde_json::from_str(DYE_MIX).unwrap();
    let reply = agent
        .call(
            "submit_protocol",
            json!({"protocol": protocol, "agent_model": "  claude-test  "}),
        )
        .await;
    assert_eq!(reply["isError"], json!(false), "{reply}");
    let out = &reply["structuredContent"];
    assert_eq!(out["outcome"], "awaiting_approval", "{out}");
    assert_eq!(out["run_id"], "run-1");
    assert_eq!(out["approval_required_because"], json!(["always_ask"]));
    let calls = core.calls();
    let [
        Call::Submit {
            proposal_id,
            principal,
        },
    ] = calls.as_slice()
    else {
        panic!("one submission: {calls:?}");
    };
    assert_eq!(proposal_id.as_deref(), Some("bo-2026-11-22-0001"));
    assert_eq!(principal.name, "planner-bo");
    assert_eq!(principal.role, Role::Planner);
    assert_eq!(principal.via, Face::Mcp);
    assert_eq!(
        principal.client,
        Some(ClientInfo {
            name: "fake-agent".into(),
            version: "2.0".into(),
            agent_model: Some("claude-test".into()),
        })
    );
}

#[tokio::test]
async fn refusals_are_tool_errors_that_say_why_and_the_core_decides_them() {
    let dir = tempfile::tempdir().unwrap();
    let core = FakeCore::start(Lab::sim(), dir.path(), Lab1).unwrap();
    let mut agent = Agent::connect(&core, planner()).await;
    let theirs = agent.call("abort_run", json!({"run_id": "theirs"})).await;
    assert_eq!(theirs["isError"], json!(true), "{theirs}");
    assert_eq!(
        theirs["content"][0]["text"],
        "refused: planner-bo may not control run theirs: it belongs to alice"
    );
    let unknown = agent.call("pause_run", json!({"run_id": "nope"})).await;
    assert_eq!(unknown["isError"], json!(true));
    assert!(
        unknown["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("unknown run nope"),
        "{unknown}"
    );
    let mine = agent.call("pause_run", json!({"run_id": "mine"})).await;
    assert_eq!(mine["structuredContent"]["state"], "running", "{mine}");
    let asked: Vec<(String, Control, Face)> = core
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Control {
                run_id,
                control,
                principal,
            } => Some((run_id, control, principal.via)),
            _ => None,
        })
        .collect();
    assert_eq!(
        asked,
        vec![
            ("theirs".into(), Control::Abort, Face::Mcp),
            ("nope".into(), Control::Pause, Face::Mcp),
            ("mine".into(), Control::Pause, Face::Mcp),
        ]
    );
    // A missing argument is refused before any tool runs, naming the field.
    let missing = agent
        .request(
            "tools/call",
            json!({"name": "instrument_state", "arguments": {}}),
        )
        .await;
    let text = missing.to_string();
    assert!(text.contains("instrument"), "{text}");
    assert!(
        missing.get("error").is_some() || missing["result"]["isError"] == json!(true),
        "{text}"
    );
}

#[tokio::test]
async fn an_observers_agent_reads_but_its_submission_never_reaches_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let core = FakeCore::start(Lab::sim(), dir.path(), Lab1).unwrap();
    let watcher = Principal::new("watcher", Role::Observer, Face::InProcess);
    let mut agent = Agent::connect(&core, watcher).await;
    let lab = agent.call("list_instruments", json!({})).await;
    assert_eq!(lab["structuredContent"]["lab_id"], "sim", "{lab}");
    let protocol: Value = serde_json::from_str(DYE_MIX).unwrap();
    let reply = agent
        .call("submit_protocol", json!({"protocol": protocol}))
        .await;
    let out = &reply["structuredContent"];
    assert_eq!(out["outcome"], "refused", "{reply}");
    assert!(
        out["message"].as_str().unwrap().contains("watcher"),
        "{out}"
    );
    assert!(core.calls().is_empty(), "{:?}", core.calls());
    // Validation is everyone's: findings carry their JSON pointers.
    let mut bad = protocol.clone();
    bad["steps"][2]["params"]["volume_ul"] = json!(-5);
    let report = agent
        .call("validate_protocol", json!({"protocol": bad}))
        .await;
    let out = &report["structuredContent"];
    assert_eq!(out["valid"], json!(false));
    assert!(
        out["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "/steps/2/params/volume_ul"),
        "{out}"
    );
    // The resources and the prompt.
    let schema = agent
        .request("resources/read", json!({"uri": "labctl://protocol/schema"}))
        .await;
    let text = schema["result"]["contents"][0]["text"].as_str().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(text).unwrap(),
        labctl_protocols::schema::protocol_schema()
    );
    let missing = agent
        .request("resources/read", json!({"uri": "labctl://nothing"}))
        .await;
    assert!(
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .contains("labctl://nothing")
    );
    let prompt = agent
        .request("prompts/get", json!({"name": "write_protocol"}))
        .await;
    let text = prompt["result"]["messages"][0]["content"]["text"]
        .as_str()
        .unwrap();
    assert!(
        text.contains("\"proposal_id\": \"bo-2026-11-22-0001\""),
        "{text}"
    );
}
