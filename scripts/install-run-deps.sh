#!/usr/bin/env bash
# Installs what building and running capsule-gateway needs on a fresh Debian machine,
# idempotently (the demo needs only this; scripts/install-test-deps.sh adds what the
# tests need). Debian packages come from apt-get. Needs root when something is missing.
set -euo pipefail
here="$(dirname "$0")"

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }

# C toolchain for aws-lc-sys.
have cc || need_apt+=(build-essential)
# `run` and the sandbox launcher: gVisor, and containerd with ctr and runc's shim v2
# (Kata's shim is not packaged in Debian 12).
have runsc || need_apt+=(runsc)
{ have containerd && have ctr && have containerd-shim-runc-v2; } || need_apt+=(containerd)
have runc || need_apt+=(runc)
# attest: tss-esapi links libtss2 (found with pkg-config; its bindings are pre-generated,
# so no clang is needed); the attest demo runs a software TPM (swtpm, swtpm_setup).
{ have pkg-config && pkg-config --exists tss2-esys tss2-tctildr tss2-mu; } \
  || need_apt+=(pkg-config libtss2-dev)
{ have swtpm && have swtpm_setup; } || need_apt+=(swtpm swtpm-tools)
# Scoped egress (`scope.network = "targets"`): network namespaces and veths with
# iproute2's `ip`, the per-run filter and its counters with nftables' `nft`.
have ip || need_apt+=(iproute2)
have nft || need_apt+=(nftables)
# The demo reads loadgen's JSON report with python3.
have python3 || need_apt+=(python3)
# The demo's pull section (scripts/agent-demo.sh): a local CNCF distribution registry,
# skopeo to read what was pushed, htpasswd -B and openssl for its credentials and CA.
have docker-registry || need_apt+=(docker-registry)
have skopeo || need_apt+=(skopeo)
have htpasswd || need_apt+=(apache2-utils)
have openssl || need_apt+=(openssl)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-run-deps: missing Debian packages ${need_apt[*]}; run as root to install them" >&2
    exit 2
  fi
  echo "install-run-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

# The sandbox's base root file system (busybox-static, pinned by its tree digest).
bash "$here/build-rootfs.sh"

# The Rust version is the workspace's `rust-version` (Cargo.toml), read from there so
# that this check and the manifest cannot disagree.
msrv=$(sed -n 's/^rust-version = "\([0-9.]*\)"$/\1/p' "$here/../Cargo.toml")
if ! have cargo || ! have rustc; then
  echo "install-run-deps: cargo not found; this project needs a Rust toolchain >= $msrv (rustup's stable)." >&2
  exit 2
fi
have_rust=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$msrv" "$have_rust" | sort -V | head -1)" != "$msrv" ]; then
  echo "install-run-deps: rustc $have_rust is older than the workspace's rust-version $msrv; run: rustup update stable" >&2
  exit 2
fi
