//! A run whose bundle index is signed by a TPM (a real swtpm, Debian package
//! `swtpm`, started here): TPM2_Quote by the identity key over sha256(index.json),
//! verified offline with `evidence verify --identity` (the file `attest identity
//! --out` writes). One real gVisor run (Debian package `runsc`) for the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attest_testkit::Swtpm;
use capsule_gateway::evidence::{Event, EventData};
use capsule_tests::{Signer, World, RUNNER};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn gw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
        .env_remove("TCTI")
        .args(args)
        .output()
        .expect("run capsule-gateway")
}

fn identity(t: &Swtpm, out: &Path) {
    let o = gw(&["attest", "identity", "--tcti", &t.tcti(), "--out", s(out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn verify(path: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["evidence", "verify", "--json"];
    args.extend_from_slice(extra);
    args.push(s(path));
    let o = gw(&args);
    let report = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "one JSON report ({e}); stderr {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().expect("exit code"), report)
}

#[test]
fn a_bundle_quoted_by_swtpm_verifies_with_its_identity_key_and_no_other() {
    let w = World::new();
    let tpm = Swtpm::start().expect("swtpm (Debian package swtpm)");
    let other_tpm = Swtpm::start().expect("a second swtpm");
    let id = w.path("identity.json");
    let other_id = w.path("other-identity.json");
    identity(&tpm, &id);
    identity(&other_tpm, &other_id);

    let files: [(&str, &[u8]); 1] = [("run.sh", b"echo quoted run\n")];
    let capsule =
        w.capsule_with_files("capsule", &w.script_manifest(&files), &files, Signer::Es256);
    let state = w.path("state");
    let o = gw(&[
        "run",
        "--policy",
        s(&w.policy_path()),
        "--runner",
        RUNNER,
        "--state",
        s(&state),
        "--tcti",
        &tpm.tcti(),
        s(&capsule),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let event =
        Event::parse(String::from_utf8_lossy(&o.stdout).trim_end().as_bytes()).expect("event");
    let EventData::Run(_, data) = &event.data else {
        panic!("a run")
    };
    let bundle = PathBuf::from(&data.evidence_bundle);
    let sig: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("index.sig.json")).expect("sig"))
            .expect("json");
    assert_eq!(sig["kind"], "tpm", "{sig}");
    assert_eq!(sig["quote"]["pcrs"]["selection"], "sha256:0,7", "{sig}");
    assert!(
        !state.join("custody").exists(),
        "no software key is made when the TPM signs"
    );

    // Offline, with the identity key: holds, and says it was a TPM.
    let (code, report) = verify(&bundle, &["--identity", s(&id)]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["signer"]["kind"], "tpm");
    assert_eq!(report["signer"]["tpm"]["software"], true, "swtpm says so");
    // Without it too (the quote verifies with the key it carries).
    assert_eq!(verify(&bundle, &[]).0, 0);

    // Another TPM's identity: refused at the index's signature.
    let (code, report) = verify(&bundle, &["--identity", s(&other_id)]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_failure"], "index_signature");
    let detail = report["hops"][0]["detail"].as_str().expect("detail");
    assert!(detail.contains("not the identity key"), "{detail}");

    // A software-signed bundle where the TPM key is expected: refused.
    let soft_state = w.path("soft-state");
    let denied = w.good_capsule("denied", Signer::Other);
    let o = gw(&[
        "admit",
        "--policy",
        s(&w.policy_path()),
        "--runner",
        RUNNER,
        "--state",
        s(&soft_state),
        s(&denied),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let soft = std::fs::read_dir(soft_state.join("evidence"))
        .expect("evidence")
        .flatten()
        .next()
        .expect("a denial bundle")
        .path();
    assert_eq!(verify(&soft, &[]).0, 0);
    let (code, report) = verify(&soft, &["--identity", s(&id)]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_failure"], "index_signature");

    // A TPM that is configured and has no identity key: a configuration error,
    // before anything is admitted.
    let bare = Swtpm::start().expect("a third swtpm");
    let o = gw(&[
        "admit",
        "--policy",
        s(&w.policy_path()),
        "--runner",
        RUNNER,
        "--state",
        s(&w.path("bare-state")),
        "--tcti",
        &bare.tcti(),
        s(&denied),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A missing --identity file is usage.
    let o = gw(&[
        "evidence",
        "verify",
        "--identity",
        s(&w.path("no-such.json")),
        s(&bundle),
    ]);
    assert_eq!(o.status.code(), Some(2));
}
