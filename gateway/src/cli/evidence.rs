//! `capsule-gateway evidence ...`: evidence bundles and exports, offline.
//!
//! `evidence verify [--trust JWKS] [--identity ID.json] [--json] PATH`: exit 0 every
//! hop holds, 1 a hop does not (named on stderr, and in `--json`), 2 usage (PATH is
//! neither a bundle nor an export, a flag's file is missing or malformed).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use verify_core::crypto::default_backend;
use verify_core::keys::KeyStore;

use super::{usage, EXIT_DENIED};
use crate::evidence::{verify_evidence, Verdict, VerifyOptions, VerifyReport};
use crate::GatewayError;

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
    }
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
