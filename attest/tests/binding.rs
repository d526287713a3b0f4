//! The SVID-to-TPM binding, the CSR path (SVID key in the TPM) and mTLS with the
//! TPM-backed rustls key, against a real swtpm started per test.

// Helpers panic when a test fails, like the #[test] fns clippy.toml already covers.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use attest::binding::{verify_binding, Binding, Expectations};
use attest::csr::{tpm_csr, DevCa};
use attest::svid::{FileSource, IdentitySource, TrustBundles};
use attest::tls::{peer_id, server_config, Authorize, Bundles, SvidCertResolver, TpmSigningKey};
use attest::tpm::{PcrValues, Tcti, Tpm, TpmWorker, DEFAULT_IDENTITY_HANDLE};
use attest::{AttestError, BindingFailure};
use attest_testkit::{SvidSpec, Swtpm, TestCa};
use rustls::pki_types::{CertificateDer, ServerName};

const TD: &str = "acme.example";
const RUNNER: &str = "spiffe://acme.example/runner/r1";

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref());
    out
}

fn open(t: &Swtpm) -> Tpm {
    Tpm::open(&Tcti::parse(&t.tcti()).unwrap()).expect("open swtpm")
}

fn svid_source(ca: &TestCa, id: &str) -> (tempfile::TempDir, FileSource) {
    let dir = tempfile::tempdir().unwrap();
    ca.write_svid_dir(dir.path(), &ca.issue(&SvidSpec::id(id)));
    let source = FileSource::open(dir.path()).unwrap();
    (dir, source)
}

fn binding_failure(r: Result<attest::binding::VerifiedBinding, AttestError>) -> BindingFailure {
    match r {
        Err(AttestError::Binding(f)) => f,
        other => panic!("expected a binding failure, got {other:?}"),
    }
}

#[test]
fn binding_verifies_and_names_each_mismatch() {
    let sw = Swtpm::start().expect("swtpm");
    let mut tpm = open(&sw);
    let (key, _) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
    let ca = TestCa::new(TD);
    let (_d1, source) = svid_source(&ca, RUNNER);
    let svid = source.current().unwrap().svid.clone();
    let selection = "sha256:0,7,16".parse().unwrap();
    let binding = tpm.bind(&key, &svid, &selection).unwrap();
    // Through its file form.
    let binding = Binding::from_json(binding.to_json().as_bytes()).unwrap();
    let reference = tpm.pcr_read(&selection).unwrap();

    let all = Expectations {
        svid: Some(&svid),
        tpm_key: Some(&key.public),
        pcrs: Some(&reference),
        allow_software_tpm: true,
    };
    let ok = verify_binding(&binding, &all).unwrap();
    assert_eq!(ok.spiffe_id.as_str(), RUNNER);
    assert!(ok.tpm.software);
    assert!(!ok.svid_key_in_tpm, "a file SVID has a software key");

    // Made on a software TPM: refused unless allowed.
    let strict = Expectations {
        allow_software_tpm: false,
        ..all
    };
    assert!(matches!(
        binding_failure(verify_binding(&binding, &strict)),
        BindingFailure::SoftwareTpm(_)
    ));

    // Another SVID (same ID, another certificate).
    let (_d2, other) = svid_source(&ca, RUNNER);
    let other_svid = other.current().unwrap().svid.clone();
    let f = binding_failure(verify_binding(
        &binding,
        &Expectations {
            svid: Some(&other_svid),
            ..all
        },
    ));
    assert!(matches!(f, BindingFailure::AnotherSvid { .. }), "{f}");
    assert!(f.to_string().contains("another SVID"), "{f}");

    // Another TPM key.
    let sw2 = Swtpm::start().expect("swtpm");
    let mut tpm2 = open(&sw2);
    let (key2, _) = tpm2.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
    let f = binding_failure(verify_binding(
        &binding,
        &Expectations {
            tpm_key: Some(&key2.public),
            ..all
        },
    ));
    assert!(matches!(f, BindingFailure::AnotherTpmKey { .. }), "{f}");

    // Other PCRs: the platform has moved on since the statement.
    tpm.pcr_extend(16, &sha256(b"reconfigured")).unwrap();
    let now = tpm.pcr_read(&selection).unwrap();
    let f = binding_failure(verify_binding(
        &binding,
        &Expectations {
            pcrs: Some(&now),
            ..all
        },
    ));
    assert_eq!(f, BindingFailure::OtherPcrs(vec!["sha256:16".into()]));

    // A reference over another selection.
    let other_sel = PcrValues::new("sha256:0,7".parse().unwrap(), vec![vec![0; 32]; 2]).unwrap();
    assert!(matches!(
        binding_failure(verify_binding(
            &binding,
            &Expectations {
                pcrs: Some(&other_sel),
                ..all
            }
        )),
        BindingFailure::OtherPcrSelection { .. }
    ));
    assert_eq!(tpm.loaded_transient_objects().unwrap(), 0);
}

#[test]
fn an_edited_statement_or_a_borrowed_quote_is_refused() {
    let sw = Swtpm::start().expect("swtpm");
    let mut tpm = open(&sw);
    let (key, _) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
    let ca = TestCa::new(TD);
    let (_d, source) = svid_source(&ca, RUNNER);
    let svid = source.current().unwrap().svid.clone();
    let selection = "sha256:0,16".parse().unwrap();
    let binding = tpm.bind(&key, &svid, &selection).unwrap();
    let lax = Expectations {
        allow_software_tpm: true,
        ..Expectations::default()
    };

    // The statement edited to claim another SPIFFE ID: its hash is no longer the
    // quote's nonce.
    let edited = String::from_utf8(binding.statement().to_vec())
        .unwrap()
        .replace("runner/r1", "runner/r9");
    let forged = Binding::from_parts(edited.into_bytes(), binding.quote().clone());
    assert!(matches!(
        verify_binding(&forged, &lax),
        Err(AttestError::Quote(attest::QuoteFailure::NonceMismatch))
    ));

    // A quote of the same TPM over another statement (a replay) does not fit either.
    let (_d2, other) = svid_source(&ca, "spiffe://acme.example/runner/r2");
    let other_binding = tpm
        .bind(&key, &other.current().unwrap().svid, &selection)
        .unwrap();
    let mixed = Binding::from_parts(binding.statement().to_vec(), other_binding.quote().clone());
    assert!(matches!(
        verify_binding(&mixed, &lax),
        Err(AttestError::Quote(attest::QuoteFailure::NonceMismatch))
    ));
    assert!(verify_binding(&binding, &lax).is_ok());
}

#[test]
fn csr_path_svid_key_lives_in_the_tpm_and_serves_mtls() {
    let sw = Swtpm::start().expect("swtpm");
    let tcti = Tcti::parse(&sw.tcti()).unwrap();
    let mut tpm = Tpm::open(&tcti).unwrap();
    let (key, _) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
    let id = attest::spiffe::parse_id(RUNNER).unwrap();

    // CSR signed by the TPM key, issued by the development CA.
    let ca = DevCa::generate(TD).unwrap();
    let csr_pem = tpm_csr(&mut tpm, &key, &id).unwrap();
    let csr_der = <rustls::pki_types::CertificateSigningRequestDer<'static> as rustls::pki_types::pem::PemObject>::from_pem_slice(csr_pem.as_bytes()).unwrap();
    let cert = ca
        .issue(&csr_der, &id, std::time::Duration::from_secs(3600))
        .unwrap();
    // A CSR for one ID cannot be issued as another.
    let other = attest::spiffe::parse_id("spiffe://acme.example/runner/r2").unwrap();
    assert!(ca
        .issue(&csr_der, &other, std::time::Duration::from_secs(3600))
        .is_err());
    // A tampered CSR (signature no longer verifies) is refused.
    let mut bad = csr_der.as_ref().to_vec();
    let n = bad.len();
    bad[n - 3] ^= 1;
    assert!(ca
        .issue(&bad, &id, std::time::Duration::from_secs(3600))
        .is_err());

    // SVID files with no key file: the key is the TPM's.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("svid.pem"),
        attest::pem::encode("CERTIFICATE", &cert),
    )
    .unwrap();
    std::fs::write(dir.path().join("bundle.pem"), ca.cert_pem()).unwrap();
    let source: Arc<dyn IdentitySource> = Arc::new(FileSource::open(dir.path()).unwrap());
    let svid = source.current().unwrap().svid.clone();
    assert_eq!(svid.spki(), key.public.spki_der().as_slice());

    // The binding records that the SVID key is in the TPM, and the verifier agrees.
    let binding = tpm.bind(&key, &svid, &"sha256:0".parse().unwrap()).unwrap();
    let ok = verify_binding(
        &binding,
        &Expectations {
            svid: Some(&svid),
            tpm_key: Some(&key.public),
            allow_software_tpm: true,
            ..Expectations::default()
        },
    )
    .unwrap();
    assert!(ok.svid_key_in_tpm);
    drop(tpm);

    // mTLS: the client's handshake signature is made by the TPM.
    let worker = Arc::new(TpmWorker::spawn(&tcti).unwrap());
    let tpm_key = Arc::new(TpmSigningKey::new(worker.clone(), key.clone()));
    let client_resolver = Arc::new(SvidCertResolver::new(source, Some(tpm_key)).unwrap());
    let mut bundles = TrustBundles::new();
    bundles
        .insert(TD, vec![CertificateDer::from(ca.cert_der().to_vec())])
        .unwrap();
    let bundles = Bundles::Fixed(Arc::new(bundles));
    let client =
        attest::tls::client_config(client_resolver, bundles.clone(), Authorize::AnyInBundle)
            .unwrap();

    // The server: a software-key SVID from the same development CA.
    let server_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut req = rcgen::CertificateParams::default();
    req.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://acme.example/gateway"
            .to_string()
            .try_into()
            .unwrap(),
    )];
    let server_csr = req.serialize_request(&server_key).unwrap();
    let server_cert = ca
        .issue(
            server_csr.der(),
            &attest::spiffe::parse_id("spiffe://acme.example/gateway").unwrap(),
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let sdir = tempfile::tempdir().unwrap();
    std::fs::write(
        sdir.path().join("svid.pem"),
        attest::pem::encode("CERTIFICATE", &server_cert),
    )
    .unwrap();
    attest_testkit::certs::write_atomic(
        sdir.path(),
        "svid_key.pem",
        server_key.serialize_pem().as_bytes(),
        0o600,
    );
    std::fs::write(sdir.path().join("bundle.pem"), ca.cert_pem()).unwrap();
    let server_source: Arc<dyn IdentitySource> = Arc::new(FileSource::open(sdir.path()).unwrap());
    let server_resolver = Arc::new(SvidCertResolver::new(server_source, None).unwrap());
    let server = server_config(server_resolver, bundles, Authorize::AnyInBundle).unwrap();

    let mut c = rustls::ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("gateway.invalid").unwrap(),
    )
    .unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        s.read_tls(&mut buf.as_slice()).unwrap();
        s.process_new_packets().unwrap();
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        c.read_tls(&mut buf.as_slice()).unwrap();
        c.process_new_packets().unwrap();
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    assert!(!s.is_handshaking());
    assert_eq!(peer_id(&s).unwrap().as_str(), RUNNER);
    // The server saw the TPM key as the client's certificate key.
    let leaf = &s.peer_certificates().unwrap()[0];
    assert_eq!(leaf.as_ref(), cert.as_slice());
    let check = worker
        .call(|tpm| Ok((tpm.loaded_transient_objects()?, tpm.loaded_sessions()?)))
        .unwrap();
    assert_eq!(check, (0, 0));
}

#[test]
fn dev_ca_round_trips_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate(TD).unwrap();
    ca.save(dir.path()).unwrap();
    assert!(ca.save(dir.path()).is_err(), "never overwrites");
    let again = DevCa::load(dir.path()).unwrap();
    assert_eq!(again.trust_domain(), TD);
    assert_eq!(again.cert_der(), ca.cert_der());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("ca_key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn tpm_signatures_from_many_async_tasks_go_through_the_tpm_thread() {
    // rustls calls the signer synchronously; on a multi-thread runtime the wait runs in
    // block_in_place. Eight concurrent tasks, each signature checked with aws-lc-rs.
    let sw = Swtpm::start().expect("swtpm");
    let tcti = Tcti::parse(&sw.tcti()).unwrap();
    let (key, _) = Tpm::open(&tcti)
        .unwrap()
        .identity_key(DEFAULT_IDENTITY_HANDLE, true)
        .unwrap();
    let worker = Arc::new(TpmWorker::spawn(&tcti).unwrap());
    let signer = Arc::new(TpmSigningKey::new(worker.clone(), key.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let signer = signer.clone();
            tasks.push(tokio::spawn(async move {
                use rustls::sign::SigningKey as _;
                let s = signer
                    .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
                    .unwrap();
                let message = vec![i; 100];
                let sig = s.sign(&message).unwrap();
                (message, sig)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let spki = key.public.spki_der();
    for (message, der_sig) in results {
        let verifier = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &spki[spki.len() - 65..],
        );
        assert!(verifier.verify(&message, &der_sig).is_ok());
    }
    let leaks = worker.call(|tpm| tpm.loaded_transient_objects()).unwrap();
    assert_eq!(leaks, 0);
}
