//! Browser sessions: a random token in a cookie names a logged-in lab user; each session has its own CSRF
//! token, which state-changing requests must echo in [`CSRF_HEADER`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use labctl_core::api::Principal;

/// The session cookie's name.
pub const COOKIE: &str = "labctl_session";
/// The header a state-changing request carries the session's CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused this long is forgotten (a shift, with margin).
pub const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at most; beyond it the least recently used is forgotten.
pub const MAX_SESSIONS: usize = 1024;

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: Principal,
    pub csrf: String,
    last_used: Instant,
}

/// The sessions of this process (a restart logs everyone out: the page says so and shows the login).
#[derive(Default)]
pub struct Sessions {
    by_token: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes from the operating system, as hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // The OS random source failing is not survivable for a login: a predictable token would be worse.
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.by_token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for `principal`: its cookie token and the session.
    pub fn open(&self, principal: Principal) -> (String, Session) {
        let token = random_token();
        let session = Session {
            principal,
            csrf: random_token(),
            last_used: Instant::now(),
        };
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.last_used.elapsed() < IDLE);
            if sessions.len() >= MAX_SESSIONS
                && let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(t, _)| t.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(token.clone(), session.clone());
        (token, session)
    }

    /// The session a cookie token names, if it is live (and marks it used).
    pub fn get(&self, token: &str) -> Option<Session> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(token)?;
        if session.last_used.elapsed() >= IDLE {
            sessions.remove(token);
            return None;
        }
        session.last_used = Instant::now();
        Some(session.clone())
    }

    pub fn close(&self, token: &str) {
        self.lock().remove(token);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `Set-Cookie` value of a session: HttpOnly (no script reads it), SameSite=Strict (no other site's
/// page sends it), Secure under TLS.
pub fn set_cookie(token: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The session token in a `Cookie` header, if any.
pub fn token_in(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// Compares two tokens in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use labctl_core::api::Face;
    use labctl_protocols::lab::Role;

    #[test]
    fn tokens_are_random_and_cookies_are_guarded() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        let c = set_cookie("abc", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert_eq!(token_in("x=1; labctl_session=abc; y=2"), Some("abc"));
        assert_eq!(token_in("labctl_session="), None);
        assert!(same_token("abc", "abc") && !same_token("abc", "abd") && !same_token("abc", "ab"));
    }

    #[test]
    fn sessions_open_close_and_stay_bounded() {
        let sessions = Sessions::default();
        let p = Principal::new("alice", Role::Technician, Face::Web);
        let (token, s) = sessions.open(p.clone());
        assert_eq!(sessions.get(&token).unwrap().csrf, s.csrf);
        sessions.close(&token);
        assert!(sessions.get(&token).is_none());
        for _ in 0..MAX_SESSIONS + 5 {
            sessions.open(p.clone());
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
    }
}
