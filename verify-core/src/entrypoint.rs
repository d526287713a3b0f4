//! What program runs. The armory limits the files a manifest labels as tools; the
//! entrypoint must not be a way around it. So the program the sandbox executes is
//! either a staged, verified file (`/capsule/<path>`, a manifest artifact or tool) or
//! a host program the tenant's policy names (`host_programs`). A staged script that
//! starts with `#!` is executed by the kernel through its interpreter, which must
//! obey the same rule; the `#!` line is read from the very bytes that were hashed
//! and matched the manifest (see [`HeadKeeper`]), never from a second read.

use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use crate::crypto::{Backend, Es256Signer, Es256Verifier, Hs256Key, KeyRejected, Sha256};
use crate::manifest::{ArtifactPath, FileEntry, Manifest};
use crate::policy::Tenant;

/// Where staged files appear inside the sandbox.
pub const CAPSULE_DIR: &str = "/capsule";
/// Bytes of a file kept for its `#!` line: the kernel reads no more
/// (`BINPRM_BUF_SIZE`).
pub const HEAD_BYTES: usize = 256;
/// Scripts whose interpreter is itself a staged script, at most this deep (the
/// kernel stops at 5 levels of `exec` handlers; one is the final binary).
const MAX_INTERPRETER_DEPTH: usize = 4;

/// The first bytes of one file as they were hashed.
pub type Head = Arc<Mutex<Vec<u8>>>;

/// Why a program (the entrypoint or a `#!` interpreter) may not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProgramError {
    #[error("names no artifact or tool of the manifest")]
    NotStaged,
    #[error("is not an absolute path")]
    NotAbsolute,
    #[error(
        "is neither a staged file (/capsule/...) nor one of the host_programs of tenant `{tenant}`"
    )]
    NotAllowed { tenant: String },
}

/// Why a `#!` line names no usable interpreter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShebangError {
    #[error("its `#!` line is longer than {HEAD_BYTES} bytes")]
    TooLong,
    #[error("its `#!` line names no interpreter")]
    Empty,
    #[error("its `#!` interpreter is not UTF-8")]
    NotUtf8,
}

/// Why what the sandbox would execute is refused (`tool_not_authorized`). Program
/// names are shown escaped and cut to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntrypointError {
    #[error("entrypoint `{program}`: {why}")]
    Program { program: String, why: ProgramError },
    #[error("/capsule/{path}: its `#!` interpreters form a loop")]
    InterpreterLoop { path: ArtifactPath },
    #[error("/capsule/{path}: more than {MAX_INTERPRETER_DEPTH} nested `#!` interpreters")]
    TooDeep { path: ArtifactPath },
    #[error("/capsule/{path}: {why}")]
    Shebang {
        path: ArtifactPath,
        why: ShebangError,
    },
    #[error("/capsule/{path} starts with `#!{interpreter}`: {why}")]
    Interpreter {
        path: ArtifactPath,
        interpreter: String,
        why: ProgramError,
    },
}

/// Checks `entrypoint[0]` against the manifest and the tenant's policy, before any
/// file is read. Returns the index in `files` of the staged file it names, if any.
pub fn check_program(
    m: &Manifest,
    files: &[FileEntry],
    tenant: &Tenant,
) -> Result<Option<usize>, EntrypointError> {
    let program = m.entrypoint.first().map(String::as_str).unwrap_or_default();
    resolve(program, files, tenant).map_err(|why| EntrypointError::Program {
        program: show(program),
        why,
    })
}

/// After every file was verified: follows the `#!` line of the staged entrypoint
/// (and of a staged interpreter, and so on). Returns the paths of the staged files
/// that the kernel executes: they, and the tools, are the only executable files
/// in `/capsule`.
pub fn check_interpreters(
    staged: Option<usize>,
    files: &[FileEntry],
    heads: &[Head],
    tenant: &Tenant,
) -> Result<Vec<ArtifactPath>, EntrypointError> {
    let mut executed = Vec::new();
    let mut current = staged;
    while let Some(i) = current {
        let path = &files[i].path;
        if executed.contains(path) {
            return Err(EntrypointError::InterpreterLoop { path: path.clone() });
        }
        if executed.len() > MAX_INTERPRETER_DEPTH {
            return Err(EntrypointError::TooDeep { path: path.clone() });
        }
        executed.push(path.clone());
        let head = heads
            .get(i)
            .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        let Some(line) = head.strip_prefix(b"#!") else {
            break;
        };
        let interpreter = interpreter(line, head.len() as u64 == files[i].size).map_err(|why| {
            EntrypointError::Shebang {
                path: path.clone(),
                why,
            }
        })?;
        current =
            resolve(&interpreter, files, tenant).map_err(|why| EntrypointError::Interpreter {
                path: path.clone(),
                interpreter: show(&interpreter),
                why,
            })?;
    }
    Ok(executed)
}

/// A staged file (its index) or an allowed host program (`None`).
fn resolve(
    program: &str,
    files: &[FileEntry],
    tenant: &Tenant,
) -> Result<Option<usize>, ProgramError> {
    if let Some(rel) = program
        .strip_prefix(CAPSULE_DIR)
        .and_then(|r| r.strip_prefix('/'))
    {
        let found = ArtifactPath::parse(rel)
            .ok()
            .and_then(|p| files.iter().position(|f| f.path == p));
        return match found {
            Some(i) => Ok(Some(i)),
            None => Err(ProgramError::NotStaged),
        };
    }
    if !program.starts_with('/') {
        return Err(ProgramError::NotAbsolute);
    }
    if tenant.host_programs.contains(program) {
        return Ok(None);
    }
    Err(ProgramError::NotAllowed {
        tenant: tenant.name.clone(),
    })
}

/// The interpreter of a `#!` line, as the kernel reads it: after spaces and tabs, up
/// to a space, tab, NUL or newline. `complete` says the head is the whole file.
fn interpreter(line: &[u8], complete: bool) -> Result<String, ShebangError> {
    let start = line
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(line.len());
    let rest = &line[start..];
    let end = rest
        .iter()
        .position(|&b| matches!(b, b' ' | b'\t' | b'\n' | b'\0'));
    let name = match end {
        Some(end) => &rest[..end],
        None if complete => rest,
        None => return Err(ShebangError::TooLong),
    };
    if name.is_empty() {
        return Err(ShebangError::Empty);
    }
    String::from_utf8(name.to_vec()).map_err(|_| ShebangError::NotUtf8)
}

fn show(s: &str) -> String {
    s.chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

/// A backend that passes everything through and keeps the first [`HEAD_BYTES`] fed
/// to the newest hasher it made. Handed to the digest check of one file, it yields
/// exactly the bytes that were hashed: when the check passes, they are verified.
#[derive(Debug)]
pub struct HeadKeeper<'a> {
    inner: &'a dyn Backend,
    head: Head,
}

impl<'a> HeadKeeper<'a> {
    pub fn new(inner: &'a dyn Backend, head: Head) -> HeadKeeper<'a> {
        HeadKeeper { inner, head }
    }
}

struct HeadHasher {
    inner: Box<dyn Sha256>,
    head: Head,
}

impl Sha256 for HeadHasher {
    fn update(&mut self, data: &[u8]) {
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let room = HEAD_BYTES.saturating_sub(head.len());
        head.extend_from_slice(&data[..room.min(data.len())]);
        drop(head);
        self.inner.update(data);
    }

    fn finish(self: Box<Self>) -> [u8; 32] {
        self.inner.finish()
    }
}

impl Backend for HeadKeeper<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn es256_verifier(&self, point: &[u8; 65]) -> Result<Box<dyn Es256Verifier>, KeyRejected> {
        self.inner.es256_verifier(point)
    }
    fn es256_signer(
        &self,
        d: &[u8; 32],
        point: &[u8; 65],
    ) -> Result<Box<dyn Es256Signer>, KeyRejected> {
        self.inner.es256_signer(d, point)
    }
    fn hs256_key(&self, secret: &[u8]) -> Box<dyn Hs256Key> {
        self.inner.hs256_key(secret)
    }
    fn sha256(&self) -> Box<dyn Sha256> {
        // A new hasher starts over (the mmap path falls back to reading that way).
        self.head.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Box::new(HeadHasher {
            inner: self.inner.sha256(),
            head: self.head.clone(),
        })
    }
    fn sha256_oneshot(&self, data: &[u8]) -> [u8; 32] {
        self.inner.sha256_oneshot(data)
    }
    fn random(&self, out: &mut [u8]) -> Result<(), KeyRejected> {
        self.inner.random(out)
    }
    fn es256_generate(&self) -> Result<(Zeroizing<[u8; 32]>, [u8; 65]), KeyRejected> {
        self.inner.es256_generate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interpreter_is_read_as_the_kernel_reads_it() {
        let ok = |l: &[u8]| interpreter(l, false);
        assert_eq!(ok(b"/bin/sh\necho").as_deref(), Ok("/bin/sh"));
        assert_eq!(
            ok(b" \t/usr/bin/env python3\n").as_deref(),
            Ok("/usr/bin/env")
        );
        assert_eq!(ok(b"/bin/sh\0junk\n").as_deref(), Ok("/bin/sh"));
        assert_eq!(ok(b"/bin/sh\r\n").as_deref(), Ok("/bin/sh\r"));
        assert_eq!(interpreter(b"/bin/sh", true).as_deref(), Ok("/bin/sh"));
        assert!(ok(b"/bin/sh").is_err(), "cut off at the head's end");
        assert!(ok(b"\n").is_err() && ok(b"  \n").is_err());
    }

    #[test]
    fn the_head_keeper_keeps_the_first_bytes_of_the_last_hasher() {
        let backend = crate::crypto::default_backend();
        let head = Head::default();
        let keeper = HeadKeeper::new(backend, head.clone());
        let mut h = keeper.sha256();
        h.update(b"stale");
        let mut h2 = keeper.sha256();
        h2.update(b"#!/bin/sh\n");
        h2.update(&[b'x'; 400]);
        let digest = h2.finish();
        let mut plain = backend.sha256();
        plain.update(b"#!/bin/sh\n");
        plain.update(&[b'x'; 400]);
        assert_eq!(digest, plain.finish(), "the digest is unchanged");
        let kept = head.lock().expect("lock").clone();
        assert_eq!(kept.len(), HEAD_BYTES);
        assert!(kept.starts_with(b"#!/bin/sh\nxxx"));
    }
}
