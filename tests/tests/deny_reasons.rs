//! Every named negative fixture through the library, with every crypto backend,
//! asserting the exact reason; and the matching positive cases.

use std::collections::HashSet;

use capsule_tests::negative::{
    host_secret, mkfifo, truncate_while, BlockedWriter, Prior, CASES, HOST_SECRET,
};
use capsule_tests::{Signer, World, RUNNER};
use verify_core::crypto::{all_backends, Backend};
use verify_core::{
    AdmittedVersion, Capsule, Decision, FixedClock, Governance, HashMode, NoHistory, Reason,
    RollbackView, SpiffeId, StateReadError, TenantIndex, Tier, Verifier,
};

/// What a state remembers after admitting one capsule (its tenant and id, version and
/// digest) and, with it, a tenant index version.
struct Remembered {
    tenant: String,
    capsule_id: String,
    admitted: AdmittedVersion,
    index_version: Option<u64>,
}
impl RollbackView for Remembered {
    fn latest(&self, tenant: &str, id: &str) -> Result<Option<AdmittedVersion>, StateReadError> {
        Ok((tenant == self.tenant && id == self.capsule_id).then_some(self.admitted))
    }
    fn highest_index_version(&self, tenant: &str) -> Result<Option<u64>, StateReadError> {
        Ok(self.index_version.filter(|_| tenant == self.tenant))
    }
}

impl Remembered {
    fn after(first: &Decision, index_version: Option<u64>) -> Remembered {
        Remembered {
            tenant: first.tenant.clone().expect("tenant"),
            capsule_id: first.capsule_id.clone().expect("capsule_id"),
            admitted: AdmittedVersion {
                version: first.version.expect("version"),
                digest: first.digest.expect("digest"),
            },
            index_version,
        }
    }
}

struct Broken;
impl RollbackView for Broken {
    fn latest(&self, _: &str, _: &str) -> Result<Option<AdmittedVersion>, StateReadError> {
        Err(StateReadError::new(std::io::Error::other(
            "state database is corrupt",
        )))
    }
}

/// A state that last trusted the time `.0` and has no versions.
struct LastKnown(u64);
impl RollbackView for LastKnown {
    fn latest(&self, _: &str, _: &str) -> Result<Option<AdmittedVersion>, StateReadError> {
        Ok(None)
    }
    fn last_known_time(&self) -> Result<Option<u64>, StateReadError> {
        Ok(Some(self.0))
    }
}

fn verify(
    w: &World,
    backend: &'static dyn Backend,
    capsule: &std::path::Path,
    runner: Option<&str>,
    view: &dyn RollbackView,
    mode: HashMode,
) -> Decision {
    verify_with(w, backend, capsule, runner, view, mode, Inputs::default())
}

/// The tiers of a host that runs gVisor: what `verify` and `admit` assume.
const HOST_TIERS: &[Tier] = &[Tier::Gvisor];

/// What a case verifies with besides the capsule: a tenant index (as `--index`
/// passes it) and a policy (`None`: the fixture policy).
#[derive(Default, Clone, Copy)]
struct Inputs<'a> {
    index: Option<&'a std::path::Path>,
    policy: Option<&'a std::path::Path>,
}

/// [`verify`] with [`Inputs`].
fn verify_with(
    w: &World,
    backend: &'static dyn Backend,
    capsule: &std::path::Path,
    runner: Option<&str>,
    view: &dyn RollbackView,
    mode: HashMode,
    inputs: Inputs<'_>,
) -> Decision {
    let Inputs { index, policy } = inputs;
    let policy = match policy {
        Some(p) => verify_core::Policy::load(p, backend).expect("policy"),
        None => w.policy_with(backend),
    };
    let runner = runner.map(|r| SpiffeId::parse(r).expect("runner id"));
    let clock = FixedClock(w.now);
    let indexes: Vec<TenantIndex> = index
        .map(|p| {
            TenantIndex::verify(&std::fs::read(p).expect("index"), &policy).expect("index verifies")
        })
        .into_iter()
        .collect();
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: view,
        runner: runner.as_ref(),
        hash_mode: mode,
        governance: Governance {
            indexes: &indexes,
            host_tiers: HOST_TIERS,
        },
    };
    let c = Capsule::from_dir(capsule, policy.limits.max_jws_bytes);
    v.admit_batch(std::slice::from_ref(&c)).remove(0)
}

#[test]
fn every_reason_has_a_named_fixture() {
    let covered: HashSet<Reason> = CASES.iter().map(|c| c.reason).collect();
    for r in Reason::ALL {
        assert!(covered.contains(&r), "no negative fixture for {r}");
    }
    let names: HashSet<&str> = CASES.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), CASES.len(), "fixture names are unique");
}

#[test]
fn good_capsules_are_admitted_with_every_backend() {
    let w = World::new();
    for backend in all_backends() {
        for (name, signer) in [("good-es", Signer::Es256), ("good-hs", Signer::Hs256)] {
            let dir = w.good_capsule(&format!("{name}-{}", backend.name()), signer);
            for mode in [HashMode::Auto, HashMode::Read, HashMode::Mmap] {
                let d = verify(&w, backend, &dir, Some(RUNNER), &NoHistory, mode);
                assert!(d.is_admit(), "{name} with {}: {d:?}", backend.name());
                assert_eq!(d.capsule_id.as_deref(), Some("auth-token-issuance"));
                assert_eq!(d.version, Some(7));
            }
        }
    }
}

#[test]
fn every_negative_fixture_is_denied_with_its_reason_by_every_backend() {
    let w = World::new();
    for backend in all_backends() {
        for case in CASES {
            let name = format!("{}-{}", case.name, backend.name());
            let setup = (case.build)(&w, &name);
            let runner = setup.runner;
            let reasons: Vec<Option<Reason>> = match &setup.prior {
                Prior::Nothing => vec![
                    verify_with(
                        &w,
                        backend,
                        &setup.capsule,
                        runner,
                        &NoHistory,
                        HashMode::Read,
                        Inputs {
                            index: setup.index.as_deref(),
                            policy: setup.policy.as_deref(),
                        },
                    )
                    .reason,
                ],
                Prior::Admitted(prior) => {
                    let prior_index = setup.prior_index.as_deref();
                    let first = verify_with(
                        &w,
                        backend,
                        prior,
                        runner,
                        &NoHistory,
                        HashMode::Read,
                        Inputs {
                            index: prior_index,
                            policy: setup.policy.as_deref(),
                        },
                    );
                    assert!(
                        first.is_admit(),
                        "{name}: prior capsule admitted: {first:?}"
                    );
                    let seen = prior_index.map(|p| {
                        let policy = w.governance_policy_with(backend);
                        let bytes = std::fs::read(p).expect("index");
                        TenantIndex::verify(&bytes, &policy).expect("index").version
                    });
                    let view = Remembered::after(&first, seen);
                    vec![
                        verify_with(
                            &w,
                            backend,
                            &setup.capsule,
                            runner,
                            &view,
                            HashMode::Read,
                            Inputs {
                                index: setup.index.as_deref(),
                                policy: setup.policy.as_deref(),
                            },
                        )
                        .reason,
                    ]
                }
                Prior::CorruptState => vec![
                    verify(&w, backend, &setup.capsule, runner, &Broken, HashMode::Read).reason,
                ],
                Prior::ClockAhead(ahead) => {
                    let view = LastKnown(w.now + ahead);
                    vec![verify(&w, backend, &setup.capsule, runner, &view, HashMode::Read).reason]
                }
                Prior::TruncatedWhileHashing(rel) => {
                    let file = setup.capsule.join(rel);
                    let mut all = Vec::new();
                    for mode in [HashMode::Auto, HashMode::Read, HashMode::Mmap] {
                        let seen = truncate_while(
                            &file,
                            || verify(&w, backend, &setup.capsule, runner, &NoHistory, mode),
                            |d| d.reason,
                        );
                        assert_eq!(
                            seen.last(),
                            Some(&Some(case.reason)),
                            "{name} {mode:?}: saw {seen:?}"
                        );
                        all.extend(seen);
                    }
                    all
                }
            };
            let last = *reasons.last().expect("at least one attempt");
            assert_eq!(
                last,
                Some(case.reason),
                "{name}: expected {}, got {last:?}",
                case.reason
            );
        }
    }
}

#[test]
fn a_batch_keeps_order_and_no_capsule_affects_another() {
    let w = World::new();
    let backend = verify_core::crypto::default_backend();
    // Every plain negative fixture, with good capsules interleaved.
    let mut dirs = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let setup = (case.build)(&w, &format!("batch-{}", case.name));
        if setup.prior == Prior::Nothing
            && setup.runner == Some(RUNNER)
            && setup.index.is_none()
            && setup.policy.is_none()
        {
            dirs.push((setup.capsule, Some(case.reason)));
            let signer = if i.is_multiple_of(2) {
                Signer::Es256
            } else {
                Signer::Hs256
            };
            dirs.push((w.good_capsule(&format!("batch-good-{i}"), signer), None));
        }
    }
    assert!(dirs.len() > 60, "a real batch: {}", dirs.len());
    let policy = w.policy_with(backend);
    let runner = SpiffeId::parse(RUNNER).expect("runner");
    let clock = FixedClock(w.now);
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: HashMode::Read,
        governance: Governance {
            host_tiers: HOST_TIERS,
            ..Default::default()
        },
    };
    let capsules: Vec<Capsule> = dirs
        .iter()
        .map(|(d, _)| Capsule::from_dir(d, policy.limits.max_jws_bytes))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .expect("pool");
    let batch = pool.install(|| v.admit_batch(&capsules));
    assert_eq!(batch.len(), capsules.len());
    for ((dir, expected), (capsule, got)) in dirs.iter().zip(capsules.iter().zip(&batch)) {
        assert_eq!(got.reason, *expected, "{}", dir.display());
        let alone = v.admit_batch(std::slice::from_ref(capsule)).remove(0);
        assert_eq!(
            &alone,
            got,
            "batch and single verdicts agree for {}",
            dir.display()
        );
    }
}

#[test]
fn a_pinned_root_is_the_directory_that_was_opened() {
    let w = World::new();
    let dir = w.good_capsule("pinned", Signer::Es256);
    let policy = w.policy();
    let runner = SpiffeId::parse(RUNNER).expect("runner");
    let clock = FixedClock(w.now);
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: HashMode::Read,
        governance: Default::default(),
    };
    let pinned = Capsule::from_dir(&dir, policy.limits.max_jws_bytes).pinned();
    // Swap the files directory after loading: the pinned capsule still sees the
    // directory it opened; an unpinned one resolves the path again and is denied.
    let files = dir.join("files");
    std::fs::rename(&files, dir.join("files.orig")).expect("rename");
    std::fs::create_dir(&files).expect("mkdir");
    assert!(v.verify(&pinned).is_ok());
    let unpinned = Capsule::from_dir(&dir, policy.limits.max_jws_bytes);
    let denied = v.verify(&unpinned).expect_err("files/ is empty now");
    assert_eq!(denied.reason, Some(Reason::ArtifactMissing));
}

fn verifier_parts(w: &World) -> (verify_core::Policy, SpiffeId, FixedClock) {
    (
        w.policy(),
        SpiffeId::parse(RUNNER).expect("runner"),
        FixedClock(w.now),
    )
}

#[test]
fn a_fifo_at_an_artifact_path_is_never_opened_for_reading() {
    let w = World::new();
    let dir = w.good_capsule("fifo-artifact", Signer::Es256);
    let fifo = dir.join("files/run.sh");
    std::fs::remove_file(&fifo).expect("rm");
    mkfifo(&fifo);
    let writer = BlockedWriter::start(&fifo);
    let (policy, runner, clock) = verifier_parts(&w);
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: HashMode::Read,
        governance: Default::default(),
    };
    for mode in [HashMode::Auto, HashMode::Read, HashMode::Mmap] {
        let v = Verifier {
            hash_mode: mode,
            ..v
        };
        let d = v
            .verify(&Capsule::from_dir(&dir, policy.limits.max_jws_bytes))
            .expect_err("a FIFO is not an artifact");
        assert_eq!(d.reason, Some(Reason::ArtifactPathInvalid), "{d:?}");
        assert!(d.detail.contains("FIFO"), "{}", d.detail);
        assert!(
            writer.is_blocked(),
            "the verifier opened the FIFO ({mode:?})"
        );
    }
    writer.release(&fifo);
}

#[test]
fn a_fifo_capsule_jws_is_never_opened_and_the_batch_still_answers_everyone() {
    let w = World::new();
    let bad = w.good_capsule("fifo-jws", Signer::Es256);
    let fifo = bad.join("capsule.jws");
    std::fs::remove_file(&fifo).expect("rm");
    mkfifo(&fifo);
    let writer = BlockedWriter::start(&fifo);
    let good = w.good_capsule("fifo-jws-neighbour", Signer::Hs256);
    let (policy, runner, clock) = verifier_parts(&w);
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: HashMode::Read,
        governance: Default::default(),
    };
    let capsules: Vec<Capsule> = [&good, &bad, &good]
        .iter()
        .map(|d| Capsule::from_dir(d, policy.limits.max_jws_bytes))
        .collect();
    let batch = v.admit_batch(&capsules);
    assert_eq!(batch.len(), 3);
    assert!(batch[0].is_admit() && batch[2].is_admit(), "{batch:?}");
    assert_eq!(batch[1].reason, Some(Reason::CapsuleUnreadable));
    assert_eq!(batch[1].digest, None, "nothing was read, nothing is hashed");
    assert!(batch[1].detail.contains("capsule.jws") && batch[1].detail.contains("FIFO"));
    assert!(writer.is_blocked(), "the verifier opened the FIFO");
    writer.release(&fifo);
}

#[test]
fn capsule_jws_symlink_to_a_host_file_is_refused_unread() {
    let w = World::new();
    for case in CASES
        .iter()
        .filter(|c| c.reason == Reason::CapsuleUnreadable)
    {
        let setup = (case.build)(&w, case.name);
        let d = verify(
            &w,
            verify_core::crypto::default_backend(),
            &setup.capsule,
            setup.runner,
            &NoHistory,
            HashMode::Read,
        );
        assert_eq!(
            d.reason,
            Some(Reason::CapsuleUnreadable),
            "{}: {d:?}",
            case.name
        );
        // Nothing was read: no digest, no facts of a manifest.
        assert_eq!(d.digest, None, "{}", case.name);
        assert_eq!(d.capsule_id, None, "{}", case.name);
        assert!(
            d.detail.contains(setup.capsule.to_str().expect("utf-8")),
            "{}: the detail names the file: {}",
            case.name,
            d.detail
        );
    }
}

#[test]
fn no_decision_carries_a_host_file_or_its_sha256() {
    let w = World::new();
    let digest = capsule_tests::sha256_hex(HOST_SECRET);
    for case in CASES {
        let setup = (case.build)(&w, &format!("leak-{}", case.name));
        if setup.prior != Prior::Nothing {
            continue;
        }
        let d = verify(
            &w,
            verify_core::crypto::default_backend(),
            &setup.capsule,
            setup.runner,
            &NoHistory,
            HashMode::Read,
        );
        let shown = format!("{d:?}");
        assert!(!shown.contains(&digest), "{}: {shown}", case.name);
        assert!(!shown.contains("host-secret"), "{}: {shown}", case.name);
    }
}

#[test]
fn a_hard_linked_artifact_does_not_report_its_size_or_sha256() {
    let w = World::new();
    let dir = w.good_capsule("hard-linked-artifact", Signer::Es256);
    let (policy, runner, clock) = verifier_parts(&w);
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: HashMode::Read,
        governance: Default::default(),
    };
    let run_sh = dir.join("files/run.sh");
    // Same size as run.sh, other bytes: a digest mismatch.
    let host = w.write(
        "host/same-size",
        &vec![b'x'; std::fs::read(&run_sh).expect("read").len()],
    );
    std::fs::remove_file(&run_sh).expect("rm");
    std::fs::hard_link(&host, &run_sh).expect("hard link");
    let d = v
        .verify(&Capsule::from_dir(&dir, policy.limits.max_jws_bytes))
        .expect_err("other bytes");
    assert_eq!(d.reason, Some(Reason::DigestMismatch));
    let host_digest = capsule_tests::sha256_hex(&std::fs::read(&host).expect("read"));
    assert!(!d.detail.contains(&host_digest), "{}", d.detail);
    // Another size: the size on disk is not reported either.
    std::fs::remove_file(&run_sh).expect("rm");
    std::fs::hard_link(host_secret(&w), &run_sh).expect("hard link");
    let d = v
        .verify(&Capsule::from_dir(&dir, policy.limits.max_jws_bytes))
        .expect_err("other size");
    assert_eq!(d.reason, Some(Reason::ArtifactSizeMismatch));
    assert!(
        !d.detail.contains(&HOST_SECRET.len().to_string()),
        "{}",
        d.detail
    );
}

#[test]
fn without_a_runner_identity_the_tenants_runners_still_apply() {
    let w = World::new();
    let (policy, _, clock) = verifier_parts(&w);
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: &NoHistory,
        runner: None,
        hash_mode: HashMode::Read,
        governance: Default::default(),
    };
    for (name, edit) in [
        (
            "runners-empty",
            (|m: &mut serde_json::Value| m["runners"] = serde_json::json!([]))
                as fn(&mut serde_json::Value),
        ),
        ("runners-missing", |m| {
            m.as_object_mut().expect("object").remove("runners");
        }),
    ] {
        let mut m = w.manifest();
        edit(&mut m);
        let dir = w.capsule(name, &m, Signer::Es256);
        let d = v
            .verify(&Capsule::from_dir(&dir, policy.limits.max_jws_bytes))
            .expect_err("the tenant restricts runners");
        assert_eq!(d.reason, Some(Reason::RunnerNotAllowed), "{name}: {d:?}");
    }
    // A tenant without `runners` does not restrict them: the same capsule is admitted.
    let open = w.write(
        "open-policy.toml",
        w.policy_toml()
            .replace("runners = [\"spiffe://acme.example/runner/*\"]\n", "")
            .as_bytes(),
    );
    let open =
        verify_core::Policy::load(&open, verify_core::crypto::default_backend()).expect("policy");
    let v = Verifier { policy: &open, ..v };
    let mut m = w.manifest();
    m["runners"] = serde_json::json!([]);
    let dir = w.capsule("runners-empty-open-tenant", &m, Signer::Es256);
    assert!(v
        .verify(&Capsule::from_dir(&dir, open.limits.max_jws_bytes))
        .is_ok());
}

#[test]
fn a_directory_where_the_jws_or_an_artifact_is_expected_is_refused_by_its_type() {
    let w = World::new();
    let (policy, runner, clock) = verifier_parts(&w);
    let v = Verifier {
        policy: &policy,
        clock: &clock,
        rollback: &NoHistory,
        runner: Some(&runner),
        hash_mode: HashMode::Auto,
        governance: Default::default(),
    };
    let jws_dir = w.good_capsule("jws-is-a-dir", Signer::Es256);
    std::fs::remove_file(jws_dir.join("capsule.jws")).expect("rm");
    std::fs::create_dir(jws_dir.join("capsule.jws")).expect("mkdir");
    let artifact_dir = w.good_capsule("artifact-is-a-dir", Signer::Es256);
    std::fs::remove_file(artifact_dir.join("files/run.sh")).expect("rm");
    std::fs::create_dir(artifact_dir.join("files/run.sh")).expect("mkdir");
    for (dir, reason) in [
        (&jws_dir, Reason::CapsuleUnreadable),
        (&artifact_dir, Reason::ArtifactPathInvalid),
    ] {
        for capsule in [
            Capsule::from_dir(dir, policy.limits.max_jws_bytes),
            Capsule::from_dir(dir, policy.limits.max_jws_bytes).pinned(),
        ] {
            let d = v.verify(&capsule).expect_err("a directory is not a file");
            assert_eq!(d.reason, Some(reason), "{d:?}");
            assert!(d.detail.contains("is a directory"), "{}", d.detail);
        }
    }
}
