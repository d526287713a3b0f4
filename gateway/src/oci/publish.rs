//! `publish`: a capsule directory becomes an OCI artifact in a registry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use bytes::Bytes;
use verify_core::Sha256Digest;

use super::artifact::{
    Descriptor, ImageManifest, ANN_CAPSULE_ID, ANN_TENANT, ANN_VERSION, CAPSULE_ARTIFACT_TYPE,
    EMPTY_CONFIG, INDEX_ARTIFACT_TYPE, INDEX_TITLE, JOSE_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
    OCTET_MEDIA_TYPE, TITLE,
};
use super::{OciError, Registry};

/// One file of the capsule directory, by its path inside it.
#[derive(Debug)]
struct CapsuleFile {
    title: String,
    path: PathBuf,
}

/// The regular files of a capsule directory (`capsule.jws`, `approvals/*.jws`,
/// `files/**`), sorted by path. A symlink or anything but a regular file or directory
/// is refused: what is published is exactly what `verify` of the directory reads.
fn capsule_files(dir: &Path) -> Result<Vec<CapsuleFile>, OciError> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<CapsuleFile>) -> Result<(), OciError> {
        let path = root.join(rel);
        let io = |source| OciError::File {
            path: path.clone(),
            source,
        };
        let meta = std::fs::symlink_metadata(&path).map_err(io)?;
        if meta.is_file() {
            out.push(CapsuleFile {
                title: rel.to_string(),
                path: path.clone(),
            });
        } else if meta.is_dir() {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&path).map_err(io)? {
                let entry = entry.map_err(io)?;
                let name = entry
                    .file_name()
                    .into_string()
                    .map_err(|n| OciError::Malformed {
                        what: path.display().to_string(),
                        why: format!("file name {n:?} is not UTF-8"),
                    })?;
                names.push(name);
            }
            names.sort();
            for n in names {
                walk(root, &format!("{rel}/{n}"), out)?;
            }
        } else {
            return Err(OciError::Malformed {
                what: path.display().to_string(),
                why: "not a regular file or directory (symlinks are not published)".into(),
            });
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, verify_core::verify::JWS_FILE, &mut out)?;
    for sub in ["approvals", verify_core::verify::FILES_DIR] {
        if std::fs::symlink_metadata(dir.join(sub)).is_ok() {
            walk(dir, sub, &mut out)?;
        }
    }
    Ok(out)
}

/// The capsule id, version and tenant the JWS payload claims, for annotations only:
/// nothing reads annotations to decide (the agent verifies the JWS itself).
fn claimed_identity(jws: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let text = std::str::from_utf8(jws).unwrap_or("").trim();
    let payload = text.split('.').nth(1).unwrap_or("");
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return out;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return out;
    };
    if let Some(id) = v["capsule_id"].as_str() {
        out.insert(ANN_CAPSULE_ID.to_string(), id.to_string());
    }
    if let Some(version) = v["version"].as_u64() {
        out.insert(ANN_VERSION.to_string(), version.to_string());
    }
    if let Some(t) = v["tenant"].as_str() {
        out.insert(ANN_TENANT.to_string(), t.to_string());
    }
    out
}

/// What `publish` pushed.
#[derive(Debug, Clone)]
pub struct Published {
    pub digest: Sha256Digest,
    pub tag: String,
    pub layers: usize,
}

/// The default tag of a capsule: `<capsule_id>.<version>` as its JWS claims them.
pub fn default_tag(annotations: &BTreeMap<String, String>) -> Option<String> {
    let id = annotations.get(ANN_CAPSULE_ID)?;
    let v = annotations.get(ANN_VERSION)?;
    let tag: String = format!("{id}.{v}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    Some(tag)
}

/// Pushes every file of `capsule` as a layer, the empty config, and the manifest under
/// `tag` (default [`default_tag`]).
pub fn publish(
    registry: &Registry,
    repository: &str,
    tag: Option<&str>,
    capsule: &Path,
) -> Result<Published, OciError> {
    let files = capsule_files(capsule)?;
    let mut layers = Vec::with_capacity(files.len());
    let mut annotations = BTreeMap::new();
    for f in &files {
        let bytes = std::fs::read(&f.path).map_err(|source| OciError::File {
            path: f.path.clone(),
            source,
        })?;
        let is_jws = f.title.ends_with(".jws");
        if f.title == verify_core::verify::JWS_FILE {
            annotations = claimed_identity(&bytes);
        }
        let size = bytes.len() as u64;
        let digest = registry.push_blob(repository, Bytes::from(bytes))?;
        let media = if is_jws {
            JOSE_MEDIA_TYPE
        } else {
            OCTET_MEDIA_TYPE
        };
        let mut d = Descriptor::new(media, digest, size);
        d.annotations.insert(TITLE.to_string(), f.title.clone());
        layers.push(d);
    }
    registry.push_blob(repository, Bytes::from_static(EMPTY_CONFIG))?;
    let tag = match tag {
        Some(t) => t.to_string(),
        None => default_tag(&annotations).ok_or_else(|| OciError::Malformed {
            what: capsule.display().to_string(),
            why: "capsule.jws names no capsule_id and version for a default tag: give --tag".into(),
        })?,
    };
    let manifest = ImageManifest::artifact(CAPSULE_ARTIFACT_TYPE, layers, annotations);
    let n = manifest.layers.len();
    let bytes = serde_json::to_vec(&manifest).map_err(|e| OciError::Malformed {
        what: "manifest".into(),
        why: e.to_string(),
    })?;
    let pushed = registry.push_manifest(repository, &tag, MANIFEST_MEDIA_TYPE, bytes)?;
    Ok(Published {
        digest: pushed.digest,
        tag,
        layers: n,
    })
}

/// Pushes a signed tenant index (`index sign`'s JWS) as an artifact of one layer at
/// tag `index`, where the agent looks for it. Its bytes are not checked here: the
/// agent verifies them against its own policy, as `--index` does.
pub fn publish_index(
    registry: &Registry,
    repository: &str,
    index: &Path,
) -> Result<Published, OciError> {
    let bytes = std::fs::read(index).map_err(|source| OciError::File {
        path: index.to_path_buf(),
        source,
    })?;
    if bytes.len() > verify_core::index::MAX_INDEX_BYTES {
        return Err(OciError::Malformed {
            what: index.display().to_string(),
            why: format!(
                "larger than a tenant index may be ({} bytes)",
                verify_core::index::MAX_INDEX_BYTES
            ),
        });
    }
    let size = bytes.len() as u64;
    let digest = registry.push_blob(repository, Bytes::from(bytes))?;
    let mut layer = Descriptor::new(JOSE_MEDIA_TYPE, digest, size);
    layer
        .annotations
        .insert(TITLE.to_string(), INDEX_TITLE.to_string());
    registry.push_blob(repository, Bytes::from_static(EMPTY_CONFIG))?;
    let manifest = ImageManifest::artifact(INDEX_ARTIFACT_TYPE, vec![layer], BTreeMap::new());
    let bytes = serde_json::to_vec(&manifest).map_err(|e| OciError::Malformed {
        what: "manifest".into(),
        why: e.to_string(),
    })?;
    let pushed = registry.push_manifest(repository, INDEX_TAG, MANIFEST_MEDIA_TYPE, bytes)?;
    Ok(Published {
        digest: pushed.digest,
        tag: INDEX_TAG.to_string(),
        layers: 1,
    })
}

/// The tag a tenant index is published at and polled from.
pub const INDEX_TAG: &str = "index";
