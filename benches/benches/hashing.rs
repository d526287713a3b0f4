//! Artifact hashing, page cache warm.
//!
//! `hash_1gib`: one 1 GiB file (pseudo-random bytes, written once, fsynced, read
//! once before measuring) checked through the public digest API — `ArtifactSource::
//! open()` once, then `Root::check(&FileEntry, mode, backend)`, which is what the
//! verifier runs per file: `openat2` + `fstat` + size check + read (or map) + SHA-256 +
//! compare — with `HashMode::Read` and `HashMode::Mmap` (the default `HashMode::Auto`
//! maps files above 1 MiB, so it is `Mmap` here), against
//! `aws_lc_rs::digest::digest(&SHA256, bytes)` over the same 1 GiB already in memory.
//!
//! `hash_2x512mib`: one ES256 capsule with two 512 MiB artifacts (the two halves of
//! the same bytes), no tools, through `Verifier::verify` on a rayon pool of 1 and of
//! 2 threads (the verifier hashes the files with `par_iter().find_map_first`), with
//! `read()` and with mmap.
//!
//! Each group is followed by `paired` lines: the same comparisons timed in alternating
//! rounds, which keeps slow drift of this shared VM out of the ratios.

mod common;

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use aws_lc_rs::digest;
use capsule_tests::Signer;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use serde_json::json;
use verify_core::manifest::{ArtifactPath, FileEntry};
use verify_core::{ArtifactSource, HashMode, Sha256Digest};

use common::{paired, Env};

const GIB: usize = 1 << 30;
const HALF: usize = GIB / 2;

/// 1 GiB that no compressor or dedup could shortcut (xorshift64*).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `bytes` and fsyncs, so no writeback runs while we measure.
fn write_synced(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
    std::fs::File::open(path)
        .expect("open")
        .sync_all()
        .expect("fsync");
}

fn sha256(bytes: &[u8]) -> Sha256Digest {
    let d = digest::digest(&digest::SHA256, bytes);
    Sha256Digest(d.as_ref().try_into().expect("32 bytes"))
}

fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(GIB as u64));
}

fn hashing(c: &mut Criterion) {
    let env = Env::new();
    let backend = env.policy.backend;
    let bytes = pseudo_random(GIB);
    let (half_a, half_b) = bytes.split_at(HALF);

    // One 1 GiB artifact, checked through the digest module.
    let big_dir = env.world.path("big/files");
    write_synced(&big_dir.join("big.bin"), &bytes);
    let big = FileEntry {
        path: ArtifactPath::parse("big.bin").expect("path"),
        sha256: sha256(&bytes),
        size: GIB as u64,
        is_tool: false,
    };
    let root = ArtifactSource::Dir(big_dir).open().expect("open root");
    // Warms the page cache, and proves both modes agree with the digest.
    for mode in [HashMode::Read, HashMode::Mmap] {
        root.check(&big, mode, backend)
            .expect("1 GiB artifact checks");
    }

    let mut g = c.benchmark_group("hash_1gib");
    configure(&mut g);
    g.bench_function("root_check/read", |b| {
        b.iter(|| {
            root.check(black_box(&big), HashMode::Read, backend)
                .expect("check")
        })
    });
    g.bench_function("root_check/mmap", |b| {
        b.iter(|| {
            root.check(black_box(&big), HashMode::Mmap, backend)
                .expect("check")
        })
    });
    g.bench_function("raw/aws-lc-digest", |b| {
        b.iter(|| digest::digest(&digest::SHA256, black_box(&bytes)))
    });
    g.finish();
    // Alternating rounds (see `common::paired`): ours against the raw digest.
    for (name, mode) in [("read", HashMode::Read), ("mmap", HashMode::Mmap)] {
        paired(
            &format!("hash_1gib: root_check/{name} vs raw/aws-lc-digest"),
            7,
            1,
            || root.check(&big, mode, backend).expect("check"),
            || digest::digest(&digest::SHA256, &bytes),
        );
    }

    // One capsule, two 512 MiB artifacts.
    let mut manifest = env.world.manifest();
    manifest["tools"] = json!([]);
    manifest["artifacts"] = json!([
        {"path": "half-a.bin", "sha256": sha256(half_a).to_hex(), "size": HALF},
        {"path": "half-b.bin", "sha256": sha256(half_b).to_hex(), "size": HALF},
    ]);
    // Both halves are data: the program is an allowed host program.
    manifest["entrypoint"] = json!(["/bin/true"]);
    let cap = env.signed("two-halves", &manifest, Signer::Es256);
    write_synced(&cap.dir.join("files/half-a.bin"), half_a);
    write_synced(&cap.dir.join("files/half-b.bin"), half_b);
    drop(bytes);

    let mut g = c.benchmark_group("hash_2x512mib");
    configure(&mut g);
    let pools: Vec<_> = [1, 2]
        .into_iter()
        .map(|threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("rayon pool")
        })
        .collect();
    for (name, mode) in [("read", HashMode::Read), ("mmap", HashMode::Mmap)] {
        let verifier = env.verifier(mode);
        for pool in &pools {
            // Also warms the page cache for the two halves.
            pool.install(|| verifier.verify(&cap.capsule))
                .expect("two-halves capsule is admitted");
            let threads = pool.current_num_threads();
            g.bench_function(format!("verify_{name}/{threads}_thread"), |b| {
                b.iter(|| {
                    pool.install(|| verifier.verify(black_box(&cap.capsule)))
                        .expect("admit")
                })
            });
        }
    }
    g.finish();
    for (name, mode) in [("read", HashMode::Read), ("mmap", HashMode::Mmap)] {
        let verifier = env.verifier(mode);
        let verify_on = |pool: &rayon::ThreadPool| {
            pool.install(|| verifier.verify(&cap.capsule))
                .expect("admit")
        };
        paired(
            &format!("hash_2x512mib: verify_{name} 2 threads vs 1"),
            7,
            1,
            || verify_on(&pools[1]),
            || verify_on(&pools[0]),
        );
    }
}

criterion_group!(benches, hashing);
criterion_main!(benches);
