//! sandbox-launcher: runs an admitted capsule inside gVisor (runsc) or Kata
//! (containerd shim v2), and nothing else.
//!
//! The only way in is [`Launcher::launch`], which takes a [`verify_core::Admitted`]:
//! a value only verify-core can build, after every admission check passed. There is
//! no API that launches a path, a manifest or a JWS. Forging one does not compile:
//!
//! ```compile_fail,E0451
//! fn forge(m: verify_core::Manifest) -> verify_core::Admitted {
//!     verify_core::Admitted { manifest: std::sync::Arc::new(m) }
//! }
//! ```
//!
//! One run, in order (each step in its module):
//! 1. [`stage`]: copy every admitted file into a launcher-owned directory while
//!    hashing it; a byte that differs from what was admitted stops the run here.
//! 2. [`bundle`]: the root file system's tree digest checked against its pin
//!    ([`rootfs`]), then the OCI config (read-only root, `/capsule` read-only, tmpfs
//!    `/tmp`, uid 65534, no capabilities, `noNewPrivileges`, empty network namespace,
//!    the manifest's limits and env, the seccomp profile and AppArmor name of
//!    [`profiles`]).
//! 3. [`net`] (`scope.network = "targets"` only): resolve the targets on the host,
//!    make the run's namespace, veth pair and nftables table.
//! 4. [`probe`]: open a listener on host loopback (`targets`: on the veth's host
//!    side); the probe inside the sandbox must fail to reach it, and reach every
//!    declared target, before the entrypoint runs.
//! 5. [`runtime`]: run under runsc or containerd with a hard timeout; capture
//!    stdout/stderr up to a cap.
//! 6. [`teardown`]: remove the container (and the run's network) and verify from
//!    the outside that nothing of it is left.
//!
//! A run that happened but cannot be vouched for (egress not proven blocked,
//! teardown incomplete) is an error carrying its [`RunReport`]. Every error says
//! whether it is a configuration error or a run failure ([`LaunchError::kind`]).
//!
//! Layers. Each module uses only those below it:
//!
//! | layer | modules | uses |
//! |---|---|---|
//! | the run, in order | this file ([`Launcher`]) | everything below |
//! | removal and recovery | [`teardown`] | `runtime` (its `Runtime` interface), `net`, `host` |
//! | scoped egress | [`net`] (`resolve`, `link`, `nft`) | `teardown` (its locks and checks), `runtime::process` (bounded commands), `host` |
//! | the sandbox runtimes | [`runtime`] (`supervise`, `runsc`, `containerd`, `process`) | `bundle` (its `Flavor`), `host` |
//! | the run's inputs | [`stage`], [`bundle`], [`probe`] | `bundle` uses [`rootfs`], [`profiles`] |
//! | root file system, security profiles | [`rootfs`] (tree digest), [`profiles`] (seccomp as data, AppArmor) | — |
//! | the host seen from outside | [`host`] (names of a run's traces, `/proc`, cgroups, signals) | — |
//! | errors | [`error`] | — |
//!
//! All but `host` use [`error`]; [`error`] refers back to this file only for the
//! [`RunReport`] a failed run's error carries, as data.
//!
//! [`RunReport`] and the types in it are the evidence's own schema: owned values,
//! `Serialize` and `Deserialize` (unknown members refused, nullable members
//! required), so the gateway writes and reads them back as they are. The OCI config
//! text is handed over in memory ([`bundle::WrittenBundle`]), never read back.

#![deny(unsafe_code)]

pub mod bundle;
pub mod error;
pub mod host;
pub mod net;
pub mod probe;
pub mod profiles;
pub mod rootfs;
pub mod runtime;
pub mod stage;
pub mod teardown;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize};
use verify_core::Admitted;

use runtime::{RunCtx, Runtime};

pub use bundle::BundleFacts;
pub use error::{BundleError, ErrorKind, LaunchError};
pub use probe::{EgressReport, ProbeReport};
pub use profiles::{AppArmorFacts, ProfileFacts, SeccompFacts};
pub use rootfs::{Rootfs, RootfsFacts};
pub use runtime::containerd::{ContainerdConfig, PrivateContainerd};
pub use runtime::runsc::RunscConfig;
pub use runtime::{Output, RuntimeConfig, RuntimeFacts};
pub use stage::StagedFile;
pub use teardown::{StaleReport, TeardownReport};

use error::Result;

/// The binary that runs as the egress probe, and the arguments that put it in probe
/// mode. The gateway uses its own executable with `["sandbox-probe"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeBinary {
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// Everything a launcher needs.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    /// The launcher's own directory: run directories (staging, bundles), the runsc
    /// root, locks. One directory per runtime; it must not be shared with anything
    /// else.
    pub state_dir: PathBuf,
    pub runtime: RuntimeConfig,
    pub rootfs: Rootfs,
    pub probe: ProbeBinary,
    /// Bytes of stdout and of stderr kept (the rest is counted and dropped).
    pub output_cap_bytes: usize,
    /// Size of the sandbox's `/tmp` tmpfs.
    pub tmp_size_mib: u64,
    /// The private range the veth pairs of `targets` runs are numbered from.
    pub egress_pool: net::Pool,

    /// Leave the seccomp profile out (only via [`danger::without_seccomp`]).
    pub(crate) without_seccomp: bool,
}

impl LauncherConfig {
    pub fn new(state_dir: impl Into<PathBuf>, runtime: RuntimeConfig, probe: ProbeBinary) -> Self {
        LauncherConfig {
            state_dir: state_dir.into(),
            runtime,
            rootfs: Rootfs::default(),
            probe,
            output_cap_bytes: 1 << 20,
            tmp_size_mib: 64,
            egress_pool: net::Pool::default(),

            without_seccomp: false,
        }
    }
}

/// A member that must be present and may be `null` (serde's derive would take a
/// missing `Option` member for `null`): the report types are read back as evidence,
/// and a reader must not fill in what a bundle left out.
pub(crate) fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// Everything the evidence needs about one run. Serialize and Deserialize: the
/// gateway writes its evidence from these types and reads it back into them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunReport {
    pub run_id: String,
    pub container_id: String,
    pub capsule_id: String,
    pub version: u64,
    /// `sha256:<hex>` of the exact JWS bytes.
    pub capsule_digest: String,
    pub runtime: RuntimeFacts,
    /// Unix milliseconds when the sandbox was started.
    pub started_at_ms: u64,
    pub duration_ms: u64,
    /// The capsule's exit code (128 + signal when killed); `None` when it was
    /// timed out or interrupted.
    #[serde(deserialize_with = "nullable")]
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// The launcher was asked to stop (SIGINT/SIGTERM) during the run.
    pub interrupted: bool,
    /// The capsule's stdout (the probe's line removed).
    pub stdout: Output,
    pub stderr: Output,
    pub egress: EgressReport,
    pub teardown: TeardownReport,
    pub bundle: BundleFacts,
    /// The exact `config.json` given to the runtime (its digest is in `bundle`);
    /// written to the evidence as a file of its own.
    #[serde(skip)]
    pub oci_config: String,
    pub staged: Vec<StagedFile>,
    /// What the runtime reported while stopping or deleting the container.
    pub runtime_notes: Vec<String>,
}

/// Launches admitted capsules.
#[derive(Debug)]
pub struct Launcher {
    config: LauncherConfig,
    runtime: Box<dyn Runtime>,
    stale: Vec<StaleReport>,
    /// What the host does with AppArmor, read once at start-up.
    apparmor: profiles::AppArmorHost,
}

impl Launcher {
    /// Checks that the runtime and the probe are there, creates the state directory,
    /// and removes every sandbox a crashed earlier launcher left in it.
    pub fn new(config: LauncherConfig) -> Result<Launcher> {
        let state = &config.state_dir;
        // Run directories hold the staged capsule and its bundle: the launcher's alone.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state.join("runs"))
            .map_err(|e| LaunchError::setup("create state directory", state, e))?;
        let state_dir = state
            .canonicalize()
            .map_err(|e| LaunchError::setup("resolve state directory", state, e))?;
        if !config.probe.path.is_file() {
            return Err(LaunchError::setup(
                "find egress probe",
                &config.probe.path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let runtime = runtime::open(&config.runtime, &state_dir)?;
        let mut stale = teardown::recover_stale(&*runtime, &state_dir)?;
        // Networks of `targets` runs whose launcher died (on this host, any
        // launcher's: a live run holds its lock and is left alone).
        for n in net::recover_stale()? {
            let ok = n.checks.iter().all(|c| c.ok);
            let report = TeardownReport {
                ok,
                checks: n.checks,
                actions: n.actions,
            };
            if !ok {
                return Err(LaunchError::StaleCleanup {
                    run_id: n.run,
                    left: report.failures(),
                });
            }
            stale.push(StaleReport {
                container_id: host::container_id(&n.run),
                run_id: n.run,
                teardown: report,
            });
        }
        Ok(Launcher {
            config: LauncherConfig {
                state_dir,
                ..config
            },
            runtime,
            stale,
            apparmor: profiles::AppArmorHost::detect(),
        })
    }

    /// Sandboxes left by a crashed earlier launcher, removed by [`Launcher::new`].
    pub fn stale_cleaned(&self) -> &[StaleReport] {
        &self.stale
    }

    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    /// Runs an admitted capsule to its end or its timeout.
    pub fn launch(&self, admitted: &Admitted) -> Result<RunReport> {
        self.launch_cancellable(admitted, &AtomicBool::new(false))
    }

    /// Like [`Launcher::launch`]; raising `cancel` (from a SIGINT/SIGTERM handler)
    /// stops the sandbox, tears it down and reports `interrupted`.
    pub fn launch_cancellable(
        &self,
        admitted: &Admitted,
        cancel: &AtomicBool,
    ) -> Result<RunReport> {
        self.launch_as(admitted, &RunId::new()?, cancel)
    }

    /// Like [`Launcher::launch_cancellable`] under a run id chosen beforehand (a
    /// service hands the id out before the run ends).
    pub fn launch_as(
        &self,
        admitted: &Admitted,
        run_id: &RunId,
        cancel: &AtomicBool,
    ) -> Result<RunReport> {
        self.launch_on(admitted, run_id, &self.config.rootfs, cancel)
    }

    /// Like [`Launcher::launch_as`] on the root file system the caller's policy chose
    /// for this capsule's tenant instead of the configured one.
    pub fn launch_on(
        &self,
        admitted: &Admitted,
        run_id: &RunId,
        rootfs: &Rootfs,
        cancel: &AtomicBool,
    ) -> Result<RunReport> {
        let run_id = run_id.as_str().to_string();
        let container_id = host::container_id(&run_id);
        let run_dir = self.config.state_dir.join("runs").join(&run_id);
        // The run directory and its lock appear together, under runs.lock, so that a
        // concurrent start-up never takes a run in the making for a stale one.
        let lock = {
            let _guard = teardown::Lock::acquire(&self.config.state_dir.join("runs.lock"))?;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&run_dir)
                .map_err(|e| LaunchError::io("create run directory", &run_dir, e))?;
            teardown::Lock::acquire(&run_dir.join("lock"))?
        };
        // The run's network (`targets`) and its host-wide lock live until the
        // teardown below has removed them: a sweep by another launcher's start
        // never takes a run being torn down for a dead one.
        let mut network = None;
        let networked = teardown::Networked::from(admitted.manifest().scope.network == "targets");
        let result = self.run_in(
            admitted,
            RunNames {
                run_id: &run_id,
                container_id: &container_id,
                run_dir: &run_dir,
            },
            rootfs,
            cancel,
            &mut network,
        );
        match result {
            Ok(mut report) => {
                report.teardown = teardown::teardown(
                    &*self.runtime,
                    &run_id,
                    &container_id,
                    &run_dir,
                    networked,
                    std::mem::take(&mut report.runtime_notes),
                );
                drop(network);
                drop(lock);
                if !report.teardown.ok {
                    let why = format!("teardown incomplete: {}", report.teardown.failures());
                    return Err(LaunchError::RunFailed {
                        why,
                        report: Box::new(report),
                    });
                }
                if !report.egress.blocked || !report.egress.declared_reached {
                    let why = egress_failure(&report);
                    return Err(LaunchError::RunFailed {
                        why,
                        report: Box::new(report),
                    });
                }
                Ok(report)
            }
            Err(e) => {
                // Nothing may outlive a failed start either.
                let t = teardown::teardown(
                    &*self.runtime,
                    &run_id,
                    &container_id,
                    &run_dir,
                    networked,
                    Vec::new(),
                );
                drop(network);
                drop(lock);
                if !t.ok {
                    return Err(LaunchError::TeardownFailed {
                        run_id,
                        cause: Box::new(e),
                        left: t.failures(),
                    });
                }
                Err(e)
            }
        }
    }

    fn run_in(
        &self,
        admitted: &Admitted,
        run: RunNames<'_>,
        rootfs: &Rootfs,
        cancel: &AtomicBool,
        network: &mut Option<net::Egress>,
    ) -> Result<RunReport> {
        let RunNames {
            run_id,
            container_id,
            run_dir,
        } = run;
        let manifest = admitted.manifest();
        let staged_dir = run_dir.join("staging");
        let staged = stage::stage(admitted, &staged_dir)?;
        *network = self.scoped_egress(admitted, run_id, run_dir)?;
        let egress = &*network;
        let listen_on = egress
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |e| e.host_address());
        let listener = probe::HostListener::open_on(listen_on)
            .map_err(|e| LaunchError::io("open egress listener", listen_on.to_string(), e))?;
        let reach: Vec<std::net::SocketAddr> = egress
            .iter()
            .flat_map(|e| e.tcp_destinations())
            .map(|d| (d.address, d.port).into())
            .collect();
        let bundle_dir = run_dir.join("bundle");
        let cgroups_path = host::cgroups_path(container_id);
        let input = bundle::BundleInput {
            manifest,
            rootfs,
            staged: &staged_dir,
            probe_binary: &self.config.probe.path,
            probe_args: &self.config.probe.args,
            probe_target: listener.addr(),
            tmp_size_mib: self.config.tmp_size_mib,
            cgroups_path: &cgroups_path,
            flavor: self.runtime.flavor(),
            share_host_network: self.runtime.host_network(),
            network: egress.as_ref().map(|e| e.bundle()),
            probe_reach: &reach,

            enforcement: bundle::Enforcement {
                seccomp_by: if self.config.without_seccomp {
                    None
                } else {
                    self.runtime.seccomp_enforcer()
                },
                apparmor: self.apparmor,
            },
        };
        let bundle::WrittenBundle {
            facts: bundle,
            config: oci_config,
        } = bundle::write(&bundle_dir, &input)?;
        let mut facts = self.runtime.facts();
        if egress.is_some() {
            // runsc `--network=host` inside the run's own namespace (see `runsc`).
            facts.network = "host-in-run-netns".into();
        }

        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let start = Instant::now();
        let ctx = RunCtx {
            container_id,
            bundle_dir: &bundle_dir,
            deadline: start + Duration::from_millis(manifest.limits.timeout_ms),
            cancel,
            output_cap: self.config.output_cap_bytes,
            sandbox_network: egress.is_some(),
        };
        let raw = runtime::supervise(&*self.runtime, &ctx)?;
        let duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);

        let (probe_report, rest) = probe::split_report(&raw.stdout.bytes);
        let dropped = raw.stdout.bytes.len() - rest.len();
        let stdout = Output {
            bytes: rest.to_vec(),
            total_bytes: raw.stdout.total_bytes.saturating_sub(dropped as u64),
            truncated: raw.stdout.truncated,
        };
        let egress = match &egress {
            None => listener.verdict(probe_report),
            Some(e) => listener.verdict_scoped(probe_report, e.ledger()?, e.sandbox_address()),
        };
        Ok(RunReport {
            run_id: run_id.to_string(),
            container_id: container_id.to_string(),
            capsule_id: manifest.capsule_id.clone(),
            version: manifest.version,
            capsule_digest: admitted.digest().to_string(),
            runtime: facts,
            started_at_ms,
            duration_ms,
            exit_code: raw.exit_code,
            timed_out: raw.timed_out,
            interrupted: raw.interrupted,
            stdout,
            stderr: raw.stderr,
            egress,
            // Filled in by the teardown that follows.
            teardown: TeardownReport {
                ok: false,
                checks: Vec::new(),
                actions: Vec::new(),
            },
            bundle,
            oci_config,
            staged,
            runtime_notes: raw.notes,
        })
    }
}

impl Launcher {
    /// `scope.network = "targets"`: the targets resolved on the host (refused if
    /// one would open it) and the run's namespace, veth and table set up. `None`
    /// for `none`. Whatever this leaves on failure, the run's teardown removes.
    fn scoped_egress(
        &self,
        admitted: &Admitted,
        run_id: &str,
        run_dir: &Path,
    ) -> Result<Option<net::Egress>> {
        let scope = &admitted.manifest().scope;
        if scope.network != "targets" {
            return Ok(None);
        }
        if self.runtime.kind() != "runsc" {
            return Err(net::NetError::RuntimeUnsupported(self.runtime.kind()).into());
        }
        let targets = net::resolve::resolve(&scope.targets, &self.config.egress_pool)?;
        Ok(Some(net::Egress::create(
            run_id,
            targets,
            &self.config.egress_pool,
            &run_dir.join("net"),
        )?))
    }
}

/// Why the egress check failed, in words.
fn egress_failure(report: &RunReport) -> String {
    let e = &report.egress;
    match &e.probe {
        None if report.timed_out || report.interrupted => format!(
            "the egress probe did not report before the run was {}",
            if report.timed_out {
                "timed out"
            } else {
                "interrupted"
            }
        ),
        None => format!(
            "the egress probe did not report: the sandbox did not start ({})",
            report.stderr.text().trim()
        ),
        Some(p) if p.connected || e.listener_accepted => format!(
            "egress is open: the probe reached the host listener {}",
            e.target
        ),
        Some(_) if e.ledger.is_some() && !e.blocked => {
            "egress is not as declared: the sandbox has an interface other than its veth, \
             or the ledger did not count the refused probe"
                .into()
        }
        Some(p) if e.ledger.is_some() => format!(
            "a declared target was not reached: {}",
            p.reached
                .iter()
                .filter(|r| !r.connected)
                .map(|r| format!(
                    "{} ({})",
                    r.target,
                    r.error.as_deref().unwrap_or("not counted")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(_) => "the sandbox has a network interface other than loopback".into(),
    }
}

/// A run's id: 16 random bytes as hex, unique per run, and what every host-side
/// trace of the run (container id, cgroup, paths) is found by. Only `new` and
/// `parse` make one, so an id is always safe as a path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunId(String);

impl RunId {
    pub fn new() -> Result<RunId> {
        let mut bytes = [0u8; 16];
        verify_core::crypto::default_backend()
            .random(&mut bytes)
            .map_err(|source| LaunchError::RunId { source })?;
        Ok(RunId(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// Accepts exactly 32 lowercase hex digits.
    pub fn parse(s: &str) -> Option<RunId> {
        let ok = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| RunId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Settings that weaken the sandbox, for tests that prove a check can fail.
pub mod danger {
    use crate::{LauncherConfig, RunscConfig};

    /// Leaves the seccomp profile out of the OCI config (the evidence then says it
    /// was not enforced). Exists only so that a test can show that a call the
    /// profile denies works without it: the denial is the profile's doing.
    pub fn without_seccomp(config: &mut LauncherConfig) {
        config.without_seccomp = true;
    }

    /// Runs runsc with `--network=host` and no network namespace in the OCI config:
    /// the sandbox shares the host's network, so
    /// the egress probe reaches the host listener and the run must fail. Exists only
    /// so that a test can show the probe is not decorative.
    pub fn runsc_host_network(config: &mut RunscConfig) {
        config.host_network = true;
    }
}

/// What one run is called: its id, its container's id and its directory.
#[derive(Debug, Clone, Copy)]
struct RunNames<'a> {
    run_id: &'a str,
    container_id: &'a str,
    run_dir: &'a Path,
}
