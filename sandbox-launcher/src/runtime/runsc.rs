//! gVisor through `runsc` (Debian package `runsc`).
//!
//! `runsc --root <state>/runsc --network=none --platform=<p> run --bundle <b> <id>`:
//! the launcher's own state root (never the system's), no network stack at all for
//! the sandbox, and `run` attached, so the container's stdout and stderr are the
//! pipes given to it and its exit status is `runsc run`'s. `runsc run` starts the
//! sandbox and gofer with a parent-death signal, so killing it takes them down too.
//!
//! The hard timeout covers the whole sandbox lifetime, boot included (a platform
//! that hangs while booting, like `kvm` in a nested VM, times out the same way):
//! on expiry `runsc kill <id> KILL`, then `runsc run` is given a moment to return
//! and is SIGKILLed if it does not; the teardown then deletes what is left
//! (`runsc delete --force <id>`) and verifies.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{
    capture, exit_code, join_capture, require, run_bounded, RuntimeFacts, Version, Waited, Waiter,
};
use crate::error::{LaunchError, Result};
use crate::{RawOutcome, RunCtx};

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

/// How long a runtime housekeeping command (`kill`, `delete`, `list`) may take.
const HOUSEKEEPING: Duration = Duration::from_secs(30);
/// How long `runsc run` gets to return after its container was killed.
const AFTER_KILL: Duration = Duration::from_secs(5);

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
            .map_err(|e| LaunchError::io("create runsc root", &root, e))?;
        Ok(Runsc {
            version: Version::ask(&binary, "--version"),
            binary,
            config: config.clone(),
            root,
        })
    }

    pub(crate) fn host_network(&self) -> bool {
        self.config.host_network
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg(format!("--root={}", self.root.display()));
        c
    }

    pub(crate) fn facts(&self) -> RuntimeFacts {
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

    /// Runs the container to its end, the deadline, or cancellation; always tries
    /// to delete it afterwards.
    pub(crate) fn run(&self, ctx: &RunCtx<'_>) -> Result<RawOutcome> {
        let mut cmd = self.cmd();
        cmd.arg(if self.config.host_network {
            "--network=host"
        } else {
            "--network=none"
        })
        .arg(format!("--platform={}", self.config.platform));
        if let Some(dir) = &self.config.debug_log_dir {
            cmd.arg("--debug")
                .arg(format!("--debug-log={}/", dir.display()));
        }
        cmd.arg("run")
            .arg(format!("--bundle={}", ctx.bundle_dir.display()))
            .arg(ctx.container_id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group: a Ctrl-C meant for the gateway reaches the launcher,
        // which tears the sandbox down in order, not runsc directly.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .map_err(|e| LaunchError::io("spawn", &self.binary, e))?;
        let out = child.stdout.take().map(|o| capture(o, ctx.output_cap));
        let err = child.stderr.take().map(|e| capture(e, ctx.output_cap));
        let mut waiter = Waiter::new(child);
        let mut notes = Vec::new();
        let (status, timed_out, interrupted) = match waiter.wait(ctx.deadline, ctx.cancel) {
            Waited::Exited(s) => (Some(s), false, false),
            Waited::Lost => (None, false, false),
            why @ (Waited::TimedOut | Waited::Interrupted) => {
                match run_bounded(
                    self.cmd().args(["kill", ctx.container_id, "KILL"]),
                    HOUSEKEEPING,
                ) {
                    Ok(r) if r.ok => {}
                    // Not created yet (still booting): killing `runsc run` below
                    // takes the sandbox down through its parent-death signal.
                    Ok(r) => notes.push(format!("runsc kill: {}", r.stderr.trim())),
                    Err(e) => notes.push(format!("runsc kill: {e}")),
                }
                let status = waiter.finish(AFTER_KILL);
                if status.is_none() {
                    notes.push(format!(
                        "runsc run (pid {}) did not return after the kill and was SIGKILLed",
                        waiter.pid()
                    ));
                }
                (
                    status,
                    matches!(why, Waited::TimedOut),
                    matches!(why, Waited::Interrupted),
                )
            }
        };
        // The container itself is removed (and that verified) by the teardown.
        let grace = Duration::from_secs(5);
        Ok(RawOutcome {
            exit_code: if timed_out || interrupted {
                None
            } else {
                status.and_then(exit_code)
            },
            timed_out,
            interrupted,
            stdout: out.map(|h| join_capture(h, grace)).unwrap_or_default(),
            stderr: err.map(|h| join_capture(h, grace)).unwrap_or_default(),
            notes,
        })
    }

    /// `runsc kill` and `runsc delete --force`; returns what went wrong, if anything
    /// (a container that is already gone is not an error).
    pub(crate) fn remove(&self, container_id: &str) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.listed(container_id).unwrap_or(true) {
            return notes;
        }
        let _ = run_bounded(
            self.cmd().args(["kill", container_id, "KILL"]),
            HOUSEKEEPING,
        );
        match run_bounded(
            self.cmd().args(["delete", "--force", container_id]),
            HOUSEKEEPING,
        ) {
            Ok(r) if r.ok => {}
            Ok(r) => notes.push(format!("runsc delete: {}", r.stderr.trim())),
            Err(e) => notes.push(format!("runsc delete: {e}")),
        }
        notes
    }

    /// Container ids in this launcher's runsc root.
    pub(crate) fn list(&self) -> Result<Vec<String>> {
        let r = run_bounded(self.cmd().args(["list", "--quiet"]), HOUSEKEEPING)?;
        if !r.ok {
            return Err(LaunchError::Runtime {
                runtime: "runsc",
                op: "list".into(),
                detail: r.stderr.trim().to_string(),
            });
        }
        Ok(r.stdout
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    pub(crate) fn listed(&self, container_id: &str) -> Result<bool> {
        Ok(self.list()?.iter().any(|c| c == container_id))
    }

    /// Files runsc keeps for a container in its root (state file, locks). A
    /// container killed while booting leaves its lock files behind.
    pub(crate) fn state_files(&self, container_id: &str) -> Vec<PathBuf> {
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
