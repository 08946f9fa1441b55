//! How labctl's HTTP faces serve, written once: the MCP face (`labctl-mcp`) and the browser console
//! (`labctl-web`) give their hyper service and their limits; this crate binds (refusing clear text on a
//! non-loopback address unless the lab file allows it, the core's one rule for every listener), accepts up to
//! a number of connections at once (a new one beyond it is closed at once), gives a TLS handshake and a
//! request's headers each a deadline (a silent client holds a slot no longer), serves HTTP/1.1, and stops
//! every connection when the face stops.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a TLS handshake may take.
pub const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// How long a request's headers may take to arrive.
pub const HEADER_READ: Duration = Duration::from_secs(30);
/// How long to wait after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cleartext(#[from] labctl_core::auth::CleartextListener),
}

/// Where and how a face serves.
pub struct ServeOptions {
    /// What is served, for messages: e.g. `"MCP over HTTP"`; `" over HTTPS"` replaces `" over HTTP"` for
    /// TLS in logs.
    pub what: &'static str,
    pub listen: SocketAddr,
    /// TLS (the data directory's certificate); `None` serves clear text.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The lab file's `interfaces.allow_cleartext_on_network`: clear text on a non-loopback address.
    pub allow_cleartext_on_network: bool,
    /// Connections served at once.
    pub max_connections: usize,
}

/// A running server: it stops (and drops every connection) when `stop` is cancelled or it is dropped.
pub struct Server {
    /// The bound address (the port taken when 0 was asked).
    pub addr: SocketAddr,
    pub tls: bool,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// `http://ADDR` or `https://ADDR`, for the face to add its path.
    pub fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// Binds `options.listen` and serves each connection with the service `service_for(peer)` makes, until
/// `stop` is cancelled.
pub async fn serve<S, B>(
    options: ServeOptions,
    stop: CancellationToken,
    service_for: impl Fn(SocketAddr) -> S + Send + 'static,
) -> Result<Server, ServeError>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if options.tls.is_none() {
        labctl_core::auth::check_cleartext_listener(
            options.what,
            options.listen,
            options.allow_cleartext_on_network,
        )?;
    }
    let bind_error = |source| ServeError::Bind {
        what: options.what,
        addr: options.listen,
        source,
    };
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let tls = options.tls.map(tokio_rustls::TlsAcceptor::from);
    let is_tls = tls.is_some();
    let connections = Arc::new(tokio::sync::Semaphore::new(options.max_connections));
    let what = options.what;
    let accepting = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                () = accepting.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "{what}: accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (service, tls, stop) = (service_for(peer), tls.clone(), accepting.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ);
                let result = match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            r = conn => r,
                            () = stop.cancelled() => Ok(()),
                        }
                    }
                    Some(acceptor) => {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await
                        else {
                            return;
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            r = conn => r,
                            () = stop.cancelled() => Ok(()),
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "{what}: connection ended");
                }
            });
        }
    });
    Ok(Server {
        addr,
        tls: is_tls,
        stop,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn options(max_connections: usize) -> ServeOptions {
        ServeOptions {
            what: "test over HTTP",
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            allow_cleartext_on_network: false,
            max_connections,
        }
    }

    fn echo_peer(
        peer: SocketAddr,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Send {
        hyper::service::service_fn(move |_req| async move {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(peer.to_string()))))
        })
    }

    async fn get(addr: SocketAddr) -> String {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let response = sender
            .send_request(Request::get("/").body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn each_connection_is_served_by_a_service_made_for_its_peer() {
        let server = serve(options(4), CancellationToken::new(), echo_peer)
            .await
            .unwrap();
        let answer = get(server.addr).await;
        assert!(answer.starts_with("127.0.0.1:"), "{answer}");
        assert!(server.origin().starts_with("http://127.0.0.1:"));
    }

    #[tokio::test]
    async fn clear_text_beyond_loopback_is_refused_by_the_core_s_rule() {
        let mut o = options(4);
        o.listen = "0.0.0.0:0".parse().unwrap();
        let refused = serve(o, CancellationToken::new(), echo_peer).await;
        assert!(matches!(refused, Err(ServeError::Cleartext(_))));
    }

    /// Past the limit a new connection is closed at once; a slot freed serves the next.
    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once() {
        let server = serve(options(1), CancellationToken::new(), echo_peer)
            .await
            .unwrap();
        // The first connection takes the one slot and holds it (headers never finished).
        let mut holder = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        holder.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // Until the server has accepted the holder, a second one may take the slot instead: retry.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut second = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            let _ = second.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let mut buf = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut buf)).await;
            // Closed: an end of stream, or a reset.
            if read.is_ok_and(|r| r.is_err() || r.is_ok_and(|n| n == 0)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a connection past the limit was served"
            );
        }
        drop(holder);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            if let Ok((mut sender, conn)) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
            {
                tokio::spawn(conn);
                if sender
                    .send_request(Request::get("/").body(Empty::new()).unwrap())
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the freed slot never served"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_stopped_server_accepts_nothing_more() {
        let stop = CancellationToken::new();
        let server = serve(options(4), stop.clone(), echo_peer).await.unwrap();
        let addr = server.addr;
        assert!(!get(addr).await.is_empty());
        stop.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still accepting after stop"
            );
            tokio::task::yield_now().await;
        }
    }
}
