//! One tokio task owns each port and runs transactions on it one at a time.
//!
//! Several instruments may share a line (three NE-1000 pumps on one RS-232 daisy chain), so no driver ever
//! touches the stream: each holds a cloneable [`PortHandle`] and sends [`Transaction`]s over a bounded
//! channel. A transaction carries its request bytes, how to cut frames from the receive buffer, which
//! frames answer it, how many frames it expects and its time budget.
//!
//! The line is never trusted to be in step with us:
//! - bytes that arrived before a request is written cannot answer it: they are framed, published to
//!   [`PortHandle::subscribe`] as unsolicited, and dropped;
//! - a frame the matcher does not recognise (a GRBL status report, a reply addressed to another pump,
//!   garbage) is logged, published and dropped, and the wait goes on;
//! - after a timeout the next request waits until the line has been quiet for [`PortConfig::quiet`], so
//!   the late reply to the old request is not taken for the answer to the new one;
//! - the receive buffer is bounded: a device that streams garbage forever costs no memory.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tracing::{debug, trace, warn};

use crate::error::PortError;
use labctl_codecs::{DecodeError, MAX_LINE, split_line};
use labctl_transport::{self as transport, Endpoint, LineTiming, Stream};

/// One frame as the framer cut it from the receive buffer, terminator included.
pub type Frame = Vec<u8>;

/// Cuts one frame off the front of the receive buffer: `Ok(Some(n))` for a frame of `n` bytes, `Ok(None)`
/// when more bytes are needed, or a [`DecodeError`] whose `skip` bytes are garbage to drop.
pub type Framer = fn(&[u8]) -> Result<Option<usize>, DecodeError>;

/// Decides what a frame means to the transaction in progress.
pub type Matcher = Box<dyn FnMut(&[u8]) -> Verdict + Send>;

/// What a matcher says about a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not an answer to this request (an unsolicited report, a reply for another address, a late reply,
    /// garbage): logged, published to subscribers and dropped.
    Unrelated,
    /// Part of the answer; the transaction ends when it has [`Transaction::frames`] parts.
    Part,
    /// The last frame of the answer, however many were expected (GRBL `error:9` instead of
    /// `[VER:..]`, `[OPT:..]`, `ok`).
    Last,
}

/// Bytes kept while waiting for the end of a frame. A line is at most [`MAX_LINE`]; twice that leaves
/// room for a frame that straddles reads.
pub const MAX_BUFFER: usize = 2 * MAX_LINE;

/// Most frames one transaction collects, whatever its matcher says.
pub const MAX_FRAMES: usize = 256;

/// Default time budget for a transaction built without one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Size of one read from the stream.
const READ_CHUNK: usize = 512;

/// Unsolicited frames kept for slow subscribers; older ones are lost (the subscriber sees `Lagged`).
const UNSOLICITED_BACKLOG: usize = 64;

/// How long a reopen waits for the previous task to let go of the device (it finishes queued
/// transactions first, each bounded by its timeout).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How the port task stands ([`Running::state`]).
const RUNNING: u8 = 0;
/// Ended on an I/O error or a close.
const ENDED: u8 = 1;
/// Ended because the device went away (EOF, EIO, a reset connection).
const LOST: u8 = 2;

/// Frames are printed at most this long in logs.
const LOG_FRAME: usize = 96;

/// One request and what answers it.
pub struct Transaction {
    pub request: Vec<u8>,
    pub framer: Framer,
    pub matcher: Matcher,
    /// Frames that make the answer; 0 for a command the device never answers (SCPI settings, NAMUR
    /// `OUT_SP_1`): the transaction ends once the request is written.
    pub frames: usize,
    /// From the start of the write to the last frame.
    pub timeout: Duration,
    /// Extra attempts after a timeout. Only for requests that are safe to repeat (queries, idempotent
    /// commands): a dispense whose reply was lost must not run twice.
    pub retries: u8,
}

impl Transaction {
    /// A request answered by one frame that `matcher` recognises.
    pub fn new(
        request: Vec<u8>,
        framer: Framer,
        matcher: impl FnMut(&[u8]) -> Verdict + Send + 'static,
    ) -> Transaction {
        Transaction {
            request,
            framer,
            matcher: Box::new(matcher),
            frames: 1,
            timeout: DEFAULT_TIMEOUT,
            retries: 0,
        }
    }

    /// A request the device does not answer.
    pub fn no_reply(request: Vec<u8>, framer: Framer) -> Transaction {
        Transaction {
            frames: 0,
            ..Transaction::new(request, framer, |_| Verdict::Unrelated)
        }
    }

    pub fn frames(mut self, frames: usize) -> Transaction {
        self.frames = frames.min(MAX_FRAMES);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Transaction {
        self.timeout = timeout;
        self
    }

    pub fn retries(mut self, retries: u8) -> Transaction {
        self.retries = retries;
        self
    }
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("request", &printable(&self.request))
            .field("frames", &self.frames)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// Time allowed for a transaction: both directions on the wire at the line's speed, plus the device's own
/// processing time. Without a line speed (TCP) only the processing time counts.
pub fn budget(
    timing: Option<LineTiming>,
    request_bytes: usize,
    reply_bytes: usize,
    processing: Duration,
) -> Duration {
    let wire = timing.map_or(Duration::ZERO, |t| {
        t.wire_time(request_bytes.saturating_add(reply_bytes))
    });
    wire.saturating_add(processing)
}

/// Frames ended by `\n` (a `\r` before it stays in the frame): GRBL, MT-SICS, SCPI.
pub fn frame_line(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    Ok(split_line("line", buf, false)?.map(|(_, consumed)| consumed))
}

/// Frames ended by `\n`, `\r\n` or a lone `\r`: NAMUR devices end lines either way.
pub fn frame_line_or_cr(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    Ok(split_line("line", buf, true)?.map(|(_, consumed)| consumed))
}

/// Settings of one port task.
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// Cuts frames that arrive while no transaction runs (they are published as unsolicited).
    pub framer: Framer,
    /// Transactions waiting for the port; a full queue makes callers wait (backpressure).
    pub queue: usize,
    /// After a timeout, the line must be quiet this long before the next request is written.
    pub quiet: Duration,
    /// Most time spent waiting for quiet; a device that never stops talking does not block the port.
    pub max_drain: Duration,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            framer: frame_line,
            queue: 16,
            quiet: Duration::from_millis(100),
            max_drain: Duration::from_secs(2),
        }
    }
}

/// Counters of what the port threw away, for diagnostics.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Frames no transaction matched (unsolicited, late, for another address, undecodable).
    pub unrelated_frames: AtomicU64,
    /// Bytes dropped as garbage (over-long lines, partial frames left before a request).
    pub discarded_bytes: AtomicU64,
    pub timeouts: AtomicU64,
    /// Largest receive buffer seen, to check the bound.
    pub peak_buffered: AtomicU64,
}

struct Job {
    transaction: Transaction,
    reply: oneshot::Sender<Result<Vec<Frame>, PortError>>,
}

/// The running task's mailbox and how it ended.
struct Running {
    jobs: mpsc::Sender<Job>,
    /// [`RUNNING`] until the task decides to stop ([`ENDED`] or [`LOST`]), which it records before
    /// anyone learns of the end: a caller told "disconnected" must find the port closed, even while the
    /// task is still letting go of the device.
    state: Arc<AtomicU8>,
}

struct Inner {
    endpoint: Endpoint,
    config: PortConfig,
    running: Mutex<Option<Running>>,
    /// Drivers that called [`PortHandle::acquire`] and not yet [`PortHandle::release`].
    users: Mutex<usize>,
    /// Serialises opening, so two drivers starting at once open the line once; holds the last task, which
    /// a reopen waits for: until it has dropped the device, an exclusive serial lock (TIOCEXCL) or a
    /// one-client simulator would refuse the new open.
    opening: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    unsolicited: broadcast::Sender<Frame>,
    stats: Arc<PortStats>,
}

/// A cloneable handle to the task that owns one port. Creating it does no I/O; [`PortHandle::acquire`]
/// opens the line.
#[derive(Clone)]
pub struct PortHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for PortHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortHandle")
            .field("endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data behind these locks stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PortHandle {
    pub fn new(endpoint: Endpoint, config: PortConfig) -> PortHandle {
        let (unsolicited, _) = broadcast::channel(UNSOLICITED_BACKLOG);
        PortHandle {
            inner: Arc::new(Inner {
                endpoint,
                config,
                running: Mutex::new(None),
                users: Mutex::new(0),
                opening: tokio::sync::Mutex::new(None),
                unsolicited,
                stats: Arc::new(PortStats::default()),
            }),
        }
    }

    pub fn name(&self) -> &str {
        self.inner.endpoint.name()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    pub fn timing(&self) -> Option<LineTiming> {
        self.inner.endpoint.timing()
    }

    /// [`budget`] on this port's line.
    pub fn budget(
        &self,
        request_bytes: usize,
        reply_bytes: usize,
        processing: Duration,
    ) -> Duration {
        budget(self.timing(), request_bytes, reply_bytes, processing)
    }

    pub fn stats(&self) -> &PortStats {
        &self.inner.stats
    }

    /// Frames no transaction claimed (GRBL `ALARM:N` and status reports, late replies), as they arrive.
    pub fn subscribe(&self) -> broadcast::Receiver<Frame> {
        self.inner.unsolicited.subscribe()
    }

    /// Whether a port task is running.
    pub fn is_open(&self) -> bool {
        lock(&self.inner.running)
            .as_ref()
            .is_some_and(|r| r.state.load(Ordering::Acquire) == RUNNING && !r.jobs.is_closed())
    }

    /// Registers a user of the line and opens it if no task runs (first use, or after a disconnect).
    pub async fn acquire(&self) -> Result<(), PortError> {
        *lock(&self.inner.users) += 1;
        let opened = self.ensure_open().await;
        if opened.is_err() {
            self.release_count();
        }
        opened
    }

    /// Opens the line if no task runs, without registering a user: a driver that already holds the port
    /// reconnects after a disconnect this way.
    pub async fn ensure_open(&self) -> Result<(), PortError> {
        let mut previous = self.inner.opening.lock().await;
        if self.is_open() {
            return Ok(());
        }
        if let Some(task) = previous.take()
            && tokio::time::timeout(CLOSE_WAIT, task).await.is_err()
        {
            warn!(port = %self.name(), "the previous port task still holds the line; opening anyway");
        }
        let stream = transport::open(&self.inner.endpoint).await?;
        let (jobs, rx) = mpsc::channel(self.inner.config.queue.max(1));
        let state = Arc::new(AtomicU8::new(RUNNING));
        let task = PortTask {
            name: self.name().to_owned(),
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            framer: self.inner.config.framer,
            quiet: self.inner.config.quiet,
            max_drain: self.inner.config.max_drain,
            unsolicited: self.inner.unsolicited.clone(),
            stats: self.inner.stats.clone(),
            stale_since: None,
            last_rx: None,
            state: state.clone(),
        };
        debug!(port = %self.name(), "port opened");
        *previous = Some(tokio::spawn(task.run(rx)));
        *lock(&self.inner.running) = Some(Running { jobs, state });
        Ok(())
    }

    /// Drops a user; the last one closes the line (the task finishes queued transactions first) and
    /// returns once the task has let go of the device, so whoever unplugs it next (a simulator shutting
    /// down, a technician) does not look like a lost line.
    pub async fn release(&self) {
        if self.release_count() == 0 {
            let mut task = self.inner.opening.lock().await;
            if *lock(&self.inner.users) == 0 {
                lock(&self.inner.running).take();
                if let Some(mut running) = task.take()
                    && tokio::time::timeout(CLOSE_WAIT, &mut running)
                        .await
                        .is_err()
                {
                    // Still finishing a transaction: a later open waits for it.
                    *task = Some(running);
                }
            }
        }
    }

    fn release_count(&self) -> usize {
        let mut users = lock(&self.inner.users);
        *users = users.saturating_sub(1);
        *users
    }

    /// Runs one transaction, after those already queued. Dropping the future does not cancel a
    /// transaction already queued: the port runs it and throws the answer away.
    pub async fn transact(&self, transaction: Transaction) -> Result<Vec<Frame>, PortError> {
        let (jobs, state) = match lock(&self.inner.running).as_ref() {
            Some(r) => (r.jobs.clone(), r.state.clone()),
            None => {
                return Err(PortError::Closed {
                    port: self.name().to_owned(),
                });
            }
        };
        let ended = || {
            if state.load(Ordering::Acquire) == LOST {
                PortError::Disconnected {
                    port: self.name().to_owned(),
                }
            } else {
                PortError::Closed {
                    port: self.name().to_owned(),
                }
            }
        };
        if state.load(Ordering::Acquire) != RUNNING {
            return Err(ended());
        }
        let (reply, answer) = oneshot::channel();
        if jobs.send(Job { transaction, reply }).await.is_err() {
            return Err(ended());
        }
        answer.await.unwrap_or_else(|_| Err(ended()))
    }
}

/// The task that owns the stream.
struct PortTask {
    name: String,
    stream: Stream,
    buf: Vec<u8>,
    /// The framer of the last transaction (or the port's), for frames that arrive between transactions.
    framer: Framer,
    quiet: Duration,
    max_drain: Duration,
    unsolicited: broadcast::Sender<Frame>,
    stats: Arc<PortStats>,
    /// When the last transaction timed out (its answer may still be on the way); cleared once the line
    /// has been quiet.
    stale_since: Option<Instant>,
    /// When the last byte arrived, to measure quiet.
    last_rx: Option<Instant>,
    state: Arc<AtomicU8>,
}

impl PortTask {
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let end = loop {
            tokio::select! {
                // A closed mailbox first: a line unplugged just after its last user left is not "lost".
                biased;
                job = jobs.recv() => {
                    let Some(mut job) = job else { break None };
                    let result = self.transact(&mut job.transaction).await;
                    let fatal = match &result {
                        Err(PortError::Disconnected { .. }) => Some(true),
                        Err(PortError::Io { .. }) => Some(false),
                        _ => None,
                    };
                    if let Some(lost) = fatal {
                        // Before anyone learns of the end, so queued callers report the right cause.
                        self.state.store(if lost { LOST } else { ENDED }, Ordering::Release);
                        let _ = job.reply.send(result);
                        break Some("transaction failed");
                    }
                    let _ = job.reply.send(result);
                }
                read = self.read_more() => {
                    if let Err(error) = read {
                        let end = if matches!(error, PortError::Disconnected { .. }) { LOST } else { ENDED };
                        self.state.store(end, Ordering::Release);
                        warn!(port = %self.name, %error, "port lost while idle");
                        break Some("idle read failed");
                    }
                    let framer = self.framer;
                    self.publish_frames(framer);
                }
            }
        };
        match end {
            None => debug!(port = %self.name, "port closed"),
            Some(why) => debug!(port = %self.name, why, "port task ended"),
        }
    }

    async fn transact(&mut self, t: &mut Transaction) -> Result<Vec<Frame>, PortError> {
        self.framer = t.framer;
        let mut attempt = 0u8;
        loop {
            self.wait_quiet().await?;
            // Nothing received before the request is written can answer it.
            self.publish_frames(t.framer);
            self.discard_rest("partial frame left before a request");
            match self.attempt(t).await {
                Err(PortError::Timeout { .. }) if attempt < t.retries => {
                    attempt += 1;
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    self.stale_since = Some(Instant::now());
                    debug!(port = %self.name, request = %printable(&t.request), attempt, "no reply, retrying");
                }
                Err(error @ PortError::Timeout { .. }) => {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    self.stale_since = Some(Instant::now());
                    return Err(error);
                }
                other => return other,
            }
        }
    }

    async fn attempt(&mut self, t: &mut Transaction) -> Result<Vec<Frame>, PortError> {
        let deadline = Instant::now() + t.timeout;
        let (port, timeout) = (self.name.clone(), t.timeout);
        let timed_out = move || PortError::Timeout {
            port: port.clone(),
            timeout,
        };
        trace!(port = %self.name, request = %printable(&t.request), "write");
        let stream = &mut self.stream;
        let write = async {
            stream.write_all(&t.request).await?;
            stream.flush().await
        };
        match timeout_at(deadline, write).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(error)) => return Err(io_error(&self.name, error)),
            Ok(Ok(())) => {}
        }
        if t.frames == 0 {
            return Ok(Vec::new());
        }
        let mut frames = Vec::new();
        loop {
            while let Some(frame) = self.next_frame(t.framer) {
                match (t.matcher)(&frame) {
                    Verdict::Unrelated => self.unrelated(frame, Some(&t.request)),
                    verdict => {
                        trace!(port = %self.name, frame = %printable(&frame), "matched");
                        frames.push(frame);
                        if verdict == Verdict::Last || frames.len() >= t.frames.min(MAX_FRAMES) {
                            return Ok(frames);
                        }
                    }
                }
            }
            match timeout_at(deadline, self.read_more()).await {
                Err(_) => return Err(timed_out()),
                Ok(result) => result?,
            }
        }
    }

    /// After a timeout, waits until nothing has arrived for `quiet` (at most `max_drain`), publishing
    /// whatever arrives meanwhile.
    async fn wait_quiet(&mut self) -> Result<(), PortError> {
        let Some(since) = self.stale_since else {
            return Ok(());
        };
        let give_up = since + self.max_drain;
        loop {
            // Bytes that arrived while the port was idle count too.
            let quiet_from = self.last_rx.map_or(since, |rx| rx.max(since));
            let until = (quiet_from + self.quiet).min(give_up);
            match timeout_at(until, self.read_more()).await {
                Err(_) => break,
                Ok(result) => result?,
            }
            let framer = self.framer;
            self.publish_frames(framer);
            if Instant::now() >= give_up {
                debug!(port = %self.name, "line never went quiet; sending anyway");
                break;
            }
        }
        self.stale_since = None;
        Ok(())
    }

    /// Reads what the stream has (waiting for at least one byte) into the bounded buffer.
    async fn read_more(&mut self) -> Result<(), PortError> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = match self.stream.read(&mut chunk).await {
            Ok(0) => {
                return Err(PortError::Disconnected {
                    port: self.name.clone(),
                });
            }
            Ok(n) => n,
            Err(error) => return Err(io_error(&self.name, error)),
        };
        self.last_rx = Some(Instant::now());
        self.buf
            .extend_from_slice(chunk.get(..n).unwrap_or_default());
        self.stats
            .peak_buffered
            .fetch_max(self.buf.len() as u64, Ordering::Relaxed);
        if self.buf.len() > MAX_BUFFER {
            // The framer would have cut any frame by now: this is a run of garbage. Keep its tail, which
            // may be the start of a real frame.
            let excess = self.buf.len() - MAX_LINE;
            self.stats
                .discarded_bytes
                .fetch_add(excess as u64, Ordering::Relaxed);
            warn!(port = %self.name, bytes = excess, "no frame in the receive buffer; dropping garbage");
            self.buf.drain(..excess);
        }
        Ok(())
    }

    /// Cuts the next non-blank frame; drops garbage the framer refuses.
    fn next_frame(&mut self, framer: Framer) -> Option<Frame> {
        loop {
            if self.buf.is_empty() {
                return None;
            }
            match framer(&self.buf) {
                Ok(None) => return None,
                Ok(Some(n)) => {
                    // A framer that claims 0 or too many bytes must not stall or panic the port.
                    let n = n.clamp(1, self.buf.len());
                    let frame: Frame = self.buf.drain(..n).collect();
                    if frame.iter().all(|&b| b == b'\r' || b == b'\n') {
                        continue;
                    }
                    return Some(frame);
                }
                Err(error) => {
                    let skip = error.skip.clamp(1, self.buf.len());
                    warn!(port = %self.name, %error, "dropping undecodable bytes");
                    self.stats
                        .discarded_bytes
                        .fetch_add(skip as u64, Ordering::Relaxed);
                    self.buf.drain(..skip);
                }
            }
        }
    }

    /// Publishes every complete frame in the buffer as unsolicited.
    fn publish_frames(&mut self, framer: Framer) {
        while let Some(frame) = self.next_frame(framer) {
            self.unrelated(frame, None);
        }
    }

    fn discard_rest(&mut self, why: &'static str) {
        if !self.buf.is_empty() {
            debug!(port = %self.name, bytes = %printable(&self.buf), why, "discarding");
            self.stats
                .discarded_bytes
                .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
            self.buf.clear();
        }
    }

    fn unrelated(&mut self, frame: Frame, during: Option<&[u8]>) {
        self.stats.unrelated_frames.fetch_add(1, Ordering::Relaxed);
        match during {
            Some(request) => debug!(
                port = %self.name,
                frame = %printable(&frame),
                request = %printable(request),
                "frame does not answer the request; dropped"
            ),
            None => debug!(port = %self.name, frame = %printable(&frame), "unsolicited frame"),
        }
        // No subscriber is fine: the frame was logged.
        let _ = self.unsolicited.send(frame);
    }
}

fn io_error(port: &str, source: std::io::Error) -> PortError {
    if transport::is_disconnect(&source) {
        PortError::Disconnected {
            port: port.to_owned(),
        }
    } else {
        PortError::Io {
            port: port.to_owned(),
            source,
        }
    }
}

/// Bytes for logs: printable ASCII as is, the rest escaped, cut to a sane length.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes.iter().take(LOG_FRAME) {
        out.extend(std::ascii::escape_default(b).map(char::from));
    }
    if bytes.len() > LOG_FRAME {
        out.push_str(&format!("...({} bytes)", bytes.len()));
    }
    out
}

#[cfg(test)]
mod tests;
