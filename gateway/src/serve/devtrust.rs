//! The embedded default of `serve` (no `--config`): a local development trust domain
//! under `STATE/dev/` — a CA, the gateway's SVID, one client SVID, an ES256 signing
//! key, a policy that admits capsules signed by it for the client, and the
//! `gateway.toml` that ties them together. Made once (in a temporary directory, then
//! renamed, so a crash leaves it whole or absent) and reused on later starts.
//! Software keys on disk: for demos and tests, never for production.

use std::path::{Path, PathBuf};
use std::time::Duration;

use attest::csr::DevCa;
use attest::spiffe::SpiffeId;
use verify_core::Alg;

use super::config::ServeConfig;
use crate::durable::{self, StagedDir};
use crate::GatewayError;

pub const TRUST_DOMAIN: &str = "capsule-gateway.dev";
pub const GATEWAY_ID: &str = "spiffe://capsule-gateway.dev/gateway";
pub const CLIENT_ID: &str = "spiffe://capsule-gateway.dev/runner/dev";
pub const SIGNING_KID: &str = "dev-es";
pub const TENANT: &str = "dev";
const SVID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the development trust domain consists of (paths under `STATE/dev/`).
#[derive(Debug)]
pub struct DevTrust {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub client_svid: PathBuf,
    pub signing_key: PathBuf,
    pub policy: PathBuf,
    pub created: bool,
}

/// Creates the development trust domain under `state/dev` unless it is there, and
/// returns where everything is.
pub fn ensure(state: &Path, listen: &str) -> Result<DevTrust, GatewayError> {
    let dir = crate::layout::StateLayout::new(state).dev();
    let created = !dir.join("gateway.toml").exists();
    if created {
        // The state directory is the gateway's alone (keys, evidence, history).
        durable::create_dirs(state, 0o700)?;
        let staged = StagedDir::new(&dir, ".dev-", 0o700)?;
        make(&staged, listen)?;
        // A half-made directory from a crash before this rename is replaced.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| GatewayError::io(&dir, e))?;
        }
        staged.commit()?;
    }
    Ok(DevTrust {
        config: dir.join("gateway.toml"),
        client_svid: dir.join("client"),
        signing_key: dir
            .join("keys")
            .join(format!("{SIGNING_KID}.private.jwk.json")),
        policy: dir.join("policy.toml"),
        dir,
        created,
    })
}

fn make(staged: &StagedDir, listen: &str) -> Result<(), GatewayError> {
    let dir = staged.path();
    let ca = DevCa::generate(TRUST_DOMAIN)?;
    ca.save(&dir.join("ca"))?;
    for (id, sub) in [(GATEWAY_ID, "gateway"), (CLIENT_ID, "client")] {
        let id = SpiffeId::parse(id).map_err(|e| GatewayError::Usage(e.to_string()))?;
        if sub == "gateway" {
            // Host names beside the SPIFFE ID: `curl --cacert STATE/dev/ca/ca.pem
            // https://localhost:8443/…` verifies the gateway without `-k`.
            let ips = [
                std::net::IpAddr::from([127, 0, 0, 1]),
                std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ];
            ca.issue_software_server_svid_dir(&id, SVID_TTL, &dir.join(sub), &["localhost"], &ips)?;
        } else {
            ca.issue_software_svid_dir(&id, SVID_TTL, &dir.join(sub))?;
        }
    }
    crate::keygen::generate(Alg::Es256, SIGNING_KID, &dir.join("keys"))?;
    let policy = format!(
        r#"# Development policy made by `capsule-gateway serve` (embedded default).
policy_version = "dev-1"
clock_skew_s = 60

[trust]
jwks = "keys/{SIGNING_KID}.public.jwks.json"

[limits]
max_jws_bytes = 1048576
max_artifacts = 4096

[[tenants]]
name = "{TENANT}"
keys = ["{SIGNING_KID}"]
environments = ["dev"]
runners = ["spiffe://{TRUST_DOMAIN}/runner/*"]
armory = []
# The dev capsule runs as `/bin/sh /capsule/run.sh`.
host_programs = ["/bin/sh"]
min_approvals = 1
"#
    );
    write(staged, "policy.toml", &policy)?;
    let config = format!(
        r#"# Made by `capsule-gateway serve` (embedded default): a development trust domain
# with software keys on disk. NOT FOR PRODUCTION.
listen = "{listen}"
state_dir = ".."
policy = "policy.toml"

[tls]
svid_dir = "gateway"
"#
    );
    write(staged, "gateway.toml", &config)
}

/// Writes a trust file readable and writable by this user only, whatever the umask
/// (the policy and the config are refused when others could write them).
fn write(staged: &StagedDir, name: &str, text: &str) -> Result<(), GatewayError> {
    Ok(staged.put(name, text.as_bytes(), 0o600)?)
}

/// Loads the development config, with the listen address given on the command line.
pub fn config(trust: &DevTrust, listen: std::net::SocketAddr) -> Result<ServeConfig, GatewayError> {
    let mut c = ServeConfig::load(&trust.config)?;
    c.listen = listen;
    Ok(c)
}
