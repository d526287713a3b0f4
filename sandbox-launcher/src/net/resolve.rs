//! The run's destinations: every `scope.targets` entry resolved on the host, once,
//! when the run is admitted into the sandbox. The addresses found here are the only
//! ones the filter opens and the only ones pinned in the sandbox's `/etc/hosts`;
//! nothing is resolved again, so a name that changes its answer during the run
//! changes nothing.
//!
//! An address that would open the host itself or its link is refused, and so the
//! run: loopback (`localhost`, `127.0.0.0/8`), link-local (`169.254.0.0/16`, cloud
//! metadata services), unspecified, broadcast and multicast addresses, any address
//! of this host's own interfaces, and the launcher's own veth pool. A name that
//! resolves to several addresses opens all of them and must have none of these.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};

use serde::{Deserialize, Serialize};
use verify_core::net_target::{NetTarget, TargetHost, Transport};

use super::{NetError, Pool};

/// One destination the filter opens: an address, a transport and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub address: Ipv4Addr,
    /// `tcp` or `udp`.
    pub protocol: String,
    pub port: u16,
}

/// A `scope.targets` entry and what it resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedTarget {
    /// The entry as the manifest gives it.
    pub target: String,
    /// The host name, when the target named one (pinned in `/etc/hosts`).
    #[serde(deserialize_with = "crate::nullable")]
    pub name: Option<String>,
    pub addresses: Vec<Ipv4Addr>,
    pub port: u16,
    pub protocols: Vec<String>,
    /// A `dns://` target: the sandbox's only resolver.
    pub resolver: bool,
}

impl ResolvedTarget {
    pub fn destinations(&self) -> impl Iterator<Item = Destination> + '_ {
        self.addresses.iter().flat_map(move |a| {
            self.protocols.iter().map(move |p| Destination {
                address: *a,
                protocol: p.clone(),
                port: self.port,
            })
        })
    }
}

/// Resolves every target, refusing any address that would open the host.
pub fn resolve(targets: &[String], pool: &Pool) -> Result<Vec<ResolvedTarget>, NetError> {
    let local = host_addresses();
    let mut out = Vec::new();
    for text in targets {
        let t = NetTarget::parse(text).map_err(|source| NetError::TargetShape {
            target: text.clone(),
            source,
        })?;
        let (name, addresses) = match &t.host {
            TargetHost::Ip(ip) => (None, vec![*ip]),
            TargetHost::Name(n) => (Some(n.clone()), lookup(n, t.port, text)?),
        };
        for a in &addresses {
            if let Some(why) = forbidden(*a, &local, pool) {
                return Err(NetError::TargetForbidden {
                    target: text.clone(),
                    address: *a,
                    why,
                });
            }
        }
        out.push(ResolvedTarget {
            target: text.clone(),
            name,
            addresses,
            port: t.port,
            protocols: t
                .transports
                .iter()
                .map(|p| Transport::as_str(p).to_string())
                .collect(),
            resolver: t.resolver,
        });
    }
    Ok(out)
}

/// The host's resolver (getaddrinfo), IPv4 answers only, sorted and deduplicated.
fn lookup(name: &str, port: u16, target: &str) -> Result<Vec<Ipv4Addr>, NetError> {
    let found: BTreeSet<Ipv4Addr> = (name, port)
        .to_socket_addrs()
        .map_err(|source| NetError::Resolve {
            target: target.to_string(),
            source,
        })?
        .filter_map(|s| match s.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    if found.is_empty() {
        return Err(NetError::NoIpv4 {
            target: target.to_string(),
        });
    }
    Ok(found.into_iter().collect())
}

/// Why an address may not be opened, if it may not.
pub(crate) fn forbidden(a: Ipv4Addr, local: &[Ipv4Addr], pool: &Pool) -> Option<&'static str> {
    if a.is_loopback() {
        Some("a loopback address would open the host")
    } else if a.is_link_local() {
        Some("a link-local address (metadata services, the host's link) is never opened")
    } else if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
        Some("not a unicast address")
    } else if pool.contains(a) {
        Some("an address of the launcher's own veth pool")
    } else if local.contains(&a) {
        Some("an address of this host")
    } else {
        None
    }
}

/// Every IPv4 address of this host's interfaces (in the launcher's namespace).
pub fn host_addresses() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v4| v4.ip())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_that_open_the_host_are_refused_each_with_its_reason() {
        let pool = Pool::default();
        let local = vec![Ipv4Addr::new(192, 0, 2, 7)];
        for (a, want) in [
            ([127, 0, 0, 1], "loopback"),
            ([127, 1, 2, 3], "loopback"),
            ([169, 254, 169, 254], "link-local"),
            ([0, 0, 0, 0], "unicast"),
            ([255, 255, 255, 255], "unicast"),
            ([224, 0, 0, 1], "unicast"),
            ([192, 0, 2, 7], "this host"),
        ] {
            let why = forbidden(a.into(), &local, &pool).unwrap_or("allowed");
            assert!(why.contains(want), "{a:?}: {why}");
        }
        let in_pool = pool.slot(3).sandbox;
        assert!(forbidden(in_pool, &local, &pool).is_some_and(|w| w.contains("pool")));
        assert_eq!(forbidden([10, 1, 2, 3].into(), &local, &pool), None);
    }

    #[test]
    fn localhost_by_name_is_refused_before_anything_opens() {
        let err =
            resolve(&["http://localhost:8080/".into()], &Pool::default()).expect_err("localhost");
        assert!(
            matches!(&err, NetError::TargetForbidden { address, .. } if address.is_loopback()),
            "{err}"
        );
    }
}
