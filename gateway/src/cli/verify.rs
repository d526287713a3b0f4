//! `verify` and `admit`: a batch of capsules in parallel, one line each, in order.

use std::path::Path;
use std::process::ExitCode;

use verify_core::{Admitted, Decision, HashMode, SpiffeId};

use super::attest::{warn_if_software, IdentityArgs};
use super::{usage, HashModeArg, VerifyArgs, EXIT_DENIED};
use crate::admission::{load_policy, system_clock, Admission};
use crate::custody::CustodySigner;
use crate::evidence::{write_denial_bundle, Custody, Event, PolicyFacts};
use crate::launch;
use crate::layout::StateLayout;
use crate::output::Lines;
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
    // With a state, denials leave bundles. A configured TPM is opened before
    // anything is admitted (one that cannot sign is a configuration error first); the
    // software key is made only when a denial needs it, so an all-admitted batch
    // leaves the state as it was. `verify` never creates a state for them.
    let state = args.state.as_deref().filter(|st| record || st.exists());
    let tpm_custody = match (state, &args.identity.tcti) {
        (Some(st), Some(_)) => Some(args.identity.custody_signer(st)?),
        _ => None,
    };
    let decisions: Vec<Decision> = admission
        .admit(&args.capsules, record)?
        .into_iter()
        .map(|r| r.map_or_else(|d| d, Admitted::into_decision))
        .collect();

    if let Some(state) = state {
        write_denial_bundles(args, state, tpm_custody, runner, &admission, &decisions)?;
    }

    let mut lines = Lines::stdout(args.json);
    let mut all_admitted = true;
    for (path, d) in args.capsules.iter().zip(&decisions) {
        all_admitted &= d.is_admit();
        lines.decision(&path.display().to_string(), d)?;
    }
    // `| head -1` closing the pipe changes nothing: the exit code is the verdicts'.
    lines.finish()?;
    Ok(if all_admitted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENIED)
    })
}

/// With `--state`, each denial leaves a denial bundle under `STATE/evidence/<id>/`
/// (decision and digests, signed index), written before the verdicts are printed.
fn write_denial_bundles(
    args: &VerifyArgs,
    state: &Path,
    signer: Option<CustodySigner>,
    runner: Option<String>,
    admission: &Admission,
    decisions: &[Decision],
) -> Result<(), GatewayError> {
    let denied: Vec<(&std::path::PathBuf, &Decision)> = args
        .capsules
        .iter()
        .zip(decisions)
        .filter(|(_, d)| !d.is_admit())
        .collect();
    if denied.is_empty() {
        return Ok(());
    }
    let signer = match signer {
        Some(s) => s,
        None => args.identity.custody_signer(state)?,
    };
    let custody = Custody {
        signer,
        facts: PolicyFacts::of(admission.policy()),
        runner_id: runner,
    };
    let source = super::run::event_source(custody.runner_id.as_deref(), None)?;
    let root = StateLayout::new(state).evidence();
    for (path, d) in denied {
        let id = launch::new_run_id()?;
        let event = Event::denied(
            id.as_str(),
            &source,
            &path.display().to_string(),
            d,
            &admission.policy().digests.policy,
            launch::event_time(admission.clock()),
        );
        write_denial_bundle(&root, &event, &custody)?;
    }
    Ok(())
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
        let admission = Admission::new(policy, system_clock(), hash_mode)
            .with_runner(runner)
            .with_log_config(log);
        // With a TPM configured, the log's checkpoints are quoted by its identity key,
        // as the evidence index is; without one, the state's software custody key.
        let admission = match (state, identity.tcti.is_some() && record) {
            (Some(dir), true) => admission.with_checkpoint_signer(
                crate::admission_log::signer::CheckpointSigner::new(identity.custody_signer(dir)?),
            ),
            _ => admission,
        };
        admission.with_state_dir(state, record)
    }
}
