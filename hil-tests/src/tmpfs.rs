//! A small tmpfs for a test to fill: the way to give a controller a full disk on demand. Mounting needs
//! root; without it the test fails and says so (CI runs as root), it never skips.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::system::ScratchDir;

/// A tmpfs mounted for the life of the value; unmounted when dropped. Drop every process using it first.
pub struct Tmpfs {
    dir: ScratchDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: `16m`).
    pub fn mount(name: &str, size: &str) -> Tmpfs {
        let dir = ScratchDir::new(name);
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs root to mount a tmpfs (mount -t tmpfs -o size={size} tmpfs {}): {}; {}",
            dir.path().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with a file of its own; returns the file and the error that stopped it
    /// (`ENOSPC` when the disk is full, as it should be).
    pub fn fill(&self) -> (PathBuf, std::io::Error) {
        let path = self.path().join("filler");
        (path.clone(), fill_until_full(&path))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy: detach it now, the kernel frees it when the last user goes.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Appends to `path` until its file system is full; returns the error that stopped it.
pub fn fill_until_full(path: &Path) -> std::io::Error {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("create the filler file");
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
            return e;
        }
        written += chunk.len() as u64;
        assert!(
            written < 1 << 30,
            "a small tmpfs was expected to fill up, but 1 GiB went in"
        );
    }
}
