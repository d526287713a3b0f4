//! gVisor through `runsc` (Debian package `runsc`).
//!
//! `runsc --root <state>/runsc --network=none --platform=<p> --oci-seccomp run
//! --bundle <b> <id>`: the launcher's own state root (never the system's), no network
//! stack at all for the sandbox, the OCI config's seccomp profile applied by the
//! sentry to the capsule's system calls, and `run` attached, so the container's stdout and stderr are the
//! pipes given to it and its exit status is `runsc run`'s. `runsc run` starts the
//! sandbox and gofer with a parent-death signal, so killing it takes them down too.
//!
//! The hard timeout (`supervise`) covers the whole sandbox lifetime, boot included
//! (a platform that hangs while booting, like `kvm` in a nested VM, times out the
//! same way): on expiry `runsc kill <id> KILL`, then `runsc run` is given a moment
//! to return and is SIGKILLed if it does not; the teardown then deletes what is left
//! (`runsc delete --force <id>`) and verifies.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::{housekeep, list_ids, require, RuntimeCommand, Version};
use super::{RunCtx, Runtime, RuntimeFacts};
use crate::bundle::Flavor;
use crate::error::{LaunchError, Result};

/// How runsc is invoked.
#[derive(Debug, Clone)]
pub struct RunscConfig {
    /// The `runsc` program (found on PATH when it is a bare name).
    pub binary: PathBuf,
    /// gVisor platform: `ptrace` (default; works everywhere), `kvm` (needs
    /// `/dev/kvm`; hangs in nested VMs without nested paging), `systrap` (newer
    /// runsc only).
    pub platform: String,
    /// Where runsc writes its debug logs (`--debug --debug-log=DIR/`), if anywhere.
    pub debug_log_dir: Option<PathBuf>,
    /// See [`crate::danger::runsc_host_network`].
    pub(crate) host_network: bool,
}

impl Default for RunscConfig {
    fn default() -> Self {
        RunscConfig {
            binary: PathBuf::from("runsc"),
            platform: "ptrace".into(),
            debug_log_dir: None,
            host_network: false,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Runsc {
    binary: PathBuf,
    config: RunscConfig,
    root: PathBuf,
    version: Version,
}

impl Runsc {
    /// Checks that runsc is installed; its state lives in `state_dir/runsc`.
    pub(crate) fn new(config: &RunscConfig, state_dir: &Path) -> Result<Runsc> {
        let binary = require(&config.binary, "runsc", "runsc")?;
        let root = state_dir.join("runsc");
        std::fs::create_dir_all(&root)
            .map_err(|e| LaunchError::setup("create runsc root", &root, e))?;
        Ok(Runsc {
            version: Version::ask(&binary, "--version"),
            binary,
            config: config.clone(),
            root,
        })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg(format!("--root={}", self.root.display()));
        c
    }
}

impl Runtime for Runsc {
    fn kind(&self) -> &'static str {
        "runsc"
    }

    fn flavor(&self) -> Flavor {
        Flavor::Runsc
    }

    fn host_network(&self) -> bool {
        self.config.host_network
    }

    /// runsc runs with `--oci-seccomp`: the sentry applies the profile to the
    /// capsule's system calls (without it runsc ignores `linux.seccomp`).
    fn seccomp_enforcer(&self) -> Option<&'static str> {
        Some("gvisor")
    }

    fn facts(&self) -> RuntimeFacts {
        RuntimeFacts {
            kind: "runsc".into(),
            platform: Some(self.config.platform.clone()),
            runtime_type: None,
            version: self.version.get(),
            network: if self.config.host_network {
                "host"
            } else {
                "none"
            }
            .into(),
        }
    }

    /// `runsc run`, attached: its stdout and stderr are the container's and its exit
    /// status is the container's.
    fn start(&self, ctx: &RunCtx<'_>) -> RuntimeCommand {
        let mut cmd = self.cmd();
        // `targets`: the sandbox joins the run's own namespace (its path is in the
        // OCI config) and uses that namespace's kernel network stack
        // (`--network=host` there means the run's namespace, not the host's).
        // gVisor's own stack (`--network=sandbox`) is not used: this runsc
        // (Debian's 20221219) refuses it in every namespace on current kernels,
        // its root-namespace test being the presence of
        // /proc/sys/net/core/rmem_default, which kernels now show in every one.
        // `none`: no network stack at all.
        cmd.arg(if self.config.host_network || ctx.sandbox_network {
            "--network=host"
        } else {
            "--network=none"
        })
        .arg(format!("--platform={}", self.config.platform))
        .arg("--oci-seccomp");
        if let Some(dir) = &self.config.debug_log_dir {
            cmd.arg("--debug")
                .arg(format!("--debug-log={}/", dir.display()));
        }
        cmd.arg("run")
            .arg(format!("--bundle={}", ctx.bundle_dir.display()))
            .arg(ctx.container_id);
        RuntimeCommand::new("runsc run", cmd)
    }

    fn kill(&self, container_id: &str) -> RuntimeCommand {
        let mut cmd = self.cmd();
        cmd.args(["kill", container_id, "KILL"]);
        RuntimeCommand::new("runsc kill", cmd)
    }

    /// `runsc kill` and `runsc delete --force`; returns what went wrong, if anything
    /// (a container that is already gone is not an error).
    fn remove(&self, container_id: &str) -> Vec<String> {
        if !self.listed(container_id).unwrap_or(true) {
            return Vec::new();
        }
        // A failed kill shows in the delete that follows.
        let _ = housekeep(self.kill(container_id), |r| r.ok);
        let mut delete = self.cmd();
        delete.args(["delete", "--force", container_id]);
        housekeep(RuntimeCommand::new("runsc delete", delete), |r| r.ok)
            .into_iter()
            .collect()
    }

    /// Container ids in this launcher's runsc root.
    fn list(&self) -> Result<Vec<String>> {
        list_ids("runsc", "list", self.cmd().args(["list", "--quiet"]))
    }

    /// Files runsc keeps for a container in its root (state file, locks). A
    /// container killed while booting leaves its lock files behind.
    fn state_files(&self, container_id: &str) -> Vec<PathBuf> {
        std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().contains(container_id))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}
