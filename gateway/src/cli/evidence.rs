//! `evidence export`: the part of a run's bundle that may leave the host, under the
//! tenant's egress mode or a stricter one (see `evidence::export`).

use std::path::PathBuf;
use std::process::ExitCode;

use verify_core::EgressMode;

use crate::admission::load_policy;
use crate::custody::CustodySigner;
use crate::evidence::{export, EgressRules};
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

#[derive(Debug, clap::Subcommand)]
pub enum EvidenceCommand {
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
        EvidenceCommand::Export(args) => {
            let mut sealed = args.identity.sealed_keys();
            let policy = load_policy(&args.policy, &mut sealed)?;
            let rules = EgressRules::compile(&policy)?;
            let signer = custody_signer(&args.state)?;
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
// TPM-signed bundles: the lead points this at custody's signer selection on merge.
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
