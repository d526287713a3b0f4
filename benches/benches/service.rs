//! The service's admission pipeline in process, no network: 10,000 admissions of the
//! small ES256 capsule submitted to `serve`'s `Batcher` (micro-batches verified on its
//! two worker threads, group-committed in the durable redb state before the answers go
//! out), artifacts resolved from the service's blob store. This is the in-process
//! batch rate the service over mTLS is compared with (`scripts/bench-service.sh`),
//! next to `batch_10k_es256/admit_batch` (verification alone, nothing recorded).

mod common;

use std::sync::Arc;
use std::time::Duration;

use capsule_gateway::admission::{system_clock, Admission};
use capsule_gateway::serve::batcher::{Admissions, Batcher};
use capsule_gateway::serve::blobs::BlobStore;
use capsule_gateway::serve::config::BatchConfig;
use capsule_gateway::serve::metrics::Metrics;
use capsule_gateway::state::State;
use capsule_tests::{sha256_hex, Signer, RUN_SH};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use verify_core::{Capsule, HashMode, Sha256Digest};

use common::{small_manifest, Env};

const ADMISSIONS: usize = 10_000;

/// The allocator the `capsule-gateway` binary ships with (gateway/src/main.rs), so
/// that the service and this in-process twin are compared on the same one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn pipeline(c: &mut Criterion) {
    let env = Env::new();
    let cap = env.signed("small-es", &small_manifest(&env.world), Signer::Es256);
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = BlobStore::open(&dir.path().join("blobs")).expect("blob store");
    let digest = Sha256Digest::from_hex(&sha256_hex(RUN_SH)).expect("digest");
    let mut upload = blobs.begin(digest, 1 << 20).expect("upload");
    upload.write(RUN_SH).expect("write");
    upload.finish().expect("stored");

    let clock = system_clock();
    let state = State::open(&dir.path().join("state"), true, clock.as_ref())
        .expect("state")
        .expect("created");
    // Every admission in full, as the service phases of scripts/bench-service.sh run
    // them (cache off): the same capsule is submitted each time, so with the cache on
    // this would measure cache hits.
    let mut policy = env.world.policy();
    policy.set_verify_cache_capacity(0);
    let admissions = Arc::new(Admissions {
        admission: Admission::new(policy, clock, HashMode::Auto).with_open_state(state),
    });
    let config = BatchConfig {
        queue: ADMISSIONS,
        threads: 2,
        ..BatchConfig::default()
    };
    let batcher = Batcher::start(admissions, &config, Arc::new(Metrics::new())).expect("batcher");
    let capsule = Capsule::from_bytes(&cap.jws, blobs.source()).with_root(blobs.root());
    let runner = env.runner.clone();
    let run = || {
        let replies: Vec<_> = (0..ADMISSIONS)
            .map(|_| {
                batcher
                    .submit(capsule.clone(), runner.clone())
                    .expect("queue has room for the whole batch")
            })
            .collect();
        replies
            .into_iter()
            .map(|rx| rx.blocking_recv().expect("answer").expect("recorded"))
            .filter(Result::is_ok)
            .count()
    };
    assert_eq!(run(), ADMISSIONS, "every admission is admitted");
    // The CPU the pipeline spends per admission (all its threads, from /proc), the
    // figure the service's own is compared with (`scripts/bench-service.sh`).
    let rounds = 5;
    let before = process_cpu_s();
    for _ in 0..rounds {
        run();
    }
    let per = (process_cpu_s() - before) / (rounds * ADMISSIONS) as f64;
    println!("in-process CPU per admission: {:.1} us", per * 1e6);

    let mut g = c.benchmark_group("service_pipeline_10k_es256");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(ADMISSIONS as u64));
    g.bench_function("batcher_durable/2_thread", |b| b.iter(run));
    g.finish();
    batcher.shutdown();
}

/// This process's user + system CPU seconds so far (fields 14 and 15 of
/// /proc/self/stat, in USER_HZ ticks: 100 per second on Linux).
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|x| x.parse().expect("ticks"))
        .collect();
    (f[0] + f[1]) as f64 / 100.0
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
