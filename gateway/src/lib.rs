//! capsule-gateway: the CLI and the admission service around verify-core.
//!
//! This crate does not re-implement checks: verify-core decides, the gateway reads
//! configuration, records admissions durably and prints results.
//!
//! - `admission`: the one place a policy, keys (sealed ones too), a clock, a hash
//!   mode, the runner and the state become an admission; `cli` and `serve` use it;
//! - `sealed`: unsealing `trust.sealed` keys through the TPM;
//! - `state`: the durable anti-rollback state, the admission log and the
//!   last-known time;
//! - `cli`: flags and printing; `serve`: the mTLS admission service.
//!
//! `cli` and `serve` sit on top of the library rooms and neither reaches into the
//! other: [`evidence`] (one schema for the run event and bundle, its writer, readers
//! and chain-of-custody check), [`launch`] (the sandbox, set up and run the same way
//! for both), [`layout`] (where state lives), [`durable`] (temp file, fsync, rename,
//! fsync the parent — every durable write), [`keygen`] and [`pack`] (keys and
//! capsules), [`error`] (which failures are usage, exit 2, and which runtime, exit 4).

pub mod admission;
pub mod cli;
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
