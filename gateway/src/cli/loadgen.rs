//! `loadgen`: drives `capsule-gateway serve` over N mutually authenticated TLS
//! connections and reports throughput, counts by status and latency percentiles.
//!
//! How the load is shaped:
//! - Exactly N connections, each with keep-alive and its own task. A request that fails
//!   at transport level is an error and its connection is re-established.
//! - Open loop (`--rate R`): request `k` of connection `i` is due `(k·N + i) / R` s
//!   after the start, so the connections take turns and together send one evenly spaced
//!   stream of R requests/s. Latency runs from the *due* time, not the send time: when
//!   the server stalls, the requests that should have gone out meanwhile are charged
//!   the wait (no coordinated omission). `send_lag_ms` shows how late requests went
//!   out, i.e. whether the generator itself kept up. HTTP/1.1 carries one request at a
//!   time, so a slow server makes a connection fall behind (seen as latency, and as an
//!   achieved rate below the requested one); with HTTP/2 each request goes out when due
//!   on its own stream, up to [`MAX_STREAMS`] in flight per connection, so an
//!   overloaded server really sees the offered rate (and answers 503).
//! - Closed loop (`--rate 0`): each connection sends its next request as soon as the
//!   previous answer has been read.
//! - Requests due during the warm-up are sent but not counted. Nothing is sent after the
//!   end; requests that were due but could not be sent by then are reported as `unsent`.
//!   Answers to requests sent in time are awaited (at most [`REQUEST_TIMEOUT`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use attest::svid::{FileSource, IdentitySource};
use attest::tls::{Authorize, Bundles, SvidCertResolver};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use verify_core::RunnerPattern;

use crate::GatewayError;

/// An answer not complete by then is a transport error (kind `timeout`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP connect plus TLS and HTTP handshakes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How early an open-loop request may go out (see `connection`).
const TIMER_SLACK: Duration = Duration::from_millis(1);
/// Pause after a failed reconnect in closed loop, so a dead server is not hammered.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Open-loop HTTP/2 requests in flight per connection; beyond it a connection waits
/// (and the wait is counted in latency, which runs from the due time).
const MAX_STREAMS: usize = 256;
/// Histogram range in microseconds (1 µs to 1 h, 3 significant digits); larger
/// values are clamped to the top.
const HIST_MAX_US: u64 = 3_600_000_000;
/// Statuses that carry an admission decision: admitted (200) or denied (403).
const SERVED: [u16; 2] = [200, 403];

#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// The service, `https://HOST:PORT`.
    #[arg(long, value_name = "URL")]
    pub url: String,
    /// Client SVID directory (svid.pem, svid_key.pem, bundle.pem).
    #[arg(long, value_name = "DIR")]
    pub svid: PathBuf,
    /// Accept only a server whose SPIFFE ID matches (`*` as a whole last segment);
    /// without it, any ID of a trust domain in the bundle.
    #[arg(long, value_name = "SPIFFE_ID_OR_PATTERN")]
    pub server_id: Option<String>,
    /// Capsule directory (capsule.jws and files/); its JWS is the admission body.
    #[arg(long, value_name = "DIR")]
    pub capsule: PathBuf,
    /// TLS connections, each with keep-alive.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub connections: usize,
    /// Total requests/s over all connections, open loop (latency from the due time);
    /// 0: as fast as possible, one request in flight per connection.
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    pub rate: f64,
    /// Measured seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before the measurement, not counted.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub warmup: f64,
    /// HTTP/2 (ALPN h2) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Do not upload the capsule's files as blobs before the run.
    #[arg(long)]
    pub no_upload: bool,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Tokio worker threads of the generator.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub threads: usize,
}

pub fn run(args: &LoadgenArgs) -> Result<ExitCode, GatewayError> {
    let plan = Arc::new(Plan::new(args)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .map_err(|e| GatewayError::Usage(format!("tokio runtime: {e}")))?;
    let files = if args.no_upload {
        Vec::new()
    } else {
        let dir = args.capsule.join("files");
        let mut files = Vec::new();
        walk_files(&dir, &mut files)?;
        files.sort();
        files
    };
    let stats = runtime.block_on(drive(plan.clone(), &files))?;
    let report = Report::new(&plan.shape, &stats);
    if args.json {
        crate::output::println_stdout(report.json())?;
    } else {
        crate::output::print_stdout(&report.text())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What was asked for: the shape of the load (also what the report describes).
#[derive(Debug, Clone, PartialEq)]
struct Shape {
    url: String,
    connections: usize,
    /// Requests/s over all connections; 0 is closed loop.
    rate: f64,
    warmup: Duration,
    duration: Duration,
    http2: bool,
}

/// The validated configuration, shared by the connection tasks.
struct Plan {
    shape: Shape,
    host: String,
    port: u16,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// Origin-form path with a Host header for HTTP/1.1; absolute for HTTP/2 (which
    /// takes `:scheme` and `:authority` from it).
    uri_base: String,
    host_header: HeaderValue,
    jws: Bytes,
}

impl Plan {
    fn new(args: &LoadgenArgs) -> Result<Plan, GatewayError> {
        let usage = |m: String| GatewayError::Usage(m);
        let target = parse_url(&args.url).map_err(usage)?;
        if args.connections == 0 || args.threads == 0 {
            return Err(usage(
                "--connections and --threads must be at least 1".into(),
            ));
        }
        if !args.rate.is_finite() || args.rate < 0.0 {
            return Err(usage(format!(
                "--rate {}: expected requests/s >= 0",
                args.rate
            )));
        }
        let duration = Duration::try_from_secs_f64(args.duration)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                usage(format!(
                    "--duration {}: expected seconds > 0",
                    args.duration
                ))
            })?;
        let warmup = Duration::try_from_secs_f64(args.warmup)
            .map_err(|_| usage(format!("--warmup {}: expected seconds >= 0", args.warmup)))?;

        let authorize =
            match &args.server_id {
                Some(p) => Authorize::Matching(vec![RunnerPattern::parse(p)
                    .map_err(|m| usage(format!("--server-id `{p}`: {m}")))?]),
                None => Authorize::AnyInBundle,
            };
        let source: Arc<dyn IdentitySource> = Arc::new(FileSource::open(&args.svid)?);
        let resolver = Arc::new(SvidCertResolver::new(source.clone(), None)?);
        let mut tls = attest::tls::client_config(resolver, Bundles::Source(source), authorize)?;
        tls.alpn_protocols = vec![if args.http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        // SPIFFE authenticates by ID; the verifier ignores the DNS name.
        let server_name = ServerName::try_from("capsule-gateway")
            .map_err(|e| usage(format!("server name: {e}")))?;

        let jws_path = args.capsule.join("capsule.jws");
        let jws = std::fs::read(&jws_path).map_err(|e| GatewayError::io(&jws_path, e))?;
        let jws = jws.trim_ascii_end();
        if jws.is_empty() {
            return Err(usage(format!("{}: empty", jws_path.display())));
        }

        Ok(Plan {
            shape: Shape {
                url: args.url.clone(),
                connections: args.connections,
                rate: args.rate,
                warmup,
                duration,
                http2: args.http2,
            },
            uri_base: if args.http2 {
                format!("https://{}", target.authority)
            } else {
                String::new()
            },
            host_header: HeaderValue::from_str(&target.authority)
                .map_err(|e| usage(format!("--url: {e}")))?,
            host: target.host,
            port: target.port,
            connector: TlsConnector::from(Arc::new(tls)),
            server_name,
            jws: Bytes::copy_from_slice(jws),
        })
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, http::Error> {
        let uri: Uri = format!("{}{path}", self.uri_base).parse()?;
        let mut builder = Request::builder().method(method).uri(uri);
        if !self.shape.http2 {
            builder = builder.header(HOST, self.host_header.clone());
        }
        if let Some(content_type) = content_type {
            builder = builder.header(CONTENT_TYPE, content_type);
        }
        builder.body(Full::new(body))
    }

    fn admission(&self) -> Result<Request<Full<Bytes>>, http::Error> {
        self.request(
            Method::POST,
            "/v1/admissions",
            Some("application/jose"),
            self.jws.clone(),
        )
    }

    /// A new connection: TCP, TLS 1.3 with both SVIDs, then the HTTP handshake.
    async fn connect(&self) -> Result<Sender, String> {
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            // Requests are small and latency is what is measured.
            tcp.set_nodelay(true)
                .map_err(|e| format!("TCP_NODELAY: {e}"))?;
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let io = TokioIo::new(tls);
            if self.shape.http2 {
                if io.inner().get_ref().1.alpn_protocol() != Some(&b"h2"[..]) {
                    return Err("the server did not agree to HTTP/2 (ALPN h2)".into());
                }
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                // A connection error surfaces on the sender; nothing to do with it here.
                tokio::spawn(conn);
                Ok(Sender::H2(send))
            } else {
                let (send, conn) = http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
                tokio::spawn(conn);
                Ok(Sender::H1(send))
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(r) => r,
            Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
        }
    }
}

struct Target {
    host: String,
    port: u16,
    authority: String,
}

/// `https://HOST[:PORT][/]`: anything else (another scheme, a path, a query) is refused
/// rather than silently ignored.
fn parse_url(url: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("--url `{url}`: {why} (expected https://HOST:PORT)");
    let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a path or query is not supported"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user information is not supported"));
    }
    let host = authority.host();
    // An IPv6 literal is bracketed in the URL, not in a socket address.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok(Target {
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(443),
        authority: authority.as_str().to_string(),
    })
}

/// Regular files under `dir`, recursively (symbolic links are not followed: the
/// capsule's artifacts are regular files).
fn walk_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), GatewayError> {
    let entries = std::fs::read_dir(dir).map_err(|e| GatewayError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| GatewayError::io(dir, e))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| GatewayError::io(&path, e))?;
        if meta.is_dir() {
            walk_files(&path, out)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// One HTTP connection's request handle.
enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// An answer: its status and, for a decision, its `verdict`.
struct Answer {
    status: u16,
    verdict: Option<String>,
    body: Bytes,
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends and reads the whole answer (reading it frees the connection for the next).
    async fn exchange(&mut self, req: Request<Full<Bytes>>) -> Result<Answer, Failure> {
        let exchange = async {
            let resp = match self {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
            };
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Err(_) => Err(Failure::new(
                "timeout",
                format!("no answer within {REQUEST_TIMEOUT:?}"),
            )),
            Ok(Err(e)) => Err(Failure::new("request", e.to_string())),
            Ok(Ok((status, body))) => Ok(Answer {
                status,
                verdict: SERVED.contains(&status).then(|| verdict(&body)).flatten(),
                body,
            }),
        }
    }
}

/// The decision's `verdict` field, if the body is a JSON object with one.
fn verdict(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Decision {
        verdict: Option<String>,
    }
    serde_json::from_slice::<Decision>(body).ok()?.verdict
}

/// A transport-level failure: its kind (`connect`, `request`, `timeout`, `task`) and
/// what happened.
struct Failure {
    kind: &'static str,
    message: String,
}

impl Failure {
    fn new(kind: &'static str, message: String) -> Failure {
        Failure { kind, message }
    }
}

/// One request's fate: when it was due, when it was sent and when it ended.
struct Done {
    due: Instant,
    sent: Instant,
    finished: Instant,
    result: Result<Answer, Failure>,
}

impl Done {
    /// A request that failed before it went out.
    fn not_sent(due: Instant, kind: &'static str, message: String) -> Done {
        let now = Instant::now();
        Done {
            due,
            sent: now,
            finished: now,
            result: Err(Failure::new(kind, message)),
        }
    }
}

/// When request `k` of connection `conn` is due, from the start: the connections take
/// turns, so together they send one request every `1 / rate` s. `rate` must be > 0.
fn due_offset(conn: usize, k: u64, connections: usize, rate: f64) -> Duration {
    let slot = k as f64 * connections as f64 + conn as f64;
    Duration::try_from_secs_f64(slot / rate).unwrap_or(Duration::MAX)
}

/// The run's timeline: load from `start`, counted from `measure_from`, nothing sent from
/// `end`.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

impl Window {
    /// When request `k` of connection `index` is due (open loop); past the end if it
    /// cannot be represented.
    fn due(&self, plan: &Plan, index: usize, k: u64) -> Instant {
        self.start
            .checked_add(due_offset(
                index,
                k,
                plan.shape.connections,
                plan.shape.rate,
            ))
            .unwrap_or(self.end)
    }
}

/// Uploads the blobs, opens the connections, runs them and merges what they saw.
async fn drive(plan: Arc<Plan>, files: &[PathBuf]) -> Result<Stats, GatewayError> {
    let fail = |m: String| GatewayError::Usage(format!("{}: {m}", plan.shape.url));
    // The first connection answers whether the server can be used at all: the client
    // certificate is judged only after the TLS 1.3 handshake, so ask something.
    let mut first = plan.connect().await.map_err(fail)?;
    let req = plan
        .request(Method::GET, "/readyz", None, Bytes::new())
        .map_err(|e| fail(e.to_string()))?;
    let ready = first.exchange(req).await.map_err(|e| fail(e.message))?;
    if ready.status != 200 {
        return Err(fail(format!("GET /readyz answered {}", ready.status)));
    }
    upload(&plan, &mut first, files).await?;

    let mut senders = vec![first];
    for i in 1..plan.shape.connections {
        let s = plan.connect().await.map_err(|m| {
            fail(format!(
                "connection {} of {}: {m}",
                i + 1,
                plan.shape.connections
            ))
        })?;
        senders.push(s);
    }

    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + plan.shape.warmup,
        end: start + plan.shape.warmup + plan.shape.duration,
    };
    let mut tasks = JoinSet::new();
    for (i, sender) in senders.into_iter().enumerate() {
        tasks.spawn(connection(plan.clone(), i, window, sender, Stats::new()?));
    }
    let mut total = Stats::new()?;
    while let Some(joined) = tasks.join_next().await {
        let stats = joined.map_err(|e| GatewayError::Usage(format!("connection task: {e}")))?;
        total.merge(&stats)?;
    }
    Ok(total)
}

/// PUTs each file as a blob named by its SHA-256.
async fn upload(plan: &Plan, sender: &mut Sender, files: &[PathBuf]) -> Result<(), GatewayError> {
    let (mut stored, mut present) = (0, 0);
    for path in files {
        // Blocking read: nothing else runs on the runtime yet.
        let bytes = std::fs::read(path).map_err(|e| GatewayError::io(path, e))?;
        let digest = verify_core::crypto::default_backend().sha256_oneshot(&bytes);
        let path_uri = format!("/v1/blobs/sha256:{}", attest::hex::encode(&digest));
        let fail = |m: String| GatewayError::Usage(format!("upload of {}: {m}", path.display()));
        let req = plan
            .request(
                Method::PUT,
                &path_uri,
                Some("application/octet-stream"),
                bytes.into(),
            )
            .map_err(|e| fail(e.to_string()))?;
        let answer = sender.exchange(req).await.map_err(|e| fail(e.message))?;
        match answer.status {
            201 => stored += 1,
            200 => present += 1,
            s => {
                let body = String::from_utf8_lossy(&answer.body);
                return Err(fail(format!("answered {s}: {}", body.trim())));
            }
        }
    }
    if !files.is_empty() {
        eprintln!(
            "loadgen: {} blob(s) uploaded: {stored} stored, {present} already present",
            files.len()
        );
    }
    Ok(())
}

/// One connection's loop; returns what it saw.
async fn connection(
    plan: Arc<Plan>,
    index: usize,
    w: Window,
    first: Sender,
    mut stats: Stats,
) -> Stats {
    let open_loop = plan.shape.rate > 0.0;
    let mut sender = Some(first);
    let mut in_flight: JoinSet<Done> = JoinSet::new();
    let mut k: u64 = 0;
    loop {
        let due = if open_loop {
            w.due(&plan, index, k)
        } else {
            Instant::now()
        };
        if due >= w.end {
            break;
        }
        // tokio's timer rounds deadlines up to its next millisecond tick (a sleep even
        // to a past instant waits for one): wake up to TIMER_SLACK early instead, and
        // charge latency from the earlier of due and sent (`Stats::record`), so the
        // rounding shows in neither the schedule nor the figures, with no busy wait.
        let wake = due.checked_sub(TIMER_SLACK).unwrap_or(due);
        if wake > Instant::now() {
            tokio::time::sleep_until(wake).await;
        }
        if Instant::now() >= w.end {
            if open_loop {
                // Behind schedule at the end: count what was due but never sent.
                stats.unsent += (k..)
                    .map(|k| w.due(&plan, index, k))
                    .take_while(|due| *due < w.end)
                    .filter(|due| *due >= w.measure_from)
                    .count() as u64;
            }
            break;
        }
        k += 1;
        let counted = due >= w.measure_from;

        if sender.as_ref().is_none_or(Sender::is_closed) {
            match plan.connect().await {
                Ok(s) => sender = Some(s),
                Err(message) => {
                    stats.record(counted, Done::not_sent(due, "connect", message));
                    if !open_loop {
                        let pause = Instant::now() + RECONNECT_PAUSE;
                        tokio::time::sleep_until(pause.min(w.end)).await;
                    }
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let req = match plan.admission() {
            Ok(r) => r,
            Err(e) => {
                stats.record(counted, Done::not_sent(due, "request", e.to_string()));
                continue;
            }
        };

        match s {
            Sender::H2(h2) if open_loop => {
                while in_flight.len() >= MAX_STREAMS {
                    if let Some(done) = in_flight.join_next().await {
                        stats.record_joined(w, done);
                    }
                }
                let mut own = Sender::H2(h2.clone());
                in_flight.spawn(async move {
                    let sent = Instant::now();
                    let result = own.exchange(req).await;
                    Done {
                        due,
                        sent,
                        finished: Instant::now(),
                        result,
                    }
                });
            }
            _ => {
                let sent = Instant::now();
                let result = s.exchange(req).await;
                if result.is_err() {
                    // The connection's state is unknown: start a fresh one.
                    sender = None;
                }
                stats.record(
                    counted,
                    Done {
                        due,
                        sent,
                        finished: Instant::now(),
                        result,
                    },
                );
            }
        }
        while let Some(done) = in_flight.try_join_next() {
            stats.record_joined(w, done);
        }
    }
    while let Some(done) = in_flight.join_next().await {
        stats.record_joined(w, done);
    }
    stats
}

/// What the counted requests saw.
struct Stats {
    /// Every answer, any status.
    all: Histogram<u64>,
    /// Answers carrying a decision (200, 403).
    served: Histogram<u64>,
    /// How late requests went out after they were due (the generator's own lag).
    lag: Histogram<u64>,
    status: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    verdicts: BTreeMap<String, u64>,
    unsent: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Stats {
    fn new() -> Result<Stats, GatewayError> {
        let h = || {
            Histogram::new_with_bounds(1, HIST_MAX_US, 3)
                .map_err(|e| GatewayError::Usage(format!("histogram: {e}")))
        };
        Ok(Stats {
            all: h()?,
            served: h()?,
            lag: h()?,
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
            first_error: None,
            verdicts: BTreeMap::new(),
            unsent: 0,
        })
    }

    fn record(&mut self, counted: bool, done: Done) {
        if !counted {
            return;
        }
        self.lag
            .saturating_record(micros(done.sent.saturating_duration_since(done.due)));
        match done.result {
            Ok(answer) => {
                // From the due time, or from the send when it went out a little early.
                let from = done.sent.min(done.due);
                let us = micros(done.finished.saturating_duration_since(from)).max(1);
                self.all.saturating_record(us);
                if SERVED.contains(&answer.status) {
                    self.served.saturating_record(us);
                }
                *self.status.entry(answer.status).or_default() += 1;
                if let Some(v) = answer.verdict {
                    *self.verdicts.entry(v).or_default() += 1;
                }
            }
            Err(f) => {
                *self.errors.entry(f.kind).or_default() += 1;
                self.first_error.get_or_insert(f.message);
            }
        }
    }

    fn record_joined(&mut self, w: Window, joined: Result<Done, tokio::task::JoinError>) {
        match joined {
            Ok(done) => self.record(done.due >= w.measure_from, done),
            Err(e) => {
                *self.errors.entry("task").or_default() += 1;
                self.first_error.get_or_insert(e.to_string());
            }
        }
    }

    fn merge(&mut self, other: &Stats) -> Result<(), GatewayError> {
        for (mine, theirs) in [
            (&mut self.all, &other.all),
            (&mut self.served, &other.served),
            (&mut self.lag, &other.lag),
        ] {
            mine.add(theirs)
                .map_err(|e| GatewayError::Usage(format!("histogram: {e:?}")))?;
        }
        for (k, v) in &other.status {
            *self.status.entry(*k).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in &other.verdicts {
            *self.verdicts.entry(k.clone()).or_default() += v;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.unsent += other.unsent;
        Ok(())
    }
}

/// Percentiles in milliseconds; `null`s when nothing was recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Percentiles {
    count: u64,
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    max: Option<f64>,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let nonempty = !h.is_empty();
        let ms = |us: u64| nonempty.then_some(us as f64 / 1000.0);
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    fn json(&self) -> Value {
        json!({
            "count": self.count,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "p999": self.p999,
            "max": self.max,
        })
    }

    fn text(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
            f(self.p50),
            f(self.p90),
            f(self.p99),
            f(self.p999),
            f(self.max),
            self.count
        )
    }
}

/// The figures of a run. Rates are over the measured window (`--duration`).
#[derive(Debug, Clone, PartialEq)]
struct Report {
    shape: Shape,
    /// Counted requests: answered or failed at transport level.
    requests: u64,
    /// Answers (any status) per second.
    throughput_rps: f64,
    /// Decisions (200, 403) per second.
    served_rps: f64,
    status: BTreeMap<u16, u64>,
    errors: u64,
    errors_by_kind: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    verdicts: BTreeMap<String, u64>,
    unsent: u64,
    latency: Percentiles,
    served_latency: Percentiles,
    send_lag: Percentiles,
    /// Counted requests sent per second.
    rate_achieved: f64,
}

impl Report {
    fn new(shape: &Shape, s: &Stats) -> Report {
        let answers: u64 = s.status.values().sum();
        let served: u64 = SERVED.iter().filter_map(|c| s.status.get(c)).sum();
        let errors: u64 = s.errors.values().sum();
        let secs = shape.duration.as_secs_f64();
        Report {
            shape: shape.clone(),
            requests: answers + errors,
            throughput_rps: answers as f64 / secs,
            served_rps: served as f64 / secs,
            status: s.status.clone(),
            errors,
            errors_by_kind: s.errors.clone(),
            first_error: s.first_error.clone(),
            verdicts: s.verdicts.clone(),
            unsent: s.unsent,
            latency: Percentiles::of(&s.all),
            served_latency: Percentiles::of(&s.served),
            send_lag: Percentiles::of(&s.lag),
            rate_achieved: (answers + errors) as f64 / secs,
        }
    }

    fn json(&self) -> Value {
        let status: serde_json::Map<String, Value> = self
            .status
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        json!({
            "requests": self.requests,
            "duration_s": self.shape.duration.as_secs_f64(),
            "throughput_rps": self.throughput_rps,
            "served_rps": self.served_rps,
            "status": status,
            "errors": self.errors,
            "errors_by_kind": self.errors_by_kind,
            "first_error": self.first_error,
            "verdicts": self.verdicts,
            "unsent": self.unsent,
            "latency_ms": self.latency.json(),
            "served_latency_ms": self.served_latency.json(),
            "send_lag_ms": self.send_lag.json(),
            "rate_requested": self.shape.rate,
            "rate_achieved": self.rate_achieved,
            "connections": self.shape.connections,
            "http2": self.shape.http2,
            "warmup_s": self.shape.warmup.as_secs_f64(),
        })
    }

    fn text(&self) -> String {
        let list = |m: Vec<(String, u64)>| {
            if m.is_empty() {
                "-".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let shape = &self.shape;
        let mode = if shape.rate > 0.0 {
            format!("open loop at {} req/s", shape.rate)
        } else {
            "closed loop".to_string()
        };
        let mut out = format!(
            "{}: {} connections ({}), {mode}, {} s measured after {} s warm-up\n",
            shape.url,
            shape.connections,
            if shape.http2 { "HTTP/2" } else { "HTTP/1.1" },
            shape.duration.as_secs_f64(),
            shape.warmup.as_secs_f64(),
        );
        let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<14}{v}\n"));
        line(
            "requests",
            format!("{} ({} unsent)", self.requests, self.unsent),
        );
        line(
            "throughput",
            format!(
                "{:.1} answers/s, {:.1} decisions/s",
                self.throughput_rps, self.served_rps
            ),
        );
        if shape.rate > 0.0 {
            line(
                "rate",
                format!(
                    "{:.1} req/s of {} requested",
                    self.rate_achieved, shape.rate
                ),
            );
        }
        line(
            "status",
            list(
                self.status
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
            ),
        );
        line(
            "errors",
            list(
                self.errors_by_kind
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
            ),
        );
        if let Some(e) = &self.first_error {
            line("first error", e.clone());
        }
        line(
            "verdicts",
            list(self.verdicts.iter().map(|(k, v)| (k.clone(), *v)).collect()),
        );
        line("latency ms", self.latency.text());
        line("served ms", self.served_latency.text());
        if shape.rate > 0.0 {
            line("send lag ms", self.send_lag.text());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rate: f64) -> Shape {
        Shape {
            url: "https://127.0.0.1:8443".into(),
            connections: 4,
            rate,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(2),
            http2: false,
        }
    }

    #[test]
    fn connections_interleave_into_one_evenly_spaced_stream() {
        // 4 connections at 100 req/s: each sends every 40 ms, offset by 10 ms.
        let (n, rate) = (4, 100.0);
        let mut all: Vec<Duration> = (0..n)
            .flat_map(|c| (0..25).map(move |k| due_offset(c, k, n, rate)))
            .collect();
        assert_eq!(due_offset(1, 0, n, rate), Duration::from_millis(10));
        assert_eq!(due_offset(1, 1, n, rate), Duration::from_millis(50));
        all.sort();
        for (i, due) in all.iter().enumerate() {
            let want = i as f64 * 0.010;
            assert!((due.as_secs_f64() - want).abs() < 1e-9, "slot {i}: {due:?}");
        }
    }

    #[test]
    fn a_second_of_schedule_holds_exactly_the_rate() {
        // Rates that do not divide evenly among connections still add up.
        for (n, rate, want) in [(3, 7.0, 7), (8, 1000.0, 1000), (5, 2.5, 3), (1, 1.0, 1)] {
            let in_one_second: usize = (0..n)
                .map(|c| {
                    (0..)
                        .take_while(|k| due_offset(c, *k, n, rate) < Duration::from_secs(1))
                        .count()
                })
                .sum();
            assert_eq!(in_one_second, want, "{n} connections at {rate}/s");
        }
    }

    #[test]
    fn urls_are_https_host_port_only() {
        let t = parse_url("https://127.0.0.1:8443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8443));
        assert_eq!(t.authority, "127.0.0.1:8443");
        let t = parse_url("https://[::1]:9000/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        assert_eq!(t.authority, "[::1]:9000");
        assert_eq!(parse_url("https://gw.example").unwrap().port, 443);
        for bad in [
            "http://127.0.0.1:8443",
            "127.0.0.1:8443",
            "https://127.0.0.1:8443/v1",
            "https://127.0.0.1:8443/?a=b",
            "https://user@127.0.0.1:8443",
            "https://",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    fn answer(status: u16, verdict: Option<&str>) -> Result<Answer, Failure> {
        Ok(Answer {
            status,
            verdict: verdict.map(String::from),
            body: Bytes::new(),
        })
    }

    fn done(latency_ms: u64, result: Result<Answer, Failure>) -> Done {
        let due = Instant::now();
        Done {
            due,
            sent: due,
            finished: due + Duration::from_millis(latency_ms),
            result,
        }
    }

    #[test]
    fn the_decision_verdict_is_read_from_the_body() {
        assert_eq!(
            verdict(br#"{"capsule":"x","verdict":"admit","reason":null}"#).as_deref(),
            Some("admit")
        );
        assert_eq!(verdict(br#"{"error":"x"}"#), None);
        assert_eq!(verdict(b"not json"), None);
    }

    #[test]
    fn stats_count_only_the_measured_window_and_split_served() {
        let mut s = Stats::new().unwrap();
        s.record(false, done(5, answer(200, Some("admit")))); // warm-up
        s.record(true, done(2, answer(200, Some("admit"))));
        s.record(true, done(4, answer(403, Some("deny"))));
        s.record(true, done(100, answer(503, None)));
        let refused = Failure::new("connect", "refused".into());
        s.record(true, done(0, Err(refused)));
        let mut other = Stats::new().unwrap();
        other.record(true, done(3, answer(200, Some("admit"))));
        other.unsent = 2;
        s.merge(&other).unwrap();

        assert_eq!(s.status, BTreeMap::from([(200, 2), (403, 1), (503, 1)]));
        assert_eq!(s.errors, BTreeMap::from([("connect", 1)]));
        assert_eq!(s.first_error.as_deref(), Some("refused"));
        assert_eq!(
            s.verdicts,
            BTreeMap::from([("admit".to_string(), 2), ("deny".to_string(), 1)])
        );
        assert_eq!((s.all.len(), s.served.len(), s.unsent), (4, 3, 2));
        // The 503 is in the overall tail, not in the served one.
        assert!(Percentiles::of(&s.all).max.unwrap() >= 100.0);
        assert!(Percentiles::of(&s.served).max.unwrap() < 5.0);
    }

    #[test]
    fn percentiles_are_milliseconds_at_microsecond_resolution() {
        let mut h = Histogram::<u64>::new_with_bounds(1, HIST_MAX_US, 3).unwrap();
        assert_eq!(
            Percentiles::of(&h),
            Percentiles {
                count: 0,
                p50: None,
                p90: None,
                p99: None,
                p999: None,
                max: None
            }
        );
        for us in 1..=10_000 {
            h.record(us).unwrap(); // 1 µs .. 10 ms
        }
        let p = Percentiles::of(&h);
        let near = |got: Option<f64>, want: f64| {
            let got = got.unwrap();
            assert!((got - want).abs() <= want * 0.002, "{got} vs {want}");
        };
        assert_eq!(p.count, 10_000);
        near(p.p50, 5.0);
        near(p.p90, 9.0);
        near(p.p99, 9.9);
        near(p.p999, 9.99);
        near(p.max, 10.0);
    }

    #[test]
    fn the_json_report_has_the_documented_shape() {
        let mut s = Stats::new().unwrap();
        for ms in 1..=10 {
            s.record(true, done(ms, answer(200, Some("admit"))));
        }
        s.record(true, done(1, answer(503, None)));
        let r = Report::new(&shape(10.0), &s);
        let v = r.json();
        for key in [
            "requests",
            "duration_s",
            "throughput_rps",
            "status",
            "errors",
            "latency_ms",
            "served_latency_ms",
            "rate_requested",
            "rate_achieved",
            "connections",
            "verdicts",
            "unsent",
        ] {
            assert!(v.get(key).is_some(), "missing `{key}` in {v}");
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(v["latency_ms"][key].is_f64(), "latency_ms.{key}");
            assert!(v["served_latency_ms"][key].is_f64(), "served.{key}");
        }
        assert_eq!(v["requests"], 11);
        assert_eq!(v["duration_s"], 2.0);
        assert_eq!(v["throughput_rps"], 5.5);
        assert_eq!(v["status"]["200"], 10);
        assert_eq!(v["status"]["503"], 1);
        assert_eq!(v["errors"], 0);
        assert_eq!(v["verdicts"]["admit"], 10);
        assert_eq!(v["rate_requested"], 10.0);
        assert_eq!(v["connections"], 4);
        // Nothing served: nulls, not made-up zeros.
        let empty = Report::new(&shape(0.0), &Stats::new().unwrap()).json();
        assert!(empty["served_latency_ms"]["p99"].is_null());
        assert_eq!(empty["served_latency_ms"]["count"], 0);
        // The text report names every figure.
        let text = r.text();
        for word in [
            "throughput",
            "status",
            "200: 10",
            "p99.9",
            "open loop at 10",
        ] {
            assert!(text.contains(word), "`{word}` in\n{text}");
        }
    }
}
