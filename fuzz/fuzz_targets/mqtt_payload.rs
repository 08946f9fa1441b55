//! The MQTT gateway's inbound handling on arbitrary topics and payloads: the topic parser, then the
//! payload parser the topic routes to. Input: topic bytes, a NUL, payload bytes. Never a panic, and a
//! rejection always names what was wrong.
#![no_main]

use labctl_mqtt::payload::{
    self, Rejection, check_size, parse_approval, parse_control_request, parse_estop, parse_override,
};
use labctl_mqtt_link::{Inbound, Topics};
use libfuzzer_sys::fuzz_target;

fn named(r: Result<impl Sized, Rejection>) {
    if let Err(rejection) = r {
        assert!(!format!("{rejection:?}").is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let (topic, body) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(suffix) = std::str::from_utf8(topic) else {
        return;
    };
    let topics = Topics::new("sim");
    let topic = format!("labctl/sim/{suffix}");
    let Some(inbound) = topics.parse_inbound(&topic) else {
        return;
    };
    if check_size(body, &topic).is_err() {
        return;
    }
    match inbound {
        Inbound::Submit => {
            let _ = payload::proposal_id_of(body);
        }
        Inbound::Control { .. } => named(parse_control_request(body, &topic)),
        Inbound::Approval { .. } => named(parse_approval(body, &topic)),
        Inbound::EStop => named(parse_estop(body, &topic)),
        Inbound::Override { .. } => named(parse_override(body, &topic)),
    }
});
