//! Admission of one small capsule, single-threaded, against its peers on the same bytes.
//!
//! The capsule: the capsule-tests fixture manifest with no tools, one 38-byte artifact
//! (`run.sh`) and `env` padded so the manifest is 1024 bytes (see `common`). Every
//! contender in a group verifies the *same* compact JWS:
//!
//! - `ours/verify`: `Verifier::verify` with the default `HashMode` (`Auto`: `read()`
//!   for a file this small), the real admission: JWS digest, strict JWS, manifest
//!   parse and every policy check, then `open(files/)` + `openat2` + `fstat` + read +
//!   SHA-256 of the artifact.
//! - `ours/jws+manifest`: `jws::verify` + `Manifest::parse` only (no policy checks, no
//!   artifact) — an extra, to split the cost.
//! - `raw/aws-lc-unparsed`: `UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
//!   .verify(signing_input, sig)` on the pre-split signing input and pre-decoded
//!   signature: the signature check and nothing else.
//! - `raw/aws-lc-parsed`: the same with a `ParsedPublicKey` built once (what our
//!   backend holds).
//! - `jsonwebtoken`: `jsonwebtoken::decode::<serde_json::Value>` (aws_lc_rs backend)
//!   with a `Validation` that checks the signature only (no required claims, no exp,
//!   no aud).
//!
//! HS256 is the same with the fixture's HS256 key (`raw/aws-lc-hmac` is
//! `hmac::verify` with a prepared `hmac::Key`).
//!
//! `components` splits `ours/verify` into its parts (ES256 capsule), and measures
//! variants: the artifact root pinned at load (`Capsule::pinned`) instead of opened per
//! verification, mmap hashing of the tiny artifact, and the standard fixture capsule
//! (run.sh + one tool = two files: the case where the verifier chooses between hashing
//! on the calling thread and rayon `find_map_first`), called from the bench thread
//! (outside any pool) and from inside a 2-thread pool.
//!
//! `governance` (issue 13): under the governance fixture policy, a `production` capsule
//! of `acme-governed` with 3 signed approvals (alice, bob, carol: three more ES256
//! verifications, one `approvals/` listing, three file reads) against the same tenant's
//! approval-free `staging` capsule (one failed `openat` of `approvals/`).
//!
//! After the criterion groups, `paired` lines give the ratios of the key pairs measured
//! in alternating blocks (see `paired`): on a shared VM they are steadier than the
//! ratio of two medians taken a minute apart.

mod common;

use std::collections::HashSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::{hmac, signature};
use capsule_tests::Signer;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use verify_core::keys::KeyMaterial;
use verify_core::manifest::{ArtifactPath, FileEntry};
use verify_core::{jws, HashMode, Manifest, Sha256Digest};

use common::{paired, small_manifest, Env, Signed};

/// Rounds of each paired measurement (see `common::paired`).
const ROUNDS: usize = 41;

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(60)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
}

/// A `Validation` for `alg` that checks the signature and nothing about the claims
/// (the capsule manifest has no `exp`/`aud`; our validity checks are not in it either).
fn signature_only(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.required_spec_claims = HashSet::new();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v
}

/// Signing input and decoded signature of a compact JWS, split once, outside the loop.
fn split(jws_bytes: &[u8]) -> (&[u8], Vec<u8>) {
    let parts = jws::split(jws_bytes).expect("three parts");
    let sig = verify_core::b64::decode(parts.signature).expect("b64 signature");
    (parts.signing_input, sig)
}

fn es256(c: &mut Criterion, env: &Env, cap: &Signed) {
    let verifier = env.verifier(HashMode::default());
    let max = env.policy.limits.max_jws_bytes;
    assert!(
        verifier.verify(&cap.capsule).is_ok(),
        "small ES256 capsule is admitted"
    );

    let point = match &env.world.es.material {
        KeyMaterial::Es256 { point, .. } => *point,
        KeyMaterial::Hs256 { .. } => unreachable!("fixture es key is ES256"),
    };
    let (signing_input, sig) = split(&cap.jws);
    let unparsed = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point);
    let parsed = signature::ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .expect("valid point");
    assert!(unparsed.verify(signing_input, &sig).is_ok());
    assert!(parsed.verify_sig(signing_input, &sig).is_ok());

    let jwk = env.world.es.to_json(false);
    let (x, y) = (jwk["x"].as_str().expect("x"), jwk["y"].as_str().expect("y"));
    let jwt_key = DecodingKey::from_ec_components(x, y).expect("jsonwebtoken EC key");
    let validation = signature_only(Algorithm::ES256);
    let decoded = jsonwebtoken::decode::<serde_json::Value>(&cap.jws, &jwt_key, &validation)
        .expect("jsonwebtoken accepts the capsule");
    let payload = jws::verify(&cap.jws, &env.policy.keys, max)
        .expect("jws")
        .payload;
    assert_eq!(
        decoded.claims,
        serde_json::from_slice::<serde_json::Value>(&payload).expect("json")
    );

    let ours = || verifier.verify(black_box(&cap.capsule)).is_ok();
    let ours_jws_manifest = || {
        let v = jws::verify(black_box(&cap.jws), &env.policy.keys, max).expect("jws");
        Manifest::parse(&v.payload).expect("manifest")
    };
    let raw_unparsed = || {
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, black_box(&point))
            .verify(black_box(signing_input), black_box(&sig))
            .is_ok()
    };
    let raw_parsed = || {
        parsed
            .verify_sig(black_box(signing_input), black_box(&sig))
            .is_ok()
    };
    let jwt = || {
        jsonwebtoken::decode::<serde_json::Value>(black_box(&cap.jws), &jwt_key, &validation)
            .expect("decode")
    };

    let mut g = c.benchmark_group("admission_es256");
    configure(&mut g);
    g.bench_function("ours/verify", |b| b.iter(ours));
    g.bench_function("ours/jws+manifest", |b| b.iter(ours_jws_manifest));
    g.bench_function("raw/aws-lc-unparsed", |b| b.iter(raw_unparsed));
    g.bench_function("raw/aws-lc-parsed", |b| b.iter(raw_parsed));
    g.bench_function("jsonwebtoken", |b| b.iter(jwt));
    g.finish();

    let block = 100;
    paired(
        "es256: ours/verify vs raw/aws-lc-unparsed",
        ROUNDS,
        block,
        ours,
        raw_unparsed,
    );
    paired(
        "es256: ours/verify vs raw/aws-lc-parsed",
        ROUNDS,
        block,
        ours,
        raw_parsed,
    );
    paired(
        "es256: ours/jws+manifest vs raw/aws-lc-unparsed",
        ROUNDS,
        block,
        ours_jws_manifest,
        raw_unparsed,
    );
    paired(
        "es256: ours/jws+manifest vs raw/aws-lc-parsed",
        ROUNDS,
        block,
        ours_jws_manifest,
        raw_parsed,
    );
    paired(
        "es256: ours/verify vs jsonwebtoken",
        ROUNDS,
        block,
        ours,
        jwt,
    );
    paired(
        "es256: ours/jws+manifest vs jsonwebtoken",
        ROUNDS,
        block,
        ours_jws_manifest,
        jwt,
    );
}

fn hs256(c: &mut Criterion, env: &Env, cap: &Signed) {
    let verifier = env.verifier(HashMode::default());
    let max = env.policy.limits.max_jws_bytes;
    assert!(
        verifier.verify(&cap.capsule).is_ok(),
        "small HS256 capsule is admitted"
    );

    let secret = match &env.world.hs.material {
        KeyMaterial::Hs256 { secret } => secret.to_vec(),
        KeyMaterial::Es256 { .. } => unreachable!("fixture hs key is HS256"),
    };
    let (signing_input, tag) = split(&cap.jws);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
    assert!(hmac::verify(&key, signing_input, &tag).is_ok());

    let jwt_key = DecodingKey::from_secret(&secret);
    let validation = signature_only(Algorithm::HS256);
    jsonwebtoken::decode::<serde_json::Value>(&cap.jws, &jwt_key, &validation)
        .expect("jsonwebtoken accepts the capsule");

    let ours = || verifier.verify(black_box(&cap.capsule)).is_ok();
    let ours_jws_manifest = || {
        let v = jws::verify(black_box(&cap.jws), &env.policy.keys, max).expect("jws");
        Manifest::parse(&v.payload).expect("manifest")
    };
    let raw_hmac = || hmac::verify(&key, black_box(signing_input), black_box(&tag)).is_ok();
    let jwt = || {
        jsonwebtoken::decode::<serde_json::Value>(black_box(&cap.jws), &jwt_key, &validation)
            .expect("decode")
    };

    let mut g = c.benchmark_group("admission_hs256");
    configure(&mut g);
    g.bench_function("ours/verify", |b| b.iter(ours));
    g.bench_function("ours/jws+manifest", |b| b.iter(ours_jws_manifest));
    g.bench_function("raw/aws-lc-hmac", |b| b.iter(raw_hmac));
    g.bench_function("jsonwebtoken", |b| b.iter(jwt));
    g.finish();

    let block = 500;
    paired(
        "hs256: ours/verify vs jsonwebtoken",
        ROUNDS,
        block,
        ours,
        jwt,
    );
    paired(
        "hs256: ours/jws+manifest vs jsonwebtoken",
        ROUNDS,
        block,
        ours_jws_manifest,
        jwt,
    );
    paired(
        "hs256: ours/verify vs raw/aws-lc-hmac",
        ROUNDS,
        block,
        ours,
        raw_hmac,
    );
}

/// The parts of `ours/verify` (ES256 small capsule), and two variants of it.
fn components(c: &mut Criterion, env: &Env, cap: &Signed, fixture: &Signed) {
    let max = env.policy.limits.max_jws_bytes;
    let backend = env.policy.backend;
    let payload = jws::verify(&cap.jws, &env.policy.keys, max)
        .expect("jws")
        .payload;
    let run_sh = FileEntry {
        path: ArtifactPath::parse("run.sh").expect("path"),
        sha256: Sha256Digest(backend.sha256_oneshot(capsule_tests::RUN_SH)),
        size: capsule_tests::RUN_SH.len() as u64,
        is_tool: false,
    };
    let source = cap.capsule.source();
    let root = source.open().expect("open files/");
    root.check(&run_sh, HashMode::Read, backend)
        .expect("run.sh checks");
    let read = env.verifier(HashMode::default());
    let mmap = env.verifier(HashMode::Mmap);
    assert!(mmap.verify(&cap.capsule).is_ok());
    assert!(
        read.verify(&fixture.capsule).is_ok(),
        "standard fixture capsule is admitted"
    );

    let mut g = c.benchmark_group("admission_components");
    configure(&mut g);
    g.bench_function("jws_sha256", |b| {
        b.iter(|| backend.sha256_oneshot(black_box(&cap.jws)))
    });
    g.bench_function("jws_verify", |b| {
        b.iter(|| jws::verify(black_box(&cap.jws), &env.policy.keys, max).expect("jws"))
    });
    g.bench_function("manifest_parse", |b| {
        b.iter(|| Manifest::parse(black_box(&payload)).expect("manifest"))
    });
    g.bench_function("artifact_open+check", |b| {
        b.iter(|| {
            let root = black_box(source).open().expect("open");
            root.check(black_box(&run_sh), HashMode::Read, backend)
        })
    });
    g.bench_function("artifact_check", |b| {
        b.iter(|| root.check(black_box(&run_sh), HashMode::Read, backend))
    });
    // The artifact root opened once, when the capsule is loaded (`Capsule::pinned`, what
    // a service does with its blob store), instead of at every verification.
    let pinned = cap.capsule.clone().pinned();
    assert!(read.verify(&pinned).is_ok());
    g.bench_function("ours/verify_pinned_root", |b| {
        b.iter(|| read.verify(black_box(&pinned)))
    });
    g.bench_function("ours/verify_mmap", |b| {
        b.iter(|| mmap.verify(black_box(&cap.capsule)))
    });
    g.bench_function("ours/verify_fixture_2_files", |b| {
        b.iter(|| read.verify(black_box(&fixture.capsule)))
    });
    // The same, called from a worker of a 2-thread pool (as `admit_batch` does): the
    // files' `par_iter` is then a nested, "hot" rayon call instead of a cold injection
    // from a thread outside the pool.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("rayon pool");
    g.bench_function("ours/verify_fixture_2_files_in_pool", |b| {
        b.iter_custom(|iters| {
            pool.install(|| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(read.verify(black_box(&fixture.capsule)).is_ok());
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    let ours = || read.verify(black_box(&cap.capsule)).is_ok();
    let artifact = || {
        let root = black_box(source).open().expect("open");
        root.check(black_box(&run_sh), HashMode::Read, backend)
            .is_ok()
    };
    let block = 100;
    // B/A here is the share of `ours/verify` that B takes (or B's slowdown, above 1).
    paired(
        "components: ours/verify vs artifact_open+check",
        ROUNDS,
        block,
        ours,
        artifact,
    );
    paired(
        "components: ours/verify vs ours/verify_pinned_root",
        ROUNDS,
        block,
        ours,
        || read.verify(black_box(&pinned)).is_ok(),
    );
    paired(
        "components: ours/verify vs ours/verify_fixture_2_files",
        ROUNDS,
        block,
        ours,
        || read.verify(black_box(&fixture.capsule)).is_ok(),
    );
}

fn admission(c: &mut Criterion) {
    let env = Env::new();
    let manifest = small_manifest(&env.world);
    let es = env.signed("small-es", &manifest, Signer::Es256);
    let hs = env.signed("small-hs", &manifest, Signer::Hs256);
    let fixture = env.signed("fixture-es", &env.world.manifest(), Signer::Es256);
    eprintln!(
        "small capsule: manifest {} bytes, ES256 JWS {} bytes, HS256 JWS {} bytes",
        manifest.to_string().len(),
        es.jws.len(),
        hs.jws.len()
    );
    es256(c, &env, &es);
    hs256(c, &env, &hs);
    components(c, &env, &es, &fixture);
}

/// Admission with 3 signed approvals against an approval-free capsule (same tenant,
/// same files), with the verifier the CLI builds (`gvisor` provided).
fn governance(c: &mut Criterion) {
    use capsule_tests::governance::{ALICE, BOB, CAROL};
    let env = Env::new();
    let w = &env.world;
    let mut policy = w.governance_policy_with(w.backend);
    // The same capsules are admitted each iteration: without this, a cache hit.
    policy.set_verify_cache_capacity(0);
    let tiers = [verify_core::Tier::Gvisor];
    let v = verify_core::Verifier {
        policy: &policy,
        governance: verify_core::Governance {
            host_tiers: &tiers,
            ..Default::default()
        },
        ..env.verifier(HashMode::Auto)
    };
    let free = w.capsule("gov-free", &w.governed_manifest("staging"), Signer::Es256);
    let approved = w.capsule("gov-3", &w.governed_manifest("production"), Signer::Es256);
    w.approve(&approved, ALICE, "sre-lead");
    w.approve(&approved, BOB, "security");
    w.approve(&approved, CAROL, "sre-lead");
    let limit = policy.limits.max_jws_bytes;
    let free = verify_core::Capsule::from_dir(&free, limit);
    let approved = verify_core::Capsule::from_dir(&approved, limit);
    assert!(v.verify(&free).is_ok() && v.verify(&approved).is_ok());
    let mut group = c.benchmark_group("governance");
    configure(&mut group);
    group.bench_function("approval-free", |b| {
        b.iter(|| v.verify(black_box(&free)).is_ok())
    });
    group.bench_function("3-signed-approvals", |b| {
        b.iter(|| v.verify(black_box(&approved)).is_ok())
    });
    group.finish();
}

criterion_group!(benches, admission, governance);
criterion_main!(benches);
