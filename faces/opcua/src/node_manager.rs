//! The node manager of the lab's namespace: an in-memory address space (reads and subscriptions are
//! served from memory and never wait on an instrument or on the controller), whose method calls are async
//! and go to the controller with the session user's principal.

use std::sync::Arc;

use async_trait::async_trait;
use labctl_protocols::Lab;
use labctl_protocols::lab::Instrument;
use opcua::server::address_space::AddressSpace;
use opcua::server::address_space::{NodeType, validate_node_write};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{
    InMemoryNodeManager, InMemoryNodeManagerBuilder, InMemoryNodeManagerImpl,
};
use opcua::server::node_manager::{
    MethodCall, NodeManagerBuilder, RequestContext, ServerContext, WriteNode,
};
use opcua::sync::{Mutex, RwLock};
use opcua::types::{AttributeId, DataValue, DateTime, Identifier, StatusCode, Variant};

use super::address_space::{self, Names};
use super::authenticator::LabAuthenticator;
use super::devices::{self, DeviceMethod};
use super::methods::{self, LabMethod};
use super::runs::RunNodes;
use labctl_core::api::{ControllerHandle, Principal};
use labctl_core::auth::Users;

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

impl LabNodes {
    /// A device method or setpoint write: the one-step run, as `who` (see `devices`). Its run's node is
    /// there when this returns.
    async fn device_command(
        &self,
        space: &RwLock<AddressSpace>,
        who: Principal,
        instrument: &Instrument,
        method: DeviceMethod,
        args: &[Variant],
    ) -> Result<devices::Done, StatusCode> {
        if !labctl_core::policy::allows(
            who.role,
            labctl_core::policy::Permission::CommandInstrument,
        ) {
            tracing::info!(user = %who.name, instrument = %instrument.id, method = method.name(), "opcua: device command refused: technicians only");
            return Err(StatusCode::BadUserAccessDenied);
        }
        let protocol = devices::protocol(&self.lab, instrument, method, args, &who)?;
        let what = format!("{}/{}", instrument.id, method.name());
        let done = devices::run(&self.api, who, &what, protocol).await?;
        self.ensure_run_node(space, &done.run_id).await;
        Ok(done)
    }

    /// A write to a setpoint: the technician's value goes through the action that sets it; the variable
    /// takes the value once the controller has accepted it.
    async fn write_setpoint(
        &self,
        context: &RequestContext,
        space: &RwLock<AddressSpace>,
        write: &mut WriteNode,
        instrument: &Instrument,
        method: DeviceMethod,
    ) -> StatusCode {
        let node_id = write.value().node_id.clone();
        // The stack's own checks: the session user's access level (technicians only), the data type.
        {
            let space = space.read();
            let type_tree = context.type_tree.read();
            let Some(node) = space.find(&node_id) else {
                return StatusCode::BadNodeIdUnknown;
            };
            if let Err(status) = validate_node_write(node, context, write.value(), &*type_tree) {
                return status;
            }
        }
        if write.value().attribute_id != AttributeId::Value {
            return StatusCode::BadNotWritable;
        }
        if write.value().index_range.has_range() {
            return StatusCode::BadWriteNotSupported;
        }
        let Some(who) = LabAuthenticator::principal(&self.users, context.user_token()) else {
            return StatusCode::BadUserAccessDenied;
        };
        let value = write.value().value.value.clone().unwrap_or_default();
        let Ok(target) = devices::number(std::slice::from_ref(&value), 0) else {
            return StatusCode::BadTypeMismatch;
        };
        let done = match self
            .device_command(space, who, instrument, method, &[Variant::from(target)])
            .await
        {
            Ok(done) => done,
            Err(status) => return status,
        };
        let status = done.write_status();
        if status.is_good() {
            let now = DateTime::now();
            let value = DataValue {
                value: Some(Variant::from(target)),
                status: Some(StatusCode::Good),
                source_timestamp: Some(now),
                server_timestamp: Some(now),
                ..Default::default()
            };
            let mut space = space.write();
            if let Some(NodeType::Variable(variable)) = space.find_mut(&node_id) {
                variable.set_data_value(value.clone());
                context
                    .subscriptions
                    .notify_data_change([(value, &node_id, AttributeId::Value)].into_iter());
            }
        }
        status
    }
}

#[async_trait]
impl InMemoryNodeManagerImpl for LabNodes {
    async fn init(&self, space: &mut AddressSpace, _context: ServerContext) {
        address_space::build_lab(space, self.names(), &self.lab);
    }

    fn name(&self) -> &str {
        "labctl"
    }

    /// Writes: setpoints only (technicians); every other variable of the lab is read-only.
    async fn write(
        &self,
        context: &RequestContext,
        space: &RwLock<AddressSpace>,
        nodes_to_write: &mut [&mut WriteNode],
    ) -> Result<(), StatusCode> {
        for write in nodes_to_write.iter_mut() {
            let setpoint = match &write.value().node_id.identifier {
                Identifier::String(path)
                    if write.value().node_id.namespace == self.namespace.namespace_index =>
                {
                    devices::setpoint_at(&self.lab, path.as_ref())
                }
                _ => None,
            };
            let status = match setpoint {
                Some((instrument, method)) => {
                    self.write_setpoint(context, space, write, instrument, method)
                        .await
                }
                None => StatusCode::BadNotWritable,
            };
            write.set_status(status);
        }
        Ok(())
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
            let path = match &call.method_id().identifier {
                Identifier::String(path)
                    if call.method_id().namespace == self.namespace.namespace_index =>
                {
                    Some(path.as_ref().to_owned())
                }
                _ => None,
            };
            let Some(path) = path else {
                call.set_status(StatusCode::BadMethodInvalid);
                continue;
            };
            // The stack checked `is_user_executable` already; anonymous sessions never get this far, but
            // nothing is called without a principal.
            let Some(who) = LabAuthenticator::principal(&self.users, context.user_token()) else {
                call.set_status(StatusCode::BadUserAccessDenied);
                continue;
            };
            if let Some(method) = LabMethod::from_node_path(&path) {
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
            } else if let Some((instrument, method)) = devices::method_at(&self.lab, &path) {
                let status = self
                    .device_command(space, who, instrument, method, call.arguments())
                    .await;
                match status {
                    Ok(done) => {
                        call.set_outputs(done.outputs());
                        call.set_status(StatusCode::Good);
                    }
                    Err(status) => call.set_status(status),
                }
            } else if let Some((instrument, action)) = devices::defined_method_at(&self.lab, &path)
            {
                let done =
                    match devices::defined_protocol(instrument, action, call.arguments(), &who) {
                        Ok(protocol) => {
                            let what = format!("{}/{}", instrument.id, action.name);
                            devices::run(&self.api, who, &what, protocol).await
                        }
                        Err(status) => Err(status),
                    };
                match done {
                    Ok(done) => {
                        self.ensure_run_node(space, &done.run_id).await;
                        call.set_outputs(done.outputs());
                        call.set_status(StatusCode::Good);
                    }
                    Err(status) => call.set_status(status),
                }
            } else {
                call.set_status(StatusCode::BadMethodInvalid);
            }
        }
        Ok(())
    }
}
