//! Governance fixtures (issue 13): approvers and their keys, a tenant with rules per
//! environment, a tenant whose index is required, signed approvals and tenant indexes.
//!
//! The fixture policy keeps the v1 tenant (`acme-payments`) as it was and adds:
//! - `acme-governed`: `production` needs two distinct signed approvals, roles
//!   `sre-lead` and `security`, never the capsule signer's (`rel@`, who holds
//!   `k-es-2025`), targets `https://auth.prod.acme.example/*`, actions
//!   `http.get`/`http.post`, network `none`, tier `gvisor`; `fortress` needs tier
//!   `kata`; `staging` has no rule (the v1 fields). Its index is optional.
//! - `acme-indexed`: like the v1 tenant, but a tenant index is required.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use verify_core::approvals::{ApprovalPayload, APPROVALS_DIR};
use verify_core::index::{IndexPayload, INDEX_SCHEMA};
use verify_core::keys::{ParsedJwk, SigningKey};
use verify_core::{Alg, Manifest, Sha256Digest};

use crate::{read_jws, sha256_hex, Signer, World, ES_KID, HS_KID, TOOL_BYTES};

/// The governance policy: the fixture policy (`policy.toml`) plus approvers and the
/// governed tenants. A file of its own, so that tests rewriting `policy.toml`'s text
/// are not affected by it.
pub const POLICY_FILE: &str = "governance.toml";
pub const GOVERNED: &str = "acme-governed";
pub const INDEXED: &str = "acme-indexed";
pub const INDEX_KID: &str = "k-index";
pub const ALICE: &str = "alice@acme.example";
pub const BOB: &str = "bob@acme.example";
pub const CAROL: &str = "carol@acme.example";
/// The author of every fixture manifest; also an approver (whose approval never counts).
pub const PLANNER: &str = "planner@acme.example";
/// Holds the capsule-signing key `k-es-2025` as well as an approval key.
pub const REL: &str = "rel@acme.example";

#[derive(Debug, Clone, Copy)]
pub struct ApproverSpec {
    pub id: &'static str,
    pub kid: &'static str,
    pub roles: &'static [&'static str],
    pub capsule_keys: &'static [&'static str],
}

pub const APPROVERS: [ApproverSpec; 5] = [
    ApproverSpec {
        id: ALICE,
        kid: "alice-2026",
        roles: &["sre-lead"],
        capsule_keys: &[],
    },
    ApproverSpec {
        id: BOB,
        kid: "bob-2026",
        roles: &["security"],
        capsule_keys: &[],
    },
    ApproverSpec {
        id: CAROL,
        kid: "carol-2026",
        roles: &["sre-lead"],
        capsule_keys: &[],
    },
    ApproverSpec {
        id: PLANNER,
        kid: "planner-2026",
        roles: &["sre-lead", "security"],
        capsule_keys: &[],
    },
    ApproverSpec {
        id: REL,
        kid: "rel-2026",
        roles: &["security"],
        capsule_keys: &[ES_KID],
    },
];

pub fn approvers_toml() -> String {
    APPROVERS
        .iter()
        .map(|a| {
            format!(
                "\n[[approvers]]\nid = \"{}\"\nkids = [\"{}\"]\nroles = {:?}\ncapsule_keys = {:?}\n",
                a.id, a.kid, a.roles, a.capsule_keys
            )
        })
        .collect()
}

pub fn tenants_toml() -> String {
    let armory = sha256_hex(TOOL_BYTES);
    format!(
        r#"
[[tenants]]
name = "{GOVERNED}"
keys = ["{ES_KID}", "{HS_KID}"]
environments = ["staging", "production", "fortress"]
runners = ["spiffe://acme.example/runner/*"]
armory = ["sha256:{armory}"]
host_programs = ["/bin/sh", "/bin/true"]
min_approvals = 1
index = {{ keys = ["{INDEX_KID}"], required = false }}

[[tenants.rules]]
environment = "production"
min_approvals = 2
roles = ["sre-lead", "security"]
signed_approvals = true
signer_may_approve = false
targets = ["https://auth.prod.acme.example/*"]
actions = ["http.get", "http.post"]
network = ["none"]
tier = "gvisor"

[[tenants.rules]]
environment = "fortress"
tier = "kata"

[[tenants]]
name = "{INDEXED}"
keys = ["{ES_KID}"]
environments = ["staging"]
runners = ["spiffe://acme.example/runner/*"]
armory = ["sha256:{armory}"]
host_programs = ["/bin/sh", "/bin/true"]
min_approvals = 1
index = {{ keys = ["{INDEX_KID}"], required = true }}
"#
    )
}

impl World {
    pub fn governance_policy_toml(&self) -> String {
        let base = self.policy_toml().replacen(
            "jwks = \"trusted.jwks.json\"\n",
            "jwks = \"trusted.jwks.json\"\napprovers_jwks = \"approvers.jwks.json\"\n",
            1,
        );
        // `[[approvers]]` before the tenants: after them TOML would nest nothing, but
        // the reader sees the identities first.
        let at = base.find("[[tenants]]").expect("a tenant");
        format!(
            "{}{}\n{}{}",
            &base[..at],
            approvers_toml(),
            &base[at..],
            tenants_toml()
        )
    }

    pub fn governance_policy_path(&self) -> PathBuf {
        self.path(POLICY_FILE)
    }

    pub fn governance_policy_with(
        &self,
        backend: &'static dyn verify_core::crypto::Backend,
    ) -> verify_core::Policy {
        verify_core::Policy::load(&self.governance_policy_path(), backend)
            .expect("governance policy loads")
    }

    /// A manifest of `acme-governed` in `environment` (otherwise [`World::manifest`]),
    /// with no unsigned approvals unless the environment has no rule.
    pub fn governed_manifest(&self, environment: &str) -> Value {
        let mut m = self.manifest();
        m["tenant"] = json!(GOVERNED);
        m["capsule_id"] = json!("prod-token-rotation");
        m["scope"]["environment"] = json!(environment);
        m["scope"]["targets"] = json!(["https://auth.prod.acme.example/token"]);
        m["env"] = json!({});
        if environment == "production" {
            m["approvals"] = json!([]);
        }
        m
    }

    pub fn approver_key(&self, id: &str) -> &ParsedJwk {
        &self
            .approvers
            .iter()
            .find(|(a, _)| *a == id)
            .unwrap_or_else(|| panic!("no fixture approver {id}"))
            .1
    }

    /// The manifest bytes a capsule signs, and the manifest.
    pub fn manifest_of(&self, capsule: &Path) -> (Vec<u8>, Manifest) {
        let jws = read_jws(capsule);
        let payload = jws.split('.').nth(1).expect("three parts");
        let bytes = verify_core::b64::decode(payload.as_bytes()).expect("base64url");
        let m = Manifest::parse(&bytes).expect("manifest");
        (bytes, m)
    }

    /// The approval payload `role` for `capsule`'s exact manifest bytes.
    pub fn approval_payload(&self, capsule: &Path, role: &str) -> ApprovalPayload {
        let (bytes, m) = self.manifest_of(capsule);
        let digest = Sha256Digest(self.backend.sha256_oneshot(&bytes));
        ApprovalPayload::for_manifest(&m, digest, role, self.now - 60)
    }

    /// Signs `payload` (any JSON) with approver `key`, as compact JWS.
    pub fn sign_es(&self, key: &ParsedJwk, payload: &[u8]) -> String {
        let signer = SigningKey::from_jwk(key, self.backend).expect("signing key");
        verify_core::jws::sign_compact(&key.kid, Alg::Es256, payload, &signer).expect("sign")
    }

    /// Writes `CAPSULE/approvals/NAME.jws`.
    pub fn put_approval(&self, capsule: &Path, name: &str, jws: &str) -> PathBuf {
        let dir = capsule.join(APPROVALS_DIR);
        std::fs::create_dir_all(&dir).expect("mkdir approvals");
        let path = dir.join(format!("{name}.jws"));
        std::fs::write(&path, jws).expect("write approval");
        path
    }

    /// `approver` approves `capsule` in `role` (signed with their own key).
    pub fn approve(&self, capsule: &Path, approver: &str, role: &str) -> PathBuf {
        let payload = self.approval_payload(capsule, role);
        let jws = self.sign_es(
            self.approver_key(approver),
            &serde_json::to_vec(&payload).expect("json"),
        );
        let name = approver.split('@').next().expect("local part");
        self.put_approval(capsule, &format!("{name}-{role}"), &jws)
    }

    /// A production capsule of `acme-governed`, approved by alice (sre-lead) and bob
    /// (security): admitted.
    pub fn approved_production_capsule(&self, name: &str) -> PathBuf {
        let dir = self.capsule(name, &self.governed_manifest("production"), Signer::Es256);
        self.approve(&dir, ALICE, "sre-lead");
        self.approve(&dir, BOB, "security");
        dir
    }

    /// A tenant index payload for `tenant`, listing `capsules` (id, version, digest).
    pub fn index_payload(
        &self,
        tenant: &str,
        version: u64,
        expires_at: u64,
        capsules: &[(&str, u64, String)],
    ) -> IndexPayload {
        IndexPayload {
            schema: INDEX_SCHEMA.into(),
            tenant: tenant.into(),
            version,
            issued_at: expires_at.min(self.now) - 120,
            expires_at,
            capsules: capsules
                .iter()
                .map(|(id, v, d)| verify_core::index::IndexEntry {
                    capsule_id: id.to_string(),
                    version: *v,
                    digest: d.clone(),
                })
                .collect(),
        }
    }

    /// Signs an index with `k-index` and writes it as `name`.
    pub fn index(&self, name: &str, payload: &IndexPayload) -> PathBuf {
        let jws = self.sign_es(&self.index_key, &serde_json::to_vec(payload).expect("json"));
        self.write(name, jws.as_bytes())
    }

    /// `sha256:` of a capsule's JWS.
    pub fn digest_of(&self, capsule: &Path) -> String {
        format!("sha256:{}", sha256_hex(read_jws(capsule).as_bytes()))
    }
}
