//! The HTTP API: routes, body limits and the JSON answers. Every request comes from
//! a peer whose SPIFFE ID the TLS layer authenticated; that ID is the runner the
//! admission is checked for.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use serde_json::{json, Value};
use verify_core::{Capsule, Decision, Sha256Digest, SpiffeId};

use super::blobs::{parse_blob_path, UploadError};
use super::linger::{LINGER_BYTES, LINGER_TIME};
use super::metrics::RunOutcome;
use super::runs::RunStatus;
use super::Service;
use crate::output::decision_json;

pub type Reply = Response<Full<Bytes>>;

/// Seconds a shed client is asked to wait.
const RETRY_AFTER_S: &str = "1";
/// A body answered early that sends nothing for this long is not drained further.
const DRAIN_STALL: Duration = Duration::from_secs(1);

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The message of an error answer, kept beside it so that a 5xx can be logged with it.
#[derive(Debug, Clone)]
struct ErrorMessage(String);

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    let message = message.into();
    let mut r = json_reply(status, &json!({ "error": message }));
    if status.is_server_error() {
        r.extensions_mut().insert(ErrorMessage(message));
    }
    r
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn shed() -> Reply {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "admission queue full; retry later",
    );
    r.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_static(RETRY_AFTER_S),
    );
    r
}

/// A request body that, dropped before its end, leaves itself to [`handle`], which
/// drains it (bounded) before the answer goes out.
#[derive(Debug)]
pub struct Tracked {
    inner: Option<Incoming>,
    ended: bool,
    leftover: Arc<Mutex<Option<Incoming>>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let (false, Some(body)) = (self.ended, self.inner.take()) {
            if let Ok(mut slot) = self.leftover.lock() {
                *slot = Some(body);
            }
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let poll = Pin::new(&mut *inner).poll_frame(cx);
        // Ended, or failed (then there is nothing left worth draining).
        if inner.is_end_stream() || matches!(poll, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.ended = true;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Reads and drops what is left of a body answered early, for at most
/// `LINGER_BYTES` and `LINGER_TIME` (and `DRAIN_STALL` without a frame); true if
/// it ended. HTTP/2 clients such as curl report an answer followed by RST_STREAM
/// while they are still sending as a stream error, and an HTTP/1.1 connection with
/// body bytes pending cannot carry the next request.
async fn drain(mut body: Incoming) -> bool {
    let end = tokio::time::Instant::now() + LINGER_TIME;
    let mut len = 0u64;
    loop {
        let next = tokio::time::timeout(DRAIN_STALL, body.frame());
        match tokio::time::timeout_at(end, next).await {
            Ok(Ok(None)) => return true,
            Ok(Ok(Some(Ok(frame)))) => {
                len = len.saturating_add(frame.data_ref().map_or(0, |d| d.len() as u64));
                if len > LINGER_BYTES {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// One request. Never fails at the HTTP level: every outcome is a response.
pub async fn handle(
    svc: Arc<Service>,
    peer: Arc<SpiffeId>,
    req: Request<Incoming>,
) -> Result<Reply, Infallible> {
    let h1 = req.version() < Version::HTTP_2;
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let leftover = Arc::new(Mutex::new(None));
    let req = req.map(|inner| Tracked {
        ended: inner.is_end_stream(),
        inner: Some(inner),
        leftover: leftover.clone(),
    });
    let mut reply = route(&svc, &peer, req).await;
    // Answered before the body was read whole (413, 503, a bad path): the rest is
    // drained first, so that the answer arrives as an answer. A stalled body (408)
    // is not waited for again. An HTTP/1.1 connection whose body could not be
    // drained says it closes (and is closed gracefully, `linger`); HTTP/2 resets
    // just the stream, with NO_ERROR, after the answer.
    let rest = leftover.lock().ok().and_then(|mut l| l.take());
    if let Some(rest) = rest {
        let drained = reply.status() != StatusCode::REQUEST_TIMEOUT && drain(rest).await;
        if h1 && !drained {
            reply.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
    }
    let status = reply.status();
    svc.metrics.response(status.as_u16());
    if status.is_server_error() {
        let why = reply
            .extensions()
            .get::<ErrorMessage>()
            .map(|m| m.0.as_str());
        tracing::warn!(
            target: "capsule_gateway::http",
            status = status.as_u16(),
            %method,
            path,
            peer = %peer,
            why,
            "server error"
        );
    }
    Ok(reply)
}

/// `/healthz`, `/readyz` and `/metrics`: the same answers on the mTLS listener and
/// on the plain one (`health`).
async fn probe(svc: &Service, path: &str) -> Option<Reply> {
    Some(match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => match svc.readiness().await {
            Ok(()) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain",
            ),
        },
        "/metrics" => text(
            StatusCode::OK,
            svc.metrics_text(),
            "text/plain; version=0.0.4",
        ),
        _ => return None,
    })
}

/// One request on the plain health listener: the probes, and nothing else.
pub async fn handle_plain<B>(svc: &Service, req: &Request<B>) -> Result<Reply, Infallible> {
    let path = req.uri().path();
    let reply = if req.method() == Method::GET {
        probe(svc, path).await
    } else {
        None
    };
    Ok(reply.unwrap_or_else(|| match path {
        "/healthz" | "/readyz" | "/metrics" => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "this listener serves /healthz, /readyz and /metrics only",
        ),
    }))
}

async fn route(svc: &Service, peer: &SpiffeId, req: Request<Tracked>) -> Reply {
    let path = req.uri().path().to_string();
    if req.method() == Method::GET {
        if let Some(reply) = probe(svc, &path).await {
            return reply;
        }
    }
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/admissions") => admission(svc, peer, req).await,
        (&Method::POST, "/v1/runs") => start_run(svc, peer, req).await,
        (&Method::GET, p) if p.starts_with("/v1/runs/") => {
            run_status(svc, peer, &p["/v1/runs/".len()..])
        }
        (&Method::PUT, p) if p.starts_with("/v1/blobs/") => match parse_blob_path(p) {
            Some(digest) => put_blob(svc, digest, req).await,
            None => error(
                StatusCode::BAD_REQUEST,
                "blob path must be /v1/blobs/sha256:<64 lowercase hex>",
            ),
        },
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/admissions" | "/v1/runs") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// Reads a whole body of at most `limit` bytes within the body deadline.
async fn read_body(body: Tracked, limit: usize, deadline: Duration) -> Result<Bytes, Reply> {
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large(limit as u64));
    }
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit as u64)),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, format!("request body: {e}"))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn too_large(limit: u64) -> Reply {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than {limit} bytes"),
    )
}

/// Verifies one capsule through the batcher; the answer is given only after the
/// decision is durable.
async fn admit(
    svc: &Service,
    peer: &SpiffeId,
    req: Request<Tracked>,
) -> Result<(verify_core::Admitted, Value), Refused> {
    // One byte over the JWS limit for a trailing newline, as the CLI tolerates.
    let limit = svc.admissions.policy().limits.max_jws_bytes + 1;
    // Admission bodies are held in memory until their decision is durable: the bytes
    // that may be held at once are bounded across all connections and streams (the
    // declared length, else the limit, is reserved before reading). None left: shed.
    let reserve = req
        .body()
        .size_hint()
        .exact()
        .map_or(limit, |n| usize::try_from(n).unwrap_or(limit).min(limit));
    let _held = svc.reserve_body(reserve).ok_or_else(shed)?;
    let body = read_body(req.into_body(), limit, svc.limits.body_timeout()).await?;
    let started = Instant::now();
    let capsule = Capsule::from_bytes(&body, svc.blobs.source()).with_root(svc.blobs.root());
    let rx = svc
        .batcher
        .submit(capsule, peer.clone())
        .map_err(|_| shed())?;
    let outcome = rx.await.map_err(|_| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the admission pipeline stopped",
        )
    })?;
    match outcome {
        Err(state) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("not recorded, not admitted: {state}"),
        )
        .into()),
        Ok(Err(denied)) => {
            svc.metrics.admission(&denied, started.elapsed());
            log_decision(&denied, peer);
            let reply = json_reply(
                StatusCode::FORBIDDEN,
                &decision_json(&capsule_name(&denied), &denied),
            );
            Err(Refused::Denied(Box::new(denied), reply))
        }
        Ok(Ok(admitted)) => {
            svc.metrics
                .admission(admitted.decision(), started.elapsed());
            let d = admitted.decision();
            log_decision(d, peer);
            let body = decision_json(&capsule_name(d), d);
            Ok((admitted, body))
        }
    }
}

/// One line per decision. The facts the verifier established, never the presented
/// bytes nor the detail (which may quote them). The fields are formatted only when
/// the level is enabled.
fn log_decision(d: &Decision, peer: &SpiffeId) {
    let digest = d.digest.as_ref().map(tracing::field::display);
    let (tenant, capsule_id) = (d.tenant.as_deref(), d.capsule_id.as_deref());
    match d.reason {
        None => tracing::info!(
            target: "capsule_gateway::admission",
            verdict = "admit",
            digest,
            tenant,
            capsule_id,
            version = d.version,
            peer = %peer,
            "admitted"
        ),
        Some(reason) => tracing::info!(
            target: "capsule_gateway::admission",
            verdict = "deny",
            reason = reason.as_str(),
            digest,
            tenant,
            capsule_id,
            version = d.version,
            peer = %peer,
            "denied"
        ),
    }
}

/// The `capsule` field of an answer: the JWS digest the verifier already computed
/// (the request has no path to name it by).
fn capsule_name(d: &Decision) -> String {
    d.digest.map(|x| x.to_string()).unwrap_or_default()
}

/// Why `admit` gave no admission: a denial (its decision, and the reply), or a
/// reply that says why nothing was decided.
enum Refused {
    Denied(Box<verify_core::Decision>, Reply),
    Reply(Reply),
}

impl From<Reply> for Refused {
    fn from(reply: Reply) -> Refused {
        Refused::Reply(reply)
    }
}

impl Refused {
    fn reply(self) -> Reply {
        match self {
            Refused::Denied(_, r) | Refused::Reply(r) => r,
        }
    }
}

async fn admission(svc: &Service, peer: &SpiffeId, req: Request<Tracked>) -> Reply {
    match admit(svc, peer, req).await {
        Ok((_, decision)) => json_reply(StatusCode::OK, &decision),
        Err(refused) => refused.reply(),
    }
}

async fn start_run(svc: &Service, peer: &SpiffeId, req: Request<Tracked>) -> Reply {
    let Some(runs) = &svc.runs else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no sandbox is configured for runs ([runs] in the config)",
        );
    };
    // A free run slot is taken before admitting, so that an admitted capsule is not
    // then refused for want of one.
    let Some(slot) = runs.slot() else {
        return shed();
    };
    let (admitted, decision) = match admit(svc, peer, req).await {
        Ok(x) => x,
        Err(Refused::Denied(denied, reply)) => {
            svc.metrics.run(RunOutcome::Denied, None);
            // A denied run leaves its denial bundle; the reply says the denial either way.
            if let Err(e) = runs.record_denial(&denied, peer) {
                tracing::error!(target: "capsule_gateway::runs", error = %e, "denial bundle not written");
            }
            return reply;
        }
        Err(Refused::Reply(reply)) => return reply,
    };
    match runs.start(
        slot,
        admitted,
        svc.admissions.policy(),
        peer,
        svc.metrics.clone(),
    ) {
        Ok(run_id) => json_reply(
            StatusCode::ACCEPTED,
            &json!({ "run_id": run_id.as_str(), "status": "running", "decision": decision }),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A run is visible to the peer that started it only; to anyone else it is exactly
/// an unknown id (same status, same body).
fn run_status(svc: &Service, peer: &SpiffeId, id: &str) -> Reply {
    let Some(runs) = &svc.runs else {
        return error(StatusCode::NOT_FOUND, "no such run");
    };
    match runs.status(id, peer) {
        RunStatus::Unknown => error(StatusCode::NOT_FOUND, "no such run"),
        RunStatus::Running => {
            json_reply(StatusCode::OK, &json!({"run_id": id, "status": "running"}))
        }
        RunStatus::Done { status, event } => json_reply(
            StatusCode::OK,
            &json!({"run_id": id, "status": status, "event": event}),
        ),
    }
}

/// Streams a blob into the store, checking its digest; a wrong digest stores nothing.
async fn put_blob(svc: &Service, digest: Sha256Digest, req: Request<Tracked>) -> Reply {
    let limit = svc.limits.max_blob_bytes;
    let mut body = req.into_body();
    if body.size_hint().lower() > limit {
        return too_large(limit);
    }
    if svc.blobs.contains(&digest) {
        // Content-addressed: the bytes are already here and are not stored again. The
        // body is still read and discarded (same limits): answered unread, hyper would
        // close the connection with bytes pending, and an HTTP/1.1 client still sending
        // them gets a reset instead of this answer.
        if let Err(reply) = discard_body(body, limit, svc.limits.body_timeout()).await {
            return reply;
        }
        return json_reply(
            StatusCode::OK,
            &json!({"digest": digest.to_string(), "stored": false}),
        );
    }
    let mut upload = match svc.blobs.begin(digest, limit) {
        Ok(u) => u,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("blob store: {e}"),
            )
        }
    };
    let deadline = tokio::time::Instant::now() + svc.limits.body_timeout();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time",
                )
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return error(StatusCode::BAD_REQUEST, format!("request body: {e}"))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if let Err(e) = upload.write(&data) {
                return upload_error(e);
            }
        }
    }
    match tokio::task::spawn_blocking(move || upload.finish()).await {
        Ok(Ok(stored)) => json_reply(
            StatusCode::CREATED,
            &json!({"digest": stored.digest.to_string(), "size": stored.size, "stored": true}),
        ),
        Ok(Err(e)) => upload_error(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("blob store: {e}"),
        ),
    }
}

/// Reads and drops a body of at most `limit` bytes within the body deadline.
async fn discard_body(mut body: Tracked, limit: u64, deadline: Duration) -> Result<(), Reply> {
    let deadline = tokio::time::Instant::now() + deadline;
    let mut len = 0u64;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(error(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time",
                ))
            }
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => {
                return Err(error(StatusCode::BAD_REQUEST, format!("request body: {e}")))
            }
            Ok(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                len = len.saturating_add(n);
                if len > limit {
                    return Err(too_large(limit));
                }
            }
        }
    }
}

fn upload_error(e: UploadError) -> Reply {
    match e {
        UploadError::TooLarge { limit } => too_large(limit),
        e @ UploadError::DigestMismatch { .. } => error(StatusCode::BAD_REQUEST, e.to_string()),
        e @ UploadError::Io(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
