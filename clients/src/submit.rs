//! `labctl submit PROTOCOL.json [--wait]`: submits a protocol over MQTT exactly as a planner would (MQTT 5,
//! response topic and correlation data) and prints the reply; with `--wait`, shows a progress bar over the
//! steps and prints each result as it arrives, until the run ends.
//!
//! Exit status: 0 accepted (without --wait) or completed; 1 rejected; 3 failed; 4 aborted or interrupted;
//! 2 usage, I/O or connection error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use labctl_contract::messages::{RunEvent, RunResult, RunStatus};
use labctl_contract::{EventKind, RunState};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    LastWill, Packet, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;

use labctl_mqtt_link::{
    MAX_PACKET, Presence, Topics, credentials_from_env, parse_broker_url, tls_config,
};

#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// The protocol (JSON).
    pub protocol: PathBuf,
    /// Follow the run: progress over its steps and its results, until it ends.
    #[arg(long)]
    pub wait: bool,
    /// The broker (`mqtt://host:port`, or `mqtts://host:port` with the CA in LABCTL_MQTT_CA or the system's).
    /// Credentials from LABCTL_MQTT_USER with LABCTL_MQTT_PASSWORD or LABCTL_MQTT_PASSWORD_FILE.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt: String,
    /// The lab's id (its topics are under `labctl/{lab_id}/`).
    #[arg(long, default_value = "sim")]
    pub lab_id: String,
    /// Give up waiting for the reply after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout_s: f64,
}

pub fn run(args: SubmitArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labctl submit: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(submit(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("labctl submit: {e}");
            ExitCode::from(2)
        }
    }
}

/// Counts the steps of a protocol, nested ones included (the progress bar's length).
fn count_steps(steps: &Value) -> u64 {
    steps
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    1 + ["steps", "branches"]
                        .iter()
                        .map(|k| match &s[*k] {
                            Value::Array(inner) if inner.iter().all(Value::is_array) => {
                                inner.iter().map(count_steps).sum()
                            }
                            v => count_steps(v),
                        })
                        .sum::<u64>()
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn submit(args: SubmitArgs) -> Result<u8, String> {
    let bytes = labctl_protocols::validate::read_protocol_file(&args.protocol)
        .map_err(|e| format!("cannot read {}: {e}", args.protocol.display()))?;
    let total_steps = serde_json::from_slice::<Value>(&bytes)
        .map(|v| count_steps(&v["steps"]))
        .unwrap_or(0);
    let broker = parse_broker_url(&args.mqtt).map_err(|e| e.to_string())?;
    let (host, port) = (broker.host.clone(), broker.port);
    if !labctl_protocols::lab::is_identifier(&args.lab_id) {
        return Err(format!(
            "--lab-id {:?}: letters, digits, '-' and '_' only",
            args.lab_id
        ));
    }
    let topics = Topics::new(&args.lab_id);
    let client_id = format!(
        "labctl-submit-{}-{}",
        std::process::id(),
        labctl_contract::now_ms()
    );
    let mut opts = MqttOptions::new(client_id.clone(), host, port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(Some(MAX_PACKET as u32));
    let credentials = credentials_from_env().map_err(|e| e.to_string())?;
    let user = credentials
        .as_ref()
        .map_or_else(|| "anonymous".to_owned(), |(user, _)| user.clone());
    let named = credentials.is_some();
    if let Some((u, p)) = credentials {
        opts.set_credentials(u, p);
    }
    // Through an external broker this will is how labctl learns that this planner went away (the lease of
    // a supervised run); the embedded broker reports the connection itself.
    if named {
        opts.set_last_will(LastWill::new(
            topics.presence(&user),
            Presence::Offline.as_str(),
            QoS::AtLeastOnce,
            false,
            None,
        ));
    }
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    if broker.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            tls_config().map_err(|e| e.to_string())?,
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Publish, String>>();
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    // One entry per SUBACK: its reason codes, so the submit waits until its replies can reach it.
    let (suback_tx, mut suback_rx) = mpsc::unbounded_channel::<Vec<SubscribeReasonCode>>();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = conn_tx.send(Ok(()));
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let _ = suback_tx.send(ack.return_codes);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = conn_tx.send(Err(e.to_string()));
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    let timeout = Duration::from_secs_f64(args.timeout_s.clamp(0.1, 3600.0));
    match tokio::time::timeout(timeout, conn_rx.recv()).await {
        Ok(Some(Ok(()))) => {}
        Ok(Some(Err(e))) => return Err(format!("cannot connect to {}: {e}", args.mqtt)),
        _ => return Err(format!("no answer from {} within {timeout:?}", args.mqtt)),
    }
    if named {
        client
            .publish(
                topics.presence(&user),
                QoS::AtLeastOnce,
                false,
                Presence::Online.as_str(),
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    let response_topic = format!("{}{client_id}", topics.reply_prefix(&user));
    let sub = |t: String| {
        let c = client.clone();
        async move { c.subscribe(t, QoS::AtLeastOnce).await }
    };
    sub(response_topic.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut subscriptions = 1;
    if args.wait {
        // Before the submit, so nothing of the run can slip past.
        for t in [
            format!("{}runs/+/status", topics.prefix()),
            format!("{}runs/+/events", topics.prefix()),
            format!("{}runs/+/results", topics.prefix()),
        ] {
            sub(t).await.map_err(|e| e.to_string())?;
            subscriptions += 1;
        }
    }
    // A subscription is in place once its SUBACK is back: only then can the reply not slip past.
    let deadline = tokio::time::Instant::now() + timeout;
    for _ in 0..subscriptions {
        match tokio::time::timeout_at(deadline, suback_rx.recv()).await {
            Ok(Some(codes)) => {
                if let Some(refused) = codes
                    .iter()
                    .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                {
                    return Err(format!(
                        "the broker refused a subscription ({refused:?}); may user {user} read {}?",
                        topics.reply_prefix(&user)
                    ));
                }
            }
            Ok(None) => return Err("connection lost".into()),
            Err(_) => return Err(format!("no SUBACK from {} within {timeout:?}", args.mqtt)),
        }
    }
    // In the user's own name where a broker's ACL vouches for it (`from/{user}/`; the embedded broker
    // checks it too), so approvals, the lease and quotas are the user's through any broker.
    let submit_topic = if named {
        format!("{}protocols/submit", topics.from_prefix(&user))
    } else {
        topics.submit()
    };
    let correlation = client_id.clone().into_bytes();
    let props = PublishProperties {
        response_topic: Some(response_topic.clone()),
        correlation_data: Some(correlation.clone().into()),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    client
        .publish_with_properties(submit_topic, QoS::AtLeastOnce, false, bytes, props)
        .await
        .map_err(|e| e.to_string())?;

    let mut early: Vec<Publish> = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let reply: Value = loop {
        let p = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(p))) => p,
            Ok(Some(Err(e))) => return Err(format!("connection lost: {e}")),
            Ok(None) => return Err("connection lost".into()),
            Err(_) => {
                return Err(format!(
                    "no reply within {timeout:?}; is labctl running on lab {}?",
                    args.lab_id
                ));
            }
        };
        if p.topic.as_ref() == response_topic.as_bytes() {
            break serde_json::from_slice(&p.payload)
                .map_err(|e| format!("unreadable reply: {e}"))?;
        }
        early.push(p);
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&reply).unwrap_or_default()
    );
    if reply["accepted"] != Value::Bool(true) {
        let _ = client.disconnect().await;
        return Ok(1);
    }
    let run_id = reply["run_id"].as_str().unwrap_or_default().to_owned();
    if !args.wait {
        let _ = client.disconnect().await;
        return Ok(0);
    }
    let code = follow(&client, &topics, &run_id, total_steps, early, &mut rx).await;
    let _ = client.disconnect().await;
    code
}

async fn follow(
    client: &AsyncClient,
    topics: &Topics,
    run_id: &str,
    total_steps: u64,
    early: Vec<Publish>,
    rx: &mut mpsc::UnboundedReceiver<Result<Publish, String>>,
) -> Result<u8, String> {
    let status_t = topics.run_status(run_id);
    let events_t = topics.run_events(run_id);
    let results_t = topics.run_results(run_id);
    let bar = indicatif::ProgressBar::new(total_steps.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    // A hidden bar (standard error is not a terminal) prints nothing: results go to standard output then.
    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut last_seq = 0u64;
    let mut replay_asked: Option<u64> = None;
    // The run's end, held back while a replay is outstanding (results may still be on their way).
    let mut ended: Option<(u8, String, tokio::time::Instant)> = None;
    let mut pending = early.into_iter();
    loop {
        let p = match pending.next() {
            Some(p) => p,
            None => match next_or_deadline(rx, ended.as_ref().map(|e| e.2)).await {
                None => {
                    let (code, line) = ended.take().map(|(c, l, _)| (c, l)).unwrap_or_default();
                    bar.finish_and_clear();
                    println!("{line}");
                    return Ok(code);
                }
                Some(Some(Ok(p))) => p,
                Some(Some(Err(e))) => {
                    bar.abandon();
                    return Err(format!("connection lost: {e}"));
                }
                Some(None) => {
                    bar.abandon();
                    return Err("connection lost".into());
                }
            },
        };
        let topic = String::from_utf8_lossy(&p.topic);
        if topic == results_t {
            let Ok(result) = serde_json::from_slice::<RunResult>(&p.payload) else {
                continue;
            };
            let seq = result.seq;
            if seq <= last_seq {
                continue; // seen already (a replay overlaps)
            }
            if seq > last_seq + 1 {
                // A gap (a broker dropped messages): ask labctl to publish the rest again from the journal.
                if replay_asked != Some(last_seq) {
                    say(format!(
                        "result seq {seq} after {last_seq}: asking for a replay from {last_seq}"
                    ));
                    let body = format!(r#"{{"action":"replay","after":{last_seq}}}"#);
                    let _ = client
                        .publish(topics.run_control(run_id), QoS::AtLeastOnce, false, body)
                        .await;
                    replay_asked = Some(last_seq);
                }
                continue;
            }
            last_seq = seq;
            say(format!(
                "result {seq} {} ({}): {}",
                result.name,
                result.instrument,
                summarise(&result.value)
            ));
        } else if topic == events_t {
            let Ok(event) = serde_json::from_slice::<RunEvent>(&p.payload) else {
                continue;
            };
            match event.known_kind() {
                Some(EventKind::StepFinished | EventKind::StepFailed | EventKind::StepSkipped) => {
                    bar.inc(1)
                }
                Some(EventKind::StepStarted) => bar.set_message(event.step.unwrap_or_default()),
                _ => {}
            }
        } else if topic == status_t {
            let Ok(status) = serde_json::from_slice::<RunStatus>(&p.payload) else {
                continue;
            };
            let state = status.state;
            let code = match state {
                RunState::Completed => Some(0),
                RunState::Rejected => Some(1),
                RunState::Failed => Some(3),
                RunState::Aborted | RunState::Interrupted => Some(4),
                _ => None,
            };
            if let Some(code) = code {
                if code == 0 {
                    bar.set_position(bar.length().unwrap_or(0));
                }
                let reason = status
                    .reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                let line = format!("run {run_id} {state}{reason}");
                if replay_asked.is_some() {
                    ended = Some((
                        code,
                        line,
                        tokio::time::Instant::now() + Duration::from_secs(2),
                    ));
                    continue;
                }
                bar.finish_and_clear();
                println!("{line}");
                return Ok(code);
            }
            bar.set_message(format!("{state} {}", status.step.unwrap_or_default()));
        }
    }
}

/// The next message, or `None` once `deadline` has passed.
async fn next_or_deadline(
    rx: &mut mpsc::UnboundedReceiver<Result<Publish, String>>,
    deadline: Option<tokio::time::Instant>,
) -> Option<Option<Result<Publish, String>>> {
    match deadline {
        None => Some(rx.recv().await),
        Some(d) => tokio::time::timeout_at(d, rx.recv()).await.ok(),
    }
}

/// A short rendering of a result value (spectra are long).
fn summarise(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= 120 {
        return text;
    }
    let cut = (0..=117)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}...", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn steps_are_counted_nested_ones_included() {
        let steps = json!([
            {"type": "wait"},
            {"type": "repeat", "steps": [{"type": "wait"}, {"type": "wait"}]},
            {"type": "parallel", "branches": [[{"type": "wait"}], [{"type": "wait"}]]}
        ]);
        assert_eq!(count_steps(&steps), 7);
        assert_eq!(count_steps(&json!(null)), 0);
    }

    #[test]
    fn long_values_are_shortened_on_a_char_boundary() {
        let v = json!("é".repeat(200));
        let s = summarise(&v);
        assert!(s.ends_with("...") && s.len() <= 121);
    }
}
