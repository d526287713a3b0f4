//! Times each TPM operation against a real swtpm that this program starts (and stops):
//! the gateway's start-up unseal, a quote, a signature, and full TLS 1.3 mTLS handshakes
//! whose client key is the TPM identity key (with a software key and with session
//! resumption for comparison).
//!
//!     cargo run --release -p attest --example tpm_timings [ROUNDS]
//!
//! swtpm runs on this machine over TCP on 127.0.0.1, so the numbers are the TPM's work
//! plus a local round trip per command; a hardware TPM on the LPC/SPI bus is slower
//! (tens of milliseconds for a signature is common).

use std::sync::Arc;
use std::time::{Duration, Instant};

use attest::binding::{verify_binding, Expectations};
use attest::csr::{tpm_csr, DevCa};
use attest::svid::{FileSource, IdentitySource, TrustBundles};
use attest::tls::{
    client_config, server_config, Authorize, Bundles, SvidCertResolver, TpmSigningKey,
};
use attest::tpm::{verify_quote, SealedKey, Tcti, Tpm, TpmWorker, DEFAULT_IDENTITY_HANDLE};
use rustls::pki_types::{CertificateDer, ServerName};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // Nearest-rank quantile in integers: index = round((n - 1) * q_percent / 100).
    let pick = |q_percent: usize| samples[((samples.len() - 1) * q_percent + 50) / 100];
    println!(
        "{name:<48} n={:<5} median {:>8.3} ms   p90 {:>8.3} ms   min {:>8.3} ms",
        samples.len(),
        ms(pick(50)),
        ms(pick(90)),
        ms(samples[0])
    );
}

fn time<T>(rounds: usize, mut f: impl FnMut() -> Res<T>) -> Res<Vec<Duration>> {
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        std::hint::black_box(f()?);
        out.push(start.elapsed());
    }
    Ok(out)
}

fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) -> Res<bool> {
    let mut c =
        rustls::ClientConnection::new(client.clone(), ServerName::try_from("gateway.invalid")?)?;
    let mut s = rustls::ServerConnection::new(server.clone())?;
    loop {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf)?;
        }
        s.read_tls(&mut buf.as_slice())?;
        s.process_new_packets()?;
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf)?;
        }
        c.read_tls(&mut buf.as_slice())?;
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() && !c.wants_write() {
            return Ok(matches!(
                s.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed)
            ));
        }
    }
}

fn main() -> Res<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let sw = attest_testkit::Swtpm::start()?;
    let tcti = Tcti::parse(&sw.tcti())?;
    let dir = tempfile::tempdir()?;

    let mut tpm = Tpm::open(&tcti)?;
    println!("TPM: {} via {}", tpm.info().describe(), tcti);
    let started = Instant::now();
    let (key, _) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true)?;
    println!(
        "identity key created and persisted once: {:.1} ms\n",
        started.elapsed().as_secs_f64() * 1e3
    );

    // Sealed key as the gateway has it on disk.
    let sealed_path = dir.path().join("k.sealed.json");
    let sealed = tpm.seal_hs256("k-hs", &[0x42; 32], &"sha256:0,7".parse()?)?;
    std::fs::write(&sealed_path, sealed.to_json())?;

    stats(
        "start-up unseal (open TPM, read file, unseal)",
        time(rounds / 4, || {
            let mut t = Tpm::open(&tcti)?;
            let s = SealedKey::load(&sealed_path)?;
            Ok(t.unseal(&s, &sealed_path)?.secret().len())
        })?,
    );
    stats(
        "  of which TPM open (TCTI connect, GetCapability)",
        time(rounds / 4, || Ok(Tpm::open(&tcti)?.info().software))?,
    );
    stats(
        "unseal on an open TPM",
        time(rounds / 4, || {
            Ok(tpm.unseal(&sealed, &sealed_path)?.secret().len())
        })?,
    );

    let selection = "sha256:0,7".parse()?;
    let nonce = [7u8; 32];
    stats(
        "quote sha256:0,7 (PCR_Read + Quote)",
        time(rounds, || Ok(tpm.quote(&key, &selection, &nonce)?))?,
    );
    let quote = tpm.quote(&key, &selection, &nonce)?;
    stats(
        "verify quote (software, aws-lc-rs)",
        time(rounds * 5, || {
            Ok(verify_quote(
                &quote,
                &key.public,
                &nonce,
                Some(&quote.pcrs),
            )?)
        })?,
    );
    let message = [0x20u8; 130]; // the size of a TLS 1.3 CertificateVerify input
    stats(
        "sign 130 bytes (TPM2_Hash + TPM2_Sign)",
        time(rounds, || Ok(tpm.sign(&key, &message)?))?,
    );

    // An SVID whose key is the TPM key (CSR path) and a software-key server SVID.
    let ca = DevCa::generate("acme.example")?;
    let runner = attest::spiffe::parse_id("spiffe://acme.example/runner/r1")?;
    let csr = attest::pem::csr_der(tpm_csr(&mut tpm, &key, &runner)?.as_bytes())?;
    let cert = ca.issue(&csr, &runner, Duration::from_secs(3600))?;
    let client_dir = dir.path().join("client");
    std::fs::create_dir(&client_dir)?;
    std::fs::write(
        client_dir.join("svid.pem"),
        attest::pem::encode("CERTIFICATE", &cert),
    )?;
    std::fs::write(client_dir.join("bundle.pem"), ca.cert_pem())?;
    let client_source: Arc<dyn IdentitySource> = Arc::new(FileSource::open(&client_dir)?);

    let binding = tpm.bind(&key, &client_source.current()?.svid, &selection)?;
    stats(
        "bind (PCR_Read + Quote + statement)",
        time(rounds / 4, || {
            Ok(tpm.bind(&key, &client_source.current()?.svid, &selection)?)
        })?,
    );
    let lax = Expectations {
        allow_software_tpm: true,
        ..Expectations::default()
    };
    stats(
        "verify binding (software)",
        time(rounds, || Ok(verify_binding(&binding, &lax)?.created_at))?,
    );
    drop(tpm);

    let server_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut req = rcgen::CertificateParams::default();
    let gateway = attest::spiffe::parse_id("spiffe://acme.example/gateway")?;
    req.subject_alt_names = vec![rcgen::SanType::URI(
        gateway.as_str().to_string().try_into()?,
    )];
    let server_cert = ca.issue(
        req.serialize_request(&server_key)?.der(),
        &gateway,
        Duration::from_secs(3600),
    )?;
    let server_dir = dir.path().join("server");
    std::fs::create_dir(&server_dir)?;
    std::fs::write(
        server_dir.join("svid.pem"),
        attest::pem::encode("CERTIFICATE", &server_cert),
    )?;
    attest_testkit::certs::write_atomic(
        &server_dir,
        "svid_key.pem",
        server_key.serialize_pem().as_bytes(),
        0o600,
    );
    std::fs::write(server_dir.join("bundle.pem"), ca.cert_pem())?;
    let server_source: Arc<dyn IdentitySource> = Arc::new(FileSource::open(&server_dir)?);

    let mut bundles = TrustBundles::new();
    bundles.insert(
        "acme.example",
        vec![CertificateDer::from(ca.cert_der().to_vec())],
    )?;
    let bundles = Bundles::Fixed(Arc::new(bundles));
    let server = Arc::new(server_config(
        Arc::new(SvidCertResolver::new(server_source.clone(), None)?),
        bundles.clone(),
        Authorize::AnyInBundle,
    )?);

    let worker = Arc::new(TpmWorker::spawn(&tcti)?);
    let tpm_key = Arc::new(TpmSigningKey::new(worker, key.clone()));
    let mut tpm_client = client_config(
        Arc::new(SvidCertResolver::new(client_source, Some(tpm_key))?),
        bundles.clone(),
        Authorize::AnyInBundle,
    )?;
    // A fresh full handshake every time: no resumption.
    tpm_client.resumption = rustls::client::Resumption::disabled();
    let tpm_client = Arc::new(tpm_client);
    stats(
        "mTLS handshake, client key in the TPM (full)",
        time(rounds, || handshake(&tpm_client, &server))?,
    );

    // The same with the client's key in software (server SVID reused as the client's).
    let mut soft_client = client_config(
        Arc::new(SvidCertResolver::new(server_source, None)?),
        bundles,
        Authorize::AnyInBundle,
    )?;
    soft_client.resumption = rustls::client::Resumption::disabled();
    let soft_client = Arc::new(soft_client);
    stats(
        "mTLS handshake, client key in software (full)",
        time(rounds, || handshake(&soft_client, &server))?,
    );

    // Resumption: after one full handshake, TLS 1.3 tickets avoid the TPM signature.
    let mut resuming = (*tpm_client).clone();
    resuming.resumption = rustls::client::Resumption::in_memory_sessions(64);
    let resuming = Arc::new(resuming);
    handshake(&resuming, &server)?;
    let samples = time(rounds, || {
        let resumed = handshake(&resuming, &server)?;
        if !resumed {
            return Err("the handshake was not resumed".into());
        }
        Ok(())
    })?;
    stats("mTLS handshake, TPM client key, resumed (no sign)", samples);
    Ok(())
}
