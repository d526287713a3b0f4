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
//! hashed. Hashing reads the descriptor in 1 MiB chunks by default, each `read`
//! asking for one byte more than remains, so a small file is one `read` and a file
//! that grew after its `fstat` is seen; memory mapping is selectable (see
//! [`HashMode`] and the SIGBUS guard in `mmap`).

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
    /// Prepended to every manifest path: `files/` when `fd` is the capsule directory
    /// itself ([`Root::files_of_capsule`]), empty when it is the artifact directory.
    prefix: &'static str,
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
            prefix: "",
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
            prefix: "",
        }
    }

    /// The artifacts of a capsule directory already opened, each resolved as
    /// `files/<path>` beneath it by the same rules (a symlink anywhere on the way,
    /// `files/` included, is refused): no descriptor of its own for `files/`, two
    /// system calls fewer per capsule. Its manifest paths cannot leave `files/`
    /// (`ArtifactPath` has no `..` and no leading `/`), and the kernel keeps every
    /// lookup beneath the capsule directory. When a file fails, ask
    /// [`Root::prefix_error`] whether `files/` itself is why.
    pub fn files_of_capsule(capsule_dir: OwnedFd, files_dir: &'static str) -> Root {
        Root {
            fd: capsule_dir,
            by_digest: false,
            prefix: files_dir,
        }
    }

    /// Why the prefix directory (`files/`) does not open, if it does not: a failure
    /// of one file is then the whole root's, as when the root was opened on its own.
    pub fn prefix_error(&self) -> Option<OpenError> {
        let dir = self.prefix.trim_end_matches('/');
        if dir.is_empty() {
            return None;
        }
        open_dir_at(&self.fd, dir).err()
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
        } else if !self.prefix.is_empty() {
            relative = format!("{}{path}", self.prefix);
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
        let end = match mode {
            HashMode::Read | HashMode::Auto => {
                hash_read(&file, entry.size, &mut |b| hasher.update(b))
            }
            HashMode::Mmap => {
                match mmap::read_mapped(&file, entry.size, CHUNK_BYTES, &mut |b| hasher.update(b)) {
                    Ok(mmap::MappedRead::Complete) => Ok(ReadEnd::Complete),
                    Ok(_) => Ok(ReadEnd::Shrank),
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
        match end {
            ReadEnd::Complete => {}
            ReadEnd::Shrank => {
                return Err((
                    Reason::ArtifactChanged,
                    format!("{path}: file shrank while it was hashed"),
                ))
            }
            ReadEnd::Grew => {
                return Err((
                    Reason::ArtifactChanged,
                    format!("{path}: file grew while it was hashed"),
                ))
            }
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
    reopen_regular(pinned, Access::Read)
}

/// How a regular file is opened once its type has been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// `fstat` on an `O_PATH` descriptor; a regular file is re-opened as `access` says.
/// Returns that `fstat`: the re-opened descriptor is the same inode (see
/// [`proc_fd_checked`]), so a second `fstat` would only repeat it; a size that
/// changes after it is caught by the read (one byte past the size is asked for).
fn reopen_regular(pinned: OwnedFd, access: Access) -> Result<(File, Stat), OpenError> {
    let st = rustix::fs::fstat(&pinned).map_err(io::Error::from)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind == FileType::Symlink {
        return Err(OpenError::Symlink);
    }
    if kind != FileType::RegularFile {
        return Err(OpenError::NotRegular(type_name(kind)));
    }
    proc_fd_checked()?;
    // The magic link names the inode already checked, whatever the path names now.
    let proc = format!("/proc/self/fd/{}", pinned.as_raw_fd());
    let mode = match access {
        Access::Read => OFlags::RDONLY,
        Access::ReadWrite => OFlags::RDWR,
    };
    let flags = mode | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::open(proc.as_str(), flags, Mode::empty()).map_err(|e| {
        let e = io::Error::from(e);
        io::Error::new(
            e.kind(),
            format!("re-opening through {proc} (is /proc mounted?): {e}"),
        )
    })?;
    Ok((File::from(fd), st))
}

/// Whether `/proc/self/fd` is procfs, asked once per process: only procfs makes its
/// entries magic links to the very inode of the descriptor, which is what lets a
/// re-open through it skip comparing `(st_dev, st_ino)` per file (one `fstat` less
/// on every file). Something else mounted there is refused, as the per-file
/// comparison refused it; only a mount over `/proc` while the process runs (root, in
/// its mount namespace) is not seen.
fn proc_fd_checked() -> io::Result<()> {
    static PROCFS: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    // `PROC_SUPER_MAGIC` of linux/magic.h.
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    // `f_type` is i64 on x86_64 and narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    PROCFS
        .get_or_init(|| match rustix::fs::statfs("/proc/self/fd") {
            Ok(fs) if i64::from(fs.f_type) == PROC_SUPER_MAGIC => Ok(()),
            Ok(fs) => Err(format!(
                "/proc/self/fd is not procfs (f_type {:#x}): files cannot be re-opened safely",
                fs.f_type
            )),
            Err(e) => Err(format!("statfs /proc/self/fd (is /proc mounted?): {e}")),
        })
        .clone()
        .map_err(io::Error::other)
}

/// How a read of a file of a known size ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadEnd {
    /// Exactly the size, then end of file.
    Complete,
    /// End of file before the size: it shrank after the `fstat`.
    Shrank,
    /// More bytes than the size: it grew after the `fstat`.
    Grew,
}

/// Feeds exactly `len` bytes of `file` to `update`, each `read` asking for one byte
/// more than remains: a file that is still `len` bytes long is read with exactly one
/// `read` per chunk (a single `read` up to [`CHUNK_BYTES`]), and one that grew is
/// seen without another system call. Loops only on a short read.
fn hash_read(file: &File, len: u64, update: &mut dyn FnMut(&[u8])) -> io::Result<ReadEnd> {
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let want = usize::try_from(len).unwrap_or(usize::MAX).min(CHUNK_BYTES) + 1;
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let mut remaining = len;
        let mut reader = file;
        loop {
            let ask = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .saturating_add(1)
                .min(buf.len());
            match reader.read(&mut buf[..ask]) {
                Ok(0) if remaining == 0 => return Ok(ReadEnd::Complete),
                Ok(0) => return Ok(ReadEnd::Shrank),
                Ok(got) if got as u64 > remaining => return Ok(ReadEnd::Grew),
                Ok(got) => {
                    update(&buf[..got]);
                    remaining -= got as u64;
                    // A short read is the end of a regular file: the size is met with
                    // no second `read` when it asked for one byte more than remained.
                    if remaining == 0 && got < ask {
                        return Ok(ReadEnd::Complete);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })
}

/// Reads a whole small file whose `fstat` said `size` bytes, refusing more than
/// `limit`: one `read` of `size + 1` bytes when the file is still that long (a short
/// read is its end); a file that grew since the `fstat` is read on to its end or to
/// one byte past `limit`, so the caller's limit check sees it. The JWS and the
/// approvals are read through this.
pub fn read_sized(file: &File, size: u64, limit: u64) -> io::Result<Vec<u8>> {
    let cap = usize::try_from(size.min(limit).saturating_add(1)).unwrap_or(usize::MAX);
    let mut bytes = vec![0u8; cap];
    let mut len = 0;
    let mut reader = file;
    loop {
        match reader.read(&mut bytes[len..]) {
            Ok(0) => break,
            Ok(got) => {
                len += got;
                if len < bytes.len() {
                    // Short of the buffer: the end of the file. Only when it is short
                    // of the size as well (it shrank, or a read was cut) is it asked again.
                    if len as u64 >= size {
                        break;
                    }
                    continue;
                }
                // It grew: read on, at most to one byte past the limit.
                if len as u64 > limit {
                    break;
                }
                let more = usize::try_from(limit + 1)
                    .unwrap_or(usize::MAX)
                    .min(len.saturating_mul(2).max(len + 4096));
                bytes.resize(more, 0);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    bytes.truncate(len);
    Ok(bytes)
}

/// Opens a file the operator named on the command line (a manifest or key for
/// `pack`): symlinks in the path are the operator's and are followed, but the file
/// must be regular, checked on an `O_PATH` descriptor before it is opened for
/// reading, so a FIFO or device there cannot hang or feed the command.
pub fn open_regular_path(path: &Path) -> Result<(File, Stat), OpenError> {
    let pinned = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
        .map_err(io::Error::from)?;
    reopen_regular(pinned, Access::Read)
}

/// Opens a file at a path the gateway laid out itself (its state database and
/// marker): the directories on the way are the operator's, but the file itself may
/// not be a symlink and must be regular, checked on an `O_PATH` descriptor before
/// it is opened as `access` says.
pub fn open_regular_nofollow(path: &Path, access: Access) -> Result<(File, Stat), OpenError> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let pinned = rustix::fs::open(path, flags, Mode::empty()).map_err(io::Error::from)?;
    reopen_regular(pinned, access)
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

    fn hashed(file: &File, len: u64) -> (Vec<u8>, ReadEnd) {
        let mut got = Vec::new();
        let end = hash_read(file, len, &mut |b| got.extend_from_slice(b)).expect("read");
        (got, end)
    }

    /// A size from an `fstat` that is already stale: the file grew or shrank after it.
    #[test]
    fn a_read_by_size_sees_growth_and_shrinking_after_the_fstat() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("f");
        std::fs::write(&p, b"0123456789").expect("write");
        let f = File::open(&p).expect("open");
        let at = |len| {
            use std::io::Seek;
            (&f).rewind().expect("rewind");
            hashed(&f, len)
        };
        assert_eq!(at(10), (b"0123456789".to_vec(), ReadEnd::Complete));
        // Grew: the one read of size + 1 returns more than the size.
        assert_eq!(at(9).1, ReadEnd::Grew);
        assert_eq!(at(0).1, ReadEnd::Grew);
        // Shrank: the file ends before the size.
        assert_eq!(at(11), (b"0123456789".to_vec(), ReadEnd::Shrank));

        let read = |size, limit| {
            use std::io::Seek;
            (&f).rewind().expect("rewind");
            read_sized(&f, size, limit).expect("read")
        };
        assert_eq!(read(10, 100), b"0123456789");
        // Grown past the size: read on to its end, or to one byte past the limit.
        assert_eq!(read(2, 100), b"0123456789");
        assert_eq!(read(2, 4), b"01234");
        assert_eq!(read(40, 100), b"0123456789");
    }

    #[test]
    fn a_large_file_is_read_whole_and_its_growth_seen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("big");
        let len = CHUNK_BYTES * 2 + 7;
        let bytes: Vec<u8> = (0..len)
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect();
        std::fs::write(&p, &bytes).expect("write");
        let (got, end) = hashed(&File::open(&p).expect("open"), len as u64);
        assert_eq!((got == bytes, end), (true, ReadEnd::Complete));
        // A stale size of exactly one chunk, and one of a byte short of the file.
        let (_, end) = hashed(&File::open(&p).expect("open"), CHUNK_BYTES as u64);
        assert_eq!(end, ReadEnd::Grew);
        let (_, end) = hashed(&File::open(&p).expect("open"), len as u64 - 1);
        assert_eq!(end, ReadEnd::Grew);
        let got = read_sized(&File::open(&p).expect("open"), 10, len as u64).expect("read");
        assert_eq!(got, bytes);
    }
}
