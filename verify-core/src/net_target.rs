//! `scope.targets` entries read as network destinations, for `scope.network =
//! "targets"`: which host, which port, which transport. Shape only: no name is
//! resolved here (verify-core does no network); the sandbox launcher resolves the
//! names on the host when it admits the run into the sandbox, and opens exactly
//! these destinations.
//!
//! Accepted forms (anything else is refused with one reason):
//! - `http://HOST[:PORT][/...]` (TCP, port 80 by default);
//! - `https://HOST[:PORT][/...]` (TCP, port 443 by default);
//! - `tcp://HOST:PORT` and `udp://HOST:PORT` (port required);
//! - `dns://HOST[:PORT]` (a resolver: UDP and TCP, port 53 by default); only a
//!   resolver target gives the sandbox any DNS.
//!
//! HOST is a dotted-quad IPv4 address or a DNS name (letters, digits, `-`, labels
//! of 1 to 63 bytes, the last one starting with a letter, so that `127.1` or
//! `0x7f.1` are never handed to a resolver that reads them as addresses). IPv6
//! literals, user info (`user@host`) and empty ports are refused.

use std::net::Ipv4Addr;

/// The transport a destination is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// Where a target's host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    Ip(Ipv4Addr),
    /// A DNS name, lowercased, without a trailing dot.
    Name(String),
}

/// One `scope.targets` entry as a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetTarget {
    /// The entry as the manifest gives it.
    pub text: String,
    pub host: TargetHost,
    pub port: u16,
    pub transports: Vec<Transport>,
    /// A `dns://` target: the sandbox's resolver.
    pub resolver: bool,
}

/// Why a `scope.targets` entry is not a destination the sandbox can open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetTargetError {
    #[error("not `scheme://host...`")]
    NotAUrl,
    #[error("scheme `{0}` is not one of http, https, tcp, udp, dns")]
    Scheme(String),
    #[error("user info (`...@`) is not allowed in a target")]
    UserInfo,
    #[error("IPv6 targets are not supported by this sandbox")]
    Ipv6,
    #[error("`{0}` is not an IPv4 address or a DNS name")]
    Host(String),
    #[error("port `{0}` is not 1 to 65535")]
    Port(String),
    #[error("a `{0}://` target needs an explicit port")]
    PortRequired(&'static str),
    #[error("a `{0}://` target has no path")]
    Path(&'static str),
}

impl NetTarget {
    pub fn parse(text: &str) -> Result<NetTarget, NetTargetError> {
        let (scheme, rest) = text.split_once("://").ok_or(NetTargetError::NotAUrl)?;
        let (default_port, transports, resolver, scheme): (Option<u16>, &[Transport], bool, _) =
            match scheme {
                "http" => (Some(80), &[Transport::Tcp], false, "http"),
                "https" => (Some(443), &[Transport::Tcp], false, "https"),
                "tcp" => (None, &[Transport::Tcp], false, "tcp"),
                "udp" => (None, &[Transport::Udp], false, "udp"),
                "dns" => (Some(53), &[Transport::Udp, Transport::Tcp], true, "dns"),
                other => {
                    return Err(NetTargetError::Scheme(
                        other.chars().take(16).collect::<String>(),
                    ))
                }
            };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if !path.is_empty() && !matches!(scheme, "http" | "https") {
            return Err(NetTargetError::Path(scheme));
        }
        if authority.contains('@') {
            return Err(NetTargetError::UserInfo);
        }
        if authority.starts_with('[') {
            return Err(NetTargetError::Ipv6);
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&n| n != 0 && !p.starts_with(['+', '0']))
                    .ok_or_else(|| NetTargetError::Port(p.chars().take(16).collect()))?;
                (h, port)
            }
            None => (
                authority,
                default_port.ok_or(NetTargetError::PortRequired(scheme))?,
            ),
        };
        Ok(NetTarget {
            text: text.to_string(),
            host: parse_host(host)?,
            port,
            transports: transports.to_vec(),
            resolver,
        })
    }
}

fn parse_host(host: &str) -> Result<TargetHost, NetTargetError> {
    let bad = || NetTargetError::Host(host.chars().take(64).collect());
    if host.contains(':') {
        return Err(NetTargetError::Ipv6);
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(TargetHost::Ip(ip));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let last_alpha = labels
        .last()
        .and_then(|l| l.bytes().next())
        .is_some_and(|b| b.is_ascii_alphabetic());
    if name.is_empty() || name.len() > 253 || !labels.iter().all(label_ok) || !last_alpha {
        return Err(bad());
    }
    Ok(TargetHost::Name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_to_host_port_and_transport() {
        let t = NetTarget::parse("https://Auth.Example/token").expect("https");
        assert_eq!(
            (t.host, t.port, t.transports, t.resolver),
            (
                TargetHost::Name("auth.example".into()),
                443,
                vec![Transport::Tcp],
                false
            )
        );
        let t = NetTarget::parse("http://10.1.2.3:8080/x?y").expect("http");
        assert_eq!(
            (t.host, t.port),
            (TargetHost::Ip([10, 1, 2, 3].into()), 8080)
        );
        let t = NetTarget::parse("dns://10.0.0.53").expect("dns");
        assert_eq!(
            (t.port, t.transports, t.resolver),
            (53, vec![Transport::Udp, Transport::Tcp], true)
        );
        assert_eq!(
            NetTarget::parse("udp://a.example:514").expect("udp").port,
            514
        );
    }

    #[test]
    fn each_bad_target_names_its_reason() {
        use NetTargetError::*;
        for (text, why) in [
            ("auth.example", NotAUrl),
            ("ftp://a.example", Scheme("ftp".into())),
            ("http://user@a.example/", UserInfo),
            ("http://a.example@10.0.0.1/", UserInfo),
            ("http://[::1]/", Ipv6),
            ("http://127.1/", Host("127.1".into())),
            ("http://0x7f.1/", Host("0x7f.1".into())),
            ("http://a..example/", Host("a..example".into())),
            ("http://a.example:0/", Port("0".into())),
            ("http://a.example:/", Port(String::new())),
            ("http://a.example:65536/", Port("65536".into())),
            ("http://a.example:080/", Port("080".into())),
            ("tcp://a.example", PortRequired("tcp")),
            ("tcp://a.example:1/x", Path("tcp")),
            ("http:///x", Host(String::new())),
        ] {
            assert_eq!(NetTarget::parse(text), Err(why), "{text}");
        }
    }
}
