//! The MCP server: its tools, resources and prompt, each a call on the core's API as the authenticated user.

use std::sync::Arc;

use labctl_core::api::{
    ApiError, ClientInfo, Control, ControllerHandle, Face, OperatorConsent, Principal, RunState,
};
use labctl_core::contract::{Decision, EventKind};
use labctl_core::journal::Record;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    GetPromptRequestParams, GetPromptResponse, GetPromptResult, Implementation, ListPromptsResult,
    ListResourcesResult, PaginatedRequestParams, ProgressNotificationParam, Prompt, PromptArgument,
    PromptMessage, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, Role as MessageRole, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, Json, RoleServer, ServerHandler, tool, tool_handler, tool_router};

use crate::tools::*;

/// The resource holding the protocol JSON Schema.
pub const SCHEMA_URI: &str = "labctl://protocol/schema";
/// The resource holding the lab's capabilities.
pub const CAPABILITIES_URI: &str = "labctl://lab/capabilities";
/// The prompt explaining the protocol language.
pub const PROMPT_NAME: &str = "write_protocol";

/// The dye-mixing worked example the prompt teaches with.
const DYE_MIX: &str = include_str!("../../../protocols/examples/dye-mix.json");

/// Who an HTTP request was authenticated as: put in the request's extensions by the HTTP face, read by the
/// tools.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Principal);

/// One MCP session's server: the controller it speaks for and, for a local transport (stdio, in-process),
/// the user it acts as. Over HTTP each request carries its own authenticated user instead.
#[derive(Clone)]
pub struct LabMcp {
    api: ControllerHandle,
    local: Option<Principal>,
    tool_router: ToolRouter<LabMcp>,
}

impl LabMcp {
    /// A server whose requests must each carry an [`Authenticated`] user (the HTTP face's).
    pub fn new(api: ControllerHandle) -> Self {
        LabMcp {
            api,
            local: None,
            tool_router: Self::tool_router(),
        }
    }

    /// A server acting as `principal` for every request (a transport with no login of its own).
    pub fn acting_as(api: ControllerHandle, principal: Principal) -> Self {
        LabMcp {
            local: Some(principal),
            ..LabMcp::new(api)
        }
    }

    /// The user a request acts as, with the MCP client it came through (its `initialize` identity, or the
    /// request's own on a protocol version without `initialize`) and the agent's declared model.
    fn principal(
        &self,
        ctx: &RequestContext<RoleServer>,
        agent_model: Option<String>,
    ) -> Result<Principal, String> {
        let from_http = ctx
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Authenticated>())
            .map(|a| a.0.clone());
        let Some(mut principal) = from_http.or_else(|| self.local.clone()) else {
            return Err("not authenticated: log in as a lab user".into());
        };
        principal.via = Face::Mcp;
        let client = ctx
            .peer
            .peer_info()
            .map(|info| info.client_info.clone())
            .or_else(|| ctx.meta.client_info());
        let agent_model = agent_model
            .map(|m| m.trim().chars().take(MAX_DECLARED_LEN).collect::<String>())
            .filter(|m| !m.is_empty());
        if client.is_some() || agent_model.is_some() {
            let (name, version) = client
                .map(|c| (c.name, c.version))
                .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
            principal = principal.with_client(ClientInfo {
                name: name.chars().take(MAX_DECLARED_LEN).collect(),
                version: version.chars().take(MAX_DECLARED_LEN).collect(),
                agent_model,
            });
        }
        Ok(principal)
    }

    async fn control(
        &self,
        ctx: &RequestContext<RoleServer>,
        run_id: &str,
        control: Control,
    ) -> Result<Json<ControlOut>, String> {
        let who = self.principal(ctx, None)?;
        match self.api.control(run_id, control, who).await {
            Ok(state) => Ok(Json(ControlOut {
                run_id: run_id.to_owned(),
                state: state.as_str().to_owned(),
            })),
            Err(e) => Err(refusal(&e)),
        }
    }
}

/// Longest client name, version or model name recorded (longer ones are cut).
pub const MAX_DECLARED_LEN: usize = 128;

/// A refusal of the core, as the tool error an agent reads.
fn refusal(e: &ApiError) -> String {
    match e {
        ApiError::Forbidden(m) => format!("refused: {m}"),
        ApiError::UnknownRun(r) => format!("unknown run {r}: check the run_id"),
        other => format!("refused: {other}"),
    }
}

/// How long the agent's operator has to answer before the submission is dropped.
pub const CONSENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What the agent's operator answers when asked to confirm a submission.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct SubmitConsent {
    /// Submit this exact protocol to the lab.
    pub submit: bool,
}

rmcp::elicit_safe!(SubmitConsent);

/// Where the client can ask its user (MCP form elicitation), the agent's operator confirms the exact
/// protocol before it is submitted: `Ok(Some)` is the consent, bound to the protocol's SHA-256; `Ok(None)`
/// when the client cannot ask; `Err` when the operator declined or could not be asked (nothing is
/// submitted then). A consent is no approval: the lab's approval policy still applies.
async fn ask_operator(
    ctx: &RequestContext<RoleServer>,
    protocol: &serde_json::Map<String, serde_json::Value>,
    bytes: &[u8],
    who: &Principal,
    api: &ControllerHandle,
) -> Result<Option<OperatorConsent>, String> {
    use rmcp::service::{ElicitationError, ElicitationMode};
    use sha2::{Digest, Sha256};
    if !ctx
        .peer
        .supported_elicitation_modes()
        .contains(&ElicitationMode::Form)
    {
        return Ok(None);
    }
    let digest: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let metadata = protocol.get("metadata");
    let field = |name: &str| {
        metadata
            .and_then(|m| m.get(name))
            .and_then(|v| v.as_str())
            .unwrap_or("(none)")
            .chars()
            .take(MAX_DECLARED_LEN)
            .collect::<String>()
    };
    let steps = protocol
        .get("steps")
        .and_then(|s| s.as_array())
        .map_or(0, Vec::len);
    let agent = who.client.as_ref().map_or_else(
        || "An agent".to_owned(),
        |c| format!("The agent {}", c.name),
    );
    let message = format!(
        "{agent} asks to submit the protocol \"{}\" (proposal {}, {steps} step(s), sha256 {digest}) to lab {} \
         as {}. Confirm only if you, the agent's operator, want this exact protocol submitted. This is not \
         an approval: the lab still holds it for a technician when its policy says so.",
        field("name"),
        field("proposal_id"),
        api.lab().lab_id,
        who.name
    );
    match ctx
        .peer
        .elicit_with_timeout::<SubmitConsent>(message, Some(CONSENT_TIMEOUT))
        .await
    {
        Ok(Some(SubmitConsent { submit: true })) => Ok(Some(OperatorConsent {
            protocol_sha256: digest,
        })),
        Ok(_) | Err(ElicitationError::UserDeclined | ElicitationError::UserCancelled) => {
            Err("the agent's operator declined the submission: nothing was submitted".into())
        }
        Err(ElicitationError::CapabilityNotSupported) => Ok(None),
        Err(e) => Err(format!(
            "the agent's operator could not be asked to confirm ({e}): nothing was submitted"
        )),
    }
}

fn protocol_bytes(protocol: &serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(protocol).unwrap_or_default()
}

#[tool_router]
impl LabMcp {
    /// The lab's instruments: for each, its kind, the actions and measurements a protocol may name, and
    /// whether it is connected and ready. Also whether the emergency stop is latched.
    #[tool(annotations(
        title = "List instruments",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = false
    ))]
    async fn list_instruments(&self) -> Json<LabOverview> {
        let snap = self.api.snapshot();
        let lab = self.api.lab();
        let instruments = lab
            .instruments
            .iter()
            .map(|i| {
                let view = snap.instruments.iter().find(|v| v.id == i.id);
                InstrumentSummary {
                    id: i.id.clone(),
                    kind: kind_name(i.kind),
                    actions: i.action_names().into_iter().map(str::to_owned).collect(),
                    measurements: i
                        .measurement_names()
                        .into_iter()
                        .map(str::to_owned)
                        .collect(),
                    connection: view
                        .map(|v| v.connection.as_str())
                        .unwrap_or("connecting")
                        .to_owned(),
                    armed: view.is_some_and(|v| v.armed),
                    busy: view.is_some_and(|v| v.busy),
                }
            })
            .collect();
        Json(LabOverview {
            lab_id: lab.lab_id.clone(),
            estop_latched: self.api.estop_latched(),
            instruments,
            interlocks_tripped: snap.interlocks_tripped.clone(),
        })
    }

    /// One instrument's state now: connection, identity (model, serial, firmware), device state, last
    /// values, and the capabilities and safety envelope labctl holds it to.
    #[tool(annotations(
        title = "Instrument state",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = false
    ))]
    async fn instrument_state(
        &self,
        Parameters(input): Parameters<InstrumentInput>,
    ) -> Result<Json<InstrumentDetail>, String> {
        let lab = self.api.lab();
        let Some(config) = lab.instruments.iter().find(|i| i.id == input.instrument) else {
            let known: Vec<&str> = lab.instruments.iter().map(|i| i.id.as_str()).collect();
            return Err(format!(
                "instrument: no instrument {:?} in this lab (there are: {})",
                input.instrument,
                known.join(", ")
            ));
        };
        let snap = self.api.snapshot();
        let view = snap.instruments.iter().find(|v| v.id == config.id);
        let json = |v: Option<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
        Ok(Json(InstrumentDetail {
            id: config.id.clone(),
            kind: kind_name(config.kind),
            connection: view
                .map(|v| v.connection.as_str())
                .unwrap_or("connecting")
                .to_owned(),
            connection_detail: view.and_then(|v| v.connection.detail().map(str::to_owned)),
            identity: json(view.and_then(|v| serde_json::to_value(&v.identity).ok())),
            state: json(view.and_then(|v| serde_json::to_value(&v.state).ok())),
            values: view
                .map(|v| {
                    v.values
                        .iter()
                        .map(|(k, x)| ((*k).to_owned(), *x))
                        .collect()
                })
                .unwrap_or_default(),
            armed: view.is_some_and(|v| v.armed),
            busy: view.is_some_and(|v| v.busy),
            capabilities: json(serde_json::to_value(&config.capabilities).ok()),
            envelope: json(serde_json::to_value(&config.envelope).ok()),
        }))
    }

    /// Checks a protocol against the lab without running it: every finding, each with the JSON pointer of
    /// the offending value, the estimated duration, and why a technician would have to approve it.
    #[tool(annotations(
        title = "Validate a protocol",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = false
    ))]
    async fn validate_protocol(
        &self,
        Parameters(input): Parameters<ProtocolInput>,
    ) -> Result<Json<ValidationOut>, String> {
        let lab = Arc::clone(self.api.lab());
        let bytes = protocol_bytes(&input.protocol);
        let report =
            tokio::task::spawn_blocking(move || labctl_protocols::validate_bytes(&bytes, &lab))
                .await
                .map_err(|_| "the validator could not run; try again".to_owned())?;
        Ok(Json(ValidationOut {
            valid: report.valid,
            findings: findings(&report.findings),
            estimated_duration_s: report.estimated_duration_s,
            expanded_steps: report.expanded_steps,
            approval_required_because: report.approval_required_because,
        }))
    }

    /// Validates a protocol and, when valid, runs it on the lab's physical model (not on the instruments):
    /// its duration and what would go wrong (a vessel overflowing, a stock running out). Nothing is
    /// recorded or run.
    #[tool(annotations(
        title = "Dry-run a protocol",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = false
    ))]
    async fn dry_run_protocol(
        &self,
        Parameters(input): Parameters<ProtocolInput>,
    ) -> Result<Json<DryRunOut>, String> {
        let (report, dry) = self
            .api
            .check(protocol_bytes(&input.protocol))
            .await
            .ok_or("the dry run could not run; try again")?;
        Ok(Json(DryRunOut {
            valid: report.valid,
            findings: findings(&report.findings),
            simulated: dry.is_some(),
            estimated_duration_s: dry.as_ref().map(|d| d.estimated_duration_s),
            problems: dry
                .as_ref()
                .map(|d| {
                    d.problems
                        .iter()
                        .map(|p| ProblemOut {
                            path: p.path.clone(),
                            message: p.message.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            notes: dry.as_ref().map(|d| d.notes.clone()).unwrap_or_default(),
            steps_simulated: dry.as_ref().map_or(0, |d| d.steps_simulated),
            approval_required_because: report.approval_required_because,
        }))
    }

    /// Submits a protocol to run on the lab's instruments. labctl validates it, dry-runs it, and either
    /// queues it (outcome `accepted`), holds it for a technician's approval (`awaiting_approval`, with the
    /// reasons), or refuses it (`rejected` with every finding, or `refused` with a message). The same
    /// `metadata.proposal_id` always gives the same run. The run moves liquids on real instruments:
    /// that cannot be undone.
    #[tool(annotations(
        title = "Submit a protocol",
        read_only_hint = false,
        destructive_hint = true,
        idempotent_hint = true,
        open_world_hint = true
    ))]
    async fn submit_protocol(
        &self,
        Parameters(input): Parameters<SubmitInput>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<SubmitOut>, String> {
        let who = self.principal(&ctx, input.agent_model)?;
        let bytes = protocol_bytes(&input.protocol);
        let reply = match ask_operator(&ctx, &input.protocol, &bytes, &who, &self.api).await? {
            Some(consent) => self.api.submit_with_consent(bytes, who, consent).await,
            None => self.api.submit(bytes, who).await,
        };
        Ok(Json(SubmitOut::from(reply)))
    }

    /// A run's state, current step, why it waits or ended, and its journal events (approvals, steps,
    /// operator actions), oldest first; give `after_event` to get only newer ones.
    #[tool(annotations(
        title = "Run status",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = false
    ))]
    async fn run_status(
        &self,
        Parameters(input): Parameters<StatusInput>,
    ) -> Result<Json<RunOut>, String> {
        let Some(run) = self.api.run(&input.run_id).await else {
            return Err(format!(
                "run_id: unknown run {:?}: check the run_id",
                input.run_id
            ));
        };
        let after = input.after_event.unwrap_or(i64::MIN);
        let mut events: Vec<EventOut> = self
            .api
            .run_record(&input.run_id)
            .await
            .map(|d| d.events)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.seq > after && e.kind != "command" && e.kind != "command_done")
            .map(|e| EventOut {
                seq: e.seq,
                at_ms: e.at_ms,
                kind: e.kind,
                step: e.step,
                actor: e.actor,
                detail: e.detail,
            })
            .collect();
        if events.len() > MAX_EVENTS_PER_CALL {
            events.drain(..events.len() - MAX_EVENTS_PER_CALL);
        }
        Ok(Json(RunOut::new(run, events)))
    }

    /// A run's results (measurements with the instrument's identity), in order, from a cursor: give the
    /// last call's `next_cursor` as `after` to get only new ones. Results are returned only once durable.
    #[tool(annotations(
        title = "Run results",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = false
    ))]
    async fn run_results(
        &self,
        Parameters(input): Parameters<ResultsInput>,
    ) -> Result<Json<ResultsOut>, String> {
        let limit = input.limit.unwrap_or(DEFAULT_RESULTS_PER_CALL);
        if limit == 0 || limit > MAX_RESULTS_PER_CALL {
            return Err(format!(
                "limit: {limit} is out of range: give 1 to {MAX_RESULTS_PER_CALL}"
            ));
        }
        let Some(run) = self.api.run(&input.run_id).await else {
            return Err(format!(
                "run_id: unknown run {:?}: check the run_id",
                input.run_id
            ));
        };
        let rows = self
            .api
            .results(&input.run_id, input.after, limit)
            .await
            .ok_or("the journal cannot be read now; try again")?;
        let next_cursor = rows
            .last()
            .and_then(|r| u64::try_from(r.seq).ok())
            .unwrap_or(input.after);
        let complete = run.state.is_terminal() && next_cursor >= run.results;
        Ok(Json(ResultsOut {
            run_id: input.run_id,
            results: rows
                .into_iter()
                .map(|r| ResultOut {
                    seq: r.seq,
                    name: r.name,
                    step: r.step,
                    instrument: r.instrument,
                    identity: r.identity,
                    value: r.value,
                    at_ms: r.at_ms,
                })
                .collect(),
            next_cursor,
            complete,
        }))
    }

    /// Follows a run until it ends or pauses, or (with `after_result`) has a result beyond that cursor, or
    /// `timeout_s` passes: one call instead of polling `run_status`. Give a `progressToken` in the
    /// request's `_meta` to get a progress notification for each state change, step and result on the way.
    #[tool(annotations(
        title = "Wait for a run",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = false
    ))]
    async fn wait_for_run(
        &self,
        Parameters(input): Parameters<WaitInput>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<WaitOut>, String> {
        use tokio::sync::broadcast::error::RecvError;
        let timeout_s = input.timeout_s.unwrap_or(DEFAULT_WAIT_S);
        if !(timeout_s > 0.0 && timeout_s <= MAX_WAIT_S) {
            return Err(format!(
                "timeout_s: {timeout_s} is out of range: give more than 0 and at most {MAX_WAIT_S}"
            ));
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64(timeout_s);
        // Subscribed before the run is read: nothing committed in between is missed.
        let mut records = self.api.events();
        let unknown = || format!("run_id: unknown run {:?}: check the run_id", input.run_id);
        let mut run = self.api.run(&input.run_id).await.ok_or_else(unknown)?;
        let token = ctx.meta.get_progress_token();
        let mut sent = 0u64;
        loop {
            let ended_by = if run.state.is_terminal() {
                Some(WaitEnd::Finished)
            } else if run.state == RunState::Paused {
                Some(WaitEnd::Paused)
            } else if input.after_result.is_some_and(|after| run.results > after) {
                Some(WaitEnd::Result)
            } else {
                None
            };
            if let Some(ended_by) = ended_by {
                return Ok(Json(WaitOut::new(run, ended_by, sent)));
            }
            let record = tokio::select! {
                record = records.recv() => record,
                () = tokio::time::sleep_until(deadline) => {
                    return Ok(Json(WaitOut::new(run, WaitEnd::Timeout, sent)));
                }
                () = ctx.ct.cancelled() => return Err("cancelled by the client".into()),
            };
            let record = match record {
                Ok(record) => record,
                // Missed records: the run is read again below, and the next one is reported.
                Err(RecvError::Lagged(_)) => {
                    run = self.api.run(&input.run_id).await.ok_or_else(unknown)?;
                    continue;
                }
                Err(RecvError::Closed) => return Err("the controller stopped".into()),
            };
            let Some(message) = progress_message(&record, &input.run_id) else {
                continue;
            };
            if let Some(token) = &token {
                sent += 1;
                // The progress value must grow with each notification: the count of them.
                let note = ProgressNotificationParam::new(token.clone(), sent as f64)
                    .with_message(message);
                if ctx.peer.notify_progress(note).await.is_err() {
                    return Err("the client went away".into());
                }
            }
            // Followed from its records, not by reading the run again: the wait then ends with the
            // notification of the record that ended it, never before it.
            match &*record {
                Record::RunState {
                    state,
                    step,
                    reason,
                    ..
                } => {
                    run.state = *state;
                    run.current_step.clone_from(step);
                    run.reason.clone_from(reason);
                }
                Record::Result { seq, .. } => run.results = run.results.max(*seq),
                _ => {}
            }
        }
    }

    /// Pauses one of your own runs after its current step; its instruments are held safe.
    #[tool(annotations(
        title = "Pause a run",
        read_only_hint = false,
        destructive_hint = false,
        idempotent_hint = false,
        open_world_hint = true
    ))]
    async fn pause_run(
        &self,
        Parameters(input): Parameters<RunInput>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<ControlOut>, String> {
        self.control(&ctx, &input.run_id, Control::Pause).await
    }

    /// Resumes one of your own paused runs.
    #[tool(annotations(
        title = "Resume a run",
        read_only_hint = false,
        destructive_hint = false,
        idempotent_hint = false,
        open_world_hint = true
    ))]
    async fn resume_run(
        &self,
        Parameters(input): Parameters<RunInput>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<ControlOut>, String> {
        self.control(&ctx, &input.run_id, Control::Resume).await
    }

    /// Aborts one of your own runs for good: its instruments go to their safe state and it cannot be
    /// resumed.
    #[tool(annotations(
        title = "Abort a run",
        read_only_hint = false,
        destructive_hint = true,
        idempotent_hint = false,
        open_world_hint = true
    ))]
    async fn abort_run(
        &self,
        Parameters(input): Parameters<RunInput>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<ControlOut>, String> {
        self.control(&ctx, &input.run_id, Control::Abort).await
    }
}

/// What a progress notification of `wait_for_run` says about `record`, when it is about `run_id` (commands
/// are left out: one per step at most is worth a line).
fn progress_message(record: &Record, run_id: &str) -> Option<String> {
    let at_step =
        |step: &Option<String>| step.as_ref().map(|s| format!(" {s}")).unwrap_or_default();
    match record {
        Record::RunState {
            run_id: r,
            state,
            step,
            reason,
            ..
        } if r == run_id => Some(format!(
            "state {}{}{}",
            state.as_str(),
            at_step(step),
            reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        Record::Approval {
            run_id: r,
            decision,
            actor,
            ..
        } if r == run_id => Some(match decision {
            Decision::Approved { .. } => format!(
                "approved{}",
                actor
                    .as_ref()
                    .map(|a| format!(" by {a}"))
                    .unwrap_or_default()
            ),
            Decision::AwaitingApproval { because, .. } => {
                format!("awaiting approval: {}", because.join("; "))
            }
            Decision::Rejected { reason } => format!("rejected: {reason}"),
        }),
        Record::Event {
            run_id: Some(r),
            step,
            detail,
            ..
        } if r == run_id
            && !matches!(detail.kind(), EventKind::Command | EventKind::CommandDone) =>
        {
            Some(format!("{}{}", detail.kind().as_str(), at_step(step)))
        }
        Record::Result {
            run_id: r,
            seq,
            name,
            step,
            ..
        } if r == run_id => Some(format!("result {seq} {name} (step {step})")),
        _ => None,
    }
}

fn kind_name(kind: labctl_protocols::InstrumentKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{kind:?}"),
    }
}

/// The capabilities resource: the lab, its instruments (actions, measurements, quantities, capabilities,
/// envelope), its deck and approval policy: what a protocol may ask.
pub fn capabilities(lab: &labctl_protocols::Lab) -> serde_json::Value {
    labctl_protocols::capabilities::document(lab)
}

/// The prompt's text: the protocol language, the rules labctl enforces, and the dye mix.
fn prompt_text(lab: &labctl_protocols::Lab, goal: Option<&str>) -> String {
    let instruments: Vec<String> = lab
        .instruments
        .iter()
        .map(|i| {
            format!(
                "- `{}` ({}): actions {:?}; measurements {:?}",
                i.id,
                kind_name(i.kind),
                i.action_names(),
                i.measurement_names()
            )
        })
        .collect();
    let goal = goal
        .map(|g| format!("\n\nThe experiment to write: {g}\n"))
        .unwrap_or_default();
    format!(
        "You write protocols for the lab `{lab_id}`, run by labctl. A protocol is one JSON document:\n\
         - `version`: 1;\n\
         - `metadata`: `name`, `objective`, a `proposal_id` unique to this protocol (the same id always \
         means the same run: a changed protocol needs a new id), and `planner` (`id`, and your `model`);\n\
         - `labware`: the vessels it uses (`id`, `kind`, `location` on the deck, `capacity_ul`);\n\
         - `steps`: in order; each has a unique `id` and a `type`: `action` (an instrument's action with its \
         `params`), `measure` (a measurement whose value is recorded under `result`), `wait` (`duration_s`), \
         and blocks (`repeat`, `parallel`); `timeout_s` and `on_error` (`fail`, `pause`, `skip`) are optional.\n\n\
         The lab's instruments:\n{instruments}\n\n\
         labctl, not you, enforces safety: every parameter is checked against the lab's envelope before \
         anything moves, some protocols wait for a technician's approval, and you may only pause, resume or \
         abort your own runs. Read the resource `{schema}` for the exact JSON Schema and `{caps}` for every \
         range. Call `validate_protocol` first: each finding names the JSON pointer of the value to fix. \
         Then `dry_run_protocol`, then `submit_protocol`; follow the run with `run_status` and read its \
         measurements with `run_results`.\n\n\
         A worked example, the dye mix: dispense red, yellow and blue stock into one vial, stir, and measure \
         the spectrum and the mass:\n\n```json\n{example}```\n{goal}",
        lab_id = lab.lab_id,
        instruments = instruments.join("\n"),
        schema = SCHEMA_URI,
        caps = CAPABILITIES_URI,
        example = DYE_MIX,
    )
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for LabMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_prompts()
                .build(),
        )
        .with_server_info(Implementation::new("labctl", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "labctl runs lab protocols on real instruments inside a safety envelope. Read the prompt \
             `write_protocol` (or the resource labctl://protocol/schema), validate with `validate_protocol`, \
             submit with `submit_protocol`, follow with `run_status` and `run_results`. Approvals, \
             emergency stops and device commands are for the lab's technicians, not for agents.",
        )
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new(SCHEMA_URI, "protocol-schema")
                .with_description("The JSON Schema of labctl's protocol language (`labctl schema`)")
                .with_mime_type("application/schema+json"),
            Resource::new(CAPABILITIES_URI, "lab-capabilities")
                .with_description(
                    "The lab's instruments, their actions, measurements, capabilities and safety envelope",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let (text, mime) = match request.uri.as_str() {
            SCHEMA_URI => (
                labctl_protocols::schema::protocol_schema_pretty(),
                "application/schema+json",
            ),
            CAPABILITIES_URI => (
                serde_json::to_string_pretty(&capabilities(self.api.lab())).unwrap_or_default(),
                "application/json",
            ),
            other => {
                return Err(ErrorData::resource_not_found(
                    format!(
                        "uri: no resource {other:?} (there are {SCHEMA_URI} and {CAPABILITIES_URI})"
                    ),
                    None,
                ));
            }
        };
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(text, request.uri).with_mime_type(mime),
        ])
        .into())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        Ok(ListPromptsResult::with_all_items(vec![Prompt::new(
            PROMPT_NAME,
            Some(
                "How to write a valid labctl protocol for this lab, with the dye-mix worked example",
            ),
            Some(vec![
                PromptArgument::new("goal")
                    .with_description("The experiment to write a protocol for")
                    .with_required(false),
            ]),
        )]))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        if request.name != PROMPT_NAME {
            return Err(ErrorData::invalid_params(
                format!(
                    "name: no prompt {:?} (there is {PROMPT_NAME})",
                    request.name
                ),
                None,
            ));
        }
        let goal = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("goal"))
            .and_then(|g| g.as_str());
        let text = prompt_text(self.api.lab(), goal);
        Ok(
            GetPromptResult::new(vec![PromptMessage::new_text(MessageRole::User, text)])
                .with_description("Writing a labctl protocol")
                .into(),
        )
    }
}
