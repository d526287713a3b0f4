#!/usr/bin/env bash
# Sandbox launch overhead: wall time of `capsule-gateway run` of a /bin/true capsule
# against `runsc run` of the same OCI bundle by hand (hyperfine, median of N runs).
# Needs root (runsc), runsc and hyperfine (Debian packages `runsc`, `hyperfine`).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-20}

command -v hyperfine >/dev/null || { echo "bench-launch: install the Debian package hyperfine" >&2; exit 2; }
command -v runsc >/dev/null || { echo "bench-launch: install the Debian package runsc" >&2; exit 2; }
cargo build --release -q -p capsule-gateway
gw=$PWD/target/release/capsule-gateway
work=$PWD/target/bench-launch
rm -rf "$work"
mkdir -p "$work/files"

"$gw" keygen --alg ES256 --kid bench-es --out "$work/keys" >/dev/null
printf '#!/bin/sh\ntrue\n' > "$work/files/run.sh"
now=$(date +%s)
cat > "$work/manifest.json" <<EOF
{"schema": "capsule/v1", "capsule_id": "bench-true", "version": 1, "parent": null,
 "tenant": "acme-payments", "issued_at": $now, "not_before": $now, "expires_at": $((now + 86400)),
 "policy_version": "2025-05-06.3", "author": "planner@acme.example",
 "approvals": [{"approver": "alice@acme.example", "role": "sre-lead", "approved_at": $now}],
 "runners": ["spiffe://acme.example/runner/*"],
 "scope": {"environment": "staging", "network": "none"},
 "limits": {"timeout_ms": 30000, "memory_mib": 256, "pids": 64},
 "entrypoint": ["/bin/true"], "env": {}, "artifacts": [{"path": "run.sh"}], "tools": []}
EOF
sed -e "s/@TOOL_DIGEST@/$(printf '%064d' 0)/" -e "s#keys/demo-es.public.jwks.json#keys/bench-es.public.jwks.json#" \
  -e 's/keys = \["demo-es"\]/keys = ["bench-es"]/' -e 's#^host_programs = .*#host_programs = ["/bin/true"]#' \
  examples/policy.template.toml > "$work/policy.toml"
"$gw" pack --manifest "$work/manifest.json" --files "$work/files" \
  --key "$work/keys/bench-es.private.jwk.json" --out "$work/capsule" >/dev/null

gwrun="$gw run --policy $work/policy.toml --runner spiffe://acme.example/runner/bench --state $work/state $work/capsule"
$gwrun > "$work/event.json"

# The same bundle by hand: the gateway's own config.json from the evidence, with the
# rootfs and /capsule pointed at a persistent copy and the probe left out of argv.
bundle=$work/bundle
mkdir -p "$bundle"
config=$(ls "$work"/state/evidence/*/oci-config.json | head -1)
cp -r "$work/files" "$bundle/capsule"
python3 - "$config" "$bundle" <<'EOF'
import json, os, sys
config, bundle = sys.argv[1], sys.argv[2]
c = json.load(open(config))
root = os.path.join(bundle, "rootfs")
os.makedirs(root, exist_ok=True)
for d in ["proc", "dev", "tmp", "capsule", "usr"]:
    os.makedirs(os.path.join(root, d), exist_ok=True)
for link in ["bin", "sbin", "lib", "lib64"]:
    p = os.path.join(root, link)
    if os.path.islink("/" + link) and not os.path.lexists(p):
        os.symlink(os.readlink("/" + link), p)
open(os.path.join(root, ".capsule-probe"), "w").close()
c["root"]["path"] = root
for m in c["mounts"]:
    if m["destination"] == "/capsule":
        m["source"] = os.path.join(bundle, "capsule")
c["process"]["args"] = ["/bin/true"]
c["linux"]["cgroupsPath"] = "/capsule-gateway/bench-by-hand"
json.dump(c, open(os.path.join(bundle, "config.json"), "w"), indent=2)
EOF
byhand="runsc --root=$work/runsc-root --network=none --platform=ptrace run --bundle=$bundle bench-by-hand"
$byhand

hyperfine --warmup 3 --runs "$runs" --export-json "$work/hyperfine.json" \
  -n "runsc run (bundle by hand)" "$byhand" \
  -n "capsule-gateway run" "$gwrun >/dev/null"
python3 - "$work/hyperfine.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
for x in r:
    print(f'{x["command"]}: median {x["median"]*1000:.0f} ms (min {x["min"]*1000:.0f}, max {x["max"]*1000:.0f}, n={len(x["times"])})')
print(f'overhead of run over runsc run: {(r[1]["median"]-r[0]["median"])*1000:.0f} ms (median)')
EOF
