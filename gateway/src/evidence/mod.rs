//! Evidence of a run: the CloudEvent (the line `run` prints, also `event.json`) and
//! the bundle directory beside it. One schema ([`schema`]) for the writer
//! ([`write`]) and every reader ([`read`], the service's `GET /v1/runs/{id}`), the
//! chain-of-custody walk over a bundle read back ([`check`]), the signed index of
//! every bundle, runs and denials alike ([`index`]), and `evidence verify` of a
//! bundle or an export ([`verify`]), which walks the same chain.
//!
//! [`Bundle::check`] walks the chain of custody backward and names the first hop
//! ([`Hop`]) that does not hold: event → run id → capsule digest (of the exact
//! `capsule.jws`) → signature (by the trust store) → manifest → approvals and policy
//! version → admission decision → sandbox and OCI config digest → staged files →
//! outputs.
//!
//! What may leave the host is shaped by the tenant's egress mode ([`egress`]): the
//! event sent to a sink, and `evidence export` ([`export`]).

pub mod check;
pub mod egress;
pub mod export;

pub mod index;
pub mod read;
pub mod schema;
pub mod verify;
pub mod write;

use std::path::PathBuf;

pub use check::{Hop, Links};
pub use egress::{outbound_event, printed_event, EgressRules, MaskRules, TenantEgress};
pub use export::{export, ExportError, ExportFile, ExportManifest, FileStatus};

pub use index::{Custody, Index, IndexKind, PolicyFacts};
pub use read::{read_event_head, Bundle};
pub use schema::{
    CustodyAttributes, DecisionRecord, DecisionSummary, DeniedData, Event, EventData, EventHead,
    EventType, RunData, SandboxRecord,
};
pub use verify::{verify_evidence, Verdict, VerifyOptions, VerifyReport};
pub use write::{write_bundle, write_denial_bundle};

/// The largest evidence file read (an event carries stdout and stderr, each up to
/// `run --output-cap`, 1 MiB by default, JSON-escaped).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why evidence was refused, or could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not the format `run` writes (the message names the file or member).
    #[error("{what}: {detail}")]
    Malformed { what: String, detail: String },
    /// A hop of the chain of custody does not hold.
    #[error("chain of custody broken at {hop}: {detail}")]
    Link { hop: Hop, detail: String },
    /// Writing a bundle failed (nothing was put in place).
    #[error("evidence bundle: {0}")]
    Write(#[from] crate::durable::DurableError),
    /// The index could not be signed (nothing was put in place).
    #[error("evidence index: {0}")]
    Sign(#[source] Box<crate::custody::CustodyError>),
}
