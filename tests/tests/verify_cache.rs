//! The verification cache (verify-core/src/verify_cache.rs) through the library: a hit
//! skips the signature check and the manifest parse and nothing else; it is keyed by
//! the exact JWS bytes and the exact key; a reloaded trust store starts empty; it is
//! bounded. Every assertion is on a reason code or a counter, none on time.

use std::path::Path;

use capsule_tests::{Signer, World, ES_KID, HS_KID, RUNNER, RUN_SH, TENANT};
use verify_core::keys::{KeyStore, ParsedJwk};
use verify_core::{
    AdmittedVersion, Alg, Capsule, Decision, FixedClock, HashMode, NoHistory, Policy, Reason,
    RollbackView, SpiffeId, StateReadError, Verdict, Verifier,
};

/// Verifies the capsule directory `dir` under `policy` at time `now` with `view`.
fn verify_at(policy: &Policy, dir: &Path, now: u64, view: &dyn RollbackView) -> Decision {
    let runner = SpiffeId::parse(RUNNER).expect("runner");
    let clock = FixedClock(now);
    let v = Verifier {
        policy,
        clock: &clock,
        rollback: view,
        runner: Some(&runner),
        hash_mode: HashMode::Auto,
        governance: Default::default(),
    };
    match v.verify(&Capsule::from_dir(dir, policy.limits.max_jws_bytes)) {
        Ok(a) => a.into_decision(),
        Err(d) => d,
    }
}

fn verify(w: &World, policy: &Policy, dir: &Path) -> Decision {
    verify_at(policy, dir, w.now, &NoHistory)
}

fn assert_admitted(d: &Decision) {
    assert_eq!(d.verdict, Verdict::Admit, "{d:?}");
}

fn assert_denied(d: &Decision, reason: Reason) {
    assert_eq!(d.verdict, Verdict::Deny, "{d:?}");
    assert_eq!(d.reason, Some(reason), "{d:?}");
}

/// (hits, misses) of the policy's cache.
fn counts(policy: &Policy) -> (u64, u64) {
    let c = policy.verify_cache();
    (c.hits(), c.misses())
}

/// A state that has admitted a higher version of the fixture capsule.
struct HigherAdmitted;
impl RollbackView for HigherAdmitted {
    fn latest(&self, _: &str, _: &str) -> Result<Option<AdmittedVersion>, StateReadError> {
        Ok(Some(AdmittedVersion {
            version: 8,
            digest: verify_core::Sha256Digest([7; 32]),
        }))
    }
}

#[test]
fn a_second_admission_is_a_hit_for_es256_and_hs256() {
    let w = World::new();
    let policy = w.policy();
    for (name, signer) in [("es", Signer::Es256), ("hs", Signer::Hs256)] {
        let dir = w.good_capsule(name, signer);
        let before = counts(&policy);
        assert_admitted(&verify(&w, &policy, &dir));
        assert_admitted(&verify(&w, &policy, &dir));
        let after = counts(&policy);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, 1),
            "{name}: one miss, then one hit"
        );
    }
    assert_eq!(policy.verify_cache().len(), 2);
}

/// After a hit, the validity window, the policy's rules as they are now, the state
/// and every artifact are still judged.
#[test]
fn a_hit_still_checks_time_policy_state_and_every_artifact() {
    let w = World::new();
    let mut policy = w.policy();
    let dir = w.good_capsule("c", Signer::Es256);
    assert_admitted(&verify(&w, &policy, &dir));

    // The validity window passed: `expired`, though the signature is cached.
    let later = w.now + 604_800 + 60;
    assert_denied(
        &verify_at(&policy, &dir, later, &NoHistory),
        Reason::Expired,
    );
    // Not yet valid before its window, from the cache too.
    assert_denied(
        &verify_at(&policy, &dir, w.now - 10_000, &NoHistory),
        Reason::NotYetValid,
    );
    // A higher version admitted meanwhile: `rollback`.
    assert_denied(
        &verify_at(&policy, &dir, w.now, &HigherAdmitted),
        Reason::Rollback,
    );
    // An artifact altered (same size, other bytes): `digest_mismatch`.
    let mut altered = RUN_SH.to_vec();
    altered[RUN_SH.len() - 2] ^= 1;
    std::fs::write(dir.join("files/run.sh"), &altered).unwrap();
    assert_denied(&verify(&w, &policy, &dir), Reason::DigestMismatch);
    std::fs::write(dir.join("files/run.sh"), RUN_SH).unwrap();
    assert_admitted(&verify(&w, &policy, &dir));

    // The tenant's key binding as it is now: the kid no longer signs for the tenant.
    let tenant = policy.tenants.get_mut(TENANT).unwrap();
    tenant.keys.remove(ES_KID);
    assert_denied(&verify(&w, &policy, &dir), Reason::TenantKeyMismatch);
    // Every one of those came from the cache: one miss, the rest hits.
    assert_eq!(counts(&policy), (6, 1));
}

/// The key is the exact JWS bytes: the same payload under another (valid) signature
/// is a miss; a forged signature over a cached payload is verified, and refused.
#[test]
fn the_same_payload_with_another_signature_is_not_a_hit() {
    let w = World::new();
    let policy = w.policy();
    let payload = w.manifest().to_string();
    let first = w.sign(payload.as_bytes(), Signer::Es256);
    // ES256 signatures are randomised: another valid signature over the same bytes.
    let second = w.sign(payload.as_bytes(), Signer::Es256);
    assert_ne!(first, second);
    assert_admitted(&verify(
        &w,
        &policy,
        &w.capsule_with_jws("a", first.as_bytes()),
    ));
    assert_admitted(&verify(
        &w,
        &policy,
        &w.capsule_with_jws("b", second.as_bytes()),
    ));
    assert_eq!(counts(&policy), (0, 2));

    // The cached payload with a signature changed in one character.
    let (head, sig) = first.rsplit_once('.').unwrap();
    let mut sig = sig.as_bytes().to_vec();
    sig[3] = if sig[3] == b'A' { b'B' } else { b'A' };
    let forged = format!("{head}.{}", String::from_utf8(sig).unwrap());
    let d = verify(&w, &policy, &w.capsule_with_jws("f", forged.as_bytes()));
    assert_denied(&d, Reason::SignatureInvalid);
    assert_eq!(counts(&policy), (0, 3));
}

/// The trust file (and the tenant) lose the key; the policy is loaded again: the capsule it signed,
/// admitted a moment ago, is `unknown_kid`. A reloaded policy's cache starts empty.
#[test]
fn a_key_removed_from_the_trust_file_is_denied_after_reload() {
    let w = World::new();
    let policy = w.policy();
    let dir = w.good_capsule("c", Signer::Es256);
    assert_admitted(&verify(&w, &policy, &dir));
    assert_admitted(&verify(&w, &policy, &dir));
    assert_eq!(counts(&policy).0, 1);

    let jwks = serde_json::json!({ "keys": [w.hs.to_json(true), w.other.to_json(false), w.index_key.to_json(false)] });
    w.write_mode("trusted.jwks.json", jwks.to_string().as_bytes(), 0o600);
    // The policy may name only trusted kids: the tenant loses it too.
    let toml = w
        .policy_toml()
        .replace(&format!("keys = [\"{ES_KID}\", "), "keys = [");
    assert!(!toml.contains(ES_KID));
    w.write_mode("policy.toml", toml.as_bytes(), 0o644);
    let reloaded = w.policy();
    assert!(reloaded.verify_cache().is_empty());
    assert_denied(&verify(&w, &reloaded, &dir), Reason::UnknownKid);
    assert_eq!(counts(&reloaded), (0, 1));
}

/// A key replaced under the same kid (ES256 and HS256), even in the policy that
/// cached the signature: the fingerprint differs, so nothing is served from the cache
/// and the signature is checked under the new key.
#[test]
fn a_key_rotated_under_the_same_kid_is_never_served_from_the_cache() {
    let w = World::new();
    let mut policy = w.policy();
    let es = w.good_capsule("es", Signer::Es256);
    let hs = w.good_capsule("hs", Signer::Hs256);
    assert_admitted(&verify(&w, &policy, &es));
    assert_admitted(&verify(&w, &policy, &hs));

    let new_es = ParsedJwk::generate(ES_KID, Alg::Es256, w.backend).unwrap();
    let new_hs = ParsedJwk::generate(HS_KID, Alg::Hs256, w.backend).unwrap();
    let jwks = serde_json::json!({ "keys": [new_es.to_json(false), new_hs.to_json(true)] });
    policy.keys =
        KeyStore::from_jwks(jwks.to_string().as_bytes(), Path::new("rotated"), w.backend).unwrap();
    assert_denied(&verify(&w, &policy, &es), Reason::SignatureInvalid);
    assert_denied(&verify(&w, &policy, &hs), Reason::SignatureInvalid);
    assert_eq!(counts(&policy), (0, 4));
}

#[test]
fn the_cache_holds_at_most_its_capacity_and_can_be_off() {
    let w = World::new();
    let mut policy = w.policy();
    policy.set_verify_cache_capacity(2);
    let dirs: Vec<_> = (1..=6u64)
        .map(|i| {
            let mut m = w.manifest();
            m["capsule_id"] = format!("c{i}").into();
            w.capsule(&format!("c{i}"), &m, Signer::Es256)
        })
        .collect();
    for _ in 0..2 {
        for dir in &dirs {
            assert_admitted(&verify(&w, &policy, dir));
            assert!(policy.verify_cache().len() <= 2);
        }
    }
    let (hits, misses) = counts(&policy);
    assert_eq!(hits + misses, 12);
    assert!(misses >= 10, "at most 2 of 6 can be held: {misses} misses");

    policy.set_verify_cache_capacity(0);
    assert_admitted(&verify(&w, &policy, &dirs[0]));
    assert_admitted(&verify(&w, &policy, &dirs[0]));
    assert_eq!(counts(&policy), (0, 2));
    assert_eq!(policy.verify_cache().len(), 0);
}

/// Only successes are cached: a malformed manifest under a good signature is
/// recomputed, with the same reason, every time.
#[test]
fn a_denial_is_never_cached() {
    let w = World::new();
    let policy = w.policy();
    let dir = w.capsule_with_jws("m", w.sign(b"{\"schema\":1}", Signer::Es256).as_bytes());
    assert_denied(&verify(&w, &policy, &dir), Reason::MalformedManifest);
    assert_denied(&verify(&w, &policy, &dir), Reason::MalformedManifest);
    assert_eq!(counts(&policy), (0, 2));
    assert!(policy.verify_cache().is_empty());
}
