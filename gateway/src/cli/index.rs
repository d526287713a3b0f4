//! `index sign` and `--index`: the tenant index (fleet freshness, DESIGN.md
//! "Governance"), after TUF's timestamp and snapshot roles.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;

use verify_core::crypto::default_backend;
use verify_core::index::{IndexEntry, IndexPayload, INDEX_SCHEMA};
use verify_core::{Alg, Sha256Digest, Tier};

use super::approve::{capsule_jws, es256_key, manifest_of, write_new};
use super::usage;
use crate::GatewayError;

/// The tiers `verify` and `admit` check a rule's `tier` against: those of `run`'s
/// default runtime (runsc, gVisor). They launch nothing; the answer they give is
/// whether `run` with its defaults would admit the capsule. `run --runtime kata`
/// checks against Kata instead.
pub(super) const VERIFY_HOST_TIERS: &[Tier] = &[Tier::Gvisor];

#[derive(Debug, clap::Subcommand)]
pub enum IndexCommand {
    /// Sign a tenant index listing the given capsules (their id, version and digest).
    // `--version` is the index's: the program's own is on the top-level command.
    #[command(disable_version_flag = true)]
    Sign {
        /// The tenant's index key: a private ES256 JWK whose kid is in the tenant's
        /// `index.keys`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The tenant every listed capsule belongs to.
        #[arg(long, value_name = "TENANT")]
        tenant: String,
        /// The index version: higher than every index this tenant published before.
        #[arg(long, value_name = "N")]
        version: u64,
        /// How long the index is valid: seconds, or a number with s, m, h or d.
        #[arg(long, value_name = "D", value_parser = parse_duration)]
        expires_in: u64,
        /// Where to write the index (never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Capsule directories to list.
        #[arg(value_name = "CAPSULE")]
        capsules: Vec<PathBuf>,
    },
}

pub fn run(command: IndexCommand) -> Result<ExitCode, GatewayError> {
    let IndexCommand::Sign {
        key,
        tenant,
        version,
        expires_in,
        out,
        capsules,
    } = command;
    let (jwk, signer) = es256_key(&key)?;
    let mut seen = HashSet::new();
    let mut entries = Vec::with_capacity(capsules.len());
    for dir in &capsules {
        let jws = capsule_jws(dir)?;
        let (_, m) = manifest_of(dir, &jws)?;
        if m.tenant != tenant {
            return Err(usage(format!(
                "{}: tenant `{}`, not `{tenant}`",
                dir.display(),
                m.tenant
            )));
        }
        if !seen.insert(m.capsule_id.clone()) {
            return Err(usage(format!(
                "{}: `{}` is listed twice (an index names one version per capsule)",
                dir.display(),
                m.capsule_id
            )));
        }
        entries.push(IndexEntry {
            capsule_id: m.capsule_id,
            version: m.version,
            digest: Sha256Digest(default_backend().sha256_oneshot(&jws)).to_string(),
        });
    }
    let now = crate::admission::system_clock().now_unix();
    let payload = IndexPayload {
        schema: INDEX_SCHEMA.into(),
        tenant,
        version,
        issued_at: now,
        expires_at: now.saturating_add(expires_in),
        capsules: entries,
    };
    let body = serde_json::to_vec(&payload).map_err(|e| usage(e.to_string()))?;
    let jws =
        verify_core::jws::sign_compact(&jwk.kid, Alg::Es256, &body, &signer).map_err(usage)?;
    write_new(&out, jws.as_bytes())?;
    crate::output::println_stdout(out.display())?;
    Ok(ExitCode::SUCCESS)
}

/// `30`, `30s`, `15m`, `12h`, `7d`.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}`: not a number of seconds (or with s, m, h, d)"))?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("`{s}`: unit must be s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|d| *d > 0)
        .ok_or_else(|| format!("`{s}`: must be positive and fit"))
}
