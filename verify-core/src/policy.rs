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
use crate::manifest::ApproverId;
use crate::rules::{Rule, TargetPattern, Tier, NETWORK_MODES};
use crate::runner::RunnerPattern;
use crate::verify_cache::VerifyCache;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    policy_version: String,
    clock_skew_s: u64,
    trust: TrustFile,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    approvers: Vec<ApproverFile>,
    tenants: Vec<TenantFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproverFile {
    id: String,
    /// Approval keys (kids in `trust.approvers_jwks`).
    kids: Vec<String>,
    roles: Vec<String>,
    /// Capsule-signing keys (kids in `trust.jwks`) this person holds: with
    /// `signer_may_approve = false`, a capsule they signed does not count their approval.
    #[serde(default)]
    capsule_keys: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    environment: String,
    min_approvals: Option<u32>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    signed_approvals: bool,
    #[serde(default = "yes")]
    signer_may_approve: bool,
    targets: Option<Vec<String>>,
    actions: Option<Vec<String>>,
    network: Option<Vec<String>>,
    tier: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexFile {
    keys: Vec<String>,
    #[serde(default)]
    required: bool,
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
    /// Approvers' public keys (ES256 only), relative to the policy file.
    approvers_jwks: Option<PathBuf>,
}

/// Turns a sealed key file named in `trust.sealed` into a key (the gateway unseals it
/// through the TPM). The error, the caller's own type, is shown with the policy file
/// and field (`ConfigError::Invalid`).
pub type Unsealer<'a> = &'a mut dyn FnMut(&Path) -> Result<ParsedJwk, UnsealError>;

/// Why an [`Unsealer`] could not unseal a key: whatever the caller's TPM code says.
pub type UnsealError = Box<dyn std::error::Error + Send + Sync>;

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
    index: Option<IndexFile>,
    #[serde(default)]
    rules: Vec<RuleFile>,
    #[serde(default)]
    evidence: EvidenceRule,
    #[serde(default)]
    rootfs: RootfsFile,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootfsFile {
    sha256: Option<String>,
    #[serde(default)]
    host_usr: bool,
}

/// `[tenants] rootfs = { sha256 = "sha256:<hex>" }` or `{ host_usr = true }`: the
/// root file system this tenant's capsules run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RootfsRule {
    /// The host's base rootfs (busybox), its tree digest recorded but not pinned.
    #[default]
    Base,
    /// The base rootfs, whose tree digest must be this one: any other refuses the run.
    Pinned(Sha256Digest),
    /// The host's `/usr` (and `/bin`, `/lib`, ...), read-only: explicit opt-in only,
    /// since it is not pinned and changes with every package upgrade.
    HostUsr,
}

/// What evidence of a tenant's runs may leave the host (`[tenants] evidence.egress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EgressMode {
    /// Nothing but the signed index's digest (the default).
    #[default]
    LocalOnly,
    /// The signed index, the event and the outputs, masked by the tenant's rules.
    Sanitized,
    /// The signed index, ids and digests only.
    MetadataOnly,
}

impl EgressMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::LocalOnly => "local-only",
            EgressMode::Sanitized => "sanitized",
            EgressMode::MetadataOnly => "metadata-only",
        }
    }
}

impl std::fmt::Display for EgressMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[tenants] evidence = { egress, mask }`. The mask patterns are regular
/// expressions; verify-core keeps them as text (it has no regex engine), and the
/// gateway compiles them when it loads the policy, so a bad pattern is a
/// configuration error there, before anything is admitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceRule {
    #[serde(default)]
    pub egress: EgressMode,
    #[serde(default)]
    pub mask: Vec<String>,
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
    /// Governance rules per environment; the first whose environment matches wins.
    pub rules: Vec<Rule>,
    /// The tenant index (fleet freshness): who signs it, whether it is required.
    pub index: Option<IndexRule>,
    /// What of its evidence may leave the host.
    pub evidence: EvidenceRule,
    /// The root file system its capsules run on.
    pub rootfs: RootfsRule,
}

impl Tenant {
    /// The rule for `environment`: the first that names it, `None` for the v1 fields.
    pub fn rule_for(&self, environment: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.environment == environment)
    }
}

/// `[tenants.index]`: the kids (in `trust.jwks`) that sign this tenant's index.
#[derive(Debug, Clone)]
pub struct IndexRule {
    pub keys: HashSet<String>,
    /// A capsule verified without an index for its tenant is `index_stale`.
    pub required: bool,
}

/// One approver from `[[approvers]]`: the identity and roles that policy, never an
/// approval's payload, gives a key.
#[derive(Debug, Clone)]
pub struct Approver {
    pub id: ApproverId,
    pub roles: HashSet<String>,
    pub capsule_keys: HashSet<String>,
}

/// Every approver, found by identity or by approval kid.
#[derive(Debug, Default)]
pub struct Approvers {
    by_id: HashMap<ApproverId, Approver>,
    by_kid: HashMap<String, ApproverId>,
    by_capsule_key: HashMap<String, ApproverId>,
    /// The approvers' public keys (`trust.approvers_jwks`), ES256 only.
    pub keys: KeyStore,
}

impl Approvers {
    pub fn get(&self, id: &str) -> Option<&Approver> {
        self.by_id.get(id)
    }

    /// The approver an approval key belongs to.
    pub fn by_kid(&self, kid: &str) -> Option<&Approver> {
        self.by_kid.get(kid).and_then(|id| self.by_id.get(id))
    }

    /// The approver who holds capsule-signing key `kid`, if policy says.
    pub fn holding_capsule_key(&self, kid: &str) -> Option<&Approver> {
        self.by_capsule_key
            .get(kid)
            .and_then(|id| self.by_id.get(id))
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// A loaded, validated policy with its trust store.
#[derive(Debug)]
pub struct Policy {
    pub policy_version: String,
    pub clock_skew_s: u64,
    pub limits: Limits,
    pub tenants: HashMap<String, Tenant>,
    pub keys: KeyStore,
    /// `[[approvers]]` and their keys.
    pub approvers: Approvers,
    pub backend: &'static dyn Backend,
    /// Where the policy came from (for messages and evidence).
    pub source: PathBuf,
    /// The sha256 of the policy text and of each trust file it loaded.
    pub digests: PolicyDigests,
    /// Signatures verified under this policy's trust store: owned by it, so a policy
    /// loaded again (a new trust store) starts with an empty cache.
    verify_cache: VerifyCache,
}

/// The content digests of what this policy was loaded from, for evidence: the policy
/// text, and each trust file (`trust.jwks`, `trust.approvers_jwks`, `trust.sealed[i]`)
/// by its field. A policy parsed from memory ([`Policy::from_toml`]) has no trust files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDigests {
    pub policy: Sha256Digest,
    pub trust_files: Vec<(String, Sha256Digest)>,
}

impl PolicyDigests {
    /// One digest for the trust store in force: the sha256 of the lines
    /// `<field> sha256:<hex>\n`, in load order (jwks, approvers_jwks, sealed).
    pub fn trust_store(&self, backend: &dyn Backend) -> Sha256Digest {
        let mut text = String::new();
        for (field, digest) in &self.trust_files {
            text.push_str(field);
            text.push(' ');
            text.push_str(&digest.to_string());
            text.push('\n');
        }
        Sha256Digest(backend.sha256_oneshot(text.as_bytes()))
    }
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
        // Each trust file's digest, in load order, for evidence (`PolicyDigests`).
        let trust_files = std::cell::RefCell::new(Vec::new());
        let digest_of = |bytes: &[u8]| Sha256Digest(backend.sha256_oneshot(bytes));
        let jwks_of = |rel: &Path| -> Result<KeyStore, ConfigError> {
            let jwks = path.parent().unwrap_or(Path::new(".")).join(rel);
            let (store, bytes) = KeyStore::load_with_bytes(&jwks, backend)?;
            let field = if trust_files.borrow().is_empty() {
                "trust.jwks"
            } else {
                "trust.approvers_jwks"
            };
            trust_files
                .borrow_mut()
                .push((field.to_string(), digest_of(&bytes)));
            Ok(store)
        };
        let mut checked_unseal;
        let unseal: Option<Unsealer<'_>> = match unseal {
            Some(inner) => {
                checked_unseal = |sealed: &Path| {
                    let bytes = crate::trust_file::read(sealed)?.bytes;
                    let n = trust_files
                        .borrow()
                        .iter()
                        .filter(|(f, _)| f.starts_with("trust.sealed"))
                        .count();
                    trust_files
                        .borrow_mut()
                        .push((format!("trust.sealed[{n}]"), digest_of(&bytes)));
                    inner(sealed)
                };
                Some(&mut checked_unseal)
            }
            None => None,
        };
        let mut policy =
            Policy::from_toml_with_sealed(file.text()?, path, backend, jwks_of, unseal)?;
        policy.digests.trust_files = trust_files.into_inner();
        Ok(policy)
    }

    /// Parses policy text; `load_keys` resolves `trust.jwks` and `trust.approvers_jwks`
    /// (tests pass keys in memory).
    pub fn from_toml(
        text: &str,
        origin: &Path,
        backend: &'static dyn Backend,
        load_keys: impl FnMut(&Path) -> Result<KeyStore, ConfigError>,
    ) -> Result<Policy, ConfigError> {
        Policy::from_toml_with_sealed(text, origin, backend, load_keys, None)
    }

    /// [`Policy::from_toml`] with an [`Unsealer`] for `trust.sealed`.
    pub fn from_toml_with_sealed(
        text: &str,
        origin: &Path,
        backend: &'static dyn Backend,
        mut load_keys: impl FnMut(&Path) -> Result<KeyStore, ConfigError>,
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
        let unreadable = |field: &str, e: ConfigError| match e {
            ConfigError::Read { file, source } => bad(
                field.into(),
                format!("{}: cannot read: {source}", file.display()),
            ),
            other => other,
        };
        let mut keys = load_keys(&file.trust.jwks).map_err(|e| unreadable("trust.jwks", e))?;
        let approver_keys = match &file.trust.approvers_jwks {
            Some(rel) => load_keys(rel).map_err(|e| unreadable("trust.approvers_jwks", e))?,
            None => KeyStore::default(),
        };
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
            let jwk = unseal(&sealed).map_err(|e| bad(field.clone(), e.to_string()))?;
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

        let approvers =
            load_approvers(file.approvers, approver_keys, &keys).map_err(|(f, m)| bad(f, m))?;

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
            let mut rules = Vec::with_capacity(t.rules.len());
            for (j, r) in t.rules.into_iter().enumerate() {
                let rule = load_rule(r, &t.environments, &approvers)
                    .map_err(|(f, m)| bad(at(&format!("rules[{j}].{f}")), m))?;
                rules.push(rule);
            }
            let index = match t.index {
                None => None,
                Some(ix) => {
                    if ix.keys.is_empty() {
                        return Err(bad(at("index.keys"), "at least one kid is required".into()));
                    }
                    for (j, kid) in ix.keys.iter().enumerate() {
                        if keys.get(kid).map(|k| k.alg()) != Some(Alg::Es256) {
                            return Err(bad(
                                at(&format!("index.keys[{j}]")),
                                format!("kid `{kid}` is not an ES256 key in trust.jwks"),
                            ));
                        }
                    }
                    Some(IndexRule {
                        keys: ix.keys.into_iter().collect(),
                        required: ix.required,
                    })
                }
            };
            let rootfs = match (&t.rootfs.sha256, t.rootfs.host_usr) {
                (Some(_), true) => return Err(bad(
                    at("rootfs"),
                    "a pinned rootfs (sha256) and the host's /usr (host_usr) exclude each other"
                        .into(),
                )),
                (Some(d), false) => {
                    RootfsRule::Pinned(Sha256Digest::parse(d).ok_or_else(|| {
                        bad(at("rootfs.sha256"), crate::manifest::NOT_A_DIGEST.into())
                    })?)
                }
                (None, true) => RootfsRule::HostUsr,
                (None, false) => RootfsRule::Base,
            };
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
                    rules,
                    index,
                    evidence: t.evidence,
                    rootfs,
                },
            );
        }
        Ok(Policy {
            policy_version: file.policy_version,
            clock_skew_s: file.clock_skew_s,
            limits: file.limits,
            tenants,
            keys,
            approvers,
            backend,
            source: origin.to_path_buf(),
            digests: PolicyDigests {
                policy: Sha256Digest(backend.sha256_oneshot(text.as_bytes())),
                trust_files: Vec::new(),
            },
            verify_cache: VerifyCache::default(),
        })
    }

    /// The verification cache of this trust store ([`VerifyCache`]).
    pub fn verify_cache(&self) -> &VerifyCache {
        &self.verify_cache
    }

    /// Replaces the verification cache by an empty one of `capacity` entries (0: off).
    pub fn set_verify_cache_capacity(&mut self, capacity: usize) {
        self.verify_cache = VerifyCache::new(capacity);
    }
}

/// `[[approvers]]`: canonical identities (the same rule as the manifest's), each
/// approval kid in `trust.approvers_jwks` and owned by one approver, each capsule key
/// in `trust.jwks`. Errors are `(field, message)`.
fn load_approvers(
    files: Vec<ApproverFile>,
    keys: KeyStore,
    capsule_keys: &KeyStore,
) -> Result<Approvers, (String, String)> {
    if let Some(kid) = keys
        .kids()
        .find(|kid| keys.get(kid).map(|k| k.alg()) != Some(Alg::Es256))
    {
        return Err((
            "trust.approvers_jwks".into(),
            format!("key `{kid}` is not ES256 (approvals are ES256 only)"),
        ));
    }
    let mut out = Approvers {
        keys,
        ..Approvers::default()
    };
    for (i, a) in files.into_iter().enumerate() {
        let at = |f: &str| format!("approvers[{i}].{f}");
        let id = ApproverId::parse(&a.id)
            .map_err(|m| (at("id"), format!("`{}`: {m}", a.id.escape_debug())))?;
        if out.by_id.contains_key(&id) {
            return Err((at("id"), format!("duplicate approver `{id}`")));
        }
        if a.kids.is_empty() {
            return Err((at("kids"), "at least one kid is required".into()));
        }
        for (j, kid) in a.kids.iter().enumerate() {
            if out.keys.get(kid).is_none() {
                return Err((
                    at(&format!("kids[{j}]")),
                    format!("kid `{kid}` is not in trust.approvers_jwks"),
                ));
            }
            if let Some(other) = out.by_kid.insert(kid.clone(), id.clone()) {
                return Err((
                    at(&format!("kids[{j}]")),
                    format!("kid `{kid}` already belongs to `{other}`"),
                ));
            }
        }
        for (j, kid) in a.capsule_keys.iter().enumerate() {
            if capsule_keys.get(kid).is_none() {
                return Err((
                    at(&format!("capsule_keys[{j}]")),
                    format!("kid `{kid}` is not in trust.jwks"),
                ));
            }
            if let Some(other) = out.by_capsule_key.insert(kid.clone(), id.clone()) {
                return Err((
                    at(&format!("capsule_keys[{j}]")),
                    format!("kid `{kid}` already belongs to `{other}`"),
                ));
            }
        }
        if let Some(j) = a.roles.iter().position(|r| r.is_empty()) {
            return Err((at(&format!("roles[{j}]")), "must not be empty".into()));
        }
        out.by_id.insert(
            id.clone(),
            Approver {
                id,
                roles: a.roles.into_iter().collect(),
                capsule_keys: a.capsule_keys.into_iter().collect(),
            },
        );
    }
    Ok(out)
}

/// One `[[tenants.rules]]` entry, checked. Errors are `(field within the rule, message)`.
fn load_rule(
    r: RuleFile,
    environments: &[String],
    approvers: &Approvers,
) -> Result<Rule, (String, String)> {
    let err = |f: &str, m: String| (f.to_string(), m);
    if !environments.contains(&r.environment) {
        return Err(err(
            "environment",
            format!(
                "`{}` is not one of the tenant's environments",
                r.environment.escape_debug()
            ),
        ));
    }
    if r.min_approvals == Some(0) {
        return Err(err("min_approvals", "must be at least 1".into()));
    }
    for (j, role) in r.roles.iter().enumerate() {
        // A role nobody holds could never be satisfied: a typo, said at load time.
        if !approvers.by_id.values().any(|a| a.roles.contains(role)) {
            return Err(err(
                &format!("roles[{j}]"),
                format!(
                    "no [[approvers]] entry holds role `{}`",
                    role.escape_debug()
                ),
            ));
        }
    }
    let targets = match r.targets {
        None => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(j, p)| {
                    TargetPattern::parse(p).map_err(|m| {
                        err(
                            &format!("targets[{j}]"),
                            format!("`{}`: {m}", p.escape_debug()),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let network = match r.network {
        None => None,
        Some(list) => {
            if let Some(j) = list
                .iter()
                .position(|m| !NETWORK_MODES.contains(&m.as_str()))
            {
                return Err(err(
                    &format!("network[{j}]"),
                    format!("`{}`: not `none` or `targets`", list[j].escape_debug()),
                ));
            }
            Some(list.into_iter().collect())
        }
    };
    let tier = match r.tier {
        None => None,
        Some(t) => Some(Tier::from_name(&t).ok_or_else(|| {
            err(
                "tier",
                format!("`{}`: not `gvisor` or `kata`", t.escape_debug()),
            )
        })?),
    };
    Ok(Rule {
        environment: r.environment,
        min_approvals: r.min_approvals,
        roles: r.roles,
        signed_approvals: r.signed_approvals,
        signer_may_approve: r.signer_may_approve,
        targets,
        actions: r.actions.map(|a| a.into_iter().collect()),
        network,
        tier,
    })
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
        policy_with(host_programs, "")
    }

    fn policy_with(host_programs: &str, extra: &str) -> Result<Policy, ConfigError> {
        let text = format!(
            "policy_version = \"1\"\nclock_skew_s = 0\n[trust]\njwks = \"k.json\"\n\
             [[tenants]]\nname = \"t\"\nkeys = [\"k\"]\nenvironments = [\"staging\"]\n\
             host_programs = {host_programs}\nmin_approvals = 1\n{extra}"
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

    #[test]
    fn the_rootfs_is_the_base_by_default_pinned_by_digest_or_the_host_usr_by_opt_in() {
        let hex = "ab".repeat(32);
        let rootfs = |extra: &str| policy_with("[]", extra).map(|p| p.tenants["t"].rootfs);
        assert_eq!(rootfs("").expect("default"), RootfsRule::Base);
        assert_eq!(
            rootfs(&format!("rootfs = {{ sha256 = \"sha256:{hex}\" }}")).expect("pinned"),
            RootfsRule::Pinned(Sha256Digest::parse(&hex).expect("digest"))
        );
        assert_eq!(
            rootfs("rootfs = { host_usr = true }").expect("opt-in"),
            RootfsRule::HostUsr
        );
        for (bad, field) in [
            (
                "rootfs = { sha256 = \"sha256:12\" }",
                "tenants[0].rootfs.sha256",
            ),
            (
                &*format!("rootfs = {{ sha256 = \"{hex}\", host_usr = true }}"),
                "tenants[0].rootfs",
            ),
            ("rootfs = { host = true }", "rootfs"),
        ] {
            let e = rootfs(bad).expect_err(bad).to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
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
        let mut refuse = |_: &Path| Err("PCR sha256:16 no longer match".into());
        let err = load(Some(&mut refuse)).unwrap_err().to_string();
        assert!(
            err.contains("policy.toml: trust.sealed[0]: PCR sha256:16"),
            "{err}"
        );
    }
}
