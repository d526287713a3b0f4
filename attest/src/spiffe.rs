//! SPIFFE IDs. verify-core's parser ([`verify_core::SpiffeId`]) is the one parser in
//! the workspace; this module adds what certificates need: the ID of an X.509-SVID is
//! its one and only URI SAN (X.509-SVID spec, section 2), and a leaf SVID's ID has a
//! path (section 3). IDs from the `spiffe` crate or the Workload API are re-parsed with
//! the strict parser before they are believed.

use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use verify_core::{RunnerPattern, SpiffeId};

use crate::error::{AttestError, Result};

/// Parses a SPIFFE ID with the strict parser.
pub fn parse_id(s: &str) -> Result<SpiffeId> {
    SpiffeId::parse(s).map_err(|message| AttestError::SpiffeId {
        id: s.chars().take(120).collect(),
        message: message.to_string(),
    })
}

/// The trust domain name of an ID (`acme.example`).
pub fn trust_domain(id: &SpiffeId) -> &str {
    id.trust_domain()
}

/// True when the ID names a workload (has a path), not just a trust domain.
pub fn has_path(id: &SpiffeId) -> bool {
    id.as_str().len() > "spiffe://".len() + id.trust_domain().len()
}

/// Why a certificate does not carry a usable SPIFFE ID (X.509-SVID spec, sections 2
/// and 3). Untrusted input (a peer's or a file's certificate) causes all of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertIdError {
    #[error("not an X.509 certificate: {0}")]
    NotX509(#[source] x509_parser::nom::Err<X509Error>),
    #[error("trailing bytes after the certificate")]
    TrailingBytes,
    #[error("subjectAltName: {0}")]
    SubjectAltName(#[source] X509Error),
    #[error("no subjectAltName extension (an SVID has exactly one URI SAN)")]
    NoSubjectAltName,
    #[error("no URI SAN (an SVID has exactly one)")]
    NoUriSan,
    #[error("{0} URI SANs (an SVID has exactly one)")]
    ManyUriSans(usize),
    /// The URI SAN (its first 120 characters) fails the strict parser.
    #[error("URI SAN `{uri}`: {reason}")]
    InvalidUri { uri: String, reason: &'static str },
    #[error("URI SAN `{0}` names a trust domain, not a workload")]
    TrustDomainOnly(SpiffeId),
    /// A CA certificate, whose URI SAN is its bare trust domain, has none.
    #[error("the CA certificate has no URI SAN naming its trust domain")]
    NoTrustDomainSan,
}

/// The SPIFFE ID of a leaf certificate: exactly one URI SAN, and it is a valid
/// `spiffe://` ID with a path. Anything else (no URI SAN, two, another scheme, a
/// malformed or bare trust-domain ID) is refused with the reason.
pub fn id_from_leaf(der: &[u8]) -> std::result::Result<SpiffeId, CertIdError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(CertIdError::NotX509)?;
    if !rest.is_empty() {
        return Err(CertIdError::TrailingBytes);
    }
    id_from_parsed(&cert)
}

pub(crate) fn id_from_parsed(
    cert: &X509Certificate<'_>,
) -> std::result::Result<SpiffeId, CertIdError> {
    let san = cert
        .subject_alternative_name()
        .map_err(CertIdError::SubjectAltName)?
        .ok_or(CertIdError::NoSubjectAltName)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [one] => *one,
        [] => return Err(CertIdError::NoUriSan),
        many => return Err(CertIdError::ManyUriSans(many.len())),
    };
    let id = SpiffeId::parse(uri).map_err(|reason| CertIdError::InvalidUri {
        uri: uri.chars().take(120).collect(),
        reason,
    })?;
    if !has_path(&id) {
        return Err(CertIdError::TrustDomainOnly(id));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_spiffe_spec() {
        // The cases of the issue; the parser itself lives in verify-core.
        let ok = [
            "spiffe://acme.example/runner/r1",
            "spiffe://acme.example/Runner/R1",
            "spiffe://a-b_c.d/x.y/z_1",
        ];
        for id in ok {
            assert!(parse_id(id).is_ok(), "{id}");
        }
        let max_path = format!("spiffe://td/{}", "a".repeat(2048 - "spiffe://td/".len()));
        assert!(
            parse_id(&max_path).is_ok(),
            "2048 bytes is the limit, inclusive"
        );
        let bad = [
            (
                "uppercase trust domain",
                "spiffe://Acme.example/r".to_string(),
            ),
            ("empty segment", "spiffe://acme.example/a//b".to_string()),
            ("trailing slash", "spiffe://acme.example/a/".to_string()),
            ("dot segment", "spiffe://acme.example/a/./b".to_string()),
            (
                "dot-dot segment",
                "spiffe://acme.example/a/../b".to_string(),
            ),
            (
                "percent-encoding",
                "spiffe://acme.example/a%2Fb".to_string(),
            ),
            (
                "percent in trust domain",
                "spiffe://acme%2eexample/a".to_string(),
            ),
            ("port", "spiffe://acme.example:8443/a".to_string()),
            ("userinfo", "spiffe://user@acme.example/a".to_string()),
            (
                "userinfo with password",
                "spiffe://u:p@acme.example/a".to_string(),
            ),
            ("query", "spiffe://acme.example/a?x=1".to_string()),
            ("fragment", "spiffe://acme.example/a#frag".to_string()),
            ("uppercase scheme", "SPIFFE://acme.example/a".to_string()),
            ("other scheme", "https://acme.example/a".to_string()),
            ("empty trust domain", "spiffe:///a".to_string()),
            ("wildcard", "spiffe://acme.example/*".to_string()),
            ("space", "spiffe://acme.example/a b".to_string()),
            ("overlong", format!("spiffe://td/{}", "a".repeat(2048))),
            (
                "trust domain over 255 bytes",
                format!("spiffe://{}/a", "t".repeat(256)),
            ),
        ];
        for (why, id) in bad {
            assert!(parse_id(&id).is_err(), "{why}: {id}");
        }
    }
}
