//! The durable spool: `STATE/spool/events/`, one file per event waiting for the
//! sink, named `<unix ns, 20 digits>-<event id>.json` so that a listing in name
//! order is the order the events were queued. An event is queued once its file is
//! durable (written, fsynced, renamed, directory fsynced); it leaves the spool only
//! after the sink answered 2xx (removed), or refused it for good (moved to
//! `STATE/spool/rejected/`, kept for the operator). A crash at any point leaves
//! the event queued or delivered, never lost.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::FlockOperation;

use super::DeliveryError;
use crate::durable::{create_dirs, sync_dir, write_new};

/// The spool under a state directory.
#[derive(Debug, Clone)]
pub struct Spool {
    queue: PathBuf,
    rejected: PathBuf,
    lock: PathBuf,
}

/// Held while one process drains the spool: two drainers would send each event
/// twice (harmless, the `id` is the same, but wasteful).
#[derive(Debug)]
pub struct DrainLock(#[allow(dead_code)] File);

/// Distinct names for events queued in the same nanosecond by one process.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DeliveryError + '_ {
    move |source| DeliveryError::Spool {
        path: path.to_path_buf(),
        source,
    }
}

impl Spool {
    /// The spool of `root` (`STATE/spool`), created 0700 if missing.
    pub fn open(root: &Path) -> Result<Spool, DeliveryError> {
        let spool = Spool {
            queue: root.join("events"),
            rejected: root.join("rejected"),
            lock: root.join(".drain.lock"),
        };
        create_dirs(&spool.queue, 0o700)?;
        create_dirs(&spool.rejected, 0o700)?;
        Ok(spool)
    }

    /// Queues one event durably; `id` is its CloudEvents `id` (a run id: 32 hex
    /// digits; anything else is refused rather than put into a file name).
    pub fn enqueue(&self, id: &str, event: &[u8]) -> Result<PathBuf, DeliveryError> {
        let safe = !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !safe {
            return Err(DeliveryError::EventId(id.to_string()));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self.queue.join(format!("{nanos:020}-{seq:06}-{id}.json"));
        write_new(&path, event, 0o600)?;
        Ok(path)
    }

    /// The queued events, oldest first.
    pub fn pending(&self) -> Result<Vec<PathBuf>, DeliveryError> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.queue)
            .map_err(io(&self.queue))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && n.ends_with(".json"))
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// An event's bytes.
    pub fn read(&self, path: &Path) -> Result<Vec<u8>, DeliveryError> {
        std::fs::read(path).map_err(io(path))
    }

    /// Delivered: the event leaves the spool (durably, so a restart does not send it
    /// again).
    pub fn remove(&self, path: &Path) -> Result<(), DeliveryError> {
        std::fs::remove_file(path).map_err(io(path))?;
        Ok(sync_dir(&self.queue)?)
    }

    /// Refused by the sink for good (a 4xx other than 408/429): kept under
    /// `rejected/` so the rest of the queue moves on and nothing is lost.
    pub fn reject(&self, path: &Path) -> Result<PathBuf, DeliveryError> {
        let name = path.file_name().unwrap_or_default();
        let to = self.rejected.join(name);
        std::fs::rename(path, &to).map_err(io(path))?;
        sync_dir(&self.rejected)?;
        sync_dir(&self.queue)?;
        Ok(to)
    }

    /// The events the sink refused.
    pub fn rejected(&self) -> Result<usize, DeliveryError> {
        Ok(std::fs::read_dir(&self.rejected)
            .map_err(io(&self.rejected))?
            .count())
    }

    /// The drain lock, or `None` when another process holds it.
    pub fn try_lock(&self) -> Result<Option<DrainLock>, DeliveryError> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)
            .map_err(io(&self.lock))?;
        match rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(DrainLock(f))),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(io(&self.lock)(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_listed_in_the_order_queued_and_leave_only_when_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        let a = spool.enqueue("aaaa", b"1").expect("a");
        let b = spool.enqueue("bbbb", b"2").expect("b");
        assert_eq!(spool.pending().expect("ls"), vec![a.clone(), b.clone()]);
        spool.remove(&a).expect("rm");
        let r = spool.reject(&b).expect("reject");
        assert!(spool.pending().expect("ls").is_empty());
        assert_eq!(std::fs::read(r).expect("kept"), b"2");
        assert!(matches!(
            spool.enqueue("../x", b"3"),
            Err(DeliveryError::EventId(_))
        ));
        let held = spool.try_lock().expect("lock").expect("free");
        assert!(spool.try_lock().expect("lock").is_none(), "held");
        drop(held);
        assert!(spool.try_lock().expect("lock").is_some());
    }
}
