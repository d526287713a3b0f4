//! Where the gateway keeps its state: one directory (`--state`, or the service's
//! `state_dir`), laid out here and nowhere else.
//!
//! | path | what |
//! |---|---|
//! | `evidence/<run id>/` | evidence bundles ([`crate::evidence`]) |
//! | `blobs/` | the service's content-addressed blob store |
//! | `sandbox/runsc/`, `sandbox/kata/` | the launcher's own directory, one per runtime |
//! | `containerd/` | the private containerd `run --runtime kata` starts |
//! | `dev/` | the service's development trust domain |
//! | `custody/` | the software custody key ([`crate::custody`]), when no TPM signs |
//!
//! The anti-rollback state and the admission log are [`crate::state`]'s.

use std::path::{Path, PathBuf};

/// The sandbox runtimes, each with a launcher directory of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxDir {
    Runsc,
    Kata,
}

/// The layout of one state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    pub fn new(root: impl Into<PathBuf>) -> StateLayout {
        StateLayout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn evidence(&self) -> PathBuf {
        self.root.join("evidence")
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn sandbox(&self, runtime: SandboxDir) -> PathBuf {
        self.root.join("sandbox").join(match runtime {
            SandboxDir::Runsc => "runsc",
            SandboxDir::Kata => "kata",
        })
    }

    pub fn containerd(&self) -> PathBuf {
        self.root.join("containerd")
    }

    pub fn dev(&self) -> PathBuf {
        self.root.join("dev")
    }

    /// The directory of the software custody key ([`crate::custody::CustodySigner::software`]).
    pub fn custody(&self) -> PathBuf {
        self.root.join("custody")
    }
}
