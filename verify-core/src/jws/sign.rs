//! Producing compact JWS (for `pack` and tests): the header is exactly
//! `{"alg":…,"kid":…,"typ":"capsule+jws"}`, so what we sign we also accept.

use crate::b64;
use crate::decision::Alg;
use crate::keys::SigningKey;

use super::header::CAPSULE_TYP;

/// Signs `payload` and returns the compact serialization.
pub fn sign_compact(
    kid: &str,
    alg: Alg,
    payload: &[u8],
    key: &SigningKey,
) -> Result<String, String> {
    match (alg, key) {
        (Alg::Es256, SigningKey::Es256(_)) | (Alg::Hs256, SigningKey::Hs256(_)) => {}
        _ => {
            return Err(format!(
                "a {} header needs a {} key",
                alg.as_str(),
                alg.as_str()
            ))
        }
    }
    let header = serde_json::json!({ "alg": alg.as_str(), "kid": kid, "typ": CAPSULE_TYP });
    let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    let mut out = b64::encode(&header);
    out.push('.');
    out.push_str(&b64::encode(payload));
    let sig = key.sign(out.as_bytes())?;
    out.push('.');
    out.push_str(&b64::encode(&sig));
    Ok(out)
}
