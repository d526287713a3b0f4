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
//!
//! Every run and every denial leaves a bundle under the evidence root with a signed
//! index (`index.json`, `index.sig.json`; see `crate::evidence::index`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::{HashModeArg, EXIT_DENIED, EXIT_RUNTIME};
use crate::admission::Admission;
use crate::delivery::{Delivery, Sink, Spool};
use crate::evidence::{
    outbound_event, printed_event, Custody, EgressRules, Event, EventData, EventType, PolicyFacts,
};
use crate::launch::{self, Runtime, Sandbox};
use crate::layout::StateLayout;
use crate::GatewayError;
use verify_core::Tier;

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
    /// Restrict this runner to one sandbox (and its tier). Without it, each capsule
    /// runs in the tier its environment's rule names (`tier`): `gvisor` (runsc, also
    /// when the rule names none) or `kata`, which this host provides only when the
    /// shim of --kata-runtime-type is installed; a rule's tier the host lacks is
    /// denied `tier_unavailable`.
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeArg>,
    /// The containerd shim v2 runtime type of the `kata` tier. `io.containerd.runc.v2`
    /// drives the same containerd path where Kata is absent; runc is no sandbox, so
    /// that is for testing the path only.
    #[arg(long, value_name = "TYPE", default_value = launch::KATA_RUNTIME_TYPE)]
    pub kata_runtime_type: String,
    /// The base root file system (built by install-deps from busybox-static); a
    /// tenant's `rootfs.sha256` pins its tree digest.
    #[arg(long, value_name = "DIR", default_value = sandbox_launcher::rootfs::BASE_ROOTFS)]
    pub rootfs: PathBuf,
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
    /// Deliver the event to this HTTP CloudEvents sink (structured mode), shaped by
    /// the tenant's egress mode: queued durably under STATE/spool first, then one
    /// attempt (with what earlier runs left queued) within --sink-timeout-ms. An
    /// event not delivered stays queued (`events deliver`, a later run or the
    /// service sends it); the run's exit code does not depend on the sink.
    #[arg(long, value_name = "URL")]
    pub sink: Option<String>,
    /// The bound on `--sink` delivery for this run (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub sink_timeout_ms: u64,
    /// Capsule directory (capsule.jws and files/).
    #[arg(value_name = "CAPSULE")]
    pub capsule: PathBuf,
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
    let gvisor = Runtime::Runsc {
        platform: args.platform.as_str().to_string(),
    };
    let kata = Runtime::Kata {
        containerd: args.containerd_address.clone(),
        runtime_type: args.kata_runtime_type.clone(),
    };
    // The tiers this runner provides, and the sandbox set up before admission: a
    // missing runtime is a configuration error (exit 2) and stale sandboxes of a
    // crashed earlier run are gone first. Kata, when a capsule's rule asks for it and
    // --runtime did not choose it, is set up after admission.
    let (tiers, first) = match args.runtime {
        Some(RuntimeArg::Runsc) => (vec![Tier::Gvisor], gvisor.clone()),
        Some(RuntimeArg::Kata) => (vec![Tier::Kata], kata.clone()),
        None if launch::shim_installed(&args.kata_runtime_type) => {
            (vec![Tier::Gvisor, Tier::Kata], gvisor.clone())
        }
        None => (vec![Tier::Gvisor], gvisor.clone()),
    };
    let admission = admission.with_governance(indexes, &tiers);
    let layout = StateLayout::new(&args.state);
    let mut sandbox = Sandbox::start(&layout, &first, Some(args.output_cap))?;
    let egress = EgressRules::compile(admission.policy())?;
    let delivery = match &args.sink {
        Some(url) => {
            let sink = Sink::parse(url, Duration::from_millis(args.sink_timeout_ms))?;
            Some(Delivery::new(Spool::open(&layout.spool())?, sink)?)
        }
        None => None,
    };
    let policy_digest = admission.policy().digests.policy;
    // The signer too: a TPM that is configured and not usable stops here.
    let custody = Custody {
        signer: args.identity.custody_signer(&args.state)?,
        facts: PolicyFacts::of(admission.policy()),
        runner_id: runner.clone(),
    };
    let evidence_root = args.evidence.clone().unwrap_or_else(|| layout.evidence());

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
                &policy_digest,
                launch::event_time(admission.clock()),
            );
            let bundle = crate::evidence::write_denial_bundle(&evidence_root, &event, &custody)?;
            emit(&event, &egress, Some(&bundle), delivery.as_ref())?;
            return Ok(ExitCode::from(EXIT_DENIED));
        }
    };

    // SIGINT/SIGTERM from here on stop the sandbox in order instead of killing us.
    let cancel = super::cancel_on_signals()?;
    // The tier its rule names (admission refused one this host lacks), else the one
    // set up already.
    let tier = launch::tier_for(admission.policy(), &admitted).unwrap_or(first.tier());
    if tier != first.tier() {
        let runtime = if tier == Tier::Kata { &kata } else { &gvisor };
        sandbox = Sandbox::start(&layout, runtime, Some(args.output_cap))?;
    }
    let rootfs = launch::rootfs_for(admission.policy(), &admitted, &args.rootfs);
    let run_id = launch::new_run_id()?;
    let event = launch::execute(
        sandbox.launcher(),
        &run_id,
        &admitted,
        &rootfs,
        launch::EvidenceSink {
            root: &evidence_root,
            source: &source,
            clock: admission.clock(),
            policy_digest: &policy_digest,
            custody: &custody,
        },
        &cancel,
        sandbox.stale_cleaned().to_vec(),
    )?;
    let bundle = evidence_root.join(run_id.as_str());
    emit(&event, &egress, Some(&bundle), delivery.as_ref())?;
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
pub(super) fn event_source(
    runner: Option<&str>,
    configured: Option<&str>,
) -> Result<String, GatewayError> {
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

/// Prints the event as the tenant's egress mode lets `run` print it, and queues the
/// outbound event for the sink (one bounded attempt). A sink that is down costs at
/// most `--sink-timeout-ms` and changes nothing else: the event stays queued.
fn emit(
    event: &Event,
    egress: &EgressRules,
    bundle: Option<&std::path::Path>,
    delivery: Option<&Delivery>,
) -> Result<(), GatewayError> {
    let tenant = egress.for_event(event);
    let index = bundle.and_then(crate::evidence::egress::index_sha256);
    if let Some(d) = delivery {
        let outbound = outbound_event(event, tenant, index.as_deref());
        crate::delivery::enqueue_and_try(d, &event.id, &outbound)?.warn_pending(
            &d.sink,
            "event queued, not delivered yet (`capsule-gateway events deliver` sends it)",
        );
    }
    // A closed pipe does not change the run's exit code (the evidence is written).
    crate::output::println_stdout(printed_event(event, tenant, index.as_deref()))
}
