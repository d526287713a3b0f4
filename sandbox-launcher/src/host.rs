//! A run's traces on the host, seen from outside every runtime: the names they carry
//! (container id, cgroup path), the processes and cgroups found by those names in
//! `/proc` and `/sys/fs/cgroup`, and signals sent by pid.
//!
//! The runtimes (to stop a containerd they left) and the teardown (to find and kill
//! what a runtime left) both read the host through this module; it depends on
//! nothing else in the crate.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;

/// Prefix of every container id the launcher creates.
pub const CONTAINER_PREFIX: &str = "capsule-";
/// Parent of every run's cgroup.
pub const CGROUP_PARENT: &str = "capsule-gateway";

/// The container id of a run.
pub fn container_id(run_id: &str) -> String {
    format!("{CONTAINER_PREFIX}{run_id}")
}

/// The cgroup path of a run's container (relative to each hierarchy's root).
pub fn cgroups_path(container_id: &str) -> String {
    format!("/{CGROUP_PARENT}/{container_id}")
}

/// Sends `signal` to one process by id (a child of ours, or one found by its unique
/// run id). A process that is already gone is not an error: the callers verify
/// what is left afterwards.
pub fn signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// A process's command line, `None` if it is gone (or a zombie, which has none).
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Host processes of a run: named by it on their command line, or in its cgroup.
pub fn processes_of(run_id: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let args = cmdline(pid);
        let named = args
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x.contains(run_id)));
        let in_cgroup =
            fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(run_id));
        // A zombie has no command line and holds nothing but its pid.
        if (named || in_cgroup) && args.is_some() {
            let what = args
                .map(|a| a.iter().take(3).cloned().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            out.push((pid, what.chars().take(160).collect()));
        }
    }
    out
}

/// Existing cgroup directories of a container, in every mounted hierarchy (cgroup v1
/// controllers under `/sys/fs/cgroup/<controller>`, or the v2 unified tree).
pub fn cgroup_dirs(container_id: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![base.join(CGROUP_PARENT).join(container_id)];
    if let Ok(rd) = fs::read_dir(base) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                candidates.push(e.path().join(CGROUP_PARENT).join(container_id));
            }
        }
    }
    candidates.retain(|p| p.exists());
    candidates
}

/// Asks `done` every 50 ms until it holds or `limit` passes; whether it held.
pub(crate) fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
