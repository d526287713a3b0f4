//! Command-line interface: flags become a validated configuration in one place, and
//! each command returns an exit code.

mod agent;
mod align;
mod approve;
pub(crate) mod attest;
mod events;

mod evidence;
mod index;
mod keygen;
mod log;
pub mod logging;
mod pack;
mod publish;

mod rootfs;
pub(crate) mod run;
mod selfcheck;
mod serve;
mod verify;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::error::ErrorClass;
use crate::GatewayError;

/// Exit code for usage and configuration errors.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when at least one capsule was denied.
pub const EXIT_DENIED: u8 = 1;
/// Exit code for a runtime failure: the command was sound and doing it failed (the
/// sandbox, a write of state, keys or evidence, a TPM command). `run` also ends
/// with it when the run cannot be vouched for (its `.failed` event says why).
pub const EXIT_RUNTIME: u8 = 4;

/// `--version`: the crate version and the commit it was built from.
pub const VERSION: &str = crate::VERSION;

#[derive(Debug, Parser)]
#[command(
    name = "capsule-gateway",
    version = VERSION,
    // Every command's page and `--version` name the commit too.
    propagate_version = true,
    about = "Verify signed test capsules and admit only what was approved.",
    long_about = "Verify signed test capsules and admit only what was approved.\n\n\
        Exit codes: 0 every capsule admitted (or the command succeeded), \
        1 at least one capsule denied, 2 usage or configuration error (bad flags; \
        a file named that is missing, malformed or unsafe; a sandbox runtime that \
        is not installed), 3 `run` only: the capsule exited non-zero or timed out, \
        4 runtime failure (the sandbox failed, writing state, keys or evidence \
        failed, a TPM command failed; `run`: the run cannot be vouched for)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: `text` (one line per event) or `json` (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: logging::LogFormat,
    /// Log level or tracing directives (`debug`, `warn,capsule_gateway::handshake=info`);
    /// default: `RUST_LOG`, else `info`.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlgArg {
    #[value(name = "ES256")]
    Es256,
    #[value(name = "HS256")]
    Hs256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HashModeArg {
    /// read() up to 1 MiB, SIGBUS-guarded mmap above (default)
    Auto,
    /// read() in 1 MiB chunks
    Read,
    /// memory-mapped, SIGBUS-guarded
    Mmap,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Policy file (TOML); its `trust.jwks` is resolved relative to it.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// This runner's SPIFFE ID (default: the SVID's). Without any runner identity, a
    /// capsule whose manifest or tenant restricts runners is denied.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub runner: Option<String>,
    /// Directory of the anti-rollback state (rollback.redb): `admit` requires it and
    /// creates it on first use; `verify` only reads it.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Print one JSON object per capsule per line, in the order given.
    #[arg(long)]
    pub json: bool,
    /// How artifact bytes are read for hashing.
    #[arg(long, value_enum, default_value = "auto")]
    pub hash_mode: HashModeArg,
    /// A signed tenant index (fleet freshness); repeat for several tenants.
    #[arg(long, value_name = "FILE")]
    pub index: Vec<PathBuf>,
    /// Admission log: a signed checkpoint every N records (and at the batch's end).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub checkpoint_every: u64,
    /// Admission log: seal a segment once it holds N records.
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub segment_records: u64,
    /// The runner's SVID (default for --runner) and the TPM for sealed keys.
    #[command(flatten)]
    pub identity: self::attest::IdentityArgs,
    /// Capsule directories (each holds capsule.jws and files/).
    #[arg(required = true, value_name = "CAPSULE")]
    pub capsules: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a signing key: DIR/KID.private.jwk.json and DIR/KID.public.jwks.json.
    Keygen {
        /// ES256 (an ECDSA P-256 key pair) or HS256 (a shared secret); any case.
        // Case-insensitive: `es256` must not make clap suggest the shared secret.
        #[arg(long, value_enum, ignore_case = true)]
        alg: AlgArg,
        /// Key ID: the JWS header's `kid` and the file names; 1 to 128 of [A-Za-z0-9._-].
        #[arg(long, value_name = "KID")]
        kid: String,
        /// Directory to write the key files to (created if missing; files never overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Fill in artifact sizes and digests, sign the manifest, write a capsule directory.
    Pack {
        /// Manifest v1 (JSON); missing `size`/`sha256` are computed from --files.
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// Directory holding every artifact and tool at its manifest path.
        #[arg(long, value_name = "DIR")]
        files: PathBuf,
        /// Private JWK (RFC 7517) with `kid` and `alg`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Capsule directory to create (must not exist).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Signed approvals to keep (a capsule's approvals/ directory): each must name
        /// the manifest being packed; a stale one is refused.
        #[arg(long, value_name = "DIR")]
        approvals: Option<PathBuf>,
    },
    /// An approver signs a packed capsule's manifest: writes one approvals/*.jws.
    Approve(approve::ApproveArgs),
    /// Tenant index (fleet freshness).
    Index {
        #[command(subcommand)]
        command: index::IndexCommand,
    },
    /// The sandbox's root file system: its tree digest, for a policy's pin.
    Rootfs {
        #[command(subcommand)]
        command: rootfs::RootfsCommand,
    },
    /// Check capsules in parallel; records nothing.
    Verify(VerifyArgs),
    /// Verify, then durably record each admission (anti-rollback state, admission log).
    Admit(VerifyArgs),
    /// Admit one capsule, run it in a gVisor (runsc) or Kata sandbox, write the
    /// evidence bundle, print one CloudEvent. Exit 0 the capsule exited 0, 1 denied,
    /// 2 usage or configuration error, 3 it exited non-zero or timed out, 4 the run
    /// failed (sandbox did not start, egress not proven blocked, teardown incomplete,
    /// interrupted, the evidence could not be written).
    Run(run::RunArgs),
    /// The admission service: mTLS (TLS 1.3, SPIFFE peers), micro-batched verification,
    /// durable state. Without --config, a development trust domain under --state.
    Serve(serve::ServeArgs),
    /// The admission log, checked offline.
    Log {
        #[command(subcommand)]
        command: log::LogCommand,
    },
    /// TPM identity key, sealed keys, quotes, and the SVID-to-TPM binding.
    Attest {
        #[command(subcommand)]
        command: self::attest::AttestCommand,
    },
    /// Evidence bundles and exports: `evidence verify` offline, and `evidence export`
    /// (what of a bundle may leave the host).
    Evidence {
        #[command(subcommand)]
        command: evidence::EvidenceCommand,
    },
    /// Events queued for a CloudEvents sink.
    Events {
        #[command(subcommand)]
        command: events::EventsCommand,
    },
    /// Print a shell completion script for SHELL on stdout.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of capsule-gateway or of one of its commands on
    /// stdout, or write every page to a directory.
    Man {
        /// Write capsule-gateway.1 and one page per command (capsule-gateway-verify.1,
        /// ...) to DIR instead of printing one page.
        #[arg(long, value_name = "DIR", conflicts_with = "command")]
        out: Option<PathBuf>,
        /// The command whose page to print, e.g. `verify` or `attest seal`.
        #[arg(value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Push a capsule directory to an OCI registry as an artifact; prints its digest.
    Publish(publish::PublishArgs),
    /// The pull-only edge runner: poll registries, pull, verify, run, push evidence.
    Agent(agent::AgentArgs),
    /// Prove on this host, through the deployed configuration, that the gate works:
    /// canaries, sandbox tiers, TPM, SVID, clock, state, alignment. Exit 0 all pass,
    /// 1 any fails, 2 usage.
    Selfcheck(selfcheck::SelfcheckArgs),
    /// The signed deployment manifest the selfcheck's `alignment` compares with.
    Align {
        #[command(subcommand)]
        command: align::AlignCommand,
    },
    /// The egress probe, run inside the sandbox before the entrypoint (internal).
    #[command(name = "sandbox-probe", hide = true)]
    SandboxProbe {
        /// The probe's own arguments, passed by the launcher.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// Parses the process arguments and runs the command.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout with success, usage errors with code 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_CONFIG } else { 0 });
        }
    };
    if let Err(e) = logging::init(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("capsule-gateway: error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let result = match cli.command {
        Command::Keygen { alg, kid, out } => keygen::run(alg, &kid, &out),
        Command::Pack {
            manifest,
            files,
            key,
            out,
            approvals,
        } => pack::run(&manifest, &files, &key, &out, approvals.as_deref()),
        Command::Approve(args) => approve::run(&args),
        Command::Index { command } => index::run(command),
        Command::Rootfs { command } => rootfs::run(command),
        Command::Verify(args) => verify::run(&args, false),
        Command::Admit(args) => verify::run(&args, true),
        Command::Run(args) => run::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Publish(args) => publish::run(&args),
        Command::Agent(args) => agent::run(&args),
        Command::Log { command } => log::run(command),
        Command::Attest { command } => self::attest::run(command),
        Command::Evidence { command } => evidence::run(command),
        Command::Events { command } => events::run(command),
        Command::Completions { shell } => completions(shell),
        Command::Man { out, command } => man(out.as_deref(), &command),
        Command::Selfcheck(args) => selfcheck::run(&args),
        Command::Align { command } => align::run(command),
        Command::SandboxProbe { args } => return run::probe(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsule-gateway: error: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code of a command that ended with `e`.
pub fn exit_code(e: &GatewayError) -> u8 {
    match e.class() {
        ErrorClass::Usage => EXIT_CONFIG,
        ErrorClass::Runtime => EXIT_RUNTIME,
    }
}

/// A flag raised by SIGINT or SIGTERM: long-running commands stop in order on it.
fn cancel_on_signals() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, GatewayError> {
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone()).map_err(|source| {
            GatewayError::Process {
                what: "signal handler",
                source,
            }
        })?;
    }
    Ok(cancel)
}

fn usage(message: impl std::fmt::Display) -> GatewayError {
    GatewayError::Usage(message.to_string())
}

/// `completions SHELL`: generated from the parser's own definitions.
fn completions(shell: clap_complete::Shell) -> Result<ExitCode, GatewayError> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "capsule-gateway", &mut script);
    print_bytes(&script)
}

/// `man [COMMAND...]` prints one page; `man --out DIR` writes them all.
fn man(out: Option<&Path>, path: &[String]) -> Result<ExitCode, GatewayError> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Built once so that subcommands carry their full names (`capsule-gateway-verify`).
    cmd.build();
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).map_err(|e| GatewayError::io(dir, e))?;
        clap_mangen::generate_to(cmd, dir).map_err(|e| GatewayError::io(dir, e))?;
        crate::output::println_stdout(dir.display())?;
        return Ok(ExitCode::SUCCESS);
    }
    for name in path {
        cmd = cmd
            .find_subcommand(name)
            .filter(|c| !c.is_hide_set())
            .cloned()
            .ok_or_else(|| usage(format!("man: no command `{}`", path.join(" "))))?;
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut page)
        .map_err(|e| GatewayError::io("<man page>", e))?;
    print_bytes(&page)
}

/// Writes generated text to stdout; a reader that went away (`| head`) ends it quietly.
fn print_bytes(bytes: &[u8]) -> Result<ExitCode, GatewayError> {
    let mut out = std::io::stdout().lock();
    crate::output::quiet_pipe(out.write_all(bytes).and_then(|()| out.flush()))?;
    Ok(ExitCode::SUCCESS)
}
