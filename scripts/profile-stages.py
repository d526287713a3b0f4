"""Sums `perf report --no-children --sort dso,sym` lines (self time per symbol) into
the stages of an admission, for scripts/profile-admission.sh. A symbol goes to the
first stage whose pattern it matches; kernel symbols are split by what they serve
(the system calls of opening, reading and closing files)."""
import re
import sys

# (stage, pattern on "dso symbol"), first match wins.
STAGES = [
    ("kernel: path lookup + open (openat2, /proc re-open, open dir)",
     r"\[k\].*(path|walk|lookup|d_alloc|dentry|dput|dget|open|namei|proc_|pid_|fd_install|alloc_empty_file|alloc_fd|file_free|do_dentry|legacy_|getname|putname|kmem_cache|memcg|security_|apparmor|inode_permission|generic_permission|mntput|mntget|terminate_walk|complete_walk|__d_|_d_|lockref|step_into|pick_link|nd_|tid_fd|seq_|task_|get_pid|put_pid|xfs_|ext4_|btrfs_)"),
    ("kernel: read", r"\[k\].*(read|copy_user|copy_to|filemap|folio|page|rep_movs|_copy_|iov_iter)"),
    ("kernel: close + fput", r"\[k\].*(close|fput|__fput|task_work|filp_|file_close|fsnotify)"),
    ("kernel: fstat / statfs", r"\[k\].*(stat|getattr)"),
    ("kernel: syscall entry/exit, other", r"\[k\]"),
    ("signature (ECDSA P-256 / HMAC)",
     r"(ecp_nistz256|p256|ec_|EC_|ECDSA|ecdsa|bn_|BN_|fiat|beeu|bignum|mont|HMAC|hmac|aws_lc_0_\d+_0_EC|point|scalar|ec_GFp|ec_scalar|ec_point|ecp_)"),
    ("sha256 (JWS digest, artifact, HMAC's inner hash)", r"(sha256|SHA256|sha2_|Sha256)"),
    ("base64", r"(b64|base64|Base64)"),
    ("JSON parse (header, manifest)", r"(serde_json|serde::|json::|deserialize|Deserialize|visit_|from_str|from_slice|parse_str|ignore_str|indexmap|IndexMap)"),
    ("allocation (malloc/free)", r"(malloc|free|realloc|calloc|_int_|arena|tcache|alloc::|__rust_alloc|__rust_dealloc|RawVec|__libc_malloc|cfree|sysmalloc|unlink_chunk|malloc_consolidate)"),
    ("memcpy/memset/strlen", r"(memcpy|memmove|memset|memcmp|strlen|bcmp)"),
    ("libc syscall wrappers", r"(libc|syscall|openat|__open|fstat|__read|__close|statx|rustix)"),
    ("verify-core logic (policy checks, decision, paths)", r"verify_core"),
]

totals = {}
rest = {}
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\[.\])\s+(.*)", line)
    if not m:
        continue
    pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
    key = f"{kind} {dso} {sym}"
    for stage, pat in STAGES:
        if re.search(pat, key):
            totals[stage] = totals.get(stage, 0) + pct
            break
    else:
        rest[sym] = rest.get(sym, 0) + pct
        totals["other"] = totals.get("other", 0) + pct
order = [s for s, _ in STAGES] + ["other"]
for stage in order:
    if totals.get(stage, 0) >= 0.05:
        print(f"  {totals[stage]:5.1f} %  {stage}")
top = sorted(rest.items(), key=lambda kv: -kv[1])[:5]
if top:
    print("  (other, largest: " + "; ".join(f"{s[:60]} {p:.1f} %" for s, p in top) + ")")
