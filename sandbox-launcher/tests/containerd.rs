//! The Kata path — containerd's shim v2 — against a real containerd that each test
//! starts for itself (own root, state and socket: tests never share one). Kata is not
//! installable here, so the shim is runc's (`io.containerd.runc.v2`); the Kata path
//! differs only in the runtime type.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use capsule_tests::World;
use common::*;
use sandbox_launcher::{
    ContainerdConfig, LaunchError, Launcher, LauncherConfig, PrivateContainerd, RunReport,
    RuntimeConfig,
};

struct Setup {
    w: World,
    containerd: PrivateContainerd,
    launcher: Launcher,
}

fn setup() -> Setup {
    let w = World::new();
    let containerd = PrivateContainerd::start(&w.path("containerd"))
        .unwrap_or_else(|e| panic!("cannot start containerd: {e}"));
    let runtime = RuntimeConfig::Containerd(ContainerdConfig::runc_for_tests(containerd.address()));
    let launcher = launcher(&w.path("launcher"), runtime);
    Setup {
        w,
        containerd,
        launcher,
    }
}

/// `ctr` from the outside: no container and no task in the launcher's namespace.
fn assert_ctr_lists_nothing(address: &Path) {
    for what in ["containers", "tasks"] {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(address)
            .args(["--namespace", "capsule-gateway", what, "list", "--quiet"])
            .output()
            .expect("ctr");
        assert!(out.status.success(), "ctr {what} list: {out:?}");
        let listed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(listed.is_empty(), "ctr still lists {what}: {listed}");
    }
}

impl Setup {
    fn run(&self, script: &str, limits: (u64, u64, u64), env: &[(&str, &str)]) -> RunReport {
        let capsule = script_capsule(&self.w, "capsule", script, limits, env);
        let admitted = admit(&self.w, &capsule);
        let report = self
            .launcher
            .launch(&admitted)
            .unwrap_or_else(|e| panic!("launch failed: {e}"));
        self.check_clean(&report);
        report
    }

    fn check_clean(&self, report: &RunReport) {
        assert_teardown_ok(report);
        assert_egress_blocked(report);
        assert_ctr_lists_nothing(self.containerd.address());
        assert_host_clean(&self.w.path("launcher"), &report.run_id);
    }
}

#[test]
fn a_capsule_prints_and_exits_zero_through_the_shim() {
    let s = setup();
    let r = s.run(
        "echo hello via containerd; id -u; env | sort; grep CapEff /proc/self/status",
        (20_000, 256, 64),
        &[("TARGET", "x")],
    );
    assert_eq!(r.exit_code, Some(0), "stderr: {}", r.stderr.text());
    let out = r.stdout.text();
    assert!(out.starts_with("hello via containerd\n65534\n"), "{out}");
    assert!(out.contains("TARGET=x"));
    assert!(!out.contains("HOME=") && !out.contains("PATH="), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert_eq!(r.runtime.kind, "containerd");
    assert_eq!(
        r.runtime.runtime_type.as_deref(),
        Some("io.containerd.runc.v2")
    );
}

#[test]
fn a_non_zero_exit_and_the_confinement_hold_through_the_shim() {
    let s = setup();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port().to_string();
    let secret = s.w.write("secret.txt", b"host-secret-77");
    let r = s.run(
        "if echo x > /capsule/run.sh; then echo capsule-written; else echo capsule-denied; fi; \
         if echo x > /evil; then echo root-written; else echo root-denied; fi; \
         if /bin/bash -c \"exec 3<>/dev/tcp/127.0.0.1/$PORT\" 2>/dev/null; then echo connected; else echo net-blocked; fi; \
         if cat \"$SECRET\" 2>/dev/null; then echo read-secret; else echo secret-absent; fi; \
         ( i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo spawned-all ) 2>/dev/null; \
         echo pids-subshell=$?; exit 7",
        (20_000, 256, 8),
        &[("PORT", &port), ("SECRET", secret.to_str().expect("utf-8"))],
    );
    assert_eq!(r.exit_code, Some(7), "stderr: {}", r.stderr.text());
    assert_eq!(
        r.stdout.text(),
        "capsule-denied\nroot-denied\nnet-blocked\nsecret-absent\npids-subshell=2\n",
        "stderr: {}",
        r.stderr.text()
    );
    assert!(
        listener.accept().is_err(),
        "the host listener saw a connection"
    );
}

#[test]
fn a_capsule_sleeping_past_its_timeout_is_killed_and_deleted_through_the_shim() {
    let s = setup();
    let started = Instant::now();
    let r = s.run("echo started; sleep 60", (2_000, 256, 64), &[]);
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.exit_code, None);
    assert_eq!(r.stdout.text(), "started\n");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn kata_is_the_production_runtime_type_and_its_absence_is_named() {
    let w = World::new();
    let config = ContainerdConfig::kata(w.path("no-containerd.sock"));
    assert_eq!(config.runtime_type, "io.containerd.kata.v2");
    let kata_installed = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| d.join("containerd-shim-kata-v2").is_file())
    });
    let result = Launcher::new(LauncherConfig::new(
        w.path("launcher"),
        RuntimeConfig::Containerd(config),
        probe(),
    ));
    match result {
        Err(e) if !kata_installed => {
            assert!(
                matches!(&e, LaunchError::ShimMissing { shim, .. } if shim == "containerd-shim-kata-v2"),
                "{e:?}"
            );
            assert!(
                e.is_config(),
                "a missing shim is a configuration error: {e}"
            );
        }
        // With Kata installed the launcher gets as far as asking containerd, which is
        // not running at that socket.
        Err(e) => assert!(kata_installed, "unexpected: {e}"),
        Ok(_) => panic!("no containerd is listening at that socket"),
    }
}
