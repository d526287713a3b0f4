//! The flags become a validated [`Plan`] in one place: the target, the TLS client
//! (the runner's SVID, the server checked by SPIFFE ID), the admission body, and how
//! a connection is opened.

use std::sync::Arc;
use std::time::Duration;

use attest::svid::{FileSource, IdentitySource};
use attest::tls::{Authorize, Bundles, SvidCertResolver};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use verify_core::RunnerPattern;

use crate::client::Sender;
use crate::error::{ConnectError, LoadgenError};
use crate::LoadgenArgs;

/// TCP connect plus TLS and HTTP handshakes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What was asked for: the shape of the load (also what the report describes).
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub url: String,
    pub connections: usize,
    /// Requests/s over all connections; 0 is closed loop.
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    pub http2: bool,
}

/// The validated configuration, shared by the connection tasks.
pub struct Plan {
    pub shape: Shape,
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

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl Plan {
    pub fn new(args: &LoadgenArgs) -> Result<Plan, LoadgenError> {
        let usage = LoadgenError::Usage;
        let target = parse_url(&args.url)?;
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

        let authorize = match &args.server_id {
            Some(p) => Authorize::Matching(vec![RunnerPattern::parse(p).map_err(|m| {
                LoadgenError::ServerId {
                    pattern: p.clone(),
                    message: m.to_string(),
                }
            })?]),
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
        let jws = std::fs::read(&jws_path).map_err(|e| LoadgenError::io(&jws_path, e))?;
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

    pub fn request(
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

    pub fn admission(&self) -> Result<Request<Full<Bytes>>, http::Error> {
        self.request(
            Method::POST,
            "/v1/admissions",
            Some("application/jose"),
            self.jws.clone(),
        )
    }

    /// A new connection: TCP, TLS 1.3 with both SVIDs, then the HTTP handshake.
    pub async fn connect(&self) -> Result<Sender, ConnectError> {
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(ConnectError::Tcp)?;
            // Requests are small and latency is what is measured.
            tcp.set_nodelay(true).map_err(ConnectError::NoDelay)?;
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(ConnectError::Tls)?;
            let io = TokioIo::new(tls);
            if self.shape.http2 {
                if io.inner().get_ref().1.alpn_protocol() != Some(&b"h2"[..]) {
                    return Err(ConnectError::NoHttp2);
                }
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(ConnectError::Http2)?;
                // A connection error surfaces on the sender; nothing to do with it here.
                tokio::spawn(conn);
                Ok(Sender::H2(send))
            } else {
                let (send, conn) = http1::handshake(io).await.map_err(ConnectError::Http1)?;
                tokio::spawn(conn);
                Ok(Sender::H1(send))
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(CONNECT_TIMEOUT)),
        }
    }
}

/// Where `--url` points.
#[derive(Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub authority: String,
}

/// `https://HOST[:PORT][/]`: anything else (another scheme, a path, a query) is refused
/// rather than silently ignored.
pub fn parse_url(url: &str) -> Result<Target, LoadgenError> {
    let bad = |why: &str| LoadgenError::Url {
        url: url.to_string(),
        why: why.to_string(),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
