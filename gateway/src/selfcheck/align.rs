//! Alignment: the sha256 of the running gateway binary, of the policy file and of the
//! trust store in force (`PolicyDigests::trust_store`) equal those in a signed
//! deployment manifest (`capsule-gateway align sign`): `ALIGNED`, else `DRIFT` naming
//! each field that differs. A manifest whose signature does not verify with the
//! configured key is its own failure, never `ALIGNED`.
//!
//! The manifest is a compact JWS (the same strict verifier and signer as capsules)
//! whose payload is [`DeploymentManifest`]; its own `schema` keeps it from being taken
//! for a capsule manifest and the other way round.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use verify_core::crypto::{default_backend, Backend};
use verify_core::keys::{parse_jwk, KeyStore, SigningKey};
use verify_core::Sha256Digest;

use super::{Report, Target};
use crate::admission::load_policy;
use crate::sealed::SealedKeys;

pub const DEPLOYMENT_SCHEMA: &str = "capsule-gateway/deployment/v1";
/// A deployment manifest is a few hundred bytes.
const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// The signed payload: what this deployment is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentManifest {
    pub schema: String,
    /// `sha256:` of the gateway binary.
    pub binary: String,
    /// `sha256:` of the policy file's bytes.
    pub policy: String,
    /// `PolicyDigests::trust_store` of the trust files the policy loads.
    pub trust_store: String,
    /// When it was signed (Unix seconds).
    pub signed_at: u64,
}

/// Why a manifest could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AlignError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the policy: {0}")]
    Policy(#[source] crate::GatewayError),
    #[error("{}: {detail}", path.display())]
    Key { path: PathBuf, detail: String },
    #[error("manifest key {}: {source}", path.display())]
    TrustKey {
        path: PathBuf,
        #[source]
        source: verify_core::ConfigError,
    },
    #[error("signing: {0}")]
    Sign(#[source] verify_core::jws::SignError),
    /// The signature does not verify with the configured key.
    #[error("{}: the signature does not verify with the manifest key: {reason} ({detail})", path.display())]
    Signature {
        path: PathBuf,
        reason: verify_core::Reason,
        detail: String,
    },
    #[error("{}: not a deployment manifest: {detail}", path.display())]
    Malformed { path: PathBuf, detail: String },
    #[error("writing the manifest: {0}")]
    Write(#[from] crate::durable::DurableError),
}

/// What this host runs, measured now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured {
    pub binary: Sha256Digest,
    pub policy: Sha256Digest,
    pub trust_store: Sha256Digest,
}

/// The running binary (Linux's `/proc/self/exe`, which names the file this process
/// was started from, even if a path to it changed since).
pub fn running_binary() -> PathBuf {
    PathBuf::from("/proc/self/exe")
}

/// sha256 of a file, streamed.
pub fn file_digest(path: &Path, backend: &dyn Backend) -> Result<Sha256Digest, AlignError> {
    let io = |source| AlignError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = backend.sha256();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256Digest(h.finish()))
}

/// Measures the binary, and the policy and trust store as admissions load them.
pub fn measure(
    policy: &Path,
    tcti: Option<&str>,
    binary: Option<&Path>,
) -> Result<Measured, AlignError> {
    let mut sealed = SealedKeys::lazy(tcti);
    let loaded = load_policy(policy, &mut sealed).map_err(AlignError::Policy)?;
    let backend = loaded.backend;
    let binary = binary.map_or_else(running_binary, Path::to_path_buf);
    Ok(Measured {
        binary: file_digest(&binary, backend)?,
        policy: loaded.digests.policy,
        trust_store: loaded.digests.trust_store(backend),
    })
}

/// `align sign`: the manifest of `measured`, signed with the private JWK at `key`,
/// written durably at `out` (an existing file is not replaced).
pub fn sign(measured: &Measured, key: &Path, out: &Path, now: u64) -> Result<(), AlignError> {
    let backend = default_backend();
    let bad = |detail: String| AlignError::Key {
        path: key.to_path_buf(),
        detail,
    };
    let bytes = crate::pack::read_bounded(key, 64 * 1024).map_err(|e| bad(e.to_string()))?;
    let jwk = parse_jwk(&bytes).map_err(|e| bad(format!("{}: {}", e.field, e.message)))?;
    let signer = SigningKey::from_jwk(&jwk, backend).map_err(|e| bad(e.to_string()))?;
    let payload = DeploymentManifest {
        schema: DEPLOYMENT_SCHEMA.into(),
        binary: measured.binary.to_string(),
        policy: measured.policy.to_string(),
        trust_store: measured.trust_store.to_string(),
        signed_at: now,
    };
    let payload = serde_json::to_vec(&payload).map_err(|e| bad(e.to_string()))?;
    let jws = verify_core::jws::sign_compact(&jwk.kid, jwk.alg, &payload, &signer)
        .map_err(AlignError::Sign)?;
    crate::durable::write_new(out, jws.as_bytes(), 0o644)?;
    Ok(())
}

/// Reads `manifest` and verifies its signature with the JWKS at `key`.
pub fn open(manifest: &Path, key: &Path) -> Result<DeploymentManifest, AlignError> {
    let backend = default_backend();
    let keys = KeyStore::load(key, backend).map_err(|source| AlignError::TrustKey {
        path: key.to_path_buf(),
        source,
    })?;
    let bytes = crate::pack::read_bounded(manifest, MAX_MANIFEST_BYTES).map_err(|e| {
        AlignError::Malformed {
            path: manifest.to_path_buf(),
            detail: e.to_string(),
        }
    })?;
    let trimmed = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let verified = verify_core::jws::verify(trimmed, &keys, MAX_MANIFEST_BYTES).map_err(|f| {
        AlignError::Signature {
            path: manifest.to_path_buf(),
            reason: f.reason,
            detail: f.detail,
        }
    })?;
    let m: DeploymentManifest =
        serde_json::from_slice(&verified.payload).map_err(|e| AlignError::Malformed {
            path: manifest.to_path_buf(),
            detail: e.to_string(),
        })?;
    if m.schema != DEPLOYMENT_SCHEMA {
        return Err(AlignError::Malformed {
            path: manifest.to_path_buf(),
            detail: format!("schema `{}`, expected `{DEPLOYMENT_SCHEMA}`", m.schema),
        });
    }
    Ok(m)
}

/// The fields of `manifest` that differ from `measured`, each as
/// `field (manifest X, running Y)`.
pub fn drift(manifest: &DeploymentManifest, measured: &Measured) -> Vec<String> {
    [
        ("binary", &manifest.binary, measured.binary),
        ("policy", &manifest.policy, measured.policy),
        ("trust_store", &manifest.trust_store, measured.trust_store),
    ]
    .into_iter()
    .filter(|(_, signed, now)| **signed != now.to_string())
    .map(|(field, signed, now)| format!("{field} (manifest {signed}, running {now})"))
    .collect()
}

pub fn check(target: &Target<'_>, report: &mut Report) {
    const NAME: &str = "alignment";
    let Some(a) = &target.alignment else {
        return report.notice(
            NAME,
            "no deployment manifest configured ([selfcheck] manifest)",
        );
    };
    let manifest = match open(&a.manifest, &a.key) {
        Ok(m) => m,
        Err(e) => return report.fail(NAME, format!("manifest not trusted: {e}")),
    };
    let measured = match measure(
        &target.policy,
        target.tcti.as_deref(),
        target.binary.as_deref(),
    ) {
        Ok(m) => m,
        Err(e) => return report.fail(NAME, format!("measuring: {e}")),
    };
    let drift = drift(&manifest, &measured);
    if drift.is_empty() {
        report.pass(
            NAME,
            format!(
                "ALIGNED: binary {}, policy {}, trust_store {}",
                measured.binary, measured.policy, measured.trust_store
            ),
        );
    } else {
        report.fail(NAME, format!("DRIFT: {}", drift.join("; ")));
    }
}
