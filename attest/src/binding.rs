//! The binding of SPIFFE identity, TPM key and platform state.
//!
//! `bind` writes an identity statement — the SPIFFE ID, SHA-256 of the SVID's leaf
//! certificate, the TPM identity key's public area, the TPM's self-description and the
//! PCR values — and has the TPM quote the same PCRs with SHA-256(statement bytes) as the
//! nonce. The statement's bytes are kept exactly as signed (base64url in the file), so
//! nothing is re-serialised before it is checked.
//!
//! `verify_binding` works offline: the statement's key must be a restricted,
//! non-exportable TPM key; the quote must verify with it, carry the statement's hash and
//! cover the statement's PCR values; then each expectation the verifier has (the SVID, the
//! TPM key, reference PCRs, no software TPM) is compared, each with its own error.
//!
//! What it proves: whoever controls this TPM key vouched for this SVID while the PCRs
//! had these values. It does not prove the key is in a genuine TPM — that takes the
//! endorsement key certificate chain, which swtpm does not have; `tpm.software` is the
//! TPM's own claim.

use serde::{Deserialize, Serialize};

use crate::error::{AttestError, BindingFailure, Result};
use crate::spiffe::parse_id;
use crate::svid::{unix_now, Svid};
use crate::tpm::{
    verify_quote, IdentityKey, PcrSelection, PcrValues, PcrValuesWire, Quote, QuoteWire, TpmInfo,
    TpmKeyPublic,
};
use crate::{b64, hex};

const STATEMENT_SCHEMA: &str = "capsule-attest/identity-statement/v1";
const BINDING_SCHEMA: &str = "capsule-attest/binding/v1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatementWire {
    schema: String,
    spiffe_id: String,
    /// Hex SHA-256 of the SVID leaf certificate (DER).
    svid_sha256: String,
    svid_not_after: i64,
    /// True when the SVID's public key is the TPM identity key (the CSR path).
    svid_key_in_tpm: bool,
    tpm_key: TpmKeyWire,
    tpm: TpmInfo,
    pcrs: PcrValuesWire,
    created_at: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TpmKeyWire {
    /// base64url of the TPMT_PUBLIC.
    public: String,
    /// RFC 7638 thumbprint, for people (the public area is what is checked).
    thumbprint: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingWire {
    schema: String,
    /// base64url of the statement's exact bytes.
    statement: String,
    quote: QuoteWire,
}

/// A statement and the quote that binds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    statement: Vec<u8>,
    quote: Quote,
}

/// What a verified binding says.
#[derive(Debug, Clone)]
pub struct VerifiedBinding {
    pub spiffe_id: crate::spiffe::SpiffeId,
    pub svid_sha256: String,
    pub svid_not_after: i64,
    pub svid_key_in_tpm: bool,
    pub tpm_key: TpmKeyPublic,
    pub tpm: TpmInfo,
    pub pcrs: PcrValues,
    pub created_at: i64,
}

/// What the verifier expects; `None` skips that comparison.
#[derive(Debug, Default, Clone, Copy)]
pub struct Expectations<'a> {
    pub svid: Option<&'a Svid>,
    pub tpm_key: Option<&'a TpmKeyPublic>,
    pub pcrs: Option<&'a PcrValues>,
    pub allow_software_tpm: bool,
}

/// SHA-256 through verify-core's crypto provider, the one way the workspace hashes.
fn sha256(data: &[u8]) -> [u8; 32] {
    verify_core::crypto::default_backend().sha256_oneshot(data)
}

fn fail(f: BindingFailure) -> AttestError {
    AttestError::Binding(f)
}

impl Binding {
    /// The statement's exact bytes (JSON).
    pub fn statement(&self) -> &[u8] {
        &self.statement
    }

    pub fn quote(&self) -> &Quote {
        &self.quote
    }

    pub fn to_json(&self) -> String {
        let wire = BindingWire {
            schema: BINDING_SCHEMA.into(),
            statement: b64::encode(&self.statement),
            quote: self.quote.to_wire(),
        };
        serde_json::to_string_pretty(&wire).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Binding> {
        let wire: BindingWire = serde_json::from_slice(bytes)
            .map_err(|e| fail(BindingFailure::Malformed(e.to_string())))?;
        if wire.schema != BINDING_SCHEMA {
            return Err(fail(BindingFailure::Malformed(format!(
                "schema `{}` is not `{BINDING_SCHEMA}`",
                wire.schema
            ))));
        }
        let statement = b64::decode(&wire.statement)
            .map_err(|e| fail(BindingFailure::Malformed(format!("statement: {e}"))))?;
        Ok(Binding {
            statement,
            quote: Quote::from_wire(&wire.quote)?,
        })
    }

    /// For tests and tools that need to build a binding from parts (a verifier must
    /// refuse whatever is put together here that the TPM did not sign).
    #[doc(hidden)]
    pub fn from_parts(statement: Vec<u8>, quote: Quote) -> Binding {
        Binding { statement, quote }
    }
}

impl crate::tpm::Tpm {
    /// Makes the statement for `svid` and has the TPM quote it.
    pub fn bind(
        &mut self,
        key: &IdentityKey,
        svid: &Svid,
        selection: &PcrSelection,
    ) -> Result<Binding> {
        for _ in 0..3 {
            let pcrs = self.pcr_read(selection)?;
            let wire = StatementWire {
                schema: STATEMENT_SCHEMA.into(),
                spiffe_id: svid.id().to_string(),
                svid_sha256: hex::encode(&svid.leaf_sha256()),
                svid_not_after: svid.not_after(),
                svid_key_in_tpm: svid.spki() == key.public.spki_der().as_slice(),
                tpm_key: TpmKeyWire {
                    public: b64::encode(key.public.area()),
                    thumbprint: key.public.thumbprint(),
                },
                tpm: self.info().clone(),
                pcrs: pcrs.to_wire(),
                created_at: unix_now(),
            };
            let statement = serde_json::to_vec(&wire)
                .map_err(|e| AttestError::malformed("identity statement", e.to_string()))?;
            let quote = self.quote(key, selection, &sha256(&statement))?;
            // The PCRs may have moved between the read and the quote: then the statement
            // would describe another state; make it again.
            if quote.pcrs == pcrs {
                return Ok(Binding { statement, quote });
            }
        }
        Err(self.err(
            "bind",
            "the PCRs kept changing while binding (three attempts)",
        ))
    }
}

/// Verifies a binding offline.
pub fn verify_binding(binding: &Binding, expect: &Expectations<'_>) -> Result<VerifiedBinding> {
    let malformed = |m: String| fail(BindingFailure::Malformed(m));
    let s: StatementWire =
        serde_json::from_slice(&binding.statement).map_err(|e| malformed(e.to_string()))?;
    if s.schema != STATEMENT_SCHEMA {
        return Err(malformed(format!(
            "schema `{}` is not `{STATEMENT_SCHEMA}`",
            s.schema
        )));
    }
    let area = b64::decode(&s.tpm_key.public).map_err(|e| malformed(format!("tpm_key: {e}")))?;
    let key = TpmKeyPublic::from_area(&area)?;
    let pcrs = PcrValues::from_wire(&s.pcrs)?;

    // The TPM key signed a quote whose nonce is this statement and whose PCRs are the
    // statement's. Until this passes nothing else in the statement is believed.
    match verify_quote(
        &binding.quote,
        &key,
        &sha256(&binding.statement),
        Some(&pcrs),
    ) {
        Ok(_) => {}
        Err(AttestError::Quote(crate::error::QuoteFailure::PcrMismatch(_)))
        | Err(AttestError::Quote(crate::error::QuoteFailure::SelectionMismatch { .. })) => {
            return Err(fail(BindingFailure::QuoteNotForStatement))
        }
        Err(e) => return Err(e),
    }
    let spiffe_id = parse_id(&s.spiffe_id)?;
    if key.thumbprint() != s.tpm_key.thumbprint {
        return Err(malformed("tpm_key.thumbprint is not the key's".into()));
    }

    if s.tpm.software && !expect.allow_software_tpm {
        return Err(fail(BindingFailure::SoftwareTpm(s.tpm.describe())));
    }
    if let Some(svid) = expect.svid {
        let expected = hex::encode(&svid.leaf_sha256());
        if s.svid_sha256 != expected {
            return Err(fail(BindingFailure::AnotherSvid {
                expected,
                found: s.svid_sha256.clone(),
            }));
        }
        if &spiffe_id != svid.id() {
            return Err(fail(BindingFailure::AnotherSpiffeId {
                expected: svid.id().to_string(),
                found: spiffe_id.to_string(),
            }));
        }
        let actual = svid.spki() == key.spki_der().as_slice();
        if actual != s.svid_key_in_tpm {
            let word = |b: bool| if b { "in" } else { "not in" };
            return Err(fail(BindingFailure::KeyClaimFalse {
                claimed: word(s.svid_key_in_tpm),
                actual: word(actual),
            }));
        }
    }
    if let Some(expected) = expect.tpm_key {
        if expected.name() != key.name() {
            return Err(fail(BindingFailure::AnotherTpmKey {
                expected: expected.thumbprint(),
                found: key.thumbprint(),
            }));
        }
    }
    if let Some(reference) = expect.pcrs {
        if reference.selection() != pcrs.selection() {
            return Err(fail(BindingFailure::OtherPcrSelection {
                expected: reference.selection().to_string(),
                found: pcrs.selection().to_string(),
            }));
        }
        let differ = reference.differing(&pcrs);
        if !differ.is_empty() {
            return Err(fail(BindingFailure::OtherPcrs(differ)));
        }
    }
    Ok(VerifiedBinding {
        spiffe_id,
        svid_sha256: s.svid_sha256,
        svid_not_after: s.svid_not_after,
        svid_key_in_tpm: s.svid_key_in_tpm,
        tpm_key: key,
        tpm: s.tpm,
        pcrs,
        created_at: s.created_at,
    })
}
