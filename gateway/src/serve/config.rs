//! `serve --config gateway.toml`: every setting of the service in one file, checked
//! once at start-up. Relative paths are resolved against the file's directory. A
//! bad file is a configuration error naming the file and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::GatewayError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on (`127.0.0.1:8443`; port 0 picks a free one).
    pub listen: SocketAddr,
    /// Anti-rollback state, admission log, blob store, run evidence.
    pub state_dir: PathBuf,
    /// Verification policy (TOML).
    pub policy: PathBuf,
    pub tls: TlsConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub limits: ServiceLimits,
    /// The TPM: sealed keys are unsealed through it and `/readyz` asks it.
    #[serde(default)]
    pub tpm: Option<TpmConfig>,
    /// The sandbox for `/v1/runs`; without it, runs answer 503.
    #[serde(default)]
    pub runs: Option<RunsConfig>,
    /// The plain-HTTP listener for `/healthz`, `/readyz` and `/metrics`; without it
    /// (and without `--health-listen`), they are served on the mTLS listener only.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Deliver run events to an HTTP CloudEvents sink, from the durable spool under
    /// the state directory, in a background thread.
    #[serde(default)]
    pub events: Option<EventsConfig>,
    /// Checkpoint and segment intervals of the admission log, and the denial budget.
    #[serde(default)]
    pub log: crate::admission_log::LogConfig,
    /// The verification cache (`[cache] capacity`, docs/service.md).
    #[serde(default)]
    pub cache: CacheConfig,
    /// The selfcheck's deployment manifest and schedule (docs/selfcheck.md).
    #[serde(default)]
    pub selfcheck: crate::selfcheck::target::SelfcheckConfig,
}

/// `[cache]`: how many verified signatures the service remembers (0: none). A hit
/// skips the signature check and the manifest parse only (docs/manifest.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub capacity: usize,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            capacity: verify_core::verify_cache::DEFAULT_CAPACITY,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// `http://host:port/path` of the sink.
    pub sink: String,
    /// One delivery attempt's limit (milliseconds).
    #[serde(default = "default_sink_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_sink_timeout_ms() -> u64 {
    5000
}

impl EventsConfig {
    /// The sink, checked (`events.sink` names the field of a bad one).
    pub fn sink(&self) -> Result<crate::delivery::Sink, crate::delivery::DeliveryError> {
        crate::delivery::Sink::parse(&self.sink, Duration::from_millis(self.timeout_ms))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Address of the plain listener (loopback by default; port 0 picks a free one).
    #[serde(default = "default_health_listen")]
    pub listen: SocketAddr,
}

/// Loopback: the plain listener needs no certificate, so it is not reachable from
/// elsewhere unless the operator says so.
pub fn default_health_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// Where the gateway's own X.509-SVID and the trust bundles come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// SVID directory (`svid.pem`, `svid_key.pem`, `bundle.pem`), reloaded on rotation.
    #[serde(default)]
    pub svid_dir: Option<PathBuf>,
    /// SPIFFE Workload API endpoint (`unix:///run/spire/agent.sock`).
    #[serde(default)]
    pub workload_api: Option<String>,
    /// Peers allowed to connect at all (patterns, `*` as a whole last segment).
    /// Default: every tenant's `runners`. Admission then checks the peer against the
    /// capsule's tenant.
    #[serde(default)]
    pub allowed_peers: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most capsules verified and committed together.
    pub max_size: usize,
    /// How long a batch waits for more capsules once it has one (microseconds).
    pub max_wait_us: u64,
    /// Admissions waiting for a batch; beyond this, 503 with Retry-After.
    pub queue: usize,
    /// Worker threads that verify and commit batches; 0 = one per core.
    pub threads: usize,
}

impl Default for BatchConfig {
    fn default() -> BatchConfig {
        BatchConfig {
            max_size: 128,
            max_wait_us: 200,
            queue: 512,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceLimits {
    /// Authenticated connections (handshake done, peer allowed); a further runner
    /// waits for a place within its handshake deadline. Peers still in the handshake
    /// do not count here.
    pub max_connections: usize,
    /// Connections still in the TLS handshake (not yet authenticated). When full, a
    /// new connection closes the oldest pending one instead of waiting.
    pub max_pending_handshakes: usize,
    /// Pending handshakes from one source address; beyond it, a new connection from
    /// that address closes that address's oldest pending one.
    pub max_pending_per_source: usize,
    /// Largest blob accepted by `PUT /v1/blobs` (bytes).
    pub max_blob_bytes: u64,
    /// TLS handshake and request-head deadline (milliseconds).
    pub handshake_timeout_ms: u64,
    /// A connection with no bytes moving either way for this long is closed.
    pub idle_timeout_ms: u64,
    /// A request body must arrive whole within this (milliseconds).
    pub body_timeout_ms: u64,
    /// Largest request head (bytes).
    pub max_header_bytes: usize,
    /// Admission bodies buffered at once, across every connection and stream (bytes);
    /// beyond this, 503 with Retry-After. Blobs stream to disk and do not count.
    pub max_buffered_bytes: u64,
}

impl Default for ServiceLimits {
    fn default() -> ServiceLimits {
        ServiceLimits {
            max_connections: 1024,
            max_pending_handshakes: 1024,
            max_pending_per_source: 256,
            max_blob_bytes: 1 << 30,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 30_000,
            body_timeout_ms: 30_000,
            max_header_bytes: 16 * 1024,
            max_buffered_bytes: 256 << 20,
        }
    }
}

impl ServiceLimits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// libtss2 TCTI string (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`).
    pub tcti: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunsRuntime {
    Runsc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsConfig {
    /// The `gvisor` tier's runtime.
    pub runtime: RunsRuntime,
    /// gVisor platform (`ptrace` works everywhere).
    #[serde(default = "default_platform")]
    pub platform: String,
    /// Runs executing at once; more answer 503.
    #[serde(default = "default_concurrent_runs")]
    pub max_concurrent: usize,
    /// The `kata` tier (containerd's shim v2); without it this service provides
    /// `gvisor` only, and a rule that needs `kata` is denied `tier_unavailable`.
    #[serde(default)]
    pub kata: Option<KataRunsConfig>,
    /// The base root file system (default: the one install-deps builds); a tenant's
    /// `rootfs.sha256` pins its tree digest.
    #[serde(default = "default_rootfs")]
    pub rootfs: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KataRunsConfig {
    /// An existing containerd socket (default: a private containerd under the state).
    #[serde(default)]
    pub containerd: Option<PathBuf>,
    /// Shim v2 runtime type (default `io.containerd.kata.v2`); `io.containerd.runc.v2`
    /// drives the same path where Kata is absent (runc is no sandbox: tests only).
    #[serde(default = "default_kata_runtime_type")]
    pub runtime_type: String,
}

fn default_rootfs() -> PathBuf {
    PathBuf::from(sandbox_launcher::rootfs::BASE_ROOTFS)
}

fn default_kata_runtime_type() -> String {
    crate::launch::KATA_RUNTIME_TYPE.into()
}

impl RunsConfig {
    /// The tiers this service provides for `/v1/runs`.
    pub fn tiers(&self) -> Vec<verify_core::Tier> {
        let mut t = vec![verify_core::Tier::Gvisor];
        if self.kata.is_some() {
            t.push(verify_core::Tier::Kata);
        }
        t
    }
}

fn default_platform() -> String {
    "ptrace".into()
}

fn default_concurrent_runs() -> usize {
    2
}

/// A setting that parses but cannot work; the message names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidSetting {
    #[error("tls: give svid_dir or workload_api, not both")]
    TlsBoth,
    #[error("tls: give svid_dir or workload_api")]
    TlsNeither,
    #[error("batch: max_size and queue must be at least 1")]
    BatchEmpty,
    #[error("batch.max_wait_us: at most 1000000 (one second)")]
    BatchWait,
    #[error("limits.max_connections: at least 1")]
    NoConnections,
    #[error("limits.max_pending_handshakes and max_pending_per_source: at least 1")]
    NoPendingHandshakes,
    #[error("limits.max_buffered_bytes: at least 1048576")]
    BufferedBytes,
    #[error("limits: timeouts must be positive")]
    ZeroTimeout,
    #[error("runs.max_concurrent: at least 1")]
    NoRuns,
}

impl ServeConfig {
    /// Reads and checks `path` (a trust file: see `verify_core::trust_file`); relative
    /// paths in it are resolved against its directory.
    pub fn load(path: &Path) -> Result<ServeConfig, GatewayError> {
        // A trust file: it names the policy, the state and the TLS identity.
        let file = verify_core::trust_file::read(path)?;
        let text = file.text()?;
        let mut config: ServeConfig =
            serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
                let (field, message) = verify_core::error::toml_error(text, e);
                GatewayError::Usage(format!("{}: {field}: {message}", path.display()))
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.state_dir = base.join(&config.state_dir);
        if let Ok(canonical) = config.state_dir.canonicalize() {
            config.state_dir = canonical;
        }
        config.policy = base.join(&config.policy);
        if let Some(r) = &mut config.runs {
            r.rootfs = base.join(&r.rootfs);
            if let Some(k) = r.kata.as_mut().and_then(|k| k.containerd.as_mut()) {
                *k = base.join(&*k);
            }
        }
        if let Some(dir) = &mut config.tls.svid_dir {
            *dir = base.join(&*dir);
        }
        config.selfcheck.resolve(base);
        config
            .selfcheck
            .check()
            .map_err(|e| GatewayError::Usage(format!("{}: {e}", path.display())))?;
        config
            .check()
            .map_err(|e| GatewayError::Usage(format!("{}: {e}", path.display())))?;
        if let Some(events) = &config.events {
            events.sink().map_err(|e| {
                GatewayError::Usage(format!("{}: events.sink: {e}", path.display()))
            })?;
        }
        Ok(config)
    }

    /// Settings that parse but cannot work.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        match (&self.tls.svid_dir, &self.tls.workload_api) {
            (Some(_), Some(_)) => return Err(InvalidSetting::TlsBoth),
            (None, None) => return Err(InvalidSetting::TlsNeither),
            _ => {}
        }
        let b = &self.batch;
        if b.max_size == 0 || b.queue == 0 {
            return Err(InvalidSetting::BatchEmpty);
        }
        if b.max_wait_us > 1_000_000 {
            return Err(InvalidSetting::BatchWait);
        }
        let l = &self.limits;
        if l.max_connections == 0 {
            return Err(InvalidSetting::NoConnections);
        }
        if l.max_pending_handshakes == 0 || l.max_pending_per_source == 0 {
            return Err(InvalidSetting::NoPendingHandshakes);
        }
        if l.max_buffered_bytes < 1 << 20 {
            return Err(InvalidSetting::BufferedBytes);
        }
        if l.handshake_timeout_ms == 0 || l.idle_timeout_ms == 0 || l.body_timeout_ms == 0 {
            return Err(InvalidSetting::ZeroTimeout);
        }
        if let Some(r) = &self.runs {
            if r.max_concurrent == 0 {
                return Err(InvalidSetting::NoRuns);
            }
        }
        Ok(())
    }

    pub fn blob_dir(&self) -> PathBuf {
        crate::layout::StateLayout::new(&self.state_dir).blobs()
    }

    pub fn evidence_dir(&self) -> PathBuf {
        crate::layout::StateLayout::new(&self.state_dir).evidence()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateway.toml");
        let c = ServeConfig::load(&path).expect("examples/gateway.toml loads");
        assert_eq!(c.batch.queue, 512);
        assert_eq!(c.runs.as_ref().map(|r| r.runtime), Some(RunsRuntime::Runsc));
        assert!(c.tls.workload_api.is_some());
    }

    /// The service config names the policy and the TLS identity: one that anyone
    /// can write, or that lies in such a directory, is refused like the policy.
    #[test]
    fn a_world_writable_serve_config_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:0\"\nstate_dir = \"s\"\npolicy = \"p.toml\"\n\
             [tls]\nsvid_dir = \"svid\"\n",
        )
        .expect("write");
        let chmod = |p: &Path, m| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
        };
        chmod(&path, 0o600);
        ServeConfig::load(&path).expect("loads");
        chmod(&path, 0o666);
        let e = ServeConfig::load(&path).expect_err("world-writable");
        assert!(matches!(e, GatewayError::Config(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("gateway.toml") && msg.contains("mode 0666") && msg.contains("chmod"),
            "{msg}"
        );
        chmod(&path, 0o600);
        chmod(dir.path(), 0o777);
        let msg = ServeConfig::load(&path)
            .expect_err("open directory")
            .to_string();
        chmod(dir.path(), 0o700);
        assert!(msg.contains("its directory"), "{msg}");
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        let base = "listen = \"127.0.0.1:0\"\nstate_dir = \"s\"\npolicy = \"p.toml\"\n";
        for (extra, field) in [
            (
                "[tls]\nsvid_dir = \"svid\"\n[batch]\nqueue = \"many\"\n",
                "batch.queue",
            ),
            ("[tls]\nsvid_dir = \"svid\"\nsurprise = 1\n", "tls"),
            ("[tls]\n", "tls: give svid_dir or workload_api"),
            (
                "[tls]\nsvid_dir = \"svid\"\n[batch]\nqueue = 0\n",
                "batch: max_size and queue",
            ),
        ] {
            std::fs::write(&path, format!("{base}{extra}")).expect("write");
            let e = ServeConfig::load(&path).expect_err(extra).to_string();
            assert!(e.contains("gateway.toml") && e.contains(field), "{e}");
        }
    }
}
