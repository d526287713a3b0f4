//! `publish`: push a capsule directory to an OCI registry as an artifact and print
//! the manifest digest. Exit 0 pushed, 2 configuration (URL, CA, credentials, the
//! capsule's files), 4 the registry refused or could not be reached.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::oci::publish::{publish, publish_index};
use crate::oci::{Registry, RegistryAuth, RegistryConfig};
use crate::GatewayError;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The registry, `https://host[:port]`.
    #[arg(long, value_name = "URL")]
    pub registry: String,
    /// Repository inside the registry (`capsules/acme-payments`).
    #[arg(long, value_name = "R")]
    pub repository: String,
    /// Tag (default: `<capsule_id>.<version>` as the capsule's JWS claims them).
    #[arg(long, value_name = "T")]
    pub tag: Option<String>,
    /// The registry's CA bundle (PEM; default: the system's).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// HTTP basic credentials: a file holding `user:password`.
    #[arg(long, value_name = "FILE", conflicts_with = "bearer_token_file")]
    pub basic_auth_file: Option<PathBuf>,
    /// A bearer token file.
    #[arg(long, value_name = "FILE")]
    pub bearer_token_file: Option<PathBuf>,
    /// SVID directory presented as the TLS client certificate (mTLS).
    #[arg(long, value_name = "DIR")]
    pub svid: Option<PathBuf>,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
    /// Publish a signed tenant index (`index sign --out`) at tag `index` instead of a
    /// capsule: the agent polls it there.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["capsule", "tag"])]
    pub index: Option<PathBuf>,
    /// The capsule directory (capsule.jws, files/, approvals/).
    #[arg(value_name = "CAPSULE", required_unless_present = "index")]
    pub capsule: Option<PathBuf>,
}

pub fn run(args: &PublishArgs) -> Result<ExitCode, GatewayError> {
    let auth = match (&args.basic_auth_file, &args.bearer_token_file) {
        (Some(f), _) => RegistryAuth::basic_from_file(f)?,
        (None, Some(f)) => RegistryAuth::bearer_from_file(f)?,
        (None, None) => RegistryAuth::None,
    };
    let registry = Registry::new(&RegistryConfig {
        url: args.registry.clone(),
        ca: args.ca.clone(),
        auth,
        svid: args.svid.clone(),
        timeout: Duration::from_secs(args.timeout_s.max(1)),
    })?;
    let published = match (&args.index, &args.capsule) {
        (Some(index), _) => publish_index(&registry, &args.repository, index)?,
        (None, Some(capsule)) => {
            publish(&registry, &args.repository, args.tag.as_deref(), capsule)?
        }
        (None, None) => return Err(super::usage("a CAPSULE or --index FILE is required")),
    };
    tracing::info!(
        tag = published.tag,
        layers = published.layers,
        "published {}/{}",
        registry.name(),
        args.repository
    );
    crate::output::println_stdout(published.digest)?;
    Ok(ExitCode::SUCCESS)
}
