//! The chain of custody of a bundle, walked backward one hop at a time. Each hop is
//! one function that either holds or names itself ([`Hop`]) in the refusal; the
//! first hop that does not hold ends the walk.

use std::fmt;

use verify_core::approvals::ApprovalPayload;
use verify_core::jws::VerifiedJws as Verified;
use verify_core::keys::KeyStore;
use verify_core::{Manifest, Policy, Sha256Digest};

use super::index::Index;
use super::read::Bundle;
use super::schema::{EventData, RunData, SandboxRecord};
use super::EvidenceError;

/// A hop of the chain of custody, in the order [`Bundle::check`] walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hop {
    /// An export's `export.json` is signed by the bundle's custody signer, names the
    /// index's digest, and accounts for every file (`evidence verify` on an export).
    Export,
    /// `index.sig.json` is a custody signature over the exact `index.json` (by the
    /// expected TPM identity key, when one is given); `evidence verify` only.
    IndexSignature,
    /// The event is a run's (a denial vouches for no run).
    Event,
    /// The bundle directory, the event's id, `data.run_id` and `sandbox.json` agree.
    RunId,
    /// Every file of the bundle is in the signed index with its sha256 and size, and
    /// every file it lists is there; the index names this run, capsule and tenant
    /// (`evidence verify` only).
    Index,
    /// The sha256 of `capsule.jws` is the one the event and the decision name.
    CapsuleDigest,
    /// The event's `manifest_jws` is the bytes of `capsule.jws`.
    ManifestJws,
    /// `capsule.jws` verifies against the trust store.
    Signature,
    /// Id, version, tenant and subject are the signed manifest's.
    Manifest,
    /// The approvers the event names are the manifest's, and each signed approval
    /// kept in the bundle verifies and names this manifest.
    Approvals,
    /// The version the manifest was admitted under; with an index, also the policy's
    /// own version and a well-formed digest of its text.
    PolicyVersion,
    /// An admission, by the key and algorithm that verified.
    Decision,
    /// The event and the bundle agree on what the sandbox reported: whether it did,
    /// and its egress probe, teardown and exit code.
    Sandbox,
    /// The sha256 of `oci-config.json` is the one `sandbox.json` and the event record.
    OciConfig,
    /// Every staged file is a manifest file with its size and digest.
    Staged,
    /// `stdout` and `stderr` are the event's.
    Outputs,
}

impl Hop {
    /// Every hop, in the order `evidence verify` walks them: the signature and the
    /// index first, since nothing else of the bundle is read before its bytes are
    /// vouched for.
    pub const ALL: [Hop; 16] = [
        Hop::Export,
        Hop::IndexSignature,
        Hop::Index,
        Hop::Event,
        Hop::RunId,
        Hop::CapsuleDigest,
        Hop::ManifestJws,
        Hop::Signature,
        Hop::Manifest,
        Hop::Approvals,
        Hop::PolicyVersion,
        Hop::Decision,
        Hop::Sandbox,
        Hop::OciConfig,
        Hop::Staged,
        Hop::Outputs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Hop::Export => "export",
            Hop::IndexSignature => "index_signature",
            Hop::Event => "event",
            Hop::RunId => "run_id",
            Hop::Index => "index",
            Hop::CapsuleDigest => "capsule_digest",
            Hop::ManifestJws => "manifest_jws",
            Hop::Signature => "signature",
            Hop::Manifest => "manifest",
            Hop::Approvals => "approvals",
            Hop::PolicyVersion => "policy_version",
            Hop::Decision => "decision",
            Hop::Sandbox => "sandbox",
            Hop::OciConfig => "oci_config",
            Hop::Staged => "staged",
            Hop::Outputs => "outputs",
        }
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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

/// The keys a walk verifies signatures with.
#[derive(Debug, Clone, Copy)]
pub struct Trust<'a> {
    /// Must verify `capsule.jws`; `Err` says why there are none (an HS256 snapshot
    /// holds no secret).
    pub keys: Result<&'a KeyStore, &'a str>,
    /// Must verify it too (`evidence verify --trust`).
    pub also: Option<&'a KeyStore>,
    /// Verify `approvals/*.jws`.
    pub approvers: &'a KeyStore,
    pub max_jws_bytes: usize,
}

impl<'a> Trust<'a> {
    /// The trust store of `policy`, as `Bundle::check` uses it.
    pub fn of_policy(policy: &'a Policy) -> Trust<'a> {
        Trust {
            keys: Ok(&policy.keys),
            also: None,
            approvers: &policy.approvers.keys,
            max_jws_bytes: policy.limits.max_jws_bytes,
        }
    }
}

/// What a walk compares besides the bundle itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expect<'a> {
    /// The bundle's signed index, once its signature and files held.
    pub index: Option<&'a Index>,
    /// The directory must be named after the run (false for an export, whose
    /// directory is the exporter's choice).
    pub dir_name: bool,
}

pub(crate) fn link(hop: Hop, detail: impl fmt::Display) -> EvidenceError {
    EvidenceError::Link {
        hop,
        detail: detail.to_string(),
    }
}

fn same<T: PartialEq + fmt::Debug>(
    hop: Hop,
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

pub(crate) fn digest_of(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest(verify_core::crypto::default_backend().sha256_oneshot(bytes))
}

/// What the launcher reported, as kept in the bundle (all present or all absent).
struct SandboxFiles<'a> {
    record: &'a SandboxRecord,
    oci_config: &'a [u8],
    claimed_oci_config: &'a str,
}

impl Bundle {
    /// Walks the chain of custody backward (see [`Hop`]); `policy` supplies the trust
    /// store that must verify the capsule's signature. The policy version the event
    /// claims is checked against the signed manifest, not against `policy` (which
    /// may have moved on since the run).
    pub fn check(&self, policy: &Policy) -> Result<Links, EvidenceError> {
        let expect = Expect {
            index: None,
            dir_name: true,
        };
        self.walk(&Trust::of_policy(policy), expect, &mut Vec::new())
    }

    /// The walk itself: each hop that holds is pushed onto `passed` (hops that do not
    /// apply, such as the sandbox's of a run that never started, are not).
    pub(crate) fn walk(
        &self,
        trust: &Trust<'_>,
        expect: Expect<'_>,
        passed: &mut Vec<Hop>,
    ) -> Result<Links, EvidenceError> {
        let run = self.run_event()?;
        passed.push(Hop::Event);
        self.check_run_id(run, expect)?;
        passed.push(Hop::RunId);
        let digest = self.check_capsule_digest(run, expect.index)?;
        passed.extend([Hop::CapsuleDigest, Hop::ManifestJws]);
        let verified = self.check_signature(trust, expect.index)?;
        passed.push(Hop::Signature);
        let manifest = self.check_manifest(run, &verified, expect.index)?;
        passed.push(Hop::Manifest);
        self.check_approvals(run, &manifest, &verified, trust, expect.index)?;
        passed.push(Hop::Approvals);
        check_policy_version(run, &manifest, expect.index)?;
        passed.push(Hop::PolicyVersion);
        self.check_decision(run, &manifest, &verified)?;
        passed.push(Hop::Decision);
        if let Some(sandbox) = self.sandbox_files(run)? {
            check_oci_config(run, &sandbox)?;
            passed.push(Hop::OciConfig);
            check_staged(run, sandbox.record, &manifest)?;
            passed.push(Hop::Staged);
            self.check_outputs(run)?;
            passed.push(Hop::Outputs);
            check_probe_and_teardown(run, sandbox.record)?;
            passed.push(Hop::Sandbox);
        }
        Ok(Links {
            run_id: self.event.id.clone(),
            capsule_digest: digest,
            manifest,
            kid: verified.kid,
        })
    }

    /// Hop [`Hop::Event`].
    fn run_event(&self) -> Result<&RunData, EvidenceError> {
        match &self.event.data {
            EventData::Run(_, d) => Ok(d),
            EventData::Denied(_) => Err(link(Hop::Event, "a denied event has no run to vouch for")),
        }
    }

    /// Hop [`Hop::RunId`]: the bundle is named after the event, and the sandbox's run
    /// is the event's.
    fn check_run_id(&self, d: &RunData, expect: Expect<'_>) -> Result<(), EvidenceError> {
        let id = &self.event.id;
        if expect.dir_name {
            let dir_name = self
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            same(
                Hop::RunId,
                "bundle directory",
                &dir_name.as_deref(),
                &Some(id.as_str()),
            )?;
        }
        if let Some(index) = expect.index {
            same(Hop::RunId, "index.json run_id", &index.run_id, id)?;
        }
        if let Some(run_id) = &d.run_id {
            same(Hop::RunId, "data.run_id", run_id, id)?;
        }
        if let Some(s) = &self.sandbox {
            same(Hop::RunId, "sandbox.json run_id", &s.run_id, id)?;
        }
        if let Some(attr) = &self.event.custody.run_id {
            same(Hop::RunId, "runid attribute", attr, id)?;
        }
        Ok(())
    }

    /// Hops [`Hop::CapsuleDigest`] and [`Hop::ManifestJws`]: of the exact JWS bytes
    /// kept in the bundle.
    fn check_capsule_digest(
        &self,
        d: &RunData,
        index: Option<&Index>,
    ) -> Result<Sha256Digest, EvidenceError> {
        let digest = digest_of(&self.capsule_jws);
        if let Some(index) = index {
            same(
                Hop::CapsuleDigest,
                "index.json capsule_digest",
                &index.capsule_digest,
                &Some(digest.to_string()),
            )?;
        }
        same(
            Hop::CapsuleDigest,
            "sha256 of capsule.jws",
            &digest.to_string(),
            &d.capsule_digest,
        )?;
        same(
            Hop::CapsuleDigest,
            "decision.json digest",
            &self.decision.digest,
            &Some(d.capsule_digest.clone()),
        )?;
        same(
            Hop::ManifestJws,
            "data.manifest_jws",
            &d.manifest_jws.as_bytes(),
            &self.capsule_jws.as_slice(),
        )?;
        Ok(digest)
    }

    /// Hop [`Hop::Signature`]: the manifest is reached only through a signature the
    /// trust store verifies (a forged capsule with every digest updated fails here).
    fn check_signature(
        &self,
        trust: &Trust<'_>,
        index: Option<&Index>,
    ) -> Result<Verified, EvidenceError> {
        let keys = trust.keys.map_err(|why| link(Hop::Signature, why))?;
        let verified = verify_core::jws::verify(&self.capsule_jws, keys, trust.max_jws_bytes)
            .map_err(|f| link(Hop::Signature, format!("{}: {}", f.reason, f.detail)))?;
        if let Some(also) = trust.also {
            verify_core::jws::verify(&self.capsule_jws, also, trust.max_jws_bytes).map_err(
                |f| {
                    link(
                        Hop::Signature,
                        format!("--trust: {}: {}", f.reason, f.detail),
                    )
                },
            )?;
        }
        if let Some(index) = index {
            same(
                Hop::Signature,
                "index.json trust_snapshot.capsule_key kid",
                &index.trust_snapshot.capsule_key.as_ref().map(|k| &k.kid),
                &Some(&verified.kid),
            )?;
        }
        Ok(verified)
    }

    /// Hop [`Hop::Manifest`].
    fn check_manifest(
        &self,
        d: &RunData,
        verified: &Verified,
        index: Option<&Index>,
    ) -> Result<Manifest, EvidenceError> {
        let m = Manifest::parse(&verified.payload).map_err(|e| link(Hop::Manifest, e))?;
        if let Some(index) = index {
            same(
                Hop::Manifest,
                "index.json tenant_id",
                &index.tenant_id,
                &Some(m.tenant.clone()),
            )?;
        }
        same(Hop::Manifest, "capsule_id", &d.capsule_id, &m.capsule_id)?;
        same(Hop::Manifest, "version", &d.version, &m.version)?;
        same(Hop::Manifest, "tenant", &d.tenant_id, &m.tenant)?;
        // The envelope's custody attributes (after the signature, so a forgery that
        // rewrote every digest is named at the signature first).
        if let Some(attr) = &self.event.custody.tenant_id {
            same(Hop::Manifest, "tenantid attribute", attr, &m.tenant)?;
        }
        if let Some(attr) = &self.event.custody.capsule_digest {
            same(
                Hop::CapsuleDigest,
                "capsuledigest attribute",
                attr,
                &d.capsule_digest,
            )?;
        }
        same(
            Hop::Manifest,
            "subject",
            &self.event.subject,
            &Some(format!("{}@{}", m.capsule_id, m.version)),
        )?;
        Ok(m)
    }

    /// Hop [`Hop::Decision`]: the admission that let it run.
    fn check_decision(
        &self,
        d: &RunData,
        m: &Manifest,
        verified: &Verified,
    ) -> Result<(), EvidenceError> {
        let r = &self.decision;
        let hop = Hop::Decision;
        same(hop, "verdict", &r.verdict.as_str(), &"admit")?;
        same(hop, "event verdict", &d.decision.verdict.as_str(), &"admit")?;
        same(hop, "kid", &r.kid, &Some(verified.kid.clone()))?;
        same(
            hop,
            "event kid",
            &d.decision.kid,
            &Some(verified.kid.clone()),
        )?;
        same(hop, "alg", &r.alg.as_deref(), &Some(verified.alg.as_str()))?;
        same(
            hop,
            "capsule_id",
            &r.capsule_id,
            &Some(m.capsule_id.clone()),
        )?;
        same(hop, "version", &r.version, &Some(m.version))?;
        same(hop, "tenant", &r.tenant, &Some(m.tenant.clone()))
    }

    /// Hop [`Hop::Sandbox`], first half: the event and the bundle agree on whether
    /// the sandbox reported.
    fn sandbox_files<'a>(
        &'a self,
        d: &'a RunData,
    ) -> Result<Option<SandboxFiles<'a>>, EvidenceError> {
        match (&self.sandbox, &self.oci_config, &d.oci_config_sha256) {
            (None, None, None) => Ok(None),
            (Some(record), Some(oci_config), Some(claimed)) => Ok(Some(SandboxFiles {
                record,
                oci_config,
                claimed_oci_config: claimed,
            })),
            _ => Err(link(
                Hop::Sandbox,
                "the event and the bundle disagree on whether the sandbox reported",
            )),
        }
    }

    /// Hop [`Hop::Outputs`]: what the capsule printed.
    fn check_outputs(&self, d: &RunData) -> Result<(), EvidenceError> {
        let text = |b: &Option<Vec<u8>>| {
            b.as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        same(Hop::Outputs, "stdout", &d.stdout, &text(&self.stdout))?;
        same(Hop::Outputs, "stderr", &d.stderr, &text(&self.stderr))
    }
}

impl Bundle {
    /// Hop [`Hop::Approvals`]: as the manifest says, and each signed approval kept
    /// in the bundle verifies (by the approvers' keys: the snapshot's, with an index)
    /// and names exactly this manifest; with an index, its snapshot lists exactly
    /// their keys.
    fn check_approvals(
        &self,
        d: &RunData,
        m: &Manifest,
        verified: &Verified,
        trust: &Trust<'_>,
        index: Option<&Index>,
    ) -> Result<(), EvidenceError> {
        let hop = Hop::Approvals;
        let approvers: Vec<&str> = m.approvals.iter().map(|a| a.approver.as_str()).collect();
        same(
            hop,
            "approvers",
            &d.approvers.iter().map(String::as_str).collect::<Vec<_>>(),
            &approvers,
        )?;
        let manifest_sha256 = digest_of(&verified.payload).to_string();
        let mut kids = Vec::new();
        for (name, jws) in &self.approvals {
            let at = |e: &dyn fmt::Display| link(hop, format!("approvals/{name}: {e}"));
            let v = verify_core::jws::verify(jws, trust.approvers, trust.max_jws_bytes)
                .map_err(|f| at(&format!("{}: {}", f.reason, f.detail)))?;
            let p: ApprovalPayload =
                verify_core::json::from_slice_strict(&v.payload).map_err(|e| at(&e))?;
            let names = (&p.capsule_id, p.version, &p.tenant, &p.manifest_sha256);
            if names != (&m.capsule_id, m.version, &m.tenant, &manifest_sha256) {
                return Err(at(&"it approves another manifest"));
            }
            kids.push(v.kid);
        }
        if let Some(index) = index {
            let listed: Vec<&String> = index
                .trust_snapshot
                .approvers
                .iter()
                .map(|k| &k.kid)
                .collect();
            same(
                hop,
                "index.json trust_snapshot.approvers",
                &listed,
                &kids.iter().collect::<Vec<_>>(),
            )?;
        }
        Ok(())
    }
}

/// Hop [`Hop::PolicyVersion`]: the version the manifest was admitted under (the
/// admission requires it to be the policy's own).
fn check_policy_version(
    d: &RunData,
    m: &Manifest,
    index: Option<&Index>,
) -> Result<(), EvidenceError> {
    let hop = Hop::PolicyVersion;
    same(hop, "policy_version", &d.policy_version, &m.policy_version)?;
    if let Some(index) = index {
        same(
            hop,
            "index.json policy_version",
            &index.policy_version,
            &m.policy_version,
        )?;
        for (what, digest) in [
            ("policy_sha256", &index.policy_sha256),
            ("trust_store_sha256", &index.trust_store_sha256),
        ] {
            if Sha256Digest::parse(digest).is_none() {
                return Err(link(hop, format!("index.json {what} is not a digest")));
            }
        }
    }
    Ok(())
}

/// Hop [`Hop::OciConfig`]: the config the sandbox ran with is the one recorded.
fn check_oci_config(d: &RunData, s: &SandboxFiles<'_>) -> Result<(), EvidenceError> {
    let actual = digest_of(s.oci_config).to_string();
    let hop = Hop::OciConfig;
    same(
        hop,
        "sha256 of oci-config.json",
        &actual,
        &s.record.oci_config_sha256,
    )?;
    same(
        hop,
        "data.oci_config_sha256",
        &s.claimed_oci_config,
        &actual.as_str(),
    )?;
    same(
        hop,
        "sandbox.json bundle",
        &s.record.bundle.oci_config_sha256,
        &actual,
    )?;
    same(
        hop,
        "data.sandbox",
        &d.sandbox.as_ref().map(|b| &b.oci_config_sha256),
        &Some(&actual),
    )
}

/// Hop [`Hop::Staged`]: the files the sandbox was given are the manifest's.
fn check_staged(d: &RunData, s: &SandboxRecord, m: &Manifest) -> Result<(), EvidenceError> {
    let mut staged: Vec<(&str, &str, u64)> = s
        .staged
        .iter()
        .map(|f| (f.path.as_str(), f.sha256.as_str(), f.size))
        .collect();
    // The manifest may spell a digest either way; staged files are canonical.
    let canonical =
        |d: &str| Sha256Digest::parse(d).map_or_else(|| d.to_string(), |d| d.to_string());
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
        Hop::Staged,
        "staged files against the manifest",
        &staged,
        &named,
    )?;
    same(
        Hop::Staged,
        "data.staged",
        &d.staged.as_ref(),
        &Some(&s.staged),
    )
}

/// Hop [`Hop::Sandbox`], second half: the egress probe, the teardown and the exit
/// code the event reports are the sandbox's.
fn check_probe_and_teardown(d: &RunData, s: &SandboxRecord) -> Result<(), EvidenceError> {
    let hop = Hop::Sandbox;
    same(
        hop,
        "egress_probe",
        &d.egress_probe.as_ref(),
        &Some(&s.egress_probe),
    )?;
    same(hop, "teardown", &d.teardown.as_ref(), &Some(&s.teardown))?;
    same(hop, "exit_code", &d.exit_code, &Some(s.exit_code))
}
