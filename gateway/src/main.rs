//! `capsule-gateway`: exit 0 when everything was admitted (or the command succeeded),
//! 1 when at least one capsule was denied, 2 on a usage or configuration error.

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the service allocates and frees per request
/// on many threads (tokio's, the admission workers'), and glibc's arenas showed as
/// ~10 % of the saturated server's CPU (`_int_free`, `malloc_consolidate`, ...;
/// BENCHMARKS.md, issue 17). The library does not choose an allocator; this binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    capsule_gateway::cli::run()
}
