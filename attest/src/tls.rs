//! mTLS with X.509-SVIDs for rustls (TLS 1.3 only, aws-lc-rs).
//!
//! [`SpiffeClientVerifier`] (server side) and [`SpiffeServerVerifier`] (client side)
//! accept a peer only when its leaf has exactly one URI SAN, that SAN is a valid SPIFFE
//! ID with a path, the trust bundle has that ID's trust domain, and the chain verifies
//! to *that* domain's CAs (a CA of one trust domain cannot vouch for another's IDs);
//! optionally the ID must match an allow-list. After the handshake, [`peer_id`] hands the
//! authenticated ID to the caller. The DNS server name plays no part (SPIFFE
//! authenticates by ID).
//!
//! [`TpmSigningKey`] is a rustls signing key whose private half is the TPM identity key;
//! [`SvidCertResolver`] presents the current SVID (rotation included) with its software
//! key or the TPM key.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureAlgorithm,
    SignatureScheme,
};

use crate::error::{AttestError, Result};
use crate::spiffe::{id_from_leaf, RunnerPattern, SpiffeId};
use crate::svid::{verify_chain, IdentitySource, SvidKey, TrustBundles};
use crate::tpm::{IdentityKey, TpmWorker};

/// Where a verifier gets the trust bundles: fixed, or from a rotating source.
#[derive(Debug, Clone)]
pub enum Bundles {
    Fixed(Arc<TrustBundles>),
    Source(Arc<dyn IdentitySource>),
}

impl Bundles {
    fn get(&self) -> Result<Arc<TrustBundles>> {
        match self {
            Bundles::Fixed(b) => Ok(b.clone()),
            Bundles::Source(s) => Ok(Arc::new(s.current()?.bundles.clone())),
        }
    }
}

/// Which authenticated IDs are accepted (beyond "chains to its own trust domain").
#[derive(Debug, Clone, Default)]
pub enum Authorize {
    /// Any ID whose trust domain is in the bundle.
    #[default]
    AnyInBundle,
    /// Only IDs matching one of these patterns (`*` as a whole last segment).
    Matching(Vec<RunnerPattern>),
}

/// Why a peer was refused, keeping webpki's reason for the rustls error.
enum PeerError {
    Chain(String, webpki::Error),
    Other(String),
}

impl PeerError {
    fn into_rustls(self) -> rustls::Error {
        let other = |m: String| CertificateError::Other(OtherError(Arc::new(AttestError::Peer(m))));
        let e = match self {
            PeerError::Chain(_, webpki::Error::CertExpired { .. }) => CertificateError::Expired,
            PeerError::Chain(_, webpki::Error::CertNotValidYet { .. }) => {
                CertificateError::NotValidYet
            }
            PeerError::Chain(_, webpki::Error::UnknownIssuer) => CertificateError::UnknownIssuer,
            PeerError::Chain(_, webpki::Error::InvalidSignatureForPublicKey) => {
                CertificateError::BadSignature
            }
            PeerError::Chain(m, _) | PeerError::Other(m) => other(m),
        };
        rustls::Error::InvalidCertificate(e)
    }

    fn message(&self) -> String {
        match self {
            PeerError::Chain(m, _) | PeerError::Other(m) => m.clone(),
        }
    }
}

fn check_peer(
    bundles: &TrustBundles,
    authorize: &Authorize,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> std::result::Result<SpiffeId, PeerError> {
    let id = id_from_leaf(end_entity).map_err(|e| PeerError::Other(e.to_string()))?;
    let td = id.trust_domain();
    let roots = bundles.roots(td).ok_or_else(|| {
        PeerError::Other(format!(
            "`{id}`: trust domain `{td}` is not in the trust bundle"
        ))
    })?;
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    verify_chain(&chain, roots, now, Some(usage)).map_err(|e| {
        PeerError::Chain(
            format!("`{id}`: no valid chain to the `{td}` bundle: {e}"),
            e,
        )
    })?;
    if let Authorize::Matching(patterns) = authorize {
        if !patterns.iter().any(|p| p.matches(&id)) {
            return Err(PeerError::Other(format!("`{id}` is not authorized here")));
        }
    }
    Ok(id)
}

/// Verifies a peer chain outside any handshake (for tests and tools): the same checks
/// the verifiers make. `client` picks the clientAuth usage, else serverAuth.
pub fn verify_peer_chain(
    bundles: &TrustBundles,
    authorize: &Authorize,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    client: bool,
) -> Result<SpiffeId> {
    let (leaf, rest) = chain
        .split_first()
        .ok_or_else(|| AttestError::Peer("no certificate".into()))?;
    let usage = if client {
        webpki::KeyUsage::client_auth()
    } else {
        webpki::KeyUsage::server_auth()
    };
    check_peer(bundles, authorize, leaf, rest, now, usage)
        .map_err(|e| AttestError::Peer(e.message()))
}

/// The authenticated SPIFFE ID of the peer of a finished handshake.
pub fn peer_id(conn: &rustls::CommonState) -> Result<SpiffeId> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| AttestError::Peer("the peer presented no certificate".into()))?;
    id_from_leaf(leaf).map_err(|e| AttestError::Peer(e.to_string()))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// Server side: requires and verifies the client's X.509-SVID.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: Bundles,
    authorize: Authorize,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(bundles: Bundles, authorize: Authorize) -> SpiffeClientVerifier {
        SpiffeClientVerifier {
            bundles,
            authorize,
            algs: algorithms(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let bundles = self
            .bundles
            .get()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        check_peer(
            &bundles,
            &self.authorize,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map(|_| ClientCertVerified::assertion())
        .map_err(PeerError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side: verifies the server's X.509-SVID (the DNS name is ignored).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: Bundles,
    authorize: Authorize,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundles: Bundles, authorize: Authorize) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            bundles,
            authorize,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let bundles = self
            .bundles
            .get()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        check_peer(
            &bundles,
            &self.authorize,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map(|_| ServerCertVerified::assertion())
        .map_err(PeerError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// DER `ECDSA-Sig-Value` from r||s (what TLS and X.509 carry).
pub fn ecdsa_der(rs: &[u8; 64]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, v: &[u8]) {
        let start = v.iter().position(|b| *b != 0).unwrap_or(v.len());
        let v = &v[start..];
        let pad = v.first().is_none_or(|b| b & 0x80 != 0);
        out.push(0x02);
        // At most 33 bytes: fits a short-form length.
        out.push(u8::try_from(v.len() + usize::from(pad)).unwrap_or(0));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let mut body = Vec::with_capacity(72);
    integer(&mut body, &rs[..32]);
    integer(&mut body, &rs[32..]);
    let mut out = vec![0x30, u8::try_from(body.len()).unwrap_or(0)];
    out.extend_from_slice(&body);
    out
}

/// A rustls signing key held by the TPM (ECDSA P-256 with SHA-256). Each signature is
/// one TPM2_Hash and one TPM2_Sign on the TPM thread; callers on a tokio multi-thread
/// runtime wait in `block_in_place`. TLS 1.3 session resumption avoids the signature.
pub struct TpmSigningKey {
    worker: Arc<TpmWorker>,
    key: IdentityKey,
    spki: Vec<u8>,
}

impl fmt::Debug for TpmSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TpmSigningKey({:#010x})", self.key.handle)
    }
}

impl TpmSigningKey {
    pub fn new(worker: Arc<TpmWorker>, key: IdentityKey) -> TpmSigningKey {
        let spki = key.public.spki_der();
        TpmSigningKey { worker, key, spki }
    }

    pub fn spki(&self) -> &[u8] {
        &self.spki
    }
}

impl SigningKey for TpmSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(TpmSigner {
                    worker: self.worker.clone(),
                    key: self.key.clone(),
                }) as Box<dyn Signer>
            })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

struct TpmSigner {
    worker: Arc<TpmWorker>,
    key: IdentityKey,
}

impl fmt::Debug for TpmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TpmSigner({:#010x})", self.key.handle)
    }
}

impl Signer for TpmSigner {
    fn sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, rustls::Error> {
        let message = message.to_vec();
        let key = self.key.clone();
        let rs = self
            .worker
            .call(move |tpm| tpm.sign(&key, &message))
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(ecdsa_der(&rs))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// Presents the current SVID of a source, rebuilt when the source rotates. A key held
/// outside the files (`SvidKey::External`) is the TPM key, which must match the leaf.
#[derive(Debug)]
pub struct SvidCertResolver {
    source: Arc<dyn IdentitySource>,
    tpm_key: Option<Arc<TpmSigningKey>>,
    cache: Mutex<Option<(u64, Arc<CertifiedKey>)>>,
}

impl SvidCertResolver {
    pub fn new(
        source: Arc<dyn IdentitySource>,
        tpm_key: Option<Arc<TpmSigningKey>>,
    ) -> Result<SvidCertResolver> {
        let r = SvidCertResolver {
            source,
            tpm_key,
            cache: Mutex::new(None),
        };
        r.certified()?;
        Ok(r)
    }

    /// The certified key for the current SVID.
    pub fn certified(&self) -> Result<Arc<CertifiedKey>> {
        let m = self.source.current()?;
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| AttestError::Certificate("resolver lock poisoned".into()))?;
        if let Some((generation, ck)) = cache.as_ref() {
            if *generation == m.generation {
                return Ok(ck.clone());
            }
        }
        let key: Arc<dyn SigningKey> = match m.svid.key() {
            SvidKey::Software(pkcs8) => rustls::crypto::aws_lc_rs::default_provider()
                .key_provider
                .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                    pkcs8.to_vec(),
                )))
                .map_err(|e| AttestError::Certificate(format!("SVID key: {e}")))?,
            SvidKey::External => {
                let tpm = self.tpm_key.clone().ok_or_else(|| {
                    AttestError::Certificate(
                        "the SVID has no key file and no TPM key was configured".into(),
                    )
                })?;
                if tpm.spki() != m.svid.spki() {
                    return Err(AttestError::Certificate(
                        "the SVID's public key is not the TPM identity key".into(),
                    ));
                }
                tpm
            }
        };
        let ck = Arc::new(CertifiedKey::new(m.svid.chain().to_vec(), key));
        *cache = Some((m.generation, ck.clone()));
        Ok(ck)
    }
}

impl rustls::server::ResolvesServerCert for SvidCertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified().ok()
    }
}

impl rustls::client::ResolvesClientCert for SvidCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certified().ok()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS 1.3 server config that presents `resolver`'s SVID and requires a client SVID.
pub fn server_config(
    resolver: Arc<SvidCertResolver>,
    bundles: Bundles,
    authorize: Authorize,
) -> Result<rustls::ServerConfig> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AttestError::Certificate(e.to_string()))?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundles, authorize)))
        .with_cert_resolver(resolver))
}

/// A TLS 1.3 client config that presents `resolver`'s SVID and verifies the server's.
pub fn client_config(
    resolver: Arc<SvidCertResolver>,
    bundles: Bundles,
    authorize: Authorize,
) -> Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AttestError::Certificate(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundles, authorize)))
        .with_client_cert_resolver(resolver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_der_encodes_minimal_integers() {
        let mut rs = [0u8; 64];
        rs[31] = 1; // r = 1
        rs[32] = 0x80; // s has the high bit set: needs a zero pad
        let der = ecdsa_der(&rs);
        assert_eq!(&der[..5], &[0x30, 3 + 35, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 33, 0x00]);
        assert_eq!(der.len(), 2 + 3 + 35);
    }
}
