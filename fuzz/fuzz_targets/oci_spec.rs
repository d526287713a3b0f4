//! Any bytes as a manifest, then the OCI runtime config the launcher would write for
//! it (`sandbox_launcher::bundle::build_spec`, the function `Launcher::launch` uses),
//! for both runtimes. A spec that is built must keep the sandbox's invariants — no
//! capability, read-only root, a new network namespace, uid/gid 65534, no new
//! privileges, exactly the manifest's env and entrypoint — and its JSON must parse
//! back to the same spec.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use sandbox_launcher::bundle::{
    build_spec, BundleInput, Flavor, Rootfs, CAPSULE_DIR, PROBE_PATH, SANDBOX_GID, SANDBOX_UID,
};
use std::path::{Path, PathBuf};
use verify_core::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::parse(data) else { return };
    let rootfs = Rootfs::host_usr();
    let Rootfs::HostBinds(binds) = &rootfs else {
        unreachable!()
    };
    let probe_args = ["sandbox-probe".to_string()];
    for flavor in [Flavor::Runsc, Flavor::Containerd] {
        let input = BundleInput {
            manifest: &m,
            rootfs: &rootfs,
            staged: Path::new("/state/runs/r/staging"),
            probe_binary: Path::new("/usr/bin/capsule-gateway"),
            probe_args: &probe_args,
            probe_target: "127.0.0.1:40000".parse().expect("addr"),
            tmp_size_mib: 64,
            cgroups_path: "/capsule-gateway/capsule-r",
            flavor,
            share_host_network: false,
            // `none`: a new, empty network namespace (the targets network is the
            // launcher's own code path, tested by the egress suites).
            network: None,
            probe_reach: &[],
            enforcement: sandbox_launcher::bundle::Enforcement {
                seccomp_by: Some("kernel"),
                apparmor: sandbox_launcher::profiles::AppArmorHost::NotAvailable,
            },
        };
        let Ok(spec) = build_spec(&input, Path::new("/state/runs/r/bundle/rootfs"), binds) else {
            continue;
        };
        check(&m, &spec, flavor);
        let json = serde_json::to_vec_pretty(&spec).expect("serialise spec");
        let again: Spec = serde_json::from_slice(&json).expect("spec JSON parses back");
        assert_eq!(again, spec, "round trip");
    }
});

fn check(m: &Manifest, spec: &Spec, flavor: Flavor) {
    let root = spec.root().as_ref().expect("root");
    let linux = spec.linux().as_ref().expect("linux");
    assert!(linux.seccomp().is_some(), "the seccomp profile is pinned");
    assert_eq!(root.readonly(), Some(true), "read-only root");

    let process = spec.process().as_ref().expect("process");
    let user = process.user();
    assert_eq!((user.uid(), user.gid()), (SANDBOX_UID, SANDBOX_GID));
    assert!(user.additional_gids().as_ref().is_none_or(|g| g.is_empty()));
    assert_eq!(process.no_new_privileges(), Some(true));
    let caps = process
        .capabilities()
        .as_ref()
        .expect("capabilities listed");
    for set in [
        caps.bounding(),
        caps.effective(),
        caps.inheritable(),
        caps.permitted(),
        caps.ambient(),
    ] {
        assert!(
            set.as_ref().is_some_and(|s| s.is_empty()),
            "a capability set is not empty: {caps:?}"
        );
    }

    // No environment for the process: the probe must start without anything the
    // capsule chose (LD_PRELOAD and friends).
    let env = process.env().as_ref().expect("env");
    assert!(env.is_empty(), "the probe's environment is not empty: {env:?}");

    // The probe first, then exactly the manifest's entrypoint; the manifest's env
    // reaches the probe as `--env NAME=VALUE`, each reading back as the name and
    // value it came from.
    let args = process.args().as_ref().expect("args");
    assert_eq!(args[0], PROBE_PATH);
    let sep = args
        .iter()
        .position(|a| a == "--")
        .expect("-- before the entrypoint");
    assert_eq!(&args[sep + 1..], &m.entrypoint[..]);
    let mut pairs = Vec::new();
    let mut i = 1;
    while i < sep {
        if args[i] == "--env" {
            let (k, v) = args[i + 1].split_once('=').expect("NAME=value");
            pairs.push((k.to_string(), v.to_string()));
            i += 2;
        } else {
            i += 1;
        }
    }
    let want: Vec<(String, String)> = m.env.0.clone().into_iter().collect();
    assert_eq!(pairs, want, "the probe's env arguments");

    let linux = spec.linux().as_ref().expect("linux");
    let ns = linux.namespaces().as_ref().expect("namespaces");
    for want in [
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
    ] {
        let n = ns
            .iter()
            .find(|n| n.typ() == want)
            .unwrap_or_else(|| panic!("no {want:?} namespace"));
        assert!(
            n.path().is_none(),
            "{want:?} namespace joins an existing one"
        );
    }
    let res = linux.resources().as_ref().expect("resources");
    let mem = res.memory().as_ref().expect("memory limit");
    assert!(mem.limit().is_some_and(|l| l > 0) && mem.limit() == mem.swap());
    match flavor {
        Flavor::Containerd => assert!(res.pids().as_ref().is_some_and(|p| p.limit() > 0)),
        Flavor::Runsc => assert!(res.pids().is_none()),
    }
    let nproc = process.rlimits().as_ref().expect("rlimits");
    assert!(nproc
        .iter()
        .any(|r| r.hard() == m.limits.pids && r.soft() == m.limits.pids));

    // Every mount but /proc, /dev and /tmp is a read-only bind; /capsule is the staging copy.
    for mnt in spec.mounts().as_ref().expect("mounts") {
        let dest = mnt.destination().to_string_lossy();
        let opts = mnt.options().as_ref().expect("mount options");
        if mnt.typ().as_deref() == Some("bind") {
            assert!(opts.iter().any(|o| o == "ro"), "{dest} is a writable bind");
        } else {
            assert!(
                ["/proc", "/dev", "/tmp"].contains(&dest.as_ref()),
                "unexpected mount {dest}"
            );
        }
        if dest == CAPSULE_DIR {
            assert_eq!(
                mnt.source().as_deref(),
                Some(Path::new("/state/runs/r/staging"))
            );
        }
    }
    assert!(!spec
        .mounts()
        .as_ref()
        .expect("mounts")
        .iter()
        .any(|m| m.destination() == &PathBuf::from("/sys")));
}
