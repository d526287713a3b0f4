//! The figures of a run, as text for people or one JSON object for scripts.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::client::SERVED;
use crate::plan::Shape;
use crate::stats::{Percentiles, Stats};

/// The figures of a run. Rates are over the measured window (`--duration`).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    shape: Shape,
    /// Counted requests: answered or failed at transport level.
    requests: u64,
    /// Answers (any status) per second.
    throughput_rps: f64,
    /// Decisions (200, 403) per second.
    served_rps: f64,
    status: BTreeMap<u16, u64>,
    errors: u64,
    errors_by_kind: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    verdicts: BTreeMap<String, u64>,
    unsent: u64,
    latency: Percentiles,
    served_latency: Percentiles,
    send_lag: Percentiles,
    /// Counted requests sent per second.
    rate_achieved: f64,
}

impl Report {
    pub fn new(shape: &Shape, s: &Stats) -> Report {
        let answers: u64 = s.status.values().sum();
        let served: u64 = SERVED.iter().filter_map(|c| s.status.get(c)).sum();
        let errors: u64 = s.errors.values().sum();
        let secs = shape.duration.as_secs_f64();
        Report {
            shape: shape.clone(),
            requests: answers + errors,
            throughput_rps: answers as f64 / secs,
            served_rps: served as f64 / secs,
            status: s.status.clone(),
            errors,
            errors_by_kind: s.errors.clone(),
            first_error: s.first_error.clone(),
            verdicts: s.verdicts.clone(),
            unsent: s.unsent,
            latency: Percentiles::of(&s.all),
            served_latency: Percentiles::of(&s.served),
            send_lag: Percentiles::of(&s.lag),
            rate_achieved: (answers + errors) as f64 / secs,
        }
    }

    pub fn json(&self) -> Value {
        let status: serde_json::Map<String, Value> = self
            .status
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        json!({
            "requests": self.requests,
            "duration_s": self.shape.duration.as_secs_f64(),
            "throughput_rps": self.throughput_rps,
            "served_rps": self.served_rps,
            "status": status,
            "errors": self.errors,
            "errors_by_kind": self.errors_by_kind,
            "first_error": self.first_error,
            "verdicts": self.verdicts,
            "unsent": self.unsent,
            "latency_ms": self.latency.json(),
            "served_latency_ms": self.served_latency.json(),
            "send_lag_ms": self.send_lag.json(),
            "rate_requested": self.shape.rate,
            "rate_achieved": self.rate_achieved,
            "connections": self.shape.connections,
            "http2": self.shape.http2,
            "warmup_s": self.shape.warmup.as_secs_f64(),
        })
    }

    pub fn text(&self) -> String {
        let list = |m: Vec<(String, u64)>| {
            if m.is_empty() {
                "-".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let shape = &self.shape;
        let mode = if shape.rate > 0.0 {
            format!("open loop at {} req/s", shape.rate)
        } else {
            "closed loop".to_string()
        };
        let mut out = format!(
            "{}: {} connections ({}), {mode}, {} s measured after {} s warm-up\n",
            shape.url,
            shape.connections,
            if shape.http2 { "HTTP/2" } else { "HTTP/1.1" },
            shape.duration.as_secs_f64(),
            shape.warmup.as_secs_f64(),
        );
        let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<14}{v}\n"));
        line(
            "requests",
            format!("{} ({} unsent)", self.requests, self.unsent),
        );
        line(
            "throughput",
            format!(
                "{:.1} answers/s, {:.1} decisions/s",
                self.throughput_rps, self.served_rps
            ),
        );
        if shape.rate > 0.0 {
            line(
                "rate",
                format!(
                    "{:.1} req/s of {} requested",
                    self.rate_achieved, shape.rate
                ),
            );
        }
        line(
            "status",
            list(
                self.status
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
            ),
        );
        line(
            "errors",
            list(
                self.errors_by_kind
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
            ),
        );
        if let Some(e) = &self.first_error {
            line("first error", e.clone());
        }
        line(
            "verdicts",
            list(self.verdicts.iter().map(|(k, v)| (k.clone(), *v)).collect()),
        );
        line("latency ms", self.latency.text());
        line("served ms", self.served_latency.text());
        if shape.rate > 0.0 {
            line("send lag ms", self.send_lag.text());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stats::tests::{answer, done};

    fn shape(rate: f64) -> Shape {
        Shape {
            url: "https://127.0.0.1:8443".into(),
            connections: 4,
            rate,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(2),
            http2: false,
        }
    }

    #[test]
    fn the_json_report_has_the_documented_shape() {
        let mut s = Stats::new().unwrap();
        for ms in 1..=10 {
            s.record(true, done(ms, answer(200, Some("admit"))));
        }
        s.record(true, done(1, answer(503, None)));
        let r = Report::new(&shape(10.0), &s);
        let v = r.json();
        for key in [
            "requests",
            "duration_s",
            "throughput_rps",
            "status",
            "errors",
            "latency_ms",
            "served_latency_ms",
            "rate_requested",
            "rate_achieved",
            "connections",
            "verdicts",
            "unsent",
        ] {
            assert!(v.get(key).is_some(), "missing `{key}` in {v}");
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(v["latency_ms"][key].is_f64(), "latency_ms.{key}");
            assert!(v["served_latency_ms"][key].is_f64(), "served.{key}");
        }
        assert_eq!(v["requests"], 11);
        assert_eq!(v["duration_s"], 2.0);
        assert_eq!(v["throughput_rps"], 5.5);
        assert_eq!(v["status"]["200"], 10);
        assert_eq!(v["status"]["503"], 1);
        assert_eq!(v["errors"], 0);
        assert_eq!(v["verdicts"]["admit"], 10);
        assert_eq!(v["rate_requested"], 10.0);
        assert_eq!(v["connections"], 4);
        // Nothing served: nulls, not made-up zeros.
        let empty = Report::new(&shape(0.0), &Stats::new().unwrap()).json();
        assert!(empty["served_latency_ms"]["p99"].is_null());
        assert_eq!(empty["served_latency_ms"]["count"], 0);
        // The text report names every figure.
        let text = r.text();
        for word in [
            "throughput",
            "status",
            "200: 10",
            "p99.9",
            "open loop at 10",
        ] {
            assert!(text.contains(word), "`{word}` in\n{text}");
        }
    }
}
