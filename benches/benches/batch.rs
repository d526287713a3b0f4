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

mod common;

use std::hint::black_box;
use std::time::Duration;

use capsule_tests::Signer;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use serde_json::json;
use verify_core::HashMode;

use common::{small_manifest, Env};

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
    for (name, caps) in [
        ("admit_batch", &repeated),
        ("admit_batch_distinct", &distinct),
    ] {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("rayon pool");
            let decisions = pool.install(|| verifier.admit_batch(caps));
            assert!(
                decisions.iter().all(|d| d.is_admit()),
                "every capsule is admitted"
            );
            g.bench_function(format!("{name}/{threads}_thread"), |b| {
                b.iter(|| pool.install(|| verifier.admit_batch(black_box(caps))))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, batch);
criterion_main!(benches);
