//! Policy (TOML): who may sign for which tenant, where, on which runners, with which
//! tools, and how many approvals it takes. A bad policy is a configuration error that
//! names the file and the field, never a silent default.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crypto::Backend;
use crate::decision::Alg;
use crate::decision::Sha256Digest;
use crate::error::ConfigError;
use crate::keys::{KeyStore, ParsedJwk};
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
    /// HS256 keys sealed to the TPM, relative to the policy file. verify-core has no
    /// TPM code: the caller passes an [`Unsealer`].
    #[serde(default)]
    sealed: Vec<PathBuf>,
}

/// Turns a sealed key file named in `trust.sealed` into a key (the gateway unseals it
/// through the TPM). The error message is shown with the policy file and field.
pub type Unsealer<'a> = &'a mut dyn FnMut(&Path) -> Result<ParsedJwk, String>;

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
    #[serde(default)]
    host_programs: Vec<String>,
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
    /// Host programs (absolute, normalised paths) an entrypoint or a script's `#!`
    /// may name; anything else that runs must be a staged, verified file.
    pub host_programs: HashSet<String>,
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
    /// Loads a policy file and the JWKS it names. A policy naming sealed keys is an
    /// error here (see [`Policy::load_with_sealed`]).
    pub fn load(path: &Path, backend: &'static dyn Backend) -> Result<Policy, ConfigError> {
        Policy::load_with_sealed(path, backend, None)
    }

    /// Loads a policy file, the JWKS it names and, through `unseal`, the sealed HS256
    /// keys it names; they join the trust store beside the JWKS keys.
    pub fn load_with_sealed(
        path: &Path,
        backend: &'static dyn Backend,
        unseal: Option<Unsealer<'_>>,
    ) -> Result<Policy, ConfigError> {
        // The policy and every file it names are trust files: refused when anyone but
        // root or this user could have changed them.
        let file = crate::trust_file::read(path)?;
        let jwks_of = |rel: &Path| -> Result<KeyStore, ConfigError> {
            let jwks = path.parent().unwrap_or(Path::new(".")).join(rel);
            KeyStore::load(&jwks, backend)
        };
        let mut checked_unseal;
        let unseal: Option<Unsealer<'_>> = match unseal {
            Some(inner) => {
                checked_unseal = move |sealed: &Path| {
                    crate::trust_file::check(sealed).map_err(|e| e.to_string())?;
                    inner(sealed)
                };
                Some(&mut checked_unseal)
            }
            None => None,
        };
        Policy::from_toml_with_sealed(file.text()?, path, backend, jwks_of, unseal)
    }

    /// Parses policy text; `load_keys` resolves `trust.jwks` (tests pass keys in memory).
    pub fn from_toml(
        text: &str,
        origin: &Path,
        backend: &'static dyn Backend,
        load_keys: impl FnOnce(&Path) -> Result<KeyStore, ConfigError>,
    ) -> Result<Policy, ConfigError> {
        Policy::from_toml_with_sealed(text, origin, backend, load_keys, None)
    }

    /// [`Policy::from_toml`] with an [`Unsealer`] for `trust.sealed`.
    pub fn from_toml_with_sealed(
        text: &str,
        origin: &Path,
        backend: &'static dyn Backend,
        load_keys: impl FnOnce(&Path) -> Result<KeyStore, ConfigError>,
        mut unseal: Option<Unsealer<'_>>,
    ) -> Result<Policy, ConfigError> {
        let de = toml::Deserializer::new(text);
        let file: PolicyFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let (field, message) = crate::error::toml_error(text, e);
            ConfigError::invalid(origin, field, message)
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
        // A JWKS that cannot be read is a fault of this policy's `trust.jwks`: say both.
        let mut keys = load_keys(&file.trust.jwks).map_err(|e| match e {
            ConfigError::Read { file, source } => bad(
                "trust.jwks".into(),
                format!("{}: cannot read: {source}", file.display()),
            ),
            other => other,
        })?;
        for (i, rel) in file.trust.sealed.iter().enumerate() {
            let field = format!("trust.sealed[{i}]");
            let sealed = origin.parent().unwrap_or(Path::new(".")).join(rel);
            let unseal = unseal.as_mut().ok_or_else(|| {
                bad(
                    field.clone(),
                    format!(
                        "{}: a sealed key needs the TPM to unseal it, and none was configured",
                        sealed.display()
                    ),
                )
            })?;
            let jwk = unseal(&sealed).map_err(|m| bad(field.clone(), m))?;
            if jwk.alg != Alg::Hs256 {
                return Err(bad(field, "a sealed key must be HS256".into()));
            }
            keys.insert(jwk, backend)
                .map_err(|e| bad(field, e.to_string()))?;
        }
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
                let digest = Sha256Digest::parse(d).ok_or_else(|| {
                    bad(
                        at(&format!("armory[{j}]")),
                        crate::manifest::NOT_A_DIGEST.into(),
                    )
                })?;
                armory.insert(digest);
            }
            let mut host_programs = HashSet::new();
            for (j, p) in t.host_programs.iter().enumerate() {
                check_host_program(p).map_err(|m| {
                    bad(
                        at(&format!("host_programs[{j}]")),
                        format!("`{}`: {m}", p.escape_debug()),
                    )
                })?;
                host_programs.insert(p.clone());
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
                    host_programs,
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

/// A host program is named by an absolute, normalised path: `/bin/sh`, never
/// `bin/sh`, `/bin//sh`, `/bin/./sh`, `/usr/../bin/sh` or `/bin/`. The entrypoint is
/// compared with it as a string, so two spellings of one file must not exist.
fn check_host_program(p: &str) -> Result<(), &'static str> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err("must be an absolute path");
    };
    if p.len() > crate::manifest::MAX_PATH_BYTES {
        return Err("longer than 4096 bytes");
    }
    if p.chars().any(|c| c.is_control()) {
        return Err("control character in path");
    }
    for seg in rest.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err("must be normalised (no empty, `.` or `..` segment, no trailing `/`)");
        }
    }
    if rest == "capsule" || rest.starts_with("capsule/") {
        return Err("is under /capsule, where only the manifest's own files are");
    }
    Ok(())
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

#[cfg(test)]
mod host_program_tests {
    use super::*;
    use crate::crypto::default_backend;

    fn policy(host_programs: &str) -> Result<Policy, ConfigError> {
        let text = format!(
            "policy_version = \"1\"\nclock_skew_s = 0\n[trust]\njwks = \"k.json\"\n\
             [[tenants]]\nname = \"t\"\nkeys = [\"k\"]\nenvironments = [\"staging\"]\n\
             host_programs = {host_programs}\nmin_approvals = 1\n"
        );
        let jwks = crate::keys::ParsedJwk::generate("k", Alg::Es256, default_backend())
            .expect("key")
            .to_json(false);
        let jwks = serde_json::json!({ "keys": [jwks] }).to_string();
        Policy::from_toml(
            &text,
            Path::new("/etc/gw/policy.toml"),
            default_backend(),
            |p| KeyStore::from_jwks(jwks.as_bytes(), p, default_backend()),
        )
    }

    #[test]
    fn host_programs_must_be_absolute_and_normalised() {
        let p = policy(r#"["/bin/sh", "/usr/bin/python3"]"#).expect("valid");
        assert!(p.tenants["t"].host_programs.contains("/bin/sh"));
        for bad in [
            "sh",
            "bin/sh",
            "/bin//sh",
            "/bin/./sh",
            "/usr/../bin/sh",
            "/bin/",
            "/",
            "",
            "/capsule/run.sh",
            "/capsule",
        ] {
            let e = policy(&format!("[{bad:?}]")).expect_err(bad).to_string();
            assert!(
                e.contains("policy.toml: tenants[0].host_programs[0]"),
                "{bad}: {e}"
            );
        }
        assert!(policy("[]").expect("empty").tenants["t"]
            .host_programs
            .is_empty());
    }
}

#[cfg(test)]
mod sealed_tests {
    use super::*;
    use crate::crypto::default_backend;
    use crate::keys::KeyMaterial;
    use zeroize::Zeroizing;

    const POLICY: &str = r#"
policy_version = "1"
clock_skew_s = 0
[trust]
jwks = "keys.jwks.json"
sealed = ["k-hs.sealed.json"]
[[tenants]]
name = "t"
keys = ["k-hs"]
environments = ["staging"]
min_approvals = 1
"#;

    fn load(unseal: Option<Unsealer<'_>>) -> Result<Policy, ConfigError> {
        Policy::from_toml_with_sealed(
            POLICY,
            Path::new("/etc/gw/policy.toml"),
            default_backend(),
            |_| Ok(KeyStore::default()),
            unseal,
        )
    }

    #[test]
    fn sealed_keys_join_the_trust_store_through_the_unsealer() {
        let mut seen = Vec::new();
        let mut unseal = |p: &Path| {
            seen.push(p.to_path_buf());
            Ok(ParsedJwk {
                kid: "k-hs".into(),
                alg: Alg::Hs256,
                material: KeyMaterial::Hs256 {
                    secret: Zeroizing::new(vec![7u8; 32]),
                },
            })
        };
        let policy = load(Some(&mut unseal)).unwrap();
        assert!(policy.keys.get("k-hs").is_some());
        assert_eq!(seen, vec![PathBuf::from("/etc/gw/k-hs.sealed.json")]);
    }

    #[test]
    fn sealed_keys_without_an_unsealer_or_that_fail_name_the_field() {
        let err = load(None).unwrap_err().to_string();
        assert!(
            err.contains("trust.sealed[0]") && err.contains("needs the TPM"),
            "{err}"
        );
        let mut refuse = |_: &Path| Err("PCR sha256:16 no longer match".to_string());
        let err = load(Some(&mut refuse)).unwrap_err().to_string();
        assert!(
            err.contains("policy.toml: trust.sealed[0]: PCR sha256:16"),
            "{err}"
        );
    }
}
