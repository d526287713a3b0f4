//! `capsule-loadgen`: drives `capsule-gateway serve` over N mutually authenticated TLS
//! connections and reports throughput, counts by status and latency percentiles. It is
//! a tool beside the gateway, not part of it: it reaches the service only over the
//! network, with the client side of `attest`'s mTLS and verify-core's SHA-256.
//!
//! How the load is shaped:
//! - Exactly N connections, each with keep-alive and its own task. A request that fails
//!   at transport level is an error and its connection is re-established.
//! - Open loop (`--rate R`): request `k` of connection `i` is due `(k·N + i) / R` s
//!   after the start, so the connections take turns and together send one evenly spaced
//!   stream of R requests/s. Latency runs from the *due* time, not the send time: when
//!   the server stalls, the requests that should have gone out meanwhile are charged
//!   the wait (no coordinated omission). `send_lag_ms` shows how late requests went
//!   out, i.e. whether the generator itself kept up. HTTP/1.1 carries one request at a
//!   time, so a slow server makes a connection fall behind (seen as latency, and as an
//!   achieved rate below the requested one); with HTTP/2 each request goes out when due
//!   on its own stream, up to [`schedule::MAX_STREAMS`] in flight per connection, so an
//!   overloaded server really sees the offered rate (and answers 503).
//! - Closed loop (`--rate 0`): each connection sends its next request as soon as the
//!   previous answer has been read.
//! - Requests due during the warm-up are sent but not counted. Nothing is sent after the
//!   end; requests that were due but could not be sent by then are reported as `unsent`.
//!   Answers to requests sent in time are awaited (at most [`client::REQUEST_TIMEOUT`]).
//!
//! Modules: [`plan`] (flags become a validated plan, TLS and connections), [`client`]
//! (one request and its answer), [`schedule`] (the timeline, the blob upload and the
//! connection loops), [`stats`] (what was seen), [`report`] (the text and JSON report).

pub mod client;
pub mod error;
pub mod plan;
pub mod report;
pub mod schedule;
pub mod stats;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

pub use error::LoadgenError;

/// Exit code when the run could not be made (usage, configuration, unusable server).
pub const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "capsule-loadgen",
    version,
    about = "Load generator for `capsule-gateway serve`: N mTLS connections, admissions at \
             a fixed rate or as fast as possible, throughput and latency percentiles.",
    long_about = "Load generator for `capsule-gateway serve`: N mTLS connections, admissions \
                  at a fixed rate or as fast as possible, throughput and latency percentiles.\n\n\
                  Exit codes: 0 the run was made and reported, 2 usage or configuration \
                  error, or a server that could not be used at all."
)]
pub struct LoadgenArgs {
    /// The service, `https://HOST:PORT`.
    #[arg(long, value_name = "URL")]
    pub url: String,
    /// Client SVID directory (svid.pem, svid_key.pem, bundle.pem).
    #[arg(long, value_name = "DIR")]
    pub svid: PathBuf,
    /// Accept only a server whose SPIFFE ID matches (`*` as a whole last segment);
    /// without it, any ID of a trust domain in the bundle.
    #[arg(long, value_name = "SPIFFE_ID_OR_PATTERN")]
    pub server_id: Option<String>,
    /// Capsule directory (capsule.jws and files/); its JWS is the admission body.
    #[arg(long, value_name = "DIR")]
    pub capsule: PathBuf,
    /// TLS connections, each with keep-alive.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub connections: usize,
    /// Total requests/s over all connections, open loop (latency from the due time);
    /// 0: as fast as possible, one request in flight per connection.
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    pub rate: f64,
    /// Measured seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before the measurement, not counted.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub warmup: f64,
    /// HTTP/2 (ALPN h2) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Do not upload the capsule's files as blobs before the run.
    #[arg(long)]
    pub no_upload: bool,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Tokio worker threads of the generator.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub threads: usize,
}

/// Parses the process arguments, runs, and returns the exit code.
pub fn main() -> ExitCode {
    let args = match LoadgenArgs::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // clap prints help/version to stdout with success, usage errors with code 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_CONFIG } else { 0 });
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsule-loadgen: error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Validates the flags, uploads the capsule's files, runs the load and prints the report.
pub fn run(args: &LoadgenArgs) -> Result<(), LoadgenError> {
    let plan = Arc::new(plan::Plan::new(args)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .map_err(LoadgenError::Runtime)?;
    let files = if args.no_upload {
        Vec::new()
    } else {
        let dir = args.capsule.join("files");
        let mut files = Vec::new();
        walk_files(&dir, &mut files)?;
        files.sort();
        files
    };
    let stats = runtime.block_on(schedule::drive(plan.clone(), &files))?;
    let report = report::Report::new(&plan.shape, &stats);
    if args.json {
        print_stdout(&format!("{}\n", report.json()))
    } else {
        print_stdout(&report.text())
    }
}

/// Writes the report to stdout; a reader that went away (`| head`) is not an error.
fn print_stdout(text: &str) -> Result<(), LoadgenError> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| LoadgenError::io("<stdout>", e)),
    }
}

/// Regular files under `dir`, recursively (symbolic links are not followed: the
/// capsule's artifacts are regular files).
fn walk_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadgenError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadgenError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| LoadgenError::io(dir, e))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| LoadgenError::io(&path, e))?;
        if meta.is_dir() {
            walk_files(&path, out)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}
