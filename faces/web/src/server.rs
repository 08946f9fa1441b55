//! Serving the console: HTTP/1.1, or HTTPS with the data directory's certificate, through the HTTP faces' one
//! server (`labctl-http`: the connection limit, the handshake and header deadlines, the clear-text rule).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use labctl_core::api::ControllerHandle;
use labctl_core::auth::Users;
use tokio_util::sync::CancellationToken;
use tower_http::compression::CompressionLayer;

use crate::routes::{Console, Peer, router};
use crate::session::Sessions;

/// HTTP connections served at once (browsers keep a few each); beyond it a new one is closed at once.
pub const MAX_CONNECTIONS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Serve(#[from] labctl_http::ServeError),
}

/// Where and how to serve.
pub struct WebOptions {
    pub listen: SocketAddr,
    /// TLS (the data directory's certificate); `None` serves clear text.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The lab file's `interfaces.allow_cleartext_on_network`: clear text on a non-loopback address.
    pub allow_cleartext_on_network: bool,
}

/// The running console: stops when dropped.
pub struct WebConsole {
    /// The bound address (the port taken when 0 was asked).
    pub addr: SocketAddr,
    pub tls: bool,
    server: labctl_http::Server,
}

impl WebConsole {
    /// The console's URL, e.g. `http://127.0.0.1:8080/`.
    pub fn url(&self) -> String {
        format!("{}/", self.server.origin())
    }
}

/// Serves the console on `options.listen` (port 0 takes a free one: see [`WebConsole::addr`]).
pub async fn serve(
    options: WebOptions,
    api: ControllerHandle,
    users: Arc<Users>,
) -> Result<WebConsole, WebError> {
    let console = Arc::new(Console {
        live: crate::live::serialiser(api.clone()),
        api,
        users,
        sessions: Sessions::default(),
        tls: options.tls.is_some(),
        evidence: Default::default(),
    });
    let app = router(console).layer(CompressionLayer::new());
    let server = labctl_http::serve(
        labctl_http::ServeOptions {
            what: "browser console over HTTP",
            listen: options.listen,
            tls: options.tls,
            allow_cleartext_on_network: options.allow_cleartext_on_network,
            max_connections: MAX_CONNECTIONS,
        },
        CancellationToken::new(),
        move |peer| {
            let app = app.clone();
            hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                let mut app = app.clone();
                async move {
                    use tower_service::Service;
                    let response = app.call(req.map(axum::body::Body::new)).await;
                    Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
                }
            })
        },
    )
    .await?;
    Ok(WebConsole {
        addr: server.addr,
        tls: server.tls,
        server,
    })
}
