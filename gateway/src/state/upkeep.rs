//! What a commit leaves for after it: the checkpoint witness, the export of sealed
//! segments into their files, and the removal of the exported records from the
//! database. None of it decides anything (the commit that recorded the admissions
//! already did), so none of it holds an answer back: the CLI runs it right after its
//! commit, and `serve` on its keeper thread (`crate::serve::batcher`). Done inside
//! the commit, a seal (a file of 16–24 MiB written and synced, 65536 records removed) held
//! redb's one write transaction, and every admission waiting on it, for 250–800 ms.
//!
//! A seal is therefore two steps. The commit that crosses `segment_records` signs
//! the sealing checkpoint, moves `log_base` past the segment and notes the segment in
//! `log_sealing` (segment → its first record, the record after its last, the sealing
//! checkpoint's number), all in its one transaction: from then on the segment is
//! sealed, and every reader starts the database's records at the base. Its records
//! stay in `admission_log`, below the base, until [`State::upkeep`] has written the
//! segment file durably from them and removed the note; only then are they removed,
//! a chunk per transaction. A crash at any point loses nothing: a noted segment is
//! exported again from the database (replacing a file that a crash left), and
//! records below the base whose segment is no longer noted are only removed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use redb::{ReadableTable, TableDefinition};

use super::{open_read_table, write_base, write_segment, State, CHECKPOINTS, LOG};
use crate::admission_log::record::Checkpoint;
use crate::admission_log::segment;
use crate::admission_log::witness::{self, Witness};

/// Segment number → (its first record, the record after its last, the number of the
/// checkpoint that sealed it), for each sealed segment whose file is not yet written.
pub(super) const SEALING: TableDefinition<u64, (u64, u64, u64)> =
    TableDefinition::new("log_sealing");

/// Exported records removed per transaction: about 1 ms of the write lock each, so a
/// commit waits at most that long behind one.
const REMOVE_CHUNK: u64 = 512;
/// About the size of one admission record, to size a segment file's buffer once.
const RECORD_BYTES: u64 = 384;
/// At most this many records' worth is allocated up front (about 50 MB).
const MAX_PREALLOCATED_RECORDS: u64 = 1 << 17;
/// The pause between two chunks when the process runs the upkeep off its commits.
const CHUNK_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// The upkeep a state's commits left, and who runs it.
#[derive(Debug, Default)]
pub(super) struct Upkeep {
    /// The process runs [`State::upkeep`] itself (`serve`'s keeper thread).
    deferred: AtomicBool,
    /// Something may be waiting: a witness, a noted segment, exported records.
    due: AtomicBool,
    /// Held for a whole upkeep: the keeper and a stop's checkpoint may both run one,
    /// and the witness's read-compare-replace must not interleave (it would move back).
    running: Mutex<()>,
    /// The latest committed checkpoint's witness, not yet written (boxed: a `State`
    /// is held by value, and this is rarely set).
    witness: Mutex<Option<Box<(PathBuf, Witness)>>>,
}

impl Upkeep {
    /// A transaction committed; `staged` is the witness of the checkpoint it wrote.
    pub(super) fn committed(&self, staged: Option<(PathBuf, Witness)>) {
        if let Some((path, w)) = staged {
            let mut slot = self.witness.lock().unwrap_or_else(PoisonError::into_inner);
            // Commits may publish out of order; the witness never moves back.
            if slot.as_ref().is_none_or(|old| old.1.number < w.number) {
                *slot = Some(Box::new((path, w)));
            }
            self.due.store(true, Ordering::Release);
        }
    }

    /// A commit (under way) noted a sealed segment.
    pub(super) fn sealed(&self) {
        self.due.store(true, Ordering::Release);
    }
}

/// What one [`State::upkeep`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Upkept {
    /// The checkpoint witness was written.
    pub witness: bool,
    /// Sealed segments written to their files.
    pub segments: u64,
    /// Exported records removed from the database.
    pub removed: u64,
}

impl State {
    /// From now on the caller runs [`State::upkeep`] whenever [`State::upkeep_due`]
    /// says so, off the commit path (`serve`); otherwise each commit runs it itself,
    /// right after it commits (the CLI).
    pub fn defer_upkeep(&self) {
        self.upkeep.deferred.store(true, Ordering::Release);
        // What an earlier process left (a crash between a seal and its export).
        self.upkeep.due.store(true, Ordering::Release);
    }

    pub fn upkeep_due(&self) -> bool {
        self.upkeep.due.load(Ordering::Acquire)
    }

    /// Writes the latest checkpoint witness, exports every noted segment to its file
    /// and removes exported records from the database. A failure leaves the work due
    /// (the next call retries it); nothing recorded depends on it.
    pub fn upkeep(&self) -> Result<Upkept, crate::GatewayError> {
        let _one_at_a_time = self
            .upkeep
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Cleared before the work: a commit during it sets it again.
        self.upkeep.due.store(false, Ordering::Release);
        let out = self.upkeep_inner();
        if out.is_err() {
            self.upkeep.due.store(true, Ordering::Release);
        }
        out
    }

    fn upkeep_inner(&self) -> Result<Upkept, crate::GatewayError> {
        let mut done = Upkept::default();
        let staged = self
            .upkeep
            .witness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((path, w)) = staged.map(|b| *b) {
            // Logged, not failed: the admission is durable; `host.checkpoint` then
            // reports the witness behind the state.
            match witness::write(&path, &w) {
                Ok(()) => done.witness = true,
                Err(e) => {
                    tracing::warn!(witness = %path.display(), error = %e, "checkpoint witness not written")
                }
            }
        }
        done.segments = self.export_sealed()?;
        done.removed = self.remove_exported()?;
        Ok(done)
    }

    /// After a commit of this process: the upkeep, unless the process runs it.
    pub(super) fn after_commit(&self) {
        if self.upkeep.deferred.load(Ordering::Acquire) || !self.upkeep_due() {
            return;
        }
        if let Err(e) = self.upkeep() {
            tracing::warn!(error = %e, "admission log upkeep failed; it is retried after the next commit");
        }
    }

    /// Writes each noted segment's file from the database, then removes its note.
    fn export_sealed(&self) -> Result<u64, crate::GatewayError> {
        let mut exported = 0;
        while let Some((number, file)) = self.guard(|| self.next_segment_file())? {
            write_segment(&self.log_dir, number, &file).map_err(|e| self.err(e))?;
            // The file is durable: the note can go, and with it the records.
            self.guard(|| {
                let txn = self.db.begin_write().map_err(|e| self.err(e))?;
                txn.open_table(SEALING)
                    .map_err(|e| self.err(e))?
                    .remove(number)
                    .map_err(|e| self.err(e))?;
                txn.commit().map_err(|e| self.err(e))
            })?;
            exported += 1;
        }
        Ok(exported)
    }

    /// The first noted segment and its file's bytes, read in one snapshot (a read
    /// transaction: commits go on meanwhile).
    fn next_segment_file(&self) -> Result<Option<(u64, Vec<u8>)>, crate::GatewayError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let Some(sealing) = open_read_table(&txn, SEALING, &self.path)? else {
            return Ok(None);
        };
        let Some((number, (first, end, checkpoint))) = sealing
            .first()
            .map_err(|e| self.err(e))?
            .map(|(k, v)| (k.value(), v.value()))
        else {
            return Ok(None);
        };
        let file = noted_segment_file(&txn, number, (first, end, checkpoint), &self.path)?;
        Ok(Some((number, file)))
    }

    /// Removes records below the base that no noted segment still needs, a chunk per
    /// durable transaction (a crash only leaves the rest to be removed again).
    /// Measured against the alternatives: chunks committed without an fsync
    /// (`Durability::None`) left all their pages to the next durable commit, an
    /// admission's, which then took 180 ms; `retain_in` over a chunk took 6–17 ms
    /// where removing its keys one by one takes about 1 ms.
    fn remove_exported(&self) -> Result<u64, crate::GatewayError> {
        let mut removed = 0;
        loop {
            let chunk = self.guard(|| {
                let txn = self.db.begin_write().map_err(|e| self.err(e))?;
                let (lowest, below) = {
                    let base = write_base(&txn, &self.path)?.count;
                    let noted = txn
                        .open_table(SEALING)
                        .map_err(|e| self.err(e))?
                        .first()
                        .map_err(|e| self.err(e))?
                        .map(|(_, v)| v.value().0);
                    let log = txn.open_table(LOG).map_err(|e| self.err(e))?;
                    let lowest = log
                        .first()
                        .map_err(|e| self.err(e))?
                        .map(|(k, _)| k.value());
                    (lowest, noted.map_or(base, |first| first.min(base)))
                };
                let Some(from) = lowest.filter(|k| *k < below) else {
                    txn.abort().map_err(|e| self.err(e))?;
                    return Ok(None);
                };
                let to = below.min(from.saturating_add(REMOVE_CHUNK));
                let last = to == below;
                {
                    let mut log = txn.open_table(LOG).map_err(|e| self.err(e))?;
                    for seq in from..to {
                        log.remove(seq).map_err(|e| self.err(e))?;
                    }
                }
                txn.commit().map_err(|e| self.err(e))?;
                Ok(Some((to - from, last)))
            })?;
            match chunk {
                None => return Ok(removed),
                Some((n, last)) => {
                    removed += n;
                    if last {
                        return Ok(removed);
                    }
                }
            }
            // A commit waiting for the write lock takes it now, not after the next
            // chunk (redb's lock is not fair).
            if self.upkeep.deferred.load(Ordering::Acquire) {
                std::thread::sleep(CHUNK_PAUSE);
            }
        }
    }
}

/// The bytes a noted segment's file is written with: its records `first..end`, every
/// one of them present, then its sealing checkpoint and signature.
pub(super) fn noted_segment_file(
    txn: &redb::ReadTransaction,
    number: u64,
    (first, end, checkpoint): (u64, u64, u64),
    path: &std::path::Path,
) -> Result<Vec<u8>, crate::GatewayError> {
    let invalid = |why: String| {
        super::err(
            path,
            format!("admission log: the note of segment {number} in log_sealing {why}"),
        )
    };
    let count = end
        .checked_sub(first)
        .ok_or_else(|| invalid("ends before it starts".into()))?;
    // The note is the database's word, not a signed one: it must be exactly what the
    // checkpoint it names sealed, or nothing is built from it.
    let (cp, sig) = open_read_table(txn, CHECKPOINTS, path)?
        .and_then(|t| t.get(checkpoint).transpose())
        .transpose()
        .map_err(|e| super::err(path, e))?
        .map(|g| {
            let (cp, sig) = g.value();
            (cp.to_vec(), sig.to_vec())
        })
        .ok_or_else(|| invalid(format!("names checkpoint {checkpoint}, which is missing")))?;
    let sealed = Checkpoint::parse(&cp)
        .map_err(|e| invalid(format!("names checkpoint {checkpoint}, unreadable: {e}")))?;
    if !sealed.seals
        || (
            sealed.number,
            sealed.segment,
            sealed.segment_first,
            sealed.count,
        ) != (checkpoint, number, first, end)
    {
        return Err(invalid(format!(
            "is not what checkpoint {checkpoint} sealed"
        )));
    }
    let missing = || {
        super::err(
            path,
            format!(
                "admission log: records {first}..{end} of segment {number}, sealed and not \
                 yet written to its file, are missing from the database"
            ),
        )
    };
    let log = open_read_table(txn, LOG, path)?.ok_or_else(missing)?;
    // Sized from the note, bounded: a forged count must not allocate the machine.
    let expect = count
        .min(MAX_PREALLOCATED_RECORDS)
        .saturating_mul(RECORD_BYTES);
    let mut file = segment::Encoder::with_capacity(usize::try_from(expect).unwrap_or(0));
    let mut read = 0;
    for row in log.range(first..end).map_err(|e| super::err(path, e))? {
        let (_, v) = row.map_err(|e| super::err(path, e))?;
        file.record(v.value());
        read += 1;
    }
    if read != count {
        return Err(missing());
    }
    Ok(file.seal(&cp, &sig))
}

/// The segments sealed and not yet written to their files, as `log_sealing` notes them.
pub(super) fn noted_segments(
    txn: &redb::ReadTransaction,
    path: &std::path::Path,
) -> Result<std::collections::BTreeMap<u64, (u64, u64, u64)>, crate::GatewayError> {
    let mut noted = std::collections::BTreeMap::new();
    if let Some(t) = open_read_table(txn, SEALING, path)? {
        for row in t.iter().map_err(|e| super::err(path, e))? {
            let (k, v) = row.map_err(|e| super::err(path, e))?;
            noted.insert(k.value(), v.value());
        }
    }
    Ok(noted)
}
