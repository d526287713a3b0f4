//! The host: the TPM answers, the sealed keys unseal, the SVID is current and inside
//! its renewal window, the clock agrees with the state's last-known time, the state
//! and its log verify up to their last checkpoint, and that checkpoint is not behind
//! the checkpoint witness (a state restored from an older copy).
//!
//! Checks: `host.tpm`, `host.sealed_keys`, `host.svid`, `host.clock`, `host.state`,
//! `host.checkpoint`. What is not configured is a notice, never a pass.

use std::path::{Path, PathBuf};
use std::time::Duration;

use attest::svid::{FileSource, IdentitySource, WorkloadApiSource};
use attest::tpm::{Tcti, Tpm};
use verify_core::{Clock, Policy};

use super::target::{StateRef, SvidSource};
use super::{Report, Target};
use crate::admission::{load_policy, system_clock};
use crate::admission_log::signer::Expect;
use crate::admission_log::witness;
use crate::admission_log::LogReport;
use crate::sealed::SealedKeys;
use crate::state::{State, StateDir};

/// How long the Workload API may take to hand out the first SVID.
const WORKLOAD_API_TIMEOUT: Duration = Duration::from_secs(5);

pub fn check(target: &Target<'_>, report: &mut Report) {
    tpm(target, report);
    let policy = sealed_keys(target, report);
    svid(target, report);
    state(target, policy.as_ref(), report);
}

fn tpm(target: &Target<'_>, report: &mut Report) {
    let Some(tcti) = &target.tcti else {
        return report.notice("host.tpm", "no TPM configured");
    };
    let answered = Tcti::parse(tcti)
        .and_then(|t| Tpm::open(&t))
        .and_then(|mut t| t.loaded_transient_objects().map(|_| t));
    match answered {
        Ok(t) => report.pass("host.tpm", format!("{tcti}: {}", t.info().describe())),
        Err(e) => report.fail("host.tpm", format!("{tcti}: {e}")),
    }
}

/// Loads the policy as admissions do (sealed keys unsealed through the TPM).
fn sealed_keys(target: &Target<'_>, report: &mut Report) -> Option<Policy> {
    let mut sealed = SealedKeys::lazy(target.tcti.as_deref());
    match load_policy(&target.policy, &mut sealed) {
        Ok(policy) => {
            let n = policy
                .digests
                .trust_files
                .iter()
                .filter(|(field, _)| field.starts_with("trust.sealed"))
                .count();
            if n == 0 {
                report.notice("host.sealed_keys", "the policy names no sealed keys");
            } else {
                report.pass(
                    "host.sealed_keys",
                    format!("{n} sealed key(s) unsealed through the TPM"),
                );
            }
            Some(policy)
        }
        Err(e) => {
            report.fail("host.sealed_keys", format!("loading the policy: {e}"));
            None
        }
    }
}

/// The SVID's validity: current, and not yet in the last sixth of its lifetime (a
/// SPIRE agent renews at half-life, so an SVID that far along was not renewed).
fn svid(target: &Target<'_>, report: &mut Report) {
    let Some(source) = &target.svid else {
        return report.notice("host.svid", "no SVID configured");
    };
    let material = match source {
        SvidSource::Dir(dir) => FileSource::open(dir).and_then(|s| s.current()),
        SvidSource::WorkloadApi(endpoint) => {
            WorkloadApiSource::connect(endpoint, WORKLOAD_API_TIMEOUT).and_then(|s| s.current())
        }
    };
    let material = match material {
        Ok(m) => m,
        Err(e) => return report.fail("host.svid", e.to_string()),
    };
    let now = i64::try_from(system_clock().now_unix()).unwrap_or(i64::MAX);
    let validity = leaf_validity(material.svid.leaf().as_ref());
    let Some((not_before, not_after)) = validity else {
        return report.fail("host.svid", "the leaf certificate does not parse");
    };
    let id = material.svid.id();
    let lifetime = (not_after - not_before).max(1);
    let left = not_after - now;
    if now < not_before {
        report.fail(
            "host.svid",
            format!("{id}: not valid before {not_before} (now {now})"),
        );
    } else if left <= 0 {
        report.fail(
            "host.svid",
            format!("{id}: expired at {not_after} (now {now})"),
        );
    } else if left < lifetime / 6 {
        report.fail(
            "host.svid",
            format!(
                "{id}: {left} s of its {lifetime} s lifetime left: past its renewal window \
                 (renewal is due at half-life); rotation is not working"
            ),
        );
    } else {
        report.pass(
            "host.svid",
            format!("{id}: valid for {left} s more (lifetime {lifetime} s)"),
        );
    }
}

fn leaf_validity(der: &[u8]) -> Option<(i64, i64)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// What the state checks read of it.
struct Seen {
    dir: PathBuf,
    log: Result<LogReport, crate::admission_log::Failure>,
    last_known: Option<u64>,
    state_id: Option<String>,
}

fn state(target: &Target<'_>, policy: Option<&Policy>, report: &mut Report) {
    let names = ["host.clock", "host.state", "host.checkpoint"];
    let Some(state) = &target.state else {
        for n in names {
            report.notice(n, "no state configured");
        }
        return;
    };
    let clock = system_clock();
    let seen = match state {
        StateRef::Open(s) => Ok(seen_open(s)),
        StateRef::Dir(dir) => seen_dir(dir, clock.as_ref()),
    };
    let seen = match seen {
        Ok(Some(s)) => s,
        Ok(None) => {
            for n in names {
                report.notice(n, "no state there yet");
            }
            return;
        }
        Err(e) => {
            for n in names {
                report.fail(n, format!("the state cannot be opened: {e}"));
            }
            return;
        }
    };
    clock_check(clock.now_unix(), &seen, policy, report);
    match &seen.log {
        Ok(r) => report.pass(
            "host.state",
            format!(
                "{} records, {} checkpoint(s), {} after the last one: the log verifies",
                r.records, r.checkpoints, r.unanchored
            ),
        ),
        Err(f) => report.fail("host.state", format!("{}: {}", f.code.as_str(), f.detail)),
    }
    checkpoint_check(&seen, report);
}

fn seen_open(s: &State) -> Option<Seen> {
    let dir = s.path().parent().unwrap_or(Path::new(".")).to_path_buf();
    let log = match Expect::of_state(&dir) {
        Ok(expect) => s.audit_log(&expect),
        Err(e) => Err(crate::admission_log::Failure::new(
            crate::admission_log::FailureCode::StateUnreadable,
            e.to_string(),
        )),
    };
    Some(Seen {
        dir,
        log,
        last_known: s.last_known_time_now(),
        state_id: s.state_id().map(str::to_string),
    })
}

fn seen_dir(dir: &Path, clock: &dyn Clock) -> Result<Option<Seen>, crate::GatewayError> {
    let Some(sd) = StateDir::locate(dir, false, clock)? else {
        return Ok(None);
    };
    let log = match Expect::of_state(dir) {
        Ok(expect) => sd.audit_log(&expect),
        Err(e) => Err(crate::admission_log::Failure::new(
            crate::admission_log::FailureCode::StateUnreadable,
            e.to_string(),
        )),
    };
    let (last_known, state_id) = match sd.open() {
        Ok(s) => (s.last_known_time_now(), s.state_id().map(str::to_string)),
        // The log check names what is wrong.
        Err(_) => (None, None),
    };
    Ok(Some(Seen {
        dir: dir.to_path_buf(),
        log,
        last_known,
        state_id,
    }))
}

fn clock_check(now: u64, seen: &Seen, policy: Option<&Policy>, report: &mut Report) {
    let Some(last_known) = seen.last_known else {
        return report.notice("host.clock", "the state has no last-known time yet");
    };
    let Some(policy) = policy else {
        return report.fail("host.clock", "the policy (its clock_skew_s) did not load");
    };
    match verify_core::verify::check_clock(now, Some(last_known), policy.clock_skew_s) {
        Ok(()) => report.pass(
            "host.clock",
            format!("the clock reads {now}, the state's last-known time is {last_known}"),
        ),
        Err(e) => report.fail("host.clock", e.to_string()),
    }
}

fn checkpoint_check(seen: &Seen, report: &mut Report) {
    const NAME: &str = "host.checkpoint";
    let Some(path) = witness::path_for(&seen.dir) else {
        return report.notice(
            NAME,
            "the state directory has no name to put a witness beside",
        );
    };
    let last = match &seen.log {
        Ok(r) => r.last_checkpoint.as_ref().map(|c| (c.number, c.count)),
        Err(_) => return report.fail(NAME, "the log does not verify (see host.state)"),
    };
    let w = match witness::read(&path) {
        Ok(w) => w,
        Err(e) => return report.fail(NAME, e.to_string()),
    };
    let shown = path.display();
    match (last, w) {
        (None, None) => report.pass(NAME, "no checkpoint written yet, and no witness"),
        (Some((n, _)), None) => report.notice(
            NAME,
            format!(
                "no witness at {shown}: nothing outside the state vouches for checkpoint \
                 #{n} (written before the witness existed, or the witness was removed)"
            ),
        ),
        (_, Some(w)) if seen.state_id.as_deref() != Some(w.state_id.as_str()) => report.fail(
            NAME,
            format!(
                "the witness {shown} is of state {}, this is state {}: the state was replaced",
                w.state_id,
                seen.state_id.as_deref().unwrap_or("<unknown>")
            ),
        ),
        (None, Some(w)) => report.fail(
            NAME,
            format!(
                "the state has no checkpoint, the witness {shown} saw #{} ({} records): \
                 restored from an older copy",
                w.number, w.count
            ),
        ),
        (Some((n, c)), Some(w)) if n < w.number => report.fail(
            NAME,
            format!(
                "the state's last checkpoint is #{n} ({c} records), the witness {shown} saw \
                 #{} ({} records): restored from an older copy",
                w.number, w.count
            ),
        ),
        (Some((n, c)), Some(w)) if n == w.number && c != w.count => report.fail(
            NAME,
            format!(
                "checkpoint #{n} covers {c} records, the witness {shown} saw it cover {}: \
                 the log was rewritten",
                w.count
            ),
        ),
        (Some((n, _)), Some(w)) if n > w.number => report.notice(
            NAME,
            format!(
                "the witness {shown} is behind (#{} < #{n}): its last write failed",
                w.number
            ),
        ),
        (Some((n, c)), Some(_)) => report.pass(
            NAME,
            format!("last checkpoint #{n} ({c} records) is the one the witness {shown} saw"),
        ),
    }
}
