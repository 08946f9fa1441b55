//! Live updates for every browser on one server-sent-events stream: the lab's snapshot (serialised once for
//! all browsers, at most [`SNAPSHOTS_PER_SECOND`] times a second) and the journal's records as they become
//! durable. Nothing here can make the controller wait: the snapshot is a `watch` (latest value only) and the
//! journal's broadcast is bounded (a browser that falls behind is told it lagged and reloads).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use labctl_core::api::ControllerHandle;
use labctl_core::journal::Record;
use labctl_core::world::LabSnapshot;
use serde_json::json;
use tokio::sync::{broadcast, watch};

/// Snapshots sent to browsers per second at most (people read at that pace; the tick runs faster).
pub const SNAPSHOTS_PER_SECOND: u64 = 4;

/// The snapshot as browsers read it.
pub fn snapshot_json(snapshot: &LabSnapshot, estop_latched: bool) -> String {
    let instruments: Vec<serde_json::Value> = snapshot
        .instruments
        .iter()
        .map(|i| {
            let (connection, detail) = match &i.connection {
                labctl_core::contract::messages::Connection::Lost(why) => {
                    ("lost", Some(why.as_str()))
                }
                c => (c.as_str(), None),
            };
            json!({
                "id": i.id,
                "connection": connection,
                "detail": detail,
                "identity": i.identity,
                "state": i.state.as_ref().map(|s| s.as_str()),
                "state_detail": i.state.as_ref().and_then(|s| s.detail()),
                "values": i.values,
                "busy": i.busy,
                "armed": i.armed,
            })
        })
        .collect();
    json!({
        "lab_id": snapshot.lab_id,
        // Read from the latch itself: it is set before the tick next publishes.
        "estop_latched": estop_latched || snapshot.estop_latched,
        "interlocks_tripped": snapshot.interlocks_tripped,
        "instruments": instruments,
        "runs": snapshot.runs,
        "tick": snapshot.tick,
        "at_ms": labctl_core::journal::now_ms(),
    })
    .to_string()
}

/// Serialises the controller's snapshot for every browser, at most [`SNAPSHOTS_PER_SECOND`] times a
/// second, until the controller's snapshot channel closes or the receiver is gone.
pub fn serialiser(api: ControllerHandle) -> watch::Receiver<Arc<str>> {
    let mut snapshots = api.watch_snapshot();
    // The Arc is taken out before serialising: holding the watch's borrow would hold up the tick's next
    // publication for as long as the serialisation takes.
    let latest = snapshots.borrow_and_update().clone();
    let first = snapshot_json(&latest, api.estop_latched());
    let (tx, rx) = watch::channel::<Arc<str>>(first.into());
    let mut records = api.events();
    tokio::spawn(async move {
        let pause = Duration::from_millis(1000 / SNAPSHOTS_PER_SECOND);
        loop {
            // A latch change is news at once; anything else waits for the next slot.
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return },
                record = records.recv() => match record {
                    Ok(r) if matches!(*r, Record::EStopLatch { .. }) => {}
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
            let latest = snapshots.borrow_and_update().clone();
            let json = snapshot_json(&latest, api.estop_latched());
            if tx.send(json.into()).is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    });
    rx
}

struct Client {
    snapshot: watch::Receiver<Arc<str>>,
    records: broadcast::Receiver<Arc<Record>>,
    started: bool,
}

/// One browser's stream: the current snapshot at once, then snapshots and journal records as they come.
pub fn stream(
    snapshot: watch::Receiver<Arc<str>>,
    records: broadcast::Receiver<Arc<Record>>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let client = Client {
        snapshot,
        records,
        started: false,
    };
    futures_util::stream::unfold(client, |mut c| async move {
        if !c.started {
            c.started = true;
            let data = c.snapshot.borrow_and_update().clone();
            return Some((Ok(Event::default().event("snapshot").data(&*data)), c));
        }
        let event = tokio::select! {
            changed = c.snapshot.changed() => {
                changed.ok()?;
                let data = c.snapshot.borrow_and_update().clone();
                Event::default().event("snapshot").data(&*data)
            }
            record = c.records.recv() => match record {
                Ok(r) => Event::default()
                    .event("record")
                    .data(serde_json::to_string(&*r).unwrap_or_default()),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    Event::default().event("lagged").data(n.to_string())
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        };
        Some((Ok(event), c))
    })
}
