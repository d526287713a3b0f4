//! `selfcheck`: proves on the deployed host, through the deployed configuration and the
//! same code paths as real admissions and runs, that the gate still works.
//!
//! Four groups of checks, each in its own module, each adding named [`Check`]s to one
//! [`Report`]:
//! - [`canary`]: unsigned, altered, expired, wrongly keyed and rolled-back canaries are
//!   denied with their reasons; a signed canary is admitted. The canaries are signed by
//!   an ephemeral key that exists only inside the check, against a throw-away state:
//!   the real trust store and state are never touched;
//! - [`tiers`]: a canary runs in each configured sandbox tier, egress is blocked and
//!   proven by the probe, teardown is clean, seccomp and AppArmor reported as they are;
//! - [`host`]: the TPM answers, sealed keys unseal, the SVID is current and inside its
//!   renewal window, the clock agrees with the state's last-known time, and the state
//!   and its log verify up to their last checkpoint (and that checkpoint is the latest
//!   one the checkpoint witness saw);
//! - [`align`]: the sha256 of the running binary, the policy and the trust store equal a
//!   signed deployment manifest (`align sign`): `ALIGNED`, else `DRIFT` naming each
//!   difference.
//!
//! `serve` and `agent` run it at start and on a schedule ([`schedule`]).

pub mod align;
pub mod canary;
pub mod host;
pub mod report;
pub mod schedule;
pub mod target;
pub mod tiers;

pub use report::{Check, Report, Verdict};
pub use target::Target;

/// Runs every check against `target`, in a fixed order, and returns the report. Never
/// panics and never stops early: a failed check is recorded and the next one runs.
pub fn run(target: &Target<'_>) -> Report {
    let started = std::time::Instant::now();
    let mut report = Report::default();
    canary::check(target, &mut report);
    tiers::check(target, &mut report);
    host::check(target, &mut report);
    align::check(target, &mut report);
    report.elapsed = started.elapsed();
    report
}
