//! Batch admission: 10,000 ES256 capsules through `Verifier::admit_batch` on a rayon
//! pool of 1 thread and of 2 threads, in the same run.
//!
//! The batch is the small capsule of the admission bench (1 KiB manifest, one
//! 38-byte artifact) repeated 10,000 times: the same `Capsule` cloned (the JWS bytes
//! are shared through an `Arc`, the files are one capsule directory). Every element
//! is still verified from scratch — signature, manifest, policy checks, open + hash
//! of the artifact — since the verifier caches nothing; what repetition removes is
//! only the cache-miss cost of 10,000 distinct JWS buffers (≈14 MiB, beyond L2).

mod common;

use std::hint::black_box;
use std::time::Duration;

use capsule_tests::Signer;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use verify_core::HashMode;

use common::{small_manifest, Env};

const BATCH: usize = 10_000;

fn batch(c: &mut Criterion) {
    let env = Env::new();
    let cap = env.signed("small-es", &small_manifest(&env.world), Signer::Es256);
    let caps = vec![cap.capsule.clone(); BATCH];
    let verifier = env.verifier(HashMode::Read);

    let mut g = c.benchmark_group("batch_10k_es256");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(BATCH as u64));
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("rayon pool");
        let decisions = pool.install(|| verifier.admit_batch(&caps));
        assert!(
            decisions.iter().all(|d| d.is_admit()),
            "every capsule is admitted"
        );
        g.bench_function(format!("admit_batch/{threads}_thread"), |b| {
            b.iter(|| pool.install(|| verifier.admit_batch(black_box(&caps))))
        });
    }
    g.finish();
}

criterion_group!(benches, batch);
criterion_main!(benches);
