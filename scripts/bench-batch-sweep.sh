#!/usr/bin/env bash
# Batch size / wait against p99 at a fixed offered rate (70 % of the saturated rate that
# scripts/bench-service.sh printed), on the state and capsule that script left in
# target/bench-service (run it first); the cache off, as in its service phases.
# Usage: RATE=N [CONNS=256] [HTTP2=1] [DUR=10] scripts/bench-batch-sweep.sh  (CSV on stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${RATE:?}
conns=${CONNS:-256}
dur=${DUR:-10}
gw=$PWD/target/release/capsule-gateway
loadgen=$PWD/target/release/capsule-loadgen
work=$PWD/target/bench-service
conf=$work/state/dev/gateway.toml
cp "$conf" "$work/sweep.orig"
echo "max_size,max_wait_us,achieved_rps,p50_ms,p90_ms,p99_ms,p999_ms,send_lag_p99_ms"
for cfg in "128 200" "64 200" "32 100" "16 50" "128 1000" "8 0"; do
  set -- $cfg
  cp "$work/sweep.orig" "$conf"
  printf '\n[cache]\ncapacity = 0\n\n[batch]\nmax_size = %s\nmax_wait_us = %s\n' "$1" "$2" >>"$conf"
  "$gw" serve --state "$work/state" --listen 127.0.0.1:0 2>"$work/sweep-serve.log" &
  pid=$!
  for _ in $(seq 100); do grep -q "serving on" "$work/sweep-serve.log" && break; sleep 0.1; done
  addr=$(grep -o 'serving on https://[0-9.:]*' "$work/sweep-serve.log" | sed 's#serving on https://##')
  "$loadgen" --url "https://$addr" --svid "$work/state/dev/client" --capsule "$work/capsule" \
    --duration "$dur" --json --connections "$conns" --rate "$rate" ${HTTP2:+--http2} >"$work/sweep.json"
  kill "$pid"; wait "$pid" || true
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); l=d['latency_ms']; print(f\"$1,$2,{d['throughput_rps']:.0f},{l['p50']},{l['p90']},{l['p99']},{l['p999']},{d['send_lag_ms']['p99']}\")" "$work/sweep.json"
done
cp "$work/sweep.orig" "$conf"
