//! Admitted capsules under real gVisor (`runsc`, Debian package `runsc`), each test
//! on its own launcher state directory (its own runsc root), so tests never see
//! each other's containers. Every run is checked from the outside afterwards:
//! `runsc list`, the process table, cgroups, directories.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_tests::World;
use common::*;
use sandbox_launcher::{
    ErrorKind, LaunchError, Launcher, LauncherConfig, ProbeBinary, Rootfs, RunReport, RunscConfig,
    RuntimeConfig,
};

fn runsc() -> RuntimeConfig {
    RuntimeConfig::Runsc(RunscConfig::default())
}

/// Runs `script` under runsc and checks the invariants every run must keep.
fn run_script(script: &str, limits: (u64, u64, u64), env: &[(&str, &str)]) -> RunReport {
    let w = World::new();
    let capsule = script_capsule(&w, "capsule", script, limits, env);
    let admitted = admit(&w, &capsule);
    let state = w.path("launcher");
    let launcher = launcher(&state, runsc());
    let report = launcher
        .launch(&admitted)
        .unwrap_or_else(|e| panic!("launch failed: {e}"));
    assert_teardown_ok(&report);
    assert_egress_blocked(&report);
    assert_runsc_left_nothing(&state, &report.run_id);
    report
}

const LIMITS: (u64, u64, u64) = (20_000, 256, 64);

#[test]
fn a_capsule_prints_and_exits_zero_as_nobody_with_only_its_env() {
    let r = run_script(
        "echo hello from the sandbox; id -u; id -g; env | sort; cat /proc/self/status | grep -i capeff",
        LIMITS,
        &[("TARGET", "https://auth.staging.acme.example/token")],
    );
    assert_eq!(r.exit_code, Some(0), "stderr: {}", r.stderr.text());
    assert!(!r.timed_out);
    let out = r.stdout.text();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hello from the sandbox");
    assert_eq!(lines[1], "65534", "uid");
    assert_eq!(lines[2], "65534", "gid");
    assert!(out.contains("TARGET=https://auth.staging.acme.example/token"));
    // Only the manifest's env (the shell adds PWD itself).
    for line in &lines[3..] {
        if line.contains('=') {
            let key = line.split('=').next().unwrap_or_default();
            assert!(["TARGET", "PWD"].contains(&key), "unexpected env {line}");
        }
    }
    assert!(
        out.contains("CapEff:\t0000000000000000"),
        "capabilities: {out}"
    );
    assert_eq!(r.runtime.kind, "runsc");
    assert_eq!(r.runtime.platform.as_deref(), Some("ptrace"));
    assert!(r.bundle.oci_config_sha256.starts_with("sha256:"));
    assert_eq!(r.staged.len(), 1);
}

#[test]
fn a_non_zero_exit_is_recorded_with_stderr() {
    let r = run_script("echo about to fail >&2; exit 3", LIMITS, &[]);
    assert_eq!(r.exit_code, Some(3));
    assert!(!r.timed_out);
    assert_eq!(r.stderr.text().trim(), "about to fail");
}

#[test]
fn a_capsule_sleeping_past_its_timeout_is_killed_and_deleted() {
    let started = Instant::now();
    let r = run_script("echo started; sleep 60; echo never", (2_000, 256, 64), &[]);
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.exit_code, None);
    assert_eq!(r.stdout.text(), "started\n");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(r.duration_ms >= 2_000, "{}", r.duration_ms);
}

#[test]
fn writing_to_capsule_fails_inside_the_sandbox() {
    let r = run_script(
        "if echo x > /capsule/run.sh; then echo overwrote; else echo denied; fi; \
         if echo x > /capsule/new; then echo created; else echo denied; fi",
        LIMITS,
        &[],
    );
    assert_eq!(
        r.stdout.text(),
        "denied\ndenied\n",
        "stderr: {}",
        r.stderr.text()
    );
    assert!(r.stderr.text().contains("/capsule/"), "{}", r.stderr.text());
}

#[test]
fn writing_to_the_root_fails_and_tmp_is_a_bounded_tmpfs() {
    let r = run_script(
        "if echo x > /evil; then echo wrote-root; else echo denied-root; fi; \
         if echo x > /usr/evil; then echo wrote-usr; else echo denied-usr; fi; \
         echo ok > /tmp/scratch && cat /tmp/scratch; \
         if head -c 100M /dev/zero > /tmp/big; then echo filled; else echo tmp-full; fi",
        LIMITS,
        &[],
    );
    assert_eq!(
        r.stdout.text(),
        "denied-root\ndenied-usr\nok\ntmp-full\n",
        "stderr: {}",
        r.stderr.text()
    );
}

/// The capsule itself tries to reach a listener the test opened on host loopback.
#[test]
fn a_socket_to_the_host_listener_fails_inside_the_sandbox() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port().to_string();
    let r = run_script(
        "if /bin/bash -c \"exec 3<>/dev/tcp/127.0.0.1/$PORT\"; then echo connected; else echo blocked; fi",
        LIMITS,
        &[("PORT", &port)],
    );
    assert_eq!(r.stdout.text(), "blocked\n", "stderr: {}", r.stderr.text());
    assert!(
        listener.accept().is_err(),
        "the host listener accepted a connection from the sandbox"
    );
}

#[test]
fn exceeding_the_pids_limit_fails_inside_the_sandbox() {
    let r = run_script(
        "( i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo spawned-all ) 2>/dev/null; \
         echo subshell-exit=$?",
        (20_000, 256, 8),
        &[],
    );
    let out = r.stdout.text();
    assert!(
        !out.contains("spawned-all"),
        "40 processes under a limit of 8: {out}"
    );
    assert!(
        out.contains("subshell-exit=2"),
        "{out} / {}",
        r.stderr.text()
    );
}

#[test]
fn a_host_file_outside_the_mounts_cannot_be_read() {
    let w = World::new();
    let secret = w.write("secret.txt", b"host-secret-4b1d");
    let secret = secret.to_str().expect("utf-8").to_string();
    let r = run_script(
        "for f in \"$SECRET\" /etc/shadow /etc/hostname /root /home /var/log; do \
           if cat \"$f\" >/dev/null 2>&1 || [ -e \"$f\" ]; then echo \"visible $f\"; else echo \"absent $f\"; fi; \
         done; cat \"$SECRET\" 2>&1",
        LIMITS,
        &[("SECRET", &secret)],
    );
    let out = r.stdout.text();
    assert!(!out.contains("visible"), "{out}");
    assert!(!out.contains("host-secret-4b1d"), "{out}");
    assert_eq!(out.matches("absent").count(), 6, "{out}");
}

#[test]
fn output_beyond_the_cap_is_counted_not_kept() {
    let w = World::new();
    let capsule = script_capsule(
        &w,
        "capsule",
        "head -c 3000000 /dev/zero | tr '\\0' a",
        LIMITS,
        &[],
    );
    let admitted = admit(&w, &capsule);
    let state = w.path("launcher");
    let mut config = LauncherConfig::new(&state, runsc(), probe());
    config.output_cap_bytes = 64 * 1024;
    let launcher = Launcher::new(config).expect("launcher");
    let r = launcher.launch(&admitted).expect("launch");
    assert_eq!(r.exit_code, Some(0));
    assert!(r.stdout.truncated);
    assert_eq!(r.stdout.total_bytes, 3_000_000);
    // The cap applies to the stream including the probe's line, which is removed.
    assert!(r.stdout.bytes.len() < 64 * 1024 && r.stdout.bytes.iter().all(|&b| b == b'a'));
    assert_runsc_left_nothing(&state, &r.run_id);
}

/// Edited, replaced, or symlink-swapped after admission: nothing is launched.
#[test]
fn a_file_changed_after_admission_never_reaches_the_sandbox() {
    let w = World::new();
    let script = "echo approved";
    let evil = "echo EVIL!!!!";
    assert_eq!(
        script.len(),
        evil.len(),
        "same size: only the digest can tell"
    );
    let state = w.path("launcher");
    let launcher = launcher(&state, runsc());
    type Swap = fn(&std::path::Path, &World, &str);
    let swaps: [(&str, Swap); 3] = [
        ("edited in place", |f, _, evil| {
            std::fs::write(f, evil).expect("edit");
        }),
        ("replaced by rename", |f, w, evil| {
            let other = w.write("other.sh", evil.as_bytes());
            std::fs::rename(other, f).expect("rename");
        }),
        ("swapped for a symlink", |f, w, evil| {
            let other = w.write("target.sh", evil.as_bytes());
            std::fs::remove_file(f).expect("remove");
            std::os::unix::fs::symlink(other, f).expect("symlink");
        }),
    ];
    for (i, (how, swap)) in swaps.iter().enumerate() {
        let capsule = script_capsule(&w, &format!("capsule-{i}"), script, LIMITS, &[]);
        let admitted = admit(&w, &capsule);
        swap(&capsule.join("files/run.sh"), &w, evil);
        let result = launcher.launch(&admitted);
        if let Err(e) = &result {
            assert_eq!(e.kind(), ErrorKind::Run, "{how}: {e}");
        }
        match result {
            Err(LaunchError::ChangedAfterAdmission { path, .. }) => {
                assert_eq!(path, "run.sh", "{how}")
            }
            // The symlink is refused when opened, before a byte is read.
            Err(LaunchError::Stage { path, source }) => {
                assert_eq!(path, "run.sh", "{how}");
                assert_eq!(
                    source.raw_os_error(),
                    Some(40),
                    "{how}: ELOOP expected, got {source}"
                );
            }
            other => panic!("{how}: expected a staging error, got {other:?}"),
        }
        let runs: Vec<_> = std::fs::read_dir(state.join("runs"))
            .expect("runs")
            .flatten()
            .collect();
        assert!(runs.is_empty(), "{how}: run directory left");
    }
    // And the same launcher still runs an untouched capsule.
    let good = script_capsule(&w, "untouched", script, LIMITS, &[]);
    let r = launcher.launch(&admit(&w, &good)).expect("launch");
    assert_eq!(r.stdout.text(), "approved\n");
    assert_runsc_left_nothing(&state, &r.run_id);
}

/// The service's path: artifacts from a content-addressed blob store. A blob
/// replaced (same size, other bytes) or swapped for a symlink between admission and
/// launch is refused while staging; nothing is launched.
#[test]
fn a_blob_replaced_after_admission_never_reaches_the_sandbox() {
    let w = World::new();
    let script = b"echo approved";
    let evil = b"echo EVIL!!!!";
    let state = w.path("launcher");
    let launcher = launcher(&state, runsc());
    let policy = w.policy();
    let runner = verify_core::SpiffeId::parse(capsule_tests::RUNNER).expect("runner");
    let files: [(&str, &[u8]); 1] = [("run.sh", script)];
    let manifest = w.script_manifest(&files);
    let jws = w.sign(
        manifest.to_string().as_bytes(),
        capsule_tests::Signer::Es256,
    );
    for (i, symlink) in [false, true].into_iter().enumerate() {
        let blobs = w.path(&format!("blobs-{i}"));
        let blob = blobs.join(format!("sha256/{}", capsule_tests::sha256_hex(script)));
        std::fs::create_dir_all(blob.parent().expect("parent")).expect("mkdir");
        std::fs::write(&blob, script).expect("blob");
        let capsule = verify_core::Capsule::from_bytes(
            jws.as_bytes(),
            verify_core::ArtifactSource::Blobs(blobs.clone()),
        );
        let admitted = verify_core::Verifier {
            policy: &policy,
            clock: &verify_core::SystemClock,
            rollback: &verify_core::NoHistory,
            runner: Some(&runner),
            hash_mode: verify_core::HashMode::Read,
            governance: Default::default(),
        }
        .verify(&capsule)
        .unwrap_or_else(|d| panic!("blob capsule denied: {d:?}"));
        std::fs::remove_file(&blob).expect("remove");
        if symlink {
            let other = w.write(&format!("evil-{i}.sh"), evil);
            std::os::unix::fs::symlink(other, &blob).expect("symlink");
        } else {
            std::fs::write(&blob, evil).expect("replace");
        }
        match launcher.launch(&admitted) {
            Err(LaunchError::ChangedAfterAdmission { path, .. }) if !symlink => {
                assert_eq!(path, "run.sh")
            }
            Err(LaunchError::Stage { source, .. }) if symlink => {
                assert_eq!(source.raw_os_error(), Some(40), "ELOOP expected: {source}")
            }
            other => panic!("symlink {symlink}: expected a staging error, got {other:?}"),
        }
        let runs = std::fs::read_dir(state.join("runs")).expect("runs").count();
        assert_eq!(runs, 0, "run directory left");
    }
}

/// Open egress is caught: with the host's network shared, the probe reaches the
/// launcher's listener, the entrypoint never runs, and the run fails.
#[test]
fn the_egress_probe_fails_the_run_when_egress_is_open() {
    let w = World::new();
    let capsule = script_capsule(&w, "capsule", "echo ENTRYPOINT-RAN", LIMITS, &[]);
    let admitted = admit(&w, &capsule);
    let state = w.path("launcher");
    let mut runsc = RunscConfig::default();
    sandbox_launcher::danger::runsc_host_network(&mut runsc);
    let launcher = launcher(&state, RuntimeConfig::Runsc(runsc));
    let err = launcher
        .launch(&admitted)
        .expect_err("open egress must fail the run");
    let report = err.report().unwrap_or_else(|| panic!("no report: {err}"));
    assert!(err.to_string().contains("egress is open"), "{err}");
    assert_eq!(
        err.kind(),
        ErrorKind::Run,
        "a failed run is no configuration error"
    );
    assert!(!report.egress.blocked);
    assert!(report.egress.listener_accepted, "{:?}", report.egress);
    assert!(report.egress.probe.as_ref().is_some_and(|p| p.connected));
    assert!(!report.stdout.text().contains("ENTRYPOINT-RAN"));
    assert_eq!(
        report.exit_code,
        Some(sandbox_launcher::probe::EXIT_EGRESS_OPEN)
    );
    assert_teardown_ok(report);
    assert_runsc_left_nothing(&state, &report.run_id);
}

/// SIGINT/SIGTERM to the gateway raise the cancel flag: the sandbox is stopped and
/// torn down, and the report says so.
#[test]
fn an_interrupted_run_is_torn_down() {
    let w = World::new();
    let capsule = script_capsule(&w, "capsule", "echo up; sleep 60", LIMITS, &[]);
    let admitted = admit(&w, &capsule);
    let state = w.path("launcher");
    let launcher = launcher(&state, runsc());
    let cancel = Arc::new(AtomicBool::new(false));
    let raise = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2500));
        raise.store(true, Ordering::SeqCst);
    });
    let r = launcher
        .launch_cancellable(&admitted, &cancel)
        .expect("launch");
    t.join().expect("thread");
    assert!(r.interrupted && !r.timed_out, "{r:?}");
    assert_eq!(r.exit_code, None);
    assert_teardown_ok(&r);
    assert_runsc_left_nothing(&state, &r.run_id);
}

/// `--platform=kvm` hangs while booting in this nested VM: the hard timeout covers
/// the boot, and the teardown is as clean as after any run. (On a host where kvm
/// works, the run simply completes.)
#[test]
fn the_kvm_platform_times_out_cleanly_or_runs() {
    let w = World::new();
    let capsule = script_capsule(&w, "capsule", "echo kvm-ran", (4_000, 256, 64), &[]);
    let admitted = admit(&w, &capsule);
    let state = w.path("launcher");
    let mut config = RunscConfig::default();
    config.platform = "kvm".into();
    let launcher = launcher(&state, RuntimeConfig::Runsc(config));
    let started = Instant::now();
    let report = match launcher.launch(&admitted) {
        Ok(r) => {
            eprintln!("kvm: the run completed");
            assert_eq!(r.stdout.text(), "kvm-ran\n");
            r
        }
        Err(LaunchError::RunFailed { report, why }) => {
            eprintln!("kvm: {why}; teardown actions {:?}", report.teardown.actions);
            assert!(report.timed_out, "{why}");
            assert!(why.contains("did not report"), "{why}");
            *report
        }
        Err(e) => panic!("{e}"),
    };
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
    assert_teardown_ok(&report);
    assert_runsc_left_nothing(&state, &report.run_id);
}

#[test]
fn a_missing_runsc_is_an_error_naming_the_debian_package() {
    let w = World::new();
    let mut config = RunscConfig::default();
    config.binary = "/nonexistent/runsc".into();
    let err = Launcher::new(LauncherConfig::new(
        w.path("l"),
        RuntimeConfig::Runsc(config),
        probe(),
    ))
    .expect_err("no runsc");
    assert!(
        matches!(
            err,
            LaunchError::ToolMissing {
                package: "runsc",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Debian package `runsc`"), "{err}");
    assert!(
        err.is_config(),
        "a missing runtime is a configuration error: {err}"
    );
}

/// A probe binary that is not there is the launcher's configuration, found before
/// any runtime is asked: a configuration error naming the path.
#[test]
fn a_missing_probe_is_a_configuration_error() {
    let w = World::new();
    let probe = ProbeBinary {
        path: w.path("no-such-probe"),
        args: Vec::new(),
    };
    let err =
        Launcher::new(LauncherConfig::new(w.path("l"), runsc(), probe)).expect_err("no probe");
    assert!(
        matches!(&err, LaunchError::Setup { op: "find egress probe", path, .. } if path == &w.path("no-such-probe")),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

/// A relative host bind in the root file system is a bad setting, refused before a
/// sandbox exists, and torn down like any failed start.
#[test]
fn a_relative_host_bind_is_a_configuration_error() {
    let w = World::new();
    let capsule = script_capsule(&w, "capsule", "echo hi", LIMITS, &[]);
    let admitted = admit(&w, &capsule);
    let state = w.path("launcher");
    let mut config = LauncherConfig::new(&state, runsc(), probe());
    config.rootfs = Rootfs::HostBinds(vec!["usr".into()]);
    let launcher = Launcher::new(config).unwrap_or_else(|e| panic!("launcher: {e}"));
    let err = launcher.launch(&admitted).expect_err("relative bind");
    assert!(
        matches!(
            &err,
            LaunchError::Bundle(sandbox_launcher::BundleError::NotAbsolute(p)) if p.as_os_str() == "usr"
        ),
        "{err:?}"
    );
    assert!(err.is_config(), "{err}");
    let runs: Vec<_> = std::fs::read_dir(state.join("runs"))
        .expect("runs")
        .collect();
    assert!(runs.is_empty(), "the failed start left {runs:?}");
}

/// The staged copy is what the sandbox reads: read-only, owned by the launcher,
/// and not the capsule directory.
#[test]
fn the_sandbox_reads_the_staged_copy() {
    let w = World::new();
    let data = b"payload-1234\n".repeat(1000);
    let files: [(&str, &[u8]); 2] = [
        (
            "run.sh",
            b"cat /capsule/data/blob.txt | head -1; wc -c < /capsule/data/blob.txt",
        ),
        ("data/blob.txt", &data),
    ];
    let m = w.script_manifest(&files);
    let capsule = w.capsule_with_files("capsule", &m, &files, capsule_tests::Signer::Es256);
    let admitted = admit(&w, &capsule);
    let state = w.path("launcher");
    let r = launcher(&state, runsc()).launch(&admitted).expect("launch");
    let out = r.stdout.text();
    assert!(
        out.starts_with("payload-1234\n13000\n"),
        "{out} / {}",
        r.stderr.text()
    );
    assert_eq!(r.staged.len(), 2);
    assert_eq!(r.staged[1].size, 13000);
    assert_runsc_left_nothing(&state, &r.run_id);
    // The capsule directory is untouched by the run (nothing staged in place).
    let mut buf = Vec::new();
    std::fs::File::open(capsule.join("files/data/blob.txt"))
        .and_then(|mut f| f.read_to_end(&mut buf))
        .expect("read");
    assert_eq!(buf, data);
}

/// A shared object whose constructor prints a forged probe report (egress
/// blocked, loopback only), then the environment it was loaded with, and ends the
/// process before anything else runs. Built with gcc (Debian package `gcc`). It is
/// also a valid `LD_AUDIT` module (`la_version`).
fn forging_library(w: &World) -> Vec<u8> {
    let src = w.write(
        "forge.c",
        br#"
#include <stdio.h>
#include <unistd.h>
extern char **environ;
unsigned int la_version(unsigned int v) { return v; }
__attribute__((constructor)) static void forge(void) {
    printf("capsule-egress-probe/v1 {\"target\":\"127.0.0.1:1\",\"connected\":false,"
           "\"error\":\"forged\",\"errno\":111,\"interfaces\":[{\"name\":\"lo\","
           "\"loopback\":true,\"up\":true,\"addresses\":[\"127.0.0.1\"]}]}\n");
    for (char **e = environ; *e; e++) printf("ENV %s\n", *e);
    fflush(stdout);
    _exit(0);
}
"#,
    );
    let out = w.path("forge.so");
    let status = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("gcc (Debian package `gcc`) cannot run: {e}"));
    assert!(status.success(), "gcc failed: {status}");
    std::fs::read(&out).expect("read forge.so")
}

/// A capsule with the forging library at `/capsule/forge.so` and a gconv module
/// list naming it, run with `env`.
fn forging_capsule(w: &World, name: &str, env: &[(&str, &str)]) -> std::path::PathBuf {
    let lib = forging_library(w);
    let files: [(&str, &[u8]); 3] = [
        ("run.sh", b"echo ENTRYPOINT-RAN"),
        ("forge.so", &lib),
        (
            "gconv/gconv-modules",
            b"module INTERNAL FORGE// /capsule/forge 1\n",
        ),
    ];
    let mut m = w.script_manifest(&files);
    m["env"] = serde_json::Value::Object(
        env.iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect(),
    );
    w.capsule_with_files(name, &m, &files, capsule_tests::Signer::Es256)
}

const LOADER_ENV: [(&str, &str); 4] = [
    ("LD_PRELOAD", "/capsule/forge.so"),
    ("LD_AUDIT", "/capsule/forge.so"),
    ("LD_LIBRARY_PATH", "/capsule"),
    ("GCONV_PATH", "/capsule/gconv"),
];

/// The manifest's env used to be the probe's own environment: a library in the
/// capsule named by `LD_PRELOAD`/`LD_AUDIT` ran inside the probe and printed a
/// forged report. Now the probe starts with no environment: its report is the
/// real one (this run's listener, the same as a run without env), and the
/// library only runs in the entrypoint, which sees exactly the manifest's env.
#[test]
fn ld_preload_and_ld_audit_in_the_manifest_env_cannot_forge_the_probe_report() {
    let w = World::new();
    let state = w.path("launcher");
    let launcher = launcher(&state, runsc());
    let baseline = launcher
        .launch(&admit(&w, &forging_capsule(&w, "plain", &[])))
        .expect("launch without env");
    assert_eq!(baseline.stdout.text(), "ENTRYPOINT-RAN\n");
    let base_probe = baseline
        .egress
        .probe
        .clone()
        .expect("baseline probe report");

    let r = launcher
        .launch(&admit(&w, &forging_capsule(&w, "forging", &LOADER_ENV)))
        .unwrap_or_else(|e| panic!("launch failed: {e}"));
    assert_teardown_ok(&r);
    assert_egress_blocked(&r);
    assert_runsc_left_nothing(&state, &r.run_id);
    let p = r.egress.probe.as_ref().expect("probe report");
    assert_eq!(
        p.target, r.egress.target,
        "the report is not the real probe's"
    );
    assert_ne!(p.error.as_deref(), Some("forged"));
    assert_eq!(
        (p.connected, p.errno, &p.interfaces),
        (
            base_probe.connected,
            base_probe.errno,
            &base_probe.interfaces
        ),
        "the report differs from a run without env"
    );
    // The library did run, in the entrypoint, after the report: its forged line is
    // capsule output, and the environment it saw is exactly the manifest's.
    let out = r.stdout.text();
    let mut lines = out.lines();
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with(sandbox_launcher::probe::PROBE_MARKER)),
        "{out}"
    );
    let mut env: Vec<&str> = lines.filter_map(|l| l.strip_prefix("ENV ")).collect();
    env.sort_unstable();
    let mut want: Vec<String> = LOADER_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
    want.sort_unstable();
    assert_eq!(env, want, "the entrypoint's environment: {out}");
    assert_eq!(r.exit_code, Some(0));
}

/// The same forgery with egress really open: a forged report would say
/// `blocked`; the real probe connects and the run fails.
#[test]
fn ld_preload_or_ld_audit_cannot_hide_open_egress() {
    for (k, v) in &LOADER_ENV[..2] {
        let w = World::new();
        let capsule = forging_capsule(&w, "forging", &[(k, v)]);
        let admitted = admit(&w, &capsule);
        let state = w.path("launcher");
        let mut config = RunscConfig::default();
        sandbox_launcher::danger::runsc_host_network(&mut config);
        let launcher = launcher(&state, RuntimeConfig::Runsc(config));
        let err = launcher
            .launch(&admitted)
            .expect_err("open egress must fail the run");
        let report = err
            .report()
            .unwrap_or_else(|| panic!("{k}: no report: {err}"));
        assert!(err.to_string().contains("egress is open"), "{k}: {err}");
        assert!(!report.egress.blocked, "{k}: {:?}", report.egress);
        assert!(report.egress.probe.as_ref().is_some_and(|p| p.connected));
        assert_eq!(
            report.exit_code,
            Some(sandbox_launcher::probe::EXIT_EGRESS_OPEN),
            "{k}"
        );
        assert!(!report.stdout.text().contains("ENTRYPOINT-RAN"));
        assert_teardown_ok(report);
        assert_runsc_left_nothing(&state, &report.run_id);
    }
}

/// Only what the verifier found will be executed is executable in `/capsule`: the
/// entrypoint script (run through its allowed `#!/bin/sh`) is 0555, a data
/// artifact is 0444 and cannot be `exec`ed, whatever it contains.
#[test]
fn a_staged_data_artifact_cannot_be_executed_inside_the_sandbox() {
    let w = World::new();
    let files: [(&str, &[u8]); 2] = [
        (
            "run.sh",
            b"#!/bin/sh\n\
              if /capsule/data/evil.sh; then echo evil-ran; else echo evil-denied; fi\n\
              test -x /capsule/run.sh && echo entrypoint-executable\n\
              test -x /capsule/data/evil.sh || echo data-not-executable\n",
        ),
        ("data/evil.sh", b"#!/bin/sh\necho EVIL\n"),
    ];
    let mut m = w.script_manifest(&files);
    m["entrypoint"] = serde_json::json!(["/capsule/run.sh"]);
    let capsule = w.capsule_with_files("capsule", &m, &files, capsule_tests::Signer::Es256);
    let admitted = admit(&w, &capsule);
    let state = w.path("launcher");
    let r = launcher(&state, runsc()).launch(&admitted).expect("launch");
    assert_eq!(
        r.stdout.text(),
        "evil-denied\nentrypoint-executable\ndata-not-executable\n",
        "stderr: {}",
        r.stderr.text()
    );
    assert_runsc_left_nothing(&state, &r.run_id);
}
