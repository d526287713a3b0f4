//! `capsule-gateway serve`: the admission service.
//!
//! tokio + rustls (TLS 1.3 only, aws-lc-rs), HTTP/1.1 and HTTP/2 via hyper. Each peer
//! is authenticated by its X.509-SVID (`attest::tls`) and must match `allowed_peers`
//! (default: some tenant's `runners`); admissions then check the peer's ID against
//! the capsule's tenant. Admissions are micro-batched (`batcher`), verified and
//! group-committed on the batcher's worker threads, recorded durably before any answer. Layout:
//!
//! - `config`: the TOML configuration; `devtrust`: the embedded development default;
//! - `http`: routes and answers; `blobs`: the content-addressed store;
//! - `batcher`: micro-batching and durability; `runs`: `/v1/runs` through the sandbox;
//! - `metrics`: Prometheus text; `idle`: the idle-connection deadline; `linger`: the
//!   lingering close;
//! - `pending`: the pool of connections still in the handshake, apart from the
//!   authenticated ones;
//! - `health`: the plain-HTTP listener for `/healthz`, `/readyz` and `/metrics`.
//!
//! Logs (`tracing`, set up by the CLI): every admission and denial (`http`), every
//! handshake that led to no connection and why (here), every 5xx (`http`).

pub mod batcher;
pub mod blobs;
pub mod config;
pub mod devtrust;
pub mod health;
pub mod http;
pub mod idle;
pub mod linger;
pub mod metrics;
pub mod pending;
pub mod runs;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attest::svid::{FileSource, IdentitySource, WorkloadApiSource};
use attest::tls::{Authorize, Bundles, SvidCertResolver};
use attest::tpm::{Tcti, Tpm};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use verify_core::{HashMode, Policy, RunnerPattern};

use self::batcher::{Admissions, Batcher};
use self::blobs::BlobStore;
use self::config::{ServeConfig, ServiceLimits};
use self::idle::IdleTimeout;
use self::metrics::{HandshakeFailure, Metrics};
use self::pending::{PendingPool, PendingSlot};
use self::runs::Runs;
use crate::admission::{load_policy, system_clock, Admission};
use crate::sealed::SealedKeys;
use crate::selfcheck::schedule::SelfcheckStatus;
use crate::state::StateDir;
use crate::GatewayError;

/// How long the Workload API may take to hand out the first SVID.
const WORKLOAD_API_TIMEOUT: Duration = Duration::from_secs(10);
/// A TPM that does not answer `/readyz`'s question within this is not ready.
const TPM_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed accept (out of file descriptors), wait this long before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Everything a request handler needs, shared by all connections.
#[derive(Debug)]
pub struct Service {
    pub admissions: Arc<Admissions>,
    pub batcher: Batcher,
    pub blobs: BlobStore,
    pub metrics: Arc<Metrics>,
    pub limits: ServiceLimits,
    pub runs: Option<Runs>,
    tpm: Option<Arc<Mutex<Tpm>>>,
    identity: Arc<dyn IdentitySource>,
    /// KiB of admission bodies that may be buffered at once (`limits.max_buffered_bytes`).
    body_budget: Arc<Semaphore>,
    /// The scheduled selfcheck's latest outcome (`[selfcheck] enabled`).
    selfcheck: Option<Arc<SelfcheckStatus>>,
}

/// Why `/readyz` answers 503.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    #[error("SVID: {0}")]
    Svid(#[source] attest::AttestError),
    #[error("the gateway's SVID has expired")]
    SvidExpired,
    #[error("no trusted keys")]
    NoKeys,
    #[error("TPM lock poisoned")]
    TpmPoisoned,
    #[error("TPM: {0}")]
    Tpm(#[source] attest::AttestError),
    #[error("TPM probe: {0}")]
    TpmProbe(#[source] tokio::task::JoinError),
    #[error("the TPM did not answer in time")]
    TpmTimeout,
    /// The first selfcheck has not passed yet, or the latest one failed (its failed
    /// checks named).
    #[error("{0}")]
    Selfcheck(String),
}

impl Service {
    /// Reserves room for a request body of `bytes`; `None` when the budget is spent.
    pub fn reserve_body(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        self.body_budget.clone().try_acquire_many_owned(kib).ok()
    }

    /// Ready when the trust material is loaded (the SVID is current) and, if a TPM is
    /// configured, it answers.
    pub async fn readiness(&self) -> Result<(), NotReady> {
        if let Some(why) = self.selfcheck.as_ref().and_then(|s| s.snapshot().refusal()) {
            return Err(NotReady::Selfcheck(why));
        }
        let svid = self.identity.current().map_err(NotReady::Svid)?;
        if svid.svid.not_after() <= self.now() {
            return Err(NotReady::SvidExpired);
        }
        if self.admissions.policy().keys.is_empty() {
            return Err(NotReady::NoKeys);
        }
        if let Some(tpm) = &self.tpm {
            let tpm = tpm.clone();
            let probe = tokio::task::spawn_blocking(move || {
                let mut t = tpm.lock().map_err(|_| NotReady::TpmPoisoned)?;
                t.loaded_transient_objects().map_err(NotReady::Tpm)
            });
            match tokio::time::timeout(TPM_PROBE_TIMEOUT, probe).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(e)) => return Err(NotReady::TpmProbe(e)),
                Err(_) => return Err(NotReady::TpmTimeout),
            }
        }
        Ok(())
    }

    /// Now, in Unix seconds, by the admission's clock.
    fn now(&self) -> i64 {
        i64::try_from(self.admissions.admission.clock().now_unix()).unwrap_or(i64::MAX)
    }

    /// `/metrics`: the counters, with the SVID's remaining lifetime read now.
    pub fn metrics_text(&self) -> String {
        let left = self
            .identity
            .current()
            .ok()
            .map(|svid| svid.svid.not_after() - self.now());
        let mut text = self.metrics.render(left);
        metrics::render_verify_cache(&mut text, self.admissions.admission.policy().verify_cache());

        if let Some(s) = &self.selfcheck {
            metrics::render_selfcheck(&mut text, &s.snapshot());
        }
        text
    }
}

/// A running service: its address, and a way to stop it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    health_addr: Option<SocketAddr>,
    runtime: tokio::runtime::Runtime,
    stop: watch::Sender<bool>,
    service: Arc<Service>,
    /// The scheduled selfcheck, stopped first in `shutdown`.
    selfcheck: Option<crate::selfcheck::schedule::Runner>,
}

impl Server {
    /// Loads trust material, policy and state, binds the listener and starts serving
    /// on its own tokio runtime.
    pub fn start(config: &ServeConfig) -> Result<Server, GatewayError> {
        let identity: Arc<dyn IdentitySource> =
            match (&config.tls.svid_dir, &config.tls.workload_api) {
                (Some(dir), _) => Arc::new(FileSource::open(dir)?),
                (None, Some(ep)) => Arc::new(WorkloadApiSource::connect(ep, WORKLOAD_API_TIMEOUT)?),
                (None, None) => return Err(GatewayError::Usage("tls: no SVID source".into())),
            };
        let clock = system_clock();
        let (mut policy, tpm) =
            open_policy(&config.policy, config.tpm.as_ref().map(|t| t.tcti.as_str()))?;
        policy.set_verify_cache_capacity(config.cache.capacity);
        let allowed = allowed_peers(config, &policy)?;
        let facts = crate::evidence::PolicyFacts::of(&policy);
        let resolver = Arc::new(SvidCertResolver::new(identity.clone(), None)?);
        let mut tls = attest::tls::server_config(
            resolver,
            Bundles::Source(identity.clone()),
            Authorize::Matching(allowed),
        )?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        // One process: the service keeps the database open (and locked) while it runs.
        let state_dir = StateDir::locate(&config.state_dir, true, clock.as_ref())?
            .ok_or_else(|| GatewayError::Usage("state: not created".into()))?;
        crate::state::announce(&state_dir);
        config.log.check().map_err(GatewayError::Usage)?;
        let signer = crate::admission_log::signer::CheckpointSigner::software(&config.state_dir)
            .map_err(|e| GatewayError::State {
                path: config.state_dir.clone(),
                message: e.to_string(),
            })?;
        let state = state_dir
            .with_log(Some(Arc::new(signer)), config.log)
            .open()?;
        // Start-up walks what follows the last signed checkpoint; the rest is `log
        // verify`'s (docs/state.md).
        state.check_since_checkpoint()?;
        let blobs = BlobStore::open(&config.blob_dir())
            .map_err(|e| GatewayError::io(config.blob_dir(), e))?;
        let metrics = Arc::new(Metrics::new());
        // Run events leave the host shaped by the tenant's egress mode; the sink's
        // thread starts only when there are runs to report.
        let egress = crate::evidence::EgressRules::compile(&policy)?;
        let policy_digest = policy.digests.policy;

        let host_tiers = config
            .runs
            .as_ref()
            .map(|r| r.tiers())
            .unwrap_or_else(|| vec![verify_core::Tier::Gvisor]);
        let admissions = Arc::new(Admissions {
            // The tiers `/v1/runs` provides: gVisor, and Kata when `[runs.kata]` is
            // configured. It takes no tenant index (no `--index` here yet), so a tenant
            // whose index is `required` is denied `index_stale`, never admitted without one.
            admission: Admission::new(policy, clock.clone(), HashMode::Auto)
                .with_open_state(state)
                .with_governance(Vec::new(), &host_tiers),
        });
        let batcher = Batcher::start(admissions.clone(), &config.batch, metrics.clone())
            .map_err(|e| GatewayError::io("<batch threads>", e))?;
        let runs = match &config.runs {
            Some(r) => {
                let deliverer = deliverer(config)?;
                let outbound = runs::Outbound {
                    policy_digest,
                    egress,
                    deliverer,
                };
                // The service signs its evidence with the software key under its state
                // (its TPM, if any, serves TLS and sealed keys); the runner is its SVID.
                let layout = crate::layout::StateLayout::new(&config.state_dir);
                let custody = crate::evidence::Custody {
                    signer: crate::custody::CustodySigner::software(&layout.custody())?,
                    facts,
                    runner_id: identity.current().ok().map(|s| s.svid.id().to_string()),
                };
                Some(Runs::start_launcher(
                    r,
                    &config.state_dir,
                    clock.clone(),
                    outbound,
                    Arc::new(custody),
                )?)
            }
            None => None,
        };
        let service = Arc::new(Service {
            admissions,
            batcher,
            blobs,
            metrics,
            limits: config.limits.clone(),
            runs,
            tpm: tpm.map(|t| Arc::new(Mutex::new(t))),
            identity,
            body_budget: Arc::new(Semaphore::new(
                usize::try_from(config.limits.max_buffered_bytes / 1024).unwrap_or(usize::MAX),
            )),
            selfcheck: config
                .selfcheck
                .enabled
                .then(crate::selfcheck::schedule::SelfcheckStatus::new),
        });
        let selfcheck = match &service.selfcheck {
            Some(status) => Some(start_selfcheck(
                config,
                status.clone(),
                service.admissions.clone(),
            )?),
            None => None,
        };

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("serve")
            .build()
            .map_err(|e| GatewayError::io("<tokio runtime>", e))?;
        let listener = runtime
            .block_on(TcpListener::bind(config.listen))
            .map_err(|e| GatewayError::io(config.listen.to_string(), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| GatewayError::io(config.listen.to_string(), e))?;
        let (stop, stopped) = watch::channel(false);
        let health_addr = match &config.health {
            Some(h) => Some(health::start(
                &runtime,
                h.listen,
                service.clone(),
                stopped.clone(),
            )?),
            None => None,
        };
        runtime.spawn(accept_loop(listener, acceptor, service.clone(), stopped));
        Ok(Server {
            addr,
            health_addr,
            runtime,
            stop,
            service,
            selfcheck,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The plain-HTTP health listener's bound address, when `[health]` is configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Stops accepting, gives open requests a moment, stops running sandboxes in
    /// order, and lets the batcher finish (every queued admission is answered or
    /// its connection is gone; nothing half-written).
    pub fn shutdown(mut self) {
        // The schedule first: its thread holds the admissions (and the open state).
        if let Some(runner) = self.selfcheck.take() {
            runner.stop();
        }
        let _ = self.stop.send(true);
        self.runtime.shutdown_timeout(Duration::from_secs(2));
        if let Some(runs) = &self.service.runs {
            runs.drain(Duration::from_secs(30));
        }
        let admissions = self.service.admissions.clone();
        if let Ok(service) = Arc::try_unwrap(self.service) {
            service.batcher.shutdown();
        }
        // Every queued admission is recorded: the log's end is signed now.
        if let Err(e) = admissions.admission.checkpoint() {
            tracing::error!(error = %e, "the shutdown checkpoint of the admission log failed");
        }
    }
}

/// The background delivery of events to `[events]`'s sink from the state's spool.
fn deliverer(config: &ServeConfig) -> Result<Option<crate::delivery::Deliverer>, GatewayError> {
    let Some(events) = &config.events else {
        return Ok(None);
    };
    let spool =
        crate::delivery::Spool::open(&crate::layout::StateLayout::new(&config.state_dir).spool())?;
    let delivery = crate::delivery::Delivery::new(spool, events.sink()?)?;
    Ok(Some(crate::delivery::Deliverer::start(delivery)?))
}

/// The scheduled selfcheck of the service: at start and every `interval_s`, on its
/// own thread, against the deployed configuration and the state this process holds
/// open; each report is logged, recorded for `/readyz` and `/metrics`, and sent as a
/// CloudEvent when `[events]` is configured.
fn start_selfcheck(
    config: &ServeConfig,
    status: Arc<SelfcheckStatus>,
    admissions: Arc<Admissions>,
) -> Result<crate::selfcheck::schedule::Runner, GatewayError> {
    use crate::selfcheck::{schedule, Target};
    let deliverer = deliverer(config)?;
    let source = format!("capsule-gateway/serve/{}", config.listen);
    let target_config = config.clone();
    schedule::Runner::start(
        status,
        config.selfcheck.interval(),
        true,
        move || {
            let target = Target::from_serve(&target_config, admissions.admission.open_state());
            crate::selfcheck::run(&target)
        },
        move |report| {
            schedule::log("serve", report);
            if let Some(d) = &deliverer {
                let event = schedule::event(&source, report);
                let id = event["id"].as_str().unwrap_or("selfcheck").to_string();
                let bytes = serde_json::to_vec(&event).unwrap_or_default();
                if let Err(e) = d.enqueue(&id, &bytes) {
                    tracing::error!(error = %e, "the selfcheck event was not queued");
                }
            }
        },
    )
    .map_err(|e| GatewayError::io("<selfcheck thread>", e))
}

/// The policy, with sealed keys unsealed through the configured TPM, which is kept
/// open for `/readyz`.
fn open_policy(path: &Path, tcti: Option<&str>) -> Result<(Policy, Option<Tpm>), GatewayError> {
    let tpm = match tcti {
        Some(t) => Some(Tpm::open(&Tcti::parse(t)?)?),
        None => None,
    };
    let mut sealed = SealedKeys::with_tpm(tpm);
    let policy = load_policy(path, &mut sealed)?;
    Ok((policy, sealed.into_tpm()))
}

/// Who may connect: the configured patterns, else every tenant's runners.
fn allowed_peers(
    config: &ServeConfig,
    policy: &Policy,
) -> Result<Vec<RunnerPattern>, GatewayError> {
    match &config.tls.allowed_peers {
        Some(list) => list
            .iter()
            .map(|p| {
                RunnerPattern::parse(p)
                    .map_err(|e| GatewayError::Usage(format!("tls.allowed_peers: `{p}`: {e}")))
            })
            .collect(),
        None => Ok(policy
            .tenants
            .values()
            .flat_map(|t| t.runners.iter().cloned())
            .collect()),
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    service: Arc<Service>,
    mut stopped: watch::Receiver<bool>,
) {
    let limits = &service.limits;
    let authenticated = Arc::new(Semaphore::new(limits.max_connections));
    let pending = PendingPool::new(
        limits.max_pending_handshakes,
        limits.max_pending_per_source,
        service.metrics.clone(),
    );
    loop {
        // Accepting never waits for a place: a newcomer takes the place of the oldest
        // pending handshake (`pending`), and only authenticated peers wait for one of
        // `max_connections`.
        let (tcp, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(_) => {
                    // e.g. EMFILE: the next accept may succeed, but not in a hot loop.
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (slot, _evicted) = pending.enter(from.ip());
        let (acceptor, service, authenticated) =
            (acceptor.clone(), service.clone(), authenticated.clone());
        tokio::spawn(async move {
            serve_connection(tcp, from, acceptor, service, slot, authenticated).await;
        });
    }
}

/// The handshake (while pending, and evictable) and then, once authenticated and
/// given a place among `max_connections`, HTTP.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    from: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    service: Arc<Service>,
    mut slot: PendingSlot,
    authenticated: Arc<Semaphore>,
) {
    let limits = &service.limits;
    let io = IdleTimeout::new(tcp, limits.idle_timeout());
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout();
    // A peer without a valid SVID fails here, inside the handshake; one that is
    // evicted (or stalls past the deadline) is closed by dropping the handshake.
    let handshake = async {
        let tls = match tokio::time::timeout_at(deadline, acceptor.accept(io)).await {
            Err(_) => {
                return Err((
                    HandshakeFailure::Timeout,
                    "the TLS handshake did not finish in time".to_string(),
                ))
            }
            Ok(Err(e)) => return Err(tls_failure(&e)),
            Ok(Ok(tls)) => tls,
        };
        let peer = attest::tls::peer_id(tls.get_ref().1)
            .map_err(|e| (HandshakeFailure::Tls, e.to_string()))?;
        let permit = match tokio::time::timeout_at(deadline, authenticated.acquire_owned()).await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                return Err((
                    HandshakeFailure::Timeout,
                    format!(
                        "`{peer}`: no connection place (limits.max_connections) within the handshake deadline"
                    ),
                ))
            }
        };
        Ok((tls, peer, permit))
    };
    let failed = |cause: HandshakeFailure, why: &str| {
        service.metrics.handshake_failed(cause);
        tracing::info!(
            target: "capsule_gateway::handshake",
            %from,
            cause = cause.as_str(),
            why,
            "handshake refused"
        );
    };
    let (tls, peer, permit) = tokio::select! {
        done = handshake => match done {
            Ok(x) => x,
            Err((cause, why)) => {
                failed(cause, &why);
                return;
            }
        },
        _ = &mut slot.evicted => {
            failed(
                HandshakeFailure::Evicted,
                "closed to make room for a newer connection (limits.max_pending_handshakes or max_pending_per_source)",
            );
            return;
        }
    };
    // Authenticated: out of the pending pool, never evicted from here on.
    drop(slot);
    let peer = Arc::new(peer);
    service
        .metrics
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let svc = service.clone();
    let handler =
        hyper::service::service_fn(move |req| http::handle(svc.clone(), peer.clone(), req));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout())
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    // The place is given back only once the closed connection is drained.
    let io = linger::Linger::new(tls, Box::new(permit));
    let _ = builder.serve_connection(TokioIo::new(io), handler).await;
    service
        .metrics
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// The cause and text of a failed TLS handshake. A valid SVID whose ID the allow-list
/// refuses is told apart by the message `attest::tls` gives it ("… is not authorized
/// here"); everything else the handshake refuses is `tls`.
fn tls_failure(e: &std::io::Error) -> (HandshakeFailure, String) {
    let mut text = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(s) = next {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = s.source();
    }
    let cause = if text.contains("is not authorized here") {
        HandshakeFailure::PeerNotAllowed
    } else {
        HandshakeFailure::Tls
    };
    (cause, text)
}
