//! PEM (RFC 7468): encoding here; decoding through rustls-pki-types' strict parser.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER of a PEM `CERTIFICATE REQUEST`; the error is the strict parser's own.
pub fn csr_der(pem: &[u8]) -> Result<Vec<u8>, rustls::pki_types::pem::Error> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem)
        .map(|d| d.as_ref().to_vec())
}
