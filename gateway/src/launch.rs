//! The sandbox, set up and used the same way by `run` and by the service's
//! `/v1/runs`: the launcher for a runtime under the state directory, run ids, and
//! one run of an admitted capsule from launch to its evidence bundle and event.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use sandbox_launcher::{
    ContainerdConfig, Launcher, LauncherConfig, PrivateContainerd, ProbeBinary, Rootfs, RunId,
    RunscConfig, RuntimeConfig, StaleReport,
};
use verify_core::{Admitted, Clock, Policy, RootfsRule, Tier};

use crate::evidence::{self, Custody, Event, EventType, RunData};
use crate::layout::{SandboxDir, StateLayout};
use crate::GatewayError;

/// Which sandbox runs capsules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    /// gVisor, on a runsc platform (`ptrace`, `kvm`).
    Runsc { platform: String },
    /// Kata through containerd's shim v2: an existing containerd socket, or (`None`)
    /// a private containerd under `STATE/containerd`, started here and stopped when
    /// the [`Sandbox`] is dropped. `runtime_type` is `io.containerd.kata.v2`
    /// ([`KATA_RUNTIME_TYPE`]); `io.containerd.runc.v2` drives the same path where
    /// Kata is absent (runc is no sandbox: for tests of that path only).
    Kata {
        containerd: Option<PathBuf>,
        runtime_type: String,
    },
}

/// The production shim v2 runtime type of the `kata` tier.
pub const KATA_RUNTIME_TYPE: &str = sandbox_launcher::runtime::containerd::KATA;

impl Runtime {
    /// The sandbox tier this runtime provides (a rule's `tier`).
    pub fn tier(&self) -> Tier {
        match self {
            Runtime::Runsc { .. } => Tier::Gvisor,
            Runtime::Kata { .. } => Tier::Kata,
        }
    }
}

/// Whether this host has the shim of a containerd runtime type on PATH (`kata`
/// counts as a tier of this host only then).
pub fn shim_installed(runtime_type: &str) -> bool {
    let shim = sandbox_launcher::runtime::containerd::shim_binary(runtime_type);
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(&shim).is_file()))
}

/// The tier a capsule's environment's rule names (`tier`), if it names one. Admission
/// already refused (`tier_unavailable`) a tier this host does not provide.
pub fn tier_for(policy: &Policy, admitted: &Admitted) -> Option<Tier> {
    let m = admitted.manifest();
    policy
        .tenants
        .get(&m.tenant)
        .and_then(|t| t.rule_for(&m.scope.environment))
        .and_then(|r| r.tier)
}

/// The root file system a capsule runs on: its tenant's `rootfs` (the base rootfs at
/// `base`, pinned or not, or the host's `/usr` by opt-in).
pub fn rootfs_for(policy: &Policy, admitted: &Admitted, base: &Path) -> Rootfs {
    let rule = policy
        .tenants
        .get(&admitted.manifest().tenant)
        .map(|t| t.rootfs)
        .unwrap_or_default();
    match rule {
        RootfsRule::Base => Rootfs::Dir {
            path: base.to_path_buf(),
            pin: None,
        },
        RootfsRule::Pinned(pin) => Rootfs::Dir {
            path: base.to_path_buf(),
            pin: Some(pin),
        },
        RootfsRule::HostUsr => Rootfs::host_usr(),
    }
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
            Runtime::Kata {
                containerd,
                runtime_type,
            } => {
                let (private, address) = match containerd {
                    Some(a) => (None, a.clone()),
                    None => {
                        let c = PrivateContainerd::start(&layout.containerd())
                            .map_err(GatewayError::SandboxSetup)?;
                        let address = c.address().to_path_buf();
                        (Some(c), address)
                    }
                };
                let mut c = ContainerdConfig::kata(address);
                c.runtime_type = runtime_type.clone();
                (
                    private,
                    RuntimeConfig::Containerd(c),
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

/// An event's time, read from the injected clock (whole seconds, as every time the
/// gateway decides by).
pub fn event_time(clock: &dyn Clock) -> chrono::DateTime<chrono::Utc> {
    let secs = i64::try_from(clock.now_unix()).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// A fresh run id (also the id of a denial's event).
pub fn new_run_id() -> Result<RunId, GatewayError> {
    RunId::new().map_err(GatewayError::Sandbox)
}

/// Where a run's evidence goes and how its event is stamped: the same for `run` and
/// `serve`.
#[derive(Clone, Copy)]
pub struct EvidenceSink<'a> {
    /// Bundles go to `root/RUN_ID/`.
    pub root: &'a Path,
    /// The event's `source` (the runner, or the peer that asked for the run).
    pub source: &'a str,
    /// The event's time.
    pub clock: &'a dyn Clock,
    /// The policy in force (the event's `policydigest`).
    pub policy_digest: &'a verify_core::Sha256Digest,
    /// What signs each bundle's index, and the policy facts it states.
    pub custody: &'a Custody,
}

impl std::fmt::Debug for EvidenceSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvidenceSink")
            .field("root", &self.root)
            .field("source", &self.source)
            .field("custody", &self.custody.signer)
            .finish_non_exhaustive()
    }
}

/// Launches an admitted capsule under `run_id` on `rootfs` ([`rootfs_for`]), writes
/// its evidence bundle under `sink.root` and returns its event: `completed` (the
/// capsule ran), or `failed` (the run cannot be vouched for: the root file system is
/// not the pinned one, the sandbox did not start, egress was not proven blocked,
/// teardown was incomplete, or `cancel` was raised).
pub fn execute(
    launcher: &Launcher,
    run_id: &RunId,
    admitted: &Admitted,
    rootfs: &Rootfs,
    sink: EvidenceSink<'_>,
    cancel: &AtomicBool,
    stale: Vec<StaleReport>,
) -> Result<Event, GatewayError> {
    let EvidenceSink {
        root: evidence_root,
        source,
        clock,
        policy_digest,
        custody,
    } = sink;
    let outcome = launcher.launch_on(admitted, run_id, rootfs, cancel);
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
    let event = Event::run(kind, source, data, policy_digest, event_time(clock));
    evidence::write_bundle(evidence_root, run_id, admitted, report, &event, custody)?;
    Ok(event)
}
