//! base64url without padding (RFC 4648 section 5), as in JOSE; strict on decode.
//! verify-core's codec is the one in the workspace: one encoding per byte string (no
//! padding, no whitespace, no non-zero trailing bits).

pub use verify_core::b64::B64Error;

pub fn encode(bytes: &[u8]) -> String {
    verify_core::b64::encode(bytes)
}

pub fn decode(text: &str) -> Result<Vec<u8>, B64Error> {
    verify_core::b64::decode(text.as_bytes())
}
