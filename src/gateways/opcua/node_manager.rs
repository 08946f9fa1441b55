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
use opcua::sync::RwLock;
use opcua::types::{Identifier, StatusCode};

use super::address_space::{self, Names};
use super::authenticator::LabAuthenticator;
use super::methods::{self, LabMethod};
use crate::api::ControllerHandle;
use crate::auth::Users;

pub type LabNodeManager = InMemoryNodeManager<LabNodes>;

pub struct LabNodes {
    namespace: NamespaceMetadata,
    lab: Arc<Lab>,
    api: ControllerHandle,
    users: Arc<Users>,
}

impl LabNodes {
    pub fn names(&self) -> Names {
        Names {
            ns: self.namespace.namespace_index,
        }
    }
}

/// The node manager of `urn:labctl:{lab_id}`, for `ServerBuilder::with_node_manager`.
pub fn builder(
    namespace_uri: String,
    lab: Arc<Lab>,
    api: ControllerHandle,
    users: Arc<Users>,
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
        _space: &RwLock<AddressSpace>,
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
                    call.set_outputs(outputs);
                    call.set_status(StatusCode::Good);
                }
                Err(status) => call.set_status(status),
            }
        }
        Ok(())
    }
}
