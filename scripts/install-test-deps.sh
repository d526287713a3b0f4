#!/usr/bin/env bash
# Installs what the tests need beyond scripts/install-run-deps.sh, idempotently:
# Debian packages from apt-get, Rust tools from crates.io.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }

# coreutils' mkfifo for the FIFO fixture.
have mkfifo || need_apt+=(coreutils)
# The attest tests extend PCRs with tpm2-tools.
have tpm2_pcrextend || need_apt+=(tpm2-tools)
# gateway/tests/packaging.rs checks examples/systemd/ with `systemd-analyze verify`.
have systemd-analyze || need_apt+=(systemd)
# The service tests check early HTTP/2 answers with curl (nghttp2) as well as hyper.
have curl || need_apt+=(curl)
# git gives `--version` its commit, and packaging.rs the commit to expect.
have git || need_apt+=(git)
# gateway/tests/observability.rs checks /metrics with `promtool check metrics`.
have promtool || need_apt+=(prometheus)
# gateway/tests/agent.rs: CNCF distribution (the registry the agent pulls from),
# skopeo (the independent OCI client and the mirror), htpasswd -B (bcrypt creds).
have docker-registry || need_apt+=(docker-registry)
have skopeo || need_apt+=(skopeo)
have htpasswd || need_apt+=(apache2-utils)
# scripts/bench-service.sh profiles the server with perf; scripts/plot-service-scaling.sh
# draws its CSV with gnuplot (pngcairo).
have perf || need_apt+=(linux-perf)
have gnuplot || need_apt+=(gnuplot-nox)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-test-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

# The test command checks the dependency tree with cargo-deny (deny.toml). It compiles
# for a few minutes, once.
if ! cargo deny --version >/dev/null 2>&1; then
  echo "install-test-deps: cargo install --locked cargo-deny"
  cargo install --locked cargo-deny
fi
# The fuzz smoke run needs cargo-fuzz (crates.io) and the machine's nightly toolchain.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "install-test-deps: cargo install cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "install-test-deps: the nightly Rust toolchain is missing (rustup toolchain nightly); cargo fuzz needs it" >&2
  exit 2
fi
