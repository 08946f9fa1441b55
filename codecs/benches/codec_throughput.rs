//! Decode throughput of each sans-IO codec (host side: what a driver parses), in MB/s and frames/s.
//!
//! Each codec decodes a buffer of about 1 MB of typical replies, front to back as a port's receive buffer
//! is consumed; the best of several passes is printed.
//!
//! `cargo bench -p labctl-codecs --bench codec_throughput` (figures in BENCHMARKS.md).

use std::hint::black_box;
use std::time::{Duration, Instant};

use labctl_codecs::{DecodeError, Decoded, grbl, mtsics, namur, ne1000, scpi};

/// Bytes of replies per pass.
const BUFFER: usize = 1 << 20;
const PASSES: usize = 7;

type Decode = fn(&[u8]) -> Result<usize, DecodeError>;

fn consumed<T>(d: Result<Decoded<T>, DecodeError>) -> Result<usize, DecodeError> {
    match d? {
        Decoded::Frame { value, consumed } => {
            black_box(value);
            Ok(consumed)
        }
        Decoded::Incomplete => Ok(0),
    }
}

fn spectrum_cmd() -> scpi::Command {
    scpi::Command::MeasureSpectrum {
        start_nm: 380.0,
        stop_nm: 780.0,
        step_nm: 2.0,
    }
}

/// Decodes every frame of `buf`; returns the number of frames.
fn decode_all(decode: Decode, buf: &[u8]) -> usize {
    let mut at = 0;
    let mut frames = 0;
    while at < buf.len() {
        match decode(&buf[at..]) {
            Ok(0) => break,
            Ok(n) => {
                at += n;
                frames += 1;
            }
            Err(e) => panic!("benchmark frame does not decode: {e}"),
        }
    }
    frames
}

fn bench(what: &str, sample: &[u8], decode: Decode) {
    let copies = (BUFFER / sample.len()).max(1);
    let buf = sample.repeat(copies);
    assert_eq!(
        decode_all(decode, &buf),
        copies,
        "{what}: every frame decodes"
    );
    let mut best = Duration::MAX;
    for _ in 0..PASSES {
        let t0 = Instant::now();
        let frames = decode_all(decode, black_box(&buf));
        best = best.min(t0.elapsed());
        black_box(frames);
    }
    let secs = best.as_secs_f64();
    println!(
        "{what:<44} {:>8.1} MB/s {:>12.0} frames/s  ({} B/frame)",
        buf.len() as f64 / secs / 1e6,
        copies as f64 / secs,
        sample.len(),
    );
}

fn spectrum_line() -> Vec<u8> {
    let values: Vec<String> = (0..201)
        .map(|k| {
            format!(
                "{:.4}",
                2.5 * (-((k as f64 - 70.0) / 22.0).powi(2) / 2.0).exp()
            )
        })
        .collect();
    format!("{}\n", values.join(",")).into_bytes()
}

fn main() {
    // `cargo test --benches` runs this too: only check that every sample decodes then.
    let quick = std::env::args().all(|a| a != "--bench");
    let spectrum = spectrum_line();
    let cases: [(&str, &[u8], Decode); 7] = [
        (
            "GRBL status report",
            b"<Idle|MPos:40.000,20.000,10.000|FS:0,0>\r\n",
            |b| consumed(grbl::decode_response(b)),
        ),
        ("GRBL ok", b"ok\r\n", |b| consumed(grbl::decode_response(b))),
        ("NE-1000 DIS reply", b"\x0201SI0.400W0.000ML\x03", |b| {
            consumed(ne1000::decode_response(b))
        }),
        ("MT-SICS weight", b"S S    10.0000 g\r\n", |b| {
            consumed(mtsics::decode_response(b))
        }),
        ("IKA NAMUR temperature", b"22.0 2\r\n", |b| {
            consumed(namur::decode_response(b))
        }),
        (
            "SCPI *IDN?",
            b"Photon Analytics,UV-2400 Probe,PA24-0711385,3.2.1\n",
            |b| consumed(scpi::decode_reply(&scpi::Command::Identify, b)),
        ),
        ("SCPI 201-point spectrum", &spectrum, |b| {
            consumed(scpi::decode_reply(&spectrum_cmd(), b))
        }),
    ];
    println!("decode throughput, best of {PASSES} passes over ~1 MB of replies each");
    for (what, sample, decode) in cases {
        if quick {
            assert_eq!(decode_all(decode, sample), 1, "{what}");
        } else {
            bench(what, sample, decode);
        }
    }
}
