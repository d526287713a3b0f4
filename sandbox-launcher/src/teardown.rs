//! Verified teardown, and the recovery of sandboxes left by a crashed launcher.
//!
//! After every run — exit, failure, timeout, interrupt — the launcher removes the
//! container and then checks from the outside that nothing is left:
//!
//! 1. the container is not in the runtime's list (`runsc list`, `ctr containers/tasks
//!    list`);
//! 2. no host process belongs to it: none whose command line names the run id (the
//!    runsc sandbox, gofer and `runsc run`, the containerd shim) and none in its
//!    cgroup (a runc/Kata container's own processes);
//! 3. its cgroup directories are gone;
//! 4. the runtime's per-container state files are gone;
//! 5. the run directory (staging, bundle, lock) is gone;
//! 6. no network namespace, veth or nftables table of the run is left
//!    (`crate::net`; a `none` run never had one, and the checks say so).
//!
//! Whatever the runtime's own delete left behind is removed first (a process found
//! by the checks above is SIGKILLed by pid; an empty cgroup is removed), and each
//! such action is recorded. The result is a [`TeardownReport`]; a failed check makes
//! the run fail (`LaunchError::RunFailed`), it is never only logged.
//!
//! Crash recovery: each run holds an exclusive `flock` on `runs/<id>/lock` for its
//! whole life; the kernel drops it when the launcher dies, even by SIGKILL. At
//! start-up the launcher takes `runs.lock`, and every run directory whose lock it
//! can take, and every container of its runtime with the launcher's id prefix whose
//! run is not live, is torn down and verified the same way.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::error::{LaunchError, Result};
use crate::host::{self, cgroup_dirs, processes_of, Signal};
// Where they were before `host` existed: part of this module's public API.
pub use crate::host::{cgroups_path, container_id, CGROUP_PARENT, CONTAINER_PREFIX};
use crate::runtime::Runtime;

/// One check of the teardown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The verified teardown of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeardownReport {
    /// Every check passed.
    pub ok: bool,
    pub checks: Vec<Check>,
    /// What had to be removed beyond the runtime's own delete.
    pub actions: Vec<String>,
}

impl TeardownReport {
    pub fn failures(&self) -> String {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A stale sandbox found and removed at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaleReport {
    pub run_id: String,
    pub container_id: String,
    pub teardown: TeardownReport,
}

/// Whether the run had a network of its own (`scope.network = "targets"`): only then
/// are its namespace, veth and nftables table removed and checked. A `none` run has
/// none to leave, and checking nftables needs CAP_NET_ADMIN, which a host that runs
/// only `none` capsules need not grant (the systemd units' capability set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Networked {
    Yes,
    No,
}

impl From<bool> for Networked {
    fn from(had: bool) -> Networked {
        if had {
            Networked::Yes
        } else {
            Networked::No
        }
    }
}

/// Removes everything of one run and verifies that it is gone.
pub(crate) fn teardown(
    runtime: &dyn Runtime,
    run_id: &str,
    container_id: &str,
    run_dir: &Path,
    network: Networked,
    mut actions: Vec<String>,
) -> TeardownReport {
    // 1. The runtime's own removal (idempotent: a gone container is skipped).
    actions.extend(runtime.remove(container_id));
    // 2. Processes the runtime left: SIGKILL by pid, then wait for them to go.
    let left = wait_gone(run_id, Duration::from_secs(2));
    for (pid, what) in &left {
        host::signal(*pid, Signal::KILL);
        actions.push(format!("killed leftover process {pid} ({what})"));
    }
    if !left.is_empty() {
        wait_gone(run_id, Duration::from_secs(10));
    }
    // 3. Empty cgroups the runtime left.
    for dir in cgroup_dirs(container_id) {
        if fs::remove_dir(&dir).is_ok() {
            actions.push(format!("removed cgroup {}", dir.display()));
        }
    }
    // 4. Runtime state files (a container killed while booting leaves its locks).
    for f in runtime.state_files(container_id) {
        if fs::remove_file(&f).is_ok() || fs::remove_dir_all(&f).is_ok() {
            actions.push(format!("removed runtime state {}", f.display()));
        }
    }
    // The run's network (`targets`), found by its names: namespace, veth, table.
    if network == Networked::Yes {
        actions.extend(crate::net::remove(run_id));
    }
    // 5. The run directory: staging, bundle, lock.
    if run_dir.exists() {
        if let Err(e) = remove_tree(run_dir) {
            actions.push(format!("removing {}: {e}", run_dir.display()));
        }
    }
    verify(runtime, run_id, container_id, run_dir, network, actions)
}

/// The checks alone, from the outside.
pub(crate) fn verify(
    runtime: &dyn Runtime,
    run_id: &str,
    container_id: &str,
    run_dir: &Path,
    network: Networked,
    actions: Vec<String>,
) -> TeardownReport {
    let mut checks = Vec::new();
    checks.push(match runtime.listed(container_id) {
        Ok(false) => Check {
            name: "runtime_list".into(),
            ok: true,
            detail: format!("{container_id} is not in the {} list", runtime.kind()),
        },
        Ok(true) => Check {
            name: "runtime_list".into(),
            ok: false,
            detail: format!("{container_id} is still in the {} list", runtime.kind()),
        },
        Err(e) => Check {
            name: "runtime_list".into(),
            ok: false,
            detail: format!("cannot list containers: {e}"),
        },
    });
    let procs = processes_of(run_id);
    checks.push(nothing_left(
        "processes",
        procs.iter().map(|(pid, what)| format!("{pid} ({what})")),
        "no host process names the run or is in its cgroup",
    ));
    checks.push(nothing_left(
        "cgroups",
        cgroup_dirs(container_id)
            .iter()
            .map(|d| d.display().to_string()),
        "no cgroup of the container is left",
    ));
    checks.push(nothing_left(
        "runtime_state",
        runtime
            .state_files(container_id)
            .iter()
            .map(|d| d.display().to_string()),
        "no runtime state file of the container is left",
    ));
    let dir_gone = !run_dir.exists();
    checks.push(Check {
        name: "run_directory".into(),
        ok: dir_gone,
        detail: format!(
            "{} {}",
            run_dir.display(),
            if dir_gone { "removed" } else { "still exists" }
        ),
    });
    if network == Networked::Yes {
        checks.extend(crate::net::verify(run_id));
    }
    TeardownReport {
        ok: checks.iter().all(|c| c.ok),
        checks,
        actions,
    }
}

/// A check that passes when nothing is `left`; it fails naming each thing left.
fn nothing_left(name: &'static str, left: impl Iterator<Item = String>, none_left: &str) -> Check {
    let left: Vec<String> = left.collect();
    Check {
        name: name.into(),
        ok: left.is_empty(),
        detail: if left.is_empty() {
            none_left.into()
        } else {
            left.join(", ")
        },
    }
}

/// Removes a tree whose directories were made read-only.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in walk_dirs(dir) {
        let _ = fs::set_permissions(&entry, fs::Permissions::from_mode(0o700));
    }
    fs::remove_dir_all(dir)
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Polls until no process of the run is left or `limit` passes; returns what is left.
fn wait_gone(run_id: &str, limit: Duration) -> Vec<(u32, String)> {
    let mut left = Vec::new();
    host::poll_until(limit, || {
        left = processes_of(run_id);
        left.is_empty()
    });
    left
}

/// An exclusive `flock`, held as long as the file is open.
#[derive(Debug)]
pub(crate) struct Lock {
    _file: File,
}

impl Lock {
    fn open(path: &Path) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| LaunchError::io("open lock", path, e))
    }

    /// Blocks until the lock is ours.
    pub(crate) fn acquire(path: &Path) -> Result<Lock> {
        let file = Lock::open(path)?;
        rustix::fs::flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| LaunchError::io("lock", path, e.into()))?;
        Ok(Lock { _file: file })
    }

    /// The lock, or `None` if a live process holds it.
    pub(crate) fn try_acquire(path: &Path) -> Result<Option<Lock>> {
        let file = Lock::open(path)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Lock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(LaunchError::io("lock", path, e.into())),
        }
    }
}

/// Finds and removes every sandbox of this launcher whose run is not live.
pub(crate) fn recover_stale(runtime: &dyn Runtime, state_dir: &Path) -> Result<Vec<StaleReport>> {
    let runs = state_dir.join("runs");
    let _guard = Lock::acquire(&state_dir.join("runs.lock"))?;
    let mut stale: Vec<(String, Option<Lock>)> = Vec::new();
    let mut live = Vec::new();
    if let Ok(rd) = fs::read_dir(&runs) {
        for e in rd.flatten() {
            let run_id = e.file_name().to_string_lossy().into_owned();
            match Lock::try_acquire(&e.path().join("lock"))? {
                Some(lock) => stale.push((run_id, Some(lock))),
                None => live.push(run_id),
            }
        }
    }
    // Containers whose run directory is already gone (a crash during teardown).
    for cid in runtime.list()? {
        if let Some(run_id) = cid.strip_prefix(CONTAINER_PREFIX) {
            if !live.iter().any(|l| l == run_id) && !stale.iter().any(|(s, _)| s == run_id) {
                stale.push((run_id.to_string(), None));
            }
        }
    }
    let mut out = Vec::new();
    for (run_id, lock) in stale {
        let cid = container_id(&run_id);
        // A crashed run's network, if it had one, is the start-up sweep's
        // (`net::recover_stale`); its checks run here only where a trace is left.
        let network = Networked::from(crate::net::has_traces(&run_id));
        let report = teardown(
            runtime,
            &run_id,
            &cid,
            &runs.join(&run_id),
            network,
            Vec::new(),
        );
        drop(lock);
        if !report.ok {
            return Err(LaunchError::StaleCleanup {
                run_id,
                left: report.failures(),
            });
        }
        out.push(StaleReport {
            run_id,
            container_id: cid,
            teardown: report,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RunId, RunscConfig, RuntimeConfig};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    /// A host process that names the run and that the runtime's own delete does not
    /// know about (a runtime that leaked one): the check sees it, the teardown
    /// SIGKILLs it by pid, says so, and verifies it is gone.
    #[test]
    fn a_process_the_runtime_left_behind_is_found_killed_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime =
            crate::runtime::open(&RuntimeConfig::Runsc(RunscConfig::default()), dir.path())
                .unwrap_or_else(|e| panic!("runsc (Debian package `runsc`): {e}"));
        let run_id = RunId::new().expect("run id");
        let run_id = run_id.as_str();
        let container = container_id(run_id);
        let run_dir = dir.path().join("runs").join(run_id);
        fs::create_dir_all(run_dir.join("staging")).expect("run dir");
        // `exec -a` puts the container id in the process's command line, as the
        // runtime's own processes (runsc-sandbox, gofer, shim) have it.
        let mut stray = Command::new("bash")
            .args(["-c", "exec -a \"$0\" sleep 300", &container])
            .spawn()
            .expect("bash (Debian package `bash`)");
        let pid = stray.id();
        let seen = host::poll_until(Duration::from_secs(5), || {
            processes_of(run_id).iter().any(|(p, _)| *p == pid)
        });
        assert!(seen, "the stray process never showed up in /proc");

        let before = verify(
            &*runtime,
            run_id,
            &container,
            &run_dir,
            Networked::No,
            Vec::new(),
        );
        assert!(!before.ok, "{before:?}");
        let procs = before
            .checks
            .iter()
            .find(|c| c.name == "processes")
            .expect("check");
        assert!(
            !procs.ok && procs.detail.contains(&pid.to_string()),
            "{procs:?}"
        );

        let after = teardown(
            &*runtime,
            run_id,
            &container,
            &run_dir,
            Networked::No,
            Vec::new(),
        );
        assert!(after.ok, "{}", after.failures());
        assert!(
            after
                .actions
                .iter()
                .any(|a| a.starts_with(&format!("killed leftover process {pid} "))),
            "{:?}",
            after.actions
        );
        let status = stray.wait().expect("reap");
        assert_eq!(status.signal(), Some(9), "{status:?}");
        assert!(!run_dir.exists());
    }
}
