//! Service metrics, rendered as Prometheus text at `GET /metrics`: admissions by
//! verdict and reason, responses by status, shed requests, queue depth, pending,
//! evicted and failed handshakes (by cause), run outcomes, build information, the
//! SVID's remaining lifetime, and histograms (cumulative `_bucket{le}`, `_sum`,
//! `_count`) of batch sizes, admission latency, batch stage times and run durations.
//!
//! Histograms rather than summaries: buckets add up across a fleet of gateways, and
//! quantiles are computed where they are scraped (`histogram_quantile`). Each bucket
//! is an atomic counter, so recording takes no lock.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use verify_core::Decision;

const PREFIX: &str = "capsule_gateway";

/// Upper bounds (microseconds) of the latency buckets: 100 µs to one minute.
const LATENCY_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
/// Upper bounds of the batch-size buckets (capsules).
const BATCH_SIZES: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
/// Upper bounds (microseconds) of the run-duration buckets: one second to an hour.
const RUN_US: &[u64] = &[
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
    600_000_000,
    1_800_000_000,
    3_600_000_000,
];

/// A fixed-bucket histogram of integer observations (microseconds or counts),
/// rendered with bounds divided by `unit` (1e6 for seconds).
#[derive(Debug)]
pub struct Buckets {
    bounds: &'static [u64],
    unit: f64,
    /// One per bound, plus `+Inf`; not cumulative (summed when rendered).
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Buckets {
    fn new(bounds: &'static [u64], unit: f64) -> Buckets {
        Buckets {
            bounds,
            unit,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let le = *bound as f64 / self.unit;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum.load(Ordering::Relaxed) as f64 / self.unit;
        let _ = writeln!(out, "{name}_sum {sum}");
        // The count is the +Inf bucket, so the two never disagree within one scrape.
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// The scheduled selfcheck's gauges and counters (`[selfcheck] enabled`): whether
/// the latest run passed (0 until a first run passed), runs by result, and when the
/// latest run finished.
pub fn render_selfcheck(out: &mut String, s: &crate::selfcheck::schedule::StatusSnapshot) {
    let p = PREFIX;
    let _ = write!(
        out,
        "# HELP {p}_selfcheck_passed 1 when the latest selfcheck passed (0 before the first has passed).\n# TYPE {p}_selfcheck_passed gauge\n{p}_selfcheck_passed {}\n",
        u8::from(s.passed)
    );
    let _ = write!(
        out,
        "# HELP {p}_selfcheck_runs_total Selfcheck runs by result.\n# TYPE {p}_selfcheck_runs_total counter\n{p}_selfcheck_runs_total{{result=\"pass\"}} {}\n{p}_selfcheck_runs_total{{result=\"fail\"}} {}\n",
        s.passes, s.failures
    );
    if let Some(t) = s.last_run_unix {
        let _ = write!(
            out,
            "# HELP {p}_selfcheck_last_run_timestamp_seconds When the latest selfcheck finished (Unix seconds).\n# TYPE {p}_selfcheck_last_run_timestamp_seconds gauge\n{p}_selfcheck_last_run_timestamp_seconds {t}\n"
        );
    }
}

/// Why a handshake did not lead to an authenticated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Closed to make room for a newer connection (`serve::pending`).
    Evicted,
    /// Not done within `limits.handshake_timeout_ms`, or no connection place in time.
    Timeout,
    /// Refused by TLS: no certificate, a bad chain, a protocol error.
    Tls,
    /// A valid SVID whose ID `tls.allowed_peers` does not allow.
    PeerNotAllowed,
}

impl HandshakeFailure {
    const ALL: [HandshakeFailure; 4] = [
        HandshakeFailure::Evicted,
        HandshakeFailure::Timeout,
        HandshakeFailure::Tls,
        HandshakeFailure::PeerNotAllowed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Evicted => "evicted",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::PeerNotAllowed => "peer_not_allowed",
        }
    }
}

/// How a `/v1/runs` request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The capsule ran to its end (its exit code is in the run's event), as
    /// `GET /v1/runs/{id}` says `completed`.
    Completed,
    /// The run failed: the sandbox did not start, egress was not proven blocked,
    /// teardown was incomplete, or it was interrupted.
    Failed,
    /// The admission was denied; nothing ran.
    Denied,
}

impl RunOutcome {
    const ALL: [RunOutcome; 3] = [
        RunOutcome::Completed,
        RunOutcome::Failed,
        RunOutcome::Denied,
    ];

    fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Completed => "completed",
            RunOutcome::Failed => "failed",
            RunOutcome::Denied => "denied",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    admissions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    responses: Mutex<BTreeMap<u16, u64>>,
    pub shed: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub connections: AtomicUsize,
    /// Connections still in the TLS handshake (`serve::pending`).
    pub pending_handshakes: AtomicUsize,
    /// Pending handshakes closed to make room for a newer connection.
    pub handshakes_evicted: AtomicU64,
    /// Handshakes that failed, by `HandshakeFailure` (in `ALL`'s order).
    handshake_failures: [AtomicU64; 4],
    /// Runs by `RunOutcome` (in `ALL`'s order).
    runs: [AtomicU64; 3],
    batch_sizes: Buckets,
    latency: Buckets,
    verify: Buckets,
    commit: Buckets,
    run_duration: Buckets,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            admissions: Mutex::default(),
            responses: Mutex::default(),
            shed: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            pending_handshakes: AtomicUsize::new(0),
            handshakes_evicted: AtomicU64::new(0),
            handshake_failures: Default::default(),
            runs: Default::default(),
            batch_sizes: Buckets::new(BATCH_SIZES, 1.0),
            latency: Buckets::new(LATENCY_US, 1e6),
            verify: Buckets::new(LATENCY_US, 1e6),
            commit: Buckets::new(LATENCY_US, 1e6),
            run_duration: Buckets::new(RUN_US, 1e6),
        }
    }

    pub fn admission(&self, d: &Decision, latency: Duration) {
        // An admission has no reason: `none`, never an empty label value.
        let key = (d.verdict.as_str(), d.reason.map_or("none", |r| r.as_str()));
        if let Ok(mut m) = self.admissions.lock() {
            *m.entry(key).or_default() += 1;
        }
        self.latency.observe_duration(latency);
    }

    pub fn response(&self, status: u16) {
        if let Ok(mut m) = self.responses.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    pub fn handshake_failed(&self, cause: HandshakeFailure) {
        let i = HandshakeFailure::ALL
            .iter()
            .position(|c| *c == cause)
            .unwrap_or(0);
        self.handshake_failures[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A run that ended (`took` from its launch), or a run request that was denied.
    pub fn run(&self, outcome: RunOutcome, took: Option<Duration>) {
        let i = RunOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.runs[i].fetch_add(1, Ordering::Relaxed);
        if let Some(took) = took {
            self.run_duration.observe_duration(took);
        }
    }

    /// Time one batch spent being verified (`verify`) or recorded durably (`commit`).
    pub fn stage(&self, commit: bool, took: Duration) {
        if commit {
            self.commit.observe_duration(took);
        } else {
            self.verify.observe_duration(took);
        }
    }

    pub fn batch(&self, size: usize) {
        self.batch_sizes.observe(size as u64);
    }

    /// Prometheus text exposition format 0.0.4. `svid_seconds_left`: the gateway SVID's
    /// `not_after` minus now, when an SVID is loaded.
    pub fn render(&self, svid_seconds_left: Option<i64>) -> String {
        let mut out = String::new();
        let p = PREFIX;
        let _ = write!(
            out,
            "# HELP {p}_build_info The running build: crate version and git commit.\n# TYPE {p}_build_info gauge\n{p}_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            env!("CAPSULE_GATEWAY_COMMIT"),
        );
        if let Some(left) = svid_seconds_left {
            let _ = write!(
                out,
                "# HELP {p}_svid_expiry_seconds Seconds until the gateway's X.509-SVID expires (negative: expired).\n# TYPE {p}_svid_expiry_seconds gauge\n{p}_svid_expiry_seconds {left}\n"
            );
        }
        let _ = write!(
            out,
            "# HELP {p}_admissions_total Admission decisions by verdict and reason (`none` for an admission).\n# TYPE {p}_admissions_total counter\n"
        );
        if let Ok(m) = self.admissions.lock() {
            for ((verdict, reason), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "{p}_admissions_total{{verdict=\"{verdict}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = write!(
            out,
            "# HELP {p}_http_responses_total HTTP responses by status code.\n# TYPE {p}_http_responses_total counter\n"
        );
        if let Ok(m) = self.responses.lock() {
            for (code, n) in m.iter() {
                let _ = writeln!(out, "{p}_http_responses_total{{code=\"{code}\"}} {n}");
            }
        }
        let _ = write!(
            out,
            "# HELP {p}_admissions_shed_total Admissions refused with 503 because the queue was full.\n# TYPE {p}_admissions_shed_total counter\n{p}_admissions_shed_total {}\n",
            self.shed.load(Ordering::Relaxed)
        );
        let _ = write!(
            out,
            "# HELP {p}_queue_depth Admissions waiting for a batch.\n# TYPE {p}_queue_depth gauge\n{p}_queue_depth {}\n",
            self.queue_depth.load(Ordering::Relaxed)
        );
        let _ = write!(
            out,
            "# HELP {p}_connections Open client connections.\n# TYPE {p}_connections gauge\n{p}_connections {}\n",
            self.connections.load(Ordering::Relaxed)
        );
        let _ = write!(
            out,
            "# HELP {p}_pending_handshakes Connections still in the TLS handshake.\n# TYPE {p}_pending_handshakes gauge\n{p}_pending_handshakes {}\n",
            self.pending_handshakes.load(Ordering::Relaxed)
        );
        let _ = write!(
            out,
            "# HELP {p}_handshakes_evicted_total Pending handshakes closed to make room for newer connections.\n# TYPE {p}_handshakes_evicted_total counter\n{p}_handshakes_evicted_total {}\n",
            self.handshakes_evicted.load(Ordering::Relaxed)
        );
        let _ = write!(
            out,
            "# HELP {p}_handshake_failures_total Handshakes that led to no authenticated connection, by cause.\n# TYPE {p}_handshake_failures_total counter\n"
        );
        for (cause, n) in HandshakeFailure::ALL.iter().zip(&self.handshake_failures) {
            let _ = writeln!(
                out,
                "{p}_handshake_failures_total{{cause=\"{}\"}} {}",
                cause.as_str(),
                n.load(Ordering::Relaxed)
            );
        }
        let _ = write!(
            out,
            "# HELP {p}_runs_total /v1/runs requests by outcome.\n# TYPE {p}_runs_total counter\n"
        );
        for (outcome, n) in RunOutcome::ALL.iter().zip(&self.runs) {
            let _ = writeln!(
                out,
                "{p}_runs_total{{outcome=\"{}\"}} {}",
                outcome.as_str(),
                n.load(Ordering::Relaxed)
            );
        }
        self.batch_sizes.render(
            &mut out,
            &format!("{p}_batch_size"),
            "Capsules per verified batch.",
        );
        self.latency.render(
            &mut out,
            &format!("{p}_admission_latency_seconds"),
            "Time from a complete request to its durable decision.",
        );
        self.verify.render(
            &mut out,
            &format!("{p}_batch_verify_seconds"),
            "Time to verify one batch on the verification pool.",
        );
        self.commit.render(
            &mut out,
            &format!("{p}_batch_commit_seconds"),
            "Time to record one batch durably (one redb transaction, fsynced).",
        );
        self.run_duration.render(
            &mut out,
            &format!("{p}_run_duration_seconds"),
            "Time from a run's launch to its evidence bundle.",
        );
        out
    }
}

/// The verification cache's counters (verify-core `VerifyCache`, owned by the
/// policy): re-admissions answered without a signature check, and those that checked.
pub fn render_verify_cache(out: &mut String, cache: &verify_core::verify_cache::VerifyCache) {
    let p = PREFIX;
    let _ = write!(
        out,
        "# HELP {p}_verify_cache_hits_total Signature checks and manifest parses answered by the verification cache.\n# TYPE {p}_verify_cache_hits_total counter\n{p}_verify_cache_hits_total {}\n\
         # HELP {p}_verify_cache_misses_total Signatures checked (not in the verification cache, or the cache off).\n# TYPE {p}_verify_cache_misses_total counter\n{p}_verify_cache_misses_total {}\n\
         # HELP {p}_verify_cache_entries Entries in the verification cache, at most its capacity.\n# TYPE {p}_verify_cache_entries gauge\n{p}_verify_cache_entries {}\n",
        cache.hits(),
        cache.misses(),
        cache.len(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_equals_the_inf_bucket() {
        let b = Buckets::new(&[10, 100], 1.0);
        for v in [1, 10, 11, 1000] {
            b.observe(v);
        }
        let mut out = String::new();
        b.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"100\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 1022\nx_count 4\n"), "{out}");
    }

    #[test]
    fn an_empty_histogram_has_zero_buckets_sum_and_count_and_no_quantiles() {
        let out = Metrics::new().render(None);
        assert!(!out.contains("quantile"), "{out}");
        assert!(!out.contains("-0"), "{out}");
        assert!(out.contains("capsule_gateway_admission_latency_seconds_bucket{le=\"0.0001\"} 0\n"));
        assert!(out.contains("capsule_gateway_admission_latency_seconds_sum 0\n"));
        assert!(out.contains("capsule_gateway_admission_latency_seconds_count 0\n"));
    }
}
