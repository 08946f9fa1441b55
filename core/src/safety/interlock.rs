//! Interlocks from the lab file, evaluated every tick against the world model. Pure: given what the
//! controller knows about an instrument, say whether an interlock trips and why.

use std::time::Duration;

use labctl_drivers::DeviceState;
use labctl_protocols::lab::Interlock;

/// What the tick knows about one instrument when it evaluates interlocks.
#[derive(Debug, Clone, Copy)]
pub struct InstrumentFacts<'a> {
    pub values: &'a [(&'static str, f64)],
    pub state: Option<&'a DeviceState>,
    /// Time since the instrument last answered; `None` when it never has.
    pub silent_for: Option<Duration>,
    pub heartbeat: Duration,
    /// A command is in flight: the driver is talking to it, so silence is not yet suspicious.
    pub busy: bool,
    /// Connected now. A lost instrument's last values are stale: its interlocks count as tripped.
    pub online: bool,
}

/// Why an interlock tripped, for the journal and the operator.
pub fn evaluate(il: &Interlock, facts: &InstrumentFacts) -> Option<String> {
    // Fail safe: what an instrument that stopped answering last said proves nothing now. One that never
    // answered yet (still connecting at start) has said nothing to judge.
    if il.quantity.is_some() && facts.silent_for.is_some() {
        if !facts.online {
            return Some(format!(
                "{}: offline, {} unknown",
                il.instrument,
                il.quantity.as_deref().unwrap_or_default()
            ));
        }
        if !facts.busy && facts.silent_for.is_some_and(|s| s > facts.heartbeat) {
            return Some(format!(
                "{}: no fresh {} for {:.1} s (heartbeat {:.1} s)",
                il.instrument,
                il.quantity.as_deref().unwrap_or_default(),
                facts.silent_for.unwrap_or_default().as_secs_f64(),
                facts.heartbeat.as_secs_f64()
            ));
        }
    }
    if let Some(q) = &il.quantity {
        let value = facts
            .values
            .iter()
            .find(|(name, _)| name == q)
            .map(|(_, v)| *v)?;
        if let Some(max) = il.above
            && value > max
        {
            return Some(format!("{}: {q} = {value} above {max}", il.instrument));
        }
        if let Some(min) = il.below
            && value < min
        {
            return Some(format!("{}: {q} = {value} below {min}", il.instrument));
        }
        return None;
    }
    if il.on_alarm
        && let Some(DeviceState::Alarm(detail)) = facts.state
    {
        return Some(format!("{}: alarm: {detail}", il.instrument));
    }
    if il.on_silence && !facts.busy {
        match facts.silent_for {
            Some(s) if s > facts.heartbeat => {
                return Some(format!(
                    "{}: silent for {:.1} s (heartbeat {:.1} s)",
                    il.instrument,
                    s.as_secs_f64(),
                    facts.heartbeat.as_secs_f64()
                ));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use labctl_protocols::Lab;

    fn interlock(name: &str) -> Interlock {
        Lab::sim()
            .interlocks
            .into_iter()
            .find(|i| i.name == name)
            .unwrap()
    }

    fn facts<'a>(
        values: &'a [(&'static str, f64)],
        state: Option<&'a DeviceState>,
    ) -> InstrumentFacts<'a> {
        InstrumentFacts {
            values,
            state,
            silent_for: Some(Duration::ZERO),
            heartbeat: Duration::from_secs(5),
            busy: false,
            online: true,
        }
    }

    #[test]
    fn over_temperature_trips_above_the_limit_only() {
        let il = interlock("hotplate-over-temperature");
        assert_eq!(
            evaluate(&il, &facts(&[("plate_temperature_c", 129.9)], None)),
            None
        );
        let why = evaluate(&il, &facts(&[("plate_temperature_c", 131.0)], None)).unwrap();
        assert!(why.contains("plate_temperature_c = 131 above 130"), "{why}");
    }

    #[test]
    fn alarm_trips_on_alarm_state() {
        let il = interlock("gantry-alarm");
        assert_eq!(evaluate(&il, &facts(&[], Some(&DeviceState::Idle))), None);
        let alarm = DeviceState::Alarm("ALARM:2 soft limit".into());
        assert!(
            evaluate(&il, &facts(&[], Some(&alarm)))
                .unwrap()
                .contains("soft limit")
        );
    }

    #[test]
    fn silence_trips_past_heartbeat_unless_busy() {
        let il = interlock("hotplate-silent");
        let mut f = facts(&[], None);
        f.silent_for = Some(Duration::from_secs(6));
        assert!(evaluate(&il, &f).is_some());
        f.busy = true;
        assert_eq!(evaluate(&il, &f), None);
        f.busy = false;
        f.silent_for = Some(Duration::from_secs(4));
        assert_eq!(evaluate(&il, &f), None);
    }

    /// An instrument gone offline is not judged on its last value: a quantity interlock counts as tripped.
    #[test]
    fn a_lost_or_stale_instrument_trips_its_quantity_interlocks() {
        let il = interlock("hotplate-over-temperature");
        let values = [("plate_temperature_c", 25.0)];
        let mut f = facts(&values, None);
        assert_eq!(evaluate(&il, &f), None);
        f.online = false;
        let why = evaluate(&il, &f).unwrap();
        assert!(why.contains("offline"), "{why}");
        f.online = true;
        f.silent_for = Some(Duration::from_secs(6));
        let why = evaluate(&il, &f).unwrap();
        assert!(why.contains("no fresh plate_temperature_c"), "{why}");
        // Never heard from (still connecting at start): nothing to judge yet.
        f.silent_for = None;
        f.online = false;
        assert_eq!(evaluate(&il, &f), None);
    }
}
