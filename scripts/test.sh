#!/usr/bin/env bash
# Runs every check and test. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== format"
cargo fmt --all -- --check
echo "== clippy (--all-targets also compiles the benches; incompatible_msrv holds rust-version)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== rust-version (every member and every locked dependency)"
bash scripts/check-msrv.sh
echo "== cargo deny (bans, licenses, sources: deny.toml; advisories need the network)"
cargo deny check bans licenses sources
echo "== tests (both crypto backends)"
cargo test --workspace --all-features
echo "== tests (default features: aws-lc-rs only)"
cargo test -p verify-core
echo "== fuzz smoke run (every target, ${FUZZ_SECONDS:-30}s each)"
bash scripts/fuzz-smoke.sh
