//! `evidence verify`: a bundle or an export checked offline, every hop reported.
//!
//! Order: the custody signature over `index.json` first, then the index against the
//! directory (every file listed with its digest and size, nothing more, nothing
//! less), because nothing else of the bundle is read before its bytes are vouched
//! for; then [`Bundle::walk`], the one chain walk (`Bundle::check` uses it too), with
//! the trust snapshot the index carries (and `--trust`, when given) as the trust
//! store. A denial's bundle has a shorter chain ([`verify_denial`]). An export
//! (docs/evidence.md, "`evidence export`") is checked file by file against `export.json` and the signed
//! index, and a hop whose input was withheld or masked is reported as such.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use attest::tpm::TpmKeyPublic;
use serde::Serialize;
use serde_json::{json, Value};
use verify_core::keys::{KeySnapshot, KeyStore};
use verify_core::Sha256Digest;

use super::check::{link, Expect, Hop, Trust};
use super::index::{index_sig_file, Index, IndexKind, SnapshotJwk, INDEX_FILE};
use super::read::{list_files, optional, Bundle};
use super::schema::{DecisionRecord, Event, EventData};
use super::EvidenceError;
use crate::custody::{sig_name, verify_custody, CustodyExpect, CustodySignature, SignerInfo};

pub const EXPORT_SCHEMA: &str = "capsule-gateway/evidence-export/v1";
pub const EXPORT_FILE: &str = "export.json";

/// The largest JWS a snapshot-verified capsule may be (verify-core's default limit;
/// the bundle's own policy is not at hand offline).
fn max_jws_bytes() -> usize {
    verify_core::Limits::default().max_jws_bytes
}

/// What the auditor brings.
#[derive(Debug, Default, Clone, Copy)]
pub struct VerifyOptions<'a> {
    /// `--trust`: the capsule must also verify with this trust store.
    pub trust: Option<&'a KeyStore>,
    /// `--identity`: the index must be quoted by this TPM identity key.
    pub identity: Option<&'a TpmKeyPublic>,
}

/// One hop's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Holds,
    Fails,
    /// An export left out an input of this hop.
    Withheld,
    /// An export masked an input of this hop.
    Masked,
    /// An export's inputs of this hop match the signed index, but the chain was not
    /// re-walked (an earlier input was withheld or masked).
    Indexed,
    /// Not part of this bundle's chain (a denial has no sandbox; a run that never
    /// started has no outputs).
    NotApplicable,
    /// After the first failure: not looked at.
    NotChecked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HopReport {
    pub hop: &'static str,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What `evidence verify` found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// `bundle` or `export`.
    pub form: &'static str,
    /// The export's mode, for an export.
    pub mode: Option<String>,
    pub kind: Option<IndexKind>,
    pub run_id: Option<String>,
    pub signer: Option<SignerInfo>,
    pub hops: Vec<HopReport>,
    /// An export's files and their status.
    pub files: Vec<(String, FileStatus)>,
}

impl VerifyReport {
    fn new(form: &'static str, hops: &[Hop]) -> VerifyReport {
        VerifyReport {
            form,
            mode: None,
            kind: None,
            run_id: None,
            signer: None,
            hops: hops
                .iter()
                .map(|h| HopReport {
                    hop: h.as_str(),
                    verdict: Verdict::NotChecked,
                    detail: None,
                })
                .collect(),
            files: Vec::new(),
        }
    }

    fn set(&mut self, hop: Hop, verdict: Verdict, detail: Option<String>) {
        if let Some(h) = self.hops.iter_mut().find(|h| h.hop == hop.as_str()) {
            h.verdict = verdict;
            h.detail = detail;
        }
    }

    fn fail(&mut self, e: EvidenceError) {
        let (hop, detail) = match e {
            EvidenceError::Link { hop, detail } => (hop, detail),
            other => (hop_of_malformed(&other), other.to_string()),
        };
        self.set(hop, Verdict::Fails, Some(detail));
    }

    /// The first hop that does not hold.
    pub fn first_failure(&self) -> Option<&HopReport> {
        self.hops.iter().find(|h| h.verdict == Verdict::Fails)
    }

    pub fn holds(&self) -> bool {
        self.first_failure().is_none()
    }

    pub fn to_json(&self) -> Value {
        let signer = self.signer.as_ref().map(|s| {
            json!({
                "kind": s.kind.as_str(),
                "key_thumbprint": s.key_thumbprint,
                "tpm": s.tpm,
                "pcrs": s.pcrs.as_ref().map(|p| p.selection().to_string()),
            })
        });
        let mut v = json!({
            "form": self.form,
            "verdict": if self.holds() { "holds" } else { "broken" },
            "first_failure": self.first_failure().map(|h| h.hop),
            "kind": self.kind,
            "run_id": self.run_id,
            "signer": signer,
            "hops": self.hops,
        });
        if self.form == "export" {
            v["mode"] = json!(self.mode);
            v["files"] = Value::Array(
                self.files
                    .iter()
                    .map(|(p, s)| json!({ "path": p, "status": s }))
                    .collect(),
            );
        }
        v
    }
}

/// A file a bundle could not read, named by the hop that reads it.
fn hop_of_malformed(e: &EvidenceError) -> Hop {
    let what = match e {
        EvidenceError::Malformed { what, .. } => what.clone(),
        EvidenceError::Io { path, .. } => path.display().to_string(),
        _ => String::new(),
    };
    let what = what.as_str();
    if what.contains("decision") {
        Hop::Decision
    } else if what.contains("sandbox") || what.contains("oci-config") {
        Hop::Sandbox
    } else if what.contains("stdout") || what.contains("stderr") {
        Hop::Outputs
    } else if what.contains("approvals") {
        Hop::Approvals
    } else if what.contains("capsule.jws") {
        Hop::CapsuleDigest
    } else if what.contains(INDEX_FILE) {
        Hop::Index
    } else {
        Hop::Event
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256Digest(verify_core::crypto::default_backend().sha256_oneshot(bytes)).to_string()
}

fn usage(path: &Path, detail: &str) -> EvidenceError {
    EvidenceError::Malformed {
        what: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// Verifies the bundle or export at `path`. `Err` only when `path` is neither (a
/// usage error); every refusal of the evidence itself is a hop in the report.
pub fn verify_evidence(
    path: &Path,
    opts: &VerifyOptions<'_>,
) -> Result<VerifyReport, EvidenceError> {
    if !path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return Err(usage(path, "not a directory"));
    }
    let has = |name: &str| path.join(name).symlink_metadata().is_ok();
    if has(EXPORT_FILE) {
        return Ok(verify_export(path, opts));
    }
    if !has(INDEX_FILE) && !has("event.json") {
        return Err(usage(
            path,
            "neither a bundle (index.json, event.json) nor an export (export.json)",
        ));
    }
    Ok(verify_bundle(path, opts))
}

/// A bundle's hops: every hop but `export` ([`Hop::ALL`] is in walking order and
/// starts with it), so the order is written once.
const BUNDLE_HOPS: &[Hop] = Hop::ALL.split_first().expect("Hop::ALL is not empty").1;
const _: () = assert!(matches!(Hop::ALL[0], Hop::Export));

/// The signed index: its signature (hop [`Hop::IndexSignature`]), then parsed.
fn signed_index(
    dir: &Path,
    opts: &VerifyOptions<'_>,
    r: &mut VerifyReport,
) -> Result<(Vec<u8>, Index, SignerInfo), EvidenceError> {
    let hop = Hop::IndexSignature;
    let bytes = optional(&dir.join(INDEX_FILE))?
        .ok_or_else(|| link(hop, "no index.json: the bundle is not signed"))?;
    let sig =
        optional(&dir.join(index_sig_file()))?.ok_or_else(|| link(hop, "no index.sig.json"))?;
    let sig = CustodySignature::parse(&sig).map_err(|e| link(hop, e))?;
    let expect = CustodyExpect {
        identity: opts.identity,
        pcrs: None,
    };
    let signer = verify_custody(&bytes, &sig, &expect).map_err(|e| link(hop, e))?;
    r.set(hop, Verdict::Holds, Some(describe(&signer)));
    r.signer = Some(signer.clone());
    let index = Index::parse(&bytes).map_err(|e| link(Hop::Index, e))?;
    r.kind = Some(index.kind);
    r.run_id = Some(index.run_id.clone());
    Ok((bytes, index, signer))
}

fn describe(s: &SignerInfo) -> String {
    match &s.tpm {
        Some(tpm) => format!(
            "TPM quote by identity key {} ({}), PCRs {}",
            s.key_thumbprint,
            tpm.describe(),
            s.pcrs
                .as_ref()
                .map_or(String::new(), |p| p.selection().to_string())
        ),
        None => format!("software key {} (not a TPM)", s.key_thumbprint),
    }
}

/// Hop [`Hop::Index`]: the directory holds exactly the files the index lists (its
/// own two files aside), each with its digest and size. `skip` names files that
/// belong to the directory but not the bundle (an export's own).
fn check_files(dir: &Path, index: &Index, skip: &[String]) -> Result<(), EvidenceError> {
    let hop = Hop::Index;
    let own = [INDEX_FILE.to_string(), index_sig_file()];
    let present: BTreeSet<String> = list_files(dir)?
        .into_iter()
        .filter(|p| !own.contains(p) && !skip.contains(p))
        .collect();
    let listed: BTreeSet<String> = index.files.iter().map(|f| f.path.clone()).collect();
    if listed.len() != index.files.len() {
        return Err(link(hop, "a file is listed twice"));
    }
    if let Some(extra) = present.difference(&listed).next() {
        return Err(link(
            hop,
            format!("{extra}: in the bundle, not in the index"),
        ));
    }
    if let Some(missing) = listed.difference(&present).next() {
        return Err(link(
            hop,
            format!("{missing}: in the index, not in the bundle"),
        ));
    }
    for f in &index.files {
        check_file(dir, &f.path, &f.sha256, f.size)?;
    }
    Ok(())
}

fn check_file(dir: &Path, path: &str, sha256_: &str, size: u64) -> Result<(), EvidenceError> {
    let bytes = optional(&dir.join(path))
        .map_err(|e| link(Hop::Index, e))?
        .ok_or_else(|| link(Hop::Index, format!("{path}: missing")))?;
    let actual = sha256(&bytes);
    if actual != sha256_ || bytes.len() as u64 != size {
        return Err(link(
            Hop::Index,
            format!(
                "{path}: sha256 {actual} ({} bytes), the index says {sha256_} ({size} bytes)",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

fn verify_bundle(dir: &Path, opts: &VerifyOptions<'_>) -> VerifyReport {
    let mut r = VerifyReport::new("bundle", BUNDLE_HOPS);
    let (_, index, _) = match signed_index(dir, opts, &mut r) {
        Ok(x) => x,
        Err(e) => {
            r.fail(e);
            return r;
        }
    };
    if let Err(e) = check_files(dir, &index, &[]) {
        r.fail(e);
        return r;
    }
    r.set(
        Hop::Index,
        Verdict::Holds,
        Some(format!("{} file(s), each as listed", index.files.len())),
    );
    match index.kind {
        IndexKind::Denial => verify_denial(dir, &index, true, &mut r),
        IndexKind::Run => walk_run(dir, &index, opts, true, &mut r),
    }
    r
}

/// The trust the walk uses: the snapshot's keys; an HS256 snapshot verifies only
/// through `--trust`, whose key must have the snapshot's fingerprint.
fn walk_run(
    dir: &Path,
    index: &Index,
    opts: &VerifyOptions<'_>,
    dir_name: bool,
    r: &mut VerifyReport,
) {
    let bundle = match Bundle::read(dir) {
        Ok(b) => b,
        Err(e) => {
            r.fail(e);
            return;
        }
    };
    let stores = (|| {
        let snapshot = SnapshotJwk::key_store(index.trust_snapshot.capsule_key.as_slice())?;
        let approvers = SnapshotJwk::key_store(&index.trust_snapshot.approvers)?;
        Ok::<_, EvidenceError>((snapshot, approvers))
    })();
    let (snapshot, approvers) = match stores {
        Ok(x) => x,
        Err(e) => {
            r.set(Hop::Signature, Verdict::Fails, Some(e.to_string()));
            return;
        }
    };
    let hs256 = index
        .trust_snapshot
        .capsule_key
        .as_ref()
        .filter(|k| k.alg == "HS256");
    let keys: Result<&KeyStore, &str> = match (hs256, opts.trust) {
        (None, _) => Ok(&snapshot),
        (Some(_), None) => Err(
            "the capsule is HS256: the snapshot keeps only the key's fingerprint, not the secret; give --trust with the key",
        ),
        (Some(k), Some(trust)) => match trust.get(&k.kid).map(|t| t.snapshot()) {
            Some(KeySnapshot::Hs256 { fingerprint })
                if Some(attest::b64::encode(fingerprint)) == k.fingerprint =>
            {
                Ok(trust)
            }
            _ => Err("--trust has no HS256 key with the snapshot's kid and fingerprint"),
        },
    };
    let trust = Trust {
        keys,
        also: if hs256.is_some() { None } else { opts.trust },
        approvers: &approvers,
        max_jws_bytes: max_jws_bytes(),
    };
    let expect = Expect {
        index: Some(index),
        dir_name,
    };
    let mut passed = Vec::new();
    let result = bundle.walk(&trust, expect, &mut passed);
    for hop in &passed {
        r.set(*hop, Verdict::Holds, None);
    }
    match result {
        Ok(links) => {
            r.set(
                Hop::Signature,
                Verdict::Holds,
                Some(format!(
                    "by `{}` from the trust snapshot{}",
                    links.kid,
                    if opts.trust.is_some() {
                        " and --trust"
                    } else {
                        ""
                    }
                )),
            );
            for h in r.hops.iter_mut() {
                if h.verdict == Verdict::NotChecked {
                    h.verdict = Verdict::NotApplicable;
                }
            }
        }
        Err(e) => r.fail(e),
    }
}

/// A denial's chain: the event is a denial, named like its bundle and index; its
/// digest is the index's and the decision's; the decision is the event's and a
/// denial. The index lists nothing presented (no `capsule.jws`, no approvals).
fn verify_denial(dir: &Path, index: &Index, dir_name: bool, r: &mut VerifyReport) {
    let result = (|| {
        let listed: Vec<&str> = index.files.iter().map(|f| f.path.as_str()).collect();
        if listed != ["decision.json", "event.json"] {
            return Err(link(
                Hop::Index,
                format!(
                    "a denial's bundle holds decision.json and event.json only, not {listed:?}"
                ),
            ));
        }
        let event = Event::parse(&super::read::required(dir, "event.json")?)?;
        let EventData::Denied(d) = &event.data else {
            return Err(link(Hop::Event, "a denial's index over a run's event"));
        };
        r.set(Hop::Event, Verdict::Holds, None);
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        if (dir_name && name.as_deref() != Some(event.id.as_str())) || index.run_id != event.id {
            return Err(link(
                Hop::RunId,
                format!(
                    "directory {name:?}, event {}, index {} disagree",
                    event.id, index.run_id
                ),
            ));
        }
        r.set(Hop::RunId, Verdict::Holds, None);
        if index.capsule_digest != d.digest || d.capsule_digest != d.digest {
            return Err(link(
                Hop::CapsuleDigest,
                "the index's and the event's digests disagree",
            ));
        }
        r.set(Hop::CapsuleDigest, Verdict::Holds, None);
        let decision = DecisionRecord::parse(&super::read::required(dir, "decision.json")?)?;
        let from_event = (
            &d.verdict,
            &d.reason,
            &d.detail,
            &d.digest,
            &d.capsule_id,
            &d.version,
            &d.tenant,
            &d.kid,
            &d.alg,
        );
        let recorded = (
            &decision.verdict,
            &decision.reason,
            &decision.detail,
            &decision.digest,
            &decision.capsule_id,
            &decision.version,
            &decision.tenant,
            &decision.kid,
            &decision.alg,
        );
        if decision.verdict != "deny" || from_event != recorded || d.launched {
            return Err(link(
                Hop::Decision,
                "decision.json is not the event's denial",
            ));
        }
        if index.tenant_id != d.tenant {
            return Err(link(Hop::Decision, "the index names another tenant"));
        }
        r.set(
            Hop::Decision,
            Verdict::Holds,
            Some(format!(
                "denied: {}",
                d.reason.as_deref().unwrap_or("(no reason)")
            )),
        );
        Ok(())
    })();
    match result {
        Ok(()) => {
            for h in r.hops.iter_mut() {
                if h.verdict == Verdict::NotChecked {
                    h.verdict = Verdict::NotApplicable;
                }
            }
        }
        Err(e) => r.fail(e),
    }
}

// `export.json` is read with the writer's own types (`evidence::export`): one schema.
use super::export::{ExportFile as ExportEntry, ExportManifest as ExportDoc, FileStatus};

/// The files each hop reads (for an export's withheld/masked report).
fn inputs(hop: Hop) -> &'static [&'static str] {
    match hop {
        Hop::Event => &["event.json"],
        Hop::RunId => &["event.json", "sandbox.json"],
        Hop::CapsuleDigest => &["capsule.jws", "event.json", "decision.json"],
        Hop::ManifestJws | Hop::Manifest | Hop::PolicyVersion => &["capsule.jws", "event.json"],
        Hop::Signature => &["capsule.jws"],
        Hop::Approvals => &["capsule.jws", "event.json", "approvals/"],
        Hop::Decision => &["decision.json", "capsule.jws", "event.json"],
        Hop::Sandbox => &["sandbox.json", "event.json"],
        Hop::OciConfig => &["oci-config.json", "sandbox.json", "event.json"],
        Hop::Staged => &["sandbox.json", "capsule.jws", "event.json"],
        Hop::Outputs => &["stdout", "stderr", "event.json"],
        _ => &[],
    }
}

fn verify_export(dir: &Path, opts: &VerifyOptions<'_>) -> VerifyReport {
    let mut hops = vec![Hop::Export];
    hops.extend_from_slice(BUNDLE_HOPS);
    let mut r = VerifyReport::new("export", &hops);
    if let Err(e) = check_export(dir, opts, &mut r) {
        r.fail(e);
    }
    r
}

fn check_export(
    dir: &Path,
    opts: &VerifyOptions<'_>,
    r: &mut VerifyReport,
) -> Result<(), EvidenceError> {
    let hop = Hop::Export;
    let bytes = optional(&dir.join(EXPORT_FILE))?.ok_or_else(|| link(hop, "no export.json"))?;
    let sig = optional(&dir.join(sig_name(EXPORT_FILE)))?
        .ok_or_else(|| link(hop, "no export.sig.json"))?;
    let sig = CustodySignature::parse(&sig).map_err(|e| link(hop, e))?;
    let expect = CustodyExpect {
        identity: opts.identity,
        pcrs: None,
    };
    let export_signer = verify_custody(&bytes, &sig, &expect).map_err(|e| link(hop, e))?;
    let doc = ExportDoc::parse(&bytes).map_err(|e| link(hop, e))?;
    if doc.schema != EXPORT_SCHEMA {
        return Err(link(
            hop,
            format!("schema `{}` is not `{EXPORT_SCHEMA}`", doc.schema),
        ));
    }
    r.mode = Some(doc.mode.to_string());
    r.run_id = Some(doc.run_id.clone());
    r.signer = Some(export_signer.clone());
    r.files = doc
        .files
        .iter()
        .map(|f| (f.path.clone(), f.status))
        .collect();
    let export_own = [EXPORT_FILE.to_string(), sig_name(EXPORT_FILE)];

    if optional(&dir.join(INDEX_FILE))?.is_none() {
        // local-only: nothing but the signed index's digest leaves.
        let present: Vec<String> = list_files(dir)?
            .into_iter()
            .filter(|p| !export_own.contains(p))
            .collect();
        if !present.is_empty() {
            return Err(link(
                hop,
                format!("{}: present, and no index lists it", present[0]),
            ));
        }
        if doc.files.iter().any(|f| f.status != FileStatus::Withheld) {
            return Err(link(hop, "the index is withheld, yet a file is not"));
        }
        r.set(
            hop,
            Verdict::Holds,
            Some(format!(
                "{} (index {} withheld)",
                describe(&export_signer),
                doc.index_sha256
            )),
        );
        for h in r.hops.iter_mut().skip(1) {
            h.verdict = Verdict::Withheld;
        }
        return Ok(());
    }

    let (index_bytes, index, index_signer) = signed_index(dir, opts, r)?;
    if index_signer.key_thumbprint != export_signer.key_thumbprint {
        return Err(link(
            hop,
            format!(
                "export signed by {}, index by {}: not the same signer",
                export_signer.key_thumbprint, index_signer.key_thumbprint
            ),
        ));
    }
    if sha256(&index_bytes) != doc.index_sha256 {
        return Err(link(hop, "index_sha256 is not the digest of index.json"));
    }
    if doc.run_id != index.run_id {
        return Err(link(hop, "run_id is not the index's"));
    }
    // Every index file has exactly one entry, and nothing else is listed.
    let mut entries: BTreeMap<&str, &ExportEntry> = BTreeMap::new();
    for e in &doc.files {
        if entries.insert(e.path.as_str(), e).is_some() {
            return Err(link(hop, format!("{}: listed twice", e.path)));
        }
    }
    let indexed: BTreeSet<&str> = index.files.iter().map(|f| f.path.as_str()).collect();
    if let Some(extra) = entries.keys().find(|p| !indexed.contains(*p)) {
        return Err(link(
            hop,
            format!("{extra}: in export.json, not in the index"),
        ));
    }
    if let Some(missing) = indexed.iter().find(|p| !entries.contains_key(*p)) {
        return Err(link(
            hop,
            format!("{missing}: in the index, not in export.json"),
        ));
    }
    let present: BTreeSet<String> = list_files(dir)?
        .into_iter()
        .filter(|p| !export_own.contains(p) && p != INDEX_FILE && *p != index_sig_file())
        .collect();
    for f in &index.files {
        let e = entries[f.path.as_str()];
        let exists = present.contains(&f.path);
        match e.status {
            FileStatus::Included => {
                if !exists {
                    return Err(link(hop, format!("{}: included, and absent", f.path)));
                }
                check_file(dir, &f.path, &f.sha256, f.size).map_err(|e| link(hop, e))?;
            }
            FileStatus::Masked => {
                let (Some(d), Some(n)) = (&e.sha256, e.size) else {
                    return Err(link(
                        hop,
                        format!("{}: masked without its own digest", f.path),
                    ));
                };
                if !exists {
                    return Err(link(hop, format!("{}: masked, and absent", f.path)));
                }
                check_file(dir, &f.path, d, n).map_err(|e| link(hop, e))?;
            }
            FileStatus::Withheld => {
                if exists {
                    return Err(link(hop, format!("{}: withheld, and present", f.path)));
                }
            }
        }
    }
    if let Some(extra) = present.iter().find(|p| !indexed.contains(p.as_str())) {
        return Err(link(
            hop,
            format!("{extra}: present, and neither file lists it"),
        ));
    }
    let counts = |s: FileStatus| doc.files.iter().filter(|f| f.status == s).count();
    r.set(
        hop,
        Verdict::Holds,
        Some(format!(
            "{}: {} included, {} masked, {} withheld",
            doc.mode,
            counts(FileStatus::Included),
            counts(FileStatus::Masked),
            counts(FileStatus::Withheld)
        )),
    );
    r.set(
        Hop::Index,
        Verdict::Holds,
        Some("checked against export.json".into()),
    );

    let all_included = doc.files.iter().all(|f| f.status == FileStatus::Included);
    if all_included && index.kind == IndexKind::Run {
        walk_run(dir, &index, opts, false, r);
        return Ok(());
    }
    if index.kind == IndexKind::Denial && all_included {
        verify_denial(dir, &index, false, r);
        return Ok(());
    }
    // Report each hop by what happened to its inputs.
    let status_of = |input: &str| -> Option<FileStatus> {
        let matching: Vec<FileStatus> = doc
            .files
            .iter()
            .filter(|f| {
                if let Some(prefix) = input.strip_suffix('/') {
                    f.path.starts_with(&format!("{prefix}/"))
                } else {
                    f.path == input
                }
            })
            .map(|f| f.status)
            .collect();
        if matching.contains(&FileStatus::Withheld) {
            Some(FileStatus::Withheld)
        } else if matching.contains(&FileStatus::Masked) {
            Some(FileStatus::Masked)
        } else if matching.is_empty() {
            None
        } else {
            Some(FileStatus::Included)
        }
    };
    for h in BUNDLE_HOPS.iter().skip(2) {
        let statuses: Vec<FileStatus> = inputs(*h).iter().filter_map(|i| status_of(i)).collect();
        let verdict = if statuses.is_empty() {
            Verdict::NotApplicable
        } else if statuses.contains(&FileStatus::Withheld) {
            Verdict::Withheld
        } else if statuses.contains(&FileStatus::Masked) {
            Verdict::Masked
        } else {
            Verdict::Indexed
        };
        r.set(*h, verdict, None);
    }
    Ok(())
}
