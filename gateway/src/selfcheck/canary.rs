//! Canaries: capsules built inside the check and judged by the deployed policy
//! (loaded with [`crate::admission::load_policy`], sealed keys unsealed) through the
//! same [`Admission`] code path as real admissions. A signed canary is admitted; an
//! unsigned, an altered (artifact byte, payload byte), an expired, a wrongly keyed and
//! a rolled-back canary are each denied with exactly their reason code.
//!
//! What the canaries never touch: the real trust store and the real state. The
//! signing key is generated here and exists only in this process's memory; its public
//! half is added to the in-memory copy of the policy's key store, for an in-memory
//! canary tenant ([`CANARY_TENANT`], refused if the policy already has a tenant of
//! that name) that no real capsule can name, so no real tenant's rules are changed.
//! The anti-rollback state the canaries are recorded in is a new one in a temporary
//! directory, removed when the check ends.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use verify_core::crypto::Backend;
use verify_core::keys::{KeyMaterial, ParsedJwk, SigningKey};
use verify_core::policy::Tenant;
use verify_core::{Alg, Decision, HashMode, Policy, Reason, Sha256Digest};

use super::{Report, Target};
use crate::admission::{load_policy, system_clock, Admission};
use crate::sealed::SealedKeys;

/// The tenant the canaries are signed for: added to the in-memory policy only.
pub const CANARY_TENANT: &str = "selfcheck-canary";
/// Its one environment.
pub const CANARY_ENVIRONMENT: &str = "selfcheck";
const CANARY_ID: &str = "selfcheck-canary";
const RUN_SH: &[u8] = b"#!/bin/sh\necho selfcheck canary\n";

/// Why the canaries could not be set up (each is a failed `canary.setup`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CanaryError {
    #[error("loading the deployed policy: {0}")]
    Policy(#[source] crate::GatewayError),
    #[error("the deployed policy already has a tenant `{CANARY_TENANT}`: the canary tenant must not be a real one")]
    TenantTaken,
    #[error("ephemeral key: {0}")]
    Key(#[source] verify_core::keys::KeyError),
    #[error("signing a canary: {0}")]
    Sign(#[source] verify_core::jws::SignError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("throw-away state: {0}")]
    State(#[source] crate::GatewayError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CanaryError + '_ {
    move |source| CanaryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One canary: its check name and the reason it must be denied with (`None`: it
/// must be admitted).
struct Case {
    name: &'static str,
    expect: Option<Reason>,
    dir: PathBuf,
    /// Recorded when admitted (the signed canary, so the rollback case has history).
    record: bool,
}

pub fn check(target: &Target<'_>, report: &mut Report) {
    if let Err(e) = run(target, report) {
        report.fail("canary.setup", e.to_string());
    }
}

fn run(target: &Target<'_>, report: &mut Report) -> Result<(), CanaryError> {
    let mut sealed = SealedKeys::lazy(target.tcti.as_deref());
    let mut policy = load_policy(&target.policy, &mut sealed).map_err(CanaryError::Policy)?;
    drop(sealed);
    let backend = policy.backend;
    let key = Ephemeral::add_to(&mut policy, backend)?;
    let tmp = tempfile::Builder::new()
        .prefix("capsule-selfcheck-")
        .tempdir()
        .map_err(io(&std::env::temp_dir()))?;
    let clock = system_clock();
    let now = clock.now_unix();
    let factory = Factory {
        root: tmp.path(),
        key: &key,
        policy_version: policy.policy_version.clone(),
        now,
        skew: policy.clock_skew_s,
        backend,
    };
    let cases = factory.cases()?;
    let state_dir = tmp.path().join("state");
    let state = crate::state::State::open(&state_dir, true, clock.as_ref())
        .map_err(CanaryError::State)?
        .ok_or_else(|| {
            CanaryError::State(crate::GatewayError::State {
                path: state_dir.clone(),
                message: "not created".into(),
            })
        })?;
    let admission = Admission::new(policy, clock, HashMode::Auto).with_open_state(state);
    for case in &cases {
        let outcome = admission
            .admit(std::slice::from_ref(&case.dir), case.record)
            .map_err(CanaryError::State)
            .map(|mut r| r.pop());
        let decision: Result<Decision, String> = match outcome {
            Ok(Some(Ok(a))) => Ok(a.into_decision()),
            Ok(Some(Err(d))) => Ok(d),
            Ok(None) => Err("no verdict".into()),
            Err(e) => Err(e.to_string()),
        };
        judge(report, case, decision);
    }
    Ok(())
}

fn judge(report: &mut Report, case: &Case, decision: Result<Decision, String>) {
    let name = format!("canary.{}", case.name);
    let d = match decision {
        Ok(d) => d,
        Err(e) => return report.fail(name, format!("admission failed: {e}")),
    };
    match (case.expect, d.reason) {
        (None, None) => report.pass(name, format!("admitted ({})", d.detail)),
        (None, Some(r)) => {
            report.fail(name, format!("denied {r}, expected admitted: {}", d.detail))
        }
        (Some(want), None) => report.fail(name, format!("ADMITTED, expected denied {want}")),
        (Some(want), Some(got)) if want == got => report.pass(name, format!("denied {got}")),
        (Some(want), Some(got)) => {
            report.fail(name, format!("denied {got}, expected {want}: {}", d.detail))
        }
    }
}

/// The canary signing key: generated here, never written anywhere.
struct Ephemeral {
    jwk: ParsedJwk,
    signer: SigningKey,
    /// A second key the policy does not trust (the wrongly keyed canary).
    stranger: (ParsedJwk, SigningKey),
}

impl Ephemeral {
    /// Generates the keys and adds the first one's public half, for the canary
    /// tenant, to the in-memory `policy` (the files it was loaded from stay as they are).
    fn add_to(
        policy: &mut Policy,
        backend: &'static dyn Backend,
    ) -> Result<Ephemeral, CanaryError> {
        if policy.tenants.contains_key(CANARY_TENANT) {
            return Err(CanaryError::TenantTaken);
        }
        let mut nonce = [0u8; 8];
        backend
            .random(&mut nonce)
            .map_err(|e| CanaryError::Key(e.into()))?;
        let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        let kid = format!("selfcheck-canary-{hex}");
        let jwk = ParsedJwk::generate(&kid, Alg::Es256, backend).map_err(CanaryError::Key)?;
        let signer = SigningKey::from_jwk(&jwk, backend).map_err(CanaryError::Key)?;
        let stranger_jwk =
            ParsedJwk::generate(&format!("selfcheck-stranger-{hex}"), Alg::Es256, backend)
                .map_err(CanaryError::Key)?;
        let stranger_signer =
            SigningKey::from_jwk(&stranger_jwk, backend).map_err(CanaryError::Key)?;
        // The trust store gets the public point only (it refuses private material).
        let KeyMaterial::Es256 { point, .. } = &jwk.material else {
            return Err(CanaryError::Key(
                verify_core::keys::KeyError::PublicKeyCannotSign,
            ));
        };
        let public = ParsedJwk {
            kid: kid.clone(),
            alg: Alg::Es256,
            material: KeyMaterial::Es256 {
                point: *point,
                d: None,
            },
        };
        policy
            .keys
            .insert(public, backend)
            .map_err(CanaryError::Key)?;
        policy.tenants.insert(
            CANARY_TENANT.to_string(),
            Tenant {
                name: CANARY_TENANT.to_string(),
                keys: HashSet::from([kid]),
                environments: HashSet::from([CANARY_ENVIRONMENT.to_string()]),
                runners: Vec::new(),
                armory: HashSet::new(),
                host_programs: HashSet::from(["/bin/sh".to_string()]),
                min_approvals: 0,
                rules: Vec::new(),
                index: None,
                evidence: Default::default(),
                rootfs: Default::default(),
            },
        );
        Ok(Ephemeral {
            jwk,
            signer,
            stranger: (stranger_jwk, stranger_signer),
        })
    }
}

/// Writes the canary capsules under `root`.
struct Factory<'a> {
    root: &'a Path,
    key: &'a Ephemeral,
    policy_version: String,
    now: u64,
    skew: u64,
    backend: &'static dyn Backend,
}

impl Factory<'_> {
    fn manifest(&self, version: u64) -> Value {
        let now = self.now;
        let digest = Sha256Digest(self.backend.sha256_oneshot(RUN_SH));
        json!({
            "schema": "capsule/v1",
            "capsule_id": CANARY_ID,
            "version": version,
            "parent": if version > 1 { Value::String(format!("sha256:{}", "00".repeat(32))) } else { Value::Null },
            "tenant": CANARY_TENANT,
            "issued_at": now.saturating_sub(60),
            "not_before": now.saturating_sub(60),
            "expires_at": now + 3600,
            "policy_version": self.policy_version,
            "author": "selfcheck@capsule-gateway.invalid",
            "approvals": [],
            "runners": [],
            "scope": {"environment": CANARY_ENVIRONMENT, "targets": [], "actions": [], "network": "none"},
            "limits": {"timeout_ms": 10000, "memory_mib": 64, "pids": 16},
            "entrypoint": ["/bin/sh", "/capsule/run.sh"],
            "env": {},
            "artifacts": [{"path": "run.sh", "sha256": digest.to_hex(), "size": RUN_SH.len()}],
            "tools": []
        })
    }

    fn sign(&self, payload: &[u8], by: (&ParsedJwk, &SigningKey)) -> Result<String, CanaryError> {
        verify_core::jws::sign_compact(&by.0.kid, by.0.alg, payload, by.1)
            .map_err(CanaryError::Sign)
    }

    fn write(&self, name: &str, jws: &[u8], run_sh: &[u8]) -> Result<PathBuf, CanaryError> {
        let dir = self.root.join(name);
        let files = dir.join("files");
        std::fs::create_dir_all(&files).map_err(io(&files))?;
        let script = files.join("run.sh");
        std::fs::write(&script, run_sh).map_err(io(&script))?;
        let path = dir.join("capsule.jws");
        std::fs::write(&path, jws).map_err(io(&path))?;
        Ok(dir)
    }

    fn cases(&self) -> Result<Vec<Case>, CanaryError> {
        let ours = (&self.key.jwk, &self.key.signer);
        let stranger = (&self.key.stranger.0, &self.key.stranger.1);
        let good = self.manifest(2).to_string();
        let signed = self.sign(good.as_bytes(), ours)?;

        // alg `none`, no signature: what an attacker without any key sends.
        let unsigned = format!(
            "{}.{}.",
            verify_core::b64::encode(
                json!({"alg": "none", "kid": self.key.jwk.kid})
                    .to_string()
                    .as_bytes()
            ),
            verify_core::b64::encode(good.as_bytes())
        );
        // The signed JWS, one byte of its payload changed after signing.
        let altered_payload = {
            let mut parts: Vec<String> = signed.split('.').map(str::to_string).collect();
            let mut payload = good.clone().into_bytes();
            let at = good.find(CANARY_ENVIRONMENT).unwrap_or(0);
            payload[at] = b'S';
            parts[1] = verify_core::b64::encode(&payload);
            parts.join(".")
        };
        let mut altered_artifact = RUN_SH.to_vec();
        altered_artifact[RUN_SH.len() - 2] ^= 0x01;
        let mut expired = self.manifest(2);
        let long_ago = self.now.saturating_sub(self.skew + 7200);
        expired["issued_at"] = json!(long_ago);
        expired["not_before"] = json!(long_ago);
        expired["expires_at"] = json!(self.now.saturating_sub(self.skew + 600));
        let expired = self.sign(expired.to_string().as_bytes(), ours)?;
        let wrong_key = self.sign(good.as_bytes(), stranger)?;
        let older = self.sign(self.manifest(1).to_string().as_bytes(), ours)?;

        let case = |name, expect, dir, record| Case {
            name,
            expect,
            dir,
            record,
        };
        Ok(vec![
            case(
                "signed",
                None,
                self.write("signed", signed.as_bytes(), RUN_SH)?,
                true,
            ),
            case(
                "unsigned",
                Some(Reason::AlgNotAllowed),
                self.write("unsigned", unsigned.as_bytes(), RUN_SH)?,
                false,
            ),
            case(
                "altered_artifact",
                Some(Reason::DigestMismatch),
                self.write("altered-artifact", signed.as_bytes(), &altered_artifact)?,
                false,
            ),
            case(
                "altered_payload",
                Some(Reason::SignatureInvalid),
                self.write("altered-payload", altered_payload.as_bytes(), RUN_SH)?,
                false,
            ),
            case(
                "expired",
                Some(Reason::Expired),
                self.write("expired", expired.as_bytes(), RUN_SH)?,
                false,
            ),
            case(
                "wrong_key",
                Some(Reason::UnknownKid),
                self.write("wrong-key", wrong_key.as_bytes(), RUN_SH)?,
                false,
            ),
            case(
                "rollback",
                Some(Reason::Rollback),
                self.write("rollback", older.as_bytes(), RUN_SH)?,
                false,
            ),
        ])
    }
}
