//! The outcome of one admission: a verdict and, for a denial, one stable reason code.

use std::fmt;

/// Why a capsule was denied. The snake_case names are a public contract
/// (CLI output, service responses, evidence): add variants, never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    MalformedJws,
    MalformedHeader,
    HeaderForbidden,
    AlgNotAllowed,
    UnknownKid,
    AlgKeyMismatch,
    SignatureInvalid,
    MalformedManifest,
    TenantUnknown,
    TenantKeyMismatch,
    PolicyMismatch,
    /// The clock reads earlier than the anti-rollback state's last-known time, by more
    /// than the policy's clock skew: it was stepped back, and expiry cannot be judged.
    ClockRollback,
    NotYetValid,
    Expired,
    RunnerNotAllowed,
    ScopeViolation,
    ToolNotAuthorized,
    ApprovalInsufficient,
    Rollback,
    ArtifactPathInvalid,
    ArtifactMissing,
    ArtifactSizeMismatch,
    DigestMismatch,
    ArtifactChanged,
    LimitExceeded,
    /// The anti-rollback state could not be read: without it no version can be admitted.
    StateUnavailable,
    /// The capsule directory or its `capsule.jws` is missing, unreadable, a symlink or
    /// not a regular file (a FIFO, a device, a directory), or `capsule.jws` has other
    /// hard links: nothing of it was read, so there is no digest.
    CapsuleUnreadable,
    /// A signed approval that does not verify, does not name this manifest, is by a
    /// key no approver holds, claims a role its approver lacks, or repeats an approver.
    ApprovalInvalid,
    /// The environment's required sandbox tier is not available on this host.
    TierUnavailable,
    /// `parent` is not the digest of the admitted predecessor.
    LineageBroken,
    /// The tenant index is expired, older than one already seen, or missing where
    /// policy requires it.
    IndexStale,
    /// The tenant index lists a higher version of this capsule (or other bytes for it).
    Superseded,
}

impl Reason {
    /// Every reason, in pipeline order. Tests use it to prove each has a fixture.
    pub const ALL: [Reason; 32] = [
        Reason::MalformedJws,
        Reason::MalformedHeader,
        Reason::HeaderForbidden,
        Reason::AlgNotAllowed,
        Reason::UnknownKid,
        Reason::AlgKeyMismatch,
        Reason::SignatureInvalid,
        Reason::MalformedManifest,
        Reason::TenantUnknown,
        Reason::TenantKeyMismatch,
        Reason::PolicyMismatch,
        Reason::ClockRollback,
        Reason::NotYetValid,
        Reason::Expired,
        Reason::RunnerNotAllowed,
        Reason::ScopeViolation,
        Reason::ToolNotAuthorized,
        Reason::ApprovalInsufficient,
        Reason::Rollback,
        Reason::ArtifactPathInvalid,
        Reason::ArtifactMissing,
        Reason::ArtifactSizeMismatch,
        Reason::DigestMismatch,
        Reason::ArtifactChanged,
        Reason::LimitExceeded,
        Reason::StateUnavailable,
        Reason::CapsuleUnreadable,
        Reason::ApprovalInvalid,
        Reason::TierUnavailable,
        Reason::LineageBroken,
        Reason::IndexStale,
        Reason::Superseded,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJws => "malformed_jws",
            Reason::MalformedHeader => "malformed_header",
            Reason::HeaderForbidden => "header_forbidden",
            Reason::AlgNotAllowed => "alg_not_allowed",
            Reason::UnknownKid => "unknown_kid",
            Reason::AlgKeyMismatch => "alg_key_mismatch",
            Reason::SignatureInvalid => "signature_invalid",
            Reason::MalformedManifest => "malformed_manifest",
            Reason::TenantUnknown => "tenant_unknown",
            Reason::TenantKeyMismatch => "tenant_key_mismatch",
            Reason::PolicyMismatch => "policy_mismatch",
            Reason::ClockRollback => "clock_rollback",
            Reason::NotYetValid => "not_yet_valid",
            Reason::Expired => "expired",
            Reason::RunnerNotAllowed => "runner_not_allowed",
            Reason::ScopeViolation => "scope_violation",
            Reason::ToolNotAuthorized => "tool_not_authorized",
            Reason::ApprovalInsufficient => "approval_insufficient",
            Reason::Rollback => "rollback",
            Reason::ArtifactPathInvalid => "artifact_path_invalid",
            Reason::ArtifactMissing => "artifact_missing",
            Reason::ArtifactSizeMismatch => "artifact_size_mismatch",
            Reason::DigestMismatch => "digest_mismatch",
            Reason::ArtifactChanged => "artifact_changed",
            Reason::LimitExceeded => "limit_exceeded",
            Reason::StateUnavailable => "state_unavailable",
            Reason::CapsuleUnreadable => "capsule_unreadable",
            Reason::ApprovalInvalid => "approval_invalid",
            Reason::TierUnavailable => "tier_unavailable",
            Reason::LineageBroken => "lineage_broken",
            Reason::IndexStale => "index_stale",
            Reason::Superseded => "superseded",
        }
    }

    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    Deny,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Admit => "admit",
            Verdict::Deny => "deny",
        }
    }
}

/// Signature algorithms the gateway accepts. Nothing else exists here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    Es256,
    Hs256,
}

impl Alg {
    pub const fn as_str(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::Hs256 => "HS256",
        }
    }

    pub fn from_name(name: &str) -> Option<Alg> {
        match name {
            "ES256" => Some(Alg::Es256),
            "HS256" => Some(Alg::Hs256),
            _ => None,
        }
    }
}

/// A SHA-256 digest, printed as `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// Parses `<64 lowercase hex>` (no prefix).
    pub fn from_hex(hex: &str) -> Option<Sha256Digest> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Sha256Digest(out))
    }

    /// Parses `sha256:<64 lowercase hex>`.
    pub fn from_prefixed(s: &str) -> Option<Sha256Digest> {
        Sha256Digest::from_hex(s.strip_prefix("sha256:")?)
    }

    /// Parses a digest as a manifest or a policy may spell it: `sha256:<64 lowercase
    /// hex>` or the bare 64 lowercase hex (the two spellings of one digest). Output is
    /// always the prefixed form (`Display`).
    pub fn parse(s: &str) -> Option<Sha256Digest> {
        Sha256Digest::from_hex(s.strip_prefix("sha256:").unwrap_or(s))
    }

    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        s
    }
}

/// Lowercase only: one digest has exactly one spelling.
fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One admission's outcome, with everything that was learned before it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// `None` exactly when the verdict is `Admit`.
    pub reason: Option<Reason>,
    pub detail: String,
    /// Digest of the exact JWS bytes; `None` only when they could not be read.
    pub digest: Option<Sha256Digest>,
    pub capsule_id: Option<String>,
    pub version: Option<u64>,
    pub tenant: Option<String>,
    pub kid: Option<String>,
    pub alg: Option<Alg>,
}

impl Decision {
    pub fn is_admit(&self) -> bool {
        self.verdict == Verdict::Admit
    }

    /// A denial that carries no facts about the capsule (it could not be read).
    pub fn deny_unread(reason: Reason, detail: impl Into<String>) -> Decision {
        Decision {
            verdict: Verdict::Deny,
            reason: Some(reason),
            detail: detail.into(),
            digest: None,
            capsule_id: None,
            version: None,
            tenant: None,
            kid: None,
            alg: None,
        }
    }

    /// Turns an admission into a denial (used when recording finds a rollback).
    pub fn into_denied(mut self, reason: Reason, detail: impl Into<String>) -> Decision {
        self.verdict = Verdict::Deny;
        self.reason = Some(reason);
        self.detail = detail.into();
        self
    }
}
