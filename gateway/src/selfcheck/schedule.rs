//! The selfcheck of a long-running process (`serve`, `agent`): its latest outcome,
//! shared by [`Arc`] between the runner and whoever must refuse work while it fails
//! (`/readyz`, the agent's loop, the metrics), and a runner that calls it at start
//! and every `interval` on a thread of its own.
//!
//! Its own std thread, never a tokio worker: a selfcheck starts sandboxes and waits
//! for them (seconds), which would stall every connection scheduled on that worker.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Report;

/// The default of `[selfcheck] interval_s`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// The CloudEvent type of one selfcheck run (its `data` is the [`Report`]).
pub const EVENT_TYPE: &str = "dev.capsule-gateway.selfcheck.v1";

/// The latest selfcheck of this process. Not passed until a first run has passed.
#[derive(Debug, Default)]
pub struct SelfcheckStatus {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    last: Option<Report>,
    last_run_unix: Option<u64>,
    passes: u64,
    failures: u64,
}

/// What `/readyz`, the metrics and the agent read, taken at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// A selfcheck has run and the latest one passed.
    pub passed: bool,
    /// Whether any selfcheck has finished yet.
    pub ran: bool,
    /// The names of the latest run's failed checks.
    pub failed: Vec<String>,
    /// Unix seconds when the latest run finished.
    pub last_run_unix: Option<u64>,
    /// Runs so far that passed and that failed.
    pub passes: u64,
    pub failures: u64,
}

impl StatusSnapshot {
    /// Why work is refused, in words (`None` when the selfcheck passed).
    pub fn refusal(&self) -> Option<String> {
        if self.passed {
            None
        } else if !self.ran {
            Some("the first selfcheck has not finished".into())
        } else {
            Some(format!("selfcheck failed: {}", self.failed.join(", ")))
        }
    }
}

impl SelfcheckStatus {
    pub fn new() -> Arc<SelfcheckStatus> {
        Arc::new(SelfcheckStatus::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock left plain data behind: still readable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a finished run.
    pub fn record(&self, report: Report) {
        let now = now_unix();
        let mut i = self.lock();
        if report.passed() {
            i.passes += 1;
        } else {
            i.failures += 1;
        }
        i.last = Some(report);
        i.last_run_unix = Some(now);
    }

    pub fn passed(&self) -> bool {
        self.lock().last.as_ref().is_some_and(Report::passed)
    }

    /// The latest report, if a run has finished.
    pub fn last(&self) -> Option<Report> {
        self.lock().last.clone()
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let i = self.lock();
        StatusSnapshot {
            passed: i.last.as_ref().is_some_and(Report::passed),
            ran: i.last.is_some(),
            failed: i
                .last
                .iter()
                .flat_map(|r| r.failures().map(|c| c.name.clone()))
                .collect(),
            last_run_unix: i.last_run_unix,
            passes: i.passes,
            failures: i.failures,
        }
    }
}

/// Runs a selfcheck at start and every `interval` until stopped (or dropped).
#[derive(Debug)]
pub struct Runner {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Runner {
    /// Starts the thread. `run` makes one report (it builds its target itself, so
    /// each run sees the configuration as it is then); `observe` sees each report
    /// after it was recorded in `status` (logs, the CloudEvent). The first run is at
    /// once when `now` (`serve`), else after one `interval` (the agent ran its
    /// first one itself before its first pass).
    pub fn start(
        status: Arc<SelfcheckStatus>,
        interval: Duration,
        now: bool,
        mut run: impl FnMut() -> Report + Send + 'static,
        mut observe: impl FnMut(&Report) + Send + 'static,
    ) -> std::io::Result<Runner> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("selfcheck".into())
            .spawn(move || {
                let mut due = now;
                loop {
                    if due {
                        let report = run();
                        status.record(report.clone());
                        observe(&report);
                    }
                    due = true;
                    let (lock, wake) = &*flag;
                    let stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                    let (stopped, _) = wake
                        .wait_timeout_while(stopped, interval, |s| !*s)
                        .unwrap_or_else(|p| p.into_inner());
                    if *stopped {
                        return;
                    }
                }
            })?;
        Ok(Runner {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the schedule and waits for a run in progress to finish.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The CloudEvent of one selfcheck run: `data` is the report, `source` the
/// process that ran it (`serve` listener, agent runner).
pub fn event(source: &str, report: &Report) -> serde_json::Value {
    let id = crate::launch::new_run_id()
        .map(|r| r.as_str().to_string())
        .unwrap_or_else(|_| format!("selfcheck-{}", now_unix()));
    let time = chrono::DateTime::from_timestamp(i64::try_from(now_unix()).unwrap_or(i64::MAX), 0)
        .unwrap_or_default();
    serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": EVENT_TYPE,
        "time": time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "datacontenttype": "application/json",
        "data": {
            "passed": report.passed(),
            "failed": report.failures().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            "report": report,
        },
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Logs one report: every failed check at error level, a pass at info.
pub fn log(process: &str, report: &Report) {
    if report.passed() {
        tracing::info!(
            process,
            checks = report.checks.len(),
            elapsed_ms = u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
            "selfcheck passed"
        );
    } else {
        for c in report.failures() {
            tracing::error!(process, check = %c.name, detail = %c.detail, "selfcheck check failed");
        }
        tracing::error!(
            process,
            failed = report.failures().count(),
            "selfcheck failed: work is refused until it passes"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_passed_until_a_run_passed_and_not_after_a_failed_one() {
        let s = SelfcheckStatus::new();
        assert_eq!(
            s.snapshot().refusal().as_deref(),
            Some("the first selfcheck has not finished")
        );
        let mut ok = Report::default();
        ok.pass("a", "fine");
        s.record(ok.clone());
        assert!(s.passed());
        let mut bad = Report::default();
        bad.fail("tier.gvisor.egress", "open");
        s.record(bad);
        let snap = s.snapshot();
        assert!(!snap.passed);
        assert_eq!(snap.failed, ["tier.gvisor.egress"]);
        assert_eq!((snap.passes, snap.failures), (1, 1));
        assert_eq!(
            snap.refusal().as_deref(),
            Some("selfcheck failed: tier.gvisor.egress")
        );
    }

    #[test]
    fn the_runner_runs_at_start_and_stops() {
        let s = SelfcheckStatus::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = Runner::start(
            s.clone(),
            Duration::from_secs(3600),
            true,
            Report::default,
            move |_| {
                let _ = tx.send(());
            },
        )
        .expect("start");
        rx.recv().expect("first run");
        runner.stop();
        assert!(s.passed());
        assert_eq!(s.snapshot().passes, 1);
    }
}
