//! The evidence reader against what `capsule-gateway run` really writes (real gVisor,
//! Debian package `runsc`): the printed event and the bundle parse strictly, the
//! chain of custody checks out, and each edit of a hop is caught at that hop.

use std::path::{Path, PathBuf};
use std::process::Command;

use capsule_gateway::evidence::{Bundle, Event, EventData, EventType, EvidenceError};
use capsule_tests::{sha256_hex, Signer, World, RUNNER};
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `capsule-gateway run`; returns the exit code and the event line it printed.
fn run(w: &World, state: &Path, capsule: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
        .args(["run", "--policy", s(&w.policy_path()), "--runner", RUNNER])
        .args(["--state", s(state), s(capsule)])
        .output()
        .expect("run capsule-gateway");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 event");
    assert_eq!(
        stdout.lines().count(),
        1,
        "one event line; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code().expect("exit code"),
        stdout.trim_end().to_string(),
    )
}

fn script_capsule(w: &World, name: &str, script: &str) -> PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let m = w.script_manifest(&files);
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

/// A copy of `bundle` (named after its run, as `check` requires) with `edit` applied.
fn edited(w: &World, bundle: &Path, n: usize, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = w
        .path(&format!("copies/{n}"))
        .join(bundle.file_name().expect("run id"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    for e in std::fs::read_dir(bundle).expect("bundle").flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
    }
    edit(&dir);
    dir
}

/// One edit of a bundle copy.
type Edit = Box<dyn FnOnce(&Path)>;

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
}

fn hop_of(r: Result<impl std::fmt::Debug, EvidenceError>) -> String {
    match r {
        Err(EvidenceError::Link { hop, .. }) => hop.to_string(),
        Err(EvidenceError::Malformed { what, .. }) => format!("malformed {what}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_real_run_bundle_checks_out_and_every_edited_hop_is_named() {
    let w = World::new();
    let state = w.path("state");
    let c = script_capsule(&w, "capsule", "echo evidence run; echo warn >&2");
    let (code, line) = run(&w, &state, &c);
    assert_eq!(code, 0, "{line}");

    // The printed event is the stored one, and it parses strictly.
    let event = Event::parse(line.as_bytes()).expect("printed event parses");
    assert_eq!(event.kind(), EventType::Completed);
    let EventData::Run(_, data) = &event.data else {
        panic!("a run event")
    };
    assert_eq!(data.stdout.as_deref(), Some("evidence run\n"), "it ran");
    let bundle_dir = PathBuf::from(&data.evidence_bundle);
    let bundle = Bundle::read(&bundle_dir).expect("bundle reads");
    assert_eq!(bundle.event, event);
    // What we write, we read back to the same JSON.
    let printed: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(event.to_json(), printed);

    let policy = w.policy();
    let links = bundle.check(&policy).expect("chain of custody holds");
    let jws = std::fs::read(c.join("capsule.jws")).expect("jws");
    assert_eq!(links.capsule_digest.to_hex(), sha256_hex(&jws));
    assert_eq!(links.run_id, event.id);
    assert_eq!(links.kid, capsule_tests::ES_KID);
    assert_eq!(links.manifest.approvals[0].approver, "alice@acme.example");

    // Each hop, edited in a copy of the bundle, is refused there.
    let cases: Vec<(&str, Edit)> = vec![
        (
            "approvals",
            Box::new(|d| {
                edit_json(&d.join("event.json"), |v| {
                    v["data"]["approvers"] = json!(["mallory@acme.example"])
                })
            }),
        ),
        (
            "policy_version",
            Box::new(|d| {
                edit_json(&d.join("event.json"), |v| {
                    v["data"]["policy_version"] = json!("2024-01-01.1")
                })
            }),
        ),
        (
            "capsule_digest",
            Box::new(|d| {
                edit_json(&d.join("event.json"), |v| {
                    v["data"]["capsule_digest"] = json!(format!("sha256:{}", "00".repeat(32)))
                })
            }),
        ),
        (
            "manifest",
            Box::new(|d| edit_json(&d.join("event.json"), |v| v["data"]["version"] = json!(8))),
        ),
        (
            "run_id",
            Box::new(|d| edit_json(&d.join("event.json"), |v| v["id"] = json!("another-run"))),
        ),
        (
            "oci_config",
            Box::new(|d| std::fs::write(d.join("oci-config.json"), b"{}").expect("write")),
        ),
        (
            "outputs",
            Box::new(|d| std::fs::write(d.join("stdout"), b"something else\n").expect("write")),
        ),
        (
            "staged",
            Box::new(|d| {
                edit_json(&d.join("sandbox.json"), |v| {
                    v["staged"][0]["size"] = json!(1)
                })
            }),
        ),
        (
            "decision",
            Box::new(|d| edit_json(&d.join("decision.json"), |v| v["verdict"] = json!("deny"))),
        ),
        (
            "malformed event data",
            Box::new(|d| {
                edit_json(&d.join("event.json"), |v| {
                    v["data"]["note"] = json!("unknown member")
                })
            }),
        ),
        (
            "malformed event",
            Box::new(|d| {
                // A second `id` member: serde_json's Value would keep the last one.
                let text = std::fs::read_to_string(d.join("event.json")).expect("read");
                let twice = text.replacen('{', "{\n  \"id\": \"shadow\",", 1);
                std::fs::write(d.join("event.json"), twice).expect("write");
            }),
        ),
        (
            "malformed decision.json",
            Box::new(|d| std::fs::remove_file(d.join("decision.json")).expect("rm")),
        ),
    ];
    for (n, (hop, edit)) in cases.into_iter().enumerate() {
        let copy = edited(&w, &bundle_dir, n, edit);
        let got = hop_of(Bundle::read(&copy).and_then(|b| b.check(&policy)));
        assert_eq!(got, hop, "case {n}");
    }

    // The signature is checked, not only the digests: a tampered JWS with every
    // digest in the bundle updated to match it is still refused.
    let mut forged = jws.clone();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged_digest = format!("sha256:{}", sha256_hex(&forged));
    let forged_text = String::from_utf8(forged.clone()).expect("ascii");
    let copy = edited(&w, &bundle_dir, 100, |d| {
        std::fs::write(d.join("capsule.jws"), &forged).expect("write");
        edit_json(&d.join("event.json"), |v| {
            v["data"]["capsule_digest"] = json!(forged_digest);
            v["data"]["manifest_jws"] = json!(forged_text);
        });
        edit_json(&d.join("decision.json"), |v| {
            v["digest"] = json!(forged_digest)
        });
    });
    assert_eq!(
        hop_of(Bundle::read(&copy).and_then(|b| b.check(&policy))),
        "signature"
    );

    // A bundle under check is untrusted: a file of it that is a symlink to a host
    // file, or a FIFO, is refused without being opened (no hang, no host bytes read).
    let host = w.path("host-secret");
    std::fs::write(&host, b"HOST-SECRET-NOT-FOR-EVIDENCE\n").expect("host file");
    let symlinked = edited(&w, &bundle_dir, 200, |d| {
        std::fs::remove_file(d.join("stdout")).expect("rm");
        std::os::unix::fs::symlink(&host, d.join("stdout")).expect("symlink");
    });
    match Bundle::read(&symlinked) {
        Err(EvidenceError::Io { path, source }) => {
            assert!(path.ends_with("stdout"), "{path:?}");
            assert!(source.to_string().contains("symbolic link"), "{source}");
        }
        other => panic!("a symlinked stdout must be refused, got {other:?}"),
    }
    let fifo = edited(&w, &bundle_dir, 201, |d| {
        std::fs::remove_file(d.join("event.json")).expect("rm");
        let made = std::process::Command::new("mkfifo")
            .arg(d.join("event.json"))
            .status()
            .expect("mkfifo (Debian package coreutils)");
        assert!(made.success());
    });
    match Bundle::read(&fifo) {
        Err(EvidenceError::Io { path, source }) => {
            assert!(path.ends_with("event.json"), "{path:?}");
            assert!(source.to_string().contains("FIFO"), "{source}");
        }
        other => panic!("a FIFO event.json must be refused, got {other:?}"),
    }
}

#[test]
fn a_denied_event_parses_and_vouches_for_no_run() {
    let w = World::new();
    let state = w.path("state");
    let c = script_capsule(&w, "capsule", "echo SHOULD-NOT-RUN");
    std::fs::write(c.join("files/run.sh"), "echo tampered!!!!").expect("tamper");
    let (code, line) = run(&w, &state, &c);
    assert_eq!(code, 1, "{line}");
    let event = Event::parse(line.as_bytes()).expect("denied event parses");
    let EventData::Denied(d) = &event.data else {
        panic!("a denied event: {event:?}")
    };
    assert_eq!(d.reason.as_deref(), Some("artifact_size_mismatch"));
    assert!(!d.launched);
    let printed: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(event.to_json(), printed);
}

/// The events `run` writes from its typed schema are CloudEvents to an independent
/// reader, the cloudevents SDK: the envelope attributes and the data it finds are
/// ours, for a completed run and for a denial.
#[test]
fn the_written_events_are_cloudevents_to_the_sdk() {
    use cloudevents::AttributesReader;
    let w = World::new();
    let state = w.path("state");
    let good = script_capsule(&w, "good", "echo sdk");
    let denied = script_capsule(&w, "denied", "echo SHOULD-NOT-RUN");
    std::fs::write(denied.join("files/run.sh"), "echo tampered!!!!!!").expect("tamper");
    for (capsule, code, kind) in [
        (&good, 0, "dev.capsule-gateway.run.completed"),
        (&denied, 1, "dev.capsule-gateway.run.denied"),
    ] {
        let (got, line) = run(&w, &state, capsule);
        assert_eq!(got, code, "{line}");
        let sdk: cloudevents::Event = serde_json::from_str(&line).expect("the SDK reads it");
        let ours = Event::parse(line.as_bytes()).expect("we read it");
        assert_eq!(sdk.id(), ours.id);
        assert_eq!(sdk.ty(), kind);
        assert_eq!(sdk.source().to_string(), RUNNER);
        assert_eq!(sdk.subject(), ours.subject.as_deref());
        assert_eq!(sdk.datacontenttype(), Some("application/json"));
        let printed: Value = serde_json::from_str(&line).expect("json");
        let data: Value = match sdk.data() {
            Some(cloudevents::Data::Json(v)) => v.clone(),
            other => panic!("JSON data, got {other:?}"),
        };
        assert_eq!(data, printed["data"]);
    }
}
