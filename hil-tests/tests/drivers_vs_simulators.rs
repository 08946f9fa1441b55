//! Every labctl driver against its wire simulator, over real pseudo-terminals (the GRBL gantry, the three
//! NE-1000 pumps sharing ONE pty, the MT-SICS balance, the IKA NAMUR hotplate) and TCP (the SCPI
//! spectrophotometer): identity, every command with its physical effect in the lab model, telemetry and
//! safe state; then each kind of injected fault per instrument family.
//!
//! The lab runs at warp 50 (virtual waits are short); every await is bounded, so a hang fails the test.

use std::time::{Duration, Instant};

use labctl_drivers::{
    AnyInstrument, DeviceCommand, DeviceState, DriverError, Instrument, Outcome, PortError,
    Telemetry,
};
use labctl_hil_tests::rig::{Rig, RigConfig, ok, step, within};
use labctl_simulators::model::{Direction, Dye, FaultConfig, GantryState, PumpState};

// ----- helpers -----

/// Deck positions of the simulated lab (mm).
const W1: (f64, f64) = (200.0, 40.0);
const A1: (f64, f64) = (20.0, 20.0);
const A2: (f64, f64) = (40.0, 20.0);
/// Height at which the head dispenses and the dip probe reads.
const WORK_Z: f64 = 10.0;

fn value(t: &Telemetry, name: &str) -> f64 {
    t.values
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} in {t:?}"))
}

fn faults(change: impl FnOnce(&mut FaultConfig)) -> FaultConfig {
    let mut f = FaultConfig::default();
    change(&mut f);
    f
}

fn is_timeout(e: &DriverError) -> bool {
    matches!(e, DriverError::Port(PortError::Timeout { .. }))
}

fn move_to(x: f64, y: f64, z: f64) -> DeviceCommand {
    DeviceCommand::MoveTo {
        x_mm: x,
        y_mm: y,
        z_mm: z,
        feed_mm_per_min: 3000.0,
    }
}

fn mass(outcome: Outcome) -> (f64, bool) {
    match outcome {
        Outcome::Mass { mass_g, stable } => (mass_g, stable),
        other => panic!("expected a mass, got {other:?}"),
    }
}

fn dispensed(outcome: Outcome) -> f64 {
    match outcome {
        Outcome::Dispensed { dispensed_ul } => dispensed_ul,
        other => panic!("expected a dispensed volume, got {other:?}"),
    }
}

fn absorbance(outcome: Outcome) -> f64 {
    match outcome {
        Outcome::Absorbance { absorbance, .. } => absorbance,
        other => panic!("expected an absorbance, got {other:?}"),
    }
}

/// Wavelength of the highest absorbance of a measured spectrum.
fn peak_nm(outcome: &Outcome) -> f64 {
    let Outcome::Spectrum {
        wavelengths_nm,
        absorbance,
    } = outcome
    else {
        panic!("expected a spectrum, got {outcome:?}");
    };
    assert_eq!(wavelengths_nm.len(), absorbance.len());
    let (k, _) = absorbance
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("a non-empty spectrum");
    wavelengths_nm[k]
}

async fn start(d: &mut AnyInstrument, what: &str) -> labctl_drivers::Identity {
    ok(what, step(what, d.start()).await)
}

async fn exec(d: &mut AnyInstrument, what: &str, cmd: DeviceCommand) -> Outcome {
    ok(what, step(what, d.execute(&cmd)).await)
}

async fn poll(d: &mut AnyInstrument, what: &str) -> Telemetry {
    ok(what, step(what, d.poll()).await)
}

/// A gantry that has been homed and stands at (x, y, WORK_Z).
async fn gantry_at(rig: &mut Rig, x: f64, y: f64) -> AnyInstrument {
    let mut g = rig.driver("gantry");
    start(&mut g, "gantry start").await;
    exec(&mut g, "home", DeviceCommand::Home).await;
    exec(&mut g, "move", move_to(x, y, WORK_Z)).await;
    g
}

/// Puts a vial with `ul` of one dye under the head at A1, working the model directly (a technician's
/// prepared sample), for tests of the instruments that only read it.
async fn sample_under_head(rig: &Rig, dye: Dye, ul: f64) {
    let pump = dye.index();
    rig.model(|m, now| {
        m.add_vial(now, "sample", "A1").unwrap();
        m.gantry_unlock(now).unwrap();
        m.gantry_move(now, [A1.0, A1.1, WORK_Z], None).unwrap();
        m.pump_set_direction(now, pump, Direction::Infuse).unwrap();
        m.pump_set_rate(now, pump, 1500.0).unwrap();
        m.pump_set_volume(now, pump, ul).unwrap();
    });
    // The pump must not start before the head is over the vial.
    wait_for(rig, "head over A1", |m, now| {
        m.gantry_status(now).state == GantryState::Idle
    })
    .await;
    rig.model(|m, now| m.pump_run(now, pump).unwrap());
    wait_for(rig, "sample dispensed", |m, now| {
        m.pump_status(now, pump).unwrap().state == PumpState::Stopped
    })
    .await;
    let got = rig.model(|m, now| {
        m.vial_under_head(now)
            .map(|v| v.contents.dye_ul[dye.index()])
    });
    assert!(
        got.is_some_and(|v| (v - ul).abs() < 0.05 * ul),
        "sample: {got:?} uL"
    );
}

/// Polls the model until `done` (bounded).
async fn wait_for(
    rig: &Rig,
    what: &str,
    mut done: impl FnMut(&mut labctl_simulators::model::LabModel, Duration) -> bool,
) {
    within(Duration::from_secs(30), what, async {
        while !rig.model(&mut done) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// What a reading printed as `text` can turn into through at most two dropped or garbled bytes that still
/// leave a well-formed number (one pad character before it may turn into a sign or digit): the damage an
/// ASCII protocol without a checksum cannot detect. `text` prints `want`; a noisy reading may differ from
/// it by `tolerance`, which scales with the value when a lost decimal point scales the value.
fn undetectable(text: &str, want: f64, got: f64, tolerance: f64) -> bool {
    const INTO: &[u8] = b"0123456789.-+ ";
    let parses_to = |s: &[u8]| {
        std::str::from_utf8(s)
            .ok()
            .map(str::trim)
            .and_then(|t| t.parse::<f64>().ok())
            .is_some_and(|v| {
                let scale = (v.abs() / want.abs().max(1e-9)).max(1.0);
                (v - got).abs() <= tolerance * scale
            })
    };
    let mut frontier = vec![format!(" {text}").into_bytes()];
    for _ in 0..2 {
        let mut next = Vec::new();
        for s in &frontier {
            for i in 0..s.len() {
                let mut dropped = s.clone();
                dropped.remove(i);
                next.push(dropped);
                for &c in INTO.iter().filter(|&&c| c != s[i]) {
                    let mut garbled = s.clone();
                    garbled[i] = c;
                    next.push(garbled);
                }
            }
        }
        if next.iter().any(|s| parses_to(s)) {
            return true;
        }
        frontier = next;
    }
    false
}

/// One reading the driver returned under byte damage, checked against the truth: `Ok(true)` when it is
/// the true value, `Ok(false)` for a wrong value that only an undetectable corruption of the printed
/// number explains (counted and reported), and a failed test for anything else.
fn judge(what: &str, name: &str, got: f64, want: f64, text: &str, tolerance: f64) -> bool {
    if (got - want).abs() <= tolerance {
        return true;
    }
    assert!(
        undetectable(text, want, got, tolerance),
        "{what}: accepted a wrong {name} {got} (true {want}, printed {text:?}) that no undetectable \
         corruption of the reply explains"
    );
    false
}

/// Byte damage on the line: each of `n` polls gives the true readings, or a typed error that does not
/// declare the line lost. A wrong reading is accepted only where the protocol has no way to see the
/// damage (a digit dropped or changed into another digit: MT-SICS, NAMUR, GRBL and SCPI carry no
/// checksum); those are counted and printed. Returns (failed polls plus damage the port absorbed by
/// retrying or dropping frames, wrong readings accepted).
async fn probe_under_damage(
    rig: &Rig,
    d: &mut AnyInstrument,
    id: &str,
    what: &str,
    n: usize,
    expected: &[(&str, f64, String)],
    tolerance: f64,
) -> (usize, usize) {
    let damage_before = rig.line_damage(id);
    let (mut failed, mut wrong) = (0, 0);
    for i in 0..n {
        match step(what, d.poll()).await {
            Ok(t) => {
                for (name, want, text) in expected {
                    let what = format!("{what}: probe {i}");
                    if !judge(&what, name, value(&t, name), *want, text, tolerance) {
                        wrong += 1;
                    }
                }
            }
            Err(e) => {
                assert!(
                    !e.is_connection_lost(),
                    "{what}: probe {i}: byte damage is not a lost line: {e}"
                );
                failed += 1;
            }
        }
    }
    let absorbed = rig.line_damage(id) - damage_before;
    println!(
        "{what}: {n} polls, {failed} typed errors, {absorbed} frames/bytes/timeouts absorbed by the \
         port, {wrong} undetectable corruptions accepted"
    );
    (
        failed + usize::try_from(absorbed).unwrap_or(usize::MAX),
        wrong,
    )
}

/// After clearing a fault, the driver works again within a few seconds (late replies drain first).
async fn recovers(d: &mut AnyInstrument, what: &str) -> Telemetry {
    within(Duration::from_secs(20), what, async {
        loop {
            match d.poll().await {
                Ok(t) => return t,
                Err(e) => assert!(!e.is_connection_lost(), "{what}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// After `unplug`, the driver reports a lost connection (typed, no hang); after `replug`, `start` and a poll
/// work again on the new pty.
async fn unplug_and_recover(rig: &mut Rig, d: &mut AnyInstrument, fault_id: &str, what: &str) {
    let location = |rig: &Rig| {
        rig.sim
            .endpoints()
            .into_iter()
            .find(|e| e.id == fault_id || e.port == fault_id)
            .map(|e| e.location())
    };
    let before = location(rig);
    step("unplug", rig.faults(fault_id).unplug()).await.unwrap();
    let t0 = Instant::now();
    let mut lost = None;
    // The port task may notice the hang-up while idle or on the next transaction; either way within a try
    // or two, and never as a value.
    for _ in 0..3 {
        match step(what, d.poll()).await {
            Ok(t) => panic!("{what}: a poll of an unplugged instrument succeeded: {t:?}"),
            Err(e) if e.is_connection_lost() => {
                lost = Some(e);
                break;
            }
            Err(e) => assert!(is_timeout(&e), "{what}: {e}"),
        }
    }
    let lost = lost.unwrap_or_else(|| panic!("{what}: the unplug was never reported as lost"));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "{what}: took {:?} to notice: {lost}",
        t0.elapsed()
    );
    let status = step("replug", rig.faults(fault_id).replug()).await.unwrap();
    assert!(status.open);
    // The kernel may hand the new pty the number the old one had; what matters is that it is open.
    let after = location(rig);
    assert!(
        after.as_deref().is_some_and(|a| a != "-"),
        "{before:?} -> replugged at {after:?}"
    );
    start(d, &format!("{what}: start after replug")).await;
    poll(d, &format!("{what}: poll after replug")).await;
}

// ----- the gantry (GRBL 1.1 over a pty) -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_identity_power_up_lock_homing_moves_and_gripper() {
    let mut rig = Rig::start(RigConfig::default()).await;
    let mut g = rig.driver("gantry");
    let id = start(&mut g, "start").await;
    assert_eq!(id.manufacturer, "Grbl");
    assert_eq!(id.model, "LabCNC XYZ-300 SN 2211-0417");
    assert_eq!(id.serial, "LabCNC XYZ-300 SN 2211-0417");
    assert_eq!(id.firmware, "Grbl 1.1h.20190825");

    // Power-up: locked until homed, at the home position, and motion is refused with a typed alarm.
    let t = poll(&mut g, "poll at power-up").await;
    assert!(matches!(t.state, DeviceState::Locked(_)), "{t:?}");
    assert_eq!(
        (value(&t, "x_mm"), value(&t, "y_mm"), value(&t, "z_mm")),
        (0.0, 0.0, 50.0)
    );
    match step("move while locked", g.execute(&move_to(W1.0, W1.1, WORK_Z))).await {
        Err(DriverError::Alarm { .. }) => {}
        other => panic!("a move before homing must be refused as an alarm: {other:?}"),
    }
    assert_eq!(
        rig.model(|m, now| m.gantry_status(now).position),
        [0.0, 0.0, 50.0],
        "nothing moved"
    );

    exec(&mut g, "home", DeviceCommand::Home).await;
    let t = poll(&mut g, "poll after homing").await;
    assert_eq!(t.state, DeviceState::Idle);

    exec(&mut g, "move to W1", move_to(W1.0, W1.1, WORK_Z)).await;
    let status = rig.model(|m, now| m.gantry_status(now));
    assert_eq!(status.state, GantryState::Idle);
    for (axis, want) in [W1.0, W1.1, WORK_Z].into_iter().enumerate() {
        assert!(
            (status.position[axis] - want).abs() < 0.01,
            "{:?}",
            status.position
        );
    }
    let t = poll(&mut g, "poll at W1").await;
    assert_eq!(
        (value(&t, "x_mm"), value(&t, "y_mm"), value(&t, "z_mm")),
        (W1.0, W1.1, WORK_Z)
    );

    // The gripper picks the vial standing under the lowered head, and puts it down again.
    rig.model(|m, now| m.add_vial(now, "v1", "A1").unwrap());
    exec(&mut g, "move to A1", move_to(A1.0, A1.1, 2.0)).await;
    exec(&mut g, "grip", DeviceCommand::Gripper { closed: true }).await;
    let status = rig.model(|m, now| m.gantry_status(now));
    assert!(status.gripper_closed);
    assert_eq!(status.held_vial.as_deref(), Some("v1"));
    exec(&mut g, "carry to A2", move_to(A2.0, A2.1, 2.0)).await;
    exec(&mut g, "release", DeviceCommand::Gripper { closed: false }).await;
    let (held, at) = rig.model(|m, now| {
        let held = m.gantry_status(now).held_vial;
        let at = m.vial("v1").and_then(|v| v.position().map(str::to_owned));
        (held, at)
    });
    assert_eq!((held, at.as_deref()), (None, Some("A2")));

    // A command for another kind of instrument is refused by name, nothing is sent.
    match g.execute(&DeviceCommand::Zero).await {
        Err(DriverError::WrongKind { .. }) => {}
        other => panic!("{other:?}"),
    }
    step("stop", g.stop()).await;
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_safe_state_is_a_feed_hold_that_stops_a_running_move() {
    let mut rig = Rig::start(RigConfig::default()).await;
    let mut mover = gantry_at(&mut rig, A1.0, A1.1).await;
    // A second driver on the same port task, as the controller's e-stop path would reach the line while
    // the move runs.
    let mut stopper = rig.driver("gantry");
    start(&mut stopper, "second driver").await;
    // 250 mm at 300 mm/min: 50 virtual s, a second of real time at warp 50.
    let long_move = tokio::spawn(async move {
        let r = mover
            .execute(&DeviceCommand::MoveTo {
                x_mm: 270.0,
                y_mm: 20.0,
                z_mm: WORK_Z,
                feed_mm_per_min: 300.0,
            })
            .await;
        (mover, r)
    });
    wait_for(&rig, "move running", |m, now| {
        m.gantry_status(now).state == GantryState::Run
    })
    .await;
    ok("safe state", step("safe state", stopper.safe_state()).await);
    wait_for(&rig, "feed hold", |m, now| {
        m.gantry_status(now).state == GantryState::Hold
    })
    .await;
    let x_hold = rig.model(|m, now| m.gantry_status(now).position[0]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = rig.model(|m, now| m.gantry_status(now));
    assert_eq!(status.state, GantryState::Hold);
    assert_eq!(status.position[0], x_hold, "held still");
    assert!(x_hold < 270.0 - 1.0, "stopped before the target: {x_hold}");
    let t = poll(&mut stopper, "poll in hold").await;
    assert_eq!(t.state, DeviceState::Busy);
    // The held move does not count as finished (and is abandoned here).
    assert!(!long_move.is_finished());
    long_move.abort();
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_soft_limit_alarm_is_typed_and_homing_recovers() {
    let mut rig = Rig::start(RigConfig::default()).await;
    let mut g = gantry_at(&mut rig, A1.0, A1.1).await;
    // Beyond the 300 mm X travel: GRBL's soft limit, ALARM:2, a critical alarm until reset.
    match step(
        "move beyond the limits",
        g.execute(&move_to(400.0, 20.0, WORK_Z)),
    )
    .await
    {
        Err(DriverError::Alarm { code, message, .. }) => {
            assert_eq!(code, "ALARM:2");
            assert!(message.contains("Soft limit"), "{message}");
        }
        other => panic!("expected the soft limit alarm: {other:?}"),
    }
    let t = poll(&mut g, "poll in alarm").await;
    assert!(matches!(t.state, DeviceState::Alarm(_)), "{t:?}");
    // Homing is how an operator recovers: it must work from here, without a power cycle.
    exec(&mut g, "home after the alarm", DeviceCommand::Home).await;
    exec(&mut g, "move after homing", move_to(A2.0, A2.1, WORK_Z)).await;
    assert_eq!(poll(&mut g, "poll").await.state, DeviceState::Idle);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_reconnected_in_a_critical_alarm_resets_and_homes() {
    let mut rig = Rig::start(RigConfig::default()).await;
    let mut g = gantry_at(&mut rig, A1.0, A1.1).await;
    match step(
        "beyond the limits",
        g.execute(&move_to(400.0, 20.0, WORK_Z)),
    )
    .await
    {
        Err(DriverError::Alarm { code, .. }) => assert_eq!(code, "ALARM:2"),
        other => panic!("expected the soft limit alarm: {other:?}"),
    }
    // The controller restarts: a new driver on a reopened line, which never saw ALARM:2 and finds GRBL
    // answering nothing but real-time bytes until a reset.
    step("stop", g.stop()).await;
    let mut g = rig.driver("gantry");
    start(&mut g, "start after the reconnect").await;
    let t = poll(&mut g, "poll after the reconnect").await;
    assert!(
        matches!(t.state, DeviceState::Locked(_) | DeviceState::Alarm(_)),
        "homing is required after the alarm: {t:?}"
    );
    exec(&mut g, "home after the reconnect", DeviceCommand::Home).await;
    exec(&mut g, "move after homing", move_to(A2.0, A2.1, WORK_Z)).await;
    let t = poll(&mut g, "poll").await;
    assert_eq!(t.state, DeviceState::Idle);
    assert_eq!((value(&t, "x_mm"), value(&t, "y_mm")), A2);
    rig.shutdown().await;
}

mod gantry_faults {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_within_the_budget_still_works() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut g = gantry_at(&mut rig, A1.0, A1.1).await;
        let latency = rig.virtual_ms(40);
        rig.set_faults("gantry", faults(|f| f.latency_ms = latency));
        let t0 = Instant::now();
        let t = poll(&mut g, "poll with latency").await;
        assert!(
            t0.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!((value(&t, "x_mm"), value(&t, "y_mm")), A1);
        exec(&mut g, "move with latency", move_to(A2.0, A2.1, WORK_Z)).await;
        // Latency beyond the status budget is a typed timeout, not a hang.
        let latency = rig.virtual_ms(600);
        rig.set_faults("gantry", faults(|f| f.latency_ms = latency));
        let e = step("poll with too much latency", g.poll())
            .await
            .unwrap_err();
        assert!(is_timeout(&e), "{e}");
        rig.faults("gantry").clear().unwrap();
        let t = recovers(&mut g, "poll after the latency").await;
        assert_eq!((value(&t, "x_mm"), value(&t, "y_mm")), A2);
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_and_garbled_bytes_never_give_a_wrong_position() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut g = gantry_at(&mut rig, A2.0, A2.1).await;
        // GRBL prints machine positions with three decimals.
        let expected = [
            ("x_mm", A2.0, format!("{:.3}", A2.0)),
            ("y_mm", A2.1, format!("{:.3}", A2.1)),
            ("z_mm", WORK_Z, format!("{WORK_Z:.3}")),
        ];
        // GRBL has no checksum, but the driver holds reports to physics: the decimals it prints, the axis
        // travel, the max rates, and an idle machine that does not move. A digit lost or changed is
        // refused and asked again (before those checks, 7 of 40 polls with dropped bytes accepted a wrong
        // position).
        rig.set_faults("gantry", faults(|f| f.drop_probability = 0.03));
        let (failed, wrong) = probe_under_damage(
            &rig,
            &mut g,
            "gantry",
            "gantry dropped",
            40,
            &expected,
            1e-9,
        )
        .await;
        assert!(failed > 0, "the damage was never felt (no error, no retry)");
        assert_eq!(
            wrong, 0,
            "a wrong position was accepted from a dropped byte"
        );
        rig.set_faults("gantry", faults(|f| f.garble_probability = 0.03));
        let (failed, wrong) = probe_under_damage(
            &rig,
            &mut g,
            "gantry",
            "gantry garbled",
            40,
            &expected,
            1e-9,
        )
        .await;
        assert!(failed > 0, "the damage was never felt (no error, no retry)");
        assert_eq!(
            wrong, 0,
            "a wrong position was accepted from a garbled byte"
        );
        rig.faults("gantry").clear().unwrap();
        let t = recovers(&mut g, "clean poll").await;
        assert_eq!(value(&t, "x_mm"), A2.0);
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_reply_is_a_typed_timeout() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut g = rig.driver("gantry");
        start(&mut g, "start").await;
        rig.set_faults("gantry", faults(|f| f.no_reply = true));
        let t0 = Instant::now();
        let e = step("poll", g.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        let e = step("start", g.start()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        rig.faults("gantry").clear().unwrap();
        start(&mut g, "start after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unplugged_is_a_lost_connection_and_replug_recovers() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut g = rig.driver("gantry");
        start(&mut g, "start").await;
        unplug_and_recover(&mut rig, &mut g, "gantry", "gantry").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grbl_error_and_alarm_codes_are_typed() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut g = gantry_at(&mut rig, A1.0, A1.1).await;
        rig.set_faults("gantry", faults(|f| f.error_code = Some("error:20".into())));
        match step("grip", g.execute(&DeviceCommand::Gripper { closed: true })).await {
            Err(DriverError::Device { code, message, .. }) => {
                assert_eq!(code, "error:20");
                assert!(!message.is_empty());
            }
            other => panic!("expected error:20 as a device error: {other:?}"),
        }
        // ALARM:9 (homing fail) pushed while idle: the next move is refused with that alarm.
        rig.set_faults("gantry", faults(|f| f.error_code = Some("ALARM:9".into())));
        match step("move in alarm", g.execute(&move_to(A2.0, A2.1, WORK_Z))).await {
            Err(DriverError::Alarm { code, .. }) => assert_eq!(code, "ALARM:9"),
            other => panic!("expected ALARM:9: {other:?}"),
        }
        let t = poll(&mut g, "poll in alarm").await;
        assert!(
            matches!(&t.state, DeviceState::Alarm(text) if text.contains("ALARM:9")),
            "{t:?}"
        );
        rig.faults("gantry").clear().unwrap();
        exec(&mut g, "home clears it", DeviceCommand::Home).await;
        exec(&mut g, "move", move_to(A2.0, A2.1, WORK_Z)).await;
        rig.shutdown().await;
    }
}

// ----- the pumps (three NE-1000 on one shared pty) -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pumps_share_one_pty_and_dispense_into_the_vial_under_the_head() {
    let mut rig = Rig::start(RigConfig::default()).await;
    let ids = ["pump-red", "pump-yellow", "pump-blue"];
    let mut pumps: Vec<AnyInstrument> = ids.iter().map(|id| rig.driver(id)).collect();
    assert_eq!(
        rig.ports.handles().count(),
        1,
        "the three pumps share one port task"
    );
    let line = rig.endpoint("pump-red");
    assert_eq!(line.name(), rig.endpoint("pump-blue").name());
    for (p, id) in pumps.iter_mut().zip(ids) {
        let identity = start(p, id).await;
        assert_eq!(identity.manufacturer, "New Era Pump Systems");
        assert_eq!(identity.model, "NE1000");
        assert_eq!(identity.firmware, "NE1000V3.928");
        let t = poll(p, id).await;
        assert_eq!(t.state, DeviceState::Idle);
        assert_eq!(value(&t, "dispensed_ul"), 0.0);
    }

    rig.model(|m, now| {
        m.add_vial(now, "w", "W1").unwrap();
        m.add_vial(now, "y", "A1").unwrap();
        m.add_vial(now, "b", "A2").unwrap();
    });
    let mut gantry = rig.driver("gantry");
    start(&mut gantry, "gantry").await;
    exec(&mut gantry, "home", DeviceCommand::Home).await;

    // Each pump dispenses where the head is: red at W1, yellow at A1, blue at A2.
    for (k, (vial, at)) in [("w", W1), ("y", A1), ("b", A2)].into_iter().enumerate() {
        exec(&mut gantry, "move", move_to(at.0, at.1, WORK_Z)).await;
        let out = exec(
            &mut pumps[k],
            ids[k],
            DeviceCommand::Dispense {
                volume_ul: 400.0,
                rate_ul_per_min: 1500.0,
            },
        )
        .await;
        assert_eq!(
            dispensed(out),
            400.0,
            "{}: the pump's own DIS counter",
            ids[k]
        );
        let contents = rig.model(|m, now| {
            m.advance_to(now);
            m.vial(vial).unwrap().contents
        });
        let delivered = contents.dye_ul[k];
        assert!(
            (delivered - 400.0).abs() < 20.0,
            "{}: {delivered} uL landed in {vial}",
            ids[k]
        );
        let others: f64 = contents.total_ul() - delivered;
        assert_eq!(others, 0.0, "only {} went into {vial}", ids[k]);
        let t = poll(&mut pumps[k], ids[k]).await;
        assert_eq!(value(&t, "dispensed_ul"), 400.0);
    }
    let spilled = rig.model(|m, _| m.stats().spilled_ul);
    assert_eq!(spilled, 0.0);
    // Red is the first dye index: a pump answered for its own address only.
    assert_eq!(Dye::Red.index(), 0);

    // STP on every pump of the line.
    for (p, id) in pumps.iter_mut().zip(ids) {
        ok(id, step(id, p.safe_state()).await);
    }
    for p in &mut pumps {
        step("stop", p.stop()).await;
    }
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pump_safe_state_stops_a_running_dispense() {
    let mut rig = Rig::start(RigConfig::default()).await;
    rig.model(|m, now| m.add_vial(now, "w", "W1").unwrap());
    let _gantry = gantry_at(&mut rig, W1.0, W1.1).await;
    let mut pump = rig.driver("pump-yellow");
    start(&mut pump, "pump").await;
    let mut stopper = rig.driver("pump-yellow");
    start(&mut stopper, "second driver").await;
    // 5 mL at 1 mL/min: 300 virtual s, 6 real s at warp 50.
    let dispense = tokio::spawn(async move {
        pump.execute(&DeviceCommand::Dispense {
            volume_ul: 5000.0,
            rate_ul_per_min: 1000.0,
        })
        .await
    });
    wait_for(&rig, "pumping", |m, now| {
        m.pump_status(now, 1).unwrap().state == PumpState::Infusing
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok("safe state", step("safe state", stopper.safe_state()).await);
    let (state, delivered) = rig.model(|m, now| {
        m.advance_to(now);
        let s = m.pump_status(now, 1).unwrap();
        (s.state, m.vial("w").unwrap().contents.dye_ul[1])
    });
    assert!(
        matches!(state, PumpState::Paused | PumpState::Stopped),
        "{state:?}"
    );
    assert!(delivered > 0.0 && delivered < 4000.0, "{delivered}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = rig.model(|m, now| {
        m.advance_to(now);
        m.vial("w").unwrap().contents.dye_ul[1]
    });
    assert_eq!(later, delivered, "nothing flows after STP");
    // The dispense that was cut short says so, typed, instead of claiming it finished.
    match within(Duration::from_secs(30), "cut dispense", dispense)
        .await
        .unwrap()
    {
        Err(DriverError::Device { code, .. }) => assert_eq!(code, "P"),
        other => panic!("a dispense stopped by STP must fail: {other:?}"),
    }
    rig.shutdown().await;
}

mod pump_faults {
    use super::*;

    async fn started(rig: &mut Rig, id: &str) -> AnyInstrument {
        let mut p = rig.driver(id);
        start(&mut p, id).await;
        p
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_within_the_budget_still_works_and_beyond_it_times_out() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut p = started(&mut rig, "pump-red").await;
        let latency = rig.virtual_ms(40);
        rig.set_faults("pump-red", faults(|f| f.latency_ms = latency));
        let t0 = Instant::now();
        let t = poll(&mut p, "poll").await;
        assert!(t0.elapsed() >= Duration::from_millis(40));
        assert_eq!(value(&t, "dispensed_ul"), 0.0);
        let latency = rig.virtual_ms(800);
        rig.set_faults("pump-red", faults(|f| f.latency_ms = latency));
        let e = step("poll", p.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        rig.faults("pump-red").clear().unwrap();
        recovers(&mut p, "poll after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_and_garbled_bytes_on_one_pump_never_give_a_wrong_volume() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut red = started(&mut rig, "pump-red").await;
        let mut blue = started(&mut rig, "pump-blue").await;
        // DIS answers `I0.000W0.000ML`: the pump prints four digits.
        let expected = [("dispensed_ul", 0.0, "0.000".to_owned())];
        rig.set_faults("pump-red", faults(|f| f.drop_probability = 0.05));
        let (failed, _) = probe_under_damage(
            &rig,
            &mut red,
            "pump-red",
            "pump dropped",
            30,
            &expected,
            0.0,
        )
        .await;
        assert!(failed > 0, "the damage was never felt (no error, no retry)");
        rig.set_faults("pump-red", faults(|f| f.garble_probability = 0.05));
        let (failed, _) = probe_under_damage(
            &rig,
            &mut red,
            "pump-red",
            "pump garbled",
            30,
            &expected,
            0.0,
        )
        .await;
        assert!(failed > 0, "the damage was never felt (no error, no retry)");
        // The neighbour on the same line is not disturbed: its replies are clean.
        for _ in 0..10 {
            let t = poll(&mut blue, "pump-blue beside a damaged pump-red").await;
            assert_eq!(value(&t, "dispensed_ul"), 0.0);
        }
        rig.faults("pump-red").clear().unwrap();
        recovers(&mut red, "clean poll").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_reply_and_an_unplugged_pump_time_out_while_its_neighbours_answer() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut red = started(&mut rig, "pump-red").await;
        let mut yellow = started(&mut rig, "pump-yellow").await;
        let mut blue = started(&mut rig, "pump-blue").await;
        rig.set_faults("pump-red", faults(|f| f.no_reply = true));
        let e = step("silent pump", red.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        let e = step("silent pump start", red.start()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        // One pump pulled off the daisy chain: the line stays up, that pump is silent, the rest answer.
        step("unplug one", rig.faults("pump-yellow").unplug())
            .await
            .unwrap();
        let e = step("unplugged pump", yellow.poll()).await.unwrap_err();
        assert!(
            is_timeout(&e) && !e.is_connection_lost(),
            "the shared line is still there: {e}"
        );
        poll(&mut blue, "neighbour").await;
        rig.faults("pump-red").clear().unwrap();
        step("replug", rig.faults("pump-yellow").replug())
            .await
            .unwrap();
        poll(&mut red, "red after").await;
        poll(&mut yellow, "yellow after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_whole_line_unplugged_is_lost_for_every_pump_and_replug_recovers() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut red = started(&mut rig, "pump-red").await;
        let mut blue = started(&mut rig, "pump-blue").await;
        unplug_and_recover(&mut rig, &mut red, "pumps", "pump line").await;
        // The other pump on the line reconnects through the same port task.
        start(&mut blue, "blue after replug").await;
        poll(&mut blue, "blue").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stall_during_a_dispense_is_a_typed_alarm() {
        let mut rig = Rig::start(RigConfig::default()).await;
        rig.model(|m, now| m.add_vial(now, "w", "W1").unwrap());
        let _gantry = gantry_at(&mut rig, W1.0, W1.1).await;
        let mut red = started(&mut rig, "pump-red").await;
        let run = tokio::spawn(async move {
            let r = red
                .execute(&DeviceCommand::Dispense {
                    volume_ul: 3000.0,
                    rate_ul_per_min: 1000.0,
                })
                .await;
            (red, r)
        });
        wait_for(&rig, "pumping", |m, now| {
            m.pump_status(now, 0).unwrap().state == PumpState::Infusing
        })
        .await;
        rig.set_faults("pump-red", faults(|f| f.error_code = Some("S".into())));
        let (mut red, r) = within(Duration::from_secs(30), "stalled dispense", run)
            .await
            .unwrap();
        match r {
            Err(DriverError::Alarm { code, message, .. }) => {
                assert_eq!(code, "A?S");
                assert!(message.to_lowercase().contains("stall"), "{message}");
            }
            other => panic!("expected the stall alarm: {other:?}"),
        }
        let state = rig.model(|m, now| m.pump_status(now, 0).unwrap().state);
        assert_eq!(state, PumpState::Stopped, "a stalled pump does not pump");
        // A command error the pump answers with (`?NA`) is a typed device error.
        rig.set_faults("pump-red", faults(|f| f.error_code = Some("?NA".into())));
        match step("stop", red.execute(&DeviceCommand::StopPump)).await {
            Err(DriverError::Device { code, .. }) => assert_eq!(code, "?NA"),
            other => panic!("expected ?NA: {other:?}"),
        }
        rig.faults("pump-red").clear().unwrap();
        exec(&mut red, "stop after", DeviceCommand::StopPump).await;
        rig.shutdown().await;
    }
}

// ----- the balance (MT-SICS over a pty) -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_identity_zero_tare_weigh_and_telemetry() {
    let mut rig = Rig::start(RigConfig::default()).await;
    let mut b = rig.driver("balance");
    let id = start(&mut b, "start").await;
    assert_eq!(id.manufacturer, "Mettler Toledo");
    assert_eq!(id.model, "XS204 Excellence");
    assert_eq!(id.serial, "B021002593");
    assert_eq!(id.firmware, "2.20 10.28.0.493.142");

    exec(&mut b, "zero", DeviceCommand::Zero).await;
    let (m, stable) =
        mass(exec(&mut b, "weigh empty", DeviceCommand::Weigh { stable: true }).await);
    assert!(m.abs() < 0.0005 && stable, "{m} {stable}");

    // A vial on the pan: the stable reading is its tare mass, from the model.
    rig.model(|m, now| m.add_vial(now, "v", "W1").unwrap());
    let (m, stable) = mass(exec(&mut b, "weigh vial", DeviceCommand::Weigh { stable: true }).await);
    let truth = rig.model(|model, _| model.vial("v").unwrap().mass_g(1.0));
    assert!(stable);
    assert!((m - truth).abs() < 0.0005, "{m} g, the vial is {truth} g");
    exec(&mut b, "tare", DeviceCommand::Tare).await;
    let (m, _) = mass(exec(&mut b, "weigh net", DeviceCommand::Weigh { stable: true }).await);
    assert!(m.abs() < 0.0005, "net {m}");
    let (m, _) = mass(exec(&mut b, "weigh now", DeviceCommand::Weigh { stable: false }).await);
    assert!(m.abs() < 0.005, "immediate {m}");
    let t = poll(&mut b, "poll").await;
    assert_eq!(t.state, DeviceState::Idle);
    assert!(value(&t, "mass_g").abs() < 0.005);
    ok("safe state", step("safe", b.safe_state()).await);
    step("stop", b.stop()).await;
    rig.shutdown().await;
}

mod balance_faults {
    use super::*;

    async fn balance_with_vial(rig: &mut Rig) -> (AnyInstrument, f64) {
        rig.model(|m, now| m.add_vial(now, "v", "W1").unwrap());
        let mut b = rig.driver("balance");
        start(&mut b, "balance").await;
        let (m, _) = mass(exec(&mut b, "settle", DeviceCommand::Weigh { stable: true }).await);
        (b, m)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_within_the_budget_still_works_and_beyond_it_times_out() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let (mut b, m) = balance_with_vial(&mut rig).await;
        let latency = rig.virtual_ms(200);
        rig.set_faults("balance", faults(|f| f.latency_ms = latency));
        let t0 = Instant::now();
        let t = poll(&mut b, "poll").await;
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!((value(&t, "mass_g") - m).abs() < 0.0005);
        let latency = rig.virtual_ms(3000);
        rig.set_faults("balance", faults(|f| f.latency_ms = latency));
        let e = step("poll", b.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        rig.faults("balance").clear().unwrap();
        recovers(&mut b, "poll after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_and_garbled_bytes_never_give_a_wrong_mass() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let (mut b, m) = balance_with_vial(&mut rig).await;
        // The XS204 prints four decimals.
        let expected = [("mass_g", m, format!("{m:.4}"))];
        rig.set_faults("balance", faults(|f| f.drop_probability = 0.03));
        let (failed, _) = probe_under_damage(
            &rig,
            &mut b,
            "balance",
            "balance dropped",
            30,
            &expected,
            0.0005,
        )
        .await;
        assert!(failed > 0, "the damage was never felt (no error, no retry)");
        rig.set_faults("balance", faults(|f| f.garble_probability = 0.03));
        let (failed, _) = probe_under_damage(
            &rig,
            &mut b,
            "balance",
            "balance garbled",
            30,
            &expected,
            0.0005,
        )
        .await;
        assert!(failed > 0, "the damage was never felt (no error, no retry)");
        rig.faults("balance").clear().unwrap();
        recovers(&mut b, "clean").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_reply_is_a_typed_timeout() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut b = rig.driver("balance");
        start(&mut b, "start").await;
        rig.set_faults("balance", faults(|f| f.no_reply = true));
        let t0 = Instant::now();
        let e = step("poll", b.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        let e = step("start", b.start()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        rig.faults("balance").clear().unwrap();
        start(&mut b, "start after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unplugged_is_a_lost_connection_and_replug_recovers() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut b = rig.driver("balance");
        start(&mut b, "start").await;
        unplug_and_recover(&mut rig, &mut b, "balance", "balance").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overload_and_error_replies_are_typed() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let (mut b, _) = balance_with_vial(&mut rig).await;
        rig.set_faults("balance", faults(|f| f.error_code = Some("+".into())));
        match step("weigh", b.execute(&DeviceCommand::Weigh { stable: true })).await {
            Err(DriverError::Device { code, message, .. }) => {
                assert_eq!(code, "S +");
                assert!(message.contains("overload"), "{message}");
            }
            other => panic!("expected an overload: {other:?}"),
        }
        let t = poll(&mut b, "poll in overload").await;
        assert!(
            matches!(&t.state, DeviceState::Alarm(text) if text.contains("overload")),
            "{t:?}"
        );
        assert!(t.values.is_empty(), "no mass while overloaded: {t:?}");
        rig.set_faults("balance", faults(|f| f.error_code = Some("EL".into())));
        match step("tare", b.execute(&DeviceCommand::Tare)).await {
            Err(DriverError::Device { code, .. }) => assert_eq!(code, "EL"),
            other => panic!("expected EL: {other:?}"),
        }
        rig.faults("balance").clear().unwrap();
        exec(&mut b, "weigh after", DeviceCommand::Weigh { stable: true }).await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drift_moves_the_reading() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let (mut b, m0) = balance_with_vial(&mut rig).await;
        // 36 g per virtual hour: 10 mg per virtual second, half a gram per real second at warp 50.
        rig.set_faults("balance", faults(|f| f.drift_per_hour = 36.0));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (m1, _) = mass(exec(&mut b, "weigh", DeviceCommand::Weigh { stable: false }).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (m2, _) = mass(exec(&mut b, "weigh", DeviceCommand::Weigh { stable: false }).await);
        assert!(m1 - m0 > 0.1 && m2 - m1 > 0.1, "{m0} -> {m1} -> {m2}");
        rig.shutdown().await;
    }
}

// ----- the hotplate (IKA NAMUR over a 7E1 pty) -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplate_heats_and_stirs_the_vial_on_the_stir_station() {
    let mut rig = Rig::start(RigConfig::default()).await;
    rig.model(|m, now| m.add_vial(now, "h", "H1").unwrap());
    let mut h = rig.driver("hotplate");
    let id = start(&mut h, "start").await;
    assert_eq!(id.manufacturer, "IKA");
    assert_eq!(id.model, "RCT digital");
    assert_eq!(id.firmware, "1.22");
    let watchdog = rig.model(|m, now| m.hotplate_status(now, 0).unwrap().watchdog_s);
    assert_eq!(watchdog, Some(600.0), "start arms the device's watchdog");

    let t = poll(&mut h, "poll cold").await;
    assert_eq!(value(&t, "temperature_c"), 22.0);
    assert_eq!(value(&t, "plate_temperature_c"), 22.0);
    assert_eq!(value(&t, "stir_speed_rpm"), 0.0);

    exec(
        &mut h,
        "set temperature",
        DeviceCommand::SetTemperature {
            temperature_c: 80.0,
        },
    )
    .await;
    exec(
        &mut h,
        "stir",
        DeviceCommand::SetStirSpeed { speed_rpm: 600.0 },
    )
    .await;
    // NAMUR setpoints get no reply: the write is all the driver can wait for, so the device acts a moment
    // later.
    wait_for(&rig, "heater and motor on", |m, now| {
        let s = m.hotplate_status(now, 0).unwrap();
        s.heating && s.stirring && s.setpoint_c == 80.0 && s.speed_setpoint_rpm == 600.0
    })
    .await;
    // The vial warms (two first-order lags of 120 virtual s); the stirrer ramps to speed.
    let t = within(Duration::from_secs(30), "heating", async {
        loop {
            let t = poll(&mut h, "poll while heating").await;
            if value(&t, "temperature_c") > 30.0 && value(&t, "stir_speed_rpm") == 600.0 {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(value(&t, "plate_temperature_c") > 30.0, "{t:?}");
    let Outcome::Temperature { temperature_c } =
        exec(&mut h, "read", DeviceCommand::ReadTemperature).await
    else {
        panic!("expected a temperature");
    };
    let vial = rig.model(|m, now| m.hotplate_status(now, 0).unwrap().vial_c.unwrap());
    assert!(
        (temperature_c - vial).abs() < 0.5,
        "{temperature_c} vs {vial}"
    );

    exec(&mut h, "heater off", DeviceCommand::HeaterOff).await;
    exec(&mut h, "stir off", DeviceCommand::StirOff).await;
    wait_for(&rig, "heater and motor off", |m, now| {
        let s = m.hotplate_status(now, 0).unwrap();
        !s.heating && !s.stirring
    })
    .await;
    // Safe state after heating again.
    exec(
        &mut h,
        "heat",
        DeviceCommand::SetTemperature {
            temperature_c: 50.0,
        },
    )
    .await;
    exec(
        &mut h,
        "stir",
        DeviceCommand::SetStirSpeed { speed_rpm: 300.0 },
    )
    .await;
    wait_for(&rig, "heating again", |m, now| {
        let s = m.hotplate_status(now, 0).unwrap();
        s.heating && s.stirring
    })
    .await;
    ok("safe state", step("safe", h.safe_state()).await);
    wait_for(&rig, "safe: heater and motor off", |m, now| {
        let s = m.hotplate_status(now, 0).unwrap();
        !s.heating && !s.stirring
    })
    .await;
    step("stop", h.stop()).await;
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplate_watchdog_switches_off_when_the_driver_goes_quiet() {
    let mut rig = Rig::start(RigConfig::default()).await;
    rig.options.hotplate.watchdog_s = 20;
    let mut h = rig.driver("hotplate");
    start(&mut h, "start").await;
    exec(
        &mut h,
        "heat",
        DeviceCommand::SetTemperature {
            temperature_c: 60.0,
        },
    )
    .await;
    wait_for(&rig, "heating", |m, now| {
        m.hotplate_status(now, 0).unwrap().heating
    })
    .await;
    // 20 virtual s of silence: 0.4 real s at warp 50.
    wait_for(&rig, "watchdog trip", |m, now| {
        let s = m.hotplate_status(now, 0).unwrap();
        s.watchdog_tripped && !s.heating
    })
    .await;
    rig.shutdown().await;
}

mod hotplate_faults {
    use super::*;

    async fn started(rig: &mut Rig) -> AnyInstrument {
        let mut h = rig.driver("hotplate");
        start(&mut h, "hotplate").await;
        h
    }

    const COLD: [(&str, f64); 3] = [
        ("temperature_c", 22.0),
        ("plate_temperature_c", 22.0),
        ("stir_speed_rpm", 0.0),
    ];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_within_the_budget_still_works_and_beyond_it_times_out() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut h = started(&mut rig).await;
        let latency = rig.virtual_ms(100);
        rig.set_faults("hotplate", faults(|f| f.latency_ms = latency));
        let t0 = Instant::now();
        let t = poll(&mut h, "poll").await;
        // Four queries, each delayed.
        assert!(
            t0.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(value(&t, "temperature_c"), 22.0);
        let latency = rig.virtual_ms(2000);
        rig.set_faults("hotplate", faults(|f| f.latency_ms = latency));
        let e = step("poll", h.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        rig.faults("hotplate").clear().unwrap();
        recovers(&mut h, "poll after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_and_garbled_bytes_never_give_a_wrong_reading() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut h = started(&mut rig).await;
        rig.set_faults("hotplate", faults(|f| f.drop_probability = 0.03));
        // NAMUR values come with one decimal.
        let cold: Vec<(&str, f64, String)> = COLD
            .iter()
            .map(|&(name, v)| (name, v, format!("{v:.1}")))
            .collect();
        // NAMUR has no checksum: the driver holds each channel to its printed decimals and refuses a
        // temperature that moved faster than a hotplate can (a lost digit: 3 of 25 polls accepted a wrong
        // reading before those checks).
        let (failed, wrong) =
            probe_under_damage(&rig, &mut h, "hotplate", "hotplate dropped", 25, &cold, 0.0).await;
        assert!(failed > 0, "the damage was never felt (no error, no retry)");
        assert_eq!(wrong, 0, "a wrong reading was accepted from a dropped byte");
        rig.set_faults("hotplate", faults(|f| f.garble_probability = 0.03));
        // A garbled last digit within 0.2 K is within what physics allows between two readings: counted
        // and printed, not refused.
        let (failed, _) =
            probe_under_damage(&rig, &mut h, "hotplate", "hotplate garbled", 25, &cold, 0.0).await;
        assert!(failed > 0, "the damage was never felt (no error, no retry)");
        rig.faults("hotplate").clear().unwrap();
        recovers(&mut h, "clean").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_reply_is_a_typed_timeout() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut h = started(&mut rig).await;
        rig.set_faults("hotplate", faults(|f| f.no_reply = true));
        let t0 = Instant::now();
        let e = step("poll", h.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        let e = step("start", h.start()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        rig.faults("hotplate").clear().unwrap();
        start(&mut h, "start after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unplugged_is_a_lost_connection_and_replug_recovers() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut h = started(&mut rig).await;
        unplug_and_recover(&mut rig, &mut h, "hotplate", "hotplate").await;
        rig.shutdown().await;
    }

    /// NAMUR has no error reply: an IKA device in an error state switches heater and motor off and ignores
    /// `START_1`. The driver cannot see the code on the wire, but its readings stay honest: the plate does
    /// not heat, and telemetry says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_error_switches_heating_off_and_readings_stay_honest() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut h = started(&mut rig).await;
        rig.set_faults("hotplate", faults(|f| f.error_code = Some("E3".into())));
        exec(
            &mut h,
            "heat",
            DeviceCommand::SetTemperature {
                temperature_c: 90.0,
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = rig.model(|m, now| m.hotplate_status(now, 0).unwrap());
        assert!(!status.heating, "{status:?}");
        let t = poll(&mut h, "poll").await;
        assert_eq!(value(&t, "plate_temperature_c"), 22.0);
        rig.faults("hotplate").clear().unwrap();
        exec(
            &mut h,
            "heat after",
            DeviceCommand::SetTemperature {
                temperature_c: 90.0,
            },
        )
        .await;
        wait_for(&rig, "heating once the error is gone", |m, now| {
            m.hotplate_status(now, 0).unwrap().heating
        })
        .await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drift_moves_the_reading() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut h = started(&mut rig).await;
        // 360 C per virtual hour: 0.1 C per virtual s, 5 C per real second at warp 50.
        rig.set_faults("hotplate", faults(|f| f.drift_per_hour = 360.0));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a = value(&poll(&mut h, "poll").await, "plate_temperature_c");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = value(&poll(&mut h, "poll").await, "plate_temperature_c");
        assert!(a > 22.5 && b - a > 1.0, "22 -> {a} -> {b}");
        rig.shutdown().await;
    }
}

// ----- the spectrophotometer (SCPI over TCP) -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spectro_over_tcp_sees_each_dye_peak_where_it_absorbs() {
    let mut rig = Rig::start(RigConfig::default()).await;
    let mut s = rig.driver("spectro");
    let id = start(&mut s, "start").await;
    assert_eq!(id.manufacturer, "Photon Analytics");
    assert_eq!(id.model, "UV-2400 Probe");
    assert_eq!(id.serial, "PA24-0711385");
    assert_eq!(id.firmware, "3.2.1");
    assert_eq!(poll(&mut s, "poll").await.state, DeviceState::Idle);

    // The whole chain through the drivers: the gantry puts the head over a vial, a pump fills it, the
    // dip probe reads it. Each pure dye peaks at its band.
    rig.model(|m, now| {
        m.add_vial(now, "y", "A1").unwrap();
        m.add_vial(now, "r", "A2").unwrap();
        m.add_vial(now, "b", "W1").unwrap();
    });
    let mut g = rig.driver("gantry");
    start(&mut g, "gantry").await;
    exec(&mut g, "home", DeviceCommand::Home).await;
    for (pump, at, band) in [
        ("pump-yellow", A1, 430.0),
        ("pump-red", A2, 520.0),
        ("pump-blue", W1, 620.0),
    ] {
        exec(&mut g, "move", move_to(at.0, at.1, WORK_Z)).await;
        let mut p = rig.driver(pump);
        start(&mut p, pump).await;
        exec(
            &mut p,
            pump,
            DeviceCommand::Dispense {
                volume_ul: 300.0,
                rate_ul_per_min: 1500.0,
            },
        )
        .await;
        let spectrum = exec(
            &mut s,
            "spectrum",
            DeviceCommand::Spectrum {
                start_nm: 380.0,
                stop_nm: 780.0,
                step_nm: 2.0,
            },
        )
        .await;
        let Outcome::Spectrum {
            wavelengths_nm,
            absorbance: a,
        } = &spectrum
        else {
            unreachable!()
        };
        assert_eq!(wavelengths_nm.len(), 201);
        let peak = peak_nm(&spectrum);
        assert!((peak - band).abs() <= 6.0, "{pump}: peak at {peak} nm");
        let top = a.iter().copied().fold(f64::MIN, f64::max);
        assert!((2.0..3.1).contains(&top), "{pump}: peak {top} AU");
        let single = absorbance(
            exec(
                &mut s,
                "absorbance",
                DeviceCommand::Absorbance {
                    wavelength_nm: band,
                },
            )
            .await,
        );
        assert!((single - top).abs() < 0.1, "{single} vs {top}");
        step("pump stop", p.stop()).await;
    }
    ok("safe", step("safe", s.safe_state()).await);
    step("stop", s.stop()).await;
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spectro_without_a_sample_reports_the_instruments_error() {
    let mut rig = Rig::start(RigConfig::default()).await;
    let mut s = rig.driver("spectro");
    start(&mut s, "start").await;
    match step(
        "absorbance",
        s.execute(&DeviceCommand::Absorbance {
            wavelength_nm: 500.0,
        }),
    )
    .await
    {
        Err(DriverError::Device { code, message, .. }) => {
            assert_eq!(code, "-200", "{message}");
            assert!(message.contains("no sample"), "{message}");
        }
        other => panic!("expected the execution error: {other:?}"),
    }
    rig.shutdown().await;
}

mod spectro_faults {
    use super::*;

    /// A spectro driver reading a red sample under the head, and its absorbance at 520 nm.
    async fn reading_red(rig: &mut Rig) -> (AnyInstrument, f64) {
        sample_under_head(rig, Dye::Red, 400.0).await;
        let mut s = rig.driver("spectro");
        start(&mut s, "spectro").await;
        let a = absorbance(
            exec(
                &mut s,
                "absorbance",
                DeviceCommand::Absorbance {
                    wavelength_nm: 520.0,
                },
            )
            .await,
        );
        assert!(a > 2.0, "{a}");
        (s, a)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_within_the_budget_still_works_and_beyond_it_times_out() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let (mut s, a) = reading_red(&mut rig).await;
        let latency = rig.virtual_ms(200);
        rig.set_faults("spectro", faults(|f| f.latency_ms = latency));
        let t0 = Instant::now();
        let got = absorbance(
            exec(
                &mut s,
                "absorbance",
                DeviceCommand::Absorbance {
                    wavelength_nm: 520.0,
                },
            )
            .await,
        );
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!((got - a).abs() < 0.02, "{got} vs {a}");
        // *OPC? gets 1 s: a 3 s delay is a typed timeout.
        let latency = rig.virtual_ms(3000);
        rig.set_faults("spectro", faults(|f| f.latency_ms = latency));
        let e = step("poll", s.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        rig.faults("spectro").clear().unwrap();
        recovers(&mut s, "poll after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_and_garbled_bytes_never_give_a_wrong_absorbance() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let (mut s, a) = reading_red(&mut rig).await;
        for (what, reads, f) in [
            // A garbled reply costs a 5 s measurement budget before the error queue is read: fewer reads.
            ("dropped", 40, faults(|f| f.drop_probability = 0.05)),
            ("garbled", 15, faults(|f| f.garble_probability = 0.05)),
        ] {
            rig.set_faults("spectro", f);
            let damage_before = rig.line_damage("spectro");
            let (mut failed, mut wrong) = (0, 0);
            for i in 0..reads {
                let r = step(
                    what,
                    s.execute(&DeviceCommand::Absorbance {
                        wavelength_nm: 520.0,
                    }),
                )
                .await;
                match r {
                    Ok(out) => {
                        // SCPI answers with four decimals.
                        let what = format!("spectro {what}: probe {i}");
                        if !judge(
                            &what,
                            "absorbance",
                            absorbance(out),
                            a,
                            &format!("{a:.4}"),
                            0.02,
                        ) {
                            wrong += 1;
                        }
                    }
                    Err(e) => {
                        assert!(!e.is_connection_lost(), "{what}: {e}");
                        failed += 1;
                    }
                }
            }
            let absorbed = rig.line_damage("spectro") - damage_before;
            println!(
                "spectro {what}: {reads} reads, {failed} typed errors, {absorbed} frames/bytes/timeouts \
                 absorbed by the port, {wrong} undetectable corruptions accepted"
            );
            assert!(
                failed > 0 || absorbed > 0 || wrong > 0,
                "{what}: the damage was never felt (no error, no retry)"
            );
        }
        rig.faults("spectro").clear().unwrap();
        recovers(&mut s, "clean").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_reply_is_a_typed_timeout() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut s = rig.driver("spectro");
        start(&mut s, "start").await;
        rig.set_faults("spectro", faults(|f| f.no_reply = true));
        let t0 = Instant::now();
        let e = step("poll", s.poll()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        let e = step("start", s.start()).await.unwrap_err();
        assert!(is_timeout(&e), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        rig.faults("spectro").clear().unwrap();
        start(&mut s, "start after").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unplugged_is_a_lost_connection_and_replug_recovers() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let mut s = rig.driver("spectro");
        start(&mut s, "start").await;
        unplug_and_recover(&mut rig, &mut s, "spectro", "spectro").await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instrument_error_code_is_typed() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let (mut s, _) = reading_red(&mut rig).await;
        rig.set_faults("spectro", faults(|f| f.error_code = Some("-240".into())));
        match step(
            "absorbance",
            s.execute(&DeviceCommand::Absorbance {
                wavelength_nm: 520.0,
            }),
        )
        .await
        {
            Err(DriverError::Device { code, .. }) => assert_eq!(code, "-240"),
            other => panic!("expected -240 hardware error: {other:?}"),
        }
        rig.faults("spectro").clear().unwrap();
        exec(
            &mut s,
            "after",
            DeviceCommand::Absorbance {
                wavelength_nm: 520.0,
            },
        )
        .await;
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drift_moves_the_reading() {
        let mut rig = Rig::start(RigConfig::default()).await;
        let (mut s, a0) = reading_red(&mut rig).await;
        // 36 AU per virtual hour: 0.01 AU per virtual s, half an AU per real second at warp 50.
        rig.set_faults("spectro", faults(|f| f.drift_per_hour = 36.0));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cmd = DeviceCommand::Absorbance {
            wavelength_nm: 520.0,
        };
        let a1 = absorbance(exec(&mut s, "a1", cmd.clone()).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a2 = absorbance(exec(&mut s, "a2", cmd).await);
        assert!(a1 - a0 > 0.1 && a2 - a1 > 0.1, "{a0} -> {a1} -> {a2}");
        rig.shutdown().await;
    }
}
