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

pub mod admission;
pub mod cli;
pub mod error;
pub mod evidence;
pub mod output;
pub mod sealed;
pub mod serve;
pub mod state;

pub use error::GatewayError;
