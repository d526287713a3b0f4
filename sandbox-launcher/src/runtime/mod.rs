//! The two sandbox runtimes and what they share: finding their programs, capturing
//! output with a size cap, and waiting for a process against a hard deadline.

pub mod containerd;
pub mod runsc;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{LaunchError, Result};

/// Which sandbox runs the capsule.
#[derive(Debug, Clone)]
pub enum RuntimeConfig {
    /// gVisor: `runsc` directly.
    Runsc(runsc::RunscConfig),
    /// containerd's shim v2: Kata (`io.containerd.kata.v2`) in production.
    Containerd(containerd::ContainerdConfig),
}

/// What the evidence says about the runtime of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFacts {
    /// `runsc` or `containerd`.
    pub kind: String,
    /// runsc: the platform (`ptrace`, `kvm`, ...).
    #[serde(deserialize_with = "crate::nullable")]
    pub platform: Option<String>,
    /// containerd: the shim v2 runtime type.
    #[serde(deserialize_with = "crate::nullable")]
    pub runtime_type: Option<String>,
    /// The runtime's `--version` first line.
    pub version: String,
    pub network: String,
}

/// Output of the sandbox, at most `cap` bytes kept (the rest is read and counted,
/// so that a chatty capsule never blocks on a full pipe).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// Every byte the stream carried, kept or not.
    pub total_bytes: u64,
    pub truncated: bool,
}

impl Output {
    /// The kept bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Reads `r` to its end on a thread, keeping the first `cap` bytes.
pub(crate) fn capture(mut r: impl Read + Send + 'static, cap: usize) -> JoinHandle<Output> {
    std::thread::spawn(move || {
        let mut out = Output::default();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.total_bytes += n as u64;
                    let room = cap.saturating_sub(out.bytes.len());
                    out.bytes.extend_from_slice(&buf[..n.min(room)]);
                    out.truncated |= n > room;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        out
    })
}

/// Joins a capture thread, giving up after `wait` (a process outside the sandbox
/// that still holds the pipe must not hang the launcher).
pub(crate) fn join_capture(h: JoinHandle<Output>, wait: Duration) -> Output {
    let end = Instant::now() + wait;
    while !h.is_finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    if h.is_finished() {
        h.join().unwrap_or_default()
    } else {
        Output {
            truncated: true,
            ..Output::default()
        }
    }
}

/// How waiting for the sandbox's main process ended.
#[derive(Debug)]
pub(crate) enum Waited {
    Exited(ExitStatus),
    /// The child is gone but its status could not be read.
    Lost,
    /// The deadline passed first.
    TimedOut,
    /// The cancel flag was raised first (SIGINT/SIGTERM to the gateway).
    Interrupted,
}

/// A child whose exit is awaited on a thread, so it can be waited for with a deadline.
pub(crate) struct Waiter {
    pid: u32,
    rx: mpsc::Receiver<std::io::Result<ExitStatus>>,
    /// `Some(None)`: the child is gone, its status unknown.
    done: Option<Option<ExitStatus>>,
}

impl Waiter {
    pub(crate) fn new(mut child: Child) -> Waiter {
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        Waiter {
            pid,
            rx,
            done: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the child exits, `deadline` passes, or `cancel` is raised.
    pub(crate) fn wait(&mut self, deadline: Instant, cancel: &AtomicBool) -> Waited {
        loop {
            match self.done {
                Some(Some(s)) => return Waited::Exited(s),
                Some(None) => return Waited::Lost,
                None => {}
            }
            if cancel.load(Ordering::SeqCst) {
                return Waited::Interrupted;
            }
            let now = Instant::now();
            if now >= deadline {
                return Waited::TimedOut;
            }
            let slice = (deadline - now).min(Duration::from_millis(20));
            match self.rx.recv_timeout(slice) {
                Ok(Ok(s)) => self.done = Some(Some(s)),
                Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => self.done = Some(None),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Waits up to `grace`; then SIGKILLs the child and waits for it to be reaped.
    pub(crate) fn finish(&mut self, grace: Duration) -> Option<ExitStatus> {
        let never = AtomicBool::new(false);
        match self.wait(Instant::now() + grace, &never) {
            Waited::Exited(s) => return Some(s),
            Waited::Lost => return None,
            Waited::TimedOut | Waited::Interrupted => {}
        }
        kill_pid(self.pid);
        match self.wait(Instant::now() + Duration::from_secs(5), &never) {
            Waited::Exited(s) => Some(s),
            _ => None,
        }
    }
}

/// SIGKILL to one process by id (a child of ours, or one found by its unique run id).
pub(crate) fn kill_pid(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// An exit status as a shell reports it: the code, or 128 + the signal.
pub(crate) fn exit_code(s: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    s.code().or_else(|| s.signal().map(|sig| 128 + sig))
}

/// The result of a short runtime command (`list`, `kill`, `delete`).
#[derive(Debug)]
pub(crate) struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a short command with a deadline; a hung runtime command is killed.
pub(crate) fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Ran> {
    let program = PathBuf::from(cmd.get_program());
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LaunchError::io("run", &program, e))?;
    let mut child = child;
    let out = child.stdout.take().map(|o| capture(o, 1 << 20));
    let err = child.stderr.take().map(|e| capture(e, 64 << 10));
    let mut waiter = Waiter::new(child);
    let never = AtomicBool::new(false);
    let (status, killed) = match waiter.wait(Instant::now() + limit, &never) {
        Waited::Exited(s) => (Some(s), false),
        Waited::Lost => (None, false),
        Waited::TimedOut | Waited::Interrupted => (waiter.finish(Duration::ZERO), true),
    };
    let text = |h: Option<JoinHandle<Output>>| {
        h.map(|h| join_capture(h, Duration::from_secs(2)).text())
            .unwrap_or_default()
    };
    let stdout = text(out);
    let mut stderr = text(err);
    if killed {
        stderr.push_str(&format!("(killed after {} ms)", limit.as_millis()));
    }
    Ok(Ran {
        ok: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
    })
}

/// Finds `program` on PATH (or checks an explicit path).
pub(crate) fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Finds a required program or names the Debian package that provides it.
pub(crate) fn require(
    program: &Path,
    name: &'static str,
    package: &'static str,
) -> Result<PathBuf> {
    find_program(program).ok_or(LaunchError::ToolMissing {
        program: name,
        package,
    })
}

/// The runtime's version for the evidence, asked once per launcher on a thread of
/// its own so that it costs a run nothing.
#[derive(Debug)]
pub(crate) struct Version(std::sync::Mutex<(Option<JoinHandle<String>>, String)>);

impl Version {
    pub(crate) fn ask(program: &Path, arg: &'static str) -> Version {
        let program = program.to_path_buf();
        let h = std::thread::spawn(move || version_line(&program, arg));
        Version(std::sync::Mutex::new((Some(h), String::new())))
    }

    pub(crate) fn get(&self) -> String {
        let Ok(mut g) = self.0.lock() else {
            return String::new();
        };
        if let Some(h) = g.0.take() {
            g.1 = h.join().unwrap_or_default();
        }
        g.1.clone()
    }
}

/// First line of `program --version` (for the evidence).
fn version_line(program: &Path, arg: &str) -> String {
    run_bounded(Command::new(program).arg(arg), Duration::from_secs(10))
        .map(|r| {
            r.stdout
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}
