//! Scoped egress, `scope.network = "targets"`: the sandbox gets a network
//! namespace of its own whose only way out is a veth pair into the launcher's
//! namespace, where a per-run nftables table allows exactly the resolved
//! destinations of `scope.targets` and refuses everything else, counting both.
//! (`none`, the default, stays an empty namespace and never reaches this module.)
//!
//! One run, in order:
//! 1. [`resolve`]: the targets resolved on the host, once; an address that would
//!    open the host (loopback, link-local, its own, the veth pool) refuses the run.
//! 2. [`Egress::create`]: under a host-wide lock, the lowest free `/30` of the
//!    [`Pool`]; namespace `capsule-<run id>`, veth `cg<12 hex>h` (host side, in the
//!    launcher's namespace) and its peer as `eth0` in the sandbox's namespace with a
//!    default route through the host side; then the table `inet capsule_<run id>`
//!    ([`nft`]). The sandbox's `/etc/hosts` pins each name to its addresses;
//!    `/etc/resolv.conf` names a resolver only when a target is a `dns://` one.
//! 3. runsc joins that namespace (its path in the OCI config, `--network=sandbox`).
//! 4. [`Egress::ledger`]: the counters, read after the run.
//! 5. [`remove`] and [`verify`] (called by the teardown for every run): no
//!    namespace, veth or table of the run is left.
//!
//! Why the host side lives in the launcher's (root) namespace and not in a
//! per-run one: a per-run router namespace needs a second veth pair into the
//! root namespace and a second address and NAT there, and the root namespace
//! must forward all the same; one hop keeps one filter at one place.
//!
//! Forwarding: the host must forward IPv4 (`net.ipv4.ip_forward = 1`) for the
//! packets to leave. The launcher never turns that on itself: enabling it makes
//! the host a router for every interface its own firewall does not close, a
//! host-wide decision for its operator. Without it a `targets` run is a
//! configuration error naming the setting.
//!
//! Crash safety: each run holds an exclusive `flock` on
//! `/run/capsule-gateway/net/<run id>.lock` while its network exists. Any
//! launcher's start ([`recover_stale`]) removes every namespace, veth and table
//! of the launcher's naming whose run holds no lock: a run killed with SIGKILL
//! leaves nothing past the next start, and a live run of another launcher on the
//! same host is never touched.

pub mod link;
pub mod nft;
pub mod resolve;

use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::teardown::{Check, Lock};
pub use resolve::{Destination, ResolvedTarget};

/// Where the launcher keeps its host-wide network locks (a tmpfs: nothing there
/// outlives a reboot, and neither do namespaces or veths).
pub const NET_RUN_DIR: &str = "/run/capsule-gateway/net";
/// Prefix of every veth the launcher creates (`cg<12 hex of the run id>h`).
pub const VETH_PREFIX: &str = "cg";
const RUN_ID_IN_VETH: usize = 12;

/// The run's network namespace (`/run/netns/<name>`).
pub fn netns_name(run_id: &str) -> String {
    format!("capsule-{run_id}")
}

/// The run's nftables table (family `inet`).
pub fn table_name(run_id: &str) -> String {
    format!("capsule_{run_id}")
}

/// The host side of the run's veth pair (interface names have 15 bytes at most).
pub fn host_veth(run_id: &str) -> String {
    format!(
        "{VETH_PREFIX}{}h",
        &run_id[..RUN_ID_IN_VETH.min(run_id.len())]
    )
}

fn peer_veth(run_id: &str) -> String {
    format!(
        "{VETH_PREFIX}{}s",
        &run_id[..RUN_ID_IN_VETH.min(run_id.len())]
    )
}

/// Why scoped egress could not be set up or was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("target `{target}`: {source}")]
    TargetShape {
        target: String,
        #[source]
        source: verify_core::net_target::NetTargetError,
    },
    #[error("target `{target}` cannot be resolved on the host: {source}")]
    Resolve {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("target `{target}` resolves to no IPv4 address (this sandbox is IPv4 only)")]
    NoIpv4 { target: String },
    #[error("target `{target}` resolves to {address}: {why}; nothing was launched")]
    TargetForbidden {
        target: String,
        address: Ipv4Addr,
        why: &'static str,
    },
    #[error(
        "scoped egress needs IPv4 forwarding on the host (`sysctl net.ipv4.ip_forward=1`, \
         with the host's own forward filter in place); it is off"
    )]
    ForwardingOff,
    #[error("scoped egress runs under runsc only in this build (runtime `{0}`)")]
    RuntimeUnsupported(&'static str),
    #[error("the veth pool {0} has no free /30 left")]
    PoolExhausted(String),
    #[error("{command}: {detail}")]
    Command { command: String, detail: String },
    #[error("reading the egress ledger of table {table}: {detail}")]
    Ledger { table: String, detail: String },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NetError {
    /// The host is not set up for scoped egress (a configuration error).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            NetError::ForwardingOff | NetError::RuntimeUnsupported(_)
        )
    }
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> NetError {
    NetError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The private IPv4 range the veth pairs are numbered from, in `/30`s: slot `i`
/// is `base + 4i`, host side `+1`, sandbox `+2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub base: Ipv4Addr,
    pub prefix_len: u8,
}

impl Default for Pool {
    /// `10.213.0.0/16`: 16384 runs at once. Pick another range where that one is
    /// in use on the host's networks.
    fn default() -> Self {
        Pool {
            base: Ipv4Addr::new(10, 213, 0, 0),
            prefix_len: 16,
        }
    }
}

/// One run's `/30`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub host: Ipv4Addr,
    pub sandbox: Ipv4Addr,
}

impl Pool {
    fn size(&self) -> u32 {
        1u32 << (32 - u32::from(self.prefix_len.clamp(8, 30)))
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let base = u32::from(self.base);
        let a = u32::from(a);
        a >= base && a - base < self.size()
    }

    pub fn slot(&self, i: u32) -> Slot {
        let at = u32::from(self.base) + 4 * i;
        Slot {
            host: Ipv4Addr::from(at + 1),
            sandbox: Ipv4Addr::from(at + 2),
        }
    }

    fn slots(&self) -> u32 {
        self.size() / 4
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

/// The egress ledger of one run: every declared destination with the packets of
/// the connections it opened, and every refused destination with the packets of
/// its attempts, from the run's own nftables counters (the probe's two checks
/// included: one allowed connection per declared TCP destination, one refused
/// attempt to the host listener).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressLedger {
    /// The nftables table (`inet capsule_<run id>`).
    pub table: String,
    /// `sha256:<hex>` of the exact ruleset applied.
    pub ruleset_sha256: String,
    pub sandbox_address: String,
    pub host_address: String,
    pub targets: Vec<ResolvedTarget>,
    /// One entry per declared destination, in the order of `targets`; packets of
    /// new connections (one per TCP connection, one per UDP flow).
    pub allowed: Vec<LedgerEntry>,
    /// One entry per refused destination (the host's own addresses included).
    pub dropped: Vec<LedgerEntry>,
    /// Refused packets that were neither TCP nor UDP over IPv4 (ICMP, IPv6, ...),
    /// or whose destination no longer fitted the 4096 entries of the per-destination
    /// set.
    pub dropped_other_packets: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    pub address: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    pub port: u16,
    pub packets: u64,
}

impl EgressLedger {
    /// Packets counted for a destination among the allowed or the dropped.
    pub fn packets(entries: &[LedgerEntry], address: &str, protocol: &str, port: u16) -> u64 {
        entries
            .iter()
            .filter(|e| e.address == address && e.protocol == protocol && e.port == port)
            .map(|e| e.packets)
            .sum()
    }
}

/// What the bundle needs of a run's network: the namespace to join and the
/// pinned files for the sandbox's `/etc`.
#[derive(Debug, Clone)]
pub struct BundleNet {
    pub netns_path: PathBuf,
    /// `(path inside the sandbox, file on the host)`, bound read-only.
    pub etc_files: Vec<(&'static str, PathBuf)>,
}

/// One run's network, live from [`Egress::create`] until the teardown.
#[derive(Debug)]
pub struct Egress {
    run_id: String,
    slot: Slot,
    targets: Vec<ResolvedTarget>,
    allowed: Vec<Destination>,
    ruleset_sha256: String,
    bundle: BundleNet,
    _lock: Lock,
}

fn ensure_dir(dir: &Path) -> Result<(), NetError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("create directory", dir, e))
}

/// Whether the host forwards IPv4.
pub fn forwarding_on() -> bool {
    fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1")
}

impl Egress {
    /// Sets up the run's namespace, veth pair and table; `dir` (in the run
    /// directory) receives the ruleset and the sandbox's `/etc` files. On error,
    /// whatever was made is left for the teardown, which removes it by name.
    pub fn create(
        run_id: &str,
        targets: Vec<ResolvedTarget>,
        pool: &Pool,
        dir: &Path,
    ) -> Result<Egress, NetError> {
        if !forwarding_on() {
            return Err(NetError::ForwardingOff);
        }
        let run_dir = Path::new(NET_RUN_DIR);
        ensure_dir(run_dir)?;
        let lock_path = run_dir.join(format!("{run_id}.lock"));
        let lock = Lock::acquire(&lock_path).map_err(|e| NetError::Command {
            command: format!("lock {}", lock_path.display()),
            detail: e.to_string(),
        })?;
        let netns = netns_name(run_id);
        let host_if = host_veth(run_id);
        let slot = {
            // One allocation at a time on this host; the kernel's address list is
            // the record, so a crashed run's slot stays taken until it is removed.
            let alloc = run_dir.join("alloc.lock");
            let _guard = Lock::acquire(&alloc).map_err(|e| NetError::Command {
                command: format!("lock {}", alloc.display()),
                detail: e.to_string(),
            })?;
            let used = link::pool_addresses_in_use();
            let slot = (0..pool.slots())
                .map(|i| pool.slot(i))
                .find(|s| !used.contains(&s.host))
                .ok_or_else(|| NetError::PoolExhausted(pool.to_string()))?;
            link::create(&netns, &host_if, &peer_veth(run_id), &slot)?;
            slot
        };
        let allowed: Vec<Destination> = {
            let mut d: Vec<Destination> = targets.iter().flat_map(|t| t.destinations()).collect();
            d.sort();
            d.dedup();
            d
        };
        ensure_dir(dir)?;
        let rules = nft::ruleset(
            &table_name(run_id),
            &host_if,
            &slot.sandbox.to_string(),
            &allowed,
        );
        let rules_path = dir.join("ruleset.nft");
        write_file(&rules_path, rules.as_bytes())?;
        nft::apply(&rules_path)?;
        let digest = verify_core::crypto::default_backend().sha256_oneshot(rules.as_bytes());
        let etc_files = write_etc(dir, &targets)?;
        Ok(Egress {
            run_id: run_id.to_string(),
            slot,
            targets,
            allowed,
            ruleset_sha256: verify_core::Sha256Digest(digest).to_string(),
            bundle: BundleNet {
                netns_path: link::netns_path(&netns),
                etc_files,
            },
            _lock: lock,
        })
    }

    pub fn bundle(&self) -> &BundleNet {
        &self.bundle
    }

    pub fn host_address(&self) -> Ipv4Addr {
        self.slot.host
    }

    pub fn sandbox_address(&self) -> Ipv4Addr {
        self.slot.sandbox
    }

    /// The declared TCP destinations, which the probe must reach.
    pub fn tcp_destinations(&self) -> impl Iterator<Item = &Destination> {
        self.allowed.iter().filter(|d| d.protocol == "tcp")
    }

    /// The counters as they stand.
    pub fn ledger(&self) -> Result<EgressLedger, NetError> {
        let table = table_name(&self.run_id);
        let (allowed, dropped, other) = nft::read(&table, &self.allowed)?;
        Ok(EgressLedger {
            table,
            ruleset_sha256: self.ruleset_sha256.clone(),
            sandbox_address: self.slot.sandbox.to_string(),
            host_address: self.slot.host.to_string(),
            targets: self.targets.clone(),
            allowed,
            dropped,
            dropped_other_packets: other,
        })
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), NetError> {
    fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| io("write", path, e))
}

/// `/etc/hosts` with each target name pinned to its resolved addresses, an
/// `nsswitch.conf` that reads only that file, and a `resolv.conf` naming a
/// resolver only if a target is one (else none: glibc would try 127.0.0.1, the
/// sandbox's own loopback, where nothing listens).
fn write_etc(
    dir: &Path,
    targets: &[ResolvedTarget],
) -> Result<Vec<(&'static str, PathBuf)>, NetError> {
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for t in targets {
        if let Some(name) = &t.name {
            for a in &t.addresses {
                hosts.push_str(&format!("{a} {name}\n"));
            }
        }
    }
    let resolvers: Vec<String> = targets
        .iter()
        .filter(|t| t.resolver)
        .flat_map(|t| t.addresses.iter().map(|a| format!("nameserver {a}\n")))
        .collect();
    let nsswitch = if resolvers.is_empty() {
        "hosts: files\n"
    } else {
        "hosts: files dns\n"
    };
    let files = [
        ("/etc/hosts", hosts),
        ("/etc/nsswitch.conf", nsswitch.to_string()),
        ("/etc/resolv.conf", resolvers.concat()),
    ];
    let mut out = Vec::new();
    for (inside, text) in files {
        let host = dir.join(inside.trim_start_matches("/etc/"));
        write_file(&host, text.as_bytes())?;
        out.push((inside, host));
    }
    Ok(out)
}

/// Removes the run's namespace, veth pair and table, whichever exist; returns
/// what it did (and what failed: the checks of [`verify`] tell the verdict).
pub fn remove(run_id: &str) -> Vec<String> {
    let mut actions = Vec::new();
    link::remove(&netns_name(run_id), &host_veth(run_id), &mut actions);
    let table = table_name(run_id);
    if nft_installed() && nft::table_exists(&table).unwrap_or(true) {
        match nft::delete(&table) {
            Ok(()) => actions.push(format!("deleted nftables table inet {table}")),
            Err(e) => actions.push(e.to_string()),
        }
    }
    let _ = fs::remove_file(Path::new(NET_RUN_DIR).join(format!("{run_id}.lock")));
    actions
}

/// Whether anything of a network of `run_id` may be left: its namespace, its veth or
/// its lock file (each readable without privileges). A table is made only after the
/// lock and the namespace, and removed before them.
pub fn has_traces(run_id: &str) -> bool {
    link::netns_path(&netns_name(run_id)).exists()
        || link::link_exists(&host_veth(run_id))
        || Path::new(NET_RUN_DIR)
            .join(format!("{run_id}.lock"))
            .exists()
}

/// Without `nft` on the host, the launcher cannot have made a table.
fn nft_installed() -> bool {
    crate::runtime::process::find_program(Path::new("nft")).is_some()
}

/// From the outside: no namespace, veth or nftables table of the run is left.
pub fn verify(run_id: &str) -> Vec<Check> {
    let netns = netns_name(run_id);
    let veth = host_veth(run_id);
    let table = table_name(run_id);
    let ns_left = link::netns_path(&netns).exists();
    let veth_left = link::link_exists(&veth) || link::link_exists(&peer_veth(run_id));
    let table_check = if !nft_installed() {
        Check {
            name: "nft_table".into(),
            ok: true,
            detail: "nft is not installed: no table can have been made".into(),
        }
    } else {
        match nft::table_exists(&table) {
            Ok(left) => Check {
                name: "nft_table".into(),
                ok: !left,
                detail: format!(
                    "table inet {table} {}",
                    if left { "still exists" } else { "is gone" }
                ),
            },
            Err(e) => Check {
                name: "nft_table".into(),
                ok: false,
                detail: format!("cannot list nftables tables: {e}"),
            },
        }
    };
    vec![
        Check {
            name: "netns".into(),
            ok: !ns_left,
            detail: format!(
                "network namespace {netns} {}",
                if ns_left { "still exists" } else { "is gone" }
            ),
        },
        Check {
            name: "veth".into(),
            ok: !veth_left,
            detail: format!(
                "veth {veth} {}",
                if veth_left { "still exists" } else { "is gone" }
            ),
        },
        table_check,
    ]
}

/// Run ids (or, for veths, run id prefixes) of every namespace, veth and table of
/// the launcher's naming on this host.
fn traces() -> (Vec<String>, Vec<String>) {
    let is_run_id = |s: &str| crate::RunId::parse(s).is_some();
    let mut ids: Vec<String> = fs::read_dir(link::NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("capsule-")
                .filter(|r| is_run_id(r))
                .map(str::to_string)
        })
        .collect();
    if nft_installed() {
        for t in nft::list_tables().unwrap_or_default() {
            if let Some(r) = t.strip_prefix("capsule_").filter(|r| is_run_id(r)) {
                ids.push(r.to_string());
            }
        }
    }
    ids.sort();
    ids.dedup();
    let prefixes = fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let p = n
                .strip_prefix(VETH_PREFIX)?
                .strip_suffix(['h', 's'])?
                .to_string();
            (p.len() == RUN_ID_IN_VETH && p.bytes().all(|b| b.is_ascii_hexdigit())).then_some(p)
        })
        .collect();
    (ids, prefixes)
}

/// A stale network found and removed at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaleNet {
    /// The run id, or the 12-hex prefix of a veth whose namespace was gone.
    pub run: String,
    pub actions: Vec<String>,
    pub checks: Vec<Check>,
}

/// Removes every namespace, veth and table of a run that holds no lock.
pub fn recover_stale() -> Result<Vec<StaleNet>, NetError> {
    let dir = Path::new(NET_RUN_DIR);
    ensure_dir(dir)?;
    let (ids, prefixes) = traces();
    let mut out = Vec::new();
    let mut live = Vec::new();
    for run_id in ids {
        let lock_path = dir.join(format!("{run_id}.lock"));
        match Lock::try_acquire(&lock_path) {
            Ok(Some(_held)) => {
                let actions = remove(&run_id);
                let checks = verify(&run_id);
                out.push(StaleNet {
                    run: run_id,
                    actions,
                    checks,
                });
            }
            _ => live.push(run_id),
        }
    }
    // A veth whose namespace is already gone (a crash between creating the pair
    // and moving its peer): removed unless a live run owns its prefix.
    for p in prefixes {
        if live.iter().any(|r| r.starts_with(&p)) || locked_prefix(dir, &p) {
            continue;
        }
        let mut actions = Vec::new();
        for suffix in ['h', 's'] {
            let name = format!("{VETH_PREFIX}{p}{suffix}");
            if link::link_exists(&name) {
                match link::ip(&["link", "delete", &name]) {
                    Ok(_) => actions.push(format!("deleted veth {name}")),
                    Err(e) => actions.push(e.to_string()),
                }
            }
        }
        let left = link::link_exists(&format!("{VETH_PREFIX}{p}h"))
            || link::link_exists(&format!("{VETH_PREFIX}{p}s"));
        out.push(StaleNet {
            run: p.clone(),
            actions,
            checks: vec![Check {
                name: "veth".into(),
                ok: !left,
                detail: format!(
                    "veth {VETH_PREFIX}{p}h {}",
                    if left { "still exists" } else { "is gone" }
                ),
            }],
        });
    }
    Ok(out)
}

/// Whether a live run (its lock held) has this veth prefix.
fn locked_prefix(dir: &Path, prefix: &str) -> bool {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".lock").map(str::to_string)
        })
        .filter(|r| r.starts_with(prefix))
        .any(|r| matches!(Lock::try_acquire(&dir.join(format!("{r}.lock"))), Ok(None)))
}
