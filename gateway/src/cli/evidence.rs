//! `capsule-gateway evidence ...`: evidence bundles and exports, offline.
//!
//! `evidence verify [--trust JWKS] [--identity ID.json] [--json] PATH`: exit 0 every
//! hop holds, 1 a hop does not (named on stderr, and in `--json`), 2 usage (PATH is
//! neither a bundle nor an export, a flag's file is missing or malformed).
//!
//! `evidence export`: the part of a run's bundle that may leave the host, under the
//! tenant's egress mode or a stricter one (see `evidence::export`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use verify_core::crypto::default_backend;
use verify_core::keys::KeyStore;
use verify_core::EgressMode;

use super::{usage, EXIT_DENIED};
use crate::admission::load_policy;
use crate::custody::CustodySigner;
use crate::evidence::{export, verify_evidence, EgressRules, Verdict, VerifyOptions, VerifyReport};
use crate::layout::StateLayout;
use crate::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// nothing but the signed index's digest
    LocalOnly,
    /// the signed index, ids and digests; no bundle file
    MetadataOnly,
    /// the signed index and the bundle, masked by the tenant's rules
    Sanitized,
}

impl From<ModeArg> for EgressMode {
    fn from(m: ModeArg) -> EgressMode {
        match m {
            ModeArg::LocalOnly => EgressMode::LocalOnly,
            ModeArg::MetadataOnly => EgressMode::MetadataOnly,
            ModeArg::Sanitized => EgressMode::Sanitized,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Check a bundle (or an export of one) offline: the custody signature over its
    /// index, the index against the files, then every hop of the chain of custody.
    /// Exit 0 all hold, 1 the first hop that does not is named, 2 usage.
    Verify {
        /// A trust store (JWKS) the capsule's signature must also verify with; without
        /// it, the key snapshot in the signed index is the trust (an HS256 capsule
        /// needs it: its snapshot has no secret).
        #[arg(long, value_name = "JWKS")]
        trust: Option<PathBuf>,
        /// The runner's identity file (`attest identity --out`): the index must be
        /// quoted by that TPM key (a software signature is then refused).
        #[arg(long, value_name = "ID.json")]
        identity: Option<PathBuf>,
        /// Print one JSON object with every hop's verdict.
        #[arg(long)]
        json: bool,
        /// The bundle directory (STATE/evidence/RUN_ID) or an export directory.
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Write what may leave the host of a bundle to a new directory: export.json
    /// (every file of the index: included, masked or withheld) and, except under
    /// local-only, the signed index. A mode more permissive than the tenant's is
    /// refused (exit 2); so is an existing --out.
    Export(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The egress mode (default: the tenant's, from --policy).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// The policy that names the tenant's egress mode and masking rules.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// The export directory to create (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Gateway state: its custody key (`STATE/custody`) signs export.json; it must
    /// be the key that signed the bundle's index.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/capsule-gateway")]
    pub state: PathBuf,
    /// The TPM for the policy's sealed keys.
    #[command(flatten)]
    pub identity: super::attest::IdentityArgs,
    /// The evidence bundle (STATE/evidence/<run id>).
    #[arg(value_name = "BUNDLE")]
    pub bundle: PathBuf,
}

pub fn run(command: EvidenceCommand) -> Result<ExitCode, GatewayError> {
    match command {
        EvidenceCommand::Verify {
            trust,
            identity,
            json,
            path,
        } => {
            let trust = trust
                .as_deref()
                .map(|p| KeyStore::load(p, default_backend()))
                .transpose()?;
            let identity = identity
                .as_deref()
                .map(super::attest::load_identity)
                .transpose()?;
            let opts = VerifyOptions {
                trust: trust.as_ref(),
                identity: identity.as_ref(),
            };
            let report = verify_evidence(&path, &opts).map_err(|e| usage(e.to_string()))?;
            print_report(&report, json)?;
            Ok(if report.holds() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DENIED)
            })
        }
        EvidenceCommand::Export(args) => {
            let mut sealed = args.identity.sealed_keys();
            let policy = load_policy(&args.policy, &mut sealed)?;
            let rules = EgressRules::compile(&policy)?;
            // The key that signed the index signs the export: the TPM's with --tcti,
            // else the state's existing software key (never one made for the occasion).
            let signer = if args.identity.tcti.is_some() {
                args.identity.custody_signer(&args.state)?
            } else {
                custody_signer(&args.state)?
            };
            let manifest = export(
                &args.bundle,
                &args.out,
                args.mode.map(Into::into),
                &rules,
                &signer,
            )?;
            let line = serde_json::json!({
                "export": args.out.display().to_string(),
                "mode": manifest.mode,
                "run_id": manifest.run_id,
                "index_sha256": manifest.index_sha256,
            });
            crate::output::println_stdout(line)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The software custody signer under `state` (it must exist: an export is signed by
/// the key that signed the index, never by a key made for the occasion).
fn custody_signer(state: &std::path::Path) -> Result<CustodySigner, GatewayError> {
    let dir = StateLayout::new(state).custody();
    if !dir.join(crate::custody::SOFTWARE_KEY_FILE).exists() {
        return Err(GatewayError::Usage(format!(
            "{}: no custody key (the state that wrote the bundle signs its export)",
            dir.display()
        )));
    }
    CustodySigner::software(&dir).map_err(|e| GatewayError::Usage(e.to_string()))
}

fn print_report(r: &VerifyReport, json: bool) -> Result<(), GatewayError> {
    if json {
        return crate::output::println_stdout(r.to_json());
    }
    let mut text = String::new();
    for h in &r.hops {
        let verdict = serde_json::to_value(h.verdict)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        text.push_str(&format!("{verdict:<14} {}", h.hop));
        if let Some(d) = &h.detail {
            text.push_str(&format!(": {d}"));
        }
        text.push('\n');
    }
    match r.first_failure() {
        None => {
            let partial = r
                .hops
                .iter()
                .any(|h| matches!(h.verdict, Verdict::Withheld | Verdict::Masked));
            text.push_str(&format!(
                "{} {}: OK{}",
                r.form,
                r.run_id.as_deref().unwrap_or("?"),
                if partial {
                    " (what was withheld or masked is reported above)"
                } else {
                    ""
                }
            ));
        }
        Some(h) => {
            eprintln!(
                "capsule-gateway: BROKEN at {}: {}",
                h.hop,
                h.detail.as_deref().unwrap_or("")
            );
            text.push_str(&format!(
                "{} {}: BROKEN at {}",
                r.form,
                r.run_id.as_deref().unwrap_or("?"),
                h.hop
            ));
        }
    }
    crate::output::println_stdout(text)
}
