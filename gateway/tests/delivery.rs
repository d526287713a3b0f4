//! Delivery to an HTTP CloudEvents sink against a real local sink (a small HTTP
//! server on 127.0.0.1 in this test) that first fails — 503, then a stall past the
//! client's timeout — and then recovers. Real runs (gVisor, Debian package
//! `runsc`). Delivery is at-least-once with the same CloudEvents `id`: every event
//! is accepted exactly once by the sink, every attempt carries the same bytes, none
//! is lost, and a sink that is down costs a run at most its `--sink-timeout-ms`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use capsule_tests::{Signer, World, RUNNER};
use serde_json::Value;

mod common;

use common::sink::{TestSink, DOWN, STALL, UP};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

/// A capsule of its own id (anti-rollback and lineage are per id).
fn script_capsule(w: &World, name: &str, script: &str) -> PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let mut m = w.script_manifest(&files);
    m["capsule_id"] = serde_json::json!(format!("delivery-{name}"));
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

/// `run --sink`; its exit code, the event id and how long it took.
fn run_with_sink(w: &World, state: &Path, capsule: &Path, sink: &str) -> (i32, String, Duration) {
    let policy = w.policy_toml().replacen(
        "min_approvals = 1\n",
        "min_approvals = 1\nevidence = { egress = \"metadata-only\" }\n",
        1,
    );
    let policy = w.write_mode("metadata.toml", policy.as_bytes(), 0o644);
    let started = Instant::now();
    let out = bin()
        .args(["run", "--policy", s(&policy), "--runner", RUNNER])
        .args([
            "--state",
            s(state),
            "--sink",
            sink,
            "--sink-timeout-ms",
            "700",
        ])
        .arg(capsule)
        .output()
        .expect("run");
    let took = started.elapsed();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let event: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        panic!(
            "event: {e}: {line} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code().expect("code"),
        event["id"].as_str().expect("id").to_string(),
        took,
    )
}

fn deliver(state: &Path, sink: &str, attempts: &str, budget_ms: &str) -> (Output, Value) {
    let out = bin()
        .args(["events", "deliver", "--state", s(state), "--sink", sink])
        .args([
            "--timeout-ms",
            "400",
            "--attempts",
            attempts,
            "--budget-ms",
            budget_ms,
        ])
        .output()
        .expect("events deliver");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("report: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out, report)
}

fn spooled(state: &Path) -> usize {
    std::fs::read_dir(state.join("spool/events"))
        .expect("spool")
        .count()
}

#[test]
fn a_sink_that_fails_then_recovers_gets_every_event_once_and_blocks_no_run() {
    let w = World::new();
    let state = w.path("state");
    let sink = TestSink::start();

    // Down (503): the run ends as it would without a sink; its event stays queued.
    sink.set(DOWN);
    let c1 = script_capsule(&w, "c1", "echo one");
    let (code, id1, fast) = run_with_sink(&w, &state, &c1, &sink.url);
    assert_eq!(code, 0);
    assert_eq!(spooled(&state), 1, "queued durably before the attempt");

    // Stalled past the timeout: the run waits at most its bound for the sink.
    sink.set(STALL);
    let c2 = script_capsule(&w, "c2", "echo two");
    let (code, id2, slow) = run_with_sink(&w, &state, &c2, &sink.url);
    assert_eq!(code, 0);
    assert_eq!(spooled(&state), 2, "nothing lost, nothing delivered");
    assert!(
        slow < fast + Duration::from_millis(700 + 1500),
        "a stalled sink costs a run one bounded attempt: {slow:?} vs {fast:?}"
    );

    // Still stalled: `events deliver` retries with backoff and gives up, exit 4.
    let (out, report) = deliver(&state, &sink.url, "2", "3000");
    assert_eq!(out.status.code(), Some(4), "{report}");
    assert_eq!(report["pending"], 2);
    assert_eq!(report["last_error"], "timed out");
    assert_eq!(spooled(&state), 2);

    // Recovered: everything queued arrives, oldest first; the spool is empty.
    sink.set(UP);
    let (out, report) = deliver(&state, &sink.url, "5", "20000");
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!(report["delivered"], 2);
    assert_eq!(spooled(&state), 0);

    let seen = sink.seen();
    let accepted: Vec<String> = seen
        .iter()
        .filter(|x| x.answered == Some(200))
        .map(|x| {
            let e: Value = serde_json::from_slice(&x.body).expect("json");
            e["id"].as_str().expect("id").to_string()
        })
        .collect();
    assert_eq!(
        accepted,
        vec![id1.clone(), id2.clone()],
        "each accepted once, in order"
    );
    assert!(seen.len() > 2, "retried: {}", seen.len());
    for id in [&id1, &id2] {
        // Every attempt at one event carried the same bytes (the same `id`).
        let bodies: Vec<&Vec<u8>> = seen
            .iter()
            .map(|x| &x.body)
            .filter(|b| {
                serde_json::from_slice::<Value>(b).expect("json")["id"].as_str() == Some(id)
            })
            .collect();
        assert!(bodies.windows(2).all(|p| p[0] == p[1]), "{id}");
    }
    for x in &seen {
        assert_eq!(x.content_type, "application/cloudevents+json");
        // Structured mode: an SDK reads the body as a CloudEvent; metadata-only data.
        let e: cloudevents::Event = serde_json::from_slice(&x.body).expect("a CloudEvent");
        let body = String::from_utf8_lossy(&x.body);
        assert!(
            !body.contains("manifest_jws") && !body.contains("\"stdout\""),
            "{body}"
        );
        let _ = e;
    }
}
