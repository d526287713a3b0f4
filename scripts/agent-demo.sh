#!/usr/bin/env bash
# The pull section of the demo, and the agent's figures: starts CNCF distribution on
# loopback (TLS from a throwaway CA, htpasswd), publishes capsules, and times
#   1. capsules pulled and verified per second (`agent --once`, action = "admit-only":
#      the sandbox excluded), for N capsules (default 200);
#   2. publish -> evidence latency of a /bin/true capsule (publish, then `agent --once`
#      pulls, verifies, runs it in gVisor and pushes the evidence back).
# Usage: scripts/agent-demo.sh [N]   (needs root for runsc; installs nothing itself:
# scripts/install-test-deps.sh brings docker-registry, skopeo and apache2-utils).
set -euo pipefail
N=${1:-200}
root=$(cd "$(dirname "$0")/.." && pwd)
# CG=path/to/capsule-gateway uses that binary instead of building a release one.
if [ -z "${CG:-}" ]; then
  cargo build --release -q -p capsule-gateway --manifest-path "$root/Cargo.toml"
fi
cg="${CG:-$root/target/release/capsule-gateway}"
for t in docker-registry:docker-registry skopeo:skopeo htpasswd:apache2-utils openssl:openssl runsc:runsc; do
  command -v "${t%%:*}" >/dev/null || { echo "missing ${t%%:*} (Debian package ${t##*:})" >&2; exit 2; }
done
work=$(mktemp -d); trap 'kill $reg 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"; umask 077
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=demo-ca \
  -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > san.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
  -extfile san.ext -out server.pem 2>/dev/null
htpasswd -B -b -c htpasswd demo demo-pass 2>/dev/null
echo 'demo:demo-pass' > registry.auth
mkdir certs && cp ca.pem certs/ca.crt
cat > registry.yml <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/storage}}
http: {addr: "127.0.0.1:$port", tls: {certificate: $work/server.pem, key: $work/server.key}}
auth: {htpasswd: {realm: demo, path: $work/htpasswd}}
YML
docker-registry serve registry.yml >registry.log 2>&1 & reg=$!
until (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
url="https://127.0.0.1:$port"

"$cg" keygen --alg ES256 --kid k1 --out keys >/dev/null
cat > policy.toml <<TOML
policy_version = "1"
clock_skew_s = 60
[trust]
jwks = "keys/k1.public.jwks.json"
[[tenants]]
name = "team-a"
keys = ["k1"]
environments = ["staging"]
runners = ["spiffe://example.org/runner/*"]
host_programs = ["/bin/sh", "/bin/true"]
min_approvals = 1
TOML
mkdir -p src && printf '#!/bin/sh\necho hello from the registry\n' > src/run.sh
pack() { # pack ID ENTRYPOINT OUT
  local now; now=$(date +%s)
  cat > m.json <<JSON
{"schema": "capsule/v1", "capsule_id": "$1", "version": 1, "parent": null, "tenant": "team-a",
 "issued_at": $now, "not_before": $now, "expires_at": $((now + 86400)), "policy_version": "1",
 "author": "dev@example.org", "approvals": [{"approver": "lead@example.org", "role": "lead", "approved_at": $now}],
 "scope": {"environment": "staging", "network": "none"}, "limits": {"timeout_ms": 10000, "memory_mib": 128, "pids": 16},
 "entrypoint": $2, "artifacts": [{"path": "run.sh"}]}
JSON
  "$cg" pack --manifest m.json --files src --key keys/k1.private.jwk.json --out "$3" >/dev/null
}
agent_toml() { # agent_toml NAME REPO ACTION
  cat > "$1.toml" <<TOML
state_dir = "$1-state"
policy = "policy.toml"
runner = "spiffe://example.org/runner/r1"
action = "$3"
[[sources]]
registry = "$url"
repository = "$2"
ca = "ca.pem"
basic_auth_file = "registry.auth"
TOML
}

echo "== publish a capsule, inspect it with skopeo"
pack hello '["/capsule/run.sh"]' capsule
digest=$("$cg" publish --registry "$url" --repository capsules/team-a --tag hello.1 \
  --ca ca.pem --basic-auth-file registry.auth capsule)
echo "published $digest"
skopeo inspect --raw --cert-dir certs --creds demo:demo-pass "docker://127.0.0.1:$port/capsules/team-a:hello.1" \
  | python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["artifactType"], [l["annotations"]["org.opencontainers.image.title"] for l in m["layers"]])'

echo "== agent --once: pull, verify, run in gVisor, push the evidence back"
agent_toml run capsules/team-a run
"$cg" agent --config run.toml --once
evidence=$(skopeo inspect --raw --cert-dir certs --creds demo:demo-pass \
  "docker://127.0.0.1:$port/capsules/team-a:sha256-${digest#sha256:}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["digest"])')
echo "evidence artifact: $evidence"
# The pushed export, pulled back by skopeo (each layer under its title), verifies
# offline like the bundle it came from.
skopeo copy --src-cert-dir certs --src-creds demo:demo-pass \
  "docker://127.0.0.1:$port/capsules/team-a@$evidence" dir:pulled-oci >/dev/null
python3 - pulled-oci pulled-export <<'PY'
import json, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for l in json.load(open(os.path.join(src, "manifest.json")))["layers"]:
    shutil.copy(os.path.join(src, l["digest"].split(":", 1)[1]),
                os.path.join(dst, l["annotations"]["org.opencontainers.image.title"]))
PY
"$cg" evidence verify pulled-export
"$cg" evidence verify run-state/evidence/*/

echo "== figure 1: $N capsules pulled and verified (admit-only, sandbox excluded)"
for i in $(seq 1 "$N"); do
  pack "bench-$i" '["/capsule/run.sh"]' "c$i"
  "$cg" publish --registry "$url" --repository capsules/bench --ca ca.pem --basic-auth-file registry.auth "c$i" >/dev/null
done
agent_toml bench capsules/bench admit-only
start=$(date +%s.%N)
"$cg" agent --config bench.toml --once --log-level warn
end=$(date +%s.%N)
python3 -c "d=$end-$start; print(f'{$N} capsules in {d:.2f} s: {$N/d:.1f} capsules/s pulled and verified')"

echo "== figure 2: publish -> evidence latency of a /bin/true capsule"
pack true '["/bin/true"]' tcap
agent_toml lat capsules/latency run
start=$(date +%s.%N)
d=$("$cg" publish --registry "$url" --repository capsules/latency --ca ca.pem --basic-auth-file registry.auth tcap)
"$cg" agent --config lat.toml --once --log-level warn >/dev/null
skopeo inspect --raw --cert-dir certs --creds demo:demo-pass \
  "docker://127.0.0.1:$port/capsules/latency:sha256-${d#sha256:}" >/dev/null
end=$(date +%s.%N)
python3 -c "print(f'publish -> evidence in the registry: {($end-$start)*1000:.0f} ms')"
