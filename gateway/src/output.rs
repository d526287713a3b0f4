//! How decisions are printed: one JSON object per capsule per line (`--json`), or one
//! human-readable line.

use serde_json::{json, Value};
use verify_core::Decision;

/// The `--json` line of DESIGN.md; `capsule` is the argument as given.
pub fn decision_json(capsule: &str, d: &Decision) -> Value {
    json!({
        "capsule": capsule,
        "verdict": d.verdict.as_str(),
        "reason": d.reason.map(|r| r.as_str()),
        "detail": d.detail,
        "digest": d.digest.map(|x| x.to_string()),
        "capsule_id": d.capsule_id,
        "version": d.version,
        "tenant": d.tenant,
        "kid": d.kid,
        "alg": d.alg.map(|a| a.as_str()),
    })
}

pub fn decision_line(capsule: &str, d: &Decision) -> String {
    let id = match (&d.capsule_id, d.version) {
        (Some(id), Some(v)) => format!(" {id}@{v}"),
        _ => String::new(),
    };
    match d.reason {
        None => format!("admit {capsule}{id}: {}", d.detail),
        Some(r) => format!("deny  {capsule}{id}: {r}: {}", d.detail),
    }
}
