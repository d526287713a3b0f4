//! Governance rules per tenant and environment (`[[tenants.rules]]`, DESIGN.md
//! "Governance"): who must approve, what `scope` may name, which sandbox tier and
//! network mode the environment needs. Policy types only; the checks live in
//! `approvals` (quorum) and `verify` (scope, tier).

use std::collections::HashSet;
use std::fmt;

/// A sandbox tier an environment may require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// gVisor (`runsc`).
    Gvisor,
    /// Kata Containers (through containerd).
    Kata,
}

impl Tier {
    pub fn from_name(name: &str) -> Option<Tier> {
        match name {
            "gvisor" => Some(Tier::Gvisor),
            "kata" => Some(Tier::Kata),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::Gvisor => "gvisor",
            Tier::Kata => "kata",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The network modes a manifest's `scope.network` may name.
pub const NETWORK_MODES: [&str; 2] = ["none", "targets"];

/// A `scope.targets` pattern: an exact URL, or a prefix ending in one `*` that
/// matches any rest (`https://auth.prod.acme.example/*`). No other wildcard, so a
/// pattern can never reach into another host by accident of globbing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPattern {
    text: String,
}

impl TargetPattern {
    pub fn parse(text: &str) -> Result<TargetPattern, TargetPatternError> {
        let body = text.strip_suffix('*').unwrap_or(text);
        if body.contains('*') {
            return Err(TargetPatternError::Wildcard);
        }
        let Some((scheme, rest)) = body.split_once("://") else {
            return Err(TargetPatternError::NotAUrl);
        };
        if scheme.is_empty() || rest.is_empty() {
            return Err(TargetPatternError::NotAUrl);
        }
        // A prefix must end its host: `https://auth.example*` would match
        // `https://auth.example.evil`.
        if text.ends_with('*') && !rest.contains('/') {
            return Err(TargetPatternError::OpenHost);
        }
        if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(TargetPatternError::Whitespace);
        }
        Ok(TargetPattern {
            text: text.to_string(),
        })
    }

    pub fn matches(&self, target: &str) -> bool {
        match self.text.strip_suffix('*') {
            Some(prefix) => target.starts_with(prefix),
            None => target == self.text,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetPatternError {
    #[error("`*` is allowed only as the last character")]
    Wildcard,
    #[error("not a URL (scheme://...)")]
    NotAUrl,
    #[error("a `*` pattern must include the path's `/` after the host")]
    OpenHost,
    #[error("whitespace or control character")]
    Whitespace,
}

/// One `[[tenants.rules]]` entry. A field left out falls back to the tenant's v1
/// behaviour: `min_approvals` to the tenant's, no roles, unsigned approvals count,
/// the signer may approve, any targets and actions, network `none` only, any tier.
#[derive(Debug, Clone)]
pub struct Rule {
    pub environment: String,
    /// Distinct approvers needed, none of them the author.
    pub min_approvals: Option<u32>,
    /// Roles that must each be held by a distinct counted approver.
    pub roles: Vec<String>,
    /// Only approvals in `approvals/*.jws` count; manifest entries are the record.
    pub signed_approvals: bool,
    /// `false`: the approver whose key signed the capsule does not count.
    pub signer_may_approve: bool,
    /// Patterns every `scope.targets` entry must match (`None`: not restricted).
    pub targets: Option<Vec<TargetPattern>>,
    /// Actions `scope.actions` may name (`None`: not restricted).
    pub actions: Option<HashSet<String>>,
    /// Network modes `scope.network` may name (`None`: `none` only).
    pub network: Option<HashSet<String>>,
    /// The sandbox tier this environment needs on the host.
    pub tier: Option<Tier>,
}

impl Rule {
    /// The `scope` rules of this environment (`scope_violation`): every target within
    /// a pattern, every action allowed, the network mode allowed.
    pub fn check_scope(&self, scope: &crate::manifest::Scope) -> Result<(), ScopeRuleError> {
        if let Some(patterns) = &self.targets {
            if let Some(t) = scope
                .targets
                .iter()
                .find(|t| !patterns.iter().any(|p| p.matches(t)))
            {
                return Err(ScopeRuleError::Target {
                    target: t.clone(),
                    environment: self.environment.clone(),
                });
            }
        }
        if let Some(actions) = &self.actions {
            if let Some(a) = scope.actions.iter().find(|a| !actions.contains(*a)) {
                return Err(ScopeRuleError::Action {
                    action: a.clone(),
                    environment: self.environment.clone(),
                });
            }
        }
        if let Some(modes) = &self.network {
            if !modes.contains(&scope.network) {
                return Err(ScopeRuleError::Network {
                    network: scope.network.clone(),
                    environment: self.environment.clone(),
                });
            }
        }
        Ok(())
    }

    /// The tier rule (`tier_unavailable`): the environment's tier must be one this
    /// host provides.
    pub fn check_tier(&self, host_tiers: &[Tier]) -> Result<(), TierError> {
        match self.tier {
            Some(t) if !host_tiers.contains(&t) => Err(TierError::Unavailable {
                environment: self.environment.clone(),
                needed: t,
                host: host_tiers.to_vec(),
            }),
            _ => Ok(()),
        }
    }
}

/// Why the requested scope is outside the environment's rule (`scope_violation`).
/// The manifest's text is kept as given and escaped when shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeRuleError {
    /// A `scope.targets` entry matches none of the rule's patterns.
    #[error("target `{}` is outside the targets allowed in `{environment}`", .target.escape_debug())]
    Target { target: String, environment: String },
    /// A `scope.actions` entry the rule does not allow.
    #[error("action `{}` is not allowed in `{environment}`", .action.escape_debug())]
    Action { action: String, environment: String },
    /// A `scope.network` mode the rule does not allow.
    #[error("network `{}` is not allowed in `{environment}`", .network.escape_debug())]
    Network {
        network: String,
        environment: String,
    },
}

/// Why this host cannot run the environment (`tier_unavailable`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TierError {
    /// The environment's tier is not among the tiers this host provides (`host`).
    #[error(
        "environment `{environment}` needs the {needed} sandbox tier; this host provides {}",
        tier_list(.host)
    )]
    Unavailable {
        environment: String,
        needed: Tier,
        host: Vec<Tier>,
    },
}

fn tier_list(tiers: &[Tier]) -> String {
    if tiers.is_empty() {
        "none".to_string()
    } else {
        tiers
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_patterns_are_exact_or_a_path_prefix() {
        let p = TargetPattern::parse("https://auth.prod.acme.example/*").unwrap();
        assert!(p.matches("https://auth.prod.acme.example/token"));
        assert!(!p.matches("https://auth.prod.acme.example.evil/token"));
        assert!(!p.matches("https://auth.staging.acme.example/token"));
        let exact = TargetPattern::parse("https://a.example/token").unwrap();
        assert!(exact.matches("https://a.example/token"));
        assert!(!exact.matches("https://a.example/token2"));
        for bad in [
            "https://auth.example*",
            "https://*.example/",
            "auth.example/*",
            "https:// a.example/",
            "",
        ] {
            assert!(TargetPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tiers_have_one_name_each() {
        for t in [Tier::Gvisor, Tier::Kata] {
            assert_eq!(Tier::from_name(t.as_str()), Some(t));
        }
        assert_eq!(Tier::from_name("runsc"), None);
    }

    #[test]
    fn typed_errors_keep_the_texts_denials_carry() {
        let tier = |host: Vec<Tier>| TierError::Unavailable {
            environment: "prod".into(),
            needed: Tier::Kata,
            host,
        };
        assert_eq!(
            tier(vec![]).to_string(),
            "environment `prod` needs the kata sandbox tier; this host provides none"
        );
        assert_eq!(
            tier(vec![Tier::Gvisor, Tier::Gvisor]).to_string(),
            "environment `prod` needs the kata sandbox tier; this host provides gvisor, gvisor"
        );
        let target = ScopeRuleError::Target {
            target: "https://x\n".into(),
            environment: "prod".into(),
        };
        assert_eq!(
            target.to_string(),
            "target `https://x\\n` is outside the targets allowed in `prod`"
        );
    }
}
