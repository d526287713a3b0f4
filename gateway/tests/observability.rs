//! What an operator sees of a running `serve`: its structured logs (JSON and text,
//! on stderr), the plain-HTTP listener for `/healthz`, `/readyz` and `/metrics`, the
//! Prometheus exposition checked by a real parser (`promtool check metrics`, Debian
//! package `prometheus`), and the development gateway SVID verified by host name.
//!
//! Every test runs the real binary (`Gateway::serve`) with real certificates over
//! loopback; each starts one server and drives it through every check it needs.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use attest_testkit::SvidSpec;
use capsule_tests::{Signer, RUNNER, TENANT};
use common::{
    client_config, digest, metric, runtime, versioned_jws, Client, Fixture, Gateway, GATEWAY_ID,
    NET_TIMEOUT,
};
use http::Method;
use serde_json::Value;

fn s(p: &Path) -> &OsStr {
    p.as_os_str()
}

/// Waits (generously) until the server's stderr satisfies `done`; returns it.
fn wait_log(gw: &Gateway, what: &str, done: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + NET_TIMEOUT;
    loop {
        let log = gw.stderr();
        if done(&log) {
            return log;
        }
        if Instant::now() > end {
            panic!("no {what} in the log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON log lines (every line of `serve --log-format json` after start-up).
fn json_events(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn find(events: &[Value], pred: impl Fn(&Value) -> bool) -> Option<&Value> {
    events.iter().find(|e| pred(e))
}

/// The plain listener's address, from its "health on http://ADDR" line.
fn health_addr(gw: &Gateway) -> SocketAddr {
    let log = gw.stderr();
    let rest = log
        .split_once("health on http://")
        .unwrap_or_else(|| panic!("no health listener announced:\n{log}"))
        .1;
    rest.split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unreadable health address:\n{log}"))
}

/// One plain HTTP/1.1 request (no TLS at all); the status and the body.
fn plain(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).expect("connect to the health listener");
    tcp.set_read_timeout(Some(NET_TIMEOUT)).expect("timeout");
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    (status, body.to_string())
}

/// `promtool check metrics` on `text`: its verdict and what it said.
fn promtool(text: &str) -> (bool, String) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool is missing ({e}): install the Debian package `prometheus` \
             (scripts/install-test-deps.sh)"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The world's files uploaded, `good` admitted (200) and `bad` denied (403), on one
/// mTLS connection as `RUNNER`; the two answers.
fn admit_and_deny(f: &Fixture, addr: SocketAddr, good: &str, bad: &str) -> (Value, Value) {
    let client = f.client_svid_dir(RUNNER);
    runtime().block_on(async {
        let mut c = Client::connect(addr, client_config(&client, GATEWAY_ID, false))
            .await
            .expect("a runner connects");
        c.upload_world_files().await;
        let ok = c.admit(good.to_string()).await.expect("admission");
        assert_eq!(ok.status, 200, "{}", ok.text());
        let no = c.admit(bad.to_string()).await.expect("denial");
        assert_eq!(no.status, 403, "{}", no.text());
        (ok.json(), no.json())
    })
}

/// A handshake the gateway refuses: connecting (or the first request) fails.
fn refused(addr: SocketAddr, config: std::sync::Arc<rustls::ClientConfig>) -> String {
    runtime().block_on(async {
        match Client::connect(addr, config).await {
            Err(e) => e,
            Ok(mut c) => match c.get("/healthz").await {
                Ok(r) => panic!("a refused peer got an answer: {r:?}"),
                Err(e) => e,
            },
        }
    })
}

/// `serve --log-format json`: one JSON object per line on stderr. An admission and a
/// denial each get a line with the capsule's digest, tenant, id, version, the reason
/// and the peer's SPIFFE ID; a handshake without a client certificate and one with a
/// valid SVID the allow-list refuses each get a line with their cause; a 5xx gets a
/// line with its status and why. No line carries the presented capsule bytes.
#[test]
fn json_logs_name_admissions_denials_refused_handshakes_and_5xx() {
    let f = Fixture::new();
    let config = f.write_config("");
    let gw = Gateway::serve(&[
        OsStr::new("--config"),
        s(&config),
        OsStr::new("--log-format"),
        OsStr::new("json"),
    ]);
    let good = versioned_jws(&f.world, "obs-json", 2);
    let low = versioned_jws(&f.world, "obs-json", 1);
    let (ok, no) = admit_and_deny(&f, gw.addr, &good, &low);
    assert_eq!(no["reason"], "rollback", "{no}");

    let stranger =
        f.ca.issue(&SvidSpec::id("spiffe://acme.example/intruder/i1"));
    refused(gw.addr, f.raw_client_config(None));
    refused(gw.addr, f.raw_client_config(Some(&stranger)));
    // Without [runs], /v1/runs answers 503: a 5xx.
    let client = f.client_svid_dir(RUNNER);
    let status = runtime().block_on(async {
        let mut c = Client::connect(gw.addr, client_config(&client, GATEWAY_ID, false))
            .await
            .expect("connect");
        c.request(Method::POST, "/v1/runs", common::full(good.clone()))
            .await
            .expect("runs")
            .status
    });
    assert_eq!(status, 503);

    let log = wait_log(&gw, "admission, denial, both refusals and the 5xx", |l| {
        let e = json_events(l);
        ["admitted", "denied", "server error"]
            .iter()
            .all(|m| find(&e, |x| x["message"] == *m).is_some())
            && e.iter()
                .filter(|x| x["message"] == "handshake refused")
                .count()
                >= 2
    });
    let events = json_events(&log);
    // Every line after start-up is JSON: start-up lines are log events too.
    assert!(
        log.lines()
            .filter(|l| l.contains("serving on"))
            .all(|l| l.starts_with('{')),
        "{log}"
    );

    let admitted = find(&events, |e| e["message"] == "admitted").expect("admitted");
    assert_eq!(admitted["level"], "INFO", "{admitted}");
    assert_eq!(
        admitted["target"], "capsule_gateway::admission",
        "{admitted}"
    );
    assert_eq!(admitted["verdict"], "admit", "{admitted}");
    assert_eq!(admitted["digest"], digest(good.as_bytes()), "{admitted}");
    assert_eq!(admitted["digest"], ok["digest"], "{admitted}");
    assert_eq!(admitted["tenant"], TENANT, "{admitted}");
    assert_eq!(admitted["capsule_id"], "obs-json", "{admitted}");
    assert_eq!(admitted["version"], 2, "{admitted}");
    assert_eq!(admitted["peer"], RUNNER, "{admitted}");
    assert!(admitted.get("reason").is_none(), "{admitted}");

    let denied = find(&events, |e| e["message"] == "denied").expect("denied");
    assert_eq!(denied["verdict"], "deny", "{denied}");
    assert_eq!(denied["reason"], "rollback", "{denied}");
    assert_eq!(denied["digest"], digest(low.as_bytes()), "{denied}");
    assert_eq!(denied["tenant"], TENANT, "{denied}");
    assert_eq!(denied["capsule_id"], "obs-json", "{denied}");
    assert_eq!(denied["version"], 1, "{denied}");
    assert_eq!(denied["peer"], RUNNER, "{denied}");

    let refusals: Vec<&Value> = events
        .iter()
        .filter(|e| e["message"] == "handshake refused")
        .collect();
    let no_cert = refusals
        .iter()
        .find(|e| e["cause"] == "tls")
        .unwrap_or_else(|| panic!("no `tls` refusal: {refusals:?}"));
    assert!(
        no_cert["why"]
            .as_str()
            .is_some_and(|w| w.contains("no certificate")),
        "{no_cert}"
    );
    assert!(no_cert["from"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
    let stranger = refusals
        .iter()
        .find(|e| e["cause"] == "peer_not_allowed")
        .unwrap_or_else(|| panic!("no `peer_not_allowed` refusal: {refusals:?}"));
    assert!(
        stranger["why"]
            .as_str()
            .is_some_and(|w| w.contains("spiffe://acme.example/intruder/i1")),
        "{stranger}"
    );

    let five = find(&events, |e| e["message"] == "server error").expect("5xx");
    assert_eq!(five["level"], "WARN", "{five}");
    assert_eq!(five["status"], 503, "{five}");
    assert_eq!(five["path"], "/v1/runs", "{five}");
    assert_eq!(five["peer"], RUNNER, "{five}");
    assert!(
        five["why"].as_str().is_some_and(|w| w.contains("[runs]")),
        "{five}"
    );

    // The presented bytes appear nowhere: not the JWS, not its signed payload.
    for jws in [&good, &low] {
        let payload = jws.split('.').nth(1).expect("payload");
        assert!(!log.contains(payload), "capsule bytes logged:\n{log}");
    }
}

/// `GET /metrics` of a live server, after admissions, denials and refused handshakes,
/// read from the plain listener (`[health] listen`), passes `promtool check metrics`,
/// and carries histograms (buckets, no quantiles), `reason="none"`, build_info with the
/// commit, the SVID's remaining lifetime, handshake failures by cause and run
/// outcomes. The mTLS listener's `/metrics` is the same exposition.
#[test]
fn live_metrics_pass_promtool_and_carry_histograms_build_info_and_causes() {
    let f = Fixture::new();
    let config = f.write_config("[health]\nlisten = \"127.0.0.1:0\"\n");
    let gw = Gateway::serve(&[OsStr::new("--config"), s(&config)]);
    let health = health_addr(&gw);
    assert!(health.ip().is_loopback());
    let good = versioned_jws(&f.world, "obs-metrics", 1);
    let bad = f.world.sign(b"{\"not\": \"a manifest\"}", Signer::Es256);
    let (_, no) = admit_and_deny(&f, gw.addr, &good, &bad);
    let reason = no["reason"].as_str().expect("a reason").to_string();
    refused(gw.addr, f.raw_client_config(None));

    // The refusal is counted once the server has seen it fail.
    let end = Instant::now() + NET_TIMEOUT;
    let text = loop {
        let (status, text) = plain(health, "GET", "/metrics");
        assert_eq!(status, 200, "{text}");
        if metric(
            &text,
            "capsule_gateway_handshake_failures_total{cause=\"tls\"}",
        ) >= Some(1.0)
        {
            break text;
        }
        assert!(Instant::now() < end, "the refusal was not counted:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };

    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics: {said}\n{text}");
    // The parser is real: it refuses what is not the format.
    let (broken_ok, _) = promtool("capsule_gateway_x{le=\"1\" 1\n");
    assert!(!broken_ok, "promtool accepted a broken exposition");

    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git (Debian package `git`)");
    let commit = String::from_utf8_lossy(&commit.stdout).trim().to_string();
    let build = format!(
        "capsule_gateway_build_info{{version=\"{}\",commit=\"{commit}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric(&text, &build), Some(1.0), "{build}\n{text}");
    assert_eq!(
        metric(
            &text,
            "capsule_gateway_admissions_total{verdict=\"admit\",reason=\"none\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!("capsule_gateway_admissions_total{{verdict=\"deny\",reason=\"{reason}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("reason=\"\""), "{text}");
    assert!(!text.contains("quantile"), "{text}");
    assert!(!text.contains("summary"), "{text}");
    assert!(!text.contains("NaN") && !text.contains(" -0\n"), "{text}");
    // The fixture's SVID lives an hour or more: well in the future, not expired.
    let left = metric(&text, "capsule_gateway_svid_expiry_seconds").expect("svid expiry");
    assert!(left > 60.0, "{left}");
    for cause in ["evicted", "timeout", "peer_not_allowed"] {
        assert_eq!(
            metric(
                &text,
                &format!("capsule_gateway_handshake_failures_total{{cause=\"{cause}\"}}")
            ),
            Some(0.0),
            "{cause}: {text}"
        );
    }
    for outcome in ["completed", "failed", "denied"] {
        assert_eq!(
            metric(
                &text,
                &format!("capsule_gateway_runs_total{{outcome=\"{outcome}\"}}")
            ),
            Some(0.0),
            "{outcome}: {text}"
        );
    }
    // Histograms: two admissions decided, so two latencies; cumulative buckets.
    let h = "capsule_gateway_admission_latency_seconds";
    assert!(text.contains(&format!("# TYPE {h} histogram\n")), "{text}");
    assert_eq!(metric(&text, &format!("{h}_count")), Some(2.0), "{text}");
    assert_eq!(
        metric(&text, &format!("{h}_bucket{{le=\"+Inf\"}}")),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("{h}_bucket{{le=\"60\"}}")),
        Some(2.0)
    );
    assert!(metric(&text, &format!("{h}_sum")).is_some_and(|s| s > 0.0));
    for h in [
        "capsule_gateway_batch_size",
        "capsule_gateway_batch_verify_seconds",
        "capsule_gateway_batch_commit_seconds",
        "capsule_gateway_run_duration_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {h} histogram\n")),
            "{h}: {text}"
        );
        assert!(metric(&text, &format!("{h}_bucket{{le=\"+Inf\"}}")).is_some());
    }

    // The mTLS route answers the same exposition (the same series).
    let client = f.client_svid_dir(RUNNER);
    let mtls = runtime().block_on(async {
        let mut c = Client::connect(gw.addr, client_config(&client, GATEWAY_ID, false))
            .await
            .expect("connect");
        c.metrics().await
    });
    let names = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split('{').next()?.split(' ').next().map(str::to_string))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    assert_eq!(names(&mtls), names(&text));
}

fn curl(args: &[&OsStr]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl (Debian package `curl`)")
}

/// The development trust domain with `--health-listen` and the default text logs:
/// - the plain listener answers `/healthz`, `/readyz` and `/metrics` over plain HTTP on
///   loopback, and nothing else;
/// - the mTLS listener still needs a client certificate for the same paths;
/// - the dev gateway SVID names `localhost` and 127.0.0.1, so `curl --cacert` with the
///   dev CA verifies it without `-k`;
/// - the text log has a denial line with its reason and peer, and a refused-handshake
///   line with its cause.
#[test]
fn dev_server_plain_probes_localhost_svid_and_text_logs() {
    let root = tempfile::tempdir().expect("tempdir");
    let state = root.path().join("state");
    let gw = Gateway::serve(&[
        OsStr::new("--state-dir"),
        s(&state),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--health-listen"),
        OsStr::new("127.0.0.1:0"),
    ]);
    let health = health_addr(&gw);
    assert_eq!(plain(health, "GET", "/healthz"), (200, "ok\n".into()));
    assert_eq!(plain(health, "GET", "/readyz"), (200, "ready\n".into()));
    let (status, text) = plain(health, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(text.contains("capsule_gateway_build_info{"), "{text}");
    // Only the probes: admissions, runs and blobs are not served without TLS.
    for (method, path) in [
        ("POST", "/v1/admissions"),
        ("POST", "/v1/runs"),
        ("GET", "/v1/runs/x"),
        ("PUT", "/v1/blobs/sha256:00"),
    ] {
        assert_eq!(plain(health, method, path).0, 404, "{method} {path}");
    }
    assert_eq!(plain(health, "POST", "/healthz").0, 405);

    let dev = state.join("dev");
    let (ca, cert, key) = (
        dev.join("ca/ca.pem"),
        dev.join("client/svid.pem"),
        dev.join("client/svid_key.pem"),
    );
    let port = gw.addr.port();
    for (url, body) in [
        (format!("https://localhost:{port}/healthz"), "ok\n"),
        (format!("https://127.0.0.1:{port}/readyz"), "ready\n"),
    ] {
        let out = curl(&[
            OsStr::new("--cacert"),
            s(&ca),
            OsStr::new("--cert"),
            s(&cert),
            OsStr::new("--key"),
            s(&key),
            OsStr::new(&url),
        ]);
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), body, "{url}");
    }
    // A denial, through curl: bytes that are no JWS.
    let out = curl(&[
        OsStr::new("--cacert"),
        s(&ca),
        OsStr::new("--cert"),
        s(&cert),
        OsStr::new("--key"),
        s(&key),
        OsStr::new("--data-binary"),
        OsStr::new("not-a-capsule"),
        OsStr::new(&format!("https://localhost:{port}/v1/admissions")),
    ]);
    let denial: Value = serde_json::from_slice(&out.stdout).expect("a JSON decision");
    assert_eq!(denial["reason"], "malformed_jws", "{denial}");
    // Without a client certificate: the server is verified (no certificate problem),
    // and then refuses the handshake, for the probes as for everything else.
    let out = curl(&[
        OsStr::new("--cacert"),
        s(&ca),
        OsStr::new(&format!("https://localhost:{port}/metrics")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served without a client certificate");
    assert!(out.stdout.is_empty());
    // curl exit 60 would be a failed verification of the gateway's certificate;
    // the refusal itself reads as an alert or a closed connection, by timing.
    assert_ne!(out.status.code(), Some(60), "{err}");
    assert!(!err.contains("certificate problem"), "{err}");

    let log = wait_log(&gw, "a denial and a refused handshake", |l| {
        l.contains(" denied ") && l.contains("handshake refused")
    });
    let line = |needle: &str| -> &str {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` line:\n{log}"))
    };
    let denied = line(" denied ");
    assert!(!denied.starts_with('{'), "not text: {denied}");
    assert!(denied.contains(" INFO "), "{denied}");
    assert!(denied.contains("reason=\"malformed_jws\""), "{denied}");
    assert!(
        denied.contains("peer=spiffe://capsule-gateway.dev/runner/dev"),
        "{denied}"
    );
    assert!(!denied.contains("not-a-capsule"), "{denied}");
    let refusal = line("handshake refused");
    assert!(refusal.contains("cause=\"tls\""), "{refusal}");
    assert!(refusal.contains("from=127.0.0.1:"), "{refusal}");
    assert!(refusal.contains("no certificates"), "{refusal}");
    assert!(line("serving on https://").contains(" INFO "), "{log}");
}
