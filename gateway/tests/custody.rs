//! The signed bundle index and `evidence verify`, against what `capsule-gateway run`
//! really writes (real gVisor, Debian package `runsc`; one run for the whole binary,
//! its bundle copied for each case): every tampered hop is named, through the library
//! and through the binary; a key rotated out of the trust store still verifies from
//! the snapshot; denial bundles verify; exports built by hand to the export format of docs/evidence.md
//! verify, and report what was withheld or masked.

use std::path::{Path, PathBuf};
use std::process::Command;

use capsule_gateway::custody::{sig_name, CustodySigner};
use capsule_gateway::evidence::index::{Index, IndexKind};
use capsule_gateway::evidence::{verify_evidence, Event, EventData, VerifyOptions};
use capsule_tests::governance::{ALICE, BOB, CAROL};
use capsule_tests::{sha256_hex, Signer, World, RUNNER};
use serde_json::{json, Value};

const SECRET: &str = "token=S3CRET-0f-the-capsule";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

/// A production capsule of the governed tenant (two signed approvals) that prints a
/// secret on stdout and a line on stderr.
fn approved_script_capsule(w: &World, name: &str) -> PathBuf {
    let script = format!("echo {SECRET}; echo warn >&2\n");
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let mut m = w.governed_manifest("production");
    let plain = w.script_manifest(&files);
    for k in ["artifacts", "tools", "entrypoint"] {
        m[k] = plain[k].clone();
    }
    let dir = w.capsule_with_files(name, &m, &files, Signer::Es256);
    w.approve(&dir, ALICE, "sre-lead");
    w.approve(&dir, BOB, "security");
    dir
}

fn run(w: &World, state: &Path, capsule: &Path) -> (i32, Event) {
    let out = bin()
        .args(["run", "--policy", s(&w.governance_policy_path())])
        .args(["--runner", RUNNER, "--state", s(state), s(capsule)])
        .output()
        .expect("run capsule-gateway");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let event = Event::parse(stdout.trim_end().as_bytes()).unwrap_or_else(|e| {
        panic!(
            "one event: {e}; stdout {stdout}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), event)
}

/// `evidence verify --json` through the binary: exit code and report.
fn cli_verify(path: &Path, extra: &[&str]) -> (i32, Value) {
    let out = bin()
        .args(["evidence", "verify", "--json"])
        .args(extra)
        .arg(path)
        .output()
        .expect("evidence verify");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let code = out.status.code().expect("exit code");
    let report = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "--json prints one object ({e}): {text}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

/// The library's first failing hop (`None`: every hop holds).
fn lib_verify(path: &Path, opts: &VerifyOptions<'_>) -> Option<String> {
    let r = verify_evidence(path, opts).expect("a bundle or export");
    r.first_failure().map(|h| h.hop.to_string())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// A copy of `bundle` named after its run, edited.
fn edited(root: &Path, bundle: &Path, n: usize, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = root
        .join(format!("copies/{n}"))
        .join(bundle.file_name().expect("run id"));
    copy_dir(bundle, &dir);
    edit(&dir);
    dir
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
}

/// The index rewritten to the files as they now are and signed again with the
/// bundle's own custody key: what an insider holding the key could do. The per-hop
/// checks must still name the hop.
fn reindex(dir: &Path, signer: &CustodySigner) {
    let mut index =
        Index::parse(&std::fs::read(dir.join("index.json")).expect("index")).expect("index parses");
    for f in &mut index.files {
        let bytes = std::fs::read(dir.join(&f.path)).expect("file");
        f.sha256 = format!("sha256:{}", sha256_hex(&bytes));
        f.size = bytes.len() as u64;
    }
    let mut bytes = serde_json::to_vec_pretty(&index).expect("json");
    bytes.push(b'\n');
    std::fs::write(dir.join("index.json"), &bytes).expect("write");
    let sig = signer.sign(&bytes).expect("sign");
    std::fs::write(dir.join("index.sig.json"), sig.to_bytes()).expect("write");
}

type Edit<'a> = Box<dyn FnOnce(&Path) + 'a>;

#[test]
fn a_real_run_bundle_verifies_and_every_tampered_hop_is_named_by_the_library_and_the_cli() {
    let w = World::new();
    let state = w.path("state");
    let capsule = approved_script_capsule(&w, "capsule");
    let (code, event) = run(&w, &state, &capsule);
    assert_eq!(code, 0, "{event:?}");
    let EventData::Run(_, data) = &event.data else {
        panic!("a run event");
    };
    let bundle = PathBuf::from(&data.evidence_bundle);

    // The index: every other file, with the run's facts.
    let index = Index::parse(&std::fs::read(bundle.join("index.json")).expect("index"))
        .expect("index parses");
    assert_eq!(index.kind, IndexKind::Run);
    assert_eq!(index.run_id, event.id);
    assert_eq!(index.runner_id.as_deref(), Some(RUNNER));
    let jws = std::fs::read(capsule.join("capsule.jws")).expect("jws");
    assert_eq!(
        index.capsule_digest,
        Some(format!("sha256:{}", sha256_hex(&jws)))
    );
    let policy = w.governance_policy_with(verify_core::crypto::default_backend());
    assert_eq!(index.policy_sha256, policy.digests.policy.to_string());
    assert_eq!(index.policy_version, policy.policy_version);
    assert_eq!(
        index.trust_store_sha256,
        policy
            .digests
            .trust_store(verify_core::crypto::default_backend())
            .to_string()
    );
    assert_eq!(index.egress_mode.as_str(), "local-only");
    let paths: Vec<&str> = index.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "approvals/alice-sre-lead.jws",
            "approvals/bob-security.jws",
            "capsule.jws",
            "decision.json",
            "event.json",
            "oci-config.json",
            "sandbox.json",
            "stderr",
            "stdout"
        ]
    );
    let snapshot = index
        .trust_snapshot
        .capsule_key
        .as_ref()
        .expect("capsule key");
    assert_eq!(snapshot.kid, capsule_tests::ES_KID);
    assert!(snapshot.x.is_some() && snapshot.fingerprint.is_none());
    let approver_kids: Vec<&str> = index
        .trust_snapshot
        .approvers
        .iter()
        .map(|k| k.kid.as_str())
        .collect();
    assert_eq!(approver_kids.len(), 2);
    let exe = std::fs::read(env!("CARGO_BIN_EXE_capsule-gateway")).expect("binary");
    assert_eq!(
        index.gateway.binary_sha256,
        format!("sha256:{}", sha256_hex(&exe))
    );
    assert!(index.gateway.version.starts_with(env!("CARGO_PKG_VERSION")));
    let sig: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("index.sig.json")).expect("sig"))
            .expect("json");
    assert_eq!(sig["kind"], "software", "no TPM configured: {sig}");

    // The whole bundle holds, through the library and the binary; --json lists every
    // hop with its verdict.
    assert_eq!(lib_verify(&bundle, &VerifyOptions::default()), None);
    let (code, report) = cli_verify(&bundle, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["verdict"], "holds");
    assert_eq!(report["signer"]["kind"], "software");
    let hops: Vec<(&str, &str)> = report["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(|h| {
            (
                h["hop"].as_str().expect("hop"),
                h["verdict"].as_str().expect("v"),
            )
        })
        .collect();
    assert_eq!(hops.len(), 15, "{hops:?}");
    assert!(hops.iter().all(|(_, v)| *v == "holds"), "{hops:?}");
    let text = bin()
        .args(["evidence", "verify"])
        .arg(&bundle)
        .output()
        .expect("text output");
    assert_eq!(text.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&text.stdout).contains(": OK"));

    // Tampered copies. Re-signed ones were re-indexed and signed again with the
    // bundle's own custody key, so only the hop itself can catch them.
    let key = CustodySigner::software(&state.join("custody")).expect("the bundle's key");
    let other_jws = {
        let mut m = w.governed_manifest("production");
        m["capsule_id"] = json!("another-capsule");
        w.sign(m.to_string().as_bytes(), Signer::Es256)
    };
    let foreign_approval = {
        let other = w.capsule(
            "foreign",
            &{
                let mut m = w.governed_manifest("production");
                m["capsule_id"] = json!("foreign-capsule");
                m
            },
            Signer::Es256,
        );
        std::fs::read(w.approve(&other, ALICE, "sre-lead")).expect("approval")
    };
    let carol_approval = {
        // A valid approval of this very manifest by an approver the snapshot does
        // not hold.
        std::fs::read(w.approve(&capsule, CAROL, "security")).expect("approval")
    };
    let cases: Vec<(&str, bool, Edit)> = vec![
        (
            "outputs",
            true,
            Box::new(|d| std::fs::write(d.join("stdout"), b"nothing to see\n").expect("w")),
        ),
        (
            "outputs",
            true,
            Box::new(|d| std::fs::write(d.join("stderr"), b"\n").expect("w")),
        ),
        (
            "sandbox",
            true,
            Box::new(|d| edit_json(&d.join("sandbox.json"), |v| v["exit_code"] = json!(7))),
        ),
        (
            "decision",
            true,
            Box::new(|d| edit_json(&d.join("decision.json"), |v| v["verdict"] = json!("deny"))),
        ),
        (
            "capsule_digest",
            true,
            Box::new(move |d| std::fs::write(d.join("capsule.jws"), &other_jws).expect("w")),
        ),
        (
            "approvals",
            true,
            Box::new(move |d| {
                std::fs::write(d.join("approvals/alice-sre-lead.jws"), &foreign_approval)
                    .expect("w")
            }),
        ),
        (
            "approvals",
            true,
            Box::new(move |d| {
                std::fs::write(d.join("approvals/bob-security.jws"), &carol_approval).expect("w")
            }),
        ),
        (
            "oci_config",
            true,
            Box::new(|d| {
                edit_json(&d.join("oci-config.json"), |v| {
                    v["hostname"] = json!("elsewhere")
                })
            }),
        ),
        (
            "run_id",
            true,
            Box::new(|d| edit_json(&d.join("sandbox.json"), |v| v["run_id"] = json!("other"))),
        ),
        (
            "policy_version",
            true,
            Box::new(|d| {
                edit_json(&d.join("index.json"), |v| {
                    v["policy_version"] = json!("1999")
                })
            }),
        ),
        // Not re-signed: the index or its signature catch them first.
        (
            "index",
            false,
            Box::new(|d| std::fs::write(d.join("stdout"), b"nothing to see\n").expect("w")),
        ),
        (
            "index_signature",
            false,
            Box::new(|d| edit_json(&d.join("index.json"), |v| v["files"][8]["size"] = json!(1))),
        ),
        (
            "index_signature",
            false,
            Box::new(|d| {
                edit_json(&d.join("index.sig.json"), |v| {
                    v["signature"] = json!(attest::b64::encode(&[7u8; 64]))
                })
            }),
        ),
        (
            "index_signature",
            false,
            Box::new(|d| std::fs::remove_file(d.join("index.sig.json")).expect("rm")),
        ),
        (
            "index",
            false,
            Box::new(|d| std::fs::write(d.join("extra"), b"added\n").expect("w")),
        ),
        (
            "index",
            false,
            Box::new(|d| std::fs::remove_file(d.join("stderr")).expect("rm")),
        ),
        (
            "index",
            false,
            Box::new(|d| std::fs::remove_file(d.join("approvals/bob-security.jws")).expect("rm")),
        ),
    ];
    let root = w.path("tampered");
    for (n, (hop, resign, edit)) in cases.into_iter().enumerate() {
        let copy = edited(&root, &bundle, n, |d| {
            edit(d);
            if resign {
                reindex(d, &key);
            }
        });
        assert_eq!(
            lib_verify(&copy, &VerifyOptions::default()).as_deref(),
            Some(hop),
            "case {n} through the library"
        );
        let (code, report) = cli_verify(&copy, &[]);
        assert_eq!(code, 1, "case {n}: {report}");
        assert_eq!(report["first_failure"], hop, "case {n} through the cli");
        assert_eq!(report["verdict"], "broken");
    }

    // Signed again by a key that is not the bundle's: the signature verifies with
    // the key it carries, but an auditor pinning the TPM identity refuses it
    // (custody_tpm.rs); here the signer's key is reported for comparison.
    let forged = edited(&root, &bundle, 100, |d| {
        let stranger = CustodySigner::software(&d.join("../stranger")).expect("key");
        reindex(d, &stranger);
    });
    let (code, report) = cli_verify(&forged, &[]);
    assert_eq!(code, 0, "{report}");
    assert_ne!(
        report["signer"]["key_thumbprint"],
        json!(key.key_thumbprint())
    );
    std::fs::remove_dir_all(forged.parent().expect("copy dir").join("stranger")).ok();

    // Key rotation: the ES256 key is gone from the new trust store. The bundle still
    // verifies from its snapshot; with --trust of the old store too; with --trust of
    // the new store only, it fails at the signature (the auditor asked whether the
    // trust in force today still vouches for it: it does not).
    let old = w.path("trusted.jwks.json");
    let rotated = w.write_mode(
        "rotated.jwks.json",
        json!({ "keys": [serde_json::from_slice::<Value>(&std::fs::read(&old).expect("old"))
            .expect("json")["keys"][2].clone()] })
        .to_string()
        .as_bytes(),
        0o644,
    );
    assert_eq!(cli_verify(&bundle, &[]).0, 0);
    assert_eq!(cli_verify(&bundle, &["--trust", s(&old)]).0, 0);
    let (code, report) = cli_verify(&bundle, &["--trust", s(&rotated)]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_failure"], "signature");
    let trust = verify_core::keys::KeyStore::load(&rotated, verify_core::crypto::default_backend())
        .expect("rotated store");
    let opts = VerifyOptions {
        trust: Some(&trust),
        identity: None,
    };
    assert_eq!(lib_verify(&bundle, &opts).as_deref(), Some("signature"));

    // Usage: not a bundle, a bad --trust.
    let out = bin()
        .args(["evidence", "verify"])
        .arg(w.path("no-such-bundle"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = bin()
        .args(["evidence", "verify", "--trust"])
        .arg(w.path("no-such.jwks"))
        .arg(&bundle)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));

    exports(&w, &bundle, &key);
}

/// What an export does with one file: its status and, when masked, the masked bytes.
type FileRule<'a> = &'a dyn Fn(&str) -> (&'static str, Option<Vec<u8>>);

/// An export directory built by hand to the format docs/evidence.md gives.
struct ExportSpec<'a> {
    mode: &'a str,
    status: FileRule<'a>,
    with_index: bool,
}

fn build_export(bundle: &Path, out: &Path, spec: &ExportSpec<'_>, signer: &CustodySigner) {
    std::fs::create_dir_all(out.join("approvals")).expect("mkdir");
    let index_bytes = std::fs::read(bundle.join("index.json")).expect("index");
    let index = Index::parse(&index_bytes).expect("index");
    let mut files = Vec::new();
    for f in &index.files {
        let (status, masked) = (spec.status)(&f.path);
        let mut entry = json!({ "path": f.path, "status": status });
        match status {
            "included" => {
                std::fs::copy(bundle.join(&f.path), out.join(&f.path)).expect("copy");
            }
            "masked" => {
                let bytes = masked.expect("masked bytes");
                std::fs::write(out.join(&f.path), &bytes).expect("write");
                entry["sha256"] = json!(format!("sha256:{}", sha256_hex(&bytes)));
                entry["size"] = json!(bytes.len());
                entry["masked_by"] = json!(["token=[^ ]+"]);
            }
            _ => {}
        }
        files.push(entry);
    }
    if std::fs::read_dir(out.join("approvals"))
        .expect("ls")
        .next()
        .is_none()
    {
        std::fs::remove_dir(out.join("approvals")).expect("rmdir");
    }
    if spec.with_index {
        std::fs::copy(bundle.join("index.json"), out.join("index.json")).expect("copy");
        std::fs::copy(bundle.join("index.sig.json"), out.join("index.sig.json")).expect("copy");
    }
    let doc = json!({
        "schema": "capsule-gateway/evidence-export/v1",
        "mode": spec.mode,
        "run_id": index.run_id,
        "index_sha256": format!("sha256:{}", sha256_hex(&index_bytes)),
        "files": files,
    });
    let bytes = serde_json::to_vec_pretty(&doc).expect("json");
    std::fs::write(out.join("export.json"), &bytes).expect("write");
    let sig = signer.sign(&bytes).expect("sign");
    std::fs::write(out.join(sig_name("export.json")), sig.to_bytes()).expect("write");
}

fn verdicts(report: &Value) -> Vec<(String, String)> {
    report["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(|h| {
            (
                h["hop"].as_str().expect("hop").to_string(),
                h["verdict"].as_str().expect("verdict").to_string(),
            )
        })
        .collect()
}

fn contains(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).expect("ls").flatten().any(|e| {
        if e.file_type().expect("type").is_dir() {
            return contains(&e.path(), needle);
        }
        let bytes = std::fs::read(e.path()).expect("read");
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

fn exports(w: &World, bundle: &Path, key: &CustodySigner) {
    let mask = |bytes: &[u8]| -> Vec<u8> {
        String::from_utf8_lossy(bytes)
            .replace(SECRET, "token=***")
            .into_bytes()
    };
    let event = std::fs::read(bundle.join("event.json")).expect("event");
    let stdout = std::fs::read(bundle.join("stdout")).expect("stdout");
    let root = w.path("exports");

    // Every file included: the whole chain is walked in the export.
    let all = root.join("all");
    build_export(
        bundle,
        &all,
        &ExportSpec {
            mode: "sanitized",
            status: &|_| ("included", None),
            with_index: true,
        },
        key,
    );
    let (code, report) = cli_verify(&all, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["form"], "export");
    assert!(
        verdicts(&report).iter().all(|(_, v)| v == "holds"),
        "{report}"
    );

    // Sanitized: event and outputs masked, each with its own digest; the secret is
    // nowhere in the export, and the hops reading them are reported masked.
    let sanitized = root.join("sanitized");
    let (ev, out) = (mask(&event), mask(&stdout));
    build_export(
        bundle,
        &sanitized,
        &ExportSpec {
            mode: "sanitized",
            status: &|p| match p {
                "event.json" => ("masked", Some(ev.clone())),
                "stdout" => ("masked", Some(out.clone())),
                _ => ("included", None),
            },
            with_index: true,
        },
        key,
    );
    assert!(!contains(&sanitized, SECRET.as_bytes()), "the secret left");
    assert!(contains(bundle, SECRET.as_bytes()), "the bundle keeps it");
    let (code, report) = cli_verify(&sanitized, &[]);
    assert_eq!(code, 0, "{report}");
    let v = verdicts(&report);
    assert!(v.contains(&("outputs".into(), "masked".into())), "{v:?}");
    assert!(v.contains(&("signature".into(), "indexed".into())), "{v:?}");
    assert!(v.contains(&("export".into(), "holds".into())), "{v:?}");
    assert!(
        report["files"]
            .as_array()
            .expect("files")
            .contains(&json!({"path": "stdout", "status": "masked"})),
        "{report}"
    );

    // Metadata-only: the index and decision.json; everything else withheld.
    let metadata = root.join("metadata");
    build_export(
        bundle,
        &metadata,
        &ExportSpec {
            mode: "metadata-only",
            status: &|p| {
                if p == "decision.json" {
                    ("included", None)
                } else {
                    ("withheld", None)
                }
            },
            with_index: true,
        },
        key,
    );
    let (code, report) = cli_verify(&metadata, &[]);
    assert_eq!(code, 0, "{report}");
    let v = verdicts(&report);
    assert!(v.contains(&("outputs".into(), "withheld".into())), "{v:?}");
    assert!(
        v.contains(&("index_signature".into(), "holds".into())),
        "{v:?}"
    );

    // Local-only: nothing but the signed export naming the index's digest.
    let local = root.join("local");
    build_export(
        bundle,
        &local,
        &ExportSpec {
            mode: "local-only",
            status: &|_| ("withheld", None),
            with_index: false,
        },
        key,
    );
    assert_eq!(std::fs::read_dir(&local).expect("ls").count(), 2);
    let (code, report) = cli_verify(&local, &[]);
    assert_eq!(code, 0, "{report}");
    assert!(
        verdicts(&report)[1..].iter().all(|(_, v)| v == "withheld"),
        "{report}"
    );

    // Broken exports, each at the export hop (or the index's signature).
    let broken: Vec<(&str, &str, Edit)> = vec![
        (
            "sanitized",
            "export",
            Box::new(|d| std::fs::write(d.join("stderr"), b"edited\n").expect("w")),
        ),
        (
            "sanitized",
            "export",
            Box::new(|d| std::fs::write(d.join("stdout"), b"token=***\n?").expect("w")),
        ),
        (
            "metadata",
            "export",
            Box::new(|d| std::fs::write(d.join("stdout"), b"withheld, yet here\n").expect("w")),
        ),
        (
            "metadata",
            "export",
            Box::new(|d| std::fs::write(d.join("notes"), b"listed nowhere\n").expect("w")),
        ),
        (
            "sanitized",
            "export",
            Box::new(|d| {
                edit_json(&d.join("export.json"), |v| {
                    v["mode"] = json!("metadata-only")
                })
            }),
        ),
        (
            "sanitized",
            "index_signature",
            Box::new(|d| edit_json(&d.join("index.json"), |v| v["runner_id"] = json!(null))),
        ),
        (
            "local",
            "export",
            Box::new(|d| std::fs::write(d.join("stdout"), b"leaked\n").expect("w")),
        ),
    ];
    for (n, (base, hop, edit)) in broken.into_iter().enumerate() {
        let copy = root.join(format!("broken-{n}"));
        copy_dir(&root.join(base), &copy);
        edit(&copy);
        assert_eq!(
            lib_verify(&copy, &VerifyOptions::default()).as_deref(),
            Some(hop),
            "export case {n}"
        );
        let (code, report) = cli_verify(&copy, &[]);
        assert_eq!(
            (code, report["first_failure"].as_str()),
            (1, Some(hop)),
            "{report}"
        );
    }
    // Signed by another key than the index's.
    let stranger = CustodySigner::software(&root.join("stranger")).expect("key");
    let other = root.join("other-signer");
    build_export(
        bundle,
        &other,
        &ExportSpec {
            mode: "sanitized",
            status: &|_| ("included", None),
            with_index: true,
        },
        &stranger,
    );
    assert_eq!(
        lib_verify(&other, &VerifyOptions::default()).as_deref(),
        Some("export")
    );
}

#[test]
fn denials_leave_a_signed_bundle_of_digests_that_verifies() {
    let w = World::new();
    let state = w.path("state");
    // Signed by a key the tenant does not allow: denied, with a digest.
    let capsule = w.good_capsule("denied", Signer::Other);
    let out = bin()
        .args(["admit", "--policy", s(&w.policy_path()), "--runner", RUNNER])
        .args(["--state", s(&state), s(&capsule)])
        .output()
        .expect("admit");
    assert_eq!(out.status.code(), Some(1));
    let root = state.join("evidence");
    let bundles: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("evidence root")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(bundles.len(), 1, "{bundles:?}");
    let bundle = &bundles[0];
    let index =
        Index::parse(&std::fs::read(bundle.join("index.json")).expect("index")).expect("index");
    assert_eq!(index.kind, IndexKind::Denial);
    let paths: Vec<&str> = index.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["decision.json", "event.json"]);
    let jws = std::fs::read(capsule.join("capsule.jws")).expect("jws");
    assert_eq!(
        index.capsule_digest,
        Some(format!("sha256:{}", sha256_hex(&jws)))
    );
    // No presented bytes: not the JWS, not its payload.
    assert!(!contains(bundle, &jws[..40]));

    assert_eq!(lib_verify(bundle, &VerifyOptions::default()), None);
    let (code, report) = cli_verify(bundle, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["kind"], "denial");
    let v = verdicts(&report);
    assert!(v.contains(&("decision".into(), "holds".into())), "{v:?}");
    assert!(
        v.contains(&("outputs".into(), "not_applicable".into())),
        "{v:?}"
    );

    // A denial bundle cannot be passed off as an admission, even re-signed.
    let key = CustodySigner::software(&state.join("custody")).expect("key");
    let copy = edited(&w.path("t"), bundle, 0, |d| {
        edit_json(&d.join("decision.json"), |v| v["verdict"] = json!("admit"));
        reindex(d, &key);
    });
    let (code, report) = cli_verify(&copy, &[]);
    assert_eq!(
        (code, report["first_failure"].as_str()),
        (1, Some("decision"))
    );
    let copy = edited(&w.path("t"), bundle, 1, |d| {
        std::fs::write(d.join("capsule.jws"), &jws).expect("w");
    });
    assert_eq!(
        lib_verify(&copy, &VerifyOptions::default()).as_deref(),
        Some("index")
    );

    // `verify --state` writes one too; `verify` without a state writes nothing.
    let out = bin()
        .args([
            "verify",
            "--policy",
            s(&w.policy_path()),
            "--runner",
            RUNNER,
        ])
        .arg(&capsule)
        .output()
        .expect("verify");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&root).expect("ls").count(), 1);
    let out = bin()
        .args([
            "verify",
            "--policy",
            s(&w.policy_path()),
            "--runner",
            RUNNER,
        ])
        .args(["--state", s(&state)])
        .arg(&capsule)
        .output()
        .expect("verify");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&root).expect("ls").count(), 2);
}
