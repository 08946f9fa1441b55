//! Instrument tasks: one tokio task per instrument owns its driver. Commands arrive over a bounded channel,
//! pass the e-stop latch and the envelope check right here, just before the driver, and readings leave
//! through a watch channel that the tick and the run tasks read without ever waiting on the instrument.

pub mod fake;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What an instrument view and the journal say about an instrument, for the faces (which never link the
/// drivers).
pub use labctl_drivers::{DeviceCommand, DeviceState, Identity};
use labctl_drivers::{DriverError, Instrument, Outcome};
use labctl_protocols::lab;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::safety::{EStop, SafetyViolation, check_command};

pub use crate::contract::messages::Connection;

/// Everything known about an instrument, published after every change.
#[derive(Debug, Clone, Serialize)]
pub struct InstrumentView {
    pub id: String,
    pub connection: Connection,
    pub identity: Option<Identity>,
    pub state: Option<DeviceState>,
    pub values: Vec<(&'static str, f64)>,
    /// When it last answered (monotonic; not serialised).
    #[serde(skip)]
    pub last_seen: Option<Instant>,
    /// A command is in flight.
    pub busy: bool,
    /// Ready for commands: false from a safe state until the driver's recovery before the next command.
    pub armed: bool,
}

impl From<&InstrumentView> for crate::contract::messages::InstrumentState {
    fn from(view: &InstrumentView) -> Self {
        crate::contract::messages::InstrumentState {
            id: view.id.clone(),
            connection: view.connection.clone(),
            identity: view.identity.clone(),
            state: view.state.clone(),
            values: view
                .values
                .iter()
                .map(|(name, value)| ((*name).to_owned(), *value))
                .collect(),
            busy: view.busy,
            armed: view.armed,
        }
    }
}

/// Why a command did not run or did not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Safety(#[from] SafetyViolation),
    #[error("{0}")]
    Driver(String),
    #[error("{0}: not connected")]
    Offline(String),
    #[error("{0}: interrupted by a safe-state request")]
    Interrupted(String),
    /// The command was issued before the instrument's latest safe-state request: it is never sent.
    #[error("{0}: not sent: a safe-state request came after it was issued")]
    Superseded(String),
    #[error("{0}: cannot recover from the safe state: {1}")]
    Recovery(String, String),
    #[error("{0}: instrument task has stopped")]
    Gone(String),
}

/// A safe-state request, optionally with someone waiting to hear it was done (`true`) or failed.
type SafeRequest = Option<oneshot::Sender<bool>>;

struct Exec {
    command: DeviceCommand,
    /// The safe-state epoch the command was issued under (see [`InstrumentHandle::epoch`]).
    epoch: u64,
    reply: oneshot::Sender<Result<Outcome, CommandError>>,
}

/// The controller's side of an instrument task.
#[derive(Clone)]
pub struct InstrumentHandle {
    pub id: String,
    exec: mpsc::Sender<Exec>,
    safe: mpsc::Sender<SafeRequest>,
    view: watch::Receiver<Arc<InstrumentView>>,
    /// Shared by every clone: [`InstrumentHandle::stop`] ends the task even while clones live on.
    stop: Arc<watch::Sender<bool>>,
    /// Raised by every safe-state request, in the requester's task, before the request is queued.
    epoch: Arc<AtomicU64>,
}

impl InstrumentHandle {
    /// Runs a command issued now; the envelope and e-stop checks happen in the instrument task.
    pub async fn execute(&self, command: DeviceCommand) -> Result<Outcome, CommandError> {
        self.execute_in_epoch(command, self.epoch()).await
    }

    /// Runs a command issued under `epoch` (read with [`InstrumentHandle::epoch`] when the caller decided
    /// to send it). If a safe state was requested since, the task refuses it at the last moment before
    /// the driver: safe is final for every command already on its way.
    pub async fn execute_in_epoch(
        &self,
        command: DeviceCommand,
        epoch: u64,
    ) -> Result<Outcome, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.exec
            .send(Exec {
                command,
                epoch,
                reply,
            })
            .await
            .map_err(|_| CommandError::Gone(self.id.clone()))?;
        rx.await.map_err(|_| CommandError::Gone(self.id.clone()))?
    }

    /// The safe-state epoch: how many safe states have been requested so far.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Asks for the safe state now, interrupting any command in flight. Never waits.
    pub fn request_safe_state(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        // A full queue already holds a pending safe-state request: that one will do.
        let _ = self.safe.try_send(None);
    }

    /// Puts the instrument in its safe state and waits (at most `timeout`) until the driver says it is.
    /// The epoch is raised when this is called, not when the future is first polled: commands issued
    /// before the call are superseded however late the future runs.
    pub fn safe_state(&self, timeout: Duration) -> impl Future<Output = bool> + Send + 'static {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let safe = self.safe.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            let sent = tokio::time::timeout(timeout, safe.send(Some(tx))).await;
            if !matches!(sent, Ok(Ok(()))) {
                return false;
            }
            matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(true)))
        }
    }

    pub fn view(&self) -> Arc<InstrumentView> {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<InstrumentView>> {
        self.view.clone()
    }

    /// Ends the instrument's task for every clone of this handle: the driver stops (its lifecycle's
    /// `stop`: the port closed) without any new command. Returns whether the task ended within `within`.
    /// Commands sent afterwards are told the task is gone.
    pub async fn stop(&self, within: Duration) -> bool {
        let mut view = self.view.clone();
        self.stop.send_replace(true);
        tokio::time::timeout(within, async { while view.changed().await.is_ok() {} })
            .await
            .is_ok()
    }
}

/// Longest wait between reconnection attempts.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(10);

/// How often an idle instrument is polled, and how long to wait before reconnecting.
#[derive(Debug, Clone, Copy)]
pub struct TaskTiming {
    pub poll: Duration,
    pub reconnect: Duration,
}

impl Default for TaskTiming {
    fn default() -> Self {
        TaskTiming {
            poll: Duration::from_millis(100),
            reconnect: Duration::from_millis(500),
        }
    }
}

/// Starts the task that owns `driver`. The task runs until every handle is dropped or one is stopped.
pub fn spawn<D: Instrument>(
    config: lab::Instrument,
    driver: D,
    estop: EStop,
    timing: TaskTiming,
) -> InstrumentHandle {
    let (exec_tx, exec_rx) = mpsc::channel(16);
    let (safe_tx, safe_rx) = mpsc::channel(4);
    let (view_tx, view_rx) = watch::channel(Arc::new(InstrumentView {
        id: config.id.clone(),
        connection: Connection::Connecting,
        identity: None,
        state: None,
        values: Vec::new(),
        last_seen: None,
        busy: false,
        armed: false,
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let epoch = Arc::new(AtomicU64::new(0));
    let handle = InstrumentHandle {
        id: config.id.clone(),
        exec: exec_tx,
        safe: safe_tx,
        view: view_rx,
        stop: Arc::new(stop_tx),
        epoch: Arc::clone(&epoch),
    };
    let channels = Channels {
        exec: exec_rx,
        safe: safe_rx,
        stop: stop_rx,
        epoch,
    };
    tokio::spawn(run(config, driver, estop, timing, channels, view_tx));
    handle
}

enum Event {
    Safe(SafeRequest),
    Exec(Exec),
    Poll,
    Closed,
}

/// Resolves once a handle has asked the task to stop (or every handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across the task's awaits.
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}

/// What the handles send the task.
struct Channels {
    exec: mpsc::Receiver<Exec>,
    safe: mpsc::Receiver<SafeRequest>,
    stop: watch::Receiver<bool>,
    epoch: Arc<AtomicU64>,
}

async fn run<D: Instrument>(
    config: lab::Instrument,
    mut driver: D,
    estop: EStop,
    timing: TaskTiming,
    channels: Channels,
    view: watch::Sender<Arc<InstrumentView>>,
) {
    let Channels {
        exec: mut exec_rx,
        safe: mut safe_rx,
        stop: mut stop_rx,
        epoch,
    } = channels;
    // A command is current when no safe state was requested after it was issued.
    let current = |e: u64| e == epoch.load(Ordering::SeqCst);
    let id = config.id.clone();
    let mut online = false;
    // Reconnect attempts back off (doubling up to a ceiling) and each new reason is logged once.
    let mut backoff = timing.reconnect;
    let mut last_error = String::new();
    let mut poll = tokio::time::interval(timing.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Commands go first, but never for so long that the instrument goes unpolled: its readings and its
    // proof of life come from the polls.
    let mut last_poll = Instant::now();
    // Callers waiting for a safe state asked for while offline: the connect makes the instrument safe, and
    // they hear how that went (or give up on their own timeout).
    let mut waiting_for_connect: Vec<oneshot::Sender<bool>> = Vec::new();
    loop {
        if !online {
            match driver.start().await {
                Ok(identity) => {
                    tracing::info!(instrument = %id, model = %identity.model, firmware = %identity.firmware, "connected");
                    // Whatever state it was left in, a (re)connected instrument starts safe.
                    let safe = driver.safe_state().await;
                    if let Err(e) = &safe {
                        tracing::warn!(instrument = %id, error = %e, "safe state after connect failed");
                    }
                    for done in waiting_for_connect.drain(..) {
                        let _ = done.send(safe.is_ok());
                    }
                    online = true;
                    backoff = timing.reconnect;
                    last_error.clear();
                    update(&view, |v| {
                        v.connection = Connection::Online;
                        v.identity = Some(identity);
                        v.last_seen = Some(Instant::now());
                        v.armed = false;
                    });
                }
                Err(e) => {
                    let reason = e.to_string();
                    if reason != last_error {
                        tracing::warn!(instrument = %id, error = %reason, "cannot connect; retrying with backoff");
                        last_error = reason.clone();
                    }
                    update(&view, |v| v.connection = Connection::Lost(reason));
                    // Refuse commands while offline, but keep listening so callers never hang.
                    let deadline = tokio::time::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            _ = stopped(&mut stop_rx) => {
                                driver.stop().await;
                                return;
                            }
                            req = exec_rx.recv() => match req {
                                Some(req) => { let _ = req.reply.send(Err(CommandError::Offline(id.clone()))); }
                                None => return,
                            },
                            s = safe_rx.recv() => if let Some(Some(done)) = s {
                                waiting_for_connect.retain(|d| !d.is_closed());
                                waiting_for_connect.push(done);
                            },
                        }
                    }
                    continue;
                }
            }
        }
        let poll_overdue = last_poll.elapsed() >= timing.poll.saturating_mul(2);
        let event = tokio::select! {
            biased;
            s = safe_rx.recv() => match s { Some(r) => Event::Safe(r), None => Event::Closed },
            _ = std::future::ready(()), if poll_overdue => Event::Poll,
            _ = stopped(&mut stop_rx) => Event::Closed,
            req = exec_rx.recv() => match req { Some(r) => Event::Exec(r), None => Event::Closed },
            _ = poll.tick() => Event::Poll,
        };
        match event {
            Event::Closed => {
                driver.stop().await;
                return;
            }
            Event::Safe(done) => {
                update(&view, |v| v.armed = false);
                let result = driver.safe_state().await;
                if let Err(e) = &result {
                    tracing::error!(instrument = %id, error = %e, "safe state failed");
                    online = !lost(&view, e);
                }
                if let Some(done) = done {
                    let _ = done.send(result.is_ok());
                }
            }
            Event::Poll => {
                let polled = driver.poll().await;
                // Counted from the poll's end: a slow instrument's poll must not make the next one due
                // at once, or commands would wait behind polls for ever.
                last_poll = Instant::now();
                poll.reset();
                match polled {
                    Ok(t) => update(&view, |v| {
                        v.state = Some(t.state);
                        v.values = t.values;
                        v.last_seen = Some(Instant::now());
                    }),
                    Err(e) => {
                        tracing::warn!(instrument = %id, error = %e, "poll failed");
                        online = !lost(&view, &e);
                    }
                }
            }
            Event::Exec(req) => {
                if !current(req.epoch) {
                    tracing::info!(instrument = %id, command = ?req.command, "command issued before a safe state: not sent");
                    let _ = req.reply.send(Err(CommandError::Superseded(id.clone())));
                    continue;
                }
                let checked = if estop.is_latched() {
                    Err(SafetyViolation::EStopLatched)
                } else {
                    check_command(&config, &req.command)
                };
                if let Err(violation) = checked {
                    tracing::warn!(instrument = %id, %violation, "command refused");
                    let _ = req.reply.send(Err(violation.into()));
                    continue;
                }
                if !view.borrow().armed {
                    // The first command after a safe state: the driver brings the instrument back first.
                    if let Err(e) = driver.recover().await {
                        tracing::error!(instrument = %id, error = %e, "recovery from the safe state failed");
                        online = !lost(&view, &e);
                        let _ = req
                            .reply
                            .send(Err(CommandError::Recovery(id.clone(), e.to_string())));
                        continue;
                    }
                    update(&view, |v| v.armed = true);
                    // A safe state asked for while recovering wins over the command.
                    if !current(req.epoch) {
                        let _ = req.reply.send(Err(CommandError::Superseded(id.clone())));
                        continue;
                    }
                }
                update(&view, |v| v.busy = true);
                let outcome = tokio::select! {
                    biased;
                    s = safe_rx.recv() => Err(s.flatten()),
                    r = driver.execute(&req.command) => Ok(r),
                };
                update(&view, |v| v.busy = false);
                match outcome {
                    Err(done) => {
                        let _ = req.reply.send(Err(CommandError::Interrupted(id.clone())));
                        update(&view, |v| v.armed = false);
                        let result = driver.safe_state().await;
                        if let Err(e) = &result {
                            online = !lost(&view, e);
                        }
                        if let Some(done) = done {
                            let _ = done.send(result.is_ok());
                        }
                    }
                    Ok(Ok(o)) => {
                        // Only data the instrument sent proves it alive: a write that expects no reply
                        // (a NAMUR setpoint) succeeds just as well when nothing listens.
                        if o != Outcome::Done {
                            update(&view, |v| v.last_seen = Some(Instant::now()));
                        }
                        let _ = req.reply.send(Ok(o));
                    }
                    Ok(Err(e)) => {
                        online = !lost(&view, &e);
                        let _ = req.reply.send(Err(CommandError::Driver(e.to_string())));
                    }
                }
            }
        }
    }
}

/// Marks the instrument lost when the error says the connection is gone; returns whether it did.
fn lost(view: &watch::Sender<Arc<InstrumentView>>, e: &DriverError) -> bool {
    if e.is_connection_lost() {
        update(view, |v| {
            v.connection = Connection::Lost(e.to_string());
            v.state = None;
        });
        true
    } else {
        false
    }
}

/// Changes the published view. The tick and the gateways hold the last view as a shared `Arc`, so the
/// copy (when one is still held) is made here in the instrument's task, never on the tick.
fn update(view: &watch::Sender<Arc<InstrumentView>>, change: impl FnOnce(&mut InstrumentView)) {
    view.send_modify(|v| change(Arc::make_mut(v)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the MQTT face publishes for a view is what the console reads back, field for field.
    #[test]
    fn a_view_s_state_message_reads_back_as_it_was_written() {
        use crate::contract::messages::InstrumentState;
        let view = InstrumentView {
            id: "hotplate".into(),
            connection: Connection::Lost("port closed".into()),
            identity: Some(Identity {
                manufacturer: "IKA".into(),
                model: "RCT digital".into(),
                serial: "H1".into(),
                firmware: "2.0".into(),
            }),
            state: Some(DeviceState::Alarm("watchdog".into())),
            values: vec![("plate_temperature_c", 24.5), ("stir_speed_rpm", 0.0)],
            last_seen: None,
            busy: true,
            armed: false,
        };
        let message = InstrumentState::from(&view);
        let wire = serde_json::to_value(&message).unwrap();
        assert_eq!(wire["connection"]["connection"], "lost");
        assert_eq!(wire["state"]["detail"], "watchdog");
        assert_eq!(wire["values"][1][0], "stir_speed_rpm");
        assert_eq!(
            serde_json::from_value::<InstrumentState>(wire).unwrap(),
            message
        );
    }

    /// An orderly shutdown stops every instrument task although gateways still hold clones of the handles.
    #[tokio::test]
    async fn stop_ends_the_task_for_every_clone_and_stops_the_driver() {
        let lab = labctl_protocols::Lab::sim();
        let timing = TaskTiming {
            poll: Duration::from_millis(5),
            reconnect: Duration::from_millis(20),
        };
        let (handles, fakes) = fake::spawn_lab(&lab, &EStop::default(), timing);
        let balance = &handles["balance"];
        let clone = balance.clone();
        // Online first, so the stop finds a running driver.
        let mut view = balance.subscribe();
        view.wait_for(|v| v.connection == Connection::Online)
            .await
            .unwrap();
        assert!(!fakes["balance"].log.lock().unwrap().stopped);
        assert!(balance.stop(Duration::from_secs(5)).await);
        assert!(fakes["balance"].log.lock().unwrap().stopped);
        assert_eq!(
            clone.execute(DeviceCommand::Tare).await,
            Err(CommandError::Gone("balance".into()))
        );
        // The others run on.
        assert!(!fakes["hotplate"].log.lock().unwrap().stopped);
        assert!(
            handles["hotplate"]
                .execute(DeviceCommand::ReadTemperature)
                .await
                .is_ok()
        );
    }
}
