//! The simulated lab on real pseudo-terminals and TCP, seen as a terminal user sees it: plain byte I/O on
//! the pty's slave (`std::fs`) and a plain `TcpStream`, no labctl driver code.
//!
//! Timeouts here only bound a failing test; assertions are about bytes and virtual time, never wall time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use labctl_clock::{Clock, ManualClock};
use labctl_simulators::model::{FaultConfig, PumpState};
use labctl_simulators::{ClockConfig, EndpointKind, SimLab, SimLabConfig, SimLabHandle};
use tokio::runtime::Runtime;

/// Bound on waiting for bytes that must come.
const COME: Duration = Duration::from_secs(10);
/// How long to watch for bytes that must not come (a wrong implementation would send them well within).
const QUIET: Duration = Duration::from_millis(300);

/// `O_NONBLOCK` on Linux (x86, ARM): reads return at once, so no reader thread outlives its terminal
/// (one would steal the replies meant for the next client of the same pty).
const O_NONBLOCK: i32 = 0o4000;

/// A terminal on a pty: plain, non-blocking byte I/O on the slave.
struct Term {
    file: File,
    buf: Vec<u8>,
    closed: bool,
}

impl Term {
    fn open(path: &Path) -> Term {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Term {
            file,
            buf: Vec::new(),
            closed: false,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.file.write_all(bytes).unwrap();
    }

    /// Reads what arrives within `timeout`; false when nothing did.
    fn pump(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            match self.file.read(&mut chunk) {
                Ok(n) if n > 0 => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                // EOF or EIO: the device end is gone.
                _ => {
                    self.closed = true;
                    return false;
                }
            }
        }
    }

    /// Everything up to and including the first `end`, waiting for it.
    fn until(&mut self, end: &[u8]) -> Vec<u8> {
        let deadline = std::time::Instant::now() + COME;
        loop {
            if let Some(i) = self.buf.windows(end.len()).position(|w| w == end) {
                return self.buf.drain(..i + end.len()).collect();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero() && !self.closed,
                "waiting for {:?}, got {:?}",
                String::from_utf8_lossy(end),
                String::from_utf8_lossy(&self.buf)
            );
            self.pump(left);
        }
    }

    /// Exactly `n` bytes, waiting for them.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let deadline = std::time::Instant::now() + COME;
        while self.buf.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero() && !self.closed,
                "waiting for {n} bytes, got {:?}",
                self.buf
            );
            self.pump(left);
        }
        self.buf.drain(..n).collect()
    }

    /// Asserts nothing arrives for a while.
    fn quiet(&mut self) {
        while self.pump(QUIET) {}
        assert!(
            self.buf.is_empty(),
            "unexpected {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }

    /// Waits for the device end to close.
    fn closes(&mut self) {
        let deadline = std::time::Instant::now() + COME;
        while !self.closed {
            assert!(
                std::time::Instant::now() < deadline,
                "the pty did not close"
            );
            self.pump(Duration::from_millis(50));
        }
    }
}

struct Lab {
    rt: Runtime,
    handle: Option<SimLabHandle>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn start(config: SimLabConfig) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new().unwrap();
        let config = SimLabConfig {
            // Made by the lab when missing.
            pty_dir: Some(dir.path().join("ptys")),
            ..config
        };
        let handle = rt.block_on(SimLab::start(config)).unwrap();
        Lab {
            rt,
            handle: Some(handle),
            dir,
        }
    }

    fn warped() -> Lab {
        Lab::start(SimLabConfig {
            clock: ClockConfig::Warp(20.0),
            ..SimLabConfig::default()
        })
    }

    /// A lab on a manual clock, without wire time, so replies come only when virtual time allows.
    fn manual(clock: &ManualClock, faults: &[(&str, FaultConfig)]) -> Lab {
        Lab::start(SimLabConfig {
            clock: ClockConfig::Manual(clock.clone()),
            wire_timing: false,
            faults: faults
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            seed: 5,
            ..SimLabConfig::default()
        })
    }

    /// Waits until the port's device has taken `bytes` bytes in all.
    fn taken(&self, port: &str, bytes: u64) {
        self.rt
            .block_on(self.handle().wait_received(port, bytes, COME))
            .unwrap();
    }

    /// Waits until the port has read `bytes` bytes in all from the host (they may still be on the wire).
    fn heard(&self, port: &str, bytes: u64) {
        self.rt
            .block_on(self.handle().wait_heard(port, bytes, COME))
            .unwrap();
    }

    /// Whether the port's device has still not taken `bytes` bytes after a moment.
    fn not_taken(&self, port: &str, bytes: u64) -> bool {
        self.rt
            .block_on(
                self.handle()
                    .wait_received(port, bytes, Duration::from_millis(200)),
            )
            .is_err()
    }

    fn handle(&self) -> &SimLabHandle {
        self.handle.as_ref().unwrap()
    }

    fn link(&self, port: &str) -> PathBuf {
        self.dir.path().join("ptys").join(format!("{port}.pty"))
    }

    fn term(&self, port: &str) -> Term {
        Term::open(&self.link(port))
    }

    fn pty(&self, id: &str) -> PathBuf {
        match self.handle().endpoint(id).unwrap().kind {
            EndpointKind::Pty { path, .. } => path.unwrap(),
            other => panic!("{other:?}"),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.rt.block_on(handle.shutdown());
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn endpoints_name_every_instrument_and_link_the_ptys() {
    let lab = Lab::warped();
    let endpoints = lab.handle().endpoints();
    let ids: Vec<&str> = endpoints.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "gantry",
            "pump-red",
            "pump-yellow",
            "pump-blue",
            "balance",
            "hotplate",
            "spectro"
        ]
    );
    let pumps: Vec<_> = endpoints.iter().filter(|e| e.port == "pumps").collect();
    assert_eq!(
        pumps.iter().map(|e| e.network_address).collect::<Vec<_>>(),
        [Some(1), Some(2), Some(3)]
    );
    assert!(
        pumps.windows(2).all(|w| w[0].kind == w[1].kind),
        "one pty for the three pumps"
    );
    for e in &endpoints {
        assert!(e.open);
        match &e.kind {
            EndpointKind::Pty { path, link, .. } => {
                let path = path.as_ref().unwrap();
                assert!(path.starts_with("/dev/pts"), "{path:?}");
                assert_eq!(&std::fs::read_link(link.as_ref().unwrap()).unwrap(), path);
            }
            EndpointKind::Tcp { address } => {
                assert!(address.ip().is_loopback() && address.port() != 0)
            }
        }
    }
    assert_eq!(
        lab.handle().endpoint("hotplate").unwrap().line_label(),
        "9600 7E1"
    );
    assert_eq!(
        lab.handle().endpoint("gantry").unwrap().line_label(),
        "115200 8N1"
    );
    // Serialised (as `labctl sim --json` prints them), the transport is a tag.
    let value = toml::Value::try_from(&endpoints[0]).unwrap();
    assert_eq!(value["transport"].as_str(), Some("pty"));
    assert_eq!(value["protocol"].as_str(), Some("grbl"));
    assert_eq!(value["line"]["baud"].as_integer(), Some(115200));
    let value = toml::Value::try_from(&endpoints[6]).unwrap();
    assert_eq!(value["transport"].as_str(), Some("tcp"));
}

#[test]
fn a_terminal_talks_to_every_serial_instrument() {
    let lab = Lab::warped();

    let mut gantry = lab.term("gantry");
    gantry.send(b"$X\n");
    gantry.until(b"ok\r\n");
    gantry.send(b"?");
    let status = text(&gantry.until(b"\r\n"));
    assert_eq!(
        status,
        "<Idle|MPos:0.000,0.000,50.000|FS:0,0|WCO:0.000,0.000,0.000>\r\n"
    );
    gantry.send(b"$I\n");
    assert_eq!(
        text(&gantry.until(b"ok\r\n")),
        "[VER:1.1h.20190825:LabCNC XYZ-300 SN 2211-0417]\r\n[OPT:V,15,128]\r\nok\r\n"
    );

    let mut pumps = lab.term("pumps");
    pumps.send(b"1VER\r");
    assert_eq!(pumps.until(b"\x03"), b"\x0201A?RNE1000V3.928\x03");
    pumps.send(b"2VER\r3DIA\r");
    assert_eq!(pumps.until(b"\x03"), b"\x0202A?RNE1000V3.928\x03");
    assert_eq!(pumps.until(b"\x03"), b"\x0203A?R14.43\x03");

    let mut balance = lab.term("balance");
    balance.send(b"S\r\n");
    let weight = text(&balance.until(b"\r\n"));
    assert!(
        weight.starts_with("S S ") && weight.ends_with(" g\r\n"),
        "{weight:?}"
    );
    assert_eq!(weight.len(), "S S     0.0000 g\r\n".len());

    let mut hotplate = lab.term("hotplate");
    hotplate.send(b"IN_NAME\r\nIN_PV_2\r\n");
    assert_eq!(text(&hotplate.until(b"\r\n")), "RCT digital\r\n");
    assert_eq!(text(&hotplate.until(b"\r\n")), "22.0 2\r\n");
}

#[test]
fn the_pty_stays_across_client_reconnects() {
    let lab = Lab::warped();
    let before = lab.pty("balance");
    for _ in 0..3 {
        let mut term = Term::open(&before);
        term.send(b"I4\r\n");
        assert_eq!(text(&term.until(b"\r\n")), "I4 A \"B021002593\"\r\n");
    }
    assert_eq!(lab.pty("balance"), before);
}

#[test]
fn the_spectrometer_answers_on_tcp() {
    let lab = Lab::warped();
    let EndpointKind::Tcp { address } = lab.handle().endpoint("spectro").unwrap().kind else {
        panic!("spectro is not on TCP");
    };
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(COME)).unwrap();
    let line = |stream: &mut TcpStream, request: &[u8]| {
        stream.write_all(request).unwrap();
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\n") {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed");
            reply.push(byte[0]);
        }
        text(&reply)
    };
    assert_eq!(
        line(&mut stream, b"*IDN?\n"),
        "Photon Analytics,UV-2400 Probe,PA24-0711385,3.2.1\n"
    );
    assert_eq!(
        line(&mut stream, b"*opc?;:syst:err?\r\n"),
        "1;0,\"No error\"\n"
    );
    // No sample at the probe: no reply to the measurement, an error on the queue.
    assert_eq!(
        line(&mut stream, b"MEAS:ABS? 500\nSYST:ERR?\n"),
        "-200,\"Execution error;no sample at the probe\"\n"
    );
}

#[test]
fn latency_holds_replies_until_virtual_time_has_passed() {
    let clock = ManualClock::new();
    let slow = FaultConfig {
        latency_ms: 500,
        ..FaultConfig::default()
    };
    let lab = Lab::manual(&clock, &[("balance", slow)]);
    let mut balance = lab.term("balance");
    let mut hotplate = lab.term("hotplate");
    balance.send(b"I4\r\n");
    // Taken at virtual time zero.
    lab.taken("balance", 4);
    clock.advance(Duration::from_millis(499));
    balance.quiet();
    // Meanwhile an instrument without latency answers at once.
    hotplate.send(b"IN_NAME\r\n");
    assert_eq!(text(&hotplate.until(b"\r\n")), "RCT digital\r\n");
    clock.advance(Duration::from_millis(1));
    assert_eq!(text(&balance.until(b"\r\n")), "I4 A \"B021002593\"\r\n");
    assert_eq!(lab.handle().now(), Duration::from_millis(500));
}

#[test]
fn wire_time_follows_the_baud_rate_in_virtual_time() {
    let clock = ManualClock::new();
    let lab = Lab::start(SimLabConfig {
        clock: ClockConfig::Manual(clock.clone()),
        ..SimLabConfig::default()
    });
    let mut balance = lab.term("balance");
    balance.send(b"I4\r\n");
    lab.heard("balance", 4);
    // The command's 4 characters take 4.2 ms to cross the line at 9600 8N1 before the balance has them...
    clock.advance(Duration::from_millis(4));
    assert!(lab.not_taken("balance", 4));
    clock.advance(Duration::from_millis(1));
    lab.taken("balance", 4);
    // ...and its reply's 19 characters 19.8 ms more.
    clock.advance(Duration::from_millis(19));
    balance.quiet();
    clock.advance(Duration::from_millis(1));
    assert_eq!(text(&balance.until(b"\r\n")), "I4 A \"B021002593\"\r\n");
}

#[test]
fn dropped_garbled_and_missing_replies() {
    let clock = ManualClock::new();
    let garbled = FaultConfig {
        garble_probability: 1.0,
        ..FaultConfig::default()
    };
    let dropped = FaultConfig {
        drop_probability: 1.0,
        ..FaultConfig::default()
    };
    let silent = FaultConfig {
        no_reply: true,
        ..FaultConfig::default()
    };
    let lab = Lab::manual(
        &clock,
        &[
            ("hotplate", garbled),
            ("pump-red", dropped),
            ("pump-blue", silent),
        ],
    );
    // Garbled: the same number of bytes, every one of them wrong.
    let mut hotplate = lab.term("hotplate");
    hotplate.send(b"IN_NAME\r\n");
    let got = hotplate.take(13);
    assert!(
        got.iter().zip(b"RCT digital\r\n").all(|(a, b)| a != b),
        "{got:?}"
    );

    // Dropped and no reply: nothing arrives, but the pumps did what they were told.
    let mut pumps = lab.term("pumps");
    pumps.send(b"1RAT 100 UM\r3RAT 200 UM\r3RUN\r");
    pumps.quiet();
    pumps.send(b"2VER\r");
    assert_eq!(pumps.until(b"\x03"), b"\x0202A?RNE1000V3.928\x03");
    let handle = lab.handle();
    assert_eq!(
        handle.with_model(|m, now| m.pump_status(now, 2).unwrap().state),
        PumpState::Infusing
    );
    handle.faults("pumps").unwrap().clear().unwrap();
    // The dropped reply had reported pump 1's power-on alarm; this one is plain.
    pumps.send(b"1RAT\r");
    assert_eq!(pumps.until(b"\x03"), b"\x0201S100.0UM\x03");
}

#[test]
fn the_same_seed_and_bytes_give_the_same_damage() {
    let run = |seed: u64| {
        let clock = ManualClock::new();
        let noisy = FaultConfig {
            garble_probability: 0.3,
            ..FaultConfig::default()
        };
        let lab = Lab::start(SimLabConfig {
            clock: ClockConfig::Manual(clock),
            wire_timing: false,
            seed,
            faults: [("balance".to_string(), noisy)].into(),
            ..SimLabConfig::default()
        });
        let mut balance = lab.term("balance");
        let mut got = Vec::new();
        for _ in 0..4 {
            balance.send(b"I4\r\n");
            got.extend(balance.take(19));
        }
        got
    };
    let a = run(11);
    assert_eq!(a, run(11));
    assert_ne!(a, run(12));
    assert_ne!(a, b"I4 A \"B021002593\"\r\n".repeat(4));
}

#[test]
fn unplug_closes_the_pty_and_replug_makes_a_new_one() {
    let lab = Lab::warped();
    let handle = lab.handle();
    let faults = handle.faults("gantry").unwrap();
    let before = lab.pty("gantry");
    let mut term = lab.term("gantry");
    term.send(b"$X\n");
    term.until(b"ok\r\n");

    lab.rt.block_on(faults.unplug()).unwrap();
    term.closes();
    assert!(
        term.file.write_all(b"?").is_err(),
        "writing to an unplugged port fails"
    );
    assert!(
        !lab.link("gantry").exists(),
        "the symlink goes with the device"
    );
    assert!(!handle.endpoint("gantry").unwrap().open);

    let status = lab.rt.block_on(faults.replug()).unwrap();
    let after = status.pty.unwrap();
    assert_ne!(after, before);
    assert_eq!(std::fs::read_link(lab.link("gantry")).unwrap(), after);
    // The controller kept its state: still unlocked.
    let mut term = lab.term("gantry");
    term.send(b"?");
    assert!(text(&term.until(b"\r\n")).starts_with("<Idle|MPos:0.000,0.000,50.000|"));
}

#[test]
fn unplugging_one_pump_keeps_the_line_and_silences_only_that_pump() {
    let lab = Lab::warped();
    let handle = lab.handle();
    let mut pumps = lab.term("pumps");
    lab.rt
        .block_on(handle.faults("pump-yellow").unwrap().unplug())
        .unwrap();
    pumps.send(b"2VER\r1VER\r");
    assert_eq!(pumps.until(b"\x03"), b"\x0201A?RNE1000V3.928\x03");
    pumps.quiet();
    lab.rt
        .block_on(handle.faults("pump-yellow").unwrap().replug())
        .unwrap();
    pumps.send(b"2VER\r");
    assert_eq!(pumps.until(b"\x03"), b"\x0202A?RNE1000V3.928\x03");
    // The whole line: the pty closes.
    lab.rt
        .block_on(handle.faults("pumps").unwrap().unplug())
        .unwrap();
    pumps.closes();
}

#[test]
fn unplugging_the_spectrometer_closes_and_refuses_until_replugged() {
    let lab = Lab::warped();
    let handle = lab.handle();
    let EndpointKind::Tcp { address } = handle.endpoint("spectro").unwrap().kind else {
        panic!("spectro is not on TCP");
    };
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(COME)).unwrap();
    stream.write_all(b"*OPC?\n").unwrap();
    let mut reply = [0u8; 2];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"1\n");
    let faults = handle.faults("spectro").unwrap();
    lab.rt.block_on(faults.unplug()).unwrap();
    assert_eq!(
        stream.read(&mut reply).unwrap_or(0),
        0,
        "the client reads EOF"
    );
    assert!(
        TcpStream::connect(address).is_err(),
        "nobody listens while unplugged"
    );
    lab.rt.block_on(faults.replug()).unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(COME)).unwrap();
    stream.write_all(b"*OPC?\n").unwrap();
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"1\n");
}

#[test]
fn instrument_error_codes_reach_the_wire() {
    let lab = Lab::warped();
    let handle = lab.handle();
    let mut gantry = lab.term("gantry");
    gantry.send(b"$X\n");
    gantry.until(b"ok\r\n");
    handle
        .faults("gantry")
        .unwrap()
        .update(|f| f.error_code = Some("ALARM:1".into()))
        .unwrap();
    // Pushed at once, unasked, as GRBL does.
    assert_eq!(
        text(&gantry.until(b"continue]\r\n")),
        "ALARM:1\r\n[MSG:Reset to continue]\r\n"
    );

    let mut balance = lab.term("balance");
    handle
        .faults("balance")
        .unwrap()
        .update(|f| f.error_code = Some("+".into()))
        .unwrap();
    balance.send(b"S\r\n");
    assert_eq!(text(&balance.until(b"\r\n")), "S +\r\n");
}

#[test]
fn a_host_at_the_wrong_baud_rate_is_not_understood() {
    let lab = Lab::warped();
    let path = lab.pty("gantry");
    let mut port = tokio_serial::new(path.to_string_lossy(), 9600)
        .timeout(Duration::from_millis(50))
        .open()
        .unwrap();
    port.write_all(b"$I\n").unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    for _ in 0..6 {
        if let Ok(n) = port.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert!(got.is_empty(), "{got:?}");
    // At the right rate the same request is answered.
    port.set_baud_rate(115_200).unwrap();
    port.write_all(b"$I\n").unwrap();
    let deadline = std::time::Instant::now() + COME;
    while !got.ends_with(b"ok\r\n") {
        assert!(std::time::Instant::now() < deadline, "{got:?}");
        if let Ok(n) = port.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert!(text(&got).starts_with("[VER:1.1h"), "{}", text(&got));
}

#[test]
fn tests_can_inspect_the_model() {
    let clock = ManualClock::new();
    let lab = Lab::manual(&clock, &[]);
    let handle = lab.handle();
    handle
        .with_model(|m, now| m.add_vial(now, "v", "W1"))
        .unwrap();
    clock.advance(Duration::from_secs(5));
    let mut balance = lab.term("balance");
    balance.send(b"S\r\n");
    let weight = text(&balance.until(b"\r\n"));
    assert!(
        weight.starts_with("S S    10.0") || weight.starts_with("S S     9.99"),
        "{weight}"
    );
    let model = handle.model();
    let spilled = model.lock().unwrap().stats().spilled_ul;
    assert_eq!(spilled, 0.0);
    assert_eq!(handle.clock().now(), Duration::from_secs(5));
}

/// A lab file with a second balance on a station of its own (W2): the simulated lab serves it as an
/// MT-SICS balance on a pty of its own, named by its id, weighing what stands on its own pan. A vial on W2
/// shows on `balance-2` and not on `balance`; its serial number is its own.
#[test]
fn a_second_balance_of_the_lab_file_weighs_on_its_own_pty() {
    let toml = labctl_protocols::lab::SIM_LAB_TOML.replace(
        "[[instruments]]\nid = \"gantry\"",
        "[[deck.stations]]\nname = \"W2\"\nx_mm = 240.0\ny_mm = 40.0\ninstrument = \"balance-2\"\n\n\
         [[instruments]]\nid = \"gantry\"",
    ) + "\n[[instruments]]\nid = \"balance-2\"\nkind = \"balance\"\ndriver = \"mt_sics\"\n\
         transport = { type = \"simulated\" }\ncapabilities = { mass_g = [-220, 220] }\n\
         envelope = { mass_g = [0, 200] }\n";
    let lab_file = labctl_protocols::Lab::from_toml_str(&toml, "two balances").unwrap();
    let clock = ManualClock::new();
    let lab = Lab::start(SimLabConfig {
        lab: lab_file.clone(),
        clock: ClockConfig::Manual(clock.clone()),
        wire_timing: false,
        ..SimLabConfig::default()
    });
    let handle = lab.handle();
    let wired = handle.lab_file(&lab_file);
    let second = wired.instrument("balance-2").unwrap();
    assert!(
        matches!(&second.transport, labctl_protocols::lab::Transport::Serial(line) if line.baud == 9600),
        "{:?}",
        second.transport
    );
    handle
        .with_model(|m, now| m.add_vial(now, "v", "W2"))
        .unwrap();
    clock.advance(Duration::from_secs(5));
    let weigh = |port: &str| {
        let mut term = lab.term(port);
        term.send(b"S\r\n");
        text(&term.until(b"\r\n"))
    };
    let on_second = weigh("balance-2");
    assert!(
        on_second.starts_with("S S    10.0") || on_second.starts_with("S S     9.99"),
        "{on_second}"
    );
    let on_first = weigh("balance");
    assert!(
        on_first.starts_with("S S     0.0000") || on_first.starts_with("S S    -0.0000"),
        "{on_first}"
    );
    let serial = |port: &str| {
        let mut term = lab.term(port);
        term.send(b"I4\r\n");
        text(&term.until(b"\r\n"))
    };
    assert_ne!(serial("balance"), serial("balance-2"));
}

/// A lab file that names its instruments its own way (`scale`, `stirrer-plate`) is simulated under those
/// names: the endpoints, the wired lab file and the fault controls all answer to them, and the scale's pty
/// weighs what stands on its station.
#[test]
fn a_lab_that_names_its_instruments_its_own_way_is_simulated_under_those_names() {
    let toml = labctl_protocols::lab::SIM_LAB_TOML
        .replace("id = \"balance\"", "id = \"scale\"")
        .replace("instrument = \"balance\"", "instrument = \"scale\"")
        .replace("id = \"hotplate\"", "id = \"stirrer-plate\"")
        .replace(
            "instrument = \"hotplate\"",
            "instrument = \"stirrer-plate\"",
        )
        .replace(
            "safe_state = [\"hotplate\"]",
            "safe_state = [\"stirrer-plate\"]",
        );
    let lab_file = labctl_protocols::Lab::from_toml_str(&toml, "own names").unwrap();
    let clock = ManualClock::new();
    let lab = Lab::start(SimLabConfig {
        lab: lab_file.clone(),
        clock: ClockConfig::Manual(clock.clone()),
        wire_timing: false,
        faults: [(
            "stirrer-plate".to_owned(),
            FaultConfig {
                error_code: Some("E2".into()),
                ..FaultConfig::default()
            },
        )]
        .into_iter()
        .collect(),
        ..SimLabConfig::default()
    });
    let handle = lab.handle();
    let ids: Vec<String> = handle.endpoints().into_iter().map(|e| e.id).collect();
    assert!(ids.contains(&"scale".to_owned()), "{ids:?}");
    assert!(ids.contains(&"stirrer-plate".to_owned()), "{ids:?}");
    assert!(!ids.contains(&"balance".to_owned()), "{ids:?}");
    let wired = handle.lab_file(&lab_file);
    assert!(matches!(
        wired.instrument("scale").unwrap().transport,
        labctl_protocols::lab::Transport::Serial(_)
    ));
    // The fault file's `stirrer-plate` reached the hotplate, and the fault controls know it by name.
    let faults = handle
        .faults("stirrer-plate")
        .expect("fault controls by the lab's id");
    faults.update(|f| f.error_code = None).unwrap();
    assert!(handle.faults("scale").is_some());
    handle
        .with_model(|m, now| m.add_vial(now, "v", "W1"))
        .unwrap();
    clock.advance(Duration::from_secs(5));
    let mut scale = Term::open(&lab.pty("scale"));
    scale.send(b"S\r\n");
    let weight = text(&scale.until(b"\r\n"));
    assert!(
        weight.starts_with("S S    10.0") || weight.starts_with("S S     9.99"),
        "{weight}"
    );
}

/// pyserial, the serial library most lab scripts use, against the gantry and the pump line: it opens the
/// port exclusively and sets raw mode and the baud rate itself. Needs `LABCTL_TEST_PYTHON` (a Python with
/// pyserial, which `scripts/test` provides); skipped with a note otherwise.
#[test]
fn pyserial_talks_to_the_simulators() {
    let Ok(python) = std::env::var("LABCTL_TEST_PYTHON") else {
        eprintln!("skipped: LABCTL_TEST_PYTHON is not set (scripts/test sets it)");
        return;
    };
    let lab = Lab::warped();
    let script = r#"
import sys, serial
gantry = serial.Serial(sys.argv[1], 115200, timeout=5)
gantry.write(b"$X\n")
assert gantry.read_until(b"ok\r\n").endswith(b"ok\r\n")
gantry.write(b"?")
print(gantry.read_until(b"\r\n").decode().strip())
pumps = serial.Serial(sys.argv[2], 19200, timeout=5)
pumps.write(b"2VER\r")
print(pumps.read_until(b"\x03")[1:-1].decode())
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(lab.link("gantry"))
        .arg(lab.link("pumps"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "<Idle|MPos:0.000,0.000,50.000|FS:0,0|WCO:0.000,0.000,0.000>\n02A?RNE1000V3.928\n"
    );
}

#[test]
fn the_wire_tap_records_what_the_host_sent_across_replug() {
    let lab = Lab::warped();
    let handle = lab.handle();
    let mut term = lab.term("hotplate");
    term.send(b"IN_NAME\r\n");
    term.until(b"\r\n");
    term.send(b"OUT_SP_1 80\r\n");
    // The device has taken both lines once the port counts their bytes.
    let sent = b"IN_NAME\r\nOUT_SP_1 80\r\n";
    lab.rt
        .block_on(handle.wait_received("hotplate", sent.len() as u64, COME))
        .unwrap();
    assert_eq!(handle.transcript("hotplate"), sent);

    // The recording survives an unplug; what comes after is appended.
    let faults = handle.faults("hotplate").unwrap();
    lab.rt.block_on(faults.unplug()).unwrap();
    lab.rt.block_on(faults.replug()).unwrap();
    let mut term = lab.term("hotplate");
    term.send(b"STOP_1\r\n");
    lab.rt
        .block_on(handle.wait_received("hotplate", sent.len() as u64 + 8, COME))
        .unwrap();
    assert_eq!(
        handle.transcript("hotplate"),
        b"IN_NAME\r\nOUT_SP_1 80\r\nSTOP_1\r\n"
    );

    // A pump's id gives the shared line; other ports heard nothing.
    let mut pumps = lab.term("pumps");
    pumps.send(b"2VER\r");
    pumps.until(b"\x03");
    assert_eq!(handle.transcript("pump-red"), b"2VER\r");
    assert_eq!(handle.transcript("pumps"), b"2VER\r");
    assert!(handle.transcript("balance").is_empty());
    assert!(handle.tap("no-such-port").is_none());
}
