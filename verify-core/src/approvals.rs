//! Signed approvals (`approvals/*.jws`, DESIGN.md "Governance") and the quorum rule.
//!
//! An approval is a compact ES256 JWS by a key in `trust.approvers_jwks`, over
//! `{"schema":"capsule-approval/v1", "capsule_id", "version", "tenant",
//! "manifest_sha256", "role", "approved_at"}`. It names the exact manifest bytes the
//! capsule signs, so it cannot be moved to another capsule or version. Who approved
//! is the identity policy gives the key (`[[approvers]]`), never the payload's text;
//! the role counts only if policy gives that approver that role.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::decision::{Alg, Reason, Sha256Digest};
use crate::digest::{open_dir_at, open_regular_at, read_sized, OpenError};
use crate::manifest::{ApproverId, Manifest};
use crate::policy::{Policy, Tenant};
use crate::rules::Rule;

/// The directory of a capsule that holds its signed approvals.
pub const APPROVALS_DIR: &str = "approvals";
pub const APPROVAL_SCHEMA: &str = "capsule-approval/v1";
/// An approval is a few hundred bytes; anything much larger is not read.
pub const MAX_APPROVAL_BYTES: usize = 16 * 1024;
/// More approvals than any quorum needs is refused unread.
pub const MAX_APPROVALS: usize = 64;

/// The approval payload (wire type; unknown and duplicate members are errors).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalPayload {
    pub schema: String,
    pub capsule_id: String,
    pub version: u64,
    pub tenant: String,
    pub manifest_sha256: String,
    pub role: String,
    pub approved_at: u64,
}

impl ApprovalPayload {
    /// The payload an approver signs for `manifest` (whose exact bytes hash to `digest`).
    pub fn for_manifest(
        manifest: &Manifest,
        digest: Sha256Digest,
        role: &str,
        approved_at: u64,
    ) -> ApprovalPayload {
        ApprovalPayload {
            schema: APPROVAL_SCHEMA.into(),
            capsule_id: manifest.capsule_id.clone(),
            version: manifest.version,
            tenant: manifest.tenant.clone(),
            manifest_sha256: digest.to_string(),
            role: role.into(),
            approved_at,
        }
    }
}

/// One approval file as found in the capsule: its name (for details) and its bytes.
#[derive(Debug, Clone)]
pub struct ApprovalFile {
    pub name: String,
    pub jws: Arc<[u8]>,
}

/// The approval files of a capsule as read, or why they could not be (the denial).
pub type ReadApprovals = Result<Arc<[ApprovalFile]>, (Reason, String)>;

/// An approval that verified: the approver as policy names them and the role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedApproval {
    pub approver: ApproverId,
    pub role: String,
    pub kid: String,
}

/// Reads `approvals/*.jws` beneath an opened capsule directory, sorted by name. No
/// `approvals/` is no approvals. Every file is opened by the capsule's rules (no
/// symlinks, a regular file with one link, its size checked before it is read);
/// names not ending in `.jws` are not read at all.
pub fn read_approvals_at(capsule_dir: impl AsFd) -> Result<Vec<ApprovalFile>, (Reason, String)> {
    let invalid = |why: String| (Reason::ApprovalInvalid, format!("{APPROVALS_DIR}/: {why}"));
    let dir = match open_dir_at(&capsule_dir, APPROVALS_DIR) {
        Ok(fd) => fd,
        Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(invalid(e.to_string())),
    };
    let mut names = Vec::new();
    let entries = rustix::fs::Dir::read_from(&dir).map_err(|e| invalid(e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| invalid(e.to_string()))?;
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".jws") {
            continue;
        }
        names.push(name.to_string());
        if names.len() > MAX_APPROVALS {
            return Err((
                Reason::LimitExceeded,
                format!("more than {MAX_APPROVALS} files in {APPROVALS_DIR}/"),
            ));
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let at = |why: String| {
                (
                    Reason::ApprovalInvalid,
                    format!("{APPROVALS_DIR}/{name}: {why}"),
                )
            };
            let (file, st) = open_regular_at(&dir, &name).map_err(|e| at(e.to_string()))?;
            if st.st_nlink != 1 {
                return Err(at(format!(
                    "has {} hard links; an approval has one",
                    st.st_nlink
                )));
            }
            if u64::try_from(st.st_size).map_or(true, |n| n > MAX_APPROVAL_BYTES as u64 + 1) {
                return Err(at(format!("larger than {MAX_APPROVAL_BYTES} bytes")));
            }
            let size = u64::try_from(st.st_size).unwrap_or(0);
            let bytes = read_sized(&file, size, MAX_APPROVAL_BYTES as u64 + 1)
                .map_err(|e| at(e.to_string()))?;
            let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            Ok(ApprovalFile {
                jws: Arc::from(bytes),
                name: name.clone(),
            })
        })
        .collect()
}

/// Why an approval is refused (`approval_invalid`): one invalid approval denies the
/// capsule. `file` is the name inside `approvals/`; `approver` is who policy says holds
/// the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApprovalError {
    /// The JWS did not verify under the approvers' keys.
    #[error("{APPROVALS_DIR}/{file}: {detail} ({reason})", APPROVALS_DIR = APPROVALS_DIR)]
    Jws {
        file: String,
        reason: Reason,
        detail: String,
    },
    #[error("{APPROVALS_DIR}/{file}: approvals are ES256 only", APPROVALS_DIR = APPROVALS_DIR)]
    NotEs256 { file: String },
    #[error(
        "{APPROVALS_DIR}/{file}: key `{kid}` belongs to no [[approvers]] entry",
        APPROVALS_DIR = APPROVALS_DIR
    )]
    UnknownKey { file: String, kid: String },
    /// The payload is not an approval payload (the JSON error).
    #[error("{APPROVALS_DIR}/{file}: payload: {why}", APPROVALS_DIR = APPROVALS_DIR)]
    Payload { file: String, why: String },
    #[error(
        "{APPROVALS_DIR}/{file} by {approver}: schema must be `{APPROVAL_SCHEMA}`",
        APPROVALS_DIR = APPROVALS_DIR,
        APPROVAL_SCHEMA = APPROVAL_SCHEMA
    )]
    Schema { file: String, approver: ApproverId },
    /// The approval names other manifest bytes (`approved` as the payload has it).
    #[error(
        "{APPROVALS_DIR}/{file} by {approver}: approves manifest {}, this capsule's manifest is {manifest}",
        .approved.escape_debug(),
        APPROVALS_DIR = APPROVALS_DIR
    )]
    OtherManifest {
        file: String,
        approver: ApproverId,
        approved: String,
        manifest: Sha256Digest,
    },
    #[error(
        "{APPROVALS_DIR}/{file} by {approver}: capsule_id, version or tenant differ from the manifest",
        APPROVALS_DIR = APPROVALS_DIR
    )]
    OtherCapsule { file: String, approver: ApproverId },
    #[error(
        "{APPROVALS_DIR}/{file} by {approver}: role `{}` is not one policy gives this approver",
        .role.escape_debug(),
        APPROVALS_DIR = APPROVALS_DIR
    )]
    RoleNotGiven {
        file: String,
        approver: ApproverId,
        role: String,
    },
    #[error(
        "{APPROVALS_DIR}/{file} by {approver}: approved_at {approved_at} is in the future",
        APPROVALS_DIR = APPROVALS_DIR
    )]
    Future {
        file: String,
        approver: ApproverId,
        approved_at: u64,
    },
    /// Two approvals by one approver (each counts once; a second is an attack).
    #[error("{approver} approved twice; each approver signs one approval")]
    Twice { approver: ApproverId },
}

/// Why the counted approvals are no quorum (`approval_insufficient`). `signed_only`:
/// the rule requires signed approvals, so only those were counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuorumError {
    /// `signer_excluded`: the rule says `signer_may_approve = false` and the capsule
    /// signer is an approver.
    #[error(
        "{counted} distinct {}approval(s) other than the author's, {need} required{}",
        kind(*.signed_only),
        if *.signer_excluded { " (the capsule signer's own approval does not count)" } else { "" }
    )]
    TooFew {
        counted: usize,
        need: usize,
        signed_only: bool,
        signer_excluded: bool,
    },
    /// No distinct counted approver is left to hold this role of the rule.
    #[error(
        "role `{role}` needs an approver of its own among the counted {}approvals",
        kind(*.signed_only)
    )]
    RoleUnfilled { role: String, signed_only: bool },
}

fn kind(signed_only: bool) -> &'static str {
    if signed_only {
        "signed "
    } else {
        ""
    }
}

/// Verifies one approval for `manifest`, whose exact bytes hash to `manifest_sha256`.
pub fn verify_approval(
    file: &ApprovalFile,
    policy: &Policy,
    manifest: &Manifest,
    manifest_sha256: Sha256Digest,
    now: u64,
) -> Result<VerifiedApproval, ApprovalError> {
    let name = || file.name.clone();
    let verified = crate::jws::verify(&file.jws, &policy.approvers.keys, MAX_APPROVAL_BYTES)
        .map_err(|f| ApprovalError::Jws {
            file: name(),
            reason: f.reason,
            detail: f.detail,
        })?;
    if verified.alg != Alg::Es256 {
        return Err(ApprovalError::NotEs256 { file: name() });
    }
    let approver =
        policy
            .approvers
            .by_kid(&verified.kid)
            .ok_or_else(|| ApprovalError::UnknownKey {
                file: name(),
                kid: verified.kid.clone(),
            })?;
    let p: ApprovalPayload =
        crate::json::from_slice_strict(&verified.payload).map_err(|e| ApprovalError::Payload {
            file: name(),
            why: e.to_string(),
        })?;
    let by = || approver.id.clone();
    if p.schema != APPROVAL_SCHEMA {
        return Err(ApprovalError::Schema {
            file: name(),
            approver: by(),
        });
    }
    // The digest first: it is the binding; the other fields only make a mistake legible.
    match Sha256Digest::parse(&p.manifest_sha256) {
        Some(d) if d == manifest_sha256 => {}
        _ => {
            return Err(ApprovalError::OtherManifest {
                file: name(),
                approver: by(),
                approved: p.manifest_sha256,
                manifest: manifest_sha256,
            })
        }
    }
    if p.capsule_id != manifest.capsule_id
        || p.version != manifest.version
        || p.tenant != manifest.tenant
    {
        return Err(ApprovalError::OtherCapsule {
            file: name(),
            approver: by(),
        });
    }
    if !approver.roles.contains(&p.role) {
        return Err(ApprovalError::RoleNotGiven {
            file: name(),
            approver: by(),
            role: p.role,
        });
    }
    if p.approved_at > now.saturating_add(policy.clock_skew_s) {
        return Err(ApprovalError::Future {
            file: name(),
            approver: by(),
            approved_at: p.approved_at,
        });
    }
    Ok(VerifiedApproval {
        approver: approver.id.clone(),
        role: p.role,
        kid: verified.kid,
    })
}

/// Verifies every approval file, in order, on the thread that verifies the capsule:
/// in a batch that is the capsule's rayon task, so approvals run in the batch's
/// parallelism beside the other capsules' signatures. A fan-out of its own was slower
/// (benches `governance`, 3 approvals: 289 µs parallel from outside a pool, 219 µs in
/// order; an approval-free admission 62 µs). One invalid approval denies the
/// capsule: a forged or stale approval in a capsule is an attack, not noise. So is
/// one approver twice.
pub fn verify_all(
    files: &[ApprovalFile],
    policy: &Policy,
    manifest: &Manifest,
    manifest_sha256: Sha256Digest,
    now: u64,
) -> Result<Vec<VerifiedApproval>, ApprovalError> {
    let verified: Vec<VerifiedApproval> = files
        .iter()
        .map(|f| verify_approval(f, policy, manifest, manifest_sha256, now))
        .collect::<Result<_, _>>()?;
    let mut seen = HashSet::new();
    if let Some(dup) = verified.iter().find(|a| !seen.insert(&a.approver)) {
        return Err(ApprovalError::Twice {
            approver: dup.approver.clone(),
        });
    }
    Ok(verified)
}

/// The quorum: distinct approvers (never the author; never the capsule signer's
/// identity when the rule says `signer_may_approve = false`), at least
/// `min_approvals`, and each of the rule's roles held by a distinct one of them.
///
/// What counts: signed approvals always; the manifest's unsigned `approvals` entries
/// only when the rule does not require `signed_approvals`, and for a role only when
/// policy gives that approver that role. Identities are canonical (`ApproverId`), so
/// they compare byte for byte.
pub fn check_quorum(
    m: &Manifest,
    tenant: &Tenant,
    rule: Option<&Rule>,
    signed: &[VerifiedApproval],
    signer_kid: &str,
    policy: &Policy,
    now: u64,
) -> Result<(), QuorumError> {
    let signed_only = rule.is_some_and(|r| r.signed_approvals);
    let excluded_signer = match rule {
        Some(r) if !r.signer_may_approve => policy
            .approvers
            .holding_capsule_key(signer_kid)
            .map(|a| a.id.as_str()),
        _ => None,
    };
    // approver -> the roles they approved with that count.
    let mut counted: HashMap<&str, HashSet<&str>> = HashMap::new();
    for a in signed {
        counted
            .entry(a.approver.as_str())
            .or_default()
            .insert(a.role.as_str());
    }
    if !signed_only {
        let skew = policy.clock_skew_s;
        for a in m
            .approvals
            .iter()
            .filter(|a| a.approved_at <= now.saturating_add(skew))
        {
            let roles = counted.entry(a.approver.as_str()).or_default();
            if policy
                .approvers
                .get(&a.approver)
                .is_some_and(|p| p.roles.contains(&a.role))
            {
                roles.insert(a.role.as_str());
            }
        }
    }
    counted.remove(m.author.as_str());
    if let Some(signer) = excluded_signer {
        counted.remove(signer);
    }
    let need = rule
        .and_then(|r| r.min_approvals)
        .unwrap_or(tenant.min_approvals) as usize;
    if counted.len() < need {
        return Err(QuorumError::TooFew {
            counted: counted.len(),
            need,
            signed_only,
            signer_excluded: excluded_signer.is_some(),
        });
    }
    if let Some(r) = rule {
        if let Some(role) = unmatched_role(&r.roles, &counted) {
            return Err(QuorumError::RoleUnfilled {
                role: role.to_string(),
                signed_only,
            });
        }
    }
    Ok(())
}

/// Assigns each required role a distinct approver who holds it (bipartite matching
/// by augmenting paths; the sets are a handful). Returns a role that cannot be had.
fn unmatched_role<'a>(
    roles: &'a [String],
    counted: &HashMap<&str, HashSet<&str>>,
) -> Option<&'a str> {
    let approvers: Vec<&HashSet<&str>> = counted.values().collect();
    // approver index -> role index it is assigned to.
    let mut owner: Vec<Option<usize>> = vec![None; approvers.len()];
    fn augment(
        role: usize,
        roles: &[String],
        approvers: &[&HashSet<&str>],
        owner: &mut [Option<usize>],
        seen: &mut [bool],
    ) -> bool {
        for (i, held) in approvers.iter().enumerate() {
            if seen[i] || !held.contains(roles[role].as_str()) {
                continue;
            }
            seen[i] = true;
            if owner[i].is_none_or(|r| augment(r, roles, approvers, owner, seen)) {
                owner[i] = Some(role);
                return true;
            }
        }
        false
    }
    for role in 0..roles.len() {
        let mut seen = vec![false; approvers.len()];
        if !augment(role, roles, &approvers, &mut owner, &mut seen) {
            return Some(&roles[role]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(
        pairs: &[(&'static str, &[&'static str])],
    ) -> HashMap<&'static str, HashSet<&'static str>> {
        pairs
            .iter()
            .map(|(a, r)| (*a, r.iter().copied().collect()))
            .collect()
    }

    #[test]
    fn each_role_needs_a_distinct_approver() {
        let roles = vec!["sre-lead".to_string(), "security".to_string()];
        // One person holding both roles covers only one.
        assert_eq!(
            unmatched_role(&roles, &held(&[("a", &["sre-lead", "security"])])),
            Some("security")
        );
        // Matching must move `a` to the role only they can fill.
        assert_eq!(
            unmatched_role(
                &roles,
                &held(&[("a", &["sre-lead", "security"]), ("b", &["sre-lead"])])
            ),
            None
        );
        assert_eq!(
            unmatched_role(&roles, &held(&[("a", &["sre-lead"]), ("b", &["sre-lead"])])),
            Some("security")
        );
        assert_eq!(unmatched_role(&[], &held(&[])), None);
    }
}
