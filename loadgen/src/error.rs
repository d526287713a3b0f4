//! The one error type of the load generator. Every variant ends the run with exit
//! code 2 (usage, configuration, or a server that cannot be used at all); failures of
//! single requests during the run are counted in the report instead.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadgenError {
    /// A flag that cannot work (the message names it).
    #[error("{0}")]
    Usage(String),
    /// `--url` is not `https://HOST[:PORT]`.
    #[error("--url `{url}`: {why} (expected https://HOST:PORT)")]
    Url { url: String, why: String },
    /// `--server-id` is not a SPIFFE ID or pattern.
    #[error("--server-id `{pattern}`: {message}")]
    ServerId { pattern: String, message: String },
    /// Reading a file (the capsule's JWS or files, the SVID directory).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The client SVID or the TLS set-up around it.
    #[error(transparent)]
    Attest(#[from] attest::AttestError),
    #[error("tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("histogram: {0:?}")]
    HistogramMerge(hdrhistogram::AdditionError),
    /// The server could not be used before the run (connect, TLS, readiness).
    #[error("{url}: {source}")]
    Server {
        url: String,
        #[source]
        source: ServerError,
    },
    /// A blob upload before the run was refused or failed.
    #[error("upload of {}: {source}", path.display())]
    Upload {
        path: PathBuf,
        #[source]
        source: ServerError,
    },
    #[error("connection task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why the server could not be used before the run started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("connection {index} of {of}: {source}")]
    Connection {
        index: usize,
        of: usize,
        #[source]
        source: ConnectError,
    },
    /// A request failed at transport level (its kind's message).
    #[error("{0}")]
    Transport(String),
    #[error("{0}")]
    Request(#[from] http::Error),
    #[error("GET /readyz answered {0}")]
    NotReady(u16),
    #[error("answered {status}: {body}")]
    Refused { status: u16, body: String },
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("connect: {0}")]
    Tcp(#[source] std::io::Error),
    #[error("TCP_NODELAY: {0}")]
    NoDelay(#[source] std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    #[error("the server did not agree to HTTP/2 (ALPN h2)")]
    NoHttp2,
    #[error("HTTP/2 handshake: {0}")]
    Http2(#[source] hyper::Error),
    #[error("HTTP/1.1 handshake: {0}")]
    Http1(#[source] hyper::Error),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
}

impl LoadgenError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> LoadgenError {
        LoadgenError::Io {
            path: path.into(),
            source,
        }
    }
}
