//! The checkpoint witness: the latest committed checkpoint (state id, number, records
//! covered, head) recorded OUTSIDE the state directory, in the sibling file
//! `DIR.witness`. A state directory restored from an older copy carries its own older
//! checkpoints, and everything inside it agrees with itself; the witness does not move
//! back with it, so `selfcheck`'s `host.checkpoint` sees the state behind it.
//!
//! Written after the checkpoint's transaction commits, never before: a crash in
//! between leaves the witness one checkpoint behind (harmless: the next checkpoint
//! moves it), never ahead (which would look like a restored state). The checkpoint
//! path stages it ([`stage`]) inside the transaction; `State`'s guard publishes what
//! was staged once the closure that committed returns ([`take_staged`], written by
//! `crate::state`'s upkeep, off the commit path). A witness
//! never moves back: a lower number for the same state is not written.
//!
//! With a TPM, an NV counter (TPM2_NV_DefineSpace with TPMA_NV_COUNTER, incremented
//! per checkpoint and quoted) would be the better witness: nothing on the file
//! system, not even root, can lower it. docs/selfcheck.md says what that would take.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the witness records of one committed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Witness {
    pub schema: String,
    pub state_id: String,
    pub number: u64,
    /// Records the checkpoint covers.
    pub count: u64,
    /// `sha256:` of the record it ends at.
    pub head: String,
}

pub const WITNESS_SCHEMA: &str = "capsule-gateway/checkpoint-witness/v1";

/// Why the witness could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a checkpoint witness: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Write(#[from] crate::durable::DurableError),
}

/// Where the witness of the state in `state_dir` lives: `DIR.witness` beside it
/// (`None` for a state directory with no name, such as `/`).
pub fn path_for(state_dir: &Path) -> Option<PathBuf> {
    let dir = state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf());
    let name = dir.file_name()?.to_os_string();
    let mut file = name;
    file.push(".witness");
    Some(dir.with_file_name(file))
}

/// The witness at `path`, if there is one.
pub fn read(path: &Path) -> Result<Option<Witness>, WitnessError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WitnessError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| WitnessError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// Records `w` durably at `path` (temp file, fsync, rename, fsync the directory),
/// unless the witness there already names a later checkpoint of the same state.
pub fn write(path: &Path, w: &Witness) -> Result<(), WitnessError> {
    if let Ok(Some(old)) = read(path) {
        if old.state_id == w.state_id && old.number > w.number {
            return Ok(());
        }
    }
    let bytes = serde_json::to_vec(w).map_err(|source| WitnessError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    crate::durable::replace(path, &bytes, 0o644)?;
    Ok(())
}

thread_local! {
    /// The checkpoint written by the transaction this thread is running, until it
    /// commits (or fails).
    static STAGED: RefCell<Option<(PathBuf, Witness)>> = const { RefCell::new(None) };
}

/// Inside a checkpoint's transaction: the witness to write once it commits. `db` is
/// the state's database file (the state directory is its parent).
pub fn stage(db: &Path, state_id: Option<&str>, number: u64, count: u64, head: String) {
    let (Some(dir), Some(state_id)) = (db.parent(), state_id) else {
        return;
    };
    let Some(path) = path_for(dir) else {
        return;
    };
    let w = Witness {
        schema: WITNESS_SCHEMA.into(),
        state_id: state_id.to_string(),
        number,
        count,
        head,
    };
    STAGED.with(|s| *s.borrow_mut() = Some((path, w)));
}

/// After the closure that ran a transaction returned: the staged witness if it
/// `committed` (to be written by the upkeep that follows the commit), dropped
/// otherwise.
pub fn take_staged(committed: bool) -> Option<(PathBuf, Witness)> {
    let staged = STAGED.with(|s| s.borrow_mut().take());
    staged.filter(|_| committed)
}
