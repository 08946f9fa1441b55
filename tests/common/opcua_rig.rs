//! The OPC UA rig the integration tests (tests/opcua.rs) and the OPC UA bench (benches/opcua.rs) share:
//! the controller on the sim lab's fake instruments with the OPC UA server on a free port, and async-opcua's
//! client logging in to it. Included with `#[path]` next to `tests/common/mod.rs` (as `common`), whose
//! controller it starts. Each includer uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use labctl::auth::Users;
use labctl::controller::Controller;
use labctl::gateways::opcua::{self as gateway, Endpoint, OpcUaConfig, OpcUaServer, Security};
use labctl::instruments::fake::FakeInstrument;
use labctl_protocols::Lab;
use opcua::client::{ClientBuilder, IdentityToken, Session};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    DataValue, MessageSecurityMode, NodeId, ReadValueId, StatusCode, TimestampsToReturn,
    UserTokenPolicy, Variant,
};
use tokio::task::JoinHandle;

/// How long the rig waits for anything (a session, the instruments online, a value).
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Rig {
    pub controller: Controller,
    pub fakes: BTreeMap<String, FakeInstrument>,
    pub server: OpcUaServer,
    /// The lab's namespace index, once a client looked it up ([`lab_namespace`]); 0 before.
    pub ns: u16,
}

/// The controller on fake instruments of the simulated lab (as in `tests/command_port.rs`), and the OPC UA
/// server on a free port.
pub async fn rig(dir: &Path, security: Security) -> Rig {
    rig_with(dir, security, gateway::runs::DEFAULT_KEEP_FINISHED_RUNS).await
}

/// [`rig`], keeping at most `keep_finished_runs` finished runs under `Lab/Runs`.
pub async fn rig_with(dir: &Path, security: Security, keep_finished_runs: usize) -> Rig {
    let lab = Lab::sim();
    let (controller, fakes, _) =
        crate::common::controller_on_fakes(dir, lab.clone(), crate::common::plate_at_42_5).await;
    crate::common::wait_all_online(&controller.handle, WAIT).await;
    let server = gateway::start(
        controller.handle.clone(),
        OpcUaConfig {
            users: Arc::new(Users::from_lab(&lab).unwrap()),
            lab,
            data_dir: dir.to_owned(),
            listen: Endpoint {
                host: "127.0.0.1".into(),
                port: 0,
            },
            security,
            keep_finished_runs,
        },
    )
    .await
    .unwrap();
    assert_ne!(server.addr.port(), 0);
    assert!(
        server
            .endpoint
            .ends_with(&format!(":{}/", server.addr.port()))
    );
    Rig {
        controller,
        fakes,
        server,
        ns: 0,
    }
}

/// A client session and its event loop (aborted on drop).
pub struct Client {
    pub session: Arc<Session>,
    event_loop: JoinHandle<StatusCode>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.event_loop.abort();
    }
}

/// Connects to `url` with the given policy and user (anonymous when `None`); the client's own certificate
/// lives under `pki`. Returns the status the session ended with when it could not be activated.
pub async fn connect(
    url: &str,
    policy: SecurityPolicy,
    mode: MessageSecurityMode,
    user: Option<(&str, &str)>,
    pki: &Path,
) -> Result<Client, StatusCode> {
    let mut client = ClientBuilder::new()
        .application_name("labctl tests")
        .application_uri("urn:labctl:tests")
        .product_uri("urn:labctl:tests")
        .pki_dir(pki)
        .create_sample_keypair(policy != SecurityPolicy::None)
        .trust_server_certs(true)
        .session_retry_limit(0)
        .session_timeout(60_000)
        .client()
        .unwrap();
    let (session, event_loop) = client
        .connect_to_matching_endpoint(
            (url, policy.to_str(), mode, UserTokenPolicy::anonymous()),
            identity(user),
        )
        .await
        .map_err(|e| e.status())?;
    let mut event_loop = event_loop.spawn();
    tokio::select! {
        connected = session.wait_for_connection() => {
            assert!(connected);
            Ok(Client { session, event_loop })
        }
        ended = &mut event_loop => Err(ended.unwrap_or(StatusCode::BadUnexpectedError)),
        _ = tokio::time::sleep(WAIT) => panic!("no session and no error within {WAIT:?}"),
    }
}

/// The identity a client presents: a user name and password, or anonymous when `None`.
pub fn identity(user: Option<(&str, &str)>) -> IdentityToken {
    match user {
        Some((name, password)) => IdentityToken::new_user_name(name, password),
        None => IdentityToken::Anonymous,
    }
}

/// A rig with SecurityPolicy None, one user logged in, and the lab's namespace looked up. Keep the
/// directory for as long as the rig runs.
pub async fn rig_as(user: &str, password: &str) -> (tempfile::TempDir, Rig, Client) {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig(dir.path(), Security::WithNone).await;
    let client = login(&rig, user, password, &dir.path().join("client-pki")).await;
    rig.ns = lab_namespace(&client).await;
    (dir, rig, client)
}

/// Logs `user` in with SecurityPolicy None; the client's own certificate lives under `pki`.
pub async fn login(rig: &Rig, user: &str, password: &str, pki: &Path) -> Client {
    connect(
        &rig.server.endpoint,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        Some((user, password)),
        pki,
    )
    .await
    .unwrap_or_else(|s| panic!("{user} could not log in: {s}"))
}

impl Rig {
    /// A node of the lab's namespace.
    pub fn id(&self, path: &str) -> NodeId {
        NodeId::new(self.ns, path)
    }
}

/// The namespace index of `urn:labctl:sim`, as a client finds it: in the server's namespace array.
pub async fn lab_namespace(c: &Client) -> u16 {
    let array = read(
        c,
        &NodeId::from(opcua::types::VariableId::Server_NamespaceArray),
    )
    .await;
    let Some(Variant::Array(array)) = array.value else {
        panic!("no namespace array: {array:?}")
    };
    array
        .values
        .iter()
        .position(|v| matches!(v, Variant::String(s) if s.as_ref() == "urn:labctl:sim"))
        .expect("urn:labctl:sim in the namespace array") as u16
}

/// One attribute value of `node`, with both timestamps.
pub async fn read(c: &Client, node: &NodeId) -> DataValue {
    c.session
        .read(&[ReadValueId::from(node)], TimestampsToReturn::Both, 0.0)
        .await
        .unwrap()
        .remove(0)
}

/// The documented trust step (docs/opcua.md, Certificates): the one client certificate the server refused
/// and kept in `pki/rejected/` is moved to `pki/trusted/`, as an administrator does.
pub fn trust_the_rejected_client(pki: &Path) {
    let rejected: Vec<_> = std::fs::read_dir(pki.join("rejected"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(rejected.len(), 1, "one refused certificate: {rejected:?}");
    std::fs::rename(
        rejected[0].path(),
        pki.join("trusted").join(rejected[0].file_name()),
    )
    .unwrap();
}
