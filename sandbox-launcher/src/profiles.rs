//! The security profiles pinned into every OCI config: the seccomp profile, kept as
//! data with a reason per allowed system call (`resources/seccomp/capsule.json`,
//! after firecracker's `resources/seccomp`), and the AppArmor profile name; and what
//! the host does with each, for the evidence.
//!
//! The profile is compiled into the launcher (`include_str!`), so the one that is
//! pinned is the one that was reviewed with the code; its sha256 goes into the
//! evidence. Who enforces it depends on the runtime: the host kernel under runc
//! (containerd's runc shim), gVisor's sentry under runsc (`--oci-seccomp`), the
//! guest kernel under Kata.

use std::collections::HashSet;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscallBuilder,
};
use serde::{Deserialize, Serialize};

use crate::error::BundleError;

/// The profile's text, exactly as reviewed.
pub const SECCOMP_PROFILE: &str = include_str!("../resources/seccomp/capsule.json");

/// The AppArmor profile every capsule runs under where the host enforces AppArmor.
pub const APPARMOR_PROFILE: &str = "capsule-gateway-capsule";

/// The profile file's schema.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompProfile {
    pub schema: String,
    pub name: String,
    pub description: String,
    /// What every system call not allowed by a rule gets.
    pub default_errno: Errno,
    pub architectures: Vec<String>,
    pub rules: Vec<SeccompRule>,
    /// Notable calls left out on purpose, with the reason (documentation: they fail
    /// with `default_errno` like every call no rule names).
    pub omitted: Vec<Omitted>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompRule {
    pub reason: String,
    pub syscalls: Vec<String>,
    /// Argument conditions, all of which must hold for the rule to apply.
    #[serde(default)]
    pub args: Vec<SeccompArg>,
    /// Fail these calls with this errno instead of allowing them.
    #[serde(default)]
    pub errno: Option<Errno>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompArg {
    pub index: usize,
    pub op: ArgOp,
    pub value: u64,
    #[serde(default)]
    pub value_two: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgOp {
    Eq,
    Ne,
    MaskedEq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Errno {
    EPERM,
    ENOSYS,
}

impl Errno {
    fn code(self) -> u32 {
        match self {
            Errno::EPERM => 1,
            Errno::ENOSYS => 38,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Omitted {
    pub reason: String,
    pub syscalls: Vec<String>,
}

/// The profile, parsed and checked: every rule has a reason, no call is named twice,
/// no omitted call is allowed.
pub fn seccomp_profile() -> Result<SeccompProfile, BundleError> {
    let p: SeccompProfile =
        serde_json::from_str(SECCOMP_PROFILE).map_err(|e| BundleError::Seccomp(e.to_string()))?;
    let bad = |why: String| Err(BundleError::Seccomp(why));
    if p.schema != "capsule-gateway/seccomp/v1" {
        return bad(format!("unknown schema `{}`", p.schema));
    }
    let mut named = HashSet::new();
    for r in &p.rules {
        if r.reason.trim().is_empty() || r.syscalls.is_empty() {
            return bad(format!(
                "a rule without a reason or calls: {:?}",
                r.syscalls
            ));
        }
        for s in &r.syscalls {
            if !named.insert(s.as_str()) {
                return bad(format!("`{s}` is named by two rules"));
            }
        }
    }
    for o in &p.omitted {
        if o.reason.trim().is_empty() {
            return bad(format!("omitted calls without a reason: {:?}", o.syscalls));
        }
        if let Some(s) = o.syscalls.iter().find(|s| named.contains(s.as_str())) {
            return bad(format!("`{s}` is both omitted and allowed"));
        }
    }
    if p.architectures != ["x86_64"] {
        return bad(format!("architectures {:?}: only x86_64", p.architectures));
    }
    Ok(p)
}

/// The profile as the OCI config's `linux.seccomp`.
pub fn oci_seccomp(p: &SeccompProfile) -> Result<LinuxSeccomp, BundleError> {
    let mut syscalls = Vec::with_capacity(p.rules.len());
    for r in &p.rules {
        let mut b = LinuxSyscallBuilder::default().names(r.syscalls.clone());
        b = match r.errno {
            Some(e) => b
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(e.code()),
            None => b.action(LinuxSeccompAction::ScmpActAllow),
        };
        if !r.args.is_empty() {
            let args = r
                .args
                .iter()
                .map(|a| {
                    let op = match a.op {
                        ArgOp::Eq => LinuxSeccompOperator::ScmpCmpEq,
                        ArgOp::Ne => LinuxSeccompOperator::ScmpCmpNe,
                        ArgOp::MaskedEq => LinuxSeccompOperator::ScmpCmpMaskedEq,
                    };
                    let mut arg = LinuxSeccompArgBuilder::default()
                        .index(a.index)
                        .value(a.value)
                        .op(op);
                    if let Some(v) = a.value_two {
                        arg = arg.value_two(v);
                    }
                    arg.build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            b = b.args(args);
        }
        syscalls.push(b.build()?);
    }
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(p.default_errno.code())
        .architectures(vec![Arch::ScmpArchX86_64])
        .syscalls(syscalls)
        .build()?)
}

/// What the evidence says about the profiles of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFacts {
    pub seccomp: SeccompFacts,
    pub apparmor: AppArmorFacts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompFacts {
    /// The profile's `name`.
    pub profile: String,
    /// `sha256:<hex>` of the profile file's exact bytes.
    pub profile_sha256: String,
    /// Whether the filter is applied to the capsule's system calls.
    pub enforced: bool,
    /// Who applies it: `kernel` (runc), `gvisor` (runsc `--oci-seccomp`),
    /// `kata-guest` (the guest kernel, through the Kata agent).
    pub enforced_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppArmorFacts {
    /// The pinned profile name.
    pub profile: String,
    /// Whether `process.apparmorProfile` is in the OCI config (only where the host
    /// has the profile loaded: a runtime refuses a profile it cannot apply).
    pub in_config: bool,
    pub enforced: bool,
    /// What the host offers, in words (`not available: this kernel has no AppArmor`).
    pub host: String,
}

/// Where the host stands on AppArmor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppArmorHost {
    /// The kernel has no AppArmor (no `/sys/module/apparmor`, or it is disabled).
    NotAvailable,
    /// AppArmor is on, but the pinned profile is not loaded.
    ProfileNotLoaded,
    /// AppArmor is on and the pinned profile is loaded.
    Loaded,
}

impl AppArmorHost {
    /// Reads the host: `/sys/module/apparmor/parameters/enabled` and the loaded
    /// profiles in `/sys/kernel/security/apparmor/profiles`.
    pub fn detect() -> AppArmorHost {
        let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|s| s.trim() == "Y");
        if !enabled {
            return AppArmorHost::NotAvailable;
        }
        let loaded =
            std::fs::read_to_string("/sys/kernel/security/apparmor/profiles").is_ok_and(|s| {
                s.lines()
                    .any(|l| l.split(" (").next() == Some(APPARMOR_PROFILE))
            });
        if loaded {
            AppArmorHost::Loaded
        } else {
            AppArmorHost::ProfileNotLoaded
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            AppArmorHost::NotAvailable => "not available: this kernel has no AppArmor",
            AppArmorHost::ProfileNotLoaded => "AppArmor is enabled, but the profile is not loaded",
            AppArmorHost::Loaded => "enforced: the profile is loaded",
        }
    }
}

/// Whether the host kernel can apply seccomp filters that return an errno
/// (`/proc/sys/kernel/seccomp/actions_avail`, Linux 4.14+).
pub fn kernel_seccomp() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail")
        .is_ok_and(|s| s.split_whitespace().any(|a| a == "errno"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_parses_and_every_allowed_call_has_one_reason() {
        let p = seccomp_profile().expect("profile");
        assert!(p.rules.iter().all(|r| !r.reason.is_empty()));
        let allowed: Vec<&str> = p
            .rules
            .iter()
            .filter(|r| r.errno.is_none())
            .flat_map(|r| r.syscalls.iter().map(String::as_str))
            .collect();
        // What a shell and the probe cannot do without.
        for needed in ["execve", "read", "write", "connect", "exit_group", "wait4"] {
            assert!(allowed.contains(&needed), "{needed}");
        }
        // The call the tests use to show the filter denies.
        for omitted in ["process_vm_readv", "ptrace", "unshare", "bpf"] {
            assert!(!allowed.contains(&omitted), "{omitted}");
        }
        let oci = oci_seccomp(&p).expect("oci");
        assert_eq!(oci.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(oci.default_errno_ret(), Some(1));
    }
}
