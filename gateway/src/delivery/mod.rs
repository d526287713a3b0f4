//! Delivery of events to an HTTP CloudEvents sink, from a durable spool
//! ([`spool::Spool`]): structured content mode (`POST`, `Content-Type:
//! application/cloudevents+json`, the event as the body).
//!
//! **At-least-once, same `id`**: an event leaves the spool only after a 2xx, so a
//! sink that took the event and whose answer was lost (a timeout, a crash before the
//! removal) gets it again, byte for byte, with the same CloudEvents `id` (and
//! `source`): a receiver deduplicates on (`source`, `id`), as the CloudEvents spec
//! says consumers may.
//!
//! A sink that is down or slow blocks no run: every attempt has a timeout, and a
//! drain has a time budget and an attempt bound ([`DrainLimits`]). `run` makes one
//! bounded attempt; the service drains in a background thread ([`Deliverer`]) with
//! exponential backoff and jitter; `events deliver` drains on demand.

pub mod spool;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

pub use spool::Spool;

use crate::durable::DurableError;
use crate::error::ErrorClass;

/// The structured-mode media type (CloudEvents HTTP binding, 3.2).
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The sink URL is not one we deliver to.
    #[error("sink `{url}`: {detail}")]
    SinkUrl { url: String, detail: String },
    #[error("event spool {}: {source}", path.display())]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("event spool: {0}")]
    Write(#[from] DurableError),
    /// An event id that cannot name a spool file.
    #[error("event id `{0}` cannot be spooled")]
    EventId(String),
    /// The client's runtime could not start.
    #[error("event delivery: {0}")]
    Runtime(#[source] std::io::Error),
}

impl DeliveryError {
    pub fn class(&self) -> ErrorClass {
        match self {
            DeliveryError::SinkUrl { .. } => ErrorClass::Usage,
            _ => ErrorClass::Runtime,
        }
    }
}

/// Why one attempt did not deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptError {
    /// No answer within the timeout.
    Timeout,
    /// Connect or HTTP failed.
    Transport(String),
    /// The sink answered; not 2xx.
    Status(u16),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Timeout => f.write_str("timed out"),
            AttemptError::Transport(e) => f.write_str(e),
            AttemptError::Status(s) => write!(f, "answered {s}"),
        }
    }
}

impl AttemptError {
    /// A 4xx other than 408 (timeout) and 429 (slow down) will not change by
    /// retrying: the event is set aside instead of blocking the queue.
    fn is_permanent(&self) -> bool {
        matches!(self, AttemptError::Status(s) if (400..500).contains(s) && *s != 408 && *s != 429)
    }
}

/// An HTTP CloudEvents sink: `http://host[:port]/path`.
#[derive(Debug, Clone)]
pub struct Sink {
    url: String,
    host: String,
    port: u16,
    path: String,
    /// One attempt's limit: connect, request and answer.
    pub timeout: Duration,
}

impl Sink {
    /// Parses the sink URL. Only `http`: a sink reached over the network should sit
    /// behind a TLS-terminating proxy on this host (see docs/evidence.md).
    pub fn parse(url: &str, timeout: Duration) -> Result<Sink, DeliveryError> {
        let bad = |detail: &str| DeliveryError::SinkUrl {
            url: url.to_string(),
            detail: detail.to_string(),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// sinks are supported"));
        }
        let auth = uri.authority().ok_or_else(|| bad("no host"))?;
        if auth.as_str().contains('@') {
            return Err(bad("credentials in the URL are refused"));
        }
        if timeout.is_zero() {
            return Err(bad("the timeout must be above zero"));
        }
        Ok(Sink {
            url: url.to_string(),
            host: auth.host().trim_matches(['[', ']']).to_string(),
            port: auth.port_u16().unwrap_or(80),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            timeout,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), AttemptError> {
        let transport = |e: &dyn std::fmt::Display| AttemptError::Transport(e.to_string());
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| transport(&e))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| transport(&e))?;
        let conn = tokio::spawn(conn);
        let authority = if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let req = http::Request::post(self.path.as_str())
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| transport(&e))?;
        let resp = send.send_request(req).await.map_err(|e| transport(&e))?;
        let status = resp.status();
        // The answer's body is read (bounded by the attempt's timeout) so the
        // connection ends cleanly; its content is not used.
        let _ = resp.into_body().collect().await;
        conn.abort();
        if status.is_success() {
            Ok(())
        } else {
            Err(AttemptError::Status(status.as_u16()))
        }
    }
}

/// How long a drain may take and how often it tries one event.
#[derive(Debug, Clone, Copy)]
pub struct DrainLimits {
    /// The whole drain ends by then (an attempt under way is cut at it).
    pub budget: Duration,
    /// Attempts per event before the drain gives up (the event stays queued).
    pub attempts: u32,
    pub backoff: Backoff,
}

impl DrainLimits {
    /// `run`'s: one attempt, within one sink timeout.
    pub fn one_attempt(sink: &Sink) -> DrainLimits {
        DrainLimits {
            budget: sink.timeout,
            attempts: 1,
            backoff: Backoff::default(),
        }
    }
}

/// Exponential backoff with jitter: the `n`th retry waits a random time in
/// `[d/2, d]`, `d = min(base * 2^n, max)`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    pub fn delay(&self, retry: u32) -> Duration {
        let d = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX))
            .min(self.max);
        let mut r = [0u8; 4];
        // Jitter only: a failed random source means no jitter, not no retry.
        let _ = verify_core::crypto::default_backend().random(&mut r);
        let frac = f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX);
        d.mul_f64(0.5 + frac / 2.0)
    }
}

/// What one drain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    pub delivered: usize,
    /// Set aside under `rejected/` (the sink refused them for good).
    pub rejected: usize,
    /// Still queued.
    pub pending: usize,
    /// Another process was draining; this one sent nothing.
    pub busy: bool,
    pub last_error: Option<String>,
}

impl DrainReport {
    /// Logs what is still queued (nothing when the spool was emptied).
    pub fn warn_pending(&self, sink: &Sink, what: &str) {
        if self.pending > 0 {
            tracing::warn!(
                target: "capsule_gateway::delivery",
                sink = sink.url(),
                pending = self.pending,
                error = self.last_error.as_deref().unwrap_or(""),
                "{what}"
            );
        }
    }
}

/// The sink, the spool and a client runtime.
#[derive(Debug)]
pub struct Delivery {
    pub spool: Spool,
    pub sink: Sink,
    rt: tokio::runtime::Runtime,
}

impl Delivery {
    pub fn new(spool: Spool, sink: Sink) -> Result<Delivery, DeliveryError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(DeliveryError::Runtime)?;
        Ok(Delivery { spool, sink, rt })
    }

    /// One attempt, cut at `limit`.
    fn attempt(&self, body: Vec<u8>, limit: Duration) -> Result<(), AttemptError> {
        let limit = limit.min(self.sink.timeout);
        self.rt
            .block_on(async { tokio::time::timeout(limit, self.sink.post(body)).await })
            .unwrap_or(Err(AttemptError::Timeout))
    }

    /// Sends the queued events in order, each until it is delivered or `limits`
    /// are spent; stops at the first event that cannot be delivered (the sink is
    /// down: the rest would fail alike, and order is kept).
    pub fn drain(&self, limits: DrainLimits) -> Result<DrainReport, DeliveryError> {
        let end = Instant::now() + limits.budget;
        let mut report = DrainReport::default();
        let Some(_lock) = self.spool.try_lock()? else {
            report.busy = true;
            report.pending = self.spool.pending()?.len();
            return Ok(report);
        };
        let pending = self.spool.pending()?;
        let total = pending.len();
        'events: for path in pending {
            let body = self.spool.read(&path)?;
            let mut retry = 0;
            loop {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break 'events;
                }
                match self.attempt(body.clone(), left) {
                    Ok(()) => {
                        self.spool.remove(&path)?;
                        report.delivered += 1;
                        continue 'events;
                    }
                    Err(e) if e.is_permanent() => {
                        let kept = self.spool.reject(&path)?;
                        tracing::warn!(
                            target: "capsule_gateway::delivery",
                            sink = self.sink.url(),
                            event = %kept.display(),
                            error = %e,
                            "sink refused an event; kept under rejected/"
                        );
                        report.rejected += 1;
                        report.last_error = Some(e.to_string());
                        continue 'events;
                    }
                    Err(e) => {
                        report.last_error = Some(e.to_string());
                        retry += 1;
                        if retry >= limits.attempts {
                            break 'events;
                        }
                        let wait = limits.backoff.delay(retry - 1);
                        if Instant::now() + wait >= end {
                            break 'events;
                        }
                        std::thread::sleep(wait);
                    }
                }
            }
        }
        report.pending = total - report.delivered - report.rejected;
        Ok(report)
    }
}

/// The service's background delivery: a thread that drains the spool whenever an
/// event is queued, and retries with backoff while the sink is down. Dropping it
/// stops the thread (what is queued stays in the spool for the next start).
#[derive(Debug)]
pub struct Deliverer {
    wake: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    spool: Spool,
}

impl Deliverer {
    /// Starts the thread; it drains what an earlier process left at once.
    pub fn start(delivery: Delivery) -> Result<Deliverer, DeliveryError> {
        let (wake, rx) = mpsc::channel::<()>();
        let spool = delivery.spool.clone();
        let thread = std::thread::Builder::new()
            .name("event-delivery".into())
            .spawn(move || {
                let backoff = Backoff::default();
                let mut failures = 0u32;
                loop {
                    let limits = DrainLimits {
                        budget: Duration::from_secs(60),
                        attempts: 1,
                        backoff,
                    };
                    let wait = match delivery.drain(limits) {
                        Ok(r) if r.pending == 0 => {
                            failures = 0;
                            Duration::from_secs(60)
                        }
                        Ok(r) => {
                            r.warn_pending(&delivery.sink, "events not delivered yet; retrying");
                            failures = failures.saturating_add(1);
                            backoff.delay(failures - 1)
                        }
                        Err(e) => {
                            tracing::error!(target: "capsule_gateway::delivery", error = %e, "event spool");
                            failures = failures.saturating_add(1);
                            backoff.delay(failures - 1)
                        }
                    };
                    match rx.recv_timeout(wait) {
                        Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .map_err(DeliveryError::Runtime)?;
        Ok(Deliverer {
            wake: Some(wake),
            thread: Some(thread),
            spool,
        })
    }

    /// Queues an event durably and wakes the thread; returns once it is queued.
    pub fn enqueue(&self, id: &str, event: &[u8]) -> Result<(), DeliveryError> {
        self.spool.enqueue(id, event)?;
        if let Some(w) = &self.wake {
            let _ = w.send(());
        }
        Ok(())
    }
}

impl Drop for Deliverer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after its current attempt (bounded
        // by the sink timeout).
        self.wake.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Queues `event` (the outbound JSON) in `spool` and, when a sink is given, makes
/// one bounded attempt at the queue: `run`'s delivery.
pub fn enqueue_and_try(
    delivery: &Delivery,
    id: &str,
    event: &serde_json::Value,
) -> Result<DrainReport, DeliveryError> {
    let bytes = serde_json::to_vec(event).unwrap_or_default();
    delivery.spool.enqueue(id, &bytes)?;
    delivery.drain(DrainLimits::one_attempt(&delivery.sink))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for (retry, cap) in [(0, 100), (1, 200), (3, 800), (10, 1000)] {
            let d = b.delay(retry);
            assert!(
                d >= Duration::from_millis(cap / 2) && d <= Duration::from_millis(cap),
                "{retry}: {d:?}"
            );
        }
    }

    #[test]
    fn only_http_sinks_without_credentials_are_taken() {
        let t = Duration::from_secs(1);
        assert!(Sink::parse("http://127.0.0.1:9/events", t).is_ok());
        for bad in ["https://x/", "ftp://x/", "http://u:p@x/", "nonsense"] {
            assert!(
                matches!(Sink::parse(bad, t), Err(DeliveryError::SinkUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_permanent_refusal_is_a_4xx_other_than_408_and_429() {
        assert!(AttemptError::Status(400).is_permanent());
        assert!(!AttemptError::Status(429).is_permanent());
        assert!(!AttemptError::Status(503).is_permanent());
        assert!(!AttemptError::Timeout.is_permanent());
    }
}
