//! `capsule-gateway`: exit 0 when everything was admitted (or the command succeeded),
//! 1 when at least one capsule was denied, 2 on a usage or configuration error.

use std::process::ExitCode;

fn main() -> ExitCode {
    capsule_gateway::cli::run()
}
