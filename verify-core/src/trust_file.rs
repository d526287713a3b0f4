//! Trust files — the policy, its JWKS and sealed keys, the service's config and TLS
//! trust bundles — are read only when nobody but root or this process's user could
//! have changed them, the way ssh's `StrictModes` treats `authorized_keys`.
//!
//! The rule: the file is a regular file, and it and every directory above it up to
//! `/` (both along the path as given and along the path it resolves to) are owned by
//! root or the effective uid and not writable by group or other. A world-writable
//! directory with the sticky bit (`/tmp`) is allowed: nobody else can rename or
//! remove an entry in it. A file that holds a secret (a JWKS with an HS256 `oct`
//! key) must not be readable, writable or executable by group or other either,
//! like ssh's "UNPROTECTED PRIVATE KEY FILE".
//!
//! A refusal is a [`ConfigError::Unsafe`] naming the file, its mode and owner, and
//! the command that fixes it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags};

use crate::error::ConfigError;

/// The largest trust file read (policies and key sets are kilobytes).
pub const MAX_TRUST_FILE_BYTES: u64 = 16 << 20;

/// A trust file's bytes, read after its permissions were checked.
#[derive(Debug)]
pub struct TrustFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    mode: u32,
    uid: u32,
}

impl TrustFile {
    /// Refuses the file unless only its owner can read it (for files holding secrets).
    pub fn require_private(&self, what: &str) -> Result<(), ConfigError> {
        if self.mode & 0o077 != 0 {
            return Err(ConfigError::Unsafe {
                file: self.path.clone(),
                message: format!(
                    "{what}, and it is accessible by group or other (mode {:04o}, owner uid {}); \
                     run `chmod 600 {}`",
                    self.mode & 0o7777,
                    self.uid,
                    self.path.display()
                ),
            });
        }
        Ok(())
    }

    pub fn text(&self) -> Result<&str, ConfigError> {
        std::str::from_utf8(&self.bytes)
            .map_err(|e| ConfigError::invalid(&self.path, "-", format!("not UTF-8: {e}")))
    }
}

/// Reads a trust file after checking it and its directories (see the module docs).
pub fn read(path: &Path) -> Result<TrustFile, ConfigError> {
    let read_err = |source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    };
    let (real, st) = check(path)?;
    // The type and owner were checked on an O_PATH descriptor; only now is it opened
    // for reading, and it must still be the same file.
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::open(&real, flags, Mode::empty()).map_err(|e| read_err(e.into()))?;
    let now = rustix::fs::fstat(&fd).map_err(|e| read_err(e.into()))?;
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        return Err(ConfigError::Unsafe {
            file: path.to_path_buf(),
            message: "replaced while it was opened".into(),
        });
    }
    let mut bytes = Vec::new();
    File::from(fd)
        .take(MAX_TRUST_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_TRUST_FILE_BYTES {
        return Err(ConfigError::invalid(
            path,
            "-",
            format!("larger than {MAX_TRUST_FILE_BYTES} bytes"),
        ));
    }
    Ok(TrustFile {
        path: path.to_path_buf(),
        bytes,
        mode: st.st_mode,
        uid: st.st_uid,
    })
}

/// Reads a trust file that holds a secret: [`read`] and [`TrustFile::require_private`].
pub fn read_private(path: &Path, what: &str) -> Result<TrustFile, ConfigError> {
    let file = read(path)?;
    file.require_private(what)?;
    Ok(file)
}

/// Checks a trust file and its directories without reading it; returns the path it
/// resolves to and its status (taken from an `O_PATH` descriptor: no open for
/// reading, so a FIFO or device is refused before anything waits on it).
pub fn check(path: &Path) -> Result<(PathBuf, rustix::fs::Stat), ConfigError> {
    let read_err = |source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(read_err)?.join(path)
    };
    let real = absolute.canonicalize().map_err(read_err)?;
    // Along the path as given (a symlink there is only as safe as its directory) and
    // along the path it resolves to.
    for dir in ancestors(&absolute).chain(ancestors(&real)) {
        check_dir(path, &dir)?;
    }
    let fd = rustix::fs::open(
        &real,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| read_err(e.into()))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| read_err(e.into()))?;
    if !FileType::from_raw_mode(st.st_mode).is_file() {
        return Err(ConfigError::Unsafe {
            file: path.to_path_buf(),
            message: format!("not a regular file (resolves to {})", real.display()),
        });
    }
    check_owner_and_mode(path, None, st.st_uid, st.st_mode, false)?;
    Ok((real, st))
}

/// The directories above `path`, nearest first, up to `/`. `..` is not resolved here
/// (the canonical path is checked as well).
fn ancestors(path: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    path.ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
        .filter(|p| !matches!(p.components().next_back(), Some(Component::ParentDir)))
        .map(Path::to_path_buf)
}

fn check_dir(file: &Path, dir: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(dir).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    check_owner_and_mode(file, Some(dir), meta.uid(), meta.mode(), true)
}

fn check_owner_and_mode(
    file: &Path,
    dir: Option<&Path>,
    uid: u32,
    mode: u32,
    is_dir: bool,
) -> Result<(), ConfigError> {
    let euid = rustix::process::geteuid().as_raw();
    let what = match dir {
        Some(d) => format!("its directory {}", d.display()),
        None => "it".to_string(),
    };
    let target = dir.unwrap_or(file);
    if uid != 0 && uid != euid {
        return Err(ConfigError::Unsafe {
            file: file.to_path_buf(),
            message: format!(
                "{what} is owned by uid {uid} (mode {:04o}), not by root or uid {euid} \
                 which reads it; run `chown {euid} {}`",
                mode & 0o7777,
                target.display()
            ),
        });
    }
    let sticky = is_dir && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(ConfigError::Unsafe {
            file: file.to_path_buf(),
            message: format!(
                "{what} is writable by group or other (mode {:04o}, owner uid {uid}); \
                 run `chmod go-w {}`",
                mode & 0o7777,
                target.display()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_file_only_its_owner_can_write_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("policy.toml");
        fs::write(&p, b"x = 1").expect("write");
        chmod(&p, 0o644);
        assert_eq!(read(&p).expect("read").bytes, b"x = 1");
        let secret = read(&p).expect("read");
        let e = secret
            .require_private("it holds a secret")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        chmod(&p, 0o600);
        read_private(&p, "it holds a secret").expect("private");
    }

    #[test]
    fn group_or_world_writable_files_and_directories_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("etc");
        fs::create_dir(&sub).expect("mkdir");
        let p = sub.join("policy.toml");
        fs::write(&p, b"x").expect("write");
        for mode in [0o666, 0o620, 0o602] {
            chmod(&p, mode);
            let e = read(&p).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, ConfigError::Unsafe { .. }), "{msg}");
            assert!(
                msg.contains("policy.toml") && msg.contains("chmod go-w"),
                "{msg}"
            );
        }
        chmod(&p, 0o644);
        chmod(&sub, 0o777);
        let msg = read(&p).unwrap_err().to_string();
        assert!(
            msg.contains("its directory") && msg.contains("mode 0777"),
            "{msg}"
        );
        // The sticky bit (as on /tmp) makes a world-writable directory safe.
        chmod(&sub, 0o1777);
        read(&p).expect("sticky directory");
        chmod(&sub, 0o755);
    }

    #[test]
    fn a_symlink_is_checked_along_both_paths_and_a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open");
        fs::create_dir(&open).expect("mkdir");
        chmod(&open, 0o777);
        let target = open.join("policy.toml");
        fs::write(&target, b"x").expect("write");
        let link = dir.path().join("policy.toml");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let msg = read(&link).unwrap_err().to_string();
        assert!(msg.contains("its directory"), "{msg}");
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let msg = read(&fifo).unwrap_err().to_string();
        assert!(msg.contains("not a regular file"), "{msg}");
    }
}
