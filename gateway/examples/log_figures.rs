//! Figures for the admission log (issue 12): `log verify` records/s, and start-up
//! time on a large log before (a full walk, as start-up did) and after (only what
//! follows the last signed checkpoint).
//!
//! `cargo run --release -p capsule-gateway --example log_figures -- [RECORDS]`
//! (default 1 000 000 records, about 250 MB; the state is made in a temporary
//! directory and removed).

use std::sync::Arc;
use std::time::Instant;

use capsule_gateway::admission_log::record::{AdmitRecord, CheckpointCause, LogRecord};
use capsule_gateway::admission_log::signer::CheckpointSigner;
use capsule_gateway::admission_log::LogConfig;
use capsule_gateway::state::{State, StateDir, STATE_FILE};
use redb::TableDefinition;
use verify_core::{Sha256Digest, SystemClock};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("admission_log");
const HEAD: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("log_head");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("state");
    drop(State::open(&dir, true, &SystemClock)?.ok_or("no state")?);
    // A large log written straight into the table (as years of admissions would).
    {
        let db = redb::Database::open(dir.join(STATE_FILE))?;
        let txn = db.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            let mut prev = [0u8; 32];
            let backend = verify_core::crypto::default_backend();
            for seq in 0..n {
                let r = LogRecord::Admit(AdmitRecord {
                    seq,
                    prev: Sha256Digest(prev).to_string(),
                    capsule_digest: Sha256Digest(backend.sha256_oneshot(&seq.to_le_bytes()))
                        .to_string(),
                    tenant: "tenant-a".into(),
                    capsule_id: format!("capsule-{}", seq % 1000),
                    version: seq,
                    kid: Some("ci-es".into()),
                    policy_version: "2026-12-01".into(),
                    approvers: vec!["spiffe://example.org/approver/alice".into()],
                    admitted_at: 1_764_000_000 + seq,
                });
                let bytes = r.to_bytes();
                log.insert(seq, bytes.as_slice())?;
                prev = backend.sha256_oneshot(&bytes);
            }
            txn.open_table(HEAD)?.insert("head", (n, prev))?;
        }
        txn.commit()?;
    }
    let size = std::fs::metadata(dir.join(STATE_FILE))?.len();
    let located = StateDir::locate(&dir, false, &SystemClock)?.ok_or("no state")?;
    let signer = Arc::new(CheckpointSigner::software(&dir)?);
    let dir_state = located.with_log(Some(signer), LogConfig::default());

    let t = Instant::now();
    let state = dir_state.open()?;
    state.check_since_checkpoint()?;
    let before = t.elapsed();
    state.checkpoint(&SystemClock, CheckpointCause::Shutdown)?;
    drop(state);

    let t = Instant::now();
    let state = dir_state.open()?;
    state.check_since_checkpoint()?;
    let after = t.elapsed();

    let t = Instant::now();
    let records = state.verify_log()?;
    let verify = t.elapsed();
    println!("records: {records}, database {:.0} MB", size as f64 / 1e6);
    println!("start-up before (no checkpoint, full walk): {before:?}");
    println!("start-up after (last checkpoint at the end): {after:?}");
    println!(
        "log verify: {verify:?}, {:.0} records/s",
        records as f64 / verify.as_secs_f64()
    );
    Ok(())
}
