//! `capsule-gateway attest ...`: the runner's TPM identity, sealed keys, quotes and the
//! SPIFFE binding; and the runner identity and sealed keys `verify`/`admit` use.
//!
//! The TPM is reached through `--tcti`, else the `TCTI` environment variable, else
//! `device:/dev/tpmrm0`. Exit codes: 0 success (or valid), 1 a quote, binding or sealed
//! key was refused, 2 usage or configuration error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ::attest::binding::{verify_binding, Binding, Expectations};
use ::attest::csr::{tpm_csr, DevCa};
use ::attest::svid::{FileSource, IdentitySource, Svid, WorkloadApiSource};
use ::attest::tpm::{
    verify_quote, PcrSelection, PcrValues, Quote, SealedKey, Tcti, Tpm, TpmKeyPublic,
};
use ::attest::{b64, hex, AttestError};
use clap::Subcommand;
use serde_json::json;
use verify_core::keys::{parse_jwk, KeyMaterial};
use verify_core::SpiffeId;

use super::{usage, EXIT_DENIED};
use crate::custody::CustodySigner;
use crate::sealed::SealedKeys;
use crate::GatewayError;

/// Where this runner's identity comes from (for `verify`/`admit`).
#[derive(Debug, clap::Args)]
pub struct IdentityArgs {
    /// SVID directory (svid.pem, svid_key.pem, bundle.pem): its SPIFFE ID is the runner
    /// identity when --runner is not given.
    #[arg(long, value_name = "DIR", conflicts_with = "workload_api")]
    pub svid: Option<PathBuf>,
    /// SPIFFE Workload API endpoint (unix:///path/agent.sock): the SVID's SPIFFE ID is the
    /// runner identity when --runner is not given.
    #[arg(long, value_name = "ENDPOINT")]
    pub workload_api: Option<String>,
    /// TPM for the policy's sealed keys (default: $TCTI, else device:/dev/tpmrm0).
    /// Given here, the same TPM also signs every evidence index: a TPM2_Quote by the
    /// identity key at --identity-handle over --custody-pcrs. Without it, a software
    /// ES256 key in STATE/custody/ signs, and the signature says so.
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
    /// Persistent handle of the TPM identity key that signs evidence (with --tcti).
    #[arg(long, value_name = "HANDLE", default_value = "0x81000ca5", value_parser = parse_handle)]
    pub identity_handle: u32,
    /// PCRs the evidence quote covers (with --tcti), e.g. sha256:0,7.
    #[arg(long, value_name = "BANK:N,N", default_value = crate::custody::DEFAULT_PCRS, value_parser = parse_selection)]
    pub custody_pcrs: PcrSelection,
}

impl Default for IdentityArgs {
    fn default() -> IdentityArgs {
        IdentityArgs {
            svid: None,
            workload_api: None,
            tcti: None,
            identity_handle: ::attest::tpm::DEFAULT_IDENTITY_HANDLE,
            custody_pcrs: crate::custody::DEFAULT_PCRS
                .parse()
                .unwrap_or_else(|_| unreachable!("the default PCR selection parses")),
        }
    }
}

/// How long to wait for the Workload API's first SVID.
const WORKLOAD_API_TIMEOUT: Duration = Duration::from_secs(10);

fn attest_err(e: AttestError) -> GatewayError {
    GatewayError::Attest(e)
}

impl IdentityArgs {
    /// The configured SVID, if any.
    pub(crate) fn svid(&self) -> Result<Option<Svid>, GatewayError> {
        let source: Box<dyn IdentitySource> = match (&self.svid, &self.workload_api) {
            (Some(dir), _) => Box::new(FileSource::open(dir).map_err(attest_err)?),
            (None, Some(ep)) => {
                Box::new(WorkloadApiSource::connect(ep, WORKLOAD_API_TIMEOUT).map_err(attest_err)?)
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(source.current().map_err(attest_err)?.svid.clone()))
    }

    /// The runner identity: `--runner` if given (it must then be the SVID's ID, when an
    /// SVID is configured), else the configured SVID's ID, else none.
    pub(crate) fn runner(&self, runner: Option<&str>) -> Result<Option<String>, GatewayError> {
        let svid = self.svid()?;
        match (runner, svid) {
            (Some(r), Some(s)) if r != s.id().as_str() => Err(usage(format!(
                "--runner `{r}` is not the configured SVID's SPIFFE ID `{}`",
                s.id()
            ))),
            (Some(r), _) => Ok(Some(r.to_string())),
            (None, Some(s)) => Ok(Some(s.id().to_string())),
            (None, None) => Ok(None),
        }
    }

    /// The sealed keys of `trust.sealed`, through the TPM of `--tcti` (else `$TCTI`,
    /// else the device), opened on the first sealed key.
    pub(crate) fn sealed_keys(&self) -> SealedKeys {
        SealedKeys::lazy(self.tcti.as_deref())
    }

    /// The custody signer of this process's evidence: the TPM of `--tcti` when given,
    /// else the software key under `STATE/custody/`.
    pub(crate) fn custody_signer(&self, state: &Path) -> Result<CustodySigner, GatewayError> {
        match &self.tcti {
            Some(tcti) => {
                let tcti = Tcti::parse(tcti).map_err(attest_err)?;
                Ok(CustodySigner::open_tpm(
                    &tcti,
                    self.identity_handle,
                    self.custody_pcrs.clone(),
                )?)
            }
            None => Ok(CustodySigner::software(
                &crate::layout::StateLayout::new(state).custody(),
            )?),
        }
    }
}

pub(crate) fn warn_if_software(tpm: &Tpm) {
    if tpm.info().software {
        eprintln!(
            "capsule-gateway: warning: software TPM (`{}` `{}`) at {}: its keys are not hardware-protected",
            tpm.info().manufacturer,
            tpm.info().vendor,
            tpm.tcti()
        );
    }
}

/// TPM selection shared by the subcommands.
#[derive(Debug, clap::Args)]
pub struct TpmArgs {
    /// TCTI (default: $TCTI, else device:/dev/tpmrm0), e.g. swtpm:host=127.0.0.1,port=2321.
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
    /// Persistent handle of the identity key.
    #[arg(long, value_name = "HANDLE", default_value = "0x81000ca5", value_parser = parse_handle)]
    pub handle: u32,
}

fn parse_handle(s: &str) -> Result<u32, String> {
    let hex = s
        .strip_prefix("0x")
        .ok_or("a handle is hex with 0x, e.g. 0x81000ca5")?;
    u32::from_str_radix(hex, 16).map_err(|e| e.to_string())
}

fn parse_selection(s: &str) -> Result<PcrSelection, String> {
    s.parse().map_err(|e: AttestError| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Create (first time) or load the TPM identity key; print its public key (JWK, PEM,
    /// TPM public area) and what the TPM is.
    Identity {
        #[command(flatten)]
        tpm: TpmArgs,
        /// Also write the identity JSON to FILE (what verify-quote and verify-binding take).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Seal an HS256 key to the current values of PCRs; the policy names the file in
    /// `trust.sealed`.
    Seal {
        #[command(flatten)]
        tpm: TpmArgs,
        /// The kid the sealed key will have in the trust store (must equal the JWK's).
        #[arg(long, value_name = "KID")]
        kid: String,
        /// PCRs to bind, e.g. sha256:0,7.
        #[arg(long, value_name = "BANK:N,N", value_parser = parse_selection)]
        pcrs: PcrSelection,
        /// The secret: an HS256 JWK (as `keygen --alg HS256` writes), or raw bytes with --raw.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Read --in as the raw key bytes.
        #[arg(long)]
        raw: bool,
        /// The sealed key file to write (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Unseal sealed keys (named here or by a policy) and report, without printing them.
    UnsealCheck {
        #[command(flatten)]
        tpm: TpmArgs,
        /// Sealed key files.
        #[arg(
            long = "sealed",
            value_name = "FILE",
            required_unless_present = "policy"
        )]
        sealed: Vec<PathBuf>,
        /// A policy whose `trust.sealed` files to check.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
    /// Print PCR values (JSON; a reference for verify-quote and verify-binding).
    PcrRead {
        #[command(flatten)]
        tpm: TpmArgs,
        /// PCRs to read, e.g. sha256:0,7.
        #[arg(long, value_name = "BANK:N,N", default_value = "sha256:0,7", value_parser = parse_selection)]
        pcrs: PcrSelection,
        /// Also write the values as JSON here (a reference for `verify-quote`); must not exist.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// TPM2_Quote over PCRs with the verifier's nonce, signed by the identity key.
    Quote {
        #[command(flatten)]
        tpm: TpmArgs,
        /// The verifier's nonce, hex (at most 64 bytes).
        #[arg(long, value_name = "HEX")]
        nonce: String,
        /// PCRs to quote, e.g. sha256:0,7.
        #[arg(long, value_name = "BANK:N,N", default_value = "sha256:0,7", value_parser = parse_selection)]
        pcrs: PcrSelection,
        /// Also write the quote as JSON here; must not exist.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Check a quote: signature by the identity key, nonce, and PCRs against a reference.
    VerifyQuote {
        /// The quote JSON (from `attest quote --out`).
        #[arg(long, value_name = "FILE")]
        quote: PathBuf,
        /// The nonce the quote must carry, hex.
        #[arg(long, value_name = "HEX")]
        nonce: String,
        /// The identity JSON (from `attest identity --out`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Reference PCR values (from `attest pcr-read --out`).
        #[arg(long, value_name = "FILE")]
        reference: Option<PathBuf>,
    },
    /// Bind the SVID to the TPM: an identity statement and a quote whose nonce is its hash.
    Bind {
        #[command(flatten)]
        tpm: TpmArgs,
        /// The SVID directory (svid.pem, svid_key.pem, bundle.pem) to bind.
        #[arg(
            long,
            value_name = "DIR",
            conflicts_with = "workload_api",
            required_unless_present = "workload_api"
        )]
        svid: Option<PathBuf>,
        /// Take the SVID from this SPIFFE Workload API endpoint instead of --svid.
        #[arg(long, value_name = "ENDPOINT")]
        workload_api: Option<String>,
        /// PCRs the quote covers, e.g. sha256:0,7.
        #[arg(long, value_name = "BANK:N,N", default_value = "sha256:0,7", value_parser = parse_selection)]
        pcrs: PcrSelection,
        /// The binding (statement and quote, JSON) to write; must not exist.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Check a binding offline, against whatever is given: the SVID, the TPM key, PCRs.
    VerifyBinding {
        /// The binding JSON (from `attest bind --out`).
        #[arg(long, value_name = "FILE")]
        binding: PathBuf,
        /// The SVID the statement must be for.
        #[arg(long, value_name = "DIR")]
        svid: Option<PathBuf>,
        /// The identity JSON the statement's TPM key must be.
        #[arg(long, value_name = "FILE")]
        tpm_key: Option<PathBuf>,
        /// Reference PCR values the statement's must equal.
        #[arg(long, value_name = "FILE")]
        pcrs_reference: Option<PathBuf>,
        /// Accept a statement made on a software TPM (swtpm).
        #[arg(long)]
        allow_software_tpm: bool,
    },
    /// A PKCS#10 CSR for SPIFFE_ID signed by the TPM identity key (PEM).
    Csr {
        #[command(flatten)]
        tpm: TpmArgs,
        /// The SPIFFE ID the CSR asks for (its URI SAN).
        #[arg(long, value_name = "SPIFFE_ID")]
        spiffe_id: String,
        /// The CSR (PEM) to write; must not exist.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// The development trust domain's CA.
    DevCa {
        #[command(subcommand)]
        command: DevCaCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevCaCommand {
    /// Make a CA for TRUST_DOMAIN in DIR (ca.pem, ca_key.pem 0600).
    Init {
        /// The trust domain, e.g. acme.example.
        #[arg(long, value_name = "TRUST_DOMAIN")]
        trust_domain: String,
        /// Directory for ca.pem and ca_key.pem (must not exist).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Issue an X.509-SVID for a CSR: writes DIR/svid.pem and DIR/bundle.pem (the key
    /// stays wherever the CSR's key is, e.g. the TPM).
    Issue {
        /// The CA directory (from `attest dev-ca init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The CSR (PEM) to sign.
        #[arg(long, value_name = "FILE")]
        csr: PathBuf,
        /// The SPIFFE ID to issue; must be the CSR's and in the CA's trust domain.
        #[arg(long, value_name = "SPIFFE_ID")]
        spiffe_id: String,
        /// Directory for svid.pem and bundle.pem.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long the SVID is valid.
        #[arg(long, value_name = "HOURS", default_value_t = 24)]
        ttl_hours: u64,
    },
}

fn open_tpm(tcti: Option<&str>) -> Result<Tpm, GatewayError> {
    let tcti = Tcti::from_config_or_env(tcti).map_err(attest_err)?;
    let tpm = Tpm::open(&tcti).map_err(attest_err)?;
    warn_if_software(&tpm);
    Ok(tpm)
}

fn read(path: &Path) -> Result<Vec<u8>, GatewayError> {
    std::fs::read(path).map_err(|e| GatewayError::io(path, e))
}

/// Writes a new file (never overwrites) with `mode`, durably.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), GatewayError> {
    Ok(crate::durable::write_new(path, bytes, mode)?)
}

fn print(text: &str) -> Result<(), GatewayError> {
    crate::output::println_stdout(text)
}

fn nonce_of(hex_text: &str) -> Result<Vec<u8>, GatewayError> {
    hex::decode(hex_text).map_err(|e| usage(format!("--nonce: {e}")))
}

/// Reads the identity JSON (`tpm_public` is what counts).
pub(crate) fn load_identity(path: &Path) -> Result<TpmKeyPublic, GatewayError> {
    let v: serde_json::Value = serde_json::from_slice(&read(path)?)
        .map_err(|e| usage(format!("{}: {e}", path.display())))?;
    let area = v["tpm_public"]
        .as_str()
        .ok_or_else(|| usage(format!("{}: no `tpm_public`", path.display())))?;
    let area =
        b64::decode(area).map_err(|e| usage(format!("{}: tpm_public: {e}", path.display())))?;
    TpmKeyPublic::from_area(&area).map_err(|e| usage(format!("{}: {e}", path.display())))
}

fn load_pcrs(path: &Path) -> Result<PcrValues, GatewayError> {
    PcrValues::from_json(&read(path)?).map_err(|e| usage(format!("{}: {e}", path.display())))
}

fn svid_from(dir: Option<&Path>, endpoint: Option<&str>) -> Result<Svid, GatewayError> {
    let ids = IdentityArgs {
        svid: dir.map(Path::to_path_buf),
        workload_api: endpoint.map(str::to_string),
        ..IdentityArgs::default()
    };
    ids.svid()?
        .ok_or_else(|| usage("give --svid DIR or --workload-api ENDPOINT"))
}

/// A refusal: printed, exit 1.
fn refused(e: &AttestError) -> ExitCode {
    eprintln!("capsule-gateway: REFUSED: {e}");
    ExitCode::from(EXIT_DENIED)
}

pub fn run(command: AttestCommand) -> Result<ExitCode, GatewayError> {
    match command {
        AttestCommand::Identity { tpm, out } => {
            let mut t = open_tpm(tpm.tcti.as_deref())?;
            let (key, created) = t.identity_key(tpm.handle, true).map_err(attest_err)?;
            let doc = json!({
                "handle": format!("{:#010x}", key.handle),
                "created": created,
                "tpm": t.info(),
                "tpm_public": b64::encode(key.public.area()),
                "name": hex::encode(key.public.name()),
                "jwk": key.public.jwk(),
                "pem": key.public.pem(),
            });
            let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
            if let Some(out) = out {
                write_new(&out, format!("{text}\n").as_bytes(), 0o644)?;
            }
            print(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        AttestCommand::Seal {
            tpm,
            kid,
            pcrs,
            input,
            raw,
            out,
        } => {
            let bytes = zeroize::Zeroizing::new(read(&input)?);
            let secret = if raw {
                bytes
            } else {
                let jwk = parse_jwk(&bytes).map_err(|e| {
                    usage(format!("{}: {}: {}", input.display(), e.field, e.message))
                })?;
                if jwk.kid != kid {
                    return Err(usage(format!(
                        "{}: the JWK's kid is `{}`, not --kid `{kid}`",
                        input.display(),
                        jwk.kid
                    )));
                }
                match jwk.material {
                    KeyMaterial::Hs256 { secret } => secret,
                    KeyMaterial::Es256 { .. } => {
                        return Err(usage(format!(
                            "{}: only HS256 keys are sealed (an ES256 private key belongs in the TPM as a key, not sealed data)",
                            input.display()
                        )))
                    }
                }
            };
            let mut t = open_tpm(tpm.tcti.as_deref())?;
            let sealed = t.seal_hs256(&kid, &secret, &pcrs).map_err(attest_err)?;
            write_new(&out, format!("{}\n", sealed.to_json()).as_bytes(), 0o600)?;
            print(&format!(
                "sealed `{kid}` to {pcrs} in {} ({})",
                out.display(),
                sealed.tpm.describe()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        AttestCommand::UnsealCheck {
            tpm,
            sealed,
            policy,
        } => {
            let mut files = sealed;
            if let Some(p) = &policy {
                files.extend(sealed_files_of(p)?);
            }
            let mut t = open_tpm(tpm.tcti.as_deref())?;
            let mut all_ok = true;
            for file in &files {
                let result = SealedKey::load(file).and_then(|s| t.unseal(&s, file));
                match result {
                    Ok(key) => print(&format!(
                        "ok: `{}` ({} bytes) unsealed from {}",
                        key.kid,
                        key.secret().len(),
                        file.display()
                    ))?,
                    Err(e) => {
                        all_ok = false;
                        eprintln!("capsule-gateway: {e}");
                    }
                }
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DENIED)
            })
        }
        AttestCommand::PcrRead { tpm, pcrs, out } => {
            let mut t = open_tpm(tpm.tcti.as_deref())?;
            let values = t.pcr_read(&pcrs).map_err(attest_err)?;
            let text = values.to_json();
            if let Some(out) = out {
                write_new(&out, format!("{text}\n").as_bytes(), 0o644)?;
            }
            print(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        AttestCommand::Quote {
            tpm,
            nonce,
            pcrs,
            out,
        } => {
            let nonce = nonce_of(&nonce)?;
            let mut t = open_tpm(tpm.tcti.as_deref())?;
            let (key, _) = t.identity_key(tpm.handle, false).map_err(attest_err)?;
            let quote = t.quote(&key, &pcrs, &nonce).map_err(attest_err)?;
            let text = quote.to_json();
            if let Some(out) = out {
                write_new(&out, format!("{text}\n").as_bytes(), 0o644)?;
            }
            print(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        AttestCommand::VerifyQuote {
            quote,
            nonce,
            key,
            reference,
        } => {
            let nonce = nonce_of(&nonce)?;
            let q = Quote::from_json(&read(&quote)?)
                .map_err(|e| usage(format!("{}: {e}", quote.display())))?;
            let key = load_identity(&key)?;
            let reference = reference.as_deref().map(load_pcrs).transpose()?;
            match verify_quote(&q, &key, &nonce, reference.as_ref()) {
                Ok(v) => {
                    print(&format!(
                        "quote OK: signed by TPM key {}, nonce matches, PCRs {} {} ({})",
                        key.thumbprint(),
                        v.pcrs.selection(),
                        if reference.is_some() {
                            "equal the reference"
                        } else {
                            "as quoted (no reference given)"
                        },
                        q.tpm.describe()
                    ))?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(refused(&e)),
            }
        }
        AttestCommand::Bind {
            tpm,
            svid,
            workload_api,
            pcrs,
            out,
        } => {
            let svid = svid_from(svid.as_deref(), workload_api.as_deref())?;
            let mut t = open_tpm(tpm.tcti.as_deref())?;
            let (key, _) = t.identity_key(tpm.handle, false).map_err(attest_err)?;
            let binding = t.bind(&key, &svid, &pcrs).map_err(attest_err)?;
            write_new(&out, format!("{}\n", binding.to_json()).as_bytes(), 0o644)?;
            print(&format!(
                "bound `{}` (certificate sha256:{}) to TPM key {} and {pcrs} in {}",
                svid.id(),
                hex::encode(&svid.leaf_sha256()),
                key.public.thumbprint(),
                out.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        AttestCommand::VerifyBinding {
            binding,
            svid,
            tpm_key,
            pcrs_reference,
            allow_software_tpm,
        } => {
            let b = Binding::from_json(&read(&binding)?)
                .map_err(|e| usage(format!("{}: {e}", binding.display())))?;
            let svid = svid
                .as_deref()
                .map(|d| svid_from(Some(d), None))
                .transpose()?;
            let key = tpm_key.as_deref().map(load_identity).transpose()?;
            let reference = pcrs_reference.as_deref().map(load_pcrs).transpose()?;
            let expect = Expectations {
                svid: svid.as_ref(),
                tpm_key: key.as_ref(),
                pcrs: reference.as_ref(),
                allow_software_tpm,
            };
            match verify_binding(&b, &expect) {
                Ok(v) => {
                    print(&format!(
                        "binding OK: `{}` (certificate sha256:{}) on TPM key {} ({}), PCRs {}",
                        v.spiffe_id,
                        v.svid_sha256,
                        v.tpm_key.thumbprint(),
                        v.tpm.describe(),
                        v.pcrs.selection()
                    ))?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(refused(&e)),
            }
        }
        AttestCommand::Csr {
            tpm,
            spiffe_id,
            out,
        } => {
            let id = SpiffeId::parse(&spiffe_id)
                .map_err(|e| usage(format!("--spiffe-id `{spiffe_id}`: {e}")))?;
            let mut t = open_tpm(tpm.tcti.as_deref())?;
            let (key, _) = t.identity_key(tpm.handle, false).map_err(attest_err)?;
            let pem = tpm_csr(&mut t, &key, &id).map_err(attest_err)?;
            write_new(&out, pem.as_bytes(), 0o644)?;
            print(&format!(
                "CSR for `{id}` signed by TPM key {} in {}",
                key.public.thumbprint(),
                out.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        AttestCommand::DevCa { command } => dev_ca(command),
    }
}

fn dev_ca(command: DevCaCommand) -> Result<ExitCode, GatewayError> {
    match command {
        DevCaCommand::Init { trust_domain, out } => {
            let ca = DevCa::generate(&trust_domain).map_err(attest_err)?;
            ca.save(&out).map_err(attest_err)?;
            print(&format!(
                "development CA for `{trust_domain}` in {} (ca.pem, ca_key.pem)",
                out.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        DevCaCommand::Issue {
            ca,
            csr,
            spiffe_id,
            out,
            ttl_hours,
        } => {
            let ca = DevCa::load(&ca).map_err(attest_err)?;
            let id = SpiffeId::parse(&spiffe_id)
                .map_err(|e| usage(format!("--spiffe-id `{spiffe_id}`: {e}")))?;
            let pem = read(&csr)?;
            let der = ::attest::pem::csr_der(&pem)
                .map_err(|e| usage(format!("{}: {e}", csr.display())))?;
            let ttl = Duration::from_secs(ttl_hours.saturating_mul(3600));
            let cert = ca.issue(&der, &id, ttl).map_err(attest_err)?;
            std::fs::create_dir_all(&out).map_err(|e| GatewayError::io(&out, e))?;
            write_new(
                &out.join("svid.pem"),
                ::attest::pem::encode("CERTIFICATE", &cert).as_bytes(),
                0o644,
            )?;
            write_new(&out.join("bundle.pem"), ca.cert_pem().as_bytes(), 0o644)?;
            print(&format!(
                "issued `{id}` into {} (svid.pem, bundle.pem)",
                out.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The sealed files a policy names (resolved relative to it), read without loading
/// the rest of the policy.
fn sealed_files_of(policy: &Path) -> Result<Vec<PathBuf>, GatewayError> {
    let text = String::from_utf8(read(policy)?)
        .map_err(|_| usage(format!("{}: not UTF-8", policy.display())))?;
    let doc: toml::Value =
        toml::from_str(&text).map_err(|e| usage(format!("{}: {e}", policy.display())))?;
    let base = policy.parent().unwrap_or(Path::new("."));
    let list = doc
        .get("trust")
        .and_then(|t| t.get("sealed"))
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(|s| base.join(s)).ok_or_else(|| {
                usage(format!(
                    "{}: trust.sealed[{i}]: not a string",
                    policy.display()
                ))
            })
        })
        .collect()
}
