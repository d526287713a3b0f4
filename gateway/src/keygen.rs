//! Key generation: a fresh ES256 key pair or HS256 secret, written as JWK files.
//! Used by `keygen` (which reads the flags and prints the paths) and by the
//! service's development trust domain.

use std::path::{Path, PathBuf};

use verify_core::crypto::default_backend;
use verify_core::keys::ParsedJwk;
use verify_core::Alg;

use crate::durable::{self, DurableError};

/// Why no key was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeygenError {
    /// The kid names files: it must be a plain file name.
    #[error("--kid must be 1 to 128 of [A-Za-z0-9._-], not starting with `.`")]
    Kid,
    /// The crypto backend could not make the key.
    #[error("generate {alg} key: {source}")]
    Generate {
        alg: &'static str,
        #[source]
        source: verify_core::keys::KeyError,
    },
    /// Writing a key file (an existing one is never replaced).
    #[error(transparent)]
    Write(#[from] DurableError),
}

/// The two files of a new key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    pub private: PathBuf,
    pub public: PathBuf,
}

/// A kid that is safe as a file name.
pub fn check_kid(kid: &str) -> Result<(), KeygenError> {
    let plain = !kid.is_empty()
        && kid.len() <= 128
        && !kid.starts_with('.')
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        Ok(())
    } else {
        Err(KeygenError::Kid)
    }
}

/// Writes `OUT/KID.private.jwk.json` (0600) and `OUT/KID.public.jwks.json` (0644; for
/// HS256 0600, since the "public" set holds the secret itself) for a new key, each
/// created with its mode and written durably; refuses to overwrite either.
pub fn generate(alg: Alg, kid: &str, out: &Path) -> Result<KeyFiles, KeygenError> {
    check_kid(kid)?;
    let jwk = ParsedJwk::generate(kid, alg, default_backend()).map_err(|source| {
        KeygenError::Generate {
            alg: alg.as_str(),
            source,
        }
    })?;
    durable::create_dirs(out, 0o777)?;
    let files = KeyFiles {
        private: out.join(format!("{kid}.private.jwk.json")),
        public: out.join(format!("{kid}.public.jwks.json")),
    };
    let jwks = serde_json::json!({ "keys": [jwk.to_json(false)] });
    let public_mode = if alg == Alg::Hs256 { 0o600 } else { 0o644 };
    durable::write_new(&files.private, &json_text(&jwk.to_json(true)), 0o600)?;
    durable::write_new(&files.public, &json_text(&jwks), public_mode)?;
    Ok(files)
}

/// Pretty JSON and a newline (a JSON value always serialises).
fn json_text(value: &serde_json::Value) -> Vec<u8> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text.into_bytes()
}
