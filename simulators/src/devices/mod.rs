//! Device-side state machines: one per instrument protocol, each speaking the real instrument's wire
//! protocol byte for byte through the device side of the shared codecs (`labctl_codecs`).
//!
//! A device is pure: bytes in, bytes out, given the [`LabModel`] and the virtual time in a [`Ctx`]. It never
//! reads a clock, sleeps or touches a port; the server (`crate::serve`) feeds it what arrives on the wire,
//! calls [`Device::poll`] at the virtual time [`Device::next_wakeup`] asks for, and applies the line timing
//! and the byte-level faults to what it emits. Every device:
//! - keeps its receive buffer bounded (the instrument's own limit where the manual gives one);
//! - never panics, whatever the bytes;
//! - refuses what the real instrument refuses, with the instrument's own error reply (or its silence);
//! - answers identity queries with realistic manufacturer, model, serial and firmware strings.

pub mod defined;
pub mod defined_modbus;
pub mod grbl;
pub mod mtsics;
pub mod namur;
pub mod ne1000;
pub mod scpi;

use std::time::Duration;

use labctl_protocols::lab::{FlowControl, Parity, SerialLine};
use serde::Serialize;

use crate::model::{FaultConfig, InstrumentId, LabModel};

/// Character framing and speed of a serial line, as the instrument expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LineSettings {
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
}

impl LineSettings {
    /// 8 data bits, no parity, 1 stop bit.
    pub const fn n81(baud: u32) -> LineSettings {
        LineSettings {
            baud,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
        }
    }

    /// 7 data bits, even parity, 1 stop bit (IKA NAMUR).
    pub const fn e71(baud: u32) -> LineSettings {
        LineSettings {
            baud,
            data_bits: 7,
            parity: Parity::Even,
            stop_bits: 1,
        }
    }

    /// Bits on the wire per character: start, data, parity, stop.
    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits)
            + u32::from(self.parity != Parity::None)
            + u32::from(self.stop_bits)
    }

    /// Time `bytes` characters take on the wire (zero for a zero baud rate).
    pub fn wire_time(&self, bytes: usize) -> Duration {
        if self.baud == 0 {
            return Duration::ZERO;
        }
        let bits = (bytes as u128).saturating_mul(u128::from(self.bits_per_char()));
        let nanos = bits
            .saturating_mul(1_000_000_000)
            .div_ceil(u128::from(self.baud));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// `115200 8N1`, `9600 7E1`.
    pub fn label(&self) -> String {
        let parity = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        format!(
            "{} {}{}{}",
            self.baud, self.data_bits, parity, self.stop_bits
        )
    }

    /// The lab-file serial line for a port at `path` with these settings.
    pub fn serial_line(&self, path: &str) -> SerialLine {
        SerialLine {
            port: path.to_owned(),
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
            flow_control: FlowControl::None,
        }
    }
}

/// One piece of output, from the instrument at index `source` of [`Device::instruments`] (several pumps
/// share one line; the server applies each pump's own faults to its own replies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    pub source: usize,
    pub bytes: Vec<u8>,
}

/// What a device works with during one call: the model, the virtual time, what can be seen of the host's
/// end of the line, and where its output goes.
pub struct Ctx<'a> {
    pub model: &'a mut LabModel,
    pub now: Duration,
    /// The baud rate the host set on its end of the line, where the transport shows it (a pty); `None` on
    /// TCP or when unknown.
    pub host_baud: Option<u32>,
    out: &'a mut Vec<Emit>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        model: &'a mut LabModel,
        now: Duration,
        host_baud: Option<u32>,
        out: &'a mut Vec<Emit>,
    ) -> Ctx<'a> {
        Ctx {
            model,
            now,
            host_baud,
            out,
        }
    }

    /// Sends `bytes` from instrument `source` (appended to that source's last chunk when it is the last one).
    pub fn emit(&mut self, source: usize, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        match self.out.last_mut() {
            Some(last) if last.source == source => last.bytes.extend_from_slice(&bytes),
            _ => self.out.push(Emit { source, bytes }),
        }
    }

    /// The fault settings of one instrument (clean when the model does not know it).
    pub fn faults(&self, id: InstrumentId) -> FaultConfig {
        self.model.faults(id).cloned().unwrap_or_default()
    }
}

/// A simulated instrument (or several sharing one line) at the device end of the wire.
pub trait Device: Send {
    /// The wire protocol, as in the lab file's `driver` (`grbl`, `ne1000`, `mt_sics`, `ika_namur`,
    /// `scpi_spectro`).
    fn protocol(&self) -> &'static str;

    /// The model instruments this device answers for, in `Emit::source` order.
    fn instruments(&self) -> &[InstrumentId];

    /// The serial settings the instrument expects, or `None` for a network instrument.
    fn line(&self) -> Option<LineSettings>;

    /// Power-on: what the instrument prints when it starts (a banner), and its power-on state.
    fn power_on(&mut self, _ctx: &mut Ctx<'_>) {}

    /// Bytes arrived from the host.
    fn receive(&mut self, ctx: &mut Ctx<'_>, bytes: &[u8]);

    /// Time passed: deferred replies, streaming output, timeouts, injected fault codes.
    fn poll(&mut self, _ctx: &mut Ctx<'_>) {}

    /// The virtual time at which [`Device::poll`] must run next, if anything is pending.
    fn next_wakeup(&mut self, _model: &mut LabModel, _now: Duration) -> Option<Duration> {
        None
    }

    /// A new network connection: partial input of the previous one is dropped.
    fn host_reset(&mut self) {}
}

/// Baud rates closer than this (relative) still understand each other; a UART tolerates a few percent.
const BAUD_TOLERANCE: f64 = 0.03;

/// Whether a receiver at `a` baud reads characters sent at `b` baud.
pub fn bauds_match(a: u32, b: u32) -> bool {
    let (a, b) = (f64::from(a), f64::from(b));
    (a - b).abs() <= BAUD_TOLERANCE * a.max(b)
}

/// What a receiver set to `receiver_baud` reads when `byte` is sent at `sender_baud`: the byte itself when
/// the rates match; otherwise a framing error. A faster receiver sees the long start bit as all zeros
/// (`0x00`); a slower one samples mostly idle line (`0xFF`). Neither is ever a protocol character.
pub fn received_as(sender_baud: u32, receiver_baud: u32, byte: u8) -> u8 {
    if bauds_match(sender_baud, receiver_baud) {
        byte
    } else if receiver_baud > sender_baud {
        0x00
    } else {
        0xFF
    }
}

/// A device on a bench, without a port: bytes in, bytes out, in virtual time. For tests and fuzzing.
pub struct Bench<D: Device> {
    pub device: D,
    pub model: LabModel,
    pub now: Duration,
    pub host_baud: Option<u32>,
}

/// Most polls one [`Bench::advance`] makes, so a device that keeps asking for "now" cannot hang a test.
const MAX_POLLS: usize = 100_000;

impl<D: Device> Bench<D> {
    /// A device powered on at virtual time zero; the power-on output is discarded (see [`Bench::power_on`]).
    pub fn new(device: D, model: LabModel) -> Bench<D> {
        let mut bench = Bench {
            device,
            model,
            now: Duration::ZERO,
            host_baud: None,
        };
        bench.power_on();
        bench
    }

    fn call(&mut self, f: impl FnOnce(&mut D, &mut Ctx<'_>)) -> Vec<Emit> {
        let mut out = Vec::new();
        let mut ctx = Ctx::new(&mut self.model, self.now, self.host_baud, &mut out);
        f(&mut self.device, &mut ctx);
        out
    }

    /// Powers the device on again and returns what it printed.
    pub fn power_on(&mut self) -> Vec<u8> {
        flatten(self.call(|d, ctx| d.power_on(ctx)))
    }

    /// Sends bytes and returns the reply bytes, all sources together.
    pub fn send(&mut self, bytes: &[u8]) -> Vec<u8> {
        flatten(self.send_emits(bytes))
    }

    /// Sends bytes and returns the output per source.
    pub fn send_emits(&mut self, bytes: &[u8]) -> Vec<Emit> {
        self.call(|d, ctx| d.receive(ctx, bytes))
    }

    /// Lets `span` of virtual time pass, polling at every wakeup the device asks for; returns the output.
    pub fn advance(&mut self, span: Duration) -> Vec<u8> {
        let end = self.now.saturating_add(span);
        let mut out = Vec::new();
        let mut last_poll = None;
        for _ in 0..MAX_POLLS {
            match self.device.next_wakeup(&mut self.model, self.now) {
                Some(at) if at <= end => {
                    let at = at.max(self.now);
                    if last_poll == Some(at) {
                        // Asked again for an instant already polled: nothing more is due before `end`.
                        break;
                    }
                    self.now = at;
                    last_poll = Some(at);
                    out.extend(flatten(self.call(|d, ctx| d.poll(ctx))));
                }
                _ => break,
            }
        }
        self.now = end;
        out.extend(flatten(self.call(|d, ctx| d.poll(ctx))));
        out
    }
}

/// All emitted bytes in order.
pub fn flatten(emits: Vec<Emit>) -> Vec<u8> {
    emits.into_iter().flat_map(|e| e.bytes).collect()
}

/// Lines of text for assertions: bytes split after `\n`, lossily decoded.
pub fn lines(bytes: &[u8]) -> Vec<String> {
    bytes
        .split_inclusive(|&b| b == b'\n')
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_time_counts_start_parity_and_stop_bits() {
        let line = LineSettings::n81(9600);
        assert_eq!(line.bits_per_char(), 10);
        assert_eq!(line.wire_time(96), Duration::from_millis(100));
        assert_eq!(LineSettings::e71(9600).bits_per_char(), 10);
        assert_eq!(LineSettings::n81(0).wire_time(10), Duration::ZERO);
        assert_eq!(LineSettings::e71(9600).label(), "9600 7E1");
        assert_eq!(LineSettings::n81(115200).label(), "115200 8N1");
        let serial = LineSettings::e71(9600).serial_line("/dev/pts/3");
        assert_eq!(
            (serial.baud, serial.data_bits, serial.parity),
            (9600, 7, Parity::Even)
        );
    }
}
