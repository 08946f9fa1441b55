//! Byte streams: serial lines (tokio-serial), raw TCP, and an in-memory duplex for tests.
//!
//! Everything above this crate sees one boxed [`ByteStream`], so port tasks and drivers are tested on the
//! in-memory duplex exactly as they run on a serial line. The drivers open instruments' lines with it and
//! the command port its own terminal line.
//!
//! May depend on: protocols (the lab file's serial line settings). Nothing else of labctl.

use std::fmt;
use std::io;
use std::time::Duration;

use labctl_protocols::lab::{self, SerialLine};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A byte stream that could not be opened: the port (device path, address or memory name) and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {port}: {source}")]
pub struct OpenError {
    pub port: String,
    pub source: io::Error,
}

/// What the rest of the crate reads and writes.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// An open connection to an instrument.
pub type Stream = Box<dyn ByteStream>;

/// How long a TCP connect may take before the instrument counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Buffer size of each direction of an in-memory duplex.
const MEMORY_BUFFER: usize = 4096;

/// Character framing and speed of a serial line, for wire-time budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTiming {
    pub baud: u32,
    /// Bits on the wire per character: start bit, data bits, parity bit, stop bits.
    pub bits_per_char: u32,
}

impl LineTiming {
    /// 8N1 (10 bits per character) at `baud`.
    pub const fn n81(baud: u32) -> LineTiming {
        LineTiming {
            baud,
            bits_per_char: 10,
        }
    }

    /// The framing a lab-file serial line configures.
    pub fn of(line: &SerialLine) -> LineTiming {
        let parity = u32::from(line.parity != lab::Parity::None);
        LineTiming {
            baud: line.baud,
            bits_per_char: 1 + u32::from(line.data_bits) + parity + u32::from(line.stop_bits),
        }
    }

    /// Time `bytes` characters take on the wire. A zero baud (nonsense) counts as no time rather than a
    /// division by zero; the processing allowance still bounds the wait.
    pub fn wire_time(&self, bytes: usize) -> Duration {
        if self.baud == 0 {
            return Duration::ZERO;
        }
        let bits = (bytes as u128).saturating_mul(u128::from(self.bits_per_char));
        let micros = bits
            .saturating_mul(1_000_000)
            .div_ceil(u128::from(self.baud));
        Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
    }
}

/// Where an instrument is reached, with any `simulated` transport already resolved by the caller.
#[derive(Clone)]
pub enum Endpoint {
    Serial(SerialLine),
    /// Raw TCP, `host:port`.
    Tcp {
        address: String,
    },
    /// In-memory duplex; each open hands the other end to the [`MemoryDevice`].
    Memory(MemoryEndpoint),
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Serial(line) => f.debug_tuple("Serial").field(line).finish(),
            Endpoint::Tcp { address } => f.debug_struct("Tcp").field("address", address).finish(),
            Endpoint::Memory(m) => f.debug_tuple("Memory").field(&m.name).finish(),
        }
    }
}

impl Endpoint {
    /// The endpoint of a lab-file transport; `None` for `simulated`, which the caller resolves to the
    /// simulator's pty path or TCP address.
    pub fn from_transport(transport: &lab::Transport) -> Option<Endpoint> {
        match transport {
            lab::Transport::Serial(line) => Some(Endpoint::Serial(line.clone())),
            lab::Transport::Tcp { address } => Some(Endpoint::Tcp {
                address: address.clone(),
            }),
            lab::Transport::Simulated => None,
        }
    }

    /// The name used in logs and errors: the device path, the address, or the memory endpoint's name.
    pub fn name(&self) -> &str {
        match self {
            Endpoint::Serial(line) => &line.port,
            Endpoint::Tcp { address } => address,
            Endpoint::Memory(m) => &m.name,
        }
    }

    /// Wire timing for timeout budgets; `None` when the link has no meaningful baud (TCP).
    pub fn timing(&self) -> Option<LineTiming> {
        match self {
            Endpoint::Serial(line) => Some(LineTiming::of(line)),
            Endpoint::Tcp { .. } => None,
            Endpoint::Memory(m) => m.timing,
        }
    }

    /// Two endpoints that reach the same physical line (instruments sharing it share one port task).
    pub fn same_line(&self, other: &Endpoint) -> bool {
        match (self, other) {
            (Endpoint::Serial(a), Endpoint::Serial(b)) => a.port == b.port,
            (Endpoint::Tcp { address: a }, Endpoint::Tcp { address: b }) => a == b,
            (Endpoint::Memory(a), Endpoint::Memory(b)) => a.devices.same_channel(&b.devices),
            _ => false,
        }
    }
}

/// The host side of an in-memory line.
#[derive(Clone)]
pub struct MemoryEndpoint {
    name: String,
    timing: Option<LineTiming>,
    devices: mpsc::Sender<DuplexStream>,
}

/// The device side of an in-memory line: a fake device accepts each connection the host opens.
pub struct MemoryDevice {
    connections: mpsc::Receiver<DuplexStream>,
}

impl MemoryDevice {
    /// The device end of the next connection the host opens; `None` once every endpoint is gone.
    pub async fn accept(&mut self) -> Option<DuplexStream> {
        self.connections.recv().await
    }
}

/// A new in-memory line named `name`. With `timing`, timeouts are budgeted as on a serial line at that
/// speed (the bytes themselves move instantly).
pub fn memory(name: &str, timing: Option<LineTiming>) -> (Endpoint, MemoryDevice) {
    let (devices, connections) = mpsc::channel(4);
    let endpoint = MemoryEndpoint {
        name: name.to_owned(),
        timing,
        devices,
    };
    (Endpoint::Memory(endpoint), MemoryDevice { connections })
}

/// Opens a byte stream to `endpoint`.
pub async fn open(endpoint: &Endpoint) -> Result<Stream, OpenError> {
    let port = endpoint.name().to_owned();
    match endpoint {
        Endpoint::Serial(line) => open_serial(line).await,
        Endpoint::Tcp { address } => {
            let stream =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(source)) => return Err(OpenError { port, source }),
                    Err(_) => {
                        let source = io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no TCP connection within {CONNECT_TIMEOUT:?}"),
                        );
                        return Err(OpenError { port, source });
                    }
                };
            // Small request/reply frames: Nagle would add tens of milliseconds to every transaction.
            stream
                .set_nodelay(true)
                .map_err(|source| OpenError { port, source })?;
            Ok(Box::new(stream))
        }
        Endpoint::Memory(m) => {
            let (host, device) = tokio::io::duplex(MEMORY_BUFFER);
            m.devices.try_send(device).map_err(|_| OpenError {
                port,
                source: io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "no fake device is listening",
                ),
            })?;
            Ok(Box::new(host))
        }
    }
}

/// The tokio-serial builder for a lab-file line, refusing settings no UART has.
pub fn serial_builder(line: &SerialLine) -> Result<tokio_serial::SerialPortBuilder, OpenError> {
    let invalid = |what: String| OpenError {
        port: line.port.clone(),
        source: io::Error::new(io::ErrorKind::InvalidInput, what),
    };
    let data_bits = match line.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        8 => tokio_serial::DataBits::Eight,
        other => return Err(invalid(format!("data_bits {other}: expected 5, 6, 7 or 8"))),
    };
    let stop_bits = match line.stop_bits {
        1 => tokio_serial::StopBits::One,
        2 => tokio_serial::StopBits::Two,
        other => return Err(invalid(format!("stop_bits {other}: expected 1 or 2"))),
    };
    let parity = match line.parity {
        lab::Parity::None => tokio_serial::Parity::None,
        lab::Parity::Even => tokio_serial::Parity::Even,
        lab::Parity::Odd => tokio_serial::Parity::Odd,
    };
    let flow_control = match line.flow_control {
        lab::FlowControl::None => tokio_serial::FlowControl::None,
        lab::FlowControl::Software => tokio_serial::FlowControl::Software,
        lab::FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
    };
    if line.baud == 0 {
        return Err(invalid("baud 0: expected a positive rate".into()));
    }
    Ok(tokio_serial::new(line.port.as_str(), line.baud)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .parity(parity)
        .flow_control(flow_control)
        // A second program on the same line would interleave bytes with ours.
        .exclusive(true))
}

async fn open_serial(line: &SerialLine) -> Result<Stream, OpenError> {
    let builder = serial_builder(line)?;
    let port = line.port.clone();
    let open_error = |source: io::Error| OpenError {
        port: port.clone(),
        source,
    };
    // open(2), flock and tcsetattr are blocking syscalls (a USB adapter can take a while): off the runtime.
    let native = tokio::task::spawn_blocking(move || builder.open_native())
        .await
        .map_err(|e| open_error(io::Error::other(format!("open task failed: {e}"))))?
        .map_err(|e| open_error(io::Error::from(e)))?;
    let stream =
        tokio_serial::SerialStream::try_from(native).map_err(|e| open_error(io::Error::from(e)))?;
    Ok(Box::new(stream))
}

/// Whether an I/O error means the device is gone rather than a transient fault: a reset TCP connection,
/// or EIO, which a pty master reads once the slave has closed (and a USB adapter once unplugged).
pub fn is_disconnect(error: &io::Error) -> bool {
    const EIO: i32 = 5;
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    ) || error.raw_os_error() == Some(EIO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use labctl_protocols::lab::{FlowControl, Parity};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn line(data_bits: u8, parity: Parity, stop_bits: u8, baud: u32) -> SerialLine {
        SerialLine {
            port: "/dev/null-line".into(),
            baud,
            data_bits,
            parity,
            stop_bits,
            flow_control: FlowControl::None,
        }
    }

    #[test]
    fn bits_per_char_follow_the_line_framing() {
        assert_eq!(
            LineTiming::of(&line(8, Parity::None, 1, 9600)).bits_per_char,
            10
        );
        assert_eq!(
            LineTiming::of(&line(7, Parity::Even, 1, 9600)).bits_per_char,
            10
        );
        assert_eq!(
            LineTiming::of(&line(8, Parity::Odd, 2, 9600)).bits_per_char,
            12
        );
    }

    #[test]
    fn wire_time_is_bytes_times_bits_over_baud() {
        // 96 characters of 10 bits at 9600 baud: exactly 100 ms.
        assert_eq!(
            LineTiming::n81(9600).wire_time(96),
            Duration::from_millis(100)
        );
        // Rounded up, never down: 1 character at 115200 is 86.8 us.
        assert_eq!(
            LineTiming::n81(115_200).wire_time(1),
            Duration::from_micros(87)
        );
        assert_eq!(LineTiming::n81(0).wire_time(1000), Duration::ZERO);
    }

    #[test]
    fn impossible_serial_settings_are_refused_by_name() {
        let err = serial_builder(&line(9, Parity::None, 1, 9600)).expect_err("9 data bits refused");
        assert!(
            err.to_string()
                .contains("data_bits 9: expected 5, 6, 7 or 8"),
            "{err}"
        );
        let err = serial_builder(&line(8, Parity::None, 3, 9600)).expect_err("3 stop bits refused");
        assert!(err.to_string().contains("stop_bits 3"), "{err}");
        let err = serial_builder(&line(8, Parity::None, 1, 0)).expect_err("baud 0 refused");
        assert!(err.to_string().contains("baud 0"), "{err}");
    }

    #[tokio::test]
    async fn opening_a_missing_serial_port_names_it() {
        let mut l = line(8, Parity::None, 1, 9600);
        l.port = "/dev/labctl-no-such-port".into();
        let err = open(&Endpoint::Serial(l))
            .await
            .err()
            .expect("missing port");
        assert!(err.port == "/dev/labctl-no-such-port", "{err}");
    }

    #[tokio::test]
    async fn serial_opens_a_real_pty_exclusively() {
        // A real pty pair: we open the slave by path like any serial device.
        let Ok((mut master, slave)) = tokio_serial::SerialStream::pair() else {
            panic!("this machine has no ptys");
        };
        let path = {
            use tokio_serial::SerialPort;
            slave.name().expect("pty slave has a name")
        };
        let l = SerialLine {
            port: path,
            ..line(8, Parity::None, 1, 115_200)
        };
        let endpoint = Endpoint::Serial(l);
        let mut stream = open(&endpoint).await.expect("open pty slave");
        // TIOCEXCL: a second open of the same line is refused.
        assert!(
            open(&endpoint).await.is_err(),
            "second open of an exclusive line must fail"
        );
        stream.write_all(b"?").await.unwrap();
        let mut byte = [0u8; 1];
        master.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"?");
        drop(slave);
    }

    #[tokio::test]
    async fn a_7e1_line_opens_on_a_pty() {
        // The hotplate's NAMUR settings; Linux keeps a pty at 8N1 whatever is asked, and that must not
        // stop a simulator's pty from opening.
        let (mut master, slave) =
            tokio_serial::SerialStream::pair().expect("this machine has ptys");
        let path = {
            use tokio_serial::SerialPort;
            slave.name().expect("pty slave has a name")
        };
        let endpoint = Endpoint::Serial(SerialLine {
            port: path,
            ..line(7, Parity::Even, 1, 9600)
        });
        let mut stream = open(&endpoint).await.expect("open 7E1 pty");
        stream.write_all(b"IN_PV_1\r\n").await.unwrap();
        let mut buf = [0u8; 9];
        master.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"IN_PV_1\r\n");
    }

    #[tokio::test]
    async fn tcp_connects_with_nodelay_and_refuses_cleanly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let endpoint = Endpoint::Tcp {
            address: address.clone(),
        };
        let (client, server) = tokio::join!(open(&endpoint), listener.accept());
        let mut client = client.expect("connect");
        let (mut server, _) = server.unwrap();
        assert!(server.nodelay().is_ok());
        client.write_all(b"*IDN?\n").await.unwrap();
        let mut buf = [0u8; 6];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"*IDN?\n");
        drop(listener);
        drop(server);
        // A closed port: an Open error naming the address, not a hang.
        let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = free.local_addr().unwrap().to_string();
        drop(free);
        let err = open(&Endpoint::Tcp {
            address: gone.clone(),
        })
        .await
        .err()
        .expect("refused");
        assert!(err.port == gone, "{err}");
    }

    #[tokio::test]
    async fn memory_endpoint_hands_each_connection_to_the_device() {
        let (endpoint, mut device) = memory("mem", None);
        let mut host = open(&endpoint).await.unwrap();
        let mut dev = device.accept().await.unwrap();
        host.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        dev.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        drop(device);
        let err = open(&endpoint).await.err().expect("no device");
        assert!(err.to_string().starts_with("cannot open"), "{err}");
    }

    #[test]
    fn disconnect_errors_are_recognised() {
        assert!(is_disconnect(&io::Error::from_raw_os_error(5)));
        assert!(is_disconnect(&io::Error::from(
            io::ErrorKind::ConnectionReset
        )));
        assert!(!is_disconnect(&io::Error::from(io::ErrorKind::WouldBlock)));
    }
}
