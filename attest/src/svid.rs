//! X.509-SVIDs and trust bundles, from PEM files or the SPIFFE Workload API, with
//! rotation picked up without a restart.
//!
//! Both sources hand out an [`X509Material`]: our SVID (ID, chain, key) and the trust
//! bundles by trust domain. Before material is handed out it is checked the same way
//! whatever its source: the `spiffe` crate's X.509-SVID rules (leaf not a CA,
//! digitalSignature, no keyCertSign/cRLSign, signing certificates are CAs), then ours —
//! exactly one URI SAN that passes the strict parser, inside its validity period, the
//! chain verifies to the bundle of its own trust domain, and the key matches the leaf.
//!
//! File layout (what `spire-agent api fetch x509 -write` produces, renamed):
//! `svid.pem` (leaf first, then intermediates), `svid_key.pem` (PKCS#8, mode 0600; absent
//! when the key lives in the TPM), `bundle.pem` (the trust domain's CA certificates).

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::error::{AttestError, Result};
use crate::spiffe::{id_from_parsed, CertIdError, SpiffeId};

/// Where our SVID's private key is.
#[derive(Clone)]
pub enum SvidKey {
    /// PKCS#8 DER, in zeroizing memory.
    Software(Zeroizing<Vec<u8>>),
    /// Not in the files: held by a signer elsewhere (the TPM identity key), whose public
    /// key must be the leaf's.
    External,
}

impl fmt::Debug for SvidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SvidKey::Software(_) => "SvidKey::Software(..)",
            SvidKey::External => "SvidKey::External",
        })
    }
}

/// Our X.509-SVID, checked.
#[derive(Debug, Clone)]
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: SvidKey,
    not_after: i64,
    leaf_sha256: [u8; 32],
    spki: Vec<u8>,
}

impl Svid {
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Leaf first, then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    pub fn key(&self) -> &SvidKey {
        &self.key
    }

    /// Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// SHA-256 of the leaf certificate's DER.
    pub fn leaf_sha256(&self) -> [u8; 32] {
        self.leaf_sha256
    }

    /// The leaf's SubjectPublicKeyInfo, DER.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }
}

/// Trust bundles: CA certificates by trust domain name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundles {
    by_domain: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

impl TrustBundles {
    pub fn new() -> TrustBundles {
        TrustBundles::default()
    }

    /// Adds the CA certificates of `trust_domain` (a name like `acme.example`).
    pub fn insert(
        &mut self,
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<()> {
        let bad = |message: String| AttestError::Bundle {
            source_name: trust_domain.to_string(),
            message,
        };
        // The trust domain must itself be valid: parse it as a bare-domain ID.
        crate::spiffe::parse_id(&format!("spiffe://{trust_domain}"))
            .map_err(|e| bad(e.to_string()))?;
        if roots.is_empty() {
            return Err(bad("no CA certificates".into()));
        }
        for r in &roots {
            webpki::anchor_from_trusted_cert(r)
                .map_err(|e| bad(format!("a CA certificate does not parse: {e}")))?;
        }
        self.by_domain.insert(trust_domain.to_string(), roots);
        Ok(())
    }

    pub fn roots(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        self.by_domain.get(trust_domain).map(Vec::as_slice)
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.by_domain.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }
}

/// What a source hands out: our SVID and the bundles, with a generation that grows on
/// each rotation.
#[derive(Debug, Clone)]
pub struct X509Material {
    pub svid: Svid,
    pub bundles: TrustBundles,
    pub generation: u64,
    /// Where it came from (a directory or an endpoint), for messages.
    pub source: String,
}

/// A source of X.509 material that may rotate.
pub trait IdentitySource: Send + Sync + fmt::Debug {
    /// The current material. Cheap when nothing changed.
    fn current(&self) -> Result<Arc<X509Material>>;
    fn describe(&self) -> String;
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Why a leaf certificate is not a usable X.509-SVID (spec sections 2 to 4) at the
/// time it is checked. Untrusted input (an SVID file, the Workload API) causes all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeafError {
    #[error("not an X.509 certificate: {0}")]
    NotX509(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("trailing bytes after the leaf certificate")]
    TrailingBytes,
    #[error(transparent)]
    Id(#[from] CertIdError),
    #[error("the leaf is a CA certificate")]
    IsCa,
    #[error("keyUsage: {0}")]
    KeyUsage(#[source] x509_parser::error::X509Error),
    #[error("keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("keyUsage of a leaf has keyCertSign or cRLSign")]
    CaKeyUsage,
    #[error("no keyUsage extension (X.509-SVID 4.3 requires one)")]
    NoKeyUsage,
    #[error("not valid before {not_before} (now {now})")]
    NotYetValid { not_before: i64, now: i64 },
    #[error("expired at {not_after} (now {now})")]
    Expired { not_after: i64, now: i64 },
}

/// Checks one leaf as an X.509-SVID at time `now`; returns its ID, notAfter and SPKI.
pub(crate) fn check_leaf(
    der: &[u8],
    now: i64,
) -> std::result::Result<(SpiffeId, i64, Vec<u8>), LeafError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(LeafError::NotX509)?;
    if !rest.is_empty() {
        return Err(LeafError::TrailingBytes);
    }
    let id = id_from_parsed(&cert)?;
    // X.509-SVID 4.1 and 4.3.
    if let Ok(Some(bc)) = cert.basic_constraints() {
        if bc.value.ca {
            return Err(LeafError::IsCa);
        }
    }
    match cert.key_usage().map_err(LeafError::KeyUsage)? {
        Some(ku) => {
            if !ku.value.digital_signature() {
                return Err(LeafError::NoDigitalSignature);
            }
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(LeafError::CaKeyUsage);
            }
        }
        None => return Err(LeafError::NoKeyUsage),
    }
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    if now < not_before {
        return Err(LeafError::NotYetValid { not_before, now });
    }
    if now > not_after {
        return Err(LeafError::Expired { not_after, now });
    }
    Ok((id, not_after, cert.public_key().raw.to_vec()))
}

/// Verifies `chain` (leaf first) up to the roots of the leaf's own trust domain, for
/// either TLS usage.
pub(crate) fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Option<webpki::KeyUsage>,
) -> std::result::Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<std::result::Result<_, _>>()?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0])?;
    let algs = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    let usages = match usage {
        Some(u) => vec![u],
        None => vec![
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ],
    };
    let mut last = webpki::Error::UnknownIssuer;
    for u in usages {
        match leaf.verify_for_usage(algs, &anchors, &chain[1..], now, u, None, None) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl X509Material {
    /// Builds and checks material; `source` names it in errors.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: SvidKey,
        bundles: TrustBundles,
        source: &str,
        now: i64,
    ) -> Result<X509Material> {
        let bad = |message: String| AttestError::Svid {
            source_name: source.to_string(),
            message,
        };
        if chain.is_empty() {
            return Err(bad("no certificate".into()));
        }
        // The spiffe crate's X.509-SVID rules first (for a software key; it needs one).
        if let SvidKey::Software(k) = &key {
            let concat: Vec<u8> = chain.iter().flat_map(|c| c.iter().copied()).collect();
            spiffe::X509Svid::parse_from_der(&concat, k).map_err(|e| bad(e.to_string()))?;
        }
        let (id, not_after, spki) = check_leaf(&chain[0], now).map_err(|e| bad(e.to_string()))?;
        let roots = bundles.roots(id.trust_domain()).ok_or_else(|| {
            bad(format!(
                "no trust bundle for its trust domain `{}`",
                id.trust_domain()
            ))
        })?;
        let when = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));
        verify_chain(&chain, roots, when, None).map_err(|e| {
            bad(format!(
                "does not chain to the `{}` bundle: {e}",
                id.trust_domain()
            ))
        })?;
        if let SvidKey::Software(k) = &key {
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.to_vec()));
            let signer = rustls::crypto::aws_lc_rs::default_provider()
                .key_provider
                .load_private_key(der)
                .map_err(|e| bad(format!("private key: {e}")))?;
            let public = signer
                .public_key()
                .ok_or_else(|| bad("private key: no public key".into()))?;
            if public.as_ref() != spki.as_slice() {
                return Err(bad(
                    "the private key does not belong to the leaf certificate".into(),
                ));
            }
        }
        let leaf_sha256 = verify_core::crypto::default_backend().sha256_oneshot(&chain[0]);
        Ok(X509Material {
            svid: Svid {
                id,
                chain,
                key,
                not_after,
                leaf_sha256,
                spki,
            },
            bundles,
            generation: 0,
            source: source.to_string(),
        })
    }
}

/// The three files' identity (size, mtime, inode); a change means "reload".
type Stamp = Vec<(u64, i64, i64, u64)>;

const SVID_FILE: &str = "svid.pem";
const KEY_FILE: &str = "svid_key.pem";
const BUNDLE_FILE: &str = "bundle.pem";

/// SVID and bundle from PEM files in a directory, reloaded when a file changes.
/// A reload that fails keeps the previous material while it is still valid (a writer
/// may be half-way through rotating); the failure is kept in [`FileSource::last_error`].
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    state: Mutex<FileState>,
}

#[derive(Debug, Default)]
struct FileState {
    stamp: Stamp,
    current: Option<Arc<X509Material>>,
    generation: u64,
    last_error: Option<String>,
}

impl FileSource {
    /// Opens `dir` and loads it once (a first load that fails is an error).
    pub fn open(dir: &Path) -> Result<FileSource> {
        let source = FileSource {
            dir: dir.to_path_buf(),
            state: Mutex::new(FileState::default()),
        };
        source.current()?;
        Ok(source)
    }

    pub fn last_error(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.last_error.clone())
    }

    fn stamp(&self) -> Stamp {
        [SVID_FILE, KEY_FILE, BUNDLE_FILE]
            .iter()
            .map(|f| match std::fs::metadata(self.dir.join(f)) {
                Ok(m) => (m.len(), m.mtime(), m.mtime_nsec(), m.ino()),
                Err(_) => (0, 0, 0, 0),
            })
            .collect()
    }

    fn load(&self) -> Result<X509Material> {
        let name = self.dir.display().to_string();
        // Trust files: refused when anyone but root or this user could change them
        // or the directories above them (verify-core's `trust_file`, as for the policy).
        let read = |file: &str| -> Result<Vec<u8>> {
            let p = self.dir.join(file);
            match verify_core::trust_file::read(&p) {
                Ok(f) => Ok(f.bytes),
                Err(verify_core::ConfigError::Read { source, .. }) => {
                    Err(AttestError::io(p, source))
                }
                Err(e) => Err(AttestError::Svid {
                    source_name: p.display().to_string(),
                    message: e.to_string(),
                }),
            }
        };
        let bad = |file: &str, message: String| AttestError::Svid {
            source_name: self.dir.join(file).display().to_string(),
            message,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(SVID_FILE)?)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(SVID_FILE, format!("PEM: {e}")))?;
        let key_path = self.dir.join(KEY_FILE);
        let key = match std::fs::metadata(&key_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SvidKey::External,
            Err(e) => return Err(AttestError::io(key_path, e)),
            Ok(m) => {
                if m.permissions().mode() & 0o077 != 0 {
                    return Err(bad(
                        KEY_FILE,
                        format!(
                            "readable by group or others (mode {:o}); chmod 600 it",
                            m.permissions().mode() & 0o777
                        ),
                    ));
                }
                let pem = Zeroizing::new(read(KEY_FILE)?);
                let key = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| {
                    bad(KEY_FILE, format!("expected one PKCS#8 `PRIVATE KEY`: {e}"))
                })?;
                SvidKey::Software(Zeroizing::new(key.secret_pkcs8_der().to_vec()))
            }
        };
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(BUNDLE_FILE)?)
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(BUNDLE_FILE, format!("PEM: {e}")))?;
        if chain.is_empty() {
            return Err(bad(SVID_FILE, "no certificate".into()));
        }
        // bundle.pem holds the CAs of the SVID's own trust domain.
        let td = check_leaf(&chain[0], unix_now())
            .map(|(id, _, _)| id.trust_domain().to_string())
            .or_else(|_| {
                // Expired or otherwise unusable: its trust domain still names the bundle,
                // and the material's own check below says what is wrong with it.
                X509Certificate::from_der(&chain[0])
                    .map_err(LeafError::NotX509)
                    .and_then(|(_, c)| Ok(id_from_parsed(&c)?))
                    .map(|id| id.trust_domain().to_string())
            })
            .map_err(|e| bad(SVID_FILE, e.to_string()))?;
        let mut bundles = TrustBundles::new();
        bundles
            .insert(&td, roots)
            .map_err(|e| bad(BUNDLE_FILE, e.to_string()))?;
        X509Material::new(chain, key, bundles, &name, unix_now())
    }
}

impl IdentitySource for FileSource {
    fn current(&self) -> Result<Arc<X509Material>> {
        let mut state = self.state.lock().map_err(|_| AttestError::Svid {
            source_name: self.dir.display().to_string(),
            message: "state lock poisoned".into(),
        })?;
        let stamp = self.stamp();
        if let (Some(current), true) = (&state.current, stamp == state.stamp) {
            if current.svid.not_after >= unix_now() {
                return Ok(current.clone());
            }
        }
        match self.load() {
            Ok(mut m) => {
                state.generation += 1;
                m.generation = state.generation;
                let m = Arc::new(m);
                state.current = Some(m.clone());
                state.stamp = stamp;
                state.last_error = None;
                Ok(m)
            }
            Err(e) => {
                state.last_error = Some(e.to_string());
                match &state.current {
                    Some(previous) if previous.svid.not_after >= unix_now() => Ok(previous.clone()),
                    _ => Err(e),
                }
            }
        }
    }

    fn describe(&self) -> String {
        format!("SVID files in {}", self.dir.display())
    }
}

/// SVID and bundles from the SPIFFE Workload API (`unix:///run/spire/agent.sock`), kept
/// current by the `spiffe` crate's `X509Source`, which follows the server's stream.
pub struct WorkloadApiSource {
    endpoint: String,
    runtime: Option<tokio::runtime::Runtime>,
    source: spiffe::X509Source,
    cache: Mutex<Option<(Arc<spiffe::X509Context>, Arc<X509Material>)>>,
    generation: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for WorkloadApiSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadApiSource")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl WorkloadApiSource {
    /// Connects and waits up to `timeout` for the first SVID. Runs its own small
    /// runtime on its own threads, so it may be called from sync or async code.
    pub fn connect(endpoint: &str, timeout: Duration) -> Result<WorkloadApiSource> {
        let err = |message: String| AttestError::WorkloadApi {
            endpoint: endpoint.to_string(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("workload-api")
            .enable_all()
            .build()
            .map_err(|e| err(format!("runtime: {e}")))?;
        let ep = endpoint.to_string();
        let handle = runtime.handle().clone();
        // block_on from a separate thread: legal even when the caller is async.
        let source = std::thread::scope(|s| {
            s.spawn(move || {
                handle.block_on(async {
                    match spiffe::X509Source::builder()
                        .endpoint(&ep)
                        .initial_sync_timeout(timeout)
                        .build()
                        .await
                    {
                        Ok(source) => Ok(source),
                        // The source retries until its timeout and then says only that;
                        // one direct fetch tells why (an expired or invalid SVID, say).
                        Err(e) => Err(match direct_fetch_problem(&ep).await {
                            Some(why) => format!("{e}: {why}"),
                            None => e.to_string(),
                        }),
                    }
                })
            })
            .join()
        })
        .map_err(|_| err("the connecting thread panicked".into()))?
        .map_err(err)?;
        let s = WorkloadApiSource {
            endpoint: endpoint.to_string(),
            runtime: Some(runtime),
            source,
            cache: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        };
        s.current()?;
        Ok(s)
    }

    fn convert(&self, ctx: &spiffe::X509Context) -> Result<X509Material> {
        material_from_context(ctx, &self.endpoint)
    }
}

/// What is wrong with what the Workload API serves, from one plain fetch.
async fn direct_fetch_problem(endpoint: &str) -> Option<String> {
    let fetch = async {
        let client = spiffe::WorkloadApiClient::connect_to(endpoint)
            .await
            .map_err(|e| e.to_string())?;
        client.fetch_x509_context().await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(2), fetch).await {
        Err(_) => None,
        Ok(Err(e)) => Some(e),
        Ok(Ok(ctx)) => material_from_context(&ctx, endpoint)
            .err()
            .map(|e| e.to_string()),
    }
}

fn material_from_context(ctx: &spiffe::X509Context, endpoint: &str) -> Result<X509Material> {
    {
        let svid = ctx.default_svid().ok_or_else(|| AttestError::Svid {
            source_name: endpoint.to_string(),
            message: "the Workload API returned no SVID".into(),
        })?;
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = SvidKey::Software(Zeroizing::new(svid.private_key().as_bytes().to_vec()));
        let mut bundles = TrustBundles::new();
        for (td, bundle) in ctx.bundle_set().iter() {
            let roots = bundle
                .authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect();
            bundles.insert(td.as_str(), roots)?;
        }
        X509Material::new(chain, key, bundles, endpoint, unix_now())
    }
}

impl IdentitySource for WorkloadApiSource {
    fn current(&self) -> Result<Arc<X509Material>> {
        let ctx = self
            .source
            .x509_context()
            .map_err(|e| AttestError::WorkloadApi {
                endpoint: self.endpoint.clone(),
                message: e.to_string(),
            })?;
        let mut cache = self.cache.lock().map_err(|_| AttestError::WorkloadApi {
            endpoint: self.endpoint.clone(),
            message: "cache lock poisoned".into(),
        })?;
        if let Some((seen, material)) = cache.as_ref() {
            if Arc::ptr_eq(seen, &ctx) {
                return Ok(material.clone());
            }
        }
        let mut m = self.convert(&ctx)?;
        m.generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let m = Arc::new(m);
        *cache = Some((ctx, m.clone()));
        Ok(m)
    }

    fn describe(&self) -> String {
        format!("SPIFFE Workload API at {}", self.endpoint)
    }
}

impl Drop for WorkloadApiSource {
    fn drop(&mut self) {
        // Never blocks, so it is safe even when dropped inside an async context.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
