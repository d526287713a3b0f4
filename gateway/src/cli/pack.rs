//! `pack`: fill in sizes and digests, sign, and write a capsule directory atomically.
//!
//! The bytes copied into the capsule are the bytes hashed (one pass does both), and
//! the capsule appears under its final name only when complete (written beside it,
//! synced, then renamed), so a failure leaves nothing half-written.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;
use verify_core::crypto::{default_backend, Backend};
use verify_core::digest::{open_beneath_regular, open_regular_path};
use verify_core::keys::{parse_jwk, SigningKey};
use verify_core::manifest::ArtifactPath;
use verify_core::{check_shape, Limits, Manifest, Sha256Digest};

use super::usage;
use crate::GatewayError;

pub fn run(
    manifest: &Path,
    files: &Path,
    key: &Path,
    out: &Path,
) -> Result<ExitCode, GatewayError> {
    let backend = default_backend();
    let limit = Limits::default().max_jws_bytes;
    let text = read_bounded(manifest, limit)?;
    verify_core::json::reject_duplicate_keys(&text)
        .map_err(|e| usage(format!("{}: {e}", manifest.display())))?;
    let mut doc: Value =
        serde_json::from_slice(&text).map_err(|e| usage(format!("{}: {e}", manifest.display())))?;

    let key_bytes = read_bounded(key, 64 * 1024)?;
    let jwk = parse_jwk(&key_bytes)
        .map_err(|e| usage(format!("{}: {}: {}", key.display(), e.field, e.message)))?;
    let signer = SigningKey::from_jwk(&jwk, backend)
        .map_err(|e| usage(format!("{}: {e}", key.display())))?;

    if out.exists() {
        return Err(usage(format!("{}: already exists", out.display())));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| GatewayError::io(parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".pack-")
        .tempdir_in(parent)
        .map_err(|e| GatewayError::io(parent, e))?;

    for list in ["artifacts", "tools"] {
        let Some(entries) = doc.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for (i, entry) in entries.iter_mut().enumerate() {
            fill_entry(entry, files, staging.path(), backend)
                .map_err(|e| usage(format!("{}: {list}[{i}]: {e}", manifest.display())))?;
        }
    }

    // What is signed must pass the verifier's own manifest rules.
    let payload = serde_json::to_vec(&doc).map_err(|e| usage(e.to_string()))?;
    let parsed =
        Manifest::parse(&payload).map_err(|e| usage(format!("{}: {e}", manifest.display())))?;
    check_shape(&parsed).map_err(|e| usage(format!("{}: {e}", manifest.display())))?;
    let jws =
        verify_core::jws::sign_compact(&jwk.kid, jwk.alg, &payload, &signer).map_err(usage)?;

    let jws_path = staging.path().join("capsule.jws");
    write_synced(&jws_path, jws.as_bytes())?;
    sync_dir(staging.path())?;
    let staged = staging.keep();
    fs::rename(&staged, out).map_err(|e| {
        let _ = fs::remove_dir_all(&staged);
        GatewayError::io(out, e)
    })?;
    sync_dir(parent)?;
    println!("{}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Copies one file into the staged capsule while hashing it, then fills in or checks
/// the entry's `size` and `sha256`.
fn fill_entry(
    entry: &mut Value,
    files: &Path,
    staging: &Path,
    backend: &dyn Backend,
) -> Result<(), String> {
    let obj = entry.as_object_mut().ok_or("must be an object")?;
    let path = obj
        .get("path")
        .and_then(Value::as_str)
        .ok_or("`path` must be a string")?;
    let path = ArtifactPath::parse(path).map_err(|e| format!("`{path}`: {e}"))?;
    let mut src = open_beneath_regular(files, &path)
        .map_err(|e| format!("{}: {e}", files.join(path.as_str()).display()))?;
    let dest: PathBuf = staging.join("files").join(path.as_str());
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let (digest, size) =
        copy_hashing(&mut src, &dest, backend).map_err(|e| format!("{}: {e}", dest.display()))?;
    match obj.get("size") {
        None | Some(Value::Null) => {
            obj.insert("size".into(), Value::from(size));
        }
        Some(v) if v.as_u64() == Some(size) => {}
        Some(v) => return Err(format!("`{path}`: size is {size}, the manifest says {v}")),
    }
    match obj.get("sha256") {
        None | Some(Value::Null) => {
            obj.insert("sha256".into(), Value::from(digest.to_hex()));
        }
        Some(v) if v.as_str() == Some(digest.to_hex().as_str()) => {}
        Some(v) => {
            return Err(format!(
                "`{path}`: sha256 is {}, the manifest says {v}",
                digest.to_hex()
            ))
        }
    }
    Ok(())
}

fn copy_hashing(
    src: &mut File,
    dest: &Path,
    backend: &dyn Backend,
) -> io::Result<(Sha256Digest, u64)> {
    let mut out = File::options().write(true).create_new(true).open(dest)?;
    let mut hasher = backend.sha256();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    out.sync_all()?;
    Ok((Sha256Digest(hasher.finish()), total))
}

/// Reads an operator-named file, a regular file only (a FIFO would hang `pack`).
fn read_bounded(path: &Path, limit: usize) -> Result<Vec<u8>, GatewayError> {
    let (file, _) = open_regular_path(path).map_err(|e| GatewayError::io(path, e.into()))?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| GatewayError::io(path, e))?;
    if bytes.len() > limit {
        return Err(usage(format!(
            "{}: larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), GatewayError> {
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| GatewayError::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| GatewayError::io(path, e))
}

/// fsync a directory so that the names in it (the rename) are durable too.
fn sync_dir(dir: &Path) -> Result<(), GatewayError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| GatewayError::io(dir, e))
}
