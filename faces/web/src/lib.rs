//! labctl's technicians' console in the browser, served by `labctl run` (default `http://127.0.0.1:8080/`).
//!
//! A small vanilla-JavaScript client (embedded in the binary, no build step, nothing fetched from the
//! network) on a JSON API and one server-sent-events stream. Pages: the lab live, proposals awaiting
//! approval with their evidence, runs with their results and downloads, the journal's log.
//!
//! Like every face it goes through the core's one API ([`labctl_core::api::ControllerHandle`]) as the
//! logged-in lab user with [`Face::Web`](labctl_core::api::Face::Web): the core's role table decides
//! every action and the journal records the user's name as from any face. The console hides buttons a role
//! cannot use only as a courtesy; the core still refuses.
//!
//! Sessions are random tokens in `HttpOnly`, `SameSite=Strict` cookies (`Secure` under TLS); every
//! state-changing request carries the session's CSRF token in a header and, when the browser sends one, an
//! `Origin` of this server.
//!
//! The console never holds the controller up: it reads the snapshot the tick publishes (serialised once for
//! every browser, at most [`live::SNAPSHOTS_PER_SECOND`] times a second) and the journal's bounded
//! broadcast; a browser that reads slowly misses records (it is told, and reloads) rather than making
//! anything wait.

pub mod assets;
pub mod evidence;
pub mod live;
pub mod routes;
pub mod server;
pub mod session;

pub use server::{WebConsole, WebError, WebOptions, serve};
