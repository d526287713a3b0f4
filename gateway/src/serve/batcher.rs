//! Micro-batching with group commit: admissions from all connections wait in one
//! bounded queue; worker threads (off the tokio workers) each take a batch, verify it
//! and commit it, and every answer goes back through its own channel only after the
//! commit that recorded it.
//!
//! A worker verifies its batch on its own thread, then offers it for commit. If no
//! commit is under way it commits itself — everything offered by then, its own batch
//! and those of the workers that finished while it waited, in one transaction (one
//! fsync) — and answers each admission from that thread. If a commit is under way,
//! its batch waits for the next one (the worker that commits picks it up before it
//! stops committing) and the worker goes back to the queue: while one commit fsyncs,
//! the next batches are gathered and verified. The slower the disk, the larger the
//! commits. A request thus crosses two threads at least (tokio → worker → tokio),
//! and a third only when another worker's commit records it.
//!
//! Safe with commits in any order: `State::record` re-checks anti-rollback inside its
//! write transaction; the check at verification time only lets a denial return early.
//!
//! The queue in front is bounded (`batch.queue`): a full queue makes `submit` fail
//! at once and the caller answers 503 with Retry-After. Verified batches waiting for
//! a commit are bounded too (a worker waits while `VERIFIED_BATCHES` are waiting).
//! Nothing is ever admitted without the full verification, and memory does not grow
//! with the offered load.
//!
//! What a commit leaves for after it (the checkpoint witness, a sealed segment's
//! export: `crate::state`'s upkeep) runs on one more thread, the keeper, which the
//! committing worker only wakes: no answer waits for it.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// What every batch needs: the admission (policy, clock, the durable state kept open).
#[derive(Debug)]
pub struct Admissions {
    pub admission: Admission,
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

/// Verified batches that may wait for the commit under way. Bounded, so at most
/// `queue + (VERIFIED_BATCHES + threads) * max_size` admissions are held in memory.
const VERIFIED_BATCHES: usize = 2;

/// The queue is full: answer 503.
#[derive(Debug)]
pub struct Full;

#[derive(Debug)]
pub struct Batcher {
    queue: SyncSender<Job>,
    metrics: Arc<Metrics>,
    threads: Vec<JoinHandle<()>>,
    keeper: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("runner", &self.runner).finish()
    }
}

/// Verified batches offered for commit, and whether a worker is committing.
#[derive(Default)]
struct Offered {
    batches: Vec<Verified>,
    committing: bool,
}

/// What the workers share: the queue's receiving end (one worker gathers at a time)
/// and the group commit.
struct Workers {
    admissions: Arc<Admissions>,
    metrics: Arc<Metrics>,
    jobs: Mutex<Receiver<Job>>,
    offered: Mutex<Offered>,
    /// Wakes the keeper; `None` without a state.
    keeper: Option<SyncSender<()>>,
    /// Signalled when a commit took the offered batches (room for more).
    taken: Condvar,
    max: usize,
    wait: Duration,
}

/// A poisoned lock only means a panic on another worker mid-update; the data stays
/// consistent (a receiver, or a list and a flag), so carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Batcher {
    pub fn start(
        admissions: Arc<Admissions>,
        config: &BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Batcher> {
        let (queue, jobs) = mpsc::sync_channel::<Job>(config.queue);
        let n = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // One wake-up pending is enough: the keeper does all that is due each time.
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let keeper = match admissions.admission.open_state() {
            Some(state) => {
                state.defer_upkeep();
                let a = admissions.clone();
                Some(
                    std::thread::Builder::new()
                        .name("log-keeper".into())
                        .spawn(move || keep(&a, &woken))?,
                )
            }
            None => None,
        };
        let wake = keeper.as_ref().map(|_| {
            // Whatever an earlier process left is done first.
            let _ = wake.try_send(());
            wake
        });
        let workers = Arc::new(Workers {
            keeper: wake,
            admissions,
            metrics: metrics.clone(),
            jobs: Mutex::new(jobs),
            offered: Mutex::default(),
            taken: Condvar::new(),
            max: config.max_size.max(1),
            wait: Duration::from_micros(config.max_wait_us),
        });
        let threads = (0..n)
            .map(|i| {
                let w = workers.clone();
                std::thread::Builder::new()
                    .name(format!("admit-{i}"))
                    .spawn(move || w.run())
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Batcher {
            queue,
            metrics,
            threads,
            keeper,
        })
    }

    /// Queues one admission; `Full` when the queue is at capacity.
    pub fn submit(
        &self,
        capsule: Capsule,
        runner: SpiffeId,
    ) -> Result<oneshot::Receiver<Outcome>, Full> {
        let (reply, rx) = oneshot::channel();
        // Counted before the send so the worker's decrement never comes first.
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

    /// Stops taking work, finishes what is queued and waits for the workers.
    pub fn shutdown(self) {
        drop(self.queue);
        for t in self.threads {
            let _ = t.join();
        }
        // The workers are gone and with them the keeper's wake-up: it finishes.
        if let Some(k) = self.keeper {
            let _ = k.join();
        }
    }
}

/// The keeper: runs the state's upkeep each time a commit left some, and once more
/// when the workers are gone.
fn keep(admissions: &Admissions, woken: &Receiver<()>) {
    let Some(state) = admissions.admission.open_state() else {
        return;
    };
    loop {
        let stop = woken.recv().is_err();
        if let Err(e) = state.upkeep() {
            tracing::warn!(error = %e, "admission log upkeep failed; retried after the next commit");
        }
        if stop {
            return;
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

/// The commit turn of one worker. A panic during a commit ends the turn: the waiting
/// batches are dropped (their peers see the pipeline stopped, nothing of them was
/// acknowledged) and another worker may commit again, instead of every later batch
/// waiting for a turn that never ends.
struct CommitTurn<'a>(&'a Workers);

impl Drop for CommitTurn<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut offered = lock(&self.0.offered);
            offered.committing = false;
            offered.batches.clear();
            drop(offered);
            self.0.taken.notify_all();
        }
    }
}

impl Workers {
    /// One worker: gather, verify, offer for commit (and commit if no one is), until
    /// the queue is closed and empty.
    fn run(&self) {
        loop {
            // One worker gathers at a time; the others wait here, not on the queue.
            let batch = {
                let jobs = lock(&self.jobs);
                gather(&jobs, self.max, self.wait)
            };
            let Some(batch) = batch else { return };
            self.metrics
                .queue_depth
                .fetch_sub(batch.len(), Ordering::Relaxed);
            self.metrics.batch(batch.len());
            let started = Instant::now();
            let a = &self.admissions.admission;
            let verified: Verified = batch
                .into_iter()
                // The authenticated peer is the runner: the tenant's `runners` patterns
                // (and the manifest's) are checked against it.
                .map(|job| (a.verify(&job.capsule, &job.runner), job.reply))
                .collect();
            self.metrics.stage(false, started.elapsed());
            self.offer(verified);
        }
    }

    /// Offers a verified batch for commit. Commits it (with whatever else is offered)
    /// when no commit is under way; otherwise leaves it to the worker that commits,
    /// which takes it before it stops.
    fn offer(&self, verified: Verified) {
        let mut offered = lock(&self.offered);
        while offered.committing && offered.batches.len() >= VERIFIED_BATCHES {
            offered = self
                .taken
                .wait(offered)
                .unwrap_or_else(PoisonError::into_inner);
        }
        offered.batches.push(verified);
        if offered.committing {
            return;
        }
        offered.committing = true;
        let _turn = CommitTurn(self);
        loop {
            let batches = std::mem::take(&mut offered.batches);
            drop(offered);
            self.taken.notify_all();
            self.commit(batches.into_iter().flatten().collect());
            offered = lock(&self.offered);
            if offered.batches.is_empty() {
                offered.committing = false;
                return;
            }
        }
    }

    /// Records one group in one transaction and only then answers each admission.
    fn commit(&self, group: Verified) {
        let (results, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        // Denials are recorded too (within the denial budget: a batch of denials over
        // it commits nothing, so a flood costs no fsync).
        let started = Instant::now();
        let recorded = self.admissions.admission.record(results);
        self.metrics.stage(true, started.elapsed());
        if let (Some(keeper), Some(state)) = (&self.keeper, self.admissions.admission.open_state())
        {
            if state.upkeep_due() {
                let _ = keeper.try_send(());
            }
        }
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
