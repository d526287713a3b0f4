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
//!   and checkpoint types, its chain walker, sealed segments and the checkpoint
//!   signer (over [`custody`]); [`layout`]: where state lives;
//! - [`evidence`]: one schema for the run event and bundle, its writer, readers and
//!   chain-of-custody check; [`launch`]: the sandbox, set up and run the same way for
//!   `run` and `serve`;
//! - [`custody`]: the custody signer (TPM quote or software ES256) of evidence
//!   indexes, exports and log checkpoints, and its offline verifier;
//! - [`durable`]: temp file, fsync, rename, fsync the parent — every durable write;
//!   [`keygen`] and [`pack`]: keys and capsules; [`output`]: printing verdicts;
//! - [`error`]: which failures are usage (exit 2) and which runtime (exit 4).

pub mod admission;
pub mod admission_log;
pub mod cli;
pub mod custody;
pub mod durable;
pub mod error;
pub mod evidence;
pub mod keygen;
pub mod launch;
pub mod layout;
pub mod output;
pub mod pack;
pub mod sealed;
pub mod serve;
pub mod state;
pub mod tenant_index;

pub use error::GatewayError;
