//! `/v1/runs`: an admitted capsule is launched in the sandbox on a blocking thread,
//! exactly as `capsule-gateway run` launches it (`cli::run::execute`), and its run id
//! is answered at once. While it runs its status lives in memory; once it is done the
//! evidence bundle on disk (`STATE/evidence/<run id>/event.json`) is the status, so
//! finished runs cost no memory and survive a restart.
//!
//! A run belongs to the peer that started it: its SPIFFE ID is the event's `source`
//! (in memory while it runs, in the bundle's `event.json` after), and any other peer
//! is told exactly what an unknown id gets.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sandbox_launcher::{Launcher, LauncherConfig, RunId, RunscConfig, RuntimeConfig};
use serde_json::Value;
use verify_core::{Admitted, SpiffeId};

use super::config::{RunsConfig, RunsRuntime};
use super::metrics::{Metrics, RunOutcome};
use crate::cli::run::{execute, launch_config_error, probe_binary, TYPE_COMPLETED};
use crate::GatewayError;

#[derive(Debug)]
pub struct Runs {
    launcher: Arc<Launcher>,
    evidence: PathBuf,
    /// Runs under way, with the peer that started each.
    running: Arc<Mutex<HashMap<RunId, String>>>,
    slots: Arc<AtomicUsize>,
    max: usize,
    /// Raised at shutdown: running sandboxes are stopped and torn down in order.
    pub cancel: Arc<AtomicBool>,
}

/// A reserved run slot; released when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub enum RunStatus {
    /// No such run, or not this peer's: the two are told apart by nobody.
    Unknown,
    Running,
    Done {
        status: &'static str,
        event: Value,
    },
}

/// Largest `event.json` read back (stdout and stderr are bounded well below).
const MAX_EVENT_BYTES: u64 = 64 << 20;

impl Runs {
    pub fn start_launcher(
        config: &RunsConfig,
        state: &std::path::Path,
    ) -> Result<Runs, GatewayError> {
        let runtime = match config.runtime {
            RunsRuntime::Runsc => {
                let mut c = RunscConfig::default();
                c.platform = config.platform.clone();
                RuntimeConfig::Runsc(c)
            }
        };
        let dir = state.join("sandbox").join("runsc");
        let launcher = Launcher::new(LauncherConfig::new(dir, runtime, probe_binary()?))
            .map_err(launch_config_error)?;
        Ok(Runs {
            launcher: Arc::new(launcher),
            evidence: state.join("evidence"),
            running: Arc::default(),
            slots: Arc::default(),
            max: config.max_concurrent,
            cancel: Arc::default(),
        })
    }

    /// Reserves a slot, or `None` when `max_concurrent` runs are under way.
    pub fn slot(&self) -> Option<Slot> {
        let taken = self.slots.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.slots.clone());
        (taken < self.max).then_some(slot)
    }

    /// Launches `admitted` on a blocking thread; returns its run id.
    pub fn start(
        &self,
        slot: Slot,
        admitted: Admitted,
        peer: &SpiffeId,
        metrics: Arc<Metrics>,
    ) -> Result<RunId, GatewayError> {
        let id = RunId::new().map_err(launch_config_error)?;
        self.running
            .lock()
            .map_err(|_| GatewayError::Usage("runs: lock poisoned".into()))?
            .insert(id.clone(), peer.to_string());
        let (launcher, evidence, running, cancel) = (
            self.launcher.clone(),
            self.evidence.clone(),
            self.running.clone(),
            self.cancel.clone(),
        );
        let source = peer.to_string();
        let run_id = id.clone();
        std::thread::Builder::new()
            .name(format!("run-{}", &id.as_str()[..8]))
            .spawn(move || {
                let _slot = slot;
                let started = std::time::Instant::now();
                let outcome = match execute(
                    &launcher,
                    &run_id,
                    &admitted,
                    &source,
                    &evidence,
                    &cancel,
                    Vec::new(),
                ) {
                    Ok((event, _)) if event["type"] == TYPE_COMPLETED => RunOutcome::Completed,
                    Ok(_) => RunOutcome::Failed,
                    Err(e) => {
                        tracing::error!(
                            target: "capsule_gateway::runs",
                            run_id = run_id.as_str(),
                            error = %e,
                            "run failed"
                        );
                        RunOutcome::Failed
                    }
                };
                metrics.run(outcome, Some(started.elapsed()));
                if let Ok(mut r) = running.lock() {
                    r.remove(&run_id);
                }
            })
            .map_err(|e| GatewayError::io("<run thread>", e))?;
        Ok(id)
    }

    /// The status of run `id` as `peer` may see it: only the peer that started a run
    /// sees it at all.
    pub fn status(&self, id: &str, peer: &SpiffeId) -> RunStatus {
        let Some(id) = RunId::parse(id) else {
            return RunStatus::Unknown;
        };
        let peer = peer.to_string();
        let running = self
            .running
            .lock()
            .map(|r| r.get(&id).map(|owner| *owner == peer))
            .unwrap_or(None);
        match running {
            Some(true) => return RunStatus::Running,
            Some(false) => return RunStatus::Unknown,
            None => {}
        }
        let dir = self.evidence.join(id.as_str());
        let event = match read_event(&dir) {
            Ok(Some(event)) => event,
            Ok(None) => return RunStatus::Unknown,
            Err(why) => {
                // Whose run this is cannot be told: nobody's, and the reason goes to
                // the operator, not to a peer.
                tracing::error!(
                    target: "capsule_gateway::runs",
                    bundle = %dir.display(),
                    why,
                    "unreadable evidence bundle"
                );
                return RunStatus::Unknown;
            }
        };
        if event["source"].as_str() != Some(peer.as_str()) {
            return RunStatus::Unknown;
        }
        let status = if event["type"] == TYPE_COMPLETED {
            "completed"
        } else {
            "failed"
        };
        RunStatus::Done { status, event }
    }

    /// Waits (up to `limit`) for running sandboxes to stop after `cancel` was raised.
    pub fn drain(&self, limit: std::time::Duration) {
        self.cancel.store(true, Ordering::SeqCst);
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end
            && self.running.lock().map(|r| !r.is_empty()).unwrap_or(false)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// `DIR/event.json`, or `None` when there is no such bundle. Neither the bundle
/// directory nor the file may be a symlink; the file's type is checked on an `O_PATH`
/// descriptor before it is opened for reading (a FIFO or device is never opened).
fn read_event(dir: &std::path::Path) -> Result<Option<Value>, String> {
    use rustix::fs::{fstat, open, openat, FileType, Mode, OFlags};
    let not_found = |e: rustix::io::Errno| e == rustix::io::Errno::NOENT;
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir_fd = match open(dir, flags | OFlags::DIRECTORY, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if not_found(e) => return Ok(None),
        Err(e) => return Err(format!("bundle directory: {e}")),
    };
    let path_fd = match openat(&dir_fd, "event.json", flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if not_found(e) => return Ok(None),
        Err(e) => return Err(format!("event.json: {e}")),
    };
    let st = fstat(&path_fd).map_err(|e| format!("event.json: {e}"))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err("event.json: not a regular file".into());
    }
    // Re-open the very file the O_PATH descriptor names, for reading.
    let proc_path = format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&path_fd)
    );
    let fd = open(
        proc_path.as_str(),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("event.json: {e}"))?;
    let again = fstat(&fd).map_err(|e| format!("event.json: {e}"))?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err("event.json: changed while being opened".into());
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_EVENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("event.json: {e}"))?;
    if bytes.len() as u64 > MAX_EVENT_BYTES {
        return Err(format!("event.json: larger than {MAX_EVENT_BYTES} bytes"));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("event.json: {e}"))
}
