//! Bounds on untrusted input, with safe defaults. Policy may tighten or relax them.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest compact JWS accepted, in bytes (checked before anything is decoded).
    pub max_jws_bytes: usize,
    /// Most artifacts plus tools in one manifest.
    pub max_artifacts: usize,
    /// Largest single artifact or tool, in bytes.
    pub max_artifact_bytes: u64,
    /// Upper bounds on what a manifest may ask of the sandbox.
    pub max_timeout_ms: u64,
    pub max_memory_mib: u64,
    pub max_pids: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_jws_bytes: 1 << 20,
            max_artifacts: 4096,
            max_artifact_bytes: 8 << 30,
            max_timeout_ms: 3_600_000,
            max_memory_mib: 16 * 1024,
            max_pids: 4096,
        }
    }
}
