#!/usr/bin/env bash
# Installs what the build and tests need on a fresh Debian machine, idempotently.
# Debian packages come from apt-get; Rust crates and tools from crates.io.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }

# C toolchain for aws-lc-sys; coreutils' mkfifo for the FIFO fixture.
have cc || need_apt+=(build-essential)
have mkfifo || need_apt+=(coreutils)
# The sandbox launcher (`run`, its tests, the demo): gVisor, and containerd with ctr and
# runc's shim v2 (Kata's shim is not packaged in Debian 12).
have runsc || need_apt+=(runsc)
{ have containerd && have ctr && have containerd-shim-runc-v2; } || need_apt+=(containerd)
have runc || need_apt+=(runc)
# attest: tss-esapi links libtss2 (found with pkg-config; its bindings are pre-generated,
# so no clang is needed); the tests start swtpm (swtpm, swtpm_setup from swtpm-tools) and
# extend PCRs with tpm2-tools.
{ have pkg-config && pkg-config --exists tss2-esys tss2-tctildr tss2-mu; } \
  || need_apt+=(pkg-config libtss2-dev)
{ have swtpm && have swtpm_setup; } || need_apt+=(swtpm swtpm-tools)
# The service tests check early HTTP/2 answers with curl (nghttp2) as well as hyper.
have curl || need_apt+=(curl)
have tpm2_pcrextend || need_apt+=(tpm2-tools)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

if ! have cargo; then
  echo "install-deps: cargo not found; this project needs a Rust toolchain >= 1.88 (rustup's stable)." >&2
  exit 2
fi

# The fuzz smoke run needs cargo-fuzz (crates.io) and the machine's nightly toolchain.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "install-deps: the nightly Rust toolchain is missing (rustup toolchain nightly); cargo fuzz needs it" >&2
  exit 2
fi
