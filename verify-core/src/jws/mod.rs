//! Strict RFC 7515 compact serialization: split, header, signature check.
//!
//! Order matters: the header is read first (it names the key), the signature is
//! checked with the key the trust store holds for that `kid`, and only then is the
//! payload decoded. Nothing in the payload is looked at before the signature verifies.

mod header;
mod sign;

pub use header::{parse_header, Header, HeaderError, CAPSULE_TYP, FORBIDDEN_MEMBERS};
pub use sign::{sign_compact, SignError};

use crate::b64;
use crate::decision::{Alg, Reason};
use crate::keys::{KeyStore, Verifier};

/// The three base64url parts of a compact JWS, borrowed from the input.
#[derive(Debug, Clone, Copy)]
pub struct CompactParts<'a> {
    pub header: &'a [u8],
    pub payload: &'a [u8],
    pub signature: &'a [u8],
    /// `header "." payload`: the bytes the signature covers, never re-serialised.
    pub signing_input: &'a [u8],
}

/// Splits `bytes` into exactly three parts. The header must not be empty; an empty
/// payload is legal JWS (the manifest check refuses it later, after the header has
/// decided the more precise reason).
pub fn split(bytes: &[u8]) -> Result<CompactParts<'_>, &'static str> {
    let mut dots = memchr_dots(bytes);
    let first = dots.next().ok_or("not three dot-separated parts")?;
    let second = dots.next().ok_or("not three dot-separated parts")?;
    if dots.next().is_some() {
        return Err("more than three dot-separated parts (JWE or garbage)");
    }
    let header = &bytes[..first];
    let payload = &bytes[first + 1..second];
    let signature = &bytes[second + 1..];
    if header.is_empty() {
        return Err("empty header");
    }
    Ok(CompactParts {
        header,
        payload,
        signature,
        signing_input: &bytes[..second],
    })
}

fn memchr_dots(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes
        .iter()
        .enumerate()
        .filter_map(|(i, &b)| (b == b'.').then_some(i))
}

/// A JWS whose signature verified under a trusted key.
#[derive(Debug)]
pub struct VerifiedJws {
    pub kid: String,
    pub alg: Alg,
    /// The decoded payload (the manifest bytes).
    pub payload: Vec<u8>,
}

/// Why a JWS was refused, with what was learned before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwsFailure {
    pub reason: Reason,
    pub detail: String,
    pub kid: Option<String>,
    pub alg: Option<Alg>,
}

fn fail(reason: Reason, detail: impl Into<String>) -> JwsFailure {
    JwsFailure {
        reason,
        detail: detail.into(),
        kid: None,
        alg: None,
    }
}

/// Checks a compact JWS against the trust store. `max_bytes` bounds the input before
/// anything is decoded.
pub fn verify(bytes: &[u8], keys: &KeyStore, max_bytes: usize) -> Result<VerifiedJws, JwsFailure> {
    if bytes.len() > max_bytes {
        return Err(fail(
            Reason::LimitExceeded,
            format!("JWS is {} bytes, the limit is {max_bytes}", bytes.len()),
        ));
    }
    let parts = split(bytes).map_err(|why| fail(Reason::MalformedJws, why))?;
    let header_json = b64::decode(parts.header)
        .map_err(|e| fail(Reason::MalformedJws, format!("header: {e}")))?;
    let header = parse_header(&header_json).map_err(|e| fail(e.reason(), e.to_string()))?;
    let with_header = |reason, detail: String| JwsFailure {
        reason,
        detail,
        kid: Some(header.kid.clone()),
        alg: Some(header.alg),
    };

    // The key is found by kid only, and its own alg must equal the header's.
    let key = keys.get(&header.kid).ok_or_else(|| {
        with_header(
            Reason::UnknownKid,
            format!("no trusted key has kid `{}`", header.kid),
        )
    })?;
    if key.alg() != header.alg {
        return Err(with_header(
            Reason::AlgKeyMismatch,
            format!(
                "header alg {} but key `{}` is {}",
                header.alg.as_str(),
                key.kid(),
                key.alg().as_str()
            ),
        ));
    }
    // Refuse a payload outside the base64url alphabet before any crypto runs: it is
    // malformed whatever the signature says. Checking is not parsing.
    b64::check(parts.payload)
        .map_err(|e| with_header(Reason::MalformedJws, format!("payload: {e}")))?;
    let bad_sig = |e: b64::B64Error| with_header(Reason::MalformedJws, format!("signature: {e}"));
    let verified = match key.verifier() {
        Verifier::Es256(v) => {
            // Exactly 64 bytes r||s; a DER signature or any other length never verifies.
            let sig = b64::decode_exact::<64>(parts.signature).map_err(bad_sig)?;
            let sig = sig.ok_or_else(|| {
                with_header(
                    Reason::SignatureInvalid,
                    "ES256 signature must be exactly 64 bytes (r||s)".to_string(),
                )
            })?;
            v.verify(parts.signing_input, &sig)
        }
        Verifier::Hs256(k) => {
            let tag = b64::decode_exact::<32>(parts.signature).map_err(bad_sig)?;
            let tag = tag.ok_or_else(|| {
                with_header(
                    Reason::SignatureInvalid,
                    "HS256 tag must be exactly 32 bytes".to_string(),
                )
            })?;
            k.verify(parts.signing_input, &tag)
        }
    };
    if !verified {
        return Err(with_header(
            Reason::SignatureInvalid,
            format!("signature does not verify under key `{}`", key.kid()),
        ));
    }
    let payload = b64::decode(parts.payload)
        .map_err(|e| with_header(Reason::MalformedJws, format!("payload: {e}")))?;
    Ok(VerifiedJws {
        kid: header.kid,
        alg: header.alg,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_requires_exactly_three_parts() {
        assert!(split(b"a.b.c").is_ok());
        assert!(split(b"a.b.").is_ok(), "empty signature is judged later");
        assert!(split(b"a.b").is_err());
        assert!(split(b"a.b.c.d").is_err());
        assert!(split(b"a.b.c.d.e").is_err());
        assert!(split(b".b.c").is_err());
        assert!(split(b"a..c").is_ok(), "an empty payload is judged later");
        assert!(split(b"").is_err());
        let p = split(b"hh.pp.ss").unwrap();
        assert_eq!(p.signing_input, b"hh.pp");
        assert_eq!(p.signature, b"ss");
    }
}
