//! Admission: the one place where a policy (its sealed keys unsealed through the TPM),
//! a clock, a hash mode, the runner identity and the anti-rollback state become
//! verdicts. `verify`, `admit` and `run` (one batch per process, the state opened for
//! moments) and `serve` (the state kept open, the peer as runner) all admit here, so
//! they admit alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use verify_core::crypto::default_backend;
use verify_core::{
    Admitted, Capsule, Clock, Decision, Governance, HashMode, NoHistory, Policy, RollbackView,
    SpiffeId, SystemClock, TenantIndex, Tier, Verifier,
};

use crate::admission_log::signer::CheckpointSigner;
use crate::admission_log::LogConfig;
use crate::sealed::SealedKeys;
use crate::state::{LazySnapshot, State, StateDir, Unavailable};
use crate::GatewayError;

/// The clock of a production process: the system's. Everything else takes the clock
/// it is given, so tests and replays can set time.
pub fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// Loads the policy, unsealing its sealed keys through `sealed` (a key that cannot be
/// unsealed stops start-up, naming the file and what the TPM said), and compiles
/// every tenant's evidence mask patterns (a bad one is a configuration error naming
/// the tenant and the field, before anything is admitted).
pub fn load_policy(path: &Path, sealed: &mut SealedKeys) -> Result<Policy, GatewayError> {
    let mut unseal = |file: &Path| sealed.unseal(file).map_err(Into::into);
    let policy = Policy::load_with_sealed(path, default_backend(), Some(&mut unseal))?;
    crate::evidence::EgressRules::compile(&policy)?;
    Ok(policy)
}

/// The anti-rollback state as this admission reads it.
#[derive(Debug)]
enum Store {
    /// No state: every version is new (`verify` without `--state`).
    None,
    /// A checked state directory; its database is opened only for the snapshot and
    /// the commit (`StateDir`), never across hashing or a sandbox run.
    Dir(StateDir),
    /// A state that exists but cannot be read: everything is denied (deny by default).
    Unavailable(Unavailable),
    /// A database kept open by one long-lived process (`serve`).
    Open(State),
}

/// Policy, clock, hash mode, runner and anti-rollback state, set up once.
pub struct Admission {
    policy: Policy,
    clock: Arc<dyn Clock>,
    hash_mode: HashMode,
    runner: Option<SpiffeId>,
    store: Store,
    /// Tenant indexes (`--index`, signatures already checked) and this host's
    /// sandbox tiers, for the governance rules.
    indexes: Vec<TenantIndex>,
    host_tiers: Vec<Tier>,
    /// Checkpoint and segment intervals, the denial budget.
    log: LogConfig,
    /// Signs the log's checkpoints; default: the state's software custody key.
    checkpoint_signer: Option<Arc<CheckpointSigner>>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("policy", &self.policy.source)
            .field("hash_mode", &self.hash_mode)
            .field("runner", &self.runner)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// An admission without runner identity and without state.
    pub fn new(policy: Policy, clock: Arc<dyn Clock>, hash_mode: HashMode) -> Admission {
        Admission {
            policy,
            clock,
            hash_mode,
            runner: None,
            store: Store::None,
            indexes: Vec::new(),
            host_tiers: Vec::new(),
            log: LogConfig::default(),
            checkpoint_signer: None,
        }
    }

    /// The tenant indexes capsules are judged against (verified by
    /// [`crate::tenant_index::load_all`]) and the sandbox tiers this host provides.
    pub fn with_governance(mut self, indexes: Vec<TenantIndex>, host_tiers: &[Tier]) -> Admission {
        self.indexes = indexes;
        self.host_tiers = host_tiers.to_vec();
        self
    }

    /// The runner identity capsules are checked against (`None`: a manifest or
    /// tenant that names runners is denied).
    pub fn with_runner(mut self, runner: Option<SpiffeId>) -> Admission {
        self.runner = runner;
        self
    }

    /// The state directory of a short-lived process. With `record`, an empty state is
    /// created where there is none (it says so on stderr); recording without a state
    /// is refused. A state that exists but cannot be read denies every capsule
    /// `state_unavailable`.
    pub fn with_state_dir(
        mut self,
        dir: Option<&Path>,
        record: bool,
    ) -> Result<Admission, GatewayError> {
        self.store = match dir {
            Some(dir) => match StateDir::locate(dir, record, self.clock.as_ref()) {
                Ok(Some(s)) => {
                    crate::state::announce(&s);
                    // A recording command signs its checkpoints; `verify` only checks
                    // the last one against the state's key.
                    let signer = match (record, &self.checkpoint_signer) {
                        (true, Some(s)) => Some(s.clone()),
                        (true, None) => match CheckpointSigner::software(dir) {
                            Ok(s) => Some(Arc::new(s)),
                            Err(e) => {
                                self.store =
                                    Store::Unavailable(Unavailable::new(GatewayError::State {
                                        path: dir.to_path_buf(),
                                        message: e.to_string(),
                                    }));
                                return Ok(self);
                            }
                        },
                        (false, _) => None,
                    };
                    Store::Dir(s.with_log(signer, self.log))
                }
                Ok(None) => Store::None,
                Err(e) => Store::Unavailable(Unavailable::new(e)),
            },
            None if record => {
                return Err(GatewayError::Usage(
                    "admit needs --state DIR to record admissions".into(),
                ))
            }
            None => Store::None,
        };
        Ok(self)
    }

    /// The log's checkpoint and segment intervals and denial budget (before
    /// [`Admission::with_state_dir`]).
    pub fn with_log_config(mut self, log: LogConfig) -> Admission {
        self.log = log;
        self
    }

    /// The custody signer of the log's checkpoints (a TPM one, where configured),
    /// before [`Admission::with_state_dir`]; without it a recording command signs with
    /// the state's software custody key.
    pub fn with_checkpoint_signer(mut self, signer: CheckpointSigner) -> Admission {
        self.checkpoint_signer = Some(Arc::new(signer));
        self
    }

    /// Writes a checkpoint of the log's end now (`serve`'s graceful stop); nothing
    /// without a state kept open.
    pub fn checkpoint(&self) -> Result<Option<u64>, GatewayError> {
        match &self.store {
            Store::Open(s) => s.checkpoint(
                self.clock.as_ref(),
                crate::admission_log::record::CheckpointCause::Shutdown,
            ),
            _ => Ok(None),
        }
    }

    /// A state kept open by this process (`serve`).
    pub fn with_open_state(mut self, state: State) -> Admission {
        self.store = Store::Open(state);
        self
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The state this process keeps open (`serve`), for its scheduled selfcheck.
    pub fn open_state(&self) -> Option<&State> {
        match &self.store {
            Store::Open(s) => Some(s),
            _ => None,
        }
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    fn verifier<'a>(
        &'a self,
        rollback: &'a dyn RollbackView,
        runner: Option<&'a SpiffeId>,
    ) -> Verifier<'a> {
        Verifier {
            policy: &self.policy,
            clock: self.clock.as_ref(),
            rollback,
            runner,
            hash_mode: self.hash_mode,
            governance: Governance {
                indexes: &self.indexes,
                host_tiers: &self.host_tiers,
            },
        }
    }

    /// Verifies capsule directories in parallel and, if `record`, records the
    /// admissions durably before returning; results come back in input order. A state
    /// that cannot be written denies every admitted capsule `state_unavailable`.
    pub fn admit(
        &self,
        dirs: &[PathBuf],
        record: bool,
    ) -> Result<Vec<Result<Admitted, Decision>>, GatewayError> {
        let capsules: Vec<Capsule> = dirs
            .iter()
            .map(|dir| Capsule::from_dir(dir, self.policy.limits.max_jws_bytes))
            .collect();
        let runner = self.runner.as_ref();
        let results = match &self.store {
            Store::None => self.verifier(&NoHistory, runner).verify_batch(&capsules),
            Store::Unavailable(u) => self.verifier(u, runner).verify_batch(&capsules),
            Store::Open(s) => self.verifier(s, runner).verify_batch(&capsules),
            Store::Dir(d) => {
                let snapshot = LazySnapshot::new(d);
                self.verifier(&snapshot, runner).verify_batch(&capsules)
            }
        };
        if !record {
            return Ok(results);
        }
        // The verdicts are given out only after the state is durable.
        self.record(results)
    }

    /// Verifies one capsule for `runner` (the authenticated peer of `serve`) against
    /// the state, recording nothing: [`Admission::record`] commits a batch of them.
    pub fn verify(&self, capsule: &Capsule, runner: &SpiffeId) -> Result<Admitted, Decision> {
        let runner = Some(runner);
        match &self.store {
            Store::None => self.verifier(&NoHistory, runner).verify(capsule),
            Store::Unavailable(u) => self.verifier(u, runner).verify(capsule),
            Store::Open(s) => self.verifier(s, runner).verify(capsule),
            Store::Dir(d) => self.verifier(&LazySnapshot::new(d), runner).verify(capsule),
        }
    }

    /// Puts `index` in place of its tenant's (the agent's poll of tag `index`); the
    /// signature was checked by `TenantIndex::verify`, freshness is judged per capsule.
    pub fn set_index(&mut self, index: TenantIndex) {
        self.indexes.retain(|i| i.tenant != index.tenant);
        self.indexes.push(index);
    }

    /// Records verified admissions in one durable transaction (see `State::record`);
    /// nothing is acknowledged unless this returns them.
    pub fn record(
        &self,
        results: Vec<Result<Admitted, Decision>>,
    ) -> Result<Vec<Result<Admitted, Decision>>, GatewayError> {
        match &self.store {
            Store::Open(s) => s.record(results, &self.policy, self.clock.as_ref()),
            Store::Dir(d) => {
                // The index versions first: a crash in between leaves the state stricter.
                let seen = crate::tenant_index::versions_used(&self.indexes, &results);
                if let Err(e) = d.record_index_versions(&seen) {
                    return Ok(crate::state::deny_unavailable(results, &e.to_string()));
                }
                Ok(d.record(results, &self.policy, self.clock.as_ref()))
            }
            Store::None | Store::Unavailable(_) => Ok(results),
        }
    }
}
