//! The bundle index (`index.json`, schema `capsule-gateway/evidence-index/v1`) and
//! its custody signature (`index.sig.json`): one document listing every other file of
//! a bundle with its sha256 and size, plus who ran what under which policy and trust
//! (a trust snapshot, so the bundle still verifies after a key is rotated out), the
//! gateway's version and binary digest, and the tenant's egress mode.
//!
//! Written for every run and for every denial (a denial's bundle holds the decision
//! and digests, never the presented bytes), inside the bundle's [`StagedDir`], so
//! the bundle with its index is whole or absent.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use verify_core::crypto::default_backend;
use verify_core::keys::{KeySnapshot, KeyStore};
use verify_core::{EgressMode, Policy, Sha256Digest};

use super::schema::{nullable, parse_strict};
use super::EvidenceError;
use crate::custody::{sig_name, CustodySigner};
use crate::durable::StagedDir;

pub const INDEX_SCHEMA: &str = "capsule-gateway/evidence-index/v1";
pub const INDEX_FILE: &str = "index.json";
/// `index.sig.json`.
pub fn index_sig_file() -> String {
    sig_name(INDEX_FILE)
}

/// Whether the bundle is a run's or a denial's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexKind {
    Run,
    Denial,
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub schema: String,
    pub kind: IndexKind,
    pub run_id: String,
    /// The runner's SPIFFE ID, when it has one.
    #[serde(deserialize_with = "nullable")]
    pub runner_id: Option<String>,
    /// `null` for a denial whose manifest could not be read.
    #[serde(deserialize_with = "nullable")]
    pub tenant_id: Option<String>,
    /// `sha256:<hex>` of the exact `capsule.jws`; `null` for a denial whose JWS could
    /// not be read.
    #[serde(deserialize_with = "nullable")]
    pub capsule_digest: Option<String>,
    /// `sha256:<hex>` of the policy file's text.
    pub policy_sha256: String,
    /// The policy's `policy_version`.
    pub policy_version: String,
    /// `PolicyDigests::trust_store`: the trust files in force.
    pub trust_store_sha256: String,
    pub trust_snapshot: TrustSnapshot,
    pub gateway: GatewayInfo,
    /// The tenant's `evidence.egress` (`local-only` for a denial without a tenant).
    pub egress_mode: EgressMode,
    /// Every other file of the bundle, sorted by path.
    pub files: Vec<IndexedFile>,
}

/// The keys that vouched for the capsule, as they were when it was admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSnapshot {
    /// The key that verified `capsule.jws` (`null` for a denial before one did).
    #[serde(deserialize_with = "nullable")]
    pub capsule_key: Option<SnapshotJwk>,
    /// The keys that verified the signed approvals, in the order of `approvals/`.
    pub approvers: Vec<SnapshotJwk>,
}

/// A public JWK (ES256), or for an HS256 key only its kid, alg and fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotJwk {
    pub kty: String,
    pub kid: String,
    pub alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// HS256: base64url HMAC-SHA256 of `HS256_FINGERPRINT_MESSAGE` under the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl SnapshotJwk {
    pub fn of(kid: &str, snapshot: &KeySnapshot) -> SnapshotJwk {
        match snapshot {
            KeySnapshot::Es256 { point } => SnapshotJwk {
                kty: "EC".into(),
                kid: kid.into(),
                alg: "ES256".into(),
                crv: Some("P-256".into()),
                x: Some(attest::b64::encode(&point[1..33])),
                y: Some(attest::b64::encode(&point[33..])),
                fingerprint: None,
            },
            KeySnapshot::Hs256 { fingerprint } => SnapshotJwk {
                kty: "oct".into(),
                kid: kid.into(),
                alg: "HS256".into(),
                crv: None,
                x: None,
                y: None,
                fingerprint: Some(attest::b64::encode(fingerprint)),
            },
        }
    }

    /// A trust store of these (ES256) keys, to verify signatures offline. An HS256
    /// snapshot holds no secret and cannot verify anything: it is left out.
    pub fn key_store(keys: &[SnapshotJwk]) -> Result<KeyStore, EvidenceError> {
        let jwks: Vec<serde_json::Value> = keys
            .iter()
            .filter(|k| k.alg == "ES256")
            .map(|k| {
                serde_json::json!({
                    "kty": k.kty, "kid": k.kid, "alg": k.alg,
                    "crv": k.crv, "x": k.x, "y": k.y,
                })
            })
            .collect();
        let text = serde_json::json!({ "keys": jwks }).to_string();
        KeyStore::from_jwks(
            text.as_bytes(),
            std::path::Path::new("index.json trust_snapshot"),
            default_backend(),
        )
        .map_err(|e| EvidenceError::Malformed {
            what: "index.json trust_snapshot".into(),
            detail: e.to_string(),
        })
    }
}

/// The gateway that wrote the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayInfo {
    /// `--version`'s text: crate version and commit.
    pub version: String,
    /// `sha256:<hex>` of the running executable.
    pub binary_sha256: String,
}

/// One file of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexedFile {
    /// Relative to the bundle (`stdout`, `approvals/a.jws`).
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

impl Index {
    pub fn parse(bytes: &[u8]) -> Result<Index, EvidenceError> {
        let index: Index = parse_strict(INDEX_FILE, bytes)?;
        if index.schema != INDEX_SCHEMA {
            return Err(EvidenceError::Malformed {
                what: INDEX_FILE.into(),
                detail: format!("schema `{}` is not `{INDEX_SCHEMA}`", index.schema),
            });
        }
        Ok(index)
    }
}

/// The sha256 of the running executable, read once per process (a failure is kept
/// too: the binary does not change under a running process, and neither does it).
pub fn binary_sha256() -> Result<String, EvidenceError> {
    static DIGEST: OnceLock<Result<String, String>> = OnceLock::new();
    DIGEST
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let bytes = std::fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
            Ok(sha256(&bytes).to_string())
        })
        .clone()
        .map_err(|detail| EvidenceError::Malformed {
            what: "the running executable".into(),
            detail,
        })
}

fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest(default_backend().sha256_oneshot(bytes))
}

/// What an index needs from the policy in force, taken once when the policy is
/// loaded (the service keeps it beside its runs).
#[derive(Debug, Clone)]
pub struct PolicyFacts {
    pub policy_sha256: String,
    pub policy_version: String,
    pub trust_store_sha256: String,
    capsule_keys: HashMap<String, SnapshotJwk>,
    approver_keys: HashMap<String, SnapshotJwk>,
    egress: HashMap<String, EgressMode>,
}

impl PolicyFacts {
    pub fn of(policy: &Policy) -> PolicyFacts {
        let snap = |store: &KeyStore| -> HashMap<String, SnapshotJwk> {
            store
                .kids()
                .filter_map(|kid| store.get(kid))
                .map(|k| (k.kid().to_string(), SnapshotJwk::of(k.kid(), k.snapshot())))
                .collect()
        };
        PolicyFacts {
            policy_sha256: policy.digests.policy.to_string(),
            policy_version: policy.policy_version.clone(),
            trust_store_sha256: policy.digests.trust_store(policy.backend).to_string(),
            capsule_keys: snap(&policy.keys),
            approver_keys: snap(&policy.approvers.keys),
            egress: policy
                .tenants
                .iter()
                .map(|(name, t)| (name.clone(), t.evidence.egress))
                .collect(),
        }
    }

    fn egress(&self, tenant: Option<&str>) -> EgressMode {
        tenant
            .and_then(|t| self.egress.get(t))
            .copied()
            .unwrap_or_default()
    }
}

/// What signs a bundle's index and what it says about the process: one per process
/// (`run`, `admit`, `serve`), shared by every bundle it writes.
#[derive(Debug)]
pub struct Custody {
    pub signer: CustodySigner,
    pub facts: PolicyFacts,
    /// The runner's SPIFFE ID, when it has one.
    pub runner_id: Option<String>,
}

/// The facts of one bundle that the index states besides its files.
#[derive(Debug, Clone)]
pub(crate) struct IndexHead<'a> {
    pub kind: IndexKind,
    pub run_id: &'a str,
    pub tenant_id: Option<&'a str>,
    pub capsule_digest: Option<String>,
    /// The kid that verified the capsule, if one did.
    pub capsule_kid: Option<&'a str>,
    /// The kids that verified its signed approvals.
    pub approver_kids: Vec<&'a str>,
}

/// A bundle being filled: each file is written into the staged directory and
/// remembered for the index.
#[derive(Debug)]
pub(crate) struct IndexedDir {
    staged: StagedDir,
    files: Vec<IndexedFile>,
}

impl IndexedDir {
    pub fn new(staged: StagedDir) -> IndexedDir {
        IndexedDir {
            staged,
            files: Vec::new(),
        }
    }

    /// Writes `path` (0600) and lists it.
    pub fn put(&mut self, path: &str, bytes: &[u8]) -> Result<(), EvidenceError> {
        if let Some((dir, _)) = path.rsplit_once('/') {
            crate::durable::create_dirs(&self.staged.path().join(dir), 0o700)?;
        }
        self.staged.put(path, bytes, 0o600)?;
        self.files.push(IndexedFile {
            path: path.to_string(),
            sha256: sha256(bytes).to_string(),
            size: bytes.len() as u64,
        });
        Ok(())
    }

    /// Writes `index.json` and its signature, then renames the bundle into place.
    pub fn commit(
        mut self,
        custody: &Custody,
        head: IndexHead<'_>,
    ) -> Result<std::path::PathBuf, EvidenceError> {
        self.files.sort();
        let f = &custody.facts;
        let index = Index {
            schema: INDEX_SCHEMA.into(),
            kind: head.kind,
            run_id: head.run_id.into(),
            runner_id: custody.runner_id.clone(),
            tenant_id: head.tenant_id.map(str::to_string),
            capsule_digest: head.capsule_digest,
            policy_sha256: f.policy_sha256.clone(),
            policy_version: f.policy_version.clone(),
            trust_store_sha256: f.trust_store_sha256.clone(),
            trust_snapshot: TrustSnapshot {
                capsule_key: head
                    .capsule_kid
                    .and_then(|k| f.capsule_keys.get(k).cloned()),
                approvers: head
                    .approver_kids
                    .iter()
                    .filter_map(|k| f.approver_keys.get(*k).cloned())
                    .collect(),
            },
            gateway: GatewayInfo {
                version: crate::VERSION.into(),
                binary_sha256: binary_sha256()?,
            },
            egress_mode: f.egress(head.tenant_id),
            files: self.files,
        };
        let mut bytes = serde_json::to_vec_pretty(&index).unwrap_or_default();
        bytes.push(b'\n');
        let sig = custody
            .signer
            .sign(&bytes)
            .map_err(|e| EvidenceError::Sign(Box::new(e)))?;
        self.staged.put(INDEX_FILE, &bytes, 0o600)?;
        self.staged.put(index_sig_file(), &sig.to_bytes(), 0o600)?;
        Ok(self.staged.commit()?)
    }
}
