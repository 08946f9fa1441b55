//! What a person deciding on a proposal sees besides the validator's findings and the dry run's report: the
//! protocol as steps in words, the path the gantry head will take over the deck, and what will be put into
//! each vessel. Read from the protocol as the journal holds it (the JSON the planner sent, validated).

use serde::Serialize;
use serde_json::Value;

/// Points of the gantry path drawn at most (a long `repeat` is drawn for its first iterations).
pub const MAX_PATH_POINTS: usize = 500;
/// Step lines listed at most.
pub const MAX_STEP_LINES: usize = 400;

/// One line of the protocol in words.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepLine {
    /// Nesting depth (inside `repeat` and `parallel` blocks).
    pub depth: usize,
    pub id: Option<String>,
    pub kind: String,
    pub text: String,
}

/// A named deck position in millimetres.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub name: String,
    pub x_mm: f64,
    pub y_mm: f64,
}

/// What goes into one vessel, by the instrument that adds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VesselVolumes {
    pub vessel: String,
    pub capacity_ul: Option<f64>,
    pub initial_ul: f64,
    /// (instrument, microlitres) in order of first use.
    pub added_ul: Vec<(String, f64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    pub steps: Vec<StepLine>,
    /// Every deck position, for the picture's background.
    pub deck: Vec<Point>,
    /// Where the head goes, in order (`home` first when the protocol homes).
    pub gantry_path: Vec<Point>,
    pub volumes: Vec<VesselVolumes>,
}

struct Walk<'a> {
    lab: &'a labctl_protocols::Lab,
    out: Evidence,
    /// Where each vessel stands now (transfers move them).
    locations: Vec<(String, String)>,
}

/// The evidence of `protocol` (its JSON) in `lab`.
pub fn of(protocol: &Value, lab: &labctl_protocols::Lab) -> Evidence {
    let deck: Vec<Point> = lab
        .deck
        .positions()
        .into_iter()
        .map(|p| Point {
            name: p.name,
            x_mm: p.x_mm,
            y_mm: p.y_mm,
        })
        .collect();
    let mut walk = Walk {
        lab,
        out: Evidence {
            steps: Vec::new(),
            deck,
            gantry_path: Vec::new(),
            volumes: Vec::new(),
        },
        locations: Vec::new(),
    };
    for l in protocol["labware"].as_array().into_iter().flatten() {
        let (Some(id), Some(location)) = (l["id"].as_str(), l["location"].as_str()) else {
            continue;
        };
        walk.locations.push((id.to_owned(), location.to_owned()));
        walk.out.volumes.push(VesselVolumes {
            vessel: id.to_owned(),
            capacity_ul: l["capacity_ul"].as_f64(),
            initial_ul: l["initial_volume_ul"].as_f64().unwrap_or(0.0),
            added_ul: Vec::new(),
        });
    }
    if let Some(steps) = protocol["steps"].as_array() {
        walk.steps(steps, 0, 1.0, true);
    }
    walk.out
}

fn params_text(params: &Value) -> String {
    params
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| match v.as_str() {
                    Some(s) => format!("{k} {s}"),
                    None => format!("{k} {v}"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

impl Walk<'_> {
    fn line(&mut self, depth: usize, step: &Value, kind: &str, text: String) {
        if self.out.steps.len() < MAX_STEP_LINES {
            self.out.steps.push(StepLine {
                depth,
                id: step["id"].as_str().map(str::to_owned),
                kind: kind.to_owned(),
                text,
            });
        }
    }

    fn head_to(&mut self, name: &str) {
        if self.out.gantry_path.len() >= MAX_PATH_POINTS {
            return;
        }
        if let Some(p) = self.lab.deck.position(name) {
            self.out.gantry_path.push(Point {
                name: p.name,
                x_mm: p.x_mm,
                y_mm: p.y_mm,
            });
        }
    }

    fn location_of(&self, vessel: &str) -> Option<String> {
        self.locations
            .iter()
            .find(|(v, _)| v == vessel)
            .map(|(_, l)| l.clone())
    }

    /// `times`: how often these steps run (nested repeats multiply); `draw`: whether this pass adds to
    /// the listing and the path (a repeat's body is listed once).
    fn steps(&mut self, steps: &[Value], depth: usize, times: f64, draw: bool) {
        for step in steps {
            let kind = step["type"].as_str().unwrap_or("?");
            match kind {
                "action" | "measure" => {
                    let instrument = step["instrument"].as_str().unwrap_or("?");
                    let action = step["action"].as_str().unwrap_or("?");
                    let params = &step["params"];
                    if draw {
                        let mut text = format!("{instrument}: {action}");
                        let p = params_text(params);
                        if !p.is_empty() {
                            text.push_str(&format!(" ({p})"));
                        }
                        if let Some(r) = step["result"].as_str() {
                            text.push_str(&format!(" → result {r}"));
                        }
                        self.line(depth, step, kind, text);
                    }
                    self.effect(action, instrument, params, times, draw);
                }
                "wait" => {
                    if draw {
                        let s = step["duration_s"].as_f64().unwrap_or(0.0);
                        self.line(depth, step, kind, format!("wait {s} s"));
                    }
                }
                "wait_until" => {
                    if draw {
                        let c = &step["condition"];
                        self.line(
                            depth,
                            step,
                            kind,
                            format!(
                                "wait until {} {} {} {} (at most {} s)",
                                c["instrument"].as_str().unwrap_or("?"),
                                c["quantity"].as_str().unwrap_or("?"),
                                c["op"].as_str().unwrap_or("?"),
                                c["value"],
                                step["timeout_s"]
                            ),
                        );
                    }
                }
                "repeat" => {
                    let count = step["count"].as_u64().unwrap_or(1);
                    if draw {
                        self.line(depth, step, kind, format!("repeat {count} times:"));
                    }
                    let body = step["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                    // Listed and drawn once; volumes count every iteration.
                    self.steps(body, depth + 1, times * count as f64, draw);
                }
                "parallel" => {
                    if draw {
                        self.line(depth, step, kind, "at the same time:".into());
                    }
                    for (i, branch) in step["branches"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .enumerate()
                    {
                        if draw {
                            self.line(depth + 1, step, "branch", format!("branch {}", i + 1));
                        }
                        let body = branch.as_array().map(Vec::as_slice).unwrap_or(&[]);
                        self.steps(body, depth + 2, times, draw);
                    }
                }
                other => {
                    if draw {
                        self.line(depth, step, other, format!("{other} step"));
                    }
                }
            }
        }
    }

    fn effect(&mut self, action: &str, instrument: &str, params: &Value, times: f64, draw: bool) {
        match action {
            "home" if draw => self.head_to_home(),
            "move_to" if draw => {
                if let Some(p) = params["position"].as_str() {
                    self.head_to(p);
                }
            }
            "transfer" => {
                let (Some(vessel), Some(to)) = (params["vessel"].as_str(), params["to"].as_str())
                else {
                    return;
                };
                if draw {
                    if let Some(from) = self.location_of(vessel) {
                        self.head_to(&from);
                    }
                    self.head_to(to);
                }
                if let Some(entry) = self.locations.iter_mut().find(|(v, _)| v == vessel) {
                    entry.1 = to.to_owned();
                }
            }
            "dispense" => {
                let (Some(vessel), Some(ul)) =
                    (params["vessel"].as_str(), params["volume_ul"].as_f64())
                else {
                    return;
                };
                let entry = match self.out.volumes.iter().position(|v| v.vessel == vessel) {
                    Some(i) => &mut self.out.volumes[i],
                    None => {
                        self.out.volumes.push(VesselVolumes {
                            vessel: vessel.to_owned(),
                            capacity_ul: None,
                            initial_ul: 0.0,
                            added_ul: Vec::new(),
                        });
                        self.out.volumes.last_mut().expect("just pushed")
                    }
                };
                match entry.added_ul.iter_mut().find(|(i, _)| i == instrument) {
                    Some((_, total)) => *total += ul * times,
                    None => entry.added_ul.push((instrument.to_owned(), ul * times)),
                }
            }
            _ => {}
        }
    }

    fn head_to_home(&mut self) {
        if self.out.gantry_path.len() < MAX_PATH_POINTS {
            self.out.gantry_path.push(Point {
                name: "home".into(),
                x_mm: 0.0,
                y_mm: 0.0,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dye_mix_reads_as_steps_a_path_and_volumes() {
        let protocol: Value =
            serde_json::from_str(include_str!("../../../protocols/examples/dye-mix.json")).unwrap();
        let e = of(&protocol, &labctl_protocols::Lab::sim());
        assert_eq!(e.steps.len(), 12);
        assert_eq!(e.steps[0].text, "gantry: home");
        assert!(
            e.steps[2].text.contains("pump-red: dispense"),
            "{:?}",
            e.steps[2]
        );
        let names: Vec<&str> = e.gantry_path.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["home", "A1", "A1", "H1", "H1", "W1"]);
        assert_eq!(e.volumes.len(), 1);
        assert_eq!(
            e.volumes[0].added_ul,
            vec![
                ("pump-red".to_owned(), 300.0),
                ("pump-yellow".to_owned(), 150.0),
                ("pump-blue".to_owned(), 450.0)
            ]
        );
        assert!(e.deck.iter().any(|p| p.name == "W1"));
    }

    #[test]
    fn a_repeat_counts_its_volumes_every_time_and_lists_its_body_once() {
        let protocol = serde_json::json!({
            "labware": [{"id": "v", "location": "A1", "capacity_ul": 5000}],
            "steps": [{"type": "repeat", "count": 3, "steps": [
                {"type": "action", "instrument": "pump-red", "action": "dispense",
                 "params": {"vessel": "v", "volume_ul": 100}}]}]
        });
        let e = of(&protocol, &labctl_protocols::Lab::sim());
        assert_eq!(e.steps.len(), 2);
        assert_eq!(e.steps[1].depth, 1);
        assert_eq!(e.volumes[0].added_ul, vec![("pump-red".to_owned(), 300.0)]);
    }
}
