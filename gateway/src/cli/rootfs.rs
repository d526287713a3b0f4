//! `rootfs digest DIR`: the tree digest of a root file system, computed by the
//! launcher's own function (`sandbox_launcher::rootfs::tree_digest`), so that what a
//! policy pins (`[[tenants]] rootfs = { sha256 = "..." }`) is what a run checks.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::GatewayError;

#[derive(Debug, clap::Subcommand)]
pub enum RootfsCommand {
    /// Print `sha256:<hex>`, the tree digest of DIR (what `rootfs.sha256` pins).
    Digest {
        /// The root file system (default: the base rootfs install-deps builds).
        #[arg(value_name = "DIR", default_value = sandbox_launcher::rootfs::BASE_ROOTFS)]
        dir: PathBuf,
    },
}

pub fn run(command: RootfsCommand) -> Result<ExitCode, GatewayError> {
    match command {
        RootfsCommand::Digest { dir } => {
            let digest = sandbox_launcher::rootfs::tree_digest(&dir).map_err(|source| {
                GatewayError::SandboxSetup(sandbox_launcher::LaunchError::Rootfs {
                    path: dir.clone(),
                    source,
                })
            })?;
            crate::output::println_stdout(digest.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
