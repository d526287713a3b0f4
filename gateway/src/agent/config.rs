//! `agent.toml`: DESIGN.md's minimal file, extended (never renamed). Relative paths
//! are resolved against the file's directory; an unknown key is an error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::oci::{RegistryAuth, RegistryConfig};
use crate::GatewayError;

/// What the agent does with an admitted capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Run it in the sandbox, write evidence, push the export (the default).
    #[default]
    Run,
    /// Pull, verify and record the admission only: nothing runs, nothing is pushed
    /// (a staging runner that pre-checks a registry; the throughput bench).
    AdmitOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeName {
    #[default]
    Runsc,
    Kata,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    policy: PathBuf,
    #[serde(default = "default_poll")]
    poll_interval_s: u64,
    #[serde(default)]
    runtime: RuntimeName,
    #[serde(default = "default_platform")]
    platform: String,
    #[serde(default)]
    action: Action,
    /// The runner's SPIFFE ID (default: the SVID's).
    runner: Option<String>,
    /// The runner's SVID directory: its ID is the runner, and it is presented to
    /// registries as the TLS client certificate.
    svid: Option<PathBuf>,
    /// TPM for the policy's sealed keys.
    tcti: Option<String>,
    #[serde(default = "default_timeout")]
    timeout_s: u64,
    /// The longest backoff after a registry failure.
    #[serde(default = "default_max_backoff")]
    max_backoff_s: u64,
    /// The largest blob pulled (after its descriptor's own size).
    #[serde(default = "default_max_blob")]
    max_blob_bytes: u64,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    selfcheck: crate::selfcheck::target::SelfcheckConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    registry: String,
    repository: String,
    ca: Option<PathBuf>,
    basic_auth_file: Option<PathBuf>,
    bearer_token_file: Option<PathBuf>,
}

fn default_poll() -> u64 {
    10
}
fn default_platform() -> String {
    "ptrace".into()
}
fn default_timeout() -> u64 {
    30
}
fn default_max_backoff() -> u64 {
    300
}
fn default_max_blob() -> u64 {
    1 << 30
}

/// One repository the agent polls.
#[derive(Debug, Clone)]
pub struct Source {
    pub registry: RegistryConfig,
    pub repository: String,
}

/// A checked `agent.toml`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub policy: PathBuf,
    pub poll_interval: Duration,
    pub runtime: RuntimeName,
    pub platform: String,
    pub action: Action,
    pub runner: Option<String>,
    pub svid: Option<PathBuf>,
    pub tcti: Option<String>,
    pub max_backoff: Duration,
    pub max_blob_bytes: u64,
    pub sources: Vec<Source>,
    /// The selfcheck's deployment manifest and schedule (docs/selfcheck.md).
    pub selfcheck: crate::selfcheck::target::SelfcheckConfig,
}

fn usage(path: &Path, why: impl std::fmt::Display) -> GatewayError {
    GatewayError::Usage(format!("{}: {why}", path.display()))
}

/// A repository name as distribution accepts it: lowercase path components of
/// `[a-z0-9]` joined by `.`, `_`, `__` or `-`, separated by `/`.
fn valid_repository(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && r.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        })
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, GatewayError> {
        // A trust file: it names the policy, the state and the registry credentials.
        let file = verify_core::trust_file::read(path)?;
        let text = file.text()?;
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let (field, message) = verify_core::error::toml_error(text, e);
                GatewayError::Usage(format!("{}: {field}: {message}", path.display()))
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &Path| base.join(p);
        if raw.sources.is_empty() {
            return Err(usage(path, "no [[sources]]: the agent would poll nothing"));
        }
        if raw.poll_interval_s == 0 || raw.timeout_s == 0 {
            return Err(usage(
                path,
                "poll_interval_s and timeout_s must be at least 1",
            ));
        }
        let svid = raw.svid.as_deref().map(rel);
        let mut selfcheck = raw.selfcheck;
        selfcheck.resolve(base);
        selfcheck.check().map_err(|e| usage(path, e))?;
        let mut sources = Vec::new();
        for s in raw.sources {
            if !valid_repository(&s.repository) {
                return Err(usage(
                    path,
                    format!("repository `{}` is not a repository name", s.repository),
                ));
            }
            let auth = match (&s.basic_auth_file, &s.bearer_token_file) {
                (Some(_), Some(_)) => {
                    return Err(usage(
                        path,
                        "a source takes basic_auth_file or bearer_token_file, not both",
                    ))
                }
                (Some(f), None) => {
                    RegistryAuth::basic_from_file(&rel(f)).map_err(|e| usage(path, e))?
                }
                (None, Some(f)) => {
                    RegistryAuth::bearer_from_file(&rel(f)).map_err(|e| usage(path, e))?
                }
                (None, None) => RegistryAuth::None,
            };
            sources.push(Source {
                registry: RegistryConfig {
                    url: s.registry,
                    ca: s.ca.as_deref().map(rel),
                    auth,
                    svid: svid.clone(),
                    timeout: Duration::from_secs(raw.timeout_s),
                },
                repository: s.repository,
            });
        }
        Ok(AgentConfig {
            state_dir: rel(&raw.state_dir),
            policy: rel(&raw.policy),
            poll_interval: Duration::from_secs(raw.poll_interval_s),
            runtime: raw.runtime,
            platform: raw.platform,
            action: raw.action,
            runner: raw.runner,
            svid,
            tcti: raw.tcti,
            max_backoff: Duration::from_secs(raw.max_backoff_s.max(raw.poll_interval_s)),
            max_blob_bytes: raw.max_blob_bytes,
            sources,
            selfcheck,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_distribution() {
        for ok in ["capsules/acme-payments", "a", "a/b.c_d"] {
            assert!(valid_repository(ok), "{ok}");
        }
        for bad in ["", "A", "a//b", "-a", "a/", "../x", "a b"] {
            assert!(!valid_repository(bad), "{bad}");
        }
    }
}
