//! The admission log as an attacker with write access to the state meets it: each
//! edit, removal, reordering or truncation of a record, before and after the last
//! signed checkpoint, and a checkpoint whose signature fails, is named by `log
//! verify` (exit 1, a stable code); a sealed segment verifies on its own; denials are
//! logged (reason and digest, no presented bytes); start-up walks only what follows
//! the last checkpoint.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use capsule_gateway::state::{State, STATE_FILE};
use capsule_tests::{Signer, World, RUNNER};
use common::versioned_manifest;
use redb::{ReadableTable, TableDefinition};
use serde_json::Value;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("admission_log");
const HEAD: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("log_head");
const CHECKPOINTS: TableDefinition<u64, (&[u8], &[u8])> = TableDefinition::new("log_checkpoints");

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn admit(w: &World, state: &Path, capsules: &[&Path], extra: &[&str]) -> Output {
    bin()
        .args(["admit", "--policy", s(&w.policy_path()), "--json"])
        .args(["--runner", RUNNER, "--state", s(state)])
        .args(extra)
        .args(capsules.iter().map(|c| s(c)))
        .output()
        .expect("admit")
}

fn log_verify(args: &[&str]) -> (i32, Value) {
    let out = bin()
        .args(["log", "verify", "--json"])
        .args(args)
        .output()
        .expect("log verify");
    let code = out.status.code().expect("exit code");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "one JSON object; stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, v)
}

fn verify_state(state: &Path) -> (i32, Value) {
    log_verify(&["--state", s(state)])
}

fn tamper(state: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(state.join(STATE_FILE)).expect("open");
    let txn = db.begin_write().expect("write");
    f(&txn);
    txn.commit().expect("commit");
}

fn edit(txn: &redb::WriteTransaction, seq: u64) {
    let mut log = txn.open_table(LOG).expect("log");
    let bytes = log.get(seq).expect("get").expect("record").value().to_vec();
    let mut r: Value = serde_json::from_slice(&bytes).expect("json");
    r["tenant"] = "someone-else".into();
    log.insert(seq, serde_json::to_vec(&r).expect("json").as_slice())
        .expect("insert");
}

/// A state with `n` admissions of distinct capsules, in batches of `batch`,
/// checkpointing every `every` records.
fn state_with(
    w: &World,
    name: &str,
    n: usize,
    batch: usize,
    every: u64,
    seg: u64,
) -> std::path::PathBuf {
    let state = w.path(name);
    let caps: Vec<_> = (0..n)
        .map(|i| {
            w.capsule(
                &format!("{name}-c{i}"),
                &versioned_manifest(w, &format!("{name}-id{i}"), 1),
                Signer::Es256,
            )
        })
        .collect();
    for chunk in caps.chunks(batch) {
        let refs: Vec<&Path> = chunk.iter().map(|p| p.as_path()).collect();
        let every = every.to_string();
        let seg = seg.to_string();
        let out = admit(
            w,
            &state,
            &refs,
            &["--checkpoint-every", &every, "--segment-records", &seg],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    state
}

#[test]
fn an_intact_log_verifies_with_its_checkpoints_and_segments() {
    let w = World::new();
    let state = state_with(&w, "intact", 10, 3, 2, 4);
    let (code, v) = verify_state(&state);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["verdict"], "ok");
    assert_eq!(v["records"], 10);
    assert_eq!(v["counts"]["admit"], 10);
    assert!(
        v["segments"].as_array().expect("segments").len() >= 2,
        "{v}"
    );
    assert_eq!(v["unanchored"], 0, "the batch's end is checkpointed: {v}");
    // The library agrees.
    let st = State::open(&state, false, &verify_core::SystemClock)
        .expect("open")
        .expect("state");
    assert_eq!(st.verify_log().expect("intact"), 10);
}

#[test]
fn each_sealed_segment_verifies_on_its_own_and_an_edited_one_does_not() {
    let w = World::new();
    let state = state_with(&w, "seg", 9, 3, 3, 3);
    let dir = state.join("log");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    for f in &files {
        let (code, v) = log_verify(&["--segment", s(f)]);
        assert_eq!(code, 0, "{}: {v}", f.display());
        assert_eq!(v["records"], 3, "{v}");
    }
    // A copy elsewhere still verifies alone, against the state's key.
    let copy = w.path("elsewhere");
    std::fs::create_dir_all(&copy).expect("mkdir");
    let moved = copy.join(files[0].file_name().expect("name"));
    std::fs::copy(&files[0], &moved).expect("copy");
    let (code, v) = log_verify(&["--segment", s(&moved), "--key-state", s(&state)]);
    assert_eq!(code, 0, "{v}");

    // One record of a sealed segment edited: the segment alone, and the state, fail.
    let text = std::fs::read_to_string(&files[1]).expect("read");
    let edited = text.replacen("\"tenant\":\"", "\"tenant\":\"x", 1);
    assert_ne!(edited, text);
    std::fs::write(&files[1], edited).expect("write");
    let (code, v) = log_verify(&["--segment", s(&files[1])]);
    assert_eq!(
        (code, v["code"].as_str()),
        (1, Some("record_edited")),
        "{v}"
    );
    let (code, v) = verify_state(&state);
    assert_eq!(
        (code, v["code"].as_str()),
        (1, Some("record_edited")),
        "{v}"
    );

    // A removed segment is named.
    std::fs::remove_file(&files[0]).expect("rm");
    let (code, v) = verify_state(&state);
    assert_eq!(
        (code, v["code"].as_str()),
        (1, Some("segment_invalid")),
        "{v}"
    );
}

/// Each attack on records in the database, before the last checkpoint (inside its
/// coverage) and after it, is named by `log verify`.
#[test]
fn edited_removed_reordered_and_truncated_records_are_named_by_log_verify() {
    type Edit = fn(&redb::WriteTransaction);
    let cases: [(&str, Edit, &str); 7] = [
        ("earlier record edited", |t| edit(t, 1), "record_edited"),
        ("last record edited", |t| edit(t, 4), "record_edited"),
        (
            "record removed",
            |t| {
                t.open_table(LOG).expect("log").remove(1).expect("rm");
            },
            "record_missing",
        ),
        (
            "records reordered",
            |t| {
                let mut log = t.open_table(LOG).expect("log");
                let a = log.get(1).expect("g").expect("r").value().to_vec();
                let b = log.get(2).expect("g").expect("r").value().to_vec();
                log.insert(1, b.as_slice()).expect("i");
                log.insert(2, a.as_slice()).expect("i");
            },
            "record_out_of_order",
        ),
        (
            "tail truncated with its head rewritten",
            |t| {
                let mut log = t.open_table(LOG).expect("log");
                let last = log.get(3).expect("g").expect("r").value().to_vec();
                log.remove(4).expect("rm");
                let h = capsule_tests::sha256_hex(&last);
                let mut raw = [0u8; 32];
                for (i, b) in raw.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).expect("hex");
                }
                t.open_table(HEAD)
                    .expect("head")
                    .insert("head", (4, raw))
                    .expect("i");
            },
            "log_truncated",
        ),
        (
            "a record's bytes truncated",
            |t| {
                let mut log = t.open_table(LOG).expect("log");
                let b = log.get(2).expect("g").expect("r").value().to_vec();
                log.insert(2, &b[..b.len() / 2]).expect("i");
            },
            "record_edited",
        ),
        (
            "checkpoint signature broken",
            |t| {
                let mut cps = t.open_table(CHECKPOINTS).expect("cps");
                let (p, sig) = {
                    let g = cps.get(0).expect("g").expect("cp");
                    (g.value().0.to_vec(), g.value().1.to_vec())
                };
                let mut edited: Value = serde_json::from_slice(&p).expect("json");
                edited["time"] = 1.into();
                let bytes = serde_json::to_vec(&edited).expect("json");
                cps.insert(0, (bytes.as_slice(), sig.as_slice()))
                    .expect("i");
            },
            "checkpoint_signature_invalid",
        ),
    ];
    let w = World::new();
    for (name, attack, code) in cases {
        // 5 records, one checkpoint at the batch's end (5).
        let state = state_with(
            &w,
            &name.replace(' ', "-").replace('\'', ""),
            5,
            5,
            1000,
            1000,
        );
        assert_eq!(verify_state(&state).0, 0, "{name}: intact first");
        tamper(&state, attack);
        let (got, v) = verify_state(&state);
        assert_eq!((got, v["code"].as_str()), (1, Some(code)), "{name}: {v}");
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
    }
}

/// Records after the last checkpoint (a process killed before its batch ended, as
/// here a checkpoint removed with them uncovered) are walked at start-up: an edit
/// there is refused by `admit` as before.
#[test]
fn start_up_walks_what_follows_the_last_checkpoint() {
    let w = World::new();
    let state = state_with(&w, "tail", 4, 2, 1000, 1000);
    // Drop the last checkpoint (the second batch's): records 2 and 3 are unanchored.
    tamper(&state, |t| {
        t.open_table(CHECKPOINTS)
            .expect("cps")
            .remove(1)
            .expect("rm");
    });
    let (code, v) = verify_state(&state);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["unanchored"], 2, "{v}");
    tamper(&state, |t| edit(t, 2));
    let c = w.capsule(
        "tail-new",
        &versioned_manifest(&w, "tail-new", 1),
        Signer::Es256,
    );
    let out = admit(&w, &state, &[&c], &[]);
    let line: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(line["reason"], "state_unavailable", "{line}");
    assert!(
        line["detail"]
            .as_str()
            .is_some_and(|d| d.contains("record 3 does not chain")),
        "{line}"
    );
}

/// A denial is logged with its reason and the capsule's digest, nothing presented.
#[test]
fn denials_are_logged_with_reason_and_digest_only() {
    let w = World::new();
    let state = w.path("denials");
    let good = w.good_capsule("good", Signer::Es256);
    let other = w.good_capsule("other", Signer::Other);
    let out = admit(&w, &state, &[&good, &other], &[]);
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines[1]["verdict"], "deny");
    let log = common::admission_log(&state);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0]["kind"], "admit");
    let d = &log[1];
    assert_eq!(d["kind"], "deny");
    assert_eq!(d["reason"], lines[1]["reason"], "{d}");
    let jws = std::fs::read(other.join("capsule.jws")).expect("jws");
    assert_eq!(
        d["capsule_digest"].as_str(),
        Some(format!("sha256:{}", capsule_tests::sha256_hex(&jws)).as_str())
    );
    let keys: Vec<&str> = d
        .as_object()
        .expect("obj")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys.iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [
            "capsule_digest",
            "denied_at",
            "kind",
            "policy_version",
            "prev",
            "reason",
            "seq"
        ]
        .into_iter()
        .collect(),
        "a denial record holds no presented field: {d}"
    );
    let (code, v) = verify_state(&state);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["counts"]["deny"], 1, "{v}");
}

#[test]
fn log_verify_usage_errors_exit_2() {
    let w = World::new();
    let out = bin()
        .args(["log", "verify", "--state", s(&w.path("none"))])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = bin().args(["log", "verify"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

/// `serve` (the real binary): denials are logged, a graceful stop (SIGTERM) signs a
/// checkpoint of the log's end; after `kill -9` the records since the last
/// checkpoint are walked at the restart, the service goes on, and the log verifies.
#[test]
fn serve_logs_denials_checkpoints_at_shutdown_and_restarts_after_kill_9() {
    use common::{client_config, runtime, versioned_jws, Client, Fixture, Gateway, GATEWAY_ID};
    use std::ffi::OsStr;
    let f = Fixture::new();
    let w = &f.world;
    let config = f.write_config("[log]\ncheckpoint_every = 1000\n");
    let client = f.client_svid_dir(RUNNER);
    let cfg = client_config(&client, GATEWAY_ID, false);
    let rt = runtime();
    let other = std::fs::read_to_string(w.good_capsule("other", Signer::Other).join("capsule.jws"))
        .expect("jws");

    let mut gateway = Gateway::serve(&[OsStr::new("--config"), OsStr::new(s(&config))]);
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg.clone())
            .await
            .expect("connect");
        c.upload_world_files().await;
        for v in 1..=2 {
            let r = c.admit(versioned_jws(w, "srv", v)).await.expect("admit");
            assert_eq!(r.status, 200, "{r:?}");
        }
        let r = c.admit(other.clone()).await.expect("admit");
        assert_eq!(r.status, 403, "{r:?}");
    });
    assert!(gateway.terminate().success(), "{}", gateway.stderr());
    let (code, v) = verify_state(&f.state_dir());
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        (v["records"].as_u64(), v["unanchored"].as_u64()),
        (Some(3), Some(0)),
        "{v}"
    );
    assert_eq!(v["last_checkpoint"]["cause"], "shutdown", "{v}");
    assert_eq!(
        (v["counts"]["admit"].as_u64(), v["counts"]["deny"].as_u64()),
        (Some(2), Some(1))
    );

    // kill -9: the two admissions after the shutdown checkpoint are not anchored by
    // any checkpoint; the restart walks them and goes on.
    let mut gateway = Gateway::serve(&[OsStr::new("--config"), OsStr::new(s(&config))]);
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg.clone())
            .await
            .expect("connect");
        for v in 3..=4 {
            let r = c.admit(versioned_jws(w, "srv", v)).await.expect("admit");
            assert_eq!(r.status, 200, "{r:?}");
        }
    });
    gateway.kill9();
    let (code, v) = verify_state(&f.state_dir());
    assert_eq!((code, v["unanchored"].as_u64()), (0, Some(2)), "{v}");
    let mut gateway = Gateway::serve(&[OsStr::new("--config"), OsStr::new(s(&config))]);
    rt.block_on(async {
        let mut c = Client::connect(gateway.addr, cfg.clone())
            .await
            .expect("connect");
        let r = c.admit(versioned_jws(w, "srv", 3)).await.expect("admit");
        assert_eq!(r.json()["reason"], "rollback", "{r:?}");
        let r = c.admit(versioned_jws(w, "srv", 5)).await.expect("admit");
        assert_eq!(r.status, 200, "{r:?}");
    });
    assert!(gateway.terminate().success(), "{}", gateway.stderr());
    let (code, v) = verify_state(&f.state_dir());
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        (v["records"].as_u64(), v["unanchored"].as_u64()),
        (Some(7), Some(0)),
        "{v}"
    );

    // An edit after the last checkpoint stops the next start (exit 2, named).
    tamper(&f.state_dir(), |t| {
        t.open_table(CHECKPOINTS)
            .expect("cps")
            .remove(1)
            .expect("rm");
        edit(t, 5);
    });
    let mut child = bin()
        .args(["serve", "--config", s(&config)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > end {
            let _ = child.kill();
            panic!("serve started on an edited log");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("record 6 does not chain"), "{stderr}");
}

/// A flood of denials beyond the budget is counted, not written one by one: the log
/// grows by the burst and one `denials_suppressed` record, and a batch entirely over
/// the budget commits nothing until the next checkpoint (through the library).
#[test]
fn a_denial_flood_is_bounded_by_the_denial_budget() {
    use capsule_gateway::admission_log::record::CheckpointCause;
    use capsule_gateway::admission_log::signer::CheckpointSigner;
    use capsule_gateway::admission_log::LogConfig;
    use capsule_gateway::state::StateDir;
    use std::sync::Arc;
    use verify_core::{Decision, Reason};
    let w = World::new();
    let dir = w.path("flood");
    let clock = verify_core::FixedClock(w.now);
    let policy =
        verify_core::Policy::load(&w.policy_path(), verify_core::crypto::default_backend())
            .expect("policy");
    let log = LogConfig {
        denial_burst: 3,
        denials_per_second: 0,
        ..LogConfig::default()
    };
    let located = StateDir::locate(&dir, true, &clock)
        .expect("locate")
        .expect("state");
    let signer = Arc::new(CheckpointSigner::software(&dir).expect("signer"));
    let state = located.with_log(Some(signer), log).open().expect("open");
    let flood = |n: usize| -> Vec<_> {
        (0..n)
            .map(|_| Err(Decision::deny_unread(Reason::MalformedJws, "not a JWS")))
            .collect()
    };
    let out = state.record(flood(10), &policy, &clock).expect("recorded");
    assert!(out.iter().all(|r| r
        .as_ref()
        .is_err_and(|d| d.reason == Some(Reason::MalformedJws))));
    // 3 denials one by one, then the summary of the other 7 in the same commit.
    assert_eq!(state.verify_log().expect("intact"), 4);
    // All over the budget: nothing is written (no commit) ...
    state.record(flood(100), &policy, &clock).expect("recorded");
    assert_eq!(state.verify_log().expect("intact"), 4);
    // ... until the shutdown checkpoint writes their count.
    assert!(state
        .checkpoint(&clock, CheckpointCause::Shutdown)
        .expect("cp")
        .is_some());
    drop(state);
    let records = common::admission_log(&dir);
    assert_eq!(records.len(), 5, "{records:?}");
    assert_eq!(records[3]["kind"], "denials_suppressed");
    assert_eq!(
        (records[3]["count"].as_u64(), records[4]["count"].as_u64()),
        (Some(7), Some(100))
    );
    assert_eq!(records[4]["reasons"]["malformed_jws"], 100);
    let (code, v) = verify_state(&dir);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["counts"]["denials_suppressed"], 2, "{v}");
}

/// A seal is exported after its commit, off the commit path: between the two, the
/// segment is sealed in the database (its records below the base, noted), `log
/// verify` checks it as its file will be written, and an edit of it is named. A
/// process that stops there (a crash) loses nothing: the next commit of the next
/// process writes the file and only then removes the records (through the library
/// and the binary).
#[test]
fn a_seal_is_exported_after_its_commit_and_a_crash_before_the_export_loses_nothing() {
    use capsule_gateway::admission_log::signer::CheckpointSigner;
    use capsule_gateway::admission_log::LogConfig;
    use capsule_gateway::state::{StateDir, Upkept};
    use std::sync::Arc;
    use verify_core::{Decision, Reason};
    let w = World::new();
    let clock = verify_core::FixedClock(w.now);
    let policy =
        verify_core::Policy::load(&w.policy_path(), verify_core::crypto::default_backend())
            .expect("policy");
    let log = LogConfig {
        checkpoint_every: 4,
        segment_records: 8,
        denial_burst: 1000,
        denials_per_second: 0,
    };
    let open_with = |dir: &Path, log: LogConfig| {
        let located = StateDir::locate(dir, true, &clock)
            .expect("locate")
            .expect("state");
        let signer = Arc::new(CheckpointSigner::software(dir).expect("signer"));
        located.with_log(Some(signer), log).open().expect("open")
    };
    let open = |dir: &Path| open_with(dir, log);
    let flood = |n: usize| -> Vec<_> {
        (0..n)
            .map(|_| Err(Decision::deny_unread(Reason::MalformedJws, "not a JWS")))
            .collect()
    };
    let first_key = |dir: &Path| {
        let db = redb::Database::open(dir.join(STATE_FILE)).expect("open");
        let txn = db.begin_read().expect("read");
        let log = txn.open_table(LOG).expect("log");
        let first = log.first().expect("first").map(|(k, _)| k.value());
        first
    };
    let segment_file = |dir: &Path| dir.join("log/segment-00000000.jsonl");

    // `serve`'s mode: the commit seals, the upkeep is left to the caller.
    let dir = w.path("sealed");
    let state = open(&dir);
    state.defer_upkeep();
    state.upkeep().expect("nothing left by an earlier process");
    state.record(flood(10), &policy, &clock).expect("recorded");
    assert!(state.upkeep_due(), "the seal left its export");
    assert!(!segment_file(&dir).exists(), "exported inside the commit");
    assert_eq!(state.verify_log().expect("sealed, not exported"), 10);
    // The crash: the process goes before its upkeep.
    drop(state);
    assert_eq!(first_key(&dir), Some(0), "the records stay until exported");
    let (code, v) = verify_state(&dir);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["segments"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["records"], 10, "{v}");

    // The next process (the CLI's mode): its commit, then the export.
    let state = open(&dir);
    state.check_since_checkpoint().expect("start-up check");
    state.record(flood(3), &policy, &clock).expect("recorded");
    assert!(!state.upkeep_due(), "done after the commit");
    assert_eq!(
        state.upkeep().expect("upkeep"),
        Upkept::default(),
        "nothing left"
    );
    drop(state);
    assert!(segment_file(&dir).exists());
    assert_eq!(first_key(&dir), Some(10), "exported records are removed");
    let (code, v) = log_verify(&["--segment", s(&segment_file(&dir))]);
    assert_eq!((code, &v["records"]), (0, &Value::from(10)), "{v}");
    let (code, v) = verify_state(&dir);
    assert_eq!((code, &v["records"]), (0, &Value::from(13)), "{v}");

    // Deferred, the upkeep reports what it did: more than one chunk of records.
    let dir = w.path("chunks");
    let big = LogConfig {
        segment_records: 1200,
        checkpoint_every: 1024,
        denial_burst: 10_000,
        ..log
    };
    let state = open_with(&dir, big);
    state.defer_upkeep();
    state
        .record(flood(1300), &policy, &clock)
        .expect("recorded");
    let done = state.upkeep().expect("upkeep");
    assert_eq!(
        (done.segments, done.removed, done.witness),
        (1, 1300, true),
        "{done:?}"
    );
    assert!(!state.upkeep_due());
    assert_eq!(state.verify_log().expect("intact"), 1300);
    drop(state);
    assert_eq!(first_key(&dir), None, "every record is in the segment");

    // An edit of a sealed record not yet exported is named, like one in a file.
    let dir = w.path("edited");
    let state = open(&dir);
    state.defer_upkeep();
    state.record(flood(10), &policy, &clock).expect("recorded");
    drop(state);
    tamper(&dir, |txn| {
        let mut log = txn.open_table(LOG).expect("log");
        let bytes = log.get(3).expect("get").expect("record").value().to_vec();
        let mut r: Value = serde_json::from_slice(&bytes).expect("json");
        r["reason"] = "expired".into();
        log.insert(3, serde_json::to_vec(&r).expect("json").as_slice())
            .expect("insert");
    });
    let (code, v) = verify_state(&dir);
    assert_eq!(
        (code, v["code"].as_str()),
        (1, Some("record_edited")),
        "{v}"
    );
    // ... and a removed one too.
    tamper(&dir, |txn| {
        txn.open_table(LOG).expect("log").remove(5).expect("remove");
    });
    let (code, v) = verify_state(&dir);
    assert_eq!(
        (code, v["code"].as_str()),
        (1, Some("segment_invalid")),
        "{v}"
    );

    // The note itself is not signed: a forged one is named (never a panic, never a
    // huge allocation), and the next process's upkeep builds nothing from it.
    const SEALING: TableDefinition<u64, (u64, u64, u64)> = TableDefinition::new("log_sealing");
    let dir = w.path("forged");
    let state = open(&dir);
    state.defer_upkeep();
    state.record(flood(10), &policy, &clock).expect("recorded");
    drop(state);
    let note = {
        let db = redb::Database::open(dir.join(STATE_FILE)).expect("open");
        let txn = db.begin_read().expect("read");
        let t = txn.open_table(SEALING).expect("log_sealing");
        let note = t.get(0).expect("get").expect("segment 0 noted").value();
        note
    };
    assert_eq!((note.0, note.1), (0, 10));
    let forgeries: [(u64, (u64, u64, u64)); 4] = [
        (0, (10, 0, note.2)),
        (0, (0, u64::MAX, note.2)),
        (0, (0, 10, note.2 + 7)),
        (99, note),
    ];
    for (segment, forged) in forgeries {
        tamper(&dir, |txn| {
            let mut t = txn.open_table(SEALING).expect("log_sealing");
            t.insert(segment, forged).expect("insert");
        });
        let (code, v) = verify_state(&dir);
        assert_eq!(
            (code, v["code"].as_str()),
            (1, Some("segment_invalid")),
            "{segment} {forged:?}: {v}"
        );
        if segment == 0 {
            let state = open(&dir);
            assert!(state.upkeep().is_err(), "{forged:?} exported");
            drop(state);
            assert!(!segment_file(&dir).exists(), "{forged:?}");
        }
        tamper(&dir, |txn| {
            let mut t = txn.open_table(SEALING).expect("log_sealing");
            t.remove(segment).expect("remove");
            t.insert(0, note).expect("restore");
        });
    }
    let (code, v) = verify_state(&dir);
    assert_eq!(code, 0, "restored: {v}");
}
