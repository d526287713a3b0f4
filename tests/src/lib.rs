//! Test fixtures shared by the library tests, the CLI tests and the benches: a
//! temporary world with real keys, a JWKS, a policy file and signed capsules.
//!
//! Everything here is written with the project's own signing code *and* checked by
//! independent code in the tests (jsonwebtoken), so a fixture cannot agree with the
//! verifier for the wrong reason.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use verify_core::crypto::{default_backend, Backend};
use verify_core::keys::{ParsedJwk, SigningKey};
use verify_core::{Alg, Policy, Sha256Digest};

pub mod governance;
pub mod negative;
pub mod netns;
pub mod trust_attacks;

/// The current time in Unix seconds. Fixtures are built around the real clock so that
/// the CLI, which has no way to pretend another time, admits them too.
pub fn now() -> u64 {
    verify_core::Clock::now_unix(&verify_core::SystemClock)
}
pub const TENANT: &str = "acme-payments";
pub const POLICY_VERSION: &str = "2025-05-06.3";
pub const RUNNER: &str = "spiffe://acme.example/runner/r1";
pub const ES_KID: &str = "k-es-2025";
pub const HS_KID: &str = "k-hs-2025";
/// A trusted key that no tenant may sign with.
pub const OTHER_KID: &str = "k-other";
pub const RUN_SH: &[u8] = b"#!/bin/sh\necho hello from the capsule\n";
pub const TOOL_BYTES: &[u8] = b"\x7fELF pretend busybox: only its digest matters here\n";

/// A temporary directory with keys, a JWKS, a policy and a place for capsules.
#[derive(Debug)]
pub struct World {
    pub dir: tempfile::TempDir,
    pub es: ParsedJwk,
    pub hs: ParsedJwk,
    pub other: ParsedJwk,
    /// The tenant-index key (`k-index`, in `trusted.jwks.json`).
    pub index_key: ParsedJwk,
    /// Approvers' keys by identity (see [`governance::APPROVERS`]).
    pub approvers: Vec<(&'static str, ParsedJwk)>,
    /// The time every fixture manifest is built around (taken once, at creation).
    pub now: u64,
    /// (capsule_id, version) -> `sha256:` of the last capsule JWS signed for it, so
    /// that a later version can name it as `parent` (lineage, issue 13).
    signed: std::sync::Mutex<std::collections::HashMap<(String, u64), String>>,
    pub backend: &'static dyn Backend,
}

/// Which key signs a fixture capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    Es256,
    Hs256,
    /// A trusted key not allowed for the tenant.
    Other,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256Digest(default_backend().sha256_oneshot(bytes)).to_hex()
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    pub fn new() -> World {
        let backend = default_backend();
        let dir = tempfile::tempdir().expect("tempdir");
        let es = ParsedJwk::generate(ES_KID, Alg::Es256, backend).expect("es key");
        let hs = ParsedJwk::generate(HS_KID, Alg::Hs256, backend).expect("hs key");
        let other = ParsedJwk::generate(OTHER_KID, Alg::Es256, backend).expect("other key");
        let index_key =
            ParsedJwk::generate(governance::INDEX_KID, Alg::Es256, backend).expect("index key");
        let approvers = governance::APPROVERS
            .iter()
            .map(|a| {
                let key = ParsedJwk::generate(a.kid, Alg::Es256, backend).expect("approver key");
                (a.id, key)
            })
            .collect();
        let world = World {
            dir,
            es,
            hs,
            other,
            index_key,
            approvers,
            now: now(),
            signed: Default::default(),
            backend,
        };
        let jwks = json!({ "keys": [world.es.to_json(false), world.hs.to_json(true), world.other.to_json(false), world.index_key.to_json(false)] });
        let approvers: Vec<Value> = world
            .approvers
            .iter()
            .map(|(_, k)| k.to_json(false))
            .collect();
        world.write_mode(
            "approvers.jwks.json",
            json!({ "keys": approvers }).to_string().as_bytes(),
            0o644,
        );
        // The JWKS holds the HS256 secret: a trust file readable by its owner only.
        world.write_mode("trusted.jwks.json", jwks.to_string().as_bytes(), 0o600);
        world.write_mode(
            "es.private.jwk.json",
            world.es.to_json(true).to_string().as_bytes(),
            0o600,
        );
        world.write_mode(
            "hs.private.jwk.json",
            world.hs.to_json(true).to_string().as_bytes(),
            0o600,
        );
        world.write_mode("policy.toml", world.policy_toml().as_bytes(), 0o644);
        world.write_mode(
            governance::POLICY_FILE,
            world.governance_policy_toml().as_bytes(),
            0o644,
        );
        world
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(&path, bytes).expect("write");
        path
    }

    /// [`World::write`], then the file's mode is exactly `mode` (trust files are
    /// refused when group or other may write them, whatever the umask).
    pub fn write_mode(&self, rel: &str, bytes: &[u8], mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.write(rel, bytes);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    pub fn policy_toml(&self) -> String {
        format!(
            r#"policy_version = "{POLICY_VERSION}"
clock_skew_s = 60

[trust]
jwks = "trusted.jwks.json"

[limits]
max_jws_bytes = 65536
max_artifacts = 16

[[tenants]]
name = "{TENANT}"
keys = ["{ES_KID}", "{HS_KID}"]
environments = ["staging"]
runners = ["spiffe://acme.example/runner/*"]
armory = ["sha256:{}"]
host_programs = ["/bin/sh", "/bin/true"]
min_approvals = 1
"#,
            sha256_hex(TOOL_BYTES)
        )
    }

    pub fn policy_path(&self) -> PathBuf {
        self.path("policy.toml")
    }

    pub fn policy(&self) -> Policy {
        self.policy_with(self.backend)
    }

    pub fn policy_with(&self, backend: &'static dyn Backend) -> Policy {
        Policy::load(&self.policy_path(), backend).expect("fixture policy loads")
    }

    /// A manifest that passes every check at `self.now` for [`RUNNER`].
    pub fn manifest(&self) -> Value {
        let now = self.now;
        json!({
            "schema": "capsule/v1",
            "capsule_id": "auth-token-issuance",
            "version": 7,
            "parent": format!("sha256:{}", "ab".repeat(32)),
            "tenant": TENANT,
            "issued_at": now - 400, "not_before": now - 400, "expires_at": now + 604_800,
            "policy_version": POLICY_VERSION,
            "author": "planner@acme.example",
            "approvals": [{"approver": "alice@acme.example", "role": "sre-lead", "approved_at": now - 300}],
            "runners": ["spiffe://acme.example/runner/*"],
            "scope": {"environment": "staging", "targets": ["https://auth.staging.acme.example/token"],
                      "actions": ["http.post"], "network": "none"},
            "limits": {"timeout_ms": 30000, "memory_mib": 256, "pids": 64},
            "entrypoint": ["/capsule/run.sh"],
            "env": {"TARGET": "https://auth.staging.acme.example/token"},
            "artifacts": [{"path": "run.sh", "sha256": sha256_hex(RUN_SH), "size": RUN_SH.len()}],
            "tools": [{"name": "busybox", "path": "tools/busybox", "sha256": sha256_hex(TOOL_BYTES), "size": TOOL_BYTES.len()}]
        })
    }

    pub fn signing_key(&self, signer: Signer) -> (&ParsedJwk, SigningKey) {
        let jwk = match signer {
            Signer::Es256 => &self.es,
            Signer::Hs256 => &self.hs,
            Signer::Other => &self.other,
        };
        (
            jwk,
            SigningKey::from_jwk(jwk, self.backend).expect("signing key"),
        )
    }

    /// Signs arbitrary payload bytes with a fixture key.
    pub fn sign(&self, payload: &[u8], signer: Signer) -> String {
        let (jwk, key) = self.signing_key(signer);
        let jws = verify_core::jws::sign_compact(&jwk.kid, jwk.alg, payload, &key).expect("sign");
        if let Ok(m) = serde_json::from_slice::<Value>(payload) {
            if let (Some(id), Some(v)) = (m["capsule_id"].as_str(), m["version"].as_u64()) {
                let digest = format!("sha256:{}", sha256_hex(jws.as_bytes()));
                self.signed
                    .lock()
                    .expect("lock")
                    .insert((id.to_string(), v), digest);
            }
        }
        jws
    }

    /// `sha256:` of the last capsule signed for `capsule_id` at `version`: the
    /// `parent` the next version names.
    pub fn signed_digest(&self, capsule_id: &str, version: u64) -> Option<String> {
        self.signed
            .lock()
            .expect("lock")
            .get(&(capsule_id.to_string(), version))
            .cloned()
    }

    /// Writes a capsule directory `name` with the standard files and `jws`.
    pub fn capsule_with_jws(&self, name: &str, jws: &[u8]) -> PathBuf {
        let dir = self.path(name);
        fs::create_dir_all(dir.join("files/tools")).expect("mkdir");
        fs::write(dir.join("files/run.sh"), RUN_SH).expect("write");
        fs::write(dir.join("files/tools/busybox"), TOOL_BYTES).expect("write");
        fs::write(dir.join("capsule.jws"), jws).expect("write");
        dir
    }

    /// Signs `manifest` and writes it as capsule `name`.
    pub fn capsule(&self, name: &str, manifest: &Value, signer: Signer) -> PathBuf {
        let jws = self.sign(manifest.to_string().as_bytes(), signer);
        self.capsule_with_jws(name, jws.as_bytes())
    }

    /// The standard valid capsule.
    pub fn good_capsule(&self, name: &str, signer: Signer) -> PathBuf {
        self.capsule(name, &self.manifest(), signer)
    }
}

impl World {
    /// A manifest (otherwise [`World::manifest`]) whose artifacts are exactly
    /// `files`, with no tools, run as `/bin/sh /capsule/run.sh`: for capsules that
    /// really run in a sandbox. `files` should include `run.sh`.
    pub fn script_manifest(&self, files: &[(&str, &[u8])]) -> Value {
        let mut m = self.manifest();
        m["artifacts"] = files
            .iter()
            .map(|(path, bytes)| json!({"path": path, "sha256": sha256_hex(bytes), "size": bytes.len()}))
            .collect();
        m["tools"] = json!([]);
        m["entrypoint"] = json!(["/bin/sh", "/capsule/run.sh"]);
        m
    }

    /// Signs `manifest` and writes capsule `name` holding exactly `files`.
    pub fn capsule_with_files(
        &self,
        name: &str,
        manifest: &Value,
        files: &[(&str, &[u8])],
        signer: Signer,
    ) -> PathBuf {
        let dir = self.path(name);
        for (path, bytes) in files {
            let target = dir.join("files").join(path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            fs::write(target, bytes).expect("write");
        }
        let jws = self.sign(manifest.to_string().as_bytes(), signer);
        fs::write(dir.join("capsule.jws"), jws).expect("write");
        dir
    }
}

/// Base64url of a JSON value (for hand-built tokens).
pub fn b64_json(v: &Value) -> String {
    verify_core::b64::encode(v.to_string().as_bytes())
}

/// Reads a capsule's JWS.
pub fn read_jws(dir: &Path) -> String {
    fs::read_to_string(dir.join("capsule.jws")).expect("read jws")
}
