//! What a selfcheck runs against: the deployed configuration (`--config gateway.toml`,
//! `--agent-config agent.toml` or the CLI's `--policy ...` flags), resolved once.
//!
//! OWNED BY: selfcheck (fills in the fields and the constructors from ServeConfig,
//! AgentConfig and the CLI flags). tiers reads `tiers` and `rootfs`.

use std::path::PathBuf;

/// The deployed configuration a selfcheck proves.
#[derive(Debug)]
pub struct Target<'a> {
    /// The deployed policy file (loaded through the same `load_policy` as admissions).
    pub policy: PathBuf,
    /// The deployed state directory, if any. `serve` passes its open state instead.
    pub state: Option<StateRef<'a>>,
    /// The TPM's TCTI, if one is configured.
    pub tcti: Option<String>,
    /// The sandbox tiers this deployment runs capsules in, with what they need.
    pub tiers: Vec<TierTarget>,
    /// The signed deployment manifest and the key that verifies it (`[selfcheck]`).
    pub alignment: Option<AlignmentTarget>,
}

/// The deployed state: a directory the check may open, or the one `serve` holds open.
#[derive(Debug)]
pub enum StateRef<'a> {
    Dir(PathBuf),
    Open(&'a crate::state::State),
}

/// One configured sandbox tier. OWNED BY: tiers.
#[derive(Debug, Clone)]
pub struct TierTarget {
    pub runtime: crate::launch::Runtime,
    pub rootfs: PathBuf,
}

/// Where the signed deployment manifest is and what verifies it. OWNED BY: selfcheck.
#[derive(Debug, Clone)]
pub struct AlignmentTarget {
    pub manifest: PathBuf,
    pub key: PathBuf,
}
