#!/usr/bin/env bash
# Draws the service's scaling from 1 to 256 connections (the CSV that
# scripts/bench-service.sh writes: protocol,connections,throughput_rps,p50_ms,p99_ms)
# as a PNG: throughput on the left axis, p50 and p99 on the right (log scale), for
# HTTP/1.1 and HTTP/2. Needs gnuplot (Debian package gnuplot-nox, with pngcairo).
# Usage: scripts/plot-service-scaling.sh [CSV [PNG]]
set -euo pipefail
cd "$(dirname "$0")/.."
csv=${1:-docs/service-scaling.csv}
png=${2:-docs/service-scaling.png}
command -v gnuplot >/dev/null || {
  echo "plot-service-scaling: gnuplot not found (Debian package gnuplot-nox)" >&2
  exit 1
}
[ -s "$csv" ] || { echo "plot-service-scaling: $csv: no data" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for p in http1 http2; do
  awk -F, -v p="$p" 'NR > 1 && $1 == p {print $2, $3, $4, $5}' "$csv" >"$tmp/$p.dat"
done
gnuplot <<GP
set terminal pngcairo size 1000,600 font ",11"
set output "$png"
set datafile separator " "
set title "capsule-gateway serve: admissions over mTLS keep-alive, closed loop (load generator on the same 2 cores)"
set xlabel "connections (one request in flight on each)"
set logscale x 2
set xrange [0.8:320]
set xtics (1, 2, 4, 8, 16, 32, 64, 128, 256)
set ylabel "admissions/s"
set yrange [0:*]
set y2label "latency at the client (ms, log)"
set logscale y2
set y2tics
set ytics nomirror
set key top left
set grid xtics ytics
plot "$tmp/http1.dat" using 1:2 with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "HTTP/1.1 throughput", \
     "$tmp/http2.dat" using 1:2 with linespoints lw 2 pt 5 lc rgb "#d62728" title "HTTP/2 throughput", \
     "$tmp/http1.dat" using 1:3 axes x1y2 with lines dt 2 lc rgb "#1f77b4" title "HTTP/1.1 p50", \
     "$tmp/http1.dat" using 1:4 axes x1y2 with lines dt 3 lw 2 lc rgb "#1f77b4" title "HTTP/1.1 p99", \
     "$tmp/http2.dat" using 1:3 axes x1y2 with lines dt 2 lc rgb "#d62728" title "HTTP/2 p50", \
     "$tmp/http2.dat" using 1:4 axes x1y2 with lines dt 3 lw 2 lc rgb "#d62728" title "HTTP/2 p99"
GP
echo "plot-service-scaling: $png from $csv"
