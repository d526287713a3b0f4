//! Errors that end a command, and which exit code each gets: a usage or
//! configuration error (exit 2: the operator can fix the command line or a file it
//! names) or a runtime failure (exit 4: the command was sound, and doing it failed —
//! the sandbox, a write of state, keys or evidence, a TPM command).

use std::path::PathBuf;

/// What kind of failure an error is, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad flags, or a file the operator named that is missing, malformed or unsafe;
    /// a sandbox runtime that is not installed.
    Usage,
    /// The work itself failed.
    Runtime,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] verify_core::ConfigError),
    #[error("{0}")]
    Usage(String),
    /// Reading a file or directory the operator named.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("anti-rollback state {}: {message}", path.display())]
    State { path: PathBuf, message: String },
    /// TPM, SVID or binding (the message names the TCTI, file or check).
    #[error(transparent)]
    Attest(#[from] attest::AttestError),
    /// The sandbox cannot be set up: its runtime or the probe is missing (the
    /// message names the Debian package).
    #[error("sandbox: {0}")]
    SandboxSetup(#[source] sandbox_launcher::LaunchError),
    /// The sandbox failed while in use.
    #[error("sandbox: {0}")]
    Sandbox(#[source] sandbox_launcher::LaunchError),
    /// An evidence bundle could not be written.
    #[error(transparent)]
    Evidence(#[from] crate::evidence::EvidenceError),
    /// `evidence export` refused or failed.
    #[error(transparent)]
    Export(#[from] crate::evidence::ExportError),
    /// Event delivery to a sink (the spool could not be written or read).
    #[error(transparent)]
    Delivery(#[from] crate::delivery::DeliveryError),
    /// A durable write (keys, capsules, certificates) failed, or would have replaced
    /// an existing file.
    #[error(transparent)]
    Write(#[from] crate::durable::DurableError),
    #[error(transparent)]
    Keygen(#[from] crate::keygen::KeygenError),
    #[error(transparent)]
    Pack(#[from] crate::pack::PackError),
    /// The custody signer could not be set up or did not sign.
    #[error(transparent)]
    Custody(#[from] crate::custody::CustodyError),
    /// A resource of this process (a thread, a signal handler) was refused.
    /// A registry operation (`publish`, the agent).
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error("{what}: {source}")]
    Process {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl GatewayError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> GatewayError {
        GatewayError::Io {
            path: path.into(),
            source,
        }
    }

    /// Usage or runtime, by what failed.
    pub fn class(&self) -> ErrorClass {
        use crate::custody::CustodyError;
        use crate::durable::DurableError;
        use crate::keygen::KeygenError;
        match self {
            GatewayError::Config(_)
            | GatewayError::Usage(_)
            | GatewayError::Io { .. }
            | GatewayError::State { .. }
            | GatewayError::SandboxSetup(_) => ErrorClass::Usage,
            GatewayError::Pack(e) => e.class(),
            GatewayError::Export(e) => e.class(),
            GatewayError::Delivery(e) => e.class(),
            // A TPM that answers but fails a command fails at run time; an
            // unreachable TPM, a bad TCTI, changed PCRs, a bad file or a missing
            // (or misplaced) identity key are configuration.
            GatewayError::Attest(attest::AttestError::Tpm { command, .. })
                if *command != "identity key" =>
            {
                ErrorClass::Runtime
            }
            GatewayError::Attest(_) => ErrorClass::Usage,
            // The TPM as for attest; an unusable key file is the operator's to fix.
            GatewayError::Custody(CustodyError::Tpm(e)) => match e {
                attest::AttestError::Tpm { command, .. } if *command != "identity key" => {
                    ErrorClass::Runtime
                }
                _ => ErrorClass::Usage,
            },
            GatewayError::Custody(CustodyError::KeyFile { .. }) => ErrorClass::Usage,
            GatewayError::Custody(_) => ErrorClass::Runtime,
            // An existing file is the operator's to move; nothing was replaced.
            GatewayError::Write(DurableError::Exists { .. })
            | GatewayError::Keygen(KeygenError::Write(DurableError::Exists { .. }))
            | GatewayError::Keygen(KeygenError::Kid) => ErrorClass::Usage,
            // A URL, CA bundle, credentials or capsule file that cannot be used is
            // configuration; what the registry did is run time.
            GatewayError::Oci(e) if e.is_config() => ErrorClass::Usage,
            GatewayError::Oci(_) | GatewayError::Agent(_) => ErrorClass::Runtime,
            GatewayError::Write(_)
            | GatewayError::Keygen(_)
            | GatewayError::Sandbox(_)
            | GatewayError::Evidence(_)
            | GatewayError::Process { .. } => ErrorClass::Runtime,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::DurableError;

    fn tpm(command: &'static str) -> GatewayError {
        GatewayError::Attest(attest::AttestError::Tpm {
            command,
            tcti: "swtpm:port=1".into(),
            message: "failed".into(),
        })
    }

    #[test]
    fn failures_at_run_time_are_runtime_and_the_operators_mistakes_usage() {
        assert_eq!(tpm("TPM2_Quote").class(), ErrorClass::Runtime);
        assert_eq!(tpm("identity key").class(), ErrorClass::Usage);
        let unreachable = GatewayError::Attest(attest::AttestError::TpmUnreachable {
            tcti: "swtpm:port=1".into(),
            message: "refused".into(),
        });
        assert_eq!(unreachable.class(), ErrorClass::Usage);
        let exists = GatewayError::Write(DurableError::Exists { path: "k".into() });
        assert_eq!(exists.class(), ErrorClass::Usage);
        let failed = GatewayError::Write(DurableError::Io {
            op: "write",
            path: "k".into(),
            source: std::io::Error::other("disk full"),
        });
        assert_eq!(failed.class(), ErrorClass::Runtime);
        assert_eq!(GatewayError::Usage("x".into()).class(), ErrorClass::Usage);
    }
}
