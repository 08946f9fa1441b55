//! The emergency-stop latch in a block of its own, reserved when the controller starts. A stop must be
//! recorded even when the journal cannot commit, and a full disk is the usual reason it cannot: SQLite
//! needs new pages for any write. The block is rewritten whole in place, so recording needs no new space;
//! a block that is torn, unreadable or of another format reads as latched (on doubt the lab stays
//! stopped). The journal's `safety` table stays the record with who and when; at start the lab is latched
//! when either says so.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::JournalError;

pub const LATCH_FILE: &str = "estop.latch";
/// One page: written whole, so the file system never allocates on a later write.
const BLOCK: usize = 4096;
const MAGIC: &str = "labctl estop latch v1";
/// The longest reason kept (the journal keeps it whole).
const MAX_REASON: usize = 1024;

/// What the block says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatchState {
    Released,
    Latched { reason: String },
}

/// The reserved block, owned by the controller.
#[derive(Debug)]
pub struct LatchBlock {
    file: File,
    path: PathBuf,
}

impl LatchBlock {
    /// Opens the block in `data_dir` (reserving it on first use) and reads what the last process left.
    /// Fails when the block cannot be reserved: a controller that could not record a stop must not start.
    pub fn open(data_dir: &Path) -> Result<(LatchBlock, LatchState), JournalError> {
        let path = data_dir.join(LATCH_FILE);
        let io = |source| JournalError::LatchBlock {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut block = vec![0u8; BLOCK];
        let mut len = 0;
        while len < BLOCK {
            match file.read_at(&mut block[len..], len as u64).map_err(io)? {
                0 => break,
                n => len += n,
            }
        }
        let state = if len == 0 {
            LatchState::Released
        } else {
            decode(&block[..len])
        };
        // Written back whole at once: a new or short file gets its page now, while there is space.
        let latch = LatchBlock { file, path };
        if let Err(source) = latch.record(&state) {
            return Err(JournalError::LatchBlock {
                path: latch.path,
                source,
            });
        }
        Ok((latch, state))
    }

    /// Writes `state` over the block and waits until it is on disk.
    pub fn record(&self, state: &LatchState) -> std::io::Result<()> {
        self.file.write_all_at(&encode(state), 0)?;
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn body(state: &LatchState) -> String {
    match state {
        LatchState::Released => format!("{MAGIC}\nreleased\n\n"),
        LatchState::Latched { reason } => {
            let mut reason: String = reason
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            if reason.len() > MAX_REASON {
                let mut end = MAX_REASON;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            format!("{MAGIC}\nlatched\n{reason}\n")
        }
    }
}

fn checksum(body: &str) -> String {
    Sha256::digest(body.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn encode(state: &LatchState) -> Vec<u8> {
    let body = body(state);
    let mut block = format!("{body}{}\n", checksum(&body)).into_bytes();
    block.resize(BLOCK, b'\n');
    block
}

fn decode(block: &[u8]) -> LatchState {
    let doubt = |why: &str| LatchState::Latched {
        reason: format!("the emergency-stop latch block is {why}: treated as latched"),
    };
    let Ok(text) = std::str::from_utf8(block) else {
        return doubt("not text");
    };
    let mut lines = text.split('\n');
    let (Some(magic), Some(state), Some(reason), Some(sum)) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return doubt("short");
    };
    let body = format!("{magic}\n{state}\n{reason}\n");
    if magic != MAGIC || sum != checksum(&body) || lines.any(|l| !l.is_empty()) {
        return doubt("torn or of another format");
    }
    match state {
        "released" => LatchState::Released,
        "latched" => LatchState::Latched {
            reason: reason.to_owned(),
        },
        _ => doubt("of an unknown state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_block_is_released_and_keeps_what_is_recorded_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let (block, state) = LatchBlock::open(dir.path()).unwrap();
        assert_eq!(state, LatchState::Released);
        assert_eq!(
            std::fs::metadata(block.path()).unwrap().len(),
            BLOCK as u64,
            "the page is reserved at once"
        );
        let latched = LatchState::Latched {
            reason: "journal failure: database or disk is full".into(),
        };
        block.record(&latched).unwrap();
        drop(block);
        let (block, state) = LatchBlock::open(dir.path()).unwrap();
        assert_eq!(state, latched);
        block.record(&LatchState::Released).unwrap();
        assert_eq!(
            LatchBlock::open(dir.path()).unwrap().1,
            LatchState::Released
        );
    }

    #[test]
    fn a_torn_or_foreign_block_reads_as_latched() {
        let latched = encode(&LatchState::Latched {
            reason: "emergency stop by alice".into(),
        });
        let released = encode(&LatchState::Released);
        // A write torn at a sector: the head of the release over the tail of the latch.
        let mut torn = released.clone();
        torn[512..].copy_from_slice(&latched[512..]);
        assert_eq!(
            decode(&torn),
            LatchState::Released,
            "padding alike: a clean tear"
        );
        let mut torn = latched.clone();
        torn[..12].copy_from_slice(&released[..12]);
        torn[22..30].copy_from_slice(b"released");
        assert!(matches!(decode(&torn), LatchState::Latched { reason } if reason.contains("torn")));
        for bad in [
            &b"\xff\xfe"[..],
            b"labctl estop latch v1\nreleased\n",
            b"hello\n",
        ] {
            assert!(
                matches!(decode(bad), LatchState::Latched { .. }),
                "{:?} must read as latched",
                String::from_utf8_lossy(bad)
            );
        }
        let mut tampered = released.clone();
        tampered[BLOCK - 1] = b'x';
        assert!(matches!(decode(&tampered), LatchState::Latched { .. }));
    }

    #[test]
    fn a_long_reason_with_control_characters_is_kept_on_one_line() {
        let state = LatchState::Latched {
            reason: format!("a\nb\r{}", "é".repeat(2000)),
        };
        match decode(&encode(&state)) {
            LatchState::Latched { reason } => {
                assert!(reason.starts_with("a b "), "{reason}");
                assert!(reason.len() <= MAX_REASON);
            }
            other => panic!("{other:?}"),
        }
    }
}
