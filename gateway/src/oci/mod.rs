//! OCI distribution: the capsule and evidence artifacts (`artifact`) and a small,
//! outbound-only registry client (`client`) for `publish` and `agent`.
//!
//! A capsule is an OCI image manifest with `artifactType`
//! [`artifact::CAPSULE_ARTIFACT_TYPE`], the empty config and one layer per file of the
//! capsule directory, titled (`org.opencontainers.image.title`) by its path inside
//! it. Blobs are addressed by the same sha256 the capsule manifest names, so a pulled
//! blob lands in the content-addressed store under the digest admission resolves.

pub mod artifact;
pub mod client;
pub mod publish;

pub use artifact::{Descriptor, ImageIndex, ImageManifest};
pub use client::{Registry, RegistryAuth, RegistryConfig};

use verify_core::Sha256Digest;

/// Why a registry operation did not complete. Nothing pulled under such an error is
/// ever used: a blob is renamed into the store only after its digest was checked.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("registry URL `{url}`: {why}")]
    Url { url: String, why: &'static str },
    #[error("registry {registry}: connect: {source}")]
    Connect {
        registry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry {registry}: TLS: {source}")]
    Tls {
        registry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry {registry}: HTTP: {source}")]
    Http {
        registry: String,
        #[source]
        source: hyper::Error,
    },
    #[error("registry {registry}: request: {source}")]
    Request {
        registry: String,
        #[source]
        source: http::Error,
    },
    #[error("registry {registry}: {what} timed out after {secs} s")]
    Timeout {
        registry: String,
        what: String,
        secs: u64,
    },
    #[error("registry {registry}: {method} {path}: HTTP {status}")]
    Status {
        registry: String,
        method: &'static str,
        path: String,
        status: u16,
    },
    #[error("registry {registry}: {what} is larger than {limit} bytes")]
    TooLarge {
        registry: String,
        what: String,
        limit: u64,
    },
    /// The registry served bytes under a digest they do not have.
    #[error("{what}: the registry served {got} for {expected}")]
    DigestMismatch {
        what: String,
        expected: Sha256Digest,
        got: Sha256Digest,
    },
    #[error("{what}: {why}")]
    Malformed { what: String, why: String },
    #[error("blob store: {0}")]
    Store(#[source] std::io::Error),
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    /// A configuration problem found before anything was sent (exit 2).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            OciError::Url { .. } | OciError::TlsConfig(_) | OciError::File { .. }
        )
    }

    /// A transient failure (outage, timeout, a status the registry may not give next
    /// time): the agent backs off and tries again. Everything else is about content.
    pub fn is_transient(&self) -> bool {
        match self {
            OciError::Connect { .. }
            | OciError::Tls { .. }
            | OciError::Http { .. }
            | OciError::Timeout { .. } => true,
            OciError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}
