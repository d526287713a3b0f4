//! Issue 14's profiles, rootfs and tiers through the binary (`run`, `rootfs digest`)
//! and the service (`/v1/runs`), with real runsc and a real containerd with runc's
//! shim v2:
//! - the evidence says seccomp was enforced (by gVisor) and AppArmor is not
//!   available on this kernel, and records the base rootfs's tree digest, the same
//!   digest `capsule-gateway rootfs digest` prints;
//! - a tenant's rootfs pin that differs refuses the run, no sandbox started; a pin
//!   that matches runs;
//! - the host's /usr only by the tenant's explicit opt-in;
//! - the tier comes from the rule: `kata` on a host without Kata is `tier_unavailable`
//!   through `run` and `/v1/runs`, and the containerd path (runc's shim standing in
//!   for Kata's) runs through both.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use capsule_tests::{read_jws, Signer, World, RUNNER};
use common::{client_config, full, runtime, Client, Fixture, Gateway, GATEWAY_ID};
use http::Method;
use serde_json::{json, Value};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The fixture policy with `tenant` appended to its one tenant (TOML keys, then
/// `[[tenants.rules]]` tables), written over the world's policy.toml.
fn set_policy(w: &World, tenant: &str) -> PathBuf {
    let text = format!("{}{tenant}\n", w.policy_toml());
    w.write_mode("policy.toml", text.as_bytes(), 0o600)
}

fn capsule(w: &World, name: &str, script: &str) -> PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let mut m = w.script_manifest(&files);
    m["capsule_id"] = json!(name);
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

fn run(w: &World, state: &Path, capsule: &Path, extra: &[&str]) -> (i32, Value, Output) {
    let out = bin()
        .args(["run", "--policy", s(&w.policy_path()), "--runner", RUNNER])
        .args(["--state", s(state)])
        .args(extra)
        .arg(capsule)
        .output()
        .expect("run capsule-gateway");
    let event: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "one event on stdout ({e}); stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), event, out)
}

fn rootfs_digest_cli(dir: &str) -> String {
    let out = bin()
        .args(["rootfs", "digest", dir])
        .output()
        .expect("rootfs digest");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

fn base_digest() -> String {
    let base = sandbox_launcher::rootfs::BASE_ROOTFS;
    assert!(
        Path::new(base).join("bin/busybox").is_file(),
        "{base}: run scripts/build-rootfs.sh (Debian package busybox-static)"
    );
    let cli = rootfs_digest_cli(base);
    let lib = sandbox_launcher::rootfs::tree_digest(Path::new(base)).expect("digest");
    assert_eq!(cli, lib.to_string(), "the CLI prints the launcher's digest");
    cli
}

/// Nothing of a refused run: no runsc container, no run directory.
fn assert_no_sandbox(state: &Path) {
    let root = state.join("sandbox/runsc/runsc");
    let out = Command::new("runsc")
        .arg(format!("--root={}", root.display()))
        .args(["list", "--quiet"])
        .output()
        .expect("runsc list (Debian package runsc)");
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{out:?}"
    );
    let runs = std::fs::read_dir(state.join("sandbox/runsc/runs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(runs, 0, "run directories left");
}

const HOST_USR_CHECK: &str =
    "if [ -e /usr/lib/os-release ]; then echo host-usr; else echo no-host-usr; fi; readlink /bin/sh || echo not-a-link";

#[test]
fn run_evidence_says_seccomp_enforced_apparmor_not_available_and_records_the_rootfs() {
    let w = World::new();
    let digest = base_digest();
    let state = w.path("state");
    let c = capsule(&w, "profiles", HOST_USR_CHECK);
    let (code, e, out) = run(&w, &state, &c, &[]);
    assert_eq!(code, 0, "{e} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(e["data"]["stdout"], "no-host-usr\n/bin/busybox\n", "{e}");
    let sandbox = &e["data"]["sandbox"];
    let p = &sandbox["profiles"];
    assert_eq!(p["seccomp"]["enforced"], true, "{p}");
    assert_eq!(p["seccomp"]["enforced_by"], "gvisor");
    assert_eq!(p["seccomp"]["profile"], "capsule-default");
    assert_eq!(p["apparmor"]["enforced"], false);
    assert_eq!(
        p["apparmor"]["host"],
        "not available: this kernel has no AppArmor"
    );
    let r = &sandbox["rootfs"];
    assert_eq!(r["source"], "dir");
    assert_eq!(r["tree_sha256"], digest.as_str());
    assert_eq!(r["pinned"], Value::Null);
    // The bundle on disk carries the same OCI config, with the profile pinned.
    let run_id = e["id"].as_str().expect("id");
    let config =
        std::fs::read_to_string(state.join("evidence").join(run_id).join("oci-config.json"))
            .expect("the OCI config in the bundle");
    assert!(config.contains("\"seccomp\"") && config.contains("SCMP_ACT_ERRNO"));
}

#[test]
fn a_rootfs_pin_that_differs_refuses_the_run_and_a_matching_one_runs() {
    let w = World::new();
    let digest = base_digest();
    let wrong = format!("sha256:{}", "0".repeat(64));
    set_policy(&w, &format!("rootfs = {{ sha256 = \"{wrong}\" }}"));
    let state = w.path("state");
    let c = capsule(&w, "pinned", "echo RAN");
    let (code, e, _) = run(&w, &state, &c, &[]);
    assert_eq!(code, 4, "{e}");
    assert_eq!(e["type"], "dev.capsule-gateway.run.failed");
    let error = e["data"]["error"].as_str().expect("error");
    assert!(
        error.contains(&format!(
            "tree digest {digest} differs from the pinned {wrong}"
        )) && error.contains("nothing was launched"),
        "{error}"
    );
    assert!(!e.to_string().contains("RAN"));
    assert_no_sandbox(&state);

    set_policy(&w, &format!("rootfs = {{ sha256 = \"{digest}\" }}"));
    let c = capsule(&w, "pinned-ok", "echo RAN");
    let (code, e, _) = run(&w, &state, &c, &[]);
    assert_eq!(code, 0, "{e}");
    assert_eq!(e["data"]["stdout"], "RAN\n");
    assert_eq!(e["data"]["sandbox"]["rootfs"]["pinned"], digest.as_str());
}

#[test]
fn the_hosts_usr_only_by_the_tenants_opt_in() {
    let w = World::new();
    let state = w.path("state");
    set_policy(&w, "rootfs = { host_usr = true }");
    let c = capsule(&w, "host-usr", HOST_USR_CHECK);
    let (code, e, _) = run(&w, &state, &c, &[]);
    assert_eq!(code, 0, "{e}");
    assert_eq!(e["data"]["stdout"], "host-usr\ndash\n", "{e}");
    assert_eq!(e["data"]["sandbox"]["rootfs"]["source"], "host-usr");
    assert_eq!(e["data"]["sandbox"]["rootfs"]["tree_sha256"], Value::Null);
}

#[test]
fn a_kata_rule_is_tier_unavailable_without_kata_and_runs_on_the_containerd_path_via_run() {
    let w = World::new();
    set_policy(
        &w,
        "[[tenants.rules]]\nenvironment = \"staging\"\ntier = \"kata\"",
    );
    let kata_installed = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| d.join("containerd-shim-kata-v2").is_file())
    });
    assert!(!kata_installed, "this test is for a host without Kata");
    let state = w.path("state");
    let c = capsule(&w, "kata", "echo via the shim; id -u");
    let (code, e, _) = run(&w, &state, &c, &[]);
    assert_eq!(code, 1, "{e}");
    assert_eq!(e["type"], "dev.capsule-gateway.run.denied");
    assert_eq!(e["data"]["reason"], "tier_unavailable", "{e}");
    assert!(
        e["data"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("needs the kata sandbox tier; this host provides gvisor")),
        "{e}"
    );
    assert_no_sandbox(&state);

    // The same path with runc's shim standing in for Kata's.
    let c = capsule(&w, "kata-runc", "echo via the shim; id -u");
    let (code, e, out) = run(
        &w,
        &state,
        &c,
        &["--kata-runtime-type", "io.containerd.runc.v2"],
    );
    assert_eq!(code, 0, "{e} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(e["data"]["stdout"], "via the shim\n65534\n");
    let rt = &e["data"]["runtime"];
    assert_eq!(rt["kind"], "containerd", "{e}");
    assert_eq!(rt["runtime_type"], "io.containerd.runc.v2");
    assert_eq!(
        e["data"]["sandbox"]["profiles"]["seccomp"]["enforced_by"],
        "kernel"
    );
}

/// Polls `GET /v1/runs/{id}` until the run is no longer `running`.
async fn finished(c: &mut Client, id: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let r = c.get(&format!("/v1/runs/{id}")).await.expect("status");
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if v["status"] != "running" {
            return v;
        }
        assert!(Instant::now() < end, "the run did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn runs_choose_the_tier_by_policy_through_the_service() {
    let f = Fixture::new();
    let w = &f.world;
    set_policy(
        w,
        "[[tenants.rules]]\nenvironment = \"staging\"\ntier = \"kata\"",
    );
    let script: &[u8] = b"#!/bin/sh\necho served via the shim\n";
    let files: [(&str, &[u8]); 1] = [("run.sh", script)];
    let m = w.script_manifest(&files);
    let good = w.capsule_with_files("served-kata", &m, &files, Signer::Es256);
    let cfg = client_config(&f.client_svid_dir(RUNNER), GATEWAY_ID, false);
    let rt = runtime();

    // gVisor only: the kata rule is tier_unavailable, nothing runs.
    let config = f.write_config("[runs]\nruntime = \"runsc\"\n");
    let mut gateway = Gateway::serve(&[OsStr::new("--config"), config.as_os_str()]);
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg.clone())
            .await
            .expect("connect");
        c.upload_dir(&good.join("files")).await;
        let r = c
            .request(Method::POST, "/v1/runs", full(read_jws(&good)))
            .await
            .expect("answer");
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.json()["reason"], "tier_unavailable");
    });
    assert!(gateway.terminate().success(), "{}", gateway.stderr());

    // With [runs.kata] on runc's shim: the same capsule runs through containerd.
    let config = f.write_config(
        "[runs]\nruntime = \"runsc\"\n[runs.kata]\nruntime_type = \"io.containerd.runc.v2\"\n",
    );
    let mut gateway = Gateway::serve(&[OsStr::new("--config"), config.as_os_str()]);
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg.clone())
            .await
            .expect("connect");
        let r = c
            .request(Method::POST, "/v1/runs", full(read_jws(&good)))
            .await
            .expect("answer");
        assert_eq!(r.status, 202, "{}", r.text());
        let id = r.json()["run_id"].as_str().expect("id").to_string();
        let done = finished(&mut c, &id).await;
        assert_eq!(done["status"], "completed", "{done}");
        let data = &done["event"]["data"];
        assert_eq!(data["stdout"], "served via the shim\n");
        assert_eq!(data["runtime"]["kind"], "containerd");
        assert_eq!(data["runtime"]["runtime_type"], "io.containerd.runc.v2");
        assert_eq!(data["sandbox"]["profiles"]["seccomp"]["enforced"], true);
    });
    assert!(gateway.terminate().success(), "{}", gateway.stderr());
}
