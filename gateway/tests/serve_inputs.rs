//! Issue 10 through the service: lookalike approvers are malformed manifests, and a
//! FIFO, device or symlink in the blob store is refused without being opened for
//! reading (the same safe open as the CLI's `files/`).

mod common;

use capsule_gateway::serve::Server;
use capsule_tests::negative::{host_secret, mkfifo, mknod_dev_zero, BlockedWriter, Prior, CASES};
use capsule_tests::{read_jws, sha256_hex, Signer, RUNNER};
use common::{client_config, runtime, Client, Fixture, GATEWAY_ID};
use verify_core::Reason;

#[test]
fn lookalike_approvers_and_authors_are_malformed_manifests_through_the_service() {
    let f = Fixture::new();
    let w = &f.world;
    let cases: Vec<_> = CASES
        .iter()
        .filter(|c| c.name.starts_with("approver-") || c.name.starts_with("author-"))
        .map(|c| (c, (c.build)(w, c.name)))
        .collect();
    assert!(cases.len() >= 6, "every lookalike fixture");
    let server = Server::start(&f.config()).expect("the service starts");
    let client = f.client_svid_dir(RUNNER);
    runtime().block_on(async {
        let mut c = Client::connect(
            server.local_addr(),
            client_config(&client, GATEWAY_ID, false),
        )
        .await
        .expect("connect");
        c.upload_world_files().await;
        for (case, setup) in &cases {
            assert_eq!(setup.prior, Prior::Nothing);
            let r = c.admit(read_jws(&setup.capsule)).await.expect("admission");
            assert_eq!(r.status, 403, "{}: {r:?}", case.name);
            assert_eq!(
                r.json()["reason"],
                case.reason.as_str(),
                "{}: {}",
                case.name,
                r.json()
            );
        }
    });
    server.shutdown();
}

#[test]
fn a_fifo_device_or_symlink_in_the_blob_store_is_never_opened_by_the_service() {
    let f = Fixture::new();
    let w = &f.world;
    let good = read_jws(&w.good_capsule("blob-swap", Signer::Es256));
    let server = Server::start(&f.config()).expect("the service starts");
    let client = f.client_svid_dir(RUNNER);
    let blob = f
        .blob_dir()
        .join("sha256")
        .join(sha256_hex(capsule_tests::RUN_SH));
    runtime().block_on(async {
        let mut c = Client::connect(
            server.local_addr(),
            client_config(&client, GATEWAY_ID, false),
        )
        .await
        .expect("connect");
        c.upload_world_files().await;
        let r = c.admit(good.clone()).await.expect("admission");
        assert_eq!(r.status, 200, "{r:?}");

        // A FIFO at the blob's path, with a writer waiting for a reader.
        std::fs::remove_file(&blob).expect("rm blob");
        mkfifo(&blob);
        let writer = BlockedWriter::start(&blob);
        let r = c.admit(good.clone()).await.expect("admission");
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["reason"], Reason::ArtifactPathInvalid.as_str());
        assert!(writer.is_blocked(), "the service opened the FIFO");
        writer.release(&blob);

        // A device node, and a symlink to a host file.
        for device in [true, false] {
            std::fs::remove_file(&blob).expect("rm blob");
            if device {
                mknod_dev_zero(&blob);
            } else {
                std::os::unix::fs::symlink(host_secret(w), &blob).expect("symlink");
            }
            let r = c.admit(good.clone()).await.expect("admission");
            assert_eq!(r.status, 403, "{r:?}");
            assert_eq!(r.json()["reason"], Reason::ArtifactPathInvalid.as_str());
        }
    });
    server.shutdown();
}
