//! The runner's identity key: a restricted, non-exportable ECDSA P-256 signing key,
//! created under the deterministic storage primary and made persistent at a fixed
//! handle, so every restart uses the same key. Its public part is exported as the TPM
//! public area (which a verifier checks), JWK and PEM; signatures are ordinary ECDSA
//! P-256/SHA-256 and verify with aws-lc-rs outside the TPM.

use serde_json::json;
use tss_esapi::handles::{ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::structures::{HashScheme, MaxBuffer, Signature, SignatureScheme};
use tss_esapi::traits::Marshall;

use super::marshal::{attr, parse_ecc_public, EccPublicArea};
use super::marshal::{TPM_ALG_ECDSA, TPM_ALG_SHA256, TPM_ECC_NIST_P256};
use super::{identity_template, Tpm, Transient};
use crate::b64;
use crate::error::{AttestError, Result};

/// Where the identity key lives unless configured otherwise (owner persistent range).
pub const DEFAULT_IDENTITY_HANDLE: u32 = 0x8100_0ca5;

/// The largest message the identity key signs: TPM2_Hash takes one buffer of at most
/// 1024 bytes (TPM2_PT_INPUT_BUFFER), and tss-esapi 7.7 does not wrap hash sequences.
pub const MAX_SIGNED_MESSAGE: usize = 1024;

const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A TPM key's public area, checked: ECC P-256, ECDSA with SHA-256, name algorithm
/// SHA-256, and the attributes of a key that never leaves its TPM (fixedTPM,
/// fixedParent, sensitiveDataOrigin) and signs only TPM-computed digests (restricted,
/// sign, not decrypt). These are the TPM's own claims about the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmKeyPublic {
    area: Vec<u8>,
    point: [u8; 65],
    name: Vec<u8>,
}

impl TpmKeyPublic {
    /// Parses a marshalled TPMT_PUBLIC and checks it is an identity key.
    pub fn from_area(area: &[u8]) -> Result<TpmKeyPublic> {
        let p = parse_ecc_public(area)?;
        check_identity_area(&p)
            .map_err(|e| AttestError::malformed("TPM identity key", e.to_string()))?;
        let mut point = [0u8; 65];
        point[0] = 0x04;
        point[1..33].copy_from_slice(&p.x);
        point[33..].copy_from_slice(&p.y);
        let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(&verify_core::crypto::default_backend().sha256_oneshot(area));
        Ok(TpmKeyPublic {
            area: area.to_vec(),
            point,
            name,
        })
    }

    /// The marshalled TPMT_PUBLIC.
    pub fn area(&self) -> &[u8] {
        &self.area
    }

    /// The TPM name: nameAlg || SHA-256(TPMT_PUBLIC). A quote names its signer by it.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// The uncompressed point (0x04 || x || y).
    pub fn point(&self) -> &[u8; 65] {
        &self.point
    }

    /// SubjectPublicKeyInfo, DER.
    pub fn spki_der(&self) -> Vec<u8> {
        let mut out = P256_SPKI_PREFIX.to_vec();
        out.extend_from_slice(&self.point);
        out
    }

    pub fn pem(&self) -> String {
        crate::pem::encode("PUBLIC KEY", &self.spki_der())
    }

    /// RFC 7638 thumbprint (base64url SHA-256 of the canonical JWK).
    pub fn thumbprint(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            b64::encode(&self.point[1..33]),
            b64::encode(&self.point[33..])
        );
        b64::encode(&verify_core::crypto::default_backend().sha256_oneshot(canonical.as_bytes()))
    }

    /// The public key as an ES256 JWK whose `kid` is the thumbprint.
    pub fn jwk(&self) -> serde_json::Value {
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": b64::encode(&self.point[1..33]),
            "y": b64::encode(&self.point[33..]),
            "kid": self.thumbprint(),
            "alg": "ES256",
            "use": "sig",
        })
    }

    /// Verifies an r||s ECDSA P-256/SHA-256 signature over `message` with aws-lc-rs.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            &self.point[..],
        )
        .verify(message, signature)
        .is_ok()
    }
}

/// Why a TPMT_PUBLIC is not an identity key made by attest (restricted, non-exportable
/// ECDSA P-256 with SHA-256). A public area read from a file causes all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityAreaError {
    #[error("name algorithm {0:#06x} is not SHA-256")]
    NameAlg(u16),
    #[error("curve {0:#06x} is not NIST P-256")]
    Curve(u16),
    #[error("the signing scheme is not ECDSA with SHA-256")]
    Scheme,
    #[error("attribute {0} is not set")]
    MissingAttribute(&'static str),
    #[error("attribute decrypt is set")]
    Decrypt,
    #[error("the point is not 32+32 bytes")]
    PointSize,
}

fn check_identity_area(p: &EccPublicArea) -> std::result::Result<(), IdentityAreaError> {
    if p.name_alg != TPM_ALG_SHA256 {
        return Err(IdentityAreaError::NameAlg(p.name_alg));
    }
    if p.curve != TPM_ECC_NIST_P256 {
        return Err(IdentityAreaError::Curve(p.curve));
    }
    if p.scheme != TPM_ALG_ECDSA || p.scheme_hash != Some(TPM_ALG_SHA256) {
        return Err(IdentityAreaError::Scheme);
    }
    let must = [
        (attr::FIXED_TPM, "fixedTPM"),
        (attr::FIXED_PARENT, "fixedParent"),
        (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (attr::RESTRICTED, "restricted"),
        (attr::SIGN, "sign"),
    ];
    for (bit, label) in must {
        if p.attributes & bit == 0 {
            return Err(IdentityAreaError::MissingAttribute(label));
        }
    }
    if p.attributes & attr::DECRYPT != 0 {
        return Err(IdentityAreaError::Decrypt);
    }
    if p.x.len() != 32 || p.y.len() != 32 {
        return Err(IdentityAreaError::PointSize);
    }
    Ok(())
}

/// The identity key of one TPM: its persistent handle and public part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKey {
    pub handle: u32,
    pub public: TpmKeyPublic,
}

/// r and s of a TPM ECDSA signature as a 64-byte r||s.
pub(crate) fn signature_rs(tpm: &Tpm, sig: Signature) -> Result<[u8; 64]> {
    let Signature::EcDsa(ecc) = sig else {
        return Err(tpm.err("TPM2_Sign", "the TPM returned a non-ECDSA signature"));
    };
    let mut out = [0u8; 64];
    for (i, part) in [ecc.signature_r().value(), ecc.signature_s().value()]
        .into_iter()
        .enumerate()
    {
        // Leading zeros may be stripped; never more than 32 significant bytes.
        let trimmed: &[u8] = {
            let start = part.iter().position(|b| *b != 0).unwrap_or(part.len());
            &part[start..]
        };
        if trimmed.len() > 32 {
            return Err(tpm.err("TPM2_Sign", "signature component longer than 32 bytes"));
        }
        out[i * 32 + 32 - trimmed.len()..(i + 1) * 32].copy_from_slice(trimmed);
    }
    Ok(out)
}

impl Tpm {
    /// The identity key at `handle`. With `create`, makes and persists it when the
    /// handle is empty; without, an empty handle is an error that says how to make one.
    /// Returns the key and whether it was created now.
    pub fn identity_key(&mut self, handle: u32, create: bool) -> Result<(IdentityKey, bool)> {
        if PersistentTpmHandle::new(handle).is_err() {
            return Err(AttestError::Tpm {
                command: "identity key",
                tcti: self.tcti.to_string(),
                message: format!(
                    "{handle:#010x} is not a persistent handle (0x81000000 to 0x81ffffff)"
                ),
            });
        }
        let mut created = false;
        if !self.persistent_exists(handle)? {
            if !create {
                return Err(AttestError::Tpm {
                    command: "identity key",
                    tcti: self.tcti.to_string(),
                    message: format!(
                        "no identity key at persistent handle {handle:#010x}; create it with `capsule-gateway attest identity`"
                    ),
                });
            }
            self.create_identity(handle)?;
            created = true;
        }
        let object = self.identity_object(handle)?;
        let (public, _, _) = self
            .ctx
            .read_public(object.into())
            .map_err(|e| self.err("TPM2_ReadPublic", e))?;
        let area = public
            .marshall()
            .map_err(|e| self.err("TPM2_ReadPublic (marshal)", e))?;
        let public =
            TpmKeyPublic::from_area(&area).map_err(|e| AttestError::ForeignPersistentObject {
                handle,
                found: format!("an object that fails the identity key checks ({e})"),
            })?;
        Ok((IdentityKey { handle, public }, created))
    }

    /// The ESYS handle of the persistent key, resolved once per open TPM.
    pub(crate) fn identity_object(&mut self, handle: u32) -> Result<ObjectHandle> {
        if let Some((h, object)) = self.identity {
            if h == handle {
                return Ok(object);
            }
            let mut old = object;
            let _ = self.ctx.tr_close(&mut old);
            self.identity = None;
        }
        let tpm_handle =
            PersistentTpmHandle::new(handle).map_err(|e| self.err("Esys_TR_FromTPMPublic", e))?;
        let object = self
            .ctx
            .tr_from_tpm_public(TpmHandle::Persistent(tpm_handle))
            .map_err(|e| self.err("Esys_TR_FromTPMPublic", e))?;
        self.identity = Some((handle, object));
        Ok(object)
    }

    fn create_identity(&mut self, handle: u32) -> Result<()> {
        let template = identity_template().map_err(|e| self.err("TPM2_Create (template)", e))?;
        let primary = self.primary()?;
        let parent = primary.key();
        let created = primary
            .tpm
            .with_password(|ctx| ctx.create(parent, template, None, None, None, None))
            .map_err(|e| primary.tpm.err("TPM2_Create", e))?;
        let loaded = primary
            .tpm
            .with_password(|ctx| ctx.load(parent, created.out_private, created.out_public))
            .map_err(|e| primary.tpm.err("TPM2_Load", e))?;
        let child = Transient {
            tpm: &mut *primary.tpm,
            handle: loaded.into(),
        };
        let persistent =
            PersistentTpmHandle::new(handle).map_err(|e| child.tpm.err("TPM2_EvictControl", e))?;
        let object = child.handle;
        let mut evicted = child
            .tpm
            .with_password(|ctx| {
                ctx.evict_control(Provision::Owner, object, Persistent::Persistent(persistent))
            })
            .map_err(|e| child.tpm.err("TPM2_EvictControl", e))?;
        // EvictControl returns an ESYS handle for the persistent copy; resolve_identity
        // makes its own, so close this one.
        let _ = child.tpm.ctx.tr_close(&mut evicted);
        Ok(())
    }

    /// Signs `message` with the identity key: TPM2_Hash (which refuses data that starts
    /// like a TPM-generated structure and returns a ticket) then TPM2_Sign. Returns r||s.
    pub fn sign(&mut self, key: &IdentityKey, message: &[u8]) -> Result<[u8; 64]> {
        if message.len() > MAX_SIGNED_MESSAGE {
            return Err(self.err(
                "TPM2_Hash",
                format!(
                    "message of {} bytes; the identity key signs at most {MAX_SIGNED_MESSAGE}",
                    message.len()
                ),
            ));
        }
        let object = self.identity_object(key.handle)?;
        let data = MaxBuffer::try_from(message.to_vec()).map_err(|e| self.err("TPM2_Hash", e))?;
        let (digest, ticket) = self
            .ctx
            .hash(data, HashingAlgorithm::Sha256, Hierarchy::Owner)
            .map_err(|e| self.err("TPM2_Hash", e))?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let sig = self
            .with_password(|ctx| ctx.sign(object.into(), digest, scheme, ticket))
            .map_err(|e| self.err("TPM2_Sign", e))?;
        signature_rs(self, sig)
    }

    /// Removes the persistent identity key (for rotation; tests use fresh TPMs).
    pub fn evict_identity_key(&mut self, handle: u32) -> Result<()> {
        let object = self.identity_object(handle)?;
        let persistent =
            PersistentTpmHandle::new(handle).map_err(|e| self.err("TPM2_EvictControl", e))?;
        self.with_password(|ctx| {
            ctx.evict_control(Provision::Owner, object, Persistent::Persistent(persistent))
        })
        .map_err(|e| self.err("TPM2_EvictControl", e))?;
        self.identity = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_prefix_is_p256() {
        // 0x30 0x59: SEQUENCE of 89 bytes = 26 - 2 + 65.
        assert_eq!(P256_SPKI_PREFIX.len() - 2 + 65, 0x59);
    }
}
