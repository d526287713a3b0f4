//! `capsule-gateway run` end to end, with real gVisor (`runsc`, Debian package
//! `runsc`): the CloudEvent, the evidence bundle, denial without launch, exit codes,
//! an interrupted run, and a gateway killed with SIGKILL mid-run whose stale
//! sandbox the next run finds and removes. Each test has its own state directory
//! (its own runsc root), so tests never see each other's sandboxes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsule_tests::{sha256_hex, Signer, World, RUNNER};
use serde_json::{json, Value};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A capsule running `script` with `/bin/sh`, under `capsule_id`.
fn capsule(w: &World, name: &str, capsule_id: &str, script: &str, timeout_ms: u64) -> PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let mut m = w.script_manifest(&files);
    m["capsule_id"] = json!(capsule_id);
    m["limits"]["timeout_ms"] = json!(timeout_ms);
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

fn run_cmd(w: &World, state: &Path, capsule: &Path) -> Command {
    let mut c = bin();
    c.args(["run", "--policy", s(&w.policy_path()), "--runner", RUNNER])
        .args(["--state", s(state), s(capsule)]);
    c
}

/// Runs `capsule-gateway run`; returns the exit code and the one event it printed.
fn run(w: &World, state: &Path, capsule: &Path) -> (i32, Value, Output) {
    let out = run_cmd(w, state, capsule)
        .output()
        .expect("run capsule-gateway");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one event line; stdout {stdout:?}, stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let event: Value = serde_json::from_str(lines[0]).expect("event is JSON");
    (out.status.code().expect("exit code"), event, out)
}

/// The CloudEvents v1.0 attributes every event carries.
fn assert_cloudevent(e: &Value, kind: &str) {
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["type"], kind);
    assert_eq!(e["source"], RUNNER);
    assert_eq!(e["datacontenttype"], "application/json");
    assert!(e["id"].as_str().is_some_and(|id| !id.is_empty()));
    let time = e["time"].as_str().expect("time");
    assert!(
        time.ends_with('Z') && time.contains('T'),
        "RFC 3339: {time}"
    );
    assert!(e["data"].is_object());
}

fn runsc_list(state: &Path) -> Vec<String> {
    let out = Command::new("runsc")
        .arg(format!(
            "--root={}",
            state.join("sandbox/runsc/runsc").display()
        ))
        .args(["list", "--quiet"])
        .output()
        .expect("runsc list (Debian package `runsc`)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

fn processes_naming(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.is_empty() && (cmd.contains(needle) || cg.contains(needle)) {
            out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    out
}

/// From the outside: nothing of `run_id` in runsc's list, the process table or the
/// gateway's sandbox directories.
fn assert_left_nothing(state: &Path, run_id: &str) {
    assert!(runsc_list(state).is_empty(), "{:?}", runsc_list(state));
    let procs = processes_naming(run_id);
    assert!(procs.is_empty(), "{procs:?}");
    let runs: Vec<_> = std::fs::read_dir(state.join("sandbox/runsc/runs"))
        .expect("runs")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(runs.is_empty(), "{runs:?}");
}

#[test]
fn run_prints_one_completed_event_and_writes_the_evidence_bundle() {
    let w = World::new();
    let state = w.path("state");
    let c = capsule(
        &w,
        "capsule",
        "auth-token-issuance",
        "echo ran as $(id -u); echo warn >&2",
        20_000,
    );
    let (code, e, _) = run(&w, &state, &c);
    assert_eq!(code, 0, "{e}");
    assert_cloudevent(&e, "dev.capsule-gateway.run.completed");
    assert_eq!(e["subject"], "auth-token-issuance@7");
    let d = &e["data"];
    let jws = std::fs::read_to_string(c.join("capsule.jws")).expect("jws");
    assert_eq!(d["manifest_jws"], jws.as_str(), "the exact JWS");
    assert_eq!(d["tenant_id"], "acme-payments");
    assert_eq!(
        d["capsule_digest"],
        format!("sha256:{}", sha256_hex(jws.as_bytes()))
    );
    assert_eq!(d["capsule_id"], "auth-token-issuance");
    assert_eq!(d["version"], 7);
    assert_eq!(d["run_id"], e["id"]);
    assert_eq!(d["stdout"], "ran as 65534\n");
    assert_eq!(d["stderr"], "warn\n");
    assert_eq!(d["exit_code"], 0);
    assert_eq!(d["timed_out"], false);
    assert!(d["duration_ms"].as_u64().is_some());
    assert_eq!(d["runtime"]["kind"], "runsc");
    assert_eq!(d["egress_probe"]["blocked"], true);
    assert_eq!(d["egress_probe"]["probe"]["connected"], false);
    assert_eq!(d["teardown"]["ok"], true);
    assert_eq!(d["error"], Value::Null);

    // The evidence bundle: exact JWS, outputs, the OCI config and its digest.
    let bundle = PathBuf::from(d["evidence_bundle"].as_str().expect("bundle path"));
    assert_eq!(
        std::fs::read_to_string(bundle.join("capsule.jws")).expect("jws"),
        jws
    );
    assert_eq!(
        std::fs::read(bundle.join("stdout")).expect("stdout"),
        b"ran as 65534\n"
    );
    let config = std::fs::read(bundle.join("oci-config.json")).expect("oci config");
    let sandbox: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("sandbox.json")).expect("sandbox.json"))
            .expect("json");
    assert_eq!(
        sandbox["oci_config_sha256"],
        format!("sha256:{}", sha256_hex(&config))
    );
    assert_eq!(d["oci_config_sha256"], sandbox["oci_config_sha256"]);
    let decision: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("decision.json")).expect("decision"))
            .expect("json");
    assert_eq!(decision["verdict"], "admit");
    let stored: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("event.json")).expect("event"))
            .expect("json");
    assert_eq!(stored, e);
    assert_left_nothing(&state, d["run_id"].as_str().expect("run id"));

    // The admission was recorded like `admit` records it: a lower version is now a rollback.
    let files: [(&str, &[u8]); 1] = [("run.sh", b"echo old")];
    let mut older = w.script_manifest(&files);
    older["version"] = json!(6);
    let old = w.capsule_with_files("older", &older, &files, Signer::Es256);
    let (code, e, _) = run(&w, &state, &old);
    assert_eq!(code, 1);
    assert_eq!(e["data"]["reason"], "rollback");
}

/// Evidence holds the capsule's output and its JWS: other local users must not read
/// it. The state directory, the evidence root and each bundle are 0700, every file
/// 0600, even under a permissive umask (the test runs the gateway with umask 000).
#[test]
fn evidence_bundles_are_not_readable_by_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    let state = w.path("state");
    let c = capsule(
        &w,
        "capsule",
        "auth-token-issuance",
        "echo secret-output",
        20_000,
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_capsule-gateway"))
        .args(["run", "--policy", s(&w.policy_path()), "--runner", RUNNER])
        .args(["--state", s(&state), s(&c)]);
    let out = cmd.output().expect("run capsule-gateway");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: Value = serde_json::from_slice(&out.stdout).expect("one event");
    let bundle = PathBuf::from(e["data"]["evidence_bundle"].as_str().expect("bundle"));
    let mode = |p: &Path| {
        std::fs::symlink_metadata(p)
            .unwrap_or_else(|err| panic!("{}: {err}", p.display()))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(bundle.parent(), Some(state.join("evidence").as_path()));
    for dir in [state.clone(), state.join("evidence"), bundle.clone()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let mut files = 0;
    for entry in std::fs::read_dir(&bundle).expect("bundle") {
        let p = entry.expect("entry").path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        files += 1;
    }
    assert!(files >= 6, "{files} files in the bundle");
    assert_eq!(
        std::fs::read(bundle.join("stdout")).expect("stdout"),
        b"secret-output\n"
    );
    assert_left_nothing(&state, e["data"]["run_id"].as_str().expect("run id"));
}

#[test]
fn a_denied_capsule_gets_a_denied_event_and_nothing_is_launched() {
    let w = World::new();
    let state = w.path("state");
    let c = capsule(
        &w,
        "capsule",
        "auth-token-issuance",
        "echo SHOULD-NOT-RUN",
        20_000,
    );
    std::fs::write(c.join("files/run.sh"), "echo tampered!!!!").expect("tamper");
    let (code, e, _) = run(&w, &state, &c);
    assert_eq!(code, 1, "{e}");
    assert_cloudevent(&e, "dev.capsule-gateway.run.denied");
    assert_eq!(e["subject"], "auth-token-issuance@7");
    let d = &e["data"];
    assert_eq!(d["reason"], "artifact_size_mismatch");
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["launched"], false);
    assert_eq!(d["tenant_id"], "acme-payments");
    assert!(d["capsule_digest"]
        .as_str()
        .is_some_and(|x| x.starts_with("sha256:")));
    assert!(d.get("stdout").is_none());
    assert!(runsc_list(&state).is_empty());
    // No run evidence: the denial's own bundle only (issue 12), holding the decision
    // and digests, never the presented bytes or any output.
    let bundles: Vec<_> = std::fs::read_dir(state.join("evidence"))
        .expect("evidence root")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(bundles.len(), 1, "{bundles:?}");
    assert_eq!(
        bundles[0].file_name(),
        e["id"].as_str().map(std::ffi::OsStr::new)
    );
    let mut files: Vec<String> = std::fs::read_dir(&bundles[0])
        .expect("bundle")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "decision.json",
            "event.json",
            "index.json",
            "index.sig.json"
        ],
        "no run, no run evidence"
    );
    let runs = std::fs::read_dir(state.join("sandbox/runsc/runs"))
        .expect("runs")
        .count();
    assert_eq!(runs, 0);
}

#[test]
fn non_zero_exit_and_timeout_are_completed_runs_with_exit_code_3() {
    let w = World::new();
    let state = w.path("state");
    let c = capsule(&w, "fails", "fails", "echo failing >&2; exit 5", 20_000);
    let (code, e, _) = run(&w, &state, &c);
    assert_eq!(code, 3, "{e}");
    assert_cloudevent(&e, "dev.capsule-gateway.run.completed");
    assert_eq!(e["data"]["exit_code"], 5);
    assert_eq!(e["data"]["stderr"], "failing\n");

    let c = capsule(&w, "sleeps", "sleeps", "echo sleeping; sleep 60", 1_500);
    let started = Instant::now();
    let (code, e, _) = run(&w, &state, &c);
    assert_eq!(code, 3, "{e}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(e["data"]["timed_out"], true);
    assert_eq!(e["data"]["exit_code"], Value::Null);
    assert_eq!(e["data"]["stdout"], "sleeping\n");
    assert_eq!(e["data"]["teardown"]["ok"], true);
    assert_left_nothing(&state, e["data"]["run_id"].as_str().expect("run id"));
}

/// Polls until `runsc list` shows one container and `runsc ps` shows its `sleep`
/// running (the probe is done, the entrypoint is up).
fn wait_for_container(state: &Path, child: &mut Child) -> String {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(id) = runsc_list(state).pop() {
            let ps = Command::new("runsc")
                .arg(format!(
                    "--root={}",
                    state.join("sandbox/runsc/runsc").display()
                ))
                .args(["ps", &id])
                .output()
                .expect("runsc ps");
            if String::from_utf8_lossy(&ps.stdout).contains("sleep") {
                return id;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the gateway exited before the sandbox was up: {status}");
        }
        assert!(Instant::now() < end, "no container appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_gateway_killed_mid_run_leaves_a_stale_sandbox_that_the_next_run_removes() {
    let w = World::new();
    let state = w.path("state");
    // Silent: after the gateway dies, a write to its stdout pipe would end the capsule
    // with SIGPIPE and runsc would remove the container by itself.
    let c = capsule(&w, "sleeper", "sleeper", "sleep 120", 300_000);
    let mut child = run_cmd(&w, &state, &c)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let container = wait_for_container(&state, &mut child);
    let run_id = container
        .strip_prefix("capsule-")
        .expect("id prefix")
        .to_string();
    child.kill().expect("SIGKILL the gateway");
    child.wait().expect("reap");

    // The gateway is gone; its sandbox is not.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        runsc_list(&state),
        vec![container.clone()],
        "the stale sandbox is still listed"
    );
    assert!(
        !processes_naming(&run_id).is_empty(),
        "its processes are still running"
    );
    assert!(state.join("sandbox/runsc/runs").join(&run_id).exists());

    // The next run cleans it up at start-up, says so, and runs normally.
    let quick = capsule(&w, "quick", "quick", "echo quick", 20_000);
    let (code, e, _) = run(&w, &state, &quick);
    assert_eq!(code, 0, "{e}");
    let cleaned = e["data"]["stale_sandboxes_cleaned"]
        .as_array()
        .expect("list");
    assert_eq!(cleaned.len(), 1, "{cleaned:?}");
    assert_eq!(cleaned[0]["run_id"], run_id.as_str());
    assert_eq!(cleaned[0]["teardown"]["ok"], true);
    assert_eq!(e["data"]["stdout"], "quick\n");
    assert_left_nothing(&state, &run_id);
    assert_left_nothing(&state, e["data"]["run_id"].as_str().expect("run id"));
}

#[test]
fn sigterm_mid_run_tears_the_sandbox_down_and_reports_a_failed_run() {
    let w = World::new();
    let state = w.path("state");
    let c = capsule(&w, "sleeper", "sleeper", "echo up; sleep 120", 300_000);
    let mut child = run_cmd(&w, &state, &c)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let container = wait_for_container(&state, &mut child);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let e: Value = serde_json::from_slice(&out.stdout).expect("one event");
    assert_cloudevent(&e, "dev.capsule-gateway.run.failed");
    assert_eq!(e["data"]["interrupted"], true);
    assert_eq!(e["data"]["teardown"]["ok"], true);
    assert!(e["data"]["error"]
        .as_str()
        .is_some_and(|m| m.contains("interrupted")));
    let run_id = container.strip_prefix("capsule-").expect("prefix");
    assert_left_nothing(&state, run_id);
}

#[test]
fn kata_without_its_shim_is_a_configuration_error_naming_it() {
    let w = World::new();
    let state = w.path("state");
    let c = capsule(&w, "capsule", "auth-token-issuance", "echo hi", 20_000);
    let out = run_cmd(&w, &state, &c)
        .args(["--runtime", "kata"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let kata_installed = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| d.join("containerd-shim-kata-v2").is_file())
    });
    if kata_installed {
        // Then it runs like runsc does.
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    } else {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("containerd-shim-kata-v2"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    // The private containerd it started for this is stopped again.
    let config = state.join("containerd/config.toml");
    assert!(
        processes_naming(s(&config)).is_empty(),
        "{:?}",
        processes_naming(s(&config))
    );
}

/// Exit codes tell the operator's mistakes from failures at run time: a usage error
/// is 2 before anything is admitted, while an evidence directory that cannot be
/// written (its parent is a regular file) is a runtime failure, 4, with no event
/// printed (nothing vouches for the run), and the sandbox is still torn down.
#[test]
fn an_unwritable_evidence_dir_is_a_runtime_failure_exit_4_and_a_usage_error_is_2() {
    let w = World::new();
    let state = w.path("state");
    let c = capsule(&w, "capsule", "auth-token-issuance", "echo hi", 20_000);

    let out = run_cmd(&w, &state, &c)
        .args(["--output-cap", "many"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());

    let not_a_dir = w.path("plain-file");
    std::fs::write(&not_a_dir, b"not a directory\n").expect("write");
    let evidence = not_a_dir.join("evidence");
    let out = run_cmd(&w, &state, &c)
        .args(["--evidence", s(&evidence)])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(out.stdout.is_empty(), "no event for a run without evidence");
    assert!(
        stderr.contains("evidence bundle") && stderr.contains(s(&evidence)),
        "{stderr}"
    );
    assert!(runsc_list(&state).is_empty(), "{:?}", runsc_list(&state));
}
