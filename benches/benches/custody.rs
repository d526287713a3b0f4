//! What signing adds to a run (issue 12): the custody signature over a bundle's
//! `index.json`, software ES256 and a TPM2_Quote on swtpm (Debian package `swtpm`,
//! started here), and a whole denial bundle written with its signed index under each
//! (two more durable files than before the index: `index.json`, `index.sig.json`).
//!
//! - `sign/software`, `sign/tpm`: `CustodySigner::sign` of a 2.5 KiB index (the size
//!   of a real run's: nine files, the trust snapshot with two approver keys);
//! - `verify/software`, `verify/tpm`: `verify_custody` of the same, offline;
//! - `denial-bundle/software`, `denial-bundle/tpm`: `write_denial_bundle` end to end
//!   (staged directory, decision, event, index, signature, fsyncs, rename).
//!
//! `cargo bench -p benches --bench custody`

use std::sync::Arc;

use attest::tpm::{PcrSelection, Tcti, TpmWorker};
use capsule_gateway::custody::{verify_custody, CustodyExpect, CustodySigner};
use capsule_gateway::evidence::{write_denial_bundle, Custody, Event, PolicyFacts};
use criterion::{criterion_group, criterion_main, Criterion};
use verify_core::{Decision, Reason};

fn index_like() -> Vec<u8> {
    let file = serde_json::json!({
        "path": "approvals/alice-sre-lead.jws",
        "sha256": format!("sha256:{}", "ab".repeat(32)),
        "size": 700,
    });
    let doc = serde_json::json!({
        "schema": "capsule-gateway/evidence-index/v1",
        "files": vec![file; 9],
        "trust_snapshot": { "approvers": vec![serde_json::json!({"x": "a".repeat(43), "y": "b".repeat(43)}); 3] },
    });
    serde_json::to_vec_pretty(&doc).expect("json")
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let software = CustodySigner::software(&dir.path().join("custody")).expect("software key");
    let swtpm = attest_testkit::Swtpm::start().expect("swtpm (Debian package swtpm)");
    let tcti = Tcti::parse(&swtpm.tcti()).expect("tcti");
    let worker = Arc::new(TpmWorker::spawn(&tcti).expect("open swtpm"));
    let key = worker
        .call(|t| t.identity_key(attest::tpm::DEFAULT_IDENTITY_HANDLE, true))
        .expect("identity key")
        .0;
    let pcrs: PcrSelection = "sha256:0,7".parse().expect("pcrs");
    let tpm = CustodySigner::tpm(worker, key, pcrs);
    let payload = index_like();

    let mut g = c.benchmark_group("custody");
    g.sample_size(30);
    for (name, signer) in [("software", &software), ("tpm", &tpm)] {
        g.bench_function(format!("sign/{name}"), |b| {
            b.iter(|| signer.sign(&payload).expect("sign"))
        });
        let sig = signer.sign(&payload).expect("sign");
        g.bench_function(format!("verify/{name}"), |b| {
            b.iter(|| verify_custody(&payload, &sig, &CustodyExpect::default()).expect("holds"))
        });
    }

    let w = capsule_tests::World::new();
    let policy = w.policy();
    let facts = PolicyFacts::of(&policy);
    let decision = Decision::deny_unread(Reason::UnknownKid, "bench");
    let roots = tempfile::tempdir().expect("tempdir");
    for (name, signer) in [("software", software), ("tpm", tpm)] {
        let custody = Custody {
            signer,
            facts: facts.clone(),
            runner_id: Some(capsule_tests::RUNNER.into()),
        };
        let root = roots.path().join(name);
        let mut n = 0u64;
        g.bench_function(format!("denial-bundle/{name}"), |b| {
            b.iter(|| {
                n += 1;
                let event = Event::denied(
                    &format!("bench-{n}"),
                    "urn:bench",
                    "capsule",
                    &decision,
                    &policy.digests.policy,
                    chrono::DateTime::from_timestamp(0, 0).unwrap_or_default(),
                );
                write_denial_bundle(&root, &event, &custody).expect("write")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
