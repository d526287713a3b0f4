//! The anti-rollback state as an attacker with write access to the state directory
//! or a second admitting process meets it, through the real binary (`admit`,
//! `verify`, `run`, `serve`): an emptied, deleted, truncated, bit-flipped or replaced
//! database is `state_unavailable` (exit 1, never a panic, never a fresh history);
//! an edited or removed admission-log record is detected by `admit` and stops
//! `serve` from starting; and no process holds the database across hashing or a
//! sandbox run, so concurrent admissions on one state all get a verdict.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use capsule_gateway::admission::Admission;
use capsule_gateway::state::{State, MARKER_FILE, STATE_FILE};
use capsule_tests::{Signer, World, RUNNER};
use common::{versioned_manifest, Fixture};
use redb::{ReadableTable, TableDefinition};
use serde_json::{json, Value};
use verify_core::{Capsule, FixedClock, HashMode, Reason, SpiffeId};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("admission_log");
const HEAD: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("log_head");
const CHECKPOINTS: TableDefinition<u64, (&[u8], &[u8])> = TableDefinition::new("log_checkpoints");

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// One capsule's line and the process's exit code and stderr.
#[derive(Debug)]
struct Verdict {
    code: i32,
    lines: Vec<Value>,
    stderr: String,
}

impl Verdict {
    fn reason(&self, i: usize) -> Option<&str> {
        self.lines[i]["reason"].as_str()
    }
}

fn parse(out: &Output) -> Verdict {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out.status.code().unwrap_or_else(|| {
        panic!(
            "the CLI was killed by a signal: {:?}; stderr {stderr}",
            out.status
        )
    });
    assert_ne!(code, 101, "the CLI panicked; stderr {stderr}");
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    Verdict {
        code,
        lines,
        stderr,
    }
}

fn cmd(cmd: &str, w: &World, state: &Path, capsules: &[&Path]) -> Command {
    let mut c = bin();
    c.args([cmd, "--policy", s(&w.policy_path()), "--json"])
        .args(["--runner", RUNNER, "--state", s(state)])
        .args(capsules.iter().map(|c| s(c)));
    c
}

fn admit(w: &World, state: &Path, capsules: &[&Path]) -> Verdict {
    parse(&cmd("admit", w, state, capsules).output().expect("admit"))
}

fn verify(w: &World, state: &Path, capsules: &[&Path]) -> Verdict {
    parse(&cmd("verify", w, state, capsules).output().expect("verify"))
}

/// Capsule `id` at `version`, as directory `name`.
fn versioned(w: &World, name: &str, id: &str, version: u64) -> PathBuf {
    w.capsule(name, &versioned_manifest(w, id, version), Signer::Es256)
}

/// A state where `tok` v1 and v2 were admitted; returns (state, v1, v3) — v1 is now
/// a rollback, v3 would be admitted.
fn seeded(w: &World, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let state = w.path(name);
    let v1 = versioned(w, &format!("{name}-v1"), "tok", 1);
    let v2 = versioned(w, &format!("{name}-v2"), "tok", 2);
    let v3 = versioned(w, &format!("{name}-v3"), "tok", 3);
    let first = admit(w, &state, &[&v1, &v2]);
    assert_eq!(first.code, 0, "{first:?}");
    let again = admit(w, &state, &[&v1]);
    assert_eq!(
        (again.code, again.reason(0)),
        (1, Some("rollback")),
        "{again:?}"
    );
    (state, v1, v3)
}

/// Every capsule of the run is denied `state_unavailable`, exit 1, and the detail
/// names what is wrong.
fn assert_unavailable(v: &Verdict, detail: &str) {
    assert_eq!(v.code, 1, "{v:?}");
    for line in &v.lines {
        assert_eq!(line["reason"], "state_unavailable", "{v:?}");
        let d = line["detail"].as_str().expect("detail");
        assert!(d.contains(detail), "detail {d:?} lacks {detail:?}");
    }
}

#[test]
fn first_admit_creates_the_state_once_and_says_so() {
    let w = World::new();
    let state = w.path("fresh/state");
    let c = versioned(&w, "c", "tok", 1);
    let v = verify(&w, &state, &[&c]);
    assert_eq!(v.code, 0, "verify on no state reads no history: {v:?}");
    assert!(!state.exists(), "verify creates nothing");

    let v = admit(&w, &state, &[&c]);
    assert_eq!(v.code, 0, "{v:?}");
    assert!(
        v.stderr
            .contains("created a new, empty anti-rollback state at"),
        "{}",
        v.stderr
    );
    let mode = fs::metadata(&state)
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "state dir mode {mode:o}");
    let marker: Value =
        serde_json::from_slice(&fs::read(state.join(MARKER_FILE)).expect("marker")).expect("json");
    assert_eq!(marker["format"], 1, "{marker}");
    assert!(marker["state_id"].as_str().is_some_and(|i| i.len() == 32));
    let names: Vec<String> = fs::read_dir(&state)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")),
        "no temporary file left: {names:?}"
    );

    let v = admit(&w, &state, &[&c]);
    assert_eq!(v.code, 0, "{v:?}");
    assert!(!v.stderr.contains("created"), "{}", v.stderr);
}

/// Admits racing to create the same new state end with one state: each admission is
/// in its log, and only the process that created it says so.
#[test]
fn concurrent_first_admits_create_one_state() {
    let w = World::new();
    let state = w.path("new");
    let capsules: Vec<PathBuf> = (0..4)
        .map(|i| versioned(&w, &format!("c{i}"), &format!("c{i}"), 1))
        .collect();
    let children: Vec<Child> = capsules
        .iter()
        .map(|c| {
            cmd("admit", &w, &state, &[c])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("admit")
        })
        .collect();
    let verdicts: Vec<Verdict> = children
        .into_iter()
        .map(|c| parse(&c.wait_with_output().expect("admit output")))
        .collect();
    for v in &verdicts {
        assert_eq!(v.code, 0, "{v:?}");
    }
    let created = verdicts
        .iter()
        .filter(|v| {
            v.stderr
                .contains("created a new, empty anti-rollback state")
        })
        .count();
    assert_eq!(created, 1, "{verdicts:?}");
    let st = State::open(&state, false, &verify_core::SystemClock)
        .expect("open")
        .expect("exists");
    assert_eq!(st.verify_log().expect("intact"), 4);
    drop(st);
    let mut names: Vec<String> = fs::read_dir(&state)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // `custody/` holds the software key that signs the log's checkpoints.
    assert_eq!(names, ["custody", STATE_FILE, MARKER_FILE], "{names:?}");
}

#[test]
fn emptied_state_database_is_state_unavailable_not_a_fresh_history() {
    let w = World::new();
    let (state, v1, v3) = seeded(&w, "state");
    fs::write(state.join(STATE_FILE), b"").expect(": > rollback.redb");
    for c in [&v1, &v3] {
        assert_unavailable(&admit(&w, &state, &[c]), "empty (0 bytes)");
        assert_unavailable(&verify(&w, &state, &[c]), "empty (0 bytes)");
    }
    assert_eq!(
        fs::metadata(state.join(STATE_FILE)).expect("db").len(),
        0,
        "the emptied database was not re-initialised"
    );
    // Without the marker as well: 0 bytes is refused in every case.
    fs::remove_file(state.join(MARKER_FILE)).expect("rm marker");
    assert_unavailable(&admit(&w, &state, &[&v1]), "empty (0 bytes)");
}

#[test]
fn deleted_state_database_is_state_unavailable_and_never_recreated() {
    let w = World::new();
    let (state, v1, v3) = seeded(&w, "state");
    fs::remove_file(state.join(STATE_FILE)).expect("rm rollback.redb");
    for c in [&v1, &v3] {
        let v = admit(&w, &state, &[c]);
        assert_unavailable(&v, "the database is missing");
        assert!(v.lines[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("never re-created")));
        assert_unavailable(&verify(&w, &state, &[c]), "the database is missing");
    }
    assert!(
        !state.join(STATE_FILE).exists(),
        "the deleted database was not re-created"
    );
}

#[test]
fn state_database_replaced_by_a_symlink_or_fifo_is_state_unavailable() {
    let w = World::new();
    let (state, v1, _) = seeded(&w, "state");
    let db = state.join(STATE_FILE);
    let moved = w.path("elsewhere.redb");
    fs::rename(&db, &moved).expect("move the database");
    std::os::unix::fs::symlink(&moved, &db).expect("symlink");
    assert_unavailable(&admit(&w, &state, &[&v1]), "a symbolic link");
    fs::remove_file(&db).expect("rm symlink");
    let mk = Command::new("mkfifo").arg(&db).status().expect("mkfifo");
    assert!(mk.success());
    assert_unavailable(&admit(&w, &state, &[&v1]), "a FIFO");
}

/// A damaged marker (garbage, another format, a symlink to a secret) is refused too,
/// and nothing of what it points at is echoed.
#[test]
fn damaged_or_symlinked_state_marker_is_state_unavailable() {
    let w = World::new();
    let (state, v1, _) = seeded(&w, "state");
    let marker = state.join(MARKER_FILE);
    let good = fs::read(&marker).expect("marker");
    fs::write(&marker, b"{}").expect("garbage");
    assert_unavailable(&admit(&w, &state, &[&v1]), "the state marker is unreadable");
    fs::write(&marker, br#"{"format":2,"created_at":0,"state_id":"00"}"#).expect("format");
    assert_unavailable(&admit(&w, &state, &[&v1]), "state format 2");
    fs::remove_file(&marker).expect("rm");
    let secret = w.write("secret", b"TOP-SECRET-BYTES");
    std::os::unix::fs::symlink(&secret, &marker).expect("symlink");
    let v = admit(&w, &state, &[&v1]);
    assert_unavailable(&v, "a symbolic link");
    assert!(!format!("{v:?}").contains("TOP-SECRET"), "{v:?}");
    fs::remove_file(&marker).expect("rm");
    fs::write(&marker, &good).expect("restore");
    let v = admit(&w, &state, &[&v1]);
    assert_eq!((v.code, v.reason(0)), (1, Some("rollback")), "{v:?}");
}

#[test]
fn state_database_of_another_state_is_state_unavailable() {
    let w = World::new();
    let (state, v1, _) = seeded(&w, "state");
    // A fresh, empty state made elsewhere, copied over this one's database.
    let other = w.path("other");
    let c = versioned(&w, "other-c", "unrelated", 1);
    assert_eq!(admit(&w, &other, &[&c]).code, 0);
    fs::copy(other.join(STATE_FILE), state.join(STATE_FILE)).expect("copy");
    assert_unavailable(&admit(&w, &state, &[&v1]), "it was replaced");
}

/// A damaged copy of a seeded database at each offset must not panic the CLI.
#[test]
fn truncated_or_bit_flipped_state_database_never_panics_the_cli() {
    let w = World::new();
    let (state, v1, v3) = seeded(&w, "state");
    let db = state.join(STATE_FILE);
    let good = fs::read(&db).expect("read db");
    let len = good.len();
    assert!(len > 8192, "{len}");
    for cut in [1, 512, 4096, len / 2, len - 1] {
        fs::write(&db, &good[..cut]).expect("truncate");
        for c in [&v1, &v3] {
            let v = admit(&w, &state, &[c]);
            assert_eq!(
                (v.code, v.reason(0)),
                (1, Some("state_unavailable")),
                "truncated to {cut} of {len}: {v:?}"
            );
            assert!(!v.stderr.contains("panicked"), "{}", v.stderr);
        }
    }
    // Flips: xorshift, so every run damages the same bytes. A flip in unused space
    // may leave the state readable; then v1 is still a rollback. Never an admission
    // of v1, never a panic.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..24 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = usize::try_from(x % len as u64).expect("offset");
        let mut bad = good.clone();
        bad[at] ^= 1 << (x % 8);
        fs::write(&db, &bad).expect("flip");
        let v = admit(&w, &state, &[&v1]);
        assert_eq!(v.code, 1, "flip at {at}: {v:?}");
        assert!(
            matches!(v.reason(0), Some("rollback" | "state_unavailable")),
            "flip at {at}: {v:?}"
        );
    }
}

/// Opens the database directly (as an attacker with the file would) and applies `f`.
fn tamper(state: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(state.join(STATE_FILE)).expect("open the state database");
    let txn = db.begin_write().expect("write");
    f(&txn);
    txn.commit().expect("commit");
}

fn edit_record(txn: &redb::WriteTransaction, seq: u64) {
    let mut log = txn.open_table(LOG).expect("log");
    let bytes = log.get(seq).expect("get").expect("record").value().to_vec();
    let mut record: Value = serde_json::from_slice(&bytes).expect("json");
    record["tenant"] = json!("someone-else");
    let edited = serde_json::to_vec(&record).expect("json");
    log.insert(seq, edited.as_slice()).expect("insert");
}

/// Each edit of the log is detected by `admit` (exit 1, state_unavailable, the
/// record named) and stops `serve` from starting (exit 2, the file named).
#[test]
fn edited_or_removed_admission_log_records_are_detected_by_admit_and_serve() {
    type Edit = fn(&redb::WriteTransaction);
    let edits: [(&str, Edit, &str); 4] = [
        (
            "last record edited",
            |t| edit_record(t, 2),
            "record 2 (the last) was changed",
        ),
        // An earlier record, covered by the batch's signed checkpoint, is no longer
        // walked at start-up: `log verify` names it (tests/admission_log.rs), and
        // start-up still walks what follows the last checkpoint.
        (
            "record after the last checkpoint edited",
            |t| {
                t.open_table(CHECKPOINTS)
                    .expect("checkpoints")
                    .remove(0)
                    .expect("remove");
                edit_record(t, 0)
            },
            "record 1 does not chain",
        ),
        (
            "last record deleted",
            |t| {
                t.open_table(LOG).expect("log").remove(2).expect("remove");
            },
            "records were removed",
        ),
        (
            "head row deleted",
            |t| {
                t.open_table(HEAD)
                    .expect("head")
                    .remove("head")
                    .expect("remove");
            },
            "log head is missing",
        ),
    ];
    for (name, edit, detail) in edits {
        let f = Fixture::new();
        let w = &f.world;
        let state = f.state_dir();
        let (a, b, c) = (
            versioned(w, "a", "tok", 1),
            versioned(w, "b", "tok", 2),
            versioned(w, "c", "other", 1),
        );
        assert_eq!(admit(w, &state, &[&a, &b, &c]).code, 0, "{name}");
        let d = versioned(w, "d", "fourth", 1);
        tamper(&state, edit);

        let v = admit(w, &state, &[&d]);
        assert_unavailable(&v, detail);
        // Nothing was chained onto the edited log.
        let count = common::admission_log(&state).len();
        assert!(count <= 3, "{name}: {count} records");

        let config = f.write_config("");
        let out = serve_until_exit(&config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: serve: {stderr}");
        assert!(
            stderr.contains(STATE_FILE) && stderr.contains(detail),
            "{name}: {stderr}"
        );
    }
}

/// `serve` on a state whose database is missing or empty refuses to start.
#[test]
fn serve_refuses_to_start_on_a_deleted_or_emptied_state_database() {
    let f = Fixture::new();
    let w = &f.world;
    let state = f.state_dir();
    let c = versioned(w, "c", "tok", 1);
    assert_eq!(admit(w, &state, &[&c]).code, 0);
    let config = f.write_config("");
    let db = state.join(STATE_FILE);
    fs::write(&db, b"").expect("empty");
    let out = serve_until_exit(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("empty (0 bytes)"), "{stderr}");
    fs::remove_file(&db).expect("rm");
    let out = serve_until_exit(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the database is missing"), "{stderr}");
    assert!(!db.exists(), "serve did not re-create it");
}

/// Runs `serve --config` expecting it to stop by itself (a refusal to start).
fn serve_until_exit(config: &Path) -> Output {
    let mut child = bin()
        .args(["serve", "--config", s(config)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let end = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap");
            panic!(
                "serve started on a damaged state: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// The state is readable by the library too after all this: an intact state verifies.
#[test]
fn the_library_reads_a_cli_made_state_and_its_log_head() {
    let w = World::new();
    let (state, _, v3) = seeded(&w, "state");
    assert_eq!(admit(&w, &state, &[&v3]).code, 0);
    let st = State::open(&state, false, &verify_core::SystemClock)
        .expect("open")
        .expect("exists");
    // v1, v2, the rollback denial of v1 (denials are logged too), v3.
    assert_eq!(st.verify_log().expect("intact"), 4);
}

/// The library (`State::open`, as `serve` and tests use it) refuses the same damage,
/// and never re-creates a refused state even when asked to create one.
#[test]
fn the_library_refuses_an_edited_emptied_or_deleted_state_and_does_not_recreate_it() {
    let w = World::new();
    let (state, _, _) = seeded(&w, "state");
    let refused = |what: &str, detail: &str| {
        let e = State::open(&state, true, &verify_core::SystemClock).expect_err(what);
        assert!(e.to_string().contains(detail), "{what}: {e}");
    };
    let good = fs::read(state.join(STATE_FILE)).expect("read");
    // Record 2 is the last: the rollback denial `seeded` provoked (denials are logged).
    tamper(&state, |t| edit_record(t, 2));
    refused("last record edited", "record 2 (the last) was changed");
    fs::write(state.join(STATE_FILE), &good).expect("restore");
    assert_eq!(
        State::open(&state, false, &verify_core::SystemClock)
            .expect("intact")
            .expect("exists")
            .verify_log()
            .expect("log"),
        3
    );
    fs::write(state.join(STATE_FILE), &good[..good.len() / 2]).expect("truncate");
    refused("truncated", "damaged");
    fs::write(state.join(STATE_FILE), b"").expect("empty");
    refused("emptied", "empty (0 bytes)");
    assert_eq!(fs::metadata(state.join(STATE_FILE)).expect("db").len(), 0);
    fs::remove_file(state.join(STATE_FILE)).expect("rm");
    refused("deleted", "the database is missing");
    assert!(!state.join(STATE_FILE).exists());
}

/// Turns a state into one made before markers: no `state.json`, no `meta` or
/// `log_head` table, and (older still than checkpoints) no `log_checkpoints`.
fn make_legacy(state: &Path) {
    fs::remove_file(state.join(MARKER_FILE)).expect("rm marker");
    tamper(state, |t| {
        const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
        assert!(t.delete_table(META).expect("delete meta"));
        assert!(t.delete_table(HEAD).expect("delete head"));
        assert!(t.delete_table(CHECKPOINTS).expect("delete checkpoints"));
    });
}

/// A state made before markers keeps its history: the first `admit` checks its whole
/// log, writes the marker and says so; a rolled-back version is still `rollback`.
#[test]
fn a_state_from_before_markers_is_adopted_with_its_history() {
    let w = World::new();
    let (state, v1, v3) = seeded(&w, "state");
    make_legacy(&state);
    let v = admit(&w, &state, &[&v1]);
    assert_eq!((v.code, v.reason(0)), (1, Some("rollback")), "{v:?}");
    assert!(
        v.stderr.contains("adopted the anti-rollback state"),
        "{}",
        v.stderr
    );
    assert!(state.join(MARKER_FILE).exists());
    assert_eq!(admit(&w, &state, &[&v3]).code, 0);
    let st = State::open(&state, false, &verify_core::SystemClock)
        .expect("open")
        .expect("exists");
    // v1, v2, two rollback denials of v1 (denials are logged too), v3.
    assert_eq!(st.verify_log().expect("intact"), 5);
}

/// ... but not with an edited log: the adoption walks the whole chain first.
#[test]
fn a_state_from_before_markers_with_an_edited_log_is_not_adopted() {
    let w = World::new();
    let (state, v1, _) = seeded(&w, "state");
    make_legacy(&state);
    tamper(&state, |t| edit_record(t, 0));
    assert_unavailable(&admit(&w, &state, &[&v1]), "record 1 does not chain");
    assert!(
        !state.join(MARKER_FILE).exists(),
        "no marker for a bad state"
    );
}

/// Kills a child left running when a test fails.
struct Reap(Option<Child>);

impl Reap {
    fn running(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A capsule whose script sleeps, to hold `run` in its sandbox.
fn sleeper(w: &World, name: &str, id: &str) -> PathBuf {
    let script = b"echo up; sleep 15".as_slice();
    let files: [(&str, &[u8]); 1] = [("run.sh", script)];
    let mut m = w.script_manifest(&files);
    m["capsule_id"] = json!(id);
    m["parent"] = Value::Null;
    m["version"] = json!(1);
    m["limits"]["timeout_ms"] = json!(60_000);
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

fn runsc_containers(state: &Path) -> usize {
    let out = Command::new("runsc")
        .arg(format!(
            "--root={}",
            state.join("sandbox/runsc/runsc").display()
        ))
        .args(["list", "--quiet"])
        .output()
        .expect("runsc list (Debian package `runsc`)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// `run` holds no lock on the state while its sandbox runs: another process admits
/// a different capsule on the same state meanwhile (real gVisor).
#[test]
fn admit_succeeds_while_a_run_on_the_same_state_is_in_its_sandbox() {
    let w = World::new();
    let state = w.path("state");
    let slow = sleeper(&w, "slow", "slow");
    let mut run = Reap(Some(
        bin()
            .args(["run", "--policy", s(&w.policy_path()), "--runner", RUNNER])
            .args(["--state", s(&state), s(&slow)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run"),
    ));
    let end = Instant::now() + Duration::from_secs(60);
    while runsc_containers(&state) == 0 {
        if let Some(status) = run.running().try_wait().expect("try_wait") {
            panic!("run exited ({status}) before its sandbox was up");
        }
        assert!(Instant::now() < end, "no sandbox appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let other = versioned(&w, "other", "other", 1);
    let v = admit(&w, &state, &[&other]);
    assert!(
        run.running().try_wait().expect("try_wait").is_none(),
        "the run ended before the admit returned: the test proves nothing"
    );
    assert_eq!(v.code, 0, "admit while run sandboxes: {v:?}");
    assert_eq!(v.lines[0]["verdict"], "admit");
    let out = run
        .0
        .take()
        .expect("run")
        .wait_with_output()
        .expect("run output");
    let event: Value = serde_json::from_slice(&out.stdout).expect("one event");
    assert_eq!(
        (out.status.code(), event["type"].as_str()),
        (Some(0), Some("dev.capsule-gateway.run.completed")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = State::open(&state, false, &verify_core::SystemClock)
        .expect("open")
        .expect("exists");
    assert_eq!(st.verify_log().expect("intact"), 2);
}

/// Size of each artifact of the slow batch: hashing it takes a moment.
const BIG: usize = 64 << 20;

/// A batch `verify` (reading the state) while admissions on the same state go on:
/// every admission gets its verdict while the batch is still hashing, and the batch
/// is admitted too.
#[test]
fn admits_succeed_while_a_batch_verify_on_the_same_state_hashes() {
    let w = World::new();
    let state = w.path("state");
    let seed = versioned(&w, "seed", "seed", 1);
    assert_eq!(admit(&w, &state, &[&seed]).code, 0);

    // Eight capsules of sixteen 64 MiB artifacts each, hard links of one file: 8 GiB
    // to hash, 64 MiB on disk.
    let big: Vec<u8> = (0..BIG)
        .map(|i| (i.wrapping_mul(31) >> 7).to_le_bytes()[0])
        .collect();
    let digest = capsule_tests::sha256_hex(&big);
    let blob = w.write("big.bin", &big);
    drop(big);
    let batch: Vec<PathBuf> = (0..8)
        .map(|i| {
            let dir = w.path(&format!("big-{i}"));
            let mut m = versioned_manifest(&w, &format!("big-{i}"), 1);
            m["tools"] = json!([]);
            m["artifacts"] = (0..16)
                .map(|k| json!({"path": format!("a{k}.bin"), "sha256": digest, "size": BIG}))
                .collect();
            // Every artifact is data: the program is an allowed host program.
            m["entrypoint"] = json!(["/bin/true"]);
            fs::create_dir_all(dir.join("files")).expect("mkdir");
            for k in 0..16 {
                fs::hard_link(&blob, dir.join(format!("files/a{k}.bin"))).expect("link");
            }
            let jws = w.sign(m.to_string().as_bytes(), Signer::Es256);
            fs::write(dir.join("capsule.jws"), jws).expect("jws");
            dir
        })
        .collect();
    let refs: Vec<&Path> = batch.iter().map(PathBuf::as_path).collect();
    let mut batch_verify = cmd("verify", &w, &state, &refs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("verify");

    let mut during = 0;
    for i in 0..40 {
        let c = versioned(&w, &format!("small-{i}"), &format!("small-{i}"), 1);
        let v = admit(&w, &state, &[&c]);
        assert_eq!(v.code, 0, "admit {i} beside the batch: {v:?}");
        if batch_verify.try_wait().expect("try_wait").is_none() {
            during += 1;
        } else {
            break;
        }
    }
    let out = batch_verify.wait_with_output().expect("verify output");
    let v = parse(&out);
    assert_eq!(v.code, 0, "{v:?}");
    assert_eq!(v.lines.len(), 8);
    assert!(
        during >= 1,
        "no admission completed while the batch was still running"
    );
}

/// The state's last-known time, as docs/state.md documents it: table `clock`, key
/// `last_known`, Unix seconds.
const CLOCK: TableDefinition<&str, u64> = TableDefinition::new("clock");

fn last_known(state: &Path) -> Option<u64> {
    let st = State::open(state, false, &verify_core::SystemClock)
        .expect("open")
        .expect("exists");
    st.last_known_time_now()
}

fn now() -> u64 {
    verify_core::Clock::now_unix(&verify_core::SystemClock)
}

/// An admission through the library on a set clock (`admit`'s, without the binary).
fn admission_at(w: &World, state: &Path, t: u64) -> Admission {
    Admission::new(w.policy(), Arc::new(FixedClock(t)), HashMode::Auto)
        .with_runner(Some(SpiffeId::parse(RUNNER).expect("runner")))
        .with_state_dir(Some(state), true)
        .expect("admission")
}

/// A clock stepped back behind what the state trusted re-opens nothing: the library
/// denies `clock_rollback` beyond the policy's skew (60 s in the fixture), on verify
/// and again inside the recording transaction, and admits within it. A forward clock
/// raises the last-known time; a clock within the skew never lowers it.
#[test]
fn clock_stepped_back_beyond_the_skew_is_clock_rollback_through_the_library() {
    let w = World::new();
    let state = w.path("state");
    let t = w.now;
    let v1 = versioned(&w, "v1", "tok", 1);
    let v2 = versioned(&w, "v2", "tok", 2);
    let v3 = versioned(&w, "v3", "tok", 3);

    let at = |t: u64, c: &PathBuf| {
        admission_at(&w, &state, t)
            .admit(std::slice::from_ref(c), true)
            .expect("admit")
            .remove(0)
    };
    assert!(at(t + 100, &v1).is_ok());
    assert_eq!(last_known(&state), Some(t + 100), "raised by the commit");

    // 61 s back: beyond the skew. Nothing is admitted and nothing moves.
    let denied = at(t + 39, &v2).expect_err("stepped back");
    assert_eq!(denied.reason, Some(Reason::ClockRollback), "{denied:?}");
    assert!(
        denied.detail.contains("stepped back") && denied.detail.contains(&(t + 100).to_string()),
        "{}",
        denied.detail
    );
    assert_eq!(last_known(&state), Some(t + 100));

    // 60 s back: within the skew, admitted; the last-known time is not lowered.
    assert!(at(t + 40, &v2).is_ok());
    assert_eq!(last_known(&state), Some(t + 100));

    // The recording transaction checks again: a state raised by another process
    // after this batch was verified still refuses it.
    let admission = admission_at(&w, &state, t + 100);
    let runner = SpiffeId::parse(RUNNER).expect("runner");
    let capsule = Capsule::from_dir(&v3, 1 << 20);
    let verified = admission.verify(&capsule, &runner);
    assert!(verified.is_ok(), "{verified:?}");
    tamper(&state, |txn| {
        let mut clock = txn.open_table(CLOCK).expect("clock");
        clock.insert("last_known", t + 1000).expect("insert");
    });
    let denied = admission
        .record(vec![verified])
        .expect("recorded")
        .remove(0)
        .expect_err("raised meanwhile");
    assert_eq!(denied.reason, Some(Reason::ClockRollback), "{denied:?}");
    assert_eq!(last_known(&state), Some(t + 1000));
}

/// Through the binary: `admit` on a normal, forward clock raises the last-known time
/// to the host's clock; a state whose last-known time (written as docs/state.md
/// documents it) lies ahead of the host's clock beyond the skew denies every capsule
/// `clock_rollback`, exit 1, on `verify` and `admit`; within the skew they pass.
#[test]
fn clock_behind_the_persisted_last_known_time_is_clock_rollback_through_the_cli() {
    let w = World::new();
    let state = w.path("state");
    let v1 = versioned(&w, "v1", "tok", 1);
    let v2 = versioned(&w, "v2", "tok", 2);
    let before = now();
    let v = admit(&w, &state, &[&v1]);
    assert_eq!(v.code, 0, "{v:?}");
    let first = last_known(&state).expect("a last-known time");
    assert!(
        first >= before && first <= now(),
        "{first} not in [{before}, now]"
    );

    let set = |t: u64| {
        tamper(&state, |txn| {
            let mut clock = txn.open_table(CLOCK).expect("clock");
            clock.insert("last_known", t).expect("insert");
        });
    };
    set(now() + 3600);
    for v in [verify(&w, &state, &[&v2]), admit(&w, &state, &[&v2])] {
        assert_eq!((v.code, v.reason(0)), (1, Some("clock_rollback")), "{v:?}");
    }
    // An older last-known time is raised by the next admission.
    set(before - 3600);
    let v = admit(&w, &state, &[&v2]);
    assert_eq!(v.code, 0, "{v:?}");
    assert!(last_known(&state).expect("time") >= before);
    // Within the skew (60 s in the fixture policy): admitted.
    let v3 = versioned(&w, "v3", "tok", 3);
    set(now() + 30);
    let v = admit(&w, &state, &[&v3]);
    assert_eq!(v.code, 0, "{v:?}");
}
