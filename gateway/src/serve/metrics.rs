//! Service metrics, rendered as Prometheus text at `GET /metrics`: admissions by
//! verdict and reason, responses by status, shed requests, queue depth, pending,
//! evicted and failed handshakes, batch sizes
//! and admission latency quantiles (hdrhistogram, microsecond resolution).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use verify_core::Decision;

/// Latencies up to one minute at 3 significant figures.
const MAX_LATENCY_US: u64 = 60_000_000;

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
    /// Handshakes that failed: refused by TLS, timed out, or no place for the peer.
    pub handshakes_failed: AtomicU64,
    batch_sizes: Mutex<Histogram<u64>>,
    latency_us: Mutex<Histogram<u64>>,
    verify_us: Mutex<Histogram<u64>>,
    commit_us: Mutex<Histogram<u64>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

fn histogram(max: u64) -> Histogram<u64> {
    // Only called with constant bounds that hdrhistogram accepts (1 ≤ low, high ≥ 2·low).
    Histogram::new_with_bounds(1, max, 3).expect("constant histogram bounds are valid")
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
            handshakes_failed: AtomicU64::new(0),
            batch_sizes: Mutex::new(histogram(1 << 20)),
            latency_us: Mutex::new(histogram(MAX_LATENCY_US)),
            verify_us: Mutex::new(histogram(MAX_LATENCY_US)),
            commit_us: Mutex::new(histogram(MAX_LATENCY_US)),
        }
    }

    pub fn admission(&self, d: &Decision, latency: Duration) {
        let key = (d.verdict.as_str(), d.reason.map_or("", |r| r.as_str()));
        if let Ok(mut m) = self.admissions.lock() {
            *m.entry(key).or_default() += 1;
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Ok(mut h) = self.latency_us.lock() {
            h.saturating_record(us.clamp(1, MAX_LATENCY_US));
        }
    }

    pub fn response(&self, status: u16) {
        if let Ok(mut m) = self.responses.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    /// Time one batch spent being verified (`verify`) or recorded durably (`commit`).
    pub fn stage(&self, commit: bool, took: Duration) {
        let h = if commit {
            &self.commit_us
        } else {
            &self.verify_us
        };
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        if let Ok(mut h) = h.lock() {
            h.saturating_record(us.clamp(1, MAX_LATENCY_US));
        }
    }

    pub fn batch(&self, size: usize) {
        if let Ok(mut h) = self.batch_sizes.lock() {
            h.saturating_record(size.max(1) as u64);
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let p = "capsule_gateway";
        out.push_str(&format!(
            "# HELP {p}_admissions_total Admission decisions by verdict and reason.\n# TYPE {p}_admissions_total counter\n"
        ));
        if let Ok(m) = self.admissions.lock() {
            for ((verdict, reason), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "{p}_admissions_total{{verdict=\"{verdict}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        out.push_str(&format!(
            "# HELP {p}_http_responses_total HTTP responses by status code.\n# TYPE {p}_http_responses_total counter\n"
        ));
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
            "# HELP {p}_handshakes_failed_total Handshakes refused, timed out, or given no connection place.\n# TYPE {p}_handshakes_failed_total counter\n{p}_handshakes_failed_total {}\n",
            self.handshakes_failed.load(Ordering::Relaxed)
        );
        if let Ok(h) = self.batch_sizes.lock() {
            summary(
                &mut out,
                &format!("{p}_batch_size"),
                "Capsules per verified batch.",
                &h,
                1.0,
            );
        }
        if let Ok(h) = self.latency_us.lock() {
            summary(
                &mut out,
                &format!("{p}_admission_latency_seconds"),
                "Time from a complete request to its durable decision.",
                &h,
                1e-6,
            );
        }
        if let Ok(h) = self.verify_us.lock() {
            summary(
                &mut out,
                &format!("{p}_batch_verify_seconds"),
                "Time to verify one batch on the verification pool.",
                &h,
                1e-6,
            );
        }
        if let Ok(h) = self.commit_us.lock() {
            summary(
                &mut out,
                &format!("{p}_batch_commit_seconds"),
                "Time to record one batch durably (one redb transaction, fsynced).",
                &h,
                1e-6,
            );
        }
        out
    }
}

fn summary(out: &mut String, name: &str, help: &str, h: &Histogram<u64>, scale: f64) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} summary\n");
    for q in [0.5, 0.9, 0.99, 0.999] {
        let v = h.value_at_quantile(q) as f64 * scale;
        let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
    }
    // hdrhistogram keeps counts, not the exact sum: the sum is from bucket midpoints.
    let sum: f64 = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        * scale;
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {}", h.len());
}
