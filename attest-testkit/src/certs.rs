//! Certificates for tests, made with rcgen: a CA per trust domain and X.509-SVIDs with
//! exactly the defects a test needs (two URI SANs, expired, a CA flag on the leaf).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::workload_api::SvidMaterial;

/// A trust domain's CA (self-signed, P-256).
#[derive(Debug)]
pub struct TestCa {
    pub trust_domain: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What to put into an SVID.
#[derive(Debug, Clone)]
pub struct SvidSpec {
    /// URI SANs, in order (an SVID has exactly one; tests add more).
    pub uris: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
}

impl SvidSpec {
    /// One SPIFFE ID, valid from an hour ago for a day.
    pub fn id(id: &str) -> SvidSpec {
        let now = OffsetDateTime::now_utc();
        SvidSpec {
            uris: vec![id.to_string()],
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(1),
            is_ca: false,
        }
    }

    /// Expired an hour ago.
    pub fn expired(mut self) -> SvidSpec {
        let now = OffsetDateTime::now_utc();
        self.not_before = now - Duration::days(2);
        self.not_after = now - Duration::hours(1);
        self
    }
}

/// An issued SVID: chain (leaf first) and its PKCS#8 key.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{trust_domain} test CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().expect("URI"),
        )];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(30);
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        TestCa {
            trust_domain: trust_domain.to_string(),
            issuer,
        }
    }

    pub fn cert_der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues an SVID with a fresh P-256 key.
    pub fn issue(&self, spec: &SvidSpec) -> IssuedSvid {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let der = self.sign_params(spec, &key);
        IssuedSvid {
            cert_pem: pem("CERTIFICATE", &der),
            chain: vec![der],
            key_pkcs8: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Issues a plain TLS server certificate for an IP address (an OCI registry on
    /// loopback in the agent tests), signed by this CA.
    pub fn issue_tls_server(&self, ip: std::net::IpAddr) -> IssuedSvid {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(30);
        let der = params
            .signed_by(&key, &self.issuer)
            .expect("sign server certificate")
            .der()
            .to_vec();
        IssuedSvid {
            cert_pem: pem("CERTIFICATE", &der),
            chain: vec![der],
            key_pkcs8: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Issues a certificate for a public key held elsewhere (a TPM key, say).
    pub fn issue_for(&self, spec: &SvidSpec, public: &impl rcgen::PublicKeyData) -> Vec<u8> {
        self.sign_params(spec, public)
    }

    fn sign_params(&self, spec: &SvidSpec, public: &impl rcgen::PublicKeyData) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| SanType::URI(u.clone().try_into().expect("URI SAN")))
            .collect();
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        if spec.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
        } else {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        params
            .signed_by(public, &self.issuer)
            .expect("sign SVID")
            .der()
            .to_vec()
    }

    /// Workload API material for an issued SVID.
    pub fn material(&self, svid: &IssuedSvid, spiffe_id: &str) -> SvidMaterial {
        SvidMaterial {
            spiffe_id: spiffe_id.to_string(),
            chain_der: svid.chain.concat(),
            key_der: svid.key_pkcs8.clone(),
            bundle_der: self.cert_der(),
        }
    }

    /// Writes `svid.pem`, `svid_key.pem` (0600) and `bundle.pem` into `dir` (created if
    /// needed), each by rename so a reader never sees half a file — what a rotating
    /// writer does.
    pub fn write_svid_dir(&self, dir: &Path, svid: &IssuedSvid) {
        std::fs::create_dir_all(dir).expect("create SVID dir");
        let chain: String = svid.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
        write_atomic(dir, "svid.pem", chain.as_bytes(), 0o644);
        write_atomic(dir, "svid_key.pem", svid.key_pem.as_bytes(), 0o600);
        write_atomic(dir, "bundle.pem", self.cert_pem().as_bytes(), 0o644);
    }
}

/// Writes `dir/name` through a temporary file and a rename.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write temporary file");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&tmp, dir.join(name)).expect("rename into place");
}

/// PEM armour (RFC 7468).
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
