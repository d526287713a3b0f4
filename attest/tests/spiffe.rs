//! SPIFFE: peer verification (library and real rustls handshakes in memory), SVIDs and
//! bundles from files (with rotation) and from the Workload API.
//!
//! No SPIRE agent is installable here (no Debian package, no internet beyond the package
//! registries): the Workload API tests talk to an in-test tonic server generated from
//! SPIFFE's workload.proto (attest-testkit), which streams rotations as an agent does.
//! All certificates are made with rcgen.

// Helpers panic when a test fails, like the #[test] fns clippy.toml already covers.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use attest::svid::{FileSource, IdentitySource, TrustBundles, WorkloadApiSource};
use attest::tls::{
    client_config, peer_id, server_config, verify_peer_chain, Authorize, Bundles,
    SpiffeClientVerifier, SpiffeServerVerifier, SvidCertResolver,
};
use attest::AttestError;
use attest_testkit::{IssuedSvid, SvidSpec, TestCa, WorkloadApiServer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConnection, ServerConnection};

const TD: &str = "acme.example";
const RUNNER: &str = "spiffe://acme.example/runner/r1";
const GATEWAY: &str = "spiffe://acme.example/gateway";

fn der_chain(svid: &IssuedSvid) -> Vec<CertificateDer<'static>> {
    svid.chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect()
}

fn bundles_of(cas: &[&TestCa]) -> TrustBundles {
    let mut b = TrustBundles::new();
    for ca in cas {
        b.insert(&ca.trust_domain, vec![CertificateDer::from(ca.cert_der())])
            .unwrap();
    }
    b
}

fn now() -> UnixTime {
    UnixTime::now()
}

fn refused(bundles: &TrustBundles, chain: &[CertificateDer<'_>]) -> String {
    match verify_peer_chain(bundles, &Authorize::AnyInBundle, chain, now(), true) {
        Err(AttestError::Peer(m)) => m,
        other => panic!("expected the peer to be refused, got {other:?}"),
    }
}

#[test]
fn a_valid_peer_is_accepted_and_its_id_handed_over() {
    let ca = TestCa::new(TD);
    let svid = ca.issue(&SvidSpec::id(RUNNER));
    let id = verify_peer_chain(
        &bundles_of(&[&ca]),
        &Authorize::AnyInBundle,
        &der_chain(&svid),
        now(),
        true,
    )
    .unwrap();
    assert_eq!(id.as_str(), RUNNER);
}

#[test]
fn a_peer_with_two_uri_sans_is_refused() {
    let ca = TestCa::new(TD);
    let mut spec = SvidSpec::id(RUNNER);
    spec.uris.push("spiffe://acme.example/runner/r2".into());
    let m = refused(&bundles_of(&[&ca]), &der_chain(&ca.issue(&spec)));
    assert!(m.contains("2 URI SANs"), "{m}");
}

#[test]
fn a_peer_with_a_non_spiffe_or_malformed_uri_is_refused() {
    let ca = TestCa::new(TD);
    let b = bundles_of(&[&ca]);
    for (uri, why) in [
        (
            "https://acme.example/runner",
            "does not start with spiffe://",
        ),
        ("spiffe://Acme.example/runner", "trust domain"),
        ("spiffe://acme.example/a//b", "path segments"),
        ("spiffe://acme.example", "names a trust domain"),
    ] {
        let m = refused(&b, &der_chain(&ca.issue(&SvidSpec::id(uri))));
        assert!(m.contains(why), "{uri}: {m}");
    }
    let mut spec = SvidSpec::id(RUNNER);
    spec.uris.clear();
    let m = refused(&b, &der_chain(&ca.issue(&spec)));
    assert!(m.contains("URI SAN"), "{m}");
}

#[test]
fn a_peer_from_another_trust_domain_is_refused() {
    let acme = TestCa::new(TD);
    let evil = TestCa::new("evil.example");
    let only_acme = bundles_of(&[&acme]);
    // Another domain's CA, another domain's ID: that domain is not in the bundle.
    let m = refused(
        &only_acme,
        &der_chain(&evil.issue(&SvidSpec::id("spiffe://evil.example/runner/r1"))),
    );
    assert!(
        m.contains("trust domain `evil.example` is not in the trust bundle"),
        "{m}"
    );
    // Another domain's CA claiming an acme ID: no chain to acme's CAs.
    let m = refused(&only_acme, &der_chain(&evil.issue(&SvidSpec::id(RUNNER))));
    assert!(
        m.contains("no valid chain to the `acme.example` bundle"),
        "{m}"
    );
    // Both domains trusted, but evil's CA vouches for an acme ID: still refused, the
    // chain must reach the CAs of the ID's own trust domain.
    let both = bundles_of(&[&acme, &evil]);
    let m = refused(&both, &der_chain(&evil.issue(&SvidSpec::id(RUNNER))));
    assert!(
        m.contains("no valid chain to the `acme.example` bundle"),
        "{m}"
    );
}

#[test]
fn an_expired_peer_svid_is_refused() {
    let ca = TestCa::new(TD);
    let m = refused(
        &bundles_of(&[&ca]),
        &der_chain(&ca.issue(&SvidSpec::id(RUNNER).expired())),
    );
    assert!(m.to_lowercase().contains("expired"), "{m}");
}

#[test]
fn a_leaf_with_the_ca_flag_is_refused() {
    let ca = TestCa::new(TD);
    let mut spec = SvidSpec::id(RUNNER);
    spec.is_ca = true;
    let m = refused(&bundles_of(&[&ca]), &der_chain(&ca.issue(&spec)));
    assert!(m.contains("no valid chain"), "{m}");
}

#[test]
fn authorization_patterns_apply_after_authentication() {
    let ca = TestCa::new(TD);
    let b = bundles_of(&[&ca]);
    let only_runners = Authorize::Matching(vec![attest::spiffe::RunnerPattern::parse(
        "spiffe://acme.example/runner/*",
    )
    .unwrap()]);
    let ok = der_chain(&ca.issue(&SvidSpec::id(RUNNER)));
    assert!(verify_peer_chain(&b, &only_runners, &ok, now(), true).is_ok());
    let other = der_chain(&ca.issue(&SvidSpec::id("spiffe://acme.example/batch/b1")));
    let err = verify_peer_chain(&b, &only_runners, &other, now(), true).unwrap_err();
    assert!(err.to_string().contains("not authorized"), "{err}");
}

// --- Real TLS 1.3 handshakes (rustls, in memory) -----------------------------------

/// Drives both sides until done; returns the first error either side reports.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
    let mut c = ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("gateway.invalid").unwrap(),
    )?;
    let mut s = ServerConnection::new(Arc::new(server))?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            return Ok((c, s));
        }
    }
    panic!("handshake did not finish");
}

fn server_side(ca: &TestCa, bundles: TrustBundles) -> rustls::ServerConfig {
    let dir = tempfile::tempdir().unwrap();
    ca.write_svid_dir(dir.path(), &ca.issue(&SvidSpec::id(GATEWAY)));
    let source: Arc<dyn IdentitySource> = Arc::new(FileSource::open(dir.path()).unwrap());
    let resolver = Arc::new(SvidCertResolver::new(source, None).unwrap());
    server_config(
        resolver,
        Bundles::Fixed(Arc::new(bundles)),
        Authorize::AnyInBundle,
    )
    .unwrap()
}

/// A client presenting exactly `svid` (checked by nothing on this side).
fn client_presenting(svid: &IssuedSvid, bundles: TrustBundles) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
        Bundles::Fixed(Arc::new(bundles)),
        Authorize::Matching(vec![attest::spiffe::RunnerPattern::parse(GATEWAY).unwrap()]),
    )))
    .with_client_auth_cert(
        der_chain(svid),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.clone())),
    )
    .unwrap()
}

#[test]
fn mtls_handshake_authenticates_both_sides_by_spiffe_id() {
    let ca = TestCa::new(TD);
    let server = server_side(&ca, bundles_of(&[&ca]));
    let client = client_presenting(&ca.issue(&SvidSpec::id(RUNNER)), bundles_of(&[&ca]));
    let (c, s) = handshake(client, server).expect("handshake");
    assert_eq!(peer_id(&s).unwrap().as_str(), RUNNER);
    assert_eq!(peer_id(&c).unwrap().as_str(), GATEWAY);
    assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
}

fn server_refusal(err: rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(e) => format!("{e:?}"),
        other => panic!("expected a certificate refusal, got {other:?}"),
    }
}

#[test]
fn mtls_refuses_a_client_with_two_uri_sans() {
    let ca = TestCa::new(TD);
    let mut spec = SvidSpec::id(RUNNER);
    spec.uris.push("spiffe://acme.example/runner/r2".into());
    let err = handshake(
        client_presenting(&ca.issue(&spec), bundles_of(&[&ca])),
        server_side(&ca, bundles_of(&[&ca])),
    )
    .unwrap_err();
    assert!(server_refusal(err).contains("2 URI SANs"));
}

#[test]
fn mtls_refuses_a_client_from_another_trust_domain() {
    let ca = TestCa::new(TD);
    let evil = TestCa::new("evil.example");
    let err = handshake(
        client_presenting(
            &evil.issue(&SvidSpec::id("spiffe://evil.example/runner/r1")),
            bundles_of(&[&ca]),
        ),
        server_side(&ca, bundles_of(&[&ca])),
    )
    .unwrap_err();
    assert!(server_refusal(err).contains("evil.example"));
}

#[test]
fn mtls_refuses_an_expired_client_svid() {
    let ca = TestCa::new(TD);
    let err = handshake(
        client_presenting(
            &ca.issue(&SvidSpec::id(RUNNER).expired()),
            bundles_of(&[&ca]),
        ),
        server_side(&ca, bundles_of(&[&ca])),
    )
    .unwrap_err();
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
    );
}

#[test]
fn client_refuses_a_server_outside_its_authorization() {
    let ca = TestCa::new(TD);
    // The server presents spiffe://acme.example/gateway; this client only talks to
    // spiffe://acme.example/other.
    let dir = tempfile::tempdir().unwrap();
    ca.write_svid_dir(dir.path(), &ca.issue(&SvidSpec::id(RUNNER)));
    let source: Arc<dyn IdentitySource> = Arc::new(FileSource::open(dir.path()).unwrap());
    let resolver = Arc::new(SvidCertResolver::new(source, None).unwrap());
    let client = client_config(
        resolver,
        Bundles::Fixed(Arc::new(bundles_of(&[&ca]))),
        Authorize::Matching(vec![attest::spiffe::RunnerPattern::parse(
            "spiffe://acme.example/other",
        )
        .unwrap()]),
    )
    .unwrap();
    let err = handshake(client, server_side(&ca, bundles_of(&[&ca]))).unwrap_err();
    assert!(server_refusal(err).contains("not authorized"));
    // The verifier type itself is usable directly too.
    let _ = SpiffeClientVerifier::new(
        Bundles::Fixed(Arc::new(bundles_of(&[&ca]))),
        Authorize::AnyInBundle,
    );
}

// --- SVIDs from files -----------------------------------------------------------------

#[test]
fn file_svid_rotation_is_picked_up_without_restart() {
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    ca.write_svid_dir(dir.path(), &ca.issue(&SvidSpec::id(RUNNER)));
    let source = FileSource::open(dir.path()).unwrap();
    let first = source.current().unwrap();
    assert_eq!(first.svid.id().as_str(), RUNNER);
    // Unchanged files: the same material, no reload.
    assert!(Arc::ptr_eq(&first, &source.current().unwrap()));

    let next = ca.issue(&SvidSpec::id("spiffe://acme.example/runner/r1-rotated"));
    ca.write_svid_dir(dir.path(), &next);
    let second = source.current().unwrap();
    assert_eq!(
        second.svid.id().as_str(),
        "spiffe://acme.example/runner/r1-rotated"
    );
    assert!(second.generation > first.generation);
    assert_ne!(second.svid.leaf_sha256(), first.svid.leaf_sha256());
}

#[test]
fn an_expired_svid_on_disk_is_refused() {
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    ca.write_svid_dir(dir.path(), &ca.issue(&SvidSpec::id(RUNNER).expired()));
    let err = FileSource::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

#[test]
fn a_key_that_is_not_the_leafs_is_refused() {
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let a = ca.issue(&SvidSpec::id(RUNNER));
    let b = ca.issue(&SvidSpec::id(RUNNER));
    let mixed = IssuedSvid {
        key_pem: b.key_pem.clone(),
        key_pkcs8: b.key_pkcs8.clone(),
        ..a
    };
    ca.write_svid_dir(dir.path(), &mixed);
    let err = FileSource::open(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("does not belong to the leaf"),
        "{err}"
    );
}

#[test]
fn a_world_readable_key_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    ca.write_svid_dir(dir.path(), &ca.issue(&SvidSpec::id(RUNNER)));
    std::fs::set_permissions(
        dir.path().join("svid_key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = FileSource::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

/// The trust bundle decides whom the gateway trusts: a `bundle.pem` (or SVID) that
/// others can write, or one in a directory others can write, is refused like the
/// policy (verify-core's `trust_file`).
#[test]
fn a_world_writable_trust_bundle_or_svid_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &std::path::Path, m| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let ca = TestCa::new(TD);
    for (file, mode) in [
        ("bundle.pem", 0o666),
        ("bundle.pem", 0o664),
        ("svid.pem", 0o646),
    ] {
        let dir = tempfile::tempdir().unwrap();
        ca.write_svid_dir(dir.path(), &ca.issue(&SvidSpec::id(RUNNER)));
        FileSource::open(dir.path()).expect("the untouched directory loads");
        chmod(&dir.path().join(file), mode);
        let err = FileSource::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(file) && err.contains("chmod go-w"),
            "{file} {mode:o}: {err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let svid = dir.path().join("svid");
    ca.write_svid_dir(&svid, &ca.issue(&SvidSpec::id(RUNNER)));
    chmod(&svid, 0o777);
    let err = FileSource::open(&svid).unwrap_err().to_string();
    assert!(err.contains("its directory"), "{err}");
}

#[test]
fn an_svid_from_another_ca_than_the_bundle_is_refused() {
    let ca = TestCa::new(TD);
    let other = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    ca.write_svid_dir(dir.path(), &ca.issue(&SvidSpec::id(RUNNER)));
    attest_testkit::certs::write_atomic(
        dir.path(),
        "bundle.pem",
        other.cert_pem().as_bytes(),
        0o644,
    );
    let err = FileSource::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");
}

// --- SVIDs from the Workload API ---------------------------------------------------------

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workload_api_svid_and_rotation() {
    let ca = TestCa::new(TD);
    let first = ca.issue(&SvidSpec::id(RUNNER));
    let server = WorkloadApiServer::start(ca.material(&first, RUNNER)).unwrap();
    let source = WorkloadApiSource::connect(&server.endpoint(), Duration::from_secs(10)).unwrap();
    let m = source.current().unwrap();
    assert_eq!(m.svid.id().as_str(), RUNNER);
    assert_eq!(m.svid.chain()[0].as_ref(), first.chain[0].as_slice());
    assert!(m.bundles.roots(TD).is_some());

    // The agent rotates: the stream delivers it and the source follows.
    let rotated = ca.issue(&SvidSpec::id("spiffe://acme.example/runner/r1-next"));
    server.rotate(ca.material(&rotated, "spiffe://acme.example/runner/r1-next"));
    let m2 = wait_for("the rotated SVID", || {
        let m = source.current().unwrap();
        (m.svid.id().as_str() == "spiffe://acme.example/runner/r1-next").then_some(m)
    });
    assert!(m2.generation > m.generation);
}

#[test]
fn workload_api_serving_an_expired_svid_is_refused() {
    let ca = TestCa::new(TD);
    let expired = ca.issue(&SvidSpec::id(RUNNER).expired());
    let server = WorkloadApiServer::start(ca.material(&expired, RUNNER)).unwrap();
    let err = WorkloadApiSource::connect(&server.endpoint(), Duration::from_secs(2)).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
}

#[test]
fn workload_api_unreachable_is_an_error_naming_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}/nothing.sock", dir.path().display());
    let err = WorkloadApiSource::connect(&endpoint, Duration::from_millis(500)).unwrap_err();
    assert!(err.to_string().contains("nothing.sock"), "{err}");
}

#[test]
fn the_test_server_requires_the_workload_header_like_spire() {
    let ca = TestCa::new(TD);
    let svid = ca.issue(&SvidSpec::id(RUNNER));
    let server = WorkloadApiServer::start(ca.material(&svid, RUNNER)).unwrap();
    assert_eq!(
        server.fetch_without_header(),
        Some(tonic::Code::InvalidArgument)
    );
}
