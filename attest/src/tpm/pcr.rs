//! PCR selections (`sha256:0,7`) and PCR values, with our own bank enum so the rest of
//! the crate never sees tss-esapi types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{AttestError, Result};
use crate::hex;
use crate::tpm::marshal::TPM_ALG_SHA256;

/// The PCR banks we quote and seal to. SHA-1 is deliberately absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PcrBank {
    Sha256,
}

impl PcrBank {
    pub fn name(self) -> &'static str {
        match self {
            PcrBank::Sha256 => "sha256",
        }
    }

    pub(crate) fn tpm_alg(self) -> u16 {
        match self {
            PcrBank::Sha256 => TPM_ALG_SHA256,
        }
    }

    pub fn digest_len(self) -> usize {
        match self {
            PcrBank::Sha256 => 32,
        }
    }
}

/// The highest PCR index a PC-client TPM has.
pub const MAX_PCR: u8 = 23;

/// A set of PCRs in one bank, sorted, without duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PcrSelection {
    bank: PcrBank,
    pcrs: Vec<u8>,
}

impl PcrSelection {
    pub fn new(bank: PcrBank, pcrs: &[u8]) -> Result<PcrSelection> {
        let mut sorted = pcrs.to_vec();
        sorted.sort_unstable();
        let text = || {
            format!(
                "{}:{}",
                bank.name(),
                pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
            )
        };
        if sorted.is_empty() {
            return Err(AttestError::PcrSelection {
                selection: text(),
                message: "select at least one PCR".into(),
            });
        }
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(AttestError::PcrSelection {
                selection: text(),
                message: "a PCR is named twice".into(),
            });
        }
        if let Some(bad) = sorted.iter().find(|p| **p > MAX_PCR) {
            return Err(AttestError::PcrSelection {
                selection: text(),
                message: format!("PCR {bad} does not exist (0 to {MAX_PCR})"),
            });
        }
        Ok(PcrSelection { bank, pcrs: sorted })
    }

    pub fn bank(&self) -> PcrBank {
        self.bank
    }

    pub fn pcrs(&self) -> &[u8] {
        &self.pcrs
    }

    /// The 3-byte select bitmap (PCR n is bit n % 8 of byte n / 8).
    pub(crate) fn bitmap(&self) -> [u8; 3] {
        let mut map = [0u8; 3];
        for p in &self.pcrs {
            map[usize::from(*p / 8)] |= 1 << (p % 8);
        }
        map
    }

    /// TPML_PCR_SELECTION with this one bank, marshalled.
    pub(crate) fn marshal(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&self.bank.tpm_alg().to_be_bytes());
        out.push(3);
        out.extend_from_slice(&self.bitmap());
        out
    }

    /// The selection as quoted: (algorithm, bitmap) pairs.
    pub(crate) fn matches_quoted(&self, quoted: &[(u16, Vec<u8>)]) -> bool {
        match quoted {
            [(alg, map)] => {
                let mut padded = map.clone();
                padded.resize(3.max(map.len()), 0);
                *alg == self.bank.tpm_alg()
                    && padded[..3] == self.bitmap()
                    && padded[3..].iter().all(|b| *b == 0)
            }
            _ => false,
        }
    }

    pub(crate) fn describe_quoted(quoted: &[(u16, Vec<u8>)]) -> String {
        quoted
            .iter()
            .map(|(alg, map)| {
                let name = if *alg == TPM_ALG_SHA256 {
                    "sha256".to_string()
                } else {
                    format!("alg{alg:#06x}")
                };
                let pcrs: Vec<String> = (0..map.len() * 8)
                    .filter(|i| map[i / 8] & (1 << (i % 8)) != 0)
                    .map(|i| i.to_string())
                    .collect();
                format!("{name}:{}", pcrs.join(","))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl FromStr for PcrSelection {
    type Err = AttestError;

    /// `sha256:0,7,16`.
    fn from_str(s: &str) -> Result<PcrSelection> {
        let bad = |message: &str| AttestError::PcrSelection {
            selection: s.to_string(),
            message: message.to_string(),
        };
        let (bank, list) = s
            .split_once(':')
            .ok_or_else(|| bad("expected BANK:N,N (for example sha256:0,7)"))?;
        let bank = match bank {
            "sha256" => PcrBank::Sha256,
            "sha1" => return Err(bad("the SHA-1 bank is not accepted; use sha256")),
            _ => return Err(bad("unknown bank (sha256 only)")),
        };
        let mut pcrs = Vec::new();
        for item in list.split(',') {
            // Plain decimal only: no signs, spaces or leading zeros that hide a typo.
            let ok = !item.is_empty()
                && item.bytes().all(|b| b.is_ascii_digit())
                && (item == "0" || !item.starts_with('0'));
            let n: u8 = if ok { item.parse().ok() } else { None }
                .ok_or_else(|| bad(&format!("`{item}` is not a PCR index")))?;
            pcrs.push(n);
        }
        PcrSelection::new(bank, &pcrs).map_err(|e| match e {
            AttestError::PcrSelection { message, .. } => bad(&message),
            other => other,
        })
    }
}

impl fmt::Display for PcrSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.pcrs.iter().map(u8::to_string).collect();
        write!(f, "{}:{}", self.bank.name(), list.join(","))
    }
}

/// PCR values for a selection, in the selection's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrValues {
    selection: PcrSelection,
    values: Vec<Vec<u8>>,
}

/// Wire form: `{"selection": "sha256:0,7", "values": {"0": "<hex>", "7": "<hex>"}}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PcrValuesWire {
    pub(crate) selection: String,
    /// PCR index (decimal) to hex value, in selection order.
    pub(crate) values: serde_json::Map<String, serde_json::Value>,
}

impl PcrValues {
    pub fn new(selection: PcrSelection, values: Vec<Vec<u8>>) -> Result<PcrValues> {
        if values.len() != selection.pcrs.len() {
            return Err(AttestError::malformed(
                "PCR values",
                format!("{} values for {} PCRs", values.len(), selection.pcrs.len()),
            ));
        }
        if let Some(v) = values
            .iter()
            .find(|v| v.len() != selection.bank.digest_len())
        {
            return Err(AttestError::malformed(
                "PCR values",
                format!(
                    "a {}-byte value in the {} bank",
                    v.len(),
                    selection.bank.name()
                ),
            ));
        }
        Ok(PcrValues { selection, values })
    }

    pub fn selection(&self) -> &PcrSelection {
        &self.selection
    }

    /// (index, value) pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.selection
            .pcrs
            .iter()
            .copied()
            .zip(self.values.iter().map(Vec::as_slice))
    }

    pub fn get(&self, pcr: u8) -> Option<&[u8]> {
        self.iter().find(|(p, _)| *p == pcr).map(|(_, v)| v)
    }

    /// The PCR digest a quote and a PolicyPCR use: the bank's hash over the
    /// concatenated values in selection order (Part 3, 18.4 and 23.7).
    pub fn digest(&self) -> [u8; 32] {
        let mut ctx = verify_core::crypto::default_backend().sha256();
        for v in &self.values {
            ctx.update(v);
        }
        ctx.finish()
    }

    /// Names (`sha256:7`) of the PCRs whose value differs from `other`; PCRs missing on
    /// either side count as different.
    pub fn differing(&self, other: &PcrValues) -> Vec<String> {
        let bank = self.selection.bank.name();
        let mut all: Vec<u8> = self
            .selection
            .pcrs
            .iter()
            .chain(other.selection.pcrs.iter())
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all.into_iter()
            .filter(|p| {
                self.selection.bank != other.selection.bank || self.get(*p) != other.get(*p)
            })
            .map(|p| format!("{bank}:{p}"))
            .collect()
    }

    pub(crate) fn to_wire(&self) -> PcrValuesWire {
        PcrValuesWire {
            selection: self.selection.to_string(),
            values: self
                .iter()
                .map(|(p, v)| (p.to_string(), serde_json::Value::String(hex::encode(v))))
                .collect(),
        }
    }

    pub(crate) fn from_wire(wire: &PcrValuesWire) -> Result<PcrValues> {
        let selection: PcrSelection = wire.selection.parse()?;
        if wire.values.len() != selection.pcrs.len() {
            return Err(AttestError::malformed(
                "PCR values",
                format!(
                    "{} values for selection {}",
                    wire.values.len(),
                    wire.selection
                ),
            ));
        }
        let mut values = Vec::with_capacity(selection.pcrs.len());
        for p in &selection.pcrs {
            let v = wire
                .values
                .get(&p.to_string())
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| {
                    AttestError::malformed("PCR values", format!("no hex value for PCR {p}"))
                })?;
            values.push(
                hex::decode(v)
                    .map_err(|m| AttestError::malformed("PCR values", format!("PCR {p}: {m}")))?,
            );
        }
        PcrValues::new(selection, values)
    }

    /// JSON text of the wire form (for reference files).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_wire()).unwrap_or_default()
    }

    pub fn from_json(text: &[u8]) -> Result<PcrValues> {
        let wire: PcrValuesWire = serde_json::from_slice(text)
            .map_err(|e| AttestError::malformed("PCR values", e.to_string()))?;
        PcrValues::from_wire(&wire)
    }
}

impl super::Tpm {
    /// Reads the selected PCRs (without a session: PCR_Read fails with one set).
    pub fn pcr_read(&mut self, selection: &PcrSelection) -> Result<PcrValues> {
        use tss_esapi::interface_types::algorithm::HashingAlgorithm;
        use tss_esapi::structures::{PcrSelectionList, PcrSlot};
        let mut values = Vec::with_capacity(selection.pcrs.len());
        // A TPML_DIGEST carries at most 8 values: read in chunks of 8.
        for chunk in selection.pcrs.chunks(8) {
            let slots = chunk
                .iter()
                .map(|p| PcrSlot::try_from(1u32 << p))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| self.err("TPM2_PCR_Read", e))?;
            let list = PcrSelectionList::builder()
                .with_selection(HashingAlgorithm::Sha256, &slots)
                .build()
                .map_err(|e| self.err("TPM2_PCR_Read", e))?;
            let (_, read, digests) = self
                .context()
                .execute_without_session(|ctx| ctx.pcr_read(list))
                .map_err(|e| self.err("TPM2_PCR_Read", e))?;
            let read_slots: Vec<PcrSlot> = read
                .get_selections()
                .iter()
                .flat_map(|s| s.selected())
                .collect();
            if read_slots.len() != chunk.len() || digests.value().len() != chunk.len() {
                return Err(self.err(
                    "TPM2_PCR_Read",
                    format!(
                        "the TPM returned {} of {} PCRs (is the sha256 bank allocated?)",
                        digests.value().len(),
                        chunk.len()
                    ),
                ));
            }
            values.extend(digests.value().iter().map(|d| d.value().to_vec()));
        }
        PcrValues::new(selection.clone(), values)
    }

    /// Extends one SHA-256 PCR with `digest` (measuring configuration, and the tests).
    pub fn pcr_extend(&mut self, pcr: u8, digest: &[u8; 32]) -> Result<()> {
        use tss_esapi::handles::PcrHandle;
        use tss_esapi::interface_types::algorithm::HashingAlgorithm;
        use tss_esapi::structures::{Digest, DigestValues};
        if pcr > MAX_PCR {
            return Err(self.err("TPM2_PCR_Extend", format!("PCR {pcr} does not exist")));
        }
        let handle =
            PcrHandle::try_from(u32::from(pcr)).map_err(|e| self.err("TPM2_PCR_Extend", e))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(|e| self.err("TPM2_PCR_Extend", e))?,
        );
        self.with_password(|ctx| ctx.pcr_extend(handle, values))
            .map_err(|e| self.err("TPM2_PCR_Extend", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_parsing() {
        let s: PcrSelection = "sha256:7,0,16".parse().unwrap();
        assert_eq!(s.pcrs(), &[0, 7, 16]);
        assert_eq!(s.to_string(), "sha256:0,7,16");
        assert_eq!(s.bitmap(), [0x81, 0x00, 0x01]);
        for bad in [
            "sha256:",
            "sha256:0,,7",
            "sha256:24",
            "sha256:07",
            "sha256:+1",
            "sha256:1,1",
            "sha1:0",
            "sha384:0",
            "0,7",
            "sha256: 0",
        ] {
            assert!(bad.parse::<PcrSelection>().is_err(), "{bad}");
        }
    }

    #[test]
    fn differing_names_each_changed_pcr() {
        let sel: PcrSelection = "sha256:0,7".parse().unwrap();
        let a = PcrValues::new(sel.clone(), vec![vec![0; 32], vec![0; 32]]).unwrap();
        let b = PcrValues::new(sel, vec![vec![0; 32], vec![1; 32]]).unwrap();
        assert_eq!(a.differing(&b), vec!["sha256:7".to_string()]);
        assert!(a.differing(&a).is_empty());
        let json = b.to_json();
        assert_eq!(PcrValues::from_json(json.as_bytes()).unwrap(), b);
    }
}
