//! Sealed keys: the HS256 keys a policy names in `trust.sealed`, unsealed through the
//! TPM when the policy is loaded. verify-core has no TPM code; it calls back here.

use std::path::{Path, PathBuf};

use attest::tpm::{SealedKey, Tcti, Tpm};
use attest::AttestError;
use verify_core::keys::{KeyMaterial, ParsedJwk};
use verify_core::Alg;

/// Why a sealed key could not be unsealed; the policy loader names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnsealError {
    #[error("{}: {source}", file.display())]
    OpenTpm {
        file: PathBuf,
        #[source]
        source: AttestError,
    },
    #[error("{}: sealed key, but no [tpm] is configured", file.display())]
    NoTpm { file: PathBuf },
    /// Reading the sealed file, or the TPM refusing it (the PCRs changed, another TPM).
    #[error(transparent)]
    Unseal(#[from] AttestError),
}

/// Where the TPM comes from.
#[derive(Debug)]
enum Source {
    /// Opened on the first sealed key, from this TCTI, else `$TCTI`, else the device
    /// (`verify`, `admit`, `run`: a policy without sealed keys never touches a TPM).
    Lazy(Option<String>),
    /// Opened already, or not configured (`serve`).
    Given,
}

/// Unseals `trust.sealed` files, holding the TPM it opened (or was given).
#[derive(Debug)]
pub struct SealedKeys {
    source: Source,
    tpm: Option<Tpm>,
}

impl SealedKeys {
    /// A TPM opened on first use: `tcti`, else `$TCTI`, else `device:/dev/tpmrm0`.
    pub fn lazy(tcti: Option<&str>) -> SealedKeys {
        SealedKeys {
            source: Source::Lazy(tcti.map(str::to_string)),
            tpm: None,
        }
    }

    /// This TPM, or none (a sealed key is then refused).
    pub fn with_tpm(tpm: Option<Tpm>) -> SealedKeys {
        SealedKeys {
            source: Source::Given,
            tpm,
        }
    }

    /// The TPM in use, if one was opened or given.
    pub fn tpm(&self) -> Option<&Tpm> {
        self.tpm.as_ref()
    }

    pub fn into_tpm(self) -> Option<Tpm> {
        self.tpm
    }

    /// Unseals one `trust.sealed` file into an HS256 key.
    pub fn unseal(&mut self, file: &Path) -> Result<ParsedJwk, UnsealError> {
        if self.tpm.is_none() {
            if let Source::Lazy(tcti) = &self.source {
                let opened = Tcti::from_config_or_env(tcti.as_deref())
                    .and_then(|t| Tpm::open(&t))
                    .map_err(|source| UnsealError::OpenTpm {
                        file: file.to_path_buf(),
                        source,
                    })?;
                self.tpm = Some(opened);
            }
        }
        let Some(tpm) = self.tpm.as_mut() else {
            return Err(UnsealError::NoTpm {
                file: file.to_path_buf(),
            });
        };
        let sealed = SealedKey::load(file)?;
        let key = tpm.unseal(&sealed, file)?;
        Ok(ParsedJwk {
            kid: key.kid.clone(),
            alg: Alg::Hs256,
            material: KeyMaterial::Hs256 {
                secret: key.into_secret(),
            },
        })
    }
}
