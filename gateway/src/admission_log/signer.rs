//! Signing and checking checkpoints: the one seam between the admission log and the
//! custody signer (docs/state.md, "Signed checkpoints").
//!
//! Interim: until `crate::custody`'s `CustodySigner` is merged, the log signs with its
//! own software ES256 key, kept in `STATE/log/checkpoint.private.jwk.json` (0600,
//! created once, durably), and the signature says `"kind": "software"` with the
//! public JWK, as the custody contract's software signature does. Only this file
//! changes when the custody signer takes over.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use verify_core::crypto::default_backend;
use verify_core::keys::{parse_jwk, ParsedJwk, SigningKey, Verifier};
use verify_core::Alg;

use super::LogError;

/// The key file of the software signer, under the log directory.
pub const KEY_FILE: &str = "checkpoint.private.jwk.json";
const KID: &str = "log-checkpoint";

/// A signature over a checkpoint's exact bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckpointSignature {
    /// A software ES256 key (no TPM): `signature` is base64url `r || s`.
    Software {
        alg: String,
        jwk: serde_json::Value,
        signature: String,
    },
}

/// Who signed a checkpoint, as `log verify` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignerInfo {
    pub kind: &'static str,
    /// The public key's JWK thumbprint-like id (its x coordinate).
    pub key: String,
}

/// Signs checkpoints.
pub struct CheckpointSigner {
    key: SigningKey,
    public: serde_json::Value,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn key_path(log_dir: &Path) -> PathBuf {
    log_dir.join(KEY_FILE)
}

fn read_key(path: &Path) -> Result<Option<ParsedJwk>, LogError> {
    match crate::pack::read_bounded(path, 64 * 1024) {
        Ok(bytes) => parse_jwk(&bytes)
            .map(Some)
            .map_err(|e| LogError::Key {
                path: path.to_path_buf(),
                message: format!("{}: {}", e.field, e.message),
            }),
        Err(crate::pack::PackError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(LogError::Key {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

impl CheckpointSigner {
    /// The software signer of the state whose log directory is `log_dir`, its key
    /// created (durably, 0600) on first use.
    pub fn software(log_dir: &Path) -> Result<CheckpointSigner, LogError> {
        let path = key_path(log_dir);
        let jwk = match read_key(&path)? {
            Some(j) => j,
            None => {
                crate::durable::create_dirs(log_dir, 0o700)?;
                let jwk = ParsedJwk::generate(KID, Alg::Es256, default_backend())
                    .map_err(|e| LogError::Key {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                let bytes = serde_json::to_vec(&jwk.to_json(true)).unwrap_or_default();
                match crate::durable::write_new(&path, &bytes, 0o600) {
                    Ok(()) => jwk,
                    // Another process created it first: that key is the one.
                    Err(crate::durable::DurableError::Exists { .. }) => {
                        read_key(&path)?.ok_or_else(|| LogError::Key {
                            path: path.clone(),
                            message: "vanished after it was created".into(),
                        })?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let key = SigningKey::from_jwk(&jwk, default_backend()).map_err(|e| LogError::Key {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(CheckpointSigner {
            key,
            public: jwk.to_json(false),
        })
    }

    /// The signature document over `payload`, as bytes.
    pub fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, LogError> {
        let sig = self.key.sign(payload).map_err(|e| LogError::Sign(e.to_string()))?;
        let doc = CheckpointSignature::Software {
            alg: "ES256".into(),
            jwk: self.public.clone(),
            signature: verify_core::b64::encode(&sig),
        };
        serde_json::to_vec(&doc).map_err(|e| LogError::Sign(e.to_string()))
    }

    /// What a checkpoint of this state must be signed by.
    pub fn expect(&self) -> Expect {
        Expect {
            public: Some(self.public.clone()),
        }
    }
}

/// The signer a checkpoint must name (`None`: any valid signature, reported).
#[derive(Debug, Clone, Default)]
pub struct Expect {
    public: Option<serde_json::Value>,
}

impl Expect {
    /// The key of the state whose log directory is `log_dir`, if it has one.
    pub fn of_state(log_dir: &Path) -> Result<Expect, LogError> {
        Ok(Expect {
            public: read_key(&key_path(log_dir))?.map(|j| j.to_json(false)),
        })
    }
}

/// Checks `sig` (a signature document's bytes) over `payload`, offline.
pub fn verify(payload: &[u8], sig: &[u8], expect: &Expect) -> Result<SignerInfo, String> {
    let doc: CheckpointSignature =
        serde_json::from_slice(sig).map_err(|e| format!("unreadable signature: {e}"))?;
    let CheckpointSignature::Software {
        alg,
        jwk,
        signature,
    } = doc;
    if alg != "ES256" {
        return Err(format!("alg {alg} (only ES256)"));
    }
    if let Some(want) = &expect.public {
        if want != &jwk {
            return Err("signed by another key than this state's".into());
        }
    }
    let jwks = serde_json::json!({ "keys": [jwk] });
    let store = verify_core::keys::KeyStore::from_jwks(
        &serde_json::to_vec(&jwks).unwrap_or_default(),
        Path::new("<checkpoint signature>"),
        default_backend(),
    )
    .map_err(|e| format!("bad public key: {e}"))?;
    let key = store.get(KID).ok_or("the public key has another kid")?;
    let Verifier::Es256(v) = key.verifier() else {
        return Err("not an ES256 key".into());
    };
    let raw: [u8; 64] = verify_core::b64::decode_exact::<64>(signature.as_bytes())
        .ok()
        .flatten()
        .ok_or("the signature is not 64 bytes of base64url")?;
    if !v.verify(payload, &raw) {
        return Err("the signature does not verify".into());
    }
    Ok(SignerInfo {
        kind: "software",
        key: jwk["x"].as_str().unwrap_or_default().to_string(),
    })
}
