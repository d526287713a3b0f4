//! `approve`: an approver signs a packed capsule's manifest (DESIGN.md "Governance").
//!
//! The approval binds the exact manifest bytes the capsule signs (`manifest_sha256`);
//! who approved is decided by the verifier's policy from the key, so the payload
//! names only the role claimed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use verify_core::approvals::{ApprovalPayload, MAX_APPROVAL_BYTES};
use verify_core::crypto::default_backend;
use verify_core::keys::{parse_jwk, ParsedJwk, SigningKey};
use verify_core::{check_shape, Alg, Limits, Manifest, Sha256Digest};

use super::usage;
use crate::pack::read_bounded;
use crate::GatewayError;

#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    /// The approver's private JWK (ES256, with `kid`: the key policy knows them by).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The role approved in (policy must give this approver this role).
    #[arg(long, value_name = "ROLE")]
    pub role: String,
    /// Where to write the approval, normally CAPSULE/approvals/NAME.jws (never overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The packed capsule directory.
    #[arg(value_name = "CAPSULE")]
    pub capsule: PathBuf,
}

pub fn run(args: &ApproveArgs) -> Result<ExitCode, GatewayError> {
    if args.role.is_empty() {
        return Err(usage("--role must not be empty"));
    }
    let (jwk, signer) = es256_key(&args.key)?;
    let (payload, manifest) = capsule_manifest(&args.capsule)?;
    let digest = Sha256Digest(default_backend().sha256_oneshot(&payload));
    let approval = ApprovalPayload::for_manifest(
        &manifest,
        digest,
        &args.role,
        crate::admission::system_clock().now_unix(),
    );
    let body = serde_json::to_vec(&approval).map_err(|e| usage(e.to_string()))?;
    let jws =
        verify_core::jws::sign_compact(&jwk.kid, Alg::Es256, &body, &signer).map_err(usage)?;
    debug_assert!(jws.len() <= MAX_APPROVAL_BYTES);
    write_new(&args.out, jws.as_bytes())?;
    crate::output::println_stdout(args.out.display())?;
    Ok(ExitCode::SUCCESS)
}

/// An ES256 private JWK and its signer (approvals and tenant indexes are ES256 only).
pub(super) fn es256_key(path: &Path) -> Result<(ParsedJwk, SigningKey), GatewayError> {
    let bytes = read_bounded(path, 64 * 1024)?;
    let jwk = parse_jwk(&bytes)
        .map_err(|e| usage(format!("{}: {}: {}", path.display(), e.field, e.message)))?;
    if jwk.alg != Alg::Es256 {
        return Err(usage(format!("{}: must be an ES256 key", path.display())));
    }
    let signer = SigningKey::from_jwk(&jwk, default_backend())
        .map_err(|e| usage(format!("{}: {e}", path.display())))?;
    Ok((jwk, signer))
}

/// A capsule's JWS bytes (as the verifier reads them) and its manifest. The signature
/// is not checked here (no policy): this is the producer's side, working on its own
/// capsules; what is signed is the exact payload, and the verifier checks both.
pub(super) fn capsule_jws(dir: &Path) -> Result<Vec<u8>, GatewayError> {
    let opened = verify_core::verify::open_capsule(dir, Limits::default().max_jws_bytes)
        .map_err(|(_, detail)| usage(detail))?;
    Ok(opened.jws.to_vec())
}

/// The manifest bytes a capsule signs, and the manifest parsed from them.
pub(super) fn capsule_manifest(dir: &Path) -> Result<(Vec<u8>, Manifest), GatewayError> {
    let jws = capsule_jws(dir)?;
    manifest_of(dir, &jws)
}

pub(super) fn manifest_of(dir: &Path, jws: &[u8]) -> Result<(Vec<u8>, Manifest), GatewayError> {
    let bad = |e: String| usage(format!("{}: capsule.jws: {e}", dir.display()));
    let parts = verify_core::jws::split(jws).map_err(|e| bad(e.into()))?;
    let payload = verify_core::b64::decode(parts.payload).map_err(|e| bad(e.to_string()))?;
    let manifest = Manifest::parse(&payload).map_err(|e| bad(e.to_string()))?;
    check_shape(&manifest).map_err(|e| bad(e.to_string()))?;
    Ok((payload, manifest))
}

/// Writes `bytes` as the new file `out` durably (temp file, fsync, rename that never
/// replaces, fsync the directory), creating its directory when missing.
pub(super) fn write_new(out: &Path, bytes: &[u8]) -> Result<(), GatewayError> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::durable::create_dirs(parent, 0o755)?;
    Ok(crate::durable::write_new(out, bytes, 0o644)?)
}
