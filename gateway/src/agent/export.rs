//! What of a run's evidence bundle the agent ships back to the registry, by the
//! tenant's egress mode. [`export_for_push`] is the only place that decides, and it
//! decides through `evidence::export`: the pushed artifact is exactly the signed
//! export `capsule-gateway evidence export` writes, so `evidence verify` checks it
//! offline after a pull (`local-only`: the signed `export.json` naming the index's
//! digest, and nothing else).

use std::path::{Path, PathBuf};

use verify_core::EgressMode;

use super::AgentError;
use crate::custody::CustodySigner;
use crate::evidence::{export, EgressRules};

/// The files to push, staged in a temporary directory (removed on drop).
#[derive(Debug)]
pub struct ExportDir {
    dir: tempfile::TempDir,
    files: Vec<String>,
}

impl ExportDir {
    pub fn path(&self) -> PathBuf {
        self.dir.path().join(EXPORT_DIR)
    }

    /// Paths inside [`ExportDir::path`], sorted.
    pub fn files(&self) -> &[String] {
        &self.files
    }
}

/// The export's directory inside the temporary one (`evidence::export` creates it).
const EXPORT_DIR: &str = "export";

fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) -> Result<(), AgentError> {
    let dir = root.join(rel);
    let io = |source| AgentError::Export {
        path: dir.clone(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let rel = rel.join(e.file_name());
        let ft = e.file_type().map_err(io)?;
        if ft.is_dir() {
            walk(root, &rel, out)?;
        } else if ft.is_file() {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// Stages the signed export of `bundle_dir` that `mode` allows to leave the host (in
/// the system's temporary directory: it holds nothing the registry will not get),
/// signed by `signer`, the key that signed the bundle's index.
pub fn export_for_push(
    bundle_dir: &Path,
    mode: EgressMode,
    rules: &EgressRules,
    signer: &CustodySigner,
) -> Result<ExportDir, AgentError> {
    let dir = tempfile::Builder::new()
        .prefix("export-")
        .tempdir()
        .map_err(|source| AgentError::Export {
            path: std::env::temp_dir(),
            source,
        })?;
    let out = dir.path().join(EXPORT_DIR);
    export(bundle_dir, &out, Some(mode), rules, signer)?;
    let mut files = Vec::new();
    walk(&out, Path::new(""), &mut files)?;
    files.sort();
    Ok(ExportDir { dir, files })
}
