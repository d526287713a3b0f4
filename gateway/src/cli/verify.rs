//! `verify` and `admit`: a batch of capsules in parallel, one line each, in order.

use std::io::Write;
use std::process::ExitCode;

use verify_core::crypto::default_backend;
use verify_core::{
    Admitted, Capsule, Decision, HashMode, NoHistory, Policy, RollbackView, SpiffeId, SystemClock,
    Verifier,
};

use super::{usage, HashModeArg, VerifyArgs, EXIT_DENIED};
use crate::output::{decision_json, decision_line};
use crate::state::{State, Unavailable};
use crate::GatewayError;

pub fn run(args: &VerifyArgs, record: bool) -> Result<ExitCode, GatewayError> {
    let policy = Policy::load(&args.policy, default_backend())?;
    let runner = match &args.runner {
        Some(r) => Some(SpiffeId::parse(r).map_err(|e| usage(format!("--runner `{r}`: {e}")))?),
        None => None,
    };
    // A state that exists but cannot be opened denies everything (deny by default);
    // `admit` without --state has nowhere to record and is refused.
    let mut unavailable = None;
    let state = match &args.state {
        Some(dir) => match State::open(dir, record) {
            Ok(s) => s,
            Err(e) => {
                unavailable = Some(Unavailable(e.to_string()));
                None
            }
        },
        None if record => return Err(usage("admit needs --state DIR to record admissions")),
        None => None,
    };
    let rollback: &dyn RollbackView = match (&state, &unavailable) {
        (_, Some(u)) => u,
        (Some(s), None) => s,
        (None, None) => &NoHistory,
    };
    let verifier = Verifier {
        policy: &policy,
        clock: &SystemClock,
        rollback,
        runner: runner.as_ref(),
        hash_mode: match args.hash_mode {
            HashModeArg::Read => HashMode::Read,
            HashModeArg::Mmap => HashMode::Mmap,
        },
    };
    let capsules: Vec<Capsule> = args
        .capsules
        .iter()
        .map(|dir| Capsule::from_dir(dir, policy.limits.max_jws_bytes))
        .collect();
    let results = verifier.verify_batch(&capsules);
    let decisions: Vec<Decision> = match (&state, record) {
        // The verdicts are printed only after the state is durable.
        (Some(s), true) => s.record(results, &policy.policy_version)?,
        _ => results
            .into_iter()
            .map(|r| r.map_or_else(|d| d, Admitted::into_decision))
            .collect(),
    };

    let mut out = std::io::stdout().lock();
    let mut all_admitted = true;
    for (path, d) in args.capsules.iter().zip(&decisions) {
        all_admitted &= d.is_admit();
        let name = path.display().to_string();
        let line = if args.json {
            decision_json(&name, d).to_string()
        } else {
            decision_line(&name, d)
        };
        writeln!(out, "{line}").map_err(|e| GatewayError::io("<stdout>", e))?;
    }
    out.flush().map_err(|e| GatewayError::io("<stdout>", e))?;
    Ok(if all_admitted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENIED)
    })
}
