#!/usr/bin/env bash
# Service figures for BENCHMARKS.md, on this machine, with the project's own load
# generator (no external tool): `serve` with its embedded development default on
# loopback, the small dev capsule (scripts/dev-capsule.sh), mTLS keep-alive
# connections. Three runs: saturated (closed loop, SAT_CONNECTIONS HTTP/1.1
# connections, one request in flight on each), 70 % of the saturated rate (open loop
# over the same SAT_CONNECTIONS HTTP/1.1 connections, so the protocol is the one that
# set the saturated rate), and 2x the saturated rate (open loop over CONNECTIONS
# HTTP/2 connections, each request on its own stream when it is due, so that more
# requests can be outstanding than the server's queue holds: the overload run shows
# how much is shed with 503, the p99 of what is served, the server's peak RSS). Around the overload run, /metrics is read to show that every
# 200 was a verified admission and every 503 a shed one. The load generator runs on
# the same machine and takes its share of the CPU.
# Env: DURATION (s, default 15), SAT_CONNECTIONS (default 256), CONNECTIONS (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${DURATION:-15}
conns=${CONNECTIONS:-16}
sat_conns=${SAT_CONNECTIONS:-256}

cargo build --release -q -p capsule-gateway -p capsule-loadgen
gw=$PWD/target/release/capsule-gateway
loadgen=$PWD/target/release/capsule-loadgen
work=$PWD/target/bench-service
rm -rf "$work"
mkdir -p "$work"

# Each phase gets a fresh server process on the same state, so that the server-side
# histograms read from its /metrics afterwards are that phase's alone.
pid=
start_server() {
  "$gw" serve --state "$work/state" --listen 127.0.0.1:0 2>"$work/serve.log" &
  pid=$!
  for _ in $(seq 100); do
    grep -q "serving on" "$work/serve.log" && break
    sleep 0.1
  done
  addr=$(grep -o 'serving on https://[0-9.:]*' "$work/serve.log" | sed 's#serving on https://##')
  [ -n "$addr" ] || { cat "$work/serve.log" >&2; exit 1; }
}
stop_server() {
  kill "$pid"
  wait "$pid" || true
}
trap 'kill "$pid" 2>/dev/null || true' EXIT
start_server
scripts/dev-capsule.sh "$gw" "$work/state" "$work/capsule"
client=$work/state/dev/client

lg() {
  "$loadgen" --url "https://$addr" --svid "$client" --capsule "$work/capsule" \
    --duration "$duration" --json "$@"
}
# GET /metrics over mTLS with Python's standard library (the chain is verified against
# the bundle; SPIFFE certificates carry no DNS name, so no hostname check).
metrics() {
  python3 - "$addr" "$client" <<'PY'
import ssl, sys, http.client
addr, d = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=f"{d}/bundle.pem")
ctx.check_hostname = False
ctx.load_cert_chain(f"{d}/svid.pem", f"{d}/svid_key.pem")
host, port = addr.rsplit(":", 1)
c = http.client.HTTPSConnection(host, int(port), context=ctx)
c.request("GET", "/metrics")
print(c.getresponse().read().decode())
PY
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
counter() { { grep -E "^$1 " <<<"$2" || true; } | awk '{s+=$2} END {print s+0}'; }
# The server's own view of a phase: batch sizes, stage times, request-to-durable latency.
server_view() {
  metrics >"$work/metrics-$1.txt"
  # Histograms: the mean of each (sum / count); quantiles come from the buckets.
  awk '/^capsule_gateway_(batch_size|batch_verify_seconds|batch_commit_seconds|admission_latency_seconds)_(sum|count) / {
      split($1, p, "_(sum|count)$"); n = $1; sub(/.*_/, "", n); v[p[1], n] = $2; names[p[1]] = 1 }
    END { for (k in names) if (v[k, "count"] > 0) printf "   server: %s mean %g over %d\n", k, v[k, "sum"] / v[k, "count"], v[k, "count"] }' \
    "$work/metrics-$1.txt"
}
client_line="f\"achieved {d['throughput_rps']:.0f}/s of {d['rate_requested']}/s, status {d['status']}, errors {d['errors']}, p50 {d['latency_ms']['p50']} ms, p90 {d['latency_ms']['p90']} ms, p99 {d['latency_ms']['p99']} ms, p99.9 {d['latency_ms']['p999']} ms, send lag p99 {d['send_lag_ms']['p99']} ms\""

echo "== saturated: $sat_conns HTTP/1.1 connections, as fast as possible, ${duration}s"
lg --connections "$sat_conns" --rate 0 >"$work/saturated.json"
sat=$(field "$work/saturated.json" "d['throughput_rps']")
field "$work/saturated.json" "$client_line"
server_view saturated
stop_server

rate70=$(python3 -c "print(int($sat * 0.7))")
echo "== 70% of saturation: $rate70/s open loop, $sat_conns HTTP/1.1 connections"
start_server
lg --connections "$sat_conns" --rate "$rate70" >"$work/p70.json"
field "$work/p70.json" "$client_line"
server_view p70
stop_server

rate2x=$(python3 -c "print(int($sat * 2))")
echo "== 2x overload: $rate2x/s open loop, $conns HTTP/2 connections"
start_server
before=$(metrics)
lg --connections "$conns" --http2 --rate "$rate2x" --warmup 0 >"$work/overload.json"
after=$(metrics)
field "$work/overload.json" "$client_line"
field "$work/overload.json" "f\"shed share {d['status'].get('503',0)/max(1,d['requests']):.3f}, p99 of served (200) {d['served_latency_ms']['p99']} ms, unsent {d['unsent']}\""
admits=$(( $(counter 'capsule_gateway_admissions_total\{verdict="admit",reason=""\}' "$after") - $(counter 'capsule_gateway_admissions_total\{verdict="admit",reason=""\}' "$before") ))
shed=$(( $(counter capsule_gateway_admissions_shed_total "$after") - $(counter capsule_gateway_admissions_shed_total "$before") ))
ok=$(field "$work/overload.json" "d['status'].get('200',0)")
unavailable=$(field "$work/overload.json" "d['status'].get('503',0)")
echo "   server: $admits verified admissions, $shed shed; client: $ok x 200, $unavailable x 503"
# The server may count a few more (answers still in flight when the client stopped);
# never fewer: a 200 the verifier did not count would be an admission without it.
if [ "$admits" -lt "$ok" ] || [ "$shed" -lt "$unavailable" ]; then
  echo "bench-service: more 200/503 answers than verified/shed admissions" >&2
  exit 1
fi
server_view overload
echo "   peak RSS of serve: $(grep VmHWM /proc/$pid/status | awk '{print $2, $3}')"
stop_server
echo "   (JSON reports and metrics in $work/)"

# Re-admission of one capsule with the verification cache (issue 17, item 2): the
# same small capsule admitted over and over, closed loop on CONNECTIONS HTTP/1.1
# connections, first with the default cache (every admission after the first a hit:
# no ECDSA, the artifact still hashed), then with `[cache] capacity = 0` (every
# admission verified in full), each on a fresh server. Prints admissions per second
# and the server's CPU per admission (utime + stime from /proc, per admission the
# server counted) for both, and the cache's hit counter.
cache_readmission_phase() {
  local conf=$work/state/dev/gateway.toml
  local saved=$work/gateway.toml.orig
  cp "$conf" "$saved"
  local ticks
  ticks=$(getconf CLK_TCK)
  for mode in cached uncached; do
    cp "$saved" "$conf"
    if [ "$mode" = uncached ]; then printf '\n[cache]\ncapacity = 0\n' >>"$conf"; fi
    start_server
    # With the cache, the first admission is its one miss; every later one a hit.
    local before cpu0 cpu1 after
    before=$(metrics)
    cpu0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    lg --connections "$conns" --rate 0 >"$work/readmit-$mode.json"
    cpu1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    after=$(metrics)
    local admits hits
    admits=$(( $(counter 'capsule_gateway_admissions_total\{verdict="admit",reason="none"\}' "$after") - $(counter 'capsule_gateway_admissions_total\{verdict="admit",reason="none"\}' "$before") ))
    hits=$(( $(counter capsule_gateway_verify_cache_hits_total "$after") - $(counter capsule_gateway_verify_cache_hits_total "$before") ))
    echo "== re-admission of one capsule, $mode: $conns HTTP/1.1 connections, ${duration}s"
    field "$work/readmit-$mode.json" "$client_line"
    python3 -c "import sys; a, h, c, t = map(int, sys.argv[1:]); print(f'   server: {a} admissions, {h} cache hits, CPU {1e6 * c / t / max(1, a):.1f} us per admission ({a / max(1e-9, c / t):.0f} admissions per CPU-second)')" \
      "$admits" "$hits" "$((cpu1 - cpu0))" "$ticks"
    stop_server
  done
  cp "$saved" "$conf"
}
cache_readmission_phase
