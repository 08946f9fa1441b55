//! A real terminal for the consoles' end-to-end tests: a tmux server of the test's own, with one window
//! of a given size running the console, read back as the screen a technician sees.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A tmux server on its own socket, with one session `console`; killed with everything in it when dropped.
/// tmux must be installed (scripts/test installs it): without it every call panics, so a test that needs
/// a terminal fails rather than passes untested.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// A server whose socket is named after `name` and this process.
    pub fn new(name: &str) -> Tmux {
        Tmux {
            socket: format!("{name}-{}", std::process::id()),
        }
    }

    /// Runs a tmux command against this server.
    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux (scripts/test installs it)")
    }

    /// Starts `command` (a shell line) in an 80x24 window, kept open after it exits so a failure to start
    /// stays readable.
    pub fn open(&self, command: &str) {
        let out = self.cmd(&[
            "new-session",
            "-d",
            "-s",
            "console",
            "-x",
            "80",
            "-y",
            "24",
            command,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        self.cmd(&["set-option", "-t", "console", "remain-on-exit", "on"]);
    }

    /// Types `keys` (tmux key names, e.g. `Down`, or text).
    pub fn send(&self, keys: &str) {
        let out = self.cmd(&["send-keys", "-t", "console", keys]);
        assert!(out.status.success(), "send-keys {keys}: {out:?}");
    }

    /// The screen as text.
    pub fn screen(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-t", "console"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls the screen until it shows all of `wanted`; panics with the last screen after `within`.
    pub fn wait_for(&self, wanted: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.screen();
            if wanted.iter().all(|w| screen.contains(w)) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the console did not show {wanted:?} within {within:?}; it shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the console's process has exited.
    pub fn wait_until_exited(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let out = self.cmd(&["display-message", "-p", "-t", "console", "#{pane_dead}"]);
            if String::from_utf8_lossy(&out.stdout).trim() == "1" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the console did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}
