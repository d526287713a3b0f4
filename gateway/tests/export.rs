//! Egress modes against real runs (gVisor, Debian package `runsc`): the event head's
//! custody attributes as the CloudEvents SDK reads them, the event `run` prints
//! shaped by the tenant's mode, `evidence export` in every mode (a secret a mask
//! matches never appears in any exported byte; withheld files are absent; the
//! export is signed by the index's signer), and its refusals with exit 2.
//!
//! Two runs (a `sanitized` tenant and a `metadata-only` one) are made once and
//! shared by the tests, which run in parallel.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use capsule_gateway::custody::{verify_custody, CustodyExpect, CustodySignature, CustodySigner};
use capsule_gateway::evidence::{
    export, Bundle, EgressRules, Event, EventData, EvidenceError, ExportError, ExportManifest,
    FileStatus,
};
use capsule_tests::{sha256_hex, Signer, World, RUNNER, TENANT};
use serde_json::{json, Value};
use verify_core::EgressMode;

/// What the capsule prints: a secret the sanitized tenant's mask matches.
const SECRET: &str = "sk-live-0123456789abcdef";
const MASK: &str = "sk-live-[0-9a-f]{16}";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

/// The fixture policy with the tenant's `evidence` rule added.
fn policy_with(w: &World, name: &str, evidence: &str) -> PathBuf {
    let text = w.policy_toml().replacen(
        "min_approvals = 1\n",
        &format!("min_approvals = 1\nevidence = {evidence}\n"),
        1,
    );
    assert!(text.contains("evidence ="), "the tenant block is there");
    w.write_mode(name, text.as_bytes(), 0o644)
}

fn run(policy: &Path, state: &Path, capsule: &Path, extra: &[&str]) -> (i32, Value, Output) {
    let out = bin()
        .args(["run", "--policy", s(policy), "--runner", RUNNER])
        .args(["--state", s(state)])
        .args(extra)
        .arg(capsule)
        .output()
        .expect("run capsule-gateway");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let line = stdout.lines().next().unwrap_or_else(|| {
        panic!(
            "one event line; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let event = serde_json::from_str(line).expect("event is JSON");
    (out.status.code().expect("exit code"), event, out)
}

fn script_capsule(w: &World, name: &str, script: &str) -> PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let m = w.script_manifest(&files);
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

/// One real run, its printed event and its bundle.
#[derive(Debug)]
struct Ran {
    policy: PathBuf,
    /// Its state (the custody key that signed its index).
    state: PathBuf,
    printed: Value,
    bundle: PathBuf,
}

#[derive(Debug)]
struct Fixture {
    w: World,
    sanitized: Ran,
    metadata: Ran,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let w = World::new();
        let capsule = script_capsule(
            &w,
            "capsule",
            &format!("echo token={SECRET}; echo also {SECRET} >&2"),
        );
        let mut ran = Vec::new();
        for (name, mode, evidence) in [
            (
                "sanitized.toml",
                EgressMode::Sanitized,
                format!(r#"{{ egress = "sanitized", mask = ["{MASK}"] }}"#),
            ),
            (
                "metadata.toml",
                EgressMode::MetadataOnly,
                r#"{ egress = "metadata-only" }"#.to_string(),
            ),
        ] {
            let policy = policy_with(&w, name, &evidence);
            // A state per run: anti-rollback admits the capsule once per state.
            let state = w.path(&format!("state-{}", mode.as_str()));
            let (code, printed, out) = run(&policy, &state, &capsule, &[]);
            assert_eq!(
                code,
                0,
                "{printed} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let bundle = state
                .join("evidence")
                .join(printed["id"].as_str().expect("id"));
            assert!(
                bundle.join("index.json").is_file() && bundle.join("index.sig.json").is_file(),
                "run writes the signed index of its bundle"
            );
            ran.push(Ran {
                policy,
                state,
                printed,
                bundle,
            });
        }
        let metadata = ran.pop().expect("metadata run");
        let sanitized = ran.pop().expect("sanitized run");
        Fixture {
            w,
            sanitized,
            metadata,
        }
    })
}

/// A copy of the sanitized run's bundle under `dir/` (named after its run, as
/// `Bundle::check` requires), for a test to edit.
fn copy_bundle(f: &Fixture, dir: &str) -> PathBuf {
    let copy =
        f.w.path(dir)
            .join(f.sanitized.bundle.file_name().expect("id"));
    std::fs::create_dir_all(&copy).expect("mkdir");
    for e in std::fs::read_dir(&f.sanitized.bundle)
        .expect("bundle")
        .flatten()
    {
        std::fs::copy(e.path(), copy.join(e.file_name())).expect("copy");
    }
    copy
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).expect("read")));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// `evidence export` of `bundle` under `ran`'s policy and custody key.
fn export_cli(ran: &Ran, mode: Option<&str>, out: &Path, bundle: &Path) -> Output {
    let mut c = bin();
    c.args([
        "evidence",
        "export",
        "--policy",
        s(&ran.policy),
        "--state",
        s(&ran.state),
    ])
    .args(["--out", s(out)]);
    if let Some(m) = mode {
        c.args(["--mode", m]);
    }
    c.arg(bundle).output().expect("evidence export")
}

fn read_export(out: &Path) -> ExportManifest {
    let bytes = std::fs::read(out.join("export.json")).expect("export.json");
    let sig = CustodySignature::parse(&std::fs::read(out.join("export.sig.json")).expect("sig"))
        .expect("sig parses");
    verify_custody(&bytes, &sig, &CustodyExpect::default()).expect("export.json is signed");
    ExportManifest::parse(&bytes).expect("export.json parses")
}

/// The files of the export other than its own.
fn exported_files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = all_bytes(out)
        .into_iter()
        .map(|(p, _)| {
            p.strip_prefix(out)
                .expect("under out")
                .display()
                .to_string()
        })
        .filter(|n| {
            !matches!(
                n.as_str(),
                "export.json" | "export.sig.json" | "index.json" | "index.sig.json"
            )
        })
        .collect();
    names.sort();
    names
}

#[test]
fn the_custody_attributes_are_cloudevents_extensions_to_the_sdk() {
    use cloudevents::event::ExtensionValue;
    use cloudevents::AttributesReader;
    let f = fixture();
    let bundle_event = std::fs::read(f.sanitized.bundle.join("event.json")).expect("event");
    let sdk: cloudevents::Event = serde_json::from_slice(&bundle_event).expect("the SDK reads it");
    let ours = Event::parse(&bundle_event).expect("we read it");
    let EventData::Run(_, d) = &ours.data else {
        panic!("run event")
    };
    let policy = std::fs::read(&f.sanitized.policy).expect("policy");
    let expect = [
        ("capsuledigest", d.capsule_digest.clone()),
        ("policydigest", format!("sha256:{}", sha256_hex(&policy))),
        ("tenantid", TENANT.to_string()),
        ("runid", d.run_id.clone().expect("run id")),
    ];
    for (name, value) in &expect {
        // CloudEvents 1.0: extension names are lowercase a-z/0-9, at most 20 chars.
        assert!(
            name.len() <= 20
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        match sdk.extension(name) {
            Some(ExtensionValue::String(v)) => assert_eq!(v, value, "{name}"),
            other => panic!("{name}: a string extension, got {other:?}"),
        }
    }
    assert_eq!(sdk.id(), ours.id);

    // An attribute that disagrees with the signed manifest breaks its hop.
    let copy = copy_bundle(f, "attr-copy");
    let mut v: Value = serde_json::from_slice(&bundle_event).expect("json");
    v["tenantid"] = json!("other-tenant");
    std::fs::write(
        copy.join("event.json"),
        serde_json::to_vec(&v).expect("json"),
    )
    .expect("w");
    let policy =
        verify_core::Policy::load(&f.sanitized.policy, verify_core::crypto::default_backend())
            .expect("policy");
    match Bundle::read(&copy).and_then(|b| b.check(&policy)) {
        Err(EvidenceError::Link { hop, detail }) => {
            assert_eq!(hop.as_str(), "manifest");
            assert!(detail.contains("tenantid"), "{detail}");
        }
        other => panic!("refused at the manifest hop, got {other:?}"),
    }
    v["tenantid"] = json!("");
    assert!(
        Event::parse(&serde_json::to_vec(&v).expect("json")).is_err(),
        "empty"
    );
}

#[test]
fn the_printed_event_is_shaped_by_the_tenants_mode_and_the_bundle_keeps_it_whole() {
    let f = fixture();
    // sanitized: the secret is masked in stdout, stderr and everywhere in data.
    let p = &f.sanitized.printed;
    let text = p.to_string();
    assert!(!text.contains(SECRET), "{text}");
    assert_eq!(p["data"]["stdout"], "token=[masked]\n");
    assert_eq!(p["data"]["egress_mode"], "sanitized");
    assert_eq!(p["data"]["masked_by"], json!([MASK]));
    assert_eq!(
        p["policydigest"].as_str().map(|d| d.starts_with("sha256:")),
        Some(true)
    );
    // metadata-only: no JWS, no outputs, the custody attributes kept.
    let m = &f.metadata.printed;
    for member in [
        "manifest_jws",
        "stdout",
        "stderr",
        "evidence_bundle",
        "decision",
    ] {
        assert!(m["data"].get(member).is_none(), "{member}: {m}");
    }
    assert!(!m.to_string().contains(SECRET));
    assert_eq!(m["data"]["exit_code"], 0);
    assert_eq!(m["tenantid"], TENANT);
    assert_eq!(m["runid"], m["id"]);
    // The bundle's own event is the full one.
    for ran in [&f.sanitized, &f.metadata] {
        let full = std::fs::read(ran.bundle.join("event.json")).expect("event");
        let e = Event::parse(&full).expect("parses strictly");
        let EventData::Run(_, d) = e.data else {
            panic!("run")
        };
        assert_eq!(
            d.stdout.as_deref(),
            Some(format!("token={SECRET}\n").as_str())
        );
        assert!(!d.manifest_jws.is_empty());
    }
}

#[test]
fn a_sanitized_export_masks_every_match_and_verifies() {
    let f = fixture();
    let out = f.w.path("exports/sanitized");
    let o = export_cli(&f.sanitized, None, &out, &f.sanitized.bundle);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m = read_export(&out);
    assert_eq!(m.mode, EgressMode::Sanitized);
    let index = std::fs::read(out.join("index.json")).expect("index copied");
    assert_eq!(
        index,
        std::fs::read(f.sanitized.bundle.join("index.json")).expect("index")
    );
    assert_eq!(m.index_sha256, format!("sha256:{}", sha256_hex(&index)));
    let status = |p: &str| m.files.iter().find(|x| x.path == p).map(|x| x.status);
    for masked in ["stdout", "stderr", "event.json"] {
        assert_eq!(status(masked), Some(FileStatus::Masked), "{masked}");
    }
    assert_eq!(status("capsule.jws"), Some(FileStatus::Included));
    assert_eq!(status("decision.json"), Some(FileStatus::Included));
    for entry in &m.files {
        let path = out.join(&entry.path);
        match entry.status {
            FileStatus::Withheld => assert!(!path.exists(), "{}", entry.path),
            FileStatus::Included => {
                let bytes = std::fs::read(&path).expect("included file");
                assert_eq!(
                    bytes,
                    std::fs::read(f.sanitized.bundle.join(&entry.path)).expect("orig")
                );
            }
            FileStatus::Masked => {
                let bytes = std::fs::read(&path).expect("masked file");
                assert_eq!(
                    entry.sha256.as_deref(),
                    Some(format!("sha256:{}", sha256_hex(&bytes)).as_str())
                );
                assert_eq!(entry.size, Some(bytes.len() as u64));
                assert_eq!(entry.masked_by.as_deref(), Some(&[MASK.to_string()][..]));
            }
        }
    }
    assert_eq!(
        std::fs::read(out.join("stdout")).expect("stdout"),
        b"token=[masked]\n"
    );
    let event: Value = serde_json::from_slice(&std::fs::read(out.join("event.json")).expect("e"))
        .expect("the masked event is still JSON");
    assert_eq!(event["data"]["stdout"], "token=[masked]\n");
    for (path, bytes) in all_bytes(&out) {
        assert!(
            !contains(&bytes, SECRET),
            "the secret leaked into {}",
            path.display()
        );
    }
}

#[test]
fn metadata_only_and_local_only_exports_withhold_every_file() {
    let f = fixture();
    for (mode, index_copied) in [("metadata-only", true), ("local-only", false)] {
        let out = f.w.path(&format!("exports/{mode}"));
        let o = export_cli(&f.sanitized, Some(mode), &out, &f.sanitized.bundle);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{mode}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let m = read_export(&out);
        assert_eq!(m.mode.as_str(), mode);
        assert!(
            m.files.iter().all(|x| x.status == FileStatus::Withheld),
            "{m:?}"
        );
        assert!(
            m.files.iter().any(|x| x.path == "stdout"),
            "every index file listed"
        );
        assert_eq!(exported_files(&out), Vec::<String>::new(), "{mode}");
        assert_eq!(out.join("index.json").exists(), index_copied, "{mode}");
        assert_eq!(out.join("index.sig.json").exists(), index_copied, "{mode}");
        for (path, bytes) in all_bytes(&out) {
            assert!(!contains(&bytes, SECRET), "{}", path.display());
        }
    }
    // The tenant's mode is the default: metadata-only for the second run.
    let out = f.w.path("exports/default-metadata");
    let o = export_cli(&f.metadata, None, &out, &f.metadata.bundle);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(read_export(&out).mode, EgressMode::MetadataOnly);
}

#[test]
fn a_wider_mode_an_existing_out_and_a_bad_mode_are_refused_with_exit_2() {
    let f = fixture();
    // The metadata-only tenant's bundle cannot be exported sanitized.
    let out = f.w.path("exports/refused");
    let o = export_cli(&f.metadata, Some("sanitized"), &out, &f.metadata.bundle);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("more permissive"),
        "{o:?}"
    );
    assert!(!out.exists(), "nothing written");
    // Through the library too.
    let policy =
        verify_core::Policy::load(&f.metadata.policy, verify_core::crypto::default_backend())
            .expect("policy");
    let rules = EgressRules::compile(&policy).expect("rules");
    let signer = CustodySigner::software(&f.metadata.state.join("custody")).expect("signer");
    let e = export(
        &f.metadata.bundle,
        &out,
        Some(EgressMode::Sanitized),
        &rules,
        &signer,
    )
    .expect_err("refused");
    assert!(matches!(e, ExportError::TooPermissive { .. }), "{e:?}");
    assert!(!out.exists());

    // An existing --out is never replaced.
    let existing = f.w.path("exports/existing");
    std::fs::create_dir_all(&existing).expect("mkdir");
    std::fs::write(existing.join("mine"), b"keep").expect("write");
    let o = export_cli(&f.sanitized, None, &existing, &f.sanitized.bundle);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert_eq!(std::fs::read(existing.join("mine")).expect("kept"), b"keep");
    assert!(!existing.join("export.json").exists());

    // A mode that does not exist is a usage error.
    let o = export_cli(
        &f.sanitized,
        Some("everything"),
        &f.w.path("exports/x"),
        &f.sanitized.bundle,
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

#[test]
fn a_bundle_edited_after_its_index_is_not_exported() {
    let f = fixture();
    let copy = copy_bundle(f, "copies");
    std::fs::write(copy.join("stdout"), b"token=nothing to see\n").expect("edit");
    let out = f.w.path("exports/edited");
    let o = export_cli(&f.sanitized, None, &out, &copy);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stdout does not match the index"),
        "{o:?}"
    );
    assert!(!out.exists());
}

#[test]
fn a_mask_that_is_not_a_regular_expression_is_a_configuration_error() {
    let f = fixture();
    let policy = policy_with(
        &f.w,
        "bad-mask.toml",
        r#"{ egress = "sanitized", mask = ["ok", "(unclosed"] }"#,
    );
    let capsule = f.w.path("capsule");
    let o = bin()
        .args([
            "verify",
            "--policy",
            s(&policy),
            "--runner",
            RUNNER,
            s(&capsule),
        ])
        .output()
        .expect("verify");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("tenants[name = \"{TENANT}\"].evidence.mask[1]")),
        "{err}"
    );
}
