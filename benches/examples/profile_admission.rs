//! `Verifier::verify` of the admission bench's small capsule in a loop, for a
//! profiler (scripts/profile-admission.sh runs it under `perf record`). One argument
//! picks the case: `es256` (root opened per capsule, the bench's `ours/verify`),
//! `es256-pinned` (`Capsule::pinned`), `hs256`; a second the number of admissions.
//! Prints the mean time per admission (under a profiler, an upper bound).
//!
//! `ratios` instead prints the admission bench's key ratios measured in *CPU time*
//! of this thread (`/proc/thread-self/schedstat`, nanoseconds on the CPU) rather
//! than wall time: on a machine that other work keeps busy, time spent preempted is
//! then not counted against whichever contender it fell on.

#[path = "../benches/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use capsule_tests::Signer;
use verify_core::HashMode;

/// Nanoseconds this thread has run on a CPU.
fn cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    s.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("run time in schedstat")
}

/// Median per-call CPU time of `a` and `b` over alternating blocks, and the median
/// of the per-round ratios time(b) / time(a) (a's throughput relative to b's).
fn cpu_paired(name: &str, block: u32, mut a: impl FnMut() -> bool, mut b: impl FnMut() -> bool) {
    let mut time = |first: bool| {
        let start = cpu_ns();
        for _ in 0..block {
            black_box(if first { a() } else { b() });
        }
        (cpu_ns() - start) as f64 / f64::from(block)
    };
    time(true);
    time(false);
    let (mut ta, mut tb, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..31 {
        let (x, y) = if round % 2 == 0 {
            let x = time(true);
            (x, time(false))
        } else {
            let y = time(false);
            (time(true), y)
        };
        ta.push(x);
        tb.push(y);
        r.push(y / x);
    }
    let q = |v: &mut Vec<f64>, k: usize| {
        v.sort_by(f64::total_cmp);
        v[(v.len() - 1) * k / 4]
    };
    println!(
        "cpu-paired {name}: A {:.3} µs, B {:.3} µs CPU per call; A/B = {:.3} (q1 {:.3}, q3 {:.3})",
        q(&mut ta, 2) / 1e3,
        q(&mut tb, 2) / 1e3,
        q(&mut r, 2),
        q(&mut r, 1),
        q(&mut r, 3)
    );
}

fn ratios(env: &common::Env) {
    use aws_lc_rs::{hmac, signature};
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use verify_core::keys::KeyMaterial;
    let manifest = common::small_manifest(&env.world);
    let es = env.signed("ratios-es", &manifest, Signer::Es256);
    let hs = env.signed("ratios-hs", &manifest, Signer::Hs256);
    let v = env.verifier(HashMode::default());
    let pinned = es.capsule.clone().pinned();
    assert!(v.verify(&es.capsule).is_ok() && v.verify(&pinned).is_ok());
    assert!(v.verify(&hs.capsule).is_ok());
    let split = |jws: &[u8]| {
        let parts = verify_core::jws::split(jws).expect("three parts");
        let sig = verify_core::b64::decode(parts.signature).expect("signature");
        (parts.signing_input.to_vec(), sig)
    };
    let KeyMaterial::Es256 { point, .. } = &env.world.es.material else {
        unreachable!("fixture es key is ES256")
    };
    let parsed =
        signature::ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).expect("point");
    let (es_input, es_sig) = split(&es.jws);
    let raw = || {
        parsed
            .verify_sig(black_box(&es_input), black_box(&es_sig))
            .is_ok()
    };
    cpu_paired(
        "es256: ours/verify vs raw/aws-lc-parsed",
        100,
        || v.verify(black_box(&es.capsule)).is_ok(),
        raw,
    );
    cpu_paired(
        "es256: ours/verify_pinned_root vs raw/aws-lc-parsed",
        100,
        || v.verify(black_box(&pinned)).is_ok(),
        raw,
    );
    let KeyMaterial::Hs256 { secret } = &env.world.hs.material else {
        unreachable!("fixture hs key is HS256")
    };
    let key = DecodingKey::from_secret(secret);
    let mut validation = Validation::new(Algorithm::HS256);
    validation.required_spec_claims = Default::default();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let jwt =
        || jsonwebtoken::decode::<serde_json::Value>(black_box(&hs.jws), &key, &validation).is_ok();
    cpu_paired(
        "hs256: ours/verify vs jsonwebtoken",
        500,
        || v.verify(black_box(&hs.capsule)).is_ok(),
        jwt,
    );
    let max = env.policy.limits.max_jws_bytes;
    cpu_paired(
        "hs256: ours/jws+manifest vs jsonwebtoken",
        500,
        || {
            let p =
                verify_core::jws::verify(black_box(&hs.jws), &env.policy.keys, max).expect("jws");
            verify_core::Manifest::parse(&p.payload).is_ok()
        },
        jwt,
    );
    let (hs_input, tag) = split(&hs.jws);
    let hkey = hmac::Key::new(hmac::HMAC_SHA256, secret);
    cpu_paired(
        "hs256: ours/verify vs raw/aws-lc-hmac",
        500,
        || v.verify(black_box(&hs.capsule)).is_ok(),
        || hmac::verify(&hkey, black_box(&hs_input), black_box(&tag)).is_ok(),
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let case = args.next().unwrap_or_else(|| "es256".into());
    let env = common::Env::new();
    if case == "ratios" {
        ratios(&env);
        return;
    }
    let manifest = common::small_manifest(&env.world);
    let (signer, pinned, default_n) = match case.as_str() {
        "es256" => (Signer::Es256, false, 40_000),
        "es256-pinned" => (Signer::Es256, true, 40_000),
        "hs256" => (Signer::Hs256, false, 400_000),
        other => {
            eprintln!("profile_admission: unknown case `{other}` (es256, es256-pinned, hs256)");
            std::process::exit(2);
        }
    };
    let n: u32 = args
        .next()
        .map(|a| a.parse().expect("a number of admissions"))
        .unwrap_or(default_n);
    let signed = env.signed(&format!("profile-{case}"), &manifest, signer);
    let capsule = if pinned {
        signed.capsule.clone().pinned()
    } else {
        signed.capsule.clone()
    };
    let verifier = env.verifier(HashMode::default());
    assert!(verifier.verify(&capsule).is_ok(), "the capsule is admitted");
    let start = Instant::now();
    for _ in 0..n {
        black_box(verifier.verify(black_box(&capsule)).is_ok());
    }
    let per = start.elapsed().as_secs_f64() / f64::from(n);
    println!("{case}: {n} admissions, {:.2} µs each", per * 1e6);
}
