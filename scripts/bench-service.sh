#!/usr/bin/env bash
# Service figures for BENCHMARKS.md, on this machine, with the project's own load
# generator (no external tool): `serve` with its embedded development default on
# loopback, the small dev capsule (scripts/dev-capsule.sh), mTLS keep-alive
# connections. Three runs: saturated (closed loop, SAT_CONNECTIONS HTTP/1.1
# connections, one request in flight on each), 70 % of the saturated rate (open loop
# over the same SAT_CONNECTIONS HTTP/1.1 connections, so the protocol is the one that
# set the saturated rate, then over CONNECTIONS HTTP/2 connections; each with the time
# the server's threads waited for a CPU, from /proc), and 2x the saturated rate (open loop over CONNECTIONS
# HTTP/2 connections, each request on its own stream when it is due, so that more
# requests can be outstanding than the server's queue holds: the overload run shows
# how much is shed with 503, the p99 of what is served, the server's peak RSS). Around the overload run, /metrics is read to show that every
# 200 was a verified admission and every 503 a shed one. The load generator runs on
# the same machine and takes its share of the CPU.
# Before them, the in-process Batcher (criterion, `--bench service`) for the ratios;
# around the saturated run, the server's and the generator's CPU from /proc. After
# them, the scaling from 1 to 256 connections over HTTP/1.1 and HTTP/2 (closed loop,
# one CSV line per point, docs/service-scaling.csv; scripts/plot-service-scaling.sh
# draws it) and a `perf` profile of the saturated server by stage.
# Env: DURATION (s, default 15), SAT_CONNECTIONS (default 256), CONNECTIONS (default 16),
# INPROC / SCALING / PROFILE (1 = run that part, default 1), SCALE_DURATION (s per
# point, default 5), SCALE_POINTS (connection counts), SCALE_CSV (default
# docs/service-scaling.csv).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${DURATION:-15}
conns=${CONNECTIONS:-16}
sat_conns=${SAT_CONNECTIONS:-256}
inproc=${INPROC:-1}
scaling=${SCALING:-1}
scale_duration=${SCALE_DURATION:-5}
scale_points=${SCALE_POINTS:-1 2 4 8 16 32 64 128 256}
profile=${PROFILE:-1}

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
# The service rows compare with the in-process pipeline, which verifies every admission
# (the benches run with the verification cache off), so these phases re-admit the one
# dev capsule with the cache off too; the cache phase at the end puts the default back.
cp "$work/state/dev/gateway.toml" "$work/gateway.toml.default"
printf '\n[cache]\ncapacity = 0\n' >>"$work/state/dev/gateway.toml"
stop_server
start_server

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
# User + system CPU of a process so far, in clock ticks (fields 14 and 15 of
# /proc/PID/stat; the command name before them has no spaces here).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk=$(getconf CLK_TCK)
admits() { counter 'capsule_gateway_admissions_total\{verdict="admit",reason="(none|)"\}' "$1"; }
# Runs the load generator (its JSON to $1) and prints the CPU ticks it used: a
# wrapper shell waits for it and reads its own children's CPU (cutime + cstime,
# fields 16 and 17 of /proc/PID/stat).
lg_cpu() {
  local out=$1
  shift
  bash -c '"$@" >"$0"; awk "{print \$16 + \$17}" /proc/$$/stat' "$out" \
    "$loadgen" --url "https://$addr" --svid "$client" --capsule "$work/capsule" \
    --duration "$duration" --json "$@"
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

echo "== load average before the saturated phases: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$inproc" = 1 ]; then
  echo "== in process: the service's Batcher, 10,000 admissions submitted at once (cargo bench -p benches --bench service)"
  cargo bench -q -p benches --bench service -- --noplot >"$work/inproc.txt" 2>&1
  # criterion's thrpt line: [low mid high]; the middle one, in elements/s.
  inproc_rate=$(awk '/thrpt:/ && !v {v=$4; u=$5} END {m = (u ~ /^K/) ? 1e3 : (u ~ /^M/) ? 1e6 : 1; print v * m}' "$work/inproc.txt")
  inproc_cpu=$(awk '/in-process CPU per admission:/ {print $5}' "$work/inproc.txt")
  echo "   in-process: ${inproc_rate}/s, CPU per admission ${inproc_cpu} us"
fi

echo "== saturated: $sat_conns HTTP/1.1 connections, as fast as possible, ${duration}s"
a0=$(admits "$(metrics)")
c0=$(cpu_ticks "$pid")
lg_ticks=$(lg_cpu "$work/saturated.json" --connections "$sat_conns" --rate 0)
c1=$(cpu_ticks "$pid")
a1=$(admits "$(metrics)")
sat=$(field "$work/saturated.json" "d['throughput_rps']")
field "$work/saturated.json" "$client_line"
python3 - "$c0" "$c1" "$a0" "$a1" "$lg_ticks" "$clk" "$duration" "${inproc_rate:-0}" "${inproc_cpu:-0}" "$sat" <<'PY'
import sys
c0, c1, a0, a1, lg, clk, dur, ir, ic, sat = map(float, sys.argv[1:])
n = max(1.0, a1 - a0)
srv = (c1 - c0) / clk / n * 1e6
gen = lg / clk / n * 1e6
print(f"   CPU from /proc over the run ({n:.0f} admissions): server {srv:.1f} us per admission, "
      f"load generator {gen:.1f} us per request ({lg / clk:.1f} CPU-s, {lg / clk / (dur + 1):.2f} core)")
if ir > 0:
    print(f"   vs in process: saturated {sat / ir:.2f} of {ir:.0f}/s; server CPU per admission {srv / ic:.2f}x of {ic:.1f} us")
    print(f"   if the generator took no CPU: {2e6 / srv:.0f}/s on 2 cores ({2e6 / srv / ir:.2f} of in process)")
PY
server_view saturated
stop_server

# Nanoseconds the server's threads have spent runnable but waiting for a CPU (field 2
# of /proc/PID/task/TID/schedstat, summed over its threads): on 2 cores shared with
# the load generator, the part of the latency that is neither work nor the disk.
runq_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s+=$2} END {print s+0}'; }
rate70=$(python3 -c "print(int($sat * 0.7))")
p70_phase() {
  local name=$1
  shift
  start_server
  local a0 w0 a1 w1
  a0=$(admits "$(metrics)")
  w0=$(runq_ns "$pid")
  lg --rate "$rate70" "$@" >"$work/$name.json"
  w1=$(runq_ns "$pid")
  a1=$(admits "$(metrics)")
  field "$work/$name.json" "$client_line"
  python3 -c "import sys; w, n, d = (float(sys.argv[2]) - float(sys.argv[1])) / 1e6, max(1, float(sys.argv[4]) - float(sys.argv[3])), float(sys.argv[5]); print(f'   server threads waited for a CPU: {w:.0f} ms over the run ({w / d:.0f} ms per second; {w * 1e3 / n:.0f} us per admission)')" \
    "$w0" "$w1" "$a0" "$a1" "$duration"
  server_view "$name"
  stop_server
}
echo "== 70% of saturation: $rate70/s open loop, $sat_conns HTTP/1.1 connections"
p70_phase p70 --connections "$sat_conns"
echo "== 70% of saturation: $rate70/s open loop, $conns HTTP/2 connections"
p70_phase p70-http2 --connections "$conns" --http2

rate2x=$(python3 -c "print(int($sat * 2))")
echo "== 2x overload: $rate2x/s open loop, $conns HTTP/2 connections"
start_server
before=$(metrics)
lg --connections "$conns" --http2 --rate "$rate2x" --warmup 0 >"$work/overload.json"
after=$(metrics)
field "$work/overload.json" "$client_line"
field "$work/overload.json" "f\"shed share {d['status'].get('503',0)/max(1,d['requests']):.3f}, p99 of served (200) {d['served_latency_ms']['p99']} ms, unsent {d['unsent']}\""
admits=$(( $(admits "$after") - $(admits "$before") ))
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

# Closed loop at each connection count, HTTP/1.1 and HTTP/2 (one request in flight per
# connection), one fresh server per protocol.
scaling_phase() {
  local csv=${SCALE_CSV:-docs/service-scaling.csv} proto flag c
  echo "== scaling: closed loop, ${scale_duration}s per point, connections $scale_points"
  echo "protocol,connections,throughput_rps,p50_ms,p99_ms" >"$csv"
  for proto in http1 http2; do
    flag=
    [ "$proto" = http2 ] && flag=--http2
    start_server
    for c in $scale_points; do
      "$loadgen" --url "https://$addr" --svid "$client" --capsule "$work/capsule" \
        --duration "$scale_duration" --json --connections "$c" --rate 0 $flag >"$work/scale.json"
      field "$work/scale.json" "f\"$proto,$c,{d['throughput_rps']:.0f},{d['latency_ms']['p50']},{d['latency_ms']['p99']}\"" | tee -a "$csv"
    done
    stop_server
  done
  echo "   (CSV in $csv; scripts/plot-service-scaling.sh draws docs/service-scaling.png)"
}

# Where the server's time goes at saturation: perf samples (call graphs off, so the
# share is of the sampled instruction), attributed to a stage by thread and symbol.
profile_phase() {
  command -v perf >/dev/null || { echo "bench-service: perf not found (Debian package linux-perf)" >&2; exit 1; }
  echo "== where the time goes: perf record of the server, $sat_conns HTTP/1.1 connections saturated, ${duration}s"
  start_server
  perf record -q -F 999 -p "$pid" -o "$work/perf.data" -- sleep "$((duration + 1))" 2>/dev/null &
  local rec=$!
  lg --connections "$sat_conns" --rate 0 >/dev/null
  wait "$rec" || true
  stop_server
  perf report -q -i "$work/perf.data" --no-children --sort comm,dso,sym --stdio 2>/dev/null \
    | sed 's/^ *//' | grep '%' >"$work/perf.txt"
  python3 - "$work/perf.txt" <<'PY'
import sys, re
stages = {}
for line in open(sys.argv[1]):
    m = re.match(r"([\d.]+)%\s+(\S+)\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if not m:
        continue
    share, comm, dso, kind, sym = float(m[1]), m[2], m[3], m[4], m[5]
    admit = comm.startswith("admit-")
    if kind == "k":
        stage = "kernel, admission workers (fsync, futex, artifact reads)" if admit else "kernel, tokio (socket I/O, epoll, futex)"
    elif admit:
        if re.search(r"redb|commit|record|fsync|checkpoint", sym, re.I):
            stage = "commit (redb, log records)"
        else:
            stage = "verify (JWS, ES256, manifest, policy, artifact hash)"
    elif re.search(r"rustls|aws_lc|aes|gcm|sha|chacha|poly1305|tls", sym, re.I):
        stage = "TLS (rustls, aws-lc records)"
    elif re.search(r"hyper|h2::|httparse|http::|tokio", sym, re.I):
        stage = "HTTP and tokio (hyper, h2, scheduling)"
    elif re.search(r"malloc|free|memcpy|memmove|realloc|_int_", sym):
        stage = "allocation and copies (tokio threads)"
    else:
        stage = "other user space (tokio threads: serde_json, routing, metrics)"
    stages[stage] = stages.get(stage, 0) + share
total = sum(stages.values()) or 1
for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
    print(f"   {v / total * 100:5.1f} %  {k}")
PY
  echo "   (the top symbols: $work/perf.txt)"
}

if [ "$scaling" = 1 ]; then scaling_phase; fi
if [ "$profile" = 1 ]; then profile_phase; fi
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
  cp "$work/gateway.toml.default" "$saved"
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
