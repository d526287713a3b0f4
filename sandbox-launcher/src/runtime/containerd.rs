//! Kata Containers through containerd's shim v2 (Debian package `containerd`).
//!
//! The launcher talks to a containerd it owns — [`PrivateContainerd`] starts one
//! with its own root, state directory and socket, never the system's — through
//! `ctr`, containerd's own client: `ctr run --rm --config <bundle>/config.json
//! --runtime <type> <id>` creates the container from the launcher's OCI config (no
//! image, no snapshotter), starts it through the shim named by the runtime type,
//! relays its stdout and stderr, and exits with its status.
//!
//! In production the runtime type is `io.containerd.kata.v2` (shim
//! `containerd-shim-kata-v2`): each capsule gets its own lightweight VM. Kata is not
//! packaged in Debian 12, so the tests drive the same path with
//! `io.containerd.runc.v2` ([`ContainerdConfig::runc_for_tests`]); the Kata path
//! differs only in the runtime name (and, optionally, Kata's documented
//! `io.katacontainers.*` annotations, which this launcher does not set: Kata sizes
//! the VM from `linux.resources`).
//!
//! Timeout (`supervise`): `ctr task kill --all -s SIGKILL <id>`, then `ctr run` is
//! given a moment to return; the teardown then runs `ctr task delete --force` and
//! `ctr container delete` for whatever is left, and verifies.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{
    find_program, housekeep, list_ids, require, run_bounded, Ran, RuntimeCommand, Version, Waiter,
    HOUSEKEEPING,
};
use super::{RunCtx, Runtime, RuntimeFacts};
use crate::bundle::Flavor;
use crate::error::{LaunchError, Result};
use crate::host::{self, Signal};

/// The production runtime type: Kata Containers.
pub const KATA: &str = "io.containerd.kata.v2";
/// runc's shim v2: the same containerd path without a VM (tests only).
pub const RUNC: &str = "io.containerd.runc.v2";

/// How the launcher reaches containerd.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// The containerd namespace the launcher's containers live in (all of them are
    /// the launcher's: stale ones are removed at start-up).
    pub namespace: String,
    /// Shim v2 runtime type.
    pub runtime_type: String,
    /// The `ctr` program.
    pub ctr: PathBuf,
}

impl ContainerdConfig {
    /// Kata through the containerd at `address`.
    pub fn kata(address: impl Into<PathBuf>) -> ContainerdConfig {
        ContainerdConfig {
            address: address.into(),
            namespace: "capsule-gateway".into(),
            runtime_type: KATA.into(),
            ctr: PathBuf::from("ctr"),
        }
    }

    /// The same path through runc's shim, where Kata is not installed. runc is a
    /// container runtime, not a sandbox: use it to test the containerd path only.
    pub fn runc_for_tests(address: impl Into<PathBuf>) -> ContainerdConfig {
        ContainerdConfig {
            runtime_type: RUNC.into(),
            ..ContainerdConfig::kata(address)
        }
    }
}

/// The shim binary containerd looks for: `io.containerd.kata.v2` →
/// `containerd-shim-kata-v2`.
pub fn shim_binary(runtime_type: &str) -> String {
    let parts: Vec<&str> = runtime_type.split('.').collect();
    match parts.as_slice() {
        [.., name, version] => format!("containerd-shim-{name}-{version}"),
        _ => runtime_type.to_string(),
    }
}

#[derive(Debug)]
pub(crate) struct Containerd {
    ctr: PathBuf,
    config: ContainerdConfig,
    version: Version,
}

impl Containerd {
    pub(crate) fn new(config: &ContainerdConfig) -> Result<Containerd> {
        let ctr = require(&config.ctr, "ctr", "containerd")?;
        let shim = shim_binary(&config.runtime_type);
        if find_program(Path::new(&shim)).is_none() {
            return Err(LaunchError::ShimMissing {
                runtime_type: config.runtime_type.clone(),
                hint: if config.runtime_type == KATA {
                    "Kata Containers is not packaged in Debian 12; install it from the Kata \
                     Containers release (kata-containers) or use --runtime runsc"
                } else if config.runtime_type == RUNC {
                    "install the Debian package `containerd`"
                } else {
                    "install the shim for this runtime type"
                },
                shim,
            });
        }
        Ok(Containerd {
            version: Version::ask(&ctr, "--version"),
            ctr,
            config: config.clone(),
        })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.ctr);
        c.arg("--address")
            .arg(&self.config.address)
            .arg("--namespace")
            .arg(&self.config.namespace);
        c
    }

    fn ids(&self, what: &str) -> Result<Vec<String>> {
        list_ids(
            "containerd",
            &format!("ctr {what} list"),
            self.cmd().args([what, "list", "--quiet"]),
        )
    }

    fn containers(&self) -> Result<Vec<String>> {
        self.ids("containers")
    }

    fn tasks(&self) -> Result<Vec<String>> {
        self.ids("tasks")
    }

    fn task_running(&self, container_id: &str) -> Result<bool> {
        let r = run_bounded(self.cmd().args(["task", "list"]), HOUSEKEEPING)?;
        Ok(r.stdout.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.first() == Some(&container_id) && cols.get(2) == Some(&"RUNNING")
        }))
    }

    /// A `ctr` delete (`task delete --force`, `container delete`) of one container.
    fn delete(&self, what: &'static str, args: &[&str], container_id: &str) -> RuntimeCommand {
        let mut cmd = self.cmd();
        cmd.args(args).arg(container_id);
        RuntimeCommand::new(what, cmd)
    }
}

/// A delete that finds nothing to delete did its job.
fn deleted(r: &Ran) -> bool {
    r.ok || r.stderr.contains("not found")
}

impl Runtime for Containerd {
    fn kind(&self) -> &'static str {
        "containerd"
    }

    fn flavor(&self) -> Flavor {
        Flavor::Containerd
    }

    /// runc loads the filter into the host kernel before it execs the process; Kata's
    /// agent loads it into the guest kernel.
    fn seccomp_enforcer(&self) -> Option<&'static str> {
        if self.config.runtime_type == KATA {
            Some("kata-guest")
        } else if crate::profiles::kernel_seccomp() {
            Some("kernel")
        } else {
            None
        }
    }

    fn facts(&self) -> RuntimeFacts {
        RuntimeFacts {
            kind: "containerd".into(),
            platform: None,
            runtime_type: Some(self.config.runtime_type.clone()),
            version: self.version.get(),
            network: "none".into(),
        }
    }

    /// `ctr run --rm`, attached: it relays the container's stdout and stderr and
    /// exits with its status.
    fn start(&self, ctx: &RunCtx<'_>) -> RuntimeCommand {
        let config = ctx.bundle_dir.join("config.json");
        let mut cmd = self.cmd();
        cmd.arg("run")
            .arg("--rm")
            .arg("--config")
            .arg(&config)
            .arg("--runtime")
            .arg(&self.config.runtime_type)
            .arg(ctx.container_id);
        RuntimeCommand::new("ctr run", cmd)
    }

    fn kill(&self, container_id: &str) -> RuntimeCommand {
        let mut cmd = self.cmd();
        cmd.args(["task", "kill", "--all", "--signal", "SIGKILL"])
            .arg(container_id);
        RuntimeCommand::new("ctr task kill", cmd)
    }

    /// Kills and deletes the task and the container; a missing one is not an error.
    fn remove(&self, container_id: &str) -> Vec<String> {
        let mut notes = Vec::new();
        if self
            .tasks()
            .map(|t| t.iter().any(|c| c == container_id))
            .unwrap_or(true)
        {
            // A failed kill shows in the forced delete that follows.
            let _ = housekeep(self.kill(container_id), |r| r.ok);
            // Give the shim a moment to reap before the forced delete.
            host::poll_until(Duration::from_secs(5), || {
                !self.task_running(container_id).unwrap_or(false)
            });
            notes.extend(housekeep(
                self.delete(
                    "ctr task delete",
                    &["task", "delete", "--force"],
                    container_id,
                ),
                deleted,
            ));
        }
        if self
            .containers()
            .map(|c| c.iter().any(|c| c == container_id))
            .unwrap_or(true)
        {
            notes.extend(housekeep(
                self.delete(
                    "ctr container delete",
                    &["container", "delete"],
                    container_id,
                ),
                deleted,
            ));
        }
        notes
    }

    /// Every container in the launcher's namespace.
    fn list(&self) -> Result<Vec<String>> {
        let mut all = self.containers()?;
        for t in self.tasks()? {
            if !all.contains(&t) {
                all.push(t);
            }
        }
        Ok(all)
    }

    /// Whether the container or its task is still in containerd's lists.
    fn listed(&self, container_id: &str) -> Result<bool> {
        Ok(self.containers()?.iter().any(|c| c == container_id)
            || self.tasks()?.iter().any(|c| c == container_id))
    }
}

/// A containerd started for the launcher (or a test): its own root, state and
/// socket under one directory, so it shares nothing with a system containerd. It
/// is stopped when dropped. A containerd left running by a crashed earlier owner of
/// the same directory is stopped first; the new one picks up the old one's shims
/// (containerd reconnects to running shims from its state), and the launcher's
/// start-up cleanup then removes their containers.
#[derive(Debug)]
pub struct PrivateContainerd {
    dir: PathBuf,
    address: PathBuf,
    child: Option<Child>,
}

const PID_FILE: &str = "containerd.pid";
const CONFIG_FILE: &str = "config.toml";

impl PrivateContainerd {
    pub fn start(dir: &Path) -> Result<PrivateContainerd> {
        let binary = require(Path::new("containerd"), "containerd", "containerd")?;
        std::fs::create_dir_all(dir).map_err(|e| LaunchError::setup("create", dir, e))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| LaunchError::setup("resolve", dir, e))?;
        let address = dir.join("containerd.sock");
        // sun_path holds 108 bytes, and containerd adds `.ttrpc`.
        if address.as_os_str().len() > 100 {
            return Err(LaunchError::SocketPathTooLong { path: address });
        }
        let config_path = dir.join(CONFIG_FILE);
        stop_stale(&dir, &config_path);
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# Only what the shim v2 path needs: no CRI, no image snapshotters besides the default.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = address.display(),
        );
        let mut f = std::fs::File::create(&config_path)
            .map_err(|e| LaunchError::setup("write containerd config", &config_path, e))?;
        f.write_all(config.as_bytes())
            .map_err(|e| LaunchError::setup("write containerd config", &config_path, e))?;
        let log_path = dir.join("containerd.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| LaunchError::setup("create containerd log", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LaunchError::setup("create containerd log", &log_path, e))?;
        let mut cmd = Command::new(&binary);
        cmd.arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(|e| LaunchError::io("spawn", &binary, e))?;
        let pid_path = dir.join(PID_FILE);
        std::fs::write(&pid_path, child.id().to_string())
            .map_err(|e| LaunchError::io("write", &pid_path, e))?;
        let mut me = PrivateContainerd {
            dir,
            address,
            child: Some(child),
        };
        me.wait_ready(Duration::from_secs(60))?;
        Ok(me)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let ctr = require(Path::new("ctr"), "ctr", "containerd")?;
        let end = Instant::now() + limit;
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.join("containerd.log"))
                        .unwrap_or_default();
                    let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                    return Err(LaunchError::Runtime {
                        runtime: "containerd",
                        op: "start".into(),
                        detail: format!("containerd exited ({status}): {tail}"),
                    });
                }
            }
            if self.address.exists() {
                let r = run_bounded(
                    Command::new(&ctr)
                        .arg("--address")
                        .arg(&self.address)
                        .arg("version"),
                    Duration::from_secs(10),
                )?;
                if r.ok {
                    return Ok(());
                }
            }
            if Instant::now() >= end {
                return Err(LaunchError::Runtime {
                    runtime: "containerd",
                    op: "start".into(),
                    detail: format!("not serving on {} after {limit:?}", self.address.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown();
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Some(child) = self.child.take() {
            host::signal(child.id(), Signal::TERM);
            let mut waiter = Waiter::new(child);
            let _ = waiter.finish(Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(self.dir.join(PID_FILE));
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Stops a containerd left running by an earlier owner of `dir`: the pid file names
/// it, and its command line must name this directory's config (a recycled pid is
/// left alone).
fn stop_stale(dir: &Path, config_path: &Path) {
    let Ok(pid) = std::fs::read_to_string(dir.join(PID_FILE)) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<u32>() else {
        return;
    };
    let ours = host::cmdline(pid)
        .is_some_and(|args| args.iter().any(|a| a == &config_path.to_string_lossy()));
    if !ours {
        return;
    }
    host::signal(pid, Signal::TERM);
    if !host::poll_until(Duration::from_secs(10), || host::cmdline(pid).is_none()) {
        host::signal(pid, Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shim_names_follow_containerds_rule() {
        assert_eq!(super::shim_binary(super::KATA), "containerd-shim-kata-v2");
        assert_eq!(super::shim_binary(super::RUNC), "containerd-shim-runc-v2");
    }
}
