//! Micro-batching: admissions from all connections are gathered into batches, each
//! verified in parallel on the rayon pool (off the tokio workers) and then recorded
//! in one durable transaction; every answer goes back through its own channel only
//! after that commit.
//!
//! Two stages. A gatherer thread forms batches and hands each to the rayon pool
//! without waiting for it (a few batches in flight, bounded), so the pool never idles
//! at a batch boundary; a committer thread records whatever verified batches are
//! waiting in one transaction (one fsync) and only then answers them. While one commit
//! is under way, the next batches are being verified. That is safe because
//! `State::record` re-checks anti-rollback inside its write transaction; the check at
//! verification time only lets a denial return early.
//!
//! The queue in front is bounded (`batch.queue`): a full queue makes `submit` fail
//! at once and the caller answers 503 with Retry-After. Nothing is ever admitted
//! without the full verification, and memory does not grow with the offered load.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::oneshot;
use verify_core::{Admitted, Capsule, Decision, Policy, SpiffeId};

use super::config::BatchConfig;
use super::metrics::Metrics;
use crate::admission::Admission;
use crate::GatewayError;

/// Nothing could be decided durably: the state could not be written, so nothing of
/// the batch was acknowledged. Shared by every admission of the failed commit.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct NotRecorded(Arc<GatewayError>);

/// The answer to one admission: a decision, or why nothing was recorded.
pub type Outcome = Result<Result<Admitted, Decision>, NotRecorded>;

/// What every batch needs: the admission (policy, clock, the durable state kept open)
/// and the verification pool.
#[derive(Debug)]
pub struct Admissions {
    pub admission: Admission,
    pub pool: rayon::ThreadPool,
}

impl Admissions {
    pub fn policy(&self) -> &Policy {
        self.admission.policy()
    }
}

struct Job {
    capsule: Capsule,
    runner: SpiffeId,
    reply: oneshot::Sender<Outcome>,
}

type Verified = Vec<(Result<Admitted, Decision>, oneshot::Sender<Outcome>)>;

/// Verified batches that may wait for the committer. While one commit (an fsync) is
/// under way the verifier goes on, and the committer then records everything that
/// waits in one transaction: the slower the disk, the larger the commits. Bounded, so
/// at most `queue + VERIFIED_BATCHES * max_size` admissions are held in memory.
const VERIFIED_BATCHES: usize = 2;

/// The queue is full: answer 503.
#[derive(Debug)]
pub struct Full;

#[derive(Debug)]
pub struct Batcher {
    queue: SyncSender<Job>,
    metrics: Arc<Metrics>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("runner", &self.runner).finish()
    }
}

impl Batcher {
    pub fn start(
        admissions: Arc<Admissions>,
        config: &BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Batcher> {
        let (queue, jobs) = mpsc::sync_channel::<Job>(config.queue);
        let (verified_tx, verified_rx) = mpsc::sync_channel::<Verified>(VERIFIED_BATCHES);
        let (max, wait) = (config.max_size, Duration::from_micros(config.max_wait_us));
        let a = admissions.clone();
        let m = metrics.clone();
        let metrics_commit = metrics.clone();
        let verifier = std::thread::Builder::new()
            .name("admit-verify".into())
            .spawn(move || verify_loop(&a, &jobs, &verified_tx, max, wait, &m))?;
        let committer = std::thread::Builder::new()
            .name("admit-commit".into())
            .spawn(move || commit_loop(&admissions, &verified_rx, &metrics_commit))?;
        Ok(Batcher {
            queue,
            metrics,
            threads: vec![verifier, committer],
        })
    }

    /// Queues one admission; `Full` when the queue is at capacity.
    pub fn submit(
        &self,
        capsule: Capsule,
        runner: SpiffeId,
    ) -> Result<oneshot::Receiver<Outcome>, Full> {
        let (reply, rx) = oneshot::channel();
        // Counted before the send so the verifier's decrement never comes first.
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(Job {
            capsule,
            runner,
            reply,
        }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.metrics.shed.fetch_add(1, Ordering::Relaxed);
                Err(Full)
            }
        }
    }

    /// Stops taking work, finishes what is queued and waits for both stages.
    pub fn shutdown(self) {
        drop(self.queue);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Gathers a batch: blocks for the first job, takes whatever else is queued, then
/// waits at most `wait` for more while the batch is below `max`.
fn gather(jobs: &Receiver<Job>, max: usize, wait: Duration) -> Option<Vec<Job>> {
    let first = jobs.recv().ok()?;
    let mut batch = Vec::with_capacity(max.min(64));
    batch.push(first);
    while batch.len() < max {
        match jobs.try_recv() {
            Ok(j) => batch.push(j),
            Err(_) => break,
        }
    }
    let deadline = Instant::now() + wait;
    while batch.len() < max {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match jobs.recv_timeout(left) {
            Ok(j) => batch.push(j),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    Some(batch)
}

fn verify_loop(
    a: &Arc<Admissions>,
    jobs: &Receiver<Job>,
    verified: &SyncSender<Verified>,
    max: usize,
    wait: Duration,
    metrics: &Arc<Metrics>,
) {
    // Batches being verified at once: a batch is handed to the pool and the next one
    // gathered without waiting for it, so the pool never idles at a batch boundary.
    let in_flight = a.pool.current_num_threads().max(1);
    let (release, acquire) = mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        let _ = release.send(());
    }
    while let Some(batch) = gather(jobs, max, wait) {
        metrics
            .queue_depth
            .fetch_sub(batch.len(), Ordering::Relaxed);
        metrics.batch(batch.len());
        if acquire.recv().is_err() {
            return;
        }
        let (task, verified, metrics, release) = (
            a.clone(),
            verified.clone(),
            metrics.clone(),
            release.clone(),
        );
        a.pool.spawn(move || {
            let a = &*task;
            let started = Instant::now();
            let results: Vec<Result<Admitted, Decision>> = batch
                .par_iter()
                // The authenticated peer is the runner: the tenant's `runners` patterns
                // (and the manifest's) are checked against it.
                .map(|job| a.admission.verify(&job.capsule, &job.runner))
                .collect();
            metrics.stage(false, started.elapsed());
            let paired = results
                .into_iter()
                .zip(batch.into_iter().map(|j| j.reply))
                .collect();
            // A stopped committer drops the replies: their peers see an error, and
            // nothing was acknowledged.
            let _ = verified.send(paired);
            let _ = release.send(());
        });
    }
}

fn commit_loop(a: &Admissions, verified: &Receiver<Verified>, metrics: &Metrics) {
    while let Ok(mut batch) = verified.recv() {
        while let Ok(more) = verified.try_recv() {
            batch.extend(more);
        }
        let (results, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        // Denials are recorded too (within the denial budget: a batch of denials over
        // it commits nothing, so a flood costs no fsync).
        let started = Instant::now();
        let recorded = a.admission.record(results);
        metrics.stage(true, started.elapsed());
        match recorded {
            Ok(recorded) => {
                for (outcome, reply) in recorded.into_iter().zip(replies) {
                    // A peer that went away does not undo its admission.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let e = NotRecorded(Arc::new(e));
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
