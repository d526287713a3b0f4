//! `/v1/runs`: an admitted capsule is launched in the sandbox on a blocking thread,
//! exactly as `capsule-gateway run` launches it (`cli::run::execute`), and its run id
//! is answered at once. While it runs its status lives in memory; once it is done the
//! evidence bundle on disk (`STATE/evidence/<run id>/event.json`) is the status, so
//! finished runs cost no memory and survive a restart.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sandbox_launcher::{Launcher, LauncherConfig, RunId, RunscConfig, RuntimeConfig};
use serde_json::Value;
use verify_core::{Admitted, SpiffeId};

use super::config::{RunsConfig, RunsRuntime};
use crate::cli::run::{execute, launch_config_error, probe_binary, TYPE_COMPLETED};
use crate::GatewayError;

#[derive(Debug)]
pub struct Runs {
    launcher: Arc<Launcher>,
    evidence: PathBuf,
    running: Arc<Mutex<HashSet<RunId>>>,
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
    Unknown,
    Running,
    Done { status: &'static str, event: Value },
    Unreadable(String),
}

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
    ) -> Result<RunId, GatewayError> {
        let id = RunId::new().map_err(launch_config_error)?;
        self.running
            .lock()
            .map_err(|_| GatewayError::Usage("runs: lock poisoned".into()))?
            .insert(id.clone());
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
                if let Err(e) = execute(
                    &launcher,
                    &run_id,
                    &admitted,
                    &source,
                    &evidence,
                    &cancel,
                    Vec::new(),
                ) {
                    eprintln!("capsule-gateway: run {}: {e}", run_id.as_str());
                }
                if let Ok(mut r) = running.lock() {
                    r.remove(&run_id);
                }
            })
            .map_err(|e| GatewayError::io("<run thread>", e))?;
        Ok(id)
    }

    pub fn status(&self, id: &str) -> RunStatus {
        let Some(id) = RunId::parse(id) else {
            return RunStatus::Unknown;
        };
        if self
            .running
            .lock()
            .map(|r| r.contains(&id))
            .unwrap_or(false)
        {
            return RunStatus::Running;
        }
        let path = self.evidence.join(id.as_str()).join("event.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return RunStatus::Unknown,
            Err(e) => return RunStatus::Unreadable(format!("{}: {e}", path.display())),
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(event) => {
                let status = if event["type"] == TYPE_COMPLETED {
                    "completed"
                } else {
                    "failed"
                };
                RunStatus::Done { status, event }
            }
            Err(e) => RunStatus::Unreadable(format!("{}: {e}", path.display())),
        }
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
