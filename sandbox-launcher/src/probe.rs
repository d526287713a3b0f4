//! Default-deny egress, proven on every run rather than assumed.
//!
//! Before the capsule's entrypoint, in the same sandbox (same namespaces, same user,
//! same limits), the probe tries a TCP connect to a listener the launcher opened on
//! the host's loopback for this run, and lists the sandbox's network interfaces. It
//! prints one line — [`PROBE_MARKER`] and a JSON [`ProbeReport`] — on stdout, then
//! `exec`s the entrypoint with exactly the manifest's environment. A probe that
//! connects does not exec: it exits with [`EXIT_EGRESS_OPEN`] and the run fails.
//!
//! The probe itself runs with an empty environment: the OCI process has none, and
//! the manifest's env reaches the probe as `--env NAME=VALUE` arguments, applied only
//! at the `execve` of the entrypoint. Were it the probe's own environment, the
//! dynamic loader would read it first: `LD_PRELOAD`, `LD_AUDIT`, `LD_LIBRARY_PATH`
//! or `GCONV_PATH` naming a library under `/capsule` would run capsule code inside
//! the probe, before the report, and could print a forged one.
//!
//! The probe is a mode of a binary the launcher trusts (the gateway's hidden
//! `sandbox-probe` subcommand, or this crate's `capsule-sandbox-probe`), bind-mounted
//! read-only at `/.capsule-probe`; it is not part of the capsule, so a capsule cannot
//! replace it. The capsule only runs after the probe line is written, so it cannot
//! write a line in front of it. The launcher does not take the probe's word alone:
//! after the run it asks its own listener whether anything connected, and checks
//! that the interface list holds only loopback interfaces. All three facts are
//! recorded as evidence.
//!
//! `scope.network = "targets"` ([`crate::net`]): the listener is on the host side
//! of the run's veth instead (the address the sandbox's route leads to), and the
//! probe also connects to every declared TCP destination (`--reach ADDR`) and
//! closes at once. The launcher checks both directions in its own nftables
//! counters ([`HostListener::verdict_scoped`]): the refused attempt must be
//! counted as dropped, each reached destination as allowed.

use std::ffi::OsString;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of the probe's report line on stdout.
pub const PROBE_MARKER: &str = "capsule-egress-probe/v1 ";
/// Exit code of a probe that reached the host listener (the capsule is not run).
pub const EXIT_EGRESS_OPEN: i32 = 97;
/// Exit code of a probe that could not exec the entrypoint.
pub const EXIT_EXEC_FAILED: i32 = 127;
/// Exit code of a probe given bad arguments.
pub const EXIT_USAGE: i32 = 96;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probe saw from inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeReport {
    /// The address it tried to reach.
    pub target: String,
    pub connected: bool,
    /// Why the connect failed (the OS error as text), when it did.
    pub error: Option<String>,
    pub errno: Option<i32>,
    pub interfaces: Vec<Interface>,
    /// `scope.network = "targets"`: each declared TCP destination the probe had to
    /// reach, and whether it did (absent in runs without a network).
    #[serde(default)]
    pub reached: Vec<Reach>,
}

/// One declared destination the probe connected to (and closed at once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reach {
    pub target: String,
    pub connected: bool,
    #[serde(deserialize_with = "crate::nullable")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    pub loopback: bool,
    pub up: bool,
    pub addresses: Vec<String>,
}

/// The egress verdict of one run, from both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressReport {
    /// The host listener (loopback) the probe had to fail to reach.
    pub target: String,
    /// The probe's own report; `None` when it never ran or printed nothing.
    #[serde(deserialize_with = "crate::nullable")]
    pub probe: Option<ProbeReport>,
    /// Whether the host listener accepted any connection during the run.
    pub listener_accepted: bool,
    /// Whether every interface the probe saw is a loopback interface.
    pub only_loopback: bool,
    /// The verdict: the probe ran, its connect failed, the listener saw nothing, and
    /// the sandbox has no interface but loopback (`targets`: none but loopback and
    /// its one veth with its one address, and the ledger counted the refused
    /// attempt).
    pub blocked: bool,
    /// `targets`: the egress ledger, from the run's nftables counters (absent in
    /// runs without a network).
    #[serde(default)]
    pub ledger: Option<crate::net::EgressLedger>,
    /// Every declared TCP destination was reached by the probe, and the ledger
    /// counted each of those connections as allowed. `true` when there is none to
    /// reach (`none`).
    #[serde(default)]
    pub declared_reached: bool,
}

/// The launcher's side: a TCP listener on host loopback for one run.
#[derive(Debug)]
pub struct HostListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl HostListener {
    /// On host loopback (`scope.network = "none"`).
    pub fn open() -> std::io::Result<HostListener> {
        HostListener::open_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// On one of the host's own addresses (`targets`: the host side of the run's
    /// veth, the address the sandbox's route leads to).
    pub fn open_on(ip: std::net::Ipv4Addr) -> std::io::Result<HostListener> {
        let listener = TcpListener::bind((ip, 0))?;
        // Never blocks: a connection that arrived waits in the backlog, fully
        // established by the kernel, until `accepted` looks.
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(HostListener { listener, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether anything connected since the listener opened (drains the backlog).
    pub fn accepted(&self) -> bool {
        let mut any = false;
        while self.listener.accept().is_ok() {
            any = true;
        }
        any
    }

    /// Combines the host's view with the probe's report.
    pub fn verdict(&self, probe: Option<ProbeReport>) -> EgressReport {
        let listener_accepted = self.accepted();
        let only_loopback = probe
            .as_ref()
            .is_some_and(|p| p.interfaces.iter().all(|i| i.loopback));
        let blocked =
            probe.as_ref().is_some_and(|p| !p.connected) && !listener_accepted && only_loopback;
        EgressReport {
            target: self.addr.to_string(),
            probe,
            listener_accepted,
            only_loopback,
            blocked,
            ledger: None,
            declared_reached: true,
        }
    }

    /// The verdict of a `targets` run: the host's view, the probe's report and the
    /// ledger must agree. Blocked: the probe's connect to this listener failed, the
    /// listener saw nothing, the ledger counted that attempt as refused, and the
    /// sandbox has loopback and one interface with exactly `sandbox_address`.
    /// Declared reached: the probe reached every declared TCP destination and the
    /// ledger counted a connection to each. The probe's word alone proves neither.
    pub fn verdict_scoped(
        &self,
        probe: Option<ProbeReport>,
        ledger: crate::net::EgressLedger,
        sandbox_address: std::net::Ipv4Addr,
    ) -> EgressReport {
        use crate::net::EgressLedger as L;
        let listener_accepted = self.accepted();
        let (ip, port) = (self.addr.ip().to_string(), self.addr.port());
        let refused_counted = L::packets(&ledger.dropped, &ip, "tcp", port) > 0;
        let want = sandbox_address.to_string();
        let interfaces_ok = probe.as_ref().is_some_and(|p| {
            let others: Vec<&Interface> = p.interfaces.iter().filter(|i| !i.loopback).collect();
            others.len() == 1
                && others[0]
                    .addresses
                    .iter()
                    .filter(|a| !a.contains(':'))
                    .eq([&want])
        });
        let only_loopback = probe
            .as_ref()
            .is_some_and(|p| p.interfaces.iter().all(|i| i.loopback));
        let blocked = probe.as_ref().is_some_and(|p| !p.connected)
            && !listener_accepted
            && refused_counted
            && interfaces_ok;
        let tcp: std::collections::BTreeSet<crate::net::Destination> = ledger
            .targets
            .iter()
            .flat_map(|t| t.destinations())
            .filter(|d| d.protocol == "tcp")
            .collect();
        let declared_reached = probe.as_ref().is_some_and(|p| {
            tcp.iter().all(|d| {
                let addr = format!("{}:{}", d.address, d.port);
                p.reached.iter().any(|r| r.target == addr && r.connected)
                    && L::packets(&ledger.allowed, &d.address.to_string(), "tcp", d.port) > 0
            })
        });
        EgressReport {
            target: self.addr.to_string(),
            probe,
            listener_accepted,
            only_loopback,
            blocked,
            ledger: Some(ledger),
            declared_reached,
        }
    }
}

/// Splits the probe's report line off the front of the sandbox's stdout. Returns
/// the report (if the first line is one) and the capsule's own output.
pub fn split_report(stdout: &[u8]) -> (Option<ProbeReport>, &[u8]) {
    let Some(rest) = stdout.strip_prefix(PROBE_MARKER.as_bytes()) else {
        return (None, stdout);
    };
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        return (None, stdout);
    };
    match serde_json::from_slice::<ProbeReport>(&rest[..end]) {
        Ok(report) => (Some(report), &rest[end + 1..]),
        Err(_) => (None, stdout),
    }
}

/// The probe's entry point inside the sandbox. `args` are what follows the mode
/// selector: `--connect ADDR -- ENTRYPOINT...`. Returns only if it must not or
/// cannot exec the entrypoint; the value is the exit code.
pub fn sandbox_main(args: &[OsString]) -> i32 {
    let Args {
        target,
        reach,
        env,
        entrypoint,
    } = match parse_args(args) {
        Ok(parsed) => parsed,
        Err(why) => {
            eprintln!("capsule egress probe: {why}");
            return EXIT_USAGE;
        }
    };
    let mut report = probe(target);
    report.reached = reach.iter().map(|r| reach_one(*r)).collect();
    let line = match serde_json::to_string(&report) {
        Ok(json) => format!("{PROBE_MARKER}{json}\n"),
        Err(e) => {
            eprintln!("capsule egress probe: {e}");
            return EXIT_USAGE;
        }
    };
    let mut out = std::io::stdout().lock();
    if out
        .write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return EXIT_USAGE;
    }
    drop(out);
    if report.connected {
        eprintln!(
            "capsule egress probe: connected to {target} on the host: egress is not blocked, \
             the capsule is not run"
        );
        return EXIT_EGRESS_OPEN;
    }
    // Exactly the manifest's env, whatever the runtime added to the probe's own.
    let err = std::process::Command::new(&entrypoint[0])
        .args(&entrypoint[1..])
        .env_clear()
        .envs(env)
        .exec();
    eprintln!(
        "capsule egress probe: cannot exec {}: {err}",
        entrypoint[0].to_string_lossy()
    );
    EXIT_EXEC_FAILED
}

/// What the launcher asks of the probe.
#[derive(Debug, PartialEq, Eq)]
struct Args<'a> {
    target: SocketAddr,
    /// Declared destinations that must be reachable (`targets`).
    reach: Vec<SocketAddr>,
    /// The manifest's env: the entrypoint gets these and nothing else. They come as
    /// arguments, not as the probe's environment (see the module docs).
    env: Vec<(&'a str, &'a str)>,
    entrypoint: &'a [OsString],
}

const USAGE: &str =
    "usage: --connect ADDR [--reach ADDR]... [--env NAME=VALUE]... -- ENTRYPOINT [ARG...]";

/// Why the probe refused its arguments (it prints this and exits [`EXIT_USAGE`]).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum ArgsError {
    #[error("{USAGE}")]
    Usage,
    #[error("bad address {0:?}")]
    BadAddress(OsString),
    #[error("no entrypoint after `--`")]
    NoEntrypoint,
    #[error("an env entry is not UTF-8")]
    EnvNotUtf8,
    #[error("env entry `{0}` is not NAME=VALUE")]
    EnvNotPair(String),
    #[error("env name `{0}` is not [A-Za-z_][A-Za-z0-9_]*")]
    EnvBadName(String),
    #[error("env name `{0}` given twice")]
    EnvTwice(String),
}

fn parse_args(args: &[OsString]) -> Result<Args<'_>, ArgsError> {
    let [flag, addr, rest @ ..] = args else {
        return Err(ArgsError::Usage);
    };
    if flag != "--connect" {
        return Err(ArgsError::Usage);
    }
    let target = addr
        .to_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| ArgsError::BadAddress(addr.clone()))?;
    let mut env = Vec::new();
    let mut reach = Vec::new();
    let mut rest = rest;
    while let [flag, addr, more @ ..] = rest {
        if flag != "--reach" {
            break;
        }
        reach.push(
            addr.to_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| ArgsError::BadAddress(addr.clone()))?,
        );
        rest = more;
    }
    loop {
        match rest {
            [sep, entrypoint @ ..] if sep == "--" => {
                if entrypoint.is_empty() {
                    return Err(ArgsError::NoEntrypoint);
                }
                return Ok(Args {
                    target,
                    reach,
                    env,
                    entrypoint,
                });
            }
            [env_flag, pair, more @ ..] if env_flag == "--env" => {
                let pair = pair.to_str().ok_or(ArgsError::EnvNotUtf8)?;
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| ArgsError::EnvNotPair(pair.to_string()))?;
                if !valid_env_name(name) {
                    return Err(ArgsError::EnvBadName(name.to_string()));
                }
                if env.iter().any(|(k, _)| *k == name) {
                    return Err(ArgsError::EnvTwice(name.to_string()));
                }
                env.push((name, value));
                rest = more;
            }
            _ => return Err(ArgsError::Usage),
        }
    }
}

/// The verifier's rule for env names (`verify_core::check_shape`).
fn valid_env_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Connects to a declared destination and closes at once.
fn reach_one(target: SocketAddr) -> Reach {
    let (connected, error) = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(_) => (true, None),
        Err(e) => (false, Some(e.to_string())),
    };
    Reach {
        target: target.to_string(),
        connected,
        error,
    }
}

/// Runs both checks.
pub fn probe(target: SocketAddr) -> ProbeReport {
    let (connected, error, errno) = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(_) => (true, None, None),
        Err(e) => (false, Some(e.to_string()), e.raw_os_error()),
    };
    ProbeReport {
        target: target.to_string(),
        connected,
        error,
        errno,
        interfaces: interfaces(),
        reached: Vec::new(),
    }
}

/// Every interface with its flags and addresses (`getifaddrs`, via netlink).
fn interfaces() -> Vec<Interface> {
    use nix::net::if_::InterfaceFlags;
    let mut out: Vec<Interface> = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for a in addrs {
        let idx = match out.iter().position(|i| i.name == a.interface_name) {
            Some(i) => i,
            None => {
                out.push(Interface {
                    name: a.interface_name.clone(),
                    loopback: a.flags.contains(InterfaceFlags::IFF_LOOPBACK),
                    up: a.flags.contains(InterfaceFlags::IFF_UP),
                    addresses: Vec::new(),
                });
                out.len() - 1
            }
        };
        if let Some(addr) = a.address {
            if let Some(v4) = addr.as_sockaddr_in() {
                out[idx].addresses.push(v4.ip().to_string());
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                out[idx].addresses.push(v6.ip().to_string());
            }
        }
    }
    // getifaddrs lists a gVisor sandbox's addresses in no fixed order: sorted, two
    // reports of the same sandbox compare equal.
    out.sort_by(|a, b| a.name.cmp(&b.name));
    for i in &mut out {
        i.addresses.sort();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(connected: bool) -> ProbeReport {
        ProbeReport {
            target: "127.0.0.1:9".into(),
            connected,
            error: None,
            errno: None,
            interfaces: vec![Interface {
                name: "lo".into(),
                loopback: true,
                up: true,
                addresses: vec!["127.0.0.1".into()],
            }],
            reached: Vec::new(),
        }
    }

    #[test]
    fn the_report_line_is_split_off_the_front_only() {
        let line = format!(
            "{PROBE_MARKER}{}\n",
            serde_json::to_string(&report(false)).unwrap_or_default()
        );
        let stdout = format!("{line}hello\n");
        let (r, rest) = split_report(stdout.as_bytes());
        assert_eq!(r, Some(report(false)));
        assert_eq!(rest, b"hello\n");
        // A capsule printing a forged line later does not count: only the first line.
        let forged = format!("hello\n{line}");
        let (r, rest) = split_report(forged.as_bytes());
        assert_eq!(r, None);
        assert_eq!(rest, forged.as_bytes());
    }

    #[test]
    fn the_listener_sees_a_connection_and_the_verdict_fails() {
        let l = HostListener::open().expect("listener");
        let quiet = l.verdict(Some(report(false)));
        assert!(quiet.blocked && !quiet.listener_accepted, "{quiet:?}");
        let _c = TcpStream::connect(l.addr()).expect("connect from the host");
        std::thread::sleep(Duration::from_millis(50));
        let v = l.verdict(Some(report(false)));
        assert!(v.listener_accepted && !v.blocked, "{v:?}");
        assert!(!l.verdict(None).blocked, "no probe report is never blocked");
        let mut eth = report(false);
        eth.interfaces.push(Interface {
            name: "eth0".into(),
            loopback: false,
            up: true,
            addresses: vec!["10.0.0.2".into()],
        });
        assert!(
            !l.verdict(Some(eth)).blocked,
            "a non-loopback interface is not default-deny"
        );
    }

    #[test]
    fn probe_args_are_strict() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let ok = os(&[
            "--connect",
            "127.0.0.1:1",
            "--env",
            "A=x=y,z",
            "--env",
            "B_2=",
            "--",
            "/bin/true",
            "x",
        ]);
        let parsed = parse_args(&ok).expect("valid");
        assert_eq!(parsed.env, vec![("A", "x=y,z"), ("B_2", "")]);
        assert_eq!(parsed.entrypoint, &ok[7..]);
        let none = os(&["--connect", "127.0.0.1:1", "--", "/bin/true"]);
        assert!(parse_args(&none).expect("valid").env.is_empty());
        let reach = os(&[
            "--connect",
            "10.0.0.1:1",
            "--reach",
            "10.9.0.2:80",
            "--reach",
            "10.9.0.3:443",
            "--env",
            "A=1",
            "--",
            "/bin/true",
        ]);
        let parsed = parse_args(&reach).expect("valid");
        assert_eq!(
            parsed.reach,
            vec![
                "10.9.0.2:80".parse().unwrap(),
                "10.9.0.3:443".parse().unwrap()
            ]
        );
        assert_eq!(parsed.env, vec![("A", "1")]);
        // `--reach` only before `--env`: the order the launcher writes.
        let late = os(&[
            "--connect",
            "10.0.0.1:1",
            "--env",
            "A=1",
            "--reach",
            "10.9.0.2:80",
            "--",
            "/bin/true",
        ]);
        assert_eq!(parse_args(&late).err(), Some(ArgsError::Usage));
        // Each refusal names its one reason.
        let c = ["--connect", "127.0.0.1:1"];
        let cases: Vec<(Vec<&str>, ArgsError)> = vec![
            ([&c[..], &["--"]].concat(), ArgsError::NoEntrypoint),
            (
                vec!["--connect", "nope", "--", "/bin/true"],
                ArgsError::BadAddress("nope".into()),
            ),
            (
                [&c[..], &["--env", "A", "--", "/bin/true"]].concat(),
                ArgsError::EnvNotPair("A".into()),
            ),
            (
                [&c[..], &["--env", "=A", "--", "/bin/true"]].concat(),
                ArgsError::EnvBadName(String::new()),
            ),
            (
                [&c[..], &["--env", "1A=b", "--", "/bin/true"]].concat(),
                ArgsError::EnvBadName("1A".into()),
            ),
            (
                [&c[..], &["--env", "A=1", "--env", "A=2", "--", "/bin/true"]].concat(),
                ArgsError::EnvTwice("A".into()),
            ),
            (
                [&c[..], &["--env", "A=1", "/bin/true"]].concat(),
                ArgsError::Usage,
            ),
            (
                [&c[..], &["--only-env", "A", "--", "/bin/true"]].concat(),
                ArgsError::Usage,
            ),
            (vec!["/bin/true"], ArgsError::Usage),
        ];
        for (bad, why) in cases {
            assert_eq!(parse_args(&os(&bad)).err(), Some(why), "{bad:?}");
        }
        assert_eq!(ArgsError::Usage.to_string(), USAGE);
    }
}
