//! Users and passwords from the lab file, shared by every gateway that logs people in (MQTT, OPC UA,
//! command port, console). Passwords are argon2 PHC hashes, in the lab file or in a file it names; clear
//! passwords exist only in memory, for the moment of a check.
//!
//! One [`Users`] serves every face, so the limits hold for the controller as a whole:
//! - at most [`MAX_CONCURRENT_VERIFICATIONS`] argon2 checks run at once (each costs 19 MiB and tens of
//!   milliseconds of CPU); an attempt that cannot start one within [`VERIFICATION_WAIT`] is refused cheaply;
//! - failures are counted per user name *and* source address, so a stranger elsewhere on the network cannot
//!   lock a technician out at the bench; all unknown user names from one source share one counter;
//! - the failure table is bounded ([`MAX_TRACKED`] entries), and names and passwords have length limits.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
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
    /// Refused without checking: too many logins are being checked right now.
    #[error("too many logins at once; try again shortly")]
    Busy,
    #[error("{field} longer than {max} bytes")]
    TooLong { field: &'static str, max: usize },
}

/// Where a login comes from: failures are counted per user name and source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A network peer.
    Ip(IpAddr),
    /// A local line (serial), or a face that does not tell the peer's address.
    Local,
}

impl From<std::net::SocketAddr> for Source {
    fn from(addr: std::net::SocketAddr) -> Self {
        Source::Ip(addr.ip())
    }
}

/// Password verifications running at once, for all faces together.
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 2;
/// How long an attempt waits for a verification slot before it is refused ([`AuthError::Busy`]).
pub const VERIFICATION_WAIT: Duration = Duration::from_secs(2);
/// Longest user name and password accepted.
pub const MAX_USER_LEN: usize = 64;
pub const MAX_PASSWORD_LEN: usize = 256;
/// Entries the failure table holds at most (user or unknown, source).
pub const MAX_TRACKED: usize = 4096;

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

struct Failures {
    count: u32,
    locked_until: Option<Instant>,
    last: Instant,
}

/// Whose failures an attempt counts against: a known user's name, or every unknown name (`None`), from
/// one source.
type FailureKey = (Option<String>, Source);

/// The lab's users, ready to check passwords.
pub struct Users {
    users: BTreeMap<String, (Role, String)>,
    /// A hash nobody's password matches, checked for unknown users.
    decoy: String,
    failures: Mutex<BTreeMap<FailureKey, Failures>>,
    verifications: Arc<tokio::sync::Semaphore>,
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
            verifications: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_VERIFICATIONS)),
        })
    }

    /// Whether any user is configured (anonymous access is refused whenever one is).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn role_of(&self, user: &str) -> Option<Role> {
        self.users.get(user).map(|(r, _)| *r)
    }

    /// Checks a login from `source` off the async threads, within the limits above. Failures are counted per
    /// user name and source; after a few, each further attempt must wait twice as long as the last (up to
    /// five minutes), whether or not the password is then right.
    pub async fn login(
        self: &Arc<Self>,
        user: &str,
        password: &str,
        source: Source,
    ) -> Result<Role, AuthError> {
        self.admissible(user, password, source)?;
        let permit = tokio::time::timeout(
            VERIFICATION_WAIT,
            Arc::clone(&self.verifications).acquire_owned(),
        )
        .await
        .map_err(|_| AuthError::Busy)?
        .map_err(|_| AuthError::Busy)?;
        let (users, user, password) = (Arc::clone(self), user.to_owned(), password.to_owned());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            users.verify(&user, &password, source)
        })
        .await
        .unwrap_or(Err(AuthError::Denied))
    }

    /// The cheap checks before any argon2 work: lengths and the failure table.
    fn admissible(&self, user: &str, password: &str, source: Source) -> Result<(), AuthError> {
        if user.len() > MAX_USER_LEN {
            return Err(AuthError::TooLong {
                field: "user name",
                max: MAX_USER_LEN,
            });
        }
        if password.len() > MAX_PASSWORD_LEN {
            return Err(AuthError::TooLong {
                field: "password",
                max: MAX_PASSWORD_LEN,
            });
        }
        let now = Instant::now();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = failures.get(&self.key(user, source))
            && let Some(until) = f.locked_until
            && until > now
        {
            return Err(AuthError::Throttled {
                user: user.to_owned(),
                retry_in_s: (until - now).as_secs().max(1),
            });
        }
        Ok(())
    }

    fn key(&self, user: &str, source: Source) -> FailureKey {
        (
            self.users.contains_key(user).then(|| user.to_owned()),
            source,
        )
    }

    /// Checks a password now, on this thread (argon2: call it off the async threads; [`Users::login`]
    /// does). Applies the same limits as `login` except the concurrency bound.
    pub fn verify(&self, user: &str, password: &str, source: Source) -> Result<Role, AuthError> {
        self.admissible(user, password, source)?;
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
        let key = self.key(user, source);
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match ok {
            Some(role) => {
                failures.remove(&key);
                Ok(role)
            }
            None => {
                if !failures.contains_key(&key) && failures.len() >= MAX_TRACKED {
                    make_room(&mut failures, now);
                }
                let f = failures.entry(key).or_insert(Failures {
                    count: 0,
                    locked_until: None,
                    last: now,
                });
                f.count += 1;
                f.last = now;
                if f.count > FREE_FAILURES {
                    let lockout = Duration::from_secs(1u64 << (f.count - FREE_FAILURES).min(9))
                        .min(MAX_LOCKOUT);
                    f.locked_until = Some(now + lockout);
                }
                tracing::warn!(user, ?source, failures = f.count, "login refused");
                Err(AuthError::Denied)
            }
        }
    }
}

/// Frees a place in a full failure table: entries whose lockout is over and that have been quiet for the
/// longest lockout are forgotten; if none, the one quiet the longest.
fn make_room(failures: &mut BTreeMap<FailureKey, Failures>, now: Instant) {
    failures.retain(|_, f| {
        f.locked_until.is_some_and(|u| u > now) || now.duration_since(f.last) < MAX_LOCKOUT
    });
    while failures.len() >= MAX_TRACKED {
        let Some(oldest) = failures
            .iter()
            .min_by_key(|(_, f)| f.last)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        failures.remove(&oldest);
    }
}

/// The passwords of the simulated lab's development users (docs/lab-file.md): public, so refused outside
/// simulation.
pub const DEVELOPMENT_PASSWORDS: [&str; 4] =
    ["technician-dev", "planner-dev", "rig-dev", "observer-dev"];

impl Users {
    /// Users whose password is one of the [`DEVELOPMENT_PASSWORDS`] (argon2 work per user and password:
    /// call it once, at start, off the async threads).
    pub fn with_development_passwords(&self) -> Vec<String> {
        self.users
            .iter()
            .filter(|(_, (_, hash))| {
                PasswordHash::new(hash).is_ok_and(|parsed| {
                    DEVELOPMENT_PASSWORDS.iter().any(|p| {
                        Argon2::default()
                            .verify_password(p.as_bytes(), &parsed)
                            .is_ok()
                    })
                })
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// A listener that would carry passwords in clear text on the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{listener} on {addr}: passwords would travel in clear text on the network; bind a loopback address, \
     or set interfaces.allow_cleartext_on_network = true in the lab file for a closed lab network"
)]
pub struct CleartextListener {
    pub listener: String,
    pub addr: std::net::SocketAddr,
}

/// Refuses a listener in clear text on a non-loopback address unless the lab file allows it
/// (`interfaces.allow_cleartext_on_network`); `what` names the listener for the message.
pub fn check_cleartext_listener(
    what: &str,
    addr: std::net::SocketAddr,
    allowed: bool,
) -> Result<(), CleartextListener> {
    if addr.ip().is_loopback() || allowed {
        return Ok(());
    }
    Err(CleartextListener {
        listener: what.to_owned(),
        addr,
    })
}

/// An argon2id PHC hash of a password, for the lab file (`labctl passwd`).
pub fn hash_password(password: &str) -> Result<String, password_hash::Error> {
    let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BENCH: Source = Source::Ip(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 5)));
    const ELSEWHERE: Source = Source::Ip(IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 9, 9)));

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
        assert_eq!(
            users.verify("alice", "correct horse", BENCH),
            Ok(Role::Technician)
        );
        assert_eq!(
            users.verify("alice", "wrong", BENCH),
            Err(AuthError::Denied)
        );
        assert_eq!(
            users.verify("mallory", "anything", BENCH),
            Err(AuthError::Denied)
        );
    }

    #[test]
    fn repeated_failures_are_throttled_even_for_the_right_password() {
        let users = Users::from_lab(&lab_with_users()).unwrap();
        for _ in 0..FREE_FAILURES + 1 {
            let _ = users.verify("alice", "wrong", BENCH);
        }
        assert!(matches!(
            users.verify("alice", "correct horse", BENCH),
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
            Users::from_lab(&lab).unwrap().verify("bob", "pw", BENCH),
            Ok(Role::Planner)
        );
        lab.users[0].password_file = None;
        lab.users[0].password_hash = Some("argon2id:not-a-phc-string".into());
        assert!(Users::from_lab(&lab).is_err());
    }

    #[test]
    fn a_stranger_elsewhere_cannot_lock_a_technician_out_at_the_bench() {
        let users = Users::from_lab(&lab_with_users()).unwrap();
        for _ in 0..FREE_FAILURES + 2 {
            let _ = users.verify("alice", "guess", ELSEWHERE);
        }
        assert!(matches!(
            users.verify("alice", "correct horse", ELSEWHERE),
            Err(AuthError::Throttled { .. })
        ));
        assert_eq!(
            users.verify("alice", "correct horse", BENCH),
            Ok(Role::Technician)
        );
    }

    #[test]
    fn unknown_names_from_one_source_share_one_counter_and_the_table_stays_bounded() {
        let users = Users::from_lab(&lab_with_users()).unwrap();
        for i in 0..FREE_FAILURES + 1 {
            let _ = users.verify(&format!("random-{i}"), "x", ELSEWHERE);
        }
        assert!(matches!(
            users.verify("yet-another-name", "x", ELSEWHERE),
            Err(AuthError::Throttled { .. })
        ));
        assert_eq!(users.failures.lock().unwrap().len(), 1);
        // Many sources: the table never holds more than its bound (a cheap fill, no argon2 per entry).
        {
            let mut failures = users.failures.lock().unwrap();
            let now = Instant::now();
            for i in 0..MAX_TRACKED as u32 {
                let source = Source::Ip(IpAddr::V6(std::net::Ipv6Addr::from(u128::from(i) + 1)));
                failures.insert(
                    (None, source),
                    Failures {
                        count: 1,
                        locked_until: None,
                        last: now,
                    },
                );
            }
        }
        let _ = users.verify("alice", "wrong", BENCH);
        let failures = users.failures.lock().unwrap();
        assert!(failures.len() <= MAX_TRACKED, "{}", failures.len());
        assert!(failures.contains_key(&(Some("alice".into()), BENCH)));
    }

    #[test]
    fn over_long_names_and_passwords_are_refused_before_any_hashing() {
        let users = Users::from_lab(&lab_with_users()).unwrap();
        assert_eq!(
            users.verify(&"a".repeat(MAX_USER_LEN + 1), "x", BENCH),
            Err(AuthError::TooLong {
                field: "user name",
                max: MAX_USER_LEN
            })
        );
        assert_eq!(
            users.verify("alice", &"p".repeat(MAX_PASSWORD_LEN + 1), BENCH),
            Err(AuthError::TooLong {
                field: "password",
                max: MAX_PASSWORD_LEN
            })
        );
        assert!(users.failures.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn logins_beyond_the_verification_slots_are_refused_cheaply() {
        let users = Arc::new(Users::from_lab(&lab_with_users()).unwrap());
        let held: Vec<_> = (0..MAX_CONCURRENT_VERIFICATIONS)
            .map(|_| users.verifications.clone().try_acquire_owned().unwrap())
            .collect();
        assert_eq!(
            users.login("alice", "correct horse", BENCH).await,
            Err(AuthError::Busy)
        );
        drop(held);
        assert_eq!(
            users.login("alice", "correct horse", BENCH).await,
            Ok(Role::Technician)
        );
    }
}
