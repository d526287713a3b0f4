//! The two sandbox runtimes behind one interface, `Runtime`: what each does
//! itself (start the container attached, kill it, delete it, list what it has) and
//! what they share, written once:
//!
//! - `process`: child-process plumbing (capped output capture, waiting against a
//!   deadline, bounded housekeeping commands, finding programs);
//! - `supervise`: one run of a container: start, wait against the hard deadline
//!   or the cancel flag, kill on expiry, collect the output;
//! - [`runsc`] and [`containerd`]: the two implementations.
//!
//! Dependencies point down: `supervise` drives any `Runtime`; `runsc` and
//! `containerd` implement it; all three use `process`, which uses only
//! [`crate::host`] and [`crate::error`]. Nothing here knows the teardown or the
//! launcher.

pub mod containerd;
pub(crate) mod process;
pub mod runsc;
pub(crate) mod supervise;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bundle::Flavor;
use crate::error::Result;
pub(crate) use process::RuntimeCommand;
pub(crate) use supervise::{supervise, RunCtx};

/// A sandbox runtime as the launcher drives it. [`supervise`] runs one container
/// with `start` and `kill`; the teardown removes it with `remove` and verifies with
/// the listings. Waiting, the deadline and output collection are not a runtime's
/// business: they are the same for both, in [`supervise`].
pub(crate) trait Runtime: std::fmt::Debug + Send + Sync {
    /// `runsc` or `containerd`.
    fn kind(&self) -> &'static str;

    fn facts(&self) -> RuntimeFacts;

    /// Which OCI config this runtime is given.
    fn flavor(&self) -> Flavor;

    /// Who applies the OCI config's seccomp profile to the capsule's system calls
    /// (`kernel`, `gvisor`, `kata-guest`), `None` when nothing does.
    fn seccomp_enforcer(&self) -> Option<&'static str>;

    /// Whether the sandbox shares the host's network (only via [`crate::danger`]).
    fn host_network(&self) -> bool {
        false
    }

    /// The command that creates and starts the container and stays attached: the
    /// container's stdout and stderr are its own, and it exits with the container's
    /// status.
    fn start(&self, ctx: &RunCtx<'_>) -> RuntimeCommand;

    /// The runtime's SIGKILL to every process of the container.
    fn kill(&self, container_id: &str) -> RuntimeCommand;

    /// Kills and deletes the container if the runtime still has it; returns what
    /// went wrong, if anything (a container that is already gone is not an error).
    fn remove(&self, container_id: &str) -> Vec<String>;

    /// Every container id the runtime lists in the launcher's root or namespace.
    fn list(&self) -> Result<Vec<String>>;

    /// Whether the runtime still lists the container (in any form it keeps).
    fn listed(&self, container_id: &str) -> Result<bool> {
        Ok(self.list()?.iter().any(|c| c == container_id))
    }

    /// Files the runtime keeps for the container outside its lists (runsc's state
    /// file and locks in its root). containerd keeps its bundles under its own
    /// state directory, which the list check covers: a deleted container has none.
    fn state_files(&self, _container_id: &str) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// The configured runtime, its programs found; runsc keeps its state in
/// `state_dir/runsc`.
pub(crate) fn open(config: &RuntimeConfig, state_dir: &Path) -> Result<Box<dyn Runtime>> {
    Ok(match config {
        RuntimeConfig::Runsc(c) => Box::new(runsc::Runsc::new(c, state_dir)?),
        RuntimeConfig::Containerd(c) => Box::new(containerd::Containerd::new(c)?),
    })
}

/// Which sandbox runs the capsule.
#[derive(Debug, Clone)]
pub enum RuntimeConfig {
    /// gVisor: `runsc` directly.
    Runsc(runsc::RunscConfig),
    /// containerd's shim v2: Kata (`io.containerd.kata.v2`) in production.
    Containerd(containerd::ContainerdConfig),
}

/// What the evidence says about the runtime of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFacts {
    /// `runsc` or `containerd`.
    pub kind: String,
    /// runsc: the platform (`ptrace`, `kvm`, ...).
    #[serde(deserialize_with = "crate::nullable")]
    pub platform: Option<String>,
    /// containerd: the shim v2 runtime type.
    #[serde(deserialize_with = "crate::nullable")]
    pub runtime_type: Option<String>,
    /// The runtime's `--version` first line.
    pub version: String,
    pub network: String,
}

/// Output of the sandbox, at most `cap` bytes kept (the rest is read and counted,
/// so that a chatty capsule never blocks on a full pipe).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// Every byte the stream carried, kept or not.
    pub total_bytes: u64,
    pub truncated: bool,
}

impl Output {
    /// The kept bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}
