//! Helpers for the service's end-to-end tests: a trust domain made with rcgen
//! (`attest_testkit::TestCa`), an in-process `Server` configured from a
//! `capsule_tests::World`, the real binary as a child process, and a small mTLS
//! client (tokio-rustls + hyper's client connections, HTTP/1.1 or HTTP/2).
//!
//! Nothing here is mocked: every request crosses a real TLS 1.3 connection on
//! loopback, and every certificate is checked by the service's own verifiers.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod sink;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use attest::svid::{FileSource, IdentitySource, TrustBundles};
use attest::tls::{Authorize, Bundles, SpiffeServerVerifier, SvidCertResolver};
use attest_testkit::{IssuedSvid, SvidSpec, TestCa};
use bytes::Bytes;
use capsule_gateway::serve::config::{BatchConfig, ServeConfig, ServiceLimits, TlsConfig};
use capsule_tests::{sha256_hex, World, RUN_SH, TOOL_BYTES};
use http::{header, HeaderMap, Method, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// The trust domain of the `World`'s tenant runners (`spiffe://acme.example/runner/*`).
pub const TRUST_DOMAIN: &str = "acme.example";
pub const GATEWAY_ID: &str = "spiffe://acme.example/gateway";
/// Any network step that takes longer than this is a failure, not a hang.
pub const NET_TIMEOUT: Duration = Duration::from_secs(20);

/// A `World` (keys, policy, capsules) plus the `acme.example` CA, the gateway's SVID
/// and a directory for the service's state.
#[derive(Debug)]
pub struct Fixture {
    pub world: World,
    pub ca: TestCa,
    pub root: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let f = Fixture {
            world: World::new(),
            ca: TestCa::new(TRUST_DOMAIN),
            root: tempfile::tempdir().expect("tempdir"),
        };
        let gateway = f.ca.issue(&SvidSpec::id(GATEWAY_ID));
        f.ca.write_svid_dir(&f.gateway_svid_dir(), &gateway);
        f
    }

    pub fn gateway_svid_dir(&self) -> PathBuf {
        self.root.path().join("gateway-svid")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("state")
    }

    pub fn blob_dir(&self) -> PathBuf {
        self.state_dir().join("blobs")
    }

    /// A service configuration for this fixture: loopback, a free port, defaults
    /// everywhere else.
    pub fn config(&self) -> ServeConfig {
        ServeConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            state_dir: self.state_dir(),
            policy: self.world.policy_path(),
            tls: TlsConfig {
                svid_dir: Some(self.gateway_svid_dir()),
                workload_api: None,
                allowed_peers: None,
            },
            batch: BatchConfig::default(),
            limits: ServiceLimits::default(),
            tpm: None,
            runs: None,
            health: None,
            events: None,
            log: Default::default(),
            cache: Default::default(),
            selfcheck: Default::default(),
        }
    }

    /// Issues an SVID for `id` from the fixture CA and writes it (with the CA as the
    /// bundle) into its own directory.
    pub fn client_svid_dir(&self, id: &str) -> PathBuf {
        let svid = self.ca.issue(&SvidSpec::id(id));
        let dir = self
            .root
            .path()
            .join("clients")
            .join(id.replace(['/', ':'], "_"));
        self.ca.write_svid_dir(&dir, &svid);
        dir
    }

    /// The fixture CA as the only trust bundle.
    pub fn bundles(&self) -> Arc<TrustBundles> {
        let mut b = TrustBundles::new();
        b.insert(TRUST_DOMAIN, vec![CertificateDer::from(self.ca.cert_der())])
            .expect("bundle");
        Arc::new(b)
    }

    /// A client TLS config presenting `cert` (or nothing), built on rustls directly
    /// (the SVID file source refuses to load an expired or foreign SVID, which is what
    /// the refusal tests need to present). The gateway is verified against the
    /// fixture CA either way.
    pub fn raw_client_config(&self, cert: Option<&IssuedSvid>) -> Arc<rustls::ClientConfig> {
        let verifier = Arc::new(SpiffeServerVerifier::new(
            Bundles::Fixed(self.bundles()),
            Authorize::Matching(vec![
                verify_core::RunnerPattern::parse(GATEWAY_ID).expect("pattern")
            ]),
        ));
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
        let mut config = match cert {
            None => builder.with_no_client_auth(),
            Some(svid) => builder
                .with_client_auth_cert(
                    svid.chain
                        .iter()
                        .map(|c| CertificateDer::from(c.clone()))
                        .collect(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.clone())),
                )
                .expect("client certificate"),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// The client side as a runner has it: its SVID directory through `FileSource`, the
/// gateway verified by SPIFFE ID, ALPN `h2` or `http/1.1`.
pub fn client_config(svid_dir: &Path, gateway_id: &str, h2: bool) -> Arc<rustls::ClientConfig> {
    let source: Arc<dyn IdentitySource> =
        Arc::new(FileSource::open(svid_dir).expect("client SVID directory"));
    let resolver = Arc::new(SvidCertResolver::new(source.clone(), None).expect("resolver"));
    let mut config = attest::tls::client_config(
        resolver,
        Bundles::Source(source),
        Authorize::Matching(vec![
            verify_core::RunnerPattern::parse(gateway_id).expect("pattern")
        ]),
    )
    .expect("client config");
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Arc::new(config)
}

/// A tokio runtime for the client side (the in-process server has its own).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A body of unknown length (HTTP/1.1 chunked): the server cannot refuse it from a
/// Content-Length and must count while it reads.
#[derive(Debug)]
pub struct Chunks(pub VecDeque<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

pub fn chunked(bytes: &[u8], chunk: usize) -> Body {
    Chunks(bytes.chunks(chunk).map(Bytes::copy_from_slice).collect()).boxed()
}

#[derive(Debug)]
enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// One mTLS connection to the gateway.
#[derive(Debug)]
pub struct Client {
    sender: Sender,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// Why the connection task ended, if it failed (a TLS alert arrives there, while
    /// the request itself only sees the connection go away).
    conn_error: Arc<Mutex<Option<String>>>,
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An error with its whole source chain (rustls' alert is usually at the bottom).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

impl Client {
    /// TCP, the TLS 1.3 handshake and the HTTP handshake for the negotiated protocol.
    pub async fn connect(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Client, String> {
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {}", chain(&e)))?;
            let _ = tcp.set_nodelay(true);
            // SPIFFE authenticates the gateway by ID; the DNS name plays no part.
            let name = ServerName::try_from("capsule-gateway").expect("server name");
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {}", chain(&e)))?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let io = TokioIo::new(tls);
            let conn_error = Arc::new(Mutex::new(None));
            let record = |e: Arc<Mutex<Option<String>>>| {
                move |r: Result<(), hyper::Error>| {
                    if let (Err(err), Ok(mut slot)) = (r, e.lock()) {
                        *slot = Some(chain(&err));
                    }
                }
            };
            let sender = if alpn.as_deref() == Some(b"h2") {
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {}", chain(&e)))?;
                let done = record(conn_error.clone());
                tokio::spawn(async move { done(conn.await) });
                Sender::H2(send)
            } else {
                let (send, conn) = http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake: {}", chain(&e)))?;
                let done = record(conn_error.clone());
                tokio::spawn(async move { done(conn.await) });
                Sender::H1(send)
            };
            Ok(Client {
                sender,
                alpn,
                conn_error,
            })
        };
        tokio::time::timeout(NET_TIMEOUT, connect)
            .await
            .map_err(|_| "connect: timed out".to_string())?
    }

    /// Another stream on the same HTTP/2 connection.
    pub fn stream(&self) -> Client {
        match &self.sender {
            Sender::H2(s) => Client {
                sender: Sender::H2(s.clone()),
                alpn: self.alpn.clone(),
                conn_error: self.conn_error.clone(),
            },
            Sender::H1(_) => panic!("HTTP/1.1 carries one request at a time: connect again"),
        }
    }

    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Body,
    ) -> Result<Reply, String> {
        let send = async {
            let response = match &mut self.sender {
                Sender::H1(s) => {
                    let req = Request::builder()
                        .method(method)
                        .uri(path)
                        .header(header::HOST, "capsule-gateway")
                        .body(body)
                        .expect("request");
                    s.ready().await.map_err(|e| chain(&e))?;
                    s.send_request(req).await.map_err(|e| chain(&e))?
                }
                Sender::H2(s) => {
                    let req = Request::builder()
                        .method(method)
                        .uri(format!("https://capsule-gateway{path}"))
                        .body(body)
                        .expect("request");
                    s.ready().await.map_err(|e| chain(&e))?;
                    s.send_request(req).await.map_err(|e| chain(&e))?
                }
            };
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| chain(&e))?
                .to_bytes();
            Ok(Reply {
                status,
                headers,
                body,
            })
        };
        let result: Result<Reply, String> = tokio::time::timeout(NET_TIMEOUT, send)
            .await
            .map_err(|_| format!("{path}: timed out"))?;
        match result {
            Ok(reply) => Ok(reply),
            Err(e) => Err(format!("{e} ({})", self.connection_error().await)),
        }
    }

    /// Why the connection failed, once its task has noticed (waits a moment for it).
    async fn connection_error(&self) -> String {
        for _ in 0..100 {
            if let Some(e) = self.conn_error.lock().ok().and_then(|e| e.clone()) {
                return format!("connection: {e}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        "the connection ended without an error".into()
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, String> {
        self.request(Method::GET, path, full(Bytes::new())).await
    }

    pub async fn admit(&mut self, jws: impl Into<Bytes>) -> Result<Reply, String> {
        self.request(Method::POST, "/v1/admissions", full(jws))
            .await
    }

    pub async fn put_blob(&mut self, bytes: &[u8]) -> Result<Reply, String> {
        let path = format!("/v1/blobs/sha256:{}", sha256_hex(bytes));
        self.request(Method::PUT, &path, full(Bytes::copy_from_slice(bytes)))
            .await
    }

    /// Uploads the files every `World` capsule names (run.sh and the tool).
    pub async fn upload_world_files(&mut self) {
        for bytes in [RUN_SH, TOOL_BYTES] {
            let r = self.put_blob(bytes).await.expect("upload");
            assert!(matches!(r.status, 200 | 201), "upload: {r:?}");
        }
    }

    /// Uploads every file under `dir` (a capsule's `files/`).
    pub async fn upload_dir(&mut self, dir: &Path) {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read_dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let bytes = std::fs::read(&path).expect("read file");
                    let r = self.put_blob(&bytes).await.expect("upload");
                    assert!(matches!(r.status, 200 | 201), "upload {path:?}: {r:?}");
                }
            }
        }
    }

    pub async fn metrics(&mut self) -> String {
        let r = self.get("/metrics").await.expect("GET /metrics");
        assert_eq!(r.status, 200, "{r:?}");
        r.text()
    }
}

/// The value of the sample `name_and_labels` (exactly as written, labels included),
/// or `None` when the exposition has no such line.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a numeric sample"))
}

/// A `World` manifest for `capsule_id` at `version` (version 1 has no parent).
pub fn versioned_manifest(w: &World, capsule_id: &str, version: u64) -> Value {
    let mut m = w.manifest();
    m["capsule_id"] = json!(capsule_id);
    m["version"] = json!(version);
    if version == 1 {
        m["parent"] = Value::Null;
    }
    // Lineage (issue 13): version N names the capsule made for N-1, when there is one.
    if let Some(parent) = version
        .checked_sub(1)
        .and_then(|p| w.signed_digest(capsule_id, p))
    {
        m["parent"] = Value::from(parent);
    }
    m
}

/// The signed JWS of [`versioned_manifest`] (ES256).
pub fn versioned_jws(w: &World, capsule_id: &str, version: u64) -> String {
    w.sign(
        versioned_manifest(w, capsule_id, version)
            .to_string()
            .as_bytes(),
        capsule_tests::Signer::Es256,
    )
}

/// `sha256:<hex>` of `bytes`, as decisions name capsules.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// The highest admitted version named by a `rollback` detail
/// ("version X is below the highest admitted version Y").
pub fn rollback_highest(detail: &str) -> Option<u64> {
    detail
        .strip_prefix("version ")?
        .split_once(" is below the highest admitted version ")?
        .1
        .trim()
        .parse()
        .ok()
}

/// The admission log's records, in commit order, read straight from the database
/// (table `admission_log` of `state.rs`) once the service has stopped: what an
/// auditor would read.
pub fn admission_log(state_dir: &Path) -> Vec<Value> {
    use redb::{ReadableTable, TableDefinition};
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("admission_log");
    let db = redb::Database::open(state_dir.join(capsule_gateway::state::STATE_FILE))
        .expect("open the state database");
    let txn = db.begin_read().expect("read transaction");
    let table = txn.open_table(LOG).expect("admission_log table");
    table
        .iter()
        .expect("iterate")
        .map(|row| {
            let (_, v) = row.expect("row");
            serde_json::from_slice(v.value()).expect("a JSON record")
        })
        .collect()
}

/// The real binary, running as a child process; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts `capsule-gateway serve ARGS` and waits for its "serving on" line.
    pub fn serve(args: &[&std::ffi::OsStr]) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start capsule-gateway serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split_once("serving on https://") {
                    let addr = rest.1.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let mut gateway = Gateway {
            child: Some(child),
            addr: "127.0.0.1:0".parse().expect("address"),
            stderr,
        };
        match rx.recv_timeout(NET_TIMEOUT) {
            Ok(addr) => gateway.addr = addr.parse().expect("the announced address"),
            Err(_) => panic!("serve did not start:\n{}", gateway.stderr()),
        }
        gateway
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `kill -9`: no chance to flush, close or answer anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(sent.success(), "kill -TERM failed");
        let end = Instant::now() + NET_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve did not stop on SIGTERM:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Packs `examples/dev-capsule` (version 1, valid for an hour) with the development
/// signing key of a `serve` state directory, exactly as `scripts/dev-capsule.sh` does;
/// `work` holds the manifest and the capsule, whose directory is returned.
pub fn pack_dev_capsule(state: &Path, work: &Path) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/dev-capsule");
    let now = capsule_tests::now();
    let manifest = std::fs::read_to_string(example.join("manifest.template.json"))
        .expect("template")
        .replace("@VERSION@", "1")
        .replace("@NOW@", &(now - 60).to_string())
        .replace("@EXPIRES@", &(now + 3600).to_string());
    let manifest_path = work.join("manifest.json");
    std::fs::write(&manifest_path, manifest).expect("write manifest");
    let capsule = work.join("capsule");
    let out = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
        .arg("pack")
        .arg("--manifest")
        .arg(&manifest_path)
        .arg("--files")
        .arg(example.join("files"))
        .arg("--key")
        .arg(state.join("dev/keys/dev-es.private.jwk.json"))
        .arg("--out")
        .arg(&capsule)
        .output()
        .expect("pack");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    capsule
}

impl Fixture {
    /// Writes `gateway.toml` for the binary: loopback on a free port, state and
    /// gateway SVID under the fixture root, the world's policy, then `extra` (TOML).
    pub fn write_config(&self, extra: &str) -> PathBuf {
        let path = self.root.path().join("gateway.toml");
        let text = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\npolicy = {}\n\n[tls]\nsvid_dir = \"gateway-svid\"\n\n{extra}",
            toml::Value::String(self.world.policy_path().display().to_string())
        );
        std::fs::write(&path, text).expect("write config");
        path
    }
}
