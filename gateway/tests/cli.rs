//! The CLI end to end: every named negative fixture through the real binary, exit
//! codes, NDJSON output, keygen → pack → verify round trips, and capsules produced
//! and checked by an independent JOSE library (jsonwebtoken).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use capsule_gateway::state::State;
use capsule_tests::negative::{
    host_secret, mkfifo, truncate_while, BlockedWriter, Prior, CASES, HOST_SECRET,
};
use capsule_tests::{read_jws, Signer, World, RUNNER};
use serde_json::{json, Value};
use verify_core::Reason;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run capsule-gateway")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `verify`/`admit` with `--json`; returns the exit code and the parsed lines.
fn check(
    cmd: &str,
    w: &World,
    runner: Option<&str>,
    state: Option<&Path>,
    capsules: &[&Path],
) -> (i32, Vec<Value>) {
    check_with(cmd, w, runner, state, capsules, None, None)
}

/// [`check`] with `--index FILE`.
fn check_with(
    cmd: &str,
    w: &World,
    runner: Option<&str>,
    state: Option<&Path>,
    capsules: &[&Path],
    index: Option<&Path>,
    policy: Option<&Path>,
) -> (i32, Vec<Value>) {
    let policy = policy.map_or_else(|| w.policy_path(), Path::to_path_buf);
    let mut args = vec![cmd, "--policy", s(&policy), "--json"];
    if let Some(i) = index {
        args.extend(["--index", s(i)]);
    }
    if let Some(r) = runner {
        args.extend(["--runner", r]);
    }
    if let Some(st) = state {
        args.extend(["--state", s(st)]);
    }
    args.extend(capsules.iter().map(|c| s(c)));
    let out = run(&args);
    assert_no_host_file(&out);
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    (out.status.code().expect("exit code"), lines)
}

/// Neither the host file some fixtures point at nor its sha256 is in the output.
fn assert_no_host_file(out: &Output) {
    let secret = String::from_utf8_lossy(HOST_SECRET);
    let secret = secret.trim_end();
    let digest = capsule_tests::sha256_hex(HOST_SECRET);
    for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(secret), "{name} holds the host file: {text}");
        assert!(
            !text.contains(&digest),
            "{name} holds the host file's sha256: {text}"
        );
    }
}

fn reason(line: &Value) -> Option<Reason> {
    line["reason"]
        .as_str()
        .map(|r| Reason::from_name(r).expect("a known reason code"))
}

#[test]
fn every_negative_fixture_is_denied_with_its_reason_by_the_cli() {
    let w = World::new();
    for case in CASES {
        let setup = (case.build)(&w, case.name);
        let state = w.path(&format!("{}-state", case.name));
        let capsule = setup.capsule.as_path();
        // Both commands consult the recorded state: `verify`, then `admit`.
        let (index, policy) = (setup.index.as_deref(), setup.policy.as_deref());
        let verify_then_admit = || {
            let (code, lines) = check_with(
                "verify",
                &w,
                setup.runner,
                Some(&state),
                &[capsule],
                index,
                policy,
            );
            assert_eq!(
                reason(&lines[0]),
                Some(case.reason),
                "{}: verify",
                case.name
            );
            assert_eq!(code, 1);
            check_with(
                "admit",
                &w,
                setup.runner,
                Some(&state),
                &[capsule],
                index,
                policy,
            )
        };
        let (code, lines) = match &setup.prior {
            Prior::Nothing => check_with(
                "verify",
                &w,
                setup.runner,
                None,
                &[capsule],
                setup.index.as_deref(),
                setup.policy.as_deref(),
            ),
            Prior::Admitted(prior) => {
                let (code, first) = check_with(
                    "admit",
                    &w,
                    setup.runner,
                    Some(&state),
                    &[prior],
                    setup.prior_index.as_deref(),
                    setup.policy.as_deref(),
                );
                assert_eq!(code, 0, "{}: prior admitted: {first:?}", case.name);
                verify_then_admit()
            }
            Prior::ClockAhead(ahead) => {
                // A state whose last-known time is ahead of this host's clock: made
                // through the library by a clock that read that time.
                let ahead = verify_core::FixedClock(w.now + ahead);
                drop(
                    State::open(&state, true, &ahead)
                        .expect("state")
                        .expect("created"),
                );
                verify_then_admit()
            }
            Prior::CorruptState => {
                std::fs::create_dir_all(&state).expect("mkdir");
                std::fs::write(
                    state.join(capsule_tests::negative::STATE_FILE),
                    b"not a redb database",
                )
                .expect("write");
                check("admit", &w, setup.runner, Some(&state), &[capsule])
            }
            Prior::TruncatedWhileHashing(rel) => {
                for mode in ["auto", "read", "mmap"] {
                    let policy = w.policy_path();
                    let seen = truncate_while(
                        &capsule.join(rel),
                        || {
                            run(&[
                                "verify",
                                "--policy",
                                s(&policy),
                                "--json",
                                "--hash-mode",
                                mode,
                                "--runner",
                                RUNNER,
                                s(capsule),
                            ])
                        },
                        |out| {
                            assert!(
                                out.status.code().is_some(),
                                "the CLI was not killed by a signal"
                            );
                            let line: Value =
                                serde_json::from_slice(&out.stdout).expect("json line");
                            reason(&line)
                        },
                    );
                    assert_eq!(
                        seen.last(),
                        Some(&Some(case.reason)),
                        "{} {mode}: saw {seen:?}",
                        case.name
                    );
                }
                continue;
            }
        };
        assert_eq!(lines.len(), 1, "{}: one line per capsule", case.name);
        assert_eq!(
            reason(&lines[0]),
            Some(case.reason),
            "{}: {}",
            case.name,
            lines[0]
        );
        assert_eq!(lines[0]["verdict"], "deny");
        assert_eq!(code, 1, "{}: exit code 1 when denied", case.name);
    }
}

#[test]
fn batch_output_keeps_the_order_given_and_exit_code_reflects_any_denial() {
    let w = World::new();
    let good = w.good_capsule("good", Signer::Es256);
    let good_hs = w.good_capsule("good-hs", Signer::Hs256);
    let missing = w.path("no-such-capsule");
    let (code, lines) = check(
        "verify",
        &w,
        Some(RUNNER),
        None,
        &[&good, &missing, &good_hs],
    );
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["capsule"], s(&good));
    assert_eq!(lines[0]["verdict"], "admit");
    assert_eq!(lines[0]["reason"], Value::Null);
    assert_eq!(lines[0]["alg"], "ES256");
    assert_eq!(lines[0]["kid"], capsule_tests::ES_KID);
    assert_eq!(lines[0]["tenant"], capsule_tests::TENANT);
    assert_eq!(lines[0]["capsule_id"], "auth-token-issuance");
    assert_eq!(lines[0]["version"], 7);
    let digest = format!(
        "sha256:{}",
        capsule_tests::sha256_hex(read_jws(&good).as_bytes())
    );
    assert_eq!(lines[0]["digest"], digest.as_str());
    assert_eq!(lines[1]["capsule"], s(&missing));
    // Issue 10: a capsule that cannot be read is `capsule_unreadable`, with no digest.
    assert_eq!(lines[1]["reason"], "capsule_unreadable");
    assert_eq!(lines[1]["digest"], Value::Null);
    assert_eq!(lines[2]["verdict"], "admit");
    assert_eq!(lines[2]["alg"], "HS256");
    let (code, _) = check("verify", &w, Some(RUNNER), None, &[&good, &good_hs]);
    assert_eq!(code, 0);
}

#[test]
fn admit_records_versions_durably_and_refuses_rollback() {
    let w = World::new();
    let state = w.path("state");
    let mut m = w.manifest();
    let v7 = w.capsule("v7", &m, Signer::Es256);
    m["version"] = json!(8);
    // Lineage (issue 13): once v7 is admitted, v8 must name it as its parent.
    m["parent"] = json!(capsule_tests::sha256_hex(read_jws(&v7).as_bytes()));
    let v8 = w.capsule("v8", &m, Signer::Es256);
    // verify records nothing.
    let (code, _) = check("verify", &w, Some(RUNNER), Some(&state), &[&v8]);
    assert_eq!(code, 0);
    let (code, _) = check("admit", &w, Some(RUNNER), Some(&state), &[&v7]);
    assert_eq!(code, 0, "v7 admitted: verify did not record v8");
    // In one batch, v8 then v7: v7 is now a rollback, decided inside the transaction.
    let (code, lines) = check("admit", &w, Some(RUNNER), Some(&state), &[&v8, &v7]);
    assert_eq!(code, 1);
    assert_eq!(lines[0]["verdict"], "admit");
    assert_eq!(lines[1]["reason"], "rollback");
    // Re-admitting the highest version with the same bytes is allowed.
    let (code, _) = check("admit", &w, Some(RUNNER), Some(&state), &[&v8]);
    assert_eq!(code, 0);
    let (code, lines) = check("verify", &w, Some(RUNNER), Some(&state), &[&v7]);
    assert_eq!((code, reason(&lines[0])), (1, Some(Reason::Rollback)));
}

#[test]
fn configuration_errors_exit_2_and_name_the_file_and_field() {
    let w = World::new();
    let good = w.good_capsule("good", Signer::Es256);
    let bad = w.write(
        "bad-policy.toml",
        w.policy_toml()
            .replace("min_approvals = 1", "min_approvals = \"one\"")
            .as_bytes(),
    );
    let out = run(&["verify", "--policy", s(&bad), s(&good)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad-policy.toml") && err.contains("tenants[0].min_approvals"),
        "{err}"
    );

    let unknown = w.write(
        "unknown-kid.toml",
        w.policy_toml()
            .replace("keys = [\"k-es-2025\"", "keys = [\"k-nope\"")
            .as_bytes(),
    );
    let out = run(&["verify", "--policy", s(&unknown), s(&good)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenants[0].keys[0]"));

    let short = json!({"keys": [{"kty": "oct", "kid": "short", "alg": "HS256",
                                  "k": verify_core::b64::encode(&[7u8; 16])}]});
    w.write("short.jwks.json", short.to_string().as_bytes());
    let p = w.write(
        "short.toml",
        w.policy_toml()
            .replace("trusted.jwks.json", "short.jwks.json")
            .as_bytes(),
    );
    let out = run(&["verify", "--policy", s(&p), s(&good)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("short.jwks.json") && err.contains("keys[0].k") && err.contains("at least 32"),
        "{err}"
    );

    let out = run(&["verify", "--policy", s(&w.path("missing.toml")), s(&good)]);
    assert_eq!(out.status.code(), Some(2));
    let policy = w.policy_path();
    let out = run(&[
        "verify",
        "--policy",
        s(&policy),
        "--runner",
        "spiffe://UPPER/x",
        s(&good),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["admit", "--policy", s(&policy), s(&good)]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "admit without --state has nowhere to record"
    );
    let out = run(&["verify", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A policy, JWKS or directory above them that others could change, and an HS256
/// secret others can read: `verify`, `admit` and `run` refuse to start (exit 2),
/// naming the file and what to run.
#[test]
fn every_unsafe_trust_file_is_a_configuration_error_naming_the_file() {
    for attack in capsule_tests::trust_attacks::TRUST_ATTACKS {
        let w = World::new();
        let good = w.good_capsule("good", Signer::Es256);
        let file = (attack.apply)(&w);
        let policy = w.policy_path();
        let state = w.path("state");
        for args in [
            vec!["verify", "--policy", s(&policy), s(&good)],
            vec![
                "admit",
                "--policy",
                s(&policy),
                "--state",
                s(&state),
                s(&good),
            ],
            vec![
                "run",
                "--policy",
                s(&policy),
                "--state",
                s(&state),
                s(&good),
            ],
        ] {
            let out = run(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{} {}: {err}",
                attack.name,
                args[0]
            );
            assert!(
                err.contains(s(&file)) && err.contains("refused") && err.contains(attack.fix),
                "{} {}: {err}",
                attack.name,
                args[0]
            );
            assert!(out.stdout.is_empty(), "{}: nothing is decided", attack.name);
        }
    }
}

#[test]
fn every_command_has_help() {
    for cmd in [
        &["--help"][..],
        &["keygen", "--help"],
        &["pack", "--help"],
        &["verify", "--help"],
        &["admit", "--help"],
    ] {
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(0), "{cmd:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{cmd:?}"
        );
    }
}

/// Writes a manifest without sizes and digests for `pack` to fill in.
fn pack_inputs(w: &World, dir: &str) -> (PathBuf, PathBuf) {
    let mut m = w.manifest();
    for list in ["artifacts", "tools"] {
        for e in m[list].as_array_mut().expect("list") {
            let o = e.as_object_mut().expect("object");
            o.remove("sha256");
            o.remove("size");
        }
    }
    let manifest = w.write(
        &format!("{dir}/manifest.json"),
        serde_json::to_vec_pretty(&m).expect("json").as_slice(),
    );
    w.write(&format!("{dir}/files/run.sh"), capsule_tests::RUN_SH);
    w.write(
        &format!("{dir}/files/tools/busybox"),
        capsule_tests::TOOL_BYTES,
    );
    (manifest, w.path(&format!("{dir}/files")))
}

/// The fixture policy, trusting `jwks` and letting `kids` sign for the tenant.
fn policy_trusting(w: &World, name: &str, jwks: &str, kids: &str) -> PathBuf {
    let text = w.policy_toml().replace("trusted.jwks.json", jwks).replace(
        &format!(
            "keys = [\"{}\", \"{}\"]",
            capsule_tests::ES_KID,
            capsule_tests::HS_KID
        ),
        &format!("keys = [{kids}]"),
    );
    w.write(name, text.as_bytes())
}

fn third_party_key(alg: &str, jwk: &Value) -> (jsonwebtoken::DecodingKey, jsonwebtoken::Algorithm) {
    match alg {
        "ES256" => (
            jsonwebtoken::DecodingKey::from_ec_components(
                jwk["x"].as_str().expect("x"),
                jwk["y"].as_str().expect("y"),
            )
            .expect("ec key"),
            jsonwebtoken::Algorithm::ES256,
        ),
        _ => (
            jsonwebtoken::DecodingKey::from_secret(
                &verify_core::b64::decode(jwk["k"].as_str().expect("k").as_bytes()).expect("k"),
            ),
            jsonwebtoken::Algorithm::HS256,
        ),
    }
}

#[test]
fn keygen_pack_verify_round_trips_and_a_third_party_library_verifies_the_output() {
    let w = World::new();
    for (alg, kid) in [("ES256", "k-es-2025"), ("HS256", "k-hs-2025")] {
        let keys = w.path(&format!("keys-{alg}"));
        let out = run(&["keygen", "--alg", alg, "--kid", kid, "--out", s(&keys)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let private = keys.join(format!("{kid}.private.jwk.json"));
        let public = keys.join(format!("{kid}.public.jwks.json"));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&private), 0o600);
        assert_eq!(mode(&public), if alg == "HS256" { 0o600 } else { 0o644 });
        // keygen refuses to overwrite.
        let again = run(&["keygen", "--alg", alg, "--kid", kid, "--out", s(&keys)]);
        assert_eq!(again.status.code(), Some(2));

        let policy = policy_trusting(
            &w,
            &format!("policy-{alg}.toml"),
            &format!("keys-{alg}/{kid}.public.jwks.json"),
            &format!("\"{kid}\""),
        );
        let (manifest, files) = pack_inputs(&w, &format!("src-{alg}"));
        let capsule = w.path(&format!("packed-{alg}"));
        let out = run(&[
            "pack",
            "--manifest",
            s(&manifest),
            "--files",
            s(&files),
            "--key",
            s(&private),
            "--out",
            s(&capsule),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(capsule.join("files/run.sh")).expect("copied"),
            capsule_tests::RUN_SH
        );
        let out = run(&[
            "verify",
            "--policy",
            s(&policy),
            "--runner",
            RUNNER,
            "--json",
            s(&capsule),
        ]);
        let line: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(line["verdict"], "admit", "{line}");
        assert_eq!(out.status.code(), Some(0));

        // jsonwebtoken, an independent JOSE implementation, verifies pack's output unchanged.
        let jws = read_jws(&capsule);
        let jwks: Value =
            serde_json::from_slice(&std::fs::read(&public).expect("jwks")).expect("json");
        let (key, algorithm) = third_party_key(alg, &jwks["keys"][0]);
        let mut validation = jsonwebtoken::Validation::new(algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let decoded = jsonwebtoken::decode::<Value>(&jws, &key, &validation)
            .expect("jsonwebtoken verifies pack's output");
        assert_eq!(decoded.header.kid.as_deref(), Some(kid));
        assert_eq!(decoded.claims["capsule_id"], "auth-token-issuance");
        assert!(
            decoded.claims["artifacts"][0]["sha256"].is_string(),
            "pack filled in digests"
        );

        // A stated size that does not match is an error, and nothing is written.
        let mut m: Value =
            serde_json::from_slice(&std::fs::read(&manifest).expect("m")).expect("json");
        m["artifacts"][0]["size"] = json!(1);
        std::fs::write(&manifest, m.to_string()).expect("write");
        let bad_out = w.path(&format!("packed-bad-{alg}"));
        let out = run(&[
            "pack",
            "--manifest",
            s(&manifest),
            "--files",
            s(&files),
            "--key",
            s(&private),
            "--out",
            s(&bad_out),
        ]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("size"), "{err}");
        assert!(!bad_out.exists(), "no partial capsule");
    }
}

#[test]
fn capsules_signed_by_an_independent_jose_library_are_admitted() {
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let w = World::new();
    // ES256: a key made by aws-lc-rs as PKCS#8, the token made by jsonwebtoken.
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("pkcs8");
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("pair");
    let point = pair.public_key().as_ref().to_vec();
    let secret = [0x5au8; 32];
    let jwks = json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "k-third", "alg": "ES256",
         "x": verify_core::b64::encode(&point[1..33]), "y": verify_core::b64::encode(&point[33..])},
        {"kty": "oct", "kid": "k-third-hs", "alg": "HS256", "k": verify_core::b64::encode(&secret)},
    ]});
    // It holds an HS256 secret: readable by its owner only, or it is refused.
    w.write_mode("third.jwks.json", jwks.to_string().as_bytes(), 0o600);
    let policy = policy_trusting(
        &w,
        "third.toml",
        "third.jwks.json",
        "\"k-third\", \"k-third-hs\"",
    );
    let manifest = w.manifest();
    for (kid, alg, key) in [
        (
            "k-third",
            jsonwebtoken::Algorithm::ES256,
            jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
        ),
        (
            "k-third-hs",
            jsonwebtoken::Algorithm::HS256,
            jsonwebtoken::EncodingKey::from_secret(&secret),
        ),
    ] {
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.into());
        header.typ = Some("capsule+jws".into());
        let token = jsonwebtoken::encode(&header, &manifest, &key).expect("jsonwebtoken signs");
        let capsule = w.capsule_with_jws(&format!("third-{kid}"), token.as_bytes());
        let out = run(&[
            "verify",
            "--policy",
            s(&policy),
            "--runner",
            RUNNER,
            "--json",
            s(&capsule),
        ]);
        let line: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(line["verdict"], "admit", "{kid}: {line}");
        assert_eq!(out.status.code(), Some(0));
    }
}

/// Runs the binary with a generous functional timeout: a hang is a failure, not a
/// stuck test run.
fn run_within(args: &[&str], secs: u64) -> Output {
    let mut child = bin()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run capsule-gateway");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("capsule-gateway {args:?} hung for {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn capsule_jws_symlink_to_a_host_file_is_refused_by_verify_and_admit_without_its_digest() {
    let w = World::new();
    let c = w.good_capsule("symlinked-jws", Signer::Es256);
    std::fs::remove_file(c.join("capsule.jws")).expect("rm");
    std::os::unix::fs::symlink(host_secret(&w), c.join("capsule.jws")).expect("symlink");
    let state = w.path("symlinked-jws-state");
    for (cmd, state) in [("verify", None), ("admit", Some(state.as_path()))] {
        let (code, lines) = check(cmd, &w, Some(RUNNER), state, &[&c]);
        assert_eq!(code, 1, "{cmd}");
        assert_eq!(reason(&lines[0]), Some(Reason::CapsuleUnreadable), "{cmd}");
        assert_eq!(lines[0]["digest"], Value::Null, "{cmd}: no hash oracle");
        assert!(
            lines[0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("capsule.jws") && d.contains("symlink")),
            "{cmd}: {}",
            lines[0]
        );
    }
    // The text output too.
    let out = run(&[
        "verify",
        "--policy",
        s(&w.policy_path()),
        "--runner",
        RUNNER,
        s(&c),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_no_host_file(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("capsule_unreadable"));
}

#[test]
fn a_fifo_capsule_jws_does_not_hang_a_cli_batch_and_is_never_opened() {
    let w = World::new();
    let good = w.good_capsule("fifo-batch-good", Signer::Es256);
    let bad = w.good_capsule("fifo-batch-bad", Signer::Es256);
    let fifo = bad.join("capsule.jws");
    std::fs::remove_file(&fifo).expect("rm");
    mkfifo(&fifo);
    let writer = BlockedWriter::start(&fifo);
    let policy = w.policy_path();
    for cmd in ["verify", "admit"] {
        let state = w.path(&format!("fifo-batch-{cmd}-state"));
        let mut args = vec![cmd, "--policy", s(&policy), "--json", "--runner", RUNNER];
        if cmd == "admit" {
            args.extend(["--state", s(&state)]);
        }
        args.extend([s(&good), s(&bad), s(&good)]);
        let out = run_within(&args, 60);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 3, "{cmd}: every capsule gets its line");
        assert_eq!(lines[0]["verdict"], "admit", "{cmd}: {}", lines[0]);
        assert_eq!(reason(&lines[1]), Some(Reason::CapsuleUnreadable), "{cmd}");
        assert_eq!(lines[1]["digest"], Value::Null);
        assert_eq!(lines[2]["verdict"], "admit", "{cmd}");
        assert!(writer.is_blocked(), "{cmd} opened the FIFO");
    }
    writer.release(&fifo);
}

#[test]
fn a_fifo_at_an_artifact_path_is_never_opened_by_verify() {
    let w = World::new();
    let c = w.good_capsule("fifo-artifact-cli", Signer::Es256);
    let fifo = c.join("files/tools/busybox");
    std::fs::remove_file(&fifo).expect("rm");
    mkfifo(&fifo);
    let writer = BlockedWriter::start(&fifo);
    for mode in ["auto", "read", "mmap"] {
        let out = run_within(
            &[
                "verify",
                "--policy",
                s(&w.policy_path()),
                "--json",
                "--hash-mode",
                mode,
                "--runner",
                RUNNER,
                s(&c),
            ],
            60,
        );
        assert_eq!(out.status.code(), Some(1));
        let line: Value = serde_json::from_slice(&out.stdout).expect("json line");
        assert_eq!(reason(&line), Some(Reason::ArtifactPathInvalid), "{line}");
        assert!(
            writer.is_blocked(),
            "verify --hash-mode {mode} opened the FIFO"
        );
    }
    writer.release(&fifo);
}

#[test]
fn pack_refuses_a_fifo_in_files_without_opening_it() {
    let w = World::new();
    let (manifest, files) = pack_inputs(&w, "pack-fifo");
    let fifo = files.join("run.sh");
    std::fs::remove_file(&fifo).expect("rm");
    mkfifo(&fifo);
    let writer = BlockedWriter::start(&fifo);
    let out_dir = w.path("pack-fifo-out");
    let out = run_within(
        &[
            "pack",
            "--manifest",
            s(&manifest),
            "--files",
            s(&files),
            "--key",
            s(&w.path("es.private.jwk.json")),
            "--out",
            s(&out_dir),
        ],
        60,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FIFO"), "{stderr}");
    assert!(!out_dir.exists(), "nothing is written");
    assert!(writer.is_blocked(), "pack opened the FIFO");
    writer.release(&fifo);
    // A symlink to a host file is refused the same way.
    std::fs::remove_file(&fifo).expect("rm");
    std::os::unix::fs::symlink(host_secret(&w), &fifo).expect("symlink");
    let out = run(&[
        "pack",
        "--manifest",
        s(&manifest),
        "--files",
        s(&files),
        "--key",
        s(&w.path("es.private.jwk.json")),
        "--out",
        s(&out_dir),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!out_dir.exists());

    // A FIFO given as --manifest is refused by its type, not read.
    let fifo_manifest = w.path("pack-fifo/manifest.fifo");
    mkfifo(&fifo_manifest);
    let writer = BlockedWriter::start(&fifo_manifest);
    let out = run_within(
        &[
            "pack",
            "--manifest",
            s(&fifo_manifest),
            "--files",
            s(&files),
            "--key",
            s(&w.path("es.private.jwk.json")),
            "--out",
            s(&out_dir),
        ],
        60,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(writer.is_blocked(), "pack opened the FIFO manifest");
    writer.release(&fifo_manifest);
}

/// `run`'s `.denied` event: the decision and a digest, never the presented bytes.
fn run_denied(w: &World, name: &str, capsule: &Path) -> (Value, Output) {
    let state = w.path(&format!("{name}-state"));
    let out = run_within(
        &[
            "run",
            "--policy",
            s(&w.policy_path()),
            "--runner",
            RUNNER,
            "--state",
            s(&state),
            s(capsule),
        ],
        120,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "denied; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_host_file(&out);
    let event: Value = serde_json::from_slice(&out.stdout).expect("one event");
    assert_eq!(event["type"], "dev.capsule-gateway.run.denied");
    assert_eq!(event["data"]["manifest_jws"], Value::Null, "{event}");
    assert_eq!(event["data"]["launched"], false);
    (event, out)
}

#[test]
fn run_denied_event_holds_neither_a_symlinked_trust_store_nor_presented_bytes() {
    let w = World::new();
    let jwks: Value = serde_json::from_slice(
        &std::fs::read(w.path("trusted.jwks.json")).expect("read trust store"),
    )
    .expect("jwks");
    let hs_secret = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find_map(|k| k["k"].as_str())
        .expect("the HS256 key's secret")
        .to_string();

    // capsule.jws -> the trust store: refused unread, the secret is nowhere.
    let c = w.good_capsule("run-jws-trust-store", Signer::Es256);
    std::fs::remove_file(c.join("capsule.jws")).expect("rm");
    std::os::unix::fs::symlink(w.path("trusted.jwks.json"), c.join("capsule.jws"))
        .expect("symlink");
    let (event, out) = run_denied(&w, "run-jws-trust-store", &c);
    assert_eq!(event["data"]["reason"], "capsule_unreadable");
    assert_eq!(event["data"]["capsule_digest"], Value::Null);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&hs_secret));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&hs_secret));

    // capsule.jws -> a host file.
    let c = w.good_capsule("run-jws-host-file", Signer::Es256);
    std::fs::remove_file(c.join("capsule.jws")).expect("rm");
    std::os::unix::fs::symlink(host_secret(&w), c.join("capsule.jws")).expect("symlink");
    let (event, _) = run_denied(&w, "run-jws-host-file", &c);
    assert_eq!(event["data"]["reason"], "capsule_unreadable");

    // A regular capsule.jws that does not verify: its digest, not its bytes.
    let presented = "PRESENTED-BYTES-NOT-VERIFIED.e30.AA";
    let c = w.capsule_with_jws("run-jws-garbage", presented.as_bytes());
    let (event, out) = run_denied(&w, "run-jws-garbage", &c);
    assert_eq!(event["data"]["reason"], "malformed_header");
    assert_eq!(
        event["data"]["capsule_digest"],
        format!("sha256:{}", capsule_tests::sha256_hex(presented.as_bytes()))
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("PRESENTED-BYTES"));
}

/// `keygen`: a kid that is not a plain file name and an existing key file are the
/// operator's to fix (exit 2); an output directory that cannot be created (its
/// parent is a regular file) is a failure at run time (exit 4), naming the path.
#[test]
fn keygen_exits_2_for_usage_errors_and_4_for_a_failed_write() {
    let w = World::new();
    let keys = w.path("exit-keys");
    let out = run(&[
        "keygen",
        "--alg",
        "ES256",
        "--kid",
        ".hidden",
        "--out",
        s(&keys),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&["keygen", "--alg", "ES256", "--kid", "k1", "--out", s(&keys)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(&["keygen", "--alg", "ES256", "--kid", "k1", "--out", s(&keys)]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let file = w.path("exit-plain-file");
    std::fs::write(&file, b"x").expect("write");
    let under_file = file.join("keys");
    let out = run(&[
        "keygen",
        "--alg",
        "ES256",
        "--kid",
        "k1",
        "--out",
        s(&under_file),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains(s(&under_file)), "{stderr}");
}

/// Issue 13's "done when", through the binary: a production capsule needing two roles
/// is denied when one approval is the author's or made with a key that is not the
/// approver's, and admitted when properly approved; `pack → approve → verify` round
/// trips, `pack --approvals` keeps matching approvals and refuses stale ones.
#[test]
fn pack_approve_verify_round_trips_and_bad_approvals_are_denied_by_the_cli() {
    use capsule_tests::governance::{ALICE, BOB, PLANNER};
    let w = World::new();
    let policy = w.governance_policy_path();
    let verify = |capsule: &Path| -> (i32, Value) {
        let (code, lines) = check_with(
            "verify",
            &w,
            Some(RUNNER),
            None,
            &[capsule],
            None,
            Some(&policy),
        );
        (code, lines[0].clone())
    };
    let key_of = |who: &str| {
        w.write_mode(
            &format!("{who}.private.jwk.json"),
            w.approver_key(who).to_json(true).to_string().as_bytes(),
            0o600,
        )
    };
    // pack, from a manifest without sizes or digests.
    let mut m = w.governed_manifest("production");
    for list in ["artifacts", "tools"] {
        for e in m[list].as_array_mut().expect("list") {
            e.as_object_mut().expect("entry").remove("sha256");
            e.as_object_mut().expect("entry").remove("size");
        }
    }
    let manifest = w.write("prod.manifest.json", m.to_string().as_bytes());
    w.write("prod-files/run.sh", capsule_tests::RUN_SH);
    w.write("prod-files/tools/busybox", capsule_tests::TOOL_BYTES);
    let packed = w.path("prod");
    let es_key = w.path("es.private.jwk.json");
    let files = w.path("prod-files");
    let pack = |out: &Path, approvals: Option<&Path>| {
        let mut args = vec![
            "pack",
            "--manifest",
            s(&manifest),
            "--files",
            s(&files),
            "--key",
            s(&es_key),
            "--out",
            s(out),
        ];
        if let Some(a) = approvals {
            args.extend(["--approvals", s(a)]);
        }
        run(&args)
    };
    assert!(pack(&packed, None).status.success());
    let approve = |who: &str, role: &str, capsule: &Path, name: &str| {
        let out = capsule.join(format!("approvals/{name}.jws"));
        let o = run(&[
            "approve",
            "--key",
            s(&key_of(who)),
            "--role",
            role,
            "--out",
            s(&out),
            s(capsule),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (code, line) = verify(&packed);
    assert_eq!(
        (code, line["reason"].as_str()),
        (1, Some("approval_insufficient")),
        "{line}"
    );
    approve(ALICE, "sre-lead", &packed, "alice");
    // The author's own approval does not count.
    let by_author = approve(PLANNER, "security", &packed, "planner");
    let (code, line) = verify(&packed);
    assert_eq!(
        (code, line["reason"].as_str()),
        (1, Some("approval_insufficient")),
        "{line}"
    );
    std::fs::remove_file(&by_author).expect("rm");
    // bob's role, signed with alice's key: the key decides who approved, and alice is
    // not `security`.
    let forged = approve(ALICE, "security", &packed, "bob");
    let (code, line) = verify(&packed);
    assert_eq!(
        (code, line["reason"].as_str()),
        (1, Some("approval_invalid")),
        "{line}"
    );
    std::fs::remove_file(&forged).expect("rm");
    approve(BOB, "security", &packed, "bob");
    let (code, line) = verify(&packed);
    assert_eq!(
        (code, line["verdict"].as_str()),
        (0, Some("admit")),
        "{line}"
    );
    // An existing approval file is never overwritten.
    let again = run(&[
        "approve",
        "--key",
        s(&key_of(BOB)),
        "--role",
        "security",
        "--out",
        s(&packed.join("approvals/bob.jws")),
        s(&packed),
    ]);
    assert_eq!(again.status.code(), Some(2));

    // Re-packing the same manifest keeps the approvals (they name the same bytes).
    let repacked = w.path("prod-again");
    let o = pack(&repacked, Some(&packed.join("approvals")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(verify(&repacked).1["verdict"], "admit");
    // A changed manifest makes them stale: pack refuses, and writes nothing.
    m["limits"]["timeout_ms"] = json!(20000);
    std::fs::write(&manifest, m.to_string()).expect("write");
    let stale = w.path("prod-stale");
    let o = pack(&stale, Some(&packed.join("approvals")));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stale approval"),
        "{o:?}"
    );
    assert!(!stale.exists());
}

/// A fresh state directory refuses a version the tenant index supersedes; an index
/// older than one the state has seen is `index_stale`; `index sign` makes the index.
#[test]
fn index_sign_and_a_fresh_state_refuses_a_superseded_version() {
    use capsule_tests::governance::GOVERNED;
    let w = World::new();
    let policy = w.governance_policy_path();
    let index_key = w.write_mode(
        "index.private.jwk.json",
        w.index_key.to_json(true).to_string().as_bytes(),
        0o600,
    );
    let v7 = w.capsule("v7", &w.governed_manifest("staging"), Signer::Es256);
    let mut m = w.governed_manifest("staging");
    m["version"] = json!(8);
    m["parent"] = json!(w.digest_of(&v7));
    let v8 = w.capsule("v8", &m, Signer::Es256);
    let sign = |version: &str, out: &str, capsule: &Path| {
        let out = w.path(out);
        let o = run(&[
            "index",
            "sign",
            "--key",
            s(&index_key),
            "--tenant",
            GOVERNED,
            "--version",
            version,
            "--expires-in",
            "1h",
            "--out",
            s(&out),
            s(capsule),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let index2 = sign("2", "index-2.jws", &v8);
    let index1 = sign("1", "index-1.jws", &v7);
    let state = w.path("fresh-state");
    let (code, lines) = check_with(
        "admit",
        &w,
        Some(RUNNER),
        Some(&state),
        &[&v7],
        Some(&index2),
        Some(&policy),
    );
    assert_eq!(
        (code, lines[0]["reason"].as_str()),
        (1, Some("superseded")),
        "{}",
        lines[0]
    );
    let (code, lines) = check_with(
        "admit",
        &w,
        Some(RUNNER),
        Some(&state),
        &[&v8],
        Some(&index2),
        Some(&policy),
    );
    assert_eq!(code, 0, "{}", lines[0]);
    // The state now knows index version 2: version 1 is stale, even for v7's own entry.
    let other = w.path("other-state");
    let (code, _) = check_with(
        "verify",
        &w,
        Some(RUNNER),
        Some(&other),
        &[&v7],
        Some(&index1),
        Some(&policy),
    );
    assert_eq!(code, 0, "a state that saw no index accepts version 1");
    let (code, lines) = check_with(
        "verify",
        &w,
        Some(RUNNER),
        Some(&state),
        &[&v8],
        Some(&index1),
        Some(&policy),
    );
    assert_eq!(
        (code, lines[0]["reason"].as_str()),
        (1, Some("index_stale")),
        "{}",
        lines[0]
    );
    // An index that does not verify is a usage error naming the file.
    let forged = w.write("forged-index.jws", w.sign(b"{}", Signer::Es256).as_bytes());
    let o = run(&[
        "verify",
        "--policy",
        s(&policy),
        "--index",
        s(&forged),
        s(&v8),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("forged-index.jws"),
        "{o:?}"
    );
}

/// The verification cache through the CLI: one batch names the same JWS three times
/// (a capsule, the same directory again, and a copy whose artifact was altered):
/// the repeats are admitted alike and the copy, whose signature may come from the
/// cache, is still `digest_mismatch`.
#[test]
fn a_repeated_jws_in_one_batch_still_has_every_artifact_checked() {
    let w = World::new();
    let good = w.good_capsule("good", Signer::Es256);
    let altered = w.capsule_with_jws("altered", read_jws(&good).as_bytes());
    let mut run_sh = capsule_tests::RUN_SH.to_vec();
    run_sh[0] ^= 1;
    std::fs::write(altered.join("files/run.sh"), run_sh).expect("alter run.sh");
    let (code, lines) = check("verify", &w, Some(RUNNER), None, &[&good, &good, &altered]);
    assert_eq!(code, 1);
    assert_eq!(lines[0]["verdict"], "admit", "{lines:?}");
    assert_eq!(lines[1]["verdict"], "admit", "{lines:?}");
    assert_eq!(lines[2]["reason"], "digest_mismatch", "{lines:?}");
    assert_eq!(lines[0]["digest"], lines[2]["digest"]);
}

/// `verify` of more capsule directories than the process may hold descriptors (and
/// more lines than its 64 KiB output buffer): each capsule's descriptors are closed
/// before the next is opened, every capsule gets its line, in order, and a JWS or an
/// artifact that is a directory is refused by its type.
#[test]
fn a_batch_larger_than_the_descriptor_limit_answers_every_capsule_in_order() {
    let w = World::new();
    let good = w.good_capsule("fd-limit-good", Signer::Es256);
    let jws_dir = w.good_capsule("fd-limit-jws-dir", Signer::Es256);
    std::fs::remove_file(jws_dir.join("capsule.jws")).expect("rm");
    std::fs::create_dir(jws_dir.join("capsule.jws")).expect("mkdir");
    let artifact_dir = w.good_capsule("fd-limit-artifact-dir", Signer::Es256);
    std::fs::remove_file(artifact_dir.join("files/run.sh")).expect("rm");
    std::fs::create_dir(artifact_dir.join("files/run.sh")).expect("mkdir");
    let copies = 300;
    let mut dirs = Vec::new();
    for i in 0..copies {
        let d = w.path(&format!("fd-limit-{i:03}"));
        let st = Command::new("cp")
            .args(["-a", s(&good), s(&d)])
            .status()
            .expect("cp");
        assert!(st.success());
        dirs.push(d);
    }
    dirs.insert(100, jws_dir.clone());
    dirs.insert(200, artifact_dir.clone());
    let policy = w.policy_path();
    let mut args = vec![
        "verify",
        "--policy",
        s(&policy),
        "--json",
        "--runner",
        RUNNER,
    ];
    args.extend(dirs.iter().map(|d| s(d)));
    // 64 descriptors: the process's own (std streams, policy, the pool) and a
    // capsule's few at a time, never one held per capsule of the batch.
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_capsule-gateway"))
        .args(&args)
        .output()
        .expect("run verify under ulimit -n 64");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.len() > 64 * 1024,
        "more than one buffer of lines"
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), dirs.len(), "every capsule gets its line");
    for (line, dir) in lines.iter().zip(&dirs) {
        assert_eq!(line["capsule"], s(dir), "in input order");
        if dir == &jws_dir {
            assert_eq!(reason(line), Some(Reason::CapsuleUnreadable), "{line}");
            assert!(line["detail"]
                .as_str()
                .is_some_and(|d| d.contains("is a directory")));
        } else if dir == &artifact_dir {
            assert_eq!(reason(line), Some(Reason::ArtifactPathInvalid), "{line}");
            assert!(line["detail"]
                .as_str()
                .is_some_and(|d| d.contains("is a directory")));
        } else {
            assert_eq!(line["verdict"], "admit", "{line}");
        }
    }
}
