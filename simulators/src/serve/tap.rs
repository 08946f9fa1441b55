//! A wire tap: the bytes the host sent to a port, as its device received them, kept in a bounded ring so a
//! test can decode afterwards what an instrument was told (and check it against the lab's envelope).
//!
//! Recording copies into a buffer allocated once, up to its capacity; the oldest bytes are overwritten
//! when it is full, and [`WireTap::total`] says how many were ever recorded, so a reader knows whether it
//! sees everything.

use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes kept per port by default: hours of a controller's traffic on a serial line.
pub const DEFAULT_TAP_CAPACITY: usize = 1 << 20;

#[derive(Debug)]
struct Ring {
    /// Grows up to `capacity`, then is overwritten in place from `start`.
    buf: Vec<u8>,
    capacity: usize,
    /// Index of the oldest byte once the buffer is full.
    start: usize,
    total: u64,
}

impl Ring {
    fn record(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.capacity == 0 {
            return;
        }
        // Only the last `capacity` bytes can survive.
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let room = self.capacity - self.buf.len();
        let (append, wrap) = bytes.split_at(bytes.len().min(room));
        self.buf.extend_from_slice(append);
        let mut rest = wrap;
        while !rest.is_empty() {
            let n = rest.len().min(self.capacity - self.start);
            self.buf[self.start..self.start + n].copy_from_slice(&rest[..n]);
            self.start = (self.start + n) % self.capacity;
            rest = &rest[n..];
        }
    }

    fn contents(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len());
        out.extend_from_slice(&self.buf[self.start..]);
        out.extend_from_slice(&self.buf[..self.start]);
        out
    }
}

/// The recording of one port; clones share it.
#[derive(Debug, Clone)]
pub struct WireTap {
    ring: Arc<Mutex<Ring>>,
}

impl Default for WireTap {
    fn default() -> Self {
        WireTap::new(DEFAULT_TAP_CAPACITY)
    }
}

impl WireTap {
    /// A tap keeping the last `capacity` bytes.
    pub fn new(capacity: usize) -> WireTap {
        WireTap {
            ring: Arc::new(Mutex::new(Ring {
                buf: Vec::new(),
                capacity,
                start: 0,
                total: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic elsewhere while recording cannot leave the ring inconsistent in a way that matters.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends bytes from the host.
    pub fn record(&self, bytes: &[u8]) {
        self.lock().record(bytes);
    }

    /// The bytes kept, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().contents()
    }

    /// Bytes ever recorded (more than [`WireTap::contents`] holds once the ring has wrapped).
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// True when some recorded bytes have been overwritten.
    pub fn wrapped(&self) -> bool {
        let ring = self.lock();
        ring.total > ring.buf.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_below_capacity_in_order() {
        let tap = WireTap::new(16);
        tap.record(b"G0 X1\n");
        tap.record(b"?");
        tap.record(b"");
        assert_eq!(tap.contents(), b"G0 X1\n?");
        assert_eq!(tap.total(), 7);
        assert!(!tap.wrapped());
    }

    #[test]
    fn keeps_the_newest_bytes_when_full() {
        let tap = WireTap::new(8);
        tap.record(b"abcdef");
        tap.record(b"ghij");
        assert_eq!(tap.contents(), b"cdefghij");
        tap.record(b"kl");
        assert_eq!(tap.contents(), b"efghijkl");
        // A chunk longer than the whole ring keeps only its tail.
        tap.record(b"0123456789XY");
        assert_eq!(tap.contents(), b"456789XY");
        assert_eq!(tap.total(), 24);
        assert!(tap.wrapped());
    }

    #[test]
    fn matches_a_naive_model_for_any_chunking() {
        // Every chunk size against the obvious "append, keep the tail" model.
        for capacity in 1..12 {
            for chunk in 1..15 {
                let tap = WireTap::new(capacity);
                let mut all = Vec::new();
                for i in 0..40u8 {
                    let bytes: Vec<u8> = (0..chunk).map(|k| i.wrapping_mul(31) ^ k as u8).collect();
                    tap.record(&bytes);
                    all.extend_from_slice(&bytes);
                    let tail = &all[all.len().saturating_sub(capacity)..];
                    assert_eq!(tap.contents(), tail, "capacity {capacity}, chunk {chunk}");
                }
            }
        }
    }

    #[test]
    fn a_zero_capacity_tap_only_counts() {
        let tap = WireTap::new(0);
        tap.record(b"abc");
        assert_eq!((tap.contents(), tap.total()), (Vec::new(), 3));
    }

    #[test]
    fn clones_share_the_recording() {
        let tap = WireTap::new(4);
        tap.clone().record(b"ab");
        assert_eq!(tap.contents(), b"ab");
    }
}
