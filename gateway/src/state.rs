//! Durable anti-rollback state and the admission log, in one redb database.
//!
//! A state directory (mode 0700) holds `rollback.redb` and `state.json`, a marker
//! written once when the state is created (format, creation time, and a random state
//! id that the database's `meta` table holds too). A state is created only where
//! neither file exists, and never again: a marked state whose database is missing,
//! empty, truncated, corrupt or another state's denies every capsule
//! `state_unavailable` (deny by default) instead of starting a fresh, empty history.
//! A database of 0 bytes is refused in every case (redb would initialise it).
//!
//! redb commits with fsync by default (`Durability::Immediate`), so a committed
//! admission survives a crash; the caller prints a verdict only after the commit.
//! The admission log is append-only and hash-chained: each record carries the sha256
//! of the previous record's bytes, and the `log_head` table, written in the same
//! transaction as each append, holds the record count and the sha256 of the last
//! record, so editing or removing any record, the last one included, is detected
//! (by [`State::verify_log`], and before every append). Records are typed
//! ([`crate::admission_log::record`]): admissions and denials. Signed checkpoints
//! (table `log_checkpoints`, written in the transaction of the records they cover)
//! anchor the head, so a rewrite of the log and its head before the last checkpoint
//! is caught too; start-up walks only what follows the last checkpoint
//! ([`State::check_since_checkpoint`]), `log verify` everything
//! ([`State::audit_log`]). Full segments are sealed into files under `log/` and
//! leave the database (table `log_base` says where its records start); the file is
//! written after the commit that seals it, off the commit path ([`upkeep`]).
//!
//! The `clock` table holds the last-known time (as tough keeps its datastore time):
//! the latest clock reading a commit trusted, raised in the commit's transaction and
//! never lowered. A clock that reads earlier, beyond the policy's skew, is refused
//! (`clock_rollback`) on verification and again inside the recording transaction.
//!
//! redb holds an exclusive lock on the file while a `Database` is open. The CLI
//! therefore opens it only for bounded moments ([`StateDir`]): a read snapshot when
//! the first capsule reaches the rollback check, and a write transaction for the
//! commit; never while artifacts are hashed or a sandbox runs. `serve` is one process
//! and keeps its [`State`] open.
//!
//! A damaged file can make redb panic; every redb call runs under [`guarded`], which
//! turns a panic into an error (so into `state_unavailable`), never an abort.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::admission_log::chain::{Link, Walker};
use crate::admission_log::record::{
    AdmitRecord, Checkpoint, CheckpointCause, DenyRecord, LogRecord, SuppressedRecord,
    CHECKPOINT_SCHEMA,
};
use crate::admission_log::segment::{self, LOG_DIR};
use crate::admission_log::signer::{CheckpointSigner, Expect};
use crate::admission_log::{CheckpointSummary, Failure, FailureCode, LogConfig, LogReport};
use verify_core::digest::{open_regular_nofollow, Access, OpenError};
use verify_core::{
    check_clock, check_rollback, Admitted, AdmittedVersion, Clock, Decision, Policy, Reason,
    RollbackView, Sha256Digest, StateReadError,
};

/// (tenant, capsule_id) → (highest admitted version, digest of its JWS).
const VERSIONS: TableDefinition<(&str, &str), (u64, [u8; 32])> = TableDefinition::new("versions");
/// sequence number → JSON record.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("admission_log");
/// `HEAD_KEY` → (record count, sha256 of the last record's bytes; zeros when empty).
const HEAD: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("log_head");
/// `STATE_ID_KEY` → the state id the marker names.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// `LAST_KNOWN_KEY` → the latest time (Unix seconds) this state has trusted: the
/// clock of every commit, never lowered (docs/state.md, "Last-known time").
pub const CLOCK: TableDefinition<&str, u64> = TableDefinition::new("clock");
pub const LAST_KNOWN_KEY: &str = "last_known";
/// tenant -> the highest tenant-index version accepted (fleet freshness, issue 13).
const INDEX_VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("index_versions");
/// checkpoint number → (its exact bytes, its signature document's bytes).
const CHECKPOINTS: TableDefinition<u64, (&[u8], &[u8])> = TableDefinition::new("log_checkpoints");
/// `BASE_KEY` → (the first record still in `admission_log`, the sha256 of the record
/// before it, the next segment's number); absent: (0, zeros, 0). Sealed segments
/// moved the records before it into files.
const BASE: TableDefinition<&str, (u64, [u8; 32], u64)> = TableDefinition::new("log_base");
const BASE_KEY: &str = "base";
const HEAD_KEY: &str = "head";
const STATE_ID_KEY: &str = "state_id";

pub const STATE_FILE: &str = "rollback.redb";
pub const MARKER_FILE: &str = "state.json";
/// The marker's `format`.
pub const FORMAT: u64 = 1;
/// A marker is a few dozen bytes; anything larger is not one.
const MAX_MARKER_BYTES: u64 = 4096;
/// How long an open waits for another process's short hold on the database.
const LOCK_WAIT: Duration = Duration::from_secs(10);

fn err(path: &Path, e: impl std::fmt::Display) -> crate::GatewayError {
    crate::GatewayError::State {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn io_err(path: &Path, e: std::io::Error) -> crate::GatewayError {
    crate::GatewayError::io(path, e)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    verify_core::crypto::default_backend().sha256_oneshot(bytes)
}

const NOT_RECREATED: &str =
    "the state is never re-created automatically (docs/state.md says how to recover)";

/// The marker: written once, when the state is created.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    pub format: u64,
    pub created_at: u64,
    pub state_id: String,
}

/// A state directory whose layout has been checked; the database is opened only by
/// [`StateDir::open`], [`StateDir::snapshot`] and [`StateDir::record`].
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
    db: PathBuf,
    /// `None` only for `verify` on a database whose creation was interrupted before
    /// its marker was written (nothing is written then).
    marker: Option<Marker>,
    created: bool,
    adopted: bool,
    /// Signs checkpoints (`admit`, `run`, `serve`); without one none are written.
    signer: Option<Arc<CheckpointSigner>>,
    log: LogConfig,
}

/// What is at a path, opened without following a symlink.
enum Found {
    Absent,
    File(File, u64),
    NotRegular(&'static str),
}

/// Opens `path` as a regular file only (verify-core's `open_regular_nofollow`: the
/// type checked on an `O_PATH` descriptor before the open), so a symlink, FIFO or
/// device node is never opened for reading.
fn open_regular(path: &Path, write: bool) -> std::io::Result<Found> {
    let access = if write {
        Access::ReadWrite
    } else {
        Access::Read
    };
    match open_regular_nofollow(path, access) {
        Ok((file, st)) => Ok(Found::File(file, u64::try_from(st.st_size).unwrap_or(0))),
        Err(OpenError::Symlink) => Ok(Found::NotRegular("a symbolic link")),
        Err(OpenError::NotRegular(kind)) => Ok(Found::NotRegular(kind)),
        Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(Found::Absent),
        Err(e) => Err(e.into()),
    }
}

fn read_marker(path: &Path) -> Result<Option<Marker>, crate::GatewayError> {
    let (file, size) = match open_regular(path, false).map_err(|e| io_err(path, e))? {
        Found::Absent => return Ok(None),
        Found::NotRegular(kind) => {
            return Err(err(path, format!("the state marker is {kind}")));
        }
        Found::File(f, size) => (f, size),
    };
    if size > MAX_MARKER_BYTES {
        return Err(err(path, format!("the state marker is {size} bytes")));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_MARKER_BYTES + 1),
        &mut bytes,
    )
    .map_err(|e| io_err(path, e))?;
    let marker: Marker = serde_json::from_slice(&bytes)
        .map_err(|e| err(path, format!("the state marker is unreadable: {e}")))?;
    if marker.format != FORMAT {
        return Err(err(
            path,
            format!(
                "state format {} (this gateway reads format {FORMAT})",
                marker.format
            ),
        ));
    }
    Ok(Some(marker))
}

/// Writes `bytes` to `dir/name` whole or not at all: a temporary file, fsynced, then
/// hard-linked into place (never replacing an existing file: if another process got
/// there first, `false`), and the directory fsynced.
fn publish(dir: &Path, name: &str, tmp: &Path) -> Result<bool, crate::GatewayError> {
    let dest = dir.join(name);
    let linked = match std::fs::hard_link(tmp, &dest) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            return Err(io_err(&dest, e));
        }
    };
    std::fs::remove_file(tmp).map_err(|e| io_err(tmp, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))?;
    Ok(linked)
}

fn temp_path(dir: &Path, name: &str) -> Result<PathBuf, crate::GatewayError> {
    Ok(dir.join(format!(".{name}.{}.tmp", random_hex(8, dir)?)))
}

fn random_hex(n: usize, dir: &Path) -> Result<String, crate::GatewayError> {
    let mut b = vec![0u8; n];
    verify_core::crypto::default_backend()
        .random(&mut b)
        .map_err(|e| err(dir, e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn write_marker(dir: &Path, marker: &Marker) -> Result<(), crate::GatewayError> {
    let tmp = temp_path(dir, MARKER_FILE)?;
    let bytes = serde_json::to_vec(marker).map_err(|e| err(dir, e))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    drop(f);
    if !publish(dir, MARKER_FILE, &tmp)? {
        // Another process finished the same creation first: it must name this state.
        let path = dir.join(MARKER_FILE);
        match read_marker(&path)? {
            Some(m) if m.state_id == marker.state_id => {}
            _ => return Err(err(&path, "another state's marker appeared while creating")),
        }
    }
    Ok(())
}

thread_local! {
    /// Set while this thread is inside [`guarded`]: its panics are reported as errors.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs redb calls so that a panic (redb asserts on some damaged files) becomes an
/// error naming the file, without the panic message on stderr.
fn guarded<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, crate::GatewayError>,
) -> Result<T, crate::GatewayError> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    result.unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(err(
            path,
            format!("the database is damaged (reading it failed: {what}); {NOT_RECREATED}"),
        ))
    })
}

/// Opens the database file (a regular file, never a symlink, never 0 bytes), waiting
/// up to `LOCK_WAIT` for another process's short hold on it.
fn open_db(path: &Path) -> Result<Database, crate::GatewayError> {
    let (file, size) = match open_regular(path, true).map_err(|e| io_err(path, e))? {
        Found::Absent => {
            return Err(err(
                path,
                format!("the database is missing, but the state marker is there; {NOT_RECREATED}"),
            ))
        }
        Found::NotRegular(kind) => {
            return Err(err(
                path,
                format!("the database is {kind}; {NOT_RECREATED}"),
            ));
        }
        Found::File(f, size) => (f, size),
    };
    if size == 0 {
        return Err(err(
            path,
            format!("the database is empty (0 bytes); {NOT_RECREATED}"),
        ));
    }
    let deadline = Instant::now() + LOCK_WAIT;
    let mut wait = Duration::from_millis(2);
    loop {
        let clone = file.try_clone().map_err(|e| io_err(path, e))?;
        let opened = guarded(path, || {
            let backend = redb::backends::FileBackend::new(clone);
            // `create_with_backend` would initialise an empty file; the size was
            // checked above on this very descriptor.
            Ok(backend.and_then(|b| redb::Builder::new().create_with_backend(b)))
        })?;
        match opened {
            Ok(db) => return Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(err(
                    path,
                    format!("another process held the database for more than {LOCK_WAIT:?}"),
                ))
            }
            Err(e) => {
                return Err(err(
                    path,
                    format!("the database is damaged: {e}; {NOT_RECREATED}"),
                ))
            }
        }
    }
}

/// The log head as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogHead {
    count: u64,
    last: [u8; 32],
}

impl StateDir {
    /// Checks the layout of `dir` without opening the database. Neither file there:
    /// `Ok(None)`, or with `create` a new, empty state is created ([`StateDir::created`]).
    /// A database whose creation was interrupted before its marker was written is
    /// finished (`create`) or read as it is.
    /// `clock` dates a state created now (its marker and first last-known time).
    pub fn locate(
        dir: &Path,
        create: bool,
        clock: &dyn Clock,
    ) -> Result<Option<StateDir>, crate::GatewayError> {
        let db = dir.join(STATE_FILE);
        let marker_path = dir.join(MARKER_FILE);
        let marker = read_marker(&marker_path)?;
        let found = open_regular(&db, false).map_err(|e| io_err(&db, e))?;
        let mut state = StateDir {
            dir: dir.to_path_buf(),
            db: db.clone(),
            marker,
            created: false,
            adopted: false,
            signer: None,
            log: LogConfig::default(),
        };
        match (found, &state.marker) {
            (Found::Absent, None) if create => {
                state.create(clock)?;
                // Re-read: a concurrent creator may have won; its state is the one.
                let mut again = StateDir::locate(dir, false, clock)?
                    .ok_or_else(|| err(&db, "the state vanished while it was created"))?;
                again.created = state.created;
                if again.marker.is_none() {
                    return Err(err(
                        &marker_path,
                        "the marker vanished while it was created",
                    ));
                }
                Ok(Some(again))
            }
            (Found::Absent, None) => Ok(None),
            (Found::Absent, Some(m)) => Err(err(
                &db,
                format!(
                    "the database is missing, but the state marker says it was created at \
                     {} (unix time); {NOT_RECREATED}",
                    m.created_at
                ),
            )),
            (Found::NotRegular(kind), _) => {
                Err(err(&db, format!("the database is {kind}; {NOT_RECREATED}")))
            }
            (Found::File(_, 0), _) => Err(err(
                &db,
                format!("the database is empty (0 bytes); {NOT_RECREATED}"),
            )),
            (Found::File(..), Some(_)) => Ok(Some(state)),
            (Found::File(..), None) if create => {
                state.finish(clock)?;
                Ok(Some(state))
            }
            (Found::File(..), None) => Ok(Some(state)),
        }
    }

    /// Checkpoints of this state are signed by `signer`, at the intervals of `log`.
    pub fn with_log(mut self, signer: Option<Arc<CheckpointSigner>>, log: LogConfig) -> StateDir {
        self.signer = signer;
        self.log = log;
        self
    }

    /// The directory of the sealed segments and the checkpoint key.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join(LOG_DIR)
    }

    /// Whether [`StateDir::locate`] created this state just now.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Whether [`StateDir::locate`] just wrote the marker of a state made before
    /// markers existed (its whole log checked first).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn db_path(&self) -> &Path {
        &self.db
    }

    /// A new, empty state: the database under a temporary name (tables and state id
    /// committed, so fsynced), linked into place, then the marker (temporary file,
    /// fsync, link) and a directory fsync. Neither is ever replaced.
    fn create(&mut self, clock: &dyn Clock) -> Result<(), crate::GatewayError> {
        let dir = self.dir.clone();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io_err(&dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err(&dir, e))?;
        let state_id = random_hex(16, &dir)?;
        let tmp = temp_path(&dir, STATE_FILE)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        let initialised = guarded(&tmp, || {
            let backend = redb::backends::FileBackend::new(file).map_err(|e| err(&tmp, e))?;
            let db = redb::Builder::new()
                .create_with_backend(backend)
                .map_err(|e| err(&tmp, e))?;
            let txn = db.begin_write().map_err(|e| err(&tmp, e))?;
            {
                txn.open_table(VERSIONS).map_err(|e| err(&tmp, e))?;
                txn.open_table(LOG).map_err(|e| err(&tmp, e))?;
                let mut meta = txn.open_table(META).map_err(|e| err(&tmp, e))?;
                meta.insert(STATE_ID_KEY, state_id.as_str())
                    .map_err(|e| err(&tmp, e))?;
                let mut head = txn.open_table(HEAD).map_err(|e| err(&tmp, e))?;
                head.insert(HEAD_KEY, (0, [0u8; 32]))
                    .map_err(|e| err(&tmp, e))?;
                let mut time = txn.open_table(CLOCK).map_err(|e| err(&tmp, e))?;
                time.insert(LAST_KNOWN_KEY, clock.now_unix())
                    .map_err(|e| err(&tmp, e))?;
            }
            txn.commit().map_err(|e| err(&tmp, e))
        });
        if let Err(e) = initialised {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if publish(&dir, STATE_FILE, &tmp)? {
            self.created = true;
        }
        // Whoever linked the database, the marker must name the state now in place.
        self.finish(clock)
    }

    /// A database without a marker: the creation was interrupted after the database
    /// was linked (its `meta` names the state), or the state predates markers (no
    /// `meta`: its whole log is checked, then the head and a state id are written).
    /// Then the marker is written.
    fn finish(&mut self, clock: &dyn Clock) -> Result<(), crate::GatewayError> {
        let path = self.db.clone();
        let db = open_db(&path)?;
        let state_id = guarded(&path, || {
            let existing = {
                let txn = db.begin_read().map_err(|e| err(&path, e))?;
                read_state_id(&txn, &path)?
            };
            if let Some(id) = existing {
                return Ok(id);
            }
            self.adopted = true;
            let id = random_hex(16, &self.dir)?;
            let txn = db.begin_write().map_err(|e| err(&path, e))?;
            {
                let log = txn.open_table(LOG).map_err(|e| err(&path, e))?;
                let head = walk_log(&log, &path)?;
                let mut heads = txn.open_table(HEAD).map_err(|e| err(&path, e))?;
                if heads.len().map_err(|e| err(&path, e))? != 0 {
                    return Err(err(
                        &path,
                        "the database has a log head but no state id: not a state this \
                         gateway created",
                    ));
                }
                heads
                    .insert(HEAD_KEY, (head.count, head.last))
                    .map_err(|e| err(&path, e))?;
                txn.open_table(VERSIONS).map_err(|e| err(&path, e))?;
                let mut meta = txn.open_table(META).map_err(|e| err(&path, e))?;
                meta.insert(STATE_ID_KEY, id.as_str())
                    .map_err(|e| err(&path, e))?;
            }
            txn.commit().map_err(|e| err(&path, e))?;
            Ok(id)
        })?;
        drop(db);
        let marker = Marker {
            format: FORMAT,
            created_at: clock.now_unix(),
            state_id,
        };
        write_marker(&self.dir, &marker)?;
        self.marker = read_marker(&self.dir.join(MARKER_FILE))?;
        Ok(())
    }

    /// Opens the database and checks that it is this marker's state and that its log
    /// head matches its last record. Held until the [`State`] is dropped.
    pub fn open(&self) -> Result<State, crate::GatewayError> {
        self.open_checked(true)
    }

    /// [`StateDir::open`]; without `check_head`, the log is not compared with its
    /// head (`log verify` does that itself, and names what it finds).
    fn open_checked(&self, check_head_now: bool) -> Result<State, crate::GatewayError> {
        let db = open_db(&self.db)?;
        let state = State {
            db,
            path: self.db.clone(),
            broken: AtomicBool::new(false),
            last_known: AtomicU64::new(0),
            state_id: self.marker.as_ref().map(|m| m.state_id.clone()),
            log_dir: self.log_dir(),
            signer: self.signer.clone(),
            log: self.log,
            denials: Mutex::new(DenialBudget::new(&self.log)),
            upkeep: upkeep::Upkeep::default(),
        };
        state.guard(|| {
            let txn = state.db.begin_read().map_err(|e| state.err(e))?;
            let id = read_state_id(&txn, &state.path)?;
            match (&self.marker, id) {
                (Some(m), Some(id)) if m.state_id == id => {}
                (Some(m), Some(id)) => {
                    return Err(state.err(format!(
                        "the database is state {id}, the marker names state {}: it was \
                         replaced; {NOT_RECREATED}",
                        m.state_id
                    )))
                }
                (Some(_), None) => {
                    return Err(state.err(format!(
                        "the database has no state id: it was replaced; {NOT_RECREATED}"
                    )))
                }
                // An interrupted creation, read by `verify` as it is.
                (None, _) => {}
            }
            let log = open_read_table(&txn, LOG, &state.path)?;
            let head = read_head(&txn, &state.path)?;
            if !check_head_now {
                // `log verify` compares the log with its head itself.
            } else if let Some(log) = log {
                let base = read_base(&txn, &state.path)?;
                let base = Link {
                    count: base.0,
                    last: base.1,
                };
                check_head(&log, head, base, &state.path)?;
            } else if head.count != 0 {
                return Err(state.err(format!(
                    "the admission log is missing, the log head says {} records",
                    head.count
                )));
            }
            let last_known = read_last_known(&txn, &state.path)?;
            state
                .last_known
                .store(last_known.unwrap_or(0), Ordering::Release);
            Ok(())
        })?;
        Ok(state)
    }

    /// Reads what verification needs, then closes the database: the whole log is
    /// checked (chain and head), and the versions table is read.
    pub fn snapshot(&self) -> Result<Snapshot, crate::GatewayError> {
        let state = self.open()?;
        state.check_since_checkpoint()?;
        let versions = state.guard(|| {
            let txn = state.db.begin_read().map_err(|e| state.err(e))?;
            let mut out = HashMap::new();
            if let Some(table) = open_read_table(&txn, VERSIONS, &state.path)? {
                for row in table.iter().map_err(|e| state.err(e))? {
                    let (k, v) = row.map_err(|e| state.err(e))?;
                    let (tenant, id) = k.value();
                    let (version, digest) = v.value();
                    out.insert(
                        (tenant.to_string(), id.to_string()),
                        AdmittedVersion {
                            version,
                            digest: Sha256Digest(digest),
                        },
                    );
                }
            }
            Ok(out)
        })?;
        let index_versions = state.index_versions()?;
        Ok(Snapshot {
            versions,
            last_known: state.last_known_time_now(),
            index_versions,
        })
    }

    /// Raises the highest tenant-index version recorded for each tenant (never lowers
    /// one), in one durable transaction: done before the admissions that used these
    /// indexes are acknowledged, so a crash can only leave the state stricter.
    pub fn record_index_versions(&self, seen: &[(String, u64)]) -> Result<(), crate::GatewayError> {
        if seen.is_empty() {
            return Ok(());
        }
        let state = self.open()?;
        state.guard(|| {
            let txn = state.db.begin_write().map_err(|e| state.err(e))?;
            {
                let mut table = txn.open_table(INDEX_VERSIONS).map_err(|e| state.err(e))?;
                for (tenant, version) in seen {
                    let known = table
                        .get(tenant.as_str())
                        .map_err(|e| state.err(e))?
                        .map(|g| g.value());
                    if known.is_none_or(|k| k < *version) {
                        table
                            .insert(tenant.as_str(), *version)
                            .map_err(|e| state.err(e))?;
                    }
                }
            }
            txn.commit().map_err(|e| state.err(e))
        })
    }

    /// Opens the database, records the batch ([`State::record`]: admissions and
    /// denials) and a checkpoint of its end, and closes it. If nothing can be
    /// recorded, every admitted capsule is denied `state_unavailable` instead (nothing
    /// was acknowledged).
    pub fn record(
        &self,
        results: Vec<Result<Admitted, Decision>>,
        policy: &Policy,
        clock: &dyn Clock,
    ) -> Vec<Result<Admitted, Decision>> {
        if results.is_empty() {
            return results;
        }
        let state = match self.open() {
            Ok(s) => s,
            Err(e) => return deny_unavailable(results, &e.to_string()),
        };
        match state.record_or_return(results, policy, clock, Some(CheckpointCause::Batch)) {
            Ok(out) => out,
            Err((results, e)) => deny_unavailable(results, &e.to_string()),
        }
    }

    /// Verifies the whole log offline (`log verify`): see [`State::audit_log`].
    /// A state that cannot be opened is `state_unreadable`.
    pub fn audit_log(&self, expect: &Expect) -> Result<LogReport, Failure> {
        let state = self
            .open_checked(false)
            .map_err(|e| Failure::new(FailureCode::StateUnreadable, e.to_string()))?;
        state.audit_log(expect)
    }
}

/// Says on stderr that a state was created or adopted just now: an operator who did
/// not expect a new, empty history learns of it from the first command that made it.
pub fn announce(state: &StateDir) {
    if state.created() {
        eprintln!(
            "capsule-gateway: created a new, empty anti-rollback state at {}",
            state.dir().display()
        );
    } else if state.adopted() {
        eprintln!(
            "capsule-gateway: adopted the anti-rollback state at {} (made before state \
             markers; its log was checked and {MARKER_FILE} written)",
            state.dir().display()
        );
    }
}

/// Every admitted capsule becomes a `state_unavailable` denial.
pub fn deny_unavailable(
    results: Vec<Result<Admitted, Decision>>,
    why: &str,
) -> Vec<Result<Admitted, Decision>> {
    results
        .into_iter()
        .map(|r| {
            r.and_then(|a| {
                Err(a.into_decision().into_denied(
                    Reason::StateUnavailable,
                    format!("{why}; nothing was recorded"),
                ))
            })
        })
        .collect()
}

fn open_read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
    path: &Path,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, crate::GatewayError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(err(path, e)),
    }
}

fn read_state_id(
    txn: &redb::ReadTransaction,
    path: &Path,
) -> Result<Option<String>, crate::GatewayError> {
    let Some(meta) = open_read_table(txn, META, path)? else {
        return Ok(None);
    };
    Ok(meta
        .get(STATE_ID_KEY)
        .map_err(|e| err(path, e))?
        .map(|g| g.value().to_string()))
}

/// The stored last-known time; `None` in a state made before it was kept (its first
/// commit starts it).
fn read_last_known(
    txn: &redb::ReadTransaction,
    path: &Path,
) -> Result<Option<u64>, crate::GatewayError> {
    let Some(table) = open_read_table(txn, CLOCK, path)? else {
        return Ok(None);
    };
    Ok(table
        .get(LAST_KNOWN_KEY)
        .map_err(|e| err(path, e))?
        .map(|g| g.value()))
}

fn read_head(txn: &redb::ReadTransaction, path: &Path) -> Result<LogHead, crate::GatewayError> {
    let head = open_read_table(txn, HEAD, path)?
        .map(|t| t.get(HEAD_KEY).map(|g| g.map(|g| g.value())))
        .transpose()
        .map_err(|e| err(path, e))?
        .flatten();
    match head {
        Some((count, last)) => Ok(LogHead { count, last }),
        None => Err(err(
            path,
            format!("the admission log head is missing; {NOT_RECREATED}"),
        )),
    }
}

/// The last record's bytes must hash to the stored head and its sequence number
/// must be the stored count minus one; with no record in the database (an empty log,
/// or every record sealed into segments), the head is where the segments end.
fn check_head(
    log: &impl ReadableTable<u64, &'static [u8]>,
    head: LogHead,
    base: Link,
    path: &Path,
) -> Result<(), crate::GatewayError> {
    let last = log.last().map_err(|e| err(path, e))?;
    match (last, head.count) {
        (None, n) if n == base.count && head.last == base.last => Ok(()),
        (None, n) => Err(err(
            path,
            format!(
                "admission log: empty, but the log head says {n} records (records were removed)"
            ),
        )),
        (Some((k, _)), n) if k.value().checked_add(1) != Some(n) => Err(err(
            path,
            format!(
                "admission log: the last record is {}, but the log head says {n} records \
                 (records were removed or added)",
                k.value()
            ),
        )),
        (Some((k, v)), _) if sha256(v.value()) != head.last => Err(err(
            path,
            format!(
                "admission log: record {} (the last) was changed: it does not hash to the \
                 stored log head",
                k.value()
            ),
        )),
        (Some(_), _) => Ok(()),
    }
}

/// Walks the whole log: consecutive sequence numbers from 0, each record chained to
/// its predecessor. Returns the head it ends at.
fn walk_log(
    log: &impl ReadableTable<u64, &'static [u8]>,
    path: &Path,
) -> Result<LogHead, crate::GatewayError> {
    let checks = BTreeMap::new();
    let mut walk = Walker::new(Link::START, &checks, false);
    for row in log.iter().map_err(|e| err(path, e))? {
        let (k, v) = row.map_err(|e| err(path, e))?;
        walk.step(k.value(), v.value()).map_err(|f| err(path, f))?;
    }
    let end = walk.at();
    Ok(LogHead {
        count: end.count,
        last: end.last,
    })
}

mod upkeep;
pub use upkeep::Upkept;

/// An open database; the file stays locked until this is dropped.
#[derive(Debug)]
pub struct State {
    db: Database,
    path: PathBuf,
    /// redb panicked during an operation: nothing further is trusted.
    broken: AtomicBool,
    /// The stored last-known time (0: none yet), read at open and raised by each
    /// commit of this process, which holds the database's lock while it is open.
    last_known: AtomicU64,
    state_id: Option<String>,
    log_dir: PathBuf,
    signer: Option<Arc<CheckpointSigner>>,
    log: LogConfig,
    denials: Mutex<DenialBudget>,
    upkeep: upkeep::Upkeep,
}

/// Seconds after which counted denials are written even without another commit.
const SUPPRESSED_FLUSH_S: u64 = 60;

/// How many denials this process may still record one by one (a token bucket), and
/// the ones it counted instead since the last summary record.
#[derive(Debug)]
struct DenialBudget {
    tokens: u64,
    refilled_at: u64,
    suppressed: u64,
    reasons: BTreeMap<String, u64>,
    first_at: u64,
    last_at: u64,
}

impl DenialBudget {
    fn new(config: &LogConfig) -> DenialBudget {
        DenialBudget {
            tokens: config.denial_burst,
            refilled_at: 0,
            suppressed: 0,
            reasons: BTreeMap::new(),
            first_at: 0,
            last_at: 0,
        }
    }

    /// Whether one more denial at `now` is recorded one by one; if not, it is counted.
    fn take(&mut self, config: &LogConfig, now: u64, reason: &str) -> bool {
        if self.refilled_at == 0 {
            self.refilled_at = now;
        }
        let refill = now
            .saturating_sub(self.refilled_at)
            .saturating_mul(config.denials_per_second);
        if refill > 0 {
            self.tokens = (self.tokens.saturating_add(refill)).min(config.denial_burst);
            self.refilled_at = now;
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            return true;
        }
        if self.suppressed == 0 {
            self.first_at = now;
        }
        self.suppressed += 1;
        self.last_at = now;
        *self.reasons.entry(reason.to_string()).or_insert(0) += 1;
        false
    }

    /// The summary of what was counted, emptied.
    fn drain(&mut self, seq: u64, prev: &Sha256Digest) -> Option<LogRecord> {
        if self.suppressed == 0 {
            return None;
        }
        let record = LogRecord::DenialsSuppressed(SuppressedRecord {
            seq,
            prev: prev.to_string(),
            count: self.suppressed,
            reasons: std::mem::take(&mut self.reasons),
            first_at: self.first_at,
            last_at: self.last_at,
        });
        self.suppressed = 0;
        Some(record)
    }
}

/// What [`State::record_or_return`] hands back when nothing was recorded.
type NotRecorded = (Vec<Result<Admitted, Decision>>, crate::GatewayError);

impl State {
    /// Locates (creating if asked, see [`StateDir::locate`]) and opens `DIR`'s state,
    /// kept open until dropped (`serve`, tests). `Ok(None)`: no state there.
    pub fn open(
        dir: &Path,
        create: bool,
        clock: &dyn Clock,
    ) -> Result<Option<State>, crate::GatewayError> {
        match StateDir::locate(dir, create, clock)? {
            Some(s) => s.open().map(Some),
            None => Ok(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state's id (its marker's), `None` for an interrupted creation.
    pub fn state_id(&self) -> Option<&str> {
        self.state_id.as_deref()
    }

    /// The latest time this state has trusted, if it has recorded one.
    pub fn last_known_time_now(&self) -> Option<u64> {
        match self.last_known.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> crate::GatewayError {
        err(&self.path, e)
    }

    fn guard<T>(
        &self,
        f: impl FnOnce() -> Result<T, crate::GatewayError>,
    ) -> Result<T, crate::GatewayError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(self.err(
                "the database failed earlier in this process; nothing more is read or written",
            ));
        }
        let out = guarded(&self.path, || {
            std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
                self.broken.store(true, Ordering::Release);
                std::panic::resume_unwind(p)
            })
        });
        // A checkpoint the closure committed is recorded outside the state, by the
        // upkeep that follows the commit (`upkeep`).
        self.upkeep
            .committed(crate::admission_log::witness::take_staged(out.is_ok()));
        out
    }

    /// Records a batch in one durable transaction, in order: each admission, and each
    /// denial (its reason and capsule digest only) within the denial budget. Each
    /// admission is checked again against the state inside the transaction (an
    /// earlier capsule of the same batch, or another process, may have admitted a
    /// higher version since it was verified); one that no longer passes is returned
    /// as a `rollback` denial, and logged as one.
    /// Before anything is appended, the last record must hash to the stored log head;
    /// each record chains from that head, which is updated in the same transaction.
    /// The clock is checked again against the stored last-known time (another process
    /// may have raised it since); a clock stepped back beyond the policy's skew denies
    /// every capsule of the batch `clock_rollback`. Otherwise the last-known time is
    /// raised to the clock in the same transaction.
    /// A signed checkpoint is written in the same transaction every
    /// `log.checkpoint_every` records, and a full segment is sealed (docs/state.md).
    /// Nothing is acknowledged unless the commit succeeds. The admitted capsules are
    /// handed back (for `run`), in order.
    pub fn record(
        &self,
        admitted: Vec<Result<Admitted, Decision>>,
        policy: &Policy,
        clock: &dyn Clock,
    ) -> Result<Vec<Result<Admitted, Decision>>, crate::GatewayError> {
        self.record_or_return(admitted, policy, clock, None)
            .map_err(|(_, e)| e)
    }

    fn record_or_return(
        &self,
        admitted: Vec<Result<Admitted, Decision>>,
        policy: &Policy,
        clock: &dyn Clock,
        end: Option<CheckpointCause>,
    ) -> Result<Vec<Result<Admitted, Decision>>, NotRecorded> {
        let policy_version = policy.policy_version.as_str();
        let now = clock.now_unix();
        let mut raised = None;
        let mut budget = match self.denials.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        // Which denials are logged one by one is decided before the transaction: a
        // batch of denials only, all over the budget, commits nothing (no fsync).
        let logged: Vec<bool> = admitted
            .iter()
            .map(|item| match item {
                Ok(_) => true,
                Err(d) => match d.reason {
                    // The state failed: there is nothing to record it in.
                    Some(Reason::StateUnavailable) | None => false,
                    Some(r) => budget.take(&self.log, now, r.as_str()),
                },
            })
            .collect();
        // Counted denials are written with the next commit, or by themselves once
        // the oldest is a minute old.
        let summary_due =
            budget.suppressed > 0 && now.saturating_sub(budget.first_at) >= SUPPRESSED_FLUSH_S;
        if !logged.iter().any(|l| *l) && end.is_none() && !summary_due {
            return Ok(admitted);
        }
        // The transaction only reads `admitted` until it commits: on any failure the
        // results are returned untouched, for the caller to deny.
        let outcome = self.guard(|| {
            let txn = self.db.begin_write().map_err(|e| self.err(e))?;
            let mut verdicts = Vec::with_capacity(admitted.len());
            {
                let mut versions = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
                let mut log = txn.open_table(LOG).map_err(|e| self.err(e))?;
                let mut heads = txn.open_table(HEAD).map_err(|e| self.err(e))?;
                let stored = heads
                    .get(HEAD_KEY)
                    .map_err(|e| self.err(e))?
                    .map(|g| g.value());
                let Some((count, last)) = stored else {
                    return Err(self.err(format!(
                        "the admission log head is missing; {NOT_RECREATED}"
                    )));
                };
                check_head(
                    &log,
                    LogHead { count, last },
                    write_base(&txn, &self.path)?,
                    &self.path,
                )?;
                let mut time = txn.open_table(CLOCK).map_err(|e| self.err(e))?;
                let last_known = time
                    .get(LAST_KNOWN_KEY)
                    .map_err(|e| self.err(e))?
                    .map(|g| g.value());
                let stepped_back = check_clock(now, last_known, policy.clock_skew_s).err();
                let (mut seq, mut prev) = (count, Sha256Digest(last));
                let mut append = |record: LogRecord,
                                  seq: &mut u64,
                                  prev: &mut Sha256Digest|
                 -> Result<(), crate::GatewayError> {
                    let bytes = record.to_bytes();
                    log.insert(*seq, bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                    *prev = Sha256Digest(sha256(&bytes));
                    *seq += 1;
                    Ok(())
                };
                let deny = |seq: u64, prev: &Sha256Digest, reason: Reason, d: &Decision| {
                    LogRecord::Deny(DenyRecord {
                        seq,
                        prev: prev.to_string(),
                        reason: reason.as_str().to_string(),
                        capsule_digest: d.digest.map(|x| x.to_string()),
                        policy_version: policy_version.to_string(),
                        denied_at: now,
                    })
                };
                for (item, logged) in admitted.iter().zip(&logged) {
                    let a = match item {
                        Ok(a) => a,
                        Err(d) => {
                            if let (true, Some(reason)) = (logged, d.reason) {
                                append(deny(seq, &prev, reason, d), &mut seq, &mut prev)?;
                            }
                            verdicts.push(None);
                            continue;
                        }
                    };
                    let denied = if let Some(why) = stepped_back {
                        Some((Reason::ClockRollback, why.to_string()))
                    } else {
                        let m = a.manifest();
                        let key = (m.tenant.as_str(), m.capsule_id.as_str());
                        let latest = versions.get(key).map_err(|e| self.err(e))?.map(|g| {
                            let (version, digest) = g.value();
                            AdmittedVersion {
                                version,
                                digest: Sha256Digest(digest),
                            }
                        });
                        check_rollback(latest, m.version, a.digest())
                            .err()
                            .map(|why| (Reason::Rollback, why.to_string()))
                    };
                    if let Some((reason, why)) = denied {
                        append(deny(seq, &prev, reason, a.decision()), &mut seq, &mut prev)?;
                        verdicts.push(Some((reason, why)));
                        continue;
                    }
                    let m = a.manifest();
                    versions
                        .insert(
                            (m.tenant.as_str(), m.capsule_id.as_str()),
                            (m.version, a.digest().0),
                        )
                        .map_err(|e| self.err(e))?;
                    let record = LogRecord::Admit(AdmitRecord {
                        seq,
                        prev: prev.to_string(),
                        capsule_digest: a.digest().to_string(),
                        tenant: m.tenant.clone(),
                        capsule_id: m.capsule_id.clone(),
                        version: m.version,
                        kid: a.decision().kid.clone(),
                        policy_version: policy_version.to_string(),
                        approvers: m
                            .approvals
                            .iter()
                            .map(|x| x.approver.as_str().to_string())
                            .collect(),
                        admitted_at: now,
                    });
                    append(record, &mut seq, &mut prev)?;
                    verdicts.push(None);
                }
                if let Some(summary) = budget.drain(seq, &prev) {
                    append(summary, &mut seq, &mut prev)?;
                }
                heads
                    .insert(HEAD_KEY, (seq, prev.0))
                    .map_err(|e| self.err(e))?;
                drop((log, heads));
                self.checkpoint_in(
                    &txn,
                    Link {
                        count: seq,
                        last: prev.0,
                    },
                    now,
                    end,
                )?;
                // The last-known time only moves forward, in the transaction that
                // records what was admitted by it.
                if stepped_back.is_none() && last_known.is_none_or(|t| now > t) {
                    time.insert(LAST_KNOWN_KEY, now).map_err(|e| self.err(e))?;
                    raised = Some(now);
                }
            }
            txn.commit().map_err(|e| self.err(e))?;
            Ok(verdicts)
        });
        if let (Ok(_), Some(now)) = (&outcome, raised) {
            self.last_known.fetch_max(now, Ordering::AcqRel);
        }
        if outcome.is_ok() {
            self.after_commit();
        }
        match outcome {
            Ok(verdicts) => Ok(admitted
                .into_iter()
                .zip(verdicts)
                .map(|(item, denied)| match (item, denied) {
                    (Ok(a), Some((reason, why))) => Err(a.into_decision().into_denied(reason, why)),
                    (item, _) => item,
                })
                .collect()),
            Err(e) => Err((admitted, e)),
        }
    }

    /// Writes a checkpoint now if records were appended since the last one (and the
    /// counted denials first): `serve`'s graceful stop. Returns its number.
    pub fn checkpoint(
        &self,
        clock: &dyn Clock,
        cause: CheckpointCause,
    ) -> Result<Option<u64>, crate::GatewayError> {
        if self.signer.is_none() {
            return Ok(None);
        }
        let now = clock.now_unix();
        let mut budget = match self.denials.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        let written = self.guard(|| {
            let txn = self.db.begin_write().map_err(|e| self.err(e))?;
            let written = {
                let mut log = txn.open_table(LOG).map_err(|e| self.err(e))?;
                let mut heads = txn.open_table(HEAD).map_err(|e| self.err(e))?;
                let (mut count, mut last) = heads
                    .get(HEAD_KEY)
                    .map_err(|e| self.err(e))?
                    .map(|g| g.value())
                    .ok_or_else(|| {
                        self.err(format!(
                            "the admission log head is missing; {NOT_RECREATED}"
                        ))
                    })?;
                check_head(
                    &log,
                    LogHead { count, last },
                    write_base(&txn, &self.path)?,
                    &self.path,
                )?;
                if let Some(summary) = budget.drain(count, &Sha256Digest(last)) {
                    let bytes = summary.to_bytes();
                    log.insert(count, bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                    (count, last) = (count + 1, sha256(&bytes));
                    heads
                        .insert(HEAD_KEY, (count, last))
                        .map_err(|e| self.err(e))?;
                }
                drop((log, heads));
                self.checkpoint_in(&txn, Link { count, last }, now, Some(cause))?
            };
            txn.commit().map_err(|e| self.err(e))?;
            Ok(written)
        })?;
        // The graceful stop: whatever upkeep is left is done now, whoever runs it.
        if let Err(e) = self.upkeep() {
            tracing::warn!(error = %e, "admission log upkeep failed at the checkpoint");
        }
        Ok(written)
    }

    /// Inside a write transaction whose log ends at `end`: writes the checkpoint that
    /// is due (a multiple of `checkpoint_every` crossed, or `cause` given and records
    /// appended since the last one), sealing the segment when it is full.
    fn checkpoint_in(
        &self,
        txn: &redb::WriteTransaction,
        end: Link,
        now: u64,
        cause: Option<CheckpointCause>,
    ) -> Result<Option<u64>, crate::GatewayError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(|e| self.err(e))?;
        let last = match checkpoints.last().map_err(|e| self.err(e))? {
            Some((k, v)) => {
                let cp = Checkpoint::parse(v.value().0).map_err(|e| {
                    self.err(format!(
                        "admission log: checkpoint {} is unreadable: {e}",
                        k.value()
                    ))
                })?;
                Some((cp, sha256(v.value().0)))
            }
            None => None,
        };
        let covered = last.as_ref().map_or(0, |(cp, _)| cp.count);
        if end.count == covered {
            return Ok(None);
        }
        let mut bases = txn.open_table(BASE).map_err(|e| self.err(e))?;
        let (first, first_prev, segment) = bases
            .get(BASE_KEY)
            .map_err(|e| self.err(e))?
            .map_or((0, [0u8; 32], 0), |g| g.value());
        // Decided before the walk below: a commit that writes no checkpoint walks
        // nothing (walking on every commit made each cost grow with the records
        // since the last checkpoint).
        let every = self.log.checkpoint_every;
        let seals = end.count - first >= self.log.segment_records;
        let interval = end.count / every > covered / every;
        let cause = match cause {
            _ if seals || interval => CheckpointCause::Interval,
            Some(c) => c,
            None => return Ok(None),
        };
        // A checkpoint vouches only for what was checked: every record since the last
        // checkpoint (or the start of the database's records) is walked first, so a
        // log edited after its last checkpoint is never signed over.
        let mut start = Link {
            count: first,
            last: first_prev,
        };
        if let Some((cp, _)) = &last {
            if cp.count > first {
                start = Link {
                    count: cp.count - 1,
                    last: [0; 32],
                };
            }
        }
        {
            let log = txn.open_table(LOG).map_err(|e| self.err(e))?;
            let cp_head = last.as_ref().and_then(|(cp, _)| digest_field(&cp.head));
            if start.count + 1 == covered {
                let at = log
                    .get(start.count)
                    .map_err(|e| self.err(e))?
                    .map(|g| sha256(g.value()));
                if at.is_none() || at != cp_head {
                    return Err(self.err(format!(
                        "admission log: record {} was changed: it does not hash to the head \
                         of the last signed checkpoint",
                        start.count
                    )));
                }
                start = Link {
                    count: covered,
                    last: cp_head.unwrap_or_default(),
                };
            }
            let checks = BTreeMap::new();
            let mut walk = Walker::new(start, &checks, false);
            for row in log.range(start.count..).map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                walk.step(k.value(), v.value()).map_err(|f| self.err(f))?;
            }
            compare_head(
                walk.at(),
                LogHead {
                    count: end.count,
                    last: end.last,
                },
                &self.path,
            )?;
        }
        let number = last.as_ref().map_or(0, |(cp, _)| cp.number + 1);
        let cp = Checkpoint {
            schema: CHECKPOINT_SCHEMA.into(),
            state_id: self.state_id.clone().unwrap_or_default(),
            number,
            prev_checkpoint: last.as_ref().map(|(_, h)| Sha256Digest(*h).to_string()),
            count: end.count,
            head: Sha256Digest(end.last).to_string(),
            time: now,
            cause,
            segment,
            segment_first: first,
            segment_prev: Sha256Digest(first_prev).to_string(),
            seals,
        };
        let bytes = cp.to_bytes();
        let sig = signer.sign(&bytes).map_err(|e| self.err(e))?;
        checkpoints
            .insert(number, (bytes.as_slice(), sig.as_slice()))
            .map_err(|e| self.err(e))?;
        crate::admission_log::witness::stage(
            &self.path,
            self.state_id.as_deref(),
            number,
            cp.count,
            cp.head.clone(),
        );
        if seals {
            // Sealed now, exported after the commit (`upkeep`): the records stay
            // below the base, noted, until their file is durable.
            txn.open_table(upkeep::SEALING)
                .map_err(|e| self.err(e))?
                .insert(segment, (first, end.count, number))
                .map_err(|e| self.err(e))?;
            self.upkeep.sealed();
            bases
                .insert(BASE_KEY, (end.count, end.last, segment + 1))
                .map_err(|e| self.err(e))?;
        }
        Ok(Some(number))
    }

    /// The start-up check: the last checkpoint's signature, that the record it ends
    /// at still hashes to its head, and every record after it (chain and head). What
    /// lies before the last checkpoint is `log verify`'s (docs/state.md).
    pub fn check_since_checkpoint(&self) -> Result<u64, crate::GatewayError> {
        self.guard(|| {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let head = read_head(&txn, &self.path)?;
            let base = read_base(&txn, &self.path)?;
            let last = match open_read_table(&txn, CHECKPOINTS, &self.path)? {
                Some(t) => t
                    .last()
                    .map_err(|e| self.err(e))?
                    .map(|(k, v)| (k.value(), v.value().0.to_vec(), v.value().1.to_vec())),
                None => None,
            };
            let log = open_read_table(&txn, LOG, &self.path)?;
            let mut start = Link {
                count: base.0,
                last: base.1,
            };
            if let Some((number, bytes, sig)) = last {
                let expect = self.expect().map_err(|e| self.err(e))?;
                let cp = self.checked_checkpoint(number, &bytes, &sig, &expect)?;
                let cp_head = digest_field(&cp.head).ok_or_else(|| {
                    self.err(format!("admission log: checkpoint {number}'s head is not a digest"))
                })?;
                if cp.count > head.count {
                    return Err(self.err(format!(
                        "admission log: the log head says {} records, but signed checkpoint                          {number} covers {} (records were removed)",
                        head.count, cp.count
                    )));
                }
                if cp.count > base.0 {
                    let at = cp.count - 1;
                    let row = match &log {
                        Some(l) => l.get(at).map_err(|e| self.err(e))?.map(|g| sha256(g.value())),
                        None => None,
                    };
                    match row {
                        None => {
                            return Err(self.err(format!(
                                "admission log: record {at} is missing (signed checkpoint                                  {number} ends at it)"
                            )))
                        }
                        Some(h) if h != cp_head => {
                            return Err(self.err(format!(
                                "admission log: record {at} was changed: it does not hash to                                  the head of signed checkpoint {number}"
                            )))
                        }
                        Some(_) => {}
                    }
                    start = Link {
                        count: cp.count,
                        last: cp_head,
                    };
                } else if cp.count < base.0 || (cp.count == base.0 && cp_head != base.1) {
                    return Err(self.err(format!(
                        "admission log: the sealed segments end at record {}, but the last                          signed checkpoint ({number}) covers {}",
                        base.0, cp.count
                    )));
                }
            }
            let checks = BTreeMap::new();
            let mut walk = Walker::new(start, &checks, false);
            if let Some(log) = &log {
                for row in log.range(start.count..).map_err(|e| self.err(e))? {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    walk.step(k.value(), v.value()).map_err(|f| self.err(f))?;
                }
            }
            compare_head(walk.at(), head, &self.path)?;
            Ok(head.count)
        })
    }

    /// The key checkpoints of this state must be signed with.
    fn expect(&self) -> Result<Expect, crate::admission_log::LogError> {
        match &self.signer {
            Some(s) => Ok(s.expect()),
            None => Expect::of_state(self.log_dir.parent().unwrap_or(Path::new("."))),
        }
    }

    fn checked_checkpoint(
        &self,
        number: u64,
        bytes: &[u8],
        sig: &[u8],
        expect: &Expect,
    ) -> Result<Checkpoint, crate::GatewayError> {
        crate::admission_log::signer::verify(bytes, sig, expect)
            .map_err(|why| self.err(format!("admission log: signed checkpoint {number}: {why}")))?;
        let cp = Checkpoint::parse(bytes).map_err(|e| {
            self.err(format!(
                "admission log: checkpoint {number} is unreadable: {e}"
            ))
        })?;
        if cp.number != number || self.state_id.as_ref().is_some_and(|id| *id != cp.state_id) {
            return Err(self.err(format!(
                "admission log: checkpoint {number} names checkpoint {} of state {}",
                cp.number, cp.state_id
            )));
        }
        Ok(cp)
    }

    /// Walks the whole admission log, sealed segments included, and checks its hash
    /// chain, its signed checkpoints and its stored head; returns the record count.
    pub fn verify_log(&self) -> Result<u64, crate::GatewayError> {
        let expect = self.expect().map_err(|e| self.err(e))?;
        self.audit_log(&expect)
            .map(|r| r.records)
            .map_err(|f| self.err(f))
    }

    /// `log verify`: every sealed segment on its own and linked to the one before,
    /// every checkpoint (signature, chain of checkpoints, the record each ends at),
    /// every record in the database (position, link, schema) and the stored head.
    pub fn audit_log(&self, expect: &Expect) -> Result<LogReport, Failure> {
        let unreadable =
            |e: crate::GatewayError| Failure::new(FailureCode::StateUnreadable, e.to_string());
        self.guard(|| Ok(self.audit_inner(expect)))
            .map_err(unreadable)?
    }

    fn audit_inner(&self, expect: &Expect) -> Result<LogReport, Failure> {
        let unreadable =
            |e: &dyn std::fmt::Display| Failure::new(FailureCode::StateUnreadable, e.to_string());
        let txn = self.db.begin_read().map_err(|e| unreadable(&e))?;
        let head = read_head(&txn, &self.path).map_err(|e| unreadable(&e))?;
        let base = read_base(&txn, &self.path).map_err(|e| unreadable(&e))?;
        // The checkpoints, each signed, each naming the previous one's bytes.
        let mut checkpoints: Vec<Checkpoint> = Vec::new();
        let mut signer = None;
        if let Some(t) =
            open_read_table(&txn, CHECKPOINTS, &self.path).map_err(|e| unreadable(&e))?
        {
            let mut prev: Option<[u8; 32]> = None;
            for row in t.iter().map_err(|e| unreadable(&e))? {
                let (k, v) = row.map_err(|e| unreadable(&e))?;
                let (number, (bytes, sig)) = (k.value(), v.value());
                let info =
                    crate::admission_log::signer::verify(bytes, sig, expect).map_err(|why| {
                        Failure::new(
                            FailureCode::CheckpointSignatureInvalid,
                            format!("admission log: signed checkpoint {number}: {why}"),
                        )
                    })?;
                signer = Some(info);
                let cp = Checkpoint::parse(bytes).map_err(|e| {
                    Failure::new(
                        FailureCode::CheckpointInvalid,
                        format!("admission log: checkpoint {number} is unreadable: {e}"),
                    )
                })?;
                let expected_number = checkpoints.len() as u64;
                let linked = cp.prev_checkpoint.as_deref().and_then(digest_field);
                if number != expected_number
                    || cp.number != expected_number
                    || linked != prev
                    || self.state_id.as_ref().is_some_and(|id| *id != cp.state_id)
                    || checkpoints.last().is_some_and(|p| p.count > cp.count)
                {
                    return Err(Failure::new(
                        FailureCode::CheckpointInvalid,
                        format!(
                            "admission log: checkpoint {expected_number} is missing or out of                              order (found checkpoint {} under {number})",
                            cp.number
                        ),
                    ));
                }
                prev = Some(sha256(bytes));
                checkpoints.push(cp);
            }
        }
        let checks: BTreeMap<u64, ([u8; 32], u64)> = checkpoints
            .iter()
            .filter_map(|cp| digest_field(&cp.head).map(|h| (cp.count, (h, cp.number))))
            .collect();
        // Sealed segments, in order, each as `log verify --segment` checks it, each
        // the one its checkpoint in the database names.
        let mut counts = crate::admission_log::chain::Counts::default();
        let mut segments = Vec::new();
        let mut at = Link::START;
        let noted = upkeep::noted_segments(&txn, &self.path).map_err(|e| unreadable(&e))?;
        for cp in checkpoints.iter().filter(|c| c.seals) {
            let path = segment::path(&self.log_dir, cp.segment);
            let bytes = match noted.get(&cp.segment) {
                // Sealed, its file not written yet: checked as it will be written.
                Some(&note) => upkeep::noted_segment_file(&txn, cp.segment, note, &self.path)
                    .map_err(|e| Failure::new(FailureCode::SegmentInvalid, e.to_string()))?,
                None => std::fs::read(&path).map_err(|e| {
                    Failure::new(
                        FailureCode::SegmentInvalid,
                        format!("segment {} ({}): {e}", cp.segment, path.display()),
                    )
                })?,
            };
            let report = segment::verify(&bytes, expect)?;
            if report.sealed != *cp
                || cp.segment_first != at.count
                || digest_field(&cp.segment_prev) != Some(at.last)
                || cp.segment != segments.len() as u64
            {
                return Err(Failure::new(
                    FailureCode::SegmentInvalid,
                    format!(
                        "segment {}: not the segment checkpoint {} sealed, or not linked to                          the segment before it",
                        cp.segment, cp.number
                    ),
                ));
            }
            // The checkpoints inside the segment hold for its records too.
            let mut walk = Walker::new(at, &checks, true);
            for line in bytes
                .split(|b| *b == b'\n')
                .take(usize::try_from(report.records).unwrap_or(usize::MAX))
            {
                let link: crate::admission_log::record::RecordLink = serde_json::from_slice(line)
                    .map_err(|e| {
                    Failure::new(
                        FailureCode::RecordEdited,
                        format!("segment {}: {e}", cp.segment),
                    )
                })?;
                walk.step(link.seq, line)
                    .map_err(|f| f.within(&format!("segment {}", cp.segment)))?;
            }
            at = walk.at();
            counts.add(walk.counts);
            segments.push(report);
        }
        // Every note names a segment that a checkpoint sealed.
        if let Some(orphan) = noted
            .keys()
            .find(|n| !checkpoints.iter().any(|c| c.seals && c.segment == **n))
        {
            return Err(Failure::new(
                FailureCode::SegmentInvalid,
                format!(
                    "admission log: log_sealing notes segment {orphan}, which no checkpoint sealed"
                ),
            ));
        }
        if let Ok(dir) = std::fs::read_dir(&self.log_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(n) = segment::parse_name(&name) {
                    if n >= segments.len() as u64 {
                        return Err(Failure::new(
                            FailureCode::SegmentInvalid,
                            format!("segment file {name} is not sealed by any checkpoint"),
                        ));
                    }
                }
            }
        }
        if (base.0, base.1, base.2) != (at.count, at.last, segments.len() as u64) {
            return Err(Failure::new(
                FailureCode::SegmentInvalid,
                format!(
                    "admission log: the database starts at record {}, but the sealed segments                      end at record {}",
                    base.0, at.count
                ),
            ));
        }
        let mut walk = Walker::new(at, &checks, true);
        if let Some(log) = open_read_table(&txn, LOG, &self.path).map_err(|e| unreadable(&e))? {
            // Records below the base are sealed: in their files, or noted above.
            for row in log.range(base.0..).map_err(|e| unreadable(&e))? {
                let (k, v) = row.map_err(|e| unreadable(&e))?;
                walk.step(k.value(), v.value())?;
            }
        }
        let end = walk.at();
        counts.add(walk.counts);
        if let Some(cp) = checkpoints.last() {
            if end.count < cp.count {
                return Err(Failure::new(
                    FailureCode::LogTruncated,
                    format!(
                        "admission log: ends at record {}, but signed checkpoint {} covers {}                          records (records were removed)",
                        end.count, cp.number, cp.count
                    ),
                ));
            }
        }
        compare_head(end, head, &self.path).map_err(|e| {
            let code = if end.count != head.count {
                FailureCode::LogTruncated
            } else {
                FailureCode::HeadMismatch
            };
            Failure::new(code, e.to_string())
        })?;
        let last = checkpoints.last();
        Ok(LogReport {
            records: end.count,
            counts,
            checkpoints: checkpoints.len() as u64,
            last_checkpoint: last.map(|cp| CheckpointSummary {
                number: cp.number,
                count: cp.count,
                time: cp.time,
                cause: cp.cause,
            }),
            unanchored: end.count - last.map_or(0, |c| c.count),
            segments,
            signer,
        })
    }
}

/// Writes a sealed segment file durably. One left by a seal whose transaction never
/// committed (a crash in between) is replaced: the database, which does not name it,
/// is the truth.
fn write_segment(
    log_dir: &Path,
    segment: u64,
    bytes: &[u8],
) -> Result<(), crate::durable::DurableError> {
    crate::durable::create_dirs(log_dir, 0o700)?;
    let path = segment::path(log_dir, segment);
    match crate::durable::write_new(&path, bytes, 0o600) {
        Err(crate::durable::DurableError::Exists { .. }) => {
            if std::fs::read(&path).is_ok_and(|old| old == bytes) {
                // Left by an export that may have been killed before it synced:
                // synced now, before the records it holds leave the database.
                return crate::durable::sync_existing(&path);
            }
            let stale = log_dir.join(format!(".{}.uncommitted", segment::file_name(segment)));
            std::fs::rename(&path, &stale).map_err(|source| crate::durable::DurableError::Io {
                op: "move an uncommitted segment aside",
                path: path.clone(),
                source,
            })?;
            crate::durable::write_new(&path, bytes, 0o600)?;
            let _ = std::fs::remove_file(&stale);
            crate::durable::sync_dir(log_dir)
        }
        other => other,
    }
}

fn digest_field(s: &str) -> Option<[u8; 32]> {
    Sha256Digest::parse(s).map(|d| d.0)
}

/// The end of a walk against the stored head.
fn compare_head(walked: Link, head: LogHead, path: &Path) -> Result<(), crate::GatewayError> {
    if walked.count != head.count {
        return Err(err(
            path,
            format!(
                "admission log: {} records, but the log head says {} (records were \
                 removed or added)",
                walked.count, head.count
            ),
        ));
    }
    if walked.last != head.last {
        return Err(err(
            path,
            format!(
                "admission log: record {} (the last) was changed: it does not hash to \
                 the stored log head",
                walked.count.saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

fn read_base(
    txn: &redb::ReadTransaction,
    path: &Path,
) -> Result<(u64, [u8; 32], u64), crate::GatewayError> {
    Ok(open_read_table(txn, BASE, path)?
        .map(|t| t.get(BASE_KEY).map(|g| g.map(|g| g.value())))
        .transpose()
        .map_err(|e| err(path, e))?
        .flatten()
        .unwrap_or((0, [0; 32], 0)))
}

/// The base as a write transaction reads it (before it opens the table to change it).
fn write_base(txn: &redb::WriteTransaction, path: &Path) -> Result<Link, crate::GatewayError> {
    let t = txn.open_table(BASE).map_err(|e| err(path, e))?;
    let base = t
        .get(BASE_KEY)
        .map_err(|e| err(path, e))?
        .map_or((0, [0; 32], 0), |g| g.value());
    Ok(Link {
        count: base.0,
        last: base.1,
    })
}

impl State {
    /// Every tenant's highest accepted tenant-index version.
    fn index_versions(&self) -> Result<HashMap<String, u64>, crate::GatewayError> {
        self.guard(|| {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let mut out = HashMap::new();
            if let Some(table) = open_read_table(&txn, INDEX_VERSIONS, &self.path)? {
                for row in table.iter().map_err(|e| self.err(e))? {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    out.insert(k.value().to_string(), v.value());
                }
            }
            Ok(out)
        })
    }
}

impl RollbackView for State {
    fn highest_index_version(&self, tenant: &str) -> Result<Option<u64>, StateReadError> {
        self.index_versions()
            .map(|m| m.get(tenant).copied())
            .map_err(StateReadError::new)
    }

    fn last_known_time(&self) -> Result<Option<u64>, StateReadError> {
        Ok(self.last_known_time_now())
    }

    fn latest(
        &self,
        tenant: &str,
        capsule_id: &str,
    ) -> Result<Option<AdmittedVersion>, StateReadError> {
        self.guard(|| {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let Some(table) = open_read_table(&txn, VERSIONS, &self.path)? else {
                return Ok(None);
            };
            let row = table.get((tenant, capsule_id)).map_err(|e| self.err(e))?;
            Ok(row.map(|g| {
                let (version, digest) = g.value();
                AdmittedVersion {
                    version,
                    digest: Sha256Digest(digest),
                }
            }))
        })
        .map_err(StateReadError::new)
    }
}

/// The versions table as read by [`StateDir::snapshot`], the database closed again.
#[derive(Debug, Default)]
pub struct Snapshot {
    versions: HashMap<(String, String), AdmittedVersion>,
    last_known: Option<u64>,
    index_versions: HashMap<String, u64>,
}

impl RollbackView for Snapshot {
    fn last_known_time(&self) -> Result<Option<u64>, StateReadError> {
        Ok(self.last_known)
    }

    fn latest(
        &self,
        tenant: &str,
        capsule_id: &str,
    ) -> Result<Option<AdmittedVersion>, StateReadError> {
        Ok(self
            .versions
            .get(&(tenant.to_string(), capsule_id.to_string()))
            .copied())
    }

    fn highest_index_version(&self, tenant: &str) -> Result<Option<u64>, StateReadError> {
        Ok(self.index_versions.get(tenant).copied())
    }
}

/// The rollback view of the CLI: the snapshot is taken when the first capsule reaches
/// the state (the clock check, after its signature, manifest, tenant and policy
/// checks, before any artifact is hashed), once for the whole batch; the database is
/// closed again right after.
#[derive(Debug)]
pub struct LazySnapshot<'a> {
    dir: &'a StateDir,
    loaded: OnceLock<Result<Snapshot, StateReadError>>,
}

impl<'a> LazySnapshot<'a> {
    pub fn new(dir: &'a StateDir) -> Self {
        LazySnapshot {
            dir,
            loaded: OnceLock::new(),
        }
    }
}

impl LazySnapshot<'_> {
    fn loaded(&self) -> Result<&Snapshot, StateReadError> {
        self.loaded
            .get_or_init(|| self.dir.snapshot().map_err(StateReadError::new))
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl RollbackView for LazySnapshot<'_> {
    fn last_known_time(&self) -> Result<Option<u64>, StateReadError> {
        self.loaded()?.last_known_time()
    }

    fn latest(
        &self,
        tenant: &str,
        capsule_id: &str,
    ) -> Result<Option<AdmittedVersion>, StateReadError> {
        self.loaded()?.latest(tenant, capsule_id)
    }

    fn highest_index_version(&self, tenant: &str) -> Result<Option<u64>, StateReadError> {
        self.loaded()?.highest_index_version(tenant)
    }
}

/// A state that cannot be read: every lookup fails, so every capsule is denied
/// `state_unavailable` (deny by default) instead of being admitted without history.
#[derive(Debug, Clone)]
pub struct Unavailable(StateReadError);

impl Unavailable {
    pub fn new(why: crate::GatewayError) -> Unavailable {
        Unavailable(StateReadError::new(why))
    }
}

impl RollbackView for Unavailable {
    fn last_known_time(&self) -> Result<Option<u64>, StateReadError> {
        Err(self.0.clone())
    }

    fn latest(&self, _: &str, _: &str) -> Result<Option<AdmittedVersion>, StateReadError> {
        Err(self.0.clone())
    }

    fn highest_index_version(&self, _: &str) -> Result<Option<u64>, StateReadError> {
        Err(self.0.clone())
    }
}
