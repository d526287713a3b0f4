//! SPIFFE IDs and the runner patterns of manifests and policy.
//!
//! Follows the SPIFFE ID spec: `spiffe://<trust domain>/<path>`, the trust domain in
//! lowercase letters, digits, `.`, `-`, `_`; path segments of letters, digits, `.`,
//! `-`, `_`, none empty, `.` or `..`; no port, userinfo, query, fragment or percent
//! encoding; at most 2048 bytes, the trust domain at most 255. A pattern may end in one
//! whole `*` segment, which matches exactly one segment (never a deeper path).

use std::fmt;

pub const MAX_SPIFFE_ID_BYTES: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerPattern {
    /// Everything before the `*` (ending in `/`) or the whole ID.
    prefix: String,
    wildcard: bool,
}

/// SPIFFE ID spec 2.1: a trust domain name is at most 255 bytes.
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN_BYTES
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Splits `spiffe://td/path` into trust domain and path segments.
fn split_id(s: &str) -> Result<(&str, Vec<&str>), &'static str> {
    if s.len() > MAX_SPIFFE_ID_BYTES {
        return Err("longer than 2048 bytes");
    }
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or("does not start with spiffe://")?;
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if !valid_trust_domain(td) {
        return Err("trust domain must be 1 to 255 lowercase letters, digits, `.`, `-`, `_`");
    }
    let segments = match path {
        None => Vec::new(),
        Some(p) => p.split('/').collect(),
    };
    Ok((td, segments))
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, &'static str> {
        let (_, segments) = split_id(s)?;
        if segments.iter().any(|seg| !valid_segment(seg)) {
            return Err(
                "path segments must be non-empty letters, digits, `.`, `-`, `_` (not `.` or `..`)",
            );
        }
        Ok(SpiffeId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').next().unwrap_or(rest)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl RunnerPattern {
    pub fn parse(s: &str) -> Result<RunnerPattern, &'static str> {
        let (_, segments) = split_id(s)?;
        let (last, init) = match segments.split_last() {
            Some(parts) => parts,
            None => {
                return Ok(RunnerPattern {
                    prefix: s.to_string(),
                    wildcard: false,
                })
            }
        };
        if init.iter().any(|seg| !valid_segment(seg)) {
            return Err("`*` is allowed only as a whole last path segment");
        }
        if *last == "*" {
            return Ok(RunnerPattern {
                prefix: s[..s.len() - 1].to_string(),
                wildcard: true,
            });
        }
        if !valid_segment(last) {
            return Err("`*` is allowed only as a whole last path segment");
        }
        Ok(RunnerPattern {
            prefix: s.to_string(),
            wildcard: false,
        })
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        if !self.wildcard {
            return id.0 == self.prefix;
        }
        match id.0.strip_prefix(&self.prefix) {
            // Exactly one more segment: `spiffe://td/runner/*` does not match
            // `spiffe://td/runner/a/b`.
            Some(rest) => !rest.is_empty() && !rest.contains('/'),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in [
            "spiffe://acme.example/runner/1",
            "spiffe://td",
            "spiffe://a-b_c.d/x.y/z_1",
        ] {
            assert!(SpiffeId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "spiffe://ACME.example/r",
            "spiffe://acme.example/",
            "spiffe://acme.example//r",
            "spiffe://acme.example/r/../x",
            "spiffe://acme.example/r/./x",
            "spiffe://a.example/r%20",
            "spiffe://a.example:443/r",
            "spiffe://user@a.example/r",
            "spiffe://a.example/r?q",
            "spiffe://a.example/r#f",
            "http://a.example/r",
            "spiffe://",
            "spiffe://a.example/*",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        assert!(SpiffeId::parse(&long).is_err());
        let long_td = format!("spiffe://{}/r", "t".repeat(256));
        assert!(SpiffeId::parse(&long_td).is_err());
        assert!(SpiffeId::parse(&format!("spiffe://{}/r", "t".repeat(255))).is_ok());
    }

    #[test]
    fn patterns() {
        let p = RunnerPattern::parse("spiffe://acme.example/runner/*").unwrap();
        let id = |s| SpiffeId::parse(s).unwrap();
        assert!(p.matches(&id("spiffe://acme.example/runner/r1")));
        assert!(!p.matches(&id("spiffe://acme.example/runner/r1/x")));
        assert!(!p.matches(&id("spiffe://acme.example/runner")));
        assert!(!p.matches(&id("spiffe://acme.example/runnerx/r1")));
        assert!(!p.matches(&id("spiffe://evil.example/runner/r1")));
        let exact = RunnerPattern::parse("spiffe://acme.example/runner/r1").unwrap();
        assert!(exact.matches(&id("spiffe://acme.example/runner/r1")));
        assert!(!exact.matches(&id("spiffe://acme.example/runner/r2")));
        for bad in [
            "spiffe://acme.example/*/r",
            "spiffe://acme.example/run*",
            "spiffe://*.example/r",
        ] {
            assert!(RunnerPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
