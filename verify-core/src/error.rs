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

/// The 1-based line and column (in characters) of byte `offset` in `text`, for
/// errors that point into a file the operator wrote.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// A TOML error as `field: line L column C: message` parts: the dotted field
/// (`-` for the whole file, as in a syntax error) and the located message.
pub fn toml_error(text: &str, e: serde_path_to_error::Error<toml::de::Error>) -> (String, String) {
    let path = e.path().to_string();
    let field = if path == "." { "-".to_string() } else { path };
    let inner = e.into_inner();
    // toml's messages may span lines (what was found, what was expected).
    let message: Vec<&str> = inner
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let message = message.join("; ");
    match inner.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            (field, format!("line {line} column {column}: {message}"))
        }
        None => (field, message),
    }
}
