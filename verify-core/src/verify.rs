//! The admission pipeline: every check of DESIGN.md, cheapest first, each denial
//! with one reason. Nothing in the payload is parsed before the signature verifies
//! (`jws::verify` returns the payload only after that).

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use crate::approvals::{self, ApprovalFile};
use crate::decision::{Alg, Decision, Reason, Sha256Digest, Verdict};
use crate::digest::{
    open_dir, open_dir_at, open_regular_at, read_sized, ArtifactSource, HashMode, Root,
};
use crate::entrypoint::{self, Head, HeadKeeper};
use crate::index::TenantIndex;
use crate::manifest::{ApproverId, ArtifactPath, FileEntry, Manifest, NOT_A_DIGEST, SCHEMA_V1};
use crate::policy::{Policy, Tenant};
use crate::rules::{Rule, ScopeRuleError, Tier};
use crate::runner::{RunnerPattern, SpiffeId};
use crate::time::Clock;

/// The highest version admitted so far for one (tenant, capsule_id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmittedVersion {
    pub version: u64,
    pub digest: Sha256Digest,
}

/// Why the anti-rollback state could not be read (`state_unavailable`); the
/// implementation's own error, shared so that one failure can deny a whole batch.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct StateReadError(Arc<dyn std::error::Error + Send + Sync>);

impl StateReadError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> StateReadError {
        StateReadError(Arc::new(e))
    }
}

/// Read access to the anti-rollback state (the gateway keeps it durably).
pub trait RollbackView: Sync {
    fn latest(
        &self,
        tenant: &str,
        capsule_id: &str,
    ) -> Result<Option<AdmittedVersion>, StateReadError>;

    /// The latest time (Unix seconds) this state has trusted, if it keeps one: a
    /// clock reading earlier than it, beyond the skew, was stepped back.
    fn last_known_time(&self) -> Result<Option<u64>, StateReadError> {
        Ok(None)
    }

    /// The digest admitted for `version` of a capsule, when the state knows it (for
    /// lineage). By default the highest admitted version is the one known: enough for
    /// the rule, since anything below the highest is a rollback anyway.
    fn admitted_digest(
        &self,
        tenant: &str,
        capsule_id: &str,
        version: u64,
    ) -> Result<Option<Sha256Digest>, StateReadError> {
        Ok(self
            .latest(tenant, capsule_id)?
            .filter(|l| l.version == version)
            .map(|l| l.digest))
    }

    /// The highest tenant-index version this runner has accepted for `tenant`.
    fn highest_index_version(&self, _tenant: &str) -> Result<Option<u64>, StateReadError> {
        Ok(None)
    }
}

/// No history: every version is new (for `verify` without `--state`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHistory;

impl RollbackView for NoHistory {
    fn latest(&self, _: &str, _: &str) -> Result<Option<AdmittedVersion>, StateReadError> {
        Ok(None)
    }
}

/// Why a version may not be admitted (`rollback`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RollbackError {
    #[error("version {version} is below the highest admitted version {highest}")]
    Below { version: u64, highest: u64 },
    #[error("version {version} was already admitted with other bytes ({admitted})")]
    Equivocation {
        version: u64,
        admitted: Sha256Digest,
    },
}

/// The anti-rollback rule. A lower version than the highest admitted is a rollback.
/// The same version is admitted again only with the same bytes: a second, different
/// capsule under an already admitted version is an equivocation and is refused too.
pub fn check_rollback(
    latest: Option<AdmittedVersion>,
    version: u64,
    digest: Sha256Digest,
) -> Result<(), RollbackError> {
    match latest {
        Some(l) if version < l.version => Err(RollbackError::Below {
            version,
            highest: l.version,
        }),
        Some(l) if version == l.version && digest != l.digest => Err(RollbackError::Equivocation {
            version,
            admitted: l.digest,
        }),
        _ => Ok(()),
    }
}

/// The clock reads earlier than the state's last-known time, beyond the skew
/// (`clock_rollback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the clock reads {now}, {behind} s before the last-known time {last_known} this state \
     recorded (clock_skew_s {skew}): the clock was stepped back",
    behind = .last_known - .now
)]
pub struct ClockRollback {
    pub now: u64,
    pub last_known: u64,
    pub skew: u64,
}

/// The last-known-time rule (as tough keeps its datastore time): a clock that reads
/// earlier than the latest time the state trusted, less the skew, would re-open
/// capsules that have expired, so nothing is admitted by it.
pub fn check_clock(now: u64, last_known: Option<u64>, skew: u64) -> Result<(), ClockRollback> {
    match last_known {
        Some(last_known) if now.saturating_add(skew) < last_known => Err(ClockRollback {
            now,
            last_known,
            skew,
        }),
        _ => Ok(()),
    }
}

/// A capsule as handed to the verifier: the JWS bytes (or where to read them, or why
/// they could not be read) and where its files are.
#[derive(Debug, Clone)]
pub struct Capsule {
    jws: Jws,
    source: ArtifactSource,
    /// The artifact root, opened when the capsule was loaded (`None`: opened at
    /// verification). Pinning it means a later rename or swap of the directory
    /// cannot redirect what is verified.
    root: Option<Result<Arc<Root>, (Reason, String)>>,
    /// Signed approvals (`approvals/*.jws`), read when the capsule was pinned or
    /// handed over (`None`: read from the capsule directory at verification).
    approvals: Option<approvals::ReadApprovals>,
}

#[derive(Debug, Clone)]
enum Jws {
    Bytes(Arc<[u8]>),
    Failed((Reason, String)),
    /// `DIR/capsule.jws`, read when the capsule is verified (on the verifier's pool):
    /// no descriptor is held per capsule of a batch and an odd file stalls nobody.
    Dir {
        dir: PathBuf,
        max_jws_bytes: usize,
    },
}

/// Name of the JWS file in a capsule directory.
pub const JWS_FILE: &str = "capsule.jws";
/// Name of the artifact directory in a capsule directory.
pub const FILES_DIR: &str = "files";

impl Capsule {
    /// A capsule from JWS bytes already in memory (one trailing newline tolerated).
    pub fn from_bytes(jws: &[u8], source: ArtifactSource) -> Capsule {
        Capsule {
            jws: Jws::Bytes(Arc::from(strip_newline(jws))),
            source,
            root: None,
            approvals: None,
        }
    }

    /// Hands over the capsule's signed approvals (a service receives them with the JWS).
    pub fn with_approvals(mut self, approvals: Vec<ApprovalFile>) -> Capsule {
        self.approvals = Some(Ok(approvals.into()));
        self
    }

    /// Opens the artifact root now (a service pins its blob store once, a CLI pins
    /// each capsule's `files/` when it loads it). A capsule directory is opened once:
    /// its `capsule.jws` is read and its `files/` opened beneath that descriptor.
    pub fn pinned(mut self) -> Capsule {
        if let Jws::Dir { dir, max_jws_bytes } = &self.jws {
            match open_capsule(dir, *max_jws_bytes) {
                Ok(opened) => {
                    self.jws = Jws::Bytes(opened.jws);
                    self.approvals = Some(approvals::read_approvals_at(&opened.dir).map(Arc::from));
                    self.root = Some(open_files_at(opened.dir, &self.source).map(Arc::new));
                }
                Err(e) => self.jws = Jws::Failed(e),
            }
            return self;
        }
        self.root = Some(open_root(&self.source).map(Arc::new));
        self
    }

    /// Uses an artifact root that is already open (shared by many capsules).
    pub fn with_root(mut self, root: Arc<Root>) -> Capsule {
        self.root = Some(Ok(root));
        self
    }

    /// A capsule directory: `DIR/capsule.jws` (at most `max_jws_bytes`, plus one
    /// newline) and the files in `DIR/files/`. Nothing is opened here: the JWS is
    /// read when the capsule is verified, and a capsule that cannot be read is a
    /// `capsule_unreadable` denial then, so one bad capsule never stops a batch.
    pub fn from_dir(dir: &Path, max_jws_bytes: usize) -> Capsule {
        Capsule {
            jws: Jws::Dir {
                dir: dir.to_path_buf(),
                max_jws_bytes,
            },
            source: ArtifactSource::Dir(dir.join(FILES_DIR)),
            root: None,
            approvals: None,
        }
    }

    /// The JWS bytes, when they are already in memory.
    pub fn jws(&self) -> Option<&[u8]> {
        match &self.jws {
            Jws::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn source(&self) -> &ArtifactSource {
        &self.source
    }
}

/// Opens a capsule directory (the last component not a symlink) and reads its
/// `capsule.jws` beneath it by the rules of [`open_regular_at`]: a regular file with
/// one link, its size checked on the descriptor before a byte is read. Returns the
/// bytes (one trailing newline stripped) and the directory, for `files/`.
pub fn open_capsule(dir: &Path, max_jws_bytes: usize) -> Result<OpenedCapsule, (Reason, String)> {
    let unreadable = |what: &Path, why: String| {
        (
            Reason::CapsuleUnreadable,
            format!("{}: {why}", what.display()),
        )
    };
    let dir_fd = open_dir(dir).map_err(|e| unreadable(dir, describe_dir_error(dir, &e)))?;
    let path = dir.join(JWS_FILE);
    let (file, st) =
        open_regular_at(&dir_fd, JWS_FILE).map_err(|e| unreadable(&path, e.to_string()))?;
    // Another name for the same inode may be a host file linked in: not read.
    if st.st_nlink != 1 {
        return Err(unreadable(
            &path,
            format!("has {} hard links; a capsule's JWS has one", st.st_nlink),
        ));
    }
    // One newline past the limit is tolerated; anything larger is refused unread.
    let limit = max_jws_bytes as u64 + 1;
    if u64::try_from(st.st_size).map_or(true, |n| n > limit) {
        return Err((
            Reason::LimitExceeded,
            format!("{}: larger than {max_jws_bytes} bytes", path.display()),
        ));
    }
    // One `read` of its size and a byte more; on past the limit only if it grew.
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let bytes = read_sized(&file, size, limit).map_err(|e| unreadable(&path, e.to_string()))?;
    let bytes = strip_newline(&bytes);
    if bytes.len() > max_jws_bytes {
        return Err((
            Reason::LimitExceeded,
            format!("{}: larger than {max_jws_bytes} bytes", path.display()),
        ));
    }
    Ok(OpenedCapsule {
        jws: Arc::from(bytes),
        dir: dir_fd,
    })
}

/// A capsule directory, opened, and the JWS read from it.
#[derive(Debug)]
pub struct OpenedCapsule {
    pub jws: Arc<[u8]>,
    pub dir: OwnedFd,
}

/// Why a capsule directory did not open, in words (`lstat` is asked only now).
fn describe_dir_error(dir: &Path, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) => "is a symlink, not a directory".into(),
        Some(libc::ENOTDIR) => match std::fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_symlink() => "is a symlink, not a directory".into(),
            Ok(_) => "is not a directory".into(),
            Err(_) => e.to_string(),
        },
        _ => e.to_string(),
    }
}

/// `files/` beneath an opened capsule directory (a pinned capsule holds it open).
fn open_files_at(dir_fd: OwnedFd, source: &ArtifactSource) -> Result<Root, (Reason, String)> {
    open_dir_at(&dir_fd, FILES_DIR)
        .map(Root::from_dir_fd)
        .map_err(|e| files_dir_denial(e, source))
}

/// `files/` as a prefix of the paths resolved beneath the capsule directory.
const FILES_PREFIX: &str = "files/";

/// Why `files/` did not open: the denial of every artifact.
fn files_dir_denial(e: crate::digest::OpenError, source: &ArtifactSource) -> (Reason, String) {
    let where_ = match source {
        ArtifactSource::Dir(p) | ArtifactSource::Blobs(p) => p.display().to_string(),
    };
    let reason = if e.is_refusal() {
        Reason::ArtifactPathInvalid
    } else {
        Reason::ArtifactMissing
    };
    (reason, format!("{where_}: {e}"))
}

fn strip_newline(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\n").unwrap_or(bytes)
}

/// A capsule that passed every check. Only this crate can build one: its fields are
/// private and there is no constructor outside `Verifier`, so a launcher that takes
/// `Admitted` cannot be handed anything unverified.
#[derive(Debug, Clone)]
pub struct Admitted {
    decision: Decision,
    /// The sha256 of `jws`, computed once when it was read.
    digest: Sha256Digest,
    manifest: Arc<Manifest>,
    jws: Arc<[u8]>,
    files: Arc<[FileEntry]>,
    source: ArtifactSource,
    /// Staged files the kernel executes: the entrypoint and its `#!` interpreters.
    executed: Arc<[ArtifactPath]>,
    /// The signed approvals as read (evidence keeps their exact bytes) and what each
    /// verified as, in the same order.
    approvals: Arc<[ApprovalFile]>,
    signed_approvals: Arc<[approvals::VerifiedApproval]>,
}

impl Admitted {
    pub fn decision(&self) -> &Decision {
        &self.decision
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The exact JWS bytes that were verified.
    pub fn jws(&self) -> &[u8] {
        &self.jws
    }
    /// The sha256 of the exact JWS bytes that were verified.
    pub fn digest(&self) -> Sha256Digest {
        self.digest
    }
    /// Every artifact and tool, with the digest it was verified against.
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }
    pub fn source(&self) -> &ArtifactSource {
        &self.source
    }
    /// Whether a staged file may be executable in the sandbox: a tool (its digest
    /// is in the armory), the entrypoint, or a `#!` interpreter on its way. Every
    /// other artifact is data.
    pub fn is_executable(&self, entry: &FileEntry) -> bool {
        entry.is_tool || self.executed.contains(&entry.path)
    }
    pub fn into_decision(self) -> Decision {
        self.decision
    }
    /// The `approvals/*.jws` files that were verified, as read.
    pub fn approvals(&self) -> &[ApprovalFile] {
        &self.approvals
    }
    /// What each of [`Admitted::approvals`] verified as (approver, role, kid).
    pub fn signed_approvals(&self) -> &[approvals::VerifiedApproval] {
        &self.signed_approvals
    }
}

/// Everything a verification needs besides the capsule.
#[derive(Clone, Copy)]
pub struct Verifier<'a> {
    pub policy: &'a Policy,
    pub clock: &'a dyn Clock,
    pub rollback: &'a dyn RollbackView,
    /// This runner's SPIFFE ID; `None` denies any manifest that names runners.
    pub runner: Option<&'a SpiffeId>,
    pub hash_mode: HashMode,
    /// Tenant indexes and the host's sandbox tiers (DESIGN.md "Governance").
    pub governance: Governance<'a>,
}

/// What the governance rules need from the host: the tenant indexes presented (each
/// already signature-checked by [`TenantIndex::verify`]) and the sandbox tiers this
/// host can launch. The default is no index and no tier.
#[derive(Debug, Clone, Copy, Default)]
pub struct Governance<'a> {
    pub indexes: &'a [TenantIndex],
    pub host_tiers: &'a [Tier],
}

impl std::fmt::Debug for Verifier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("policy", &self.policy.source)
            .field("runner", &self.runner)
            .field("hash_mode", &self.hash_mode)
            .field("host_tiers", &self.governance.host_tiers)
            .finish_non_exhaustive()
    }
}

/// A denial under construction: the facts learned so far travel with it.
struct Facts {
    digest: Option<Sha256Digest>,
    capsule_id: Option<String>,
    version: Option<u64>,
    tenant: Option<String>,
    kid: Option<String>,
    alg: Option<Alg>,
}

impl Facts {
    fn deny(&self, reason: Reason, detail: impl Into<String>) -> Decision {
        self.decision(Verdict::Deny, Some(reason), detail.into())
    }

    fn decision(&self, verdict: Verdict, reason: Option<Reason>, detail: String) -> Decision {
        Decision {
            verdict,
            reason,
            detail,
            digest: self.digest,
            capsule_id: self.capsule_id.clone(),
            version: self.version,
            tenant: self.tenant.clone(),
            kid: self.kid.clone(),
            alg: self.alg,
        }
    }
}

impl Verifier<'_> {
    /// Verifies a batch on the current rayon pool; decisions come back in input
    /// order, and one capsule's failure never touches another's verdict.
    pub fn admit_batch(&self, capsules: &[Capsule]) -> Vec<Decision> {
        capsules
            .par_iter()
            .map(|c| match self.verify(c) {
                Ok(a) => a.decision,
                Err(d) => d,
            })
            .collect()
    }

    /// Like [`Verifier::admit_batch`], keeping the admitted capsules.
    pub fn verify_batch(&self, capsules: &[Capsule]) -> Vec<Result<Admitted, Decision>> {
        capsules.par_iter().map(|c| self.verify(c)).collect()
    }

    /// Runs every check on one capsule.
    pub fn verify(&self, capsule: &Capsule) -> Result<Admitted, Decision> {
        let policy = self.policy;
        // A capsule directory is opened once; its `files/` is opened beneath it.
        let (jws, dir_fd) = match &capsule.jws {
            Jws::Bytes(bytes) => (bytes.clone(), None),
            Jws::Failed((reason, detail)) => {
                return Err(Decision::deny_unread(*reason, detail.clone()))
            }
            Jws::Dir { dir, max_jws_bytes } => match open_capsule(dir, *max_jws_bytes) {
                Ok(opened) => (opened.jws, Some(opened.dir)),
                Err((reason, detail)) => return Err(Decision::deny_unread(reason, detail)),
            },
        };
        let digest = Sha256Digest(policy.backend.sha256_oneshot(&jws));
        let mut facts = Facts {
            digest: Some(digest),
            capsule_id: None,
            version: None,
            tenant: None,
            kid: None,
            alg: None,
        };

        // 1. Signature, by the trust store's key for this kid (JWS rules, DESIGN.md),
        // 2. then the manifest, now that its bytes are authentic. The one step the
        // verification cache may answer: keyed by (digest, the key), it skips only
        // these two; every check below runs on every admission (verify_cache.rs).
        let verified =
            policy
                .verify_cache()
                .verify(&jws, digest, &policy.keys, policy.limits.max_jws_bytes);
        let verified = match verified {
            Ok(v) => v,
            Err(f) => {
                facts.kid = f.kid;
                facts.alg = f.alg;
                return Err(facts.deny(f.reason, f.detail));
            }
        };
        facts.kid = Some(verified.kid.clone());
        facts.alg = Some(verified.alg);
        let manifest = verified.manifest.clone();
        facts.capsule_id = Some(manifest.capsule_id.clone());
        facts.version = Some(manifest.version);
        facts.tenant = Some(manifest.tenant.clone());
        check_shape(&manifest).map_err(|e| facts.deny(Reason::MalformedManifest, e.to_string()))?;
        let files = self
            .check_files(&manifest)
            .map_err(|(r, e)| facts.deny(r, e))?;

        // 3. Tenant and key binding: the kid must be one this tenant signs with.
        let tenant = policy.tenants.get(&manifest.tenant).ok_or_else(|| {
            facts.deny(
                Reason::TenantUnknown,
                format!("tenant `{}` is not in the policy", manifest.tenant),
            )
        })?;
        if !tenant.keys.contains(&verified.kid) {
            return Err(facts.deny(
                Reason::TenantKeyMismatch,
                format!(
                    "key `{}` may not sign for tenant `{}`",
                    verified.kid, tenant.name
                ),
            ));
        }
        if manifest.policy_version != policy.policy_version {
            return Err(facts.deny(
                Reason::PolicyMismatch,
                format!(
                    "manifest names policy {}, the policy in force is {}",
                    manifest.policy_version, policy.policy_version
                ),
            ));
        }

        // 4. The clock, then the validity window, with the policy's clock skew either way.
        let now = self.clock.now_unix();
        let skew = policy.clock_skew_s;
        // A clock stepped back behind what the state has trusted would re-open capsules
        // that expired: nothing is judged by it.
        let last_known = self
            .rollback
            .last_known_time()
            .map_err(|e| facts.deny(Reason::StateUnavailable, e.to_string()))?;
        check_clock(now, last_known, skew)
            .map_err(|e| facts.deny(Reason::ClockRollback, e.to_string()))?;
        if manifest.not_before > now.saturating_add(skew)
            || manifest.issued_at > now.saturating_add(skew)
        {
            return Err(facts.deny(
                Reason::NotYetValid,
                format!(
                    "not valid before {} (now {now})",
                    manifest.not_before.max(manifest.issued_at)
                ),
            ));
        }
        if now >= manifest.expires_at.saturating_add(skew) {
            return Err(facts.deny(
                Reason::Expired,
                format!("expired at {} (now {now})", manifest.expires_at),
            ));
        }

        // 5. Runner, scope (with the environment's rule), tier, tools, approvals.
        let rule = tenant.rule_for(&manifest.scope.environment);
        self.check_runner(&manifest, tenant)
            .map_err(|e| facts.deny(Reason::RunnerNotAllowed, e.to_string()))?;
        check_scope(&manifest, tenant, rule)
            .map_err(|e| facts.deny(Reason::ScopeViolation, e.to_string()))?;
        if let Some(rule) = rule {
            rule.check_tier(self.governance.host_tiers)
                .map_err(|e| facts.deny(Reason::TierUnavailable, e.to_string()))?;
        }
        check_tools(&files, tenant)
            .map_err(|e| facts.deny(Reason::ToolNotAuthorized, e.to_string()))?;
        let program = entrypoint::check_program(&manifest, &files, tenant)
            .map_err(|e| facts.deny(Reason::ToolNotAuthorized, e.to_string()))?;
        let approval_files = match (&capsule.approvals, &dir_fd) {
            (Some(read), _) => read.clone(),
            (None, Some(fd)) => approvals::read_approvals_at(fd).map(Arc::from),
            (None, None) => Ok(Arc::from(Vec::new())),
        }
        .map_err(|(r, e)| facts.deny(r, e))?;
        // The approval-free path hashes nothing more.
        let signed = if approval_files.is_empty() {
            Vec::new()
        } else {
            let manifest_sha256 = Sha256Digest(policy.backend.sha256_oneshot(&verified.payload));
            approvals::verify_all(&approval_files, policy, &manifest, manifest_sha256, now)
                .map_err(|e| facts.deny(Reason::ApprovalInvalid, e.to_string()))?
        };
        approvals::check_quorum(&manifest, tenant, rule, &signed, &verified.kid, policy, now)
            .map_err(|e| facts.deny(Reason::ApprovalInsufficient, e.to_string()))?;

        // 6. Anti-rollback against the highest admitted version.
        let latest = self
            .rollback
            .latest(&manifest.tenant, &manifest.capsule_id)
            .map_err(|e| facts.deny(Reason::StateUnavailable, e.to_string()))?;
        check_rollback(latest, manifest.version, digest)
            .map_err(|e| facts.deny(Reason::Rollback, e.to_string()))?;
        self.check_lineage(&manifest)
            .map_err(|(r, e)| facts.deny(r, e))?;
        self.check_index(&manifest, tenant, digest, now)
            .map_err(|(r, e)| facts.deny(r, e))?;

        // 7. Every artifact and tool, hashed in parallel: the expensive step goes last.
        let heads = self
            .check_artifacts(capsule, dir_fd, &files)
            .map_err(|(r, e)| facts.deny(r, e))?;
        // The `#!` lines, from the bytes that were just verified.
        let executed = entrypoint::check_interpreters(program, &files, &heads, tenant)
            .map_err(|e| facts.deny(Reason::ToolNotAuthorized, e.to_string()))?;

        let detail = format!(
            "signed by {} ({}), {} file(s) verified",
            verified.kid,
            verified.alg.as_str(),
            files.len()
        );
        Ok(Admitted {
            decision: facts.decision(Verdict::Admit, None, detail),
            digest,
            manifest,
            jws,
            files: files.into(),
            source: capsule.source.clone(),
            executed: executed.into(),
            approvals: approval_files,
            signed_approvals: signed.into(),
        })
    }

    /// Lineage: version 1 has no parent; version N names the digest admitted for N-1
    /// whenever the state knows it. An unknown predecessor (never admitted here, or
    /// state without it) is not judged: the tenant index covers a runner with no
    /// history.
    fn check_lineage(&self, m: &Manifest) -> Result<(), (Reason, String)> {
        if m.version == 1 {
            return match &m.parent {
                None => Ok(()),
                Some(_) => Err((
                    Reason::LineageBroken,
                    "version 1 has no predecessor; its parent must be null".into(),
                )),
            };
        }
        let known = self
            .rollback
            .admitted_digest(&m.tenant, &m.capsule_id, m.version - 1)
            .map_err(|e| (Reason::StateUnavailable, e.to_string()))?;
        let Some(predecessor) = known else {
            return Ok(());
        };
        // `check_shape` made `parent` a digest for every version after 1.
        let parent = m.parent.as_deref().and_then(Sha256Digest::parse);
        if parent != Some(predecessor) {
            return Err((
                Reason::LineageBroken,
                format!(
                    "parent {} is not {predecessor}, the digest admitted for version {}",
                    m.parent.as_deref().map_or("null".into(), truncate),
                    m.version - 1
                ),
            ));
        }
        Ok(())
    }

    /// The tenant index: required where policy says so, fresh, and not naming a
    /// higher version of this capsule.
    fn check_index(
        &self,
        m: &Manifest,
        tenant: &Tenant,
        digest: Sha256Digest,
        now: u64,
    ) -> Result<(), (Reason, String)> {
        let index = self
            .governance
            .indexes
            .iter()
            .filter(|i| i.tenant == m.tenant)
            .max_by_key(|i| i.version);
        let Some(index) = index else {
            return match &tenant.index {
                Some(rule) if rule.required => Err((
                    Reason::IndexStale,
                    format!(
                        "tenant `{}` requires a tenant index and none was given",
                        tenant.name
                    ),
                )),
                _ => Ok(()),
            };
        };
        let seen = self
            .rollback
            .highest_index_version(&m.tenant)
            .map_err(|e| (Reason::StateUnavailable, e.to_string()))?;
        index
            .check_fresh(now, self.policy.clock_skew_s, seen)
            .map_err(|e| (Reason::IndexStale, e.to_string()))?;
        index
            .check_current(&m.capsule_id, m.version, digest)
            .map_err(|e| (Reason::Superseded, e.to_string()))
    }

    /// Paths, digests, sizes and counts of every artifact and tool.
    fn check_files(&self, m: &Manifest) -> Result<Vec<FileEntry>, (Reason, String)> {
        let limits = &self.policy.limits;
        let count = m.artifacts.len() + m.tools.len();
        if count > limits.max_artifacts {
            return Err((
                Reason::LimitExceeded,
                format!(
                    "{count} artifacts and tools, the limit is {}",
                    limits.max_artifacts
                ),
            ));
        }
        let sandbox = [
            ("timeout_ms", m.limits.timeout_ms, limits.max_timeout_ms),
            ("memory_mib", m.limits.memory_mib, limits.max_memory_mib),
            ("pids", m.limits.pids, limits.max_pids),
        ];
        for (name, asked, max) in sandbox {
            if asked > max {
                return Err((
                    Reason::LimitExceeded,
                    format!("limits.{name} {asked} exceeds the policy's {max}"),
                ));
            }
        }
        let entries = m
            .artifacts
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    ("artifacts", i),
                    a.path.as_str(),
                    a.sha256.as_str(),
                    a.size,
                    false,
                )
            })
            .chain(m.tools.iter().enumerate().map(|(i, t)| {
                (
                    ("tools", i),
                    t.path.as_str(),
                    t.sha256.as_str(),
                    t.size,
                    true,
                )
            }));
        let mut seen = HashSet::with_capacity(count);
        let mut files = Vec::with_capacity(count);
        for ((list, i), path, sha, size, is_tool) in entries {
            let parsed = ArtifactPath::parse(path).map_err(|e| {
                (
                    Reason::ArtifactPathInvalid,
                    format!("`{}`: {e}", truncate(path)),
                )
            })?;
            if !seen.insert(parsed.clone()) {
                return Err((
                    Reason::ArtifactPathInvalid,
                    format!("`{path}` is named twice"),
                ));
            }
            // Either spelling; anything else is a format problem, not a mismatch.
            let sha256 = Sha256Digest::parse(sha).ok_or_else(|| {
                (
                    Reason::MalformedManifest,
                    format!("{list}[{i}].sha256: {NOT_A_DIGEST}"),
                )
            })?;
            if size > limits.max_artifact_bytes {
                return Err((
                    Reason::LimitExceeded,
                    format!(
                        "`{path}` is {size} bytes, the limit is {}",
                        limits.max_artifact_bytes
                    ),
                ));
            }
            files.push(FileEntry {
                path: parsed,
                sha256,
                size,
                is_tool,
            });
        }
        Ok(files)
    }

    fn check_runner(&self, m: &Manifest, tenant: &Tenant) -> Result<(), RunnerError> {
        let Some(runner) = self.runner else {
            // Without an identity nothing can match a restriction: the tenant's runners
            // apply whatever the manifest says (an empty or missing `runners` included).
            if !tenant.runners.is_empty() {
                return Err(RunnerError::TenantNeedsIdentity {
                    tenant: tenant.name.clone(),
                });
            }
            if !m.runners.is_empty() {
                return Err(RunnerError::ManifestNeedsIdentity);
            }
            return Ok(());
        };
        // Both the manifest (what the approvers allowed) and the tenant policy (what the
        // operator allows) must let this runner in.
        let manifest_ok = m.runners.is_empty()
            || m.runners
                .iter()
                .filter_map(|r| RunnerPattern::parse(r).ok())
                .any(|p| p.matches(runner));
        if !manifest_ok {
            return Err(RunnerError::NotInManifest {
                runner: runner.clone(),
            });
        }
        if !tenant.runners.is_empty() && !tenant.runners.iter().any(|p| p.matches(runner)) {
            return Err(RunnerError::NotForTenant {
                runner: runner.clone(),
                tenant: tenant.name.clone(),
            });
        }
        Ok(())
    }

    /// Returns the first bytes of every file as they were hashed (for `#!` lines).
    fn check_artifacts(
        &self,
        capsule: &Capsule,
        dir_fd: Option<OwnedFd>,
        files: &[FileEntry],
    ) -> Result<Vec<Head>, (Reason, String)> {
        let heads: Vec<Head> = files.iter().map(|_| Head::default()).collect();
        if files.is_empty() {
            return Ok(heads);
        }
        let opened;
        let root = match (&capsule.root, dir_fd) {
            (Some(Ok(root)), _) => root.as_ref(),
            (Some(Err(e)), _) => return Err(e.clone()),
            // `files/<path>` beneath the capsule directory: no descriptor for `files/`.
            (None, Some(fd)) => {
                opened = Root::files_of_capsule(fd, FILES_PREFIX);
                &opened
            }
            (None, None) => {
                opened = open_root(&capsule.source)?;
                &opened
            }
        };
        // A failure because of `files/` itself is denied as when it was opened alone.
        let files_first = |failure: (Reason, String)| match root.prefix_error() {
            Some(e) => files_dir_denial(e, &capsule.source),
            None => failure,
        };
        let backend = self.policy.backend;
        let check = |(f, head): (&FileEntry, &Head)| {
            root.check(f, self.hash_mode, &HeadKeeper::new(backend, head.clone()))
        };
        // Handing work to the pool costs tens of microseconds when called from outside
        // it (measured: two tiny files 120 µs outside a pool, 79 µs inside): small
        // capsules are hashed in order on this thread, large ones in parallel.
        let total: u64 = files.iter().map(|f| f.size).sum();
        if files.len() == 1 || total <= crate::digest::MMAP_THRESHOLD_BYTES {
            files
                .iter()
                .zip(&heads)
                .try_for_each(check)
                .map_err(files_first)?;
            return Ok(heads);
        }
        // The first failure in manifest order is the one reported, whatever finishes first.
        match files
            .par_iter()
            .zip(heads.par_iter())
            .find_map_first(|f| check(f).err())
        {
            Some(failure) => Err(files_first(failure)),
            None => Ok(heads),
        }
    }
}

/// Opens an artifact root; a failure is the denial every artifact would get.
fn open_root(source: &ArtifactSource) -> Result<Root, (Reason, String)> {
    source.open().map_err(|e| {
        let where_ = match source {
            ArtifactSource::Dir(p) | ArtifactSource::Blobs(p) => p.display().to_string(),
        };
        let reason = if e.raw_os_error() == Some(libc::ELOOP) {
            Reason::ArtifactPathInvalid
        } else {
            Reason::ArtifactMissing
        };
        (reason, format!("{where_}: {e}"))
    })
}

/// Why a manifest breaks a structural rule of manifest v1 (`malformed_manifest`).
/// Names and values from the manifest are cut to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    #[error("schema must be `{SCHEMA_V1}`")]
    Schema,
    #[error("capsule_id must be 1 to 128 of [A-Za-z0-9._-]")]
    CapsuleId,
    #[error("tenant must be 1 to 128 of [A-Za-z0-9._-]")]
    Tenant,
    #[error("version starts at 1")]
    VersionZero,
    #[error("parent is required after version 1")]
    ParentMissing,
    #[error("parent: {NOT_A_DIGEST}")]
    ParentNotADigest,
    #[error("expires_at must be after not_before")]
    Window,
    #[error("entrypoint must name a program")]
    NoEntrypoint,
    #[error("limits must be positive")]
    Limits,
    #[error("env name `{0}` is not [A-Za-z_][A-Za-z0-9_]*")]
    EnvName(String),
    #[error("NUL in env or entrypoint")]
    Nul,
    #[error("runner `{pattern}`: {why}")]
    Runner { pattern: String, why: String },
    #[error("author: {0}")]
    Author(String),
    #[error("approvals[{index}].approver: {why}")]
    Approver { index: usize, why: String },
    #[error("tool name must not be empty")]
    ToolName,
}

/// Structural rules of manifest v1 that serde alone does not express (also used by
/// `pack`, so that nothing is signed that the verifier would call malformed).
pub fn check_shape(m: &Manifest) -> Result<(), ShapeError> {
    if m.schema != SCHEMA_V1 {
        return Err(ShapeError::Schema);
    }
    if !valid_name(&m.capsule_id) {
        return Err(ShapeError::CapsuleId);
    }
    if !valid_name(&m.tenant) {
        return Err(ShapeError::Tenant);
    }
    if m.version == 0 {
        return Err(ShapeError::VersionZero);
    }
    match &m.parent {
        None if m.version > 1 => return Err(ShapeError::ParentMissing),
        Some(p) if Sha256Digest::parse(p).is_none() => return Err(ShapeError::ParentNotADigest),
        _ => {}
    }
    if m.expires_at <= m.not_before {
        return Err(ShapeError::Window);
    }
    if m.entrypoint.is_empty() || m.entrypoint[0].is_empty() {
        return Err(ShapeError::NoEntrypoint);
    }
    if m.limits.timeout_ms == 0 || m.limits.memory_mib == 0 || m.limits.pids == 0 {
        return Err(ShapeError::Limits);
    }
    for key in m.env.0.keys() {
        let ok = !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !key.as_bytes()[0].is_ascii_digit();
        if !ok {
            return Err(ShapeError::EnvName(truncate(key)));
        }
    }
    if m.env
        .0
        .values()
        .chain(m.entrypoint.iter())
        .any(|v| v.contains('\0'))
    {
        return Err(ShapeError::Nul);
    }
    for r in &m.runners {
        RunnerPattern::parse(r).map_err(|e| ShapeError::Runner {
            pattern: truncate(r),
            why: e.to_string(),
        })?;
    }
    ApproverId::parse(&m.author).map_err(|e| ShapeError::Author(e.to_string()))?;
    for (i, a) in m.approvals.iter().enumerate() {
        ApproverId::parse(&a.approver).map_err(|e| ShapeError::Approver {
            index: i,
            why: e.to_string(),
        })?;
    }
    if m.tools.iter().any(|t| t.name.is_empty()) {
        return Err(ShapeError::ToolName);
    }
    Ok(())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why this runner may not run the capsule (`runner_not_allowed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    #[error("tenant `{tenant}` allows only named runners and this runner has no SPIFFE ID")]
    TenantNeedsIdentity { tenant: String },
    #[error("the manifest names runners and this runner has no SPIFFE ID")]
    ManifestNeedsIdentity,
    #[error("runner {runner} is not named by the manifest")]
    NotInManifest { runner: SpiffeId },
    #[error("runner {runner} is not allowed for tenant `{tenant}`")]
    NotForTenant { runner: SpiffeId, tenant: String },
}

/// Why the requested scope is refused (`scope_violation`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeError {
    #[error("environment `{environment}` is not allowed for tenant `{tenant}`")]
    Environment { environment: String, tenant: String },
    /// Outside what the environment's rule (`[[tenants.rules]]`) allows.
    #[error(transparent)]
    Rule(#[from] ScopeRuleError),
    #[error("network `{0}` requested; only `none` is allowed")]
    Network(String),
    /// `scope.network = "targets"` with an empty `scope.targets`.
    #[error("network `targets` requested with no `scope.targets`")]
    NoTargets,
    /// A target the sandbox cannot open as a destination.
    #[error("target `{}`: {source}", .target.escape_debug())]
    Target {
        target: String,
        #[source]
        source: crate::net_target::NetTargetError,
    },
}

fn check_scope(m: &Manifest, tenant: &Tenant, rule: Option<&Rule>) -> Result<(), ScopeError> {
    if !tenant.environments.contains(&m.scope.environment) {
        return Err(ScopeError::Environment {
            environment: truncate(&m.scope.environment),
            tenant: tenant.name.clone(),
        });
    }
    if let Some(rule) = rule {
        rule.check_scope(&m.scope)?;
    }
    // Without a rule naming the network modes, `none` only (the rule itself checked
    // its own list above).
    if rule.and_then(|r| r.network.as_ref()).is_none() && m.scope.network != "none" {
        return Err(ScopeError::Network(truncate(&m.scope.network)));
    }
    // `targets`: every target must be a destination the sandbox can open.
    if m.scope.network == "targets" {
        if m.scope.targets.is_empty() {
            return Err(ScopeError::NoTargets);
        }
        for t in &m.scope.targets {
            crate::net_target::NetTarget::parse(t).map_err(|source| ScopeError::Target {
                target: truncate(t),
                source,
            })?;
        }
    }
    Ok(())
}

/// A file labelled as a tool whose digest is not in the tenant's armory
/// (`tool_not_authorized`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tool `{path}` ({digest}) is not in the armory of `{tenant}`")]
pub struct ToolError {
    pub path: ArtifactPath,
    pub digest: Sha256Digest,
    pub tenant: String,
}

fn check_tools(files: &[FileEntry], tenant: &Tenant) -> Result<(), ToolError> {
    match files
        .iter()
        .find(|f| f.is_tool && !tenant.armory.contains(&f.sha256))
    {
        Some(f) => Err(ToolError {
            path: f.path.clone(),
            digest: f.sha256,
            tenant: tenant.name.clone(),
        }),
        None => Ok(()),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Where a capsule directory keeps its JWS (for callers that write one).
pub fn jws_path(dir: &Path) -> PathBuf {
    dir.join(JWS_FILE)
}
