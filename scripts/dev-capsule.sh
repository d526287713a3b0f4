#!/usr/bin/env bash
# Packs examples/dev-capsule for the development trust domain that `serve` makes
# without --config: signed with STATE/dev/keys/dev-es.private.jwk.json, tenant `dev`.
# Usage: scripts/dev-capsule.sh GATEWAY_BINARY STATE_DIR OUT_DIR [VERSION]
set -euo pipefail
gw=$1 state=$2 out=$3 version=${4:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
now=$(date +%s)
tmp=$(mktemp)
sed -e "s/@NOW@/$now/g" -e "s/@EXPIRES@/$((now + 7 * 86400))/" -e "s/@VERSION@/$version/" \
  "$here/examples/dev-capsule/manifest.template.json" > "$tmp"
"$gw" pack --manifest "$tmp" --files "$here/examples/dev-capsule/files" \
  --key "$state/dev/keys/dev-es.private.jwk.json" --out "$out" >/dev/null
rm -f "$tmp"
