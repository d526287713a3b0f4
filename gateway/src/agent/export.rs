//! What of a run's evidence bundle the agent ships back to the registry, by the
//! tenant's egress mode. [`export_for_push`] is the only place that decides: when the
//! signed export (`evidence export`) lands it is called from here, and nothing else
//! in the agent changes.

use std::path::{Path, PathBuf};

use serde::Serialize;
use verify_core::EgressMode;

use super::AgentError;
use crate::oci::client::sha256;

/// The files to push, staged in a temporary directory (removed on drop).
#[derive(Debug)]
pub struct ExportDir {
    dir: tempfile::TempDir,
    files: Vec<String>,
}

impl ExportDir {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Paths inside [`ExportDir::path`], sorted.
    pub fn files(&self) -> &[String] {
        &self.files
    }
}

/// The digest document every export carries: each bundle file's path, sha256 and
/// size, and nothing of their contents.
pub const DIGESTS_FILE: &str = "digests.json";

#[derive(Serialize)]
struct Digests<'a> {
    schema: &'static str,
    run_id: &'a str,
    egress_mode: &'static str,
    files: Vec<FileDigest>,
}

#[derive(Serialize)]
struct FileDigest {
    path: String,
    sha256: String,
    size: u64,
}

/// Which bundle files leave the host in `mode`, besides the digest document.
/// `metadata-only`: the decision (ids and digests) and the signed index, if present.
/// `sanitized`: also the sandbox facts and configuration; the event and the outputs
/// stay home until masking (the export's) can rewrite them.
fn allowed(mode: EgressMode, path: &str) -> bool {
    let metadata = matches!(path, "decision.json" | "index.json" | "index.sig.json");
    match mode {
        EgressMode::LocalOnly => false,
        EgressMode::MetadataOnly => metadata,
        EgressMode::Sanitized => {
            metadata || !matches!(path, "stdout" | "stderr" | "event.json" | "capsule.jws")
        }
    }
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), AgentError> {
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
            out.push((rel.to_string_lossy().into_owned(), root.join(&rel)));
        }
    }
    Ok(())
}

/// Stages the export of `bundle_dir` that `mode` allows to leave the host (in the
/// system's temporary directory: it holds nothing the registry will not get).
pub fn export_for_push(bundle_dir: &Path, mode: EgressMode) -> Result<ExportDir, AgentError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Export { path, source }
    };
    let dir = tempfile::Builder::new()
        .prefix("export-")
        .tempdir()
        .map_err(io(&std::env::temp_dir()))?;
    let mut bundle = Vec::new();
    walk(bundle_dir, Path::new(""), &mut bundle)?;
    let run_id = bundle_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let mut digests = Vec::new();
    let mut files = Vec::new();
    for (rel, path) in &bundle {
        let bytes = std::fs::read(path).map_err(io(path))?;
        digests.push(FileDigest {
            path: rel.clone(),
            sha256: sha256(&bytes).to_string(),
            size: bytes.len() as u64,
        });
        if allowed(mode, rel) {
            let dest = dir.path().join(rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&dest, &bytes).map_err(io(&dest))?;
            files.push(rel.clone());
        }
    }
    let doc = Digests {
        schema: "capsule-gateway/agent-digests/v1",
        run_id,
        egress_mode: mode.as_str(),
        files: digests,
    };
    let doc_path = dir.path().join(DIGESTS_FILE);
    // Strings and numbers only: serialising cannot fail.
    let text = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    std::fs::write(&doc_path, text).map_err(io(&doc_path))?;
    files.push(DIGESTS_FILE.to_string());
    files.sort();
    Ok(ExportDir { dir, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_ships_what_it_allows_and_local_only_only_digests() {
        let bundle = tempfile::tempdir().expect("bundle");
        for f in [
            "capsule.jws",
            "decision.json",
            "stdout",
            "stderr",
            "event.json",
            "sandbox.json",
        ] {
            std::fs::write(bundle.path().join(f), f).expect("write");
        }
        let local = export_for_push(bundle.path(), EgressMode::LocalOnly).expect("local");
        assert_eq!(local.files(), [DIGESTS_FILE]);
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(local.path().join(DIGESTS_FILE)).expect("read"))
                .expect("json");
        assert_eq!(doc["files"].as_array().expect("files").len(), 6);
        assert!(!doc.to_string().contains("\"stdout\":"), "no contents");
        let meta = export_for_push(bundle.path(), EgressMode::MetadataOnly).expect("meta");
        assert_eq!(meta.files(), ["decision.json", DIGESTS_FILE]);
        let san = export_for_push(bundle.path(), EgressMode::Sanitized).expect("san");
        assert_eq!(san.files(), ["decision.json", DIGESTS_FILE, "sandbox.json"]);
    }
}
