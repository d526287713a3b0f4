//! The run ledger: which capsule digests (sha256 of the exact JWS bytes) this agent
//! has started, finished and shipped evidence for. `STATE/agent/runs/`:
//!
//! | file | written |
//! |---|---|
//! | `<hex>.started.json` | durably, **before** the sandbox starts (a `RENAME_NOREPLACE`: two agents on one state cannot both claim a digest) |
//! | `<hex>.done.json` | durably, after the evidence bundle is written |
//! | `<hex>.pushed.json` | after the registry accepted the evidence artifact |
//!
//! A digest with `started` is never run again: a crash mid-run (kill -9) leaves
//! `started` without `done`, and the restart reports the run as interrupted instead
//! of repeating it (at most once, never twice).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use verify_core::Sha256Digest;

use crate::durable::{self, DurableError};

/// Where a capsule came from and what happened to its run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    pub capsule_digest: String,
    pub run_id: String,
    pub registry: String,
    pub repository: String,
    /// The capsule artifact's manifest (the evidence artifact's `subject`).
    pub manifest_digest: String,
    pub manifest_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DoneRecord {
    #[serde(flatten)]
    pub run: RunRecord,
    /// The event type's last part: `completed`, `failed` or `interrupted`.
    pub outcome: String,
    pub exit_code: Option<i64>,
    /// The tenant's egress mode when the run finished (what its export may hold).
    pub egress: String,
}

#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

/// What the ledger knows of a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    New,
    /// Started and never finished: the process died mid-run.
    Interrupted(RunRecord),
    Done {
        done: DoneRecord,
        pushed: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Write(#[from] DurableError),
    #[error("run ledger {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("run ledger {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Ledger {
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let dir = state_dir.join("agent").join("runs");
        durable::create_dirs(&dir, 0o700)?;
        Ok(Ledger { dir })
    }

    fn path(&self, digest: &Sha256Digest, what: &str) -> PathBuf {
        self.dir.join(format!("{}.{what}.json", digest.to_hex()))
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, path: &Path) -> Result<Option<T>, LedgerError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| LedgerError::Parse {
                    path: path.to_path_buf(),
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LedgerError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn entry(&self, digest: &Sha256Digest) -> Result<Entry, LedgerError> {
        if let Some(done) = self.read::<DoneRecord>(&self.path(digest, "done"))? {
            let pushed = self.path(digest, "pushed").exists();
            return Ok(Entry::Done { done, pushed });
        }
        match self.read::<RunRecord>(&self.path(digest, "started"))? {
            Some(r) => Ok(Entry::Interrupted(r)),
            None => Ok(Entry::New),
        }
    }

    /// Claims `digest` for a run, durably; `false` if it was claimed already.
    pub fn start(&self, digest: &Sha256Digest, run: &RunRecord) -> Result<bool, LedgerError> {
        let bytes = to_json(run);
        match durable::write_new(&self.path(digest, "started"), &bytes, 0o600) {
            Ok(()) => Ok(true),
            Err(DurableError::Exists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn finish(&self, digest: &Sha256Digest, done: &DoneRecord) -> Result<(), LedgerError> {
        Ok(durable::write_new(
            &self.path(digest, "done"),
            &to_json(done),
            0o600,
        )?)
    }

    pub fn pushed(
        &self,
        digest: &Sha256Digest,
        evidence_digest: &Sha256Digest,
    ) -> Result<(), LedgerError> {
        let body = serde_json::json!({ "evidence_manifest": evidence_digest.to_string() });
        match durable::write_new(
            &self.path(digest, "pushed"),
            body.to_string().as_bytes(),
            0o600,
        ) {
            Err(DurableError::Exists { .. }) => Ok(()),
            r => Ok(r?),
        }
    }

    /// Finished runs whose evidence the registry has not accepted yet.
    pub fn unpushed(&self) -> Result<Vec<(Sha256Digest, DoneRecord)>, LedgerError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|source| LedgerError::Read {
            path: self.dir.clone(),
            source,
        })?;
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".done.json")) else {
                continue;
            };
            let Some(digest) = Sha256Digest::from_prefixed(&format!("sha256:{hex}")) else {
                continue;
            };
            if let Entry::Done {
                done,
                pushed: false,
            } = self.entry(&digest)?
            {
                out.push((digest, done));
            }
        }
        Ok(out)
    }
}

fn to_json(v: &impl Serialize) -> Vec<u8> {
    // Strings and numbers only: serialising cannot fail.
    serde_json::to_vec_pretty(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RunRecord {
        RunRecord {
            capsule_digest: Sha256Digest([1; 32]).to_string(),
            run_id: "r".into(),
            registry: "h:1".into(),
            repository: "c".into(),
            manifest_digest: Sha256Digest([2; 32]).to_string(),
            manifest_size: 3,
        }
    }

    #[test]
    fn a_digest_is_claimed_once_and_an_unfinished_claim_is_interrupted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Ledger::open(dir.path()).expect("open");
        let d = Sha256Digest([1; 32]);
        assert_eq!(l.entry(&d).expect("entry"), Entry::New);
        assert!(l.start(&d, &record()).expect("start"));
        assert!(!l.start(&d, &record()).expect("start again"));
        // A new process (the same files) sees the claim.
        let l = Ledger::open(dir.path()).expect("reopen");
        assert_eq!(l.entry(&d).expect("entry"), Entry::Interrupted(record()));
        let done = DoneRecord {
            run: record(),
            outcome: "completed".into(),
            exit_code: Some(0),
            egress: "local-only".into(),
        };
        l.finish(&d, &done).expect("finish");
        assert_eq!(l.unpushed().expect("unpushed").len(), 1);
        l.pushed(&d, &Sha256Digest([3; 32])).expect("pushed");
        assert!(l.unpushed().expect("unpushed").is_empty());
        assert_eq!(
            l.entry(&d).expect("entry"),
            Entry::Done { done, pushed: true }
        );
    }
}
