//! Shared by the runsc and containerd tests: admit a capsule through the real
//! verifier, build a launcher on a private state directory, and check from the
//! outside that a run left nothing behind.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use capsule_tests::{Signer, World, RUNNER};
use sandbox_launcher::{Launcher, LauncherConfig, ProbeBinary, Rootfs, RunReport, RuntimeConfig};
use serde_json::Value;
use verify_core::{Admitted, Capsule, NoHistory, SpiffeId, SystemClock, Verifier};

pub fn probe() -> ProbeBinary {
    ProbeBinary {
        path: PathBuf::from(env!("CARGO_BIN_EXE_capsule-sandbox-probe")),
        args: Vec::new(),
    }
}

/// Verifies a capsule directory with the fixture policy; panics on a denial.
pub fn admit(w: &World, capsule: &Path) -> Admitted {
    let policy = w.policy();
    let runner = SpiffeId::parse(RUNNER).expect("runner id");
    let verifier = Verifier {
        policy: &policy,
        clock: &SystemClock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: verify_core::HashMode::Read,
        governance: Default::default(),
    };
    verifier
        .verify(&Capsule::from_dir(capsule, policy.limits.max_jws_bytes))
        .unwrap_or_else(|d| panic!("fixture capsule denied: {d:?}"))
}

/// A signed capsule running `script` with `/bin/sh`, with the given limits
/// (`timeout_ms`, `memory_mib`, `pids`) and env.
pub fn script_capsule(
    w: &World,
    name: &str,
    script: &str,
    limits: (u64, u64, u64),
    env: &[(&str, &str)],
) -> PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let mut m = w.script_manifest(&files);
    m["limits"] =
        serde_json::json!({"timeout_ms": limits.0, "memory_mib": limits.1, "pids": limits.2});
    m["env"] = Value::Object(
        env.iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    );
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

/// A launcher on its own state directory, on the host's `/usr` (opted in: these
/// tests' capsules use Debian's dash, bash and glibc); a missing runtime fails the
/// test with the error, which names the Debian package.
pub fn launcher(state: &Path, runtime: RuntimeConfig) -> Launcher {
    launcher_on(state, runtime, Rootfs::host_usr())
}

/// A launcher on the given root file system.
pub fn launcher_on(state: &Path, runtime: RuntimeConfig, rootfs: Rootfs) -> Launcher {
    let mut config = LauncherConfig::new(state, runtime, probe());
    config.rootfs = rootfs;
    Launcher::new(config).unwrap_or_else(|e| panic!("cannot set up the launcher: {e}"))
}

/// The base rootfs that `scripts/build-rootfs.sh` (run by install-deps) builds; a
/// missing one fails naming the script and the Debian package.
pub fn base_rootfs() -> PathBuf {
    let p = PathBuf::from(sandbox_launcher::rootfs::BASE_ROOTFS);
    assert!(
        p.join("bin/busybox").is_file(),
        "{} has no bin/busybox: run scripts/build-rootfs.sh (Debian package busybox-static)",
        p.display()
    );
    p
}

/// Host processes that name `needle` on their command line or have it in their
/// cgroup — an independent re-implementation of the launcher's own check.
pub fn host_processes_with(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmd.is_empty() {
            continue; // gone, or a zombie
        }
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cmd.contains(needle) || cg.contains(needle) {
            out.push(format!("{name}: {cmd}"));
        }
    }
    out
}

/// Cgroup directories named after `container_id`, in any hierarchy.
pub fn cgroups_named(container_id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.to_path_buf()];
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            roots.push(e.path());
        }
    }
    for r in roots {
        let p = r.join("capsule-gateway").join(container_id);
        if p.exists() {
            out.push(p);
        }
    }
    out
}

/// From the outside: runsc's list (in the launcher's root) is empty, no process or
/// cgroup of the run exists, and the run directories are gone.
pub fn assert_runsc_left_nothing(state: &Path, run_id: &str) {
    let root = state.join("runsc");
    let out = Command::new("runsc")
        .arg(format!("--root={}", root.display()))
        .args(["list", "--quiet"])
        .output()
        .expect("runsc list");
    assert!(out.status.success(), "runsc list: {out:?}");
    let listed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(listed.is_empty(), "runsc still lists: {listed}");
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .expect("runsc root")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "runsc root holds {leftovers:?}");
    assert_host_clean(state, run_id);
}

/// No process, cgroup or run directory of `run_id` is left.
pub fn assert_host_clean(state: &Path, run_id: &str) {
    let procs = host_processes_with(run_id);
    assert!(procs.is_empty(), "processes left: {procs:?}");
    let cid = format!("capsule-{run_id}");
    let cgroups = cgroups_named(&cid);
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    let runs: Vec<_> = std::fs::read_dir(state.join("runs"))
        .expect("runs dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(runs.is_empty(), "run directories left: {runs:?}");
}

/// The launcher's own teardown verdict, check by check.
pub fn assert_teardown_ok(report: &RunReport) {
    assert!(report.teardown.ok, "teardown: {:?}", report.teardown);
    let names: Vec<_> = report
        .teardown
        .checks
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for want in [
        "runtime_list",
        "processes",
        "cgroups",
        "runtime_state",
        "run_directory",
    ] {
        assert!(names.contains(&want), "check {want} missing: {names:?}");
    }
}

/// The egress probe ran, failed to connect, saw only loopback, and the host
/// listener saw nothing.
pub fn assert_egress_blocked(report: &RunReport) {
    let e = &report.egress;
    assert!(e.blocked, "egress: {e:?}");
    let p = e.probe.as_ref().expect("probe report");
    assert!(!p.connected && p.error.is_some(), "{p:?}");
    assert!(!e.listener_accepted);
    assert!(
        p.interfaces.iter().all(|i| i.loopback) && !p.interfaces.is_empty(),
        "{:?}",
        p.interfaces
    );
}
