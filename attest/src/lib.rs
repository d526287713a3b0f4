//! attest: who this runner is, and proof of it.
//!
//! - [`tpm`]: the TPM through tss-esapi — the identity key (restricted, non-exportable
//!   P-256, persistent), HS256 keys sealed to PCRs, quotes and their verifier.
//! - [`spiffe`] and [`svid`]: SPIFFE IDs (verify-core's strict parser is the one parser),
//!   X.509-SVIDs and trust bundles from PEM files or the Workload API, with rotation.
//! - [`tls`]: rustls verifiers that accept a peer only with a chain to the trust bundle
//!   of its own trust domain and exactly one `spiffe://` URI SAN, and a TPM-backed
//!   rustls signing key.
//! - [`binding`]: the statement binding SPIFFE ID, SVID, TPM key and PCRs, and its
//!   offline verifier.
//! - [`csr`]: CSRs signed by the TPM identity key and a development CA that issues them.
//!
//! Capsule verification is not here (that is verify-core's job).

pub mod b64;
pub mod binding;
pub mod csr;
pub mod error;
pub mod hex;
pub mod pem;
pub mod spiffe;
pub mod svid;
pub mod tls;
pub mod tpm;

pub use error::{AttestError, BindingFailure, QuoteFailure};
