//! `selfcheck`: proves on this host, through the deployed configuration, that the gate
//! still works (docs/selfcheck.md). Exit 0 every check passed (notices do not fail),
//! 1 at least one failed, 2 usage or a configuration that does not load.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::agent::config::AgentConfig;
use crate::launch::{Runtime, KATA_RUNTIME_TYPE};
use crate::output::print_stdout;
use crate::selfcheck::target::{AlignmentTarget, Flags};
use crate::selfcheck::Target;
use crate::serve::config::ServeConfig;
use crate::GatewayError;

use super::EXIT_DENIED;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TierArg {
    /// gVisor (`runsc`).
    Runsc,
    /// Kata Containers through containerd's shim v2.
    Kata,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("deployment").required(true).multiple(false).args(["config", "agent_config", "policy"])))]
pub struct SelfcheckArgs {
    /// The service's configuration (`serve --config`): its policy, state, TPM, SVID,
    /// run tiers and `[selfcheck]`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The agent's configuration (`agent --config`).
    #[arg(long, value_name = "FILE")]
    pub agent_config: Option<PathBuf>,
    /// The policy, for a deployment described by flags.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// The anti-rollback state directory (with --policy).
    #[arg(long, value_name = "DIR", requires = "policy")]
    pub state: Option<PathBuf>,
    /// The TPM's TCTI (with --policy; `device:/dev/tpmrm0`, `swtpm:host=...,port=...`).
    #[arg(long, value_name = "TCTI", requires = "policy")]
    pub tcti: Option<String>,
    /// The SVID directory (`svid.pem`, `svid_key.pem`, `bundle.pem`; with --policy).
    #[arg(long, value_name = "DIR", requires = "policy")]
    pub svid: Option<PathBuf>,
    /// A sandbox tier to check (repeatable; with --policy).
    #[arg(long, value_enum, requires = "policy")]
    pub runtime: Vec<TierArg>,
    /// gVisor platform of the `runsc` tier.
    #[arg(long, default_value = "ptrace", requires = "policy")]
    pub platform: String,
    /// The base rootfs of the tiers (default: the one install-deps builds).
    #[arg(long, value_name = "DIR", requires = "policy")]
    pub rootfs: Option<PathBuf>,
    /// The signed deployment manifest (`align sign --out`); overrides `[selfcheck]`.
    #[arg(long, value_name = "FILE", requires = "manifest_key")]
    pub manifest: Option<PathBuf>,
    /// The JWKS that verifies it.
    #[arg(long, value_name = "JWKS", requires = "manifest")]
    pub manifest_key: Option<PathBuf>,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &SelfcheckArgs) -> Result<ExitCode, GatewayError> {
    let override_alignment = match (&args.manifest, &args.manifest_key) {
        (Some(manifest), Some(key)) => Some(AlignmentTarget {
            manifest: manifest.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let serve;
    let mut target = if let Some(path) = &args.config {
        serve = ServeConfig::load(path)?;
        Target::from_serve(&serve, None)
    } else if let Some(path) = &args.agent_config {
        Target::from_agent(&AgentConfig::load(path)?)
    } else if let Some(policy) = &args.policy {
        Target::from_flags(Flags {
            policy: policy.clone(),
            state: args.state.clone(),
            tcti: args.tcti.clone(),
            svid: args.svid.clone(),
            runtimes: args
                .runtime
                .iter()
                .map(|r| match r {
                    TierArg::Runsc => Runtime::Runsc {
                        platform: args.platform.clone(),
                    },
                    TierArg::Kata => Runtime::Kata {
                        containerd: None,
                        runtime_type: KATA_RUNTIME_TYPE.to_string(),
                    },
                })
                .collect(),
            rootfs: args.rootfs.clone(),
            alignment: None,
            binary: None,
        })
    } else {
        return Err(super::usage(
            "selfcheck: --config FILE, --agent-config FILE or --policy FILE",
        ));
    };
    if override_alignment.is_some() {
        target.alignment = override_alignment;
    }
    let report = crate::selfcheck::run(&target);
    let text = if args.json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        v["passed"] = report.passed().into();
        format!("{v}\n")
    } else {
        report.to_text()
    };
    print_stdout(&text)?;
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENIED)
    })
}
