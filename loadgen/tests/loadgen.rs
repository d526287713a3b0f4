//! `capsule-loadgen` against the real service with its embedded development default
//! (the trust domain, config and policy `capsule-gateway serve` makes without
//! `--config`, started in this process through the gateway's library exactly as the
//! `serve` command starts it): the dev client SVID, the dev capsule signed with the dev
//! key, blobs uploaded by the load generator itself, then admissions over mTLS in
//! closed and open loop (HTTP/1.1 and HTTP/2), and configuration errors that must end
//! with exit code 2. The load generator runs as its own binary, a child process.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use capsule_gateway::serve::{devtrust, Server};
use serde_json::Value;
use verify_core::crypto::default_backend;
use verify_core::keys::{parse_jwk, SigningKey};

const GATEWAY_ID: &str = devtrust::GATEWAY_ID;

fn s(p: &Path) -> &OsStr {
    p.as_os_str()
}

/// The service on a free loopback port, and the dev capsule signed as
/// scripts/dev-capsule.sh packs it.
struct Setup {
    _server: Server,
    addr: SocketAddr,
    client_svid: PathBuf,
    capsule: PathBuf,
    _tmp: tempfile::TempDir,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let trust = devtrust::ensure(&state, "127.0.0.1:0").expect("development trust domain");
    let config =
        devtrust::config(&trust, "127.0.0.1:0".parse().expect("address")).expect("dev config");
    let server = Server::start(&config).expect("start the service");
    let capsule = dev_capsule(&trust.signing_key, tmp.path());
    Setup {
        addr: server.local_addr(),
        _server: server,
        client_svid: trust.client_svid,
        capsule,
        _tmp: tmp,
    }
}

/// `examples/dev-capsule` (version 1, valid for an hour) signed with the development
/// key: its one artifact's size and digest filled in, as `pack` fills them.
fn dev_capsule(key: &Path, work: &Path) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/dev-capsule");
    let now = capsule_tests::now();
    let text = std::fs::read_to_string(example.join("manifest.template.json"))
        .expect("template")
        .replace("@VERSION@", "1")
        .replace("@NOW@", &(now - 60).to_string())
        .replace("@EXPIRES@", &(now + 3600).to_string());
    let mut manifest: Value = serde_json::from_str(&text).expect("manifest JSON");
    let run_sh = std::fs::read(example.join("files/run.sh")).expect("run.sh");
    manifest["artifacts"][0]["size"] = run_sh.len().into();
    manifest["artifacts"][0]["sha256"] = capsule_tests::sha256_hex(&run_sh).into();
    let jwk = parse_jwk(&std::fs::read(key).expect("dev key")).expect("dev JWK");
    let signer = SigningKey::from_jwk(&jwk, default_backend()).expect("signing key");
    let payload = serde_json::to_vec(&manifest).expect("payload");
    let jws = verify_core::jws::sign_compact(&jwk.kid, jwk.alg, &payload, &signer).expect("sign");
    let capsule = work.join("capsule");
    std::fs::create_dir_all(capsule.join("files")).expect("mkdir");
    std::fs::write(capsule.join("files/run.sh"), &run_sh).expect("write run.sh");
    std::fs::write(capsule.join("capsule.jws"), jws).expect("write capsule.jws");
    capsule
}

fn loadgen(url: &str, svid: &Path, capsule: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsule-loadgen"))
        .args([OsStr::new("--url"), OsStr::new(url)])
        .args([OsStr::new("--svid"), s(svid)])
        .args([OsStr::new("--capsule"), s(capsule)])
        .args(extra)
        .output()
        .expect("run capsule-loadgen")
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
    let url = format!("https://{}", t.addr);

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
    let url = format!("https://{}", t.addr);
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
            format!("https://127.0.0.2:{}", t.addr.port()),
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
