//! Any text as a policy file (keys from the fuzzing-only JWKS): errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use verify_core::crypto::default_backend;
use verify_core::keys::KeyStore;
use verify_core::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let jwks = include_bytes!("../keys/fuzz.jwks.json");
    let store = |_: &Path| KeyStore::from_jwks(jwks, Path::new("fuzz.jwks.json"), default_backend());
    let _ = Policy::from_toml(text, Path::new("fuzz.toml"), default_backend(), store);
});
