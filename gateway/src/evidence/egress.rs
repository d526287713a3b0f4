//! Egress modes: what of a tenant's evidence may leave this host (`[[tenants]]
//! evidence = { egress, mask }`), and the masking rules, compiled once when the
//! policy is loaded. The bundle on disk always stays whole; this module shapes the
//! copies that leave: the event sent to a sink (and printed by `run`, see
//! [`printed_event`]) and the files of `evidence export` ([`super::export`]).
//!
//! Deny by default: a tenant the policy does not know (a denial of an unknown
//! tenant, of unreadable bytes) gets `local-only`, and the outbound event is built
//! from an allowlist of members, so a member added to the schema later does not leak
//! through `metadata-only` unless it is added here.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde_json::{json, Map, Value};
use verify_core::{ConfigError, EgressMode, Policy};

use super::schema::{Event, EventData};

/// What a masked match is replaced with.
pub const MASK: &str = "[masked]";

/// How far a mode lets evidence leave: a mode may be narrowed, never widened.
pub fn permissiveness(mode: EgressMode) -> u8 {
    match mode {
        EgressMode::LocalOnly => 0,
        EgressMode::MetadataOnly => 1,
        EgressMode::Sanitized => 2,
    }
}

/// One `mask` pattern, compiled for text and for raw bytes (outputs need not be
/// UTF-8).
#[derive(Debug, Clone)]
struct MaskRule {
    pattern: String,
    text: regex::Regex,
    bytes: regex::bytes::Regex,
}

/// A tenant's masking rules, in policy order.
#[derive(Debug, Clone, Default)]
pub struct MaskRules(Vec<MaskRule>);

/// The patterns that matched while masking (for `masked_by`).
pub type Hits = BTreeSet<String>;

impl MaskRules {
    /// Compiles `patterns`; a bad one is a configuration error naming `field[i]`.
    pub fn compile(
        patterns: &[String],
        file: &Path,
        field: &str,
    ) -> Result<MaskRules, ConfigError> {
        let mut rules = Vec::with_capacity(patterns.len());
        for (i, pattern) in patterns.iter().enumerate() {
            let invalid = |e: regex::Error| ConfigError::Invalid {
                file: file.to_path_buf(),
                field: format!("{field}[{i}]"),
                message: format!("not a regular expression: {e}"),
            };
            if pattern.is_empty() {
                return Err(ConfigError::Invalid {
                    file: file.to_path_buf(),
                    field: format!("{field}[{i}]"),
                    message: "an empty pattern masks nothing".into(),
                });
            }
            rules.push(MaskRule {
                pattern: pattern.clone(),
                text: regex::Regex::new(pattern).map_err(invalid)?,
                bytes: regex::bytes::Regex::new(pattern).map_err(invalid)?,
            });
        }
        Ok(MaskRules(rules))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any rule matches `bytes`.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        self.0.iter().any(|r| r.bytes.is_match(bytes))
    }

    /// `s` with every match of every rule replaced by [`MASK`].
    pub fn mask_str(&self, s: &str, hits: &mut Hits) -> String {
        let mut out = s.to_string();
        for r in &self.0 {
            if r.text.is_match(&out) {
                hits.insert(r.pattern.clone());
                out = r.text.replace_all(&out, MASK).into_owned();
            }
        }
        out
    }

    /// `bytes` with every match replaced by [`MASK`].
    pub fn mask_bytes(&self, bytes: &[u8], hits: &mut Hits) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for r in &self.0 {
            if r.bytes.is_match(&out) {
                hits.insert(r.pattern.clone());
                out = r.bytes.replace_all(&out, MASK.as_bytes()).into_owned();
            }
        }
        out
    }

    /// Masks every string value of a JSON document in place (member names are
    /// left: the caller checks the serialised result, see
    /// [`super::export`]).
    pub fn mask_json(&self, value: &mut Value, hits: &mut Hits) {
        match value {
            Value::String(s) => *s = self.mask_str(s, hits),
            Value::Array(items) => items.iter_mut().for_each(|v| self.mask_json(v, hits)),
            Value::Object(members) => members.values_mut().for_each(|v| self.mask_json(v, hits)),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

/// One tenant's egress mode and masking rules.
#[derive(Debug, Clone, Default)]
pub struct TenantEgress {
    pub mode: EgressMode,
    pub mask: MaskRules,
}

/// Every tenant's egress, compiled from a loaded policy.
#[derive(Debug, Clone, Default)]
pub struct EgressRules {
    tenants: HashMap<String, TenantEgress>,
    unknown: TenantEgress,
}

impl EgressRules {
    /// Compiles every tenant's mask patterns; the first bad one is a configuration
    /// error naming the policy file, the tenant and the field.
    pub fn compile(policy: &Policy) -> Result<EgressRules, ConfigError> {
        let mut names: Vec<&String> = policy.tenants.keys().collect();
        // Sorted: the error names the same tenant whatever the hash order.
        names.sort();
        let mut tenants = HashMap::with_capacity(names.len());
        for name in names {
            let rule = &policy.tenants[name].evidence;
            let field = format!("tenants[name = \"{name}\"].evidence.mask");
            let mask = MaskRules::compile(&rule.mask, &policy.source, &field)?;
            tenants.insert(
                name.clone(),
                TenantEgress {
                    mode: rule.egress,
                    mask,
                },
            );
        }
        Ok(EgressRules {
            tenants,
            unknown: TenantEgress::default(),
        })
    }

    /// The egress of `tenant`: a tenant the policy does not name (or none) is
    /// `local-only` without rules.
    pub fn tenant(&self, tenant: Option<&str>) -> &TenantEgress {
        tenant
            .and_then(|t| self.tenants.get(t))
            .unwrap_or(&self.unknown)
    }

    /// The egress of the tenant an event names.
    pub fn for_event(&self, event: &Event) -> &TenantEgress {
        self.tenant(event.custody.tenant_id.as_deref())
    }
}

/// Members of a run event's `data` that `metadata-only` lets leave: ids, digests,
/// verdicts and numbers, never the JWS, the outputs or a free-text member.
const RUN_METADATA: &[&str] = &[
    "tenant_id",
    "capsule_digest",
    "capsule_id",
    "version",
    "run_id",
    "policy_version",
    "approvers",
    "exit_code",
    "timed_out",
    "interrupted",
    "started_at_ms",
    "duration_ms",
    "stdout_bytes",
    "stderr_bytes",
    "stdout_truncated",
    "stderr_truncated",
    "oci_config_sha256",
];

/// The same for a denial: `detail` and `capsule` (a path on this host) stay.
const DENIED_METADATA: &[&str] = &[
    "verdict",
    "reason",
    "digest",
    "capsule_id",
    "version",
    "tenant_id",
    "capsule_digest",
    "kid",
    "alg",
    "launched",
];

fn select(data: &Value, members: &[&str]) -> Map<String, Value> {
    members
        .iter()
        .filter_map(|m| data.get(*m).map(|v| ((*m).to_string(), v.clone())))
        .collect()
}

/// The event as it may leave the host under `egress` (to a sink, or the agent):
///
/// - `local-only`: a notice and nothing more — `id`, `type`, `source`, `time`, the
///   `runid` attribute, and `data` = `{egress_mode, index_sha256}` (the signed
///   index's digest, `null` when the bundle has no index);
/// - `metadata-only`: the head with every custody attribute, `data` reduced to ids,
///   digests, verdicts and numbers ([`RUN_METADATA`]): no JWS, no outputs, no
///   free text;
/// - `sanitized`: the whole event with every string of `data` masked by the
///   tenant's rules, and `egress_mode` and `masked_by` added to `data`.
///
/// The event's `id` is kept in every mode: it is what a receiver deduplicates on.
pub fn outbound_event(event: &Event, egress: &TenantEgress, index_sha256: Option<&str>) -> Value {
    let full = event.to_json();
    let mode = egress.mode.as_str();
    let mut out = full.clone();
    let Some(head) = out.as_object_mut() else {
        return Value::Null;
    };
    match egress.mode {
        EgressMode::LocalOnly => {
            for attr in ["subject", "capsuledigest", "policydigest", "tenantid"] {
                head.remove(attr);
            }
            head.insert(
                "data".into(),
                json!({ "egress_mode": mode, "index_sha256": index_sha256 }),
            );
        }
        EgressMode::MetadataOnly => {
            let members = match event.data {
                EventData::Run(..) => RUN_METADATA,
                EventData::Denied(_) => DENIED_METADATA,
            };
            let mut data = select(&full["data"], members);
            data.insert("egress_mode".into(), json!(mode));
            data.insert("index_sha256".into(), json!(index_sha256));
            head.insert("data".into(), Value::Object(data));
        }
        EgressMode::Sanitized => {
            let mut data = full["data"].clone();
            let mut hits = Hits::new();
            egress.mask.mask_json(&mut data, &mut hits);
            if let Value::Object(d) = &mut data {
                d.insert("egress_mode".into(), json!(mode));
                d.insert("index_sha256".into(), json!(index_sha256));
                d.insert("masked_by".into(), json!(hits));
            }
            head.insert("data".into(), data);
        }
    }
    out
}

/// What `run` prints on its stdout. `run`'s stdout is a pipe to the user who runs
/// it on this host, the owner of the bundle: under `local-only` it gets the whole
/// event (as the bundle's `event.json`), since nothing leaves the host by it. Under
/// `sanitized` and `metadata-only` the tenant has said that its evidence is
/// collected elsewhere (a CI log is the usual reader of that stdout), so it gets the
/// outbound event.
pub fn printed_event(event: &Event, egress: &TenantEgress, index_sha256: Option<&str>) -> Value {
    match egress.mode {
        EgressMode::LocalOnly => event.to_json(),
        EgressMode::MetadataOnly | EgressMode::Sanitized => {
            outbound_event(event, egress, index_sha256)
        }
    }
}

/// `sha256:<hex>` of a bundle's `index.json`, when it has one.
pub fn index_sha256(bundle: &Path) -> Option<String> {
    let bytes = std::fs::read(bundle.join("index.json")).ok()?;
    Some(super::check::digest_of(&bytes).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(p: &[&str]) -> MaskRules {
        let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        MaskRules::compile(
            &p,
            Path::new("policy.toml"),
            "tenants[name = \"t\"].evidence.mask",
        )
        .expect("compiles")
    }

    #[test]
    fn a_bad_pattern_names_the_tenant_and_the_field() {
        let e = MaskRules::compile(
            &["ok".into(), "(unclosed".into()],
            Path::new("p.toml"),
            "tenants[name = \"acme\"].evidence.mask",
        )
        .expect_err("refused");
        match e {
            ConfigError::Invalid { field, .. } => {
                assert_eq!(field, "tenants[name = \"acme\"].evidence.mask[1]")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn masking_replaces_every_match_and_names_the_rule() {
        let r = rules(&["sk-[a-z0-9]{8}", "password=\\S+"]);
        let mut hits = Hits::new();
        let out = r.mask_str("a sk-abcd1234 b sk-zzzz9999 password=hunter2", &mut hits);
        assert_eq!(out, "a [masked] b [masked] [masked]");
        assert_eq!(hits.len(), 2);
        let mut hits = Hits::new();
        let out = r.mask_bytes(b"\xff\xfe sk-abcd1234", &mut hits);
        assert_eq!(out, b"\xff\xfe [masked]");
        assert!(!r.matches(&out));
    }

    #[test]
    fn modes_are_ordered_by_what_they_let_leave() {
        assert!(permissiveness(EgressMode::LocalOnly) < permissiveness(EgressMode::MetadataOnly));
        assert!(permissiveness(EgressMode::MetadataOnly) < permissiveness(EgressMode::Sanitized));
    }
}
