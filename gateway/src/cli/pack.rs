//! `pack`: the command-line front of [`crate::pack`]; prints the capsule's path.

use std::path::Path;
use std::process::ExitCode;

use crate::GatewayError;

pub fn run(
    manifest: &Path,
    files: &Path,
    key: &Path,
    out: &Path,
    approvals: Option<&Path>,
) -> Result<ExitCode, GatewayError> {
    let capsule = crate::pack::pack(manifest, files, key, out, approvals)?;
    crate::output::println_stdout(capsule.display())?;
    Ok(ExitCode::SUCCESS)
}
