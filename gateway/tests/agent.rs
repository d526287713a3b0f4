//! `publish` and `agent` against a real registry: CNCF distribution (Debian
//! `docker-registry`) on loopback with TLS (a test CA) and htpasswd (bcrypt, from
//! `htpasswd -B`, Debian `apache2-utils`), and skopeo (Debian `skopeo`) as the
//! independent client. One registry per test binary, one repository per test; runs
//! use real gVisor (`runsc`). Tests about pulling use `action = "admit-only"` (pull,
//! verify, record; nothing runs).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use attest_testkit::{require_tool, TestCa};
use capsule_tests::{sha256_hex, Signer, World, RUNNER};
use serde_json::{json, Value};

const USER: &str = "fleet";
const PASSWORD: &str = "s3cret-pass";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A distribution registry process; killed when the test process ends (a watcher
/// shell ends it when our pid is gone, since statics are never dropped).
struct Registry {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// What every test shares: the CA, the credentials, skopeo's cert dir.
struct Pki {
    dir: tempfile::TempDir,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        require_tool("docker-registry", "docker-registry").expect("docker-registry");
        require_tool("skopeo", "skopeo").expect("skopeo");
        require_tool("htpasswd", "apache2-utils").expect("htpasswd");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("registry.test");
        let server = ca.issue_tls_server("127.0.0.1".parse().expect("ip"));
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("ca");
        std::fs::write(dir.path().join("server.pem"), &server.cert_pem).expect("cert");
        std::fs::write(dir.path().join("server.key"), &server.key_pem).expect("key");
        // skopeo's --cert-dir reads *.crt as CAs.
        std::fs::create_dir(dir.path().join("skopeo-certs")).expect("mkdir");
        std::fs::write(dir.path().join("skopeo-certs/ca.crt"), ca.cert_pem()).expect("ca");
        let out = Command::new("htpasswd")
            .args(["-B", "-b", "-c"])
            .arg(dir.path().join("htpasswd"))
            .args([USER, PASSWORD])
            .output()
            .expect("htpasswd");
        assert!(out.status.success(), "htpasswd: {out:?}");
        std::fs::write(
            dir.path().join("registry.auth"),
            format!("{USER}:{PASSWORD}\n"),
        )
        .expect("auth");
        Pki { dir }
    })
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Registry {
    fn start_on(port: u16) -> Registry {
        Registry::start_with(port, "")
    }

    /// `tls_extra`: more of the `http.tls` section (indented four spaces).
    fn start_with(port: u16, tls_extra: &str) -> Registry {
        let pki = pki();
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {cert}\n    key: {key}\n{tls_extra}auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n",
            root = s(&dir.join("storage")),
            cert = s(&pki.path("server.pem")),
            key = s(&pki.path("server.key")),
            htpasswd = s(&pki.path("htpasswd")),
        );
        std::fs::write(dir.join("config.yml"), config).expect("config");
        let script = format!(
            "docker-registry serve {cfg} >{log} 2>&1 & r=$!; while kill -0 {me} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.5; done; kill $r 2>/dev/null; wait $r; rm -rf {dir}",
            cfg = s(&dir.join("config.yml")),
            log = s(&dir.join("registry.log")),
            me = std::process::id(),
            dir = s(&dir),
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .spawn()
            .expect("start registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            dir,
            port,
            child: Some(child),
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's own file for blob `hex` (filesystem driver layout).
    fn blob_file(&self, hex: &str) -> PathBuf {
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The watcher shell kills the registry when it sees it gone or us gone;
            // killing the shell's child directly is simplest through pkill -P.
            let _ = Command::new("pkill")
                .args(["-P", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn shared() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry::start_on(free_port()))
}

fn mirror() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry::start_on(free_port()))
}

fn skopeo(args: &[&str]) -> Output {
    let pki = pki();
    let mut c = Command::new("skopeo");
    c.args(args);
    let out = c.output().expect("skopeo");
    let _ = pki;
    out
}

/// `skopeo copy` of an artifact into `dir:`, then each layer put under its title
/// in `out` (what a consumer of the pushed evidence does).
fn pull_artifact(reg: &Registry, reference: &str, out: &Path) -> PathBuf {
    let pki = pki();
    let creds = format!("{USER}:{PASSWORD}");
    let raw = out.with_extension("oci-dir");
    let copied = skopeo(&[
        "copy",
        "--src-cert-dir",
        s(&pki.path("skopeo-certs")),
        "--src-creds",
        &creds,
        &format!("docker://{}/{reference}", reg.host()),
        &format!("dir:{}", s(&raw)),
    ]);
    assert!(
        copied.status.success(),
        "skopeo copy {reference}: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(raw.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    std::fs::create_dir_all(out).expect("mkdir");
    for l in manifest["layers"].as_array().expect("layers") {
        let title = l["annotations"]["org.opencontainers.image.title"]
            .as_str()
            .expect("title");
        let hex = l["digest"]
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .expect("digest");
        std::fs::copy(raw.join(hex), out.join(title)).expect("copy layer");
    }
    out.to_path_buf()
}

fn skopeo_raw(reg: &Registry, reference: &str) -> Value {
    let pki = pki();
    let creds = format!("{USER}:{PASSWORD}");
    let target = format!("docker://{}/{reference}", reg.host());
    let out = skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        s(&pki.path("skopeo-certs")),
        "--creds",
        &creds,
        &target,
    ]);
    assert!(
        out.status.success(),
        "skopeo inspect {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("skopeo prints JSON")
}

fn capsule(w: &World, name: &str, capsule_id: &str, script: &str) -> PathBuf {
    let files: [(&str, &[u8]); 1] = [("run.sh", script.as_bytes())];
    let mut m = w.script_manifest(&files);
    m["capsule_id"] = json!(capsule_id);
    w.capsule_with_files(name, &m, &files, Signer::Es256)
}

fn publish(reg: &Registry, repo: &str, tag: &str, capsule: &Path) -> Output {
    let pki = pki();
    bin()
        .args([
            "publish",
            "--registry",
            &reg.url(),
            "--repository",
            repo,
            "--tag",
            tag,
        ])
        .args(["--ca", s(&pki.path("ca.pem"))])
        .args(["--basic-auth-file", s(&pki.path("registry.auth"))])
        .arg(capsule)
        .output()
        .expect("publish")
}

fn published(reg: &Registry, repo: &str, tag: &str, capsule: &Path) -> String {
    let out = publish(reg, repo, tag, capsule);
    assert!(
        out.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// An agent.toml for `reg`/`repo` under a fresh state directory.
fn agent_config(
    w: &World,
    name: &str,
    reg_url: &str,
    repo: &str,
    extra: &str,
) -> (PathBuf, PathBuf) {
    let pki = pki();
    let state = w.path(&format!("{name}-state"));
    let runner = if extra.contains("runner =") {
        String::new()
    } else {
        format!("runner = \"{RUNNER}\"\n")
    };
    let timeout = if extra.contains("timeout_s =") {
        ""
    } else {
        "timeout_s = 3\n"
    };
    let text = format!(
        "state_dir = \"{state}\"\npolicy = \"{policy}\"\npoll_interval_s = 1\n{timeout}max_backoff_s = 2\n{runner}{extra}\n[[sources]]\nregistry = \"{reg_url}\"\nrepository = \"{repo}\"\nca = \"{ca}\"\nbasic_auth_file = \"{auth}\"\n",
        state = s(&state),
        policy = s(&w.policy_path()),
        ca = s(&pki.path("ca.pem")),
        auth = s(&pki.path("registry.auth")),
    );
    let path = w.write(&format!("{name}.toml"), text.as_bytes());
    (path, state)
}

fn agent_once(config: &Path) -> (i32, Vec<Value>, String) {
    let out = bin()
        .args(["agent", "--config", s(config), "--once"])
        .output()
        .expect("agent");
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one CloudEvent per line"))
        .collect();
    (
        out.status.code().expect("exit code"),
        events,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Nothing ran: the evidence root holds one bundle, a denial's (decision, event and
/// the signed index; never the presented bytes or any output).
fn assert_only_a_denial_bundle(evidence: &Path) {
    let bundles = dir_entries(evidence);
    assert_eq!(bundles.len(), 1, "one denial bundle: {bundles:?}");
    let mut files = dir_entries(&evidence.join(&bundles[0]));
    files.sort();
    assert_eq!(
        files,
        [
            "decision.json",
            "event.json",
            "index.json",
            "index.sig.json"
        ],
        "a denial bundle, nothing of a run"
    );
}

fn dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// No temporary file is left in the blob store.
fn assert_no_temp_files(state: &Path) {
    assert!(
        dir_entries(&state.join("blobs/tmp")).is_empty(),
        "temp files left: {:?}",
        dir_entries(&state.join("blobs/tmp"))
    );
}

#[test]
fn publish_pushes_an_artifact_skopeo_reads_and_the_agent_runs_it_once_and_pushes_evidence() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/run-once";
    let dir = capsule(&w, "c", "run-once", "echo hello from the registry\n");
    let digest = published(reg, repo, "v1", &dir);
    assert!(digest.starts_with("sha256:"), "{digest}");

    // skopeo, an independent client, reads what publish pushed.
    let m = skopeo_raw(reg, &format!("{repo}:v1"));
    assert_eq!(
        m["artifactType"],
        "application/vnd.capsule-gateway.capsule.v1"
    );
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(
        m["annotations"]["dev.capsule-gateway.capsule.id"],
        "run-once"
    );
    assert_eq!(m["annotations"]["dev.capsule-gateway.capsule.version"], "7");
    assert_eq!(
        m["annotations"]["dev.capsule-gateway.capsule.tenant"],
        "acme-payments"
    );
    let layers = m["layers"].as_array().expect("layers");
    let titles: Vec<&str> = layers
        .iter()
        .map(|l| {
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .expect("title")
        })
        .collect();
    assert_eq!(titles, ["capsule.jws", "files/run.sh"]);
    let jws = std::fs::read(dir.join("capsule.jws")).expect("jws");
    assert_eq!(layers[0]["digest"], format!("sha256:{}", sha256_hex(&jws)));
    assert_eq!(layers[0]["mediaType"], "application/jose");
    assert_eq!(
        layers[1]["digest"],
        format!("sha256:{}", sha256_hex(b"echo hello from the registry\n"))
    );

    let (config, state) = agent_config(&w, "a", &reg.url(), repo, "");
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["type"], "dev.capsule-gateway.run.completed");
    assert_eq!(e["source"], RUNNER);
    assert_eq!(e["data"]["exit_code"], 0);
    let run_id = e["id"].as_str().expect("id").to_string();
    let bundle = state.join("evidence").join(&run_id);
    assert_eq!(
        std::fs::read(bundle.join("stdout")).expect("stdout"),
        b"hello from the registry\n"
    );
    assert_no_temp_files(&state);

    // The evidence came back as an artifact whose subject is the capsule: the
    // registry (distribution 2.8) has no referrers API, so the sha256-<hex> tag.
    let index = skopeo_raw(
        reg,
        &format!("{repo}:sha256-{}", digest.trim_start_matches("sha256:")),
    );
    let refs = index["manifests"].as_array().expect("manifests");
    assert_eq!(refs.len(), 1, "{index}");
    assert_eq!(
        refs[0]["artifactType"],
        "application/vnd.capsule-gateway.evidence.v1"
    );
    let ev = skopeo_raw(
        reg,
        &format!("{repo}@{}", refs[0]["digest"].as_str().expect("digest")),
    );
    assert_eq!(ev["subject"]["digest"], digest);
    assert_eq!(ev["annotations"]["dev.capsule-gateway.run.id"], run_id);
    // The tenant's egress mode is the default, local-only: only the signed export
    // naming the index's digest.
    assert_eq!(
        ev["annotations"]["dev.capsule-gateway.egress"],
        "local-only"
    );
    let titles: Vec<&str> = ev["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .expect("title")
        })
        .collect();
    assert_eq!(titles, ["export.json", "export.sig.json"]);
    // Pulled back by an independent client (skopeo copy to a directory, each blob
    // put under its title), the export verifies offline with `evidence verify`.
    let pulled = pull_artifact(
        reg,
        &format!("{repo}@{}", refs[0]["digest"].as_str().expect("digest")),
        &state.join("pulled-evidence"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_capsule-gateway"))
        .args(["evidence", "verify", "--json"])
        .arg(&pulled)
        .output()
        .expect("evidence verify");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A second pass finds the same capsule and runs nothing.
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(dir_entries(&state.join("evidence")).len(), 1);
}

#[test]
fn a_blob_replaced_in_the_registry_storage_is_digest_mismatch_and_never_runs() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/corrupt";
    let script = "echo must never run\n";
    let dir = capsule(&w, "c", "corrupt", script);
    published(reg, repo, "v1", &dir);
    // Rewrite the artifact's blob in the registry's own storage, same length.
    let file = reg.blob_file(&sha256_hex(script.as_bytes()));
    std::fs::write(&file, "echo substituted!!!\n").expect("rewrite blob");

    let (config, state) = agent_config(&w, "a", &reg.url(), repo, "");
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "dev.capsule-gateway.run.denied");
    assert_eq!(events[0]["data"]["reason"], "digest_mismatch");
    assert_only_a_denial_bundle(&state.join("evidence"));
    assert!(
        dir_entries(&state.join("agent/runs")).is_empty(),
        "never claimed"
    );
    assert!(!state
        .join("blobs/sha256")
        .join(sha256_hex(script.as_bytes()))
        .exists());
    assert_no_temp_files(&state);
}

#[test]
fn an_unreachable_or_silent_registry_admits_nothing_and_the_agent_backs_off_and_resumes() {
    let w = World::new();
    let repo = "capsules/outage";
    // Down: nothing listens.
    let port = free_port();
    let (config, state) = agent_config(
        &w,
        "down",
        &format!("https://127.0.0.1:{port}"),
        repo,
        "action = \"admit-only\"",
    );
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(events.is_empty());
    assert!(stderr.contains("registry unreachable"), "{stderr}");

    // Silent: accepts and never answers; the request deadline ends it.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let (config2, _) = agent_config(
        &w,
        "silent",
        &format!("https://127.0.0.1:{silent_port}"),
        repo,
        "action = \"admit-only\"",
    );
    let started = Instant::now();
    let (code, events, stderr) = agent_once(&config2);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(events.is_empty());
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(silent);

    // The daemon backs off while the registry is down and resumes when it is back.
    let mut agent = bin()
        .args(["agent", "--config", s(&config)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    let stderr = agent.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |needle: &str, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if line.contains(needle) {
                    return true;
                }
            }
        }
        false
    };
    assert!(wait_for("backing off", 20), "the agent backs off");
    let mut reg = Registry::start_on(port);
    let dir = capsule(&w, "c", "outage", "true\n");
    published(&reg, repo, "v1", &dir);
    let ok = wait_for("agent: admitted", 30);
    let _ = agent.kill();
    let _ = agent.wait();
    reg.stop();
    assert!(ok, "the agent resumed and admitted the capsule");
    assert_no_temp_files(&state);
}

#[test]
fn a_mirror_made_by_skopeo_copy_serves_the_agent() {
    let w = World::new();
    let (src, dst) = (shared(), mirror());
    let repo = "capsules/mirrored";
    let dir = capsule(&w, "c", "mirrored", "true\n");
    let digest = published(src, repo, "v1", &dir);
    let pki = pki();
    let creds = format!("{USER}:{PASSWORD}");
    let certs = pki.path("skopeo-certs");
    let out = skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-cert-dir",
        s(&certs),
        "--dest-cert-dir",
        s(&certs),
        "--src-creds",
        &creds,
        "--dest-creds",
        &creds,
        &format!("docker://{}/{repo}:v1", src.host()),
        &format!("docker://{}/{repo}:v1", dst.host()),
    ]);
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = skopeo_raw(dst, &format!("{repo}:v1"));
    assert_eq!(
        m["artifactType"],
        "application/vnd.capsule-gateway.capsule.v1"
    );

    let (config, state) = agent_config(&w, "m", &dst.url(), repo, "action = \"admit-only\"");
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(events.is_empty(), "admit-only runs nothing: {events:?}");
    assert!(stderr.contains("agent: admitted"), "{stderr}");
    assert!(
        stderr.contains(&digest),
        "the mirror's manifest is the original's: {stderr}"
    );
    let jws = std::fs::read(dir.join("capsule.jws")).expect("jws");
    assert!(state.join("blobs/sha256").join(sha256_hex(&jws)).exists());
}

#[test]
fn two_agents_with_different_runner_ids_each_admit_only_what_their_tenant_allows() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/two-runners";
    let dir = capsule(&w, "c", "two-runners", "true\n");
    published(reg, repo, "v1", &dir);
    let (allowed, _) = agent_config(
        &w,
        "r1",
        &reg.url(),
        repo,
        &format!("action = \"admit-only\"\nrunner = \"{RUNNER}\""),
    );
    let (other, other_state) = agent_config(
        &w,
        "r2",
        &reg.url(),
        repo,
        "action = \"admit-only\"\nrunner = \"spiffe://other.example/runner/r9\"",
    );
    let (code, events, stderr) = agent_once(&allowed);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(events.is_empty());
    let (code, events, stderr) = agent_once(&other);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["reason"], "runner_not_allowed");
    assert_eq!(events[0]["source"], "spiffe://other.example/runner/r9");
    assert_only_a_denial_bundle(&other_state.join("evidence"));
}

#[test]
fn an_agent_killed_mid_run_does_not_run_the_capsule_again_after_a_restart() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/kill-mid-run";
    let dir = capsule(&w, "c", "kill-mid-run", "sleep 30\n");
    published(reg, repo, "v1", &dir);
    let (config, state) = agent_config(&w, "k", &reg.url(), repo, "");
    let mut agent = bin()
        .args(["agent", "--config", s(&config)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent");
    let runs = state.join("agent/runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir_entries(&runs)
        .iter()
        .any(|n| n.ends_with(".started.json"))
    {
        assert!(Instant::now() < deadline, "the run never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    agent.kill().expect("kill -9");
    agent.wait().expect("wait");

    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(events.is_empty(), "not run again: {events:?}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(dir_entries(&runs).iter().any(|n| n.ends_with(".done.json")));
    assert!(
        dir_entries(&state.join("evidence")).len() <= 1,
        "at most the killed run's bundle"
    );
    assert_no_temp_files(&state);
}

#[test]
fn the_disk_filling_up_while_pulling_admits_nothing_and_leaves_nothing_corrupt() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/disk-full";
    let big = vec![b'x'; 6 << 20];
    let files: [(&str, &[u8]); 2] = [("run.sh", b"true\n"), ("big.bin", &big)];
    let m = w.script_manifest(&files);
    let dir = w.capsule_with_files("c", &m, &files, Signer::Es256);
    published(reg, repo, "v1", &dir);
    let (config, state) = agent_config(&w, "full", &reg.url(), repo, "action = \"admit-only\"");
    std::fs::create_dir_all(&state).expect("state");
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", s(&state)])
        .status()
        .expect("mount");
    assert!(mount.success(), "mount a 2 MiB tmpfs (needs root)");
    let (code, events, stderr) = agent_once(&config);
    // Whatever was stored is whole: every blob's name is its digest.
    for name in dir_entries(&state.join("blobs/sha256")) {
        let bytes = std::fs::read(state.join("blobs/sha256").join(&name)).expect("blob");
        assert_eq!(sha256_hex(&bytes), name, "a stored blob is its digest");
    }
    let tmp = dir_entries(&state.join("blobs/tmp"));
    let big_stored = state.join("blobs/sha256").join(sha256_hex(&big)).exists();
    let _ = Command::new("umount").arg(&state).status();
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(events.is_empty(), "{events:?}");
    assert!(stderr.contains("No space left"), "{stderr}");
    assert!(
        !stderr.contains("agent: admitted"),
        "nothing admitted: {stderr}"
    );
    assert!(!big_stored, "no partial blob under its digest");
    assert!(tmp.is_empty(), "no temp file left: {tmp:?}");
}

/// A byte-level TCP proxy to `upstream` (TLS passes through untouched) that
/// forwards the server's bytes at most `chunk` per `tick`: a slow registry.
fn throttled_proxy(upstream: u16, chunk: usize, tick: Duration) -> u16 {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut c_read, mut s_write) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; chunk];
                loop {
                    match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            std::thread::sleep(tick);
                        }
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

fn big_capsule(w: &World, name: &str, capsule_id: &str, size: usize) -> (PathBuf, Vec<u8>) {
    let big = vec![b'y'; size];
    let files: [(&str, &[u8]); 2] = [("run.sh", b"true\n"), ("big.bin", &big)];
    let mut m = w.script_manifest(&files);
    m["capsule_id"] = json!(capsule_id);
    (w.capsule_with_files(name, &m, &files, Signer::Es256), big)
}

#[test]
fn an_agent_killed_mid_pull_leaves_no_partial_blob_and_the_restart_resumes() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/kill-mid-pull";
    let (dir, big) = big_capsule(&w, "c", "kill-mid-pull", 8 << 20);
    published(reg, repo, "v1", &dir);
    // About 3 MB/s: the big blob takes seconds, long enough to be caught mid-pull.
    let slow = throttled_proxy(reg.port, 16 << 10, Duration::from_millis(5));
    let (slow_config, state) = agent_config(
        &w,
        "k",
        &format!("https://127.0.0.1:{slow}"),
        repo,
        "action = \"admit-only\"",
    );
    let mut agent = bin()
        .args(["agent", "--config", s(&slow_config), "--once"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent");
    let tmp = state.join("blobs/tmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    let partial = loop {
        let sizes: Vec<u64> = std::fs::read_dir(&tmp)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .collect()
            })
            .unwrap_or_default();
        if sizes.iter().any(|&n| n > (1 << 20)) {
            break sizes;
        }
        assert!(Instant::now() < deadline, "never caught mid-pull");
        std::thread::sleep(Duration::from_millis(20));
    };
    agent.kill().expect("kill -9");
    agent.wait().expect("wait");
    assert!(!partial.is_empty());
    let big_path = state.join("blobs/sha256").join(sha256_hex(&big));
    assert!(
        !big_path.exists(),
        "a partial blob is never under its digest"
    );

    // The restart (straight to the registry) removes the temp file and resumes.
    std::fs::write(
        &slow_config,
        std::fs::read_to_string(&slow_config)
            .expect("read")
            .replace(&format!(":{slow}\""), &format!(":{}\"", reg.port)),
    )
    .expect("rewrite");
    let (code, _, stderr) = agent_once(&slow_config);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stderr.contains("agent: admitted"), "{stderr}");
    assert_no_temp_files(&state);
    assert_eq!(
        sha256_hex(&std::fs::read(&big_path).expect("big blob")),
        sha256_hex(&big)
    );
}

#[test]
fn slow_content_hits_the_deadline_and_admits_nothing() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/slow";
    let (dir, _) = big_capsule(&w, "c", "slow", 1 << 20);
    published(reg, repo, "v1", &dir);
    // 10 KiB/s: 1 MiB would take 100 s; its deadline is timeout_s + 1 MiB / 256 KiB/s.
    let slow = throttled_proxy(reg.port, 1 << 10, Duration::from_millis(100));
    let (config, state) = agent_config(
        &w,
        "slow",
        &format!("https://127.0.0.1:{slow}"),
        repo,
        "action = \"admit-only\"\ntimeout_s = 2",
    );
    let started = Instant::now();
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(events.is_empty(), "{events:?}");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(!stderr.contains("agent: admitted"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "bounded by the deadline"
    );
    assert_no_temp_files(&state);
}

#[test]
fn replayed_stale_and_oversized_capsules_from_the_registry_are_denied() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/replay";
    let files: [(&str, &[u8]); 1] = [("run.sh", b"true\n")];
    let mut v8 = w.script_manifest(&files);
    v8["capsule_id"] = json!("replay");
    v8["version"] = json!(8);
    let newer = w.capsule_with_files("v8", &v8, &files, Signer::Es256);
    published(reg, repo, "a-v8", &newer);
    let (config, _) = agent_config(
        &w,
        "r",
        &reg.url(),
        repo,
        "action = \"admit-only\"\nmax_blob_bytes = 4096",
    );
    let (code, _, stderr) = agent_once(&config);
    assert_eq!(code, 0, "stderr: {stderr}");

    // Replayed: the older version 7 pushed again after 8 was admitted.
    let mut v7 = v8.clone();
    v7["version"] = json!(7);
    let older = w.capsule_with_files("v7", &v7, &files, Signer::Es256);
    published(reg, repo, "b-v7", &older);
    // Stale: a capsule whose validity ended.
    let mut expired = v8.clone();
    expired["capsule_id"] = json!("replay-expired");
    expired["issued_at"] = json!(w.now - 7200);
    expired["not_before"] = json!(w.now - 7200);
    expired["expires_at"] = json!(w.now - 3600);
    let stale = w.capsule_with_files("expired", &expired, &files, Signer::Es256);
    published(reg, repo, "c-expired", &stale);
    // Oversized: a layer larger than max_blob_bytes is refused before it is pulled.
    let (big, big_bytes) = big_capsule(&w, "big", "replay-big", 8192);
    published(reg, repo, "d-big", &big);

    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 1, "stderr: {stderr}");
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["data"]["reason"].as_str().expect("reason"))
        .collect();
    assert_eq!(
        reasons,
        ["rollback", "expired", "limit_exceeded"],
        "{events:?}"
    );
    let state = w.path("r-state");
    assert!(
        !state
            .join("blobs/sha256")
            .join(sha256_hex(&big_bytes))
            .exists(),
        "never pulled"
    );
}

#[test]
fn a_registry_that_requires_mtls_admits_the_runner_presenting_its_svid() {
    let w = World::new();
    let acme = TestCa::new("acme.example");
    let clientcas = w.write("acme-ca.pem", acme.cert_pem().as_bytes());
    let svid_dir = w.path("svid");
    std::fs::create_dir_all(&svid_dir).expect("mkdir");
    acme.write_svid_dir(
        &svid_dir,
        &acme.issue(&attest_testkit::SvidSpec::id(RUNNER)),
    );
    let mut reg = Registry::start_with(
        free_port(),
        &format!("    clientcas:\n      - {}\n", s(&clientcas)),
    );
    let repo = "capsules/mtls";
    let dir = capsule(&w, "c", "mtls", "true\n");
    // Without a client certificate the registry refuses the handshake.
    let out = publish(&reg, repo, "v1", &dir);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bin()
        .args([
            "publish",
            "--registry",
            &reg.url(),
            "--repository",
            repo,
            "--tag",
            "v1",
        ])
        .args([
            "--ca",
            s(&pki().path("ca.pem")),
            "--basic-auth-file",
            s(&pki().path("registry.auth")),
        ])
        .args(["--svid", s(&svid_dir)])
        .arg(&dir)
        .output()
        .expect("publish");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The runner identity is the SVID's; no `runner` key.
    let (without, _) = agent_config(&w, "plain", &reg.url(), repo, "action = \"admit-only\"");
    let (code, _, stderr) = agent_once(&without);
    assert_eq!(code, 1, "no client certificate: {stderr}");
    let (with, _) = agent_config(
        &w,
        "svid",
        &reg.url(),
        repo,
        &format!(
            "action = \"admit-only\"\nrunner = \"{RUNNER}\"\nsvid = \"{}\"",
            s(&svid_dir)
        ),
    );
    let (code, _, stderr) = agent_once(&with);
    reg.stop();
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stderr.contains("agent: admitted"), "{stderr}");
}

/// A TLS-terminating proxy to the registry that answers every manifest GET with
/// `substitute`'s bytes, keeping the registry's headers (its Docker-Content-Digest
/// names the real manifest): a manifest served under the wrong digest.
fn substituting_proxy(upstream: u16, substitute: Vec<u8>) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::{Read, Write};
    use std::sync::Arc;
    let pki = pki();
    let certs = vec![CertificateDer::from_pem_file(pki.path("server.pem")).expect("cert")];
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config"),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.pem")).expect("ca"))
        .expect("root");
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    /// One HTTP/1.1 message: its head and a Content-Length body.
    fn read_message(stream: &mut impl Read) -> Option<(String, Vec<u8>)> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).ok()?;
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).ok()?;
        Some((head, body))
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().map_while(Result::ok) {
            let (server, client, substitute) = (server.clone(), client.clone(), substitute.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(server).expect("server conn");
                let mut down = rustls::StreamOwned::new(conn, tcp);
                let Some((head, body)) = read_message(&mut down) else {
                    return;
                };
                let up_tcp =
                    std::net::TcpStream::connect(("127.0.0.1", upstream)).expect("upstream");
                let name = ServerName::try_from("127.0.0.1").expect("name");
                let conn = rustls::ClientConnection::new(client, name).expect("client conn");
                let mut up = rustls::StreamOwned::new(conn, up_tcp);
                up.write_all(head.as_bytes()).expect("forward head");
                up.write_all(&body).expect("forward body");
                let Some((rhead, rbody)) = read_message(&mut up) else {
                    return;
                };
                let is_manifest = head.starts_with("GET ") && head.contains("/manifests/");
                let (rhead, rbody) = if is_manifest && rhead.starts_with("HTTP/1.1 200") {
                    let mut out = String::new();
                    for line in rhead.trim_end().lines() {
                        if line.to_ascii_lowercase().starts_with("content-length:") {
                            out.push_str(&format!("Content-Length: {}\r\n", substitute.len()));
                        } else {
                            out.push_str(line);
                            out.push_str("\r\n");
                        }
                    }
                    out.push_str("\r\n");
                    (out, substitute)
                } else {
                    (rhead, rbody)
                };
                let _ = down.write_all(rhead.as_bytes());
                let _ = down.write_all(&rbody);
                let _ = down.flush();
                down.conn.send_close_notify();
                let _ = down.flush();
            });
        }
    });
    port
}

#[test]
fn a_manifest_served_under_the_wrong_digest_is_refused() {
    let w = World::new();
    let reg = shared();
    let repo = "capsules/wrong-digest";
    let real = capsule(&w, "real", "wrong-digest", "true\n");
    let real_digest = published(reg, repo, "v1", &real);
    // Another signed capsule's manifest, substituted for v1's.
    let other = capsule(&w, "other", "wrong-digest-other", "echo other\n");
    let other_digest = published(reg, "capsules/wrong-digest-other", "v1", &other);
    let substitute = skopeo_raw(reg, "capsules/wrong-digest-other:v1").to_string();
    let proxy = substituting_proxy(reg.port, substitute.into_bytes());
    let (config, state) = agent_config(
        &w,
        "p",
        &format!("https://127.0.0.1:{proxy}"),
        repo,
        "action = \"admit-only\"",
    );
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(events.is_empty(), "{events:?}");
    assert!(stderr.contains("manifest refused"), "{stderr}");
    assert!(
        stderr.contains(&real_digest),
        "names the digest it was served under: {stderr}"
    );
    assert!(!stderr.contains("agent: admitted"), "{stderr}");
    assert_ne!(real_digest, other_digest);
    assert!(
        dir_entries(&state.join("blobs/sha256")).is_empty(),
        "nothing pulled"
    );
}

/// The tenant index is polled at tag `index` (published by `publish --index`): a
/// tenant whose index is required is denied `index_stale` while there is none, and
/// while the one at `index` is signed by a key its tenant does not name; once the
/// signed index is published, the capsule it lists is admitted.
#[test]
fn the_tenant_index_at_tag_index_is_polled_and_a_required_one_is_enforced() {
    use capsule_tests::governance::INDEXED;
    let w = World::new();
    let reg = shared();
    let repo = "capsules/indexed";
    let files: [(&str, &[u8]); 1] = [("run.sh", b"true\n")];
    let mut m = w.script_manifest(&files);
    m["tenant"] = json!(INDEXED);
    m["capsule_id"] = json!("indexed");
    let dir = w.capsule_with_files("indexed", &m, &files, Signer::Es256);
    published(reg, repo, "v1", &dir);
    let (config, _) = agent_config(&w, "ix", &reg.url(), repo, "action = \"admit-only\"");
    // The governance policy names the index keys and the indexed tenant.
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replace(s(&w.policy_path()), s(&w.governance_policy_path()));
    std::fs::write(&config, text).expect("config");

    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert_eq!(events[0]["data"]["reason"], "index_stale", "{events:?}");

    let publish_index = |index: &Path| {
        let pki = pki();
        let out = bin()
            .args(["publish", "--registry", &reg.url(), "--repository", repo])
            .args(["--ca", s(&pki.path("ca.pem"))])
            .args(["--basic-auth-file", s(&pki.path("registry.auth"))])
            .arg("--index")
            .arg(index)
            .output()
            .expect("publish --index");
        assert!(
            out.status.success(),
            "publish --index: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let entry = ("indexed", 7, w.digest_of(&dir));
    let payload = w.index_payload(INDEXED, 1, w.now + 3600, &[entry]);
    // Signed by the capsule key, not one of the tenant's `index.keys`: ignored.
    let forged = w.write(
        "forged.index.jws",
        w.sign(&serde_json::to_vec(&payload).expect("json"), Signer::Es256)
            .as_bytes(),
    );
    publish_index(&forged);
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert_eq!(events[0]["data"]["reason"], "index_stale", "{events:?}");

    publish_index(&w.index("good.index.jws", &payload));
    let (code, events, stderr) = agent_once(&config);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(events.is_empty(), "admit-only prints no event: {events:?}");
    assert!(stderr.contains("tenant index"), "{stderr}");
}
