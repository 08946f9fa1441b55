//! The SCPI command port end to end: the controller on in-process fake instruments (warped time), the
//! command port on a free TCP port and on a pty pair, and plain bytes on the wire (no labctl client code):
//! login, the dye mix submitted with `RUN:SUBM` and polled to completion, `MEAS?`, the emergency stop and
//! its acknowledgement, bad input and over-long lines, several clients at once.

#![cfg(unix)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use labctl::controller::Controller;
use labctl::gateways::command_port::{self, CommandPort, CommandPortArgs};
use labctl::instruments::fake::FakeInstrument;
use labctl_protocols::Lab;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(10);

struct Rig {
    controller: Controller,
    fakes: BTreeMap<String, FakeInstrument>,
}

/// The controller on fake instruments of the simulated lab (as in `tests/controller.rs`).
async fn rig(dir: &Path) -> Rig {
    let (controller, fakes, _) =
        common::controller_on_fakes(dir, Lab::sim(), common::plate_at_42_5).await;
    common::wait_all_online(&controller.handle, WAIT).await;
    Rig { controller, fakes }
}

async fn port(rig: &Rig, dir: &Path, args: CommandPortArgs) -> CommandPort {
    let users = std::sync::Arc::new(labctl::auth::Users::from_lab(&Lab::sim()).unwrap());
    command_port::start(
        &args,
        &Lab::sim(),
        dir,
        rig.controller.handle.clone(),
        users,
    )
    .await
    .unwrap()
}

fn tcp_on_free_port() -> CommandPortArgs {
    CommandPortArgs {
        command_port: Some("127.0.0.1:0".into()),
        ..Default::default()
    }
}

/// A client that only writes lines and reads lines.
struct Client<S> {
    stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Self {
        Client {
            stream: BufReader::new(stream),
        }
    }

    async fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes()).await;
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        let s = self.stream.get_mut();
        s.write_all(bytes).await.unwrap();
        s.flush().await.unwrap();
    }

    async fn read_line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.stream.read_line(&mut line))
            .await
            .expect("a reply in time")
            .unwrap();
        assert!(n > 0, "connection closed");
        assert!(line.ends_with('\n'), "{line:?}");
        line.trim_end().to_owned()
    }

    async fn query(&mut self, line: &str) -> String {
        self.send(line).await;
        self.read_line().await
    }

    /// The next error queue entry.
    async fn error(&mut self) -> String {
        self.query("SYST:ERR?").await
    }

    async fn no_error(&mut self) {
        assert_eq!(self.error().await, "0,\"No error\"");
    }

    /// Sends a command that answers nothing, then checks the queue is empty (proves it ran).
    async fn ok(&mut self, line: &str) {
        self.send(line).await;
        let err = self.error().await;
        assert_eq!(err, "0,\"No error\"", "after {line:?}");
    }

    /// Sends a command that must be refused with `code`; returns the error entry.
    async fn refused(&mut self, line: &str, code: i32) -> String {
        self.send(line).await;
        let err = self.error().await;
        assert!(
            err.starts_with(&format!("{code},")),
            "{line:?} gave {err:?}, expected {code}"
        );
        self.no_error().await;
        err
    }

    async fn submit(&mut self, protocol: &str) -> String {
        let reply = self.query(&format!("RUN:SUBM {protocol}")).await;
        let id = reply.trim_matches('"').to_owned();
        assert!(id.starts_with("run-"), "{reply:?}");
        id
    }

    async fn wait_state(&mut self, run_id: &str, state: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = self.query(&format!("RUN:STAT? {run_id}")).await;
            if reply.split(',').next() == Some(state) {
                return reply;
            }
            assert!(
                !["failed", "aborted", "rejected"].contains(&reply.split(',').next().unwrap()),
                "{run_id}: {reply}"
            );
            assert!(Instant::now() < deadline, "{run_id} never {state}: {reply}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `MEAS?` until the first reading has reached the snapshot.
    async fn measure(&mut self, id: &str, quantity: &str) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            self.send(&format!("MEAS? {id},{quantity}")).await;
            // A failing query answers nothing: ask for the error in the same round trip.
            let reply = self.query("SYST:ERR?").await;
            if reply.starts_with("0,") {
                unreachable!("MEAS? answered nothing and queued nothing");
            }
            if let Ok(v) = reply.parse::<f64>() {
                assert_eq!(self.read_line().await, "0,\"No error\"");
                return v;
            }
            assert!(Instant::now() < deadline, "MEAS? never answered: {reply}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The dye-mix example, on one line, with its own proposal id.
fn dye_mix(proposal_id: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocols/examples/dye-mix.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["metadata"]["proposal_id"] = proposal_id.into();
    serde_json::to_string(&v).unwrap()
}

/// The whole conversation a rig has with the lab, on any byte stream. A serial line is a rig already;
/// on TCP (`tcp`) the client logs in first.
async fn conversation<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, tcp: bool, tag: &str) {
    let idn = c.query("*IDN?").await;
    let fields: Vec<&str> = idn.split(',').collect();
    assert_eq!(fields.len(), 4, "{idn}");
    assert_eq!(&fields[..2], ["labctl", "sim"]);
    assert!(!fields[2].is_empty());
    assert_eq!(fields[3], env!("CARGO_PKG_VERSION"));
    assert_eq!(c.query("*OPC?").await, "1");
    c.no_error().await;

    if tcp {
        // Nothing that changes the lab before a login; a wrong password is an error, not a hang-up.
        c.refused(
            &format!("RUN:SUBM {}", dye_mix(&format!("{tag}-early"))),
            -203,
        )
        .await;
        let err = c.refused("SYST:LOGIN rig-1,wrong", -200).await;
        assert!(err.contains("wrong user name or password"), "{err}");
        assert_eq!(c.query("*IDN?").await, idn);
        c.ok("SYST:LOGIN rig-1,rig-dev").await;
    }
    assert!(c.query("SYST:LOGIN?").await.ends_with(",rig"));

    // Short and long forms, any case, several units on a line.
    let list = c.query("inst:list?").await;
    assert!(list.contains("\"hotplate\""), "{list}");
    assert_eq!(
        c.query("INSTRUMENT:CATALOG?;*OPC?").await,
        format!("{list};1")
    );
    let stat = c.query("INST:STAT? hotplate").await;
    assert!(stat.starts_with("online,"), "{stat}");

    // The dye mix, polled to completion.
    let run_id = c.submit(&dye_mix(&format!("{tag}-dye"))).await;
    c.wait_state(&run_id, "completed").await;
    assert_eq!(c.measure("hotplate", "plate_temperature_c").await, 42.5);
    c.refused("MEAS? hotplate,no_such_quantity", -222).await;
    c.refused(&format!("RUN:PAUS {run_id}"), -221).await;
    c.refused("RUN:STAT? run-nope", -222).await;

    // A rig may stop the lab but not release it; then nothing changes until a technician acknowledges.
    c.ok("SYST:ESTOP").await;
    assert_eq!(c.query("SYST:ESTOP?").await, "1");
    let err = c.refused("SYST:ESTOP:ACK", -203).await;
    assert!(
        err.contains("may not acknowledge the emergency stop"),
        "{err}"
    );
    c.ok("SYST:LOGIN alice,technician-dev").await;
    c.ok("SYST:ESTOP").await;
    assert_eq!(c.query("SYST:ESTOP?").await, "1");
    let err = c
        .refused(
            &format!("RUN:SUBM {}", dye_mix(&format!("{tag}-latched"))),
            -200,
        )
        .await;
    assert!(err.contains("emergency stop is latched"), "{err}");
    c.refused(&format!("RUN:RES {run_id}"), -200).await;
    // Reading goes on.
    assert_eq!(c.measure("hotplate", "plate_temperature_c").await, 42.5);
    c.ok("SYST:ESTOP:ACK").await;
    assert_eq!(c.query("SYST:ESTOP?").await, "0");
    let again = c.submit(&dye_mix(&format!("{tag}-after"))).await;
    c.wait_state(&again, "completed").await;
    c.no_error().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_a_rig_logs_in_runs_the_dye_mix_and_meets_the_emergency_stop() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let port = port(&rig, dir.path(), tcp_on_free_port()).await;
    let addr = port.tcp.expect("TCP port bound");
    assert_ne!(addr.port(), 0);
    assert_eq!(port.endpoints(), [format!("command port: tcp {addr}")]);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = Client::new(stream);
    conversation(&mut c, true, "tcp").await;
    assert!(rig.fakes["pump-red"].log.lock().unwrap().safe_states > 0);
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_pty_the_serial_line_acts_as_a_rig_without_login() {
    use tokio_serial::SerialPort;
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    // The test holds the master; labctl opens the slave by its path, as it would /dev/ttyUSB0.
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = slave.name().expect("pty path");
    let args = CommandPortArgs {
        command_port: Some("off".into()),
        command_serial: Some(path.clone()),
        ..Default::default()
    };
    let port = port(&rig, dir.path(), args).await;
    assert_eq!(port.tcp, None);
    let who = port.serial.clone().expect("serial line served");
    assert_eq!(who.name, format!("serial:{path}"));
    let mut c = Client::new(master);
    conversation(&mut c, false, "pty").await;
    drop(slave);
    rig.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tcp_clients_each_have_their_own_login_and_error_queue() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let port = port(&rig, dir.path(), tcp_on_free_port()).await;
    let addr = port.tcp.unwrap();
    let mut a = Client::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let mut b = Client::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let mut c = Client::new(std::net::TcpStream::connect(addr).map(tokio_std).unwrap());
    a.ok("SYST:LOGIN alice,technician-dev").await;
    // The error goes to a's queue only.
    a.send("NO:SUCH:COMMAND").await;
    assert_eq!(a.query("SYST:ERR:COUN?").await, "1");
    b.no_error().await;
    c.no_error().await;
    assert_eq!(a.query("SYST:LOGIN?").await, "\"alice\",technician");
    assert_eq!(b.query("SYST:LOGIN?").await, "\"\",none");
    b.refused("SYST:ESTOP", -203).await;
    assert_eq!(c.query("SYST:ESTOP?").await, "0");
    assert!(a.error().await.starts_with("-113,"));
    rig.controller.shutdown().await;
}

fn tokio_std(s: std::net::TcpStream) -> tokio::net::TcpStream {
    s.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_over_long_lines_never_drop_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let port = port(&rig, dir.path(), tcp_on_free_port()).await;
    let addr = port.tcp.unwrap();
    let mut c = Client::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    // 1 MiB without a line end: refused, never buffered whole.
    let chunk = vec![b'X'; 64 * 1024];
    for _ in 0..16 {
        c.send_bytes(&chunk).await;
    }
    c.send_bytes(b"\n").await;
    let err = c.error().await;
    assert!(err.starts_with("-363,"), "{err}");
    c.no_error().await;
    // Binary garbage, control characters, broken JSON, unbalanced quotes.
    c.send_bytes(b"\x00\xff\xfe\x1b[2J\r\n").await;
    c.send_bytes(b"RUN:SUBM {\"metadata\": \n").await;
    c.send_bytes(b"MEAS? \"hotplate,plate_temperature_c\n")
        .await;
    c.send_bytes(b"*IDN?;;;;\n").await;
    let idn = c.read_line().await;
    assert!(idn.starts_with("labctl,"), "{idn}");
    let mut codes = Vec::new();
    loop {
        let e = c.error().await;
        if e.starts_with("0,") {
            break;
        }
        codes.push(e);
    }
    assert_eq!(codes.len(), 4, "{codes:?}");
    // Still connected and serving.
    assert_eq!(c.query("*OPC?").await, "1");
    // A whole protocol with a comment-like `;` inside a JSON string passes intact.
    c.ok("SYST:LOGIN planner-bo,planner-dev").await;
    let mut v: serde_json::Value = serde_json::from_str(&dye_mix("semicolon")).unwrap();
    v["metadata"]["name"] = "dye mix; with a semicolon".into();
    let id = c.submit(&serde_json::to_string(&v).unwrap()).await;
    c.wait_state(&id, "completed").await;
    rig.controller.shutdown().await;
}

/// `openssl s_client` as a command-port client: lines in on its standard input, replies out on its standard
/// output.
struct SClient {
    child: tokio::process::Child,
    out: BufReader<tokio::process::ChildStdout>,
}

impl SClient {
    fn start(addr: std::net::SocketAddr, cafile: &Path) -> SClient {
        let mut child = tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-verify_return_error",
                "-servername",
                "localhost",
            ])
            .arg("-connect")
            .arg(addr.to_string())
            .arg("-CAfile")
            .arg(cafile)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("openssl (Debian package `openssl`; scripts/test installs it)");
        let out = BufReader::new(child.stdout.take().unwrap());
        SClient { child, out }
    }

    async fn query(&mut self, line: &str) -> Option<String> {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).await.ok()?;
        stdin.flush().await.ok()?;
        let mut reply = String::new();
        let n = tokio::time::timeout(WAIT, self.out.read_line(&mut reply))
            .await
            .expect("a reply or the end of the connection in time")
            .ok()?;
        (n > 0).then(|| reply.trim_end().to_owned())
    }
}

/// The command port over TLS: a certificate made on first start under the data directory, which
/// `openssl s_client` verifies before it logs in and talks SCPI; with another CA the handshake fails, and
/// clear text on the TLS port gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_port_over_tls_is_verified_by_openssl_and_speaks_scpi() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(dir.path()).await;
    let args = CommandPortArgs {
        command_port: Some("off".into()),
        command_port_tls: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    let port = port(&rig, dir.path(), args).await;
    let addr = port.tls.expect("the TLS command port");
    assert!(
        port.endpoints()
            .contains(&format!("command port: tls {addr}"))
    );
    let cert = dir.path().join("tls/server-cert.pem");
    let mut c = SClient::start(addr, &cert);
    let idn = c.query("*IDN?").await.expect("an answer over TLS");
    assert!(idn.starts_with("labctl,sim,"), "{idn}");
    assert_eq!(
        c.query("SYST:LOGIN alice,technician-dev;LOGIN?")
            .await
            .as_deref(),
        Some("\"alice\",technician")
    );
    // Another certificate authority: openssl refuses the server and nothing is exchanged.
    let other = dir.path().join("other.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other",
        ])
        .arg("-keyout")
        .arg(dir.path().join("other-key.pem"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success());
    let mut untrusting = SClient::start(addr, &other);
    assert_eq!(untrusting.query("*IDN?").await, None);
    // Clear text on the TLS port: no answer, the connection is closed.
    let mut plain = Client::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    plain.send("*IDN?").await;
    let mut line = String::new();
    let n = tokio::time::timeout(WAIT, plain.stream.read_line(&mut line))
        .await
        .expect("the connection closed in time")
        .unwrap_or(0);
    assert!(!line.starts_with("labctl"), "{line:?} ({n} bytes)");
    rig.controller.shutdown().await;
}
