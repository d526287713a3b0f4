//! `capsule-gateway run` with `scope.network = "targets"`, end to end: real runsc,
//! nftables and network namespaces, against the target network of
//! `capsule_tests::netns` (set up once per test binary). The capsule calls its
//! declared HTTP target and is refused anything else, and the egress ledger is in
//! its evidence; a policy without the rule denies it; a target that would open the
//! host fails the run before anything is made; a gateway killed with SIGKILL
//! mid-run leaves a namespace, veth and table that the next start removes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsule_tests::netns::{sh, targets_world, test_net, HELLO, HTTP_PORT, OTHER_PORT};
use capsule_tests::{Signer, World, RUNNER};
use serde_json::{json, Value};

/// One test at a time: every `run` starts a launcher, and a launcher's start
/// removes the network of any run whose gateway is dead, which would race the
/// SIGKILL test's look at what its killed run left.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn targets_capsule(w: &World, name: &str, script: &str, targets: &[String]) -> PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let mut m = w.script_manifest(&files);
    m["capsule_id"] = json!(name);
    m["scope"]["network"] = json!("targets");
    m["scope"]["targets"] = json!(targets);
    m["limits"]["timeout_ms"] = json!(120_000);
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

fn run_cmd(w: &World, state: &Path, capsule: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"));
    c.args(["run", "--policy", s(&w.policy_path()), "--runner", RUNNER])
        .args(["--state", s(state), s(capsule)]);
    c
}

/// Runs `capsule-gateway run`; the exit code and the one event it printed.
fn run(w: &World, state: &Path, capsule: &Path) -> (i32, Value, Output) {
    let out = run_cmd(w, state, capsule)
        .output()
        .expect("run capsule-gateway");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let event: Value = serde_json::from_str(stdout.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| {
            panic!(
                "{e}: stdout {stdout:?}, stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out.status.code().expect("exit code"), event, out)
}

fn packets(entries: &Value, address: &str, protocol: &str, port: u16) -> u64 {
    entries
        .as_array()
        .expect("ledger entries")
        .iter()
        .filter(|e| e["address"] == address && e["protocol"] == protocol && e["port"] == port)
        .map(|e| e["packets"].as_u64().unwrap_or(0))
        .sum()
}

fn assert_network_gone(run_id: &str) {
    let netns = sh(&["ip", "netns", "list"]);
    assert!(
        !netns.contains(&format!("capsule-{run_id}")),
        "netns left: {netns}"
    );
    let veth = format!("cg{}h", &run_id[..12]);
    assert!(
        !Path::new("/sys/class/net").join(&veth).exists(),
        "veth {veth} left"
    );
    let tables = sh(&["nft", "list", "tables"]);
    assert!(
        !tables.contains(&format!("capsule_{run_id}")),
        "table left: {tables}"
    );
}

/// The README's example: the capsule calls its declared target and gets the
/// answer, an undeclared port is refused, and the ledger in the event and in the
/// bundle's stored event counts both.
#[test]
fn run_reaches_its_declared_target_and_the_ledger_is_in_the_evidence() {
    let _one = serial();
    let n = test_net();
    let w = targets_world();
    let state = w.path("state");
    let t = n.target.to_string();
    // runsc's host stack answers a blocking read that comes before the data with
    // EAGAIN (observed with runsc 20221219): `cat` is retried until the answer is in.
    const READ: &str =
        "for i in 1 2 3 4 5 6 7 8 9 10; do cat <&3 2>/dev/null && break; sleep 0.2; done";
    let script = format!(
        "/bin/bash -c 'exec 3<>/dev/tcp/{t}/{HTTP_PORT}; printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3; {READ}' | tail -1\n\
         if timeout 5 /bin/bash -c 'exec 3<>/dev/tcp/{t}/{OTHER_PORT}' 2>/dev/null; then echo open; else echo refused; fi\n"
    );
    let target = format!("http://{t}:{HTTP_PORT}/");
    let c = targets_capsule(&w, "caller", &script, std::slice::from_ref(&target));
    let (code, e, out) = run(&w, &state, &c);
    assert_eq!(code, 0, "{e}\n{}", String::from_utf8_lossy(&out.stderr));
    let d = &e["data"];
    assert_eq!(d["stdout"], format!("{HELLO}\nrefused\n"), "{d}");
    let egress = &d["egress_probe"];
    assert_eq!(egress["blocked"], true, "{egress}");
    assert_eq!(egress["declared_reached"], true, "{egress}");
    let ledger = &egress["ledger"];
    assert_eq!(ledger["targets"][0]["target"], target.as_str());
    assert!(
        packets(&ledger["allowed"], &t, "tcp", HTTP_PORT) >= 2,
        "{ledger}"
    );
    assert!(
        packets(&ledger["dropped"], &t, "tcp", OTHER_PORT) >= 1,
        "{ledger}"
    );
    assert_eq!(packets(&ledger["allowed"], &t, "tcp", OTHER_PORT), 0);
    let bundle = PathBuf::from(d["evidence_bundle"].as_str().expect("bundle"));
    let stored: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("event.json")).expect("event.json"))
            .expect("json");
    assert_eq!(stored["data"]["egress_probe"]["ledger"], *ledger);
    let run_id = d["run_id"].as_str().expect("run id");
    let checks = d["teardown"]["checks"].as_array().expect("checks");
    for name in ["netns", "veth", "nft_table"] {
        assert!(
            checks.iter().any(|c| c["name"] == name && c["ok"] == true),
            "{name}: {checks:?}"
        );
    }
    assert_network_gone(run_id);
}

/// Without a rule that lists `targets`, the same capsule is denied at admission
/// (`scope_violation`, exit 1) and nothing is launched.
#[test]
fn targets_without_a_rule_allowing_them_is_a_scope_violation() {
    let _one = serial();
    let w = World::new();
    let state = w.path("state");
    let c = targets_capsule(&w, "caller", "echo RAN", &["http://10.1.2.3:80/".into()]);
    let (code, e, _) = run(&w, &state, &c);
    assert_eq!(code, 1, "{e}");
    assert_eq!(e["data"]["reason"], "scope_violation");
    assert!(
        e["data"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("only `none`")),
        "{e}"
    );
}

/// A target resolving to the host's loopback fails the run (exit 4) before a
/// namespace, a veth or a table exists, naming the address and why.
#[test]
fn a_loopback_target_fails_the_run_before_anything_is_made() {
    let _one = serial();
    let _ = test_net();
    let w = targets_world();
    let state = w.path("state");
    let c = targets_capsule(&w, "local", "echo RAN", &["http://localhost:8080/".into()]);
    let (code, e, _) = run(&w, &state, &c);
    assert_eq!(code, 4, "{e}");
    let err = e["data"]["error"].as_str().expect("error");
    assert!(
        err.contains("127.0.0.1") && err.contains("loopback"),
        "{err}"
    );
    assert_eq!(e["data"]["stdout"], Value::Null, "{e}");
}

/// SIGKILL the gateway mid-run: its run's namespace, veth and table outlive it;
/// the next `run` on the same state removes them at start-up, says so, and
/// verifies it.
#[test]
fn a_gateway_killed_mid_run_leaves_a_network_that_the_next_start_removes() {
    let _one = serial();
    let n = test_net();
    let w = targets_world();
    let state = w.path("state");
    let target = format!("http://{}:{HTTP_PORT}/", n.target);
    // Silent: a write to the dead gateway's pipe would end the capsule early.
    let c = targets_capsule(&w, "sleeper", "sleep 120", std::slice::from_ref(&target));
    let mut child = run_cmd(&w, &state, &c)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // The run's id, from its runsc container, once the entrypoint is up.
    let root = state.join("sandbox/runsc/runsc");
    let end = Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        let listed = sh(&[
            "runsc",
            &format!("--root={}", root.display()),
            "list",
            "--quiet",
        ]);
        if let Some(id) = listed
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("capsule-"))
        {
            let ps = sh(&[
                "runsc",
                &format!("--root={}", root.display()),
                "ps",
                &format!("capsule-{id}"),
            ]);
            if ps.contains("sleep") {
                break id.to_string();
            }
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the gateway exited early"
        );
        assert!(Instant::now() < end, "no sandbox came up");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().expect("SIGKILL the gateway");
    child.wait().expect("reap");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sh(&["ip", "netns", "list"]).contains(&format!("capsule-{run_id}")),
        "the killed run's namespace should still be there"
    );
    assert!(sh(&["nft", "list", "tables"]).contains(&format!("capsule_{run_id}")));

    let quick = targets_capsule(&w, "quick", "echo quick", std::slice::from_ref(&target));
    let (code, e, _) = run(&w, &state, &quick);
    assert_eq!(code, 0, "{e}");
    let cleaned = e["data"]["stale_sandboxes_cleaned"]
        .as_array()
        .expect("list");
    let stale = cleaned
        .iter()
        .find(|c| c["run_id"] == run_id.as_str())
        .unwrap_or_else(|| panic!("{run_id} not cleaned: {cleaned:?}"));
    assert_eq!(stale["teardown"]["ok"], true, "{stale}");
    let checks = stale["teardown"]["checks"].as_array().expect("checks");
    for name in ["netns", "veth", "nft_table"] {
        assert!(
            checks.iter().any(|c| c["name"] == name && c["ok"] == true),
            "{name}: {checks:?}"
        );
    }
    assert_network_gone(&run_id);
    assert_network_gone(e["data"]["run_id"].as_str().expect("run id"));
}
