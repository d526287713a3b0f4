//! The TPM layer against a real software TPM. Each test starts its own swtpm on free
//! ports (nothing shared, so nothing to serialize) and checks at the end that no
//! transient object or session was left loaded — swtpm without a resource manager has
//! only 3 object slots and keeps what a crashed client leaves behind.
//! A missing swtpm fails these tests with the Debian package to install.

// Helpers panic when a test fails, like the #[test] fns clippy.toml already covers.
#![allow(clippy::unwrap_used)]

use attest::tpm::{
    verify_quote, PcrSelection, PcrValues, Quote, SealedKey, Tcti, Tpm, DEFAULT_IDENTITY_HANDLE,
};
use attest::{AttestError, QuoteFailure};
use attest_testkit::Swtpm;

fn swtpm() -> Swtpm {
    Swtpm::start().expect("swtpm")
}

fn open(t: &Swtpm) -> Tpm {
    Tpm::open(&Tcti::parse(&t.tcti()).expect("tcti")).expect("open swtpm")
}

/// Nothing left loaded: the property the 3-slot swtpm depends on.
fn assert_clean(tpm: &mut Tpm) {
    assert_eq!(
        tpm.loaded_transient_objects().unwrap(),
        0,
        "transient objects leaked"
    );
    assert_eq!(tpm.loaded_sessions().unwrap(), 0, "sessions leaked");
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref());
    out
}

#[test]
fn identity_key_persists_across_reconnects_and_restarts() {
    let mut sw = swtpm();
    let first = {
        let mut tpm = open(&sw);
        let (key, created) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
        assert!(created, "a fresh TPM has no identity key yet");
        assert_clean(&mut tpm);
        key
    };
    // A new connection finds the same key and does not create another.
    {
        let mut tpm = open(&sw);
        let (key, created) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
        assert!(!created);
        assert_eq!(key, first);
        assert_clean(&mut tpm);
    }
    // A killed and restarted TPM (state kept, as across a reboot) still has it.
    sw.restart().unwrap();
    let mut tpm = open(&sw);
    let (key, created) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, false).unwrap();
    assert!(!created);
    assert_eq!(key.public.point(), first.public.point());
    assert_clean(&mut tpm);
}

#[test]
fn missing_identity_key_is_an_error_without_create() {
    let sw = swtpm();
    let mut tpm = open(&sw);
    let err = tpm
        .identity_key(DEFAULT_IDENTITY_HANDLE, false)
        .unwrap_err();
    assert!(err.to_string().contains("attest identity"), "{err}");
    let err = tpm.identity_key(0x8000_0001, true).unwrap_err();
    assert!(err.to_string().contains("not a persistent handle"), "{err}");
}

#[test]
fn signatures_verify_with_aws_lc_outside_the_tpm() {
    let sw = swtpm();
    let mut tpm = open(&sw);
    let (key, _) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
    let message = b"capsule-gateway identity check";
    let sig = tpm.sign(&key, message).unwrap();
    // Verified by aws-lc-rs from the exported SPKI, independent of attest's own helper.
    let spki = key.public.spki_der();
    let point = &spki[spki.len() - 65..];
    let verifier = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        point,
    );
    assert!(verifier.verify(message, &sig).is_ok());
    assert!(verifier.verify(b"another message", &sig).is_err());
    // The JWK names the same point.
    let jwk = key.public.jwk();
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["crv"], "P-256");
    assert_eq!(jwk["kid"], key.public.thumbprint());
    assert!(key.public.pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
    // The restricted key refuses to sign something shaped like a TPM-generated
    // structure: it cannot be made to forge a quote.
    let mut forged = 0xff54_4347u32.to_be_bytes().to_vec();
    forged.extend_from_slice(&[0x80, 0x18, 0, 0]);
    let err = tpm.sign(&key, &forged).unwrap_err();
    assert!(
        err.to_string().contains("TPM2_Hash") || err.to_string().contains("TPM2_Sign"),
        "{err}"
    );
    assert_clean(&mut tpm);
}

#[test]
fn unreachable_tpm_is_an_error_naming_the_tcti() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcti = Tcti::parse(&format!("swtpm:host=127.0.0.1,port={port}")).unwrap();
    let err = Tpm::open(&tcti).unwrap_err();
    assert!(matches!(err, AttestError::TpmUnreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("port={port}")), "{err}");
    assert!(err.to_string().contains("Connection refused"), "{err}");
    let err = Tpm::open(&Tcti::parse("device:/dev/no-such-tpm").unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("/dev/no-such-tpm does not exist"),
        "{err}"
    );
    let err = Tcti::parse("carrier-pigeon:fast").unwrap_err();
    assert!(err.to_string().contains("carrier-pigeon"), "{err}");
}

#[test]
fn software_tpm_is_reported_as_such() {
    let sw = swtpm();
    let tpm = open(&sw);
    assert!(tpm.info().software);
    assert_eq!(tpm.info().vendor, "SW TPM");
    assert!(tpm.info().describe().starts_with("software TPM"));
}

#[test]
fn seal_unseal_and_pcr_change_refuses_naming_the_pcr() {
    let sw = swtpm();
    let mut tpm = open(&sw);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k-hs.sealed.json");
    let secret = [0x5au8; 32];
    let selection: PcrSelection = "sha256:0,7,16".parse().unwrap();
    let sealed = tpm.seal_hs256("k-hs", &secret, &selection).unwrap();
    std::fs::write(&file, sealed.to_json()).unwrap();
    assert_clean(&mut tpm);

    // Unsealed from the file, on a new connection.
    let mut tpm = open(&sw);
    let loaded = SealedKey::load(&file).unwrap();
    let key = tpm.unseal(&loaded, &file).unwrap();
    assert_eq!(key.kid, "k-hs");
    assert_eq!(key.secret(), &secret);
    assert!(
        !format!("{key:?}").contains("5a5a"),
        "Debug must not print the secret"
    );
    assert_clean(&mut tpm);

    // Extending a PCR the key is not bound to changes nothing.
    tpm.pcr_extend(23, &sha256(b"unrelated")).unwrap();
    assert!(tpm.unseal(&loaded, &file).is_ok());

    // Extending a bound PCR: refused, naming that PCR and the file.
    tpm.pcr_extend(16, &sha256(b"new configuration")).unwrap();
    let err = tpm.unseal(&loaded, &file).unwrap_err();
    match &err {
        AttestError::PcrMismatch { pcrs, kid, .. } => {
            assert_eq!(pcrs, &vec!["sha256:16".to_string()]);
            assert_eq!(kid, "k-hs");
        }
        other => panic!("expected PcrMismatch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("sha256:16") && text.contains("k-hs.sealed.json"),
        "{text}"
    );
    assert_clean(&mut tpm);
}

#[test]
fn the_tpm_itself_enforces_the_pcr_policy() {
    // Skip attest's own pre-check and ask the TPM directly after a bound PCR changed:
    // the TPM refuses (and the error still names the PCR).
    let sw = swtpm();
    let mut tpm = open(&sw);
    let selection: PcrSelection = "sha256:16".parse().unwrap();
    let sealed = tpm.seal_hs256("k", &[1u8; 48], &selection).unwrap();
    assert_eq!(
        tpm.unseal_without_precheck(&sealed, "k.json".as_ref())
            .unwrap()
            .secret(),
        &[1u8; 48]
    );
    tpm.pcr_extend(16, &sha256(b"x")).unwrap();
    let err = tpm
        .unseal_without_precheck(&sealed, "k.json".as_ref())
        .unwrap_err();
    assert!(
        matches!(&err, AttestError::PcrMismatch { pcrs, .. } if pcrs == &vec!["sha256:16".to_string()]),
        "{err:?}"
    );
    assert_clean(&mut tpm);
}

#[test]
fn edited_pcr_values_in_a_sealed_file_are_detected() {
    // Someone edits the file's PCR values to the current ones to get past the
    // pre-check: the values no longer match the object's policy digest.
    let sw = swtpm();
    let mut tpm = open(&sw);
    let selection: PcrSelection = "sha256:16".parse().unwrap();
    let sealed = tpm.seal_hs256("k", &[1u8; 48], &selection).unwrap();
    tpm.pcr_extend(16, &sha256(b"x")).unwrap();
    let now = tpm.pcr_read(&selection).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&sealed.to_json()).unwrap();
    json["pcrs"] = serde_json::from_str(&now.to_json()).unwrap();
    let edited = SealedKey::from_json(json.to_string().as_bytes(), "edited.json".as_ref()).unwrap();
    let err = tpm.unseal(&edited, "edited.json".as_ref()).unwrap_err();
    assert!(err.to_string().contains("file edited"), "{err}");
    assert_clean(&mut tpm);
}

#[test]
fn a_sealed_file_with_an_edited_kid_is_refused() {
    let sw = swtpm();
    let mut tpm = open(&sw);
    let sealed = tpm
        .seal_hs256("tenant-a-key", &[7u8; 32], &"sha256:0".parse().unwrap())
        .unwrap();
    let json = sealed.to_json().replace("tenant-a-key", "tenant-b-key");
    let edited = SealedKey::from_json(json.as_bytes(), "b.json".as_ref()).unwrap();
    let err = tpm.unseal(&edited, "b.json".as_ref()).unwrap_err();
    assert!(err.to_string().contains("kid edited"), "{err}");
    assert_clean(&mut tpm);
}

#[test]
fn secrets_outside_the_sealable_range_are_refused() {
    let sw = swtpm();
    let mut tpm = open(&sw);
    let sel: PcrSelection = "sha256:0".parse().unwrap();
    assert!(tpm.seal_hs256("k", &[1u8; 31], &sel).is_err());
    assert!(tpm.seal_hs256("k", &[1u8; 113], &sel).is_err());
    assert!(tpm.seal_hs256("", &[1u8; 32], &sel).is_err());
}

fn quote_fixture(tpm: &mut Tpm, nonce: &[u8]) -> (attest::tpm::IdentityKey, Quote) {
    let (key, _) = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
    tpm.pcr_extend(16, &sha256(b"measured config")).unwrap();
    let quote = tpm
        .quote(&key, &"sha256:0,7,16".parse().unwrap(), nonce)
        .unwrap();
    (key, quote)
}

#[test]
fn quote_verifies_against_nonce_key_and_reference() {
    let sw = swtpm();
    let mut tpm = open(&sw);
    let nonce = sha256(b"verifier's fresh nonce");
    let (key, quote) = quote_fixture(&mut tpm, &nonce);
    let reference = tpm.pcr_read(quote.pcrs.selection()).unwrap();
    let verified = verify_quote(&quote, &key.public, &nonce, Some(&reference)).unwrap();
    assert_eq!(verified.pcrs, reference);
    // The quote survives its JSON form byte for byte.
    let again = Quote::from_json(quote.to_json().as_bytes()).unwrap();
    assert_eq!(again, quote);
    assert!(again.tpm.software);
    assert_clean(&mut tpm);
}

#[test]
fn tampered_quotes_are_rejected_precisely() {
    let sw = swtpm();
    let mut tpm = open(&sw);
    let nonce = sha256(b"nonce");
    let (key, quote) = quote_fixture(&mut tpm, &nonce);
    let reference = quote.pcrs.clone();
    let reason = |q: &Quote, n: &[u8], r: &PcrValues| match verify_quote(q, &key.public, n, Some(r))
    {
        Err(AttestError::Quote(f)) => f,
        other => panic!("expected a quote failure, got {other:?}"),
    };

    // One flipped bit anywhere in the signed bytes.
    let mut q = quote.clone();
    let last = q.attest.len() - 1;
    q.attest[last] ^= 1;
    assert_eq!(
        reason(&q, &nonce, &reference),
        QuoteFailure::SignatureInvalid
    );

    // A flipped signature bit.
    let mut q = quote.clone();
    q.signature[5] ^= 0x80;
    assert_eq!(
        reason(&q, &nonce, &reference),
        QuoteFailure::SignatureInvalid
    );

    // Replayed against another nonce.
    assert_eq!(
        reason(&quote, &sha256(b"other"), &reference),
        QuoteFailure::NonceMismatch
    );

    // PCR values carried with the quote edited to look good.
    let mut json: serde_json::Value = serde_json::from_str(&quote.to_json()).unwrap();
    json["pcrs"]["values"]["16"] = serde_json::Value::String("00".repeat(32));
    let q = Quote::from_json(json.to_string().as_bytes()).unwrap();
    assert_eq!(reason(&q, &nonce, &reference), QuoteFailure::ValuesTampered);

    // The platform is not in the reference state: the changed PCR is named.
    let mut json: serde_json::Value = serde_json::from_str(&reference.to_json()).unwrap();
    json["values"]["16"] = serde_json::Value::String("00".repeat(32));
    let other_ref = PcrValues::from_json(json.to_string().as_bytes()).unwrap();
    assert_eq!(
        reason(&quote, &nonce, &other_ref),
        QuoteFailure::PcrMismatch(vec!["sha256:16".into()])
    );

    // A reference over other PCRs.
    let other_sel = PcrValues::new("sha256:0,7".parse().unwrap(), vec![vec![0; 32]; 2]).unwrap();
    assert!(matches!(
        reason(&quote, &nonce, &other_sel),
        QuoteFailure::SelectionMismatch { .. }
    ));

    // Another TPM's key does not verify it.
    let sw2 = swtpm();
    let mut tpm2 = open(&sw2);
    let (key2, _) = tpm2.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap();
    assert!(matches!(
        verify_quote(&quote, &key2.public, &nonce, Some(&reference)),
        Err(AttestError::Quote(QuoteFailure::SignatureInvalid))
    ));
    assert_clean(&mut tpm);
    assert_clean(&mut tpm2);
}

#[test]
fn a_foreign_object_at_the_identity_handle_is_not_used() {
    // Another tool (tpm2-tools) put its own key at our handle: attest refuses it rather
    // than signing with a key it did not make.
    let sw = swtpm();
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("primary.ctx");
    let run = |tool: &str, args: &[&str]| {
        let path = attest_testkit::require_tool(tool, "tpm2-tools").unwrap();
        let out = std::process::Command::new(path)
            .args(args)
            .env("TPM2TOOLS_TCTI", sw.tcti())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        "tpm2_createprimary",
        &["-C", "o", "-G", "rsa2048", "-c", ctx.to_str().unwrap()],
    );
    run(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", ctx.to_str().unwrap(), "0x81000ca5"],
    );
    run("tpm2_flushcontext", &["-t"]);
    let mut tpm = open(&sw);
    let err = tpm.identity_key(DEFAULT_IDENTITY_HANDLE, true).unwrap_err();
    assert!(
        matches!(
            err,
            AttestError::ForeignPersistentObject {
                handle: 0x8100_0ca5,
                ..
            }
        ),
        "{err:?}"
    );
    assert_clean(&mut tpm);
}

#[test]
fn a_key_sealed_on_another_tpm_does_not_unseal() {
    let a = swtpm();
    let b = swtpm();
    let sealed = open(&a)
        .seal_hs256("k", &[9u8; 32], &"sha256:0".parse().unwrap())
        .unwrap();
    let mut tpm_b = open(&b);
    let err = tpm_b.unseal(&sealed, "k.json".as_ref()).unwrap_err();
    assert!(err.to_string().contains("sealed on another TPM"), "{err}");
    assert_clean(&mut tpm_b);
}
