//! A strict reader for the TPM structures a verifier receives from elsewhere
//! (TPMS_ATTEST of a quote, TPMT_PUBLIC of a key). Big-endian, sizes checked against
//! what is left, and no trailing bytes: the same bytes can mean only one thing.
//! TPM 2.0 Library, Part 2 (Structures) gives the layouts cited below.

use crate::error::{AttestError, Result};

pub(crate) struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(what: &'static str, bytes: &'a [u8]) -> Reader<'a> {
        Reader {
            what,
            bytes,
            pos: 0,
        }
    }

    fn err(&self, message: impl Into<String>) -> AttestError {
        AttestError::malformed(self.what, message)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| self.err(format!("truncated at byte {}", self.pos)))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A TPM2B: a u16 size, then that many bytes (at most `max`).
    pub(crate) fn tpm2b(&mut self, max: usize) -> Result<&'a [u8]> {
        let size = usize::from(self.u16()?);
        if size > max {
            return Err(self.err(format!("a sized buffer of {size} bytes exceeds {max}")));
        }
        self.take(size)
    }

    pub(crate) fn finish(self) -> Result<()> {
        if self.pos != self.bytes.len() {
            return Err(self.err(format!("{} trailing bytes", self.bytes.len() - self.pos)));
        }
        Ok(())
    }
}

pub(crate) const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
pub(crate) const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
pub(crate) const TPM_ALG_SHA256: u16 = 0x000b;
pub(crate) const TPM_ALG_ECC: u16 = 0x0023;
pub(crate) const TPM_ALG_ECDSA: u16 = 0x0018;
pub(crate) const TPM_ALG_NULL: u16 = 0x0010;
pub(crate) const TPM_ECC_NIST_P256: u16 = 0x0003;
/// TPM_CC_PolicyPCR (Part 2, 6.5.2).
pub(crate) const TPM_CC_POLICY_PCR: u32 = 0x0000_017f;

/// Object attribute bits (Part 2, 8.3 TPMA_OBJECT).
pub(crate) mod attr {
    pub(crate) const FIXED_TPM: u32 = 1 << 1;
    pub(crate) const FIXED_PARENT: u32 = 1 << 4;
    pub(crate) const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub(crate) const RESTRICTED: u32 = 1 << 16;
    pub(crate) const DECRYPT: u32 = 1 << 17;
    pub(crate) const SIGN: u32 = 1 << 18;
}

/// The quote part of a TPMS_ATTEST (Part 2, 10.12.12 and 10.12.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QuoteAttest {
    pub(crate) magic: u32,
    pub(crate) tag: u16,
    pub(crate) qualified_signer: Vec<u8>,
    pub(crate) extra_data: Vec<u8>,
    pub(crate) clock: u64,
    pub(crate) reset_count: u32,
    pub(crate) restart_count: u32,
    pub(crate) safe: bool,
    pub(crate) firmware_version: u64,
    /// (hash algorithm, select bitmap) per bank, as quoted.
    pub(crate) selection: Vec<(u16, Vec<u8>)>,
    pub(crate) pcr_digest: Vec<u8>,
}

/// Parses a TPMS_ATTEST that must be a quote; anything else is an error.
pub(crate) fn parse_quote_attest(bytes: &[u8]) -> Result<QuoteAttest> {
    let mut r = Reader::new("TPMS_ATTEST", bytes);
    let magic = r.u32()?;
    let tag = r.u16()?;
    if magic != TPM_GENERATED_VALUE || tag != TPM_ST_ATTEST_QUOTE {
        return Err(AttestError::Quote(crate::error::QuoteFailure::NotAQuote {
            magic,
            tag,
        }));
    }
    // TPM2B_NAME: at most a handle or nameAlg + a SHA-512 digest.
    let qualified_signer = r.tpm2b(2 + 64)?.to_vec();
    // TPM2B_DATA: at most sizeof(TPMT_HA).
    let extra_data = r.tpm2b(2 + 64)?.to_vec();
    let clock = r.u64()?;
    let reset_count = r.u32()?;
    let restart_count = r.u32()?;
    let safe = match r.u8()? {
        0 => false,
        1 => true,
        other => {
            return Err(AttestError::malformed(
                "TPMS_ATTEST",
                format!("clockInfo.safe is {other}"),
            ))
        }
    };
    let firmware_version = r.u64()?;
    // TPMS_QUOTE_INFO: TPML_PCR_SELECTION then TPM2B_DIGEST.
    let count = r.u32()?;
    if count > 16 {
        return Err(AttestError::malformed(
            "TPMS_ATTEST",
            format!("{count} PCR banks"),
        ));
    }
    let mut selection = Vec::new();
    for _ in 0..count {
        let alg = r.u16()?;
        let size = usize::from(r.u8()?);
        if size > 4 {
            return Err(AttestError::malformed(
                "TPMS_ATTEST",
                format!("sizeofSelect {size}"),
            ));
        }
        selection.push((alg, r.take(size)?.to_vec()));
    }
    let pcr_digest = r.tpm2b(64)?.to_vec();
    r.finish()?;
    Ok(QuoteAttest {
        magic,
        tag,
        qualified_signer,
        extra_data,
        clock,
        reset_count,
        restart_count,
        safe,
        firmware_version,
        selection,
        pcr_digest,
    })
}

/// An ECC TPMT_PUBLIC (Part 2, 12.2.4 with 12.2.3.6 TPMS_ECC_PARMS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EccPublicArea {
    pub(crate) name_alg: u16,
    pub(crate) attributes: u32,
    pub(crate) auth_policy: Vec<u8>,
    pub(crate) symmetric: u16,
    pub(crate) scheme: u16,
    pub(crate) scheme_hash: Option<u16>,
    pub(crate) curve: u16,
    pub(crate) kdf: u16,
    pub(crate) x: Vec<u8>,
    pub(crate) y: Vec<u8>,
}

pub(crate) fn parse_ecc_public(bytes: &[u8]) -> Result<EccPublicArea> {
    let mut r = Reader::new("TPMT_PUBLIC", bytes);
    let alg = r.u16()?;
    if alg != TPM_ALG_ECC {
        return Err(AttestError::malformed(
            "TPMT_PUBLIC",
            format!("type {alg:#06x} is not ECC"),
        ));
    }
    let name_alg = r.u16()?;
    let attributes = r.u32()?;
    let auth_policy = r.tpm2b(64)?.to_vec();
    // TPMT_SYM_DEF_OBJECT: algorithm, then keyBits and mode unless NULL.
    let symmetric = r.u16()?;
    if symmetric != TPM_ALG_NULL {
        r.u16()?;
        r.u16()?;
    }
    // TPMT_ECC_SCHEME: scheme, then the hash unless NULL (ECDSA has only the hash).
    let scheme = r.u16()?;
    let scheme_hash = if scheme == TPM_ALG_NULL {
        None
    } else if scheme == TPM_ALG_ECDSA {
        Some(r.u16()?)
    } else {
        return Err(AttestError::malformed(
            "TPMT_PUBLIC",
            format!("ECC scheme {scheme:#06x} is not ECDSA"),
        ));
    };
    let curve = r.u16()?;
    // TPMT_KDF_SCHEME: scheme, then the hash unless NULL.
    let kdf = r.u16()?;
    if kdf != TPM_ALG_NULL {
        r.u16()?;
    }
    let x = r.tpm2b(66)?.to_vec();
    let y = r.tpm2b(66)?.to_vec();
    r.finish()?;
    Ok(EccPublicArea {
        name_alg,
        attributes,
        auth_policy,
        symmetric,
        scheme,
        scheme_hash,
        curve,
        kdf,
        x,
        y,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_truncation_and_trailing_bytes() {
        let mut r = Reader::new("t", &[0, 3, 1, 2]);
        assert!(r.tpm2b(8).is_err());
        let mut r = Reader::new("t", &[0, 1, 7, 9]);
        assert_eq!(r.tpm2b(8).unwrap(), &[7]);
        assert!(r.finish().is_err());
        let mut r = Reader::new("t", &[0, 9]);
        assert!(r.tpm2b(8).is_err(), "size above the maximum");
    }

    #[test]
    fn quote_attest_rejects_other_structures() {
        // A TPMS_ATTEST of type CERTIFY (0x8017) is not a quote.
        let mut b = TPM_GENERATED_VALUE.to_be_bytes().to_vec();
        b.extend_from_slice(&0x8017u16.to_be_bytes());
        assert!(matches!(
            parse_quote_attest(&b),
            Err(AttestError::Quote(
                crate::error::QuoteFailure::NotAQuote { .. }
            ))
        ));
    }
}
