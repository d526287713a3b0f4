//! `keygen`: a fresh ES256 key pair or HS256 secret, as JWK files.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use verify_core::crypto::default_backend;
use verify_core::keys::ParsedJwk;
use verify_core::Alg;

use super::{usage, AlgArg};
use crate::GatewayError;

pub fn run(alg: AlgArg, kid: &str, out: &Path) -> Result<ExitCode, GatewayError> {
    // The kid names files: keep it a plain file name.
    let plain = !kid.is_empty()
        && kid.len() <= 128
        && !kid.starts_with('.')
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !plain {
        return Err(usage(
            "--kid must be 1 to 128 of [A-Za-z0-9._-], not starting with `.`",
        ));
    }
    let alg = match alg {
        AlgArg::Es256 => Alg::Es256,
        AlgArg::Hs256 => Alg::Hs256,
    };
    let (private, public) = generate(alg, kid, out)?;
    crate::output::print_stdout(&format!("{}\n{}\n", private.display(), public.display()))?;
    if alg == Alg::Hs256 {
        eprintln!(
            "note: HS256 is a shared secret: {} contains it too (mode 0600)",
            public.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `OUT/KID.private.jwk.json` and `OUT/KID.public.jwks.json` for a new key;
/// refuses to overwrite. Returns the two paths.
pub(crate) fn generate(
    alg: Alg,
    kid: &str,
    out: &Path,
) -> Result<(PathBuf, PathBuf), GatewayError> {
    let jwk = ParsedJwk::generate(kid, alg, default_backend()).map_err(usage)?;
    std::fs::create_dir_all(out).map_err(|e| GatewayError::io(out, e))?;
    let private = out.join(format!("{kid}.private.jwk.json"));
    let public = out.join(format!("{kid}.public.jwks.json"));
    let jwks = serde_json::json!({ "keys": [jwk.to_json(false)] });
    // An HS256 "public" set holds the secret itself, so it is as private as the key.
    let public_mode = if alg == Alg::Hs256 { 0o600 } else { 0o644 };
    write_new(&private, &jwk.to_json(true), 0o600)?;
    write_new(&public, &jwks, public_mode)?;
    Ok((private, public))
}

/// Creates `path` with `mode`, refusing to overwrite, and syncs it.
fn write_new(path: &Path, value: &serde_json::Value, mode: u32) -> Result<(), GatewayError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| GatewayError::io(path, e))?;
    let mut text = serde_json::to_string_pretty(value).map_err(|e| usage(e.to_string()))?;
    text.push('\n');
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| GatewayError::io(path, e))
}
