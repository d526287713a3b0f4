//! `capsule-gateway attest ...` and the identity/sealed-key options of `verify`/`admit`,
//! through the real binary against a real swtpm that each test starts on free ports.
//! PCRs are extended with tpm2-tools' `tpm2_pcrextend`, an implementation independent of
//! ours. SVIDs are made with rcgen (no SPIRE is installable here; the Workload API path
//! is covered in attest's own tests with an in-test server).

// Helpers panic when a test fails, like the #[test] fns clippy.toml already covers.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use attest_testkit::{require_tool, SvidSpec, Swtpm, TestCa};
use capsule_tests::{Signer, World, ES_KID, HS_KID, RUNNER};
use serde_json::Value;

fn gw(tpm: Option<&Swtpm>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"));
    c.args(args);
    match tpm {
        Some(t) => c.env("TCTI", t.tcti()),
        None => c.env_remove("TCTI"),
    };
    c.output().expect("run capsule-gateway")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Extends a SHA-256 PCR with tpm2-tools (Debian package `tpm2-tools`).
fn tpm2_pcrextend(t: &Swtpm, pcr: u8) {
    let tool = require_tool("tpm2_pcrextend", "tpm2-tools").unwrap();
    let out = Command::new(tool)
        .arg("-T")
        .arg(t.tcti())
        .arg(format!("{pcr}:sha256={}", "ab".repeat(32)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A policy whose HS256 key is sealed to the TPM instead of being in the JWKS.
fn sealed_policy(w: &World) -> std::path::PathBuf {
    let jwks = serde_json::json!({ "keys": [w.es.to_json(false)] });
    w.write("sealed.jwks.json", jwks.to_string().as_bytes());
    let policy = w.policy_toml().replace(
        "jwks = \"trusted.jwks.json\"",
        "jwks = \"sealed.jwks.json\"\nsealed = [\"hs.sealed.json\"]",
    );
    assert!(policy.contains("sealed = ["));
    w.write("sealed-policy.toml", policy.as_bytes())
}

#[test]
fn identity_is_created_once_and_reused_by_later_processes() {
    let t = Swtpm::start().expect("swtpm");
    let first: Value = serde_json::from_str(&ok(&gw(Some(&t), &["attest", "identity"]))).unwrap();
    assert_eq!(first["created"], true);
    assert_eq!(first["handle"], "0x81000ca5");
    assert_eq!(first["tpm"]["software"], true);
    assert_eq!(first["jwk"]["crv"], "P-256");
    assert!(first["pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    let second: Value = serde_json::from_str(&ok(&gw(Some(&t), &["attest", "identity"]))).unwrap();
    assert_eq!(second["created"], false);
    assert_eq!(second["jwk"], first["jwk"]);
    // The software TPM is reported in the logs too.
    let out = gw(Some(&t), &["attest", "identity"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("software TPM"));
}

#[test]
fn an_unreachable_tpm_is_a_configuration_error_naming_the_tcti() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let err = fails(&gw(None, &["attest", "identity", "--tcti", &tcti]), 2);
    assert!(
        err.contains(&tcti) && err.contains("no TPM reachable"),
        "{err}"
    );
}

#[test]
fn sealed_hs256_key_admits_until_a_bound_pcr_changes_then_startup_is_refused() {
    let t = Swtpm::start().expect("swtpm");
    let w = World::new();
    let sealed = w.path("hs.sealed.json");
    let hs_jwk = w.path("hs.private.jwk.json");
    let out = ok(&gw(
        Some(&t),
        &[
            "attest",
            "seal",
            "--kid",
            HS_KID,
            "--pcrs",
            "sha256:0,7,16",
            "--in",
            s(&hs_jwk),
            "--out",
            s(&sealed),
        ],
    ));
    assert!(out.contains("sealed `k-hs-2025` to sha256:0,7,16"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sealed).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The sealed file holds no usable secret.
    let text = std::fs::read_to_string(&sealed).unwrap();
    let k = w.hs.to_json(true)["k"].as_str().unwrap().to_string();
    assert!(!text.contains(&k));

    let policy = sealed_policy(&w);
    let hs_capsule = w.good_capsule("hs-capsule", Signer::Hs256);
    let es_capsule = w.good_capsule("es-capsule", Signer::Es256);
    let verify = |tpm: &Swtpm| {
        gw(
            Some(tpm),
            &[
                "verify",
                "--policy",
                s(&policy),
                "--runner",
                RUNNER,
                "--json",
                s(&hs_capsule),
                s(&es_capsule),
            ],
        )
    };
    // Unsealed at start-up: the HS256 capsule is admitted beside the ES256 one.
    let stdout = ok(&verify(&t));
    assert_eq!(
        stdout.matches("\"verdict\":\"admit\"").count(),
        2,
        "{stdout}"
    );
    assert!(ok(&gw(
        Some(&t),
        &["attest", "unseal-check", "--policy", s(&policy)]
    ))
    .contains("ok: `k-hs-2025`"));

    // Without a TPM configured, the policy cannot be loaded: exit 2, the field named.
    let err = fails(
        &gw(
            None,
            &[
                "verify",
                "--policy",
                s(&policy),
                "--tcti",
                "swtpm:host=127.0.0.1,port=1",
                s(&es_capsule),
            ],
        ),
        2,
    );
    assert!(
        err.contains("trust.sealed[0]") && err.contains("port=1"),
        "{err}"
    );

    // A bound PCR changes: the gateway refuses to start and says which PCR.
    tpm2_pcrextend(&t, 16);
    let err = fails(&verify(&t), 2);
    assert!(err.contains("trust.sealed[0]"), "{err}");
    assert!(err.contains("PCR sha256:16 no longer match"), "{err}");
    assert!(err.contains("hs.sealed.json"), "{err}");
    let err = fails(
        &gw(
            Some(&t),
            &["attest", "unseal-check", "--sealed", s(&sealed)],
        ),
        1,
    );
    assert!(err.contains("sha256:16"), "{err}");
}

#[test]
fn seal_refuses_a_kid_mismatch_and_es256_keys() {
    let t = Swtpm::start().expect("swtpm");
    let w = World::new();
    let hs_jwk = w.path("hs.private.jwk.json");
    let err = fails(
        &gw(
            Some(&t),
            &[
                "attest",
                "seal",
                "--kid",
                "other",
                "--pcrs",
                "sha256:0",
                "--in",
                s(&hs_jwk),
                "--out",
                s(&w.path("x.json")),
            ],
        ),
        2,
    );
    assert!(err.contains("not --kid `other`"), "{err}");
    let es_jwk = w.path("es.private.jwk.json");
    let err = fails(
        &gw(
            Some(&t),
            &[
                "attest",
                "seal",
                "--kid",
                ES_KID,
                "--pcrs",
                "sha256:0",
                "--in",
                s(&es_jwk),
                "--out",
                s(&w.path("y.json")),
            ],
        ),
        2,
    );
    assert!(err.contains("only HS256"), "{err}");
    let err = fails(
        &gw(
            Some(&t),
            &[
                "attest",
                "seal",
                "--kid",
                HS_KID,
                "--pcrs",
                "sha1:0",
                "--in",
                s(&hs_jwk),
                "--out",
                s(&w.path("z.json")),
            ],
        ),
        2,
    );
    assert!(err.contains("sha256"), "{err}");
}

#[test]
fn quote_and_verify_quote() {
    let t = Swtpm::start().expect("swtpm");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    ok(&gw(
        Some(&t),
        &["attest", "identity", "--out", s(&p("identity.json"))],
    ));
    ok(&gw(
        Some(&t),
        &[
            "attest",
            "pcr-read",
            "--pcrs",
            "sha256:0,7,16",
            "--out",
            s(&p("ref.json")),
        ],
    ));
    let nonce = "0123456789abcdef".repeat(4);
    ok(&gw(
        Some(&t),
        &[
            "attest",
            "quote",
            "--nonce",
            &nonce,
            "--pcrs",
            "sha256:0,7,16",
            "--out",
            s(&p("quote.json")),
        ],
    ));
    let verify = |nonce: &str| {
        gw(
            None,
            &[
                "attest",
                "verify-quote",
                "--quote",
                s(&p("quote.json")),
                "--nonce",
                nonce,
                "--key",
                s(&p("identity.json")),
                "--reference",
                s(&p("ref.json")),
            ],
        )
    };
    assert!(ok(&verify(&nonce)).contains("quote OK"));
    let err = fails(&verify(&"00".repeat(32)), 1);
    assert!(err.contains("nonce"), "{err}");
    // The platform moves on: the old reference no longer matches a new quote.
    tpm2_pcrextend(&t, 16);
    std::fs::remove_file(p("quote.json")).unwrap();
    ok(&gw(
        Some(&t),
        &[
            "attest",
            "quote",
            "--nonce",
            &nonce,
            "--pcrs",
            "sha256:0,7,16",
            "--out",
            s(&p("quote.json")),
        ],
    ));
    let err = fails(&verify(&nonce), 1);
    assert!(
        err.contains("PCR sha256:16 differ from the reference"),
        "{err}"
    );
    // quote before any identity exists on a fresh TPM: told how to make one.
    let fresh = Swtpm::start().expect("swtpm");
    let err = fails(
        &gw(Some(&fresh), &["attest", "quote", "--nonce", &nonce]),
        2,
    );
    assert!(err.contains("attest identity"), "{err}");
}

#[test]
fn bind_and_verify_binding_with_each_mismatch() {
    let t = Swtpm::start().expect("swtpm");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let ca = TestCa::new("acme.example");
    ca.write_svid_dir(&p("svid"), &ca.issue(&SvidSpec::id(RUNNER)));
    ca.write_svid_dir(&p("other-svid"), &ca.issue(&SvidSpec::id(RUNNER)));
    ok(&gw(
        Some(&t),
        &["attest", "identity", "--out", s(&p("identity.json"))],
    ));
    ok(&gw(
        Some(&t),
        &[
            "attest",
            "pcr-read",
            "--pcrs",
            "sha256:0,16",
            "--out",
            s(&p("ref.json")),
        ],
    ));
    let out = ok(&gw(
        Some(&t),
        &[
            "attest",
            "bind",
            "--svid",
            s(&p("svid")),
            "--pcrs",
            "sha256:0,16",
            "--out",
            s(&p("binding.json")),
        ],
    ));
    assert!(out.contains(RUNNER), "{out}");

    let binding = p("binding.json");
    let verify = |extra: &[&str]| {
        let mut args = vec!["attest", "verify-binding", "--binding", s(&binding)];
        args.extend_from_slice(extra);
        gw(None, &args)
    };
    let (svid_dir, identity, reference) = (p("svid"), p("identity.json"), p("ref.json"));
    let all = [
        "--svid",
        s(&svid_dir),
        "--tpm-key",
        s(&identity),
        "--pcrs-reference",
        s(&reference),
    ];
    let mut allowed = all.to_vec();
    allowed.push("--allow-software-tpm");
    assert!(ok(&verify(&allowed)).contains("binding OK"));
    // Software TPM refused unless allowed.
    assert!(fails(&verify(&all), 1).contains("software TPM"));
    // Another SVID.
    let err = fails(
        &verify(&["--svid", s(&p("other-svid")), "--allow-software-tpm"]),
        1,
    );
    assert!(err.contains("another SVID"), "{err}");
    // Another TPM key.
    let t2 = Swtpm::start().expect("swtpm");
    ok(&gw(
        Some(&t2),
        &["attest", "identity", "--out", s(&p("identity2.json"))],
    ));
    let err = fails(
        &verify(&["--tpm-key", s(&p("identity2.json")), "--allow-software-tpm"]),
        1,
    );
    assert!(err.contains("another TPM key"), "{err}");
    // Other PCRs.
    tpm2_pcrextend(&t, 16);
    ok(&gw(
        Some(&t),
        &[
            "attest",
            "pcr-read",
            "--pcrs",
            "sha256:0,16",
            "--out",
            s(&p("ref2.json")),
        ],
    ));
    let err = fails(
        &verify(&[
            "--pcrs-reference",
            s(&p("ref2.json")),
            "--allow-software-tpm",
        ]),
        1,
    );
    assert!(err.contains("sha256:16"), "{err}");
}

#[test]
fn runner_defaults_to_the_configured_svid() {
    let w = World::new();
    let ca = TestCa::new("acme.example");
    let svid = w.path("svid");
    ca.write_svid_dir(&svid, &ca.issue(&SvidSpec::id(RUNNER)));
    let capsule = w.good_capsule("c", Signer::Es256);
    let policy = w.policy_path();
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--policy", s(&policy), "--json"];
        args.extend_from_slice(extra);
        args.push(s(&capsule));
        gw(None, &args)
    };
    // No runner at all: the manifest names runners, so it is denied.
    let out = gw(
        None,
        &["verify", "--policy", s(&policy), "--json", s(&capsule)],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("runner_not_allowed"));
    // The SVID's ID is the runner.
    assert!(ok(&verify(&["--svid", s(&svid)])).contains("\"verdict\":\"admit\""));
    // --runner still works and must agree with the SVID.
    assert!(ok(&verify(&["--svid", s(&svid), "--runner", RUNNER])).contains("admit"));
    let err = fails(
        &verify(&[
            "--svid",
            s(&svid),
            "--runner",
            "spiffe://acme.example/runner/r2",
        ]),
        2,
    );
    assert!(
        err.contains("is not the configured SVID's SPIFFE ID"),
        "{err}"
    );
    // An SVID for a runner the policy does not allow: denied.
    let other = w.path("other-svid");
    ca.write_svid_dir(
        &other,
        &ca.issue(&SvidSpec::id("spiffe://acme.example/batch/b1")),
    );
    let out = verify(&["--svid", s(&other)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("runner_not_allowed"));
    // An expired SVID is a configuration error.
    let expired = w.path("expired-svid");
    ca.write_svid_dir(&expired, &ca.issue(&SvidSpec::id(RUNNER).expired()));
    let err = fails(&verify(&["--svid", s(&expired)]), 2);
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn csr_path_issues_an_svid_whose_key_is_the_tpm_key() {
    let t = Swtpm::start().expect("swtpm");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    ok(&gw(
        Some(&t),
        &["attest", "identity", "--out", s(&p("identity.json"))],
    ));
    ok(&gw(
        Some(&t),
        &[
            "attest",
            "csr",
            "--spiffe-id",
            RUNNER,
            "--out",
            s(&p("runner.csr")),
        ],
    ));
    ok(&gw(
        None,
        &[
            "attest",
            "dev-ca",
            "init",
            "--trust-domain",
            "acme.example",
            "--out",
            s(&p("ca")),
        ],
    ));
    ok(&gw(
        None,
        &[
            "attest",
            "dev-ca",
            "issue",
            "--ca",
            s(&p("ca")),
            "--csr",
            s(&p("runner.csr")),
            "--spiffe-id",
            RUNNER,
            "--out",
            s(&p("svid")),
        ],
    ));
    assert!(!p("svid/svid_key.pem").exists(), "the key stays in the TPM");
    // The CA refuses to issue another ID for that CSR.
    let err = fails(
        &gw(
            None,
            &[
                "attest",
                "dev-ca",
                "issue",
                "--ca",
                s(&p("ca")),
                "--csr",
                s(&p("runner.csr")),
                "--spiffe-id",
                "spiffe://acme.example/runner/r2",
                "--out",
                s(&p("svid2")),
            ],
        ),
        2,
    );
    assert!(err.contains("not exactly"), "{err}");
    ok(&gw(
        Some(&t),
        &[
            "attest",
            "bind",
            "--svid",
            s(&p("svid")),
            "--pcrs",
            "sha256:0",
            "--out",
            s(&p("binding.json")),
        ],
    ));
    let out = ok(&gw(
        None,
        &[
            "attest",
            "verify-binding",
            "--binding",
            s(&p("binding.json")),
            "--svid",
            s(&p("svid")),
            "--tpm-key",
            s(&p("identity.json")),
            "--allow-software-tpm",
        ],
    ));
    assert!(out.contains("binding OK"), "{out}");
    let binding: Value =
        serde_json::from_slice(&std::fs::read(p("binding.json")).unwrap()).unwrap();
    let statement = attest::b64::decode(binding["statement"].as_str().unwrap()).unwrap();
    let statement: Value = serde_json::from_slice(&statement).unwrap();
    assert_eq!(statement["svid_key_in_tpm"], true);
}

#[test]
fn runner_defaults_to_the_workload_api_svid() {
    // The SVID comes from the SPIFFE Workload API, served by the in-test server (no
    // SPIRE is installable here).
    let w = World::new();
    let ca = TestCa::new("acme.example");
    let svid = ca.issue(&SvidSpec::id(RUNNER));
    let server = attest_testkit::WorkloadApiServer::start(ca.material(&svid, RUNNER)).unwrap();
    let capsule = w.good_capsule("c", Signer::Es256);
    let policy = w.policy_path();
    let endpoint = server.endpoint();
    let out = ok(&gw(
        None,
        &[
            "verify",
            "--policy",
            s(&policy),
            "--workload-api",
            &endpoint,
            "--json",
            s(&capsule),
        ],
    ));
    assert!(out.contains("\"verdict\":\"admit\""), "{out}");
    // --svid and --workload-api are exclusive.
    fails(
        &gw(
            None,
            &[
                "verify",
                "--policy",
                s(&policy),
                "--workload-api",
                &endpoint,
                "--svid",
                "x",
                s(&capsule),
            ],
        ),
        2,
    );
}
