//! Packing a capsule: fill in sizes and digests, sign, and write the capsule
//! directory atomically. `pack` is the command-line front.
//!
//! The bytes copied into the capsule are the bytes hashed (one pass does both), and
//! the capsule appears under its final name only when complete (written beside it,
//! synced, then renamed without replacing anything, the parent synced), so a
//! failure leaves nothing half-written.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use verify_core::crypto::{default_backend, Backend};
use verify_core::digest::{open_beneath_regular, open_regular_path};
use verify_core::keys::{parse_jwk, SigningKey};
use verify_core::manifest::{ArtifactPath, NOT_A_DIGEST};
use verify_core::{check_shape, Limits, Manifest, Sha256Digest};

use crate::durable::{DurableError, StagedDir};
use crate::error::ErrorClass;

/// Why no capsule was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// An input file (manifest, key) could not be opened or read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: usize },
    /// The manifest does not parse or does not pass the verifier's rules (`detail`
    /// has the line, column and JSON path where there is one).
    #[error("{}: {detail}", path.display())]
    Manifest { path: PathBuf, detail: String },
    #[error("{}: {source}", path.display())]
    AsWritten {
        path: PathBuf,
        #[source]
        source: AsWritten,
    },
    /// An artifact or tool entry of the manifest.
    #[error("{}: {list}[{index}]: {source}", manifest.display())]
    Entry {
        manifest: PathBuf,
        list: &'static str,
        index: usize,
        #[source]
        source: EntryError,
    },
    /// The private JWK is unusable.
    #[error("{}: {detail}", path.display())]
    Key { path: PathBuf, detail: String },
    #[error("sign: {0}")]
    Sign(String),
    #[error("{}: already exists", path.display())]
    Exists { path: PathBuf },
    /// An approval given to `pack --approvals` that does not name the manifest packed
    /// (or does not parse as one).
    #[error("{}: {detail}", path.display())]
    StaleApproval { path: PathBuf, detail: String },
    /// Creating the output directory's parent.
    #[error("{}: {source}", path.display())]
    CreateParent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] DurableError),
}

impl PackError {
    /// Everything is the operator's to fix, except a write that failed.
    pub fn class(&self) -> ErrorClass {
        match self {
            PackError::Write(DurableError::Io { .. }) => ErrorClass::Runtime,
            _ => ErrorClass::Usage,
        }
    }
}

/// Why the manifest, as the author wrote it, does not fit the verifier's types.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AsWritten {
    /// At the author's line and column; `path` is the JSON path and `: `, or empty.
    #[error("line {line} column {column}: {path}{message}")]
    At {
        line: usize,
        column: usize,
        path: String,
        message: String,
    },
    #[error("too many missing fields")]
    TooManyMissing,
}

/// Why an artifact or tool entry cannot be packed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    #[error("must be an object")]
    NotObject,
    #[error("`path` must be a string")]
    PathNotString,
    #[error("`{path}`: {detail}")]
    Path { path: String, detail: String },
    /// Opening the source file (symlinks, FIFOs and escapes are refused here).
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Copying it into the capsule while hashing it.
    #[error("{}: {source}", path.display())]
    Copy {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{path}`: size is {size}, the manifest says {claimed}")]
    Size {
        path: String,
        size: u64,
        claimed: Value,
    },
    #[error("sha256: {NOT_A_DIGEST}")]
    NotADigest,
    #[error("`{path}`: its bytes hash to {digest}, the manifest says {claimed}")]
    Digest {
        path: String,
        digest: Sha256Digest,
        claimed: Sha256Digest,
    },
}

/// Packs the manifest `manifest` with the files under `files`, signed with the
/// private JWK `key`, into the new capsule directory `out`.
/// With `approvals`, the approvals in that directory that name this manifest go into
/// the capsule's `approvals/`; a stale one is refused ([`PackError::StaleApproval`]).
pub fn pack(
    manifest: &Path,
    files: &Path,
    key: &Path,
    out: &Path,
    approvals: Option<&Path>,
) -> Result<PathBuf, PackError> {
    let backend = default_backend();
    let limit = Limits::default().max_jws_bytes;
    let bad_manifest = |detail: String| PackError::Manifest {
        path: manifest.to_path_buf(),
        detail,
    };
    let text = read_bounded(manifest, limit)?;
    verify_core::json::reject_duplicate_keys(&text).map_err(|e| bad_manifest(e.to_string()))?;
    check_as_written(&text).map_err(|source| PackError::AsWritten {
        path: manifest.to_path_buf(),
        source,
    })?;
    let mut doc: Value = serde_json::from_slice(&text).map_err(|e| bad_manifest(e.to_string()))?;
    canonical_parent(&mut doc);

    let bad_key = |detail: String| PackError::Key {
        path: key.to_path_buf(),
        detail,
    };
    let key_bytes = read_bounded(key, 64 * 1024)?;
    let jwk = parse_jwk(&key_bytes).map_err(|e| bad_key(format!("{}: {}", e.field, e.message)))?;
    let signer = SigningKey::from_jwk(&jwk, backend).map_err(|e| bad_key(e.to_string()))?;

    if out.exists() {
        return Err(PackError::Exists { path: out.into() });
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|source| PackError::CreateParent {
        path: parent.into(),
        source,
    })?;
    let staging = StagedDir::new(out, ".pack-", 0o700)?;

    for list in ["artifacts", "tools"] {
        let Some(entries) = doc.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for (index, entry) in entries.iter_mut().enumerate() {
            fill_entry(entry, files, staging.path(), backend).map_err(|source| {
                PackError::Entry {
                    manifest: manifest.to_path_buf(),
                    list,
                    index,
                    source,
                }
            })?;
        }
    }

    // What is signed must pass the verifier's own manifest rules.
    let payload = serde_json::to_vec(&doc).map_err(|e| bad_manifest(e.to_string()))?;
    let parsed = Manifest::parse(&payload).map_err(|e| bad_manifest(e.to_string()))?;
    check_shape(&parsed).map_err(|e| bad_manifest(e.to_string()))?;
    let jws = verify_core::jws::sign_compact(&jwk.kid, jwk.alg, &payload, &signer)
        .map_err(|e| PackError::Sign(e.to_string()))?;

    if let Some(dir) = approvals {
        let digest = Sha256Digest(backend.sha256_oneshot(&payload));
        keep_approvals(dir, &parsed, digest, &staging)?;
    }
    staging.put("capsule.jws", jws.as_bytes(), 0o644)?;
    Ok(staging.commit()?)
}

/// Copies the approvals in `dir` that name this manifest into the staged capsule's
/// `approvals/`. One that names other manifest bytes (the manifest changed since it
/// was approved) is refused: a capsule is never packed with an approval the verifier
/// would call `approval_invalid`. Signatures are the verifier's to check.
fn keep_approvals(
    dir: &Path,
    manifest: &Manifest,
    digest: Sha256Digest,
    staging: &StagedDir,
) -> Result<(), PackError> {
    use verify_core::approvals::{ApprovalPayload, APPROVALS_DIR, MAX_APPROVAL_BYTES};
    let read_dir = |source| PackError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(read_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "jws")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    names.sort();
    crate::durable::create_dirs(&staging.path().join(APPROVALS_DIR), 0o755)?;
    for path in names {
        let bytes = read_bounded(&path, MAX_APPROVAL_BYTES + 1)?;
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let stale = |detail: String| PackError::StaleApproval {
            path: path.clone(),
            detail,
        };
        let parts = verify_core::jws::split(bytes).map_err(|e| stale(e.into()))?;
        let body = verify_core::b64::decode(parts.payload).map_err(|e| stale(e.to_string()))?;
        let p: ApprovalPayload =
            verify_core::json::from_slice_strict(&body).map_err(|e| stale(e.to_string()))?;
        let names_this = Sha256Digest::parse(&p.manifest_sha256) == Some(digest)
            && p.capsule_id == manifest.capsule_id
            && p.version == manifest.version
            && p.tenant == manifest.tenant;
        if !names_this {
            return Err(stale(format!(
                "stale approval: it approves manifest {}, the manifest packed is {digest}",
                p.manifest_sha256.escape_debug()
            )));
        }
        let name = path.file_name().unwrap_or_default();
        staging.put(Path::new(APPROVALS_DIR).join(name), bytes, 0o644)?;
    }
    crate::durable::sync_dir(&staging.path().join(APPROVALS_DIR))?;
    Ok(())
}

/// Copies one file into the staged capsule while hashing it, then fills in or checks
/// the entry's `size` and `sha256`.
fn fill_entry(
    entry: &mut Value,
    files: &Path,
    staging: &Path,
    backend: &dyn Backend,
) -> Result<(), EntryError> {
    let obj = entry.as_object_mut().ok_or(EntryError::NotObject)?;
    let path = obj
        .get("path")
        .and_then(Value::as_str)
        .ok_or(EntryError::PathNotString)?;
    let path = ArtifactPath::parse(path).map_err(|e| EntryError::Path {
        path: path.to_string(),
        detail: e.to_string(),
    })?;
    let mut src = open_beneath_regular(files, &path).map_err(|source| EntryError::Open {
        path: files.join(path.as_str()),
        source,
    })?;
    let dest: PathBuf = staging.join("files").join(path.as_str());
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).map_err(|source| EntryError::Copy {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let (digest, size) =
        copy_hashing(&mut src, &dest, backend).map_err(|source| EntryError::Copy {
            path: dest.clone(),
            source,
        })?;
    match obj.get("size") {
        None | Some(Value::Null) => {
            obj.insert("size".into(), Value::from(size));
        }
        Some(v) if v.as_u64() == Some(size) => {}
        Some(v) => {
            return Err(EntryError::Size {
                path: path.as_str().to_string(),
                size,
                claimed: v.clone(),
            })
        }
    }
    // Either spelling is accepted; what is signed is always the canonical `sha256:<hex>`.
    match obj.get("sha256") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_str().and_then(Sha256Digest::parse) {
            None => return Err(EntryError::NotADigest),
            Some(d) if d == digest => {}
            Some(claimed) => {
                return Err(EntryError::Digest {
                    path: path.as_str().to_string(),
                    digest,
                    claimed,
                })
            }
        },
    }
    obj.insert("sha256".into(), Value::from(digest.to_string()));
    Ok(())
}

/// `parent` in its canonical spelling (a malformed one is left for the verifier's
/// own check to name).
fn canonical_parent(doc: &mut Value) {
    if let Some(parent) = doc.get_mut("parent") {
        if let Some(d) = parent.as_str().and_then(Sha256Digest::parse) {
            *parent = Value::from(d.to_string());
        }
    }
}

/// Checks the manifest as the author wrote it against the verifier's own types, so
/// that an unknown or mistyped field is reported at the author's line and column,
/// with its JSON path (`artifacts[0].descripton`). `size` and `sha256` of artifacts
/// and tools may be missing (pack computes them): a placeholder is spliced in before
/// the entry's closing brace, and positions are mapped back past the splices.
fn check_as_written(original: &[u8]) -> Result<(), AsWritten> {
    let mut text = original.to_vec();
    // (offset in `original`, length) of every placeholder spliced in.
    let mut splices: Vec<(usize, usize)> = Vec::new();
    // Each pass fills one missing field of one entry, so this bounds the passes.
    let max_passes = 2 * original.iter().filter(|&&b| b == b'{').count() + 1;
    for _ in 0..max_passes {
        let mut de = serde_json::Deserializer::from_slice(&text);
        let (path, err) = match serde_path_to_error::deserialize::<_, Manifest>(&mut de) {
            Ok(_) => match de.end() {
                Ok(()) => return Ok(()),
                Err(e) => (String::new(), e),
            },
            Err(e) => (e.path().to_string(), e.into_inner()),
        };
        let offset = offset_of(&text, err.line(), err.column());
        let placeholder = fillable(&path, &err.to_string());
        match placeholder.zip(closing_brace(&text, offset)) {
            Some((insert, at)) => {
                let at_original = to_original(&splices, at);
                text.splice(at..at, insert.bytes());
                splices.push((at_original, insert.len()));
                splices.sort_unstable();
            }
            None => {
                // serde_json stops after an unknown key: point at where the key starts.
                let offset = if err.to_string().starts_with("unknown field") {
                    text[..offset]
                        .iter()
                        .rposition(|&b| b == b'"')
                        .unwrap_or(offset)
                } else {
                    offset
                };
                return Err(located(original, &splices, offset, &path, &err));
            }
        }
    }
    Err(AsWritten::TooManyMissing)
}

/// The placeholder for a field `pack` fills in itself, when that is what is missing.
fn fillable(path: &str, message: &str) -> Option<&'static str> {
    let entry = ["artifacts[", "tools["].iter().any(|list| {
        path.strip_prefix(list)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
    });
    if !entry {
        return None;
    }
    if message.starts_with("missing field `size`") {
        Some(",\"size\":0")
    } else if message.starts_with("missing field `sha256`") {
        Some(",\"sha256\":\"sha256:0000000000000000000000000000000000000000000000000000000000000000\"")
    } else {
        None
    }
}

/// Byte offset of serde_json's (1-based line, 1-based byte column).
fn offset_of(text: &[u8], line: usize, column: usize) -> usize {
    let start = if line <= 1 {
        0
    } else {
        text.iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .nth(line - 2)
            .map_or(text.len(), |(i, _)| i + 1)
    };
    (start + column.saturating_sub(1)).min(text.len())
}

/// The `}` that a missing-field error at `offset` points at (or just past).
fn closing_brace(text: &[u8], offset: usize) -> Option<usize> {
    let ahead = text[offset..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|i| offset + i);
    if let Some(i) = ahead.filter(|&i| text[i] == b'}') {
        return Some(i);
    }
    let end = (offset + 1).min(text.len());
    text[..end].iter().rposition(|&b| b == b'}')
}

/// Maps an offset in the spliced text back to the author's text.
fn to_original(splices: &[(usize, usize)], mut at: usize) -> usize {
    let mut shift = 0;
    for &(o, len) in splices {
        if at >= o + shift + len {
            shift += len;
        } else {
            break;
        }
    }
    at -= shift;
    at
}

/// `line L column C: PATH: message`, at the author's position.
fn located(
    original: &[u8],
    splices: &[(usize, usize)],
    offset: usize,
    path: &str,
    err: &serde_json::Error,
) -> AsWritten {
    let message = err.to_string();
    // serde_json ends its messages with its own (here: shifted) position.
    let message = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => &message,
    };
    let at = to_original(splices, offset);
    let (line, column) = match std::str::from_utf8(original) {
        Ok(text) => verify_core::error::line_column(text, at),
        Err(_) => (err.line(), err.column()),
    };
    let path = match path {
        "" | "." => String::new(),
        p => format!("{p}: "),
    };
    AsWritten::At {
        line,
        column,
        path,
        message: message.to_string(),
    }
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
pub fn read_bounded(path: &Path, limit: usize) -> Result<Vec<u8>, PackError> {
    let read_error = |source: io::Error| PackError::Read {
        path: path.to_path_buf(),
        source,
    };
    let (file, _) = open_regular_path(path).map_err(|e| read_error(e.into()))?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() > limit {
        return Err(PackError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}
