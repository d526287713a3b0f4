//! `capsule-gateway loadgen` against the real `serve` binary with its embedded
//! development default: the dev client SVID, the dev capsule packed with the dev key,
//! blobs uploaded by loadgen itself, then admissions over mTLS in closed and open loop
//! (HTTP/1.1 and HTTP/2), and configuration errors that must end with exit code 2.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Gateway;
use serde_json::Value;

const GATEWAY_ID: &str = "spiffe://capsule-gateway.dev/gateway";

fn s(p: &Path) -> &OsStr {
    p.as_os_str()
}

/// `serve` on a free port, and the dev capsule packed as scripts/dev-capsule.sh does.
struct Setup {
    gateway: Gateway,
    client_svid: PathBuf,
    capsule: PathBuf,
    _tmp: tempfile::TempDir,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let gateway = Gateway::serve(&[
        OsStr::new("--state-dir"),
        s(&state),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
    ]);
    let dev = state.join("dev");
    let capsule = common::pack_dev_capsule(&state, tmp.path());
    Setup {
        gateway,
        client_svid: dev.join("client"),
        capsule,
        _tmp: tmp,
    }
}

fn loadgen(url: &str, svid: &Path, capsule: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
        .arg("loadgen")
        .args([OsStr::new("--url"), OsStr::new(url)])
        .args([OsStr::new("--svid"), s(svid)])
        .args([OsStr::new("--capsule"), s(capsule)])
        .args(extra)
        .output()
        .expect("run loadgen")
}

fn report(out: &Output) -> Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "loadgen failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn loadgen_admits_through_serve_in_closed_and_open_loop() {
    let t = setup();
    let url = format!("https://{}", t.gateway.addr);

    // Closed loop over HTTP/1.1, uploading the capsule's files first.
    let out = loadgen(
        &url,
        &t.client_svid,
        &t.capsule,
        &[
            "--server-id",
            GATEWAY_ID,
            "--connections",
            "2",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--json",
        ],
    );
    let r = report(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 blob(s) uploaded: 1 stored"), "{stderr}");
    let admitted = count(&r["status"]["200"]);
    assert!(admitted > 0, "{r}");
    assert_eq!(r["requests"], admitted, "only 200s: {r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(count(&r["verdicts"]["admit"]), admitted, "{r}");
    assert_eq!(r["served_latency_ms"]["count"], admitted, "{r}");
    assert_eq!(
        (r["connections"].as_u64(), r["duration_s"].as_f64()),
        (Some(2), Some(2.0))
    );
    let lat = &r["latency_ms"];
    let (p50, p99, max) = (
        lat["p50"].as_f64().expect("p50"),
        lat["p99"].as_f64().expect("p99"),
        lat["max"].as_f64().expect("max"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{lat}");
    let rps = r["throughput_rps"].as_f64().expect("throughput");
    assert!((rps - admitted as f64 / 2.0).abs() < 1e-6, "{r}");

    // Open loop over HTTP/2 at a rate any build keeps up with; the blobs are there.
    let out = loadgen(
        &url,
        &t.client_svid,
        &t.capsule,
        &[
            "--http2",
            "--no-upload",
            "--rate",
            "40",
            "--connections",
            "2",
            "--duration",
            "1",
            "--warmup",
            "0.25",
            "--json",
        ],
    );
    let r = report(&out);
    // 40 requests are due in the measured second; all are sent and admitted.
    assert_eq!(r["requests"], 40, "{r}");
    assert_eq!(r["status"]["200"], 40, "{r}");
    assert_eq!(
        (r["errors"].as_u64(), r["unsent"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    assert_eq!(r["rate_requested"], 40.0);
    assert_eq!(r["rate_achieved"], 40.0);

    // The text report, for people.
    let out = loadgen(
        &url,
        &t.client_svid,
        &t.capsule,
        &[
            "--no-upload",
            "--connections",
            "1",
            "--duration",
            "0.5",
            "--warmup",
            "0",
        ],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "throughput",
        "status",
        "200: ",
        "verdicts",
        "admit: ",
        "p99.9",
    ] {
        assert!(text.contains(word), "`{word}` in\n{text}");
    }
}

#[test]
fn configuration_errors_exit_2() {
    let t = setup();
    let url = format!("https://{}", t.gateway.addr);
    let quick = ["--no-upload", "--duration", "0.2", "--warmup", "0"];
    let cases: [(&str, String, PathBuf, Vec<&str>, &str); 4] = [
        (
            "a server ID that is not the gateway's",
            url.clone(),
            t.client_svid.clone(),
            vec![
                "--server-id",
                "spiffe://capsule-gateway.dev/not-the-gateway",
            ],
            "TLS handshake",
        ),
        (
            "plain http",
            url.replace("https", "http"),
            t.client_svid.clone(),
            vec![],
            "scheme must be https",
        ),
        (
            "an unreadable SVID directory",
            url.clone(),
            t.capsule.join("missing"),
            vec![],
            "svid.pem",
        ),
        (
            "nobody listening",
            // The gateway's port on another loopback address: refused.
            format!("https://127.0.0.2:{}", t.gateway.addr.port()),
            t.client_svid.clone(),
            vec![],
            "connect",
        ),
    ];
    for (what, url, svid, extra, message) in cases {
        let args: Vec<&str> = quick.iter().copied().chain(extra).collect();
        let out = loadgen(&url, &svid, &t.capsule, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(stderr.contains(message), "{what}: `{message}` in {stderr}");
        assert!(out.stdout.is_empty(), "{what}: no report");
    }
}
