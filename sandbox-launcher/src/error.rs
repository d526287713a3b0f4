//! The launcher's one error type. Every variant names the operation and what it was
//! working on; a run that started but cannot be vouched for carries its report.

use std::path::PathBuf;

use crate::RunReport;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// A program the chosen runtime needs is not installed.
    #[error("`{program}` was not found on PATH: install the Debian package `{package}`")]
    ToolMissing {
        program: &'static str,
        package: &'static str,
    },
    /// The containerd shim for the chosen runtime type is not installed.
    #[error("`{shim}` was not found on PATH (runtime type `{runtime_type}`): {hint}")]
    ShimMissing {
        shim: String,
        runtime_type: String,
        hint: &'static str,
    },
    /// A file could not be copied into the staging directory (missing, not a
    /// regular file, a symlink on the way, ...).
    #[error("staging `{path}`: {source}")]
    Stage {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The bytes read while staging are not the bytes that were admitted: the
    /// file changed after admission. Nothing was launched.
    #[error(
        "staging `{path}`: the file changed after admission ({actual_size} bytes, sha256 {actual}; \
         admitted {expected_size} bytes, sha256 {expected}); nothing was launched"
    )]
    ChangedAfterAdmission {
        path: String,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
    /// The OCI configuration could not be built or written.
    #[error("OCI bundle: {0}")]
    Bundle(String),
    /// A file-system or process operation of the launcher failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The runtime refused or failed an operation before the capsule started.
    #[error("{runtime} {op}: {detail}")]
    Runtime {
        runtime: &'static str,
        op: String,
        detail: String,
    },
    /// The run happened, but the launcher cannot vouch for it: the egress probe
    /// connected or did not report, or teardown left something behind. The report
    /// says what was seen.
    #[error("run {}: {why}", report.run_id)]
    RunFailed { why: String, report: Box<RunReport> },
    /// A run failed before its sandbox ran, and removing what it had set up failed
    /// too.
    #[error("run {run_id}: {cause}; and its teardown left {left}")]
    TeardownFailed {
        run_id: String,
        cause: Box<LaunchError>,
        left: String,
    },
    /// A sandbox left by an earlier, crashed launcher could not be removed.
    #[error("stale sandbox {run_id}: cleanup left {left}")]
    StaleCleanup { run_id: String, left: String },
}

impl LaunchError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LaunchError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The report of a run that started, if this error happened after launch.
    pub fn report(&self) -> Option<&RunReport> {
        match self {
            LaunchError::RunFailed { report, .. } => Some(report),
            _ => None,
        }
    }
}

pub type Result<T, E = LaunchError> = std::result::Result<T, E>;
