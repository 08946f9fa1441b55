//! A network instrument's raw TCP socket (SCPI instruments listen on such a port, e.g. 5025).
//!
//! One client at a time: a new connection replaces the previous one (which is closed), so a client that
//! reconnects never waits for the server to notice the old socket is dead. Every accepted socket gets
//! `TCP_NODELAY`. Unplugging closes the client's socket and the listener (connections are refused);
//! plugging back listens on the same port again.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::IoEvent;

const READ_CHUNK: usize = 4096;

/// A listening socket and its current client.
pub struct TcpPort {
    /// Where to listen; after the first bind, the port actually bound (so re-plugging keeps it).
    addr: SocketAddr,
    listener: Option<TcpListener>,
    conn: Option<TcpStream>,
    rbuf: Box<[u8; READ_CHUNK]>,
}

impl TcpPort {
    pub fn new(addr: SocketAddr) -> TcpPort {
        TcpPort {
            addr,
            listener: None,
            conn: None,
            rbuf: Box::new([0; READ_CHUNK]),
        }
    }

    pub async fn open(&mut self) -> io::Result<()> {
        self.close();
        let listener = TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        self.listener = Some(listener);
        Ok(())
    }

    pub fn close(&mut self) {
        self.conn = None;
        self.listener = None;
    }

    pub fn is_open(&self) -> bool {
        self.listener.is_some()
    }

    pub fn has_client(&self) -> bool {
        self.conn.is_some()
    }

    /// The bound address (the requested one before the first bind).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes a new client, closing the previous one.
    pub fn accept(&mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        self.conn = Some(stream);
    }

    pub fn client_gone(&mut self) {
        self.conn = None;
    }

    /// The next thing that happens: a connection, bytes read, bytes written, the client leaving.
    pub async fn next_event(&mut self, tx: &[u8]) -> IoEvent {
        let TcpPort {
            listener,
            conn,
            rbuf,
            ..
        } = self;
        let Some(listener) = listener.as_mut() else {
            return std::future::pending().await;
        };
        poll_fn(|cx| {
            if let Poll::Ready(result) = listener.poll_accept(cx) {
                match result {
                    Ok((stream, _)) => return Poll::Ready(IoEvent::Accepted(stream)),
                    // A failed accept (e.g. the client already left) leaves the port as it was.
                    Err(_) => cx.waker().wake_by_ref(),
                }
            }
            let Some(stream) = conn.as_mut() else {
                return Poll::Pending;
            };
            if !tx.is_empty()
                && let Poll::Ready(result) = Pin::new(&mut *stream).poll_write(cx, tx)
            {
                return Poll::Ready(match result {
                    Ok(n) if n > 0 => IoEvent::Wrote(n),
                    _ => IoEvent::HostGone,
                });
            }
            let mut buf = ReadBuf::new(&mut rbuf[..]);
            match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(IoEvent::HostGone),
                Poll::Ready(Ok(())) => Poll::Ready(IoEvent::Read(buf.filled().to_vec())),
                Poll::Ready(Err(_)) => Poll::Ready(IoEvent::HostGone),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}
