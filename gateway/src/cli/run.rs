//! `run`: admit one capsule exactly as `admit` does, run it in a gVisor or Kata
//! sandbox, write the evidence bundle, and print one CloudEvents v1.0 event
//! (structured JSON mode) on stdout.
//!
//! Event types: `dev.capsule-gateway.run.completed` (the capsule ran; its exit code,
//! or `timed_out`, is in `data`), `.denied` (not admitted: nothing was launched),
//! `.failed` (admitted, but the run cannot be vouched for: the sandbox did not
//! start, egress was not proven blocked, teardown was incomplete, or the gateway was
//! interrupted). Exit codes: 0 completed with exit code 0, 1 denied, 2 usage or
//! configuration error, 3 completed with a non-zero exit code or a timeout, 4 failed
//! (with a `.failed` event), or a runtime failure without an event (the evidence
//! could not be written).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{HashModeArg, EXIT_DENIED, EXIT_RUNTIME};
use crate::admission::Admission;
use crate::evidence::{Event, EventData, EventType};
use crate::launch::{self, Runtime, Sandbox};
use crate::layout::StateLayout;
use crate::GatewayError;

/// The capsule ran and exited non-zero, or was timed out.
pub const EXIT_CAPSULE_FAILED: u8 = 3;
/// The run cannot be vouched for (see the module docs): the runtime-failure code
/// every command uses.
pub const EXIT_RUN_FAILED: u8 = EXIT_RUNTIME;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeArg {
    /// gVisor (`runsc`, Debian package `runsc`)
    Runsc,
    /// Kata Containers through containerd's shim v2 (`io.containerd.kata.v2`)
    Kata,
}

/// The gVisor platforms the installed runsc has (`runsc flags`: `-platform`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlatformArg {
    /// ptrace(2): works everywhere, the default
    Ptrace,
    /// KVM: needs /dev/kvm (and nested paging inside a VM)
    Kvm,
}

impl PlatformArg {
    fn as_str(self) -> &'static str {
        match self {
            PlatformArg::Ptrace => "ptrace",
            PlatformArg::Kvm => "kvm",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy file (TOML); its `trust.jwks` is resolved relative to it.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// The sandbox.
    #[arg(long, value_enum, default_value = "runsc")]
    pub runtime: RuntimeArg,
    /// This runner's SPIFFE ID (also the event's `source`); defaults to the SVID's.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub runner: Option<String>,
    /// Gateway state: anti-rollback state, sandbox state, evidence.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/capsule-gateway")]
    pub state: PathBuf,
    /// gVisor platform (`ptrace` works everywhere; `kvm` needs usable nested paging).
    /// Checked when the flags are read: a platform runsc does not have is a usage
    /// error, before any capsule is admitted or recorded.
    #[arg(long, value_enum, default_value = "ptrace")]
    pub platform: PlatformArg,
    /// Kata: an existing containerd socket (default: a private containerd under
    /// STATE/containerd, started and stopped by this command).
    #[arg(long, value_name = "SOCKET")]
    pub containerd_address: Option<PathBuf>,
    /// The event's `source` when there is no --runner (a URI).
    #[arg(long, value_name = "URI")]
    pub event_source: Option<String>,
    /// Where evidence bundles go (default STATE/evidence).
    #[arg(long, value_name = "DIR")]
    pub evidence: Option<PathBuf>,
    /// Bytes of stdout and of stderr kept.
    #[arg(long, default_value_t = 1 << 20)]
    pub output_cap: usize,
    /// How artifact bytes are read for hashing.
    #[arg(long, value_enum, default_value = "auto")]
    pub hash_mode: HashModeArg,
    /// The runner's SVID (default for --runner) and the TPM for sealed keys, as for
    /// `admit`.
    #[command(flatten)]
    pub identity: super::attest::IdentityArgs,
    /// A signed tenant index (fleet freshness); repeat for several tenants.
    #[arg(long, value_name = "FILE")]
    pub index: Vec<PathBuf>,
    /// Capsule directory (capsule.jws and files/).
    #[arg(value_name = "CAPSULE")]
    pub capsule: PathBuf,
}

impl RuntimeArg {
    /// The sandbox tier this runtime provides (a rule's `tier`).
    fn tier(self) -> verify_core::Tier {
        match self {
            RuntimeArg::Runsc => verify_core::Tier::Gvisor,
            RuntimeArg::Kata => verify_core::Tier::Kata,
        }
    }
}

/// The hidden `sandbox-probe` subcommand: the egress probe, inside the sandbox.
pub fn probe(args: &[OsString]) -> ExitCode {
    let code = sandbox_launcher::probe::sandbox_main(args);
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}

pub fn run(args: &RunArgs) -> Result<ExitCode, GatewayError> {
    let runner = args.identity.runner(args.runner.as_deref())?;
    let source = event_source(runner.as_deref(), args.event_source.as_deref())?;
    let admission = Admission::open_with(
        &args.policy,
        runner.as_deref(),
        &args.identity,
        Some(&args.state),
        true,
        args.hash_mode,
        crate::admission_log::LogConfig::default(),
    )?;
    let indexes = crate::tenant_index::load_all(&args.index, admission.policy())?;
    let admission = admission.with_governance(indexes, &[args.runtime.tier()]);
    // The sandbox is set up before admission: a missing runtime is a configuration
    // error (exit 2) and stale sandboxes of a crashed earlier run are gone first.
    let layout = StateLayout::new(&args.state);
    let runtime = match args.runtime {
        RuntimeArg::Runsc => Runtime::Runsc {
            platform: args.platform.as_str().to_string(),
        },
        RuntimeArg::Kata => Runtime::Kata {
            containerd: args.containerd_address.clone(),
        },
    };
    let sandbox = Sandbox::start(&layout, &runtime, Some(args.output_cap))?;

    let result = admission
        .admit(std::slice::from_ref(&args.capsule), true)?
        .pop()
        .ok_or_else(|| super::usage("no capsule"))?;
    let admitted = match result {
        Ok(a) => a,
        Err(decision) => {
            let id = launch::new_run_id()?;
            let capsule = args.capsule.display().to_string();
            let event = Event::denied(
                id.as_str(),
                &source,
                &capsule,
                &decision,
                launch::event_time(admission.clock()),
            );
            print_event(&event)?;
            return Ok(ExitCode::from(EXIT_DENIED));
        }
    };

    // SIGINT/SIGTERM from here on stop the sandbox in order instead of killing us.
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone()).map_err(|source| {
            GatewayError::Process {
                what: "signal handler",
                source,
            }
        })?;
    }
    let evidence_root = args.evidence.clone().unwrap_or_else(|| layout.evidence());
    let run_id = launch::new_run_id()?;
    let event = launch::execute(
        sandbox.launcher(),
        &run_id,
        &admitted,
        launch::EvidenceSink {
            root: &evidence_root,
            source: &source,
            clock: admission.clock(),
        },
        &cancel,
        sandbox.stale_cleaned().to_vec(),
    )?;
    print_event(&event)?;
    Ok(ExitCode::from(exit_code(&event)))
}

/// `run`'s exit code for the event of an admitted capsule's run (0, 3 or 4).
fn exit_code(event: &Event) -> u8 {
    match &event.data {
        EventData::Run(EventType::Completed, d) if d.exit_code == Some(Some(0)) => 0,
        EventData::Run(EventType::Completed, _) => EXIT_CAPSULE_FAILED,
        EventData::Run(_, _) => EXIT_RUN_FAILED,
        EventData::Denied(_) => EXIT_DENIED,
    }
}

/// `source`: the runner's SPIFFE ID, else the configured URI, else this host.
fn event_source(runner: Option<&str>, configured: Option<&str>) -> Result<String, GatewayError> {
    if let Some(r) = runner {
        return Ok(r.to_string());
    }
    if let Some(s) = configured {
        if s.is_empty() || s.chars().any(char::is_whitespace) {
            return Err(super::usage(format!("--event-source `{s}` is not a URI")));
        }
        return Ok(s.to_string());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    Ok(format!("urn:capsule-gateway:host:{}", host.trim()))
}

fn print_event(event: &Event) -> Result<(), GatewayError> {
    // A closed pipe does not change the run's exit code (the evidence is written).
    crate::output::println_stdout(event.to_json())
}
