//! The closed-loop reference planner's core, shared by `examples/planner/main.rs` and `tests/planner.rs`:
//! a (1+1)-ES with the 1/5th success rule on the three dye volumes, the dye-mix protocol it submits,
//! and the MQTT loop (submit, reply, spectrum result, tell).

use std::time::Duration;

use labctl_simulators::model::{LabConfig, LabModel};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Lower volume bound of each dye (uL): the pumps' envelope minimum.
pub const MIN_UL: f64 = 1.0;
/// Default upper volume bound of each dye (uL). Up to 1500 stays inside the auto-approve envelope, but the
/// sim lab's pumps have 10 mL syringes and no refill action: at 1500 a pump stalls after about a dozen
/// experiments. A dye-only spectrum depends on the ratios alone, so 150 finds the same mix and lasts.
pub const MAX_UL: f64 = 150.0;
/// Spectral grid the planner asks for.
pub const GRID: (f64, f64, f64) = (380.0, 780.0, 5.0);

/// A tiny seeded generator (xorshift64*) with Box-Muller normals, so the example needs no extra crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// (1+1)-ES with the 1/5th success rule: ask a candidate, tell its error.
pub struct OnePlusOne {
    pub parent: [f64; 3],
    pub parent_f: f64,
    pub sigma: f64,
    pub max_ul: f64,
    pending: Option<[f64; 3]>,
    rng: Rng,
}

impl OnePlusOne {
    /// Starts at the middle of `MIN_UL..max_ul` with a log step of 0.5 (volumes change by about 1.6x).
    pub fn new(max_ul: f64, seed: u64) -> Self {
        OnePlusOne {
            parent: [max_ul / 2.0; 3],
            parent_f: f64::INFINITY,
            sigma: 0.3,
            max_ul,
            pending: None,
            rng: Rng::new(seed),
        }
    }

    /// The next volumes to try (the start point first). Mutations are log-normal (a step changes each
    /// volume by a factor), since a dye-only spectrum depends on the volume ratios.
    pub fn ask(&mut self) -> [f64; 3] {
        let x = if self.parent_f.is_infinite() {
            self.parent
        } else {
            let mut x = self.parent;
            for v in &mut x {
                *v *= (self.sigma * self.rng.normal()).exp();
            }
            x.map(|v| v.clamp(MIN_UL, self.max_ul))
        };
        let x = x.map(|v| v.round());
        self.pending = Some(x);
        x
    }

    /// The RMS error of the last ask (1/5th success rule on the log step size).
    pub fn tell(&mut self, f: f64) {
        let Some(x) = self.pending.take() else { return };
        if self.parent_f.is_infinite() {
            self.parent_f = f;
            return;
        }
        if f <= self.parent_f {
            self.parent = x;
            self.parent_f = f;
            self.sigma *= 1.5;
        } else {
            self.sigma *= 1.5f64.powf(-0.25);
        }
        self.sigma = self.sigma.clamp(0.002, 1.5);
    }
}

/// Rack positions A1..D6, cycled.
pub fn rack_position(n: usize) -> String {
    let row = ["A", "B", "C", "D"][(n / 6) % 4];
    format!("{row}{}", n % 6 + 1)
}

/// A dye-mix protocol: a fresh vial at `position`, the three volumes, stir at H1, the spectrum, then the
/// vial back to its rack position (so H1 and W1 stay free for the next run).
pub fn dye_mix_protocol(proposal_id: &str, position: &str, ul: [f64; 3]) -> Value {
    let dispense = |id: &str, pump: &str, v: f64| {
        json!({ "type": "action", "id": id, "instrument": pump, "action": "dispense",
                "params": { "vessel": "mix1", "volume_ul": v, "rate_ul_per_min": 1000 } })
    };
    json!({
        "version": 1,
        "metadata": {
            "name": "Dye mix: match target spectrum",
            "proposal_id": proposal_id,
            "planner": { "id": "planner-bo", "model": "one-plus-one-es", "model_version": "0.1.0" },
            "tags": ["dye-mixing", "closed-loop"]
        },
        "labware": [ { "id": "mix1", "kind": "vial", "location": position, "capacity_ul": 20000 } ],
        "steps": [
            { "type": "action", "id": "home", "instrument": "gantry", "action": "home", "params": {}, "timeout_s": 60 },
            { "type": "action", "id": "to-vial", "instrument": "gantry", "action": "move_to", "params": { "position": position, "feed_mm_per_min": 3000 } },
            dispense("red", "pump-red", ul[0]),
            dispense("yellow", "pump-yellow", ul[1]),
            dispense("blue", "pump-blue", ul[2]),
            { "type": "action", "id": "to-stirrer", "instrument": "gantry", "action": "transfer", "params": { "vessel": "mix1", "to": "H1" } },
            { "type": "action", "id": "stir", "instrument": "hotplate", "action": "set_stir_speed", "params": { "speed_rpm": 1000 } },
            { "type": "wait", "id": "mix", "duration_s": 60 },
            { "type": "action", "id": "stir-off", "instrument": "hotplate", "action": "stir_off", "params": {} },
            { "type": "measure", "id": "spectrum", "instrument": "spectro", "action": "spectrum", "params": { "start_nm": GRID.0, "stop_nm": GRID.1, "step_nm": GRID.2 }, "result": "spectrum", "timeout_s": 30, "on_error": "pause" },
            { "type": "action", "id": "to-rack", "instrument": "gantry", "action": "transfer", "params": { "vessel": "mix1", "to": position } }
        ]
    })
}

/// The target absorbance spectrum of hidden volumes (no water), on [`GRID`].
pub fn target_absorbance(hidden_ul: [f64; 3]) -> Vec<f64> {
    let model = LabModel::new(LabConfig::sim_default(), 1).expect("sim model");
    model
        .target_spectrum(hidden_ul, 0.0, GRID.0, GRID.1, GRID.2)
        .expect("target spectrum")
        .absorbance
}

pub fn rmse(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return f64::INFINITY;
    }
    let s: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

pub struct PlannerConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub lab_id: String,
    pub target: Vec<f64>,
    pub budget: usize,
    /// Upper volume bound of each dye (uL).
    pub max_ul: f64,
    pub threshold: f64,
    pub seed: u64,
    /// Longest wait for one experiment's spectrum.
    pub per_experiment: Duration,
}

pub struct Outcome {
    pub experiments: usize,
    pub best_ul: [f64; 3],
    pub best_rmse: f64,
    pub converged: bool,
}

async fn next_matching(
    rx: &mut mpsc::UnboundedReceiver<rumqttc::Publish>,
    deadline: tokio::time::Instant,
    mut pick: impl FnMut(&rumqttc::Publish) -> Option<Value>,
) -> Result<Value, String> {
    loop {
        let p = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| "timed out".to_string())?
            .ok_or("MQTT connection closed")?;
        if let Some(v) = pick(&p) {
            return Ok(v);
        }
    }
}

/// Runs the closed loop until the error is under the threshold or the budget is spent.
pub async fn run(cfg: PlannerConfig) -> Result<Outcome, String> {
    let mut opts = MqttOptions::new(
        format!("planner-es-{}", std::process::id()),
        cfg.host.clone(),
        cfg.port,
    );
    opts.set_credentials(cfg.user.clone(), cfg.password.clone());
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    let _ = conn_tx.send(Ok(ack.code));
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = conn_tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    let connected = tokio::time::timeout(Duration::from_secs(10), conn_rx.recv())
        .await
        .map_err(|_| "no CONNACK within 10 s".to_string())?
        .ok_or("MQTT event loop ended")?;
    connected.map_err(|e| format!("cannot connect: {e}"))?;
    let lab = &cfg.lab_id;
    for topic in [
        format!("labctl/{lab}/protocols/replies/#"),
        format!("labctl/{lab}/runs/+/results"),
        format!("labctl/{lab}/runs/+/status"),
    ] {
        client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .map_err(|e| e.to_string())?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let session = format!(
        "es-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let mut es = OnePlusOne::new(cfg.max_ul, cfg.seed);
    let mut best = ([0.0; 3], f64::INFINITY);
    let mut n = 0;
    while n < cfg.budget && best.1 >= cfg.threshold {
        let ul = es.ask();
        let proposal_id = format!("{session}-{n:03}");
        let position = rack_position(n);
        let protocol = dye_mix_protocol(&proposal_id, &position, ul);
        client
            .publish(
                format!("labctl/{lab}/protocols/submit"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&protocol).map_err(|e| e.to_string())?,
            )
            .await
            .map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + cfg.per_experiment;
        let reply_topic = format!("labctl/{lab}/protocols/replies/{proposal_id}");
        let reply = next_matching(&mut rx, deadline, |p| {
            (p.topic == reply_topic)
                .then(|| serde_json::from_slice(&p.payload).ok())
                .flatten()
        })
        .await
        .map_err(|e| format!("{proposal_id}: reply: {e}"))?;
        if reply["accepted"] != json!(true) {
            return Err(format!("{proposal_id} rejected: {reply}"));
        }
        let run_id = reply["run_id"].as_str().unwrap_or_default().to_owned();
        let results = format!("labctl/{lab}/runs/{run_id}/results");
        let status = format!("labctl/{lab}/runs/{run_id}/status");
        let measured = next_matching(&mut rx, deadline, |p| {
            let v: Value = serde_json::from_slice(&p.payload).ok()?;
            if p.topic == results && v["name"] == "spectrum" {
                return Some(v);
            }
            if p.topic == status
                && matches!(
                    v["state"].as_str(),
                    Some("failed" | "aborted" | "interrupted" | "paused" | "rejected")
                )
            {
                return Some(json!({ "ended": v }));
            }
            None
        })
        .await
        .map_err(|e| format!("{run_id}: spectrum: {e}"))?;
        if let Some(ended) = measured.get("ended") {
            return Err(format!("{run_id} ended before its spectrum: {ended}"));
        }
        let absorbance: Vec<f64> = measured["value"]["absorbance"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let f = rmse(&absorbance, &cfg.target);
        es.tell(f);
        n += 1;
        if f < best.1 {
            best = (ul, f);
        }
        println!(
            "{n:3} {run_id} {position:<3} red {:6.0} yellow {:6.0} blue {:6.0} uL  rmse {f:.4} AU  best {:.4} AU",
            ul[0], ul[1], ul[2], best.1
        );
    }
    let _ = client.disconnect().await;
    poller.abort();
    Ok(Outcome {
        experiments: n,
        best_ul: best.0,
        best_rmse: best.1,
        converged: best.1 < cfg.threshold,
    })
}
