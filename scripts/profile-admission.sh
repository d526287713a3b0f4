#!/usr/bin/env bash
# Where the time of one in-process admission goes (issue 17): the admission bench's
# small capsule verified in a loop (benches/examples/profile_admission.rs, release
# build) under `perf record` (cpu-clock samples, user and kernel), each sample's
# self time put in one stage by its symbol. Prints the share of each stage per case.
# Usage: scripts/profile-admission.sh [es256|es256-pinned|hs256 ...]   (default: all)
# Needs perf (Debian package linux-perf) and root or kernel.perf_event_paranoid <= 1
# for the kernel's share.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "profile-admission: perf not found (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release -q -p benches --example profile_admission
bin=target/release/examples/profile_admission
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cases=${*:-es256 es256-pinned hs256}
for case in $cases; do
  perf record -q -F 4999 -e cpu-clock -o "$out/$case.data" -- "$bin" "$case" >"$out/$case.txt" 2>/dev/null
  echo "== $case: $(cat "$out/$case.txt")"
  perf report -i "$out/$case.data" --no-children --sort dso,sym --stdio -q 2>/dev/null \
    | python3 scripts/profile-stages.py
done
