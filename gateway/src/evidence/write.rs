//! Writing evidence: the schema's values made from what the verifier and the
//! launcher returned (typed, so the writer cannot spell a member differently from
//! the readers), and the bundle put on disk durably.

use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use sandbox_launcher::{RunId, RunReport, StaleReport};
use serde::Serialize;
use verify_core::{Admitted, Decision, Sha256Digest};

use super::index::{Custody, IndexHead, IndexKind, IndexedDir};
use super::schema::{
    CustodyAttributes, DecisionRecord, DecisionSummary, DeniedData, Event, EventData, EventType,
    RunData, SandboxRecord,
};
use super::EvidenceError;
use crate::durable::{create_dirs, StagedDir};

impl DecisionRecord {
    /// The decision as `verify --json` prints it and `decision.json` stores it;
    /// `capsule` is the capsule as given.
    pub fn new(capsule: &str, d: &Decision) -> DecisionRecord {
        DecisionRecord {
            capsule: capsule.to_string(),
            verdict: d.verdict.as_str().to_string(),
            reason: d.reason.map(|r| r.as_str().to_string()),
            detail: d.detail.clone(),
            digest: d.digest.map(|x| x.to_string()),
            capsule_id: d.capsule_id.clone(),
            version: d.version,
            tenant: d.tenant.clone(),
            kid: d.kid.clone(),
            alg: d.alg.map(|a| a.as_str().to_string()),
        }
    }
}

impl RunData {
    /// `data` of a run event: DESIGN.md's evidence fields, and what the sandbox saw
    /// when the launcher reported (`report`); `error` says why the run cannot be
    /// vouched for, if it cannot.
    pub fn new(
        admitted: &Admitted,
        run_id: &RunId,
        report: Option<&RunReport>,
        error: Option<String>,
        stale_sandboxes_cleaned: Vec<StaleReport>,
        evidence_bundle: &Path,
    ) -> RunData {
        let m = admitted.manifest();
        let d = admitted.decision();
        RunData {
            manifest_jws: String::from_utf8_lossy(admitted.jws()).into_owned(),
            tenant_id: m.tenant.clone(),
            capsule_digest: admitted.digest().to_string(),
            capsule_id: m.capsule_id.clone(),
            version: m.version,
            run_id: Some(run_id.as_str().to_string()),
            policy_version: m.policy_version.clone(),
            approvers: m.approvals.iter().map(|a| a.approver.clone()).collect(),
            decision: DecisionSummary {
                verdict: d.verdict.as_str().to_string(),
                detail: d.detail.clone(),
                kid: d.kid.clone(),
                alg: d.alg.map(|a| a.as_str().to_string()),
            },
            error,
            stdout: report.map(|r| r.stdout.text()),
            stderr: report.map(|r| r.stderr.text()),
            stdout_bytes: report.map(|r| r.stdout.total_bytes),
            stderr_bytes: report.map(|r| r.stderr.total_bytes),
            stdout_truncated: report.map(|r| r.stdout.truncated),
            stderr_truncated: report.map(|r| r.stderr.truncated),
            exit_code: report.map(|r| r.exit_code),
            timed_out: report.map(|r| r.timed_out),
            interrupted: report.map(|r| r.interrupted),
            started_at_ms: report.map(|r| r.started_at_ms),
            duration_ms: report.map(|r| r.duration_ms),
            runtime: report.map(|r| r.runtime.clone()),
            oci_config_sha256: report.map(|r| r.bundle.oci_config_sha256.clone()),
            sandbox: report.map(|r| r.bundle.clone()),
            egress_probe: report.map(|r| r.egress.clone()),
            teardown: report.map(|r| r.teardown.clone()),
            staged: report.map(|r| r.staged.clone()),
            stale_sandboxes_cleaned,
            evidence_bundle: evidence_bundle.display().to_string(),
        }
    }
}

impl SandboxRecord {
    /// `sandbox.json`: the launcher's report of the run, without its outputs and
    /// OCI config (files of their own).
    pub fn new(r: &RunReport) -> SandboxRecord {
        SandboxRecord {
            run_id: r.run_id.clone(),
            container_id: r.container_id.clone(),
            runtime: r.runtime.clone(),
            oci_config_sha256: r.bundle.oci_config_sha256.clone(),
            bundle: r.bundle.clone(),
            egress_probe: r.egress.clone(),
            teardown: r.teardown.clone(),
            staged: r.staged.clone(),
            exit_code: r.exit_code,
            timed_out: r.timed_out,
            interrupted: r.interrupted,
            duration_ms: r.duration_ms,
        }
    }
}

/// RFC 3339 in UTC, as CloudEvents' `time` (`Z`, sub-seconds as needed).
fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

impl Event {
    /// The event of an admitted capsule's run (`completed` or `failed`), under its
    /// run id.
    /// `policy_digest`: the policy in force (`Policy.digests.policy`).
    pub fn run(
        kind: EventType,
        source: &str,
        data: RunData,
        policy_digest: &Sha256Digest,
        time: DateTime<Utc>,
    ) -> Event {
        debug_assert_ne!(kind, EventType::Denied);
        let custody = CustodyAttributes {
            capsule_digest: Some(data.capsule_digest.clone()),
            policy_digest: Some(policy_digest.to_string()),
            tenant_id: Some(data.tenant_id.clone()),
            run_id: data.run_id.clone(),
        };
        Event {
            custody,
            id: data.run_id.clone().unwrap_or_default(),
            source: source.to_string(),
            subject: Some(format!("{}@{}", data.capsule_id, data.version)),
            time: rfc3339(time),
            data: EventData::Run(kind, Box::new(data)),
        }
    }

    /// A `.denied` event: the decision and the digest of the JWS bytes the verifier
    /// read (none when they could not be read). The bytes themselves are never
    /// copied here: they did not verify, and a denied capsule's `capsule.jws` is
    /// whatever its author made it (before issue 10, a symlink put a host file into
    /// the event). `manifest_jws` stays in the schema, always null.
    pub fn denied(
        id: &str,
        source: &str,
        capsule: &str,
        d: &Decision,
        policy_digest: &Sha256Digest,
        time: DateTime<Utc>,
    ) -> Event {
        let r = DecisionRecord::new(capsule, d);
        let custody = CustodyAttributes {
            capsule_digest: r.digest.clone(),
            policy_digest: Some(policy_digest.to_string()),
            tenant_id: r.tenant.clone(),
            run_id: Some(id.to_string()),
        };
        let data = DeniedData {
            tenant_id: r.tenant.clone(),
            capsule_digest: r.digest.clone(),
            manifest_jws: None,
            launched: false,
            capsule: r.capsule,
            verdict: r.verdict,
            reason: r.reason,
            detail: r.detail,
            digest: r.digest,
            capsule_id: r.capsule_id,
            version: r.version,
            tenant: r.tenant,
            kid: r.kid,
            alg: r.alg,
        };
        let subject = match (&d.capsule_id, d.version) {
            (Some(id), Some(v)) => Some(format!("{id}@{v}")),
            _ => None,
        };
        Event {
            id: id.to_string(),
            source: source.to_string(),
            subject,
            time: rfc3339(time),
            custody,
            data: EventData::Denied(Box::new(data)),
        }
    }
}

/// Pretty JSON of one of our types (plain structs: serialising cannot fail, and
/// would be a bug caught by every test that reads a bundle).
fn pretty(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

/// Writes the evidence bundle of one run, `ROOT/<run id>/`: the exact `capsule.jws`
/// and `approvals/*.jws`, `decision.json`, and when the launcher reported `stdout`,
/// `stderr`, `oci-config.json` and `sandbox.json`; then `event.json`, and last the
/// index of them all with its custody signature (`index.json`, `index.sig.json`).
/// Filled under a temporary name and renamed into place (then the root synced), so a
/// bundle is whole or absent.
///
/// A bundle holds the capsule's output and its JWS: readable by the gateway's user
/// only (the root, when it creates it, and each bundle directory 0700, each file
/// 0600, whatever the umask).
pub fn write_bundle(
    root: &Path,
    run_id: &RunId,
    admitted: &Admitted,
    report: Option<&RunReport>,
    event: &Event,
    custody: &Custody,
) -> Result<PathBuf, EvidenceError> {
    create_dirs(root, 0o700)?;
    let mut bundle = IndexedDir::new(StagedDir::new(
        &root.join(run_id.as_str()),
        ".bundle-",
        0o700,
    )?);
    bundle.put("capsule.jws", admitted.jws())?;
    for a in admitted.approvals() {
        bundle.put(&format!("approvals/{}", a.name), &a.jws)?;
    }
    let decision = DecisionRecord::new("capsule", admitted.decision());
    bundle.put("decision.json", &pretty(&decision))?;
    if let Some(r) = report {
        bundle.put("stdout", &r.stdout.bytes)?;
        bundle.put("stderr", &r.stderr.bytes)?;
        bundle.put("oci-config.json", r.oci_config.as_bytes())?;
        bundle.put("sandbox.json", &pretty(&SandboxRecord::new(r)))?;
    }
    bundle.put("event.json", &pretty(&event.to_json()))?;
    let m = admitted.manifest();
    let head = IndexHead {
        kind: IndexKind::Run,
        run_id: run_id.as_str(),
        tenant_id: Some(&m.tenant),
        capsule_digest: Some(admitted.digest().to_string()),
        capsule_kid: admitted.decision().kid.as_deref(),
        approver_kids: admitted
            .signed_approvals()
            .iter()
            .map(|a| a.kid.as_str())
            .collect(),
    };
    bundle.commit(custody, head)
}

/// Writes the smaller bundle of a denial, `ROOT/<id>/`: `decision.json` and the
/// `.denied` `event.json` (digests, never the presented bytes), and their signed
/// index.
pub fn write_denial_bundle(
    root: &Path,
    event: &Event,
    custody: &Custody,
) -> Result<PathBuf, EvidenceError> {
    let EventData::Denied(d) = &event.data else {
        return Err(EvidenceError::Malformed {
            what: "denial bundle".into(),
            detail: "the event is not a denial".into(),
        });
    };
    create_dirs(root, 0o700)?;
    let mut bundle = IndexedDir::new(StagedDir::new(&root.join(&event.id), ".bundle-", 0o700)?);
    let decision = DecisionRecord {
        capsule: d.capsule.clone(),
        verdict: d.verdict.clone(),
        reason: d.reason.clone(),
        detail: d.detail.clone(),
        digest: d.digest.clone(),
        capsule_id: d.capsule_id.clone(),
        version: d.version,
        tenant: d.tenant.clone(),
        kid: d.kid.clone(),
        alg: d.alg.clone(),
    };
    bundle.put("decision.json", &pretty(&decision))?;
    bundle.put("event.json", &pretty(&event.to_json()))?;
    let head = IndexHead {
        kind: IndexKind::Denial,
        run_id: &event.id,
        tenant_id: d.tenant.as_deref(),
        capsule_digest: d.digest.clone(),
        capsule_kid: d.kid.as_deref(),
        approver_kids: Vec::new(),
    };
    bundle.commit(custody, head)
}
