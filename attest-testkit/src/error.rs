//! The one error type of the test kit: a stand-in that could not be started. Tests
//! `expect()` it and fail with the message (a missing tool names its Debian package).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// A tool the tests need is not on `PATH`.
    #[error("`{tool}` is not installed: install the Debian package `{package}` (scripts/install-deps.sh does)")]
    MissingTool { tool: String, package: &'static str },
    #[error("swtpm is not installed: install the Debian packages `swtpm` and `swtpm-tools` (scripts/install-deps.sh does)")]
    SwtpmMissing,
    #[error("swtpm state directory: {0}")]
    SwtpmState(#[source] std::io::Error),
    #[error("swtpm ports: {0}")]
    SwtpmPorts(#[source] std::io::Error),
    #[error("cannot start swtpm: {0}")]
    SwtpmSpawn(#[source] std::io::Error),
    /// Every attempt failed; the last attempt's reason.
    #[error("swtpm did not start: {0}")]
    SwtpmNotStarted(#[source] SwtpmStart),
    #[error("workload API server: {0}")]
    WorkloadApi(#[source] std::io::Error),
    #[error("{}: {source}", path.display())]
    WorkloadApiSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workload API server thread died")]
    WorkloadApiThread,
}

/// Why one swtpm process did not come up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwtpmStart {
    #[error("{0}")]
    Wait(#[source] std::io::Error),
    #[error("swtpm exited with {status}: {stderr}")]
    Exited {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("swtpm not listening on port {0} after 10 s")]
    NotListening(u16),
}
