//! The evidence schema: every file and event `run` writes, as types that serialize
//! exactly what is written and deserialize strictly what is read. The launcher's
//! report types ([`RuntimeFacts`], [`BundleFacts`], [`EgressReport`],
//! [`TeardownReport`], [`StagedFile`], [`StaleReport`]) are used as they are: the
//! writer and every reader share them, so there is one spelling of the format.
//!
//! Every object refuses unknown and duplicate members: a reader that skipped what it
//! does not know would let a bundle say more than it proves.

use std::fmt;

use sandbox_launcher::{
    BundleFacts, EgressReport, RuntimeFacts, StagedFile, StaleReport, TeardownReport,
};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::EvidenceError;

fn malformed(what: &str, detail: impl fmt::Display) -> EvidenceError {
    EvidenceError::Malformed {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

/// Parses one strict JSON document of ours: no duplicate member anywhere (serde
/// would keep the last one), then the typed value, which refuses unknown members.
pub(crate) fn parse_strict<T: for<'de> Deserialize<'de>>(
    what: &str,
    bytes: &[u8],
) -> Result<T, EvidenceError> {
    verify_core::json::reject_duplicate_keys(bytes).map_err(|e| malformed(what, e))?;
    verify_core::json::from_slice_strict(bytes).map_err(|e| malformed(what, e))
}

/// A member that must be present and may be `null` (serde's derive would take a
/// missing `Option` member for `null`).
pub(crate) fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
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

impl EventType {
    /// The status `GET /v1/runs/{id}` answers for a finished run.
    pub fn status(self) -> &'static str {
        match self {
            EventType::Completed => "completed",
            EventType::Failed => "failed",
            EventType::Denied => "denied",
        }
    }
}

/// What the service reads of a stored event to answer `GET /v1/runs/{id}`: whose run
/// it is and how it ended. Only these attributes, and other members are not refused
/// (the whole event is answered as stored; [`super::Bundle::check`] is the strict
/// reading).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EventHead {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub source: String,
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
    // The custody, as CloudEvents extension attributes (lowercase alphanumeric
    // names, string values); absent in events written before issue 12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    capsuledigest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policydigest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenantid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    runid: Option<String>,
    data: Value,
}

/// The chain of custody as CloudEvents extension attributes on the event head, so a
/// consumer can route and correlate without reading `data` (which an egress mode may
/// have withheld). Each is absent when unknown (a denial of unreadable bytes has no
/// capsule digest); present, it is never empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustodyAttributes {
    /// `capsuledigest`: `sha256:<hex>` of the exact JWS bytes.
    pub capsule_digest: Option<String>,
    /// `policydigest`: `sha256:<hex>` of the policy text in force.
    pub policy_digest: Option<String>,
    /// `tenantid`: the capsule's tenant.
    pub tenant_id: Option<String>,
    /// `runid`: the run (for a denial, the denial's id).
    pub run_id: Option<String>,
}

impl CustodyAttributes {
    /// The attribute names, in the order written.
    pub const ATTRIBUTES: [&'static str; 4] =
        ["capsuledigest", "policydigest", "tenantid", "runid"];
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
    /// The extension attributes.
    pub custody: CustodyAttributes,
    pub data: EventData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    /// `completed` or `failed`: the capsule was admitted (and launched, or tried to be).
    Run(EventType, Box<RunData>),
    Denied(Box<DeniedData>),
}

/// `data` of a `completed` or `failed` event ([`RunData::new`]).
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
    /// Sandboxes of a crashed earlier run that this run's start-up removed.
    pub stale_sandboxes_cleaned: Vec<StaleReport>,
    /// Where the bundle of this run is.
    pub evidence_bundle: String,
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

/// `decision.json` of a bundle, and the `--json` line of `verify`.
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
        let custody = CustodyAttributes {
            capsule_digest: env.capsuledigest,
            policy_digest: env.policydigest,
            tenant_id: env.tenantid,
            run_id: env.runid,
        };
        for (name, value) in CustodyAttributes::ATTRIBUTES.iter().zip([
            &custody.capsule_digest,
            &custody.policy_digest,
            &custody.tenant_id,
            &custody.run_id,
        ]) {
            if value.as_deref() == Some("") {
                return Err(malformed("event", format!("attribute {name} is empty")));
            }
        }
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
            custody,
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
            capsuledigest: self.custody.capsule_digest.clone(),
            policydigest: self.custody.policy_digest.clone(),
            tenantid: self.custody.tenant_id.clone(),
            runid: self.custody.run_id.clone(),
            // Plain structs of strings, numbers and booleans: serialising cannot fail.
            data: data.unwrap_or(Value::Null),
        };
        serde_json::to_value(env).unwrap_or(Value::Null)
    }
}
