//! A small OCI distribution client: HTTP/1.1 over rustls (TLS only), one connection
//! per request, outbound only.
//!
//! Why not the `oci-client` crate: its `ClientConfig` builds its own reqwest client
//! and has no way to present a client certificate, so the runner's SVID (mTLS to the
//! registry) cannot be used; it would also bring a second HTTP stack (reqwest 0.13)
//! and a second sha2 into a tree that already has hyper, tokio-rustls and the
//! verifier's SHA-256. The distribution API the agent needs is six requests, below.
//!
//! Every byte read is bounded (manifests by [`MAX_MANIFEST_BYTES`], blobs by their
//! descriptor's size) and every request has a deadline (`timeout`, plus time for the
//! body at [`MIN_RATE_BYTES_PER_S`]), so a hostile registry can neither fill the disk
//! nor stall the agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderName, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use verify_core::crypto::default_backend;
use verify_core::Sha256Digest;

use super::artifact::{ImageIndex, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE};
use super::OciError;
use crate::serve::blobs::{BlobStore, Stored, UploadError};

/// A manifest or index larger than this is refused (distribution's own limit is 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The slowest body accepted: a blob of N bytes gets `timeout + N / rate` in all.
pub const MIN_RATE_BYTES_PER_S: u64 = 256 << 10;
/// The system CA bundle (Debian `ca-certificates`), used when no `ca` is configured.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The SHA-256 of `bytes`, by the verifier's backend (the one way the workspace hashes).
pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest(default_backend().sha256_oneshot(bytes))
}

/// Credentials for the registry.
#[derive(Clone, Default)]
pub enum RegistryAuth {
    #[default]
    None,
    /// `user:password` (HTTP basic; distribution's htpasswd).
    Basic(String),
    /// A bearer token, sent as is.
    Bearer(String),
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str(match self {
            RegistryAuth::None => "None",
            RegistryAuth::Basic(_) => "Basic(..)",
            RegistryAuth::Bearer(_) => "Bearer(..)",
        })
    }
}

impl RegistryAuth {
    /// Basic credentials from a file holding `user:password` (one line).
    pub fn basic_from_file(path: &Path) -> Result<RegistryAuth, OciError> {
        let text = read_secret(path)?;
        if !text.contains(':') {
            return Err(OciError::Malformed {
                what: path.display().to_string(),
                why: "basic credentials must be `user:password`".into(),
            });
        }
        Ok(RegistryAuth::Basic(text))
    }

    /// A bearer token from a file (one line).
    pub fn bearer_from_file(path: &Path) -> Result<RegistryAuth, OciError> {
        Ok(RegistryAuth::Bearer(read_secret(path)?))
    }

    fn header(&self) -> Option<String> {
        match self {
            RegistryAuth::None => None,
            RegistryAuth::Basic(up) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(up.as_bytes())
            )),
            RegistryAuth::Bearer(t) => Some(format!("Bearer {t}")),
        }
    }
}

fn read_secret(path: &Path) -> Result<String, OciError> {
    let text = std::fs::read_to_string(path).map_err(|source| OciError::File {
        path: path.to_path_buf(),
        source,
    })?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err(OciError::Malformed {
            what: path.display().to_string(),
            why: "empty credentials file".into(),
        });
    }
    Ok(line)
}

/// How to reach one registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `https://host[:port]`.
    pub url: String,
    /// The registry's CA bundle (PEM); default: the system bundle.
    pub ca: Option<PathBuf>,
    pub auth: RegistryAuth,
    /// The runner's SVID directory (svid.pem, svid_key.pem, bundle.pem), presented as
    /// the TLS client certificate.
    pub svid: Option<PathBuf>,
    /// Deadline of one request (and the base of a body's deadline).
    pub timeout: Duration,
}

/// A registry endpoint, ready for requests.
pub struct Registry {
    /// `host:port`, for messages and the Host header.
    name: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    auth: Option<String>,
    timeout: Duration,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A manifest as pulled: its bytes and the digest they have.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub digest: Sha256Digest,
    pub bytes: Vec<u8>,
}

/// What a manifest push returned.
#[derive(Debug, Clone, Copy)]
pub struct PushedManifest {
    pub digest: Sha256Digest,
    /// The registry answered `OCI-Subject`: it indexes referrers itself (OCI 1.1).
    pub registry_indexes_subject: bool,
}

fn parse_url(url: &str) -> Result<(String, u16), OciError> {
    let bad = |why| OciError::Url {
        url: url.to_string(),
        why,
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("only https:// registries are reached"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(bad("must be https://host[:port], without a path"));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || port.is_empty() => {
            let port = port.parse().map_err(|_| bad("bad port"))?;
            Ok((host.trim_matches(['[', ']']).to_string(), port))
        }
        _ => Ok((authority.trim_matches(['[', ']']).to_string(), 443)),
    }
}

fn tls_config(ca: Option<&Path>, svid: Option<&Path>) -> Result<rustls::ClientConfig, OciError> {
    let ca_path = ca.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_path)
        .map_err(|e| OciError::TlsConfig(format!("{}: {e}", ca_path.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| OciError::TlsConfig(format!("{}: {e}", ca_path.display())))?;
        roots
            .add(cert)
            .map_err(|e| OciError::TlsConfig(format!("{}: {e}", ca_path.display())))?;
    }
    if roots.is_empty() {
        return Err(OciError::TlsConfig(format!(
            "{}: no certificates",
            ca_path.display()
        )));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| OciError::TlsConfig(e.to_string()))?
    .with_root_certificates(roots);
    Ok(match svid {
        Some(dir) => {
            let source = attest::svid::FileSource::open(dir)
                .map_err(|e| OciError::TlsConfig(format!("SVID {}: {e}", dir.display())))?;
            let resolver = attest::tls::SvidCertResolver::new(Arc::new(source), None)
                .map_err(|e| OciError::TlsConfig(format!("SVID {}: {e}", dir.display())))?;
            builder.with_client_cert_resolver(Arc::new(resolver))
        }
        None => builder.with_no_client_auth(),
    })
}

/// A digest named by a `Docker-Content-Digest` header, when it is a sha256 one.
fn header_digest(resp: &http::Response<Incoming>) -> Option<Result<Sha256Digest, String>> {
    let v = resp.headers().get("docker-content-digest")?;
    let s = v.to_str().unwrap_or("");
    Some(Sha256Digest::from_prefixed(s).ok_or_else(|| s.to_string()))
}

impl Registry {
    pub fn new(config: &RegistryConfig) -> Result<Registry, OciError> {
        let (host, port) = parse_url(&config.url)?;
        let server_name = ServerName::try_from(host.clone()).map_err(|_| OciError::Url {
            url: config.url.clone(),
            why: "not a host name or address",
        })?;
        let tls = tls_config(config.ca.as_deref(), config.svid.as_deref())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(OciError::Store)?;
        Ok(Registry {
            name: format!("{host}:{port}"),
            host,
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            auth: config.auth.header(),
            timeout: config.timeout,
            rt,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn timeout_err(&self, what: impl Into<String>, secs: u64) -> OciError {
        OciError::Timeout {
            registry: self.name.clone(),
            what: what.into(),
            secs,
        }
    }

    /// Sends one request on a fresh connection; the deadline covers connect, TLS and
    /// the response head.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, &str)],
        body: Bytes,
    ) -> Result<http::Response<Incoming>, OciError> {
        let registry = || self.name.clone();
        let fut = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|source| OciError::Connect {
                    registry: registry(),
                    source,
                })?;
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|source| OciError::Tls {
                    registry: registry(),
                    source,
                })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|source| OciError::Http {
                    registry: registry(),
                    source,
                })?;
            tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(HOST, self.name.as_str());
            if let Some(a) = &self.auth {
                req = req.header(AUTHORIZATION, a.as_str());
            }
            for (k, v) in headers {
                req = req.header(k, *v);
            }
            let req = req
                .body(Full::new(body))
                .map_err(|source| OciError::Request {
                    registry: registry(),
                    source,
                })?;
            sender
                .send_request(req)
                .await
                .map_err(|source| OciError::Http {
                    registry: registry(),
                    source,
                })
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| self.timeout_err(path, self.timeout.as_secs()))?
    }

    fn status_err(&self, method: &'static str, path: &str, status: StatusCode) -> OciError {
        OciError::Status {
            registry: self.name.clone(),
            method,
            path: path.to_string(),
            status: status.as_u16(),
        }
    }

    /// Reads a body of at most `limit` bytes before `deadline`, handing each chunk to
    /// `sink`.
    async fn read_body(
        &self,
        body: Incoming,
        what: &str,
        limit: u64,
        deadline: Instant,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), OciError>,
    ) -> Result<u64, OciError> {
        let mut body = body;
        let mut len = 0u64;
        let secs = deadline.saturating_duration_since(Instant::now()).as_secs();
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|source| OciError::Http {
                    registry: self.name.clone(),
                    source,
                })?;
                if let Ok(chunk) = frame.into_data() {
                    len = len.saturating_add(chunk.len() as u64);
                    if len > limit {
                        return Err(OciError::TooLarge {
                            registry: self.name.clone(),
                            what: what.to_string(),
                            limit,
                        });
                    }
                    sink(&chunk)?;
                }
            }
            Ok(len)
        };
        tokio::time::timeout_at(deadline.into(), read)
            .await
            .map_err(|_| self.timeout_err(what, secs))?
    }

    /// A manifest, index or tag list: at most [`MAX_MANIFEST_BYTES`], into memory.
    async fn read_small(&self, body: Incoming, what: &str) -> Result<Vec<u8>, OciError> {
        let mut bytes = Vec::new();
        let deadline = self.body_deadline(MAX_MANIFEST_BYTES);
        self.read_body(body, what, MAX_MANIFEST_BYTES, deadline, &mut |c| {
            bytes.extend_from_slice(c);
            Ok(())
        })
        .await?;
        Ok(bytes)
    }

    fn body_deadline(&self, size: u64) -> Instant {
        Instant::now() + self.timeout + Duration::from_secs(size / MIN_RATE_BYTES_PER_S)
    }

    /// The repository's tags (none when the repository does not exist yet).
    pub fn tags(&self, repo: &str) -> Result<Vec<String>, OciError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let path = format!("/v2/{repo}/tags/list");
        self.rt.block_on(async {
            let resp = self.send(Method::GET, &path, &[], Bytes::new()).await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(Vec::new()),
                s => return Err(self.status_err("GET", &path, s)),
            }
            let bytes = self.read_small(resp.into_body(), &path).await?;
            let list: TagList =
                serde_json::from_slice(&bytes).map_err(|e| OciError::Malformed {
                    what: path.clone(),
                    why: e.to_string(),
                })?;
            Ok(list.tags.unwrap_or_default())
        })
    }

    /// Pulls a manifest (or index) by tag or digest. The digest is the sha256 of the
    /// bytes received, never the registry's word: pulled by digest, the bytes must
    /// have it, and a `Docker-Content-Digest` header that names another is refused
    /// (a manifest served under the wrong digest). `None`: there is no such manifest.
    pub fn manifest(&self, repo: &str, reference: &str) -> Result<Option<Pulled>, OciError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let accept = format!("{MANIFEST_MEDIA_TYPE}, {INDEX_MEDIA_TYPE}");
        self.rt.block_on(async {
            let resp = self
                .send(
                    Method::GET,
                    &path,
                    &[(ACCEPT, accept.as_str())],
                    Bytes::new(),
                )
                .await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(None),
                s => return Err(self.status_err("GET", &path, s)),
            }
            let claimed = header_digest(&resp);
            let bytes = self.read_small(resp.into_body(), &path).await?;
            let got = sha256(&bytes);
            let mismatch = |expected| OciError::DigestMismatch {
                what: format!("manifest {repo}:{reference}"),
                expected,
                got,
            };
            if let Some(expected) = Sha256Digest::from_prefixed(reference) {
                if expected != got {
                    return Err(mismatch(expected));
                }
            }
            match claimed {
                Some(Ok(claimed)) if claimed != got => return Err(mismatch(claimed)),
                Some(Err(other)) => {
                    return Err(OciError::Malformed {
                        what: format!("manifest {repo}:{reference}"),
                        why: format!("Docker-Content-Digest `{other}` is not a sha256 digest"),
                    })
                }
                _ => {}
            }
            Ok(Some(Pulled { digest: got, bytes }))
        })
    }

    /// Streams the blob `digest` (at most `size` bytes: its descriptor's) into the
    /// store: a temporary file, hashed as it is written, renamed under its digest only
    /// when complete and matching. Anything else leaves nothing behind.
    pub fn pull_blob(
        &self,
        repo: &str,
        digest: &Sha256Digest,
        size: u64,
        store: &BlobStore,
    ) -> Result<Stored, OciError> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        self.rt.block_on(async {
            let resp = self.send(Method::GET, &path, &[], Bytes::new()).await?;
            if resp.status() != StatusCode::OK {
                return Err(self.status_err("GET", &path, resp.status()));
            }
            let mut upload = store.begin(*digest, size).map_err(OciError::Store)?;
            let deadline = self.body_deadline(size);
            let what = format!("blob {digest}");
            self.read_body(resp.into_body(), &what, size, deadline, &mut |c| {
                upload.write(c).map_err(|e| self.upload_err(&what, e))
            })
            .await?;
            let stored = upload.finish().map_err(|e| self.upload_err(&what, e))?;
            Ok(stored)
        })
    }

    fn upload_err(&self, what: &str, e: UploadError) -> OciError {
        match e {
            UploadError::TooLarge { limit } => OciError::TooLarge {
                registry: self.name.clone(),
                what: what.to_string(),
                limit,
            },
            UploadError::DigestMismatch { expected, got } => OciError::DigestMismatch {
                what: what.to_string(),
                expected,
                got,
            },
            UploadError::Io(e) => OciError::Store(e),
        }
    }

    /// Pushes a blob unless the registry has it (monolithic upload: POST, then PUT).
    pub fn push_blob(&self, repo: &str, bytes: Bytes) -> Result<Sha256Digest, OciError> {
        let digest = sha256(&bytes);
        let head = format!("/v2/{repo}/blobs/{digest}");
        let start = format!("/v2/{repo}/blobs/uploads/");
        self.rt.block_on(async {
            let resp = self.send(Method::HEAD, &head, &[], Bytes::new()).await?;
            if resp.status() == StatusCode::OK {
                return Ok(digest);
            }
            let resp = self.send(Method::POST, &start, &[], Bytes::new()).await?;
            if resp.status() != StatusCode::ACCEPTED {
                return Err(self.status_err("POST", &start, resp.status()));
            }
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| OciError::Malformed {
                    what: start.clone(),
                    why: "upload answer without Location".into(),
                })?;
            let mut target = strip_origin(location).to_string();
            target.push(if target.contains('?') { '&' } else { '?' });
            target.push_str(&format!("digest={digest}"));
            let len = bytes.len().to_string();
            let resp = self
                .send(
                    Method::PUT,
                    &target,
                    &[
                        (CONTENT_TYPE, "application/octet-stream"),
                        (http::header::CONTENT_LENGTH, len.as_str()),
                    ],
                    bytes,
                )
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(self.status_err("PUT", &head, resp.status()));
            }
            Ok(digest)
        })
    }

    /// Pushes a manifest under `reference` (a tag, or its own digest).
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<PushedManifest, OciError> {
        let digest = sha256(&bytes);
        let path = format!("/v2/{repo}/manifests/{reference}");
        self.rt.block_on(async {
            let len = bytes.len().to_string();
            let resp = self
                .send(
                    Method::PUT,
                    &path,
                    &[
                        (CONTENT_TYPE, media_type),
                        (http::header::CONTENT_LENGTH, len.as_str()),
                    ],
                    Bytes::from(bytes),
                )
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(self.status_err("PUT", &path, resp.status()));
            }
            Ok(PushedManifest {
                digest,
                registry_indexes_subject: resp.headers().contains_key("oci-subject"),
            })
        })
    }

    /// The referrers of `subject`: the OCI 1.1 referrers API where the registry has
    /// it, else the `sha256-<hex>` fallback tag's index (empty when neither exists).
    pub fn referrers(&self, repo: &str, subject: &Sha256Digest) -> Result<ImageIndex, OciError> {
        let path = format!("/v2/{repo}/referrers/{subject}");
        let api = self.rt.block_on(async {
            let resp = self.send(Method::GET, &path, &[], Bytes::new()).await?;
            if resp.status() != StatusCode::OK {
                return Ok::<_, OciError>(None);
            }
            let bytes = self.read_small(resp.into_body(), &path).await?;
            Ok(serde_json::from_slice::<ImageIndex>(&bytes).ok())
        })?;
        if let Some(index) = api {
            return Ok(index);
        }
        let tag = super::artifact::referrers_tag(subject);
        match self.manifest(repo, &tag)? {
            None => Ok(ImageIndex::empty()),
            Some(p) => serde_json::from_slice(&p.bytes).map_err(|e| OciError::Malformed {
                what: format!("{repo}:{tag}"),
                why: e.to_string(),
            }),
        }
    }
}

/// `https://host:port/v2/...` → `/v2/...` (distribution answers absolute Locations).
fn strip_origin(location: &str) -> &str {
    match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => location,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_are_https_authorities_only() {
        assert_eq!(
            parse_url("https://127.0.0.1:5000").expect("url"),
            ("127.0.0.1".to_string(), 5000)
        );
        assert_eq!(
            parse_url("https://registry.example/").expect("url"),
            ("registry.example".to_string(), 443)
        );
        for bad in [
            "http://127.0.0.1:5000",
            "https://h:5000/v2",
            "https://user@h",
            "https://",
            "https://h:x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upload_locations_lose_their_origin() {
        assert_eq!(
            strip_origin("https://h:1/v2/r/blobs/uploads/u?_s=1"),
            "/v2/r/blobs/uploads/u?_s=1"
        );
        assert_eq!(
            strip_origin("/v2/r/blobs/uploads/u"),
            "/v2/r/blobs/uploads/u"
        );
    }

    #[test]
    fn credentials_are_never_printed() {
        let a = RegistryAuth::Basic("u:secret".into());
        assert!(!format!("{a:?}").contains("secret"));
        assert_eq!(a.header().as_deref(), Some("Basic dTpzZWNyZXQ="));
    }
}
