//! A timer that holds wire-time deadlines to tens of microseconds, whatever the async runtime is doing.
//!
//! tokio's timer has millisecond resolution and fires only when a worker gets round to it: on a busy
//! 2-core machine a 3.5 ms wire time came out anywhere up to 5.7 ms. A real UART does not wait for a
//! scheduler, so the simulator's wire must not either. One thread for the whole process keeps the pending
//! deadlines in a heap and sleeps on a condition variable to the earliest (the kernel's high-resolution
//! timer), then wakes the task that waits. Ports ask it only for the last few milliseconds of a wait
//! ([`sleep_until`]); longer waits stay on tokio's timer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Waits longer than this start on tokio's timer and hand over to the wire clock this long before the
/// deadline (tokio may be a millisecond or two late).
pub const HANDOVER: Duration = Duration::from_millis(5);

/// One waiting task.
struct Entry {
    fired: AtomicBool,
    /// Set when the waiting future is dropped, so the thread forgets the entry.
    cancelled: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

struct Queue {
    heap: BinaryHeap<Pending>,
    next_seq: u64,
}

/// A wait in the heap: earliest deadline first, equal deadlines in the order they came.
struct Pending {
    at: Instant,
    seq: u64,
    entry: Arc<Entry>,
}

impl Pending {
    fn key(&self) -> Reverse<(Instant, u64)> {
        Reverse((self.at, self.seq))
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

struct WireClock {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl WireClock {
    fn global() -> &'static WireClock {
        static CLOCK: OnceLock<&'static WireClock> = OnceLock::new();
        CLOCK.get_or_init(|| {
            let clock: &'static WireClock = Box::leak(Box::new(WireClock {
                queue: Mutex::new(Queue {
                    heap: BinaryHeap::new(),
                    next_seq: 0,
                }),
                changed: Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("sim-wire-clock".into())
                .spawn(move || clock.run())
                .expect("spawn the simulator's wire clock thread");
            clock
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, at: Instant, entry: Arc<Entry>) {
        let mut q = self.lock();
        let earliest = q.heap.peek().is_none_or(|first| at < first.at);
        let seq = q.next_seq;
        q.next_seq += 1;
        q.heap.push(Pending { at, seq, entry });
        drop(q);
        if earliest {
            self.changed.notify_one();
        }
    }

    fn run(&self) {
        let mut q = self.lock();
        loop {
            let now = Instant::now();
            match q.heap.peek() {
                None => q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner()),
                Some(first) if first.at > now => {
                    let wait = first.at - now;
                    q = self
                        .changed
                        .wait_timeout(q, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Some(_) => {
                    let Some(Pending { entry, .. }) = q.heap.pop() else {
                        continue;
                    };
                    if entry.cancelled.load(Ordering::Acquire) {
                        continue;
                    }
                    entry.fired.store(true, Ordering::Release);
                    let waker = entry.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }
            }
        }
    }
}

/// Resolves at `at`, to the tens of microseconds.
pub fn sleep_until(at: Instant) -> WireSleep {
    WireSleep {
        at,
        entry: None,
        coarse: None,
    }
}

/// The future of [`sleep_until`].
pub struct WireSleep {
    at: Instant,
    entry: Option<Arc<Entry>>,
    /// tokio's sleep for the part of a long wait before the handover.
    coarse: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for WireSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        if now >= self.at {
            return Poll::Ready(());
        }
        if self.entry.is_none() {
            let handover = self.at - HANDOVER;
            if now < handover {
                let coarse = self
                    .coarse
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(handover.into())));
                if coarse.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            let entry = Arc::new(Entry {
                fired: AtomicBool::new(false),
                cancelled: AtomicBool::new(false),
                waker: Mutex::new(Some(cx.waker().clone())),
            });
            self.entry = Some(entry.clone());
            WireClock::global().add(self.at, entry);
            return Poll::Pending;
        }
        let Some(entry) = &self.entry else {
            return Poll::Pending;
        };
        if entry.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        *entry.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        // The clock may have fired between the check and the new waker: look again.
        if entry.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for WireSleep {
    fn drop(&mut self) {
        if let Some(entry) = &self.entry {
            entry.cancelled.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lateness(after: Duration) -> Duration {
        let at = Instant::now() + after;
        sleep_until(at).await;
        Instant::now().saturating_duration_since(at)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wakes_at_the_deadline_not_before() {
        for span in [
            Duration::from_micros(300),
            Duration::from_millis(3),
            Duration::from_millis(12),
        ] {
            let start = Instant::now();
            let late = lateness(span).await;
            assert!(start.elapsed() >= span, "{span:?} woke early");
            // Generous: this only checks the wake comes from the deadline, not from some later event.
            assert!(
                late < Duration::from_millis(50),
                "{span:?} woke {late:?} late"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_wait_is_forgotten_and_others_still_fire() {
        let now = Instant::now();
        let dropped = sleep_until(now + Duration::from_millis(2));
        let mut dropped = Box::pin(dropped);
        // Register it with the clock, then give it up.
        assert!(futures_poll_once(dropped.as_mut()).is_pending());
        drop(dropped);
        let many: Vec<_> = (0..50)
            .map(|i| sleep_until(now + Duration::from_micros(100 * i)))
            .collect();
        for s in many {
            s.await;
        }
        assert!(now.elapsed() >= Duration::from_micros(4900));
    }

    fn futures_poll_once(f: Pin<&mut WireSleep>) -> Poll<()> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        f.poll(&mut cx)
    }
}
