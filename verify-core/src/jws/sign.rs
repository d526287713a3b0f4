//! Producing compact JWS (for `pack` and tests): the header is exactly
//! `{"alg":…,"kid":…,"typ":"capsule+jws"}`, so what we sign we also accept.

use crate::b64;
use crate::decision::Alg;
use crate::keys::{KeyError, SigningKey};

use super::header::CAPSULE_TYP;

/// Why a token could not be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The header would name another alg than the key signs with.
    #[error("a {} header needs a {} key", .alg.as_str(), .alg.as_str())]
    AlgKeyMismatch { alg: Alg },
    #[error("the JWS header: {0}")]
    Header(#[source] serde_json::Error),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Signs `payload` and returns the compact serialization.
pub fn sign_compact(
    kid: &str,
    alg: Alg,
    payload: &[u8],
    key: &SigningKey,
) -> Result<String, SignError> {
    if key.alg() != alg {
        return Err(SignError::AlgKeyMismatch { alg });
    }
    let header = serde_json::json!({ "alg": alg.as_str(), "kid": kid, "typ": CAPSULE_TYP });
    let header = serde_json::to_vec(&header).map_err(SignError::Header)?;
    let mut out = b64::encode(&header);
    out.push('.');
    out.push_str(&b64::encode(payload));
    let sig = key.sign(out.as_bytes())?;
    out.push('.');
    out.push_str(&b64::encode(&sig));
    Ok(out)
}
