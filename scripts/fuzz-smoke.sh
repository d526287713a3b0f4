#!/usr/bin/env bash
# Runs every cargo-fuzz target for a short fixed time (FUZZ_SECONDS, default 30) and
# fails on any crash, leak, timeout or out-of-memory. Needs the nightly toolchain and
# cargo-fuzz (scripts/install-deps.sh installs cargo-fuzz from crates.io).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-30}

# target:max_len, chosen per format (a JWS or manifest is bounded by max_jws_bytes; a
# manifest for oci_spec is about 1 KiB; a run event with its JWS and outputs about 4 KiB).
targets="jws_verify:16384 manifest_signed:16384 policy_toml:8192 jwks:8192 paths_and_ids:4200 base64url:4096 oci_spec:8192 evidence:16384 service_requests:4096"

cargo +nightly fuzz build -O
for entry in $targets; do
  target=${entry%%:*}
  max_len=${entry##*:}
  echo "== fuzz $target for ${seconds}s (max_len $max_len)"
  # A private copy of the seeds, so a smoke run never changes the committed corpus.
  work=$(mktemp -d)
  cp corpus/"$target"/seed-* "$work"/
  # A target's own dictionary when it has one (evidence.dict), else the JSON/JWS one.
  dict=jws.dict
  if [ -f "$target.dict" ]; then dict=$target.dict; fi
  status=0
  cargo +nightly fuzz run -O "$target" "$work" -- \
    -max_total_time="$seconds" -max_len="$max_len" -dict="$dict" \
    -timeout=10 -rss_limit_mb=2048 -detect_leaks=1 -print_final_stats=1 \
    >"$work.log" 2>&1 || status=$?
  grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::average_exec_per_sec)|ERROR|SUMMARY|panicked" "$work.log" || true
  if [ "$status" -ne 0 ]; then tail -40 "$work.log" >&2; fi
  rm -rf "$work" "$work.log"
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $target failed (exit $status); the crashing input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
