//! The simulators as a terminal user sees them: no labctl driver code, only plain file I/O on the
//! simulator's `/dev/pts/N` (set raw with `stty`), a plain TCP socket, and pyserial when
//! `LABCTL_TEST_PYTHON` names a Python that has it (`scripts/test` sets it).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use labctl_simulators::{EndpointKind, SimLab, SimLabConfig, SimLabHandle};

/// `O_NOCTTY` on Linux: opening a terminal must not make it the test process's controlling terminal.
const O_NOCTTY: i32 = 0o400;

/// The simulated lab in real time (warp 1), wire timing on: what a person at a terminal would get.
async fn lab() -> SimLabHandle {
    SimLab::start(SimLabConfig::default())
        .await
        .expect("start the simulated lab")
}

fn pty_of(sim: &SimLabHandle, id: &str) -> PathBuf {
    match sim.endpoint(id).expect("simulated instrument").kind {
        EndpointKind::Pty { path: Some(p), .. } => p,
        other => panic!("{id} is not on a pty: {other:?}"),
    }
}

/// Opens a pty like a serial terminal program: read/write, raw, the instrument's baud rate, and reads that
/// return after 0.1 s of silence (`min 0 time 1`) so nothing blocks for ever.
fn open_raw(path: &Path, baud: u32, framing: &[&str]) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_NOCTTY)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut stty = Command::new("stty");
    stty.arg("-F")
        .arg(path)
        .args(["raw", "-echo", "min", "0", "time", "1"])
        .arg(baud.to_string())
        .args(framing);
    let out = stty.output().expect("run stty (coreutils)");
    assert!(
        out.status.success(),
        "stty failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

/// Reads until `done` says the reply is complete, or fails after 5 s.
fn read_until(file: &mut File, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !done(&got) {
        assert!(
            Instant::now() < deadline,
            "no complete reply within 5 s; got {:?}",
            String::from_utf8_lossy(&got)
        );
        let n = file.read(&mut buf).expect("read the pty");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn ends_with_crlf(b: &[u8]) -> bool {
    b.ends_with(b"\r\n")
}

/// Runs blocking terminal I/O off the runtime that drives the simulators.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(f))
        .await
        .expect("terminal session hung")
        .expect("terminal session panicked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grbl_answers_a_status_query_and_build_info_at_power_up() {
    let sim = lab().await;
    let path = pty_of(&sim, "gantry");
    let (status, info, refused) = blocking(move || {
        let mut tty = open_raw(&path, 115_200, &["cs8", "-parenb"]);
        tty.write_all(b"?").unwrap();
        let status = read_until(&mut tty, ends_with_crlf);
        tty.write_all(b"$I\n").unwrap();
        let info = read_until(&mut tty, |b| b.ends_with(b"ok\r\n"));
        tty.write_all(b"G0 X10\n").unwrap();
        let refused = read_until(&mut tty, ends_with_crlf);
        (status, info, refused)
    })
    .await;
    // Power-up: locked in alarm at the home position until homed.
    assert_eq!(
        String::from_utf8_lossy(&status),
        "<Alarm|MPos:0.000,0.000,50.000|FS:0,0|WCO:0.000,0.000,0.000>\r\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&info),
        "[VER:1.1h.20190825:LabCNC XYZ-300 SN 2211-0417]\r\n[OPT:V,15,128]\r\nok\r\n"
    );
    assert_eq!(String::from_utf8_lossy(&refused), "error:9\r\n");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ne1000_pumps_on_one_line_answer_by_address_in_stx_etx_packets() {
    let sim = lab().await;
    let path = pty_of(&sim, "pump-red");
    assert_eq!(
        path,
        pty_of(&sim, "pump-blue"),
        "one pty for the whole daisy chain"
    );
    let replies = blocking(move || {
        let mut tty = open_raw(&path, 19_200, &["cs8", "-parenb"]);
        let mut replies = Vec::new();
        for request in [&b"1VER\r"[..], b"1VER\r", b"3VER\r", b"2DIA\r"] {
            tty.write_all(request).unwrap();
            replies.push(read_until(&mut tty, |b| b.last() == Some(&0x03)));
        }
        replies
    })
    .await;
    // The first reply after power-on reports the reset alarm once (`A?R`); then the prompt is `S`.
    assert_eq!(replies[0], b"\x0201A?RNE1000V3.928\x03");
    assert_eq!(replies[1], b"\x0201SNE1000V3.928\x03");
    assert_eq!(replies[2], b"\x0203A?RNE1000V3.928\x03");
    assert_eq!(replies[3], b"\x0202A?R14.43\x03");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mt_sics_balance_weighs_the_empty_pan_and_identifies() {
    let sim = lab().await;
    let path = pty_of(&sim, "balance");
    let (weight, serial, bad) = blocking(move || {
        let mut tty = open_raw(&path, 9600, &["cs8", "-parenb"]);
        tty.write_all(b"S\r\n").unwrap();
        let weight = read_until(&mut tty, ends_with_crlf);
        tty.write_all(b"I4\r\n").unwrap();
        let serial = read_until(&mut tty, ends_with_crlf);
        tty.write_all(b"XYZ\r\n").unwrap();
        let bad = read_until(&mut tty, ends_with_crlf);
        (weight, serial, bad)
    })
    .await;
    // `S S`, the value right-aligned in 10 characters, the unit.
    assert_eq!(String::from_utf8_lossy(&weight), "S S     0.0000 g\r\n");
    assert_eq!(String::from_utf8_lossy(&serial), "I4 A \"B021002593\"\r\n");
    assert_eq!(String::from_utf8_lossy(&bad), "ES\r\n");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ika_hotplate_names_itself_over_a_7e1_line() {
    let sim = lab().await;
    let path = pty_of(&sim, "hotplate");
    let (name, temperature) = blocking(move || {
        // The instrument's line is 7E1, but Linux keeps a pty at 8 bits without parity (`stty cs7 parenb`
        // fails on it) and the simulator sends plain ASCII; a real port would be set `cs7 parenb -parodd`.
        let mut tty = open_raw(&path, 9600, &["cs8", "-parenb"]);
        tty.write_all(b"IN_NAME\r\n").unwrap();
        let name = read_until(&mut tty, ends_with_crlf);
        tty.write_all(b"IN_PV_2\r\n").unwrap();
        let temperature = read_until(&mut tty, ends_with_crlf);
        (name, temperature)
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&name), "RCT digital\r\n");
    assert_eq!(String::from_utf8_lossy(&temperature), "22.0 2\r\n");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scpi_spectrometer_identifies_over_a_plain_socket() {
    let sim = lab().await;
    let address = match sim.endpoint("spectro").expect("spectro").kind {
        EndpointKind::Tcp { address } => address,
        other => panic!("{other:?}"),
    };
    let reply = blocking(move || {
        let mut socket = TcpStream::connect(address).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        socket.write_all(b"*IDN?\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"\n") && Instant::now() < deadline {
            if let Ok(n) = socket.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        got
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "Photon Analytics,UV-2400 Probe,PA24-0711385,3.2.1\n"
    );
    sim.shutdown().await;
}

/// A pyserial client, configured as its users would for each instrument, against the ptys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyserial_talks_to_the_simulators() {
    let python = std::env::var_os("LABCTL_TEST_PYTHON")
        .expect("LABCTL_TEST_PYTHON: a venv python with pyserial (scripts/test sets it)");
    let sim = lab().await;
    let balance = pty_of(&sim, "balance");
    let hotplate = pty_of(&sim, "hotplate");
    const SCRIPT: &str = r#"
import sys, serial
balance, hotplate = sys.argv[1], sys.argv[2]
with serial.Serial(balance, 9600, bytesize=8, parity="N", stopbits=1, timeout=5) as s:
    s.write(b"S\r\n")
    print("balance", repr(s.read_until(b"\r\n").decode("ascii")))
with serial.Serial(hotplate, 9600, bytesize=7, parity="E", stopbits=1, timeout=5) as s:
    s.write(b"IN_NAME\r\n")
    print("hotplate", repr(s.read_until(b"\r\n").decode("ascii")))
"#;
    let out = blocking(move || {
        Command::new(python)
            .arg("-c")
            .arg(SCRIPT)
            .arg(balance)
            .arg(hotplate)
            .output()
            .expect("run the python in LABCTL_TEST_PYTHON")
    })
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pyserial script failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "balance 'S S     0.0000 g\\r\\n'\nhotplate 'RCT digital\\r\\n'\n"
    );
    sim.shutdown().await;
}
