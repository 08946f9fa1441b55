//! Topic names under `labctl/{lab_id}/`: building the ones labctl publishes and parsing the ones it
//! listens to. Pure functions; nothing here touches the network.

/// What a message on an inbound topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Submit,
    Control {
        run_id: String,
    },
    Approval {
        run_id: String,
    },
    EStop,
    /// A technician's override of a tripped interlock, or its withdrawal.
    Override {
        interlock: String,
    },
}

/// The topic tree of one lab.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

/// Longest id accepted inside a topic level (run ids, proposal ids, instrument ids).
pub const MAX_ID_LEN: usize = 128;
/// Longest MQTT 5 response topic accepted.
pub const MAX_REPLY_TOPIC: usize = 512;

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
    /// Retained: every interlock of the lab file and where it stands (clear, tripped, overridden).
    pub fn interlocks(&self) -> String {
        self.t("interlocks")
    }
    pub fn interlock_override(&self, interlock: &str) -> String {
        self.t(&format!("interlocks/{interlock}/override"))
    }
    /// Retained: the latch as labctl holds it, whoever set or cleared it (console, OPC UA, command port).
    pub fn estop_state(&self) -> String {
        self.t("estop/state")
    }

    /// Where labctl answers `user`'s commands: the MQTT 5 response topic of a command must lie under it.
    /// Only labctl writes there, and only that user may read it (the embedded broker enforces both; an
    /// external broker's ACL must, see `docs/mosquitto.acl`).
    pub fn reply_prefix(&self, user: &str) -> String {
        self.t(&format!("to/{user}/"))
    }

    /// Whether labctl may answer on `topic` for the sender `user` (`None`: the broker vouches for nobody,
    /// so any single user level is allowed and the broker's ACL decides who reads it). The topic must be
    /// under the user's reply prefix with at least one more level, bounded, without wildcards.
    pub fn is_reply_topic(&self, topic: &str, user: Option<&str>) -> bool {
        let Some(rest) = topic.strip_prefix(&self.prefix) else {
            return false;
        };
        let Some(rest) = rest.strip_prefix("to/") else {
            return false;
        };
        let Some((who, tail)) = rest.split_once('/') else {
            return false;
        };
        topic.len() <= MAX_REPLY_TOPIC
            && is_topic_level(who)
            && user.is_none_or(|u| u == who)
            && !tail.is_empty()
            && tail
                .split('/')
                .all(|level| !level.is_empty() && is_topic_level(level))
    }

    /// Whether `user` may subscribe to `filter`: anything but another user's reply prefix (a filter that
    /// could match a topic under `to/{someone else}/`, such as `#`, `labctl/{lab}/#` or
    /// `labctl/{lab}/to/+/...`, is refused).
    pub fn may_subscribe(&self, filter: &str, user: &str) -> bool {
        let fixed = ["labctl", self.lab_level(), "to"];
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, want) in fixed.iter().enumerate() {
            match levels.get(i) {
                // The filter ends above the reply tree: it matches nothing inside it.
                None => return true,
                Some(&"#") => return false,
                Some(&"+") => {}
                Some(level) if level == want => {}
                Some(_) => return true,
            }
        }
        match levels.get(3) {
            None => true,
            Some(level) => *level == user,
        }
    }

    fn lab_level(&self) -> &str {
        self.prefix
            .strip_prefix("labctl/")
            .and_then(|r| r.strip_suffix('/'))
            .unwrap_or_default()
    }

    /// Where `user` sends commands when the broker, not labctl, vouches for who wrote a message: the same
    /// inbound topics under `labctl/{lab}/from/{user}/`, which the broker's ACL lets only `user` write
    /// (`%u` in mosquitto's ACL file, the same idea in every major broker).
    pub fn from_prefix(&self, user: &str) -> String {
        self.t(&format!("from/{user}/"))
    }

    /// Where `user`'s client says it is here (`online`, after it connects) and, as its MQTT will, that it
    /// went away (`offline`): how labctl learns through an external broker, which tells it nothing of its
    /// clients' connections, that a planner is gone (the planner lease of supervised runs). Under the
    /// user's `from/{user}/` prefix, so nobody else can say it for them.
    pub fn presence(&self, user: &str) -> String {
        self.t(&format!("from/{user}/presence"))
    }

    /// The filter of every user's presence topic.
    pub fn presence_filter(&self) -> String {
        self.t("from/+/presence")
    }

    /// The user a presence topic names.
    pub fn parse_presence(&self, topic: &str) -> Option<String> {
        let user = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("from/")?
            .strip_suffix("/presence")?;
        is_topic_level(user).then(|| user.to_owned())
    }

    /// The filters the gateway subscribes to (again on every ConnAck): the inbound topics, and the same
    /// under every user's `from/{user}/` prefix.
    pub fn inbound_filters(&self) -> [String; 10] {
        [
            self.submit(),
            self.t("runs/+/control"),
            self.t("runs/+/approval"),
            self.estop(),
            self.t("interlocks/+/override"),
            self.t("from/+/protocols/submit"),
            self.t("from/+/runs/+/control"),
            self.t("from/+/runs/+/approval"),
            self.t("from/+/estop"),
            self.t("from/+/interlocks/+/override"),
        ]
    }

    /// Parses an inbound topic; `None` for anything else (including outbound topics and other labs).
    pub fn parse_inbound(&self, topic: &str) -> Option<Inbound> {
        self.parse_inbound_from(topic).map(|(inbound, _)| inbound)
    }

    /// Parses an inbound topic and, for one under `from/{user}/`, the user it names.
    pub fn parse_inbound_from(&self, topic: &str) -> Option<(Inbound, Option<String>)> {
        let rest = topic.strip_prefix(&self.prefix)?;
        if let Some(from) = rest.strip_prefix("from/") {
            let (user, rest) = from.split_once('/')?;
            if !is_topic_level(user) {
                return None;
            }
            return Self::parse_command(rest).map(|i| (i, Some(user.to_owned())));
        }
        Self::parse_command(rest).map(|i| (i, None))
    }

    /// An inbound command's path below the lab's prefix (and below `from/{user}/`).
    fn parse_command(rest: &str) -> Option<Inbound> {
        match rest {
            "protocols/submit" => return Some(Inbound::Submit),
            "estop" => return Some(Inbound::EStop),
            _ => {}
        }
        if let Some(interlock) = rest
            .strip_prefix("interlocks/")
            .and_then(|r| r.strip_suffix("/override"))
        {
            return is_topic_level(interlock).then(|| Inbound::Override {
                interlock: interlock.to_owned(),
            });
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

/// What a client says on its presence topic ([`Topics::presence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Online,
    Offline,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Offline => "offline",
        }
    }

    /// `online` or `offline`, as the payload says it (surrounding white space ignored).
    pub fn parse(payload: &[u8]) -> Option<Presence> {
        match std::str::from_utf8(payload).ok()?.trim() {
            "online" => Some(Presence::Online),
            "offline" => Some(Presence::Offline),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_topics_name_their_user() {
        let t = Topics::new("sim");
        assert_eq!(
            t.presence("planner-bo"),
            "labctl/sim/from/planner-bo/presence"
        );
        assert_eq!(
            t.parse_presence("labctl/sim/from/planner-bo/presence")
                .as_deref(),
            Some("planner-bo")
        );
        for other in [
            "labctl/sim/from/planner-bo/estop",
            "labctl/other/from/planner-bo/presence",
            "labctl/sim/from/a/b/presence",
            "labctl/sim/from//presence",
        ] {
            assert_eq!(t.parse_presence(other), None, "{other}");
        }
        assert_eq!(Presence::parse(b" offline\n"), Some(Presence::Offline));
        assert_eq!(Presence::parse(b"online"), Some(Presence::Online));
        assert_eq!(Presence::parse(b"gone"), None);
    }

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
            t.parse_inbound(&t.interlock_override("pump-alarm")),
            Some(Inbound::Override {
                interlock: "pump-alarm".into()
            })
        );
        assert_eq!(t.parse_inbound("labctl/sim/interlocks/a/b/override"), None);
        assert_eq!(t.parse_inbound("labctl/sim/interlocks/+/override"), None);
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
        assert_eq!(
            t.parse_inbound_from("labctl/sim/from/alice/runs/r1/approval"),
            Some((
                Inbound::Approval {
                    run_id: "r1".into()
                },
                Some("alice".into())
            ))
        );
        assert_eq!(
            t.parse_inbound_from("labctl/sim/from/bo/estop"),
            Some((Inbound::EStop, Some("bo".into())))
        );
        assert_eq!(
            t.parse_inbound_from("labctl/sim/estop"),
            Some((Inbound::EStop, None))
        );
        for topic in [
            "labctl/other/estop",
            "labctl/sim/runs/r1/results",
            "labctl/sim/runs//control",
            "labctl/sim/runs/a/b/control",
            "labctl/sim/status",
            "",
            "labctl/sim/",
            "labctl/sim/from/+/estop",
            "labctl/sim/from//estop",
            "labctl/sim/from/alice/from/bo/estop",
            "labctl/sim/from/alice/runs/r1/status",
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

    #[test]
    fn replies_go_only_under_the_senders_own_prefix() {
        let t = Topics::new("sim");
        assert_eq!(t.reply_prefix("bo"), "labctl/sim/to/bo/");
        assert!(t.is_reply_topic("labctl/sim/to/bo/console-1", Some("bo")));
        assert!(t.is_reply_topic("labctl/sim/to/bo/a/b", Some("bo")));
        assert!(t.is_reply_topic("labctl/sim/to/anyone/x", None));
        for bad in [
            "labctl/sim/runs/r1/status",
            "labctl/sim/to/alice/x",
            "labctl/sim/to/bo/",
            "labctl/sim/to/bo",
            "labctl/sim/to/bo//x",
            "labctl/other/to/bo/x",
            "elsewhere/answers",
            "$SYS/x",
        ] {
            assert!(!t.is_reply_topic(bad, Some("bo")), "{bad}");
        }
        assert!(!t.is_reply_topic(
            &format!("labctl/sim/to/bo/{}", "x/".repeat(300)),
            Some("bo")
        ));
    }

    #[test]
    fn nobody_subscribes_to_another_users_replies() {
        let t = Topics::new("sim");
        for ok in [
            "labctl/sim/to/bo/#",
            "labctl/sim/to/bo/console-1",
            "labctl/sim/runs/+/status",
            "labctl/sim/status",
            "labctl/sim/to",
            "labctl/other/#",
            "labctl/+/status",
            "elsewhere/#",
            "+/sim/status",
        ] {
            assert!(t.may_subscribe(ok, "bo"), "{ok}");
        }
        for refused in [
            "#",
            "labctl/#",
            "labctl/sim/#",
            "labctl/+/#",
            "+/+/to/#",
            "labctl/sim/to/#",
            "labctl/sim/to/+/x",
            "labctl/sim/to/alice/#",
        ] {
            assert!(!t.may_subscribe(refused, "bo"), "{refused}");
        }
    }
}
