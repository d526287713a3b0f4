//! Known-answer tests: Project Wycheproof (ECDSA P-256/SHA-256 in IEEE P1363 form,
//! HMAC-SHA256, complete JWS tokens) and the RFC 7515 Appendix A examples, run through
//! every crypto backend compiled in. With `--all-features` that is aws-lc-rs and the
//! pure-Rust backend, and every test also checks that the two agree on every vector.
//!
//! The vectors are data kept outside the crate, in `shared/vectors/` beside the
//! repository checkout (the layout CI clones). `shared/vectors/README.md` gives their
//! provenance, the tcId groups and the divergences asserted here. A missing vectors
//! directory fails the tests, naming where it looked: a conformance suite that skips
//! itself proves nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde_json::{json, Value};
use verify_core::crypto::{all_backends, Backend, Es256Verifier, Hs256Key, KeyRejected};
use verify_core::error::ConfigError;
use verify_core::jws::{self, VerifiedJws};
use verify_core::keys::{Jwk, KeyStore, SigningKey};
use verify_core::{b64, Alg, Reason};

const VECTORS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/vectors");

/// Large enough for every token in the files; the size limit is not under test here.
const MAX_JWS_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------

fn load_vectors(relative: &str) -> Value {
    let dir = Path::new(VECTORS_DIR);
    assert!(
        dir.is_dir(),
        "test vectors missing: no directory at {} (expected `shared/vectors/` beside the \
         repository checkout); these tests fail rather than skip",
        dir.display()
    );
    let path = dir.join(relative);
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("cannot read test vectors {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn array<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value[key]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("`{key}` is not an array"))
}

fn string<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string"))
}

fn number(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a number"))
}

fn tc_id(test: &Value) -> u64 {
    number(test, "tcId")
}

fn hex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd-length hex `{text}`");
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16).unwrap_or_else(|e| panic!("hex `{text}`: {e}"))
        })
        .collect()
}

fn b64url(text: &str) -> Vec<u8> {
    b64::decode(text.as_bytes()).unwrap_or_else(|e| panic!("base64url `{text}`: {e}"))
}

/// The vector's verdict (Wycheproof `result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Valid,
    Invalid,
    Acceptable,
}

fn verdict(test: &Value) -> Verdict {
    match string(test, "result") {
        "valid" => Verdict::Valid,
        "invalid" => Verdict::Invalid,
        "acceptable" => Verdict::Acceptable,
        other => panic!("tcId {}: unknown result `{other}`", tc_id(test)),
    }
}

/// Every backend compiled in. Checked against the enabled features, so a backend that
/// `all_backends()` forgot cannot make the agreement checks vacuous.
fn backends() -> Vec<&'static dyn Backend> {
    let all = all_backends();
    let expected =
        usize::from(cfg!(feature = "aws-lc")) + usize::from(cfg!(feature = "rust-crypto"));
    assert_eq!(
        all.len(),
        expected,
        "all_backends() does not match the enabled features"
    );
    if all.len() < 2 {
        eprintln!("note: one crypto backend only; run with --all-features to cross-check");
    }
    all
}

/// Asserts that every backend reached the same result, and returns it.
fn agreed<T: PartialEq + fmt::Debug>(what: &str, per_backend: Vec<(&'static str, T)>) -> T {
    let mut results = per_backend.into_iter();
    let (first_name, first) = results.next().expect("at least one backend");
    for (name, other) in results {
        assert_eq!(
            other, first,
            "{what}: backend {name} disagrees with {first_name}"
        );
    }
    first
}

/// A trust store made the way the gateway makes one: a JWKS document through
/// `KeyStore::from_jwks`.
fn store_from_jwks(
    jwks: &[Value],
    origin: &str,
    backend: &'static dyn Backend,
) -> Result<KeyStore, ConfigError> {
    let document = json!({ "keys": jwks }).to_string();
    KeyStore::from_jwks(document.as_bytes(), Path::new(origin), backend)
}

fn store_from_jwk(
    jwk: &Value,
    origin: &str,
    backend: &'static dyn Backend,
) -> Result<KeyStore, ConfigError> {
    store_from_jwks(std::slice::from_ref(jwk), origin, backend)
}

/// `jwk` with `kid` and `alg` added where it has none. Our JWK loader requires both
/// (DESIGN.md: each key has kid and alg); RFC examples and some Wycheproof keys omit
/// them.
fn with_kid_and_alg(jwk: &Value, kid: &str, alg: &str) -> Value {
    let mut jwk = jwk.clone();
    let members = jwk.as_object_mut().expect("a JWK is a JSON object");
    members.entry("kid").or_insert_with(|| json!(kid));
    members.entry("alg").or_insert_with(|| json!(alg));
    jwk
}

/// What `jws::verify` did with one token, reduced to what is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    Accepted,
    Rejected(&'static str),
}

impl Outcome {
    fn rejected(reason: Reason) -> Outcome {
        Outcome::Rejected(reason.as_str())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Accepted => f.write_str("accepted"),
            Outcome::Rejected(reason) => write!(f, "rejected: {reason}"),
        }
    }
}

fn outcome(result: &Result<VerifiedJws, jws::JwsFailure>) -> Outcome {
    match result {
        Ok(_) => Outcome::Accepted,
        Err(failure) => Outcome::rejected(failure.reason),
    }
}

fn rejection(result: Result<VerifiedJws, jws::JwsFailure>) -> Reason {
    match result {
        Ok(verified) => panic!("accepted, kid `{}`", verified.kid),
        Err(failure) => failure.reason,
    }
}

// ---------------------------------------------------------------------------------
// 1. ECDSA P-256 / SHA-256, IEEE P1363 (r || s)
// ---------------------------------------------------------------------------------

/// floor(n / 2) for the P-256 group order n: a signature whose s is above it is
/// "high-S".
const P256_HALF_N: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

fn is_high_s(sig: &[u8; 64]) -> bool {
    sig[32..] > P256_HALF_N[..]
}

/// A backend's verifier for one group key, or the backend's refusal of the key.
type PreparedEs256 = Result<Box<dyn Es256Verifier>, KeyRejected>;

/// One signature through one backend's verifier, the way the JWS path does it: the
/// signature must be exactly 64 bytes `r || s`. Any other length is refused before
/// the curve arithmetic (our API takes `&[u8; 64]` and cannot express it).
fn es256_accepts(verifier: &PreparedEs256, msg: &[u8], sig: &[u8]) -> bool {
    let Ok(verifier) = verifier else { return false };
    let Ok(sig) = <&[u8; 64]>::try_from(sig) else {
        return false;
    };
    verifier.verify(msg, sig)
}

#[derive(Debug, Default)]
struct EcdsaTally {
    tests: usize,
    valid_accepted: usize,
    invalid_rejected: usize,
    wrong_length_rejected: usize,
    high_s_valid_accepted: usize,
    key_rejected: usize,
    acceptable: Vec<(u64, bool)>,
}

#[test]
fn wycheproof_ecdsa_p256_sha256_p1363() {
    let doc = load_vectors("wycheproof/ecdsa_secp256r1_sha256_p1363_test.json");
    let backends = backends();
    let mut tally = EcdsaTally::default();

    for group in array(&doc, "testGroups") {
        assert_eq!(string(group, "type"), "EcdsaP1363Verify");
        assert_eq!(string(group, "sha"), "SHA-256");
        assert_eq!(string(&group["publicKey"], "curve"), "secp256r1");
        let point: [u8; 65] = hex(string(&group["publicKey"], "uncompressed"))
            .try_into()
            .expect("uncompressed P-256 point is 65 bytes");
        let verifiers: Vec<(&'static str, PreparedEs256)> = backends
            .iter()
            .map(|b| (b.name(), b.es256_verifier(&point)))
            .collect();
        let key_ok: Vec<(&'static str, bool)> = verifiers
            .iter()
            .map(|(name, v)| (*name, v.is_ok()))
            .collect();
        let key_ok = agreed("ECDSA public key acceptance", key_ok);

        for test in array(group, "tests") {
            let tc = tc_id(test);
            let msg = hex(string(test, "msg"));
            let sig = hex(string(test, "sig"));
            let per_backend = verifiers
                .iter()
                .map(|(name, v)| (*name, es256_accepts(v, &msg, &sig)))
                .collect();
            let accepted = agreed(&format!("ECDSA tcId {tc}"), per_backend);
            tally.tests += 1;
            if !key_ok {
                assert_eq!(
                    verdict(test),
                    Verdict::Invalid,
                    "tcId {tc}: key refused, but valid"
                );
                tally.key_rejected += 1;
            }
            match verdict(test) {
                Verdict::Valid => {
                    assert!(accepted, "ECDSA tcId {tc} is valid but was rejected");
                    tally.valid_accepted += 1;
                    // Low-S is NOT enforced, by choice: neither RFC 7515 nor RFC 7518
                    // requires it, Wycheproof marks high-S signatures valid, and the
                    // RFC 7515 A.3 example itself is high-S. So these must verify.
                    let sig: &[u8; 64] =
                        sig.as_slice().try_into().expect("valid sigs are 64 bytes");
                    if is_high_s(sig) {
                        tally.high_s_valid_accepted += 1;
                    }
                }
                Verdict::Invalid => {
                    assert!(!accepted, "ECDSA tcId {tc} is invalid but was accepted");
                    tally.invalid_rejected += 1;
                    if sig.len() != 64 {
                        tally.wrong_length_rejected += 1;
                    }
                }
                Verdict::Acceptable => tally.acceptable.push((tc, accepted)),
            }
        }
    }

    eprintln!(
        "ecdsa_secp256r1_sha256_p1363_test.json through {} backend(s): {tally:?}",
        backends.len()
    );
    assert_eq!(number(&doc, "numberOfTests"), 262);
    assert_eq!(tally.tests, 262, "every ECDSA vector ran");
    assert_eq!(tally.valid_accepted, 173);
    assert_eq!(tally.invalid_rejected, 89);
    assert_eq!(
        tally.wrong_length_rejected, 21,
        "signatures that are not 64 bytes"
    );
    assert_eq!(
        tally.high_s_valid_accepted, 70,
        "high-S valid signatures verify (no low-S rule)"
    );
    assert_eq!(
        tally.key_rejected, 0,
        "every group key is a valid P-256 point"
    );
    assert!(
        tally.acceptable.is_empty(),
        "this file version has no `acceptable` tests"
    );
}

// ---------------------------------------------------------------------------------
// 2. HMAC-SHA256
// ---------------------------------------------------------------------------------

/// An `oct` JWK for `secret` through the key loader (`Jwk` -> `ParsedJwk::parse`).
fn parse_hs256_jwk(
    secret: &[u8],
) -> Result<verify_core::keys::ParsedJwk, verify_core::keys::JwkError> {
    let jwk =
        json!({ "kty": "oct", "kid": "wycheproof-hmac", "alg": "HS256", "k": b64::encode(secret) });
    let jwk: Jwk = serde_json::from_value(jwk).expect("well-formed JWK");
    jwk.parse()
}

/// Our HS256 API takes `&[u8; 32]`, so a 16-byte tag cannot be passed at all. The
/// nearest a caller could come is to pad it; that must not verify either.
fn padded_tag_verifies(key: &dyn Hs256Key, msg: &[u8], tag: &[u8]) -> bool {
    let mut padded = [0u8; 32];
    padded[..tag.len()].copy_from_slice(tag);
    key.verify(msg, &padded)
}

/// Through the JWS path: a correct HS256 tag truncated to `tag.len()` bytes is refused.
fn assert_truncated_tag_refused_by_jws(
    secret: &[u8],
    tag_len: usize,
    backend: &'static dyn Backend,
    tc: u64,
) {
    let parsed = parse_hs256_jwk(secret).expect("key of at least 32 bytes loads");
    let signer = SigningKey::from_jwk(&parsed, backend).expect("HS256 signing key");
    let full = jws::sign_compact("wycheproof-hmac", Alg::Hs256, b"{}", &signer).expect("sign");
    let mut store = KeyStore::default();
    store.insert(parsed, backend).expect("insert");
    assert!(
        jws::verify(full.as_bytes(), &store, MAX_JWS_BYTES).is_ok(),
        "tcId {tc}: full tag"
    );
    let (signing_input, tag) = full.rsplit_once('.').expect("three parts");
    let truncated = format!("{signing_input}.{}", b64::encode(&b64url(tag)[..tag_len]));
    let reason = rejection(jws::verify(truncated.as_bytes(), &store, MAX_JWS_BYTES));
    assert_eq!(
        reason,
        Reason::SignatureInvalid,
        "tcId {tc}: truncated tag via {}",
        backend.name()
    );
}

#[test]
fn wycheproof_hmac_sha256() {
    let doc = load_vectors("wycheproof/hmac_sha256_test.json");
    let backends = backends();
    let mut per_group: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    let (mut full_valid, mut full_invalid, mut truncated, mut short_keys_refused) = (0, 0, 0, 0);

    for group in array(&doc, "testGroups") {
        assert_eq!(string(group, "type"), "MacTest");
        let (key_bits, tag_bits) = (number(group, "keySize"), number(group, "tagSize"));
        for test in array(group, "tests") {
            let tc = tc_id(test);
            let (key, msg, tag) = (
                hex(string(test, "key")),
                hex(string(test, "msg")),
                hex(string(test, "tag")),
            );
            let expected = verdict(test);
            assert_ne!(expected, Verdict::Acceptable, "tcId {tc}");
            *per_group.entry((key_bits, tag_bits)).or_default() += 1;
            let full_tag: Option<[u8; 32]> = tag.as_slice().try_into().ok();

            let per_backend = backends
                .iter()
                .map(|b| {
                    let k = b.hs256_key(&key);
                    let accepted = match &full_tag {
                        Some(full) => k.verify(&msg, full),
                        None => {
                            assert!(!padded_tag_verifies(k.as_ref(), &msg, &tag), "tcId {tc}");
                            false
                        }
                    };
                    (b.name(), (accepted, k.sign(&msg)))
                })
                .collect();
            let (accepted, mac) = agreed(&format!("HMAC tcId {tc}"), per_backend);

            match (full_tag, expected) {
                (Some(_), Verdict::Valid) => {
                    assert!(accepted, "HMAC tcId {tc} is valid but was rejected");
                    assert_eq!(mac[..], tag[..], "HMAC tcId {tc}: sign(msg) is the tag");
                    full_valid += 1;
                }
                (Some(_), _) => {
                    assert!(!accepted, "HMAC tcId {tc} is invalid but was accepted");
                    assert_ne!(mac[..], tag[..], "HMAC tcId {tc}");
                    full_invalid += 1;
                }
                (None, _) => {
                    // JWS HS256 uses the full 32-byte tag only: a truncated tag is
                    // rejected even where Wycheproof calls it a valid (truncated) MAC.
                    // The vector's own verdict is still checked against the prefix.
                    assert!(!accepted);
                    assert_eq!(tag.len(), 16, "tcId {tc}");
                    assert_eq!(
                        mac[..16] == tag[..],
                        expected == Verdict::Valid,
                        "tcId {tc}"
                    );
                    if key.len() >= 32 {
                        for b in &backends {
                            assert_truncated_tag_refused_by_jws(&key, tag.len(), *b, tc);
                        }
                    }
                    truncated += 1;
                }
            }

            // RFC 7518 §3.2: an HS256 key must be at least 256 bits. The loader refuses
            // the 128-bit keys and loads the 256- and 520-bit ones.
            match parse_hs256_jwk(&key) {
                Ok(_) => assert!(key.len() >= 32, "tcId {tc}: {}-byte key loaded", key.len()),
                Err(e) => {
                    assert_eq!((key_bits, e.field), (128, "k"), "tcId {tc}: {e:?}");
                    short_keys_refused += 1;
                }
            }
        }
    }

    eprintln!(
        "hmac_sha256_test.json through {} backend(s): full-tag valid {full_valid}, full-tag invalid \
         {full_invalid}, truncated tags rejected {truncated}, 128-bit keys refused by the loader \
         {short_keys_refused}; per (keySize, tagSize): {per_group:?}",
        backends.len()
    );
    assert_eq!(number(&doc, "numberOfTests"), 174);
    assert_eq!(
        full_valid + full_invalid + truncated,
        174,
        "every HMAC vector ran"
    );
    assert_eq!((full_valid, full_invalid, truncated), (33, 54, 87));
    assert_eq!(short_keys_refused, 6);
    let expected_groups = [
        ((128, 128), 3),
        ((128, 256), 3),
        ((256, 128), 81),
        ((256, 256), 81),
        ((520, 128), 3),
        ((520, 256), 3),
    ];
    assert_eq!(per_group, BTreeMap::from(expected_groups));
}

// ---------------------------------------------------------------------------------
// 3. JWS (complete tokens)
// ---------------------------------------------------------------------------------

/// tcIds where our verdict differs from the vector's on purpose. Each entry's outcome
/// is asserted exactly, and must contradict the vector (else it is no divergence).
struct Divergence {
    tc_ids: &'static [u64],
    ours: Outcome,
    why: &'static str,
}

const DIVERGENCES: &[Divergence] = &[
    Divergence {
        tc_ids: &[
            33, 259, 260, 261, 262, 263, 264, 265, 266, 267, 268, 269, 270, 271, 272, 273, 274,
            275, 287, 288, 320, 321, 322, 323, 325, 326, 327, 328, 345, 346, 347, 349, 350, 351,
        ],
        ours: Outcome::Rejected("alg_not_allowed"),
        why: "valid RS256/384/512, PS256/384/512 or ES512 token: only ES256 and HS256 exist here \
              (DESIGN.md, JWS rules); the header's alg is refused before any key is looked up",
    },
    Divergence {
        tc_ids: &[372],
        ours: Outcome::Rejected("malformed_jws"),
        why: "strict base64url: a `?` inside the header is outside the alphabet; Wycheproof \
              marks it valid for decoders that skip such characters, we refuse it",
    },
    Divergence {
        tc_ids: &[373],
        ours: Outcome::Rejected("malformed_jws"),
        why: "strict base64url: a `?` inside the payload is outside the alphabet; the payload's \
              alphabet is checked (not parsed) before any crypto runs, so it is refused as \
              malformed_jws",
    },
    Divergence {
        tc_ids: &[367, 370],
        ours: Outcome::Accepted,
        why: "marked invalid (invalidBase64Padding, ...InPayload), but the token is byte for \
              byte the valid tcId 357 (the upstream padding step changed nothing); accepting \
              357 means accepting these. The test asserts the bytes are identical",
    },
];

/// The exact reason for every invalid-marked ES256/HS256-group test (and structurally
/// broken tokens in the other groups). Invalid tests not listed here must be tokens
/// whose header names another alg: those get `alg_not_allowed`.
struct Rejection {
    tc_ids: &'static [u64],
    reason: Reason,
    why: &'static str,
}

const REJECTIONS: &[Rejection] = &[
    Rejection {
        tc_ids: &[4, 7, 9, 10, 11, 12, 13, 14, 15, 21, 24, 26, 27, 28, 29, 30, 36, 39, 41, 42, 43, 44, 45],
        reason: Reason::MalformedJws,
        why: "not three parts with a non-empty header (missing/extra part, empty string)",
    },
    Rejection {
        tc_ids: &[6, 23],
        reason: Reason::SignatureInvalid,
        why: "payload removed: an empty payload is legal JWS, so the header is read and the \
              signature checked, and it was made over the original payload",
    },
    Rejection {
        tc_ids: &[17],
        reason: Reason::MalformedJws,
        why: "JSON serialization: compact serialization only; the JSON text is not three dot-separated parts",
    },
    Rejection {
        tc_ids: &[360, 361, 362, 363, 364, 365, 366, 368, 369, 371],
        reason: Reason::MalformedJws,
        why: "a space or a character outside the base64url alphabet in the header, payload or signature",
    },
    Rejection {
        tc_ids: &[374, 375],
        reason: Reason::MalformedJws,
        why: "the payload has non-zero trailing bits (a second spelling of the same bytes): \
              refused by the alphabet check before any crypto, whatever the MAC says",
    },
    Rejection {
        tc_ids: &[16, 341, 342, 343, 344],
        reason: Reason::AlgNotAllowed,
        why: "alg none (any case, with or without kid): refused before any key is looked up",
    },
    Rejection {
        tc_ids: &[8, 25],
        reason: Reason::UnknownKid,
        why: "the header names a kid the trust store does not hold",
    },
    Rejection {
        tc_ids: &[354, 356],
        reason: Reason::UnknownKid,
        why: "the group's EC key is for encryption (use enc / key_ops encrypt): the key loader \
              refuses it, so no trusted key has that kid",
    },
    Rejection {
        tc_ids: &[31],
        reason: Reason::AlgKeyMismatch,
        why: "HS256 token naming an ES256 key: the key's own alg decides, no MAC is ever \
              computed with EC key bytes",
    },
    Rejection {
        tc_ids: &[32],
        reason: Reason::HeaderForbidden,
        why: "embedded `jwk`: keys come only from the trust store",
    },
    Rejection {
        tc_ids: &[3, 20, 379, 380, 381, 382, 383, 384, 385],
        reason: Reason::SignatureInvalid,
        why: "signature not exactly 32 (HS256) or 64 (ES256, r||s) bytes: empty, DER-like, too long",
    },
    Rejection {
        tc_ids: &[2, 5, 19, 22],
        reason: Reason::SignatureInvalid,
        why: "modified signature, payload or payload encoding: the signature does not verify",
    },
    Rejection {
        tc_ids: &[386, 387, 388, 389, 390, 391, 392, 393, 394, 395, 396, 397, 398, 399, 400, 401],
        reason: Reason::SignatureInvalid,
        why: "r or s in {0, 1, n-1, n}: out of range or simply wrong (CVE-2022-21449 class)",
    },
];

/// Groups whose key our loader refuses, by the group's first tcId: the field the
/// error names, a fragment of its message, and why.
const KEY_REFUSALS: &[(&[u64], &str, &str, &str)] = &[
    (
        &[
            33, 259, 264, 268, 272, 320, 325, 345, 346, 349, 350, 353, 355,
        ],
        "keys[0].n",
        "unknown field",
        "RSA key: `n`/`e` are not members of the keys we know (EC P-256, oct)",
    ),
    (
        &[347, 351],
        "keys[0].alg",
        "ES521",
        "P-521 key: alg is not ES256/HS256",
    ),
    (&[354], "keys[0].use", "enc", "EC key with use enc"),
    (
        &[356],
        "keys[0].key_ops",
        "sign",
        "EC key with key_ops encrypt",
    ),
];

fn divergence(tc: u64) -> Option<&'static Divergence> {
    DIVERGENCES.iter().find(|d| d.tc_ids.contains(&tc))
}

fn pinned_rejection(tc: u64) -> Option<&'static Rejection> {
    REJECTIONS.iter().find(|r| r.tc_ids.contains(&tc))
}

/// The token's protected header as JSON, if it decodes (strictly).
fn token_header(token: &str) -> Option<Value> {
    let header = token.split('.').next()?;
    serde_json::from_slice(&b64::decode(header.as_bytes()).ok()?).ok()
}

/// What we must do with one test: from the divergence table, the pinned reasons, the
/// alg rule, and otherwise the vector's own verdict.
fn expected_outcome(tc: u64, vector: Verdict, token: &str) -> Outcome {
    assert_ne!(vector, Verdict::Acceptable, "JWS tcId {tc}");
    if let Some(d) = divergence(tc) {
        let contradicts = (d.ours == Outcome::Accepted) == (vector == Verdict::Invalid);
        assert!(
            contradicts,
            "tcId {tc} is in DIVERGENCES but agrees with the vector"
        );
        return d.ours;
    }
    if let Some(r) = pinned_rejection(tc) {
        assert_eq!(
            vector,
            Verdict::Invalid,
            "tcId {tc}: a pinned rejection of a valid token is a divergence"
        );
        return Outcome::rejected(r.reason);
    }
    let alg = token_header(token).and_then(|h| h["alg"].as_str().map(str::to_string));
    if let Some(alg) = alg.filter(|a| Alg::from_name(a).is_none()) {
        assert_eq!(
            vector,
            Verdict::Invalid,
            "tcId {tc}: valid {alg} token must be in DIVERGENCES"
        );
        return Outcome::rejected(Reason::AlgNotAllowed);
    }
    match vector {
        Verdict::Valid => Outcome::Accepted,
        _ => panic!("JWS tcId {tc} is invalid and has no expected reason: add it to REJECTIONS"),
    }
}

/// The group's key as a trust store. The vector's public JWK is used (or the private
/// one for HS256 groups, where the secret is the key). Where the JWK lacks kid or alg,
/// it gets the kid/alg its token's header names (the most favourable reading for the
/// token), so that a refusal comes from a real rule, not from the missing member.
/// A refused key leaves an empty store: the key refusal is then part of the rejection.
fn group_store(group: &Value, backend: &'static dyn Backend) -> (KeyStore, Option<ConfigError>) {
    let jwk = group
        .get("public")
        .or_else(|| group.get("private"))
        .expect("group has a key");
    let header = array(group, "tests")
        .iter()
        .find_map(|t| t["jws"].as_str().and_then(token_header))
        .unwrap_or(Value::Null);
    let jwk = with_kid_and_alg(
        jwk,
        header["kid"].as_str().unwrap_or("unnamed"),
        header["alg"].as_str().unwrap_or("none"),
    );
    let origin = format!(
        "json_web_signature_test.json group {}",
        tc_id(&array(group, "tests")[0])
    );
    match store_from_jwk(&jwk, &origin, backend) {
        Ok(store) => (store, None),
        Err(e) => (KeyStore::default(), Some(e)),
    }
}

fn assert_key_refusal_expected(first_tc: u64, refusal: Option<&ConfigError>) {
    let expected = KEY_REFUSALS
        .iter()
        .find(|(ids, ..)| ids.contains(&first_tc));
    match (expected, refusal) {
        (None, None) => {}
        (
            Some((_, field, fragment, why)),
            Some(ConfigError::Invalid {
                field: f, message, ..
            }),
        ) => {
            assert_eq!(f, field, "group {first_tc} ({why}): {message}");
            assert!(
                message.contains(fragment),
                "group {first_tc} ({why}): {message}"
            );
        }
        (expected, refusal) => panic!(
            "group {first_tc}: key refusal {refusal:?}, expected {:?}",
            expected.map(|e| e.3)
        ),
    }
}

/// tcId 31 with a MAC we can reproduce: an HS256 token whose MAC key is the EC
/// public point itself. A verifier that let the header pick the algorithm would
/// accept it; ours refuses it on the key's own alg.
fn assert_hs_es_confusion_refused(group: &Value, store: &KeyStore, backend: &'static dyn Backend) {
    let public = &group["public"];
    let mut point = vec![0x04];
    point.extend(b64url(string(public, "x")));
    point.extend(b64url(string(public, "y")));
    let kid = string(public, "kid");
    let header = json!({ "alg": "HS256", "kid": kid }).to_string();
    let signing_input = format!("{}.{}", b64::encode(header.as_bytes()), b64::encode(b"foo"));
    let tag = backend.hs256_key(&point).sign(signing_input.as_bytes());
    let token = format!("{signing_input}.{}", b64::encode(&tag));
    let reason = rejection(jws::verify(token.as_bytes(), store, MAX_JWS_BYTES));
    assert_eq!(
        reason,
        Reason::AlgKeyMismatch,
        "HS/ES confusion via {}",
        backend.name()
    );
}

fn token_bytes(test: &Value) -> (Vec<u8>, bool) {
    match &test["jws"] {
        Value::String(s) => (s.as_bytes().to_vec(), false),
        // JSON serialization given as an object: our API takes bytes, so feed the text.
        other => (other.to_string().into_bytes(), true),
    }
}

#[test]
fn wycheproof_json_web_signature() {
    let doc = load_vectors("wycheproof/json_web_signature_test.json");
    let backends = backends();
    let mut seen = BTreeSet::new();
    let mut summary: BTreeMap<(&'static str, Outcome), usize> = BTreeMap::new();
    let mut tokens: BTreeMap<u64, Vec<u8>> = BTreeMap::new();

    for group in array(&doc, "testGroups") {
        let first_tc = tc_id(&array(group, "tests")[0]);
        let stores: Vec<(&'static dyn Backend, KeyStore)> = backends
            .iter()
            .map(|b| {
                let (store, refusal) = group_store(group, *b);
                assert_key_refusal_expected(first_tc, refusal.as_ref());
                (*b, store)
            })
            .collect();

        for test in array(group, "tests") {
            let tc = tc_id(test);
            assert!(seen.insert(tc), "tcId {tc} twice");
            let (bytes, json_object) = token_bytes(test);
            let token = String::from_utf8_lossy(&bytes).into_owned();
            let expected = expected_outcome(tc, verdict(test), &token);
            if json_object {
                assert_eq!(
                    expected,
                    Outcome::rejected(Reason::MalformedJws),
                    "tcId {tc}"
                );
            }

            let per_backend = stores
                .iter()
                .map(|(b, store)| {
                    let result = jws::verify(&bytes, store, MAX_JWS_BYTES);
                    if let Ok(v) = &result {
                        let header = token_header(&token).expect("accepted => header decodes");
                        assert_eq!(Some(v.kid.as_str()), header["kid"].as_str(), "tcId {tc}");
                    }
                    (b.name(), (outcome(&result), result.ok().map(|v| v.payload)))
                })
                .collect();
            let (ours, _payload) = agreed(&format!("JWS tcId {tc}"), per_backend);
            assert_eq!(
                ours,
                expected,
                "JWS tcId {tc} ({})",
                string(test, "comment")
            );

            if tc == 31 {
                for (b, store) in &stores {
                    assert_hs_es_confusion_refused(group, store, *b);
                }
            }
            let bucket = match verdict(test) {
                Verdict::Valid => "vector valid",
                _ => "vector invalid",
            };
            *summary.entry((bucket, ours)).or_default() += 1;
            tokens.insert(tc, bytes);
        }
    }

    // 367 and 370 are accepted because they are the very bytes of the valid tcId 357.
    for tc in [367, 370] {
        assert_eq!(
            tokens.get(&tc),
            tokens.get(&357),
            "tcId {tc} is byte-identical to 357"
        );
    }
    // Every table entry names a test that exists (a typo would otherwise be silent).
    for tc in DIVERGENCES
        .iter()
        .flat_map(|d| d.tc_ids)
        .chain(REJECTIONS.iter().flat_map(|r| r.tc_ids))
    {
        assert!(
            seen.contains(tc),
            "table names tcId {tc}, which is not in the file"
        );
    }

    let total: usize = summary.values().sum();
    eprintln!(
        "json_web_signature_test.json through {} backend(s), {total} tests:",
        backends.len()
    );
    for ((bucket, outcome), count) in &summary {
        eprintln!("  {bucket:>14} -> {:<28} {count:>4}", outcome.to_string());
    }
    for d in DIVERGENCES {
        eprintln!("  divergence {:?} -> {}: {}", d.tc_ids, d.ours, d.why);
    }
    for r in REJECTIONS {
        eprintln!("  pinned {:?} -> {}: {}", r.tc_ids, r.reason, r.why);
    }
    assert_eq!(number(&doc, "numberOfTests"), 401);
    assert_eq!(total, 401, "every JWS vector ran");
    let count = |bucket: &str, o: Outcome| summary.get(&(bucket, o)).copied().unwrap_or(0);
    assert_eq!(count("vector valid", Outcome::Accepted), 10);
    assert_eq!(
        count("vector invalid", Outcome::Accepted),
        2,
        "only 367/370 (= tcId 357)"
    );
}

// ---------------------------------------------------------------------------------
// 4. RFC 7515 Appendix A
// ---------------------------------------------------------------------------------

fn example<'a>(doc: &'a Value, id: &str) -> &'a Value {
    array(doc, "examples")
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("rfc7515.json has no example `{id}`"))
}

/// The example's own consistency: `compact` is `signing_input` "." signature, and the
/// parts decode to the stated header and payload.
fn assert_example_consistent(ex: &Value) {
    let compact = string(ex, "compact");
    let parts: Vec<&str> = compact.split('.').collect();
    assert_eq!(parts.len(), 3, "{}", ex["id"]);
    assert_eq!(b64url(parts[0]), string(ex, "protected_header").as_bytes());
    assert_eq!(b64url(parts[1]), string(ex, "payload").as_bytes());
    if let Some(signing_input) = ex["signing_input"].as_str() {
        assert_eq!(
            compact,
            format!("{signing_input}.{}", string(ex, "signature_b64url"))
        );
    }
}

/// Signs the example's payload with its own key under a header that names a kid,
/// and verifies it through `jws::verify`: the key works end to end on this backend.
fn assert_resigned_example_verifies(
    ex: &Value,
    private: &Value,
    public: &Value,
    alg: Alg,
    backend: &'static dyn Backend,
) {
    let kid = format!("{}-kid", string(ex, "id"));
    let private: Jwk =
        serde_json::from_value(with_kid_and_alg(private, &kid, alg.as_str())).expect("JWK");
    let signer =
        SigningKey::from_jwk(&private.parse().expect("key loads"), backend).expect("signer");
    let payload = string(ex, "payload").as_bytes();
    let token = jws::sign_compact(&kid, alg, payload, &signer).expect("sign");
    let store = store_from_jwk(
        &with_kid_and_alg(public, &kid, alg.as_str()),
        "rfc7515.json",
        backend,
    )
    .expect("public key loads");
    let verified =
        jws::verify(token.as_bytes(), &store, MAX_JWS_BYTES).expect("re-signed example verifies");
    assert_eq!(
        (
            verified.kid.as_str(),
            verified.alg,
            verified.payload.as_slice()
        ),
        (kid.as_str(), alg, payload)
    );
}

#[test]
fn rfc7515_appendix_a() {
    let doc = load_vectors("rfc7515.json");
    let backends = backends();
    let (a1, a3, a5) = (
        example(&doc, "rfc7515-A.1"),
        example(&doc, "rfc7515-A.3"),
        example(&doc, "rfc7515-A.5"),
    );
    for ex in [a1, a3, a5] {
        assert_example_consistent(ex);
    }
    assert_eq!(
        (
            string(a1, "expected_signature_check"),
            string(a3, "expected_signature_check")
        ),
        ("valid", "valid")
    );
    assert_eq!(string(a5, "expected_signature_check"), "reject");

    // A.1, HS256 with a 64-byte key. The key has no kid/alg; we give it both.
    let a1_jwk = &a1["jwk"];
    let a1_secret = b64url(string(a1_jwk, "k"));
    assert_eq!(a1_secret.len(), 64);
    let a1_tag: [u8; 32] = b64url(string(a1, "signature_b64url"))
        .try_into()
        .expect("32-byte tag");
    let a1_input = string(a1, "signing_input").as_bytes();

    // A.3, ES256. Its signature is 64 bytes r||s and has a high S: it verifies because we
    // do not enforce low-S (RFC 7515/7518 do not require it).
    let a3_public = &a3["public_jwk"];
    let mut a3_point = [0u8; 65];
    a3_point[0] = 0x04;
    a3_point[1..33].copy_from_slice(&b64url(string(a3_public, "x")));
    a3_point[33..].copy_from_slice(&b64url(string(a3_public, "y")));
    let a3_sig: [u8; 64] = b64url(string(a3, "signature_b64url"))
        .try_into()
        .expect("64-byte sig");
    assert_eq!(a3_sig[..32], hex(string(a3, "signature_r_hex"))[..]);
    assert_eq!(a3_sig[32..], hex(string(a3, "signature_s_hex"))[..]);
    assert!(is_high_s(&a3_sig), "the A.3 example is high-S");
    let a3_input = string(a3, "signing_input").as_bytes();

    for backend in &backends {
        let backend = *backend;
        // Signature layer, backend primitives directly.
        let hs = backend.hs256_key(&a1_secret);
        assert!(hs.verify(a1_input, &a1_tag), "A.1 via {}", backend.name());
        assert_eq!(
            hs.sign(a1_input),
            a1_tag,
            "A.1 MAC recomputes via {}",
            backend.name()
        );
        let es = backend
            .es256_verifier(&a3_point)
            .expect("A.3 point is on the curve");
        assert!(es.verify(a3_input, &a3_sig), "A.3 via {}", backend.name());
        let mut tampered = a3_sig;
        tampered[63] ^= 1;
        assert!(
            !es.verify(a3_input, &tampered),
            "A.3 tampered via {}",
            backend.name()
        );

        // Full path. The A.1 and A.3 headers carry no `kid` (A.1 also has typ JWT), and
        // our header rules require kid: jws::verify refuses them as malformed_header even
        // with the key trusted under some kid, because the token cannot name it.
        let trusted = [
            with_kid_and_alg(a1_jwk, "rfc7515-A.1", "HS256"),
            with_kid_and_alg(a3_public, "rfc7515-A.3", "ES256"),
        ];
        let store = store_from_jwks(&trusted, "rfc7515.json", backend).expect("both keys load");
        for ex in [a1, a3] {
            let reason = rejection(jws::verify(
                string(ex, "compact").as_bytes(),
                &store,
                MAX_JWS_BYTES,
            ));
            assert_eq!(
                reason,
                Reason::MalformedHeader,
                "{} via {}",
                ex["id"],
                backend.name()
            );
        }
        // The same keys do verify end to end once a header names them.
        assert_resigned_example_verifies(a1, a1_jwk, a1_jwk, Alg::Hs256, backend);
        assert_resigned_example_verifies(a3, &a3["jwk"], a3_public, Alg::Es256, backend);
        // A trust store refuses the A.3 JWK with its private `d`.
        let private = store_from_jwk(
            &with_kid_and_alg(&a3["jwk"], "rfc7515-A.3", "ES256"),
            "rfc7515.json",
            backend,
        );
        assert!(
            private.is_err(),
            "a private EC key in a trust store is refused"
        );

        // A.5: unsecured JWS, alg none.
        let reason = rejection(jws::verify(
            string(a5, "compact").as_bytes(),
            &store,
            MAX_JWS_BYTES,
        ));
        assert_eq!(reason, Reason::AlgNotAllowed, "A.5 via {}", backend.name());
    }
}
