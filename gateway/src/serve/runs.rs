//! `/v1/runs`: an admitted capsule is launched in the sandbox of the tier its
//! environment's rule names (gVisor unless `tier = "kata"`; admission already refused
//! a tier this service does not provide) on a blocking thread,
//! exactly as `capsule-gateway run` launches it ([`crate::launch::execute`]), and its run id
//! is answered at once. While it runs its status lives in memory; once it is done the
//! evidence bundle on disk (`STATE/evidence/<run id>/event.json`) is the status, so
//! finished runs cost no memory and survive a restart.
//!
//! A run belongs to the peer that started it: its SPIFFE ID is the event's `source`
//! (in memory while it runs, in the bundle's `event.json` after), and any other peer
//! is told exactly what an unknown id gets.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sandbox_launcher::RunId;
use serde_json::Value;
use verify_core::{Admitted, Clock, Policy, SpiffeId, Tier};

use super::config::{RunsConfig, RunsRuntime};
use super::metrics::{Metrics, RunOutcome};
use crate::delivery::Deliverer;
use crate::evidence::{
    outbound_event, read_event_head, write_denial_bundle, Custody, EgressRules, Event, EventData,
    EventType,
};
use crate::launch::{self, Runtime, Sandbox};
use crate::layout::StateLayout;
use crate::GatewayError;

pub struct Runs {
    /// The `gvisor` tier.
    sandbox: Arc<Sandbox>,
    /// The `kata` tier, when `[runs.kata]` is configured.
    kata: Option<Arc<Sandbox>>,
    /// The base root file system.
    rootfs: PathBuf,
    evidence: PathBuf,
    /// Runs under way, with the peer that started each.
    running: Arc<Mutex<HashMap<RunId, String>>>,
    slots: Arc<AtomicUsize>,
    max: usize,
    /// Raised at shutdown: running sandboxes are stopped and torn down in order.
    pub cancel: Arc<AtomicBool>,
    /// The service's clock: the time of every run event.
    clock: Arc<dyn Clock>,
    /// The event's `policydigest`, the tenants' egress, and the sink's delivery.
    outbound: Arc<Outbound>,
    /// Signs each bundle's index.
    custody: Arc<Custody>,
}

/// What leaves the host of each run's event: shaped by the tenant's egress mode and
/// queued for the sink, when one is configured.
#[derive(Debug)]
pub struct Outbound {
    pub policy_digest: verify_core::Sha256Digest,
    pub egress: EgressRules,
    pub deliverer: Option<Deliverer>,
}

impl Outbound {
    /// Queues the event for the sink (durably; the background thread sends it).
    fn deliver(&self, event: &Event, bundle: &std::path::Path) {
        let Some(d) = &self.deliverer else { return };
        let index = crate::evidence::egress::index_sha256(bundle);
        let outbound = outbound_event(event, self.egress.for_event(event), index.as_deref());
        let bytes = serde_json::to_vec(&outbound).unwrap_or_default();
        if let Err(e) = d.enqueue(&event.id, &bytes) {
            // The bundle on disk is the record; the operator learns the event was not queued.
            tracing::error!(
                target: "capsule_gateway::delivery",
                run_id = event.id.as_str(),
                error = %e,
                "event not queued for the sink"
            );
        }
    }
}

impl std::fmt::Debug for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runs")
            .field("evidence", &self.evidence)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// A reserved run slot; released when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub enum RunStatus {
    /// No such run, or not this peer's: the two are told apart by nobody.
    Unknown,
    Running,
    Done {
        status: &'static str,
        event: Value,
    },
}

impl Runs {
    pub fn start_launcher(
        config: &RunsConfig,
        state: &std::path::Path,
        clock: Arc<dyn Clock>,
        outbound: Outbound,

        custody: Arc<Custody>,
    ) -> Result<Runs, GatewayError> {
        let runtime = match config.runtime {
            RunsRuntime::Runsc => Runtime::Runsc {
                platform: config.platform.clone(),
            },
        };
        let layout = StateLayout::new(state);
        let sandbox = Sandbox::start(&layout, &runtime, None)?;
        let kata = match &config.kata {
            Some(k) => Some(Arc::new(Sandbox::start(
                &layout,
                &Runtime::Kata {
                    containerd: k.containerd.clone(),
                    runtime_type: k.runtime_type.clone(),
                },
                None,
            )?)),
            None => None,
        };
        Ok(Runs {
            sandbox: Arc::new(sandbox),
            kata,
            rootfs: config.rootfs.clone(),
            evidence: layout.evidence(),
            running: Arc::default(),
            slots: Arc::default(),
            max: config.max_concurrent,
            cancel: Arc::default(),
            clock,
            outbound: Arc::new(outbound),
            custody,
        })
    }

    /// A denied run request leaves a denial bundle (decision, digests, signed index)
    /// under its own id, as `run` does.
    pub fn record_denial(
        &self,
        decision: &verify_core::Decision,
        peer: &SpiffeId,
    ) -> Result<(), GatewayError> {
        let id = launch::new_run_id()?;
        let event = Event::denied(
            id.as_str(),
            peer.as_str(),
            "capsule",
            decision,
            &self.outbound.policy_digest,
            launch::event_time(self.clock.as_ref()),
        );
        write_denial_bundle(&self.evidence, &event, &self.custody)?;
        Ok(())
    }

    /// Reserves a slot, or `None` when `max_concurrent` runs are under way.
    pub fn slot(&self) -> Option<Slot> {
        let taken = self.slots.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.slots.clone());
        (taken < self.max).then_some(slot)
    }

    /// Launches `admitted` on a blocking thread, in its tier and on its tenant's root
    /// file system (`policy`); returns its run id.
    pub fn start(
        &self,
        slot: Slot,
        admitted: Admitted,
        policy: &Policy,
        peer: &SpiffeId,
        metrics: Arc<Metrics>,
    ) -> Result<RunId, GatewayError> {
        let sandbox = match launch::tier_for(policy, &admitted) {
            Some(Tier::Kata) => self.kata.clone().ok_or_else(|| {
                // Admission checks the tier against the same configuration.
                GatewayError::Usage("runs: the kata tier is not configured ([runs.kata])".into())
            })?,
            _ => self.sandbox.clone(),
        };
        let rootfs = launch::rootfs_for(policy, &admitted, &self.rootfs);
        let id = launch::new_run_id()?;
        self.running
            .lock()
            .map_err(|_| GatewayError::Usage("runs: lock poisoned".into()))?
            .insert(id.clone(), peer.to_string());
        let clock = self.clock.clone();
        let outbound = self.outbound.clone();
        let (evidence, running, cancel, custody) = (
            self.evidence.clone(),
            self.running.clone(),
            self.cancel.clone(),
            self.custody.clone(),
        );
        let source = peer.to_string();
        let run_id = id.clone();
        std::thread::Builder::new()
            .name(format!("run-{}", &id.as_str()[..8]))
            .spawn(move || {
                let _slot = slot;
                let started = std::time::Instant::now();
                let outcome = match launch::execute(
                    sandbox.launcher(),
                    &run_id,
                    &admitted,
                    &rootfs,
                    launch::EvidenceSink {
                        root: &evidence,
                        source: &source,
                        clock: clock.as_ref(),
                        policy_digest: &outbound.policy_digest,
                        custody: &custody,
                    },
                    &cancel,
                    Vec::new(),
                ) {
                    Ok(event) => {
                        outbound.deliver(&event, &evidence.join(run_id.as_str()));
                        if matches!(event.data, EventData::Run(EventType::Completed, _)) {
                            RunOutcome::Completed
                        } else {
                            RunOutcome::Failed
                        }
                    }
                    Err(e) => {
                        tracing::error!(
                            target: "capsule_gateway::runs",
                            run_id = run_id.as_str(),
                            error = %e,
                            "run failed"
                        );
                        RunOutcome::Failed
                    }
                };
                metrics.run(outcome, Some(started.elapsed()));
                if let Ok(mut r) = running.lock() {
                    r.remove(&run_id);
                }
            })
            .map_err(|source| GatewayError::Process {
                what: "run thread",
                source,
            })?;
        Ok(id)
    }

    /// The status of run `id` as `peer` may see it: only the peer that started a run
    /// sees it at all.
    pub fn status(&self, id: &str, peer: &SpiffeId) -> RunStatus {
        let Some(id) = RunId::parse(id) else {
            return RunStatus::Unknown;
        };
        let peer = peer.to_string();
        let running = self
            .running
            .lock()
            .map(|r| r.get(&id).map(|owner| *owner == peer))
            .unwrap_or(None);
        match running {
            Some(true) => return RunStatus::Running,
            Some(false) => return RunStatus::Unknown,
            None => {}
        }
        let dir = self.evidence.join(id.as_str());
        let (head, event) = match read_event_head(&dir) {
            Ok(Some(read)) => read,
            Ok(None) => return RunStatus::Unknown,
            Err(why) => {
                // Whose run this is cannot be told: nobody's, and the reason goes to
                // the operator, not to a peer.
                tracing::error!(
                    target: "capsule_gateway::runs",
                    bundle = %dir.display(),
                    why = %why,
                    "unreadable evidence bundle"
                );
                return RunStatus::Unknown;
            }
        };
        if head.source != peer {
            return RunStatus::Unknown;
        }
        RunStatus::Done {
            status: head.kind.status(),
            event,
        }
    }

    /// Waits (up to `limit`) for running sandboxes to stop after `cancel` was raised.
    pub fn drain(&self, limit: std::time::Duration) {
        self.cancel.store(true, Ordering::SeqCst);
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end
            && self.running.lock().map(|r| !r.is_empty()).unwrap_or(false)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
