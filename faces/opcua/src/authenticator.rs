//! OPC UA users are the lab file's users (`labctl_core::auth::Users`): a user name and password token, checked with
//! the same argon2 hashes, failure logging and throttling as every other gateway. Deny by default: anonymous
//! sessions only when the lab has no users at all (and then they only read), no certificate or issued
//! tokens.

use std::sync::Arc;

use async_trait::async_trait;
use labctl_protocols::lab::Role;
use opcua::crypto::SecurityPolicy;
use opcua::server::ServerEndpoint;
use opcua::server::address_space::AccessLevel;
use opcua::server::authenticator::{
    AuthManager, Password, UserToken, user_pass_security_policy_id,
};
use opcua::types::{
    Error, Identifier, MessageSecurityMode, NodeId, StatusCode, UAString, UserTokenPolicy,
    UserTokenType,
};

use super::methods::LabMethod;
use super::names;
use labctl_core::api::Principal;
use labctl_core::auth::{AuthError, Source, Users};
use labctl_core::contract::Face;
use labctl_core::policy::{self, Permission};

/// The face recorded in journal entries and principals.
pub const VIA: Face = Face::Opcua;

pub struct LabAuthenticator {
    users: Arc<Users>,
}

impl LabAuthenticator {
    pub fn new(users: Arc<Users>) -> LabAuthenticator {
        LabAuthenticator { users }
    }

    /// Who a session's user token stands for; anonymous sessions are nobody (they read, never call).
    pub fn principal(users: &Users, token: &UserToken) -> Option<Principal> {
        if token.is_anonymous() {
            return None;
        }
        users
            .role_of(&token.0)
            .map(|role| Principal::new(&token.0, role, VIA))
    }

    fn role(&self, token: &UserToken) -> Option<Role> {
        Self::principal(&self.users, token).map(|p| p.role)
    }
}

#[async_trait]
impl AuthManager for LabAuthenticator {
    async fn authenticate_anonymous_token(&self, endpoint: &ServerEndpoint) -> Result<(), Error> {
        if self.users.is_empty() {
            return Ok(());
        }
        tracing::warn!(endpoint = %endpoint.path, "opcua: anonymous session refused: this lab has users");
        Err(Error::new(
            StatusCode::BadIdentityTokenRejected,
            "anonymous access is refused: log in with a user of the lab file",
        ))
    }

    async fn authenticate_username_identity_token(
        &self,
        _endpoint: &ServerEndpoint,
        username: &str,
        password: &Password,
    ) -> Result<UserToken, Error> {
        // The stack does not tell the peer's address here: OPC UA failures share one source.
        let verdict = self
            .users
            .login(username, password.get(), Source::Local)
            .await;
        match verdict {
            Ok(role) => {
                tracing::info!(user = username, ?role, "opcua: session activated");
                Ok(UserToken(username.to_owned()))
            }
            // `Users::verify` has logged the failure and counted it.
            Err(e) => {
                if let AuthError::Throttled { .. } = e {
                    tracing::warn!(user = username, error = %e, "opcua: login throttled");
                }
                Err(Error::new(StatusCode::BadUserAccessDenied, e.to_string()))
            }
        }
    }

    fn is_user_executable(&self, token: &UserToken, method_id: &NodeId) -> bool {
        match &method_id.identifier {
            Identifier::String(path) => match LabMethod::from_node_path(path.as_ref()) {
                Some(method) => self.role(token).is_some_and(|role| method.allowed(role)),
                // An instrument's action: technicians only.
                None if names::is_device_method(path.as_ref()) => self
                    .role(token)
                    .is_some_and(|role| policy::allows(role, Permission::CommandInstrument)),
                // Not one of the lab's methods (the server's own, in namespace 0): the stack decides.
                None => true,
            },
            _ => true,
        }
    }

    /// Setpoints are writable by technicians only; every other variable of the lab is read-only anyway.
    fn effective_user_access_level(
        &self,
        token: &UserToken,
        user_access_level: AccessLevel,
        node_id: &NodeId,
    ) -> AccessLevel {
        match &node_id.identifier {
            Identifier::String(path)
                if names::is_setpoint(path.as_ref())
                    && !self.role(token).is_some_and(|role| {
                        policy::allows(role, Permission::CommandInstrument)
                    }) =>
            {
                user_access_level - AccessLevel::CURRENT_WRITE
            }
            _ => user_access_level,
        }
    }

    fn user_token_policies(&self, endpoint: &ServerEndpoint) -> Vec<UserTokenPolicy> {
        if self.users.is_empty() {
            return vec![UserTokenPolicy::anonymous()];
        }
        // Passwords only where they travel encrypted: on a SignAndEncrypt channel, and on the development
        // endpoint without security (loopback only, unless the lab file allows clear text on the network),
        // where the token itself is encrypted with the server's certificate (Basic256Sha256), so the
        // password is not readable on the wire there either. A Sign-only channel takes no password.
        let token_security = match endpoint.message_security_mode() {
            MessageSecurityMode::SignAndEncrypt => UAString::null(),
            MessageSecurityMode::None => SecurityPolicy::Basic256Sha256.to_uri().into(),
            _ => return Vec::new(),
        };
        vec![UserTokenPolicy {
            policy_id: user_pass_security_policy_id(endpoint),
            token_type: UserTokenType::UserName,
            issued_token_type: UAString::null(),
            issuer_endpoint_url: UAString::null(),
            security_policy_uri: token_security,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labctl_protocols::Lab;

    /// What a client is offered for a user name and password on each kind of endpoint.
    #[test]
    fn passwords_are_offered_only_where_they_travel_encrypted() {
        let auth = LabAuthenticator::new(Arc::new(Users::from_lab(&Lab::sim()).unwrap()));
        let offered = |policy: SecurityPolicy, mode: MessageSecurityMode| {
            let no_tokens: &[&str] = &[];
            auth.user_token_policies(&ServerEndpoint::from(("/", policy, mode, no_tokens)))
        };
        let encrypted = offered(
            SecurityPolicy::Aes256Sha256RsaPss,
            MessageSecurityMode::SignAndEncrypt,
        );
        assert_eq!(encrypted.len(), 1);
        assert_eq!(encrypted[0].token_type, UserTokenType::UserName);
        // The channel encrypts: the token uses the channel's policy.
        assert!(encrypted[0].security_policy_uri.is_null());
        assert!(offered(SecurityPolicy::Basic256Sha256, MessageSecurityMode::Sign).is_empty());
        // Without security the token itself is encrypted with the server's certificate.
        let development = offered(SecurityPolicy::None, MessageSecurityMode::None);
        assert_eq!(development.len(), 1);
        assert_eq!(
            development[0].security_policy_uri.as_ref(),
            SecurityPolicy::Basic256Sha256.to_uri()
        );
    }
}
