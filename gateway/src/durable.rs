//! Durable writes: what the gateway writes appears under its final name whole or not
//! at all, and survives a crash once the call returns. Two shapes, one rule (temp
//! name beside the final one, write, fsync, rename without replacing, fsync the
//! parent):
//!
//! - [`write_new`]: one file (keys, sealed keys, quotes, certificates);
//! - [`StagedDir`]: a directory filled under a temporary name and renamed into place
//!   when complete (a packed capsule, an evidence bundle, the development trust
//!   domain).
//!
//! Files are created with their final mode (`open(2)`'s mode, so the umask can only
//! narrow it): a private key is 0600 from its first byte, never chmod-ed after.
//! Nothing here replaces an existing name: the rename is `RENAME_NOREPLACE`, so two
//! writers racing for one name cannot both win.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{RenameFlags, CWD};

/// Why a durable write did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    /// The final name is taken; nothing was replaced.
    #[error("{}: already exists", path.display())]
    Exists { path: PathBuf },
    /// A step of the write failed (`op` names it).
    #[error("{}: {op}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DurableError + 'a {
    move |source| DurableError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The directory a name lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// fsync a directory, so that the names in it (a rename) are durable too.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

/// fsync an existing file and then its directory: a file an earlier process wrote,
/// and may have been killed before it synced, is durable, name included.
pub fn sync_existing(path: &Path) -> Result<(), DurableError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("sync file", path))?;
    sync_dir(parent_of(path))
}

/// Creates `dir` and its missing parents, each new one with `mode`, and syncs the
/// parent of each one it created: a file later made durable inside a new directory
/// is not lost with the directory's own entry.
pub fn create_dirs(dir: &Path, mode: u32) -> Result<(), DurableError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io("create directory", dir))?;
    for created in missing {
        sync_dir(parent_of(created))?;
    }
    Ok(())
}

/// Renames `from` to `to` unless `to` exists, then syncs `to`'s parent.
fn rename_new(from: &Path, to: &Path) -> Result<(), DurableError> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) | Err(rustix::io::Errno::NOTEMPTY) => {
            return Err(DurableError::Exists { path: to.into() })
        }
        Err(e) => return Err(io("rename into place", to)(e.into())),
    }
    sync_dir(parent_of(to))
}

/// Creates `path` (it must not exist) with `mode`, writes `bytes` and syncs it. Not
/// atomic by itself: for a file inside a [`StagedDir`], whose rename is.
fn create_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => DurableError::Exists { path: path.into() },
            _ => io("create", path)(e),
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("write", path))
}

/// `bytes` written and synced under a temporary name (mode `mode`) in `parent`: the
/// first half of [`write_new`] and [`replace`], which then rename it into place.
fn synced_temp(
    parent: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<tempfile::NamedTempFile, DurableError> {
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(parent)
        .map_err(io("create temporary file", parent))?;
    let mut f = tmp.as_file();
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("write", tmp.path()))?;
    Ok(tmp)
}

/// Writes a new file `path` with `mode`, durably; refuses to replace an existing one
/// ([`DurableError::Exists`]). The parent directory must exist.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    let parent = parent_of(path);
    if path.symlink_metadata().is_ok() {
        // Checked first only for the message; the rename below is what enforces it.
        return Err(DurableError::Exists { path: path.into() });
    }
    let tmp = synced_temp(parent, bytes, mode)?;
    rename_new(tmp.path(), path)?;
    // Renamed away: there is nothing left for the guard to delete.
    let _ = tmp.into_temp_path().keep();
    Ok(())
}

/// Writes `path` with `mode`, durably, replacing what is there: the new bytes are
/// written and synced under a temporary name beside it, renamed over it, and the
/// parent synced, so a crash leaves the old file or the new one, never a mix.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    let parent = parent_of(path);
    let tmp = synced_temp(parent, bytes, mode)?;
    tmp.persist(path)
        .map_err(|e| io("rename into place", path)(e.error))?;
    sync_dir(parent)
}

/// A directory filled under a temporary name beside its destination, and renamed into
/// place by [`StagedDir::commit`]: whole or absent. Dropped without a commit, it is
/// removed.
#[derive(Debug)]
pub struct StagedDir {
    tmp: tempfile::TempDir,
    dest: PathBuf,
}

impl StagedDir {
    /// A new staging directory with `mode` for `dest`, beside it (the parent must
    /// exist). `dest` itself is not checked here: the commit's rename refuses to
    /// replace it.
    pub fn new(dest: &Path, prefix: &str, mode: u32) -> Result<StagedDir, DurableError> {
        let parent = parent_of(dest);
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempdir_in(parent)
            .map_err(io("create temporary directory", parent))?;
        Ok(StagedDir {
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// Where the files go until the commit.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Writes the new file `name` (a path relative to the staging directory) with
    /// `mode` and syncs it.
    pub fn put(&self, name: impl AsRef<Path>, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
        create_synced(&self.tmp.path().join(name), bytes, mode)
    }

    /// Syncs the staged directory, renames it to its destination (never over an
    /// existing one) and syncs the parent. Returns the destination.
    pub fn commit(self) -> Result<PathBuf, DurableError> {
        sync_dir(self.tmp.path())?;
        let staged = self.tmp.keep();
        if let Err(e) = rename_new(&staged, &self.dest) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e);
        }
        Ok(self.dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p)
            .expect("meta")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn write_new_creates_the_file_with_its_mode_and_never_replaces_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("k.private.jwk.json");
        write_new(&key, b"secret", 0o600).expect("write");
        assert_eq!(std::fs::read(&key).expect("read"), b"secret");
        assert_eq!(mode(&key), 0o600);
        let again = write_new(&key, b"other", 0o600);
        assert!(
            matches!(again, Err(DurableError::Exists { .. })),
            "{again:?}"
        );
        assert_eq!(std::fs::read(&key).expect("read"), b"secret");
        // No temporary file is left beside it, after success or refusal.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("k.private.jwk.json")]);
    }

    #[test]
    fn a_write_into_a_missing_directory_is_an_io_error_naming_the_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = write_new(&dir.path().join("no/such/file"), b"x", 0o644).expect_err("fails");
        assert!(
            matches!(
                e,
                DurableError::Io {
                    op: "create temporary file",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_staged_dir_appears_whole_on_commit_and_not_at_all_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("root/bundle");
        create_dirs(&dir.path().join("root"), 0o700).expect("mkdir");
        let staged = StagedDir::new(&dest, ".b-", 0o700).expect("stage");
        staged.put("a", b"1", 0o600).expect("put");
        assert!(!dest.exists());
        assert_eq!(staged.commit().expect("commit"), dest);
        assert_eq!(std::fs::read(dest.join("a")).expect("read"), b"1");
        assert_eq!(mode(&dest), 0o700);
        assert_eq!(mode(&dest.join("a")), 0o600);

        let other = StagedDir::new(&dest, ".b-", 0o700).expect("stage");
        other.put("b", b"2", 0o600).expect("put");
        let e = other.commit().expect_err("dest exists");
        assert!(matches!(e, DurableError::Exists { .. }), "{e:?}");
        assert!(!dest.join("b").exists());

        let dropped = StagedDir::new(&dir.path().join("root/x"), ".b-", 0o700).expect("stage");
        let tmp = dropped.path().to_path_buf();
        drop(dropped);
        assert!(!tmp.exists() && !dir.path().join("root/x").exists());
    }
}
