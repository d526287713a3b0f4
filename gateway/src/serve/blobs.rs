//! The content-addressed blob store behind `PUT /v1/blobs/sha256:<hex>`:
//! `BLOBS/sha256/<hex>`, the layout `verify_core::ArtifactSource::Blobs` reads.
//!
//! An upload streams into a temporary file under `BLOBS/tmp/` while it is hashed;
//! only when the whole body is in, within the size limit, and its sha256 is the one
//! named in the path is the file synced and renamed into place (then the directory
//! synced). Anything else deletes the temporary file: a wrong digest stores nothing,
//! and a crash leaves at most a temporary file, removed at the next start.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use verify_core::crypto::{default_backend, Sha256};
use verify_core::digest::{ArtifactSource, Root};
use verify_core::Sha256Digest;

/// Why an upload stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the body's digest is {got}, not {expected}")]
    DigestMismatch {
        expected: Sha256Digest,
        got: Sha256Digest,
    },
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    root: Arc<Root>,
}

/// `/v1/blobs/sha256:<64 lowercase hex>` → the digest. The path is the whole name:
/// nothing else (no `..`, no other algorithm, no upper case) is a blob.
pub fn parse_blob_path(path: &str) -> Option<Sha256Digest> {
    Sha256Digest::from_prefixed(path.strip_prefix("/v1/blobs/")?)
}

impl BlobStore {
    /// Opens (creating) `dir`, removes temporary files a crash left, and pins the
    /// `sha256/` root that admissions resolve artifacts from.
    pub fn open(dir: &Path) -> std::io::Result<BlobStore> {
        std::fs::create_dir_all(dir.join("sha256"))?;
        let tmp = dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let root = Arc::new(ArtifactSource::Blobs(dir.to_path_buf()).open()?);
        Ok(BlobStore {
            dir: dir.to_path_buf(),
            root,
        })
    }

    /// The pinned artifact root for `Capsule::with_root`.
    pub fn root(&self) -> Arc<Root> {
        self.root.clone()
    }

    pub fn source(&self) -> ArtifactSource {
        ArtifactSource::Blobs(self.dir.clone())
    }

    fn path_of(&self, digest: &Sha256Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.to_hex())
    }

    /// Whether a regular file is stored under `digest`. A symlink, FIFO or device
    /// planted there does not count (`lstat`, not followed), so an upload replaces it.
    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        std::fs::symlink_metadata(self.path_of(digest)).is_ok_and(|m| m.file_type().is_file())
    }

    /// Starts an upload of the blob `expected`, at most `limit` bytes.
    pub fn begin(&self, expected: Sha256Digest, limit: u64) -> std::io::Result<Upload> {
        let file = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))?;
        Ok(Upload {
            file,
            // The verifier's SHA-256 (its crypto provider): the digest that admissions
            // resolve the blob by is computed the one way the workspace computes it.
            hash: default_backend().sha256(),
            len: 0,
            limit,
            expected,
            dest: self.path_of(&expected),
            dest_dir: self.dir.join("sha256"),
        })
    }
}

/// One upload in progress. Dropping it without [`Upload::finish`] deletes the
/// temporary file.
pub struct Upload {
    file: tempfile::NamedTempFile,
    hash: Box<dyn Sha256>,
    len: u64,
    limit: u64,
    expected: Sha256Digest,
    dest: PathBuf,
    dest_dir: PathBuf,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("expected", &self.expected)
            .field("len", &self.len)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// Appends a chunk of the body (to the page cache: cheap enough for the async
    /// side; the sync happens in `finish`).
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        self.len = self.len.saturating_add(chunk.len() as u64);
        if self.len > self.limit {
            return Err(UploadError::TooLarge { limit: self.limit });
        }
        self.hash.update(chunk);
        self.file.as_file_mut().write_all(chunk)?;
        Ok(())
    }

    /// Checks the digest and, if it matches, makes the blob durable under its name.
    /// Blocking (two fsyncs): call it off the async workers.
    pub fn finish(self) -> Result<Stored, UploadError> {
        let got = Sha256Digest(self.hash.finish());
        if got != self.expected {
            return Err(UploadError::DigestMismatch {
                expected: self.expected,
                got,
            });
        }
        self.file.as_file().sync_all()?;
        self.file
            .persist(&self.dest)
            .map_err(|e| UploadError::Io(e.error))?;
        File::open(&self.dest_dir)?.sync_all()?;
        Ok(Stored {
            digest: got,
            size: self.len,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub digest: Sha256Digest,
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent SHA-256 (aws-lc-rs directly, not the provider under test).
    fn sha(bytes: &[u8]) -> Sha256Digest {
        use aws_lc_rs::digest;
        let mut d = [0u8; 32];
        d.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
        Sha256Digest(d)
    }

    #[test]
    fn stores_only_the_bytes_named_by_the_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let body = b"hello blob";
        let mut up = store.begin(sha(b"other bytes"), 1024).expect("begin");
        up.write(body).expect("write");
        assert!(matches!(
            up.finish(),
            Err(UploadError::DigestMismatch { .. })
        ));
        assert!(!store.contains(&sha(b"other bytes")));
        assert!(!store.contains(&sha(body)));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );

        let mut up = store.begin(sha(body), 1024).expect("begin");
        up.write(&body[..3]).expect("write");
        up.write(&body[3..]).expect("write");
        let stored = up.finish().expect("stored");
        assert_eq!(stored.size, body.len() as u64);
        let path = dir.path().join("sha256").join(sha(body).to_hex());
        assert_eq!(std::fs::read(path).expect("read"), body);
    }

    #[test]
    fn a_symlink_planted_at_a_blob_path_is_not_a_stored_blob_and_an_upload_replaces_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let body = b"the real blob";
        let host = dir.path().join("host-file");
        std::fs::write(&host, body).expect("host file");
        let path = dir.path().join("sha256").join(sha(body).to_hex());
        std::os::unix::fs::symlink(&host, &path).expect("symlink");
        assert!(
            !store.contains(&sha(body)),
            "a symlink is not a stored blob"
        );
        let mut up = store.begin(sha(body), 1024).expect("begin");
        up.write(body).expect("write");
        up.finish().expect("stored");
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        assert!(
            meta.file_type().is_file(),
            "the upload replaced the symlink"
        );
        assert!(store.contains(&sha(body)));
    }

    #[test]
    fn refuses_bodies_over_the_limit_and_keeps_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let mut up = store.begin(sha(b"0123456789"), 9).expect("begin");
        assert!(matches!(
            up.write(b"0123456789"),
            Err(UploadError::TooLarge { limit: 9 })
        ));
        drop(up);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );
    }

    #[test]
    fn blob_paths_are_exactly_sha256_and_lowercase_hex() {
        let hex = "ab".repeat(32);
        assert!(parse_blob_path(&format!("/v1/blobs/sha256:{hex}")).is_some());
        for bad in [
            format!("/v1/blobs/sha256:{}", hex.to_uppercase()),
            format!("/v1/blobs/sha512:{hex}"),
            format!("/v1/blobs/sha256:{hex}/x"),
            format!("/v1/blobs/sha256:{}", &hex[1..]),
            "/v1/blobs/sha256:../../etc/passwd".to_string(),
            "/v1/blobs/".to_string(),
        ] {
            assert!(parse_blob_path(&bad).is_none(), "{bad}");
        }
    }
}
