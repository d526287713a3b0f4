//! Sealed segments: the records of a closed stretch of the log, moved out of the
//! database into one append-never file that ends in the checkpoint sealing it.
//!
//! `STATE/log/segment-<8 digits>.jsonl`: one record per line (its exact stored
//! bytes; compact JSON holds no newline), then the sealing checkpoint's bytes, then
//! its signature document. Written whole or not at all (`durable::write_new`) after
//! the commit that seals it and before its records leave the database
//! (`crate::state`'s upkeep).

use std::path::{Path, PathBuf};

use super::chain::{Counts, Link, Walker};
use super::record::Checkpoint;
use super::signer::{self, Expect, SignerInfo};
use super::{Failure, FailureCode};

/// The log directory inside a state directory.
pub const LOG_DIR: &str = "log";

pub fn file_name(segment: u64) -> String {
    format!("segment-{segment:08}.jsonl")
}

pub fn path(log_dir: &Path, segment: u64) -> PathBuf {
    log_dir.join(file_name(segment))
}

/// A segment's number, from its file name.
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("segment-")?.strip_suffix(".jsonl")?;
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The bytes of a sealed segment file, built as its records are read (no copy of
/// each record on the way).
#[derive(Debug)]
pub struct Encoder {
    out: Vec<u8>,
}

impl Encoder {
    /// `bytes`: about how large the file will be.
    pub fn with_capacity(bytes: usize) -> Encoder {
        Encoder {
            out: Vec::with_capacity(bytes),
        }
    }

    /// The next record's exact stored bytes (compact JSON: no newline inside).
    pub fn record(&mut self, record: &[u8]) {
        self.out.extend_from_slice(record);
        self.out.push(b'\n');
    }

    /// The file: the records, then the sealing checkpoint, then its signature.
    pub fn seal(mut self, checkpoint: &[u8], sig: &[u8]) -> Vec<u8> {
        self.out.extend_from_slice(checkpoint);
        self.out.push(b'\n');
        self.out.extend_from_slice(sig);
        self.out.push(b'\n');
        self.out
    }
}

/// What a segment verified on its own holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentReport {
    pub segment: u64,
    pub first: u64,
    pub records: u64,
    pub counts: Counts,
    pub checkpoint: u64,
    pub signer: SignerInfo,
    /// The sealing checkpoint's exact bytes, to compare with the database's copy.
    #[serde(skip)]
    pub checkpoint_bytes: Vec<u8>,
    #[serde(skip)]
    pub sealed: Checkpoint,
}

/// Verifies one segment file's bytes alone: the sealing checkpoint's signature, then
/// every record from the checkpoint's `segment_first`/`segment_prev` to its head.
pub fn verify(bytes: &[u8], expect: &Expect) -> Result<SegmentReport, Failure> {
    let bad = |detail: String| Failure::new(FailureCode::SegmentInvalid, detail);
    let body = bytes
        .strip_suffix(b"\n")
        .ok_or_else(|| bad("the segment does not end in a newline (truncated)".into()))?;
    let mut lines: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
    let (Some(sig), Some(cp_bytes)) = (lines.pop(), lines.pop()) else {
        return Err(bad("the segment has no sealing checkpoint".into()));
    };
    let cp = Checkpoint::parse(cp_bytes)
        .map_err(|e| bad(format!("the sealing checkpoint is unreadable: {e}")))?;
    let signer = signer::verify(cp_bytes, sig, expect).map_err(|why| {
        Failure::new(
            FailureCode::CheckpointSignatureInvalid,
            format!("segment {}: checkpoint {}: {why}", cp.segment, cp.number),
        )
    })?;
    if !cp.seals {
        return Err(bad(format!(
            "segment {}: its last checkpoint ({}) does not seal it",
            cp.segment, cp.number
        )));
    }
    let prev = verify_core::Sha256Digest::parse(&cp.segment_prev)
        .ok_or_else(|| bad("the checkpoint's segment_prev is not a digest".into()))?;
    let head = verify_core::Sha256Digest::parse(&cp.head)
        .ok_or_else(|| bad("the checkpoint's head is not a digest".into()))?;
    let checks = std::collections::BTreeMap::from([(cp.count, (head.0, cp.number))]);
    let mut walk = Walker::new(
        Link {
            count: cp.segment_first,
            last: prev.0,
        },
        &checks,
        true,
    );
    for line in &lines {
        let link: super::record::RecordLink = serde_json::from_slice(line).map_err(|e| {
            Failure::new(
                FailureCode::RecordEdited,
                format!("segment {}: a line is not a record: {e}", cp.segment),
            )
        })?;
        walk.step(link.seq, line)
            .map_err(|f| f.within(&format!("segment {}", cp.segment)))?;
    }
    let end = walk.at();
    if end.count != cp.count {
        return Err(Failure::new(
            FailureCode::LogTruncated,
            format!(
                "segment {}: ends at record {}, but its sealing checkpoint {} covers {} \
                 records (records were removed)",
                cp.segment, end.count, cp.number, cp.count
            ),
        ));
    }
    Ok(SegmentReport {
        segment: cp.segment,
        first: cp.segment_first,
        records: cp.count - cp.segment_first,
        counts: walk.counts,
        checkpoint: cp.number,
        signer,
        checkpoint_bytes: cp_bytes.to_vec(),
        sealed: cp,
    })
}
