//! Policy (TOML): who may sign for which tenant, where, on which runners, with which
//! tools, and how many approvals it takes. A bad policy is a configuration error that
//! names the file and the field, never a silent default.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crypto::Backend;
use crate::decision::Sha256Digest;
use crate::error::ConfigError;
use crate::keys::KeyStore;
use crate::limits::Limits;
use crate::runner::RunnerPattern;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    policy_version: String,
    clock_skew_s: u64,
    trust: TrustFile,
    #[serde(default)]
    limits: Limits,
    tenants: Vec<TenantFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    /// Path of the JWKS, relative to the policy file.
    jwks: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    name: String,
    keys: Vec<String>,
    environments: Vec<String>,
    #[serde(default)]
    runners: Vec<String>,
    #[serde(default)]
    armory: Vec<String>,
    min_approvals: u32,
}

/// One tenant's rules.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    /// Kids allowed to sign for this tenant.
    pub keys: HashSet<String>,
    pub environments: HashSet<String>,
    pub runners: Vec<RunnerPattern>,
    /// The only tool digests this tenant may run.
    pub armory: HashSet<Sha256Digest>,
    /// Distinct approvers needed, none of them the author.
    pub min_approvals: u32,
}

/// A loaded, validated policy with its trust store.
#[derive(Debug)]
pub struct Policy {
    pub policy_version: String,
    pub clock_skew_s: u64,
    pub limits: Limits,
    pub tenants: HashMap<String, Tenant>,
    pub keys: KeyStore,
    pub backend: &'static dyn Backend,
    /// Where the policy came from (for messages and evidence).
    pub source: PathBuf,
}

/// A clock skew beyond a day would make validity windows meaningless.
const MAX_CLOCK_SKEW_S: u64 = 86_400;

impl Policy {
    /// Loads a policy file and the JWKS it names.
    pub fn load(path: &Path, backend: &'static dyn Backend) -> Result<Policy, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let jwks_of = |rel: &Path| -> Result<KeyStore, ConfigError> {
            let jwks = path.parent().unwrap_or(Path::new(".")).join(rel);
            KeyStore::load(&jwks, backend)
        };
        Policy::from_toml(&text, path, backend, jwks_of)
    }

    /// Parses policy text; `load_keys` resolves `trust.jwks` (tests pass keys in memory).
    pub fn from_toml(
        text: &str,
        origin: &Path,
        backend: &'static dyn Backend,
        load_keys: impl FnOnce(&Path) -> Result<KeyStore, ConfigError>,
    ) -> Result<Policy, ConfigError> {
        let de = toml::Deserializer::new(text);
        let file: PolicyFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::invalid(origin, field, e.into_inner().message().trim().to_string())
        })?;
        let bad = |field: String, message: String| ConfigError::invalid(origin, field, message);

        if file.policy_version.is_empty() {
            return Err(bad("policy_version".into(), "must not be empty".into()));
        }
        if file.clock_skew_s > MAX_CLOCK_SKEW_S {
            return Err(bad(
                "clock_skew_s".into(),
                format!("at most {MAX_CLOCK_SKEW_S}"),
            ));
        }
        check_limits(&file.limits).map_err(|(f, m)| bad(format!("limits.{f}"), m.into()))?;
        let keys = load_keys(&file.trust.jwks)?;
        if file.tenants.is_empty() {
            return Err(bad(
                "tenants".into(),
                "at least one tenant is required".into(),
            ));
        }

        let mut tenants = HashMap::new();
        for (i, t) in file.tenants.into_iter().enumerate() {
            let at = |f: &str| format!("tenants[{i}].{f}");
            if t.name.is_empty() {
                return Err(bad(at("name"), "must not be empty".into()));
            }
            if tenants.contains_key(&t.name) {
                return Err(bad(at("name"), format!("duplicate tenant `{}`", t.name)));
            }
            if t.keys.is_empty() {
                return Err(bad(at("keys"), "at least one kid is required".into()));
            }
            for (j, kid) in t.keys.iter().enumerate() {
                if keys.get(kid).is_none() {
                    return Err(bad(
                        at(&format!("keys[{j}]")),
                        format!("kid `{kid}` is not in the trust store"),
                    ));
                }
            }
            if t.environments.is_empty() {
                return Err(bad(
                    at("environments"),
                    "at least one environment is required".into(),
                ));
            }
            let mut runners = Vec::with_capacity(t.runners.len());
            for (j, r) in t.runners.iter().enumerate() {
                runners.push(
                    RunnerPattern::parse(r)
                        .map_err(|m| bad(at(&format!("runners[{j}]")), format!("`{r}`: {m}")))?,
                );
            }
            let mut armory = HashSet::new();
            for (j, d) in t.armory.iter().enumerate() {
                let digest = Sha256Digest::from_prefixed(d).ok_or_else(|| {
                    bad(
                        at(&format!("armory[{j}]")),
                        "must be sha256:<64 lowercase hex>".into(),
                    )
                })?;
                armory.insert(digest);
            }
            if t.min_approvals == 0 {
                // Zero would admit capsules nobody approved: say so explicitly instead.
                return Err(bad(at("min_approvals"), "must be at least 1".into()));
            }
            tenants.insert(
                t.name.clone(),
                Tenant {
                    name: t.name,
                    keys: t.keys.into_iter().collect(),
                    environments: t.environments.into_iter().collect(),
                    runners,
                    armory,
                    min_approvals: t.min_approvals,
                },
            );
        }
        Ok(Policy {
            policy_version: file.policy_version,
            clock_skew_s: file.clock_skew_s,
            limits: file.limits,
            tenants,
            keys,
            backend,
            source: origin.to_path_buf(),
        })
    }
}

fn check_limits(l: &Limits) -> Result<(), (&'static str, &'static str)> {
    let positive = [
        ("max_jws_bytes", l.max_jws_bytes as u64),
        ("max_artifacts", l.max_artifacts as u64),
        ("max_artifact_bytes", l.max_artifact_bytes),
        ("max_timeout_ms", l.max_timeout_ms),
        ("max_memory_mib", l.max_memory_mib),
        ("max_pids", l.max_pids),
    ];
    for (name, value) in positive {
        if value == 0 {
            return Err((name, "must be positive"));
        }
    }
    Ok(())
}
