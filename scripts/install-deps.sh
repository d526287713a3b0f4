#!/usr/bin/env bash
# Installs everything the build, the demos and the tests need on a fresh Debian
# machine, idempotently: what running needs, then what testing needs.
set -euo pipefail
here="$(dirname "$0")"
bash "$here/install-run-deps.sh"
bash "$here/install-test-deps.sh"
