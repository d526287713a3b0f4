//! Staging opens the capsule's files by the verifier's rules: a FIFO, a device or a
//! symlink swapped in after admission is refused before it is opened for reading.

mod common;

use capsule_tests::negative::{host_secret, mkfifo, mknod_dev_zero, BlockedWriter};
use capsule_tests::{Signer, World};
use sandbox_launcher::stage::stage;
use sandbox_launcher::LaunchError;

fn staging_refuses(w: &World, name: &str, swap: impl FnOnce(&std::path::Path)) -> LaunchError {
    let c = w.good_capsule(name, Signer::Es256);
    let admitted = common::admit(w, &c);
    let file = c.join("files/run.sh");
    std::fs::remove_file(&file).expect("rm");
    swap(&file);
    let dest = w.path(&format!("{name}-staged"));
    match stage(&admitted, &dest) {
        Err(e @ LaunchError::Stage { .. }) => e,
        other => panic!("{name}: staging must refuse, got {other:?}"),
    }
}

#[test]
fn a_fifo_swapped_in_after_admission_is_never_opened_by_staging() {
    let w = World::new();
    let c = w.good_capsule("stage-fifo", Signer::Es256);
    let admitted = common::admit(&w, &c);
    let fifo = c.join("files/run.sh");
    std::fs::remove_file(&fifo).expect("rm");
    mkfifo(&fifo);
    let writer = BlockedWriter::start(&fifo);
    let err = stage(&admitted, &w.path("stage-fifo-staged")).expect_err("a FIFO");
    assert!(matches!(err, LaunchError::Stage { .. }), "{err:?}");
    assert!(err.to_string().contains("FIFO"), "{err}");
    assert!(writer.is_blocked(), "staging opened the FIFO");
    writer.release(&fifo);
}

#[test]
fn a_device_or_a_symlink_swapped_in_after_admission_is_refused_by_staging() {
    let w = World::new();
    let err = staging_refuses(&w, "stage-device", mknod_dev_zero);
    assert!(err.to_string().contains("character device"), "{err}");
    let err = staging_refuses(&w, "stage-symlink", |p| {
        std::os::unix::fs::symlink(host_secret(&w), p).expect("symlink")
    });
    match err {
        LaunchError::Stage { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::ELOOP), "{source}")
        }
        other => panic!("{other:?}"),
    }
}
