//! The run's nftables table: the filter between the sandbox's veth and everything
//! else, and the counters that are the egress ledger.
//!
//! Why the `nft` binary (Debian package `nftables`) and not the `nftables` crate:
//! that crate drives the same `nft -j` program, and its schema has no way to
//! declare a set with per-element counters, which is what counts dropped attempts
//! per destination here. The ruleset is written as nft text to the run's directory
//! and applied in one `nft -f` transaction (all or nothing); the counters are read
//! back with `nft -j list table`, parsed by serde into the few fields used.
//!
//! One table per run, `inet capsule_<run id>`, so that a crashed run's table is
//! found by its name. Its chains run at priority -10, before the host's own
//! filter: their `accept` opens nothing the host's filter drops, their `reject`
//! closes what the host would let through.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use super::resolve::Destination;
use super::{LedgerEntry, NetError};
use crate::runtime::process::run_bounded;

const NFT_LIMIT: Duration = Duration::from_secs(10);

fn nft(args: &[&str]) -> Result<String, NetError> {
    let mut cmd = Command::new("nft");
    cmd.args(args);
    let what = || format!("nft {}", args.join(" "));
    let ran = run_bounded(&mut cmd, NFT_LIMIT).map_err(|e| NetError::Command {
        command: what(),
        detail: e.to_string(),
    })?;
    if !ran.ok {
        return Err(NetError::Command {
            command: what(),
            detail: ran.stderr.trim().to_string(),
        });
    }
    Ok(ran.stdout)
}

/// The table's ruleset. `allowed[i]` is counted by the named counter `allow_i`.
///
/// - From the sandbox (`iifname HOST_IF`), forwarded: replies of accepted
///   connections pass; a new connection to a declared destination is counted and
///   accepted; every other attempt is counted per destination (address,
///   protocol, port) in the set `dropped`, or in `dropped_other` when it is
///   neither TCP nor UDP, and rejected (ICMP administratively prohibited, so that
///   the capsule fails at once and each attempt is counted once, not once per
///   retransmission).
/// - From the sandbox to the host itself (input hook): always rejected, counted
///   the same way. The host's loopback, its veth address and every other address
///   it owns are closed.
/// - Towards the sandbox: only replies; nothing may open a connection into it.
/// - IPv6 from the sandbox: rejected (this sandbox is IPv4 only).
/// - The sandbox's address is masqueraded on its way out, so that a target needs
///   no route back to the launcher's pool.
pub(crate) fn ruleset(
    table: &str,
    host_if: &str,
    sandbox: &str,
    allowed: &[Destination],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table inet {table} {{");
    for i in 0..allowed.len() {
        let _ = writeln!(s, "  counter allow_{i} {{\n  }}");
    }
    let _ = writeln!(
        s,
        "  counter dropped_other {{\n  }}\n  set dropped {{\n    type ipv4_addr . inet_proto . inet_service\n    flags dynamic\n    counter\n    size 4096\n  }}"
    );
    let refuse = format!(
        "    iifname \"{host_if}\" meta nfproto ipv4 meta l4proto {{ tcp, udp }} add @dropped {{ ip daddr . meta l4proto . th dport }} reject with icmpx admin-prohibited\n    iifname \"{host_if}\" counter name dropped_other reject with icmpx admin-prohibited\n"
    );
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority -10; policy accept;\n    oifname \"{host_if}\" ct state established,related accept\n    oifname \"{host_if}\" drop\n    iifname \"{host_if}\" meta nfproto ipv4 ct state established,related accept"
    );
    for (i, d) in allowed.iter().enumerate() {
        let _ = writeln!(
            s,
            "    iifname \"{host_if}\" ip daddr {} meta l4proto {} th dport {} ct state new counter name allow_{i} accept",
            d.address, d.protocol, d.port
        );
    }
    s.push_str(&refuse);
    let _ = writeln!(s, "  }}");
    let _ = writeln!(
        s,
        "  chain input {{\n    type filter hook input priority -10; policy accept;\n{refuse}  }}"
    );
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    ip saddr {sandbox} oifname != \"{host_if}\" masquerade\n  }}\n}}"
    );
    s
}

/// Applies the ruleset file in one transaction.
pub(crate) fn apply(file: &Path) -> Result<(), NetError> {
    nft(&["-f", &file.to_string_lossy()]).map(|_| ())
}

pub(crate) fn table_exists(table: &str) -> Result<bool, NetError> {
    Ok(list_tables()?.iter().any(|t| t == table))
}

/// Names of every `inet` table.
pub(crate) fn list_tables() -> Result<Vec<String>, NetError> {
    let out = nft(&["list", "tables", "inet"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .map(|t| t.trim().to_string())
        .collect())
}

pub(crate) fn delete(table: &str) -> Result<(), NetError> {
    nft(&["delete", "table", "inet", table]).map(|_| ())
}

/// What the counters say: packets per declared destination (in `allowed`'s
/// order), per dropped destination, and dropped packets that were neither TCP nor
/// UDP.
pub(crate) fn read(
    table: &str,
    allowed: &[Destination],
) -> Result<(Vec<LedgerEntry>, Vec<LedgerEntry>, u64), NetError> {
    let out = nft(&["-j", "list", "table", "inet", table])?;
    let doc: Doc = serde_json::from_str(&out).map_err(|e| NetError::Ledger {
        table: table.to_string(),
        detail: e.to_string(),
    })?;
    let mut counters = std::collections::HashMap::new();
    let mut dropped = Vec::new();
    for item in doc.nftables {
        match item {
            Item::Counter { counter } => {
                counters.insert(counter.name, counter.packets);
            }
            Item::Set { set } if set.name == "dropped" => {
                for e in set.elem {
                    let Elem::Counted { elem } = e else { continue };
                    let [address, protocol, port] = &elem.val.concat;
                    dropped.push(LedgerEntry {
                        address: address.as_str().unwrap_or_default().to_string(),
                        protocol: protocol.as_str().unwrap_or_default().to_string(),
                        port: port
                            .as_u64()
                            .and_then(|p| u16::try_from(p).ok())
                            .unwrap_or(0),
                        packets: elem.counter.packets,
                    });
                }
            }
            _ => {}
        }
    }
    let allowed = allowed
        .iter()
        .enumerate()
        .map(|(i, d)| LedgerEntry {
            address: d.address.to_string(),
            protocol: d.protocol.clone(),
            port: d.port,
            packets: counters.get(&format!("allow_{i}")).copied().unwrap_or(0),
        })
        .collect();
    dropped
        .sort_by(|a, b| (&a.address, &a.protocol, a.port).cmp(&(&b.address, &b.protocol, b.port)));
    let other = counters.get("dropped_other").copied().unwrap_or(0);
    Ok((allowed, dropped, other))
}

#[derive(Deserialize)]
struct Doc {
    nftables: Vec<Item>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Item {
    Counter { counter: NamedCounter },
    Set { set: SetItem },
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct NamedCounter {
    name: String,
    packets: u64,
}

#[derive(Deserialize)]
struct SetItem {
    name: String,
    #[serde(default)]
    elem: Vec<Elem>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Elem {
    Counted { elem: Box<CountedElem> },
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct CountedElem {
    val: Concat,
    counter: Packets,
}

#[derive(Deserialize)]
struct Concat {
    concat: [serde_json::Value; 3],
}

#[derive(Deserialize)]
struct Packets {
    packets: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_opens_exactly_the_declared_destinations() {
        let d = Destination {
            address: [10, 1, 2, 3].into(),
            protocol: "tcp".into(),
            port: 8080,
        };
        let r = ruleset("capsule_x", "cgxh", "10.213.0.2", &[d]);
        assert_eq!(r.matches(" accept\n").count(), 3, "{r}");
        assert!(r.contains(
            "iifname \"cgxh\" ip daddr 10.1.2.3 meta l4proto tcp th dport 8080 ct state new counter name allow_0 accept"
        ));
        assert_eq!(
            r.matches("reject with icmpx admin-prohibited").count(),
            4,
            "{r}"
        );
    }

    #[test]
    fn the_ledger_is_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "inet", "name": "t", "handle": 1}},
          {"counter": {"family": "inet", "name": "allow_0", "table": "t", "handle": 2, "packets": 3, "bytes": 180}},
          {"counter": {"family": "inet", "name": "dropped_other", "table": "t", "handle": 3, "packets": 1, "bytes": 84}},
          {"set": {"family": "inet", "name": "dropped", "table": "t", "type": ["ipv4_addr", "inet_proto", "inet_service"],
            "handle": 4, "size": 4096, "elem": [{"elem": {"val": {"concat": ["10.99.0.1", "udp", 53]},
            "counter": {"packets": 2, "bytes": 60}}}], "stmt": [{"counter": null}]}}]}"#;
        let doc: Doc = serde_json::from_str(json).expect("parses");
        let n = doc
            .nftables
            .iter()
            .filter(|i| matches!(i, Item::Counter { .. } | Item::Set { .. }))
            .count();
        assert_eq!(n, 3);
    }
}
