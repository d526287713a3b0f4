//! The selfcheck's result: named checks, each with a verdict and a detail.

use std::time::Duration;

use serde::Serialize;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The guarantee holds.
    Pass,
    /// The guarantee does not hold: the selfcheck fails (exit 1, `/readyz` 503).
    Fail,
    /// Reported as it is, not a failure: e.g. AppArmor on a kernel without it, or a
    /// check that has nothing to check in this configuration (no TPM configured).
    Notice,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Notice => "notice",
        }
    }
}

/// One check: a stable dotted name (`canary.unsigned`, `tier.gvisor.egress`,
/// `host.svid`, `alignment`), its verdict and a one-line detail.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
}

/// Every check of one selfcheck run, in the order they ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    #[serde(serialize_with = "as_millis")]
    pub elapsed: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Report {
    pub fn pass(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.push(name, Verdict::Pass, detail);
    }

    pub fn fail(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.push(name, Verdict::Fail, detail);
    }

    pub fn notice(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.push(name, Verdict::Notice, detail);
    }

    pub fn push(&mut self, name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            verdict,
            detail: detail.into(),
        });
    }

    /// True when no check failed (notices do not fail).
    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.verdict == Verdict::Fail)
    }

    /// The human form: one line per check, then a summary line.
    pub fn to_text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<6} {:<width$}  {}\n",
                c.verdict.as_str().to_uppercase(),
                c.name,
                c.detail
            ));
        }
        let failed = self.failures().count();
        out.push_str(&format!(
            "selfcheck: {} ({} checks, {} failed, {} ms)\n",
            if failed == 0 { "PASS" } else { "FAIL" },
            self.checks.len(),
            failed,
            self.elapsed.as_millis()
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_does_not_fail_and_a_fail_does() {
        let mut r = Report::default();
        r.pass("a", "ok");
        r.notice("b", "not available");
        assert!(r.passed());
        r.fail("c", "broken");
        assert!(!r.passed());
        assert_eq!(
            r.failures().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert!(r.to_text().contains("selfcheck: FAIL (3 checks, 1 failed"));
    }
}
