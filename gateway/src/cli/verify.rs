//! `verify` and `admit`: a batch of capsules in parallel, one line each, in order.

use std::path::Path;
use std::process::ExitCode;

use verify_core::{Admitted, Decision, HashMode, SpiffeId};

use super::attest::{warn_if_software, IdentityArgs};
use super::{usage, HashModeArg, VerifyArgs, EXIT_DENIED};
use crate::admission::{load_policy, system_clock, Admission};
use crate::output::{decision_json, decision_line, print_stdout};
use crate::GatewayError;

pub fn run(args: &VerifyArgs, record: bool) -> Result<ExitCode, GatewayError> {
    let runner = args.identity.runner(args.runner.as_deref())?;
    let log = crate::admission_log::LogConfig {
        checkpoint_every: args.checkpoint_every,
        segment_records: args.segment_records,
        ..Default::default()
    };
    log.check().map_err(usage)?;
    let admission = Admission::open_with(
        &args.policy,
        runner.as_deref(),
        &args.identity,
        args.state.as_deref(),
        record,
        args.hash_mode,
        log,
    )?;
    let indexes = crate::tenant_index::load_all(&args.index, admission.policy())?;
    let admission = admission.with_governance(indexes, super::index::VERIFY_HOST_TIERS);
    let decisions: Vec<Decision> = admission
        .admit(&args.capsules, record)?
        .into_iter()
        .map(|r| r.map_or_else(|d| d, Admitted::into_decision))
        .collect();

    let mut text = String::new();
    let mut all_admitted = true;
    for (path, d) in args.capsules.iter().zip(&decisions) {
        all_admitted &= d.is_admit();
        let name = path.display().to_string();
        let line = if args.json {
            decision_json(&name, d).to_string()
        } else {
            decision_line(&name, d)
        };
        text.push_str(&line);
        text.push('\n');
    }
    // `| head -1` closing the pipe changes nothing: the exit code is the verdicts'.
    print_stdout(&text)?;
    Ok(if all_admitted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENIED)
    })
}

impl Admission {
    /// The admission of `verify`, `admit` and `run`, from their flags: the policy
    /// (its sealed keys unsealed through the TPM of `--tcti`, opened on first use),
    /// the runner, the state directory and the hash mode, on the system clock. Shared
    /// by the three commands, so that `run` admits exactly as `admit` does.
    pub(crate) fn open_with(
        policy: &Path,
        runner: Option<&str>,
        identity: &IdentityArgs,
        state: Option<&Path>,
        record: bool,
        hash_mode: HashModeArg,
        log: crate::admission_log::LogConfig,
    ) -> Result<Admission, GatewayError> {
        let mut sealed = identity.sealed_keys();
        let policy = load_policy(policy, &mut sealed);
        if let Some(tpm) = sealed.tpm() {
            warn_if_software(tpm);
        }
        let policy = policy?;
        let runner = match runner {
            Some(r) => Some(SpiffeId::parse(r).map_err(|e| usage(format!("--runner `{r}`: {e}")))?),
            None => None,
        };
        let hash_mode = match hash_mode {
            HashModeArg::Auto => HashMode::Auto,
            HashModeArg::Read => HashMode::Read,
            HashModeArg::Mmap => HashMode::Mmap,
        };
        Admission::new(policy, system_clock(), hash_mode)
            .with_runner(runner)
            .with_log_config(log)
            .with_state_dir(state, record)
    }
}
