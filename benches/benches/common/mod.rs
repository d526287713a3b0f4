//! Fixtures shared by the `admission` and `batch` benches: the capsule-tests `World`
//! (fresh keys, JWKS, policy on disk) and the "small capsule" every admission bench
//! uses, so that the numbers of both benches are about the same bytes.

#![allow(dead_code)] // each bench binary uses a different part of this module

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use capsule_tests::{Signer, World, RUNNER};
use serde_json::{json, Value};
use verify_core::{Capsule, FixedClock, HashMode, NoHistory, Policy, SpiffeId, Verifier};

/// Size of the small capsule's manifest (the JWS payload, before base64url).
pub const SMALL_PAYLOAD_BYTES: usize = 1024;

/// A world with its policy loaded and everything a `Verifier` borrows.
pub struct Env {
    pub world: World,
    pub policy: Policy,
    pub runner: SpiffeId,
    pub clock: FixedClock,
}

impl Env {
    pub fn new() -> Env {
        let world = World::new();
        let mut policy = world.policy();
        // These benches measure every admission in full, its signature check
        // included: the verification cache is measured by `benches/cache.rs`.
        policy.set_verify_cache_capacity(0);
        let clock = FixedClock(world.now);
        Env {
            world,
            policy,
            runner: SpiffeId::parse(RUNNER).expect("runner id"),
            clock,
        }
    }

    /// The verifier the gateway would use: clock fixed at the world's `now` (so a
    /// long run cannot drift across a validity edge), no
    /// anti-rollback history, the fixtures' runner identity.
    pub fn verifier(&self, hash_mode: HashMode) -> Verifier<'_> {
        Verifier {
            policy: &self.policy,
            clock: &self.clock,
            rollback: &NoHistory,
            runner: Some(&self.runner),
            hash_mode,
            governance: Default::default(),
        }
    }

    /// Signs `manifest` and writes it as capsule directory `name`.
    pub fn signed(&self, name: &str, manifest: &Value, signer: Signer) -> Signed {
        let dir = self.world.capsule(name, manifest, signer);
        let jws = std::fs::read(dir.join("capsule.jws")).expect("read jws");
        let capsule = Capsule::from_dir(&dir, self.policy.limits.max_jws_bytes);
        Signed { dir, jws, capsule }
    }
}

/// One signed capsule: its directory, its exact JWS bytes, and the `Capsule` handed
/// to the verifier (JWS already in memory, files looked up in `dir/files`).
pub struct Signed {
    pub dir: PathBuf,
    pub jws: Vec<u8>,
    pub capsule: Capsule,
}

/// The fixture manifest with no tools (one artifact: `run.sh`, 38 bytes) and its
/// `env` padded with `PAD` so that the serialized manifest is exactly
/// [`SMALL_PAYLOAD_BYTES`] long. One file means `check_artifacts` takes its
/// single-file path (no rayon hop): the latency of one admission, not of a fan-out.
pub fn small_manifest(world: &World) -> Value {
    let mut m = world.manifest();
    m["tools"] = json!([]);
    m["env"]["PAD"] = json!("");
    let base = m.to_string().len();
    assert!(
        base < SMALL_PAYLOAD_BYTES,
        "fixture manifest is already {base} bytes"
    );
    m["env"]["PAD"] = json!("p".repeat(SMALL_PAYLOAD_BYTES - base));
    assert_eq!(m.to_string().len(), SMALL_PAYLOAD_BYTES);
    m
}

/// A paired A/B measurement printed after the criterion groups, because sequential
/// criterion runs of two contenders see different background noise on a shared VM
/// (±10 % drift over seconds here). `rounds` rounds, each timing a block of `block`
/// calls of `a` and of `b` back to back (order alternating per round); per round the
/// ratio `time(b) / time(a)`, i.e. the throughput of `a` relative to `b`. Prints the
/// median per-call times and the median ratio with its quartiles.
pub fn paired<A, B>(
    name: &str,
    rounds: usize,
    block: u32,
    mut a: impl FnMut() -> A,
    mut b: impl FnMut() -> B,
) {
    let mut time_block = |first: bool| {
        let start = Instant::now();
        for _ in 0..block {
            if first {
                black_box(a());
            } else {
                black_box(b());
            }
        }
        start.elapsed().as_secs_f64() / f64::from(block)
    };
    time_block(true); // warm-up
    time_block(false);
    let (mut ta, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (x, y) = if round.is_multiple_of(2) {
            let x = time_block(true);
            (x, time_block(false))
        } else {
            let y = time_block(false);
            (time_block(true), y)
        };
        ta.push(x);
        tb.push(y);
        ratio.push(y / x);
    }
    // The k-th quartile (k = 1, 2, 3): index (n - 1) k / 4 of the sorted values.
    let quartile = |v: &mut Vec<f64>, k: usize| {
        v.sort_by(f64::total_cmp);
        v[(v.len() - 1) * k / 4]
    };
    println!(
        "paired {name}: A {:.3} µs, B {:.3} µs per call; throughput A/B = {:.3} (q1 {:.3}, q3 {:.3}), {rounds} rounds of {block}",
        quartile(&mut ta, 2) * 1e6,
        quartile(&mut tb, 2) * 1e6,
        quartile(&mut ratio, 2),
        quartile(&mut ratio, 1),
        quartile(&mut ratio, 3),
    );
}
