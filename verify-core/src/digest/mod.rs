//! Artifact resolution and hashing.
//!
//! Files are opened beneath the capsule's `files/` directory (or the blob store) with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: the kernel refuses any symlink on the
//! way and any escape, so there is no window between a path check and the open. The
//! size is checked on the open descriptor before a byte is hashed. Hashing reads the
//! descriptor in 1 MiB chunks by default; memory mapping is selectable
//! (see [`HashMode`] and the SIGBUS guard in `mmap`).

pub(crate) mod mmap;

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use crate::crypto::Backend;
use crate::decision::{Reason, Sha256Digest};
use crate::manifest::FileEntry;

/// How artifact bytes reach the hash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HashMode {
    /// `read()` for files up to [`MMAP_THRESHOLD_BYTES`], guarded mmap above: measured
    /// here, read is faster for small files (no map/unmap) and mmap for large ones
    /// (no copy: 0.98 of raw digest for 1 GiB against read's 0.93; BENCHMARKS.md).
    #[default]
    Auto,
    /// `read()` in 1 MiB chunks; a truncation is just a short read.
    Read,
    /// Memory-mapped (memmap2), with a SIGBUS guard so a file truncated under the
    /// mapping is reported as changed instead of killing the process.
    Mmap,
}

impl HashMode {
    pub fn from_name(name: &str) -> Option<HashMode> {
        match name {
            "auto" => Some(HashMode::Auto),
            "read" => Some(HashMode::Read),
            "mmap" => Some(HashMode::Mmap),
            _ => None,
        }
    }
}

/// Files larger than this are mapped in [`HashMode::Auto`]. One read chunk: below it
/// a read is a single syscall, above it mapping saves copying chunk after chunk.
pub const MMAP_THRESHOLD_BYTES: u64 = 1 << 20;

/// Size of one read, and of one chunk fed to the hash from a mapping.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Where a capsule's files are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactSource {
    /// A capsule directory's `files/`: found by manifest path.
    Dir(PathBuf),
    /// A content-addressed store: found at `sha256/<hex>` by digest.
    Blobs(PathBuf),
}

/// An opened root directory; artifacts are resolved beneath it.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    by_digest: bool,
}

impl ArtifactSource {
    pub fn open(&self) -> io::Result<Root> {
        let (path, by_digest) = match self {
            ArtifactSource::Dir(p) => (p, false),
            ArtifactSource::Blobs(p) => (p, true),
        };
        Ok(Root {
            fd: open_dir(path)?,
            by_digest,
        })
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::open(path, flags, Mode::empty())?)
}

/// Why one file failed its check: the reason code and a detail naming the file.
pub type FileFailure = (Reason, String);

thread_local! {
    /// One read buffer per thread, reused across files.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The identity of an open file's contents as far as `fstat` tells: any write,
/// truncation or replacement changes one of these.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(st: &rustix::fs::Stat) -> Fingerprint {
        // Nanoseconds are below 10^9 and always fit.
        let ns = |n| i64::try_from(n).unwrap_or(i64::MAX);
        Fingerprint {
            size: st.st_size,
            mtime: (st.st_mtime, ns(st.st_mtime_nsec)),
            ctime: (st.st_ctime, ns(st.st_ctime_nsec)),
        }
    }
}

fn fingerprint(fd: impl AsFd) -> io::Result<Fingerprint> {
    Ok(Fingerprint::of(&rustix::fs::fstat(fd)?))
}

impl Root {
    /// Checks one file: resolved safely, a regular file of the stated size, whose
    /// sha256 is the stated one, unchanged while it was hashed.
    pub fn check(
        &self,
        entry: &FileEntry,
        mode: HashMode,
        backend: &dyn Backend,
    ) -> Result<(), FileFailure> {
        let path = entry.path.as_str();
        let relative;
        let target = if self.by_digest {
            relative = format!("sha256/{}", entry.sha256.to_hex());
            relative.as_str()
        } else {
            path
        };
        let fd = open_beneath(&self.fd, target).map_err(|e| {
            let reason = match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => Reason::ArtifactPathInvalid,
                _ => Reason::ArtifactMissing,
            };
            let why = match e.raw_os_error() {
                Some(libc::ELOOP) => "a symlink is on the way".to_string(),
                Some(libc::EXDEV) => "resolves outside the capsule".to_string(),
                _ => e.to_string(),
            };
            (reason, format!("{path}: {why}"))
        })?;
        let st = rustix::fs::fstat(&fd)
            .map_err(|e| (Reason::ArtifactMissing, format!("{path}: {e}")))?;
        if !FileType::from_raw_mode(st.st_mode).is_file() {
            return Err((
                Reason::ArtifactPathInvalid,
                format!("{path}: not a regular file"),
            ));
        }
        let before = Fingerprint::of(&st);
        // Size before hashing: a wrong size costs one fstat, not a full read.
        if u64::try_from(st.st_size).ok() != Some(entry.size) {
            return Err((
                Reason::ArtifactSizeMismatch,
                format!(
                    "{path}: {} bytes on disk, manifest says {}",
                    st.st_size, entry.size
                ),
            ));
        }
        let file = File::from(fd);
        let mut hasher = backend.sha256();
        let mode = match mode {
            HashMode::Auto if entry.size > MMAP_THRESHOLD_BYTES => HashMode::Mmap,
            HashMode::Auto => HashMode::Read,
            other => other,
        };
        let complete = match mode {
            HashMode::Read | HashMode::Auto => {
                hash_read(&file, entry.size, &mut |b| hasher.update(b))
            }
            HashMode::Mmap => {
                match mmap::read_mapped(&file, entry.size, CHUNK_BYTES, &mut |b| hasher.update(b)) {
                    Ok(m) => Ok(m == mmap::MappedRead::Complete),
                    // No guard slot free or the map failed: fall back to reading.
                    Err(_) => {
                        hasher = backend.sha256();
                        hash_read(&file, entry.size, &mut |b| hasher.update(b))
                    }
                }
            }
        }
        .map_err(|e| (Reason::ArtifactChanged, format!("{path}: read failed: {e}")))?;
        let changed = || fingerprint(&file).map_or(true, |now| now != before);
        if !complete {
            return Err((
                Reason::ArtifactChanged,
                format!("{path}: file shrank while it was hashed"),
            ));
        }
        let digest = Sha256Digest(hasher.finish());
        if digest != entry.sha256 {
            // Only on a mismatch is it worth one more fstat to tell a concurrent
            // change from a wrong file.
            if changed() {
                return Err((
                    Reason::ArtifactChanged,
                    format!("{path}: file changed while it was hashed"),
                ));
            }
            return Err((
                Reason::DigestMismatch,
                format!("{path}: sha256 is {digest}, manifest says {}", entry.sha256),
            ));
        }
        Ok(())
    }
}

/// Opens `path` beneath `dir`. The kernel refuses symlinks (`ELOOP`) and escapes
/// (`EXDEV`); `NONBLOCK` keeps a FIFO planted at the path from hanging the open.
fn open_beneath(dir: &OwnedFd, path: &str) -> io::Result<OwnedFd> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    loop {
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), resolve) {
            // The kernel may ask for a retry when a rename raced the lookup.
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// Feeds exactly `len` bytes of `file` to `update`. Returns `false` when the file
/// ended early (it shrank after the size check).
fn hash_read(file: &File, len: u64, update: &mut dyn FnMut(&[u8])) -> io::Result<bool> {
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let want = usize::try_from(len).unwrap_or(usize::MAX).min(CHUNK_BYTES);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let mut remaining = len;
        let mut reader = file;
        while remaining > 0 {
            let n = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            match reader.read(&mut buf[..n]) {
                Ok(0) => return Ok(false),
                Ok(got) => {
                    update(&buf[..got]);
                    remaining -= got as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    })
}

/// Opens a regular file beneath `dir` by the same rules as verification (no symlinks,
/// no escape, regular files only). `pack` reads what it signs through this.
pub fn open_beneath_regular(dir: &Path, path: &crate::manifest::ArtifactPath) -> io::Result<File> {
    let fd = open_beneath(&open_dir(dir)?, path.as_str())?;
    let st = rustix::fs::fstat(&fd)?;
    if !FileType::from_raw_mode(st.st_mode).is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(File::from(fd))
}
