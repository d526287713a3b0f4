#!/usr/bin/env bash
# The `capsule-gateway attest` session of the README, against a software TPM (swtpm)
# started here on free local ports and stopped at the end: identity key, a sealed HS256
# key, a quote and its verification, an SVID whose key is the TPM key (CSR + development
# CA), the binding, and what happens when a bound PCR changes.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --release -q -p capsule-gateway
gw="$PWD/target/release/capsule-gateway"
work=target/attest-demo
rm -rf "$work"
mkdir -p "$work/tpm"
cd "$work"

# Two consecutive free ports: N for commands, N+1 for swtpm's control channel.
port=23000
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null; do
  port=$((port + 2))
done
swtpm socket --tpm2 --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
  --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
  --tpmstate dir=tpm --flags not-need-init,startup-clear &
swtpm_pid=$!
trap 'kill "$swtpm_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
export TCTI="swtpm:host=127.0.0.1,port=$port"
runner=spiffe://acme.example/runner/demo

step() { printf '\n$ %s\n' "$*"; "$@"; }

step "$gw" attest identity --out identity.json
step "$gw" keygen --alg HS256 --kid k-hs --out keys
step "$gw" attest seal --kid k-hs --pcrs sha256:0,7,16 --in keys/k-hs.private.jwk.json --out keys/k-hs.sealed.json
step "$gw" attest unseal-check --sealed keys/k-hs.sealed.json
step "$gw" attest pcr-read --pcrs sha256:0,7,16 --out reference.json
nonce=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
step "$gw" attest quote --nonce "$nonce" --pcrs sha256:0,7,16 --out quote.json >/dev/null
step "$gw" attest verify-quote --quote quote.json --nonce "$nonce" --key identity.json --reference reference.json
step "$gw" attest csr --spiffe-id "$runner" --out runner.csr
step "$gw" attest dev-ca init --trust-domain acme.example --out ca
step "$gw" attest dev-ca issue --ca ca --csr runner.csr --spiffe-id "$runner" --out svid
step "$gw" attest bind --svid svid --pcrs sha256:0,7,16 --out binding.json
step "$gw" attest verify-binding --binding binding.json --svid svid --tpm-key identity.json \
  --pcrs-reference reference.json --allow-software-tpm

echo
echo "== PCR 16 is extended (tpm2-tools): the sealed key and the binding no longer fit"
step tpm2_pcrextend -T "$TCTI" "16:sha256=$(printf 'new configuration' | sha256sum | cut -d' ' -f1)"
set +e
step "$gw" attest unseal-check --sealed keys/k-hs.sealed.json
code=$?
"$gw" attest pcr-read --pcrs sha256:0,7,16 --out reference-now.json >/dev/null
step "$gw" attest verify-binding --binding binding.json --pcrs-reference reference-now.json --allow-software-tpm
code2=$?
set -e
if [ "$code" -ne 1 ] || [ "$code2" -ne 1 ]; then
  echo "attest-demo: expected both to be refused (exit 1), got $code and $code2" >&2
  exit 1
fi
echo
echo "attest-demo: OK"
