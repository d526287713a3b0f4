//! Trust files others could change: each attack loosens one file or directory of a
//! [`World`](crate::World). The library tests and the CLI tests run every one and
//! expect a configuration error naming the file.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::World;

/// The uid of `nobody`: neither root nor the tests' user.
pub const OTHER_UID: u32 = 65534;

#[derive(Debug, Clone, Copy)]
pub struct TrustAttack {
    pub name: &'static str,
    /// Loosens the world; returns the path the refusal must name.
    pub apply: fn(&World) -> PathBuf,
    /// What the message tells the operator to run.
    pub fix: &'static str,
}

fn chmod(p: &std::path::Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(p: &std::path::Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), None).unwrap_or_else(|e| {
        panic!(
            "chown {} to {uid} (the tests run as root): {e}",
            p.display()
        )
    });
}

pub const TRUST_ATTACKS: &[TrustAttack] = &[
    TrustAttack {
        name: "world-writable-policy",
        apply: |w| {
            chmod(&w.policy_path(), 0o666);
            w.policy_path()
        },
        fix: "chmod go-w",
    },
    TrustAttack {
        name: "group-writable-jwks",
        apply: |w| {
            let p = w.path("trusted.jwks.json");
            chmod(&p, 0o620);
            p
        },
        fix: "chmod go-w",
    },
    TrustAttack {
        name: "world-writable-parent-directory",
        apply: |w| {
            chmod(w.dir.path(), 0o777);
            w.policy_path()
        },
        fix: "chmod go-w",
    },
    TrustAttack {
        name: "group-readable-hs256-jwks",
        apply: |w| {
            let p = w.path("trusted.jwks.json");
            chmod(&p, 0o640);
            p
        },
        fix: "chmod 600",
    },
    TrustAttack {
        name: "policy-owned-by-another-user",
        apply: |w| {
            chown(&w.policy_path(), OTHER_UID);
            w.policy_path()
        },
        fix: "chown",
    },
    TrustAttack {
        name: "jwks-owned-by-another-user",
        apply: |w| {
            let p = w.path("trusted.jwks.json");
            chown(&p, OTHER_UID);
            p
        },
        fix: "chown",
    },
    TrustAttack {
        name: "parent-directory-owned-by-another-user",
        apply: |w| {
            chown(w.dir.path(), OTHER_UID);
            w.policy_path()
        },
        fix: "chown",
    },
    TrustAttack {
        // The policy is reached through a symlink into a directory anyone can write.
        name: "policy-symlink-into-world-writable-directory",
        apply: |w| {
            let open = w.path("open");
            fs::create_dir_all(&open).expect("mkdir");
            chmod(&open, 0o777);
            let target = open.join("policy.toml");
            fs::rename(w.policy_path(), &target).expect("move policy");
            fs::copy(w.path("trusted.jwks.json"), open.join("trusted.jwks.json")).expect("copy");
            chmod(&open.join("trusted.jwks.json"), 0o600);
            std::os::unix::fs::symlink(&target, w.policy_path()).expect("symlink");
            w.policy_path()
        },
        fix: "chmod go-w",
    },
];
