//! Batch admission: 10,000 ES256 capsules through `Verifier::admit_batch` on a rayon
//! pool of 1 thread and of 2 threads, in the same run.
//!
//! The batch is the small capsule of the admission bench (1 KiB manifest, one
//! 38-byte artifact) repeated 10,000 times: the same `Capsule` cloned (the JWS bytes
//! are shared through an `Arc`, the files are one capsule directory). Every element
//! is still verified from scratch — signature, manifest, policy checks, open + hash
//! of the artifact — since the verifier caches nothing; what repetition removes is
//! only the cache-miss cost of 10,000 distinct JWS buffers (≈15 MiB, beyond L2),
//! and it makes both threads open the *same* directory and file (shared dentries).
//!
//! `admit_batch_distinct` is the control for that: 10,000 distinct capsules (each its
//! own `capsule_id`, signature and capsule directory), same sizes.
//!
//! `raw_es256_verify` is the machine's own ceiling: 10,000 `ParsedPublicKey` verifies
//! of the same signing input through the same `par_iter().collect()` shape, no
//! verify-core at all. If it does not scale 2×, neither can anything built on it.
//!
//! After the criterion group, `paired` lines time the 1-thread and the 2-thread pool in
//! alternating rounds, which keeps slow drift of this shared VM out of the ratio.

mod common;

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::signature;
use capsule_tests::Signer;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rayon::prelude::*;
use serde_json::json;
use verify_core::keys::KeyMaterial;
use verify_core::{jws, HashMode};

use common::{paired, small_manifest, Env};

const BATCH: usize = 10_000;

fn batch(c: &mut Criterion) {
    let env = Env::new();
    let cap = env.signed("small-es", &small_manifest(&env.world), Signer::Es256);
    let repeated = vec![cap.capsule.clone(); BATCH];
    let mut manifest = small_manifest(&env.world);
    let distinct: Vec<_> = (0..BATCH)
        .map(|i| {
            // Same length as the small capsule: `capsule_id` keeps its byte count.
            manifest["capsule_id"] = json!(format!("auth-token-i{i:07}"));
            env.signed(&format!("d/{i}"), &manifest, Signer::Es256)
                .capsule
        })
        .collect();
    let verifier = env.verifier(HashMode::default());

    let mut g = c.benchmark_group("batch_10k_es256");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(BATCH as u64));
    let pools: Vec<_> = [1, 2]
        .into_iter()
        .map(|threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("rayon pool")
        })
        .collect();
    for (name, caps) in [
        ("admit_batch", &repeated),
        ("admit_batch_distinct", &distinct),
    ] {
        for pool in &pools {
            let decisions = pool.install(|| verifier.admit_batch(caps));
            assert!(
                decisions.iter().all(|d| d.is_admit()),
                "every capsule is admitted"
            );
            let threads = pool.current_num_threads();
            g.bench_function(format!("{name}/{threads}_thread"), |b| {
                b.iter(|| pool.install(|| verifier.admit_batch(black_box(caps))))
            });
        }
    }

    // The ceiling: the signature check alone, same batch shape.
    let point = match &env.world.es.material {
        KeyMaterial::Es256 { point, .. } => *point,
        KeyMaterial::Hs256 { .. } => unreachable!("fixture es key is ES256"),
    };
    let parsed = signature::ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .expect("valid point");
    let parts = jws::split(&cap.jws).expect("three parts");
    let sig = verify_core::b64::decode(parts.signature).expect("b64 signature");
    let raw = || -> Vec<bool> {
        (0..BATCH)
            .into_par_iter()
            .map(|_| {
                parsed
                    .verify_sig(black_box(parts.signing_input), black_box(&sig))
                    .is_ok()
            })
            .collect()
    };
    assert!(pools[0].install(raw).into_iter().all(|ok| ok));
    for pool in &pools {
        let threads = pool.current_num_threads();
        g.bench_function(format!("raw_es256_verify/{threads}_thread"), |b| {
            b.iter(|| pool.install(raw))
        });
    }
    g.finish();

    // Throughput of 2 threads relative to 1, in alternating rounds of one batch each.
    let (one, two) = (&pools[0], &pools[1]);
    for (name, caps) in [
        ("admit_batch", &repeated),
        ("admit_batch_distinct", &distinct),
    ] {
        paired(
            &format!("batch: {name} 2 threads vs 1"),
            9,
            1,
            || two.install(|| verifier.admit_batch(caps)),
            || one.install(|| verifier.admit_batch(caps)),
        );
    }
    paired(
        "batch: raw_es256_verify 2 threads vs 1",
        9,
        1,
        || two.install(raw),
        || one.install(raw),
    );
}

criterion_group!(benches, batch);
criterion_main!(benches);
