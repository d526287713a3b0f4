//! HS256 keys sealed to a PCR policy.
//!
//! `seal` reads the selected PCRs, computes the TPM2_PolicyPCR digest of those values
//! and creates a sealed data object under the storage primary whose only authorization
//! is that policy (no userWithAuth). The file keeps the TPM blobs, the kid and the PCR
//! values sealed to. `unseal` checks that the file's PCR values are the ones the
//! object's policy was computed from (so the message below cannot be lied to), compares
//! them with the current PCRs and names each one that changed, and only then asks the
//! TPM, in a policy session salted with the primary so the secret crosses the TCTI
//! encrypted. The sealed data is `SHA-256(kid)[..16] || secret`: a file whose kid was
//! edited is refused after unsealing.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::SessionHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Digest, KeyedHashScheme, PcrSelectionList, PcrSlot, Private, Public, PublicBuilder,
    PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

use super::marshal::TPM_CC_POLICY_PCR;
use super::pcr::{PcrSelection, PcrValues, PcrValuesWire};
use super::{Tpm, TpmInfo, Transient};
use crate::b64;
use crate::error::{AttestError, Result};

const SCHEMA: &str = "capsule-attest/sealed-hs256/v1";
/// RFC 7518 section 3.2 (and verify-core's key store): at least the hash length.
pub const MIN_SECRET_BYTES: usize = verify_core::keys::MIN_HS256_KEY_BYTES;
/// MAX_SYM_DATA (128) minus the 16-byte kid tag.
pub const MAX_SECRET_BYTES: usize = 112;
const KID_TAG_BYTES: usize = 16;

/// A sealed HS256 key as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKey {
    pub kid: String,
    /// The PCR values the key is sealed to.
    pub pcrs: PcrValues,
    /// Marshalled TPMT_PUBLIC of the sealed object.
    public: Vec<u8>,
    /// TPM2B_PRIVATE contents (encrypted by the storage primary).
    private: Vec<u8>,
    /// The TPM that sealed it.
    pub tpm: TpmInfo,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedWire {
    schema: String,
    kid: String,
    alg: String,
    pcrs: PcrValuesWire,
    public: String,
    private: String,
    tpm: TpmInfo,
}

/// An unsealed key. The secret lives in zeroizing memory and is never printed.
pub struct UnsealedKey {
    pub kid: String,
    secret: Zeroizing<Vec<u8>>,
}

impl UnsealedKey {
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// Hands the secret over without copying it.
    pub fn into_secret(self) -> Zeroizing<Vec<u8>> {
        self.secret
    }
}

impl fmt::Debug for UnsealedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UnsealedKey {{ kid: {:?}, {} bytes }}",
            self.kid,
            self.secret.len()
        )
    }
}

/// TPM2_PolicyPCR on a fresh session (Part 3, 23.7):
/// SHA-256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest).
pub(crate) fn policy_pcr_digest(values: &PcrValues) -> [u8; 32] {
    let mut ctx = verify_core::crypto::default_backend().sha256();
    ctx.update(&[0u8; 32]);
    ctx.update(&TPM_CC_POLICY_PCR.to_be_bytes());
    ctx.update(&values.selection().marshal());
    ctx.update(&values.digest());
    ctx.finish()
}

fn kid_tag(kid: &str) -> [u8; KID_TAG_BYTES] {
    let d = verify_core::crypto::default_backend().sha256_oneshot(kid.as_bytes());
    let mut out = [0u8; KID_TAG_BYTES];
    out.copy_from_slice(&d[..KID_TAG_BYTES]);
    out
}

pub(crate) fn tss_selection_list(tpm: &Tpm, selection: &PcrSelection) -> Result<PcrSelectionList> {
    let slots = selection
        .pcrs()
        .iter()
        .map(|p| PcrSlot::try_from(1u32 << p))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tpm.err("PCR selection", e))?;
    PcrSelectionList::builder()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| tpm.err("PCR selection", e))
}

impl SealedKey {
    pub fn to_json(&self) -> String {
        let wire = SealedWire {
            schema: SCHEMA.into(),
            kid: self.kid.clone(),
            alg: "HS256".into(),
            pcrs: self.pcrs.to_wire(),
            public: b64::encode(&self.public),
            private: b64::encode(&self.private),
            tpm: self.tpm.clone(),
        };
        serde_json::to_string_pretty(&wire).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8], file: &Path) -> Result<SealedKey> {
        let bad = |message: String| AttestError::SealedFile {
            file: file.to_path_buf(),
            message,
        };
        let wire: SealedWire = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if wire.schema != SCHEMA {
            return Err(bad(format!("schema `{}` is not `{SCHEMA}`", wire.schema)));
        }
        if wire.alg != "HS256" {
            return Err(bad(format!("alg `{}` is not HS256", wire.alg)));
        }
        if wire.kid.is_empty() || wire.kid.len() > 256 || wire.kid.chars().any(char::is_control) {
            return Err(bad("kid must be 1 to 256 printable characters".into()));
        }
        let pcrs = PcrValues::from_wire(&wire.pcrs).map_err(|e| bad(e.to_string()))?;
        let public = b64::decode(&wire.public).map_err(|e| bad(format!("public: {e}")))?;
        let private = b64::decode(&wire.private).map_err(|e| bad(format!("private: {e}")))?;
        Ok(SealedKey {
            kid: wire.kid,
            pcrs,
            public,
            private,
            tpm: wire.tpm,
        })
    }

    pub fn load(file: &Path) -> Result<SealedKey> {
        let bytes = std::fs::read(file).map_err(|e| AttestError::io(file, e))?;
        SealedKey::from_json(&bytes, file)
    }

    /// Checks that the PCR values in the file are those the object's policy was made
    /// from (the public area is integrity-protected by the TPM on load).
    fn check_policy(&self, file: &Path) -> Result<Public> {
        let bad = |message: String| AttestError::SealedFile {
            file: file.to_path_buf(),
            message,
        };
        let public = Public::unmarshall(&self.public).map_err(|e| bad(format!("public: {e}")))?;
        let Public::KeyedHash {
            auth_policy,
            object_attributes,
            ..
        } = &public
        else {
            return Err(bad("public: not a sealed data object".into()));
        };
        if object_attributes.user_with_auth() {
            return Err(bad(
                "public: the object can be used without its PCR policy".into()
            ));
        }
        if auth_policy.value() != policy_pcr_digest(&self.pcrs) {
            return Err(bad(
                "the PCR values in the file are not those the object is sealed to (file edited?)"
                    .into(),
            ));
        }
        Ok(public)
    }
}

impl Tpm {
    /// Seals an HS256 secret to the current values of `selection`.
    pub fn seal_hs256(
        &mut self,
        kid: &str,
        secret: &[u8],
        selection: &PcrSelection,
    ) -> Result<SealedKey> {
        if kid.is_empty() || kid.len() > 256 || kid.chars().any(char::is_control) {
            return Err(AttestError::Secret(
                "kid must be 1 to 256 printable characters".into(),
            ));
        }
        if secret.len() < MIN_SECRET_BYTES || secret.len() > MAX_SECRET_BYTES {
            return Err(AttestError::Secret(format!(
                "an HS256 key of {} bytes; sealed keys are {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes",
                secret.len()
            )));
        }
        let pcrs = self.pcr_read(selection)?;
        let policy = policy_pcr_digest(&pcrs);
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .with_admin_with_policy(true)
            .with_user_with_auth(false)
            .build()
            .map_err(|e| self.err("TPM2_Create (template)", e))?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_auth_policy(
                Digest::try_from(policy.to_vec()).map_err(|e| self.err("TPM2_Create", e))?,
            )
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(|e| self.err("TPM2_Create (template)", e))?;
        let mut data = Zeroizing::new(Vec::with_capacity(KID_TAG_BYTES + secret.len()));
        data.extend_from_slice(&kid_tag(kid));
        data.extend_from_slice(secret);
        let sensitive =
            SensitiveData::try_from(data.to_vec()).map_err(|e| self.err("TPM2_Create", e))?;
        let primary = self.primary()?;
        let parent = primary.key();
        let created = primary
            .tpm
            .with_password(|ctx| ctx.create(parent, template, None, Some(sensitive), None, None))
            .map_err(|e| primary.tpm.err("TPM2_Create", e))?;
        drop(primary);
        if created.out_public.auth_policy().value() != policy {
            return Err(self.err("TPM2_Create", "the TPM changed the object's policy"));
        }
        let public = created
            .out_public
            .marshall()
            .map_err(|e| self.err("TPM2_Create (marshal)", e))?;
        Ok(SealedKey {
            kid: kid.to_string(),
            pcrs,
            public,
            private: created.out_private.value().to_vec(),
            tpm: self.info().clone(),
        })
    }

    /// Unseals; `file` names the sealed key in errors. Changed PCRs are reported by
    /// name before the TPM is asked.
    pub fn unseal(&mut self, sealed: &SealedKey, file: &Path) -> Result<UnsealedKey> {
        let public = sealed.check_policy(file)?;
        let mismatch = |tpm: &mut Tpm| -> Result<AttestError> {
            let now = tpm.pcr_read(sealed.pcrs.selection())?;
            Ok(AttestError::PcrMismatch {
                file: file.to_path_buf(),
                kid: sealed.kid.clone(),
                pcrs: sealed.pcrs.differing(&now),
            })
        };
        let current = self.pcr_read(sealed.pcrs.selection())?;
        if current != sealed.pcrs {
            return Err(mismatch(self)?);
        }
        self.unseal_tpm_enforced(sealed, file, public)
    }

    /// The TPM part of [`Tpm::unseal`] alone, without the file and PCR pre-checks;
    /// public so tests can show the TPM itself refuses when a bound PCR changed.
    #[doc(hidden)]
    pub fn unseal_without_precheck(
        &mut self,
        sealed: &SealedKey,
        file: &Path,
    ) -> Result<UnsealedKey> {
        let public = Public::unmarshall(&sealed.public).map_err(|e| AttestError::SealedFile {
            file: file.to_path_buf(),
            message: format!("public: {e}"),
        })?;
        self.unseal_tpm_enforced(sealed, file, public)
    }

    fn unseal_tpm_enforced(
        &mut self,
        sealed: &SealedKey,
        file: &Path,
        public: Public,
    ) -> Result<UnsealedKey> {
        let mismatch = |tpm: &mut Tpm| -> Result<AttestError> {
            let now = tpm.pcr_read(sealed.pcrs.selection())?;
            Ok(AttestError::PcrMismatch {
                file: file.to_path_buf(),
                kid: sealed.kid.clone(),
                pcrs: sealed.pcrs.differing(&now),
            })
        };
        let selection = tss_selection_list(self, sealed.pcrs.selection())?;
        let private =
            Private::try_from(sealed.private.clone()).map_err(|e| AttestError::SealedFile {
                file: file.to_path_buf(),
                message: format!("private: {e}"),
            })?;
        let primary = self.primary()?;
        let parent = primary.key();
        let loaded = primary
            .tpm
            .with_password(|ctx| ctx.load(parent, private, public))
            .map_err(|e| AttestError::SealedFile {
                file: file.to_path_buf(),
                message: format!(
                    "the TPM refuses to load it (sealed on another TPM, or its owner seed was cleared): {e}"
                ),
            })?;
        let object = Transient {
            tpm: &mut *primary.tpm,
            handle: loaded.into(),
        };
        // A policy session salted with the primary: the response (the secret) is
        // encrypted between the TPM and this process.
        let session = object
            .tpm
            .context()
            .execute_without_session(|ctx| {
                ctx.start_auth_session(
                    Some(parent),
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(|e| object.tpm.err("TPM2_StartAuthSession", e))?
            .ok_or_else(|| {
                object
                    .tpm
                    .err("TPM2_StartAuthSession", "no session returned")
            })?;
        let session_guard = Transient {
            tpm: &mut *object.tpm,
            handle: SessionHandle::from(session).into(),
        };
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_encrypt(true)
            .build();
        session_guard
            .tpm
            .context()
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(|e| session_guard.tpm.err("Esys_TRSess_SetAttributes", e))?;
        let policy_session = PolicySession::try_from(session)
            .map_err(|e| session_guard.tpm.err("TPM2_PolicyPCR", e))?;
        let expected = Digest::try_from(sealed.pcrs.digest().to_vec())
            .map_err(|e| session_guard.tpm.err("TPM2_PolicyPCR", e))?;
        let policy = session_guard
            .tpm
            .context()
            .execute_without_session(|ctx| ctx.policy_pcr(policy_session, expected, selection));
        if let Err(e) = policy {
            // PCRs may have moved since they were read: say which.
            let tpm = &mut *session_guard.tpm;
            let err = match mismatch(tpm)? {
                AttestError::PcrMismatch { pcrs, .. } if pcrs.is_empty() => {
                    tpm.err("TPM2_PolicyPCR", e)
                }
                m => m,
            };
            return Err(err);
        }
        let item = object.handle;
        let data = session_guard
            .tpm
            .context()
            .execute_with_session(Some(session), |ctx| ctx.unseal(item))
            .map_err(|e| session_guard.tpm.err("TPM2_Unseal", e))?;
        drop(session_guard);
        drop(object);
        drop(primary);
        let data = Zeroizing::new(data.value().to_vec());
        if data.len() < KID_TAG_BYTES + MIN_SECRET_BYTES
            || data[..KID_TAG_BYTES] != kid_tag(&sealed.kid)
        {
            return Err(AttestError::SealedFile {
                file: file.to_path_buf(),
                message: format!(
                    "the sealed data is not a key for kid `{}` (kid edited?)",
                    sealed.kid
                ),
            });
        }
        Ok(UnsealedKey {
            kid: sealed.kid.clone(),
            secret: Zeroizing::new(data[KID_TAG_BYTES..].to_vec()),
        })
    }
}
