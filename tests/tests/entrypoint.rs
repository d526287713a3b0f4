//! What the sandbox may execute, decided at admission: the entrypoint is a staged
//! file or an allowed host program, a staged script's `#!` chain ends in one, and
//! only those files and the tools are executable once staged. The denials are
//! named negative fixtures (`entrypoint-*` in tests/src/negative.rs).

use capsule_tests::{Signer, World, RUNNER};
use serde_json::json;
use verify_core::{Admitted, Capsule, NoHistory, SpiffeId, SystemClock, Verifier};

fn verify(w: &World, capsule: &std::path::Path) -> Result<Admitted, verify_core::Decision> {
    let policy = w.policy();
    let runner = SpiffeId::parse(RUNNER).expect("runner");
    Verifier {
        policy: &policy,
        clock: &SystemClock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: verify_core::HashMode::Read,
        governance: Default::default(),
    }
    .verify(&Capsule::from_dir(capsule, policy.limits.max_jws_bytes))
}

fn executable(a: &Admitted) -> Vec<String> {
    a.files()
        .iter()
        .filter(|f| a.is_executable(f))
        .map(|f| f.path.to_string())
        .collect()
}

#[test]
fn a_staged_interpreter_chain_ending_in_an_allowed_host_program_is_admitted() {
    let w = World::new();
    let files: [(&str, &[u8]); 3] = [
        ("run.sh", b"#!/capsule/lib/interp -x\necho hi\n"),
        ("lib/interp", b"#!/bin/sh\nexec /bin/sh \"$@\"\n"),
        ("data.txt", b"#!/usr/bin/perl but only data\n"),
    ];
    let mut m = w.script_manifest(&files);
    m["entrypoint"] = json!(["/capsule/run.sh"]);
    let c = w.capsule_with_files("chain", &m, &files, Signer::Es256);
    let a = verify(&w, &c).unwrap_or_else(|d| panic!("{d:?}"));
    assert_eq!(executable(&a), ["run.sh", "lib/interp"]);
}

#[test]
fn a_host_program_entrypoint_makes_no_artifact_executable_but_tools_stay_executable() {
    let w = World::new();
    let mut m = w.manifest();
    m["entrypoint"] = json!(["/bin/sh", "/capsule/run.sh"]);
    let c = w.capsule("host", &m, Signer::Es256);
    let a = verify(&w, &c).unwrap_or_else(|d| panic!("{d:?}"));
    assert_eq!(executable(&a), ["tools/busybox"]);
    // The standard fixture: `/capsule/run.sh` with `#!/bin/sh`, and the tool.
    let a = verify(&w, &w.good_capsule("good", Signer::Es256)).unwrap_or_else(|d| panic!("{d:?}"));
    assert_eq!(executable(&a), ["run.sh", "tools/busybox"]);
}

#[test]
fn a_script_named_as_its_own_interpreter_is_refused() {
    let w = World::new();
    let files: [(&str, &[u8]); 1] = [("run.sh", b"#!/capsule/run.sh\n")];
    let mut m = w.script_manifest(&files);
    m["entrypoint"] = json!(["/capsule/run.sh"]);
    let c = w.capsule_with_files("loop", &m, &files, Signer::Es256);
    let d = verify(&w, &c).expect_err("a loop");
    assert_eq!(d.reason, Some(verify_core::Reason::ToolNotAuthorized));
    assert!(d.detail.contains("loop"), "{}", d.detail);
}
