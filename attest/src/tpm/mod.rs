//! The TPM, through tss-esapi and nothing else: every other module talks to [`Tpm`] and
//! sees only this crate's types (the rust-keylime habit of one wrapper).
//!
//! Rules kept here, learnt against swtpm and libtss2 3.2.1:
//! - PCR_Read, StartAuthSession and the policy commands run without any session (with a
//!   password session set they fail with TPM_RC_VALUE); only commands that authorize an
//!   object or hierarchy get the password session, and only for that one call.
//! - A TPM without a resource manager (swtpm on a socket) holds 3 transient objects and
//!   keeps them after a crashed client: every handle loaded here is flushed by a guard,
//!   on success and on error alike.
//! - An unreachable TPM is an error naming the TCTI, never a panic.

mod identity;
pub(crate) mod marshal;
mod pcr;
mod quote;
mod seal;
mod worker;

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, EccPoint, EccScheme, KeyDerivationFunctionScheme, Public, PublicBuilder,
    PublicEccParametersBuilder, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

use crate::error::{AttestError, Result};

pub use identity::{IdentityKey, TpmKeyPublic, DEFAULT_IDENTITY_HANDLE, MAX_SIGNED_MESSAGE};
pub(crate) use pcr::PcrValuesWire;
pub use pcr::{PcrBank, PcrSelection, PcrValues, MAX_PCR};
pub(crate) use quote::QuoteWire;
pub use quote::{verify_quote, Quote, VerifiedQuote, MAX_NONCE_BYTES};
pub use seal::{SealedKey, UnsealedKey, MAX_SECRET_BYTES, MIN_SECRET_BYTES};
pub use worker::TpmWorker;

/// The TCTI used when neither configuration nor the `TCTI` variable names one: the
/// kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// A validated TCTI string (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`,
/// `mssim:...`, `tabrmd:...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcti(String);

impl Tcti {
    pub fn parse(s: &str) -> Result<Tcti> {
        TctiNameConf::from_str(s).map_err(|_| AttestError::TctiInvalid {
            tcti: s.to_string(),
            message: "expected device:PATH, swtpm:host=H,port=N, mssim:host=H,port=N or tabrmd:..."
                .into(),
        })?;
        Ok(Tcti(s.to_string()))
    }

    /// Configuration first, then the `TCTI` environment variable, then
    /// [`DEFAULT_TCTI`].
    pub fn from_config_or_env(configured: Option<&str>) -> Result<Tcti> {
        match configured {
            Some(s) => Tcti::parse(s),
            None => match std::env::var("TCTI") {
                Ok(s) if !s.is_empty() => Tcti::parse(&s),
                _ => Tcti::parse(DEFAULT_TCTI),
            },
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for TCTIs that can only reach a simulator.
    fn is_simulator(&self) -> bool {
        self.0.starts_with("swtpm") || self.0.starts_with("mssim")
    }
}

impl std::fmt::Display for Tcti {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why no TPM is reachable at a TCTI, found before libtss2 is asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnreachableTpm {
    #[error("{0} does not exist (no TPM, or its driver is not loaded)")]
    NoDevice(String),
    #[error("{addr}: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no address")]
    NoAddress(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// libtss2 reports a missing device or a refused connection only as an unrecognized
/// response code; look first, to say what is wrong.
fn precheck(tcti: &Tcti) -> std::result::Result<(), UnreachableTpm> {
    let (kind, conf) = tcti.as_str().split_once(':').unwrap_or((tcti.as_str(), ""));
    match kind {
        "device" => {
            let path = if conf.is_empty() { "/dev/tpmrm0" } else { conf };
            if !std::path::Path::new(path).exists() {
                return Err(UnreachableTpm::NoDevice(path.to_string()));
            }
        }
        "swtpm" | "mssim" => {
            let field = |name: &str| {
                conf.split(',')
                    .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            };
            let host = field("host").unwrap_or("localhost");
            let port = field("port").unwrap_or("2321");
            let addr = format!("{host}:{port}");
            let resolved = std::net::ToSocketAddrs::to_socket_addrs(&addr)
                .map_err(|source| UnreachableTpm::Resolve {
                    addr: addr.clone(),
                    source,
                })?
                .next()
                .ok_or_else(|| UnreachableTpm::NoAddress(addr.clone()))?;
            std::net::TcpStream::connect_timeout(&resolved, std::time::Duration::from_secs(3))
                .map_err(|source| UnreachableTpm::Connect { addr, source })?;
        }
        _ => {}
    }
    Ok(())
}

/// What the TPM says it is. `software` is true for swtpm/libtpms (vendor string
/// `SW TPM`) and for any TPM reached through a simulator TCTI; evidence carries it so a
/// verifier can refuse software TPMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmInfo {
    pub manufacturer: String,
    pub vendor: String,
    pub firmware_version: String,
    pub software: bool,
}

impl TpmInfo {
    pub fn describe(&self) -> String {
        format!(
            "{} TPM, manufacturer `{}`, vendor `{}`, firmware {}",
            if self.software {
                "software"
            } else {
                "hardware/firmware"
            },
            self.manufacturer,
            self.vendor,
            self.firmware_version
        )
    }
}

/// An open TPM.
#[derive(Debug)]
pub struct Tpm {
    ctx: Context,
    tcti: Tcti,
    info: TpmInfo,
    /// The identity key's ESYS handle once resolved (a TPM2_ReadPublic saved per sign).
    identity: Option<(u32, ObjectHandle)>,
}

fn ascii_of(v: u32) -> String {
    v.to_be_bytes()
        .iter()
        .filter(|b| b.is_ascii_graphic())
        .map(|b| char::from(*b))
        .collect()
}

impl Tpm {
    /// Connects through `tcti`. Fails with [`AttestError::TpmUnreachable`] naming the
    /// TCTI when nothing answers.
    pub fn open(tcti: &Tcti) -> Result<Tpm> {
        let conf = TctiNameConf::from_str(tcti.as_str()).map_err(|_| AttestError::TctiInvalid {
            tcti: tcti.to_string(),
            message: "not a TCTI configuration".into(),
        })?;
        precheck(tcti).map_err(|e| AttestError::TpmUnreachable {
            tcti: tcti.to_string(),
            message: e.to_string(),
        })?;
        let mut ctx = Context::new(conf).map_err(|e| AttestError::TpmUnreachable {
            tcti: tcti.to_string(),
            message: e.to_string(),
        })?;
        let mut prop = |tag: PropertyTag| -> Result<u32> {
            ctx.get_tpm_property(tag)
                .map(Option::unwrap_or_default)
                .map_err(|e| AttestError::TpmUnreachable {
                    tcti: tcti.to_string(),
                    message: format!("TPM2_GetCapability: {e}"),
                })
        };
        let manufacturer = ascii_of(prop(PropertyTag::Manufacturer)?);
        let vendor = [
            PropertyTag::VendorString1,
            PropertyTag::VendorString2,
            PropertyTag::VendorString3,
            PropertyTag::VendorString4,
        ]
        .into_iter()
        .map(|t| prop(t).map(ascii_of))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
        let fw1 = prop(PropertyTag::FirmwareVersion1)?;
        let fw2 = prop(PropertyTag::FirmwareVersion2)?;
        let software = tcti.is_simulator() || vendor == "SW TPM";
        let info = TpmInfo {
            manufacturer,
            vendor,
            firmware_version: format!("{fw1:08x}.{fw2:08x}"),
            software,
        };
        Ok(Tpm {
            ctx,
            tcti: tcti.clone(),
            info,
            identity: None,
        })
    }

    pub fn info(&self) -> &TpmInfo {
        &self.info
    }

    pub fn tcti(&self) -> &Tcti {
        &self.tcti
    }

    pub(crate) fn err(&self, command: &'static str, e: impl std::fmt::Display) -> AttestError {
        AttestError::Tpm {
            command,
            tcti: self.tcti.to_string(),
            message: e.to_string(),
        }
    }

    /// Runs `f` with the password session (empty auth) set, and clears it afterwards.
    pub(crate) fn with_password<T>(
        &mut self,
        f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> tss_esapi::Result<T> {
        self.ctx
            .execute_with_session(Some(AuthSession::Password), f)
    }

    /// Creates the deterministic storage primary: the TCG ECC P-256 SRK template
    /// (restricted decrypt, AES-128-CFB, noDA), so the same owner seed always yields the
    /// same key and nothing needs to be persisted for it.
    pub(crate) fn primary(&mut self) -> Result<Transient<'_>> {
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()
            .map_err(|e| self.err("TPM2_CreatePrimary (template)", e))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_ecc_scheme(EccScheme::Null)
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()
                    .map_err(|e| self.err("TPM2_CreatePrimary (template)", e))?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(|e| self.err("TPM2_CreatePrimary (template)", e))?;
        let handle = self
            .with_password(|ctx| {
                ctx.create_primary(Hierarchy::Owner, public, None, None, None, None)
            })
            .map_err(|e| self.err("TPM2_CreatePrimary", e))?
            .key_handle;
        Ok(Transient {
            tpm: self,
            handle: handle.into(),
        })
    }

    /// Number of transient objects currently loaded in the TPM (tests check that
    /// nothing leaks).
    pub fn loaded_transient_objects(&mut self) -> Result<usize> {
        self.count_handles(0x8000_0000)
    }

    /// Number of loaded sessions.
    pub fn loaded_sessions(&mut self) -> Result<usize> {
        // HMAC and policy sessions: 0x02xxxxxx (loaded) and 0x03xxxxxx.
        Ok(self.count_handles(0x0200_0000)? + self.count_handles(0x0300_0000)?)
    }

    fn count_handles(&mut self, first: u32) -> Result<usize> {
        let (data, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, first, 64)
            .map_err(|e| self.err("TPM2_GetCapability(handles)", e))?;
        match data {
            CapabilityData::Handles(list) => Ok(list
                .into_inner()
                .into_iter()
                .filter(|h| u32::from(*h) >> 24 == first >> 24)
                .count()),
            _ => Err(self.err("TPM2_GetCapability(handles)", "unexpected capability data")),
        }
    }

    pub(crate) fn persistent_exists(&mut self, handle: u32) -> Result<bool> {
        let (data, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, handle, 1)
            .map_err(|e| self.err("TPM2_GetCapability(handles)", e))?;
        match data {
            CapabilityData::Handles(list) => Ok(list
                .into_inner()
                .into_iter()
                .any(|h| u32::from(h) == handle)),
            _ => Err(self.err("TPM2_GetCapability(handles)", "unexpected capability data")),
        }
    }

    pub(crate) fn context(&mut self) -> &mut Context {
        &mut self.ctx
    }
}

/// A loaded transient object (or session), flushed when the guard drops — on every
/// path, so a failed command never leaves one of swtpm's 3 slots occupied.
pub(crate) struct Transient<'t> {
    pub(crate) tpm: &'t mut Tpm,
    pub(crate) handle: ObjectHandle,
}

impl Transient<'_> {
    pub(crate) fn key(&self) -> KeyHandle {
        self.handle.into()
    }
}

impl Drop for Transient<'_> {
    fn drop(&mut self) {
        // Nothing useful can be done with a failed flush here; the TPM reports the
        // leak to the next caller as TPM_RC_OBJECT_MEMORY, and tests count handles.
        let _ = self.tpm.ctx.flush_context(self.handle);
    }
}

/// The identity key's template: a restricted, non-exportable ECDSA P-256 signing key.
/// Restricted means the TPM signs only digests it computed itself (TPM2_Hash with a
/// ticket), so no caller can make it sign a forged TPMS_ATTEST: the same key can sign
/// quotes, CSRs and TLS handshakes.
pub(crate) fn identity_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(tss_esapi::structures::HashScheme::new(
                    HashingAlgorithm::Sha256,
                )))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}
