//! The admission log's wire types: each record and each checkpoint is one compact
//! JSON document whose exact bytes are hashed (records chain by the sha256 of the
//! previous record's bytes) and signed (a checkpoint's bytes), never re-serialised.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `schema` of a checkpoint.
pub const CHECKPOINT_SCHEMA: &str = "capsule-gateway/log-checkpoint/v1";

/// One record of the admission log, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogRecord {
    /// An admission, in the transaction that raised the anti-rollback version.
    Admit(AdmitRecord),
    /// A denial: the reason code and the digest of the presented JWS, nothing of the
    /// presented bytes themselves (their manifest fields are unverified).
    Deny(DenyRecord),
    /// Denials beyond the per-process denial budget, counted instead of recorded
    /// one by one (docs/state.md, "A denial flood").
    DenialsSuppressed(SuppressedRecord),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitRecord {
    pub seq: u64,
    pub prev: String,
    pub capsule_digest: String,
    pub tenant: String,
    pub capsule_id: String,
    pub version: u64,
    pub kid: Option<String>,
    pub policy_version: String,
    pub approvers: Vec<String>,
    pub admitted_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyRecord {
    pub seq: u64,
    pub prev: String,
    /// The stable snake_case reason code.
    pub reason: String,
    /// `sha256:` of the exact JWS bytes; absent when they could not be read.
    pub capsule_digest: Option<String>,
    pub policy_version: String,
    pub denied_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressedRecord {
    pub seq: u64,
    pub prev: String,
    /// Denials not recorded one by one since the previous such record.
    pub count: u64,
    /// reason code → how many of them.
    pub reasons: BTreeMap<String, u64>,
    pub first_at: u64,
    pub last_at: u64,
}

/// A record written before records were typed (an admission, without `kind`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "read to check the schema, fields kept for Debug")]
struct LegacyAdmit {
    seq: u64,
    prev: String,
    capsule_digest: String,
    tenant: String,
    capsule_id: String,
    version: u64,
    kid: Option<String>,
    policy_version: String,
    approvers: Vec<String>,
    admitted_at: u64,
}

/// What the chain needs of any record: its position and its link.
#[derive(Debug, Clone, Deserialize)]
pub struct RecordLink {
    pub seq: u64,
    pub prev: String,
}

impl LogRecord {
    pub fn seq(&self) -> u64 {
        match self {
            LogRecord::Admit(r) => r.seq,
            LogRecord::Deny(r) => r.seq,
            LogRecord::DenialsSuppressed(r) => r.seq,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            LogRecord::Admit(_) => "admit",
            LogRecord::Deny(_) => "deny",
            LogRecord::DenialsSuppressed(_) => "denials_suppressed",
        }
    }

    /// The record's bytes as they are stored and hashed.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Checks a stored record against the schema (current, or an admission written
/// before records were typed); returns its kind.
pub fn check_schema(bytes: &[u8]) -> Result<&'static str, serde_json::Error> {
    match serde_json::from_slice::<LogRecord>(bytes) {
        Ok(r) => Ok(r.kind()),
        Err(e) => match serde_json::from_slice::<LegacyAdmit>(bytes) {
            Ok(_) => Ok("admit"),
            Err(_) => Err(e),
        },
    }
}

/// Why a checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointCause {
    /// Every `checkpoint_every` records.
    Interval,
    /// The end of a CLI batch (`admit`, `run`).
    Batch,
    /// `serve`'s graceful stop.
    Shutdown,
}

/// A signed statement of the log's head: "this state's log held `count` records, the
/// last one hashing to `head`, at `time`". Its exact bytes are signed
/// (`<name>.sig.json` beside it in a segment file, a column beside it in redb).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub schema: String,
    pub state_id: String,
    /// 0, 1, 2, ... over the life of the state.
    pub number: u64,
    /// `sha256:` of the previous checkpoint's bytes (`None` for number 0): removing
    /// or reordering checkpoints breaks this chain.
    pub prev_checkpoint: Option<String>,
    /// Records in the whole log so far: the next record's `seq`.
    pub count: u64,
    /// `sha256:` of record `count - 1` (64 zeros when the log is empty).
    pub head: String,
    pub time: u64,
    pub cause: CheckpointCause,
    /// The segment the head falls in, its first record and the link that record
    /// chains from (the previous segment's head).
    pub segment: u64,
    pub segment_first: u64,
    pub segment_prev: String,
    /// This checkpoint closes its segment: the segment's records were moved into a
    /// sealed file ending in it.
    pub seals: bool,
}

impl Checkpoint {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(bytes: &[u8]) -> Result<Checkpoint, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_unknown_fields_are_refused() {
        let r = LogRecord::Deny(DenyRecord {
            seq: 3,
            prev: "sha256:00".into(),
            reason: "signature_invalid".into(),
            capsule_digest: Some("sha256:ab".into()),
            policy_version: "p1".into(),
            denied_at: 7,
        });
        let bytes = r.to_bytes();
        assert_eq!(check_schema(&bytes).expect("schema"), "deny");
        assert_eq!(
            serde_json::from_slice::<LogRecord>(&bytes).expect("parse"),
            r
        );
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        v["detail"] = "presented text".into();
        assert!(check_schema(&serde_json::to_vec(&v).expect("json")).is_err());
    }

    #[test]
    fn an_untyped_admission_record_of_an_older_state_still_checks() {
        let old = serde_json::json!({
            "seq": 0, "prev": "sha256:00", "capsule_digest": "sha256:ab", "tenant": "t",
            "capsule_id": "c", "version": 1, "kid": "k", "policy_version": "p",
            "approvers": [], "admitted_at": 1,
        });
        assert_eq!(
            check_schema(&serde_json::to_vec(&old).expect("json")).expect("legacy"),
            "admit"
        );
    }
}
