//! The other SVID issuance path: the SVID's key is the TPM identity key.
//!
//! The Workload API hands out software keys; here the runner makes a PKCS#10 CSR signed
//! by the TPM identity key (proof of possession), and a CA that signs CSRs issues the
//! X.509-SVID. [`DevCa`] is the development trust domain's CA: it takes only the public
//! key and the one requested SPIFFE ID from a CSR whose signature verifies, and builds
//! every other field itself (never a CA flag or key usage from the request).

use std::cell::RefCell;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateSigningRequestDer;
use time::OffsetDateTime;

use crate::error::{AttestError, Result};
use crate::spiffe::{CertIdError, SpiffeId};
use crate::tls::ecdsa_der;
use crate::tpm::{IdentityKey, Tpm};

fn cert_err(e: impl std::fmt::Display) -> AttestError {
    AttestError::Certificate(e.to_string())
}

/// The TPM identity key as an rcgen signing key (each signature is a TPM2_Sign).
struct TpmRcgenKey<'t> {
    tpm: RefCell<&'t mut Tpm>,
    key: IdentityKey,
}

impl rcgen::PublicKeyData for TpmRcgenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.key.public.point()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TpmRcgenKey<'_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        let rs = self
            .tpm
            .borrow_mut()
            .sign(&self.key, msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)?;
        Ok(ecdsa_der(&rs))
    }
}

/// A PEM CSR for `id`, signed by the TPM identity key.
pub fn tpm_csr(tpm: &mut Tpm, key: &IdentityKey, id: &SpiffeId) -> Result<String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.as_str().to_string().try_into().map_err(cert_err)?,
    )];
    let signer = TpmRcgenKey {
        tpm: RefCell::new(tpm),
        key: key.clone(),
    };
    let csr = params.serialize_request(&signer).map_err(cert_err)?;
    csr.pem().map_err(cert_err)
}

/// A development CA for one trust domain (P-256, software key on disk).
#[derive(Debug)]
pub struct DevCa {
    trust_domain: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca_key.pem";

impl DevCa {
    pub fn generate(trust_domain: &str) -> Result<DevCa> {
        let td_id = crate::spiffe::parse_id(&format!("spiffe://{trust_domain}"))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{trust_domain} development CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            td_id.as_str().to_string().try_into().map_err(cert_err)?,
        )];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(DevCa {
            trust_domain: trust_domain.to_string(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Writes `ca.pem` and `ca_key.pem` (0600) into `dir`; refuses to overwrite.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| AttestError::io(dir, e))?;
        write_new(dir, CA_KEY, &self.issuer.key().serialize_pem(), 0o600)?;
        write_new(dir, CA_CERT, &self.cert_pem(), 0o644)
    }

    pub fn load(dir: &Path) -> Result<DevCa> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| AttestError::io(&p, e))
        };
        let key = KeyPair::from_pem(&read(CA_KEY)?).map_err(cert_err)?;
        let cert_pem = read(CA_CERT)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_err)?;
        let der = <rustls::pki_types::CertificateDer<'static> as rustls::pki_types::pem::PemObject>::from_pem_slice(cert_pem.as_bytes())
            .map_err(cert_err)?;
        let id = crate::spiffe::id_from_leaf(&der)
            .or_else(|_| {
                // A CA's URI SAN is the bare trust domain; read it directly.
                ca_trust_domain(&der)
            })
            .map_err(|e| AttestError::Certificate(e.to_string()))?;
        Ok(DevCa {
            trust_domain: id.trust_domain().to_string(),
            cert_der: der.to_vec(),
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> String {
        crate::pem::encode("CERTIFICATE", &self.cert_der)
    }

    /// Issues an X.509-SVID for `id` to the key in `csr_der` (valid `ttl` from now).
    /// The CSR's signature must verify and it must ask for exactly that one URI SAN.
    pub fn issue(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: std::time::Duration,
    ) -> Result<Vec<u8>> {
        self.issue_with_names(csr_der, id, ttl, &[])
    }

    /// As [`DevCa::issue`], with `names` (DNS names, IP addresses) added by the CA
    /// beside the SPIFFE ID: for the CA's own server, so that ordinary TLS clients
    /// (`curl --cacert`) can verify it by host name. The CSR still must ask for
    /// exactly the ID.
    fn issue_with_names(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: std::time::Duration,
        names: &[SanType],
    ) -> Result<Vec<u8>> {
        let ttl = time::Duration::try_from(ttl).map_err(cert_err)?;
        if id.trust_domain() != self.trust_domain {
            return Err(AttestError::Certificate(format!(
                "`{id}` is not in this CA's trust domain `{}`",
                self.trust_domain
            )));
        }
        if !crate::spiffe::has_path(id) {
            return Err(AttestError::Certificate(format!("`{id}` has no path")));
        }
        // from_der verifies the CSR's signature: the requester holds the key.
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| AttestError::Certificate(format!("CSR: {e}")))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [id.as_str()] {
            return Err(AttestError::Certificate(format!(
                "the CSR asks for {asked:?}, not exactly `{id}`"
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str().to_string().try_into().map_err(cert_err)?,
        )];
        params.subject_alt_names.extend(names.iter().cloned());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + ttl;
        let mut serial = [0u8; 16];
        aws_lc_rs::rand::fill(&mut serial).map_err(|_| cert_err("no randomness"))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_err)?;
        Ok(cert.der().to_vec())
    }
}

impl DevCa {
    /// Issues an SVID for `id` to a new software P-256 key and writes `svid.pem`,
    /// `svid_key.pem` (0600) and `bundle.pem` into `dir` (created, must not hold them
    /// yet). For the development trust domain of `serve`'s embedded default; the key
    /// goes through the same CSR check as any other requester's.
    pub fn issue_software_svid_dir(
        &self,
        id: &SpiffeId,
        ttl: std::time::Duration,
        dir: &Path,
    ) -> Result<()> {
        self.issue_software_server_svid_dir(id, ttl, dir, &[], &[])
    }

    /// As [`DevCa::issue_software_svid_dir`], for a server: the certificate also
    /// names `dns` and `ips`, so that a client checking host names (curl, browsers)
    /// verifies it with the CA alone, without `-k`.
    pub fn issue_software_server_svid_dir(
        &self,
        id: &SpiffeId,
        ttl: std::time::Duration,
        dir: &Path,
        dns: &[&str],
        ips: &[std::net::IpAddr],
    ) -> Result<()> {
        let mut names = Vec::with_capacity(dns.len() + ips.len());
        for name in dns {
            names.push(SanType::DnsName(
                name.to_string().try_into().map_err(cert_err)?,
            ));
        }
        names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str().to_string().try_into().map_err(cert_err)?,
        )];
        let csr = params.serialize_request(&key).map_err(cert_err)?;
        let cert = self.issue_with_names(csr.der(), id, ttl, &names)?;
        std::fs::create_dir_all(dir).map_err(|e| AttestError::io(dir, e))?;
        write_new(dir, "svid_key.pem", &key.serialize_pem(), 0o600)?;
        write_new(
            dir,
            "svid.pem",
            &crate::pem::encode("CERTIFICATE", &cert),
            0o644,
        )?;
        write_new(dir, "bundle.pem", &self.cert_pem(), 0o644)
    }
}

/// Creates `dir/name` with `mode`; refuses to overwrite.
fn write_new(dir: &Path, name: &str, text: &str, mode: u32) -> Result<()> {
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&p)
        .map_err(|e| AttestError::io(&p, e))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| AttestError::io(&p, e))
}

fn ca_trust_domain(der: &[u8]) -> std::result::Result<SpiffeId, CertIdError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(CertIdError::NotX509)?;
    let san = cert
        .subject_alternative_name()
        .map_err(CertIdError::SubjectAltName)?
        .ok_or(CertIdError::NoTrustDomainSan)?;
    for n in &san.value.general_names {
        if let GeneralName::URI(u) = n {
            return SpiffeId::parse(u).map_err(|reason| CertIdError::InvalidUri {
                uri: u.chars().take(120).collect(),
                reason,
            });
        }
    }
    Err(CertIdError::NoTrustDomainSan)
}
