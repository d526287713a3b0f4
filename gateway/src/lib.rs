//! capsule-gateway: the CLI and the admission service around verify-core.
//!
//! This crate does not re-implement checks: verify-core decides, the gateway reads
//! configuration, records admissions durably and prints results.

pub mod cli;
pub mod durable;
pub mod error;
pub mod evidence;
pub mod keygen;
pub mod launch;
pub mod layout;
pub mod output;
pub mod pack;
pub mod serve;
pub mod state;

pub use error::GatewayError;
