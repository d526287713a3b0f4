//! `serve`: flags and the embedded default; the service itself is `crate::serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::serve::config::{HealthConfig, ServeConfig};
use crate::serve::{devtrust, Server};
use crate::GatewayError;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Service configuration (TOML). Without it: a development trust domain (CA,
    /// gateway SVID, one client SVID, signing key, policy) under --state.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory of the embedded default (ignored with --config, whose
    /// `state_dir` says where). `--state-dir` is the old spelling, still accepted.
    #[arg(
        long = "state",
        alias = "state-dir",
        value_name = "DIR",
        default_value = "capsule-gateway-state"
    )]
    pub state_dir: PathBuf,
    /// Listen address (overrides the config's `listen`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Policy file (overrides the config's `policy`; with the embedded default,
    /// replaces the development policy).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Also serve /healthz, /readyz and /metrics over plain HTTP on ADDR (overrides
    /// the config's `health.listen`; use a loopback address, e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
}

const DEFAULT_LISTEN: &str = "127.0.0.1:8443";

pub fn run(args: &ServeArgs) -> Result<ExitCode, GatewayError> {
    let mut config = match &args.config {
        Some(path) => ServeConfig::load(path)?,
        None => {
            let trust = devtrust::ensure(&args.state_dir, DEFAULT_LISTEN)?;
            tracing::warn!(
                "no --config: using the development trust domain in {} \
                 (software keys on disk; NOT FOR PRODUCTION)",
                trust.dir.display()
            );
            tracing::info!(
                "{} development trust domain `{}`: client SVID {}, \
                 signing key {} (kid `{}`, tenant `{}`), policy {}, config {}",
                if trust.created { "created" } else { "reusing" },
                devtrust::TRUST_DOMAIN,
                trust.client_svid.display(),
                trust.signing_key.display(),
                devtrust::SIGNING_KID,
                devtrust::TENANT,
                trust.policy.display(),
                trust.config.display(),
            );
            ServeConfig::load(&trust.config)?
        }
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(policy) = &args.policy {
        config.policy = policy.clone();
    }
    if let Some(listen) = args.health_listen {
        config.health = Some(HealthConfig { listen });
    }
    let server = Server::start(&config)?;
    if let Some(addr) = server.health_addr() {
        tracing::info!("health on http://{addr} (/healthz, /readyz, /metrics; no TLS)");
    }
    // The line scripts and tests wait for: the address actually bound.
    tracing::info!(
        "serving on https://{} (state {})",
        server.local_addr(),
        config.state_dir.display()
    );
    wait_for_signal()?;
    tracing::info!("stopping");
    server.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_signal() -> Result<(), GatewayError> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| GatewayError::io("<signal handler>", e))?;
    let _ = signals.forever().next();
    Ok(())
}
