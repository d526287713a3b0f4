//! Scoped egress (`scope.network = "targets"`) under real gVisor (`runsc`), real
//! nftables (`nft`, Debian package `nftables`) and real network namespaces (`ip`,
//! Debian package `iproute2`), against the target network of
//! `capsule_tests::netns`, set up once per test binary.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::Ordering;

use capsule_tests::netns::{sh, targets_world, test_net, HELLO, HTTP_PORT, OTHER_PORT};
use capsule_tests::World;
use common::*;
use sandbox_launcher::net::{self, EgressLedger, NetError};
use sandbox_launcher::{LaunchError, RunReport, RunscConfig, RuntimeConfig};

fn targets_capsule(
    w: &World,
    name: &str,
    script: &str,
    targets: &[String],
    env: &[(&str, &str)],
) -> std::path::PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let mut m = w.script_manifest(&files);
    m["scope"]["network"] = "targets".into();
    m["scope"]["targets"] = serde_json::json!(targets);
    m["limits"] = serde_json::json!({"timeout_ms": 30_000, "memory_mib": 256, "pids": 64});
    m["env"] = serde_json::Value::Object(
        env.iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect(),
    );
    w.capsule_with_files(name, &m, &files, capsule_tests::Signer::Es256)
}

fn runsc() -> RuntimeConfig {
    RuntimeConfig::Runsc(RunscConfig::default())
}

/// From the outside: no namespace, veth or table of the run is left.
fn assert_network_gone(run_id: &str) {
    let netns = sh(&["ip", "netns", "list"]);
    assert!(
        !netns.contains(&net::netns_name(run_id)),
        "netns left: {netns}"
    );
    let veth = net::host_veth(run_id);
    assert!(
        !Path::new("/sys/class/net").join(&veth).exists(),
        "veth {veth} left"
    );
    let tables = sh(&["nft", "list", "tables"]);
    assert!(
        !tables.contains(&net::table_name(run_id)),
        "nft table left: {tables}"
    );
}

fn ledger(r: &RunReport) -> &EgressLedger {
    r.egress
        .ledger
        .as_ref()
        .expect("a targets run has a ledger")
}

/// The capsule calls its declared HTTP target and gets the answer; another port
/// of the same host, the host's loopback, a second namespace and UDP/53 are all
/// refused; the ledger counts each; the teardown leaves nothing.
#[test]
fn the_capsule_reaches_its_declared_target_and_nothing_else() {
    let n = test_net();
    let host_lo = TcpListener::bind("127.0.0.1:0").expect("host loopback listener");
    host_lo.set_nonblocking(true).expect("nonblocking");
    let host_lo_port = host_lo.local_addr().expect("addr").port().to_string();
    let w = targets_world();
    // runsc's host stack answers a blocking read that comes before the data with
    // EAGAIN (observed with runsc 20221219): `cat` is retried until the answer is in.
    let script = r#"
try() { if timeout 5 /bin/bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then echo "$3 open"; else echo "$3 closed"; fi; }
/bin/bash -c 'exec 3<>/dev/tcp/$T/8080; printf "GET / HTTP/1.0\r\nHost: t\r\n\r\n" >&3; for i in 1 2 3 4 5 6 7 8 9 10; do cat <&3 2>/dev/null && break; sleep 0.2; done' | tail -1
try "$T" 8081 other-port
try 127.0.0.1 "$LO" host-loopback
try "$HOST_SIDE" 22 host-address
try "$OTHER" 8080 second-namespace
/bin/bash -c 'echo query > /dev/udp/$T/53' && echo udp-sent
cat /etc/hosts; wc -c < /etc/resolv.conf
"#;
    let target = format!("http://{}:{HTTP_PORT}/", n.target);
    let env = [
        ("T", n.target.to_string()),
        ("OTHER", n.other.to_string()),
        ("LO", host_lo_port),
        ("HOST_SIDE", n.target_host_side.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let capsule = targets_capsule(&w, "capsule", script, std::slice::from_ref(&target), &env);
    let state = w.path("launcher");
    let r = launcher(&state, runsc())
        .launch(&admit(&w, &capsule))
        .unwrap_or_else(|e| panic!("launch failed: {e}"));
    let out = r.stdout.text();
    assert_eq!(
        out.lines().take(7).collect::<Vec<_>>(),
        [
            HELLO,
            "other-port closed",
            "host-loopback closed",
            "host-address closed",
            "second-namespace closed",
            "udp-sent",
            "127.0.0.1 localhost",
        ],
        "stdout: {out}\nstderr: {}",
        r.stderr.text()
    );
    assert_eq!(
        out.lines().nth(7),
        Some("0"),
        "resolv.conf must be empty: {out}"
    );
    assert!(
        r.egress.blocked && r.egress.declared_reached,
        "{:?}",
        r.egress
    );
    let p = r.egress.probe.as_ref().expect("probe");
    assert!(
        !p.connected && p.reached.iter().all(|x| x.connected),
        "{p:?}"
    );
    assert_eq!(r.bundle.network, "targets");
    assert_eq!(r.runtime.network, "host-in-run-netns");

    let l = ledger(&r);
    let t = n.target.to_string();
    assert!(
        EgressLedger::packets(&l.allowed, &t, "tcp", HTTP_PORT) >= 2,
        "the probe's and the capsule's connections: {l:?}"
    );
    for (addr, proto, port) in [
        (t.as_str(), "tcp", OTHER_PORT),
        (&n.target_host_side.to_string(), "tcp", 22),
        (&n.other.to_string(), "tcp", HTTP_PORT),
        (t.as_str(), "udp", 53),
    ] {
        assert!(
            EgressLedger::packets(&l.dropped, addr, proto, port) >= 1,
            "{addr} {proto}/{port} not counted as dropped: {l:?}"
        );
    }
    // The probe's refused attempt to the launcher's listener on the host side.
    let (lh, lp) = r.egress.target.rsplit_once(':').expect("host:port");
    assert_eq!(lh, l.host_address);
    assert!(EgressLedger::packets(&l.dropped, lh, "tcp", lp.parse().expect("port")) >= 1);
    assert!(EgressLedger::packets(&l.allowed, &t, "tcp", OTHER_PORT) == 0);
    assert_eq!(l.targets[0].target, target);
    assert!(
        host_lo.accept().is_err(),
        "the host loopback listener was reached"
    );
    assert_eq!(
        n.other_port_hits.load(Ordering::SeqCst),
        0,
        "undeclared port reached"
    );
    assert_eq!(
        n.other_ns_hits.load(Ordering::SeqCst),
        0,
        "second namespace reached"
    );

    assert_teardown_ok(&r);
    for check in ["netns", "veth", "nft_table"] {
        assert!(
            r.teardown.checks.iter().any(|c| c.name == check && c.ok),
            "{check}: {:?}",
            r.teardown.checks
        );
    }
    assert_runsc_left_nothing(&state, &r.run_id);
    assert_network_gone(&r.run_id);
}

/// A target that resolves to the host's loopback, to a link-local address or to
/// an address of the host itself is refused before anything is made: no sandbox,
/// no namespace, no table.
#[test]
fn a_target_that_would_open_the_host_is_refused_and_nothing_is_left() {
    let n = test_net();
    let w = targets_world();
    let state = w.path("launcher");
    let launcher = launcher(&state, runsc());
    for (i, (target, want)) in [
        ("http://localhost:8080/".to_string(), "loopback"),
        ("http://127.0.0.1:8080/".to_string(), "loopback"),
        ("http://169.254.169.254/".to_string(), "link-local"),
        (format!("http://{}:8080/", n.target_host_side), "this host"),
    ]
    .into_iter()
    .enumerate()
    {
        let capsule = targets_capsule(
            &w,
            &format!("c{i}"),
            "echo RAN",
            std::slice::from_ref(&target),
            &[],
        );
        match launcher.launch(&admit(&w, &capsule)) {
            Err(LaunchError::Egress(NetError::TargetForbidden { why, target: t, .. })) => {
                assert_eq!(t, target);
                assert!(why.contains(want), "{target}: {why}");
            }
            other => panic!("{target}: expected a refusal, got {other:?}"),
        }
        let runs = std::fs::read_dir(state.join("runs")).expect("runs").count();
        assert_eq!(runs, 0, "{target}: run directory left");
    }
}

/// LD_PRELOAD, LD_AUDIT, LD_LIBRARY_PATH and GCONV_PATH in the manifest's env
/// change nothing in the probe's report of a `targets` run: it starts with an
/// empty environment, and the env applies only at the entrypoint's exec.
#[test]
fn loader_env_in_the_manifest_changes_nothing_in_a_targets_probe_report() {
    let n = test_net();
    let w = targets_world();
    let state = w.path("launcher");
    let launcher = launcher(&state, runsc());
    let target = format!("http://{}:{HTTP_PORT}/", n.target);
    let run = |name: &str, env: &[(&str, &str)]| {
        let capsule = targets_capsule(
            &w,
            name,
            "env | grep -c '^LD_\\|^GCONV' || true",
            std::slice::from_ref(&target),
            env,
        );
        launcher
            .launch(&admit(&w, &capsule))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let plain = run("plain", &[]);
    let loaded = run(
        "loaded",
        &[
            ("LD_PRELOAD", "/capsule/run.sh"),
            ("LD_AUDIT", "/capsule/run.sh"),
            ("LD_LIBRARY_PATH", "/capsule"),
            ("GCONV_PATH", "/capsule"),
        ],
    );
    let shape = |r: &RunReport| {
        let p = r.egress.probe.clone().expect("probe");
        (
            p.connected,
            p.errno,
            p.interfaces
                .iter()
                .map(|i| (i.name.clone(), i.loopback))
                .collect::<Vec<_>>(),
            p.reached
                .iter()
                .map(|x| (x.target.clone(), x.connected))
                .collect::<Vec<_>>(),
            r.egress.blocked,
            r.egress.declared_reached,
        )
    };
    assert_eq!(shape(&plain), shape(&loaded));
    // The entrypoint did get the env (the loader ignores a non-ELF preload).
    assert_eq!(plain.stdout.text().trim(), "0");
    assert_eq!(loaded.stdout.text().trim(), "4", "{}", loaded.stderr.text());
    for r in [&plain, &loaded] {
        assert_teardown_ok(r);
        assert_network_gone(&r.run_id);
    }
}
