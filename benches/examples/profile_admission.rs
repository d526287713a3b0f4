//! `Verifier::verify` of the admission bench's small capsule in a loop, for a
//! profiler (scripts/profile-admission.sh runs it under `perf record`). One argument
//! picks the case: `es256` (root opened per capsule, the bench's `ours/verify`),
//! `es256-pinned` (`Capsule::pinned`), `hs256`; a second the number of admissions.
//! Prints the mean time per admission (under a profiler, an upper bound).

#[path = "../benches/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use capsule_tests::Signer;
use verify_core::HashMode;

fn main() {
    let mut args = std::env::args().skip(1);
    let case = args.next().unwrap_or_else(|| "es256".into());
    let env = common::Env::new();
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
