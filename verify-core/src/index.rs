//! The tenant index (fleet freshness, after TUF's timestamp and snapshot roles):
//! a compact ES256 JWS by one of the tenant's index keys over
//! `{"schema":"capsule-index/v1", "tenant", "version", "issued_at", "expires_at",
//! "capsules": [{"capsule_id", "version", "digest"}]}`.
//!
//! A runner refuses an index that is expired or older than one it has seen
//! (`index_stale`), and a capsule below the index's entry for its id (`superseded`):
//! so a runner with empty state cannot be rolled back or frozen either.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::decision::{Alg, Sha256Digest};
use crate::policy::Policy;

pub const INDEX_SCHEMA: &str = "capsule-index/v1";
/// An index lists a fleet's capsules: bounded, but not tiny.
pub const MAX_INDEX_BYTES: usize = 4 << 20;

/// The index payload (wire type).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IndexPayload {
    pub schema: String,
    pub tenant: String,
    pub version: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    pub capsules: Vec<IndexEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    pub capsule_id: String,
    pub version: u64,
    /// `sha256:` of the capsule's exact JWS bytes.
    pub digest: String,
}

/// An index whose signature verified under one of its tenant's index keys.
#[derive(Debug, Clone)]
pub struct TenantIndex {
    pub tenant: String,
    pub version: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    pub kid: String,
    /// capsule_id -> (version, digest) the index names.
    entries: HashMap<String, (u64, Sha256Digest)>,
}

/// Why an index file was refused before any capsule is looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("index signature: {detail} ({reason})")]
    Signature {
        reason: crate::decision::Reason,
        detail: String,
    },
    #[error("index payload: {0}")]
    Payload(String),
    #[error("tenant `{0}` is not in the policy")]
    TenantUnknown(String),
    #[error("key `{kid}` may not sign the index of tenant `{tenant}` (its `index.keys`)")]
    KeyNotAllowed { kid: String, tenant: String },
}

impl TenantIndex {
    /// Verifies an index: signature by a trust-store key, the key one of the named
    /// tenant's `index.keys`, the payload strict. Freshness is judged per admission
    /// (it needs the clock and the state), not here.
    pub fn verify(jws: &[u8], policy: &Policy) -> Result<TenantIndex, IndexError> {
        let jws = jws.strip_suffix(b"\n").unwrap_or(jws);
        let v = crate::jws::verify(jws, &policy.keys, MAX_INDEX_BYTES).map_err(|f| {
            IndexError::Signature {
                reason: f.reason,
                detail: f.detail,
            }
        })?;
        let p: IndexPayload = crate::json::from_slice_strict(&v.payload)
            .map_err(|e| IndexError::Payload(e.to_string()))?;
        if p.schema != INDEX_SCHEMA {
            return Err(IndexError::Payload(format!(
                "schema must be `{INDEX_SCHEMA}`"
            )));
        }
        let tenant = policy
            .tenants
            .get(&p.tenant)
            .ok_or_else(|| IndexError::TenantUnknown(p.tenant.clone()))?;
        let allowed = tenant
            .index
            .as_ref()
            .is_some_and(|ix| ix.keys.contains(&v.kid));
        if !allowed || v.alg != Alg::Es256 {
            return Err(IndexError::KeyNotAllowed {
                kid: v.kid,
                tenant: p.tenant,
            });
        }
        if p.expires_at <= p.issued_at {
            return Err(IndexError::Payload(
                "expires_at must be after issued_at".into(),
            ));
        }
        let mut entries = HashMap::with_capacity(p.capsules.len());
        for (i, e) in p.capsules.into_iter().enumerate() {
            let digest = Sha256Digest::parse(&e.digest).ok_or_else(|| {
                IndexError::Payload(format!(
                    "capsules[{i}].digest: {}",
                    crate::manifest::NOT_A_DIGEST
                ))
            })?;
            if entries
                .insert(e.capsule_id.clone(), (e.version, digest))
                .is_some()
            {
                return Err(IndexError::Payload(format!(
                    "capsules[{i}]: `{}` is listed twice",
                    e.capsule_id.escape_debug()
                )));
            }
        }
        Ok(TenantIndex {
            tenant: p.tenant,
            version: p.version,
            issued_at: p.issued_at,
            expires_at: p.expires_at,
            kid: v.kid,
            entries,
        })
    }

    /// The version and digest the index names for `capsule_id`.
    pub fn entry(&self, capsule_id: &str) -> Option<(u64, Sha256Digest)> {
        self.entries.get(capsule_id).copied()
    }

    /// Freshness (`index_stale`): not expired (with the policy's skew), and not older
    /// than the highest version this runner has seen for the tenant.
    pub fn check_fresh(
        &self,
        now: u64,
        skew: u64,
        highest_seen: Option<u64>,
    ) -> Result<(), StaleIndexError> {
        if now >= self.expires_at.saturating_add(skew) {
            return Err(StaleIndexError::Expired {
                version: self.version,
                tenant: self.tenant.clone(),
                expires_at: self.expires_at,
                now,
            });
        }
        if let Some(seen) = highest_seen.filter(|s| self.version < *s) {
            return Err(StaleIndexError::Older {
                version: self.version,
                tenant: self.tenant.clone(),
                seen,
            });
        }
        Ok(())
    }

    /// Supersession (`superseded`): the index names a higher version of this capsule,
    /// or other bytes under this same version.
    pub fn check_current(
        &self,
        capsule_id: &str,
        version: u64,
        digest: Sha256Digest,
    ) -> Result<(), SupersededError> {
        match self.entry(capsule_id) {
            Some((v, _)) if version < v => Err(SupersededError::Newer {
                index_version: self.version,
                capsule_id: capsule_id.to_string(),
                listed: v,
                version,
            }),
            Some((v, d)) if version == v && digest != d => Err(SupersededError::OtherBytes {
                index_version: self.version,
                capsule_id: capsule_id.to_string(),
                version,
                listed: d,
            }),
            _ => Ok(()),
        }
    }
}

/// Why the tenant index is not fresh (`index_stale`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StaleIndexError {
    /// Past `expires_at` plus the policy's clock skew.
    #[error("tenant index version {version} of `{tenant}` expired at {expires_at} (now {now})")]
    Expired {
        version: u64,
        tenant: String,
        expires_at: u64,
        now: u64,
    },
    /// Below the highest index version this runner has seen for the tenant.
    #[error(
        "tenant index version {version} of `{tenant}` is older than version {seen} already seen"
    )]
    Older {
        version: u64,
        tenant: String,
        seen: u64,
    },
}

/// Why the tenant index says this capsule is not the current one (`superseded`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SupersededError {
    /// The index lists a higher version of the capsule.
    #[error("tenant index version {index_version} lists `{capsule_id}` at version {listed}; this is version {version}")]
    Newer {
        index_version: u64,
        capsule_id: String,
        listed: u64,
        version: u64,
    },
    /// The index lists other bytes (`listed`, a digest) under this same version.
    #[error("tenant index version {index_version} lists other bytes ({listed}) for `{capsule_id}` version {version}")]
    OtherBytes {
        index_version: u64,
        capsule_id: String,
        version: u64,
        listed: Sha256Digest,
    },
}
