//! One run of a container, the same for every runtime: start the runtime's
//! attached command, capture its stdout and stderr up to the cap, wait for it
//! against the hard deadline and the cancel flag, and on either the runtime's kill,
//! a moment for the command to return, SIGKILL if it does not. The container itself
//! is removed, and that verified, by the teardown that follows.
//!
//! The deadline covers the sandbox's whole life, boot included: a runtime that
//! hangs while booting (runsc's `kvm` platform in a nested VM) times out the same
//! way.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::process::{capture, exit_code, housekeep, join_capture, RuntimeCommand, Waited, Waiter};
use super::{Output, Runtime};
use crate::error::{LaunchError, Result};

/// How long the attached command gets to return after its container was killed.
const AFTER_KILL: Duration = Duration::from_secs(5);
/// How long the output capture threads get to finish once the command is gone (a
/// process outside the sandbox that still holds a pipe must not hang the launcher).
const COLLECT_GRACE: Duration = Duration::from_secs(5);

/// What a runtime needs for one run.
#[derive(Debug)]
pub(crate) struct RunCtx<'a> {
    pub container_id: &'a str,
    pub bundle_dir: &'a Path,
    pub deadline: Instant,
    pub cancel: &'a AtomicBool,
    pub output_cap: usize,
    /// The sandbox joins the prepared network namespace of its OCI config
    /// (`scope.network = "targets"`; runsc `--network=sandbox`).
    pub sandbox_network: bool,
}

/// How one run ended, as the runtime's command saw it.
#[derive(Debug)]
pub(crate) struct RawOutcome {
    /// The container's exit code (128 + signal when killed); `None` when it was
    /// timed out or interrupted, or its status was lost.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub interrupted: bool,
    pub stdout: Output,
    pub stderr: Output,
    /// What went wrong while stopping the container.
    pub notes: Vec<String>,
}

/// Runs the container to its end, the deadline, or cancellation.
pub(crate) fn supervise(runtime: &dyn Runtime, ctx: &RunCtx<'_>) -> Result<RawOutcome> {
    let RuntimeCommand { what, mut command } = runtime.start(ctx);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group: a Ctrl-C meant for the gateway reaches the launcher,
    // which tears the sandbox down in order, not the runtime directly.
    command.process_group(0);
    let program = PathBuf::from(command.get_program());
    let mut child = command
        .spawn()
        .map_err(|e| LaunchError::io("spawn", &program, e))?;
    let out = child.stdout.take().map(|o| capture(o, ctx.output_cap));
    let err = child.stderr.take().map(|e| capture(e, ctx.output_cap));
    let mut waiter = Waiter::new(child);
    let mut notes = Vec::new();
    let (status, timed_out, interrupted) = match waiter.wait(ctx.deadline, ctx.cancel) {
        Waited::Exited(s) => (Some(s), false, false),
        Waited::Lost => (None, false, false),
        why @ (Waited::TimedOut | Waited::Interrupted) => {
            // A kill that fails is noted and not fatal: a container not created yet
            // (runsc still booting) goes down with the attached command below
            // (runsc gives its sandbox a parent-death signal), and the teardown
            // removes whatever is left.
            notes.extend(housekeep(runtime.kill(ctx.container_id), |r| r.ok));
            let status = waiter.finish(AFTER_KILL);
            if status.is_none() {
                notes.push(format!(
                    "{what} (pid {}) did not return after the kill and was SIGKILLed",
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
    let collect = |h: Option<_>| {
        h.map(|h| join_capture(h, COLLECT_GRACE))
            .unwrap_or_default()
    };
    Ok(RawOutcome {
        exit_code: if timed_out || interrupted {
            None
        } else {
            status.and_then(exit_code)
        },
        timed_out,
        interrupted,
        stdout: collect(out),
        stderr: collect(err),
        notes,
    })
}
