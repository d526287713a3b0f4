//! verify-core: decides whether a capsule may run.
//!
//! Strict compact JWS (ES256/HS256), a trust store of JWKs, a TOML policy, manifest v1
//! checks, and artifact hashing in parallel. Every verification ends in one
//! [`Decision`]; a capsule that passes becomes an [`Admitted`], which only this crate
//! can build. No network, no processes, no async runtime.
//!
//! Governance: signed approvals (`approvals`), rules per tenant and environment
//! (`rules`, loaded by `policy`), lineage and the tenant index (`index`), all checked in
//! `verify`'s one sequence.
//!
//! The verification cache (`verify_cache`, owned by the [`Policy`]) remembers that one
//! JWS verified under one key and what its manifest parsed as; every other check runs
//! on every admission.
//!
//! Errors untrusted input can cause are denials with a [`Reason`], never panics;
//! configuration problems are [`ConfigError`]s naming the file and field.

pub mod approvals;
pub mod b64;
pub mod crypto;
pub mod decision;
pub mod digest;
pub mod entrypoint;
pub mod error;
pub mod index;
pub mod json;
pub mod jws;
pub mod keys;
pub mod limits;
pub mod manifest;
pub mod net_target;
pub mod policy;
pub mod rules;
pub mod runner;
pub mod time;
pub mod trust_file;
pub mod verify;
pub mod verify_cache;

pub use approvals::{ApprovalError, QuorumError};
pub use decision::{Alg, Decision, Reason, Sha256Digest, Verdict};
pub use digest::{ArtifactSource, HashMode};
pub use error::ConfigError;
pub use index::{StaleIndexError, SupersededError, TenantIndex};
pub use limits::Limits;
pub use manifest::{ApproverId, Manifest};
pub use policy::{EgressMode, EvidenceRule, Policy, PolicyDigests, RootfsRule, UnsealError};
pub use rules::{ScopeRuleError, Tier, TierError};
pub use runner::{RunnerPattern, SpiffeId};
pub use time::{Clock, FixedClock, SystemClock};
pub use verify::{
    check_clock, check_rollback, check_shape, Admitted, AdmittedVersion, Capsule, ClockRollback,
    Governance, NoHistory, RollbackError, RollbackView, ScopeError, ShapeError, StateReadError,
    Verifier,
};
