//! `capsule-loadgen`: exit 0 when the run was made and reported, 2 on a usage or
//! configuration error or a server that could not be used at all.

use std::process::ExitCode;

fn main() -> ExitCode {
    capsule_loadgen::main()
}
