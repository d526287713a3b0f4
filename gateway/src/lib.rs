//! capsule-gateway: the CLI and the admission service around verify-core.
//!
//! This crate does not re-implement checks: verify-core decides, the gateway reads
//! configuration, records admissions durably and prints results.
//!
//! `cli` (flags and printing) and `serve` (the mTLS admission service) sit on top of
//! the library modules, and neither reaches into the other:
//!
//! - [`admission`]: the one place a policy, keys (sealed ones too, through
//!   [`sealed`]), a clock, a hash mode, the runner, the state and the tenant indexes
//!   ([`tenant_index`]) become an admission;
//! - [`state`]: the durable anti-rollback state, the admission log, the last-known
//!   time and the highest tenant-index versions; [`admission_log`]: the log's record
//!   and checkpoint types, its chain walker, sealed segments, the checkpoint
//!   signer (over [`custody`]) and the checkpoint witness outside the state;
//!   [`layout`]: where state lives;
//! - [`evidence`]: one schema for the run event and bundle, its writer, readers and
//!   chain-of-custody check, the egress modes and masking, and `evidence export`;
//!   [`launch`]: the sandbox, set up and run the same way for `run` and `serve`;
//! - [`delivery`]: events to an HTTP CloudEvents sink from a durable spool;
//! - [`custody`]: the custody signer (TPM quote or software ES256) of evidence
//!   indexes, exports and log checkpoints, and its offline verifier;
//! - [`durable`]: temp file, fsync, rename, fsync the parent — every durable write;
//!   [`keygen`] and [`pack`]: keys and capsules; [`output`]: printing verdicts;
//! - [`oci`]: capsules and evidence as OCI artifacts, and the registry client;
//!   [`agent`]: the pull-only edge runner (poll, pull into the blob store, admit,
//!   run, push the evidence back);
//! - [`selfcheck`]: proves on the host that the gate, the sandbox, the host's trust
//!   anchors and the deployment's alignment still hold (`selfcheck`, `align sign`);
//! - [`error`]: which failures are usage (exit 2) and which runtime (exit 4).

pub mod admission;
pub mod admission_log;
pub mod agent;
pub mod cli;
pub mod custody;
pub mod delivery;
pub mod durable;
pub mod error;
pub mod evidence;
pub mod keygen;
pub mod launch;
pub mod layout;
pub mod oci;
pub mod output;
pub mod pack;
pub mod sealed;
pub mod selfcheck;
pub mod serve;
pub mod state;
pub mod tenant_index;

pub use error::GatewayError;

/// `--version` and an evidence index's `gateway.version`: the crate version and the
/// commit it was built from (`unknown` outside a git checkout; see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CAPSULE_GATEWAY_COMMIT"),
    ")"
);
