//! Staging: the bytes that run are the bytes that were verified.
//!
//! Design. Admission hashed the capsule's files where they lie, in a directory the
//! launcher does not own: whoever can write there can edit a file, rename another one
//! over it or swap in a symlink after the verdict. So the sandbox never sees that
//! directory. Instead, before launch, every admitted file is copied into a staging
//! directory inside the launcher's own run directory (mode 0700, owned by the
//! launcher) **while it is hashed**; the copy is used only if the bytes that were
//! written are exactly the admitted size and sha256. The source is opened with the
//! verifier's own rules (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`,
//! regular files only), so a symlink swapped in after admission is refused, not
//! followed. The staged files and directories are then made read-only (the mode is
//! not part of what was signed, so it is not taken from the source: 0555 for
//! directories, tools, the entrypoint and its `#!` interpreters, 0444 for every other
//! artifact) and the staging directory is bind-mounted read-only at `/capsule`.
//!
//! What this buys: a change to the capsule directory at any time after admission —
//! before staging (detected: the digest differs, nothing launches) or after it
//! (irrelevant: the sandbox reads the private copy) — cannot change what runs.
//! What it costs: one extra read and write of the capsule's bytes per run, which is
//! cheap next to the sandbox start for test capsules (see BENCHMARKS.md). Reflinks,
//! fs-verity or sealed memfds would avoid the copy but depend on the file system or
//! do not map onto an OCI bind mount; a copy works everywhere.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use verify_core::digest::open_beneath_regular;
use verify_core::manifest::{ArtifactPath, FileEntry};
use verify_core::{Admitted, ArtifactSource, Sha256Digest};

use crate::error::{LaunchError, Result};

/// One file as it was staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedFile {
    /// Its path beneath `/capsule`.
    pub path: String,
    /// `sha256:<hex>` of the bytes written to the staging directory.
    pub sha256: String,
    pub size: u64,
}

/// Mode of staged directories, and of the staged files that may be executed (tools,
/// the entrypoint and its `#!` interpreters: [`Admitted::is_executable`]): readable
/// and executable by everyone, writable by nobody.
const STAGED_MODE: u32 = 0o555;
/// Mode of every other staged file: data, not a program. A capsule cannot `exec` an
/// artifact the armory never saw.
const STAGED_DATA_MODE: u32 = 0o444;
const CHUNK: usize = 1 << 20;

/// Copies every admitted file into `dest` (which must not exist) while hashing it,
/// refuses any file whose bytes are not the admitted ones, and makes the result
/// read-only. On error, `dest` may hold a partial copy: the caller removes its run
/// directory.
pub fn stage(admitted: &Admitted, dest: &Path) -> Result<Vec<StagedFile>> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dest)
        .map_err(|e| LaunchError::io("create staging directory", dest, e))?;
    let mut staged = Vec::with_capacity(admitted.files().len());
    let mut dirs = vec![dest.to_path_buf()];
    for entry in admitted.files() {
        let source = open_source(admitted.source(), entry).map_err(|e| LaunchError::Stage {
            path: entry.path.to_string(),
            source: e,
        })?;
        let target = dest.join(entry.path.as_str());
        make_parents(dest, &entry.path, &mut dirs)?;
        let mode = if admitted.is_executable(entry) {
            STAGED_MODE
        } else {
            STAGED_DATA_MODE
        };
        staged.push(copy_verified(source, &target, entry, mode)?);
    }
    // Read-only from the leaves up, so that no directory is closed before its
    // children are done.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in &dirs {
        fs::set_permissions(dir, fs::Permissions::from_mode(STAGED_MODE))
            .map_err(|e| LaunchError::io("make read-only", dir, e))?;
    }
    Ok(staged)
}

/// Opens an admitted file by the verifier's rules: by manifest path beneath
/// `files/`, or by digest in a blob store.
fn open_source(source: &ArtifactSource, entry: &FileEntry) -> std::io::Result<File> {
    match source {
        ArtifactSource::Dir(dir) => open_beneath_regular(dir, &entry.path),
        ArtifactSource::Blobs(dir) => {
            let rel = format!("sha256/{}", entry.sha256.to_hex());
            let path = ArtifactPath::parse(&rel)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            open_beneath_regular(dir, &path)
        }
    }
}

/// Creates the directories between `dest` and the file. `dest` is the launcher's own
/// 0700 directory, so nobody else can plant a symlink on the way; `create_new`
/// below refuses to open anything that already exists regardless.
fn make_parents(dest: &Path, path: &ArtifactPath, dirs: &mut Vec<PathBuf>) -> Result<()> {
    let mut dir = dest.to_path_buf();
    let segments: Vec<&str> = path.as_str().split('/').collect();
    for seg in &segments[..segments.len() - 1] {
        dir.push(seg);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => dirs.push(dir.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => {
                return Err(LaunchError::Stage {
                    path: path.to_string(),
                    source: e,
                })
            }
        }
    }
    Ok(())
}

/// Copies at most `size + 1` bytes, hashing exactly what is written, and compares.
fn copy_verified(
    mut source: File,
    target: &Path,
    entry: &FileEntry,
    mode: u32,
) -> Result<StagedFile> {
    let path = entry.path.to_string();
    let stage_err = |e| LaunchError::Stage {
        path: path.clone(),
        source: e,
    };
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(stage_err)?;
    let mut hasher = verify_core::crypto::default_backend().sha256();
    let want = entry.size.saturating_add(1);
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(want).unwrap_or(CHUNK))];
    let mut written = 0u64;
    while written < want {
        let room = usize::try_from(want - written)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = match source.read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(stage_err(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(stage_err)?;
        written += n as u64;
    }
    let actual = Sha256Digest(hasher.finish());
    if written != entry.size || actual != entry.sha256 {
        return Err(LaunchError::ChangedAfterAdmission {
            path,
            expected: entry.sha256.to_string(),
            expected_size: entry.size,
            actual: actual.to_string(),
            // `written` stops one byte past the admitted size: a grown file says so.
            actual_size: written,
        });
    }
    out.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(stage_err)?;
    Ok(StagedFile {
        path,
        sha256: actual.to_string(),
        size: written,
    })
}
