//! TPM2_Quote over selected PCRs, signed by the identity key, and its verifier.
//!
//! A [`Quote`] keeps the exact TPMS_ATTEST bytes the signature covers, the r||s
//! signature, and the PCR values read alongside (a quote carries only their digest).
//! [`verify_quote`] checks, in order: the signature (nothing is believed before it), that
//! the bytes are a TPM-generated quote, the signer's name, the nonce, that the carried
//! values hash to the quoted digest, and the values against a reference.

use serde::{Deserialize, Serialize};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{Data, HashScheme, SignatureScheme};
use tss_esapi::traits::Marshall;

use super::identity::{signature_rs, IdentityKey, TpmKeyPublic};
use super::marshal::parse_quote_attest;
use super::pcr::{PcrSelection, PcrValues, PcrValuesWire};
use super::seal::tss_selection_list;
use super::{Tpm, TpmInfo};
use crate::b64;
use crate::error::{AttestError, QuoteFailure, Result};

const SCHEMA: &str = "capsule-attest/quote/v1";
/// TPM2B_DATA holds at most a SHA-512 digest.
pub const MAX_NONCE_BYTES: usize = 64;

/// A quote as produced by the TPM, with the PCR values it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// Marshalled TPMS_ATTEST: the signed bytes.
    pub attest: Vec<u8>,
    /// ECDSA P-256 r||s over SHA-256(attest).
    pub signature: [u8; 64],
    pub pcrs: PcrValues,
    pub tpm: TpmInfo,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuoteWire {
    pub(crate) schema: String,
    pub(crate) attest: String,
    pub(crate) signature: String,
    pub(crate) pcrs: PcrValuesWire,
    pub(crate) tpm: TpmInfo,
}

impl Quote {
    pub(crate) fn to_wire(&self) -> QuoteWire {
        QuoteWire {
            schema: SCHEMA.into(),
            attest: b64::encode(&self.attest),
            signature: b64::encode(&self.signature),
            pcrs: self.pcrs.to_wire(),
            tpm: self.tpm.clone(),
        }
    }

    pub(crate) fn from_wire(w: &QuoteWire) -> Result<Quote> {
        if w.schema != SCHEMA {
            return Err(AttestError::malformed(
                "quote",
                format!("schema `{}` is not `{SCHEMA}`", w.schema),
            ));
        }
        let attest = b64::decode(&w.attest)
            .map_err(|e| AttestError::malformed("quote", format!("attest: {e}")))?;
        let sig = b64::decode(&w.signature)
            .map_err(|e| AttestError::malformed("quote", format!("signature: {e}")))?;
        let signature: [u8; 64] = sig
            .try_into()
            .map_err(|_| AttestError::malformed("quote", "signature is not 64 bytes (r||s)"))?;
        Ok(Quote {
            attest,
            signature,
            pcrs: PcrValues::from_wire(&w.pcrs)?,
            tpm: w.tpm.clone(),
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_wire()).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Quote> {
        let w: QuoteWire = serde_json::from_slice(bytes)
            .map_err(|e| AttestError::malformed("quote", e.to_string()))?;
        Quote::from_wire(&w)
    }
}

/// What a verified quote says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    pub pcrs: PcrValues,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
    /// The signer's qualified name as the TPM stated it.
    pub qualified_signer: Vec<u8>,
}

impl Tpm {
    /// TPM2_Quote over `selection` with `nonce` as qualifying data, signed by the
    /// identity key. The PCRs are read before and the read is repeated if they moved
    /// while quoting, so the values always match the quoted digest.
    pub fn quote(
        &mut self,
        key: &IdentityKey,
        selection: &PcrSelection,
        nonce: &[u8],
    ) -> Result<Quote> {
        if nonce.len() > MAX_NONCE_BYTES {
            return Err(self.err(
                "TPM2_Quote",
                format!(
                    "a nonce of {} bytes; at most {MAX_NONCE_BYTES}",
                    nonce.len()
                ),
            ));
        }
        let object = self.identity_object(key.handle)?;
        for _ in 0..3 {
            let pcrs = self.pcr_read(selection)?;
            let data = Data::try_from(nonce.to_vec()).map_err(|e| self.err("TPM2_Quote", e))?;
            let list = tss_selection_list(self, selection)?;
            let scheme = SignatureScheme::EcDsa {
                hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
            };
            let (attest, sig) = self
                .with_password(|ctx| ctx.quote(object.into(), data, scheme, list))
                .map_err(|e| self.err("TPM2_Quote", e))?;
            let attest = attest
                .marshall()
                .map_err(|e| self.err("TPM2_Quote (marshal)", e))?;
            let signature = signature_rs(self, sig)?;
            let parsed = parse_quote_attest(&attest)?;
            if parsed.pcr_digest == pcrs.digest() {
                return Ok(Quote {
                    attest,
                    signature,
                    pcrs,
                    tpm: self.info().clone(),
                });
            }
        }
        Err(self.err(
            "TPM2_Quote",
            "the PCRs kept changing while quoting (three attempts)",
        ))
    }
}

/// Verifies `quote` against the identity key, the nonce the verifier chose, and
/// (optionally) reference PCR values.
pub fn verify_quote(
    quote: &Quote,
    key: &TpmKeyPublic,
    nonce: &[u8],
    reference: Option<&PcrValues>,
) -> Result<VerifiedQuote> {
    let fail = AttestError::Quote;
    if !key.verify(&quote.attest, &quote.signature) {
        return Err(fail(QuoteFailure::SignatureInvalid));
    }
    // The signature is the authentication. `qualifiedSigner` is the key's qualified
    // name, which depends on its parent chain; it is reported, not compared.
    let a = parse_quote_attest(&quote.attest)?;
    if a.extra_data != nonce {
        return Err(fail(QuoteFailure::NonceMismatch));
    }
    let selection = quote.pcrs.selection();
    if !selection.matches_quoted(&a.selection) {
        return Err(fail(QuoteFailure::SelectionMismatch {
            expected: selection.to_string(),
            found: PcrSelection::describe_quoted(&a.selection),
        }));
    }
    if a.pcr_digest != quote.pcrs.digest() {
        return Err(fail(QuoteFailure::ValuesTampered));
    }
    if let Some(r) = reference {
        if r.selection() != selection {
            return Err(fail(QuoteFailure::SelectionMismatch {
                expected: r.selection().to_string(),
                found: selection.to_string(),
            }));
        }
        let differ = r.differing(&quote.pcrs);
        if !differ.is_empty() {
            return Err(fail(QuoteFailure::PcrMismatch(differ)));
        }
    }
    Ok(VerifiedQuote {
        pcrs: quote.pcrs.clone(),
        clock: a.clock,
        reset_count: a.reset_count,
        restart_count: a.restart_count,
        firmware_version: a.firmware_version,
        qualified_signer: a.qualified_signer,
    })
}
