#!/usr/bin/env bash
# Builds the sandbox's base root file system from Debian's busybox-static, idempotently,
# at /usr/local/lib/capsule-gateway/rootfs (the launcher's default, BASE_ROOTFS in
# sandbox-launcher/src/rootfs.rs; a first argument builds it elsewhere):
#   - /bin/busybox (busybox-static) and a symlink to it for each of its applets;
#   - the C runtime the egress probe is linked against (the gateway binary runs as the
#     probe): the loader, libc, libm, libgcc_s, and libcrypto and libtss2, copied from
#     the host's Debian packages — nothing else of the host's /usr;
#   - the mount points /proc, /dev, /tmp, /capsule and the file /.capsule-probe;
#   - /etc/passwd and /etc/group naming nobody (65534), the capsule's user.
# Every entry is owned by root and writable by root only. The tree digest (what a
# policy pins) is `capsule-gateway rootfs digest DIR`, the launcher's own function.
# An existing tree with the same content is left alone; a different one is replaced
# atomically (rename), so a run never sees a half-built root.
set -euo pipefail
umask 022
dest="${1:-/usr/local/lib/capsule-gateway/rootfs}"

if ! dpkg -s busybox-static >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "build-rootfs: the Debian package busybox-static is missing; run as root to install it" >&2
    exit 2
  fi
  echo "build-rootfs: apt-get install busybox-static"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends busybox-static
fi
if [ "$(id -u)" -ne 0 ] && [ -z "${1:-}" ]; then
  if [ -x "$dest/bin/busybox" ]; then
    echo "build-rootfs: not root; leaving $dest as it is"
    exit 0
  fi
  echo "build-rootfs: building $dest needs root" >&2
  exit 2
fi

libdir=/lib/x86_64-linux-gnu
# The probe's DT_NEEDED closure (`ldd capsule-gateway`), by soname.
libs=(libc.so.6 libm.so.6 libgcc_s.so.1 libcrypto.so.3 libtss2-esys.so.0 libtss2-mu.so.0
      libtss2-sys.so.1 libtss2-tctildr.so.0)

parent="$(dirname "$dest")"
mkdir -p "$parent"
new="$(mktemp -d "$parent/.rootfs-new.XXXXXX")"
trap 'rm -rf "$new"' EXIT
chmod 0755 "$new"
install -d -m 0755 "$new"/{bin,sbin,usr/bin,usr/sbin,etc,proc,dev,tmp,capsule,lib64,"${libdir#/}"}
install -m 0755 /bin/busybox "$new/bin/busybox"
for applet in $(/bin/busybox --list-full); do
  case "$applet" in
    bin/busybox|linuxrc) continue ;;
  esac
  ln -s /bin/busybox "$new/$applet"
done
for so in "${libs[@]}"; do
  [ -e "$libdir/$so" ] || { echo "build-rootfs: $libdir/$so is missing (install-run-deps.sh installs it)" >&2; exit 2; }
  install -m 0644 "$(readlink -f "$libdir/$so")" "$new$libdir/$so"
done
install -m 0755 "$(readlink -f /lib64/ld-linux-x86-64.so.2)" "$new/lib64/ld-linux-x86-64.so.2"
printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' > "$new/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$new/etc/group"
chmod 0644 "$new/etc/passwd" "$new/etc/group"
: > "$new/.capsule-probe"
chmod 0444 "$new/.capsule-probe"
[ "$(id -u)" -ne 0 ] || chown -R -h root:root "$new"

# What the digest covers, as text: the same tree gives the same listing.
listing() {
  (cd "$1" && find . -printf '%P %y %m %U %G %l\n' | LC_ALL=C sort \
    && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
}
if [ -d "$dest" ] && [ "$(listing "$dest")" = "$(listing "$new")" ]; then
  echo "build-rootfs: $dest is up to date"
  exit 0
fi
if [ -e "$dest" ]; then
  old="$(mktemp -d "$parent/.rootfs-old.XXXXXX")"
  mv -T "$dest" "$old/rootfs"
  mv -T "$new" "$dest"
  rm -rf "$old"
else
  mv -T "$new" "$dest"
fi
trap - EXIT
echo "build-rootfs: built $dest"
