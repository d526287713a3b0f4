//! The admission log's parts apart from the database: its record and checkpoint
//! types ([`record`]), the hash-chain walker ([`chain`]), sealed segment files
//! ([`segment`]), the checkpoint signer ([`signer`]) and the checkpoint witness
//! outside the state ([`witness`]). `crate::state` keeps the
//! log in redb and uses these; `log verify` (`crate::cli`) reports with them.
//! docs/state.md ("The admission log") describes the design.

pub mod chain;
pub mod record;
pub mod segment;
pub mod signer;
pub mod witness;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How often checkpoints are written and segments sealed, and how many denials are
/// recorded one by one. Defaults: a checkpoint every 1024 records, a segment sealed
/// once it holds 65536 records (about 16 MiB), and a denial budget of 1000 records
/// refilled at 100 per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub checkpoint_every: u64,
    pub segment_records: u64,
    pub denial_burst: u64,
    pub denials_per_second: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            checkpoint_every: 1024,
            segment_records: 65_536,
            denial_burst: 1000,
            denials_per_second: 100,
        }
    }
}

impl LogConfig {
    /// Zero intervals would checkpoint or seal never (or always): refused.
    pub fn check(&self) -> Result<(), String> {
        if self.checkpoint_every == 0 || self.segment_records == 0 {
            return Err("log.checkpoint_every and log.segment_records must be at least 1".into());
        }
        Ok(())
    }
}

/// What `log verify` found wrong, as a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// A record's bytes changed (its link, its hash at a checkpoint, its schema).
    RecordEdited,
    /// A record is absent from the middle of the log.
    RecordMissing,
    /// Records are not in sequence order.
    RecordOutOfOrder,
    /// The log (or a segment) ends before what a signed checkpoint covers, or its
    /// stored head.
    LogTruncated,
    /// The stored head disagrees with the records.
    HeadMismatch,
    /// A checkpoint's signature does not verify (or names another signer).
    CheckpointSignatureInvalid,
    /// A checkpoint is unreadable, or missing from the checkpoint chain.
    CheckpointInvalid,
    /// A sealed segment file is missing, unreadable, or not the one its checkpoint
    /// names.
    SegmentInvalid,
    /// The state itself cannot be read.
    StateUnreadable,
}

impl FailureCode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::RecordEdited => "record_edited",
            FailureCode::RecordMissing => "record_missing",
            FailureCode::RecordOutOfOrder => "record_out_of_order",
            FailureCode::LogTruncated => "log_truncated",
            FailureCode::HeadMismatch => "head_mismatch",
            FailureCode::CheckpointSignatureInvalid => "checkpoint_signature_invalid",
            FailureCode::CheckpointInvalid => "checkpoint_invalid",
            FailureCode::SegmentInvalid => "segment_invalid",
            FailureCode::StateUnreadable => "state_unreadable",
        }
    }
}

/// The first thing that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{detail}")]
pub struct Failure {
    pub code: FailureCode,
    pub detail: String,
}

impl Failure {
    pub fn new(code: FailureCode, detail: impl Into<String>) -> Failure {
        Failure {
            code,
            detail: detail.into(),
        }
    }

    /// The same failure, its detail prefixed with where it was found.
    pub fn within(mut self, place: &str) -> Failure {
        self.detail = format!("{place}: {}", self.detail);
        self
    }
}

/// Why the log could not sign or write a checkpoint or a segment.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The checkpoint key file is unreadable or not a key.
    #[error("checkpoint key {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    /// Signing failed.
    #[error("signing a checkpoint: {0}")]
    Sign(String),
    /// A durable write (the key, a segment) failed.
    #[error(transparent)]
    Write(#[from] crate::durable::DurableError),
}

/// What `log verify` reports when everything holds.
#[derive(Debug, Clone, Serialize)]
pub struct LogReport {
    /// Records in the whole log (sealed segments and the database).
    pub records: u64,
    pub counts: chain::Counts,
    pub checkpoints: u64,
    /// The last checkpoint: its number, the records it covers, its time.
    pub last_checkpoint: Option<CheckpointSummary>,
    /// Records after the last checkpoint (covered by the stored head only).
    pub unanchored: u64,
    pub segments: Vec<segment::SegmentReport>,
    pub signer: Option<signer::SignerInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointSummary {
    pub number: u64,
    pub count: u64,
    pub time: u64,
    pub cause: record::CheckpointCause,
}
