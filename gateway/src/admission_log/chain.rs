//! The hash chain: walking records in order from a known link, checking each
//! record's position and link, and each checkpoint's head on the way. One walker for
//! start-up (what follows the last checkpoint), `log verify` (everything) and a
//! segment verified on its own.

use std::collections::BTreeMap;

use verify_core::Sha256Digest;

use super::record::{check_schema, RecordLink};
use super::{Failure, FailureCode};

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    verify_core::crypto::default_backend().sha256_oneshot(bytes)
}

/// Where a walk starts or ends: the next record's `seq`, and the sha256 of the record
/// before it (zeros at the very start of the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub count: u64,
    pub last: [u8; 32],
}

impl Link {
    pub const START: Link = Link {
        count: 0,
        last: [0; 32],
    };
}

/// Records seen by kind, for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub admit: u64,
    pub deny: u64,
    pub denials_suppressed: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.admit += other.admit;
        self.deny += other.deny;
        self.denials_suppressed += other.denials_suppressed;
    }
}

/// A walk in progress.
#[derive(Debug)]
pub struct Walker<'a> {
    at: Link,
    /// count → the head a checkpoint says record `count - 1` hashes to (and the
    /// checkpoint's number, for the message).
    checks: &'a BTreeMap<u64, ([u8; 32], u64)>,
    /// Check every record against the schema (`log verify`), not only its link.
    schema: bool,
    pub counts: Counts,
}

impl<'a> Walker<'a> {
    pub fn new(start: Link, checks: &'a BTreeMap<u64, ([u8; 32], u64)>, schema: bool) -> Self {
        Walker {
            at: start,
            checks,
            schema,
            counts: Counts::default(),
        }
    }

    pub fn at(&self) -> Link {
        self.at
    }

    /// The record stored under `key`, its exact bytes.
    pub fn step(&mut self, key: u64, bytes: &[u8]) -> Result<(), Failure> {
        let expect = self.at.count;
        if key > expect {
            return Err(Failure::new(
                FailureCode::RecordMissing,
                format!("admission log: record {expect} is missing"),
            ));
        }
        if key < expect {
            return Err(Failure::new(
                FailureCode::RecordOutOfOrder,
                format!(
                    "admission log: record {key} appears after record {}",
                    expect - 1
                ),
            ));
        }
        let link: RecordLink = serde_json::from_slice(bytes).map_err(|e| {
            Failure::new(
                FailureCode::RecordEdited,
                format!("admission log: record {key} is not a record: {e}"),
            )
        })?;
        if link.seq != key {
            return Err(Failure::new(
                FailureCode::RecordOutOfOrder,
                format!(
                    "admission log: record {key} holds the record of seq {} (records were \
                     reordered)",
                    link.seq
                ),
            ));
        }
        if link.prev != Sha256Digest(self.at.last).to_string() {
            return Err(Failure::new(
                FailureCode::RecordEdited,
                format!(
                    "admission log: record {key} does not chain to its predecessor \
                     (record {key} or the one before it was changed)"
                ),
            ));
        }
        if self.schema {
            let kind = check_schema(bytes).map_err(|e| {
                Failure::new(
                    FailureCode::RecordEdited,
                    format!("admission log: record {key} does not fit the record schema: {e}"),
                )
            })?;
            match kind {
                "admit" => self.counts.admit += 1,
                "deny" => self.counts.deny += 1,
                _ => self.counts.denials_suppressed += 1,
            }
        }
        let hash = sha256(bytes);
        self.at = Link {
            count: key + 1,
            last: hash,
        };
        if let Some((head, number)) = self.checks.get(&self.at.count) {
            if *head != hash {
                return Err(Failure::new(
                    FailureCode::RecordEdited,
                    format!(
                        "admission log: record {key} was changed: it does not hash to the \
                         head of signed checkpoint {number}"
                    ),
                ));
            }
        }
        Ok(())
    }
}
