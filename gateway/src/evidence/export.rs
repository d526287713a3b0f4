//! `evidence export`: the part of a bundle that may leave the host under an egress
//! mode, in a directory that still verifies (docs/evidence.md,
//! `capsule-gateway/evidence-export/v1`):
//!
//! - `export.json` lists every file the bundle's index lists, once, as `included`
//!   (copied verbatim: the index's digest holds), `masked` (rewritten by the
//!   tenant's rules: its own `sha256`/`size` beside the index's original, and the
//!   patterns that matched) or `withheld` (absent); `export.sig.json` signs it,
//!   by the custody signer that signed the index (checked before anything is
//!   written);
//! - `index.json` and `index.sig.json` copied verbatim, except under `local-only`,
//!   whose export is `export.json` alone: nothing but the signed index's digest.
//!
//! What each mode lets out: `local-only` nothing; `metadata-only` the index (ids
//! and digests) and no bundle file; `sanitized` every file, those a rule matches
//! masked. A file that still matches a rule after masking (a pattern that matches
//! its own replacement, a match across JSON syntax) is withheld: a masked secret
//! never leaves. The export is staged and renamed into place, whole or absent, and
//! never over an existing directory.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use verify_core::EgressMode;

use super::egress::{permissiveness, EgressRules, Hits, MaskRules};
use super::EvidenceError;
use crate::custody::{
    verify_custody, CustodyError, CustodyExpect, CustodySignature, CustodySigner,
};
use crate::durable::{create_dirs, DurableError, StagedDir};

/// `export.json`'s `schema`.
pub const EXPORT_SCHEMA: &str = "capsule-gateway/evidence-export/v1";

/// `export.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportManifest {
    pub schema: String,
    pub mode: EgressMode,
    pub run_id: String,
    /// `sha256:<hex>` of the bundle's `index.json` bytes.
    pub index_sha256: String,
    /// One entry per file of the index, in the index's order.
    pub files: Vec<ExportFile>,
}

impl ExportManifest {
    pub fn parse(bytes: &[u8]) -> Result<ExportManifest, EvidenceError> {
        super::schema::parse_strict("export.json", bytes)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    /// Present, copied verbatim: the index's digest is its digest.
    Included,
    /// Present, rewritten by the masking rules: `sha256`/`size` are its own.
    Masked,
    /// Absent.
    Withheld,
}

/// One file of the index, as the export has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFile {
    pub path: String,
    pub status: FileStatus,
    /// `masked` only: of the masked bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// `masked` only: the patterns that matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_by: Option<Vec<String>>,
}

/// What export reads of the index (custody owns its schema; members it does not
/// use are not refused here, `evidence verify` reads it strictly).
#[derive(Debug, Deserialize)]
struct IndexView {
    run_id: String,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    egress_mode: Option<EgressMode>,
    files: Vec<IndexFile>,
}

#[derive(Debug, Deserialize)]
struct IndexFile {
    path: String,
    sha256: String,
    size: u64,
}

/// Why an export was refused or not written (nothing is left at `--out`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// A mode that lets more leave than the tenant's.
    #[error("egress mode {requested} is more permissive than tenant {tenant}'s {allowed}")]
    TooPermissive {
        requested: EgressMode,
        allowed: EgressMode,
        tenant: String,
    },
    /// The bundle has no index, or an index that is not one.
    #[error("{}: {detail}", bundle.display())]
    Index { bundle: PathBuf, detail: String },
    /// A file does not match the index: the bundle was changed after it was written.
    #[error("{}: {path} does not match the index ({detail})", bundle.display())]
    Mismatch {
        bundle: PathBuf,
        path: String,
        detail: String,
    },
    #[error(transparent)]
    Read(#[from] EvidenceError),
    #[error("export: {0}")]
    Write(#[from] DurableError),
    /// `index.sig.json` is missing or does not hold over `index.json`.
    #[error("{}: index.sig.json: {detail}", bundle.display())]
    IndexSignature { bundle: PathBuf, detail: String },
    /// The signer at hand is not the one that signed the index: `evidence verify`
    /// requires one signer for both.
    #[error("{}: the index was signed by key {index}, this signer is {signer}", bundle.display())]
    OtherSigner {
        bundle: PathBuf,
        index: String,
        signer: String,
    },
    /// The custody signer refused to sign `export.json`.
    #[error("signing export.json: {0}")]
    Sign(#[source] CustodyError),
}

impl ExportError {
    /// A refused mode, a missing or malformed index and an existing `--out` are the
    /// operator's to fix (exit 2); a bundle that does not match its index, or a
    /// failed write, is a runtime failure.
    pub fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            ExportError::TooPermissive { .. }
            | ExportError::Index { .. }
            | ExportError::OtherSigner { .. }
            | ExportError::Write(DurableError::Exists { .. }) => ErrorClass::Usage,
            ExportError::Read(EvidenceError::Malformed { .. }) => ErrorClass::Usage,
            ExportError::Mismatch { .. }
            | ExportError::IndexSignature { .. }
            | ExportError::Read(_)
            | ExportError::Write(_)
            | ExportError::Sign(_) => ErrorClass::Runtime,
        }
    }
}

/// An index path as a relative path inside the bundle (no `..`, not absolute, not
/// one of the index's own files).
fn bundle_path(bundle: &Path, path: &str) -> Result<PathBuf, ExportError> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !matches!(
            path,
            "index.json" | "index.sig.json" | "export.json" | "export.sig.json"
        );
    if !ok {
        return Err(ExportError::Index {
            bundle: bundle.to_path_buf(),
            detail: format!("index lists `{path}`, not a file of the bundle"),
        });
    }
    Ok(p.to_path_buf())
}

/// What sanitizing one file gives.
enum Sanitized {
    Verbatim,
    Masked(Vec<u8>, Hits),
    Withheld,
}

fn sanitize(name: &str, bytes: &[u8], rules: &MaskRules) -> Sanitized {
    if !rules.matches(bytes) {
        return Sanitized::Verbatim;
    }
    // JSON files are masked in their string values, so they stay JSON.
    if name.ends_with(".json") {
        if let Ok(mut v) = serde_json::from_slice::<Value>(bytes) {
            let mut hits = Hits::new();
            rules.mask_json(&mut v, &mut hits);
            if let Ok(out) = serde_json::to_vec_pretty(&v) {
                if !rules.matches(&out) {
                    return Sanitized::Masked(out, hits);
                }
            }
        }
    }
    let mut hits = Hits::new();
    let out = rules.mask_bytes(bytes, &mut hits);
    if rules.matches(&out) {
        return Sanitized::Withheld;
    }
    Sanitized::Masked(out, hits)
}

fn read_required(bundle: &Path, rel: &Path) -> Result<Vec<u8>, ExportError> {
    super::read::optional(&bundle.join(rel))?.ok_or_else(|| ExportError::Mismatch {
        bundle: bundle.to_path_buf(),
        path: rel.display().to_string(),
        detail: "missing".into(),
    })
}

/// Checks `index.sig.json` over the index's bytes and that `signer` is the key that
/// made it.
fn check_index_signer(
    bundle: &Path,
    index: &[u8],
    sig: Option<&[u8]>,
    signer: &CustodySigner,
) -> Result<(), ExportError> {
    let refused = |detail: String| ExportError::IndexSignature {
        bundle: bundle.to_path_buf(),
        detail,
    };
    let sig = sig.ok_or_else(|| refused("missing".into()))?;
    let sig = CustodySignature::parse(sig).map_err(|e| refused(e.to_string()))?;
    let info = verify_custody(index, &sig, &CustodyExpect::default())
        .map_err(|e| refused(e.to_string()))?;
    if info.key_thumbprint != signer.key_thumbprint() {
        return Err(ExportError::OtherSigner {
            bundle: bundle.to_path_buf(),
            index: info.key_thumbprint,
            signer: signer.key_thumbprint(),
        });
    }
    Ok(())
}

/// Writes the export of `bundle` under `mode` (default: the tenant's) to `out`,
/// which must not exist, and signs `export.json` with `signer` (the one that signed
/// the bundle's index: checked first). Returns what `export.json` says.
pub fn export(
    bundle: &Path,
    out: &Path,
    mode: Option<EgressMode>,
    rules: &EgressRules,
    signer: &CustodySigner,
) -> Result<ExportManifest, ExportError> {
    let index_error = |detail: String| ExportError::Index {
        bundle: bundle.to_path_buf(),
        detail,
    };
    let index_bytes = super::read::optional(&bundle.join("index.json"))?
        .ok_or_else(|| index_error("no index.json: not an evidence bundle".into()))?;
    let index: IndexView = serde_json::from_slice(&index_bytes)
        .map_err(|e| index_error(format!("index.json: {e}")))?;
    let index_sig = super::read::optional(&bundle.join("index.sig.json"))?;
    check_index_signer(bundle, &index_bytes, index_sig.as_deref(), signer)?;

    // The tenant's mode, narrowed by the one the index was written under: what the
    // run was promised is never widened by a later policy.
    let egress = rules.tenant(index.tenant_id.as_deref());
    let mut allowed = egress.mode;
    if let Some(at_run) = index.egress_mode {
        if permissiveness(at_run) < permissiveness(allowed) {
            allowed = at_run;
        }
    }
    let mode = mode.unwrap_or(allowed);
    if permissiveness(mode) > permissiveness(allowed) {
        return Err(ExportError::TooPermissive {
            requested: mode,
            allowed,
            tenant: index.tenant_id.unwrap_or_else(|| "(none)".into()),
        });
    }

    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent, 0o700)?;
    }
    let staged = StagedDir::new(out, ".export-", 0o700)?;
    let mut files = Vec::with_capacity(index.files.len());
    for f in &index.files {
        let rel = bundle_path(bundle, &f.path)?;
        let withheld = ExportFile {
            path: f.path.clone(),
            status: FileStatus::Withheld,
            sha256: None,
            size: None,
            masked_by: None,
        };
        if mode != EgressMode::Sanitized {
            files.push(withheld);
            continue;
        }
        let bytes = read_required(bundle, &rel)?;
        let digest = super::check::digest_of(&bytes).to_string();
        if digest != f.sha256 || bytes.len() as u64 != f.size {
            return Err(ExportError::Mismatch {
                bundle: bundle.to_path_buf(),
                path: f.path.clone(),
                detail: format!("{digest}, {} bytes", bytes.len()),
            });
        }
        let put = |bytes: &[u8]| -> Result<(), ExportError> {
            if let Some(dir) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_dirs(&staged.path().join(dir), 0o700)?;
            }
            Ok(staged.put(&rel, bytes, 0o600)?)
        };
        match sanitize(&f.path, &bytes, &egress.mask) {
            Sanitized::Verbatim => {
                put(&bytes)?;
                files.push(ExportFile {
                    status: FileStatus::Included,
                    ..withheld
                });
            }
            Sanitized::Masked(masked, hits) => {
                put(&masked)?;
                files.push(ExportFile {
                    status: FileStatus::Masked,
                    sha256: Some(super::check::digest_of(&masked).to_string()),
                    size: Some(masked.len() as u64),
                    masked_by: Some(hits.into_iter().collect()),
                    ..withheld
                });
            }
            Sanitized::Withheld => files.push(withheld),
        }
    }
    if mode != EgressMode::LocalOnly {
        staged.put("index.json", &index_bytes, 0o600)?;
        staged.put(
            "index.sig.json",
            index_sig.as_deref().unwrap_or_default(),
            0o600,
        )?;
    }
    let manifest = ExportManifest {
        schema: EXPORT_SCHEMA.into(),
        mode,
        run_id: index.run_id,
        index_sha256: super::check::digest_of(&index_bytes).to_string(),
        files,
    };
    // Plain structs of strings and numbers: serialising cannot fail.
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    staged.put("export.json", &bytes, 0o600)?;
    let sig = signer.sign(&bytes).map_err(ExportError::Sign)?;
    staged.put("export.sig.json", &sig.to_bytes(), 0o600)?;
    staged.commit()?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_path_outside_the_bundle_is_refused() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "",
            "a/../../b",
            "index.json",
        ] {
            assert!(bundle_path(Path::new("b"), bad).is_err(), "{bad}");
        }
        assert_eq!(
            bundle_path(Path::new("b"), "approvals/x.jws").expect("ok"),
            PathBuf::from("approvals/x.jws")
        );
    }

    #[test]
    fn a_file_that_still_matches_after_masking_is_withheld() {
        // The pattern matches its own replacement: nothing safe can be written.
        let rules =
            MaskRules::compile(&["masked|s3cret".into()], Path::new("p"), "m").expect("compiles");
        assert!(matches!(
            sanitize("stdout", b"s3cret", &rules),
            Sanitized::Withheld
        ));
        let rules = MaskRules::compile(&["s3cret".into()], Path::new("p"), "m").expect("ok");
        match sanitize("event.json", br#"{"a": "x s3cret y"}"#, &rules) {
            Sanitized::Masked(out, hits) => {
                let v: Value = serde_json::from_slice(&out).expect("still JSON");
                assert_eq!(v["a"], "x [masked] y");
                assert_eq!(hits.into_iter().collect::<Vec<_>>(), vec!["s3cret"]);
            }
            _ => panic!("masked"),
        }
    }
}
