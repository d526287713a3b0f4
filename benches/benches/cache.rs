//! Re-admission of one small capsule with the verification cache (issue 17, item 2),
//! single-threaded, in one run beside what it is bound by:
//!
//! - `cached/verify`: `Verifier::verify` of the small capsule (`common::small_manifest`,
//!   ES256, one 38-byte artifact) read from its directory, the policy's cache warm:
//!   every call is a hit. It still reads `capsule.jws`, hashes it, parses the header
//!   (the cache key needs the kid), runs every policy, time and state check and opens,
//!   reads and hashes the artifact.
//! - `cached/verify-pinned`: the same capsule with its JWS in memory and its root
//!   pinned (what the service hands the verifier).
//! - `uncached/verify`: the same capsule under a policy whose cache is off
//!   (capacity 0): the admission of `benches/admission.rs`.
//! - `raw/aws-lc-parsed`: the ECDSA P-256 verify alone, the key parsed once.
//! - `sha256/jws+artifact`: the two SHA-256 a hit still computes (the JWS digest and
//!   the artifact's), on bytes in memory.
//! - `artifact/open+read+sha256`: what hashing one artifact costs from disk: open the
//!   file beneath `files/`, `fstat`, read, SHA-256 (`Root::check`).
//!
//! `paired` lines give the ratios measured in alternating blocks (see `common::paired`).
//! Re-admissions per second per core = 1 / `cached/verify`.

mod common;

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::signature;
use capsule_tests::{Signer, RUN_SH};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use verify_core::digest::HashMode;
use verify_core::keys::KeyMaterial;
use verify_core::manifest::{ArtifactPath, FileEntry};
use verify_core::{jws, Capsule, Sha256Digest, Verifier};

use common::{paired, small_manifest, Env};

const ROUNDS: usize = 41;

fn cache(c: &mut Criterion) {
    let env = Env::new();
    let manifest = small_manifest(&env.world);
    let cap = env.signed("small-es", &manifest, Signer::Es256);
    let backend = env.policy.backend;

    // Two policies from the same files: the cache on (default capacity), and off.
    let mut cached_policy = env.world.policy();
    cached_policy.set_verify_cache_capacity(verify_core::verify_cache::DEFAULT_CAPACITY);
    let mut uncached_policy = env.world.policy();
    uncached_policy.set_verify_cache_capacity(0);
    let with = |policy| Verifier {
        policy,
        ..env.verifier(HashMode::default())
    };
    let cached = with(&cached_policy);
    let uncached = with(&uncached_policy);
    let pinned = Capsule::from_bytes(&cap.jws, cap.capsule.source().clone()).pinned();
    assert!(cached.verify(&cap.capsule).is_ok(), "admitted (and cached)");
    assert!(uncached.verify(&cap.capsule).is_ok(), "admitted uncached");
    assert!(cached.verify(&pinned).is_ok());
    let hits = cached_policy.verify_cache().hits();
    assert!(cached.verify(&cap.capsule).is_ok());
    assert_eq!(cached_policy.verify_cache().hits(), hits + 1, "a hit");

    let point = match &env.world.es.material {
        KeyMaterial::Es256 { point, .. } => *point,
        KeyMaterial::Hs256 { .. } => unreachable!("fixture es key is ES256"),
    };
    let parts = jws::split(&cap.jws).expect("three parts");
    let sig = verify_core::b64::decode(parts.signature).expect("b64 signature");
    let signing_input = parts.signing_input;
    let parsed = signature::ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .expect("valid point");
    assert!(parsed.verify_sig(signing_input, &sig).is_ok());

    let entry = FileEntry {
        path: ArtifactPath::parse("run.sh").expect("path"),
        sha256: Sha256Digest(backend.sha256_oneshot(RUN_SH)),
        size: RUN_SH.len() as u64,
        is_tool: false,
    };
    let root = cap.capsule.source().open().expect("files/ opens");

    let hit = || cached.verify(black_box(&cap.capsule)).is_ok();
    let hit_pinned = || cached.verify(black_box(&pinned)).is_ok();
    let miss = || uncached.verify(black_box(&cap.capsule)).is_ok();
    let ecdsa = || {
        parsed
            .verify_sig(black_box(signing_input), black_box(&sig))
            .is_ok()
    };
    let hashes = || {
        (
            backend.sha256_oneshot(black_box(&cap.jws)),
            backend.sha256_oneshot(black_box(RUN_SH)),
        )
    };
    let artifact = || {
        root.check(black_box(&entry), HashMode::default(), backend)
            .is_ok()
    };
    assert!(artifact());

    let mut g = c.benchmark_group("cache_es256");
    g.sample_size(60)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    g.bench_function("cached/verify", |b| b.iter(hit));
    g.bench_function("cached/verify-pinned", |b| b.iter(hit_pinned));
    g.bench_function("uncached/verify", |b| b.iter(miss));
    g.bench_function("raw/aws-lc-parsed", |b| b.iter(ecdsa));
    g.bench_function("sha256/jws+artifact", |b| b.iter(hashes));
    g.bench_function("artifact/open+read+sha256", |b| b.iter(artifact));
    g.finish();

    let block = 100;
    paired(
        "cache: cached/verify vs uncached/verify",
        ROUNDS,
        block,
        hit,
        miss,
    );
    paired(
        "cache: cached/verify vs raw/aws-lc-parsed",
        ROUNDS,
        block,
        hit,
        ecdsa,
    );
    paired(
        "cache: cached/verify-pinned vs raw/aws-lc-parsed",
        ROUNDS,
        block,
        hit_pinned,
        ecdsa,
    );
    paired(
        "cache: cached/verify-pinned vs artifact/open+read+sha256",
        ROUNDS,
        block,
        hit_pinned,
        artifact,
    );
    let c = cached_policy.verify_cache();
    println!(
        "cache: {} hits, {} misses, {} entries",
        c.hits(),
        c.misses(),
        c.len()
    );
}

criterion_group!(benches, cache);
criterion_main!(benches);
