//! Governance through the library (issue 13), with every crypto backend: a properly
//! approved production capsule is admitted; approvals and tenant indexes made by an
//! independent JOSE library (jsonwebtoken) are accepted; policy errors name the field.

use std::path::Path;

use capsule_tests::governance::{ALICE, BOB, GOVERNED, INDEXED};
use capsule_tests::{Signer, World, RUNNER};
use serde_json::{json, Value};
use verify_core::crypto::{all_backends, Backend};
use verify_core::{
    Capsule, Decision, FixedClock, Governance, HashMode, NoHistory, Policy, Reason, SpiffeId,
    TenantIndex, Tier, Verifier,
};

fn verify(
    w: &World,
    backend: &'static dyn Backend,
    capsule: &Path,
    index: Option<&Path>,
    tiers: &[Tier],
) -> Decision {
    let policy = w.governance_policy_with(backend);
    let runner = SpiffeId::parse(RUNNER).expect("runner");
    let clock = FixedClock(w.now);
    let indexes: Vec<TenantIndex> = index
        .map(|p| TenantIndex::verify(&std::fs::read(p).expect("index"), &policy).expect("index"))
        .into_iter()
        .collect();
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: HashMode::Read,
        governance: Governance {
            indexes: &indexes,
            host_tiers: tiers,
        },
    };
    let c = Capsule::from_dir(capsule, policy.limits.max_jws_bytes);
    v.admit_batch(std::slice::from_ref(&c)).remove(0)
}

#[test]
fn a_properly_approved_production_capsule_is_admitted_by_every_backend() {
    let w = World::new();
    for backend in all_backends() {
        let dir = w.approved_production_capsule(&format!("prod-{}", backend.name()));
        let d = verify(&w, backend, &dir, None, &[Tier::Gvisor]);
        assert!(d.is_admit(), "{}: {d:?}", backend.name());
        // The same capsule on a host without gVisor.
        let d = verify(&w, backend, &dir, None, &[Tier::Kata]);
        assert_eq!(d.reason, Some(Reason::TierUnavailable), "{d:?}");
        // Kata environments run on a Kata host.
        let fortress = w.capsule(
            &format!("fortress-{}", backend.name()),
            &w.governed_manifest("fortress"),
            Signer::Es256,
        );
        assert!(verify(&w, backend, &fortress, None, &[Tier::Kata]).is_admit());
    }
}

/// PKCS#8 DER of a P-256 private JWK, for jsonwebtoken's `EncodingKey::from_ec_der`.
fn pkcs8(jwk: &Value) -> Vec<u8> {
    let part = |k: &str| verify_core::b64::decode(jwk[k].as_str().expect(k).as_bytes()).expect(k);
    let mut der = vec![
        0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
        0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30,
        0x6b, 0x02, 0x01, 0x01, 0x04, 0x20,
    ];
    der.extend(part("d"));
    der.extend([0xa1, 0x44, 0x03, 0x42, 0x00, 0x04]);
    der.extend(part("x"));
    der.extend(part("y"));
    der
}

/// Signs `claims` with jsonwebtoken (no `typ`: the gateway accepts only its own).
fn third_party(jwk: &Value, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.typ = None;
    header.kid = Some(jwk["kid"].as_str().expect("kid").to_string());
    let key = jsonwebtoken::EncodingKey::from_ec_der(&pkcs8(jwk));
    jsonwebtoken::encode(&header, claims, &key).expect("jsonwebtoken signs")
}

#[test]
fn approvals_and_indexes_from_an_independent_producer_are_accepted() {
    let w = World::new();
    let dir = w.capsule(
        "third-party",
        &w.governed_manifest("production"),
        Signer::Es256,
    );
    for (who, role) in [(ALICE, "sre-lead"), (BOB, "security")] {
        let claims = serde_json::to_value(w.approval_payload(&dir, role)).expect("json");
        let jwk = w.approver_key(who).to_json(true);
        w.put_approval(&dir, role, &third_party(&jwk, &claims));
    }
    let digest = w.digest_of(&dir);
    let index = json!({
        "schema": "capsule-index/v1", "tenant": GOVERNED, "version": 9,
        "issued_at": w.now - 10, "expires_at": w.now + 3600,
        "capsules": [{"capsule_id": "prod-token-rotation", "version": 7, "digest": digest}],
    });
    let index = w.write(
        "third-party.index.jws",
        third_party(&w.index_key.to_json(true), &index).as_bytes(),
    );
    for backend in all_backends() {
        let d = verify(&w, backend, &dir, Some(&index), &[Tier::Gvisor]);
        assert!(d.is_admit(), "{}: {d:?}", backend.name());
    }
}

#[test]
fn a_required_index_that_lists_the_capsule_admits_it() {
    let w = World::new();
    let mut m = w.manifest();
    m["tenant"] = json!(INDEXED);
    let dir = w.capsule("indexed", &m, Signer::Es256);
    let entry = ("auth-token-issuance", 7, w.digest_of(&dir));
    let index = w.index(
        "ok.index.jws",
        &w.index_payload(INDEXED, 1, w.now + 60, &[entry]),
    );
    for backend in all_backends() {
        assert!(verify(&w, backend, &dir, Some(&index), &[]).is_admit());
        assert_eq!(
            verify(&w, backend, &dir, None, &[]).reason,
            Some(Reason::IndexStale)
        );
    }
}

#[test]
fn an_index_by_a_key_the_tenant_does_not_name_is_refused() {
    let w = World::new();
    let payload = serde_json::to_vec(&w.index_payload(GOVERNED, 1, w.now + 60, &[])).expect("json");
    let jws = w.sign(&payload, Signer::Es256);
    let policy = w.governance_policy_with(w.backend);
    let e =
        TenantIndex::verify(jws.as_bytes(), &policy).expect_err("k-es-2025 signs capsules only");
    assert!(e.to_string().contains("index.keys"), "{e}");
}

fn policy_error(w: &World, from: &str, to: &str) -> String {
    let text = w.governance_policy_toml();
    assert!(text.contains(from), "{from}");
    let path = w.write_mode("edited.toml", text.replacen(from, to, 1).as_bytes(), 0o644);
    Policy::load(&path, w.backend)
        .expect_err("refused")
        .to_string()
}

#[test]
fn governance_policy_errors_name_the_field() {
    let w = World::new();
    for (from, to, field) in [
        (
            "id = \"alice@acme.example\"",
            "id = \"Alice@acme.example\"",
            "approvers[0].id",
        ),
        (
            "kids = [\"alice-2026\"]",
            "kids = [\"nobody\"]",
            "approvers[0].kids[0]",
        ),
        (
            "tier = \"gvisor\"",
            "tier = \"runsc\"",
            "tenants[1].rules[0].tier",
        ),
        (
            "network = [\"none\"]",
            "network = [\"open\"]",
            "tenants[1].rules[0].network[0]",
        ),
        (
            "targets = [\"https://auth.prod.acme.example/*\"]",
            "targets = [\"https://auth.prod.acme.example*\"]",
            "tenants[1].rules[0].targets[0]",
        ),
        (
            "environment = \"production\"",
            "environment = \"prod\"",
            "tenants[1].rules[0].environment",
        ),
        (
            "roles = [\"sre-lead\", \"security\"]\nsigned",
            "roles = [\"sre-lead\", \"secutiry\"]\nsigned",
            "tenants[1].rules[0].roles[1]",
        ),
        (
            "index = { keys = [\"k-index\"]",
            "index = { keys = [\"k-es-2025x\"]",
            "tenants[1].index.keys[0]",
        ),
    ] {
        let e = policy_error(&w, from, to);
        assert!(e.contains(&format!("edited.toml: {field}")), "{field}: {e}");
    }
}
