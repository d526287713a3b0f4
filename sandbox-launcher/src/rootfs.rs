//! The sandbox's root file system and its tree digest.
//!
//! The default root is the base rootfs that `scripts/install-run-deps.sh` builds from
//! Debian's `busybox-static` at [`BASE_ROOTFS`]. Its tree digest — one sha256 over
//! every entry's path, type, mode, owner and content (a symlink's target, never what
//! it points to) — is computed before every run, recorded in the evidence, and
//! compared with the policy's pin when there is one: a root that differs refuses the
//! run before any sandbox exists. The host's `/usr` (and `/bin`, `/lib`, ...) is used
//! only when asked for by name ([`Rootfs::host_usr`]).
//!
//! `capsule-gateway rootfs digest DIR` prints [`tree_digest`] of a directory: the
//! same function, so an operator pins exactly what the launcher will compute.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use verify_core::Sha256Digest;

/// Where `install-run-deps.sh` builds the busybox base rootfs.
pub const BASE_ROOTFS: &str = "/usr/local/lib/capsule-gateway/rootfs";

/// The host directories [`Rootfs::host_usr`] binds read-only.
const HOST_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// Where the sandbox's root file system comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// An empty directory made by the launcher for each run, with read-only binds of
    /// these host directories. A host path that is a symlink (merged `/usr`: `/bin ->
    /// usr/bin`) is reproduced as the same symlink; one that does not exist is left
    /// out. The capsule sees the host's programs and libraries, and nothing else of
    /// the host (no `/etc`, `/home`, `/root`, `/var`). Only by explicit opt-in (policy
    /// `rootfs = { host_usr = true }`): it is not pinned, it changes with every
    /// package upgrade.
    HostBinds(Vec<PathBuf>),
    /// A prepared root file system, used read-only: its tree digest is computed before
    /// each run and must equal `pin` when one is set. It must contain the mount
    /// points `/proc`, `/dev`, `/tmp`, `/capsule`, the file `/.capsule-probe`, and the
    /// C library the probe is linked against.
    Dir {
        path: PathBuf,
        pin: Option<Sha256Digest>,
    },
}

impl Rootfs {
    /// The base rootfs at [`BASE_ROOTFS`], pinned to `pin` if given.
    pub fn base(pin: Option<Sha256Digest>) -> Rootfs {
        Rootfs::Dir {
            path: PathBuf::from(BASE_ROOTFS),
            pin,
        }
    }

    /// The host's `/usr`, `/bin`, `/sbin` and library directories, read-only.
    pub fn host_usr() -> Rootfs {
        Rootfs::HostBinds(HOST_DIRS.iter().map(PathBuf::from).collect())
    }
}

impl Default for Rootfs {
    /// The unpinned base rootfs: its digest is still recorded.
    fn default() -> Self {
        Rootfs::base(None)
    }
}

/// What the evidence says about the root of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsFacts {
    /// `dir` (a prepared root, digested) or `host-usr` (the host's directories).
    pub source: String,
    /// The prepared root's path, or the host directories bound.
    pub paths: Vec<String>,
    /// `sha256:<hex>` tree digest of a prepared root (`None` for `host-usr`).
    #[serde(deserialize_with = "crate::nullable")]
    pub tree_sha256: Option<String>,
    /// The policy's pin, when there is one (then equal to `tree_sha256`).
    #[serde(deserialize_with = "crate::nullable")]
    pub pinned: Option<String>,
}

/// Why a root file system could not be digested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootfsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Anyone but the owner may change it: what is digested now could be changed
    /// before the sandbox reads it.
    #[error("{}: writable by group or others (mode {mode:04o})", path.display())]
    Writable { path: PathBuf, mode: u32 },
    /// A device, FIFO or socket: a root holds directories, files and symlinks only.
    #[error("{}: not a directory, regular file or symlink", path.display())]
    SpecialFile { path: PathBuf },
    /// A name that is not UTF-8 (the digest's entries are text).
    #[error("{}: a name that is not UTF-8", path.display())]
    Name { path: PathBuf },
}

/// One entry of the tree listing that is digested.
#[derive(Serialize)]
struct Entry<'a> {
    path: &'a str,
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

/// The tree digest of `root`: sha256 over one JSON line per entry (the root itself
/// as `.`, then every entry below it in byte order of its path), each giving path,
/// kind, mode (with the setuid/setgid/sticky bits), uid, gid, and a file's size and
/// sha256 or a symlink's target. Symlinks are never followed. Refuses an entry that
/// group or others may write, and any special file.
pub fn tree_digest(root: &Path) -> Result<Sha256Digest, RootfsError> {
    let mut listing = Vec::new();
    walk(root, ".", &mut listing)?;
    Ok(Sha256Digest(
        verify_core::crypto::default_backend().sha256_oneshot(&listing),
    ))
}

fn walk(path: &Path, rel: &str, out: &mut Vec<u8>) -> Result<(), RootfsError> {
    let io = |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(io)?;
    let ft = meta.file_type();
    let mode = meta.mode() & 0o7777;
    if !ft.is_symlink() && mode & 0o022 != 0 {
        return Err(RootfsError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut entry = Entry {
        path: rel,
        kind: "dir",
        mode,
        uid: meta.uid(),
        gid: meta.gid(),
        size: None,
        sha256: None,
        target: None,
    };
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io)?;
        entry.kind = "symlink";
        entry.target = Some(
            target
                .to_str()
                .ok_or_else(|| RootfsError::Name {
                    path: path.to_path_buf(),
                })?
                .to_string(),
        );
    } else if ft.is_file() {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        f.read_to_end(&mut bytes).map_err(io)?;
        entry.kind = "file";
        entry.size = Some(bytes.len() as u64);
        entry.sha256 = Some(
            Sha256Digest(verify_core::crypto::default_backend().sha256_oneshot(&bytes)).to_string(),
        );
    } else if !ft.is_dir() {
        return Err(RootfsError::SpecialFile {
            path: path.to_path_buf(),
        });
    }
    // serde_json escapes every control character: one entry is one line.
    serde_json::to_writer(&mut *out, &entry).map_err(|e| io(e.into()))?;
    out.push(b'\n');
    if ft.is_dir() {
        let mut names = Vec::new();
        for e in fs::read_dir(path).map_err(io)? {
            let name = e.map_err(io)?.file_name();
            let name = name.into_string().map_err(|_| RootfsError::Name {
                path: path.to_path_buf(),
            })?;
            names.push(name);
        }
        names.sort_unstable();
        for name in names {
            let child_rel = if rel == "." {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            walk(&path.join(&name), &child_rel, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        fs::create_dir(d.path().join("bin")).expect("mkdir");
        fs::write(d.path().join("bin/busybox"), b"\x7fELF").expect("write");
        std::os::unix::fs::symlink("busybox", d.path().join("bin/sh")).expect("symlink");
        for p in [d.path().to_path_buf(), d.path().join("bin")] {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        fs::set_permissions(
            d.path().join("bin/busybox"),
            fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        d
    }

    #[test]
    fn the_digest_changes_with_content_mode_and_link_targets_and_nothing_else() {
        let d = tree();
        let a = tree_digest(d.path()).expect("digest");
        assert_eq!(a, tree_digest(d.path()).expect("again"), "deterministic");
        let bb = d.path().join("bin/busybox");
        fs::write(&bb, b"\x7fELG").expect("edit");
        let b = tree_digest(d.path()).expect("digest");
        assert_ne!(a, b, "content");
        fs::set_permissions(&bb, fs::Permissions::from_mode(0o4755)).expect("setuid");
        assert_ne!(b, tree_digest(d.path()).expect("digest"), "setuid bit");
        fs::set_permissions(&bb, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::remove_file(d.path().join("bin/sh")).expect("rm");
        std::os::unix::fs::symlink("/proc/self/exe", d.path().join("bin/sh")).expect("ln");
        assert_ne!(b, tree_digest(d.path()).expect("digest"), "link target");
    }

    #[test]
    fn a_group_writable_entry_or_a_fifo_is_refused() {
        let d = tree();
        fs::set_permissions(d.path().join("bin"), fs::Permissions::from_mode(0o775))
            .expect("chmod");
        assert!(matches!(
            tree_digest(d.path()),
            Err(RootfsError::Writable { mode: 0o775, .. })
        ));
        fs::set_permissions(d.path().join("bin"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let status = std::process::Command::new("mkfifo")
            .arg(d.path().join("bin/fifo"))
            .status()
            .expect("mkfifo (Debian package coreutils)");
        assert!(status.success());
        assert!(matches!(
            tree_digest(d.path()),
            Err(RootfsError::SpecialFile { .. })
        ));
    }
}
