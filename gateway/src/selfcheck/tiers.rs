//! The sandbox tiers: for each configured tier a signed canary is admitted and run
//! through the same launch path as real runs ([`launch::Sandbox::start`],
//! [`launch::execute`], the egress probe, the teardown), with `scope.network =
//! "none"`. Checks, per tier (`tier.<tier>.<what>`):
//!
//! - `available`: the runtime is there (runsc on PATH, Kata's shim); a missing one
//!   names its Debian package;
//! - `egress`: nothing left the sandbox. The launcher's own probe must fail to reach
//!   its listener on host loopback; then the canary runs the same probe binary
//!   (`/.capsule-probe`) against listeners this check opened itself, on `127.0.0.1`
//!   and on a non-loopback address of the host, and it must fail to reach each, and
//!   neither listener may have seen a connection. Anything reached is named;
//! - `teardown`: the launcher's verification from outside found nothing left;
//! - `seccomp`, `apparmor`: what the run's evidence says was enforced, as it is.
//!
//! The canary is signed by a key made inside the check, admitted under a policy that
//! trusts only that key, without any state, and its evidence goes to a throw-away
//! directory: the deployment's trust store, state and evidence are never touched.
//!
//! Not done: for a `targets` configuration, the proof that an undeclared address is
//! dropped (the launcher proves it on every `targets` run; the selfcheck does not
//! run one).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use sandbox_launcher::probe::{split_report, ProbeReport};
use sandbox_launcher::profiles::AppArmorHost;
use sandbox_launcher::{Rootfs, TeardownReport};
use verify_core::HashMode;

use super::target::TierTarget;
use super::{Report, Target};
use crate::admission::{system_clock, Admission};
use crate::custody::CustodySigner;
use crate::evidence::{Custody, EventData, PolicyFacts, RunData};
use crate::launch::{self, Sandbox};
use crate::layout::StateLayout;
use crate::GatewayError;

/// The canary's kid, tenant and environment (they exist only in the check's policy).
const CANARY_KID: &str = "selfcheck-canary";
const CANARY_TENANT: &str = "selfcheck";
const CANARY_ENV: &str = "selfcheck";

pub fn check(target: &Target<'_>, report: &mut Report) {
    for tier in &target.tiers {
        check_tier(tier, report);
    }
}

/// Why a tier's canary could not be made or run (reported as the failed check).
#[derive(Debug, thiserror::Error)]
enum TierError {
    #[error("cannot make the throw-away directory: {0}")]
    Work(#[source] std::io::Error),
    #[error("cannot open a listener on {addr}: {source}")]
    Listen {
        addr: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the canary {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("cannot make the canary's key: {0}")]
    Key(#[from] crate::keygen::KeygenError),
    #[error("cannot pack the canary: {0}")]
    Pack(#[from] crate::pack::PackError),
    #[error("cannot load the canary's policy: {0}")]
    Policy(#[from] verify_core::ConfigError),
    #[error("the signed canary was denied: {0}")]
    Denied(String),
    #[error("cannot make the throw-away custody key: {0}")]
    Custody(#[from] crate::custody::CustodyError),
}

fn check_tier(tier: &TierTarget, report: &mut Report) {
    let name = format!("tier.{}", tier.runtime.tier().as_str());
    let work = match tempfile::Builder::new()
        .prefix("capsule-selfcheck-")
        .tempdir()
        .map_err(TierError::Work)
    {
        Ok(w) => w,
        Err(e) => return report.fail(format!("{name}.available"), e.to_string()),
    };
    // A throw-away launcher directory: the deployment's sandboxes are not touched.
    let layout = StateLayout::new(work.path().join("state"));
    let sandbox = match Sandbox::start(&layout, &tier.runtime, None) {
        Ok(s) => s,
        Err(e) => return report.fail(format!("{name}.available"), e.to_string()),
    };
    report.pass(format!("{name}.available"), describe(&tier.runtime));
    match run_canary(&sandbox, tier, work.path()) {
        Ok(run) => judge(&name, &run, report),
        Err(e) => report.fail(
            format!("{name}.egress"),
            format!("the canary did not run: {e}"),
        ),
    }
}

fn describe(runtime: &launch::Runtime) -> String {
    match runtime {
        launch::Runtime::Runsc { platform } => format!("runsc is there (platform {platform})"),
        launch::Runtime::Kata { runtime_type, .. } => {
            format!("containerd and the shim of {runtime_type} are there")
        }
    }
}

/// What one canary run left to judge.
struct CanaryRun {
    data: RunData,
    /// The check's own listeners, and whether each saw a connection.
    own: Vec<(SocketAddr, bool)>,
}

/// The check's own listeners: host loopback, and a non-loopback address of the host
/// when it has one (outside the egress pool, which belongs to `targets` runs).
struct Listeners(Vec<TcpListener>);

impl Listeners {
    fn open() -> Result<Listeners, TierError> {
        let pool = sandbox_launcher::net::Pool::default();
        let other = sandbox_launcher::net::resolve::host_addresses()
            .into_iter()
            .find(|a| !a.is_loopback() && !a.is_link_local() && !pool.contains(*a));
        let mut out = Vec::new();
        for addr in std::iter::once(Ipv4Addr::LOCALHOST).chain(other) {
            let l = TcpListener::bind((addr, 0))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| TierError::Listen { addr, source })?;
            out.push(l);
        }
        Ok(Listeners(out))
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.0.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Each listener's address and whether anything connected (drains the backlog).
    fn seen(&self) -> Vec<(SocketAddr, bool)> {
        self.0
            .iter()
            .filter_map(|l| {
                let mut any = false;
                while l.accept().is_ok() {
                    any = true;
                }
                l.local_addr().ok().map(|a| (a, any))
            })
            .collect()
    }
}

fn run_canary(sandbox: &Sandbox, tier: &TierTarget, work: &Path) -> Result<CanaryRun, TierError> {
    let listeners = Listeners::open()?;
    let admission_policy = canary_policy(work)?;
    let capsule = pack_canary(work, &listeners.addrs())?;
    let admission = Admission::new(admission_policy, system_clock(), HashMode::Auto)
        .with_governance(Vec::new(), &[tier.runtime.tier()]);
    let admitted = admission
        .admit(std::slice::from_ref(&capsule), false)?
        .pop()
        .ok_or_else(|| TierError::Denied("no verdict".into()))?
        .map_err(|d| TierError::Denied(format!("{:?}: {}", d.reason, d.detail)))?;
    let custody = Custody {
        signer: CustodySigner::software(&work.join("custody"))?,
        facts: PolicyFacts::of(admission.policy()),
        runner_id: None,
    };
    let evidence = work.join("evidence");
    let rootfs = Rootfs::Dir {
        path: tier.rootfs.clone(),
        pin: None,
    };
    let run_id = launch::new_run_id()?;
    let event = launch::execute(
        sandbox.launcher(),
        &run_id,
        &admitted,
        &rootfs,
        launch::EvidenceSink {
            root: &evidence,
            source: "capsule-gateway/selfcheck",
            clock: admission.clock(),
            policy_digest: &admission.policy().digests.policy,
            custody: &custody,
        },
        &AtomicBool::new(false),
        Vec::new(),
    )?;
    let own = listeners.seen();
    match event.data {
        EventData::Run(_, data) => Ok(CanaryRun { data: *data, own }),
        EventData::Denied(d) => Err(TierError::Denied(format!("{d:?}"))),
    }
}

/// A policy that trusts only the canary's key, made fresh in `work`.
fn canary_policy(work: &Path) -> Result<verify_core::Policy, TierError> {
    let keys = work.join("keys");
    crate::keygen::generate(verify_core::Alg::Es256, CANARY_KID, &keys)?;
    let text = format!(
        r#"policy_version = "selfcheck-1"
clock_skew_s = 60

[trust]
jwks = "keys/{CANARY_KID}.public.jwks.json"

[[tenants]]
name = "{CANARY_TENANT}"
keys = ["{CANARY_KID}"]
environments = ["{CANARY_ENV}"]
host_programs = ["/bin/sh"]
min_approvals = 1
"#
    );
    let path = work.join("policy.toml");
    write(&path, text.as_bytes())?;
    let mut sealed = crate::sealed::SealedKeys::with_tpm(None);
    Ok(crate::admission::load_policy(&path, &mut sealed)?)
}

/// The canary: a shell script that runs the sandbox's probe binary again against
/// the check's own listeners (it must reach none), then exits 0.
fn pack_canary(work: &Path, targets: &[SocketAddr]) -> Result<PathBuf, TierError> {
    let probe = launch::probe_binary()?;
    let (first, rest) = targets
        .split_first()
        .ok_or_else(|| TierError::Denied("no listener".into()))?;
    let mut line = format!("exec /.capsule-probe {}", probe.args.join(" "));
    line.push_str(&format!(" --connect {first}"));
    for r in rest {
        line.push_str(&format!(" --reach {r}"));
    }
    line.push_str(" -- /bin/true\n");
    let files = work.join("files");
    std::fs::create_dir_all(&files).map_err(|source| TierError::Write {
        path: files.clone(),
        source,
    })?;
    write(&files.join("canary.sh"), line.as_bytes())?;
    let now = system_clock().as_ref().now_unix();
    let manifest = serde_json::json!({
        "schema": "capsule/v1",
        "capsule_id": "selfcheck-tier-canary",
        "version": 1,
        "parent": null,
        "tenant": CANARY_TENANT,
        "issued_at": now.saturating_sub(60),
        "not_before": now.saturating_sub(60),
        "expires_at": now + 600,
        "policy_version": "selfcheck-1",
        "author": "selfcheck@capsule-gateway.dev",
        "approvals": [{
            "approver": "selfcheck-approver@capsule-gateway.dev",
            "role": "selfcheck",
            "approved_at": now.saturating_sub(60)
        }],
        "runners": [],
        "scope": {"environment": CANARY_ENV, "targets": [], "actions": [], "network": "none"},
        "limits": {"timeout_ms": 30000, "memory_mib": 128, "pids": 32},
        "entrypoint": ["/bin/sh", "/capsule/canary.sh"],
        "env": {},
        "artifacts": [{"path": "canary.sh"}],
        "tools": []
    });
    let manifest_path = work.join("manifest.json");
    write(&manifest_path, manifest.to_string().as_bytes())?;
    let out = work.join("capsule");
    Ok(crate::pack::pack(
        &manifest_path,
        &files,
        &work
            .join("keys")
            .join(format!("{CANARY_KID}.private.jwk.json")),
        &out,
        None,
    )?)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), TierError> {
    std::fs::write(path, bytes).map_err(|source| TierError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn judge(name: &str, run: &CanaryRun, report: &mut Report) {
    let d = &run.data;
    judge_egress(name, run, report);
    match &d.teardown {
        Some(t) => judge_teardown(name, t, report),
        None => report.fail(
            format!("{name}.teardown"),
            format!(
                "the launcher reported no teardown: {}",
                d.error.as_deref().unwrap_or("no report")
            ),
        ),
    }
    match &d.sandbox {
        Some(s) => {
            let sc = &s.profiles.seccomp;
            if sc.enforced {
                report.pass(
                    format!("{name}.seccomp"),
                    format!(
                        "profile {} ({}) enforced by {}",
                        sc.profile, sc.profile_sha256, sc.enforced_by
                    ),
                );
            } else {
                report.fail(
                    format!("{name}.seccomp"),
                    format!("profile {} is not enforced", sc.profile),
                );
            }
            let aa = &s.profiles.apparmor;
            if aa.enforced {
                report.pass(
                    format!("{name}.apparmor"),
                    format!("profile {} enforced", aa.profile),
                );
            } else if aa.host == AppArmorHost::Loaded.describe() {
                // Loaded on the host but not applied to the run: a real failure.
                report.fail(
                    format!("{name}.apparmor"),
                    format!("profile {} is loaded but was not applied", aa.profile),
                );
            } else {
                report.notice(format!("{name}.apparmor"), aa.host.clone());
            }
        }
        None => {
            let why = d.error.as_deref().unwrap_or("no report").to_string();
            report.fail(
                format!("{name}.seccomp"),
                format!("no sandbox facts: {why}"),
            );
            report.fail(
                format!("{name}.apparmor"),
                format!("no sandbox facts: {why}"),
            );
        }
    }
}

fn judge_teardown(name: &str, t: &TeardownReport, report: &mut Report) {
    if t.ok {
        let checks: Vec<&str> = t.checks.iter().map(|c| c.name.as_str()).collect();
        report.pass(
            format!("{name}.teardown"),
            format!("nothing left ({})", checks.join(", ")),
        );
    } else {
        report.fail(
            format!("{name}.teardown"),
            format!("left behind: {}", t.failures()),
        );
    }
}

/// Egress is blocked when the launcher's probe failed to reach its listener, the
/// canary's probe failed to reach each of the check's listeners, and none of those
/// listeners saw a connection.
fn judge_egress(name: &str, run: &CanaryRun, report: &mut Report) {
    let check = format!("{name}.egress");
    let d = &run.data;
    let mut reached: Vec<String> = Vec::new();
    if let Some(e) = &d.egress_probe {
        if e.probe.as_ref().is_some_and(|p| p.connected) || e.listener_accepted {
            reached.push(format!("{} (the launcher's listener)", e.target));
        }
    }
    for (addr, seen) in &run.own {
        if *seen {
            reached.push(format!("{addr} (the selfcheck's listener)"));
        }
    }
    let canary = d
        .stdout
        .as_deref()
        .and_then(|s| split_report(s.as_bytes()).0);
    if let Some(p) = &canary {
        for (target, connected) in probed(p) {
            let addr = format!("{target} (the selfcheck's listener)");
            if connected && !reached.contains(&addr) {
                reached.push(addr);
            }
        }
    }
    if !reached.is_empty() {
        return report.fail(
            check,
            format!("egress is open: the probe reached {}", reached.join(", ")),
        );
    }
    let Some(e) = &d.egress_probe else {
        return report.fail(
            check,
            format!(
                "the egress probe did not run: {}",
                d.error.as_deref().unwrap_or("no report")
            ),
        );
    };
    if !e.blocked {
        return report.fail(
            check,
            d.error
                .clone()
                .unwrap_or_else(|| "the launcher did not find egress blocked".into()),
        );
    }
    let Some(p) = canary else {
        return report.fail(
            check,
            format!(
                "the canary's probe did not report (exit {:?}): {}",
                d.exit_code.flatten(),
                d.stderr.as_deref().unwrap_or("").trim()
            ),
        );
    };
    let tried: Vec<String> = probed(&p)
        .into_iter()
        .map(|(t, _)| t)
        .chain(std::iter::once(e.target.clone()))
        .collect();
    report.pass(
        check,
        format!(
            "the probe reached none of {} (sandbox interfaces: {})",
            tried.join(", "),
            p.interfaces
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
}

/// Every address the canary's probe tried, and whether it connected.
fn probed(p: &ProbeReport) -> Vec<(String, bool)> {
    std::iter::once((p.target.clone(), p.connected))
        .chain(p.reached.iter().map(|r| (r.target.clone(), r.connected)))
        .collect()
}
