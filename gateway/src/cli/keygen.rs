//! `keygen`: the flags and the printing around [`crate::keygen::generate`].

use std::path::Path;
use std::process::ExitCode;

use verify_core::Alg;

use super::AlgArg;
use crate::GatewayError;

pub fn run(alg: AlgArg, kid: &str, out: &Path) -> Result<ExitCode, GatewayError> {
    let alg = match alg {
        AlgArg::Es256 => Alg::Es256,
        AlgArg::Hs256 => Alg::Hs256,
    };
    let files = crate::keygen::generate(alg, kid, out)?;
    crate::output::print_stdout(&format!(
        "{}\n{}\n",
        files.private.display(),
        files.public.display()
    ))?;
    if alg == Alg::Hs256 {
        eprintln!(
            "note: HS256 is a shared secret: {} contains it too (mode 0600)",
            files.public.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
