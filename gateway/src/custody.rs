//! The custody signer: what vouches for evidence the gateway writes (a bundle's
//! `index.json`, an export's `export.json`, an admission-log checkpoint). It signs the
//! sha256 of a payload's exact bytes, and the signature is written next to the payload
//! as `<name>.sig.json` ([`sig_name`]).
//!
//! - With a TPM: a TPM2_Quote by the runner's identity key (restricted,
//!   non-exportable P-256) whose qualifying data is sha256(payload), over the
//!   configured PCRs. The quote proves the TPM key vouched for these bytes while the
//!   PCRs held these values.
//! - Without: a software ES256 key, created once (0600, durably) in a directory the
//!   caller names (the state directory's `custody/`), signing the 32 bytes of
//!   sha256(payload). The signature says `"kind": "software"` and carries the public
//!   JWK: it proves only that whoever held that file signed, and says so.
//!
//! [`verify_custody`] works offline, from the payload bytes and the signature file
//! alone; [`CustodyExpect`] pins the TPM key (the identity file `attest identity
//! --out` writes) where the verifier knows it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use attest::b64;
use attest::tpm::{
    verify_quote, IdentityKey, PcrSelection, PcrValues, Quote, Tcti, TpmInfo, TpmKeyPublic,
    TpmWorker,
};
use serde::{Deserialize, Serialize};
use verify_core::crypto::default_backend;
use verify_core::keys::{parse_jwk, KeyMaterial, ParsedJwk, SigningKey};
use verify_core::{Alg, Sha256Digest};

use crate::durable::{self, DurableError};

/// The software key's file in the directory given to [`CustodySigner::software`].
pub const SOFTWARE_KEY_FILE: &str = "custody-es256.private.jwk.json";
/// The PCRs a TPM signer quotes unless configured otherwise.
pub const DEFAULT_PCRS: &str = "sha256:0,7";

/// `index.json` → `index.sig.json`: where the signature of a payload file goes.
pub fn sig_name(payload_name: &str) -> String {
    let stem = payload_name.strip_suffix(".json").unwrap_or(payload_name);
    format!("{stem}.sig.json")
}

/// Why a payload could not be signed, or a signature does not hold.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CustodyError {
    /// The software key file exists and cannot be read or used.
    #[error("custody key {}: {detail}", path.display())]
    KeyFile { path: PathBuf, detail: String },
    #[error("custody key {}: {source}", path.display())]
    KeyIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The crypto backend could not make or use the key.
    #[error("custody key: {0}")]
    Key(#[from] verify_core::keys::KeyError),
    #[error("custody key: {0}")]
    Backend(#[from] verify_core::crypto::KeyRejected),
    /// Writing the new software key failed.
    #[error("custody key: {0}")]
    Write(#[from] DurableError),
    /// The TPM could not be reached or did not quote.
    #[error("custody TPM: {0}")]
    Tpm(#[source] attest::AttestError),
    /// The signature file is not one of ours.
    #[error("custody signature malformed: {0}")]
    Malformed(String),
    /// The signature names another payload than the one given.
    #[error("the signature is over {signed}, the payload is {actual}")]
    PayloadDigest { signed: String, actual: String },
    /// The software signature does not verify with its key.
    #[error("the software signature does not verify with its key {kid}")]
    SignatureInvalid { kid: String },
    /// The quote does not verify with its TPM key for this payload.
    #[error("the TPM quote does not hold: {0}")]
    Quote(#[source] attest::AttestError),
    /// The verifier asked for a TPM key and the payload was signed in software.
    #[error("signed by a software key ({kid}), not by the TPM identity key {expected}")]
    SoftwareSigner { kid: String, expected: String },
    /// The quote is by another TPM key than the one the verifier expects.
    #[error("quoted by TPM key {found}, not the identity key {expected}")]
    AnotherTpmKey { expected: String, found: String },
    /// The quoted PCRs are not the reference the verifier gave.
    #[error("the quoted PCRs are not the reference: {0}")]
    Pcrs(String),
}

/// The kind of key that signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignerKind {
    Software,
    Tpm,
}

impl SignerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SignerKind::Software => "software",
            SignerKind::Tpm => "tpm",
        }
    }
}

/// The public part of the software key, as the signature carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftwareJwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub y: String,
    /// RFC 7638 thumbprint of the key.
    pub kid: String,
    pub alg: String,
}

impl SoftwareJwk {
    fn of(point: &[u8; 65]) -> SoftwareJwk {
        SoftwareJwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: b64::encode(&point[1..33]),
            y: b64::encode(&point[33..]),
            kid: thumbprint(point),
            alg: "ES256".into(),
        }
    }

    fn point(&self) -> Result<[u8; 65], CustodyError> {
        let bad = |m: &str| CustodyError::Malformed(format!("jwk: {m}"));
        if self.kty != "EC" || self.crv != "P-256" || self.alg != "ES256" {
            return Err(bad("not an ES256 P-256 key"));
        }
        let coord = |s: &str| -> Result<Vec<u8>, CustodyError> {
            b64::decode(s)
                .ok()
                .filter(|c| c.len() == 32)
                .ok_or_else(|| bad("a coordinate is not 32 bytes of base64url"))
        };
        let mut point = [0u8; 65];
        point[0] = 0x04;
        point[1..33].copy_from_slice(&coord(&self.x)?);
        point[33..].copy_from_slice(&coord(&self.y)?);
        if thumbprint(&point) != self.kid {
            return Err(bad("kid is not the key's thumbprint"));
        }
        Ok(point)
    }
}

/// RFC 7638 thumbprint of a P-256 point (the same spelling as `TpmKeyPublic`'s).
fn thumbprint(point: &[u8; 65]) -> String {
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        b64::encode(&point[1..33]),
        b64::encode(&point[33..])
    );
    b64::encode(&default_backend().sha256_oneshot(canonical.as_bytes()))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    default_backend().sha256_oneshot(bytes)
}

/// A custody signature, `<name>.sig.json`, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CustodySignature {
    /// ES256 over the 32 bytes of sha256(payload), by a key kept in a file.
    Software {
        /// `sha256:<hex>` of the payload's exact bytes.
        payload_sha256: String,
        jwk: SoftwareJwk,
        /// base64url of r||s.
        signature: String,
    },
    /// TPM2_Quote by the identity key, qualifying data sha256(payload).
    Tpm {
        payload_sha256: String,
        /// base64url of the identity key's TPMT_PUBLIC.
        tpm_public: String,
        #[serde(with = "quote_json")]
        quote: Box<Quote>,
    },
}

/// The quote as attest writes it (`capsule-attest/quote/v1`), inline.
mod quote_json {
    use attest::tpm::Quote;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(q: &Quote, s: S) -> Result<S::Ok, S::Error> {
        let value: serde_json::Value =
            serde_json::from_str(&q.to_json()).map_err(serde::ser::Error::custom)?;
        value.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<Quote>, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let bytes = serde_json::to_vec(&value).map_err(serde::de::Error::custom)?;
        Quote::from_json(&bytes)
            .map(Box::new)
            .map_err(serde::de::Error::custom)
    }
}

impl CustodySignature {
    pub fn kind(&self) -> SignerKind {
        match self {
            CustodySignature::Software { .. } => SignerKind::Software,
            CustodySignature::Tpm { .. } => SignerKind::Tpm,
        }
    }

    /// The file's bytes (pretty JSON and a newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, a JSON value and plain structs: serialising cannot fail.
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text.into_bytes()
    }

    /// Parses a signature file strictly (no duplicate or unknown member).
    pub fn parse(bytes: &[u8]) -> Result<CustodySignature, CustodyError> {
        verify_core::json::reject_duplicate_keys(bytes)
            .map_err(|e| CustodyError::Malformed(e.to_string()))?;
        serde_json::from_slice(bytes).map_err(|e| CustodyError::Malformed(e.to_string()))
    }
}

/// Who signed, as a verified signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerInfo {
    pub kind: SignerKind,
    /// RFC 7638 thumbprint of the signing key (software key or TPM identity key).
    pub key_thumbprint: String,
    /// The TPM's self-description and the quoted PCRs (TPM signatures only).
    pub tpm: Option<TpmInfo>,
    pub pcrs: Option<PcrValues>,
}

/// What the verifier knows beforehand; `None` compares nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct CustodyExpect<'a> {
    /// The runner's TPM identity key: the payload must be quoted by it (a software
    /// signature is then refused).
    pub identity: Option<&'a TpmKeyPublic>,
    /// Reference PCR values the quote must carry.
    pub pcrs: Option<&'a PcrValues>,
}

/// Verifies `sig` over `payload` offline: the digest it names is the payload's, then
/// the signature (software) or the quote (TPM) with the key it carries, then what
/// `expect` pins.
pub fn verify_custody(
    payload: &[u8],
    sig: &CustodySignature,
    expect: &CustodyExpect<'_>,
) -> Result<SignerInfo, CustodyError> {
    let digest = sha256(payload);
    let actual = Sha256Digest(digest).to_string();
    let (CustodySignature::Software { payload_sha256, .. }
    | CustodySignature::Tpm { payload_sha256, .. }) = sig;
    if *payload_sha256 != actual {
        return Err(CustodyError::PayloadDigest {
            signed: payload_sha256.clone(),
            actual,
        });
    }
    match sig {
        CustodySignature::Software { jwk, signature, .. } => {
            let point = jwk.point()?;
            let invalid = || CustodyError::SignatureInvalid {
                kid: jwk.kid.clone(),
            };
            let rs: [u8; 64] = b64::decode(signature)
                .ok()
                .and_then(|s| s.try_into().ok())
                .ok_or_else(invalid)?;
            if !default_backend()
                .es256_verifier(&point)?
                .verify(&digest, &rs)
            {
                return Err(invalid());
            }
            if let Some(expected) = expect.identity {
                return Err(CustodyError::SoftwareSigner {
                    kid: jwk.kid.clone(),
                    expected: expected.thumbprint(),
                });
            }
            Ok(SignerInfo {
                kind: SignerKind::Software,
                key_thumbprint: jwk.kid.clone(),
                tpm: None,
                pcrs: None,
            })
        }
        CustodySignature::Tpm {
            tpm_public, quote, ..
        } => {
            let area = b64::decode(tpm_public)
                .map_err(|e| CustodyError::Malformed(format!("tpm_public: {e}")))?;
            let key = TpmKeyPublic::from_area(&area)
                .map_err(|e| CustodyError::Malformed(format!("tpm_public: {e}")))?;
            verify_quote(quote, &key, &digest, None).map_err(CustodyError::Quote)?;
            if let Some(expected) = expect.identity {
                if expected.name() != key.name() {
                    return Err(CustodyError::AnotherTpmKey {
                        expected: expected.thumbprint(),
                        found: key.thumbprint(),
                    });
                }
            }
            if let Some(reference) = expect.pcrs {
                let differ = reference.differing(&quote.pcrs);
                if reference.selection() != quote.pcrs.selection() || !differ.is_empty() {
                    return Err(CustodyError::Pcrs(if differ.is_empty() {
                        format!(
                            "selection {} is not {}",
                            quote.pcrs.selection(),
                            reference.selection()
                        )
                    } else {
                        differ.join(", ")
                    }));
                }
            }
            Ok(SignerInfo {
                kind: SignerKind::Tpm,
                key_thumbprint: key.thumbprint(),
                tpm: Some(quote.tpm.clone()),
                pcrs: Some(quote.pcrs.clone()),
            })
        }
    }
}

/// Signs payloads for evidence; cheap to share (`Arc` inside for the TPM).
pub struct CustodySigner {
    inner: Inner,
}

enum Inner {
    Software {
        key: SigningKey,
        jwk: SoftwareJwk,
    },
    Tpm {
        worker: Arc<TpmWorker>,
        key: IdentityKey,
        pcrs: PcrSelection,
    },
}

impl std::fmt::Debug for CustodySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Software { jwk, .. } => f
                .debug_struct("CustodySigner::Software")
                .field("kid", &jwk.kid)
                .finish_non_exhaustive(),
            Inner::Tpm { key, pcrs, .. } => f
                .debug_struct("CustodySigner::Tpm")
                .field("handle", &format_args!("{:#010x}", key.handle))
                .field("pcrs", &pcrs.to_string())
                .finish_non_exhaustive(),
        }
    }
}

impl CustodySigner {
    /// The software signer whose key is `dir/`[`SOFTWARE_KEY_FILE`]: loaded when it
    /// exists, else created (the directory 0700 if missing, the file 0600, written
    /// durably before it is used). Two processes creating it at once: the rename
    /// refuses to replace, and the loser loads the winner's key.
    pub fn software(dir: &Path) -> Result<CustodySigner, CustodyError> {
        let path = dir.join(SOFTWARE_KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => return Self::load_software(&path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CustodyError::KeyIo { path, source }),
        }
        let fresh = ParsedJwk::generate("custody", Alg::Es256, default_backend())?;
        let KeyMaterial::Es256 { point, .. } = &fresh.material else {
            return Err(CustodyError::KeyFile {
                path,
                detail: "generated key is not ES256".into(),
            });
        };
        let jwk = ParsedJwk {
            kid: thumbprint(point),
            alg: Alg::Es256,
            material: fresh.material,
        };
        durable::create_dirs(dir, 0o700)?;
        let mut text = serde_json::to_string_pretty(&jwk.to_json(true)).unwrap_or_default();
        text.push('\n');
        match durable::write_new(&path, text.as_bytes(), 0o600) {
            Ok(()) => Self::from_parsed(&path, &jwk),
            Err(DurableError::Exists { .. }) => {
                let bytes = std::fs::read(&path).map_err(|source| CustodyError::KeyIo {
                    path: path.clone(),
                    source,
                })?;
                Self::load_software(&path, &bytes)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn load_software(path: &Path, bytes: &[u8]) -> Result<CustodySigner, CustodyError> {
        let jwk = parse_jwk(bytes).map_err(|e| CustodyError::KeyFile {
            path: path.into(),
            detail: format!("{}: {}", e.field, e.message),
        })?;
        Self::from_parsed(path, &jwk)
    }

    fn from_parsed(path: &Path, jwk: &ParsedJwk) -> Result<CustodySigner, CustodyError> {
        let KeyMaterial::Es256 { point, d: Some(_) } = &jwk.material else {
            return Err(CustodyError::KeyFile {
                path: path.into(),
                detail: "not an ES256 private key".into(),
            });
        };
        Ok(CustodySigner {
            inner: Inner::Software {
                key: SigningKey::from_jwk(jwk, default_backend())?,
                jwk: SoftwareJwk::of(point),
            },
        })
    }

    /// The TPM signer: quotes by `key` over `pcrs`, through the TPM thread `worker`.
    pub fn tpm(worker: Arc<TpmWorker>, key: IdentityKey, pcrs: PcrSelection) -> CustodySigner {
        CustodySigner {
            inner: Inner::Tpm { worker, key, pcrs },
        }
    }

    /// Opens the TPM at `tcti` on its own thread and takes the identity key at
    /// `handle` (it must exist: `capsule-gateway attest identity` makes it).
    pub fn open_tpm(
        tcti: &Tcti,
        handle: u32,
        pcrs: PcrSelection,
    ) -> Result<CustodySigner, CustodyError> {
        let worker = Arc::new(TpmWorker::spawn(tcti).map_err(CustodyError::Tpm)?);
        let key = worker
            .call(move |tpm| tpm.identity_key(handle, false).map(|(k, _)| k))
            .map_err(CustodyError::Tpm)?;
        Ok(CustodySigner::tpm(worker, key, pcrs))
    }

    pub fn kind(&self) -> SignerKind {
        match self.inner {
            Inner::Software { .. } => SignerKind::Software,
            Inner::Tpm { .. } => SignerKind::Tpm,
        }
    }

    /// Thumbprint of the signing key.
    pub fn key_thumbprint(&self) -> String {
        match &self.inner {
            Inner::Software { jwk, .. } => jwk.kid.clone(),
            Inner::Tpm { key, .. } => key.public.thumbprint(),
        }
    }

    /// Signs sha256(`payload`).
    pub fn sign(&self, payload: &[u8]) -> Result<CustodySignature, CustodyError> {
        let digest = sha256(payload);
        let payload_sha256 = Sha256Digest(digest).to_string();
        match &self.inner {
            Inner::Software { key, jwk } => Ok(CustodySignature::Software {
                payload_sha256,
                jwk: jwk.clone(),
                signature: b64::encode(&key.sign(&digest)?),
            }),
            Inner::Tpm { worker, key, pcrs } => {
                let (k, p) = (key.clone(), pcrs.clone());
                let quote = worker
                    .call(move |tpm| tpm.quote(&k, &p, &digest))
                    .map_err(CustodyError::Tpm)?;
                Ok(CustodySignature::Tpm {
                    payload_sha256,
                    tpm_public: b64::encode(key.public.area()),
                    quote: Box::new(quote),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn sig_names_sit_beside_their_payload() {
        assert_eq!(sig_name("index.json"), "index.sig.json");
        assert_eq!(sig_name("export.json"), "export.sig.json");
        assert_eq!(sig_name("checkpoint"), "checkpoint.sig.json");
    }

    #[test]
    fn the_software_key_is_created_once_0600_and_signatures_verify_offline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("custody");
        let signer = CustodySigner::software(&keys).expect("create");
        assert_eq!(signer.kind(), SignerKind::Software);
        let file = keys.join(SOFTWARE_KEY_FILE);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&keys), 0o700);
        let again = CustodySigner::software(&keys).expect("load");
        assert_eq!(again.key_thumbprint(), signer.key_thumbprint());

        let payload = br#"{"schema":"x"}"#;
        let sig = again.sign(payload).expect("sign");
        let parsed = CustodySignature::parse(&sig.to_bytes()).expect("parse");
        assert_eq!(parsed, sig);
        let text = String::from_utf8(sig.to_bytes()).expect("utf8");
        assert!(text.contains(r#""kind": "software""#), "{text}");
        assert!(
            !text.contains(r#""d""#),
            "the private scalar never leaves: {text}"
        );
        let info = verify_custody(payload, &parsed, &CustodyExpect::default()).expect("holds");
        assert_eq!(info.kind, SignerKind::Software);
        assert_eq!(info.key_thumbprint, signer.key_thumbprint());
    }

    #[test]
    fn a_changed_payload_or_signature_or_key_is_refused_each_by_its_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = CustodySigner::software(dir.path()).expect("create");
        let sig = signer.sign(b"payload").expect("sign");
        let e = verify_custody(b"payloaD", &sig, &CustodyExpect::default()).expect_err("edited");
        assert!(matches!(e, CustodyError::PayloadDigest { .. }), "{e}");

        // Another key's signature put under this one's digest.
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = CustodySigner::software(other_dir.path()).expect("other");
        let (
            CustodySignature::Software { signature, .. },
            CustodySignature::Software {
                payload_sha256,
                jwk,
                ..
            },
        ) = (other.sign(b"payload").expect("sign"), sig.clone())
        else {
            panic!("software signatures");
        };
        let forged = CustodySignature::Software {
            payload_sha256,
            jwk: jwk.clone(),
            signature,
        };
        let e = verify_custody(b"payload", &forged, &CustodyExpect::default()).expect_err("forged");
        assert!(matches!(e, CustodyError::SignatureInvalid { .. }), "{e}");

        // A key whose kid is not its thumbprint.
        let mut renamed = jwk;
        renamed.kid = "someone-else".into();
        let CustodySignature::Software {
            payload_sha256,
            signature,
            ..
        } = sig.clone()
        else {
            panic!("software");
        };
        let e = verify_custody(
            b"payload",
            &CustodySignature::Software {
                payload_sha256,
                jwk: renamed,
                signature,
            },
            &CustodyExpect::default(),
        )
        .expect_err("renamed");
        assert!(matches!(e, CustodyError::Malformed(_)), "{e}");

        // Unknown members are refused.
        let mut v: serde_json::Value = serde_json::from_slice(&sig.to_bytes()).expect("json");
        v["extra"] = serde_json::json!(1);
        let e = CustodySignature::parse(v.to_string().as_bytes()).expect_err("unknown member");
        assert!(matches!(e, CustodyError::Malformed(_)), "{e}");
    }

    #[test]
    fn an_unreadable_key_file_is_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(SOFTWARE_KEY_FILE);
        std::fs::write(&file, b"{}").expect("write");
        let e = CustodySigner::software(dir.path()).expect_err("bad key");
        assert!(matches!(e, CustodyError::KeyFile { .. }), "{e}");
        assert_eq!(std::fs::read(&file).expect("read"), b"{}");
    }

    /// One swtpm for the TPM tests of this module.
    fn swtpm_signer() -> (attest_testkit::swtpm::Swtpm, CustodySigner, TpmKeyPublic) {
        let swtpm = attest_testkit::swtpm::Swtpm::start().expect("swtpm (Debian package swtpm)");
        let tcti = Tcti::parse(&swtpm.tcti()).expect("tcti");
        let worker = Arc::new(TpmWorker::spawn(&tcti).expect("open swtpm"));
        let key = worker
            .call(|tpm| tpm.identity_key(attest::tpm::DEFAULT_IDENTITY_HANDLE, true))
            .expect("identity key")
            .0;
        let public = key.public.clone();
        let pcrs: PcrSelection = DEFAULT_PCRS.parse().expect("pcrs");
        (swtpm, CustodySigner::tpm(worker, key, pcrs), public)
    }

    #[test]
    fn a_tpm_quote_signs_the_payload_and_pins_to_the_identity_key() {
        let (_swtpm, signer, public) = swtpm_signer();
        assert_eq!(signer.kind(), SignerKind::Tpm);
        let payload = b"index bytes";
        let sig = signer.sign(payload).expect("quote");
        let sig = CustodySignature::parse(&sig.to_bytes()).expect("round trip");
        let expect = CustodyExpect {
            identity: Some(&public),
            pcrs: None,
        };
        let info = verify_custody(payload, &sig, &expect).expect("holds");
        assert_eq!(info.kind, SignerKind::Tpm);
        assert_eq!(info.key_thumbprint, public.thumbprint());
        assert!(
            info.tpm.as_ref().is_some_and(|t| t.software),
            "swtpm says so"
        );
        let pcrs = info.pcrs.expect("pcrs");
        verify_custody(
            payload,
            &sig,
            &CustodyExpect {
                identity: Some(&public),
                pcrs: Some(&pcrs),
            },
        )
        .expect("reference PCRs match");

        // The digest rewritten to another payload's: the quote's nonce is not it.
        let CustodySignature::Tpm {
            tpm_public, quote, ..
        } = sig.clone()
        else {
            panic!("tpm");
        };
        let moved = CustodySignature::Tpm {
            payload_sha256: Sha256Digest(sha256(b"other")).to_string(),
            tpm_public,
            quote,
        };
        let e = verify_custody(b"other", &moved, &CustodyExpect::default()).expect_err("moved");
        assert!(matches!(e, CustodyError::Quote(_)), "{e}");

        // A software signature where the TPM key is expected.
        let dir = tempfile::tempdir().expect("tempdir");
        let soft = CustodySigner::software(dir.path()).expect("software");
        let e = verify_custody(payload, &soft.sign(payload).expect("sign"), &expect)
            .expect_err("software refused");
        assert!(matches!(e, CustodyError::SoftwareSigner { .. }), "{e}");

        // Another TPM's identity key: its quote holds on its own, and is refused
        // where this runner's key is expected.
        let (_other_swtpm, other, _) = swtpm_signer();
        let sig = other.sign(payload).expect("quote");
        verify_custody(payload, &sig, &CustodyExpect::default()).expect("holds by itself");
        let e = verify_custody(payload, &sig, &expect).expect_err("another key");
        assert!(matches!(e, CustodyError::AnotherTpmKey { .. }), "{e}");
    }
}
