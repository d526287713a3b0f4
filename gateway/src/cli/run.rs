//! `run`: admit one capsule exactly as `admit` does, run it in a gVisor or Kata
//! sandbox, write the evidence bundle, and print one CloudEvents v1.0 event
//! (structured JSON mode) on stdout.
//!
//! Event types: `dev.capsule-gateway.run.completed` (the capsule ran; its exit code,
//! or `timed_out`, is in `data`), `.denied` (not admitted: nothing was launched),
//! `.failed` (admitted, but the run cannot be vouched for: the sandbox did not
//! start, egress was not proven blocked, teardown was incomplete, or the gateway was
//! interrupted). Exit codes: 0 completed with exit code 0, 1 denied, 2 usage or
//! configuration error, 3 completed with a non-zero exit code or a timeout, 4 failed.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cloudevents::{EventBuilder, EventBuilderV10};
use sandbox_launcher::{
    ContainerdConfig, LaunchError, Launcher, LauncherConfig, PrivateContainerd, ProbeBinary, RunId,
    RunReport, RunscConfig, RuntimeConfig,
};
use serde_json::{json, Value};
use verify_core::{Admitted, Decision};

use super::verify::Admission;
use super::{HashModeArg, EXIT_DENIED};
use crate::output::decision_json;
use crate::GatewayError;

/// The capsule ran and exited non-zero, or was timed out.
pub const EXIT_CAPSULE_FAILED: u8 = 3;
/// The run cannot be vouched for (see the module docs).
pub const EXIT_RUN_FAILED: u8 = 4;

pub const TYPE_COMPLETED: &str = "dev.capsule-gateway.run.completed";
pub const TYPE_DENIED: &str = "dev.capsule-gateway.run.denied";
pub const TYPE_FAILED: &str = "dev.capsule-gateway.run.failed";

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
    )?
    .with_governance(&args.index, &[args.runtime.tier()])?;
    // The sandbox is set up before admission: a missing runtime is a configuration
    // error (exit 2) and stale sandboxes of a crashed earlier run are gone first.
    let (_containerd, launcher) = launcher(args)?;
    let stale: Vec<Value> = launcher
        .stale_cleaned()
        .iter()
        .map(
            |s| json!({"run_id": s.run_id, "container_id": s.container_id, "teardown": s.teardown}),
        )
        .collect();

    let result = admission
        .admit(std::slice::from_ref(&args.capsule), true)?
        .pop()
        .ok_or_else(|| super::usage("no capsule"))?;
    let admitted = match result {
        Ok(a) => a,
        Err(decision) => {
            let event = denied_event(&source, &args.capsule, &decision)?;
            print_event(&event)?;
            return Ok(ExitCode::from(EXIT_DENIED));
        }
    };

    // SIGINT/SIGTERM from here on stop the sandbox in order instead of killing us.
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone())
            .map_err(|e| GatewayError::io("<signal handler>", e))?;
    }
    let evidence_root = args
        .evidence
        .clone()
        .unwrap_or_else(|| args.state.join("evidence"));
    let run_id = RunId::new().map_err(launch_config_error)?;
    let (event, code) = execute(
        &launcher,
        &run_id,
        &admitted,
        &source,
        &evidence_root,
        &cancel,
        stale,
    )?;
    print_event(&event)?;
    Ok(ExitCode::from(code))
}

/// Launches an admitted capsule, writes its evidence bundle under `evidence_root`
/// and returns its CloudEvent with the exit code `run` gives it (0, 3 or 4). Shared
/// by `run` and the service's `/v1/runs`.
pub(crate) fn execute(
    launcher: &Launcher,
    run_id: &RunId,
    admitted: &Admitted,
    source: &str,
    evidence_root: &Path,
    cancel: &AtomicBool,
    stale: Vec<Value>,
) -> Result<(Value, u8), GatewayError> {
    let outcome = launcher.launch_as(admitted, run_id, cancel);
    let (kind, data, code) = match &outcome {
        Ok(report) if report.interrupted => (
            TYPE_FAILED,
            run_data(
                admitted,
                Some(report),
                Some("interrupted: the gateway was asked to stop"),
            ),
            EXIT_RUN_FAILED,
        ),
        Ok(report) => (
            TYPE_COMPLETED,
            run_data(admitted, Some(report), None),
            if report.exit_code == Some(0) {
                0
            } else {
                EXIT_CAPSULE_FAILED
            },
        ),
        Err(e) => (
            TYPE_FAILED,
            run_data(admitted, e.report(), Some(&e.to_string())),
            EXIT_RUN_FAILED,
        ),
    };
    let mut data = data;
    data["stale_sandboxes_cleaned"] = Value::Array(stale);
    data["run_id"] = json!(run_id.as_str());
    let run_id = run_id.as_str();
    let m = admitted.manifest();
    let subject = format!("{}@{}", m.capsule_id, m.version);
    let bundle_dir = evidence_root.join(run_id);
    data["evidence_bundle"] = json!(bundle_dir.display().to_string());
    let event = build_event(run_id, source, kind, Some(&subject), data)?;
    let report = match &outcome {
        Ok(r) => Some(r),
        Err(e) => e.report(),
    };
    write_evidence(evidence_root, run_id, admitted, report, &event)?;
    Ok((event, code))
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

fn launcher(args: &RunArgs) -> Result<(Option<PrivateContainerd>, Launcher), GatewayError> {
    let probe = probe_binary()?;
    let sandbox = args.state.join("sandbox");
    let (containerd, runtime, dir) = match args.runtime {
        RuntimeArg::Runsc => {
            let mut c = RunscConfig::default();
            c.platform = args.platform.as_str().to_string();
            (None, RuntimeConfig::Runsc(c), sandbox.join("runsc"))
        }
        RuntimeArg::Kata => {
            let (private, address) = match &args.containerd_address {
                Some(a) => (None, a.clone()),
                None => {
                    let c = PrivateContainerd::start(&args.state.join("containerd"))
                        .map_err(launch_config_error)?;
                    let address = c.address().to_path_buf();
                    (Some(c), address)
                }
            };
            (
                private,
                RuntimeConfig::Containerd(ContainerdConfig::kata(address)),
                sandbox.join("kata"),
            )
        }
    };
    let mut config = LauncherConfig::new(dir, runtime, probe);
    config.output_cap_bytes = args.output_cap;
    let launcher = Launcher::new(config).map_err(launch_config_error)?;
    Ok((containerd, launcher))
}

/// This executable as the sandbox's egress probe (`capsule-gateway sandbox-probe`).
pub(crate) fn probe_binary() -> Result<ProbeBinary, GatewayError> {
    let exe = std::env::current_exe().map_err(|e| GatewayError::io("<current executable>", e))?;
    Ok(ProbeBinary {
        path: exe,
        args: vec!["sandbox-probe".into()],
    })
}

pub(crate) fn launch_config_error(e: LaunchError) -> GatewayError {
    GatewayError::Usage(format!("sandbox: {e}"))
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    // The id only has to be unique; should the RNG fail, the time still is.
    if verify_core::crypto::default_backend()
        .random(&mut b)
        .is_err()
    {
        let t = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        return format!("t{t:x}");
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `data` of a run event: DESIGN.md's evidence fields, and what the sandbox saw.
fn run_data(admitted: &Admitted, report: Option<&RunReport>, error: Option<&str>) -> Value {
    let m = admitted.manifest();
    let d = admitted.decision();
    let mut data = json!({
        "manifest_jws": String::from_utf8_lossy(admitted.jws()),
        "tenant_id": m.tenant,
        "capsule_digest": admitted.digest().to_string(),
        "capsule_id": m.capsule_id,
        "version": m.version,
        "run_id": report.map(|r| r.run_id.clone()),
        "policy_version": m.policy_version,
        "approvers": m.approvals.iter().map(|a| a.approver.as_str()).collect::<Vec<_>>(),
        "decision": {"verdict": d.verdict.as_str(), "detail": d.detail, "kid": d.kid, "alg": d.alg.map(|a| a.as_str())},
        "error": error,
    });
    if let Some(r) = report {
        let extra = json!({
            "stdout": r.stdout.text(),
            "stderr": r.stderr.text(),
            "stdout_bytes": r.stdout.total_bytes,
            "stderr_bytes": r.stderr.total_bytes,
            "stdout_truncated": r.stdout.truncated,
            "stderr_truncated": r.stderr.truncated,
            "exit_code": r.exit_code,
            "timed_out": r.timed_out,
            "interrupted": r.interrupted,
            "started_at_ms": r.started_at_ms,
            "duration_ms": r.duration_ms,
            "runtime": r.runtime,
            "oci_config_sha256": r.bundle.oci_config_sha256,
            "sandbox": r.bundle,
            "egress_probe": r.egress,
            "teardown": r.teardown,
            "staged": r.staged,
        });
        if let (Some(obj), Value::Object(more)) = (data.as_object_mut(), extra) {
            obj.extend(more);
        }
    }
    data
}

fn build_event(
    id: &str,
    source: &str,
    kind: &str,
    subject: Option<&str>,
    data: Value,
) -> Result<Value, GatewayError> {
    let mut b = EventBuilderV10::new()
        .id(id)
        .source(source)
        .ty(kind)
        .time(chrono::Utc::now())
        .data("application/json", data);
    if let Some(s) = subject {
        b = b.subject(s);
    }
    let event = b
        .build()
        .map_err(|e| super::usage(format!("CloudEvent: {e}")))?;
    serde_json::to_value(&event).map_err(|e| super::usage(format!("CloudEvent: {e}")))
}

/// A `.denied` event: the decision and the digest of the JWS bytes the verifier read
/// (none when they could not be read). The bytes themselves are never copied here:
/// they did not verify, and a denied capsule's `capsule.jws` is whatever its author
/// made it (before issue 10, a symlink put a host file into the event).
/// `manifest_jws` stays in the schema, always null.
fn denied_event(source: &str, capsule: &Path, d: &Decision) -> Result<Value, GatewayError> {
    let mut data = decision_json(&capsule.display().to_string(), d);
    data["tenant_id"] = json!(d.tenant);
    data["capsule_digest"] = json!(d.digest.map(|x| x.to_string()));
    data["manifest_jws"] = Value::Null;
    data["launched"] = json!(false);
    let subject = match (&d.capsule_id, d.version) {
        (Some(id), Some(v)) => Some(format!("{id}@{v}")),
        _ => None,
    };
    build_event(&random_id(), source, TYPE_DENIED, subject.as_deref(), data)
}

fn print_event(event: &Value) -> Result<(), GatewayError> {
    // A closed pipe does not change the run's exit code (the evidence is written).
    crate::output::println_stdout(event)
}

/// The evidence bundle of one run: `EVIDENCE/<run id>/` with the exact `capsule.jws`,
/// `decision.json`, `stdout`, `stderr`, `sandbox.json` (runtime, OCI config digest,
/// egress probe, teardown), `oci-config.json` and `event.json`. Written to a
/// temporary directory and renamed into place, so a bundle is whole or absent.
///
/// A bundle holds the capsule's output and its JWS: readable by the gateway's user
/// only (the root, when it creates it, and each bundle directory 0700, each file
/// 0600, whatever the umask).
fn write_evidence(
    root: &Path,
    run_id: &str,
    admitted: &Admitted,
    report: Option<&RunReport>,
    event: &Value,
) -> Result<PathBuf, GatewayError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| GatewayError::io(root, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".bundle-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(root)
        .map_err(|e| GatewayError::io(root, e))?;
    let put = |name: &str, bytes: &[u8]| -> Result<(), GatewayError> {
        let p = tmp.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| GatewayError::io(&p, e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| GatewayError::io(&p, e))
    };
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    put("capsule.jws", admitted.jws())?;
    put(
        "decision.json",
        &pretty(&decision_json("capsule", admitted.decision())),
    )?;
    if let Some(r) = report {
        put("stdout", &r.stdout.bytes)?;
        put("stderr", &r.stderr.bytes)?;
        put("oci-config.json", r.oci_config.as_bytes())?;
        let sandbox = json!({
            "run_id": r.run_id,
            "container_id": r.container_id,
            "runtime": r.runtime,
            "oci_config_sha256": r.bundle.oci_config_sha256,
            "bundle": r.bundle,
            "egress_probe": r.egress,
            "teardown": r.teardown,
            "staged": r.staged,
            "exit_code": r.exit_code,
            "timed_out": r.timed_out,
            "interrupted": r.interrupted,
            "duration_ms": r.duration_ms,
        });
        put("sandbox.json", &pretty(&sandbox))?;
    }
    put("event.json", &pretty(event))?;
    let dest = root.join(run_id);
    let kept = tmp.keep();
    std::fs::rename(&kept, &dest).map_err(|e| GatewayError::io(&dest, e))?;
    Ok(dest)
}
