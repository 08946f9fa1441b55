//! Topic names under `labctl/{lab_id}/`: building the ones labctl publishes and parsing the ones it
//! listens to. Pure functions; nothing here touches the network.

/// What a message on an inbound topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Submit,
    Control { run_id: String },
    Approval { run_id: String },
    EStop,
}

/// The topic tree of one lab.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

/// Longest id accepted inside a topic level (run ids, proposal ids, instrument ids).
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` can stand as one topic level: non-empty, bounded, no separators or wildcards, no control
/// characters.
pub fn is_topic_level(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | '$') || c.is_control())
}

impl Topics {
    pub fn new(lab_id: &str) -> Self {
        Topics {
            prefix: format!("labctl/{lab_id}/"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn t(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub fn status(&self) -> String {
        self.t("status")
    }
    pub fn capabilities(&self) -> String {
        self.t("capabilities")
    }
    pub fn instrument_state(&self, id: &str) -> String {
        self.t(&format!("instruments/{id}/state"))
    }
    pub fn instrument_telemetry(&self, id: &str) -> String {
        self.t(&format!("instruments/{id}/telemetry"))
    }
    pub fn submit(&self) -> String {
        self.t("protocols/submit")
    }
    pub fn reply(&self, proposal_id: &str) -> String {
        self.t(&format!("protocols/replies/{proposal_id}"))
    }
    /// Rejections that belong to no proposal and have no MQTT 5 response topic (e.g. malformed JSON).
    pub fn rejections(&self) -> String {
        self.t("rejections")
    }
    pub fn run_status(&self, run_id: &str) -> String {
        self.t(&format!("runs/{run_id}/status"))
    }
    pub fn run_events(&self, run_id: &str) -> String {
        self.t(&format!("runs/{run_id}/events"))
    }
    pub fn run_results(&self, run_id: &str) -> String {
        self.t(&format!("runs/{run_id}/results"))
    }
    pub fn run_control(&self, run_id: &str) -> String {
        self.t(&format!("runs/{run_id}/control"))
    }
    pub fn run_approval(&self, run_id: &str) -> String {
        self.t(&format!("runs/{run_id}/approval"))
    }
    pub fn estop(&self) -> String {
        self.t("estop")
    }
    /// Retained: the latch as labctl holds it, whoever set or cleared it (console, OPC UA, command port).
    pub fn estop_state(&self) -> String {
        self.t("estop/state")
    }

    /// The filters the gateway subscribes to (again on every ConnAck).
    pub fn inbound_filters(&self) -> [String; 4] {
        [
            self.submit(),
            self.t("runs/+/control"),
            self.t("runs/+/approval"),
            self.estop(),
        ]
    }

    /// Parses an inbound topic; `None` for anything else (including outbound topics and other labs).
    pub fn parse_inbound(&self, topic: &str) -> Option<Inbound> {
        let rest = topic.strip_prefix(&self.prefix)?;
        match rest {
            "protocols/submit" => return Some(Inbound::Submit),
            "estop" => return Some(Inbound::EStop),
            _ => {}
        }
        let run = rest.strip_prefix("runs/")?;
        let (run_id, what) = run.split_once('/')?;
        if !is_topic_level(run_id) {
            return None;
        }
        let run_id = run_id.to_owned();
        match what {
            "control" => Some(Inbound::Control { run_id }),
            "approval" => Some(Inbound::Approval { run_id }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses_the_contract_topics() {
        let t = Topics::new("sim");
        assert_eq!(t.status(), "labctl/sim/status");
        assert_eq!(t.reply("p-1"), "labctl/sim/protocols/replies/p-1");
        assert_eq!(t.run_results("r1"), "labctl/sim/runs/r1/results");
        assert_eq!(
            t.parse_inbound("labctl/sim/protocols/submit"),
            Some(Inbound::Submit)
        );
        assert_eq!(t.parse_inbound("labctl/sim/estop"), Some(Inbound::EStop));
        assert_eq!(
            t.parse_inbound("labctl/sim/runs/r1/control"),
            Some(Inbound::Control {
                run_id: "r1".into()
            })
        );
        assert_eq!(
            t.parse_inbound("labctl/sim/runs/r1/approval"),
            Some(Inbound::Approval {
                run_id: "r1".into()
            })
        );
        for topic in [
            "labctl/other/estop",
            "labctl/sim/runs/r1/results",
            "labctl/sim/runs//control",
            "labctl/sim/runs/a/b/control",
            "labctl/sim/status",
            "",
            "labctl/sim/",
        ] {
            assert_eq!(t.parse_inbound(topic), None, "{topic}");
        }
    }

    #[test]
    fn topic_levels_refuse_wildcards_and_separators() {
        assert!(is_topic_level("bo-2026-11-22-0001"));
        for bad in ["", "a/b", "a+", "#", "$SYS", "a\u{0}b"] {
            assert!(!is_topic_level(bad), "{bad:?}");
        }
        assert!(!is_topic_level(&"x".repeat(MAX_ID_LEN + 1)));
    }
}
