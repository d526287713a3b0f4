//! Packaging through the real binary: `--version` names the commit, `--alg` takes any
//! case, shell completions and man pages come from the parser itself, every flag of
//! every command has help text, and the systemd units in examples/systemd/ pass
//! `systemd-analyze verify` (Debian package `systemd`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use capsule_gateway::cli::Cli;
use clap::CommandFactory;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run capsule-gateway")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[test]
fn version_names_the_commit_of_head() {
    let git = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo())
        .output()
        .expect("git (Debian package `git`) runs");
    assert!(git.status.success(), "the tests run in a git checkout");
    let commit = String::from_utf8(git.stdout).expect("utf-8");
    let commit = commit.trim();
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    let version = stdout(&out);
    assert!(
        version.starts_with(&format!("capsule-gateway {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(
        version.contains(&format!("(commit {commit})")),
        "`--version` must name HEAD {commit}: {version}"
    );
}

#[test]
fn keygen_alg_is_case_insensitive() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (alg, kid) in [
        ("es256", "lower-es"),
        ("Es256", "mixed-es"),
        ("hs256", "lower-hs"),
    ] {
        let out = run(&[
            "keygen",
            "--alg",
            alg,
            "--kid",
            kid,
            "--out",
            dir.path().to_str().expect("utf-8"),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "--alg {alg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let jwk: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("{kid}.private.jwk.json"))).expect("key"),
        )
        .expect("JSON");
        assert_eq!(jwk["alg"], alg.to_ascii_uppercase(), "{jwk}");
    }
    // Still a closed set: anything else is a usage error.
    let out = run(&["keygen", "--alg", "rs256", "--kid", "k", "--out", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn completions_for_bash_zsh_and_fish_cover_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = stdout(&out);
        assert!(
            // fish spells flags `-l policy`, bash and zsh `--policy`.
            script.contains("verify") && script.contains("admit") && script.contains("policy"),
            "{shell} completions must know the commands and their flags"
        );
    }
    let out = run(&["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_are_roff_for_the_tool_and_each_command() {
    let out = run(&["man"]);
    assert_eq!(out.status.code(), Some(0));
    let page = stdout(&out);
    assert!(page.starts_with(".ie") || page.starts_with(".TH"), "{page}");
    assert!(page.contains(".TH capsule-gateway 1"), "{page}");
    assert!(page.contains("verify"), "the top page lists the commands");

    let out = run(&["man", "attest", "seal"]);
    assert_eq!(out.status.code(), Some(0));
    let page = stdout(&out);
    assert!(
        page.contains(".TH capsule-gateway-attest-seal 1") && page.contains("(commit "),
        "{page}"
    );
    assert!(page.contains("pcrs"), "{page}");

    let out = run(&["man", "no-such-command"]);
    assert_eq!(out.status.code(), Some(2));

    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("man1");
    let out = run(&["man", "--out", out_dir.to_str().expect("utf-8")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: BTreeSet<String> = std::fs::read_dir(&out_dir)
        .expect("man pages written")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "capsule-gateway.1",
        "capsule-gateway-verify.1",
        "capsule-gateway-run.1",
        "capsule-gateway-serve.1",
        "capsule-gateway-attest-seal.1",
    ] {
        assert!(names.contains(expected), "{expected} in {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.contains("sandbox-probe")),
        "the internal probe gets no page: {names:?}"
    );
    for name in &names {
        let text = std::fs::read_to_string(out_dir.join(name)).expect("page");
        assert!(text.contains(".TH "), "{name} has a title line");
    }
}

/// Every argument of `cmd` and its subcommands without help: `(path, id)`.
fn missing_help(cmd: &clap::Command, path: &str, missing: &mut BTreeSet<(String, String)>) {
    for arg in cmd.get_arguments() {
        if arg.is_hide_set() {
            continue;
        }
        let has_help = arg
            .get_help()
            .is_some_and(|h| !h.to_string().trim().is_empty())
            || arg
                .get_long_help()
                .is_some_and(|h| !h.to_string().trim().is_empty());
        if !has_help {
            missing.insert((path.to_string(), arg.get_id().to_string()));
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() {
            continue;
        }
        assert!(
            sub.get_about().is_some(),
            "command `{path} {}` has no description",
            sub.get_name()
        );
        let sub_path = if path.is_empty() {
            sub.get_name().to_string()
        } else {
            format!("{path} {}", sub.get_name())
        };
        missing_help(sub, &sub_path, missing);
    }
}

#[test]
fn every_flag_of_every_command_has_help_text() {
    let mut cmd = Cli::command();
    cmd.build();
    let mut missing = BTreeSet::new();
    missing_help(&cmd, "", &mut missing);
    assert!(missing.is_empty(), "arguments without help: {missing:?}");
    // And the binary's own `--help` for each command shows it (the walk above is
    // what the parser holds; this is what a user reads).
    for sub in [
        "keygen",
        "pack",
        "verify",
        "admit",
        "run",
        "serve",
        "completions",
        "man",
    ] {
        let out = run(&[sub, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{sub} --help");
        assert!(stdout(&out).contains("Options:"), "{sub} --help");
    }
    let help = stdout(&run(&["keygen", "--help"]));
    assert!(help.contains("Key ID"), "{help}");
}

/// `systemd-analyze verify` on a copy of each unit whose ExecStart names the binary
/// just built (the units name /usr/bin/capsule-gateway, which need not exist here).
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: install the Debian package `systemd` (scripts/install-test-deps.sh)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = env!("CARGO_BIN_EXE_capsule-gateway");
    for unit in [
        "capsule-gateway-serve.service",
        "capsule-gateway-agent.service",
    ] {
        let text =
            std::fs::read_to_string(repo().join("examples/systemd").join(unit)).expect("unit file");
        assert!(
            text.contains("ExecStart=/usr/bin/capsule-gateway "),
            "{unit}: ExecStart names the installed binary"
        );
        for option in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "StateDirectoryMode=0700",
            "RestrictAddressFamilies=",
            "CapabilityBoundingSet=",
        ] {
            assert!(text.contains(option), "{unit}: {option}");
        }
        let copy = dir.path().join(unit);
        std::fs::write(
            &copy,
            text.replace("/usr/bin/capsule-gateway ", &format!("{exe} ")),
        )
        .expect("write unit copy");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .expect("systemd-analyze verify");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{unit}: systemd-analyze verify failed: {stderr}"
        );
        // verify exits 0 on some findings (unknown options are only warned about).
        let findings: Vec<&str> = stderr.lines().filter(|l| l.contains(unit)).collect();
        assert!(findings.is_empty(), "{unit}: {findings:?}");
    }
}

/// GitHub's anchor for a heading: lowercase, spaces to `-`, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// The README and the reference docs link only inside the repository (a clone has
/// nothing beside it), to files that exist and headings that exist.
#[test]
fn readme_and_reference_docs_link_only_to_files_and_headings_in_the_repository() {
    let root = repo().canonicalize().expect("repo");
    for doc in [
        "README.md",
        "docs/manifest.md",
        "docs/policy.md",
        "docs/cli.md",
        "docs/service.md",
        "docs/agent.md",
    ] {
        let path = root.join(doc);
        let text = std::fs::read_to_string(&path).expect("doc");
        let mut links = 0;
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let target = &rest[..rest.find(')').expect("closed link")];
            links += 1;
            assert!(
                !target.contains("://") && !target.starts_with("mailto:"),
                "{doc}: `{target}` links outside the repository"
            );
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let linked = if file.is_empty() {
                path.clone()
            } else {
                path.parent().expect("dir").join(file)
            };
            let resolved = linked
                .canonicalize()
                .unwrap_or_else(|e| panic!("{doc}: `{target}`: {e}"));
            assert!(
                resolved.starts_with(&root),
                "{doc}: `{target}` leaves the repository"
            );
            if !anchor.is_empty() {
                let heads = anchors(&std::fs::read_to_string(&resolved).expect("linked doc"));
                assert!(heads.contains(anchor), "{doc}: `{target}`: no such heading");
            }
        }
        assert!(links > 0, "{doc} links to the other docs");
    }
}

/// The capabilities a unit's `CapabilityBoundingSet=` keeps, lowercased without `cap_`
/// (as setpriv spells them).
fn unit_capabilities(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("examples/systemd").join(unit)).expect("unit");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("{unit} has a CapabilityBoundingSet"));
    line.split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{unit}: `{c}`"))
                .to_ascii_lowercase()
        })
        .collect()
}

/// Runs the test capsule with `run` under a capability bounding set of exactly `caps`
/// and no_new_privs (what the unit gives the service); returns the exit code and the
/// event's `type`.
fn run_bounded(dir: &Path, caps: &[String], capsule: &Path, state: &Path) -> (i32, String) {
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("setpriv")
        .args(["--bounding-set", &bounding, "--no-new-privs"])
        .arg(env!("CARGO_BIN_EXE_capsule-gateway"))
        .args(["run", "--policy"])
        .arg(dir.join("policy.toml"))
        .args(["--runner", "spiffe://example.org/runner/r1", "--state"])
        .arg(state)
        .arg(capsule)
        .output()
        .expect("setpriv (Debian package util-linux) runs");
    let event: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "one CloudEvent on stdout ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code().expect("exit code"),
        event["type"].as_str().unwrap_or_default().to_string(),
    )
}

/// The units' CapabilityBoundingSet is what running a capsule in gVisor needs: a run
/// under exactly that set (and no_new_privs) completes, and a run without any one of
/// them fails to start the sandbox. Needs root and runsc, as `run` does.
#[test]
fn the_units_capability_set_is_exactly_what_a_runsc_run_needs() {
    let runsc = Command::new("runsc").arg("--version").output();
    assert!(
        runsc.is_ok_and(|o| o.status.success()),
        "runsc is missing: install the Debian package `runsc` (scripts/install-run-deps.sh)"
    );
    assert!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self"))
            == 0,
        "`run` starts gVisor sandboxes and needs root"
    );
    let caps = unit_capabilities("capsule-gateway-serve.service");
    assert_eq!(
        caps,
        unit_capabilities("capsule-gateway-agent.service"),
        "both units run runsc the same way"
    );

    // A capsule whose entrypoint is a staged binary (no `#!` interpreter to allow).
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let gw = |args: &[&str]| {
        let out = bin().args(args).current_dir(d).output().expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    gw(&["keygen", "--alg", "ES256", "--kid", "k1", "--out", "keys"]);
    std::fs::create_dir(d.join("src")).expect("mkdir");
    std::fs::copy("/bin/echo", d.join("src/echo")).expect("copy /bin/echo");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let manifest = serde_json::json!({
        "schema": "capsule/v1", "capsule_id": "caps", "version": 1, "parent": null,
        "tenant": "team-a", "issued_at": now, "not_before": now, "expires_at": now + 3600,
        "policy_version": "1", "author": "dev@example.org",
        "approvals": [{"approver": "lead@example.org", "role": "lead", "approved_at": now}],
        "scope": {"environment": "staging", "network": "none"},
        "limits": {"timeout_ms": 60000, "memory_mib": 128, "pids": 16},
        "entrypoint": ["/capsule/echo", "hello"],
        "artifacts": [{"path": "echo"}]
    });
    std::fs::write(d.join("manifest.json"), manifest.to_string()).expect("manifest");
    std::fs::write(
        d.join("policy.toml"),
        "policy_version = \"1\"\nclock_skew_s = 60\n[trust]\njwks = \"keys/k1.public.jwks.json\"\n\
         [[tenants]]\nname = \"team-a\"\nkeys = [\"k1\"]\nenvironments = [\"staging\"]\n\
         runners = [\"spiffe://example.org/runner/*\"]\nmin_approvals = 1\n",
    )
    .expect("policy");
    gw(&[
        "pack",
        "--manifest",
        "manifest.json",
        "--files",
        "src",
        "--key",
        "keys/k1.private.jwk.json",
        "--out",
        "capsule",
    ]);
    let capsule = d.join("capsule");
    let state = d.join("state");

    assert_eq!(
        run_bounded(d, &caps, &capsule, &state),
        (0, "dev.capsule-gateway.run.completed".to_string()),
        "a run under the units' capabilities completes"
    );
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        assert_eq!(
            run_bounded(d, &fewer, &capsule, &state),
            (4, "dev.capsule-gateway.run.failed".to_string()),
            "without CAP_{} the sandbox must not start, or the unit keeps a capability it does not need",
            dropped.to_ascii_uppercase()
        );
    }
}
