//! `selfcheck` on a deployment built here (a real policy, state, SVID, deployment
//! manifest and, for the TPM check, a real swtpm, Debian package `swtpm`), through the
//! library and the CLI binary: a healthy deployment passes every canary, host and
//! alignment check and leaves the real state byte for byte as it was; each canary is
//! denied with its exact reason; an edited policy or trust file is DRIFT naming it; a
//! forged or wrongly keyed manifest fails; an expired SVID fails; a state restored
//! from an older copy fails `host.checkpoint`; a dead TPM fails `host.tpm`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attest_testkit::{SvidSpec, Swtpm, TestCa};
use capsule_gateway::selfcheck::target::{AlignmentTarget, Flags};
use capsule_gateway::selfcheck::{self, Report, Target, Verdict};
use capsule_tests::{Signer, World, RUNNER};
use common::versioned_manifest;
use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"));
    c.env_remove("TCTI");
    c
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "stdout {} stderr {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A deployment: policy and trust store, a state with admissions in it, the
/// gateway's SVID, an operator key and a deployment manifest signed for the gateway
/// binary.
struct Deployment {
    world: World,
    ca: TestCa,
    root: tempfile::TempDir,
    versions: u64,
}

impl Deployment {
    fn new() -> Deployment {
        let d = Deployment {
            world: World::new(),
            ca: TestCa::new(common::TRUST_DOMAIN),
            root: tempfile::tempdir().expect("tempdir"),
            versions: 0,
        };
        let svid = d.ca.issue(&SvidSpec::id(common::GATEWAY_ID));
        d.ca.write_svid_dir(&d.svid(), &svid);
        ok(bin()
            .args(["keygen", "--alg", "ES256", "--kid", "operator", "--out"])
            .arg(d.path("keys"))
            .output()
            .expect("keygen"));
        ok(bin()
            .args(["keygen", "--alg", "ES256", "--kid", "intruder", "--out"])
            .arg(d.path("keys"))
            .output()
            .expect("keygen"));
        d
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }
    fn state(&self) -> PathBuf {
        self.path("state")
    }
    fn svid(&self) -> PathBuf {
        self.path("svid")
    }
    fn manifest(&self) -> PathBuf {
        self.path("deployment.jws")
    }
    fn operator_jwks(&self) -> PathBuf {
        self.path("keys/operator.public.jwks.json")
    }

    /// Admits the next version of one capsule into the real state (a checkpoint per
    /// batch, so the witness moves).
    fn admit_next(&mut self) {
        self.versions += 1;
        let m = versioned_manifest(&self.world, "svc", self.versions);
        let name = format!("capsule-v{}", self.versions);
        let c = self.world.capsule(&name, &m, Signer::Es256);
        ok(bin()
            .args(["admit", "--policy", s(&self.world.policy_path())])
            .args(["--runner", RUNNER, "--state", s(&self.state())])
            .arg(&c)
            .output()
            .expect("admit"));
    }

    /// `align sign` with `key` (`operator` or `intruder`) for `binary`, to `out`.
    fn sign(&self, key: &str, binary: &Path, out: &Path) {
        let _ = std::fs::remove_file(out);
        ok(bin()
            .args(["align", "sign", "--key"])
            .arg(self.path(&format!("keys/{key}.private.jwk.json")))
            .args(["--policy", s(&self.world.policy_path())])
            .args(["--binary", s(binary), "--out", s(out)])
            .output()
            .expect("align sign"));
    }

    fn flags(&self) -> Flags {
        Flags {
            policy: self.world.policy_path(),
            state: Some(self.state()),
            svid: Some(self.svid()),
            alignment: Some(AlignmentTarget {
                manifest: self.manifest(),
                key: self.operator_jwks(),
            }),
            ..Flags::default()
        }
    }

    /// The library run, aligned against `binary`.
    fn run(&self, flags: Flags, binary: &Path) -> Report {
        let mut target = Target::from_flags(flags);
        target.binary = Some(binary.to_path_buf());
        selfcheck::run(&target)
    }

    /// The CLI run with the deployment's flags plus `extra`: (exit code, report).
    fn cli(&self, extra: &[&str]) -> (i32, Value) {
        let o = bin()
            .args([
                "selfcheck",
                "--json",
                "--policy",
                s(&self.world.policy_path()),
            ])
            .args(["--state", s(&self.state()), "--svid", s(&self.svid())])
            .args(["--manifest", s(&self.manifest())])
            .args(["--manifest-key", s(&self.operator_jwks())])
            .args(extra)
            .output()
            .expect("selfcheck");
        let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "one JSON report ({e}); stdout {} stderr {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (o.status.code().expect("exit code"), v)
    }
}

fn gateway_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn verdict<'a>(r: &'a Report, name: &str) -> (Verdict, &'a str) {
    let c = r
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name} in\n{}", r.to_text()));
    (c.verdict, c.detail.as_str())
}

fn cli_check<'a>(v: &'a Value, name: &str) -> (&'a str, &'a str) {
    let c = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {v}"));
    (
        c["verdict"].as_str().expect("verdict"),
        c["detail"].as_str().expect("detail"),
    )
}

/// Every file under `dir` and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

const CANARIES: [(&str, &str); 7] = [
    ("canary.signed", ""),
    ("canary.unsigned", "denied alg_not_allowed"),
    ("canary.altered_artifact", "denied digest_mismatch"),
    ("canary.altered_payload", "denied signature_invalid"),
    ("canary.expired", "denied expired"),
    ("canary.wrong_key", "denied unknown_kid"),
    ("canary.rollback", "denied rollback"),
];

#[test]
fn a_healthy_deployment_passes_and_leaves_the_real_state_as_it_was() {
    let mut d = Deployment::new();
    d.admit_next();
    d.admit_next();
    let bin = gateway_binary();
    d.sign("operator", &bin, &d.manifest());
    let trust = d.world.path("trusted.jwks.json");
    let (state_before, trust_before) = (snapshot(&d.state()), std::fs::read(&trust).expect("jwks"));

    let r = d.run(d.flags(), &bin);
    assert!(r.passed(), "{}", r.to_text());
    for (name, detail) in CANARIES {
        let (v, got) = verdict(&r, name);
        assert_eq!(v, Verdict::Pass, "{name}: {got}");
        if detail.is_empty() {
            assert!(got.starts_with("admitted"), "{name}: {got}");
        } else {
            assert_eq!(got, detail, "{name}");
        }
    }
    for name in ["host.svid", "host.clock", "host.state", "host.checkpoint"] {
        assert_eq!(
            verdict(&r, name).0,
            Verdict::Pass,
            "{name}: {}",
            verdict(&r, name).1
        );
    }
    assert!(verdict(&r, "host.checkpoint")
        .1
        .starts_with("last checkpoint #1 "));
    assert_eq!(
        verdict(&r, "host.tpm"),
        (Verdict::Notice, "no TPM configured")
    );
    assert_eq!(verdict(&r, "host.sealed_keys").0, Verdict::Notice);
    let (v, detail) = verdict(&r, "alignment");
    assert_eq!(v, Verdict::Pass, "{detail}");
    assert!(detail.starts_with("ALIGNED: binary sha256:"), "{detail}");

    // Nothing the canaries did reached the real state or trust store.
    assert_eq!(
        snapshot(&d.state()),
        state_before,
        "the real state is byte-identical"
    );
    assert_eq!(std::fs::read(&trust).expect("jwks"), trust_before);

    // The CLI binary: the same checks, exit 0, and the text form.
    let (code, v) = d.cli(&[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["passed"], true);
    for (name, _) in CANARIES {
        assert_eq!(cli_check(&v, name).0, "pass", "{name}");
    }
    assert_eq!(cli_check(&v, "alignment").0, "pass");
    let text = ok(bin_selfcheck_text(&d));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("PASS   canary.rollback"), "{text}");
    assert!(text.contains("selfcheck: PASS ("), "{text}");
    println!("{text}");
}

fn bin_selfcheck_text(d: &Deployment) -> Output {
    bin()
        .args(["selfcheck", "--policy", s(&d.world.policy_path())])
        .args(["--state", s(&d.state()), "--svid", s(&d.svid())])
        .args(["--manifest", s(&d.manifest())])
        .args(["--manifest-key", s(&d.operator_jwks())])
        .output()
        .expect("selfcheck")
}

#[test]
fn an_edited_policy_or_trust_file_is_drift_naming_it_and_a_forged_manifest_fails() {
    let mut d = Deployment::new();
    d.admit_next();
    // Signed by the CLI for its own binary: the CLI's alignment is its own.
    let bin = gateway_binary();
    d.sign("operator", &bin, &d.manifest());
    assert_eq!(d.cli(&[]).0, 0);

    let policy = d.world.policy_path();
    let original = std::fs::read(&policy).expect("policy");
    let mut edited = original.clone();
    edited.extend_from_slice(b"# edited after align sign\n");
    std::fs::write(&policy, &edited).expect("edit policy");
    let (code, v) = d.cli(&[]);
    assert_eq!(code, 1, "{v}");
    let (got, detail) = cli_check(&v, "alignment");
    assert_eq!(got, "fail");
    assert!(
        detail.starts_with("DRIFT: policy (manifest sha256:"),
        "{detail}"
    );
    assert!(
        !detail.contains("binary (") && !detail.contains("trust_store ("),
        "{detail}"
    );
    std::fs::write(&policy, &original).expect("restore policy");

    // The trust file rewritten (same keys, other bytes): the trust store drifted.
    let trust = d.world.path("trusted.jwks.json");
    let jwks: Value = serde_json::from_slice(&std::fs::read(&trust).expect("jwks")).expect("json");
    std::fs::write(&trust, serde_json::to_vec_pretty(&jwks).expect("json")).expect("rewrite");
    let r = d.run(d.flags(), &bin);
    let (v, detail) = verdict_owned(&r, "alignment");
    assert_eq!(v, Verdict::Fail);
    assert!(
        detail.starts_with("DRIFT: trust_store (manifest sha256:"),
        "{detail}"
    );
    assert!(!detail.contains("policy ("), "{detail}");

    // Another binary than the one signed.
    let r = d.run(d.flags(), Path::new("/bin/sh"));
    assert!(
        verdict(&r, "alignment").1.contains("binary (manifest"),
        "{}",
        r.to_text()
    );

    // Signed by a key the deployment does not trust: never ALIGNED.
    d.sign("intruder", &bin, &d.manifest());
    let (code, v) = d.cli(&[]);
    assert_eq!(code, 1);
    let (verdict_s, detail) = cli_check(&v, "alignment");
    assert_eq!(verdict_s, "fail");
    assert!(detail.starts_with("manifest not trusted:"), "{detail}");
    assert!(detail.contains("unknown_kid"), "{detail}");

    // The operator's manifest with its payload swapped for another (forged digests).
    d.sign("operator", &bin, &d.manifest());
    let jws = std::fs::read_to_string(d.manifest()).expect("manifest");
    let parts: Vec<&str> = jws.split('.').collect();
    let forged_payload = serde_json::json!({
        "schema": "capsule-gateway/deployment/v1",
        "binary": format!("sha256:{}", "00".repeat(32)),
        "policy": format!("sha256:{}", "00".repeat(32)),
        "trust_store": format!("sha256:{}", "00".repeat(32)),
        "signed_at": 1
    });
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        verify_core::b64::encode(forged_payload.to_string().as_bytes()),
        parts[2]
    );
    std::fs::write(d.manifest(), forged).expect("forge");
    let r = d.run(d.flags(), &bin);
    let (v, detail) = verdict(&r, "alignment");
    assert_eq!(v, Verdict::Fail);
    assert!(
        detail.starts_with("manifest not trusted:") && detail.contains("signature_invalid"),
        "{detail}"
    );
}

fn verdict_owned(r: &Report, name: &str) -> (Verdict, String) {
    let (v, d) = verdict(r, name);
    (v, d.to_string())
}

#[test]
fn an_expired_svid_fails() {
    let mut d = Deployment::new();
    d.admit_next();
    let expired = d.ca.issue(&SvidSpec::id(common::GATEWAY_ID).expired());
    d.ca.write_svid_dir(&d.path("expired-svid"), &expired);
    let mut flags = d.flags();
    flags.svid = Some(d.path("expired-svid"));
    flags.alignment = None;
    let r = d.run(flags, &gateway_binary());
    let (v, detail) = verdict(&r, "host.svid");
    assert_eq!(v, Verdict::Fail, "{detail}");
    assert!(detail.contains("expired"), "{detail}");
    assert!(!r.passed());
    let (code, v) = {
        let o = bin()
            .args(["selfcheck", "--json", "--policy", s(&d.world.policy_path())])
            .args(["--svid", s(&d.path("expired-svid"))])
            .output()
            .expect("selfcheck");
        (
            o.status.code().expect("code"),
            serde_json::from_slice::<Value>(&o.stdout).expect("json"),
        )
    };
    assert_eq!(code, 1);
    assert_eq!(cli_check(&v, "host.svid").0, "fail");
    assert_eq!(cli_check(&v, "host.state").0, "notice");
}

#[test]
fn a_state_restored_from_an_older_copy_fails_the_checkpoint_check() {
    let mut d = Deployment::new();
    d.admit_next();
    let witness = d.root.path().join("state.witness");
    let w1: Value =
        serde_json::from_slice(&std::fs::read(&witness).expect("witness")).expect("json");
    assert_eq!(w1["number"], 0);
    let old = d.path("state-copy");
    ok(Command::new("cp")
        .arg("-a")
        .arg(d.state())
        .arg(&old)
        .output()
        .expect("cp"));
    d.admit_next();
    let w2: Value =
        serde_json::from_slice(&std::fs::read(&witness).expect("witness")).expect("json");
    assert_eq!(w2["number"], 1, "the witness moved with the new checkpoint");
    let mut flags = d.flags();
    flags.alignment = None;
    let r = d.run(flags, &gateway_binary());
    assert_eq!(
        verdict(&r, "host.checkpoint").0,
        Verdict::Pass,
        "{}",
        r.to_text()
    );

    // The older copy back in place: it verifies on its own, and is behind the witness.
    std::fs::remove_dir_all(d.state()).expect("rm");
    std::fs::rename(&old, d.state()).expect("restore");
    let mut flags = d.flags();
    flags.alignment = None;
    let r = d.run(flags, &gateway_binary());
    assert_eq!(
        verdict(&r, "host.state").0,
        Verdict::Pass,
        "{}",
        r.to_text()
    );
    let (v, detail) = verdict(&r, "host.checkpoint");
    assert_eq!(v, Verdict::Fail);
    assert!(
        detail.starts_with("the state's last checkpoint is #0 (1 records), the witness")
            && detail.ends_with("saw #1 (2 records): restored from an older copy"),
        "{detail}"
    );
    let o = bin()
        .args(["selfcheck", "--policy", s(&d.world.policy_path())])
        .args(["--state", s(&d.state())])
        .output()
        .expect("selfcheck");
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("FAIL   host.checkpoint"), "{text}");
}

#[test]
fn the_tpm_check_passes_with_swtpm_and_fails_when_it_is_dead() {
    let d = Deployment::new();
    let tpm = Swtpm::start().expect("swtpm (Debian package swtpm)");
    let tcti = tpm.tcti();
    let flags = |tcti: &str| Flags {
        policy: d.world.policy_path(),
        tcti: Some(tcti.to_string()),
        ..Flags::default()
    };
    let r = d.run(flags(&tcti), &gateway_binary());
    let (v, detail) = verdict(&r, "host.tpm");
    assert_eq!(v, Verdict::Pass, "{detail}");
    assert!(detail.contains("software TPM"), "{detail}");
    assert!(r.passed(), "{}", r.to_text());
    drop(tpm);
    let r = d.run(flags(&tcti), &gateway_binary());
    assert_eq!(verdict(&r, "host.tpm").0, Verdict::Fail, "{}", r.to_text());
    let o = bin()
        .args([
            "selfcheck",
            "--policy",
            s(&d.world.policy_path()),
            "--tcti",
            &tcti,
        ])
        .output()
        .expect("selfcheck");
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn usage_errors_exit_2() {
    let o = bin().args(["selfcheck"]).output().expect("selfcheck");
    assert_eq!(o.status.code(), Some(2));
    let o = bin()
        .args([
            "selfcheck",
            "--policy",
            "/nonexistent/p.toml",
            "--config",
            "/x",
        ])
        .output()
        .expect("selfcheck");
    assert_eq!(o.status.code(), Some(2));
    let o = bin()
        .args(["selfcheck", "--config", "/nonexistent/gateway.toml"])
        .output()
        .expect("selfcheck");
    assert_eq!(o.status.code(), Some(2));
}
