//! The pull-only edge runner (`agent`): it polls each source's tags, pulls new capsule
//! artifacts by digest into the content-addressed blob store `serve` uses
//! (`STATE/blobs`), admits them through the one [`Admission`], runs them in the
//! configured sandbox, writes evidence, and pushes the export its tenant's egress
//! mode allows back to the registry as an artifact whose `subject` is the capsule.
//! It opens no listening port.
//!
//! Nothing is used before it is checked: a blob is renamed into the store only after
//! its sha256 matched its name, a manifest's digest is the sha256 of the bytes
//! received, and the capsule is verified (signature, every artifact digest) before it
//! runs. A capsule digest that has started a run is never run again
//! ([`ledger::Ledger`]).

pub mod config;
mod export;
pub mod ledger;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use verify_core::approvals::ApprovalFile;
use verify_core::{
    Admitted, Capsule, Decision, EgressMode, HashMode, Reason, Sha256Digest, SpiffeId, Tier,
};

pub use config::{Action, AgentConfig, RuntimeName};
pub use export::{export_for_push, ExportDir};
use ledger::{DoneRecord, Entry, Ledger, LedgerError, RunRecord};

use crate::admission::{load_policy, system_clock, Admission};
use crate::evidence::{Event, EventData, EventType};
use crate::launch::{self, Runtime, Sandbox};
use crate::layout::StateLayout;
use crate::oci::artifact::{
    self, capsule_layers, Descriptor, ImageIndex, ImageManifest, ANN_EGRESS, ANN_RUNNER,
    ANN_RUN_ID, EMPTY_CONFIG, EVIDENCE_ARTIFACT_TYPE, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, TITLE,
};
use crate::oci::client::Pulled;
use crate::oci::{OciError, Registry};
use crate::sealed::SealedKeys;
use crate::selfcheck::{self, schedule::SelfcheckStatus};
use crate::serve::blobs::BlobStore;
use crate::GatewayError;

/// The tag the tenant index is published under (not a capsule).
pub use crate::oci::publish::INDEX_TAG;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("evidence export {}: {source}", path.display())]
    Export {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Evidence(#[from] crate::evidence::ExportError),
    #[error("blob store {}: {source}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// New capsules admitted (and, with `action = "run"`, run with exit code 0).
    pub ok: usize,
    /// Capsules denied (the event says why).
    pub denied: usize,
    /// Runs that failed or exited non-zero, evidence not pushed, pulls that failed.
    pub failed: usize,
    /// Sources that could not be reached or timed out (backoff).
    pub unreachable: usize,
    /// Capsules already run (by this state) and left alone.
    pub already_ran: usize,
    /// Why the pass did nothing: the selfcheck fails (`[selfcheck] enabled`).
    pub paused: Option<String>,
}

impl PassReport {
    /// `--once`: everything found was admitted and ran.
    pub fn all_ok(&self) -> bool {
        self.denied == 0 && self.failed == 0 && self.unreachable == 0 && self.paused.is_none()
    }
}

/// How one capsule artifact ended in this pass.
enum Outcome {
    Ok,
    Denied,
    Failed,
    AlreadyRan,
    /// Not a capsule (another artifact under a tag): skipped.
    NotCapsule,
}

struct Source {
    registry: Registry,
    repository: String,
}

pub struct Agent {
    config: AgentConfig,
    admission: Admission,
    runner: SpiffeId,
    sources: Vec<Source>,
    store: BlobStore,
    ledger: Ledger,
    layout: StateLayout,
    sandbox: Option<Sandbox>,
    stale: Vec<sandbox_launcher::StaleReport>,
    cancel: Arc<AtomicBool>,
    /// Signs each bundle's index: the software custody key under the state (as the
    /// service's; a TPM-quoted index for the agent is a next step).
    custody: crate::evidence::Custody,
    /// The tenants' egress modes and masking rules, for the export pushed back.
    egress: crate::evidence::EgressRules,
    /// Capsule manifests settled in this process (ran, denied, already ran): not
    /// pulled again every poll. A transient failure is not settled.
    settled: HashSet<Sha256Digest>,
    /// The scheduled selfcheck (`[selfcheck] enabled`): while it fails, passes do
    /// nothing. The runner is kept only to be stopped with the agent.
    selfcheck: Option<(Arc<SelfcheckStatus>, selfcheck::schedule::Runner)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("runner", &self.runner)
            .field("state", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Sets everything up before anything is pulled: the policy, the runner identity,
    /// the state, the blob store (removing a crashed pull's temporary files), the
    /// sandbox and the registries. Any failure here is configuration (exit 2).
    pub fn open(config: AgentConfig, cancel: Arc<AtomicBool>) -> Result<Agent, GatewayError> {
        let runner = runner_id(&config)?;
        let mut sealed = SealedKeys::lazy(config.tcti.as_deref());
        let policy = load_policy(&config.policy, &mut sealed)?;
        let tier = match (config.action, config.runtime) {
            (Action::Run, RuntimeName::Kata) => Tier::Kata,
            _ => Tier::Gvisor,
        };
        let admission = Admission::new(policy, system_clock(), HashMode::Auto)
            .with_runner(Some(runner.clone()))
            .with_state_dir(Some(&config.state_dir), true)?
            .with_governance(Vec::new(), &[tier]);
        let layout = StateLayout::new(&config.state_dir);
        let custody = crate::evidence::Custody {
            signer: crate::custody::CustodySigner::software(&layout.custody())?,
            facts: crate::evidence::PolicyFacts::of(admission.policy()),
            runner_id: Some(runner.to_string()),
        };
        let egress = crate::evidence::EgressRules::compile(admission.policy())?;
        let store =
            BlobStore::open(&layout.blobs()).map_err(|e| GatewayError::io(layout.blobs(), e))?;
        let ledger = Ledger::open(&config.state_dir).map_err(AgentError::from)?;
        let (sandbox, stale) = match config.action {
            Action::AdmitOnly => (None, Vec::new()),
            Action::Run => {
                let runtime = match config.runtime {
                    RuntimeName::Runsc => Runtime::Runsc {
                        platform: config.platform.clone(),
                    },
                    RuntimeName::Kata => Runtime::Kata {
                        containerd: None,
                        runtime_type: launch::KATA_RUNTIME_TYPE.to_string(),
                    },
                };
                let sandbox = Sandbox::start(&layout, &runtime, None)?;
                let stale = sandbox.stale_cleaned().to_vec();
                (Some(sandbox), stale)
            }
        };
        let sources = config
            .sources
            .iter()
            .map(|s| {
                Ok(Source {
                    registry: Registry::new(&s.registry)?,
                    repository: s.repository.clone(),
                })
            })
            .collect::<Result<Vec<_>, OciError>>()?;
        let selfcheck = if config.selfcheck.enabled {
            Some(start_selfcheck(&config, &runner)?)
        } else {
            None
        };
        Ok(Agent {
            config,
            admission,
            runner,
            sources,
            store,
            ledger,
            layout,
            sandbox,
            stale,
            cancel,
            custody,
            egress,
            settled: HashSet::new(),
            selfcheck,
        })
    }

    /// One pass over every source: finished runs whose evidence is not pushed yet
    /// first, then every tag.
    pub fn pass(&mut self) -> PassReport {
        let mut report = PassReport::default();
        if let Some(why) = self
            .selfcheck
            .as_ref()
            .and_then(|(status, _)| status.snapshot().refusal())
        {
            tracing::warn!(reason = %why, "paused: nothing is pulled, admitted or run until the selfcheck passes");
            report.paused = Some(why);
            return report;
        }
        self.push_pending(&mut report);
        for i in 0..self.sources.len() {
            if self.cancel.load(Ordering::Relaxed) {
                break;
            }
            if let Err(e) = self.poll_source(i, &mut report) {
                tracing::warn!(error = %e, "registry unreachable; nothing admitted from it");
                report.unreachable += 1;
            }
        }
        report
    }

    /// Passes until SIGTERM/SIGINT, waiting `poll_interval_s` between them and backing
    /// off (doubling, up to `max_backoff_s`) while a registry is unreachable.
    pub fn run_forever(&mut self) {
        let mut wait = self.config.poll_interval;
        while !self.cancel.load(Ordering::Relaxed) {
            let report = self.pass();
            wait = if report.unreachable > 0 {
                let next = (wait * 2).min(self.config.max_backoff);
                tracing::warn!(seconds = next.as_secs(), "backing off");
                next
            } else {
                self.config.poll_interval
            };
            let until = std::time::Instant::now() + wait;
            while std::time::Instant::now() < until && !self.cancel.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn poll_source(&mut self, i: usize, report: &mut PassReport) -> Result<(), OciError> {
        let mut tags = {
            let s = &self.sources[i];
            s.registry.tags(&s.repository)?
        };
        // In name order: the same registry is read the same way every pass.
        tags.sort();
        // The tenant index first, so every capsule of this pass is judged against it.
        if tags.iter().any(|t| t == INDEX_TAG) {
            self.pull_index(i)?;
        }
        for tag in tags {
            if tag == INDEX_TAG || tag.starts_with("sha256-") || self.cancel.load(Ordering::Relaxed)
            {
                continue;
            }
            let pulled = {
                let s = &self.sources[i];
                match s.registry.manifest(&s.repository, &tag) {
                    Ok(Some(p)) => p,
                    Ok(None) => continue,
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => {
                        // Served under the wrong digest, too large, malformed: refused.
                        tracing::warn!(tag, error = %e, "manifest refused");
                        report.failed += 1;
                        continue;
                    }
                }
            };
            if self.settled.contains(&pulled.digest) {
                continue;
            }
            match self.capsule(i, &tag, &pulled)? {
                Outcome::Ok => report.ok += 1,
                Outcome::Denied => report.denied += 1,
                Outcome::Failed => report.failed += 1,
                Outcome::AlreadyRan => report.already_ran += 1,
                Outcome::NotCapsule => {}
            }
        }
        Ok(())
    }

    /// Pulls the tenant index at tag `index` and, if it verifies against the policy
    /// (signature, a key in its tenant's `index.keys`), judges capsules by it. One that
    /// does not verify is ignored with a warning: a tenant whose index is `required`
    /// is then denied `index_stale`, never admitted without one. An older index than
    /// the state has seen is refused per capsule (`index_stale`), as with `--index`.
    fn pull_index(&mut self, i: usize) -> Result<(), OciError> {
        let s = &self.sources[i];
        let pulled = match s.registry.manifest(&s.repository, INDEX_TAG) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "tenant index manifest refused");
                return Ok(());
            }
        };
        let layer = serde_json::from_slice::<ImageManifest>(&pulled.bytes)
            .ok()
            .filter(|m| m.kind() == artifact::INDEX_ARTIFACT_TYPE && m.layers.len() == 1)
            .map(|m| m.layers[0].clone())
            .filter(|l| l.size <= verify_core::index::MAX_INDEX_BYTES as u64);
        let Some(layer) = layer else {
            tracing::warn!("tag `index` is not a tenant index of one bounded layer; ignored");
            return Ok(());
        };
        let digest = layer.sha256()?;
        if !self.store.contains(&digest) {
            match s
                .registry
                .pull_blob(&s.repository, &digest, layer.size, &self.store)
            {
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "tenant index not pulled; ignored");
                    return Ok(());
                }
            }
        }
        let bytes = match self.read_blob(&layer) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "tenant index unreadable; ignored");
                return Ok(());
            }
        };
        match verify_core::TenantIndex::verify(&bytes, self.admission.policy()) {
            Ok(index) => {
                tracing::info!(
                    tenant = index.tenant,
                    version = index.version,
                    "tenant index"
                );
                self.admission.set_index(index);
            }
            Err(e) => tracing::warn!(error = %e, "tenant index does not verify; ignored"),
        }
        Ok(())
    }

    fn emit(&self, event: &Event) {
        if let Err(e) = crate::output::println_stdout(event.to_json()) {
            tracing::error!(error = %e, "could not print the event");
        }
    }

    fn deny(&mut self, manifest: &Sha256Digest, what: &str, decision: &Decision) -> Outcome {
        match launch::new_run_id() {
            Ok(id) => {
                let event = Event::denied(
                    id.as_str(),
                    self.runner.as_str(),
                    what,
                    decision,
                    &self.admission.policy().digests.policy,
                    launch::event_time(self.admission.clock()),
                );
                // A denial leaves its bundle of digests, as `run`'s does.
                if let Err(e) = crate::evidence::write_denial_bundle(
                    &self.layout.evidence(),
                    &event,
                    &self.custody,
                ) {
                    tracing::error!(error = %e, "denial bundle not written");
                }
                self.emit(&event);
            }
            Err(e) => tracing::error!(error = %e, "no run id for a denial event"),
        }
        self.settled.insert(*manifest);
        Outcome::Denied
    }

    /// One capsule artifact: pull, verify, record, run, push.
    fn capsule(&mut self, i: usize, tag: &str, pulled: &Pulled) -> Result<Outcome, OciError> {
        let what = {
            let s = &self.sources[i];
            format!(
                "{}/{}:{tag}@{}",
                s.registry.name(),
                s.repository,
                pulled.digest
            )
        };
        let manifest: ImageManifest = match serde_json::from_slice(&pulled.bytes) {
            Ok(m) => m,
            Err(e) => {
                let d = Decision::deny_unread(Reason::CapsuleUnreadable, format!("manifest: {e}"));
                return Ok(self.deny(&pulled.digest, &what, &d));
            }
        };
        if manifest.kind() != artifact::CAPSULE_ARTIFACT_TYPE {
            self.settled.insert(pulled.digest);
            return Ok(Outcome::NotCapsule);
        }
        let layers = match capsule_layers(&manifest, &what) {
            Ok(l) => l,
            Err(e) => {
                let d = Decision::deny_unread(Reason::CapsuleUnreadable, e.to_string());
                return Ok(self.deny(&pulled.digest, &what, &d));
            }
        };
        let jws_digest = layers.jws.sha256()?;
        match self.ledger.entry(&jws_digest) {
            Ok(Entry::New) => {}
            Ok(Entry::Done { .. }) => {
                self.settled.insert(pulled.digest);
                return Ok(Outcome::AlreadyRan);
            }
            Ok(Entry::Interrupted(run)) => {
                tracing::warn!(capsule = %jws_digest, run_id = run.run_id, "the run was interrupted by a crash; it is not run again");
                let done = DoneRecord {
                    run,
                    outcome: "interrupted".into(),
                    exit_code: None,
                    egress: EgressMode::LocalOnly.as_str().into(),
                };
                if let Err(e) = self.ledger.finish(&jws_digest, &done) {
                    tracing::error!(error = %e, "run ledger");
                }
                self.settled.insert(pulled.digest);
                return Ok(Outcome::AlreadyRan);
            }
            Err(e) => {
                tracing::error!(error = %e, "run ledger unreadable; nothing runs");
                return Ok(Outcome::Failed);
            }
        }
        // Pull every blob by digest; sizes are bounded before a byte is read.
        let max_jws = self.admission.policy().limits.max_jws_bytes as u64;
        let all: Vec<&Descriptor> = std::iter::once(&layers.jws)
            .chain(layers.approvals.iter().map(|(_, d)| d))
            .chain(layers.files.iter())
            .collect();
        for d in &all {
            let limit = if d.title().is_some_and(|t| t.ends_with(".jws")) {
                max_jws
            } else {
                self.config.max_blob_bytes
            };
            if d.size > limit {
                let e = format!(
                    "layer {} is {} bytes, more than the {limit} allowed",
                    d.digest, d.size
                );
                let dec = Decision::deny_unread(Reason::LimitExceeded, e);
                return Ok(self.deny(&pulled.digest, &what, &dec));
            }
            let digest = d.sha256()?;
            if self.store.contains(&digest) {
                continue;
            }
            let s = &self.sources[i];
            match s
                .registry
                .pull_blob(&s.repository, &digest, d.size, &self.store)
            {
                Ok(_) => {}
                Err(e @ OciError::DigestMismatch { .. }) | Err(e @ OciError::TooLarge { .. }) => {
                    let dec = Decision::deny_unread(Reason::DigestMismatch, e.to_string());
                    // Not settled: a registry that is repaired is read again.
                    let out = self.deny(&pulled.digest, &what, &dec);
                    self.settled.remove(&pulled.digest);
                    return Ok(out);
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(capsule = what, error = %e, "pull failed; nothing admitted");
                    return Ok(Outcome::Failed);
                }
            }
        }
        let jws = match self.read_blob(&layers.jws) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(capsule = what, error = %e, "blob store");
                return Ok(Outcome::Failed);
            }
        };
        let mut approvals = Vec::new();
        for (name, d) in &layers.approvals {
            match self.read_blob(d) {
                Ok(b) => approvals.push(ApprovalFile {
                    name: name.clone(),
                    jws: Arc::from(b),
                }),
                Err(e) => {
                    tracing::warn!(capsule = what, error = %e, "blob store");
                    return Ok(Outcome::Failed);
                }
            }
        }
        let capsule = Capsule::from_bytes(&jws, self.store.source())
            .with_root(self.store.root())
            .with_approvals(approvals);
        let verdict = self.admission.verify(&capsule, &self.runner);
        let recorded = match self.admission.record(vec![verdict]) {
            Ok(mut r) => r.pop(),
            Err(e) => {
                tracing::error!(error = %e, "the admission could not be recorded; nothing runs");
                return Ok(Outcome::Failed);
            }
        };
        let admitted = match recorded {
            Some(Ok(a)) => a,
            Some(Err(d)) => return Ok(self.deny(&pulled.digest, &what, &d)),
            None => return Ok(Outcome::Failed),
        };
        tracing::info!(capsule = what, digest = %admitted.digest(), "admitted");
        if self.config.action == Action::AdmitOnly {
            self.settled.insert(pulled.digest);
            return Ok(Outcome::Ok);
        }
        let out = self.run(i, &admitted, pulled);
        Ok(out)
    }

    fn read_blob(&self, d: &Descriptor) -> Result<Vec<u8>, AgentError> {
        let path = self
            .layout
            .blobs()
            .join("sha256")
            .join(d.sha256()?.to_hex());
        std::fs::read(&path).map_err(|source| AgentError::Store { path, source })
    }

    fn egress_of(&self, admitted: &Admitted) -> EgressMode {
        self.admission
            .policy()
            .tenants
            .get(&admitted.manifest().tenant)
            .map(|t| t.evidence.egress)
            .unwrap_or_default()
    }

    fn run(&mut self, i: usize, admitted: &Admitted, pulled: &Pulled) -> Outcome {
        let digest = admitted.digest();
        let run_id = match launch::new_run_id() {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "no run id");
                return Outcome::Failed;
            }
        };
        let record = RunRecord {
            capsule_digest: digest.to_string(),
            run_id: run_id.as_str().to_string(),
            registry: self.sources[i].registry.name().to_string(),
            repository: self.sources[i].repository.clone(),
            manifest_digest: pulled.digest.to_string(),
            manifest_size: pulled.bytes.len() as u64,
        };
        // The claim is durable before the sandbox starts: at most once.
        match self.ledger.start(&digest, &record) {
            Ok(true) => {}
            Ok(false) => {
                self.settled.insert(pulled.digest);
                return Outcome::AlreadyRan;
            }
            Err(e) => {
                tracing::error!(error = %e, "run ledger; nothing runs");
                return Outcome::Failed;
            }
        }
        let Some(sandbox) = &self.sandbox else {
            return Outcome::Failed;
        };
        let evidence_root = self.layout.evidence();
        // The tenant's rootfs rule (pinned digest, or the host's /usr by opt-in) over
        // the base rootfs install-deps builds.
        let rootfs = launch::rootfs_for(
            self.admission.policy(),
            admitted,
            std::path::Path::new(sandbox_launcher::rootfs::BASE_ROOTFS),
        );
        let event = launch::execute(
            sandbox.launcher(),
            &run_id,
            admitted,
            &rootfs,
            launch::EvidenceSink {
                root: &evidence_root,
                source: self.runner.as_str(),
                clock: self.admission.clock(),
                policy_digest: &self.admission.policy().digests.policy,
                custody: &self.custody,
            },
            &self.cancel,
            std::mem::take(&mut self.stale),
        );
        self.settled.insert(pulled.digest);
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "the run's evidence could not be written");
                return Outcome::Failed;
            }
        };
        self.emit(&event);
        let (outcome, exit_code, ok) = match &event.data {
            EventData::Run(EventType::Completed, d) => {
                let code = d.exit_code.flatten().map(i64::from);
                ("completed", code, code == Some(0))
            }
            _ => ("failed", None, false),
        };
        let done = DoneRecord {
            run: record,
            outcome: outcome.into(),
            exit_code,
            egress: self.egress_of(admitted).as_str().into(),
        };
        if let Err(e) = self.ledger.finish(&digest, &done) {
            tracing::error!(error = %e, "run ledger");
            return Outcome::Failed;
        }
        let pushed = self.push(&digest, &done);
        if ok && pushed {
            Outcome::Ok
        } else {
            Outcome::Failed
        }
    }

    /// Retries evidence pushes a failure (an outage, a crash) left behind.
    fn push_pending(&mut self, report: &mut PassReport) {
        let pending = match self.ledger.unpushed() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "run ledger");
                report.failed += 1;
                return;
            }
        };
        for (digest, done) in pending {
            if done.outcome == "interrupted" {
                continue;
            }
            if !self.push(&digest, &done) {
                report.failed += 1;
            }
        }
    }

    /// Pushes the run's export; `true` once the registry has it.
    fn push(&self, digest: &Sha256Digest, done: &DoneRecord) -> bool {
        let Some(source) = self.sources.iter().find(|s| {
            s.registry.name() == done.run.registry && s.repository == done.run.repository
        }) else {
            tracing::warn!(
                run_id = done.run.run_id,
                "the run's source is no longer configured; evidence stays local"
            );
            return false;
        };
        match self.push_evidence(source, done) {
            Ok(evidence) => {
                tracing::info!(run_id = done.run.run_id, evidence = %evidence, "evidence pushed");
                if let Err(e) = self.ledger.pushed(digest, &evidence) {
                    tracing::error!(error = %e, "run ledger");
                }
                true
            }
            Err(e) => {
                tracing::warn!(run_id = done.run.run_id, error = %e, "evidence not pushed; retried next pass");
                false
            }
        }
    }

    fn push_evidence(
        &self,
        source: &Source,
        done: &DoneRecord,
    ) -> Result<Sha256Digest, AgentError> {
        let mode = egress_from_str(&done.egress);
        let bundle = self.layout.evidence().join(&done.run.run_id);
        let export = export_for_push(&bundle, mode, &self.egress, &self.custody.signer)?;
        let (registry, repo) = (&source.registry, source.repository.as_str());
        let mut layers = Vec::new();
        for rel in export.files() {
            let path = export.path().join(rel);
            let bytes = std::fs::read(&path).map_err(|e| AgentError::Export { path, source: e })?;
            let size = bytes.len() as u64;
            let d = registry.push_blob(repo, Bytes::from(bytes))?;
            let media = if rel.ends_with(".json") {
                "application/json"
            } else {
                artifact::OCTET_MEDIA_TYPE
            };
            let mut desc = Descriptor::new(media, d, size);
            desc.annotations.insert(TITLE.into(), rel.clone());
            layers.push(desc);
        }
        registry.push_blob(repo, Bytes::from_static(EMPTY_CONFIG))?;
        let mut annotations = BTreeMap::new();
        annotations.insert(ANN_RUN_ID.to_string(), done.run.run_id.clone());
        annotations.insert(ANN_RUNNER.to_string(), self.runner.as_str().to_string());
        annotations.insert(ANN_EGRESS.to_string(), mode.as_str().to_string());
        let mut manifest = ImageManifest::artifact(EVIDENCE_ARTIFACT_TYPE, layers, annotations);
        let subject = Sha256Digest::from_prefixed(&done.run.manifest_digest).ok_or_else(|| {
            OciError::Malformed {
                what: "run ledger".into(),
                why: format!("manifest digest `{}`", done.run.manifest_digest),
            }
        })?;
        manifest.subject = Some(Descriptor::new(
            MANIFEST_MEDIA_TYPE,
            subject,
            done.run.manifest_size,
        ));
        let bytes = serde_json::to_vec(&manifest).map_err(|e| OciError::Malformed {
            what: "evidence manifest".into(),
            why: e.to_string(),
        })?;
        let size = bytes.len() as u64;
        let digest = crate::oci::client::sha256(&bytes);
        let pushed =
            registry.push_manifest(repo, &digest.to_string(), MANIFEST_MEDIA_TYPE, bytes)?;
        if !pushed.registry_indexes_subject {
            // No referrers API: the `sha256-<subject hex>` tag holds the index.
            let tag = artifact::referrers_tag(&subject);
            let mut index = match registry.manifest(repo, &tag)? {
                Some(p) => serde_json::from_slice::<ImageIndex>(&p.bytes)
                    .unwrap_or_else(|_| ImageIndex::empty()),
                None => ImageIndex::empty(),
            };
            let mut desc = Descriptor::new(MANIFEST_MEDIA_TYPE, pushed.digest, size);
            desc.artifact_type = Some(EVIDENCE_ARTIFACT_TYPE.into());
            desc.annotations = manifest.annotations.clone();
            if !index.manifests.iter().any(|m| m.digest == desc.digest) {
                index.manifests.push(desc);
            }
            let bytes = serde_json::to_vec(&index).map_err(|e| OciError::Malformed {
                what: "referrers index".into(),
                why: e.to_string(),
            })?;
            registry.push_manifest(repo, &tag, INDEX_MEDIA_TYPE, bytes)?;
        }
        Ok(pushed.digest)
    }
}

/// Runs the first selfcheck now (before the first pass), then every `interval_s` on
/// its own thread; each report is logged and printed as a CloudEvent on stdout with
/// the agent's other events.
fn start_selfcheck(
    config: &AgentConfig,
    runner: &SpiffeId,
) -> Result<(Arc<SelfcheckStatus>, selfcheck::schedule::Runner), GatewayError> {
    use selfcheck::{schedule, Target};
    let status = SelfcheckStatus::new();
    let source = runner.to_string();
    let observe = move |report: &selfcheck::Report| {
        schedule::log("agent", report);
        if let Err(e) = crate::output::println_stdout(schedule::event(&source, report)) {
            tracing::error!(error = %e, "could not print the selfcheck event");
        }
    };
    let first = selfcheck::run(&Target::from_agent(config));
    status.record(first.clone());
    observe(&first);
    let target_config = config.clone();
    let thread = schedule::Runner::start(
        status.clone(),
        config.selfcheck.interval(),
        false,
        move || selfcheck::run(&Target::from_agent(&target_config)),
        observe,
    )
    .map_err(|e| GatewayError::io("<selfcheck thread>", e))?;
    Ok((status, thread))
}

fn egress_from_str(s: &str) -> EgressMode {
    match s {
        "sanitized" => EgressMode::Sanitized,
        "metadata-only" => EgressMode::MetadataOnly,
        // Anything unknown ships the least.
        _ => EgressMode::LocalOnly,
    }
}

/// The runner: `runner` if set (it must then be the SVID's ID), else the SVID's.
fn runner_id(config: &AgentConfig) -> Result<SpiffeId, GatewayError> {
    let svid = match &config.svid {
        Some(dir) => {
            let source = attest::svid::FileSource::open(dir)?;
            use attest::svid::IdentitySource;
            Some(source.current()?.svid.id().clone())
        }
        None => None,
    };
    let id = match (&config.runner, svid) {
        (Some(r), Some(s)) if r != s.as_str() => {
            return Err(GatewayError::Usage(format!(
                "runner `{r}` is not the SVID's SPIFFE ID `{}`",
                s.as_str()
            )))
        }
        (_, Some(s)) => return Ok(s),
        (Some(r), None) => r.clone(),
        (None, None) => {
            return Err(GatewayError::Usage(
                "the agent needs a runner identity: `runner` or `svid` in agent.toml".into(),
            ))
        }
    };
    SpiffeId::parse(&id).map_err(|e| GatewayError::Usage(format!("runner `{id}`: {e}")))
}

/// The agent's own state paths (for tests and docs).
pub fn ledger_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("agent").join("runs")
}
