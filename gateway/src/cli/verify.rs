//! `verify` and `admit`: a batch of capsules in parallel, one line each, in order.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use verify_core::crypto::default_backend;
use verify_core::{
    Admitted, Capsule, Decision, Governance, HashMode, NoHistory, Policy, RollbackView, SpiffeId,
    SystemClock, TenantIndex, Tier, Verifier,
};

use super::attest::IdentityArgs;
use super::{usage, HashModeArg, VerifyArgs, EXIT_DENIED};
use crate::output::{decision_json, decision_line, print_stdout};
use crate::state::{LazySnapshot, StateDir, Unavailable};
use crate::GatewayError;

pub fn run(args: &VerifyArgs, record: bool) -> Result<ExitCode, GatewayError> {
    let runner = args.identity.runner(args.runner.as_deref())?;
    let admission = Admission::open_with(
        &args.policy,
        runner.as_deref(),
        &args.identity,
        args.state.as_deref(),
        record,
        args.hash_mode,
    )?
    .with_governance(&args.index, super::index::VERIFY_HOST_TIERS)?;
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

/// Policy, runner and anti-rollback state, set up once; shared by `verify`, `admit`
/// and `run`, so that `run` admits exactly as `admit` does.
pub(crate) struct Admission {
    pub policy: Policy,
    runner: Option<SpiffeId>,
    /// The state's directory, checked; its database is opened only for the snapshot
    /// and the commit (`StateDir`), never across hashing or a sandbox run.
    state: Option<StateDir>,
    unavailable: Option<Unavailable>,
    hash_mode: HashMode,
    /// Tenant indexes given with `--index` (signatures checked) and the sandbox tiers
    /// of this host (issue 13).
    indexes: Vec<TenantIndex>,
    host_tiers: Vec<Tier>,
}

impl Admission {
    /// Loads the policy (with the TPM that unseals its sealed keys: a key that cannot
    /// be unsealed stops start-up, naming the PCRs that changed) and checks the state
    /// directory (creating an empty state there if `record` and there is none; it says
    /// so on stderr). A state that exists but cannot be read denies everything (deny
    /// by default); recording without a state is refused.
    pub(crate) fn open_with(
        policy: &Path,
        runner: Option<&str>,
        identity: &IdentityArgs,
        state: Option<&Path>,
        record: bool,
        hash_mode: HashModeArg,
    ) -> Result<Admission, GatewayError> {
        let mut unseal = identity.unsealer();
        let policy = Policy::load_with_sealed(policy, default_backend(), Some(&mut unseal))?;
        let runner = match runner {
            Some(r) => Some(SpiffeId::parse(r).map_err(|e| usage(format!("--runner `{r}`: {e}")))?),
            None => None,
        };
        let mut unavailable = None;
        let state = match state {
            Some(dir) => match StateDir::locate(dir, record) {
                Ok(s) => {
                    if let Some(s) = &s {
                        crate::state::announce(s);
                    }
                    s
                }
                Err(e) => {
                    unavailable = Some(Unavailable(e.to_string()));
                    None
                }
            },
            None if record => return Err(usage("admit needs --state DIR to record admissions")),
            None => None,
        };
        Ok(Admission {
            policy,
            runner,
            state,
            unavailable,
            hash_mode: match hash_mode {
                HashModeArg::Auto => HashMode::Auto,
                HashModeArg::Read => HashMode::Read,
                HashModeArg::Mmap => HashMode::Mmap,
            },
            indexes: Vec::new(),
            host_tiers: Vec::new(),
        })
    }

    /// Adds the tenant indexes (`--index`, each verified now: one that does not verify
    /// is a usage error naming the file) and the host's sandbox tiers.
    pub(crate) fn with_governance(
        mut self,
        indexes: &[PathBuf],
        host_tiers: &[Tier],
    ) -> Result<Admission, GatewayError> {
        self.indexes = super::index::load_all(indexes, &self.policy)?;
        self.host_tiers = host_tiers.to_vec();
        Ok(self)
    }

    /// Verifies the capsules in parallel and, if `record`, records the admissions
    /// durably before returning; results come back in input order. A state that
    /// cannot be written denies every admitted capsule `state_unavailable`.
    pub(crate) fn admit(
        &self,
        dirs: &[PathBuf],
        record: bool,
    ) -> Result<Vec<Result<Admitted, Decision>>, GatewayError> {
        let snapshot;
        let rollback: &dyn RollbackView = match (&self.state, &self.unavailable) {
            (_, Some(u)) => u,
            (Some(s), None) => {
                snapshot = LazySnapshot::new(s);
                &snapshot
            }
            (None, None) => &NoHistory,
        };
        let verifier = Verifier {
            policy: &self.policy,
            clock: &SystemClock,
            rollback,
            runner: self.runner.as_ref(),
            hash_mode: self.hash_mode,
            governance: Governance {
                indexes: &self.indexes,
                host_tiers: &self.host_tiers,
            },
        };
        let capsules: Vec<Capsule> = dirs
            .iter()
            .map(|dir| Capsule::from_dir(dir, self.policy.limits.max_jws_bytes))
            .collect();
        let results = verifier.verify_batch(&capsules);
        match (&self.state, &self.unavailable, record) {
            // The verdicts are given out only after the state is durable.
            (Some(s), None, true) => {
                // The index versions first: a crash in between leaves the state stricter.
                let seen = super::index::versions_used(&self.indexes, &results);
                if let Err(e) = s.record_index_versions(&seen) {
                    return Ok(crate::state::deny_unavailable(results, &e.to_string()));
                }
                Ok(s.record(results, &self.policy.policy_version))
            }
            _ => Ok(results),
        }
    }
}
