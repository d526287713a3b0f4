//! The OCI bundle of one run, built with the `oci-spec` crate.
//!
//! Everything the sandbox gets is listed here and nothing else: a read-only root,
//! the staged artifacts read-only at `/capsule`, a size-limited tmpfs at `/tmp`, the
//! egress probe read-only at `/.capsule-probe`, uid/gid 65534 with no capabilities and
//! `noNewPrivileges`, new (empty) network, pid, ipc, uts and mount namespaces, the
//! manifest's memory and pids limits as cgroup limits and rlimits, an empty
//! environment, and the probe followed by the manifest's `entrypoint` as the
//! process (the manifest's `env` is handed to the probe as arguments, for the
//! entrypoint only).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};
use serde::{Deserialize, Serialize};
use verify_core::Manifest;

use crate::error::{BundleError, LaunchError, Result};
use crate::profiles::{self, AppArmorFacts, AppArmorHost, ProfileFacts, SeccompFacts};
use crate::rootfs::RootfsFacts;

/// The unprivileged user the capsule runs as (`nobody`).
pub const SANDBOX_UID: u32 = 65534;
pub const SANDBOX_GID: u32 = 65534;
/// Where the staged artifacts appear inside the sandbox.
pub const CAPSULE_DIR: &str = "/capsule";
/// Where the egress probe binary appears inside the sandbox.
pub const PROBE_PATH: &str = "/.capsule-probe";
/// Open files per process inside the sandbox.
const NOFILE: u64 = 1024;

pub use crate::rootfs::Rootfs;

/// Which runtime the bundle is for. They read the same config but enforce the pids
/// limit differently (see [`build_spec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Runsc,
    Containerd,
}

/// Everything a bundle is made of.
#[derive(Debug)]
pub struct BundleInput<'a> {
    pub manifest: &'a Manifest,
    pub rootfs: &'a Rootfs,
    /// The staging directory (bound read-only at `/capsule`).
    pub staged: &'a Path,
    /// The probe binary on the host (bound read-only at `/.capsule-probe`).
    pub probe_binary: &'a Path,
    /// Arguments that select the probe mode of that binary (e.g. `["sandbox-probe"]`).
    pub probe_args: &'a [String],
    /// The host listener the probe must fail to reach.
    pub probe_target: std::net::SocketAddr,
    pub tmp_size_mib: u64,
    /// cgroup path, unique per run (`/capsule-gateway/<container id>`).
    pub cgroups_path: &'a str,
    pub flavor: Flavor,
    /// Leave out the network namespace (only via [`crate::danger`]).
    pub share_host_network: bool,
    /// `scope.network = "targets"`: the run's prepared namespace and pinned `/etc`
    /// files ([`crate::net`]); `None`: a new, empty network namespace.
    pub network: Option<&'a crate::net::BundleNet>,
    /// Declared destinations the probe must reach (`targets`).
    pub probe_reach: &'a [std::net::SocketAddr],

    /// Who applies the seccomp profile and what the host does with AppArmor.
    pub enforcement: Enforcement,
}

/// What the host and the runtime do with the pinned profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enforcement {
    /// Who applies the seccomp filter (`kernel`, `gvisor`, `kata-guest`). `None` when
    /// nothing can (or, only via [`crate::danger`], nothing should): then the profile
    /// is left out of the config and the evidence says it was not enforced.
    pub seccomp_by: Option<&'static str>,
    pub apparmor: AppArmorHost,
}

/// Facts about the bundle that go into the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFacts {
    /// `sha256:<hex>` of the exact `config.json` bytes given to the runtime.
    pub oci_config_sha256: String,
    pub root_readonly: bool,
    pub uid: u32,
    pub gid: u32,
    pub tmp_size_mib: u64,
    pub memory_limit_bytes: i64,
    pub pids_limit: u64,
    pub network: String,
    /// The root file system and its tree digest.
    pub rootfs: RootfsFacts,
    /// The seccomp and AppArmor profiles and whether the host enforced each.
    pub profiles: ProfileFacts,
}

/// A bundle as written: the facts for the evidence and the exact `config.json`
/// text, kept in memory so that the evidence never reads back what it wrote.
#[derive(Debug, Clone)]
pub struct WrittenBundle {
    pub facts: BundleFacts,
    pub config: String,
}

/// Writes `dir/config.json` (and `dir/rootfs` for [`Rootfs::HostBinds`]). A prepared
/// root is digested first: one that differs from its pin is refused here, before
/// any runtime is asked to start anything.
pub fn write(dir: &Path, input: &BundleInput<'_>) -> Result<WrittenBundle> {
    let (root, binds, rootfs) = match input.rootfs {
        Rootfs::HostBinds(host) => {
            let root = dir.join("rootfs");
            let facts = RootfsFacts {
                source: "host-usr".into(),
                paths: host.iter().map(|p| p.display().to_string()).collect(),
                tree_sha256: None,
                pinned: None,
            };
            (root, Some(host), facts)
        }
        Rootfs::Dir { path, pin } => {
            let digest =
                crate::rootfs::tree_digest(path).map_err(|source| LaunchError::Rootfs {
                    path: path.clone(),
                    source,
                })?;
            if let Some(pin) = pin {
                if *pin != digest {
                    return Err(LaunchError::RootfsPinMismatch {
                        path: path.clone(),
                        pinned: pin.to_string(),
                        actual: digest.to_string(),
                    });
                }
            }
            let facts = RootfsFacts {
                source: "dir".into(),
                paths: vec![path.display().to_string()],
                tree_sha256: Some(digest.to_string()),
                pinned: pin.map(|p| p.to_string()),
            };
            (path.clone(), None, facts)
        }
    };
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| LaunchError::io("create bundle directory", dir, e))?;
    let binds = match binds {
        Some(host) => make_rootfs(&root, host)?,
        None => Vec::new(),
    };
    let spec = build_spec(input, &root, &binds)?;
    let config = serde_json::to_string_pretty(&spec).map_err(BundleError::from)?;
    let path = dir.join("config.json");
    fs::write(&path, &config).map_err(|e| LaunchError::io("write OCI config", &path, e))?;
    let backend = verify_core::crypto::default_backend();
    let digest = backend.sha256_oneshot(config.as_bytes());
    let limits = &input.manifest.limits;
    let seccomp = profiles::seccomp_profile()?;
    let apparmor = input.enforcement.apparmor;
    let profiles = ProfileFacts {
        seccomp: SeccompFacts {
            profile: seccomp.name.clone(),
            profile_sha256: verify_core::Sha256Digest(
                backend.sha256_oneshot(profiles::SECCOMP_PROFILE.as_bytes()),
            )
            .to_string(),
            enforced: input.enforcement.seccomp_by.is_some(),
            enforced_by: input.enforcement.seccomp_by.unwrap_or("nothing").into(),
        },
        apparmor: AppArmorFacts {
            profile: profiles::APPARMOR_PROFILE.into(),
            in_config: apparmor == AppArmorHost::Loaded,
            enforced: apparmor == AppArmorHost::Loaded,
            host: apparmor.describe().into(),
        },
    };
    let facts = BundleFacts {
        oci_config_sha256: verify_core::Sha256Digest(digest).to_string(),
        root_readonly: true,
        uid: SANDBOX_UID,
        gid: SANDBOX_GID,
        tmp_size_mib: input.tmp_size_mib,
        memory_limit_bytes: memory_bytes(limits.memory_mib),
        pids_limit: limits.pids,
        network: if input.share_host_network {
            "host"
        } else if input.network.is_some() {
            "targets"
        } else {
            "none"
        }
        .into(),
        rootfs,
        profiles,
    };
    Ok(WrittenBundle { facts, config })
}

/// Makes the per-run root: mount points and merged-`/usr` symlinks only, no files
/// of its own. Returns the host directories to bind read-only.
fn make_rootfs(root: &Path, host: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mkdir = |p: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
            .map_err(|e| LaunchError::io("create rootfs mount point", p, e))
    };
    mkdir(root)?;
    for point in ["proc", "dev", "tmp", "capsule"] {
        mkdir(&root.join(point))?;
    }
    let probe = root.join(PROBE_PATH.trim_start_matches('/'));
    fs::write(&probe, b"").map_err(|e| LaunchError::io("create probe mount point", &probe, e))?;
    let mut binds = Vec::new();
    for path in host {
        let rel = path
            .strip_prefix("/")
            .map_err(|_| BundleError::NotAbsolute(path.clone()))?;
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(LaunchError::io("inspect host directory", path, e)),
        };
        let inside = root.join(rel);
        if meta.file_type().is_symlink() {
            let target =
                fs::read_link(path).map_err(|e| LaunchError::io("read symlink", path, e))?;
            std::os::unix::fs::symlink(&target, &inside)
                .map_err(|e| LaunchError::io("create rootfs symlink", &inside, e))?;
        } else if meta.is_dir() {
            mkdir(&inside)?;
            binds.push(path.clone());
        }
    }
    // The root itself is mounted read-only; its mount points need no write bit.
    fs::set_permissions(root, fs::Permissions::from_mode(0o555))
        .map_err(|e| LaunchError::io("make rootfs read-only", root, e))?;
    Ok(binds)
}

fn memory_bytes(mib: u64) -> i64 {
    i64::try_from(mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX)
}

/// An oci-spec builder's refusal, as the launcher's error.
fn bundle_err(e: oci_spec::OciSpecError) -> LaunchError {
    BundleError::Spec(e).into()
}

fn mount(dest: &str, typ: &str, source: &Path, options: &[&str]) -> Result<Mount> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(bundle_err)
}

/// The OCI runtime config. Every choice is explicit: nothing is left to a builder
/// default (oci-spec's defaults grant capabilities and mount `/sys`).
///
/// Refuses a manifest the verifier would call malformed. An admitted one never is,
/// but this function is public and its output must not depend on that: an env name
/// with `=` would turn into another variable (`"=A": "B=c"` becomes `=A=B=c`, read
/// as `"" = "A=B=c"`) in the probe's `--env NAME=VALUE` arguments.
pub fn build_spec(input: &BundleInput<'_>, root: &Path, binds: &[PathBuf]) -> Result<Spec> {
    let m = input.manifest;
    verify_core::verify::check_shape(m).map_err(|why| BundleError::Manifest(why.to_string()))?;
    let ro_bind = ["rbind", "ro", "nosuid", "nodev"];
    let mut mounts = vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "noexec", "strictatime", "mode=755", "size=65536k"],
        )?,
    ];
    for host in binds {
        let dest = host.to_string_lossy();
        mounts.push(mount(&dest, "bind", host, &ro_bind)?);
    }
    mounts.push(mount(CAPSULE_DIR, "bind", input.staged, &ro_bind)?);
    mounts.push(mount(
        PROBE_PATH,
        "bind",
        input.probe_binary,
        &["bind", "ro", "nosuid", "nodev"],
    )?);
    mounts.extend(network_mounts(input)?);
    let tmp_size = format!("size={}m", input.tmp_size_mib);
    mounts.push(mount(
        "/tmp",
        "tmpfs",
        Path::new("tmpfs"),
        &["nosuid", "nodev", "mode=1777", &tmp_size],
    )?);

    // The probe runs first, in the same sandbox, then execs the entrypoint. The
    // manifest's env travels as probe arguments and is applied only at that exec:
    // the process itself starts with an empty environment, so nothing the capsule
    // chose (LD_PRELOAD, LD_AUDIT, LD_LIBRARY_PATH, GCONV_PATH...) reaches the
    // dynamic loader or the C library of the probe.
    let mut args = vec![PROBE_PATH.to_string()];
    args.extend(input.probe_args.iter().cloned());
    args.extend(["--connect".to_string(), input.probe_target.to_string()]);
    for r in input.probe_reach {
        args.extend(["--reach".to_string(), r.to_string()]);
    }
    for (k, v) in &m.env.0 {
        args.extend(["--env".to_string(), format!("{k}={v}")]);
    }
    args.push("--".to_string());
    args.extend(m.entrypoint.iter().cloned());
    // No PATH, HOME or TERM, and none of the manifest's env either (see above).
    let env: Vec<String> = Vec::new();

    let none: HashSet<Capability> = HashSet::new();
    let caps = LinuxCapabilitiesBuilder::default()
        .bounding(none.clone())
        .effective(none.clone())
        .inheritable(none.clone())
        .permitted(none.clone())
        .ambient(none)
        .build()
        .map_err(bundle_err)?;
    let rlimit = |typ, value: u64| {
        PosixRlimitBuilder::default()
            .typ(typ)
            .hard(value)
            .soft(value)
            .build()
            .map_err(bundle_err)
    };
    let rlimits = vec![
        // gVisor enforces RLIMIT_NPROC inside the sandbox: it is how the pids limit
        // reaches the capsule's tasks there (see below). Under runc and Kata the
        // pids cgroup enforces it as well.
        rlimit(PosixRlimitType::RlimitNproc, m.limits.pids)?,
        rlimit(PosixRlimitType::RlimitNofile, NOFILE)?,
        rlimit(PosixRlimitType::RlimitCore, 0)?,
    ];
    let mut process = ProcessBuilder::default();
    // The pinned AppArmor profile, where the host has it loaded: a runtime refuses
    // a profile the kernel cannot apply, so elsewhere the evidence says why not.
    if input.enforcement.apparmor == AppArmorHost::Loaded {
        process = process.apparmor_profile(profiles::APPARMOR_PROFILE);
    }
    let process = process
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(SANDBOX_UID)
                .gid(SANDBOX_GID)
                .additional_gids(Vec::<u32>::new())
                .build()
                .map_err(bundle_err)?,
        )
        .args(args)
        .env(env)
        .cwd("/")
        .capabilities(caps)
        .rlimits(rlimits)
        .no_new_privileges(true)
        .build()
        .map_err(bundle_err)?;

    let memory = memory_bytes(m.limits.memory_mib);
    let mut resources = LinuxResourcesBuilder::default()
        // swap == limit: no swap on top of the memory limit.
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory)
                .swap(memory)
                .build()
                .map_err(bundle_err)?,
        )
        .devices(Vec::new());
    if input.flavor == Flavor::Containerd {
        // runc and Kata apply the pids cgroup to the capsule's own processes.
        // runsc applies cgroup limits to the host cgroup of the sandbox, which holds
        // the sentry's and gofer's host threads, not the capsule's tasks: a pids
        // limit there starves gVisor itself (measured: 10 stops it from booting) and
        // bounds nothing the capsule does. gVisor gets the limit as RLIMIT_NPROC.
        let pids = i64::try_from(m.limits.pids).unwrap_or(i64::MAX);
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(pids)
                .build()
                .map_err(bundle_err)?,
        );
    }
    let namespaces = [
        LinuxNamespaceType::Pid,
        // A new network namespace without a path: empty but for loopback. runsc
        // additionally runs with --network=none.
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ]
    .into_iter()
    .filter(|ns| !(input.share_host_network && *ns == LinuxNamespaceType::Network))
    .map(|typ| {
        let mut ns = LinuxNamespaceBuilder::default().typ(typ);
        if let (LinuxNamespaceType::Network, Some(net)) = (typ, input.network) {
            ns = ns.path(net.netns_path.clone());
        }
        ns.build().map_err(bundle_err)
    })
    .collect::<Result<Vec<_>>>()?;
    let mut linux = LinuxBuilder::default();
    // The pinned seccomp profile, wherever something applies it (see
    // [`Enforcement::seccomp_by`]).
    if input.enforcement.seccomp_by.is_some() {
        linux = linux.seccomp(profiles::oci_seccomp(&profiles::seccomp_profile()?)?);
    }
    let linux = linux
        .resources(resources.build().map_err(bundle_err)?)
        .cgroups_path(PathBuf::from(input.cgroups_path))
        .namespaces(namespaces)
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
        )
        .build()
        .map_err(bundle_err)?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(root)
                .readonly(true)
                .build()
                .map_err(bundle_err)?,
        )
        .hostname("capsule")
        .mounts(mounts)
        .process(process)
        .linux(linux)
        .build()
        .map_err(bundle_err)
}

/// The network part of the config for `targets`: the pinned `/etc/hosts`,
/// `/etc/nsswitch.conf` and `/etc/resolv.conf`, read-only (the namespace path is
/// set where the namespaces are listed). Nothing for `none`.
fn network_mounts(input: &BundleInput<'_>) -> Result<Vec<Mount>> {
    let Some(net) = input.network else {
        return Ok(Vec::new());
    };
    net.etc_files
        .iter()
        .map(|(inside, host)| mount(inside, "bind", host, &["bind", "ro", "nosuid", "nodev"]))
        .collect()
}

/// Kernel interfaces hidden from the capsule (runc's defaults): they leak host
/// state or allow host-wide effects.
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// Kernel interfaces the capsule may read but never write.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(env: &str) -> Manifest {
        let json = format!(
            r#"{{"schema": "capsule/v1", "capsule_id": "c", "version": 1, "parent": null,
            "tenant": "t", "issued_at": 1, "not_before": 1, "expires_at": 2,
            "policy_version": "p", "author": "a@b.example", "approvals": [],
            "scope": {{"environment": "staging", "network": "none"}},
            "limits": {{"timeout_ms": 1000, "memory_mib": 64, "pids": 8}},
            "entrypoint": ["/capsule/run.sh"], "env": {env}, "artifacts": []}}"#
        );
        Manifest::parse(json.as_bytes()).expect("manifest parses")
    }

    fn spec_of(m: &Manifest) -> Result<Spec> {
        let rootfs = Rootfs::host_usr();
        let input = BundleInput {
            manifest: m,
            rootfs: &rootfs,
            staged: Path::new("/run/staging"),
            probe_binary: Path::new("/usr/bin/probe"),
            probe_args: &[],
            probe_target: ([127, 0, 0, 1], 9).into(),
            tmp_size_mib: 8,
            cgroups_path: "/capsule-gateway/capsule-x",
            flavor: Flavor::Runsc,
            share_host_network: false,
            network: None,
            probe_reach: &[],

            enforcement: Enforcement {
                seccomp_by: Some("gvisor"),
                apparmor: AppArmorHost::NotAvailable,
            },
        };
        build_spec(&input, Path::new("/run/rootfs"), &[])
    }

    /// Found by the `oci_spec` fuzz target: the env name `=_2` (never admitted: the
    /// verifier refuses it) made the entry `=_2=x=y,z`, which a runtime reads as the
    /// variable `` with the value `_2=x=y,z`.
    #[test]
    fn an_env_name_with_an_equals_sign_is_refused_not_split_into_another_variable() {
        for env in [
            r#"{"=_2": "x=y,z"}"#,
            r#"{"A=B": "c"}"#,
            r#"{"A,B": "c"}"#,
            r#"{"": "c"}"#,
        ] {
            match spec_of(&manifest(env)) {
                Err(LaunchError::Bundle(BundleError::Manifest(why))) => {
                    assert!(why.contains("env name"), "{env}: {why}")
                }
                other => panic!("{env}: expected a refusal, got {other:?}"),
            }
        }
        let spec = spec_of(&manifest(r#"{"A": "x=y,z", "_b2": ""}"#)).expect("valid env");
        let process = spec.process().as_ref().expect("process");
        assert_eq!(process.env().clone(), Some(Vec::new()));
        let args = process.args().clone().unwrap_or_default();
        let env_args: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "--env")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(env_args, vec!["A=x=y,z", "_b2="]);
    }

    /// The process starts with no environment at all: the manifest's env, whatever
    /// it names, is only an argument of the probe, never its environment.
    #[test]
    fn ld_preload_in_the_manifest_env_is_not_the_probe_environment() {
        let spec = spec_of(&manifest(
            r#"{"LD_PRELOAD": "/capsule/evil.so", "LD_AUDIT": "/capsule/evil.so",
               "LD_LIBRARY_PATH": "/capsule", "GCONV_PATH": "/capsule"}"#,
        ))
        .expect("spec");
        let process = spec.process().as_ref().expect("process");
        assert_eq!(process.env().clone(), Some(Vec::new()));
        let args = process.args().clone().unwrap_or_default();
        assert_eq!(args[0], PROBE_PATH);
        let sep = args.iter().position(|a| a == "--").expect("--");
        assert_eq!(&args[sep + 1..], ["/capsule/run.sh"]);
        assert!(args[..sep].contains(&"LD_PRELOAD=/capsule/evil.so".to_string()));
    }
}
