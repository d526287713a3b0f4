//! What a selfcheck runs against: the deployed configuration (`--config gateway.toml`,
//! `--agent-config agent.toml` or the CLI's `--policy ...` flags), resolved once.
//!
//! tiers reads `tiers`; the canary, host and alignment checks read the rest.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::agent::config::{AgentConfig, RuntimeName};
use crate::launch::{Runtime, KATA_RUNTIME_TYPE};
use crate::serve::config::ServeConfig;

/// The deployed configuration a selfcheck proves.
#[derive(Debug)]
pub struct Target<'a> {
    /// The deployed policy file (loaded through the same `load_policy` as admissions).
    pub policy: PathBuf,
    /// The deployed state directory, if any. `serve` passes its open state instead.
    pub state: Option<StateRef<'a>>,
    /// The TPM's TCTI, if one is configured.
    pub tcti: Option<String>,
    /// The sandbox tiers this deployment runs capsules in, with what they need.
    pub tiers: Vec<TierTarget>,
    /// The signed deployment manifest and the key that verifies it (`[selfcheck]`).
    pub alignment: Option<AlignmentTarget>,
    /// Where this deployment's X.509-SVID comes from, if it has one.
    pub svid: Option<SvidSource>,
    /// The gateway binary whose digest the alignment check compares (default: the
    /// running one, `/proc/self/exe`).
    pub binary: Option<PathBuf>,
}

/// The deployed state: a directory the check may open, or the one `serve` holds open.
#[derive(Debug)]
pub enum StateRef<'a> {
    Dir(PathBuf),
    Open(&'a crate::state::State),
}

/// One configured sandbox tier: its runtime and the base rootfs its canary runs on.
#[derive(Debug, Clone)]
pub struct TierTarget {
    pub runtime: Runtime,
    pub rootfs: PathBuf,
}

/// Where the signed deployment manifest is and what verifies it.
#[derive(Debug, Clone)]
pub struct AlignmentTarget {
    pub manifest: PathBuf,
    pub key: PathBuf,
}

/// Where the SVID is read from: the directory `serve`'s `tls.svid_dir` or the agent's
/// `svid` names, or the SPIFFE Workload API endpoint of `tls.workload_api`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidSource {
    Dir(PathBuf),
    WorkloadApi(String),
}

/// `[selfcheck]` of `gateway.toml` and `agent.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SelfcheckConfig {
    /// The signed deployment manifest (`align sign --out`).
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// The public JWK that verifies it.
    #[serde(default)]
    pub manifest_key: Option<PathBuf>,
    /// Seconds between scheduled runs in `serve` and `agent` (at least 1).
    #[serde(default = "default_interval_s")]
    pub interval_s: u64,
    /// `serve` and `agent` run the selfcheck at start and every `interval_s`, and
    /// refuse work while it fails (`/readyz` 503, the agent pauses). Off unless
    /// set: a deployment opts in once its `selfcheck` passes by hand.
    #[serde(default)]
    pub enabled: bool,
}

/// Five minutes: often enough that a broken gate is noticed, rarely enough that the
/// canaries (and tier runs) cost nothing worth measuring.
pub const DEFAULT_INTERVAL_S: u64 = 300;

fn default_interval_s() -> u64 {
    DEFAULT_INTERVAL_S
}

impl Default for SelfcheckConfig {
    fn default() -> SelfcheckConfig {
        SelfcheckConfig {
            manifest: None,
            manifest_key: None,
            interval_s: DEFAULT_INTERVAL_S,
            enabled: false,
        }
    }
}

/// A `[selfcheck]` table that parses but cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelfcheckSettingError {
    #[error("selfcheck: give manifest and manifest_key together")]
    ManifestWithoutKey,
    #[error("selfcheck.interval_s: at least 1")]
    ZeroInterval,
}

impl SelfcheckConfig {
    /// Resolves relative paths against `base` (the config file's directory).
    pub fn resolve(&mut self, base: &Path) {
        for p in [&mut self.manifest, &mut self.manifest_key]
            .into_iter()
            .flatten()
        {
            *p = base.join(&*p);
        }
    }

    pub fn check(&self) -> Result<(), SelfcheckSettingError> {
        if self.manifest.is_some() != self.manifest_key.is_some() {
            return Err(SelfcheckSettingError::ManifestWithoutKey);
        }
        if self.interval_s == 0 {
            return Err(SelfcheckSettingError::ZeroInterval);
        }
        Ok(())
    }

    pub fn alignment(&self) -> Option<AlignmentTarget> {
        match (&self.manifest, &self.manifest_key) {
            (Some(manifest), Some(key)) => Some(AlignmentTarget {
                manifest: manifest.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.interval_s.max(1))
    }
}

/// `capsule-gateway selfcheck --policy P ...`: the deployment described by flags.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub policy: PathBuf,
    pub state: Option<PathBuf>,
    pub tcti: Option<String>,
    pub svid: Option<PathBuf>,
    pub runtimes: Vec<Runtime>,
    /// The base rootfs of the tiers (default: the one install-deps builds).
    pub rootfs: Option<PathBuf>,
    pub alignment: Option<AlignmentTarget>,
    pub binary: Option<PathBuf>,
}

fn base_rootfs() -> PathBuf {
    PathBuf::from(sandbox_launcher::rootfs::BASE_ROOTFS)
}

impl<'a> Target<'a> {
    /// `serve --config`: its policy, its state (`open`, the one `serve` holds, else
    /// the directory), its TPM, SVID, run tiers and `[selfcheck]`.
    pub fn from_serve(config: &ServeConfig, open: Option<&'a crate::state::State>) -> Target<'a> {
        let mut tiers = Vec::new();
        if let Some(runs) = &config.runs {
            tiers.push(TierTarget {
                runtime: match runs.runtime {
                    crate::serve::config::RunsRuntime::Runsc => Runtime::Runsc {
                        platform: runs.platform.clone(),
                    },
                },
                rootfs: runs.rootfs.clone(),
            });
            if let Some(k) = &runs.kata {
                tiers.push(TierTarget {
                    runtime: Runtime::Kata {
                        containerd: k.containerd.clone(),
                        runtime_type: k.runtime_type.clone(),
                    },
                    rootfs: runs.rootfs.clone(),
                });
            }
        }
        let svid = match (&config.tls.svid_dir, &config.tls.workload_api) {
            (Some(dir), _) => Some(SvidSource::Dir(dir.clone())),
            (None, Some(endpoint)) => Some(SvidSource::WorkloadApi(endpoint.clone())),
            (None, None) => None,
        };
        Target {
            policy: config.policy.clone(),
            state: Some(match open {
                Some(s) => StateRef::Open(s),
                None => StateRef::Dir(config.state_dir.clone()),
            }),
            tcti: config.tpm.as_ref().map(|t| t.tcti.clone()),
            tiers,
            alignment: config.selfcheck.alignment(),
            svid,
            binary: None,
        }
    }

    /// `agent --config`: its policy, state, TPM, SVID, runtime (when it runs
    /// capsules) and `[selfcheck]`.
    pub fn from_agent(config: &AgentConfig) -> Target<'static> {
        let tiers = match config.action {
            crate::agent::config::Action::AdmitOnly => Vec::new(),
            crate::agent::config::Action::Run => vec![TierTarget {
                runtime: match config.runtime {
                    RuntimeName::Runsc => Runtime::Runsc {
                        platform: config.platform.clone(),
                    },
                    RuntimeName::Kata => Runtime::Kata {
                        containerd: None,
                        runtime_type: KATA_RUNTIME_TYPE.to_string(),
                    },
                },
                rootfs: base_rootfs(),
            }],
        };
        Target {
            policy: config.policy.clone(),
            state: Some(StateRef::Dir(config.state_dir.clone())),
            tcti: config.tcti.clone(),
            tiers,
            alignment: config.selfcheck.alignment(),
            svid: config.svid.clone().map(SvidSource::Dir),
            binary: None,
        }
    }

    /// `selfcheck --policy P [--state DIR] [--tcti T] [--svid DIR] [--runtime ...]`.
    pub fn from_flags(flags: Flags) -> Target<'static> {
        let rootfs = flags.rootfs.unwrap_or_else(base_rootfs);
        Target {
            policy: flags.policy,
            state: flags.state.map(StateRef::Dir),
            tcti: flags.tcti,
            tiers: flags
                .runtimes
                .into_iter()
                .map(|runtime| TierTarget {
                    runtime,
                    rootfs: rootfs.clone(),
                })
                .collect(),
            alignment: flags.alignment,
            svid: flags.svid.map(SvidSource::Dir),
            binary: flags.binary,
        }
    }
}
