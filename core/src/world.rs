//! The world model: one bevy_ecs `World` holding instruments and runs as entities, kept true by a fixed-rate
//! tick on its own OS thread. Every interface reads the snapshot the tick publishes; nothing here waits on an
//! instrument (readings arrive through watch channels that the instrument tasks write).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bevy_ecs::prelude::*;
use labctl_protocols::lab::{Interlock, Lab, TripAction};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::contract::RunState;
use crate::instruments::{InstrumentHandle, InstrumentView};
use crate::safety::EStop;
use crate::safety::interlock::{InstrumentFacts, evaluate};

/// An instrument entity's latest view.
#[derive(Component)]
pub struct InstrumentComponent {
    pub view: Arc<InstrumentView>,
    pub heartbeat: Duration,
    receiver: watch::Receiver<Arc<InstrumentView>>,
}

/// A run entity as the controller reports it.
#[derive(Component, Clone, Debug, Serialize)]
pub struct RunComponent {
    pub run_id: String,
    pub proposal_id: String,
    pub state: RunState,
    pub current_step: Option<String>,
    /// The instruments this run has reserved.
    pub instruments: Vec<String>,
    /// The run's vessels and the deck position each stands at now.
    #[serde(skip)]
    pub vessels: Vec<(String, String)>,
}

/// A vessel on the deck, owned by a run.
#[derive(Component, Clone, Debug, Serialize)]
pub struct VesselComponent {
    pub vessel: String,
    pub run_id: String,
    pub position: String,
}

/// What the tick tells the controller about an interlock: it tripped (and again whenever one of its
/// instruments is re-armed while the condition still holds), or its condition no longer holds.
#[derive(Debug, Clone)]
pub enum InterlockEvent {
    Tripped(Trip),
    Cleared { interlock: String },
}

/// A tripped interlock.
#[derive(Debug, Clone)]
pub struct Trip {
    pub interlock: String,
    pub instrument: String,
    pub reason: String,
    pub action: TripAction,
    pub safe_state: Vec<String>,
}

/// Lateness of tick wake-ups against their absolute deadlines, in 1 us buckets up to 20 ms.
#[derive(Resource, Clone)]
pub struct TickStats {
    buckets: Box<[u32; 20_000]>,
    over: u64,
    pub ticks: u64,
    pub skipped: u64,
    pub max: Duration,
}

impl Default for TickStats {
    fn default() -> Self {
        TickStats {
            buckets: Box::new([0; 20_000]),
            over: 0,
            ticks: 0,
            skipped: 0,
            max: Duration::ZERO,
        }
    }
}

impl TickStats {
    /// Back to no ticks recorded, in place (no allocation on the tick thread).
    fn clear(&mut self) {
        self.buckets.fill(0);
        self.over = 0;
        self.ticks = 0;
        self.skipped = 0;
        self.max = Duration::ZERO;
    }

    fn record(&mut self, lateness: Duration) {
        self.ticks += 1;
        self.max = self.max.max(lateness);
        match self.buckets.get_mut(lateness.as_micros() as usize) {
            Some(b) => *b = b.saturating_add(1),
            None => self.over += 1,
        }
    }

    /// The lateness below which `q` (0..1) of the ticks woke, to the microsecond.
    pub fn quantile(&self, q: f64) -> Duration {
        let total = self.ticks.max(1) as f64;
        let mut seen = 0u64;
        for (us, &n) in self.buckets.iter().enumerate() {
            seen += u64::from(n);
            if seen as f64 >= q * total {
                return Duration::from_micros(us as u64);
            }
        }
        self.max
    }

    pub fn summary(&self) -> TickSummary {
        TickSummary {
            ticks: self.ticks,
            skipped: self.skipped,
            p50_us: self.quantile(0.5).as_micros() as u64,
            p99_us: self.quantile(0.99).as_micros() as u64,
            max_us: self.max.as_micros() as u64,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TickSummary {
    pub ticks: u64,
    pub skipped: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// What every interface reads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LabSnapshot {
    pub lab_id: String,
    pub estop_latched: bool,
    /// Shared with the instrument tasks: publishing a snapshot copies no instrument's data.
    pub instruments: Vec<Arc<InstrumentView>>,
    pub runs: Vec<RunComponent>,
    pub vessels: Vec<VesselComponent>,
    /// Interlocks whose condition holds now, by name (their instruments are inhibited).
    pub interlocks_tripped: Vec<String>,
    pub tick: TickSummary,
}

#[derive(Resource)]
struct Interlocks(Vec<WatchedInterlock>);

struct WatchedInterlock {
    interlock: Interlock,
    /// The watched instrument's entity, looked up once: a tick never searches the instruments.
    instrument: Option<Entity>,
    tripped: bool,
    /// Since the trip, the watched instrument has been seen disarmed (its safe state done): being armed
    /// again after that is a re-arm while the condition holds.
    safe_seen: bool,
    /// Its condition has been judged once. The first judgement is reported even when clear, so the
    /// controller ends an override restored from the journal whose condition no longer holds.
    judged: bool,
}

#[derive(Resource)]
struct Outputs {
    trips: mpsc::UnboundedSender<InterlockEvent>,
    snapshot: watch::Sender<Arc<LabSnapshot>>,
    run_updates: mpsc::UnboundedReceiver<RunComponent>,
    estop: EStop,
    lab_id: String,
    changed: bool,
    last_published: Option<Instant>,
    /// The instrument entities in the order of their ids, as snapshots list them (sorted once, at start).
    instrument_order: Vec<Entity>,
}

fn sync_instruments(mut q: Query<&mut InstrumentComponent>, mut out: ResMut<Outputs>) {
    for mut inst in &mut q {
        if inst.receiver.has_changed().unwrap_or(false) {
            let view = inst.receiver.borrow_and_update().clone();
            inst.view = view;
            out.changed = true;
        }
    }
}

fn sync_runs(
    mut commands: Commands,
    mut runs: Query<(Entity, &mut RunComponent)>,
    vessels: Query<(Entity, &VesselComponent)>,
    mut out: ResMut<Outputs>,
    mut latest: Local<Vec<RunComponent>>,
) {
    // Commands are applied after the system: coalesce this tick's updates so a run gets one entity.
    latest.clear();
    while let Ok(update) = out.run_updates.try_recv() {
        match latest.iter_mut().find(|r| r.run_id == update.run_id) {
            Some(slot) => *slot = update,
            None => latest.push(update),
        }
    }
    if !latest.is_empty() {
        out.changed = true;
    }
    for update in latest.drain(..) {
        // A run's vessels follow its latest update (despawned with the run when it ends).
        for (entity, v) in &vessels {
            if v.run_id == update.run_id {
                commands.entity(entity).despawn();
            }
        }
        if !update.state.is_terminal() {
            for (vessel, position) in &update.vessels {
                commands.spawn(VesselComponent {
                    vessel: vessel.clone(),
                    run_id: update.run_id.clone(),
                    position: position.clone(),
                });
            }
        }
        match runs.iter_mut().find(|(_, r)| r.run_id == update.run_id) {
            // Finished runs stay in the journal; the live model keeps only the active ones.
            Some((entity, _)) if update.state.is_terminal() => commands.entity(entity).despawn(),
            Some((_, mut run)) => *run = update,
            None if update.state.is_terminal() => {}
            None => {
                commands.spawn(update);
            }
        }
    }
}

fn check_interlocks(
    q: Query<&InstrumentComponent>,
    mut interlocks: ResMut<Interlocks>,
    mut out: ResMut<Outputs>,
) {
    let now = Instant::now();
    for watched in interlocks.0.iter_mut() {
        let (il, tripped, safe_seen, judged) = (
            &watched.interlock,
            &mut watched.tripped,
            &mut watched.safe_seen,
            &mut watched.judged,
        );
        let Some(inst) = watched.instrument.and_then(|e| q.get(e).ok()) else {
            continue;
        };
        let facts = InstrumentFacts {
            values: &inst.view.values,
            state: inst.view.state.as_ref(),
            silent_for: inst
                .view
                .last_seen
                .map(|t| now.saturating_duration_since(t)),
            heartbeat: inst.heartbeat,
            busy: inst.view.busy,
            online: inst.view.connection == crate::instruments::Connection::Online,
        };
        let verdict = evaluate(il, &facts);
        let first = !std::mem::replace(judged, true);
        if *tripped && !inst.view.armed {
            *safe_seen = true;
        }
        let rearmed = *tripped && *safe_seen && inst.view.armed;
        match verdict {
            // Level, not edge: a trip is sent when the condition starts to hold, and again whenever the
            // watched instrument is re-armed while it still holds (its safe state is requested again).
            Some(reason) if !*tripped || rearmed => {
                if *tripped {
                    tracing::warn!(interlock = %il.name, %reason, "instrument re-armed while its interlock holds: tripped again");
                } else {
                    tracing::warn!(interlock = %il.name, %reason, "interlock tripped");
                }
                out.changed |= !*tripped;
                *tripped = true;
                *safe_seen = false;
                let safe_state = if il.safe_state.is_empty() {
                    vec![il.instrument.clone()]
                } else {
                    il.safe_state.clone()
                };
                let _ = out.trips.send(InterlockEvent::Tripped(Trip {
                    interlock: il.name.clone(),
                    instrument: il.instrument.clone(),
                    reason,
                    action: il.action,
                    safe_state,
                }));
            }
            None if *tripped || first => {
                if *tripped {
                    tracing::info!(interlock = %il.name, "interlock condition cleared");
                }
                *tripped = false;
                out.changed = true;
                let _ = out.trips.send(InterlockEvent::Cleared {
                    interlock: il.name.clone(),
                });
            }
            _ => {}
        }
    }
}

fn publish_snapshot(
    instruments: Query<&InstrumentComponent>,
    runs: Query<&RunComponent>,
    vessels: Query<&VesselComponent>,
    interlocks: Res<Interlocks>,
    stats: Res<TickStats>,
    mut out: ResMut<Outputs>,
) {
    let estop = out.estop.is_latched();
    let stale = out
        .last_published
        .is_none_or(|t| t.elapsed() > Duration::from_millis(500));
    let estop_changed = out.snapshot.borrow().estop_latched != estop;
    // Build a new snapshot only when something changed (and twice a second for the tick figures).
    if !(out.changed || stale || estop_changed) {
        return;
    }
    let mut snap = LabSnapshot {
        lab_id: out.lab_id.clone(),
        estop_latched: estop,
        instruments: out
            .instrument_order
            .iter()
            .filter_map(|e| instruments.get(*e).ok())
            .map(|i| i.view.clone())
            .collect(),
        runs: runs.iter().cloned().collect(),
        vessels: vessels.iter().cloned().collect(),
        interlocks_tripped: interlocks
            .0
            .iter()
            .filter(|w| w.tripped)
            .map(|w| w.interlock.name.clone())
            .collect(),
        tick: stats.summary(),
    };
    snap.runs.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    snap.vessels
        .sort_by(|a, b| (&a.run_id, &a.vessel).cmp(&(&b.run_id, &b.vessel)));
    out.snapshot.send_replace(Arc::new(snap));
    out.changed = false;
    out.last_published = Some(Instant::now());
}

/// The running tick thread.
pub struct TickThread {
    stop: Arc<AtomicBool>,
    /// Asks the tick to start its lateness statistics afresh (at its next tick).
    restart_stats: Arc<AtomicBool>,
    join: Option<TickJoin>,
}

/// What runs the tick.
enum TickJoin {
    Thread(std::thread::JoinHandle<TickStats>),
    /// The core's own tests: a task on tokio's paused clock (see [`TickDriver::PausedRuntime`]).
    #[cfg(test)]
    Task(tokio::task::JoinHandle<TickStats>),
}

/// Where the tick runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TickDriver {
    /// Its own thread, on absolute deadlines of the real clock: production, and every test outside the core.
    Thread,
    /// A task on the test's tokio runtime, on absolute deadlines of tokio's clock, so that the controller's
    /// unit tests run the whole controller, interlocks included, on paused time. Same systems, same order.
    #[cfg(test)]
    PausedRuntime,
}

impl TickThread {
    /// Stops the tick and returns its lateness statistics (none from a tick on the test runtime).
    pub fn stop(mut self) -> Option<TickStats> {
        self.stop.store(true, Ordering::SeqCst);
        match self.join.take()? {
            TickJoin::Thread(join) => join.join().ok(),
            #[cfg(test)]
            TickJoin::Task(task) => {
                task.abort();
                None
            }
        }
    }

    /// Starts the lateness statistics afresh from the next tick, so a measurement window leaves out the
    /// start (connects, the safe state sent to every instrument).
    pub fn restart_stats(&self) {
        self.restart_stats.store(true, Ordering::Relaxed);
    }
}

impl Drop for TickThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

pub struct TickConfig {
    pub period: Duration,
    /// Spin this long before each deadline instead of sleeping (trades a core for lower jitter).
    pub spin: Duration,
    /// Run the tick thread under `SCHED_FIFO` at this priority (1-99), ahead of every ordinary thread:
    /// the I/O tasks, the gateways and anything else on the machine then wait for the tick, not the
    /// reverse. Needs `CAP_SYS_NICE` (or root); without it the tick runs at normal priority and says so.
    pub realtime_priority: Option<u8>,
}

impl Default for TickConfig {
    fn default() -> Self {
        TickConfig {
            period: Duration::from_millis(10),
            spin: Duration::ZERO,
            realtime_priority: None,
        }
    }
}

/// Channels the tick feeds.
pub struct TickIo {
    pub trips: mpsc::UnboundedSender<InterlockEvent>,
    pub snapshot: watch::Sender<Arc<LabSnapshot>>,
    pub run_updates: mpsc::UnboundedReceiver<RunComponent>,
    pub estop: EStop,
}

/// Builds the world from the lab and the instrument tasks, and starts the tick thread.
pub fn start_tick(
    lab: &Lab,
    instruments: &[InstrumentHandle],
    io: TickIo,
    config: TickConfig,
) -> TickThread {
    start_tick_on(lab, instruments, io, config, TickDriver::Thread)
}

pub(crate) fn start_tick_on(
    lab: &Lab,
    instruments: &[InstrumentHandle],
    io: TickIo,
    config: TickConfig,
    driver: TickDriver,
) -> TickThread {
    let mut world = World::new();
    let mut entities = std::collections::HashMap::new();
    for h in instruments {
        let heartbeat = lab
            .instrument(&h.id)
            .map(|i| Duration::from_secs_f64(i.heartbeat_s))
            .unwrap_or(Duration::from_secs(5));
        let receiver = h.subscribe();
        let view = receiver.borrow().clone();
        let entity = world
            .spawn(InstrumentComponent {
                view,
                heartbeat,
                receiver,
            })
            .id();
        entities.insert(h.id.clone(), entity);
    }
    let mut instrument_order: Vec<(&String, Entity)> =
        entities.iter().map(|(id, e)| (id, *e)).collect();
    instrument_order.sort();
    let instrument_order = instrument_order.into_iter().map(|(_, e)| e).collect();
    world.insert_resource(Interlocks(
        lab.interlocks
            .iter()
            .map(|i| WatchedInterlock {
                interlock: i.clone(),
                instrument: entities.get(&i.instrument).copied(),
                tripped: false,
                safe_seen: false,
                judged: false,
            })
            .collect(),
    ));
    world.insert_resource(TickStats::default());
    world.insert_resource(Outputs {
        trips: io.trips,
        snapshot: io.snapshot,
        run_updates: io.run_updates,
        estop: io.estop,
        lab_id: lab.lab_id.clone(),
        changed: true,
        last_published: None,
        instrument_order,
    });
    let mut schedule = Schedule::default();
    schedule.add_systems(
        (
            sync_instruments,
            sync_runs,
            check_interlocks,
            publish_snapshot,
        )
            .chain(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let restart_stats = Arc::new(AtomicBool::new(false));
    let flags = TickFlags {
        stop: Arc::clone(&stop),
        restart_stats: Arc::clone(&restart_stats),
    };
    let join = match driver {
        TickDriver::Thread => TickJoin::Thread(
            std::thread::Builder::new()
                .name("labctl-tick".into())
                .spawn(move || tick_loop(world, schedule, config, flags))
                .expect("spawning the tick thread"),
        ),
        #[cfg(test)]
        TickDriver::PausedRuntime => {
            TickJoin::Task(tokio::spawn(tick_task(world, schedule, config, flags)))
        }
    };
    TickThread {
        stop,
        restart_stats,
        join: Some(join),
    }
}

/// One tick: the lateness it started with goes into the statistics, then every system runs once.
fn tick_once(world: &mut World, schedule: &mut Schedule, flags: &TickFlags, lateness: Duration) {
    {
        let mut stats = world.resource_mut::<TickStats>();
        if flags.restart_stats.swap(false, Ordering::Relaxed) {
            stats.clear();
        }
        stats.record(lateness);
    }
    schedule.run(world);
}

/// The tick on the test's runtime: tokio's interval keeps absolute deadlines and skips missed ones, as the
/// thread does.
#[cfg(test)]
async fn tick_task(
    mut world: World,
    mut schedule: Schedule,
    config: TickConfig,
    flags: TickFlags,
) -> TickStats {
    let mut interval =
        tokio::time::interval_at(tokio::time::Instant::now() + config.period, config.period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !flags.stop.load(Ordering::Relaxed) {
        let deadline = interval.tick().await;
        let lateness = tokio::time::Instant::now().saturating_duration_since(deadline);
        tick_once(&mut world, &mut schedule, &flags, lateness);
    }
    world.remove_resource::<TickStats>().unwrap_or_default()
}

/// What the owner of the tick thread can ask of it.
struct TickFlags {
    stop: Arc<AtomicBool>,
    restart_stats: Arc<AtomicBool>,
}

fn tick_loop(
    mut world: World,
    mut schedule: Schedule,
    config: TickConfig,
    flags: TickFlags,
) -> TickStats {
    if let Some(priority) = config.realtime_priority {
        match realtime::make_current_thread_fifo(priority) {
            Ok(()) => tracing::info!(priority, "tick thread runs under SCHED_FIFO"),
            Err(e) => tracing::warn!(
                priority,
                error = %e,
                "tick thread stays at normal priority (SCHED_FIFO needs CAP_SYS_NICE)"
            ),
        }
    }
    let period = config.period;
    let mut deadline = Instant::now() + period;
    while !flags.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < deadline {
            let remaining = deadline - now;
            if remaining > config.spin {
                std::thread::sleep(remaining - config.spin);
            }
            while Instant::now() < deadline {
                std::hint::spin_loop();
            }
        }
        let lateness = Instant::now().saturating_duration_since(deadline);
        tick_once(&mut world, &mut schedule, &flags, lateness);
        deadline += period;
        // A tick that could not start before the next deadline is skipped, not run in a burst.
        let after = Instant::now();
        if after > deadline {
            let behind = after - deadline;
            let skip = (behind.as_nanos() / period.as_nanos().max(1)) as u32 + 1;
            world.resource_mut::<TickStats>().skipped += u64::from(skip);
            deadline += period * skip;
        }
    }
    world.remove_resource::<TickStats>().unwrap_or_default()
}

mod realtime {
    /// Moves the calling thread to `SCHED_FIFO` at `priority` (1-99).
    pub fn make_current_thread_fifo(priority: u8) -> std::io::Result<()> {
        let param = libc::sched_param {
            sched_priority: i32::from(priority.clamp(1, 99)),
        };
        // SAFETY: `param` is a valid sched_param for the call; pid 0 is the calling thread.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy of this process's thread named `name` (field 41 of its stat), once it exists.
    fn policy_of(name: &str) -> Option<u32> {
        for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let dir = entry.path();
            if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name) {
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                return stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(38)?
                    .parse()
                    .ok();
            }
        }
        None
    }

    #[test]
    fn a_tick_given_a_realtime_priority_runs_under_sched_fifo_where_allowed() {
        // Whether this process may use SCHED_FIFO at all (root or CAP_SYS_NICE), asked on a probe thread.
        let allowed = std::thread::spawn(|| realtime::make_current_thread_fifo(10))
            .join()
            .unwrap();
        let (trips, _trips) = mpsc::unbounded_channel();
        let (snapshot, _snapshots) = watch::channel(Arc::new(LabSnapshot::default()));
        let (_updates, run_updates) = mpsc::unbounded_channel();
        let io = TickIo {
            trips,
            snapshot,
            run_updates,
            estop: EStop::default(),
        };
        let config = TickConfig {
            realtime_priority: Some(10),
            ..TickConfig::default()
        };
        let tick = start_tick(&Lab::sim(), &[], io, config);
        let mut policy = None;
        for _ in 0..200 {
            policy = policy_of("labctl-tick");
            if policy == Some(libc::SCHED_FIFO as u32) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // It keeps ticking under the new policy.
        std::thread::sleep(Duration::from_millis(200));
        let stats = tick.stop().expect("the tick thread's statistics");
        assert!(stats.ticks > 0);
        match allowed {
            Ok(()) => assert_eq!(policy, Some(libc::SCHED_FIFO as u32)),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                assert_eq!(policy, Some(libc::SCHED_OTHER as u32));
            }
        }
    }

    #[test]
    fn quantiles_come_from_the_recorded_lateness() {
        let mut s = TickStats::default();
        for us in 1..=100u64 {
            s.record(Duration::from_micros(us));
        }
        assert_eq!(s.quantile(0.5), Duration::from_micros(50));
        assert_eq!(s.quantile(0.99), Duration::from_micros(99));
        assert_eq!(s.max, Duration::from_micros(100));
        s.record(Duration::from_millis(50));
        assert_eq!(s.over, 1);
        assert_eq!(s.max, Duration::from_millis(50));
        s.clear();
        s.record(Duration::from_micros(7));
        assert_eq!((s.ticks, s.over, s.skipped), (1, 0, 0));
        assert_eq!(
            (s.quantile(0.99), s.max),
            (Duration::from_micros(7), Duration::from_micros(7))
        );
    }
}
