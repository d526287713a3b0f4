//! Criterion benches live in `benches/benches/` (`admission`, `batch`, `hashing`);
//! the fixtures they share are in `benches/benches/common/`. Results and how to read
//! them: `BENCHMARKS.md` at the repository root.
