//! Reading evidence back from disk. A bundle under check is untrusted: every file of
//! it is opened by the rules capsule files are (no symlink, regular files only, the
//! type checked on an `O_PATH` descriptor before the read-open, size-capped), so a
//! planted symlink or FIFO is refused, never opened.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::Value;
use verify_core::digest::{open_dir, open_regular_at, open_regular_nofollow, Access, OpenError};

use super::schema::{DecisionRecord, Event, EventHead, SandboxRecord};
use super::{EvidenceError, MAX_FILE_BYTES};

/// An evidence bundle directory, read.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub event: Event,
    pub capsule_jws: Vec<u8>,
    pub decision: DecisionRecord,
    /// `sandbox.json`, `oci-config.json`, `stdout`, `stderr`: present when the
    /// launcher reported (all four or none).
    pub sandbox: Option<SandboxRecord>,
    pub oci_config: Option<Vec<u8>>,
    pub stdout: Option<Vec<u8>>,
    pub stderr: Option<Vec<u8>>,
    /// `approvals/*.jws`, by file name, sorted.
    pub approvals: Vec<(String, Vec<u8>)>,
}

fn io_error(path: &Path, source: std::io::Error) -> EvidenceError {
    EvidenceError::Io {
        path: path.into(),
        source,
    }
}

/// Reads an opened file, refusing more than [`MAX_FILE_BYTES`].
fn read_capped(file: File, path: &Path) -> Result<Vec<u8>, EvidenceError> {
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(EvidenceError::Malformed {
            what: path.display().to_string(),
            detail: format!("larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// The open's result, with "not there" as `None`.
fn found<T>(r: Result<T, OpenError>, path: &Path) -> Result<Option<T>, EvidenceError> {
    match r {
        Ok(x) => Ok(Some(x)),
        Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, e.into())),
    }
}

pub(crate) fn optional(path: &Path) -> Result<Option<Vec<u8>>, EvidenceError> {
    found(open_regular_nofollow(path, Access::Read), path)?
        .map(|(f, _)| read_capped(f, path))
        .transpose()
}

pub(crate) fn required(dir: &Path, name: &str) -> Result<Vec<u8>, EvidenceError> {
    optional(&dir.join(name))?.ok_or_else(|| EvidenceError::Malformed {
        what: name.into(),
        detail: "missing from the bundle".into(),
    })
}

impl Bundle {
    /// Reads `EVIDENCE/<run id>/` as `run` writes it, every file strictly.
    pub fn read(dir: &Path) -> Result<Bundle, EvidenceError> {
        let event = Event::parse(&required(dir, "event.json")?)?;
        let decision = DecisionRecord::parse(&required(dir, "decision.json")?)?;
        let capsule_jws = required(dir, "capsule.jws")?;
        let sandbox = optional(&dir.join("sandbox.json"))?
            .map(|b| SandboxRecord::parse(&b))
            .transpose()?;
        let oci_config = optional(&dir.join("oci-config.json"))?;
        let stdout = optional(&dir.join("stdout"))?;
        let stderr = optional(&dir.join("stderr"))?;
        let parts = [
            sandbox.is_some(),
            oci_config.is_some(),
            stdout.is_some(),
            stderr.is_some(),
        ];
        if parts.iter().any(|p| *p) && !parts.iter().all(|p| *p) {
            return Err(EvidenceError::Malformed {
                what: dir.display().to_string(),
                detail: "sandbox.json, oci-config.json, stdout and stderr: all or none".into(),
            });
        }
        let approvals = list_files(dir)?
            .into_iter()
            .filter_map(|p| p.strip_prefix("approvals/").map(str::to_string))
            .map(|name| {
                let bytes = required(dir, &format!("approvals/{name}"))?;
                Ok((name, bytes))
            })
            .collect::<Result<Vec<_>, EvidenceError>>()?;
        Ok(Bundle {
            approvals,
            dir: dir.to_path_buf(),
            event,
            capsule_jws,
            decision,
            sandbox,
            oci_config,
            stdout,
            stderr,
        })
    }
}

/// Every entry of a bundle directory, as paths relative to it, sorted: the files at
/// its top and in `approvals/`. Any other directory is listed as `NAME/` (no bundle
/// has one, so an index never lists it); nothing is followed or opened.
pub fn list_files(dir: &Path) -> Result<Vec<String>, EvidenceError> {
    let mut out = Vec::new();
    let entries = |d: &Path| -> Result<Vec<(String, std::fs::FileType)>, EvidenceError> {
        std::fs::read_dir(d)
            .map_err(|e| io_error(d, e))?
            .map(|e| {
                let e = e.map_err(|e| io_error(d, e))?;
                let t = e.file_type().map_err(|err| io_error(&e.path(), err))?;
                Ok((e.file_name().to_string_lossy().into_owned(), t))
            })
            .collect()
    };
    for (name, t) in entries(dir)? {
        if t.is_dir() && name == "approvals" {
            for (inner, t) in entries(&dir.join("approvals"))? {
                out.push(format!(
                    "approvals/{inner}{}",
                    if t.is_dir() { "/" } else { "" }
                ));
            }
        } else if t.is_dir() {
            out.push(format!("{name}/"));
        } else {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// `DIR/event.json` as the service answers it: the stored JSON and the attributes
/// it decides by, or `None` when there is no such bundle. Neither the bundle
/// directory nor the file may be a symlink, and a FIFO or device is never opened.
pub fn read_event_head(dir: &Path) -> Result<Option<(EventHead, Value)>, EvidenceError> {
    let dir_fd = match open_dir(dir) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(dir, e)),
    };
    let path = dir.join("event.json");
    let Some((file, _)) = found(open_regular_at(&dir_fd, "event.json"), &path)? else {
        return Ok(None);
    };
    let bytes = read_capped(file, &path)?;
    let malformed = |e: serde_json::Error| EvidenceError::Malformed {
        what: path.display().to_string(),
        detail: e.to_string(),
    };
    let event: Value = serde_json::from_slice(&bytes).map_err(malformed)?;
    let head = EventHead::deserialize(&event).map_err(malformed)?;
    Ok(Some((head, event)))
}
