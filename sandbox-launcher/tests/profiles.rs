//! The pinned profiles and the pinned base rootfs, against real runsc and a real
//! containerd with runc's shim v2:
//! - the seccomp profile denies calls it omits under both, and the same calls work in
//!   the same sandbox without the profile: `unshare(0)` (no namespace asked for: any
//!   process may, and gVisor implements it) and `process_vm_readv` on the caller's own memory
//!   (no capability needed; gVisor of Debian 12 answers it ENOSYS itself);
//! - the evidence says seccomp was enforced, and by whom, and that AppArmor is not
//!   available on this kernel;
//! - the busybox base rootfs runs capsules, its tree digest is in the evidence, and
//!   a pin that differs refuses the run before any sandbox exists.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use capsule_tests::{Signer, World};
use common::*;
use sandbox_launcher::rootfs::tree_digest;
use sandbox_launcher::{
    ContainerdConfig, LaunchError, Launcher, LauncherConfig, PrivateContainerd, Rootfs, RunReport,
    RunscConfig, RuntimeConfig,
};

/// Calls `unshare(0)`, calls `process_vm_readv` on its own memory, and prints
/// each outcome. Static, so it runs on any root (Debian package `gcc`, `libc6-dev`
/// for the static libc).
const VMREAD_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sched.h>
#include <sys/uio.h>
#include <unistd.h>
int main(void) {
    if (unshare(0) < 0) printf("unshare errno=%d\n", errno);
    else printf("unshare ok\n");
    char src[8] = "secret!", dst[8] = {0};
    struct iovec local = {dst, sizeof dst}, remote = {src, sizeof src};
    ssize_t n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    if (n < 0) printf("process_vm_readv errno=%d\n", errno);
    else printf("process_vm_readv read=%s\n", dst);
    return 0;
}
"#;

fn vmread_binary() -> &'static [u8] {
    static BIN: OnceLock<Vec<u8>> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("vmread.c");
        std::fs::write(&src, VMREAD_C).expect("write");
        let out = dir.path().join("vmread");
        let status = std::process::Command::new("gcc")
            .args(["-static", "-O1", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("gcc (Debian package `gcc`) cannot run: {e}"));
        assert!(
            status.success(),
            "gcc -static failed (Debian package libc6-dev)"
        );
        // The control: outside any sandbox the call works.
        let host = std::process::Command::new(&out)
            .output()
            .expect("run vmread");
        assert_eq!(
            String::from_utf8_lossy(&host.stdout),
            "unshare ok\nprocess_vm_readv read=secret!\n"
        );
        std::fs::read(&out).expect("read vmread")
    })
}

fn vmread_capsule(w: &World, name: &str) -> PathBuf {
    let bin = vmread_binary();
    let files: [(&str, &[u8]); 1] = [("vmread", bin)];
    let mut m = w.script_manifest(&files);
    m["entrypoint"] = serde_json::json!(["/capsule/vmread"]);
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

fn runsc() -> RuntimeConfig {
    RuntimeConfig::Runsc(RunscConfig::default())
}

fn config(state: &Path, runtime: RuntimeConfig) -> LauncherConfig {
    let mut c = LauncherConfig::new(state, runtime, probe());
    c.rootfs = Rootfs::base(None);
    c
}

fn run(w: &World, launcher: &Launcher, capsule: &Path) -> RunReport {
    let r = launcher
        .launch(&admit(w, capsule))
        .unwrap_or_else(|e| panic!("launch failed: {e}"));
    assert_teardown_ok(&r);
    assert_egress_blocked(&r);
    r
}

fn assert_profiles(r: &RunReport, enforced_by: &str) {
    let p = &r.bundle.profiles;
    assert!(p.seccomp.enforced, "{p:?}");
    assert_eq!(p.seccomp.enforced_by, enforced_by);
    assert_eq!(p.seccomp.profile, "capsule-default");
    let sha = capsule_tests::sha256_hex(sandbox_launcher::profiles::SECCOMP_PROFILE.as_bytes());
    assert_eq!(p.seccomp.profile_sha256, format!("sha256:{sha}"));
    assert_eq!(p.apparmor.profile, "capsule-gateway-capsule");
    // This kernel has no AppArmor: the evidence says so, and the config does not
    // name a profile no one would apply.
    assert!(!std::path::Path::new("/sys/module/apparmor").exists());
    assert!(!p.apparmor.enforced && !p.apparmor.in_config, "{p:?}");
    assert_eq!(
        p.apparmor.host,
        "not available: this kernel has no AppArmor"
    );
    assert!(r.oci_config.contains("\"seccomp\""), "pinned in the config");
    assert!(!r.oci_config.contains("apparmorProfile"));
}

#[test]
fn seccomp_denies_omitted_calls_under_runsc_and_not_without_the_profile() {
    let w = World::new();
    let capsule = vmread_capsule(&w, "vmread");
    let state = w.path("launcher");
    let r = run(
        &w,
        &Launcher::new(config(&state, runsc())).expect("launcher"),
        &capsule,
    );
    assert_eq!(
        r.stdout.text(),
        "unshare errno=1\nprocess_vm_readv errno=1\n",
        "EPERM from the profile; stderr {}",
        r.stderr.text()
    );
    assert_profiles(&r, "gvisor");
    assert_runsc_left_nothing(&state, &r.run_id);

    let state = w.path("launcher-off");
    let mut off = config(&state, runsc());
    sandbox_launcher::danger::without_seccomp(&mut off);
    let r = run(&w, &Launcher::new(off).expect("launcher"), &capsule);
    assert_eq!(
        r.stdout.text(),
        "unshare ok\nprocess_vm_readv errno=38\n",
        "gVisor answers unshare, and process_vm_readv with its own ENOSYS"
    );
    assert!(!r.bundle.profiles.seccomp.enforced);
    assert!(!r.oci_config.contains("\"seccomp\""));
    assert_runsc_left_nothing(&state, &r.run_id);
}

#[test]
fn seccomp_denies_omitted_calls_through_containerd_and_runc() {
    let w = World::new();
    let containerd = PrivateContainerd::start(&w.path("containerd"))
        .unwrap_or_else(|e| panic!("cannot start containerd: {e}"));
    let runtime =
        || RuntimeConfig::Containerd(ContainerdConfig::runc_for_tests(containerd.address()));
    let capsule = vmread_capsule(&w, "vmread");
    let state = w.path("launcher");
    let r = run(
        &w,
        &Launcher::new(config(&state, runtime())).expect("launcher"),
        &capsule,
    );
    assert_eq!(
        r.stdout.text(),
        "unshare errno=1\nprocess_vm_readv errno=1\n",
        "stderr {}",
        r.stderr.text()
    );
    assert_profiles(&r, "kernel");
    assert_host_clean(&state, &r.run_id);

    let state = w.path("launcher-off");
    let mut off = config(&state, runtime());
    sandbox_launcher::danger::without_seccomp(&mut off);
    let r = run(&w, &Launcher::new(off).expect("launcher"), &capsule);
    assert_eq!(
        r.stdout.text(),
        "unshare ok\nprocess_vm_readv read=secret!\n"
    );
    assert_host_clean(&state, &r.run_id);
}

/// The busybox root runs a shell capsule as nobody and nothing of the host's /usr
/// is there; its tree digest is the evidence's, and a matching pin runs.
#[test]
fn the_base_rootfs_runs_capsules_and_its_digest_is_in_the_evidence() {
    let base = base_rootfs();
    let digest = tree_digest(&base).expect("digest");
    let w = World::new();
    let capsule = script_capsule(
        &w,
        "capsule",
        "id -u; readlink /bin/sh; if [ -e /usr/bin/perl ] || [ -e /usr/lib/os-release ]; then echo host-usr; else echo no-host-usr; fi",
        (20_000, 256, 64),
        &[],
    );
    let state = w.path("launcher");
    let mut c = config(&state, runsc());
    c.rootfs = Rootfs::base(Some(digest));
    let r = run(&w, &Launcher::new(c).expect("launcher"), &capsule);
    assert_eq!(
        r.stdout.text(),
        "65534\n/bin/busybox\nno-host-usr\n",
        "stderr {}",
        r.stderr.text()
    );
    let f = &r.bundle.rootfs;
    assert_eq!(f.source, "dir");
    assert_eq!(f.tree_sha256.as_deref(), Some(digest.to_string().as_str()));
    assert_eq!(f.pinned, f.tree_sha256);
    assert_runsc_left_nothing(&state, &r.run_id);
}

/// A root whose tree digest is not the pinned one: refused with both digests named,
/// before any sandbox exists (nothing in runsc's list, no run directory).
#[test]
fn a_rootfs_that_differs_from_its_pin_refuses_the_run() {
    let base = base_rootfs();
    let w = World::new();
    // A copy of the base root with one applet link pointing elsewhere.
    let copy = w.path("rootfs");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&base)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());
    let pinned = tree_digest(&copy).expect("digest");
    std::fs::remove_file(copy.join("bin/cat")).expect("rm");
    std::os::unix::fs::symlink("/capsule/evil", copy.join("bin/cat")).expect("ln");
    let actual = tree_digest(&copy).expect("digest");
    assert_ne!(pinned, actual);

    let capsule = script_capsule(&w, "capsule", "echo RAN", (20_000, 256, 64), &[]);
    let state = w.path("launcher");
    let mut c = config(&state, runsc());
    c.rootfs = Rootfs::Dir {
        path: copy.clone(),
        pin: Some(pinned),
    };
    let launcher = Launcher::new(c).expect("launcher");
    let err = launcher
        .launch(&admit(&w, &capsule))
        .expect_err("a rootfs that differs from its pin");
    match &err {
        LaunchError::RootfsPinMismatch {
            path,
            pinned: p,
            actual: a,
        } => {
            assert_eq!(path, &copy);
            assert_eq!(p, &pinned.to_string());
            assert_eq!(a, &actual.to_string());
        }
        other => panic!("expected RootfsPinMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&pinned.to_string())
            && msg.contains(&actual.to_string())
            && msg.contains("nothing was launched"),
        "{msg}"
    );
    assert!(err.is_config(), "{err}");
    let runs: Vec<_> = std::fs::read_dir(state.join("runs"))
        .expect("runs")
        .collect();
    assert!(runs.is_empty(), "{runs:?}");
    let out = std::process::Command::new("runsc")
        .arg(format!("--root={}", state.join("runsc").display()))
        .args(["list", "--quiet"])
        .output()
        .expect("runsc list");
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}
