//! The run's network namespace and veth pair, made and removed with iproute2's `ip`
//! (Debian package `iproute2`).
//!
//! Why the `ip` binary and not a netlink crate: `rtnetlink` is async (tokio), and
//! the launcher is synchronous and runtime-free; creating a named network namespace
//! (`ip netns add`: unshare, then bind-mount `/proc/self/ns/net` at
//! `/run/netns/NAME`) is not netlink at all. `ip` does exactly the steps below,
//! each one a short bounded command whose failure names itself.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{NetError, Slot};
use crate::runtime::process::run_bounded;

const IP_LIMIT: Duration = Duration::from_secs(10);
/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Runs `ip ARGS`; its stderr is the error.
pub(crate) fn ip(args: &[&str]) -> Result<String, NetError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let ran = run_bounded(&mut cmd, IP_LIMIT).map_err(|e| NetError::Command {
        command: format!("ip {}", args.join(" ")),
        detail: e.to_string(),
    })?;
    if !ran.ok {
        return Err(NetError::Command {
            command: format!("ip {}", args.join(" ")),
            detail: ran.stderr.trim().to_string(),
        });
    }
    Ok(ran.stdout)
}

pub(crate) fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// Whether an interface of this name exists in the launcher's namespace.
pub(crate) fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The sandbox's namespace (loopback up, `eth0` with the slot's sandbox address
/// and a default route through the host side), and the host side of the pair
/// with the slot's host address. The host side stays in the launcher's own
/// namespace, where the run's nftables table filters what it forwards.
pub(crate) fn create(
    netns: &str,
    host_if: &str,
    peer_if: &str,
    slot: &Slot,
) -> Result<(), NetError> {
    let sandbox = format!("{}/30", slot.sandbox);
    let host = format!("{}/30", slot.host);
    let gw = slot.host.to_string();
    ip(&["netns", "add", netns])?;
    ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", peer_if,
    ])?;
    ip(&["link", "set", peer_if, "netns", netns])?;
    ip(&["-n", netns, "link", "set", peer_if, "name", "eth0"])?;
    ip(&["-n", netns, "addr", "add", &sandbox, "dev", "eth0"])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n", netns, "route", "add", "default", "via", &gw, "dev", "eth0",
    ])?;
    ip(&["addr", "add", &host, "dev", host_if])?;
    ip(&["link", "set", host_if, "up"])?;
    Ok(())
}

/// Removes the namespace (which destroys the veth end inside it, and so its peer)
/// and the host side if it is still there. Returns what it did or failed to do.
pub(crate) fn remove(netns: &str, host_if: &str, actions: &mut Vec<String>) {
    // A process still in the namespace (the sandbox of a launcher that died, its
    // runtime not ours to ask) would keep the namespace and its veth alive after
    // the unmount, without the table: it is killed first.
    if netns_path(netns).exists() {
        let pids = |out: String| -> Vec<u32> {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        };
        let left = pids(ip(&["netns", "pids", netns]).unwrap_or_default());
        for pid in &left {
            crate::host::signal(*pid, crate::host::Signal::KILL);
            actions.push(format!(
                "killed process {pid} left in network namespace {netns}"
            ));
        }
        if !left.is_empty() {
            crate::host::poll_until(Duration::from_secs(10), || {
                pids(ip(&["netns", "pids", netns]).unwrap_or_default()).is_empty()
            });
        }
    }
    if netns_path(netns).exists() {
        match ip(&["netns", "delete", netns]) {
            Ok(_) => actions.push(format!("deleted network namespace {netns}")),
            Err(e) => actions.push(e.to_string()),
        }
    }
    // The kernel destroys the pair with the namespace, asynchronously.
    crate::host::poll_until(Duration::from_secs(2), || !link_exists(host_if));
    if link_exists(host_if) {
        match ip(&["link", "delete", host_if]) {
            Ok(_) => actions.push(format!("deleted veth {host_if}")),
            Err(e) => actions.push(e.to_string()),
        }
    }
}

/// Host addresses already taken by the launcher's veths (any launcher's).
pub(crate) fn pool_addresses_in_use() -> Vec<Ipv4Addr> {
    super::resolve::host_addresses()
}
