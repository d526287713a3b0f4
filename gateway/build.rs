//! Bakes the commit into `--version`: `git rev-parse --short HEAD` when the source is a
//! git checkout (CI builds from a clone), `unknown` otherwise (a source tarball).

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CAPSULE_GATEWAY_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points to (a
    // commit) and packed-refs. `--git-path` resolves them in a worktree too, where
    // `.git` is a file. Only existing paths are named: a missing one would make cargo
    // rerun this script on every build.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = PathBuf::from(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
