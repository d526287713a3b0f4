//! The plain-HTTP listener (`[health] listen`, `serve --health-listen`): `/healthz`,
//! `/readyz` and `/metrics` without TLS, for probes and scrapers that hold no SVID.
//! It answers exactly what the mTLS routes answer and nothing else (every other path
//! is 404), so it exposes no admission, run or blob. Loopback by default; a wider
//! address is the operator's choice and is logged as a warning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::idle::IdleTimeout;
use super::Service;
use crate::GatewayError;

/// Connections served at once; beyond it a new one is closed at once (a probe retries).
const MAX_CONNECTIONS: usize = 64;
/// A request head, and any silence, longer than this closes the connection.
const TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed accept (out of file descriptors), wait this long before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Binds `listen` and serves on `runtime` until `stopped`; returns the bound address.
pub fn start(
    runtime: &tokio::runtime::Runtime,
    listen: SocketAddr,
    service: Arc<Service>,
    stopped: watch::Receiver<bool>,
) -> Result<SocketAddr, GatewayError> {
    let listener = runtime
        .block_on(TcpListener::bind(listen))
        .map_err(|e| GatewayError::io(format!("health.listen {listen}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| GatewayError::io(format!("health.listen {listen}"), e))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the plain health listener is not on loopback: /metrics is readable without a client certificate"
        );
    }
    runtime.spawn(accept_loop(listener, service, stopped));
    Ok(addr)
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<Service>,
    mut stopped: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            continue; // dropped: closed
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _place = place;
            let handler = hyper::service::service_fn(move |req| {
                let service = service.clone();
                async move { super::http::handle_plain(&service, &req).await }
            });
            let io = IdleTimeout::new(tcp, TIMEOUT);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(TIMEOUT)
                .serve_connection(TokioIo::new(io), handler)
                .await;
        });
    }
}
