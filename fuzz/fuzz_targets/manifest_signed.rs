//! The fuzzer writes the manifest; a fuzzing-only HS256 key signs it, so every input
//! gets past the signature into manifest parsing and every policy check. A manifest
//! that parses must serialise and parse back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use verify_core::crypto::default_backend;
use verify_core::keys::{parse_jwk, KeyStore, SigningKey};
use verify_core::{ArtifactSource, Capsule, FixedClock, HashMode, Manifest, NoHistory, Policy, SpiffeId, Verifier};

struct Fixture {
    policy: Policy,
    key: SigningKey,
    files: std::path::PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let jwks = include_bytes!("../keys/fuzz.jwks.json");
        let store = |_: &Path| KeyStore::from_jwks(jwks, Path::new("fuzz.jwks.json"), default_backend());
        let policy = Policy::from_toml(include_str!("../keys/fuzz-policy.toml"), Path::new("fuzz-policy.toml"), default_backend(), store)
            .expect("fuzz policy");
        let jwk = parse_jwk(include_bytes!("../keys/fuzz-hs.private.jwk.json")).expect("fuzz key");
        let key = SigningKey::from_jwk(&jwk, default_backend()).expect("signing key");
        let files = std::env::temp_dir().join(format!("capsule-fuzz-files-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&files);
        Fixture { policy, key, files }
    })
}

fuzz_target!(|payload: &[u8]| {
    let f = fixture();
    if let Ok(m) = Manifest::parse(payload) {
        let again = serde_json::to_vec(&m).expect("serialise");
        assert_eq!(Manifest::parse(&again).expect("round trip"), m);
    }
    let jws = verify_core::jws::sign_compact("k-fuzz-hs", verify_core::Alg::Hs256, payload, &f.key).expect("sign");
    let capsule = Capsule::from_bytes(jws.as_bytes(), ArtifactSource::Dir(f.files.clone()));
    let runner = SpiffeId::parse("spiffe://fuzz.example/runner/r1").expect("runner");
    let v = Verifier {
        policy: &f.policy,
        clock: &FixedClock(1_763_800_500),
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: HashMode::Read,
        governance: Default::default(),
    };
    let _ = v.verify(&capsule);
});
