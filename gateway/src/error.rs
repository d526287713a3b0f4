//! Errors that end a command with exit code 2 (usage or configuration).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] verify_core::ConfigError),
    #[error("{0}")]
    Usage(String),
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
}

impl GatewayError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> GatewayError {
        GatewayError::Io {
            path: path.into(),
            source,
        }
    }
}
