//! The one protocol validator: the CLI, the MQTT and OPC UA gateways and the command port all call it.
//!
//! Two passes. The structural pass decodes the JSON step by step, so one malformed step does not hide the
//! problems of the others, and explains unit mistakes (`volume_ml` for `volume_ul`). The semantic pass walks
//! the decoded protocol against the lab: instruments and actions, capability ranges and the safety envelope,
//! vessel volumes through `repeat` and `parallel`, and the order of steps.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::capabilities::{param_fields, split_unit};
use crate::finding::{Finding, FindingCode as Code};
use crate::lab::{ApprovalPolicy, Lab, Position};
use crate::protocol::*;
use crate::registry::builtin_models;

/// Largest protocol document accepted, in bytes.
pub const MAX_PROTOCOL_BYTES: usize = 4 * 1024 * 1024;

/// Reads at most one byte more than the validator accepts, so a huge file is refused without loading it.
pub fn read_protocol_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_PROTOCOL_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}
/// Deepest JSON nesting accepted (objects and arrays).
pub const MAX_JSON_DEPTH: usize = 64;
/// Deepest nesting of `parallel` and `repeat` blocks.
pub const MAX_STEP_NESTING: usize = 8;
/// Most steps written in one protocol.
pub const MAX_WRITTEN_STEPS: usize = 100_000;
/// Most steps a protocol may execute once every `repeat` is unrolled.
pub const MAX_EXPANDED_STEPS: u64 = 10_000_000;
/// Largest `repeat` count.
pub const MAX_REPEAT: u32 = 100_000;
/// Longest wait or timeout, in seconds (a week).
pub const MAX_DURATION_S: f64 = 7.0 * 86_400.0;
/// Most points in one spectrum.
pub const MAX_SPECTRUM_POINTS: f64 = 10_000.0;

/// The outcome of validating one protocol.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The decoded protocol, when its structure was sound (it may still have semantic findings).
    #[serde(skip)]
    pub protocol: Option<Protocol>,
    pub valid: bool,
    pub findings: Vec<Finding>,
    /// Static estimate; every `wait_until` counts at its timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_duration_s: Option<f64>,
    /// Steps executed once every `repeat` is unrolled.
    pub expanded_steps: u64,
    /// Why a technician must approve this protocol; empty when the lab's policy approves it automatically.
    pub approval_required_because: Vec<String>,
    /// The proposal id the document gives, read even from an invalid one so a refusal can name it.
    #[serde(skip)]
    pub proposal_id: Option<String>,
}

impl Report {
    /// A report for a document refused before it could be decoded.
    pub fn from_findings(findings: Vec<Finding>) -> Report {
        Report {
            protocol: None,
            valid: !findings.iter().any(Finding::is_error),
            findings,
            estimated_duration_s: None,
            expanded_steps: 0,
            approval_required_because: Vec::new(),
            proposal_id: None,
        }
    }

    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.is_error())
    }
}

/// Validates a protocol document (raw bytes as received from a file or the network) against a lab.
pub fn validate_bytes(bytes: &[u8], lab: &Lab) -> Report {
    if bytes.len() > MAX_PROTOCOL_BYTES {
        return Report::from_findings(vec![
            Finding::error(Code::TooLarge, "", "protocol document too large")
                .found(format!("{} bytes", bytes.len()))
                .expected(format!("at most {MAX_PROTOCOL_BYTES} bytes")),
        ]);
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let (line, column) = line_col(bytes, e.valid_up_to());
            return Report::from_findings(vec![
                Finding::error(Code::Syntax, "", "protocol is not valid UTF-8")
                    .found(format!("invalid byte at offset {}", e.valid_up_to()))
                    .expected("UTF-8 JSON text")
                    .at(line, column),
            ]);
        }
    };
    if let Some(offset) = too_deep(bytes) {
        let (line, column) = line_col(bytes, offset);
        return Report::from_findings(vec![
            Finding::error(Code::TooLarge, "", "JSON nested too deeply")
                .expected(format!(
                    "at most {MAX_JSON_DEPTH} levels of objects and arrays"
                ))
                .at(line, column),
        ]);
    }
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let message = e.to_string();
            let message = message.split(" at line ").next().unwrap_or_default();
            return Report::from_findings(vec![
                Finding::error(Code::Syntax, "", format!("invalid JSON: {message}"))
                    .expected("a JSON object")
                    .at(e.line(), e.column()),
            ]);
        }
    };
    validate_value(&value, lab)
}

/// Validates an already parsed JSON value (e.g. from an MQTT payload parsed upstream).
pub fn validate_value(value: &Value, lab: &Lab) -> Report {
    let mut decoder = Decoder {
        lab,
        findings: Vec::new(),
        written_steps: 0,
    };
    let protocol = decoder.protocol(value);
    let structural_errors = decoder.findings.iter().any(Finding::is_error);
    let mut findings = decoder.findings;
    let proposal_id = value
        .pointer("/metadata/proposal_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(protocol) = protocol else {
        return Report {
            proposal_id,
            ..Report::from_findings(findings)
        };
    };
    let mut semantic = Semantic::new(lab, structural_errors);
    semantic.run(&protocol);
    findings.append(&mut semantic.findings);
    let valid = !findings.iter().any(Finding::is_error);
    let approval_required_because = approval_reasons(&protocol, lab, &semantic.summary);
    Report {
        valid,
        findings,
        estimated_duration_s: Some(semantic.summary.duration_s),
        expanded_steps: semantic.summary.expanded_steps,
        approval_required_because,
        protocol: if valid { Some(protocol) } else { None },
        proposal_id,
    }
}

/// Semantic checks of a typed protocol (for callers that built one in code).
pub fn validate_protocol(protocol: &Protocol, lab: &Lab) -> Report {
    match serde_json::to_value(protocol) {
        Ok(v) => validate_value(&v, lab),
        Err(e) => Report::from_findings(vec![Finding::error(Code::Schema, "", e.to_string())]),
    }
}

fn line_col(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, column)
}

/// Offset of the first bracket past [`MAX_JSON_DEPTH`], scanning outside strings; checked before parsing so
/// a hostile document cannot exhaust the stack or the parser's recursion limit.
fn too_deep(bytes: &[u8]) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Some(i);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

fn join(path: &str, key: impl std::fmt::Display) -> String {
    let key = key.to_string().replace('~', "~0").replace('/', "~1");
    format!("{path}/{key}")
}

fn list(items: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let v: Vec<String> = items
        .into_iter()
        .map(|s| format!("`{}`", s.as_ref()))
        .collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

/// Keys each step type accepts, as the schema defines them (a test keeps them equal).
pub(crate) fn step_keys(step_type: &str) -> Option<&'static [&'static str]> {
    Some(match step_type {
        "action" => &[
            "type",
            "id",
            "instrument",
            "action",
            "params",
            "timeout_s",
            "on_error",
        ],
        "measure" => &[
            "type",
            "id",
            "instrument",
            "action",
            "params",
            "result",
            "timeout_s",
            "on_error",
        ],
        "wait" => &["type", "id", "duration_s", "on_error"],
        "wait_until" => &["type", "id", "condition", "timeout_s", "on_error"],
        "parallel" => &["type", "id", "branches", "timeout_s", "on_error"],
        "repeat" => &["type", "id", "count", "steps", "timeout_s", "on_error"],
        _ => return None,
    })
}

struct Decoder<'a> {
    lab: &'a Lab,
    findings: Vec<Finding>,
    written_steps: usize,
}

impl Decoder<'_> {
    fn schema(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.findings
            .push(Finding::error(Code::Schema, path, message));
    }

    /// Decodes a leaf with serde, reporting the first problem with its full path.
    fn leaf<T: DeserializeOwned>(&mut self, value: &Value, path: &str) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(t) => Some(t),
            Err(e) => {
                let mut p = path.to_owned();
                for seg in e.path().iter() {
                    match seg {
                        serde_path_to_error::Segment::Seq { index } => p = join(&p, index),
                        serde_path_to_error::Segment::Map { key } => p = join(&p, key),
                        serde_path_to_error::Segment::Enum { .. }
                        | serde_path_to_error::Segment::Unknown => {}
                    }
                }
                let message = e.inner().to_string();
                // serde names a missing field in its message and points at the parent: point at the field.
                if let Some(field) = message
                    .strip_prefix("missing field `")
                    .and_then(|m| m.split('`').next())
                {
                    p = join(&p, field);
                }
                self.schema(p, message);
                None
            }
        }
    }

    fn protocol(&mut self, v: &Value) -> Option<Protocol> {
        let Some(obj) = v.as_object() else {
            self.findings.push(
                Finding::error(Code::Schema, "", "a protocol is a JSON object")
                    .found(json_type(v))
                    .expected("object with version, metadata, labware, steps"),
            );
            return None;
        };
        self.unknown_keys(obj, "", &["version", "metadata", "labware", "steps"]);
        match obj.get("version") {
            None => self.findings.push(
                Finding::error(Code::Schema, "/version", "missing required field `version`")
                    .expected(PROTOCOL_VERSION),
            ),
            Some(Value::Number(n)) if n.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
            Some(other) => self.findings.push(
                Finding::error(
                    Code::UnsupportedVersion,
                    "/version",
                    "unsupported protocol version",
                )
                .found(other)
                .expected(PROTOCOL_VERSION),
            ),
        }
        let metadata = match obj.get("metadata") {
            Some(m) => self.leaf::<Metadata>(m, "/metadata"),
            None => {
                self.schema("/metadata", "missing required field `metadata`");
                None
            }
        };
        let labware = match obj.get("labware") {
            None => Some(Vec::new()),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    out.extend(self.leaf::<Labware>(item, &format!("/labware/{i}")));
                }
                Some(out)
            }
            Some(other) => {
                self.findings.push(
                    Finding::error(Code::Schema, "/labware", "labware is a list")
                        .found(json_type(other))
                        .expected("array"),
                );
                None
            }
        };
        let steps = match obj.get("steps") {
            Some(s) => self.steps(s, "/steps", 0),
            None => {
                self.schema("/steps", "missing required field `steps`");
                Vec::new()
            }
        };
        // A protocol with broken steps is still walked, so the other steps' problems are reported too.
        Some(Protocol {
            version: PROTOCOL_VERSION,
            metadata: metadata?,
            labware: labware?,
            steps,
        })
    }

    fn unknown_keys(&mut self, obj: &Map<String, Value>, path: &str, known: &[&str]) -> bool {
        let mut any = false;
        for key in obj.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            any = true;
            self.findings
                .push(explain_unknown_key(key, known, &join(path, key)));
        }
        any
    }

    fn steps(&mut self, v: &Value, path: &str, depth: usize) -> Vec<Step> {
        let Some(items) = v.as_array() else {
            self.findings.push(
                Finding::error(Code::Schema, path, "steps are a list")
                    .found(json_type(v))
                    .expected("array"),
            );
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len().min(1024));
        for (i, item) in items.iter().enumerate() {
            self.written_steps += 1;
            if self.written_steps > MAX_WRITTEN_STEPS {
                self.findings.push(
                    Finding::error(Code::TooLarge, join(path, i), "too many steps").expected(
                        format!("at most {MAX_WRITTEN_STEPS} written steps; use `repeat`"),
                    ),
                );
                return out;
            }
            // A broken step keeps its place, so the semantic pass reports the others at their real index.
            out.push(
                self.step(item, &join(path, i), depth)
                    .unwrap_or_else(broken_step),
            );
        }
        out
    }

    fn step(&mut self, v: &Value, path: &str, depth: usize) -> Option<Step> {
        let Some(obj) = v.as_object() else {
            self.findings.push(
                Finding::error(Code::Schema, path, "a step is an object")
                    .found(json_type(v))
                    .expected("object"),
            );
            return None;
        };
        let step_type = match obj.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(other) => {
                self.findings.push(
                    Finding::error(Code::Schema, join(path, "type"), "step type is a string")
                        .found(other),
                );
                return None;
            }
            None => {
                self.findings.push(
                    Finding::error(
                        Code::Schema,
                        join(path, "type"),
                        "missing required field `type`",
                    )
                    .expected(list([
                        "action",
                        "measure",
                        "wait",
                        "wait_until",
                        "parallel",
                        "repeat",
                    ])),
                );
                return None;
            }
        };
        let Some(keys) = step_keys(step_type) else {
            self.findings.push(
                Finding::error(Code::Schema, join(path, "type"), "unknown step type")
                    .found(format!("`{step_type}`"))
                    .expected(list([
                        "action",
                        "measure",
                        "wait",
                        "wait_until",
                        "parallel",
                        "repeat",
                    ])),
            );
            return None;
        };
        let mut bad_keys = self.unknown_keys(obj, path, keys);
        match step_type {
            "action" | "measure" => {
                bad_keys |= self.check_action_name_and_params(obj, path, step_type);
                if bad_keys {
                    return None;
                }
                // Fast path: most steps are fine.
                if let Ok(step) = <Step as serde::Deserialize>::deserialize(v) {
                    return Some(step);
                }
                // The action is flattened into the step, which hides the path of a bad parameter from serde:
                // decode action and params on their own first so the finding names `/params/<field>`.
                let mut tagged = Map::new();
                for key in ["action", "params"] {
                    if let Some(x) = obj.get(key) {
                        tagged.insert(key.to_owned(), x.clone());
                    }
                }
                let tagged = Value::Object(tagged);
                let defined = obj
                    .get("instrument")
                    .and_then(Value::as_str)
                    .and_then(|id| self.lab.instrument(id))
                    .is_some_and(|i| i.defined().is_some());
                let params_ok = if step_type == "action" && defined {
                    self.leaf::<crate::protocol::DefinedAction>(&tagged, path)
                        .is_some()
                } else if step_type == "action" {
                    self.leaf::<Action>(&tagged, path).is_some()
                } else {
                    self.leaf::<Measurement>(&tagged, path).is_some()
                };
                if !params_ok {
                    return None;
                }
                let mut fields = obj.clone();
                for key in ["type", "action", "params"] {
                    fields.remove(key);
                }
                self.leaf::<ActionStepFields>(&Value::Object(fields), path)?;
                self.leaf::<Step>(v, path)
            }
            "parallel" | "repeat" => {
                if depth + 1 > MAX_STEP_NESTING {
                    self.findings.push(
                        Finding::error(
                            Code::TooLarge,
                            path,
                            "parallel/repeat blocks nested too deeply",
                        )
                        .expected(format!("at most {MAX_STEP_NESTING} levels")),
                    );
                    return None;
                }
                // Decode the block's own fields with its children removed, then each child on its own.
                let child_key = if step_type == "parallel" {
                    "branches"
                } else {
                    "steps"
                };
                let mut shell = obj.clone();
                let children = shell.insert(child_key.to_owned(), Value::Array(Vec::new()));
                let shell_step = if bad_keys {
                    None
                } else {
                    self.leaf::<Step>(&Value::Object(shell), path)
                };
                let child_path = join(path, child_key);
                match (shell_step, children) {
                    (Some(Step::Parallel(mut p)), Some(Value::Array(branches))) => {
                        for (j, b) in branches.iter().enumerate() {
                            p.branches
                                .push(self.steps(b, &join(&child_path, j), depth + 1));
                        }
                        Some(Step::Parallel(p))
                    }
                    (Some(Step::Repeat(mut r)), Some(children)) => {
                        r.steps = self.steps(&children, &child_path, depth + 1);
                        Some(Step::Repeat(r))
                    }
                    (_, Some(children)) => {
                        // Still look inside, so the children's problems are reported in the same pass.
                        match (step_type, children) {
                            ("parallel", Value::Array(branches)) => {
                                for (j, b) in branches.iter().enumerate() {
                                    self.steps(b, &join(&child_path, j), depth + 1);
                                }
                            }
                            ("repeat", children) => {
                                self.steps(&children, &child_path, depth + 1);
                            }
                            (_, other) => self.findings.push(
                                Finding::error(
                                    Code::Schema,
                                    child_path,
                                    "branches are a list of step lists",
                                )
                                .found(json_type(&other))
                                .expected("array"),
                            ),
                        }
                        None
                    }
                    (_, None) => {
                        self.findings.push(Finding::error(
                            Code::Schema,
                            child_path,
                            format!("missing required field `{child_key}`"),
                        ));
                        None
                    }
                }
            }
            _ => {
                if bad_keys {
                    return None;
                }
                self.leaf::<Step>(v, path)
            }
        }
    }

    /// Checks the action name against the instrument and the params' keys against the action, so a wrong
    /// unit is named as such instead of as a generic "unknown field". Returns whether it found anything.
    fn check_action_name_and_params(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        step_type: &str,
    ) -> bool {
        let Some(Value::String(action)) = obj.get("action") else {
            return false; // serde reports the missing or mistyped field with its path
        };
        let inst = obj
            .get("instrument")
            .and_then(Value::as_str)
            .and_then(|id| self.lab.instrument(id));
        let kind = inst.map(|i| i.kind);
        let allowed: Vec<&str> = match (inst, step_type) {
            (Some(i), "action") => i.action_names(),
            (Some(i), _) => i.measurement_names(),
            (None, "action") => builtin_models().flat_map(|m| m.action_names()).collect(),
            (None, _) => builtin_models()
                .flat_map(|m| m.measurement_names())
                .collect(),
        };
        if !allowed.contains(&action.as_str()) {
            let what = match (kind, step_type) {
                (Some(k), "action") => format!("a {k} cannot `{action}`"),
                (Some(k), _) => format!("a {k} cannot measure `{action}`"),
                (None, _) => format!("unknown {step_type} `{action}`"),
            };
            self.findings.push(
                Finding::error(Code::UnknownAction, join(path, "action"), what)
                    .found(format!("`{action}`"))
                    .expected(list(&allowed)),
            );
            return true;
        }
        if let (Some(def), "action") = (inst.and_then(|i| i.defined()), step_type) {
            let fields: Vec<&str> = def
                .action(action)
                .map(|a| a.params.iter().map(|p| p.name.as_str()).collect())
                .unwrap_or_default();
            return match obj.get("params") {
                Some(Value::Object(params)) => {
                    self.unknown_keys(params, &join(path, "params"), &fields)
                }
                _ => false,
            };
        }
        let Some(fields) = param_fields(action) else {
            return false;
        };
        match obj.get("params") {
            Some(Value::Object(params)) => self.unknown_keys(params, &join(path, "params"), fields),
            _ => false,
        }
    }
}

/// The fields an action or measure step has beside its flattened action, decoded on their own so that a
/// bad value is reported at its own path (serde loses the path inside flattened structs).
#[derive(serde::Deserialize)]
#[allow(dead_code)] // decoded only for its errors
struct ActionStepFields {
    id: Option<String>,
    instrument: String,
    result: Option<String>,
    timeout_s: Option<f64>,
    on_error: Option<OnError>,
}

/// Stands in for a step that failed to decode. JSON has no NaN, so no submitted step can look like it.
fn broken_step() -> Step {
    Step::Wait(WaitStep {
        id: None,
        duration_s: f64::NAN,
        on_error: OnError::Fail,
    })
}

fn is_broken(step: &Step) -> bool {
    matches!(step, Step::Wait(w) if w.duration_s.is_nan())
}

/// Explains an unexpected key: a wrong or missing unit when it shares a stem with an expected field.
fn explain_unknown_key(key: &str, known: &[&str], path: &str) -> Finding {
    let (stem, unit) = split_unit(key);
    for &expected in known {
        let (exp_stem, exp_unit) = split_unit(expected);
        let Some((_, meaning)) = exp_unit else {
            continue;
        };
        let same_stem =
            exp_stem == stem || key == exp_stem || key.starts_with(&format!("{exp_stem}_"));
        if same_stem {
            let message = match unit {
                None if key == exp_stem => format!("`{key}` has no unit"),
                _ => format!("`{key}` has the wrong unit"),
            };
            return Finding::error(Code::Unit, path, message)
                .found(format!("`{key}`"))
                .expected(format!("`{expected}` (in {meaning})"));
        }
    }
    Finding::error(Code::Schema, path, format!("unknown field `{key}`"))
        .found(format!("`{key}`"))
        .expected(list(known))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Aggregates the approval policy needs.
#[derive(Debug, Default, Clone)]
struct Summary {
    duration_s: f64,
    expanded_steps: u64,
    max_temperature_c: Option<f64>,
    total_volume_ul: f64,
}

#[derive(Debug, Clone)]
struct Vessel {
    max_fill_ul: f64,
    volume_ul: f64,
    position: String,
    overfilled: bool,
}

struct Semantic<'a> {
    lab: &'a Lab,
    /// Structure had errors: skip checks that depend on every step being present.
    partial: bool,
    positions: BTreeMap<String, Position>,
    vessels: BTreeMap<String, Vessel>,
    /// Deck position (upper case) the gantry head is above, when known.
    head_at: Option<String>,
    /// A move went to an invalid target: where the head is cannot be known, so order checks stay quiet.
    head_lost: bool,
    /// Where the head is (x, y, z in mm) after the last move, when the protocol says: the travel check of
    /// `move_xyz` needs coordinates, not just a deck position.
    head_xyz: Option<[f64; 3]>,
    ids: BTreeSet<String>,
    results: BTreeSet<String>,
    findings: Vec<Finding>,
    summary: Summary,
    /// Defined instruments' last parameter values, for their duration models.
    params: crate::instrument_def::ParamHistory,
}

impl<'a> Semantic<'a> {
    fn new(lab: &'a Lab, partial: bool) -> Self {
        let positions = lab
            .deck
            .positions()
            .into_iter()
            .map(|p| (p.name.to_ascii_uppercase(), p))
            .collect();
        Semantic {
            lab,
            partial,
            positions,
            vessels: BTreeMap::new(),
            head_at: None,
            head_lost: false,
            head_xyz: None,
            ids: BTreeSet::new(),
            results: BTreeSet::new(),
            findings: Vec::new(),
            summary: Summary::default(),
            params: Default::default(),
        }
    }

    fn push(&mut self, f: Finding) {
        self.findings.push(f);
    }

    fn run(&mut self, p: &Protocol) {
        self.metadata(&p.metadata);
        let mut occupied: HashMap<String, &str> = HashMap::new();
        for (i, lw) in p.labware.iter().enumerate() {
            let path = format!("/labware/{i}");
            if self.vessels.contains_key(&lw.id) {
                self.push(
                    Finding::error(
                        Code::DuplicateId,
                        join(&path, "id"),
                        "labware id used twice",
                    )
                    .found(&lw.id),
                );
                continue;
            }
            let pos = lw.location.to_ascii_uppercase();
            if !self.positions.contains_key(&pos) {
                self.push(
                    Finding::error(
                        Code::UnknownPosition,
                        join(&path, "location"),
                        "no such deck position",
                    )
                    .found(&lw.location)
                    .expected(list(self.positions.values().map(|p| p.name.clone()))),
                );
            } else if let Some(other) = occupied.insert(pos.clone(), &lw.id) {
                self.push(
                    Finding::error(
                        Code::Sequence,
                        join(&path, "location"),
                        format!("position already holds `{other}`"),
                    )
                    .found(&lw.location),
                );
            }
            if !(lw.capacity_ul.is_finite() && lw.capacity_ul > 0.0) {
                self.push(
                    Finding::error(
                        Code::InvalidValue,
                        join(&path, "capacity_ul"),
                        "capacity must be positive",
                    )
                    .found(lw.capacity_ul),
                );
            }
            let max_fill_ul = lw.capacity_ul * self.lab.deck.max_fill_fraction;
            if !(lw.initial_volume_ul >= 0.0 && lw.initial_volume_ul <= max_fill_ul) {
                self.push(
                    Finding::error(
                        Code::Overfill,
                        join(&path, "initial_volume_ul"),
                        "initial volume outside the vessel's fill range",
                    )
                    .found(lw.initial_volume_ul)
                    .expected(format!(
                        "0 to {max_fill_ul} uL ({} of capacity)",
                        self.lab.deck.max_fill_fraction
                    )),
                );
            }
            self.vessels.insert(
                lw.id.clone(),
                Vessel {
                    max_fill_ul,
                    volume_ul: lw.initial_volume_ul,
                    position: pos,
                    overfilled: false,
                },
            );
        }
        let (duration, expanded) = self.steps(&p.steps, "/steps");
        self.summary.duration_s = duration;
        self.summary.expanded_steps = expanded;
        if expanded > MAX_EXPANDED_STEPS {
            self.push(
                Finding::error(
                    Code::TooLarge,
                    "/steps",
                    "protocol executes too many steps once repeats are unrolled",
                )
                .found(expanded)
                .expected(format!("at most {MAX_EXPANDED_STEPS}")),
            );
        }
        if p.steps.is_empty() && !self.partial {
            self.push(Finding::error(
                Code::InvalidValue,
                "/steps",
                "a protocol needs at least one step",
            ));
        }
    }

    fn metadata(&mut self, m: &Metadata) {
        for (field, value, max) in [
            ("proposal_id", &m.proposal_id, 128usize),
            ("name", &m.name, 256),
            ("planner/id", &m.planner.id, 128),
        ] {
            if value.trim().is_empty() || value.len() > max {
                self.push(
                    Finding::error(
                        Code::InvalidValue,
                        format!("/metadata/{field}"),
                        "must be a non-empty string",
                    )
                    .found(format!("{} characters", value.len()))
                    .expected(format!("1 to {max} characters")),
                );
            }
        }
        if !m.proposal_id.is_empty()
            && !crate::lab::is_identifier(&m.proposal_id.replace(['.', ':'], "_"))
        {
            self.push(
                Finding::error(
                    Code::InvalidValue,
                    "/metadata/proposal_id",
                    "proposal id is used in MQTT topics",
                )
                .found(&m.proposal_id)
                .expected("letters, digits, '-', '_', '.', ':' only"),
            );
        }
    }

    /// Walks steps; returns (estimated seconds, steps executed).
    fn steps(&mut self, steps: &[Step], path: &str) -> (f64, u64) {
        let mut duration = 0.0;
        let mut count: u64 = 0;
        for (i, step) in steps.iter().enumerate() {
            let (d, n) = self.step(step, &join(path, i));
            duration += d;
            count = count.saturating_add(n);
        }
        (duration, count)
    }

    fn step(&mut self, step: &Step, path: &str) -> (f64, u64) {
        if is_broken(step) {
            return (0.0, 1);
        }
        if let Some(id) = step.id()
            && !self.ids.insert(id.to_owned())
        {
            self.push(
                Finding::error(Code::DuplicateId, join(path, "id"), "step id used twice").found(id),
            );
        }
        if let Some(t) = step.timeout_s() {
            self.duration(t, &join(path, "timeout_s"));
        }
        match step {
            Step::Action(s) => (self.action(s, path), 1),
            Step::Measure(s) => (self.measure(s, path), 1),
            Step::Wait(s) => {
                self.duration(s.duration_s, &join(path, "duration_s"));
                (s.duration_s.max(0.0), 1)
            }
            Step::WaitUntil(s) => {
                self.condition(&s.condition, &join(path, "condition"));
                (s.timeout_s.max(0.0), 1)
            }
            Step::Parallel(s) => self.parallel(s, path),
            Step::Repeat(s) => self.repeat(s, path),
        }
    }

    fn duration(&mut self, seconds: f64, path: &str) {
        if !(seconds > 0.0 && seconds <= MAX_DURATION_S) {
            self.push(
                Finding::error(Code::InvalidValue, path, "duration out of range")
                    .found(seconds)
                    .expected(format!("more than 0 and at most {MAX_DURATION_S} s")),
            );
        }
    }

    /// Looks the instrument up; reports an unknown one.
    fn instrument(&mut self, id: &str, path: &str) -> Option<&'a crate::lab::Instrument> {
        let lab = self.lab;
        let found = lab.instrument(id);
        if found.is_none() {
            self.push(
                Finding::error(
                    Code::UnknownInstrument,
                    path,
                    "no such instrument in this lab",
                )
                .found(format!("`{id}`"))
                .expected(list(lab.instruments.iter().map(|i| i.id.as_str()))),
            );
        }
        found
    }

    /// Checks a commanded value against the instrument's capability, then the lab's envelope.
    fn value(&mut self, inst: &crate::lab::Instrument, quantity: &str, v: f64, path: &str) {
        if !v.is_finite() {
            self.push(Finding::error(Code::InvalidValue, path, "not a finite number").found(v));
            return;
        }
        if let Some(cap) = inst.capabilities.range(quantity)
            && !cap.contains(v)
        {
            self.push(
                Finding::error(
                    Code::OutOfRange,
                    path,
                    format!("outside what {} can do", inst.id),
                )
                .found(v)
                .expected(format!("{quantity} within {cap}")),
            );
            return;
        }
        if let Some(env) = inst.envelope.range(quantity)
            && !env.contains(v)
        {
            self.push(
                Finding::error(
                    Code::OutsideEnvelope,
                    path,
                    format!("outside the lab's safety envelope for {}", inst.id),
                )
                .found(v)
                .expected(format!("{quantity} within {env}")),
            );
        }
    }

    fn position(&mut self, name: &str, path: &str) -> Option<Position> {
        let p = self.positions.get(&name.to_ascii_uppercase()).cloned();
        if p.is_none() {
            self.push(
                Finding::error(Code::UnknownPosition, path, "no such deck position")
                    .found(format!("`{name}`"))
                    .expected(list(self.positions.values().map(|p| p.name.clone()))),
            );
        }
        p
    }

    fn vessel_exists(&mut self, id: &str, path: &str) -> bool {
        let ok = self.vessels.contains_key(id);
        if !ok {
            self.push(
                Finding::error(
                    Code::UnknownVessel,
                    path,
                    "no such vessel in the protocol's labware",
                )
                .found(format!("`{id}`"))
                .expected(list(self.vessels.keys())),
            );
        }
        ok
    }

    /// The head crosses the deck only at `safe_z_mm` or above: a `move_xyz` below it must be a vertical
    /// move from a known point above its target, and one that starts below it may only go straight up.
    fn low_travel(&mut self, m: &crate::MoveXyzParams, params: &str) {
        if self.partial || self.head_lost {
            return;
        }
        let safe_z = self.lab.deck.safe_z_mm;
        let lateral =
            |from: &[f64; 3]| (from[0] - m.x_mm).abs() > 0.01 || (from[1] - m.y_mm).abs() > 0.01;
        let problem = match &self.head_xyz {
            None if m.z_mm < safe_z => Some((
                "from an unknown position".to_owned(),
                "head position unknown (not moved since start or homing)".to_owned(),
            )),
            Some(from) if lateral(from) && (m.z_mm < safe_z || from[2] < safe_z) => Some((
                format!(
                    "from ({}, {}, {}) to ({}, {}, {}) sideways",
                    from[0], from[1], from[2], m.x_mm, m.y_mm, m.z_mm
                ),
                format!("head at z = {} mm", from[2]),
            )),
            _ => None,
        };
        if let Some((what, found)) = problem {
            self.push(
                Finding::error(
                    Code::Sequence,
                    params.to_owned(),
                    format!(
                        "move_xyz would travel below the deck's safe_z_mm ({safe_z} mm) {what}: the head may hit what stands on the deck"
                    ),
                )
                .found(found)
                .expected(format!(
                    "travel at z >= {safe_z} mm (move_to, or move_xyz at that height) above the target first, then a vertical move_xyz down"
                )),
            );
        }
    }

    fn vessel_under_head(&self) -> Option<String> {
        let head = self.head_at.as_ref()?;
        self.vessels
            .iter()
            .find(|(_, v)| &v.position == head)
            .map(|(id, _)| id.clone())
    }

    fn action(&mut self, s: &ActionStep, path: &str) -> f64 {
        let Some(inst) = self.instrument(&s.instrument, &join(path, "instrument")) else {
            return 0.0;
        };
        let names = inst.action_names();
        if !names.contains(&s.action.name()) {
            self.push(
                Finding::error(
                    Code::UnknownAction,
                    join(path, "action"),
                    format!("a {} cannot `{}`", inst.kind, s.action.name()),
                )
                .found(format!("`{}`", s.action.name()))
                .expected(list(names)),
            );
            return 0.0;
        }
        let params = join(path, "params");
        if let Some(def) = inst.defined() {
            return self.defined_action(inst, def, s, &params);
        }
        let Some(action) = s.action.builtin() else {
            return 0.0; // not a built-in name: refused above
        };
        match action {
            Action::Home {} => {
                self.head_at = None;
                self.head_xyz = None;
                10.0
            }
            Action::MoveTo(m) => {
                if let Some(f) = m.feed_mm_per_min {
                    self.value(
                        inst,
                        "feed_mm_per_min",
                        f,
                        &join(&params, "feed_mm_per_min"),
                    );
                }
                if let Some(pos) = self.position(&m.position, &join(&params, "position")) {
                    self.value(inst, "x_mm", pos.x_mm, &join(&params, "position"));
                    self.value(inst, "y_mm", pos.y_mm, &join(&params, "position"));
                    self.head_at = Some(pos.name.to_ascii_uppercase());
                    self.head_xyz = Some([pos.x_mm, pos.y_mm, self.lab.deck.safe_z_mm]);
                    self.head_lost = false;
                } else {
                    self.head_lost = true;
                    self.head_xyz = None;
                }
                5.0
            }
            Action::MoveXyz(m) => {
                for (q, v) in [("x_mm", m.x_mm), ("y_mm", m.y_mm), ("z_mm", m.z_mm)] {
                    self.value(inst, q, v, &join(&params, q));
                }
                if let Some(f) = m.feed_mm_per_min {
                    self.value(
                        inst,
                        "feed_mm_per_min",
                        f,
                        &join(&params, "feed_mm_per_min"),
                    );
                }
                self.low_travel(m, &params);
                self.head_at = self
                    .positions
                    .iter()
                    .find(|(_, p)| (p.x_mm - m.x_mm).abs() < 0.5 && (p.y_mm - m.y_mm).abs() < 0.5)
                    .map(|(k, _)| k.clone());
                self.head_xyz = Some([m.x_mm, m.y_mm, m.z_mm]);
                5.0
            }
            Action::Transfer(t) => {
                let vessel_ok = self.vessel_exists(&t.vessel, &join(&params, "vessel"));
                if let Some(to) = self.position(&t.to, &join(&params, "to")) {
                    let to = to.name.to_ascii_uppercase();
                    let occupant = self
                        .vessels
                        .iter()
                        .find(|(id, v)| v.position == to && **id != t.vessel)
                        .map(|(id, _)| id.clone());
                    if let Some(other) = occupant {
                        self.push(
                            Finding::error(
                                Code::Sequence,
                                join(&params, "to"),
                                format!("position {to} already holds `{other}`"),
                            )
                            .found(&t.to),
                        );
                    } else if vessel_ok && let Some(v) = self.vessels.get_mut(&t.vessel) {
                        v.position = to.clone();
                    }
                    self.head_xyz = self
                        .positions
                        .get(&to)
                        .map(|p| [p.x_mm, p.y_mm, self.lab.deck.safe_z_mm]);
                    self.head_at = Some(to);
                    self.head_lost = false;
                } else {
                    self.head_lost = true;
                    self.head_xyz = None;
                }
                15.0
            }
            Action::Dispense(d) => {
                self.value(inst, "volume_ul", d.volume_ul, &join(&params, "volume_ul"));
                self.value(
                    inst,
                    "rate_ul_per_min",
                    d.rate_ul_per_min,
                    &join(&params, "rate_ul_per_min"),
                );
                if d.volume_ul > 0.0 {
                    self.summary.total_volume_ul += d.volume_ul;
                }
                if self.vessel_exists(&d.vessel, &join(&params, "vessel")) {
                    let under = self.vessel_under_head();
                    if !self.partial
                        && !self.head_lost
                        && under.as_deref() != Some(d.vessel.as_str())
                    {
                        let at = self
                            .vessels
                            .get(&d.vessel)
                            .map(|v| v.position.clone())
                            .unwrap_or_default();
                        self.push(
                            Finding::error(
                                Code::Sequence,
                                join(&params, "vessel"),
                                format!("the pumps dispense under the gantry head, which is not above `{}` (at {at})", d.vessel),
                            )
                            .found(match &self.head_at {
                                Some(h) => format!("head above {h}"),
                                None => "head position unknown (not moved since start or homing)".into(),
                            })
                            .expected(format!("a gantry move_to {at} before this step")),
                        );
                    }
                    self.fill(&d.vessel, d.volume_ul, &join(&params, "volume_ul"));
                }
                if d.rate_ul_per_min > 0.0 {
                    d.volume_ul / d.rate_ul_per_min * 60.0
                } else {
                    0.0
                }
            }
            Action::SetTemperature(t) => {
                self.value(
                    inst,
                    "temperature_c",
                    t.temperature_c,
                    &join(&params, "temperature_c"),
                );
                let m = self
                    .summary
                    .max_temperature_c
                    .get_or_insert(t.temperature_c);
                *m = m.max(t.temperature_c);
                1.0
            }
            Action::SetStirSpeed(r) => {
                self.value(
                    inst,
                    "stir_speed_rpm",
                    r.speed_rpm,
                    &join(&params, "speed_rpm"),
                );
                1.0
            }
            Action::StopPump {}
            | Action::Tare {}
            | Action::Zero {}
            | Action::HeaterOff {}
            | Action::StirOff {} => 1.0,
        }
    }

    /// An action of a defined instrument: each parameter present, a number within the definition's range
    /// and the lab's envelope. The dry-run duration comes from the definition's model.
    fn defined_action(
        &mut self,
        inst: &crate::lab::Instrument,
        def: &crate::instrument_def::InstrumentDefinition,
        s: &ActionStep,
        params: &str,
    ) -> f64 {
        let Some(spec) = def.action(s.action.name()) else {
            return 0.0;
        };
        let values = match s.action.numeric_params() {
            Ok(v) => v,
            Err(why) => {
                self.push(Finding::error(Code::InvalidValue, params, why));
                return 0.0;
            }
        };
        for p in &spec.params {
            let at = join(params, &p.name);
            match values.get(&p.name) {
                None => self.push(
                    Finding::error(Code::Schema, at, format!("missing parameter `{}`", p.name))
                        .expected(format!(
                            "a number in {} within [{}, {}]",
                            p.unit, p.min, p.max
                        )),
                ),
                Some(&v) => {
                    if v.is_finite() && !(p.min..=p.max).contains(&v) {
                        self.push(
                            Finding::error(
                                Code::OutOfRange,
                                at,
                                format!("outside what {} can do", inst.id),
                            )
                            .found(v)
                            .expected(format!(
                                "{} within [{}, {}] {}",
                                p.name, p.min, p.max, p.unit
                            )),
                        );
                    } else {
                        self.value(inst, &p.name, v, &at);
                    }
                    // A temperature setpoint counts toward the auto-approval limit whichever instrument
                    // takes it.
                    if p.unit == "degC" && v.is_finite() {
                        let m = self.summary.max_temperature_c.get_or_insert(v);
                        *m = m.max(v);
                    }
                }
            }
        }
        self.params.estimate_s(&inst.id, def, spec, &values)
    }

    fn fill(&mut self, vessel: &str, volume_ul: f64, path: &str) {
        let partial = self.partial;
        let Some(v) = self.vessels.get_mut(vessel) else {
            return;
        };
        v.volume_ul += volume_ul.max(0.0);
        if v.volume_ul > v.max_fill_ul && !v.overfilled && !partial {
            v.overfilled = true;
            let (vol, max) = (v.volume_ul, v.max_fill_ul);
            self.push(
                Finding::error(
                    Code::Overfill,
                    path,
                    format!("vessel `{vessel}` would overfill"),
                )
                .found(format!("{vol} uL after this step"))
                .expected(format!("at most {max} uL")),
            );
        }
    }

    fn measure(&mut self, s: &MeasureStep, path: &str) -> f64 {
        if !self.results.insert(s.result.clone()) {
            self.push(
                Finding::error(
                    Code::DuplicateResult,
                    join(path, "result"),
                    "result name used twice",
                )
                .found(&s.result),
            );
        }
        if !crate::lab::is_identifier(&s.result) {
            self.push(
                Finding::error(
                    Code::InvalidValue,
                    join(path, "result"),
                    "result names are used in topics and file names",
                )
                .found(&s.result)
                .expected("1-64 letters, digits, '-' or '_'"),
            );
        }
        let Some(inst) = self.instrument(&s.instrument, &join(path, "instrument")) else {
            return 0.0;
        };
        if !inst.measurement_names().contains(&s.measurement.name()) {
            self.push(
                Finding::error(
                    Code::UnknownAction,
                    join(path, "action"),
                    format!("a {} cannot measure `{}`", inst.kind, s.measurement.name()),
                )
                .found(format!("`{}`", s.measurement.name()))
                .expected(list(inst.measurement_names())),
            );
            return 0.0;
        }
        let params = join(path, "params");
        match &s.measurement {
            Measurement::Weigh(_) => 3.0,
            Measurement::ReadTemperature {} => 0.5,
            Measurement::Read(r) => {
                let quantities = inst.quantities();
                if !inst.reports(&r.quantity) {
                    self.push(
                        Finding::error(
                            Code::UnknownQuantity,
                            join(&params, "quantity"),
                            format!("{} does not report this", inst.id),
                        )
                        .found(format!("`{}`", r.quantity))
                        .expected(list(quantities.iter().map(|(q, _)| *q))),
                    );
                }
                0.5
            }
            Measurement::Absorbance(a) => {
                self.value(
                    inst,
                    "wavelength_nm",
                    a.wavelength_nm,
                    &join(&params, "wavelength_nm"),
                );
                self.probe_in_vessel(&params);
                1.0
            }
            Measurement::Spectrum(sp) => {
                self.value(
                    inst,
                    "wavelength_nm",
                    sp.start_nm,
                    &join(&params, "start_nm"),
                );
                self.value(inst, "wavelength_nm", sp.stop_nm, &join(&params, "stop_nm"));
                if sp.start_nm >= sp.stop_nm {
                    self.push(
                        Finding::error(
                            Code::InvalidValue,
                            join(&params, "stop_nm"),
                            "spectrum must go up",
                        )
                        .found(sp.stop_nm)
                        .expected(format!("more than start_nm ({})", sp.start_nm)),
                    );
                }
                let points = (sp.stop_nm - sp.start_nm) / sp.step_nm;
                if !(sp.step_nm > 0.0 && points <= MAX_SPECTRUM_POINTS) {
                    self.push(
                        Finding::error(
                            Code::InvalidValue,
                            join(&params, "step_nm"),
                            "step gives no or too many points",
                        )
                        .found(sp.step_nm)
                        .expected(format!("> 0 and at most {MAX_SPECTRUM_POINTS} points")),
                    );
                }
                self.probe_in_vessel(&params);
                2.0
            }
        }
    }

    fn probe_in_vessel(&mut self, path: &str) {
        if !self.partial && !self.head_lost && self.vessel_under_head().is_none() {
            self.push(
                Finding::error(
                    Code::Sequence,
                    path,
                    "the dip probe measures the vessel under the gantry head, and there is none",
                )
                .found(match &self.head_at {
                    Some(h) => format!("head above {h}, which holds no vessel"),
                    None => "head position unknown".into(),
                })
                .expected("a gantry move_to a vessel's position before this step"),
            );
        }
    }

    fn condition(&mut self, c: &Condition, path: &str) {
        let Some(inst) = self.instrument(&c.instrument, &join(path, "instrument")) else {
            return;
        };
        if !inst.reports(&c.quantity) {
            self.push(
                Finding::error(
                    Code::UnknownQuantity,
                    join(path, "quantity"),
                    format!("{} does not report this", inst.id),
                )
                .found(format!("`{}`", c.quantity))
                .expected(list(inst.quantities().iter().map(|(q, _)| *q))),
            );
            return;
        }
        if c.op == Comparison::Within && !c.tolerance.is_some_and(|t| t >= 0.0) {
            self.push(
                Finding::error(
                    Code::InvalidValue,
                    join(path, "tolerance"),
                    "`within` needs a tolerance",
                )
                .expected("a number >= 0"),
            );
        }
        if let Some(h) = c.hold_s
            && !(0.0..=MAX_DURATION_S).contains(&h)
        {
            self.push(
                Finding::error(
                    Code::InvalidValue,
                    join(path, "hold_s"),
                    "hold time out of range",
                )
                .found(h),
            );
        }
        // A target the envelope keeps the instrument from reaching would only ever time out.
        let envelope_quantity = match c.quantity.as_str() {
            "plate_temperature_c" => "temperature_c",
            q => q,
        };
        if let Some(env) = inst.envelope.range(envelope_quantity) {
            let unreachable = match c.op {
                Comparison::Gt | Comparison::Ge => c.value > env.max,
                Comparison::Lt | Comparison::Le => c.value < env.min,
                Comparison::Within => false,
            };
            if unreachable {
                self.push(
                    Finding::warning(
                        Code::OutsideEnvelope,
                        join(path, "value"),
                        "the envelope never lets the reading get there",
                    )
                    .found(c.value)
                    .expected(format!("{} within {env}", c.quantity)),
                );
            }
        }
    }

    fn parallel(&mut self, s: &ParallelStep, path: &str) -> (f64, u64) {
        if s.branches.is_empty() {
            self.push(
                Finding::error(
                    Code::InvalidValue,
                    join(path, "branches"),
                    "a parallel block needs branches",
                )
                .expected("at least one"),
            );
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (j, branch) in s.branches.iter().enumerate() {
            let mut used = BTreeSet::new();
            crate::protocol::collect_instruments(branch, InstrumentUse::Commanded, &mut used);
            for inst in used {
                if let Some(first) = seen.get(&inst) {
                    self.push(
                        Finding::error(
                            Code::ParallelConflict,
                            join(&join(path, "branches"), j),
                            format!("instrument `{inst}` is already used in branch {first}"),
                        )
                        .found(format!("`{inst}` in branches {first} and {j}"))
                        .expected("each instrument in at most one branch"),
                    );
                } else {
                    seen.insert(inst, j);
                }
            }
        }
        self.shared_space(s, path);
        let (mut longest, mut count) = (0.0f64, 1u64);
        for (j, branch) in s.branches.iter().enumerate() {
            let (d, n) = self.steps(branch, &join(&join(path, "branches"), j));
            longest = longest.max(d);
            count = count.saturating_add(n);
        }
        (longest, count)
    }

    /// Instruments that share the space over the deck must not act at once: the gantry head moves over
    /// the vessels, the pumps dispense through the head into the vessel under it, and the spectrometer's
    /// probe dips into a vessel. A branch moving the gantry while another dispenses or measures is refused
    /// (put them in one branch, in order).
    fn shared_space(&mut self, s: &ParallelStep, path: &str) {
        use crate::InstrumentKind::{Gantry, Spectrophotometer, SyringePump};
        let kinds: Vec<BTreeSet<crate::InstrumentKind>> = s
            .branches
            .iter()
            .map(|branch| {
                let mut used = BTreeSet::new();
                crate::protocol::collect_instruments(branch, InstrumentUse::Commanded, &mut used);
                used.iter()
                    .filter_map(|id| self.lab.instrument(id).map(|i| i.kind))
                    .collect()
            })
            .collect();
        let Some(mover) = kinds.iter().position(|k| k.contains(&Gantry)) else {
            return;
        };
        for (j, other) in kinds.iter().enumerate() {
            if j == mover {
                continue;
            }
            let what = if other.contains(&SyringePump) {
                "a pump dispenses through the gantry head"
            } else if other.contains(&Spectrophotometer) {
                "the spectrometer's probe dips into a vessel under the head"
            } else {
                continue;
            };
            self.push(
                Finding::error(
                    Code::ParallelConflict,
                    join(&join(path, "branches"), j),
                    format!("branch {j} runs while branch {mover} moves the gantry, and {what}"),
                )
                .found(format!("the gantry in branch {mover}, {what} in branch {j}"))
                .expected("the gantry's moves and the dispenses or measurements under it in one branch, in order"),
            );
        }
    }

    fn repeat(&mut self, s: &RepeatStep, path: &str) -> (f64, u64) {
        if s.count == 0 || s.count > MAX_REPEAT {
            self.push(
                Finding::error(
                    if s.count == 0 {
                        Code::InvalidValue
                    } else {
                        Code::TooLarge
                    },
                    join(path, "count"),
                    "repeat count out of range",
                )
                .found(s.count)
                .expected(format!("1 to {MAX_REPEAT}")),
            );
        }
        let before: BTreeMap<String, f64> = self
            .vessels
            .iter()
            .map(|(k, v)| (k.clone(), v.volume_ul))
            .collect();
        let volume_before = self.summary.total_volume_ul;
        let (d, n) = self.steps(&s.steps, &join(path, "steps"));
        let count = f64::from(s.count.max(1));
        self.summary.total_volume_ul =
            volume_before + (self.summary.total_volume_ul - volume_before) * count;
        // Dispenses only add liquid, so one pass gives the per-iteration change of every vessel.
        let partial = self.partial;
        let mut overfills = Vec::new();
        for (id, v) in self.vessels.iter_mut() {
            let start = before.get(id).copied().unwrap_or(0.0);
            let delta = v.volume_ul - start;
            if delta <= 0.0 {
                continue;
            }
            v.volume_ul = start + delta * count;
            if v.volume_ul > v.max_fill_ul && !v.overfilled && !partial {
                v.overfilled = true;
                let iteration = ((v.max_fill_ul - start) / delta).floor() + 1.0;
                overfills.push(
                    Finding::error(
                        Code::Overfill,
                        join(path, "count"),
                        format!("vessel `{id}` overfills in iteration {iteration} of {count}"),
                    )
                    .found(format!("{} uL after the last iteration", v.volume_ul))
                    .expected(format!("at most {} uL", v.max_fill_ul)),
                );
            }
        }
        self.findings.extend(overfills);
        let total = n.saturating_mul(u64::from(s.count));
        (d * count, total.saturating_add(1))
    }
}

/// Why a technician must approve a protocol under the lab's policy (empty: approve automatically).
fn approval_reasons(_p: &Protocol, lab: &Lab, s: &Summary) -> Vec<String> {
    let mut reasons = Vec::new();
    if lab.approval.policy == ApprovalPolicy::AlwaysAsk {
        reasons.push("lab policy: every proposal is approved by a technician".to_owned());
    }
    let env = &lab.approval.auto_approve;
    if let (Some(max), Some(t)) = (env.max_temperature_c, s.max_temperature_c)
        && t > max
    {
        reasons.push(format!(
            "temperature {t} C exceeds the auto-approve limit {max} C"
        ));
    }
    if let Some(max) = env.max_total_volume_ul
        && s.total_volume_ul > max
    {
        reasons.push(format!(
            "total volume {} uL exceeds the auto-approve limit {max} uL",
            s.total_volume_ul
        ));
    }
    if let Some(max) = env.max_duration_s
        && s.duration_s > max
    {
        reasons.push(format!(
            "estimated duration {:.0} s exceeds the auto-approve limit {max} s",
            s.duration_s
        ));
    }
    if let Some(max) = env.max_steps
        && s.expanded_steps > max
    {
        reasons.push(format!(
            "{} steps exceed the auto-approve limit {max}",
            s.expanded_steps
        ));
    }
    reasons
}
