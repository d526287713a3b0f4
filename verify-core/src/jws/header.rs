//! The JWS protected header: `alg`, `kid`, optional `typ`, and nothing else.

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};

use crate::decision::{Alg, Reason};

/// The only `typ` accepted, when `typ` is present.
pub const CAPSULE_TYP: &str = "capsule+jws";

/// Members that change how a JWS is verified or where its key comes from: a gateway
/// that trusts only its own store must refuse them, not ignore them.
pub const FORBIDDEN_MEMBERS: [&str; 7] = ["jku", "x5u", "jwk", "x5c", "crit", "b64", "zip"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub alg: Alg,
    pub kid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header is not a JSON object: {0}")]
    Json(String),
    #[error("header member `{0}` is forbidden")]
    Forbidden(&'static str),
    #[error("header member `{0}` is not allowed")]
    Unknown(String),
    #[error("header member `{0}` appears twice")]
    Duplicate(&'static str),
    #[error("header has no `{0}`")]
    Missing(&'static str),
    #[error("header `{0}` is invalid: {1}")]
    Invalid(&'static str, &'static str),
    #[error("alg `{0}` is not allowed (ES256 or HS256 only)")]
    AlgNotAllowed(String),
}

impl HeaderError {
    pub fn reason(&self) -> Reason {
        match self {
            HeaderError::Forbidden(_) => Reason::HeaderForbidden,
            HeaderError::AlgNotAllowed(_) => Reason::AlgNotAllowed,
            _ => Reason::MalformedHeader,
        }
    }
}

/// Parses the decoded header bytes.
pub fn parse_header(json: &[u8]) -> Result<Header, HeaderError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let raw = de::Deserializer::deserialize_map(&mut de, HeaderVisitor)
        .map_err(|e| HeaderError::Json(e.to_string()))?;
    de.end().map_err(|e| HeaderError::Json(e.to_string()))?;
    let raw = raw?;
    let alg_name = raw.alg.ok_or(HeaderError::Missing("alg"))?;
    let alg = Alg::from_name(&alg_name).ok_or(HeaderError::AlgNotAllowed(alg_name))?;
    let kid = raw.kid.ok_or(HeaderError::Missing("kid"))?;
    if kid.is_empty() || kid.len() > 256 || kid.chars().any(char::is_control) {
        return Err(HeaderError::Invalid(
            "kid",
            "must be 1 to 256 printable characters",
        ));
    }
    if let Some(typ) = raw.typ {
        if typ != CAPSULE_TYP {
            return Err(HeaderError::Invalid("typ", "must be `capsule+jws`"));
        }
    }
    Ok(Header { alg, kid })
}

#[derive(Default)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    typ: Option<String>,
}

/// Walks the members one by one so that a forbidden member, an unknown member and a
/// duplicate are each told apart (a derived struct would fold them into one error).
/// The visitor's own error type carries JSON problems; header rule violations travel
/// in the inner `Result` so that their reason code survives.
struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Result<RawHeader, HeaderError>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut raw = RawHeader::default();
        // The first rule broken wins, but the object is still read to its end:
        // serde_json checks that the visitor consumed the whole map.
        let mut problem: Option<HeaderError> = None;
        while let Some(name) = map.next_key::<String>()? {
            if problem.is_some() {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let (member, slot): (&'static str, &mut Option<String>) = match name.as_str() {
                "alg" => ("alg", &mut raw.alg),
                "kid" => ("kid", &mut raw.kid),
                "typ" => ("typ", &mut raw.typ),
                other => {
                    map.next_value::<IgnoredAny>()?;
                    problem = Some(match FORBIDDEN_MEMBERS.iter().find(|f| **f == other) {
                        Some(f) => HeaderError::Forbidden(f),
                        None => HeaderError::Unknown(truncate(other)),
                    });
                    continue;
                }
            };
            if slot.is_some() {
                map.next_value::<IgnoredAny>()?;
                problem = Some(HeaderError::Duplicate(member));
                continue;
            }
            match map.next_value::<serde_json::Value>()? {
                serde_json::Value::String(s) => *slot = Some(s),
                _ => problem = Some(HeaderError::Invalid(member, "must be a string")),
            }
        }
        Ok(match problem {
            Some(p) => Err(p),
            None => Ok(raw),
        })
    }
}

/// Member names from untrusted input are echoed in details; keep them short.
fn truncate(name: &str) -> String {
    name.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(json: &str) -> Reason {
        parse_header(json.as_bytes()).unwrap_err().reason()
    }

    #[test]
    fn accepts_minimal_and_typed_headers() {
        let h = parse_header(br#"{"alg":"ES256","kid":"k1"}"#).unwrap();
        assert_eq!(
            h,
            Header {
                alg: Alg::Es256,
                kid: "k1".into()
            }
        );
        assert!(parse_header(br#"{"typ":"capsule+jws","kid":"k","alg":"HS256"}"#).is_ok());
    }

    #[test]
    fn refuses_every_rule_breaker_with_its_reason() {
        assert_eq!(reason(r#"{"alg":"none","kid":"k"}"#), Reason::AlgNotAllowed);
        assert_eq!(
            reason(r#"{"alg":"RS256","kid":"k"}"#),
            Reason::AlgNotAllowed
        );
        assert_eq!(
            reason(r#"{"alg":"es256","kid":"k"}"#),
            Reason::AlgNotAllowed
        );
        for m in FORBIDDEN_MEMBERS {
            let json = format!(r#"{{"alg":"ES256","kid":"k","{m}":"x"}}"#);
            assert_eq!(reason(&json), Reason::HeaderForbidden, "{m}");
        }
        assert_eq!(
            reason(r#"{"alg":"ES256","kid":"k","cty":"x"}"#),
            Reason::MalformedHeader
        );
        assert_eq!(
            reason(r#"{"alg":"ES256","kid":"k","kid":"j"}"#),
            Reason::MalformedHeader
        );
        assert_eq!(
            reason(r#"{"alg":"ES256","alg":"ES256","kid":"k"}"#),
            Reason::MalformedHeader
        );
        assert_eq!(reason(r#"{"alg":"ES256"}"#), Reason::MalformedHeader);
        assert_eq!(reason(r#"{"kid":"k"}"#), Reason::MalformedHeader);
        assert_eq!(
            reason(r#"{"alg":"ES256","kid":7}"#),
            Reason::MalformedHeader
        );
        assert_eq!(
            reason(r#"{"alg":"ES256","kid":""}"#),
            Reason::MalformedHeader
        );
        assert_eq!(
            reason(r#"{"alg":"ES256","kid":"k","typ":"JWT"}"#),
            Reason::MalformedHeader
        );
        assert_eq!(reason(r#"["ES256"]"#), Reason::MalformedHeader);
        assert_eq!(
            reason(r#"{"alg":"ES256","kid":"k"} {}"#),
            Reason::MalformedHeader
        );
        assert_eq!(
            reason(r#"{"alg":"ES256","kid":"k""#),
            Reason::MalformedHeader
        );
    }
}
