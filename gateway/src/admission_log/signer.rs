//! Signing and checking checkpoints with the custody signer ([`crate::custody`]): the
//! one seam between the admission log and it. Without a TPM the state's software
//! custody key (`STATE/custody/`) signs, and a checkpoint must be signed by that key
//! (its thumbprint pinned); a TPM signer's quote is checked offline by custody.

use std::path::Path;

use crate::custody::{verify_custody, CustodyExpect, CustodySignature, CustodySigner};

use super::LogError;

/// Who signed a checkpoint, as `log verify` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SignerInfo {
    pub kind: &'static str,
    pub key_thumbprint: String,
}

/// Signs checkpoints.
#[derive(Debug)]
pub struct CheckpointSigner(CustodySigner);

impl CheckpointSigner {
    /// The software custody signer of the state directory `state_dir` (its key
    /// created durably, 0600, on first use).
    pub fn software(state_dir: &Path) -> Result<CheckpointSigner, LogError> {
        let dir = crate::layout::StateLayout::new(state_dir).custody();
        CustodySigner::software(&dir)
            .map(CheckpointSigner)
            .map_err(|e| LogError::Sign(e.to_string()))
    }

    pub fn new(signer: CustodySigner) -> CheckpointSigner {
        CheckpointSigner(signer)
    }

    /// The signature's bytes over `payload`: compact JSON, one line (a segment file
    /// holds it as its last line).
    pub fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, LogError> {
        let sig = self
            .0
            .sign(payload)
            .map_err(|e| LogError::Sign(e.to_string()))?;
        serde_json::to_vec(&sig).map_err(|e| LogError::Sign(e.to_string()))
    }

    /// What a checkpoint of this state must be signed by: this signer's kind and key.
    pub fn expect(&self) -> Expect {
        Expect {
            kind: Some(self.0.kind().as_str()),
            software: None,
            thumbprint: Some(self.0.key_thumbprint()),
        }
    }
}

/// The signer a checkpoint must show; what is `None` is not compared.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// Only this kind (`software`, `tpm`) of signature is accepted.
    pub kind: Option<&'static str>,
    /// A software signature must be by this key.
    pub software: Option<String>,
    /// The signature must be by this key (software key or TPM identity key).
    pub thumbprint: Option<String>,
}

impl Expect {
    /// What a process without a signer of its own (`verify`, `log verify`) pins: a
    /// software signature must be by the state's own software custody key, when it
    /// has one. A TPM signature is checked (the quote) and reported, its key not
    /// pinned here.
    pub fn of_state(state_dir: &Path) -> Result<Expect, LogError> {
        let dir = crate::layout::StateLayout::new(state_dir).custody();
        if !dir.join(crate::custody::SOFTWARE_KEY_FILE).exists() {
            return Ok(Expect::default());
        }
        Ok(Expect {
            software: CheckpointSigner::software(state_dir)?.expect().thumbprint,
            ..Expect::default()
        })
    }
}

/// Checks `sig` (a signature's bytes) over `payload`, offline.
pub fn verify(payload: &[u8], sig: &[u8], expect: &Expect) -> Result<SignerInfo, String> {
    let sig = CustodySignature::parse(sig).map_err(|e| e.to_string())?;
    let info =
        verify_custody(payload, &sig, &CustodyExpect::default()).map_err(|e| e.to_string())?;
    let kind = info.kind.as_str();
    if let Some(want) = expect.kind {
        if want != kind {
            return Err(format!(
                "a {kind} signature, but this state signs with a {want} signer"
            ));
        }
    }
    let pinned = match kind {
        "software" => expect.thumbprint.as_ref().or(expect.software.as_ref()),
        _ => expect.thumbprint.as_ref(),
    };
    if let Some(want) = pinned {
        if *want != info.key_thumbprint {
            return Err(format!(
                "signed by key {}, not by this state's key {want}",
                info.key_thumbprint
            ));
        }
    }
    Ok(SignerInfo {
        kind,
        key_thumbprint: info.key_thumbprint,
    })
}
