//! Durable anti-rollback state and the admission log, in one redb database.
//!
//! redb commits with fsync by default (`Durability::Immediate`), so a committed
//! admission survives a crash; the caller prints a verdict only after the commit.
//! The admission log is append-only and hash-chained: each record carries the sha256
//! of the previous record's bytes, so removing or editing a record breaks the chain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use verify_core::{
    check_rollback, Admitted, AdmittedVersion, Decision, Reason, RollbackView, Sha256Digest,
};

/// (tenant, capsule_id) → (highest admitted version, digest of its JWS).
const VERSIONS: TableDefinition<(&str, &str), (u64, [u8; 32])> = TableDefinition::new("versions");
/// sequence number → JSON record.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("admission_log");

pub const STATE_FILE: &str = "rollback.redb";

#[derive(Debug)]
pub struct State {
    db: Database,
    path: PathBuf,
}

fn err(path: &Path, e: impl std::fmt::Display) -> crate::GatewayError {
    crate::GatewayError::State {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl State {
    /// Opens (creating if asked) `DIR/rollback.redb`. Another process holding the
    /// database is waited for briefly: admissions from two CLIs serialise.
    pub fn open(dir: &Path, create: bool) -> Result<Option<State>, crate::GatewayError> {
        let path = dir.join(STATE_FILE);
        if !create && !path.exists() {
            return Ok(None);
        }
        if create {
            // The gateway's alone: history, evidence, sandboxes (0700 whatever the umask).
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(dir)
            .map_err(|e| crate::GatewayError::io(dir, e))?;
        }
        let mut wait = Duration::from_millis(5);
        let db = loop {
            match Database::create(&path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if wait < Duration::from_secs(5) => {
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                Err(e) => return Err(err(&path, e)),
            }
        };
        Ok(Some(State { db, path }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records admissions in one durable transaction, in order. Each is checked
    /// again against the state inside the transaction (an earlier capsule of the
    /// same batch, or another process, may have admitted a higher version since it
    /// was verified); one that no longer passes is returned as a `rollback` denial.
    /// Nothing is acknowledged unless the commit succeeds. The admitted capsules are
    /// handed back (for `run`), in order.
    pub fn record(
        &self,
        admitted: Vec<Result<Admitted, Decision>>,
        policy_version: &str,
    ) -> Result<Vec<Result<Admitted, Decision>>, crate::GatewayError> {
        let txn = self.db.begin_write().map_err(|e| err(&self.path, e))?;
        let mut out = Vec::with_capacity(admitted.len());
        {
            let mut versions = txn.open_table(VERSIONS).map_err(|e| err(&self.path, e))?;
            let mut log = txn.open_table(LOG).map_err(|e| err(&self.path, e))?;
            let (mut seq, mut prev) = match log.last().map_err(|e| err(&self.path, e))? {
                Some((k, v)) => (
                    k.value() + 1,
                    Sha256Digest(verify_core::crypto::default_backend().sha256_oneshot(v.value())),
                ),
                None => (0, Sha256Digest([0; 32])),
            };
            for item in admitted {
                let a = match item {
                    Ok(a) => a,
                    Err(denied) => {
                        out.push(Err(denied));
                        continue;
                    }
                };
                let m = a.manifest();
                let key = (m.tenant.as_str(), m.capsule_id.as_str());
                let latest = versions.get(key).map_err(|e| err(&self.path, e))?.map(|g| {
                    let (version, digest) = g.value();
                    AdmittedVersion {
                        version,
                        digest: Sha256Digest(digest),
                    }
                });
                if let Err(why) = check_rollback(latest, m.version, a.digest()) {
                    out.push(Err(a.into_decision().into_denied(Reason::Rollback, why)));
                    continue;
                }
                versions
                    .insert(key, (m.version, a.digest().0))
                    .map_err(|e| err(&self.path, e))?;
                let record = serde_json::json!({
                    "seq": seq,
                    "prev": prev.to_string(),
                    "capsule_digest": a.digest().to_string(),
                    "tenant": m.tenant,
                    "capsule_id": m.capsule_id,
                    "version": m.version,
                    "kid": a.decision().kid,
                    "policy_version": policy_version,
                    "approvers": m.approvals.iter().map(|x| x.approver.as_str()).collect::<Vec<_>>(),
                    "admitted_at": verify_core::Clock::now_unix(&verify_core::SystemClock),
                });
                let bytes = serde_json::to_vec(&record).map_err(|e| err(&self.path, e))?;
                log.insert(seq, bytes.as_slice())
                    .map_err(|e| err(&self.path, e))?;
                prev = Sha256Digest(verify_core::crypto::default_backend().sha256_oneshot(&bytes));
                seq += 1;
                out.push(Ok(a));
            }
        }
        txn.commit().map_err(|e| err(&self.path, e))?;
        Ok(out)
    }

    /// Walks the admission log and checks its hash chain; returns the record count.
    pub fn verify_log(&self) -> Result<u64, crate::GatewayError> {
        let txn = self.db.begin_read().map_err(|e| err(&self.path, e))?;
        let log = match txn.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(err(&self.path, e)),
        };
        let mut prev = Sha256Digest([0; 32]);
        let mut expect = 0u64;
        for row in log.iter().map_err(|e| err(&self.path, e))? {
            let (k, v) = row.map_err(|e| err(&self.path, e))?;
            let record: serde_json::Value =
                serde_json::from_slice(v.value()).map_err(|e| err(&self.path, e))?;
            if k.value() != expect || record["seq"] != expect {
                return Err(err(
                    &self.path,
                    format!("admission log: record {expect} is missing"),
                ));
            }
            if record["prev"] != prev.to_string() {
                return Err(err(
                    &self.path,
                    format!("admission log: record {expect} does not chain to its predecessor"),
                ));
            }
            prev = Sha256Digest(verify_core::crypto::default_backend().sha256_oneshot(v.value()));
            expect += 1;
        }
        Ok(expect)
    }
}

impl RollbackView for State {
    fn latest(&self, tenant: &str, capsule_id: &str) -> Result<Option<AdmittedVersion>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = match txn.open_table(VERSIONS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let row = table.get((tenant, capsule_id)).map_err(|e| e.to_string())?;
        Ok(row.map(|g| {
            let (version, digest) = g.value();
            AdmittedVersion {
                version,
                digest: Sha256Digest(digest),
            }
        }))
    }
}

/// A state that cannot be read: every lookup fails, so every capsule is denied
/// `state_unavailable` (deny by default) instead of being admitted without history.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl RollbackView for Unavailable {
    fn latest(&self, _: &str, _: &str) -> Result<Option<AdmittedVersion>, String> {
        Err(self.0.clone())
    }
}
