//! Any bytes as a compact JWS, against a trust store holding one key of each alg.
//! Nothing may panic; an accepted token must carry a trusted kid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use verify_core::crypto::default_backend;
use verify_core::keys::KeyStore;

/// A fixed, fuzzing-only trust store (public points and a secret made up for fuzzing).
fn store() -> &'static KeyStore {
    static STORE: OnceLock<KeyStore> = OnceLock::new();
    STORE.get_or_init(|| {
        let jwks = include_bytes!("../keys/fuzz.jwks.json");
        KeyStore::from_jwks(jwks, Path::new("fuzz.jwks.json"), default_backend()).expect("fuzz jwks")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = verify_core::jws::verify(data, store(), 1 << 20) {
        assert!(store().get(&v.kid).is_some());
    }
});
