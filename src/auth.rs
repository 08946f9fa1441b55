//! Users and passwords from the lab file, shared by every gateway that logs people in (MQTT, OPC UA,
//! command port, console). Passwords are argon2 PHC hashes, in the lab file or in a file it names; clear
//! passwords exist only in memory, for the moment of a check. Repeated failures for a user are throttled.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use labctl_protocols::Lab;
use labctl_protocols::lab::Role;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Deliberately the same for an unknown user and a wrong password.
    #[error("wrong user name or password")]
    Denied,
    #[error("too many failed logins for {user}; try again in {retry_in_s} s")]
    Throttled { user: String, retry_in_s: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("user {user}: cannot read password file {path}: {source}")]
    PasswordFile {
        user: String,
        path: String,
        source: std::io::Error,
    },
    #[error("user {user}: password hash is not a valid PHC string: {reason}")]
    BadHash { user: String, reason: String },
}

/// Failures allowed before throttling starts, and the longest lockout.
const FREE_FAILURES: u32 = 3;
const MAX_LOCKOUT: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
}

/// The lab's users, ready to check passwords.
pub struct Users {
    users: BTreeMap<String, (Role, String)>,
    /// A hash nobody's password matches, checked for unknown users.
    decoy: String,
    failures: Mutex<BTreeMap<String, Failures>>,
}

impl Users {
    /// Loads every user of the lab file, reading password files now so a bad one fails at start.
    pub fn from_lab(lab: &Lab) -> Result<Users, UsersError> {
        let mut users = BTreeMap::new();
        for u in &lab.users {
            let hash = match (&u.password_hash, &u.password_file) {
                (Some(h), _) => h.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|source| UsersError::PasswordFile {
                        user: u.name.clone(),
                        path: path.display().to_string(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
                (None, None) => continue, // refused by Lab::problems already
            };
            PasswordHash::new(&hash).map_err(|e| UsersError::BadHash {
                user: u.name.clone(),
                reason: e.to_string(),
            })?;
            users.insert(u.name.clone(), (u.role, hash));
        }
        let decoy = hash_password("labctl decoy: no user has this password").unwrap_or_default();
        Ok(Users {
            users,
            decoy,
            failures: Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether any user is configured (anonymous access is refused whenever one is).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn role_of(&self, user: &str) -> Option<Role> {
        self.users.get(user).map(|(r, _)| *r)
    }

    /// Checks a password. Failures are counted per user name; after a few, each further attempt must wait
    /// twice as long as the last (up to five minutes), whether or not the password is then right.
    pub fn verify(&self, user: &str, password: &str) -> Result<Role, AuthError> {
        let now = Instant::now();
        {
            let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = failures.get(user)
                && let Some(until) = f.locked_until
                && until > now
            {
                return Err(AuthError::Throttled {
                    user: user.to_owned(),
                    retry_in_s: (until - now).as_secs().max(1),
                });
            }
        }
        // An unknown user costs the same argon2 work as a known one, so timing does not tell which names
        // exist.
        let (role, hash) = match self.users.get(user) {
            Some((role, hash)) => (Some(*role), hash.as_str()),
            None => (None, self.decoy.as_str()),
        };
        let verified = PasswordHash::new(hash).ok().is_some_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        let ok = role.filter(|_| verified);
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match ok {
            Some(role) => {
                failures.remove(user);
                Ok(role)
            }
            None => {
                let f = failures.entry(user.to_owned()).or_default();
                f.count += 1;
                if f.count > FREE_FAILURES {
                    let lockout = Duration::from_secs(1u64 << (f.count - FREE_FAILURES).min(9))
                        .min(MAX_LOCKOUT);
                    f.locked_until = Some(now + lockout);
                }
                tracing::warn!(user, failures = f.count, "login refused");
                Err(AuthError::Denied)
            }
        }
    }
}

/// An argon2id PHC hash of a password, for the lab file (`labctl passwd`).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_with_users() -> Lab {
        let mut lab = Lab::sim();
        lab.users = vec![labctl_protocols::lab::User {
            name: "alice".into(),
            role: Role::Technician,
            password_hash: Some(hash_password("correct horse").unwrap()),
            password_file: None,
        }];
        lab
    }

    #[test]
    fn right_password_gives_the_role_and_wrong_or_unknown_is_denied_alike() {
        let users = Users::from_lab(&lab_with_users()).unwrap();
        assert_eq!(users.verify("alice", "correct horse"), Ok(Role::Technician));
        assert_eq!(users.verify("alice", "wrong"), Err(AuthError::Denied));
        assert_eq!(users.verify("mallory", "anything"), Err(AuthError::Denied));
    }

    #[test]
    fn repeated_failures_are_throttled_even_for_the_right_password() {
        let users = Users::from_lab(&lab_with_users()).unwrap();
        for _ in 0..FREE_FAILURES + 1 {
            let _ = users.verify("alice", "wrong");
        }
        assert!(matches!(
            users.verify("alice", "correct horse"),
            Err(AuthError::Throttled { .. })
        ));
    }

    #[test]
    fn a_password_file_is_read_and_a_bad_hash_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bob.hash");
        std::fs::write(&path, format!("{}\n", hash_password("pw").unwrap())).unwrap();
        let mut lab = Lab::sim();
        lab.users = vec![labctl_protocols::lab::User {
            name: "bob".into(),
            role: Role::Planner,
            password_hash: None,
            password_file: Some(path),
        }];
        assert_eq!(
            Users::from_lab(&lab).unwrap().verify("bob", "pw"),
            Ok(Role::Planner)
        );
        lab.users[0].password_file = None;
        lab.users[0].password_hash = Some("argon2id:not-a-phc-string".into());
        assert!(Users::from_lab(&lab).is_err());
    }
}
