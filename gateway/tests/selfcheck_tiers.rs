//! The selfcheck's tier checks, and what `serve` and `agent` do with the selfcheck,
//! against real gVisor (`runsc`, Debian package `runsc`).
//!
//! The failing host is made the way an operator's host could be broken: a script
//! named `runsc` first in PATH that ignores `--network=none` — it runs the real
//! runsc with `--network=host` and drops the network namespace from the bundle's
//! `config.json` (both are needed: runsc's host network inside the config's own new
//! namespace still has nothing but loopback). The launcher finds runsc through PATH
//! (`RunscConfig::binary` is the bare name `runsc`), as it does in production.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::sink::{TestSink, UP};
use common::Fixture;
use serde_json::Value;

const NO_APPARMOR: &str = "not available: this kernel has no AppArmor";

fn runsc_on_path() -> PathBuf {
    let path = std::env::var_os("PATH").expect("PATH");
    std::env::split_paths(&path)
        .map(|d| d.join("runsc"))
        .find(|p| p.is_file())
        .expect("runsc is not installed (Debian package runsc)")
}

/// A directory whose `runsc` ignores `--network=none`, and the PATH with it first.
fn shim_path() -> &'static (tempfile::TempDir, String) {
    static SHIM: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    SHIM.get_or_init(|| {
        let real = runsc_on_path();
        let dir = tempfile::tempdir().expect("tempdir");
        let script = format!(
            r#"#!/bin/sh
# runsc that ignores --network=none: host network, and no network namespace.
net=none
for a in "$@"; do
  shift
  case "$a" in
    --network=none) net=host; set -- "$@" --network=host ;;
    --bundle=*) [ "$net" = host ] && perl -0pi -e 's/\{{\s*"type":\s*"network"\s*\}},\s*//' "${{a#--bundle=}}/config.json"; set -- "$@" "$a" ;;
    *) set -- "$@" "$a" ;;
  esac
done
exec {real} "$@"
"#,
            real = real.display()
        );
        let shim = dir.path().join("runsc");
        std::fs::write(&shim, script).expect("write shim");
        std::fs::set_permissions(
            &shim,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").expect("PATH")
        );
        (dir, path)
    })
}

/// `capsule-gateway selfcheck --policy P --runtime runsc --json` under `path`: the
/// exit code and each check's (verdict, detail) by name.
fn cli(policy: &Path, path: &str) -> (i32, Vec<(String, String, String)>) {
    let out = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
        .args(["selfcheck", "--policy"])
        .arg(policy)
        .args(["--runtime", "runsc", "--json"])
        .env("PATH", path)
        .output()
        .expect("selfcheck");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "selfcheck --json: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["verdict"].as_str().unwrap_or("").to_string(),
                c["detail"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    (out.status.code().expect("exit code"), checks)
}

fn cli_check<'a>(checks: &'a [(String, String, String)], name: &str) -> (&'a str, &'a str) {
    checks
        .iter()
        .find(|c| c.0 == name)
        .map(|c| (c.1.as_str(), c.2.as_str()))
        .unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
}

/// This process's PATH without the shim (which only the library test puts first).
fn healthy_path_restore() -> String {
    let path = std::env::var("PATH").expect("PATH");
    let shim = format!("{}:", shim_path().0.path().display());
    path.strip_prefix(&shim).map(str::to_string).unwrap_or(path)
}

/// (1) and (2) through the binary.
#[test]
fn selfcheck_cli_reports_the_tier_and_fails_with_exit_1_when_runsc_ignores_network_none() {
    let w = capsule_tests::World::new();
    let (code, checks) = cli(&w.policy_path(), &healthy_path_restore());
    assert_eq!(code, 0, "{checks:?}");
    for name in [
        "tier.gvisor.available",
        "tier.gvisor.egress",
        "tier.gvisor.teardown",
        "tier.gvisor.seccomp",
    ] {
        assert_eq!(cli_check(&checks, name).0, "pass", "{name}: {checks:?}");
    }
    assert_eq!(
        cli_check(&checks, "tier.gvisor.apparmor"),
        ("notice", NO_APPARMOR)
    );

    let (code, checks) = cli(&w.policy_path(), &shim_path().1);
    assert_eq!(code, 1, "{checks:?}");
    let (v, detail) = cli_check(&checks, "tier.gvisor.egress");
    assert_eq!(v, "fail");
    assert!(
        detail.starts_with("egress is open: the probe reached 127.0.0.1:"),
        "{detail}"
    );
}

/// A missing runsc fails `tier.gvisor.available` naming the Debian package.
#[test]
fn a_missing_runsc_fails_available_naming_the_debian_package() {
    let w = capsule_tests::World::new();
    let empty = tempfile::tempdir().expect("tempdir");
    let (code, checks) = cli(&w.policy_path(), &empty.path().display().to_string());
    assert_eq!(code, 1);
    let (v, detail) = cli_check(&checks, "tier.gvisor.available");
    assert_eq!(v, "fail");
    assert_eq!(
        detail,
        "sandbox: `runsc` was not found on PATH: install the Debian package `runsc`"
    );
    assert!(
        checks
            .iter()
            .all(|c| !c.0.starts_with("tier.gvisor.") || c.0 == "tier.gvisor.available"),
        "{checks:?}"
    );
}

/// `capsule-gateway serve` under `path`, with the health listener announced.
struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Serve {
    fn start(config: &Path, path: &str) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
            .args(["serve", "--config"])
            .arg(config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve");
        let log = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr");
        let l = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut pipe = pipe;
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = l.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Serve { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn health(&self) -> SocketAddr {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some((_, rest)) = log.split_once("health on http://") {
                return rest
                    .split_whitespace()
                    .next()
                    .and_then(|a| a.parse().ok())
                    .expect("health address");
            }
            assert!(Instant::now() < end, "no health listener:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn plain(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").expect("http");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, body.to_string())
}

/// `/readyz` once the first selfcheck has finished (503 "has not finished" before).
fn settled_readyz(health: SocketAddr) -> (u16, String) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = plain(health, "/readyz");
        if !body.contains("has not finished") {
            return (code, body);
        }
        assert!(Instant::now() < end, "the first selfcheck did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

/// (3) `serve` with `[selfcheck] enabled`: 503 naming the failed check while runsc
/// ignores `--network=none`, 200 on a healthy host; the metrics say so; each run's
/// CloudEvent reaches the sink.
#[test]
fn serve_is_not_ready_while_the_selfcheck_fails_and_ready_when_it_passes() {
    let sink = TestSink::start();
    sink.set(UP);
    let selfcheck_events = || -> Vec<Value> {
        sink.seen()
            .iter()
            .filter_map(|s| serde_json::from_slice::<Value>(&s.body).ok())
            .filter(|e| e["type"] == "dev.capsule-gateway.selfcheck.v1")
            .collect()
    };
    // `events`: how many selfcheck events the sink has seen once this run's arrived.
    // The process is stopped only then: its spool is delivered by a background thread,
    // and a process stopped first leaves its event in a state no one restarts.
    let run = |path: &str, events: usize| {
        let f = Fixture::new();
        let config = f.write_config(&format!(
            "[health]\nlisten = \"127.0.0.1:0\"\n\n[runs]\nruntime = \"runsc\"\n\n[events]\nsink = \"{}\"\n\n[selfcheck]\nenabled = true\n",
            sink.url
        ));
        let serve = Serve::start(&config, path);
        let health = serve.health();
        let ready = settled_readyz(health);
        let metrics = plain(health, "/metrics").1;
        let end = Instant::now() + Duration::from_secs(30);
        while selfcheck_events().len() < events && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(serve);
        (f, ready, metrics)
    };

    let (_f, (code, body), metrics) = run(&shim_path().1, 1);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("not ready: selfcheck failed: ") && body.contains("tier.gvisor.egress"),
        "{body}"
    );
    assert_eq!(
        metric(&metrics, "capsule_gateway_selfcheck_passed "),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "capsule_gateway_selfcheck_runs_total{result=\"fail\"} "
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(metric(
        &metrics,
        "capsule_gateway_selfcheck_last_run_timestamp_seconds "
    )
    .is_some());

    let (_f, (code, body), metrics) = run(&healthy_path_restore(), 2);
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    assert_eq!(
        metric(&metrics, "capsule_gateway_selfcheck_passed "),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "capsule_gateway_selfcheck_runs_total{result=\"pass\"} "
        ),
        Some(1.0)
    );

    // Both runs' CloudEvents reached the sink, the failed one naming its check.
    let events = selfcheck_events();
    assert!(
        events.iter().any(|e| e["data"]["passed"] == false
            && e["data"]["failed"]
                .as_array()
                .is_some_and(|f| f.iter().any(|n| n == "tier.gvisor.egress"))),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["data"]["passed"] == true),
        "{events:?}"
    );
}

/// (4) The agent pauses while its selfcheck fails: `agent --once` contacts no
/// registry, admits and runs nothing, exits 1 and says why.
#[test]
fn the_agent_pulls_and_admits_nothing_while_its_selfcheck_fails() {
    let w = capsule_tests::World::new();
    // A "registry" that records whether anything connected to it.
    let registry = TcpListener::bind("127.0.0.1:0").expect("bind");
    registry.set_nonblocking(true).expect("nonblocking");
    let state = w.path("agent-state");
    let config = w.write(
        "agent.toml",
        format!(
            "state_dir = \"{}\"\npolicy = \"{}\"\nrunner = \"{}\"\naction = \"run\"\n\n[selfcheck]\nenabled = true\n\n[[sources]]\nregistry = \"https://{}\"\nrepository = \"acme/capsules\"\n",
            state.display(),
            w.policy_path().display(),
            capsule_tests::RUNNER,
            registry.local_addr().expect("addr"),
        )
        .as_bytes(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
        .args(["agent", "--once", "--config"])
        .arg(&config)
        .env("PATH", &shim_path().1)
        .output()
        .expect("agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("paused: nothing is pulled, admitted or run until the selfcheck passes"),
        "{stderr}"
    );
    assert!(
        stderr.contains("selfcheck failed: ") && stderr.contains("tier.gvisor.egress"),
        "{stderr}"
    );
    assert!(
        registry.accept().is_err(),
        "the paused agent contacted the registry"
    );
    // Its only event is the selfcheck's.
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one CloudEvent per line"))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "dev.capsule-gateway.selfcheck.v1");
    assert_eq!(events[0]["data"]["passed"], false);
    assert!(
        !state.join("evidence").exists()
            || std::fs::read_dir(state.join("evidence"))
                .expect("evidence")
                .next()
                .is_none()
    );
}
