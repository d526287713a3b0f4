//! A target network for the scoped-egress tests (`scope.network = "targets"`),
//! set up once per test binary ([`test_net`]): two network namespaces of the
//! binary's own, each joined to the host by a veth pair. The *target* namespace
//! serves HTTP on [`HTTP_PORT`] (the declared target) and on [`OTHER_PORT`] (an
//! undeclared port of the same host); the *other* namespace serves on
//! [`HTTP_PORT`] (an undeclared host). The host must forward IPv4 for any of this
//! to route; the set-up turns `net.ipv4.ip_forward` on, as the operator of a
//! `targets` runner does (the launcher itself never does). Namespaces of a test
//! binary that died are removed by the next one. Needs root, `ip` (Debian
//! package `iproute2`) and `nft` (`nftables`); a missing tool fails naming it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::World;

pub const HTTP_PORT: u16 = 8080;
pub const OTHER_PORT: u16 = 8081;
pub const HELLO: &str = "target-says-hello";

#[derive(Debug)]
pub struct TestNet {
    /// The declared target's address (in the target namespace).
    pub target: Ipv4Addr,
    /// The host side of the target namespace's veth: an address of this host.
    pub target_host_side: Ipv4Addr,
    /// A second namespace, never declared.
    pub other: Ipv4Addr,
    /// Connections that reached the undeclared port, and the undeclared namespace.
    pub other_port_hits: Arc<AtomicUsize>,
    pub other_ns_hits: Arc<AtomicUsize>,
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} (Debian package `iproute2`/`nftables`): {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn test_net() -> &'static TestNet {
    static NET: OnceLock<TestNet> = OnceLock::new();
    NET.get_or_init(TestNet::up)
}

impl TestNet {
    fn up() -> TestNet {
        for (tool, package) in [("ip", "iproute2"), ("nft", "nftables"), ("runsc", "runsc")] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "`{tool}` is not installed: install the Debian package `{package}`"
            );
        }
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable IPv4 forwarding");
        // Namespaces of earlier test binaries that are gone.
        for line in sh(&["ip", "netns", "list"]).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(pid) = name
                .strip_prefix("cgt")
                .and_then(|r| r.strip_suffix(['a', 'b']))
            else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "delete", name]).status();
                let _ = Command::new("ip")
                    .args(["link", "delete", &format!("{name}h")])
                    .status();
            }
        }
        let pid = std::process::id();
        let [_, _, x, y] = ((pid << 2) & 0xffff).to_be_bytes();
        let target_base = Ipv4Addr::new(10, 214, x, y);
        let other_base = Ipv4Addr::new(10, 215, x, y);
        let target = namespace(&format!("cgt{pid}a"), target_base);
        let other = namespace(&format!("cgt{pid}b"), other_base);
        let other_port_hits = Arc::new(AtomicUsize::new(0));
        let other_ns_hits = Arc::new(AtomicUsize::new(0));
        serve_in(&format!("cgt{pid}a"), HTTP_PORT, None);
        serve_in(
            &format!("cgt{pid}a"),
            OTHER_PORT,
            Some(other_port_hits.clone()),
        );
        serve_in(
            &format!("cgt{pid}b"),
            HTTP_PORT,
            Some(other_ns_hits.clone()),
        );
        TestNet {
            target,
            target_host_side: Ipv4Addr::from(u32::from(target_base) + 1),
            other,
            other_port_hits,
            other_ns_hits,
        }
    }
}

/// A namespace with `base+2/30`, routed through the host side `base+1/30`.
/// Returns the namespace's address.
fn namespace(name: &str, base: Ipv4Addr) -> Ipv4Addr {
    let host = format!("{}/30", Ipv4Addr::from(u32::from(base) + 1));
    let inside = Ipv4Addr::from(u32::from(base) + 2);
    let (h, p) = (format!("{name}h"), format!("{name}p"));
    sh(&["ip", "netns", "add", name]);
    sh(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &p]);
    sh(&["ip", "link", "set", &p, "netns", name]);
    sh(&[
        "ip",
        "-n",
        name,
        "addr",
        "add",
        &format!("{inside}/30"),
        "dev",
        &p,
    ]);
    sh(&["ip", "-n", name, "link", "set", &p, "up"]);
    sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
    let gw = Ipv4Addr::from(u32::from(base) + 1).to_string();
    sh(&["ip", "-n", name, "route", "add", "default", "via", &gw]);
    sh(&["ip", "addr", "add", &host, "dev", &h]);
    sh(&["ip", "link", "set", &h, "up"]);
    inside
}

/// An HTTP server on `port` inside namespace `name` (a thread that joined it). With
/// `hits`, every connection is counted.
fn serve_in(name: &str, port: u16, hits: Option<Arc<AtomicUsize>>) {
    let ns = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind in netns");
        tx.send(()).expect("ready");
        for conn in l.incoming().flatten() {
            if let Some(h) = &hits {
                h.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::spawn(move || {
                let mut conn = conn;
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("{HELLO}\n");
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("server up");
}

/// The fixture policy with a rule that allows `targets` in `staging`.
pub fn targets_world() -> World {
    let w = World::new();
    let policy = format!(
        // The capsules of these tests speak HTTP with bash's /dev/tcp: the host's
        // /usr by the tenant's explicit opt-in (the base rootfs is busybox).
        "{}rootfs = {{ host_usr = true }}\n[[tenants.rules]]\nenvironment = \"staging\"\nnetwork = [\"none\", \"targets\"]\n",
        w.policy_toml()
    );
    std::fs::write(w.policy_path(), policy).expect("policy");
    w
}
