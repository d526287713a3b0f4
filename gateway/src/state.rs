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
//! (by [`State::verify_log`], and before every append). Signed checkpoints, which
//! also catch a rewrite of the whole log and its head, are a later step.
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
        let db = open_db(&self.db)?;
        let state = State {
            db,
            path: self.db.clone(),
            broken: AtomicBool::new(false),
            last_known: AtomicU64::new(0),
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
            if let Some(log) = log {
                check_head(&log, head, &state.path)?;
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
        state.verify_log()?;
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

    /// Opens the database, records the admissions ([`State::record`]) and closes it.
    /// If nothing can be recorded, every admitted capsule is denied
    /// `state_unavailable` instead (nothing was acknowledged).
    pub fn record(
        &self,
        results: Vec<Result<Admitted, Decision>>,
        policy: &Policy,
        clock: &dyn Clock,
    ) -> Vec<Result<Admitted, Decision>> {
        if !results.iter().any(Result::is_ok) {
            return results;
        }
        let state = match self.open() {
            Ok(s) => s,
            Err(e) => return deny_unavailable(results, &e.to_string()),
        };
        match state.record_or_return(results, policy, clock) {
            Ok(out) => out,
            Err((results, e)) => deny_unavailable(results, &e.to_string()),
        }
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
/// must be the stored count minus one (an empty log: count 0).
fn check_head(
    log: &impl ReadableTable<u64, &'static [u8]>,
    head: LogHead,
    path: &Path,
) -> Result<(), crate::GatewayError> {
    let last = log.last().map_err(|e| err(path, e))?;
    match (last, head.count) {
        (None, 0) => Ok(()),
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
    let mut prev = [0u8; 32];
    let mut expect = 0u64;
    for row in log.iter().map_err(|e| err(path, e))? {
        let (k, v) = row.map_err(|e| err(path, e))?;
        let record: serde_json::Value = serde_json::from_slice(v.value()).map_err(|e| {
            err(
                path,
                format!("admission log: record {} is not JSON: {e}", k.value()),
            )
        })?;
        if k.value() != expect || record["seq"] != expect {
            return Err(err(
                path,
                format!("admission log: record {expect} is missing"),
            ));
        }
        if record["prev"] != Sha256Digest(prev).to_string() {
            return Err(err(
                path,
                format!(
                    "admission log: record {expect} does not chain to its predecessor \
                     (record {expect} or the one before it was changed)"
                ),
            ));
        }
        prev = sha256(v.value());
        expect += 1;
    }
    Ok(LogHead {
        count: expect,
        last: prev,
    })
}

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
        guarded(&self.path, || {
            std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
                self.broken.store(true, Ordering::Release);
                std::panic::resume_unwind(p)
            })
        })
    }

    /// Records admissions in one durable transaction, in order. Each is checked
    /// again against the state inside the transaction (an earlier capsule of the
    /// same batch, or another process, may have admitted a higher version since it
    /// was verified); one that no longer passes is returned as a `rollback` denial.
    /// Before anything is appended, the last record must hash to the stored log head;
    /// each record chains from that head, which is updated in the same transaction.
    /// The clock is checked again against the stored last-known time (another process
    /// may have raised it since); a clock stepped back beyond the policy's skew denies
    /// every capsule of the batch `clock_rollback`. Otherwise the last-known time is
    /// raised to the clock in the same transaction.
    /// Nothing is acknowledged unless the commit succeeds. The admitted capsules are
    /// handed back (for `run`), in order.
    pub fn record(
        &self,
        admitted: Vec<Result<Admitted, Decision>>,
        policy: &Policy,
        clock: &dyn Clock,
    ) -> Result<Vec<Result<Admitted, Decision>>, crate::GatewayError> {
        self.record_or_return(admitted, policy, clock)
            .map_err(|(_, e)| e)
    }

    fn record_or_return(
        &self,
        admitted: Vec<Result<Admitted, Decision>>,
        policy: &Policy,
        clock: &dyn Clock,
    ) -> Result<Vec<Result<Admitted, Decision>>, NotRecorded> {
        let policy_version = policy.policy_version.as_str();
        let now = clock.now_unix();
        let mut raised = None;
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
                check_head(&log, LogHead { count, last }, &self.path)?;
                let mut time = txn.open_table(CLOCK).map_err(|e| self.err(e))?;
                let last_known = time
                    .get(LAST_KNOWN_KEY)
                    .map_err(|e| self.err(e))?
                    .map(|g| g.value());
                let stepped_back = check_clock(now, last_known, policy.clock_skew_s).err();
                let (mut seq, mut prev) = (count, Sha256Digest(last));
                for item in &admitted {
                    let Ok(a) = item else {
                        verdicts.push(None);
                        continue;
                    };
                    if let Some(why) = stepped_back {
                        verdicts.push(Some((Reason::ClockRollback, why.to_string())));
                        continue;
                    }
                    let m = a.manifest();
                    let key = (m.tenant.as_str(), m.capsule_id.as_str());
                    let latest = versions.get(key).map_err(|e| self.err(e))?.map(|g| {
                        let (version, digest) = g.value();
                        AdmittedVersion {
                            version,
                            digest: Sha256Digest(digest),
                        }
                    });
                    if let Err(why) = check_rollback(latest, m.version, a.digest()) {
                        verdicts.push(Some((Reason::Rollback, why.to_string())));
                        continue;
                    }
                    versions
                        .insert(key, (m.version, a.digest().0))
                        .map_err(|e| self.err(e))?;
                    let record = serde_json::json!({
                        "seq": seq,
                        "prev": prev.to_string(),
                        "capsule_digest": a.digest().to_string(),
                        "tenant": m.tenant,
                        "capsule_id": m.capsule_id,
                        "version": m.version,
                        "kid": a.decision().kid,
                        "policy_version": policy_version,
                        "approvers": m.approvals.iter().map(|x| x.approver.as_str()).collect::<Vec<_>>(),
                        "admitted_at": now,
                    });
                    let bytes = serde_json::to_vec(&record).map_err(|e| self.err(e))?;
                    log.insert(seq, bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                    prev = Sha256Digest(sha256(&bytes));
                    seq += 1;
                    verdicts.push(None);
                }
                heads
                    .insert(HEAD_KEY, (seq, prev.0))
                    .map_err(|e| self.err(e))?;
                // The last-known time only moves forward, in the transaction that
                // records what was admitted by it.
                if stepped_back.is_none() && last_known.is_none_or(|t| now > t) {
                    time.insert(LAST_KNOWN_KEY, now)
                        .map_err(|e| self.err(e))?;
                    raised = Some(now);
                }
            }
            txn.commit().map_err(|e| self.err(e))?;
            Ok(verdicts)
        });
        if let (Ok(_), Some(now)) = (&outcome, raised) {
            self.last_known.fetch_max(now, Ordering::AcqRel);
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

    /// Walks the admission log and checks its hash chain and its stored head (count
    /// and the last record's sha256); returns the record count.
    pub fn verify_log(&self) -> Result<u64, crate::GatewayError> {
        self.guard(|| {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let head = read_head(&txn, &self.path)?;
            let walked = match open_read_table(&txn, LOG, &self.path)? {
                Some(log) => walk_log(&log, &self.path)?,
                None => LogHead {
                    count: 0,
                    last: [0; 32],
                },
            };
            if walked.count != head.count {
                return Err(self.err(format!(
                    "admission log: {} records, but the log head says {} (records were \
                     removed or added)",
                    walked.count, head.count
                )));
            }
            if walked.last != head.last {
                return Err(self.err(format!(
                    "admission log: record {} (the last) was changed: it does not hash to \
                     the stored log head",
                    walked.count.saturating_sub(1)
                )));
            }
            Ok(walked.count)
        })
    }
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
