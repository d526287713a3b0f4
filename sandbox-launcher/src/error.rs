//! The launcher's one error type. Every variant names the operation and what it was
//! working on; a run that started but cannot be vouched for carries its report.
//! [`LaunchError::kind`] sorts them into configuration errors (fix the setup; nothing
//! ran) and run failures (the sandbox, its runtime or its teardown failed), so that a
//! caller can give them different exit codes.

use std::path::PathBuf;

use crate::RunReport;

/// The two kinds of [`LaunchError`], for the caller's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The launcher is not set up right: a program or shim is not installed, a
    /// setting is invalid, its state directory or the egress probe is unusable.
    /// Nothing was launched; fixing the configuration or the host fixes it.
    Config,
    /// A run or the runtime under it failed: staging refused the capsule's files,
    /// the runtime failed or could not be reached, egress was not proven blocked,
    /// teardown or the clean-up of an earlier run left something behind.
    Run,
}

/// Why an OCI bundle could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The manifest is not one the verifier would admit (its reason).
    #[error("manifest: {0}")]
    Manifest(String),
    /// A [`crate::Rootfs::HostBinds`] entry is a relative path.
    #[error("{}: not absolute", .0.display())]
    NotAbsolute(PathBuf),
    /// oci-spec refused a value.
    #[error(transparent)]
    Spec(#[from] oci_spec::OciSpecError),
    /// The config could not be serialised.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The compiled-in seccomp profile does not parse or breaks its own rules.
    #[error("seccomp profile: {0}")]
    Seccomp(String),
}

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
    /// The OCI configuration could not be built.
    #[error("OCI bundle: {0}")]
    Bundle(#[from] BundleError),
    /// The prepared root file system cannot be digested (unreadable, writable by
    /// others, a special file in it). Nothing was launched.
    #[error("rootfs {}: {source}; nothing was launched", path.display())]
    Rootfs {
        path: PathBuf,
        #[source]
        source: crate::rootfs::RootfsError,
    },
    /// The root file system's tree digest is not the one the policy pins. Nothing
    /// was launched.
    #[error(
        "rootfs {}: tree digest {actual} differs from the pinned {pinned}; nothing was launched",
        path.display()
    )]
    RootfsPinMismatch {
        path: PathBuf,
        pinned: String,
        actual: String,
    },
    /// The launcher's own set-up failed: its state directory (or a private
    /// containerd's) cannot be created or used, the egress probe is not there.
    #[error("{op} {}: {source}", path.display())]
    Setup {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A private containerd's socket path does not fit a unix socket address.
    #[error("containerd start: socket path {} is too long for a unix socket", path.display())]
    SocketPathTooLong { path: PathBuf },
    /// The system's random number generator failed to give a run id.
    #[error("random run id: {source}")]
    RunId {
        #[source]
        source: verify_core::crypto::KeyRejected,
    },
    /// A file-system or process operation of a run failed.
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
    /// Scoped egress (`scope.network = "targets"`) was refused or could not be set
    /// up: a target that would open the host, a name that does not resolve, the
    /// host not forwarding, `ip` or `nft` failing.
    #[error("scoped egress: {0}")]
    Egress(#[from] crate::net::NetError),
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

    pub(crate) fn setup(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        LaunchError::Setup {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether fixing the configuration, or installing what is missing, is what
    /// this error asks for ([`ErrorKind::Config`]), or a run failed
    /// ([`ErrorKind::Run`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            LaunchError::ToolMissing { .. }
            | LaunchError::ShimMissing { .. }
            | LaunchError::Setup { .. }
            | LaunchError::SocketPathTooLong { .. }
            | LaunchError::Bundle(BundleError::NotAbsolute(_))
            | LaunchError::Rootfs { .. }
            | LaunchError::RootfsPinMismatch { .. } => ErrorKind::Config,
            LaunchError::Egress(e) if e.is_config() => ErrorKind::Config,
            LaunchError::Stage { .. }
            | LaunchError::ChangedAfterAdmission { .. }
            | LaunchError::Bundle(_)
            | LaunchError::RunId { .. }
            | LaunchError::Io { .. }
            | LaunchError::Runtime { .. }
            | LaunchError::Egress(_)
            | LaunchError::RunFailed { .. }
            | LaunchError::TeardownFailed { .. }
            | LaunchError::StaleCleanup { .. } => ErrorKind::Run,
        }
    }

    /// `kind() == ErrorKind::Config`.
    pub fn is_config(&self) -> bool {
        self.kind() == ErrorKind::Config
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
