//! `align sign`: the signed deployment manifest the selfcheck's `alignment` check
//! compares this host with (docs/selfcheck.md).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::output::print_stdout;
use crate::selfcheck::align;
use crate::GatewayError;

#[derive(Debug, clap::Subcommand)]
pub enum AlignCommand {
    /// Measure the gateway binary, the policy and its trust store, and sign them into a
    /// deployment manifest (a compact JWS) with the operator's key.
    Sign(AlignSignArgs),
}

#[derive(Debug, clap::Args)]
pub struct AlignSignArgs {
    /// The operator's private JWK (ES256 or HS256; `keygen` makes one).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The deployed policy (its trust files are measured as it loads them).
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// The gateway binary to measure (default: this one).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// The TPM that unseals the policy's sealed keys.
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
    /// Where to write the manifest (an existing file is not replaced).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("align sign: {0}")]
pub struct AlignSignError(#[from] align::AlignError);

pub fn run(command: AlignCommand) -> Result<ExitCode, GatewayError> {
    let AlignCommand::Sign(args) = command;
    let usage = |e: align::AlignError| GatewayError::Usage(AlignSignError(e).to_string());
    let measured = align::measure(&args.policy, args.tcti.as_deref(), args.binary.as_deref())
        .map_err(usage)?;
    let now = verify_core::Clock::now_unix(&verify_core::SystemClock);
    align::sign(&measured, &args.key, &args.out, now).map_err(usage)?;
    print_stdout(&format!(
        "wrote {}: binary {}, policy {}, trust_store {}\n",
        args.out.display(),
        measured.binary,
        measured.policy,
        measured.trust_store
    ))?;
    Ok(ExitCode::SUCCESS)
}
