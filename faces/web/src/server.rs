//! Serving the console: HTTP/1.1, or HTTPS with the data directory's certificate; clear text is refused on a
//! non-loopback address unless the lab file allows it (the core's one rule for every listener).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use labctl_core::api::ControllerHandle;
use labctl_core::auth::Users;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::compression::CompressionLayer;

use crate::routes::{Console, Peer, router};
use crate::session::Sessions;

/// HTTP connections served at once (browsers keep a few each); beyond it a new one is closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a TLS handshake may take.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// How long a request's headers may take to arrive (a silent connection holds a slot no longer).
const HEADER_READ: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("browser console on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cleartext(#[from] labctl_core::auth::CleartextListener),
}

/// Where and how to serve.
pub struct WebOptions {
    pub listen: SocketAddr,
    /// TLS (the data directory's certificate); `None` serves clear text.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The lab file's `interfaces.allow_cleartext_on_network`: clear text on a non-loopback address.
    pub allow_cleartext_on_network: bool,
}

/// The running console: stops when shut down or dropped.
pub struct WebConsole {
    /// The bound address (the port taken when 0 was asked).
    pub addr: SocketAddr,
    pub tls: bool,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl WebConsole {
    /// The console's URL, e.g. `http://127.0.0.1:8080/`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/", self.addr)
    }
}

impl Drop for WebConsole {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// Serves the console on `options.listen` (port 0 takes a free one: see [`WebConsole::addr`]).
pub async fn serve(
    options: WebOptions,
    api: ControllerHandle,
    users: Arc<Users>,
) -> Result<WebConsole, WebError> {
    if options.tls.is_none() {
        labctl_core::auth::check_cleartext_listener(
            "browser console over HTTP",
            options.listen,
            options.allow_cleartext_on_network,
        )?;
    }
    let bind_error = |source| WebError::Bind {
        addr: options.listen,
        source,
    };
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let is_tls = options.tls.is_some();
    let console = Arc::new(Console {
        live: crate::live::serialiser(api.clone()),
        api,
        users,
        sessions: Sessions::default(),
        tls: is_tls,
        evidence: Default::default(),
    });
    let app = router(console).layer(CompressionLayer::new());
    let tls = options.tls.map(tokio_rustls::TlsAcceptor::from);
    let (stop, stopped) = watch::channel(false);
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        let mut stop_accepting = stopped.clone();
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop_accepting.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "web: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (app, tls, mut stopped) = (app.clone(), tls.clone(), stopped.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let service =
                    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                        req.extensions_mut().insert(Peer(peer));
                        let mut app = app.clone();
                        async move {
                            use tower_service::Service;
                            let response = app.call(req.map(axum::body::Body::new)).await;
                            Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
                        }
                    });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ);
                let result = match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            r = conn => r,
                            _ = stopped.changed() => Ok(()),
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
                            _ = stopped.changed() => Ok(()),
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "web: connection ended");
                }
            });
        }
    });
    Ok(WebConsole {
        addr,
        tls: is_tls,
        stop,
        task,
    })
}
