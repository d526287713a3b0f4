//! Artifact resolution and hashing, and the one way an untrusted path is opened.
//!
//! Every file a capsule names (its `capsule.jws`, artifacts and tools, blobs by
//! digest) is opened by [`open_regular_at`]: beneath a directory descriptor with
//! `openat2(O_PATH, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`,
//! so the kernel refuses any symlink on the way and any escape and nothing is
//! opened for reading yet; `fstat` on that descriptor refuses anything that is not a
//! regular file (a FIFO, a device, a socket or a directory is never opened for
//! reading, so a blocked FIFO writer stays blocked); only then is the same inode
//! re-opened for reading through `/proc/self/fd`. There is no window between the
//! check and the open. The size is checked on the open descriptor before a byte is
//! hashed. Hashing reads the descriptor in 1 MiB chunks by default; memory mapping
//! is selectable (see [`HashMode`] and the SIGBUS guard in `mmap`).

pub(crate) mod mmap;

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, Stat};

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

/// Opens a directory named by the operator (a capsule directory, a blob store). The
/// last component must not be a symlink; `O_DIRECTORY` refuses a FIFO or a device
/// before it is opened.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY
        | OFlags::DIRECTORY
        | OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | OFlags::NONBLOCK
        | OFlags::NOCTTY;
    Ok(rustix::fs::open(path, flags, Mode::empty())?)
}

/// Opens the directory `path` beneath `dir` by the same rules as a file (no
/// symlinks, no escape): `files/` beneath an opened capsule directory.
pub fn open_dir_at(dir: impl AsFd, path: &str) -> Result<OwnedFd, OpenError> {
    let flags = OFlags::RDONLY
        | OFlags::DIRECTORY
        | OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | OFlags::NONBLOCK
        | OFlags::NOCTTY;
    openat2_retrying(dir.as_fd(), path, flags).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTDIR) => OpenError::NotRegular("not a directory"),
        _ => OpenError::from_resolve(e),
    })
}

impl Root {
    /// An artifact root that is `files/` (or any directory) already opened beneath
    /// the capsule directory: found by manifest path.
    pub fn from_dir_fd(fd: OwnedFd) -> Root {
        Root {
            fd,
            by_digest: false,
        }
    }
}

/// Why an untrusted path was not opened. Nothing of the file was read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("a symlink is on the way")]
    Symlink,
    #[error("resolves outside its directory")]
    Escape,
    /// What the path is instead of a regular file ("a FIFO", "a directory", ...).
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl OpenError {
    fn from_resolve(e: io::Error) -> OpenError {
        match e.raw_os_error() {
            Some(libc::ELOOP) => OpenError::Symlink,
            Some(libc::EXDEV) => OpenError::Escape,
            _ => OpenError::Io(e),
        }
    }

    /// A refusal by the rules (as opposed to a missing or unreadable file).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, OpenError::Io(_))
    }
}

/// As an `io::Error`, a symlink is `ELOOP` and an escape `EXDEV`, what the kernel says
/// for them (a symlink as the last component is found by its type, not by errno).
impl From<OpenError> for io::Error {
    fn from(e: OpenError) -> io::Error {
        match e {
            OpenError::Io(e) => e,
            OpenError::Symlink => io::Error::from_raw_os_error(libc::ELOOP),
            OpenError::Escape => io::Error::from_raw_os_error(libc::EXDEV),
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        }
    }
}

/// How a file type is named in a refusal.
fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        _ => "of an unknown type",
    }
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
        let (file, st) = open_regular_at(&self.fd, target).map_err(|e| {
            let reason = if e.is_refusal() {
                Reason::ArtifactPathInvalid
            } else {
                Reason::ArtifactMissing
            };
            (reason, format!("{path}: {e}"))
        })?;
        // A file with other names may be a hard link to a host file: what it holds
        // (its size, its digest) is not reported, only that it differs.
        let linked = st.st_nlink > 1;
        let before = Fingerprint::of(&st);
        // Size before hashing: a wrong size costs one fstat, not a full read.
        if u64::try_from(st.st_size).ok() != Some(entry.size) {
            let on_disk = if linked {
                "a hard-linked file of another size".to_string()
            } else {
                format!("{} bytes", st.st_size)
            };
            return Err((
                Reason::ArtifactSizeMismatch,
                format!("{path}: {on_disk} on disk, manifest says {}", entry.size),
            ));
        }
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
            let is = if linked {
                "sha256 of a hard-linked file differs".to_string()
            } else {
                format!("sha256 is {digest}")
            };
            return Err((
                Reason::DigestMismatch,
                format!("{path}: {is}, manifest says {}", entry.sha256),
            ));
        }
        Ok(())
    }
}

fn openat2_retrying(dir: impl AsFd, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    loop {
        match rustix::fs::openat2(dir.as_fd(), path, flags, Mode::empty(), resolve) {
            // The kernel may ask for a retry when a rename raced the lookup.
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// Opens the regular file `path` beneath `dir` for reading; the one way an untrusted
/// path is opened (see the module docs). Returns the file and its `fstat`.
///
/// The path is first resolved to an `O_PATH` descriptor, which opens nothing: the
/// kernel refuses symlinks (`ELOOP`; a symlink as the last component comes back as
/// the link itself and is refused by its type) and escapes (`EXDEV`). `fstat` on it
/// refuses every type but a regular file. Only then is that inode opened for reading,
/// through its `/proc/self/fd` entry, `O_NONBLOCK` and `O_NOCTTY` all the same.
pub fn open_regular_at(dir: impl AsFd, path: &str) -> Result<(File, Stat), OpenError> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let pinned = openat2_retrying(dir, path, flags).map_err(OpenError::from_resolve)?;
    reopen_regular(pinned)
}

/// `fstat` on an `O_PATH` descriptor; a regular file is re-opened for reading.
fn reopen_regular(pinned: OwnedFd) -> Result<(File, Stat), OpenError> {
    let st = rustix::fs::fstat(&pinned).map_err(io::Error::from)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind == FileType::Symlink {
        return Err(OpenError::Symlink);
    }
    if kind != FileType::RegularFile {
        return Err(OpenError::NotRegular(type_name(kind)));
    }
    // The magic link names the inode already checked, whatever the path names now.
    let proc = format!("/proc/self/fd/{}", pinned.as_raw_fd());
    let read = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::open(proc.as_str(), read, Mode::empty()).map_err(|e| {
        let e = io::Error::from(e);
        io::Error::new(
            e.kind(),
            format!("re-opening through {proc} (is /proc mounted?): {e}"),
        )
    })?;
    let now = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        // Only a /proc that is not procfs could do this.
        return Err(OpenError::Io(io::Error::other(
            "/proc/self/fd re-opened another file",
        )));
    }
    Ok((File::from(fd), now))
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

/// Opens a file the operator named on the command line (a manifest or key for
/// `pack`): symlinks in the path are the operator's and are followed, but the file
/// must be regular, checked on an `O_PATH` descriptor before it is opened for
/// reading, so a FIFO or device there cannot hang or feed the command.
pub fn open_regular_path(path: &Path) -> Result<(File, Stat), OpenError> {
    let pinned = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
        .map_err(io::Error::from)?;
    reopen_regular(pinned)
}

/// Opens a regular file beneath `dir` by the same rules as verification (no symlinks,
/// no escape, regular files only, the type checked before a read-open). `pack` and
/// staging read what they copy through this.
pub fn open_beneath_regular(dir: &Path, path: &crate::manifest::ArtifactPath) -> io::Result<File> {
    Ok(open_regular_at(open_dir(dir)?, path.as_str())?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn refusal(dir: &Path, path: &str) -> String {
        let fd = open_dir(dir).expect("open dir");
        match open_regular_at(&fd, path) {
            Ok(_) => panic!("{path}: opened"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn only_regular_files_beneath_the_directory_are_opened() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path();
        std::fs::create_dir(d.join("sub")).expect("mkdir");
        std::fs::write(d.join("sub/ok"), b"ok").expect("write");
        std::fs::write(tmp.path().join("outside"), b"host").expect("write");
        symlink(d.join("outside"), d.join("link")).expect("symlink");
        symlink("sub", d.join("dirlink")).expect("symlink");
        let _sock = std::os::unix::net::UnixListener::bind(d.join("sock")).expect("bind");

        let fd = open_dir(d).expect("open dir");
        let (mut f, st) = open_regular_at(&fd, "sub/ok").expect("a regular file");
        assert_eq!(st.st_size, 2);
        let mut got = String::new();
        f.read_to_string(&mut got).expect("read");
        assert_eq!(got, "ok");

        assert_eq!(refusal(d, "link"), "a symlink is on the way");
        assert_eq!(refusal(d, "dirlink/ok"), "a symlink is on the way");
        assert_eq!(refusal(d, "../outside"), "resolves outside its directory");
        assert_eq!(refusal(d, "sub"), "is a directory, not a regular file");
        assert_eq!(refusal(d, "sock"), "is a socket, not a regular file");
        assert!(refusal(d, "missing").contains("No such file"));
        // A link to a device is refused as a link; the device itself by its type.
        symlink("/dev/zero", d.join("zero")).expect("symlink");
        assert_eq!(refusal(d, "zero"), "a symlink is on the way");
        let null = open_dir(Path::new("/dev")).expect("/dev");
        assert!(matches!(
            open_regular_at(&null, "null"),
            Err(OpenError::NotRegular("a character device"))
        ));
    }

    #[test]
    fn an_operator_path_may_be_a_symlink_but_must_be_a_regular_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path();
        std::fs::write(d.join("key"), b"k").expect("write");
        symlink(d.join("key"), d.join("key-link")).expect("symlink");
        assert!(open_regular_path(&d.join("key-link")).is_ok());
        assert!(matches!(
            open_regular_path(Path::new("/dev/null")),
            Err(OpenError::NotRegular("a character device"))
        ));
        assert!(matches!(
            open_regular_path(d),
            Err(OpenError::NotRegular("a directory"))
        ));
    }
}
