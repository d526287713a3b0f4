//! Configuration errors: a bad policy or key file names the file and the field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {field}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        /// Dotted path of the offending field (`tenants[0].armory[1]`), or `-` for the whole file.
        field: String,
        message: String,
    },
    /// A trust file others could have changed (see [`crate::trust_file`]).
    #[error("{}: refused: {message}", file.display())]
    Unsafe { file: PathBuf, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(
        file: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: file.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
