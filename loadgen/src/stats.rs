//! What the counted requests saw: latency histograms (from the due time), counts by
//! status, transport errors by kind, verdicts, and the percentiles read from them.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::client::{Answer, Failure, SERVED};
use crate::error::LoadgenError;
use crate::schedule::Window;

/// Histogram range in microseconds (1 µs to 1 h, 3 significant digits); larger
/// values are clamped to the top.
pub const HIST_MAX_US: u64 = 3_600_000_000;

/// One request's fate: when it was due, when it was sent and when it ended.
#[derive(Debug)]
pub struct Done {
    pub due: Instant,
    pub sent: Instant,
    pub finished: Instant,
    pub result: Result<Answer, Failure>,
}

impl Done {
    /// A request that failed before it went out.
    pub fn not_sent(due: Instant, kind: &'static str, message: String) -> Done {
        let now = Instant::now();
        Done {
            due,
            sent: now,
            finished: now,
            result: Err(Failure::new(kind, message)),
        }
    }
}

/// What the counted requests saw.
#[derive(Debug)]
pub struct Stats {
    /// Every answer, any status.
    pub(crate) all: Histogram<u64>,
    /// Answers carrying a decision (200, 403).
    pub(crate) served: Histogram<u64>,
    /// How late requests went out after they were due (the generator's own lag).
    pub(crate) lag: Histogram<u64>,
    pub(crate) status: BTreeMap<u16, u64>,
    pub(crate) errors: BTreeMap<&'static str, u64>,
    pub(crate) first_error: Option<String>,
    pub(crate) verdicts: BTreeMap<String, u64>,
    pub(crate) unsent: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Stats {
    pub fn new() -> Result<Stats, LoadgenError> {
        let h = || Histogram::new_with_bounds(1, HIST_MAX_US, 3).map_err(LoadgenError::Histogram);
        Ok(Stats {
            all: h()?,
            served: h()?,
            lag: h()?,
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
            first_error: None,
            verdicts: BTreeMap::new(),
            unsent: 0,
        })
    }

    pub fn record(&mut self, counted: bool, done: Done) {
        if !counted {
            return;
        }
        self.lag
            .saturating_record(micros(done.sent.saturating_duration_since(done.due)));
        match done.result {
            Ok(answer) => {
                // From the due time, or from the send when it went out a little early.
                let from = done.sent.min(done.due);
                let us = micros(done.finished.saturating_duration_since(from)).max(1);
                self.all.saturating_record(us);
                if SERVED.contains(&answer.status) {
                    self.served.saturating_record(us);
                }
                *self.status.entry(answer.status).or_default() += 1;
                if let Some(v) = answer.verdict {
                    *self.verdicts.entry(v).or_default() += 1;
                }
            }
            Err(f) => {
                *self.errors.entry(f.kind).or_default() += 1;
                self.first_error.get_or_insert(f.message);
            }
        }
    }

    pub fn record_joined(&mut self, w: Window, joined: Result<Done, tokio::task::JoinError>) {
        match joined {
            Ok(done) => self.record(done.due >= w.measure_from, done),
            Err(e) => {
                *self.errors.entry("task").or_default() += 1;
                self.first_error.get_or_insert(e.to_string());
            }
        }
    }

    pub fn merge(&mut self, other: &Stats) -> Result<(), LoadgenError> {
        for (mine, theirs) in [
            (&mut self.all, &other.all),
            (&mut self.served, &other.served),
            (&mut self.lag, &other.lag),
        ] {
            mine.add(theirs).map_err(LoadgenError::HistogramMerge)?;
        }
        for (k, v) in &other.status {
            *self.status.entry(*k).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in &other.verdicts {
            *self.verdicts.entry(k.clone()).or_default() += v;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.unsent += other.unsent;
        Ok(())
    }
}

/// Percentiles in milliseconds; `null`s when nothing was recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let nonempty = !h.is_empty();
        let ms = |us: u64| nonempty.then_some(us as f64 / 1000.0);
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "count": self.count,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "p999": self.p999,
            "max": self.max,
        })
    }

    pub fn text(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
            f(self.p50),
            f(self.p90),
            f(self.p99),
            f(self.p999),
            f(self.max),
            self.count
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;

    pub(crate) fn answer(status: u16, verdict: Option<&str>) -> Result<Answer, Failure> {
        Ok(Answer {
            status,
            verdict: verdict.map(String::from),
            body: Bytes::new(),
        })
    }

    pub(crate) fn done(latency_ms: u64, result: Result<Answer, Failure>) -> Done {
        let due = Instant::now();
        Done {
            due,
            sent: due,
            finished: due + Duration::from_millis(latency_ms),
            result,
        }
    }

    #[test]
    fn stats_count_only_the_measured_window_and_split_served() {
        let mut s = Stats::new().unwrap();
        s.record(false, done(5, answer(200, Some("admit")))); // warm-up
        s.record(true, done(2, answer(200, Some("admit"))));
        s.record(true, done(4, answer(403, Some("deny"))));
        s.record(true, done(100, answer(503, None)));
        let refused = Failure::new("connect", "refused".into());
        s.record(true, done(0, Err(refused)));
        let mut other = Stats::new().unwrap();
        other.record(true, done(3, answer(200, Some("admit"))));
        other.unsent = 2;
        s.merge(&other).unwrap();

        assert_eq!(s.status, BTreeMap::from([(200, 2), (403, 1), (503, 1)]));
        assert_eq!(s.errors, BTreeMap::from([("connect", 1)]));
        assert_eq!(s.first_error.as_deref(), Some("refused"));
        assert_eq!(
            s.verdicts,
            BTreeMap::from([("admit".to_string(), 2), ("deny".to_string(), 1)])
        );
        assert_eq!((s.all.len(), s.served.len(), s.unsent), (4, 3, 2));
        // The 503 is in the overall tail, not in the served one.
        assert!(Percentiles::of(&s.all).max.unwrap() >= 100.0);
        assert!(Percentiles::of(&s.served).max.unwrap() < 5.0);
    }

    #[test]
    fn percentiles_are_milliseconds_at_microsecond_resolution() {
        let mut h = Histogram::<u64>::new_with_bounds(1, HIST_MAX_US, 3).unwrap();
        assert_eq!(
            Percentiles::of(&h),
            Percentiles {
                count: 0,
                p50: None,
                p90: None,
                p99: None,
                p999: None,
                max: None
            }
        );
        for us in 1..=10_000 {
            h.record(us).unwrap(); // 1 µs .. 10 ms
        }
        let p = Percentiles::of(&h);
        let near = |got: Option<f64>, want: f64| {
            let got = got.unwrap();
            assert!((got - want).abs() <= want * 0.002, "{got} vs {want}");
        };
        assert_eq!(p.count, 10_000);
        near(p.p50, 5.0);
        near(p.p90, 9.0);
        near(p.p99, 9.9);
        near(p.p999, 9.99);
        near(p.max, 10.0);
    }
}
