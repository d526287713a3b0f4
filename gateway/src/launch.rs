//! The sandbox, set up and used the same way by `run` and by the service's
//! `/v1/runs`: the launcher for a runtime under the state directory, run ids, and
//! one run of an admitted capsule from launch to its evidence bundle and event.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use sandbox_launcher::{
    ContainerdConfig, Launcher, LauncherConfig, PrivateContainerd, ProbeBinary, RunId, RunscConfig,
    RuntimeConfig, StaleReport,
};
use verify_core::Admitted;

use crate::evidence::{self, Event, EventType, RunData};
use crate::layout::{SandboxDir, StateLayout};
use crate::GatewayError;

/// Which sandbox runs capsules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    /// gVisor, on a runsc platform (`ptrace`, `kvm`).
    Runsc { platform: String },
    /// Kata through containerd's shim v2: an existing containerd socket, or (`None`)
    /// a private containerd under `STATE/containerd`, started here and stopped when
    /// the [`Sandbox`] is dropped.
    Kata { containerd: Option<PathBuf> },
}

/// A launcher ready to run capsules, and the private containerd it may need.
#[derive(Debug)]
pub struct Sandbox {
    // Declared first, dropped first: the launcher goes before its containerd.
    launcher: Launcher,
    _containerd: Option<PrivateContainerd>,
}

impl Sandbox {
    /// Checks that the runtime and the probe are there and removes the sandboxes a
    /// crashed earlier launcher left. A missing runtime is a configuration error,
    /// found before anything is admitted. `output_cap`: bytes of stdout and of
    /// stderr kept (`None`: the launcher's default).
    pub fn start(
        layout: &StateLayout,
        runtime: &Runtime,
        output_cap: Option<usize>,
    ) -> Result<Sandbox, GatewayError> {
        let probe = probe_binary()?;
        let (containerd, config, dir) = match runtime {
            Runtime::Runsc { platform } => {
                let mut c = RunscConfig::default();
                c.platform = platform.clone();
                (
                    None,
                    RuntimeConfig::Runsc(c),
                    layout.sandbox(SandboxDir::Runsc),
                )
            }
            Runtime::Kata { containerd } => {
                let (private, address) = match containerd {
                    Some(a) => (None, a.clone()),
                    None => {
                        let c = PrivateContainerd::start(&layout.containerd())
                            .map_err(GatewayError::SandboxSetup)?;
                        let address = c.address().to_path_buf();
                        (Some(c), address)
                    }
                };
                (
                    private,
                    RuntimeConfig::Containerd(ContainerdConfig::kata(address)),
                    layout.sandbox(SandboxDir::Kata),
                )
            }
        };
        let mut config = LauncherConfig::new(dir, config, probe);
        if let Some(cap) = output_cap {
            config.output_cap_bytes = cap;
        }
        let launcher = Launcher::new(config).map_err(GatewayError::SandboxSetup)?;
        Ok(Sandbox {
            launcher,
            _containerd: containerd,
        })
    }

    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }

    /// Sandboxes of a crashed earlier run that [`Sandbox::start`] removed.
    pub fn stale_cleaned(&self) -> &[StaleReport] {
        self.launcher.stale_cleaned()
    }
}

/// This executable as the sandbox's egress probe (`capsule-gateway sandbox-probe`).
pub fn probe_binary() -> Result<ProbeBinary, GatewayError> {
    let exe = std::env::current_exe().map_err(|e| GatewayError::io("<current executable>", e))?;
    Ok(ProbeBinary {
        path: exe,
        args: vec!["sandbox-probe".into()],
    })
}

/// A fresh run id (also the id of a denial's event).
pub fn new_run_id() -> Result<RunId, GatewayError> {
    RunId::new().map_err(GatewayError::Sandbox)
}

/// Launches an admitted capsule under `run_id`, writes its evidence bundle under
/// `evidence_root` and returns its event: `completed` (the capsule ran), or
/// `failed` (the run cannot be vouched for: the sandbox did not start, egress was
/// not proven blocked, teardown was incomplete, or `cancel` was raised).
pub fn execute(
    launcher: &Launcher,
    run_id: &RunId,
    admitted: &Admitted,
    source: &str,
    evidence_root: &Path,
    cancel: &AtomicBool,
    stale: Vec<StaleReport>,
) -> Result<Event, GatewayError> {
    let outcome = launcher.launch_as(admitted, run_id, cancel);
    let (kind, report, error) = match &outcome {
        Ok(report) if report.interrupted => (
            EventType::Failed,
            Some(report),
            Some("interrupted: the gateway was asked to stop".to_string()),
        ),
        Ok(report) => (EventType::Completed, Some(report), None),
        Err(e) => (EventType::Failed, e.report(), Some(e.to_string())),
    };
    let bundle_dir = evidence_root.join(run_id.as_str());
    let data = RunData::new(admitted, run_id, report, error, stale, &bundle_dir);
    let event = Event::run(kind, source, data, chrono::Utc::now());
    evidence::write_bundle(evidence_root, run_id, admitted, report, &event)?;
    Ok(event)
}
