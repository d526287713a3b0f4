//! Any bytes as a JWKS and as a single JWK: errors, never panics. A JWK that parses
//! must write out and parse back to the same kid, alg and key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use verify_core::crypto::default_backend;
use verify_core::keys::{parse_jwk, KeyStore};

fuzz_target!(|data: &[u8]| {
    let _ = KeyStore::from_jwks(data, Path::new("fuzz.jwks.json"), default_backend());
    if let Ok(jwk) = parse_jwk(data) {
        let private = jwk.to_json(true).to_string();
        let again = parse_jwk(private.as_bytes()).expect("round trip");
        assert_eq!((again.kid.as_str(), again.alg), (jwk.kid.as_str(), jwk.alg));
        assert_eq!(again.to_json(true), jwk.to_json(true));
    }
});
