//! The node manager of the lab's namespace: an in-memory address space (reads and subscriptions are
//! served from memory and never wait on an instrument or on the controller), whose method calls are async
//! and go to the controller with the session user's principal.

use std::sync::Arc;

use async_trait::async_trait;
use labctl_protocols::Lab;
use opcua::server::address_space::AddressSpace;
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{
    InMemoryNodeManager, InMemoryNodeManagerBuilder, InMemoryNodeManagerImpl,
};
use opcua::server::node_manager::{MethodCall, NodeManagerBuilder, RequestContext, ServerContext};
use opcua::sync::{Mutex, RwLock};
use opcua::types::{Identifier, StatusCode, Variant};

use super::address_space::{self, Names};
use super::authenticator::LabAuthenticator;
use super::methods::{self, LabMethod};
use super::runs::RunNodes;
use crate::api::ControllerHandle;
use crate::auth::Users;

pub type LabNodeManager = InMemoryNodeManager<LabNodes>;

pub struct LabNodes {
    namespace: NamespaceMetadata,
    lab: Arc<Lab>,
    api: ControllerHandle,
    users: Arc<Users>,
    runs: Mutex<RunNodes>,
}

impl LabNodes {
    pub fn names(&self) -> Names {
        Names {
            ns: self.namespace.namespace_index,
        }
    }

    /// The run nodes present under `Lab/Runs`. Lock order: the address space first, then this.
    pub fn runs(&self) -> &Mutex<RunNodes> {
        &self.runs
    }

    /// Makes `Lab/Runs/{run_id}` exist with the run's current values before `SubmitProtocol` returns, so a
    /// client that browses right after the call finds it (the updater would add it a moment later, once
    /// the journal's record reaches it).
    async fn ensure_run_node(&self, space: &RwLock<AddressSpace>, run_id: &str) {
        if run_id.is_empty() {
            return;
        }
        let Some(info) = self.api.run(run_id).await else {
            return;
        };
        let mut space = space.write();
        let (added, _removed) = self.runs.lock().ensure(&mut space, self.names(), &info);
        if added {
            tracing::debug!(run = %run_id, "opcua: run added by SubmitProtocol");
        }
    }
}

/// The node manager of `urn:labctl:{lab_id}`, for `ServerBuilder::with_node_manager`; at most
/// `keep_finished_runs` finished runs keep their nodes under `Lab/Runs`.
pub fn builder(
    namespace_uri: String,
    lab: Arc<Lab>,
    api: ControllerHandle,
    users: Arc<Users>,
    keep_finished_runs: usize,
) -> impl NodeManagerBuilder {
    InMemoryNodeManagerBuilder::new(move |context: ServerContext, space: &mut AddressSpace| {
        let index = context
            .type_tree
            .write()
            .namespaces_mut()
            .add_namespace(&namespace_uri);
        space.add_namespace(&namespace_uri, index);
        LabNodes {
            namespace: NamespaceMetadata {
                namespace_uri,
                namespace_index: index,
                ..Default::default()
            },
            lab,
            api,
            users,
            runs: Mutex::new(RunNodes::new(keep_finished_runs)),
        }
    })
}

#[async_trait]
impl InMemoryNodeManagerImpl for LabNodes {
    async fn init(&self, space: &mut AddressSpace, _context: ServerContext) {
        address_space::build_lab(space, self.names(), &self.lab);
    }

    fn name(&self) -> &str {
        "labctl"
    }

    fn namespaces(&self) -> Vec<NamespaceMetadata> {
        vec![self.namespace.clone()]
    }

    async fn call(
        &self,
        context: &RequestContext,
        space: &RwLock<AddressSpace>,
        methods_to_call: &mut [&mut &mut MethodCall],
    ) -> Result<(), StatusCode> {
        for call in methods_to_call {
            let method = match &call.method_id().identifier {
                Identifier::String(path)
                    if call.method_id().namespace == self.namespace.namespace_index =>
                {
                    LabMethod::from_node_path(path.as_ref())
                }
                _ => None,
            };
            let Some(method) = method else {
                call.set_status(StatusCode::BadMethodInvalid);
                continue;
            };
            // The stack checked `is_user_executable` already; anonymous sessions never get this far, but
            // nothing is called without a principal.
            let Some(who) = LabAuthenticator::principal(&self.users, context.user_token()) else {
                call.set_status(StatusCode::BadUserAccessDenied);
                continue;
            };
            match methods::call(&self.api, who, method, call.arguments()).await {
                Ok(outputs) => {
                    if method == LabMethod::SubmitProtocol
                        && let Some(Variant::String(run_id)) = outputs.first()
                    {
                        self.ensure_run_node(space, run_id.as_ref()).await;
                    }
                    call.set_outputs(outputs);
                    call.set_status(StatusCode::Good);
                }
                Err(status) => call.set_status(status),
            }
        }
        Ok(())
    }
}
