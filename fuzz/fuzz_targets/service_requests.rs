//! What the service reads from a peer before verification: the request path of a
//! blob upload or run lookup, and the body of a blob upload in arbitrary chunks.
//! A blob path is accepted only in its one canonical spelling; an upload stores
//! exactly the bytes it was sent, and only when they hash to the digest in the
//! path; a refused upload leaves nothing, not even a temporary file.
#![no_main]

use std::sync::OnceLock;

use aws_lc_rs::digest;
use capsule_gateway::serve::blobs::{parse_blob_path, BlobStore, UploadError};
use libfuzzer_sys::fuzz_target;
use sandbox_launcher::RunId;
use verify_core::Sha256Digest;

/// Largest body an upload accepts in this target (bodies beyond it must be refused).
const LIMIT: u64 = 2048;

struct Store {
    dir: tempfile::TempDir,
    blobs: BlobStore,
}

fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        // fsync is the store's job; on tmpfs it costs nothing, so the fuzzer runs fast.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir");
        let blobs = BlobStore::open(dir.path()).expect("blob store");
        Store { dir, blobs }
    })
}

fn sha(bytes: &[u8]) -> Sha256Digest {
    let mut d = [0u8; 32];
    d.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    Sha256Digest(d)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(d) = parse_blob_path(text) {
            assert_eq!(format!("/v1/blobs/{d}"), text);
        }
        if let Some(id) = RunId::parse(text) {
            assert_eq!(id.as_str(), text);
        }
    }

    // Framing: byte 0 picks the claimed digest (even: the body's own), byte 1 the
    // chunk size; the rest is the body.
    let [mode, chunk, body @ ..] = data else {
        return;
    };
    let s = store();
    let claimed = if mode % 2 == 0 { sha(body) } else { sha(&[*mode, *chunk]) };
    let honest = claimed == sha(body);
    let mut upload = s.blobs.begin(claimed, LIMIT).expect("begin");
    let mut refused_size = false;
    for part in body.chunks(usize::from(*chunk).max(1)) {
        match upload.write(part) {
            Ok(()) => {}
            Err(UploadError::TooLarge { .. }) => {
                refused_size = true;
                break;
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    assert_eq!(refused_size, body.len() as u64 > LIMIT);
    let stored_path = s.dir.path().join("sha256").join(claimed.to_hex());
    if refused_size {
        drop(upload);
    } else {
        match upload.finish() {
            Ok(stored) => {
                assert!(honest, "stored bytes that do not hash to the claimed digest");
                assert_eq!(stored.size, body.len() as u64);
                assert_eq!(std::fs::read(&stored_path).expect("stored blob"), body);
            }
            Err(UploadError::DigestMismatch { got, .. }) => {
                assert!(!honest);
                assert_eq!(got, sha(body));
            }
            Err(e) => panic!("finish: {e}"),
        }
    }
    assert!(honest && !refused_size || !stored_path.exists());
    let _ = std::fs::remove_file(&stored_path);
    let leftovers = std::fs::read_dir(s.dir.path().join("tmp")).expect("tmp").count();
    assert_eq!(leftovers, 0, "a temporary file outlived its upload");
});
