//! An in-test SPIFFE Workload API server (X.509 part) on a Unix socket.
//!
//! No SPIRE agent is installable here (not packaged for Debian 12, no internet beyond the
//! package registries), so the tests serve the Workload API protocol themselves: a tonic
//! server generated from SPIFFE's `workload.proto` (`proto/workload.proto`) by protox and
//! tonic-prost-build. Like SPIRE, it refuses a request without the `workload.spiffe.io:
//! true` metadata, and it streams a new `X509SVIDResponse` whenever the test rotates the
//! SVID, which is how a real agent delivers rotation.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::sync::watch;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::error::TestkitError;

/// The code generated from `proto/workload.proto`.
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("_");
}

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use pb::{X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse};

/// One identity as the server hands it out.
#[derive(Debug, Clone)]
pub struct SvidMaterial {
    pub spiffe_id: String,
    /// DER certificates, leaf first, concatenated.
    pub chain_der: Vec<u8>,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// DER CA certificates of the trust domain, concatenated.
    pub bundle_der: Vec<u8>,
}

impl SvidMaterial {
    fn response(&self) -> X509svidResponse {
        X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: self.spiffe_id.clone(),
                x509_svid: self.chain_der.clone(),
                x509_svid_key: self.key_der.clone(),
                bundle: self.bundle_der.clone(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: Default::default(),
        }
    }
}

#[derive(Debug)]
struct Service {
    current: watch::Receiver<SvidMaterial>,
}

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    // SPIFFE Workload API 6.2.1: the server MUST reject a request without this header.
    match request.metadata().get("workload.spiffe.io") {
        Some(v) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

type SvidStream = Pin<Box<dyn Stream<Item = Result<X509svidResponse, Status>> + Send>>;
type BundleStream = Pin<Box<dyn Stream<Item = Result<X509BundlesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = SvidStream;
    type FetchX509BundlesStream = BundleStream;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<SvidStream>, Status> {
        check_header(&request)?;
        let stream = WatchStream::new(self.current.clone()).map(|m| Ok(m.response()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        check_header(&request)?;
        let stream = WatchStream::new(self.current.clone()).map(|m| {
            let td = m
                .spiffe_id
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default()
                .to_string();
            Ok(X509BundlesResponse {
                crl: Vec::new(),
                bundles: [(format!("spiffe://{td}"), m.bundle_der.clone())]
                    .into_iter()
                    .collect(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A running Workload API server; dropping it stops the server and its runtime.
#[derive(Debug)]
pub struct WorkloadApiServer {
    socket: PathBuf,
    update: Option<watch::Sender<SvidMaterial>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl WorkloadApiServer {
    /// Serves `initial` on a fresh Unix socket in a temporary directory.
    pub fn start(initial: SvidMaterial) -> Result<WorkloadApiServer, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("wapi-")
            .tempdir()
            .map_err(TestkitError::WorkloadApi)?;
        let socket = dir.path().join("agent.sock");
        let (update, current) = watch::channel(initial);
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), TestkitError>>();
        let path = socket.clone();
        let thread = std::thread::Builder::new()
            .name("workload-api".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(TestkitError::WorkloadApi(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::UnixListener::bind(&path) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(TestkitError::WorkloadApiSocket {
                                path: path.clone(),
                                source: e,
                            }));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let _ = tonic::transport::Server::builder()
                        .add_service(SpiffeWorkloadApiServer::new(Service { current }))
                        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                            let _ = stop.await;
                        })
                        .await;
                });
            })
            .map_err(TestkitError::WorkloadApi)?;
        ready_rx
            .recv()
            .map_err(|_| TestkitError::WorkloadApiThread)??;
        Ok(WorkloadApiServer {
            socket,
            update: Some(update),
            shutdown: Some(shutdown),
            thread: Some(thread),
            _dir: dir,
        })
    }

    /// The endpoint in SPIFFE form: `unix:///path/to/agent.sock`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Calls FetchX509SVID with a bare client that omits the `workload.spiffe.io`
    /// header; returns the gRPC status code of the refusal (None if it was accepted).
    pub fn fetch_without_header(&self) -> Option<tonic::Code> {
        use pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
        let socket = self.socket.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                }))
                .await
                .ok()?;
            let mut client = SpiffeWorkloadApiClient::new(channel);
            client
                .fetch_x509svid(X509svidRequest {})
                .await
                .err()
                .map(|s| s.code())
        })
    }

    /// Rotates: every open `FetchX509SVID` stream receives the new material.
    pub fn rotate(&self, next: SvidMaterial) {
        if let Some(u) = &self.update {
            u.send_replace(next);
        }
    }
}

impl Drop for WorkloadApiServer {
    fn drop(&mut self) {
        // Closing the watch ends every open stream, so the graceful shutdown can finish.
        drop(self.update.take());
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
