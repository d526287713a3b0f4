//! Manifest v1: the JWS payload. Wire types only; the checks live in `verify`.
//!
//! Unknown members and duplicate members are errors at every level, so that the
//! document that was approved is the document that is checked.

use serde::{Deserialize, Serialize};

use crate::decision::Sha256Digest;
use crate::json::UniqueMap;

pub const SCHEMA_V1: &str = "capsule/v1";

/// What a digest that does not parse is told (artifact and tool `sha256`, `parent`,
/// policy `armory`): a format problem, said so, never worded like a mismatch.
pub const NOT_A_DIGEST: &str = "not a sha256 digest (want sha256:<64 lowercase hex>)";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: String,
    pub capsule_id: String,
    pub version: u64,
    /// The parent capsule's JWS digest (`sha256:<hex>` or bare hex); `null` only for
    /// version 1.
    pub parent: Option<String>,
    pub tenant: String,
    pub issued_at: u64,
    pub not_before: u64,
    pub expires_at: u64,
    pub policy_version: String,
    pub author: String,
    pub approvals: Vec<Approval>,
    #[serde(default)]
    pub runners: Vec<String>,
    pub scope: Scope,
    pub limits: SandboxLimits,
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub env: UniqueMap,
    pub artifacts: Vec<Artifact>,
    #[serde(default)]
    pub tools: Vec<Tool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub approver: String,
    pub role: String,
    pub approved_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    pub environment: String,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub actions: Vec<String>,
    /// `none` (the sandbox has no network) or `targets` (exactly `targets`, when the
    /// environment's rule allows it; see [`crate::net_target`]).
    pub network: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxLimits {
    pub timeout_ms: u64,
    pub memory_mib: u64,
    pub pids: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    pub name: String,
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// One file the manifest names, artifact or tool, with its path checked and its
/// digest decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: ArtifactPath,
    pub sha256: Sha256Digest,
    pub size: u64,
    pub is_tool: bool,
}

/// Why manifest bytes are not a manifest v1 document (shown as the JSON error, which
/// names the member and the position).
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct ManifestError {
    #[source]
    source: serde_json::Error,
}

impl Manifest {
    /// Parses manifest bytes strictly.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        crate::json::from_slice_strict(bytes).map_err(|source| ManifestError { source })
    }
}

/// A relative path beneath `files/`: `/`-separated, no empty, `.` or `..` segment,
/// no NUL or control characters, not absolute, at most 4096 bytes and 255 per segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactPath(String);

pub const MAX_PATH_BYTES: usize = 4096;
pub const MAX_SEGMENT_BYTES: usize = 255;

impl ArtifactPath {
    pub fn parse(path: &str) -> Result<ArtifactPath, &'static str> {
        if path.is_empty() {
            return Err("empty path");
        }
        if path.len() > MAX_PATH_BYTES {
            return Err("path longer than 4096 bytes");
        }
        if path.starts_with('/') {
            return Err("absolute path");
        }
        for segment in path.split('/') {
            match segment {
                "" => return Err("empty path segment"),
                "." | ".." => return Err("`.` or `..` segment"),
                s if s.len() > MAX_SEGMENT_BYTES => {
                    return Err("path segment longer than 255 bytes")
                }
                s if s.chars().any(|c| c.is_control() || c == '\\') => {
                    return Err("control character or backslash in path")
                }
                _ => {}
            }
        }
        Ok(ArtifactPath(path.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ArtifactPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An approver's (or author's) identity: one canonical spelling, lowercase ASCII
/// `local@domain`, compared byte for byte (DESIGN.md "Governance"). Everything a
/// lookalike needs is refused rather than folded: case, spaces, fullwidth or
/// accented letters (NFC or NFD), zero-width characters, a trailing dot. So
/// `planner@acme.example ` is not a second approver, it is a malformed manifest.
///
/// - local part: 1+ of `[a-z0-9._+-]`, no leading, trailing or double dot;
/// - domain: two or more labels of `[a-z0-9-]`, none empty or starting or ending
///   with `-`, at most 63 bytes each, no trailing dot;
/// - at most 254 bytes in all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApproverId(String);

pub const MAX_APPROVER_BYTES: usize = 254;

impl ApproverId {
    /// Parses a canonical identity; the error says which rule it breaks (callers add
    /// the field: `author`, `approvals[0].approver`, `approvers[2].id`).
    pub fn parse(id: &str) -> Result<ApproverId, &'static str> {
        if id.is_empty() {
            return Err("empty identity");
        }
        if id.len() > MAX_APPROVER_BYTES {
            return Err("longer than 254 bytes");
        }
        if !id.is_ascii() {
            return Err("not ASCII (lookalike letters, accents or invisible characters)");
        }
        let Some((local, domain)) = id.split_once('@') else {
            return Err("not local@domain");
        };
        if domain.contains('@') {
            return Err("more than one `@`");
        }
        if local.is_empty() {
            return Err("empty local part");
        }
        if !local
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'+' | b'-'))
        {
            return Err("local part must be lowercase [a-z0-9._+-]");
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err("local part has a leading, trailing or double dot");
        }
        if domain.ends_with('.') {
            return Err("domain has a trailing dot");
        }
        let mut labels = 0;
        for label in domain.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err("domain label empty or longer than 63 bytes");
            }
            if !label
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
            {
                return Err("domain must be lowercase [a-z0-9-] labels");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err("domain label starts or ends with `-`");
            }
            labels += 1;
        }
        if labels < 2 {
            return Err("domain needs at least two labels");
        }
        Ok(ApproverId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ApproverId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ApproverId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn path_rules() {
        for ok in [
            "run.sh",
            "tools/busybox",
            "a/b/c.txt",
            "..a",
            "a..",
            ".hidden",
            "a b",
        ] {
            assert!(ArtifactPath::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "./a",
            "a//b",
            "a/",
            "..",
            ".",
            "a\0b",
            "a\\b",
            "a\nb",
        ] {
            assert!(ArtifactPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ArtifactPath::parse(&"a".repeat(256)).is_err());
        assert!(ArtifactPath::parse(&"a/".repeat(2049)).is_err());
    }

    #[test]
    fn approver_ids_have_one_spelling() {
        for ok in [
            "alice@acme.example",
            "planner@acme.example",
            "a.b+c_d-e@x-1.acme.example",
            "0@a.b",
        ] {
            assert_eq!(
                ApproverId::parse(ok).map(|a| a.to_string()),
                Ok(ok.to_string())
            );
        }
        for bad in [
            "",
            "planner@acme.example ",
            " planner@acme.example",
            "Planner@acme.example",
            "planner@ACME.example",
            "\u{ff50}lanner@acme.example",
            "planner@acme.example.",
            "plan\u{200b}ner@acme.example",
            "a\u{30a}sa@acme.example",
            "\u{e5}sa@acme.example",
            "planner",
            "@acme.example",
            "planner@",
            "planner@example",
            "a@b@c.d",
            ".a@b.c",
            "a.@b.c",
            "a..b@c.d",
            "a@-b.c",
            "a@b-.c",
            "a@b..c",
            "a@.b.c",
            "a b@c.d",
            "a\0@c.d",
        ] {
            assert!(ApproverId::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("{}@{}.example", "a".repeat(64), "b".repeat(63));
        assert!(ApproverId::parse(&long).is_ok());
        let too_long = format!("a@{}.example", vec!["b".repeat(60); 5].join("."));
        assert!(too_long.len() > 254 && ApproverId::parse(&too_long).is_err());
    }

    proptest! {
        /// Whatever is accepted stays beneath the root: joining it never climbs out.
        #[test]
        fn accepted_paths_never_escape(segments in proptest::collection::vec("[a-z.]{0,4}", 1..6)) {
            let path = segments.join("/");
            if let Ok(p) = ArtifactPath::parse(&path) {
                let mut depth = 0i32;
                for s in p.as_str().split('/') {
                    prop_assert!(s != ".." && s != "." && !s.is_empty());
                    depth += 1;
                }
                prop_assert!(depth >= 1);
                prop_assert!(!p.as_str().starts_with('/'));
            } else {
                prop_assert!(segments.iter().any(|s| s.is_empty() || s == "." || s == ".."));
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = ArtifactPath::parse(&s);
        }
    }
}
