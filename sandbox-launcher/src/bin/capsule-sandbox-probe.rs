//! The egress probe as a standalone binary (the gateway has the same probe as its
//! hidden `sandbox-probe` subcommand). Runs inside the sandbox:
//! `capsule-sandbox-probe --connect ADDR -- ENTRYPOINT [ARG...]`.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    std::process::exit(sandbox_launcher::probe::sandbox_main(&args));
}
