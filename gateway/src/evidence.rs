//! Reading evidence back: the CloudEvent of a run (the line `run` prints, also
//! `event.json`) and the evidence bundle beside it, parsed strictly, and the links
//! from the event to the signed capsule it names.
//!
//! The writer is `cli/run.rs` (`build_event`, `write_evidence`). Everything here is
//! our own format, so every object refuses unknown and duplicate members: a reader
//! that skipped what it does not know would let a bundle say more than it proves.
//! The CloudEvents envelope is read as exactly the attributes `run` writes (no
//! extensions, `specversion` 1.0, `datacontenttype` `application/json`).
//!
//! [`Bundle::check`] walks the chain of custody backward and names the first hop
//! that does not hold: event → run id → capsule digest (of the exact `capsule.jws`)
//! → signature (by the trust store) → manifest → approvals and policy version →
//! admission decision → OCI config digest → staged files → outputs.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use sandbox_launcher::ProbeReport;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use verify_core::{Manifest, Policy, Sha256Digest};

/// The largest evidence file read (an event carries stdout and stderr, each up to
/// `run --output-cap`, 1 MiB by default, JSON-escaped).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why evidence was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not the format `run` writes (the message names the file or member).
    #[error("{what}: {detail}")]
    Malformed { what: String, detail: String },
    /// A hop of the chain of custody does not hold.
    #[error("chain of custody broken at {hop}: {detail}")]
    Link { hop: &'static str, detail: String },
}

fn malformed(what: &str, detail: impl fmt::Display) -> EvidenceError {
    EvidenceError::Malformed {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

fn link(hop: &'static str, detail: impl fmt::Display) -> EvidenceError {
    EvidenceError::Link {
        hop,
        detail: detail.to_string(),
    }
}

/// Parses one strict JSON document of ours: no duplicate member anywhere (serde
/// would keep the last one), then the typed value, which refuses unknown members.
fn parse_strict<T: for<'de> Deserialize<'de>>(
    what: &str,
    bytes: &[u8],
) -> Result<T, EvidenceError> {
    verify_core::json::reject_duplicate_keys(bytes).map_err(|e| malformed(what, e))?;
    verify_core::json::from_slice_strict(bytes).map_err(|e| malformed(what, e))
}

/// A member that must be present and may be `null` (serde's derive would take a
/// missing `Option` member for `null`).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// A member that may be absent, and when present may be `null`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The event types `run` emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "dev.capsule-gateway.run.completed")]
    Completed,
    #[serde(rename = "dev.capsule-gateway.run.failed")]
    Failed,
    #[serde(rename = "dev.capsule-gateway.run.denied")]
    Denied,
}

/// The CloudEvents v1.0 envelope, structured JSON mode, as `run` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    specversion: String,
    id: String,
    #[serde(rename = "type")]
    kind: EventType,
    source: String,
    datacontenttype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    time: String,
    data: Value,
}

/// One run event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    /// The runner's SPIFFE ID or the configured URI.
    pub source: String,
    /// `<capsule_id>@<version>`, when known.
    pub subject: Option<String>,
    /// RFC 3339, as written.
    pub time: String,
    pub data: EventData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    /// `completed` or `failed`: the capsule was admitted (and launched, or tried to be).
    Run(EventType, Box<RunData>),
    Denied(Box<DeniedData>),
}

/// `data` of a `completed` or `failed` event (`cli/run.rs` `run_data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunData {
    /// The exact JWS text.
    pub manifest_jws: String,
    pub tenant_id: String,
    pub capsule_digest: String,
    pub capsule_id: String,
    pub version: u64,
    /// `null` when the launch failed before a sandbox was set up.
    #[serde(deserialize_with = "nullable")]
    pub run_id: Option<String>,
    pub policy_version: String,
    pub approvers: Vec<String>,
    pub decision: DecisionSummary,
    #[serde(deserialize_with = "nullable")]
    pub error: Option<String>,
    pub stale_sandboxes_cleaned: Vec<StaleRecord>,
    pub evidence_bundle: String,
    // What the sandbox saw: all present when the launcher reported, else all absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_truncated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_truncated: Option<bool>,
    /// Absent: no report; `Some(None)`: timed out or interrupted.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub exit_code: Option<Option<i32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci_config_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<BundleFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_probe: Option<EgressReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teardown: Option<TeardownReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<Vec<StagedFile>>,
}

impl RunData {
    /// How many of the sandbox members are present (0 or all of them).
    fn report_members(&self) -> (usize, usize) {
        let present = [
            self.stdout.is_some(),
            self.stderr.is_some(),
            self.stdout_bytes.is_some(),
            self.stderr_bytes.is_some(),
            self.stdout_truncated.is_some(),
            self.stderr_truncated.is_some(),
            self.exit_code.is_some(),
            self.timed_out.is_some(),
            self.interrupted.is_some(),
            self.started_at_ms.is_some(),
            self.duration_ms.is_some(),
            self.runtime.is_some(),
            self.oci_config_sha256.is_some(),
            self.sandbox.is_some(),
            self.egress_probe.is_some(),
            self.teardown.is_some(),
            self.staged.is_some(),
        ];
        (present.iter().filter(|p| **p).count(), present.len())
    }
}

/// The admission decision as an event summarises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionSummary {
    pub verdict: String,
    pub detail: String,
    #[serde(deserialize_with = "nullable")]
    pub kid: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub alg: Option<String>,
}

/// `data` of a `denied` event: the decision line of `--json`, and what was presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeniedData {
    pub capsule: String,
    pub verdict: String,
    #[serde(deserialize_with = "nullable")]
    pub reason: Option<String>,
    pub detail: String,
    #[serde(deserialize_with = "nullable")]
    pub digest: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub capsule_id: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub version: Option<u64>,
    #[serde(deserialize_with = "nullable")]
    pub tenant: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub kid: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub alg: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub tenant_id: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub capsule_digest: Option<String>,
    /// Always `null` now: a denial carries digests, never the presented bytes (the
    /// member stays so that older bundles still parse).
    #[serde(deserialize_with = "nullable")]
    pub manifest_jws: Option<String>,
    pub launched: bool,
}

/// `decision.json` of a bundle (`output.rs` `decision_json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    pub capsule: String,
    pub verdict: String,
    #[serde(deserialize_with = "nullable")]
    pub reason: Option<String>,
    pub detail: String,
    #[serde(deserialize_with = "nullable")]
    pub digest: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub capsule_id: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub version: Option<u64>,
    #[serde(deserialize_with = "nullable")]
    pub tenant: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub kid: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub alg: Option<String>,
}

impl DecisionRecord {
    pub fn parse(bytes: &[u8]) -> Result<DecisionRecord, EvidenceError> {
        parse_strict("decision.json", bytes)
    }
}

/// `sandbox.json` of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    pub run_id: String,
    pub container_id: String,
    pub runtime: RuntimeFacts,
    pub oci_config_sha256: String,
    pub bundle: BundleFacts,
    pub egress_probe: EgressReport,
    pub teardown: TeardownReport,
    pub staged: Vec<StagedFile>,
    #[serde(deserialize_with = "nullable")]
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub interrupted: bool,
    pub duration_ms: u64,
}

impl SandboxRecord {
    pub fn parse(bytes: &[u8]) -> Result<SandboxRecord, EvidenceError> {
        parse_strict("sandbox.json", bytes)
    }
}

// Readers of sandbox-launcher's report types (which are written, never read, there).

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFacts {
    pub kind: String,
    #[serde(deserialize_with = "nullable")]
    pub platform: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub runtime_type: Option<String>,
    pub version: String,
    pub network: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFacts {
    pub oci_config_sha256: String,
    pub root_readonly: bool,
    pub uid: u32,
    pub gid: u32,
    pub tmp_size_mib: u64,
    pub memory_limit_bytes: i64,
    pub pids_limit: u64,
    pub network: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressReport {
    pub target: String,
    #[serde(deserialize_with = "nullable")]
    pub probe: Option<ProbeReport>,
    pub listener_accepted: bool,
    pub only_loopback: bool,
    pub blocked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeardownReport {
    pub ok: bool,
    pub checks: Vec<TeardownCheck>,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeardownCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedFile {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaleRecord {
    pub run_id: String,
    pub container_id: String,
    pub teardown: TeardownReport,
}

impl Event {
    /// Parses one event strictly: the envelope `run` writes and the typed `data` of
    /// its type.
    pub fn parse(bytes: &[u8]) -> Result<Event, EvidenceError> {
        let env: Envelope = parse_strict("event", bytes)?;
        if env.specversion != "1.0" {
            return Err(malformed("event specversion", "must be 1.0"));
        }
        if env.datacontenttype != "application/json" {
            return Err(malformed(
                "event datacontenttype",
                "must be application/json",
            ));
        }
        if env.id.is_empty() || env.source.is_empty() {
            return Err(malformed("event", "id and source must not be empty"));
        }
        chrono::DateTime::parse_from_rfc3339(&env.time).map_err(|e| malformed("event time", e))?;
        let data = match env.kind {
            EventType::Denied => EventData::Denied(Box::new(
                serde_json::from_value(env.data).map_err(|e| malformed("event data", e))?,
            )),
            kind => {
                let d: RunData =
                    serde_json::from_value(env.data).map_err(|e| malformed("event data", e))?;
                match d.report_members() {
                    (0, _) => {}
                    (n, all) if n == all => {}
                    (n, all) => {
                        return Err(malformed(
                            "event data",
                            format!("{n} of the {all} sandbox members: all or none"),
                        ))
                    }
                }
                EventData::Run(kind, Box::new(d))
            }
        };
        Ok(Event {
            id: env.id,
            source: env.source,
            subject: env.subject,
            time: env.time,
            data,
        })
    }

    pub fn kind(&self) -> EventType {
        match &self.data {
            EventData::Run(kind, _) => *kind,
            EventData::Denied(_) => EventType::Denied,
        }
    }

    /// The event as JSON, in the form `run` writes.
    pub fn to_json(&self) -> Value {
        let data = match &self.data {
            EventData::Run(_, d) => serde_json::to_value(d),
            EventData::Denied(d) => serde_json::to_value(d),
        };
        let env = Envelope {
            specversion: "1.0".into(),
            id: self.id.clone(),
            kind: self.kind(),
            source: self.source.clone(),
            datacontenttype: "application/json".into(),
            subject: self.subject.clone(),
            time: self.time.clone(),
            // Plain structs of strings, numbers and booleans: serialising cannot fail.
            data: data.unwrap_or(Value::Null),
        };
        serde_json::to_value(env).unwrap_or(Value::Null)
    }
}

/// An evidence bundle directory, read.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub event: Event,
    pub capsule_jws: Vec<u8>,
    pub decision: DecisionRecord,
    /// `sandbox.json`, `oci-config.json`, `stdout`, `stderr`: present when the
    /// launcher reported (all four or none).
    pub sandbox: Option<SandboxRecord>,
    pub oci_config: Option<Vec<u8>>,
    pub stdout: Option<Vec<u8>>,
    pub stderr: Option<Vec<u8>>,
}

/// What a checked bundle proves.
#[derive(Debug, Clone)]
pub struct Links {
    pub run_id: String,
    pub capsule_digest: Sha256Digest,
    /// The manifest as signed, by the key `kid` of the trust store.
    pub manifest: Manifest,
    pub kid: String,
}

fn read_capped(path: &Path) -> Result<Option<Vec<u8>>, EvidenceError> {
    // A bundle under check is untrusted: a symlink or a FIFO planted in it is
    // refused on an O_PATH descriptor, never opened (the class of issue 10).
    use verify_core::digest::{open_regular_nofollow, Access, OpenError};
    let f = match open_regular_nofollow(path, Access::Read) {
        Ok((f, _)) => f,
        Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(EvidenceError::Io {
                path: path.into(),
                source: e.into(),
            })
        }
    };
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| EvidenceError::Io {
            path: path.into(),
            source: e,
        })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(malformed(
            &path.display().to_string(),
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(Some(bytes))
}

fn required(dir: &Path, name: &str) -> Result<Vec<u8>, EvidenceError> {
    read_capped(&dir.join(name))?.ok_or_else(|| malformed(name, "missing from the bundle"))
}

fn digest_of(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest(verify_core::crypto::default_backend().sha256_oneshot(bytes))
}

fn same<T: PartialEq + fmt::Debug>(
    hop: &'static str,
    what: &str,
    a: &T,
    b: &T,
) -> Result<(), EvidenceError> {
    if a == b {
        Ok(())
    } else {
        Err(link(hop, format!("{what}: {a:?} != {b:?}")))
    }
}

impl Bundle {
    /// Reads `EVIDENCE/<run id>/` as `run` writes it.
    pub fn read(dir: &Path) -> Result<Bundle, EvidenceError> {
        let event = Event::parse(&required(dir, "event.json")?)?;
        let decision = DecisionRecord::parse(&required(dir, "decision.json")?)?;
        let capsule_jws = required(dir, "capsule.jws")?;
        let sandbox = read_capped(&dir.join("sandbox.json"))?
            .map(|b| SandboxRecord::parse(&b))
            .transpose()?;
        let oci_config = read_capped(&dir.join("oci-config.json"))?;
        let stdout = read_capped(&dir.join("stdout"))?;
        let stderr = read_capped(&dir.join("stderr"))?;
        let parts = [
            sandbox.is_some(),
            oci_config.is_some(),
            stdout.is_some(),
            stderr.is_some(),
        ];
        if parts.iter().any(|p| *p) && !parts.iter().all(|p| *p) {
            return Err(malformed(
                &dir.display().to_string(),
                "sandbox.json, oci-config.json, stdout and stderr: all or none",
            ));
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            event,
            capsule_jws,
            decision,
            sandbox,
            oci_config,
            stdout,
            stderr,
        })
    }

    /// Walks the chain of custody backward (see the module docs); `policy` supplies
    /// the trust store that must verify the capsule's signature. The policy version
    /// the event claims is checked against the signed manifest, not against `policy`
    /// (which may have moved on since the run).
    pub fn check(&self, policy: &Policy) -> Result<Links, EvidenceError> {
        let EventData::Run(_, d) = &self.event.data else {
            return Err(link("event", "a denied event has no run to vouch for"));
        };
        // Event → run id: the bundle is named after the event, and the sandbox's run
        // is the event's.
        let dir_name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        same(
            "run_id",
            "bundle directory",
            &dir_name.as_deref(),
            &Some(self.event.id.as_str()),
        )?;
        if let Some(run_id) = &d.run_id {
            same("run_id", "data.run_id", run_id, &self.event.id)?;
        }

        // Run → capsule digest: of the exact JWS bytes kept in the bundle.
        let digest = digest_of(&self.capsule_jws);
        same(
            "capsule_digest",
            "sha256 of capsule.jws",
            &digest.to_string(),
            &d.capsule_digest,
        )?;
        same(
            "capsule_digest",
            "decision.json digest",
            &self.decision.digest,
            &Some(d.capsule_digest.clone()),
        )?;
        same(
            "manifest_jws",
            "data.manifest_jws",
            &d.manifest_jws.as_bytes(),
            &self.capsule_jws.as_slice(),
        )?;

        // Capsule → manifest: only through a signature the trust store verifies.
        let verified =
            verify_core::jws::verify(&self.capsule_jws, &policy.keys, policy.limits.max_jws_bytes)
                .map_err(|f| link("signature", format!("{}: {}", f.reason, f.detail)))?;
        let m = Manifest::parse(&verified.payload).map_err(|e| link("manifest", e))?;
        same("manifest", "capsule_id", &d.capsule_id, &m.capsule_id)?;
        same("manifest", "version", &d.version, &m.version)?;
        same("manifest", "tenant", &d.tenant_id, &m.tenant)?;
        same(
            "manifest",
            "subject",
            &self.event.subject,
            &Some(format!("{}@{}", m.capsule_id, m.version)),
        )?;

        // Manifest → approvals and the policy version it was admitted under.
        let approvers: Vec<&str> = m.approvals.iter().map(|a| a.approver.as_str()).collect();
        same(
            "approvals",
            "approvers",
            &d.approvers.iter().map(String::as_str).collect::<Vec<_>>(),
            &approvers,
        )?;
        same(
            "policy_version",
            "policy_version",
            &d.policy_version,
            &m.policy_version,
        )?;

        // The admission decision that let it run.
        let r = &self.decision;
        same("decision", "verdict", &r.verdict.as_str(), &"admit")?;
        same(
            "decision",
            "event verdict",
            &d.decision.verdict.as_str(),
            &"admit",
        )?;
        same("decision", "kid", &r.kid, &Some(verified.kid.clone()))?;
        same(
            "decision",
            "event kid",
            &d.decision.kid,
            &Some(verified.kid.clone()),
        )?;
        same(
            "decision",
            "alg",
            &r.alg.as_deref(),
            &Some(verified.alg.as_str()),
        )?;
        same(
            "decision",
            "capsule_id",
            &r.capsule_id,
            &Some(m.capsule_id.clone()),
        )?;
        same("decision", "version", &r.version, &Some(m.version))?;
        same("decision", "tenant", &r.tenant, &Some(m.tenant.clone()))?;

        // The sandbox: its OCI config, the files it was given and what it printed.
        match (&self.sandbox, &self.oci_config, &d.oci_config_sha256) {
            (None, None, None) => {}
            (Some(s), Some(config), Some(claimed)) => {
                same("sandbox", "sandbox.json run_id", &s.run_id, &self.event.id)?;
                let actual = digest_of(config).to_string();
                same(
                    "oci_config",
                    "sha256 of oci-config.json",
                    &actual,
                    &s.oci_config_sha256,
                )?;
                same("oci_config", "data.oci_config_sha256", claimed, &actual)?;
                same(
                    "oci_config",
                    "sandbox.json bundle",
                    &s.bundle.oci_config_sha256,
                    &actual,
                )?;
                same(
                    "oci_config",
                    "data.sandbox",
                    &d.sandbox.as_ref().map(|b| &b.oci_config_sha256),
                    &Some(&actual),
                )?;
                same(
                    "sandbox",
                    "egress_probe",
                    &d.egress_probe.as_ref(),
                    &Some(&s.egress_probe),
                )?;
                same(
                    "sandbox",
                    "teardown",
                    &d.teardown.as_ref(),
                    &Some(&s.teardown),
                )?;
                same("sandbox", "exit_code", &d.exit_code, &Some(s.exit_code))?;
                let mut staged: Vec<(&str, &str, u64)> = s
                    .staged
                    .iter()
                    .map(|f| (f.path.as_str(), f.sha256.as_str(), f.size))
                    .collect();
                // The manifest may spell a digest either way; staged files are canonical.
                let canonical = |d: &str| {
                    verify_core::Sha256Digest::parse(d)
                        .map_or_else(|| d.to_string(), |d| d.to_string())
                };
                let mut named: Vec<(&str, String, u64)> = m
                    .artifacts
                    .iter()
                    .map(|a| (a.path.as_str(), canonical(&a.sha256), a.size))
                    .chain(
                        m.tools
                            .iter()
                            .map(|t| (t.path.as_str(), canonical(&t.sha256), t.size)),
                    )
                    .collect();
                staged.sort();
                named.sort();
                let named: Vec<(&str, &str, u64)> =
                    named.iter().map(|(p, h, s)| (*p, h.as_str(), *s)).collect();
                same(
                    "staged",
                    "staged files against the manifest",
                    &staged,
                    &named,
                )?;
                same(
                    "staged",
                    "data.staged",
                    &d.staged.as_ref(),
                    &Some(&s.staged),
                )?;
                let text = |b: &Option<Vec<u8>>| {
                    b.as_deref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                };
                same("outputs", "stdout", &d.stdout, &text(&self.stdout))?;
                same("outputs", "stderr", &d.stderr, &text(&self.stderr))?;
            }
            _ => {
                return Err(link(
                    "sandbox",
                    "the event and the bundle disagree on whether the sandbox reported",
                ))
            }
        }
        Ok(Links {
            run_id: self.event.id.clone(),
            capsule_digest: digest,
            manifest: m,
            kid: verified.kid,
        })
    }
}
