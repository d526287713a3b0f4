#!/usr/bin/env bash
# The workspace's `rust-version` must be true for the lock file too: no locked
# dependency may declare a newer Rust than the workspace does (clippy's
# `incompatible_msrv` checks the code itself). Reads `cargo metadata` of the locked tree.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
v = lambda s: tuple((list(map(int, (s or "0").split("."))) + [0, 0])[:3])
members = set(m["workspace_members"])
mine = {p["rust_version"] for p in m["packages"] if p["id"] in members}
if len(mine) != 1 or None in mine:
    sys.exit(f"check-msrv: every workspace member must inherit one rust-version, found {sorted(map(str, mine))}")
msrv = mine.pop()
newer = sorted("%s %s (rust-version %s)" % (p["name"], p["version"], p["rust_version"])
               for p in m["packages"] if v(p.get("rust_version")) > v(msrv))
if newer:
    sys.exit(f"check-msrv: the workspace says Rust {msrv}, but the lock file holds " + ", ".join(newer)
             + "; `cargo update -p NAME` picks a version within rust-version (resolver 3)")
print(f"check-msrv: Rust {msrv}: every member and every locked dependency agree")
'
