//! The device end of the wire: what happens to a device's output between the device and the host.
//!
//! In order: the instrument's `no_reply` / `disconnected` faults swallow it; each byte may be dropped or
//! garbled (seeded, so the same output gives the same damage); then the chunk waits for the added latency
//! (`FaultConfig::latency_ms`, taken as virtual milliseconds: real ones at warp 1) and for the line to be
//! free, and takes its wire time (characters × bits per character / baud) before it has arrived.
//!
//! The other direction takes its wire time too: a pty hands the device what the host wrote at once, but a
//! real instrument has the last byte of a command only after it has crossed the line, so what the host sends
//! reaches the device after its wire time ([`Wire::receive`], [`Wire::arrived`]).

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::devices::LineSettings;
use crate::model::FaultConfig;

/// Most bytes kept for a host that does not read; more output is lost, as at a full host buffer.
pub const MAX_PENDING: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    /// Virtual time at which the last byte has arrived at the host.
    due: Duration,
    bytes: Vec<u8>,
}

/// Output on its way to the host.
#[derive(Debug)]
pub struct Wire {
    rng: SmallRng,
    /// Serial timing, `None` for a network link (no wire time).
    timing: Option<LineSettings>,
    queue: VecDeque<Chunk>,
    queued_bytes: usize,
    line_free_at: Duration,
    /// Arrived at the host's end, waiting to be written to the transport.
    tx: Vec<u8>,
    /// From the host, on its way to the device.
    inbound: VecDeque<Chunk>,
    inbound_free_at: Duration,
}

impl Wire {
    /// `seed` makes the damage reproducible; `timing` gives the line's wire time.
    pub fn new(seed: u64, timing: Option<LineSettings>) -> Wire {
        Wire {
            rng: SmallRng::seed_from_u64(seed),
            timing,
            queue: VecDeque::new(),
            queued_bytes: 0,
            line_free_at: Duration::ZERO,
            tx: Vec::new(),
            inbound: VecDeque::new(),
            inbound_free_at: Duration::ZERO,
        }
    }

    /// Sets the serial timing (a device may change its baud rate).
    pub fn set_timing(&mut self, timing: Option<LineSettings>) {
        self.timing = timing;
    }

    /// Sends `bytes` emitted at virtual time `now` by an instrument with `faults`.
    pub fn send(&mut self, now: Duration, bytes: &[u8], faults: &FaultConfig) {
        if faults.no_reply || faults.disconnected || bytes.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if faults.drop_probability > 0.0
                && self.rng.random_bool(faults.drop_probability.min(1.0))
            {
                continue;
            }
            let mut b = b;
            if faults.garble_probability > 0.0
                && self.rng.random_bool(faults.garble_probability.min(1.0))
            {
                b ^= self.rng.random_range(1..=255u8);
            }
            out.push(b);
        }
        if out.is_empty() || self.queued_bytes + out.len() > MAX_PENDING {
            return;
        }
        let latency = Duration::from_millis(faults.latency_ms);
        let start = now.saturating_add(latency).max(self.line_free_at);
        let wire_time = self
            .timing
            .map_or(Duration::ZERO, |t| t.wire_time(out.len()));
        let due = start.saturating_add(wire_time);
        self.line_free_at = due;
        self.queued_bytes += out.len();
        self.queue.push_back(Chunk { due, bytes: out });
    }

    /// Moves what has arrived by `now` to the transmit buffer, or throws it away when nobody listens.
    pub fn release(&mut self, now: Duration, listening: bool) {
        while let Some(chunk) = self.queue.front() {
            if chunk.due > now {
                break;
            }
            let Some(chunk) = self.queue.pop_front() else {
                break;
            };
            self.queued_bytes = self.queued_bytes.saturating_sub(chunk.bytes.len());
            if listening && self.tx.len() + chunk.bytes.len() <= MAX_PENDING {
                self.tx.extend_from_slice(&chunk.bytes);
            }
        }
    }

    /// Takes `bytes` the host sent at virtual time `now`; they reach the device after their wire time.
    pub fn receive(&mut self, now: Duration, bytes: Vec<u8>) {
        let Some(timing) = self.timing else {
            self.inbound.push_back(Chunk { due: now, bytes });
            return;
        };
        let due = now
            .max(self.inbound_free_at)
            .saturating_add(timing.wire_time(bytes.len()));
        self.inbound_free_at = due;
        self.inbound.push_back(Chunk { due, bytes });
    }

    /// What the host sent that has reached the device by `now`, in order.
    pub fn arrived(&mut self, now: Duration) -> Option<Vec<u8>> {
        if self.inbound.front()?.due > now {
            return None;
        }
        self.inbound.pop_front().map(|c| c.bytes)
    }

    /// When the next chunk arrives, at either end.
    pub fn next_due(&self) -> Option<Duration> {
        let out = self.queue.front().map(|c| c.due);
        let inbound = self.inbound.front().map(|c| c.due);
        match (out, inbound) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bytes ready to write.
    pub fn tx(&self) -> &[u8] {
        &self.tx
    }

    /// `n` bytes were written.
    pub fn written(&mut self, n: usize) {
        self.tx.drain(..n.min(self.tx.len()));
    }

    /// The host went away: what was on its way is lost.
    pub fn clear(&mut self) {
        self.inbound.clear();
        self.queue.clear();
        self.queued_bytes = 0;
        self.tx.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn wire_time_and_latency_delay_replies_in_order() {
        let mut wire = Wire::new(1, Some(LineSettings::n81(9600)));
        let faults = FaultConfig {
            latency_ms: 50,
            ..FaultConfig::default()
        };
        wire.send(ms(0), &[b'x'; 96], &faults);
        wire.send(ms(0), b"yy", &FaultConfig::default());
        // 96 characters at 9600 8N1 take 100 ms after 50 ms latency; the second chunk queues behind.
        assert_eq!(wire.next_due(), Some(ms(150)));
        wire.release(ms(149), true);
        assert!(wire.tx().is_empty());
        wire.release(ms(150), true);
        assert_eq!(wire.tx().len(), 96);
        assert!(wire.next_due() > Some(ms(150)));
        wire.release(ms(200), true);
        assert_eq!(&wire.tx()[96..], b"yy");
        wire.written(98);
        assert!(wire.tx().is_empty());
    }

    #[test]
    fn what_the_host_sends_reaches_the_device_after_its_wire_time() {
        let mut wire = Wire::new(1, Some(LineSettings::n81(9600)));
        // "SI\r\n" is 4 characters: 4.17 ms at 9600 8N1; the next command (3.13 ms) queues behind it.
        wire.receive(ms(10), b"SI\r\n".to_vec());
        wire.receive(ms(10), b"S\r\n".to_vec());
        assert_eq!(wire.arrived(ms(14)), None);
        let first_due = wire.next_due().unwrap();
        assert!(first_due > ms(14) && first_due < ms(15), "{first_due:?}");
        assert_eq!(wire.arrived(first_due).as_deref(), Some(&b"SI\r\n"[..]));
        assert_eq!(wire.arrived(first_due), None);
        assert_eq!(wire.arrived(ms(17)), None);
        assert_eq!(wire.arrived(ms(18)).as_deref(), Some(&b"S\r\n"[..]));
        // A network link has no wire time.
        let mut tcp = Wire::new(1, None);
        tcp.receive(ms(3), b"*IDN?\n".to_vec());
        assert_eq!(tcp.arrived(ms(3)).as_deref(), Some(&b"*IDN?\n"[..]));
        wire.receive(ms(20), b"lost".to_vec());
        wire.clear();
        assert_eq!(wire.next_due(), None);
    }

    #[test]
    fn faults_drop_garble_and_silence_reproducibly() {
        let noisy = FaultConfig {
            drop_probability: 0.2,
            garble_probability: 0.2,
            ..FaultConfig::default()
        };
        let run = |seed| {
            let mut wire = Wire::new(seed, None);
            wire.send(ms(0), &[b'a'; 200], &noisy);
            wire.release(ms(0), true);
            wire.tx().to_vec()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        assert!(a.len() < 200 && a.len() > 100, "{}", a.len());
        assert!(a.iter().any(|&b| b != b'a'));
        let mut wire = Wire::new(1, None);
        for faults in [
            FaultConfig {
                no_reply: true,
                ..FaultConfig::default()
            },
            FaultConfig {
                disconnected: true,
                ..FaultConfig::default()
            },
        ] {
            wire.send(ms(0), b"ok\r\n", &faults);
        }
        assert_eq!(wire.next_due(), None);
    }

    #[test]
    fn nobody_listening_loses_output() {
        let mut wire = Wire::new(1, Some(LineSettings::n81(9600)));
        wire.send(ms(0), b"ok", &FaultConfig::default());
        wire.release(ms(10), true);
        wire.send(ms(10), b"lost", &FaultConfig::default());
        wire.release(ms(100), false);
        assert_eq!(wire.tx(), b"ok");
        wire.send(ms(100), b"gone", &FaultConfig::default());
        wire.clear();
        assert_eq!((wire.tx(), wire.next_due()), (&b""[..], None));
    }
}
