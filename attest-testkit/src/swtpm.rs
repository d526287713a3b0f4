//! A real software TPM (swtpm, Debian packages `swtpm` and `swtpm-tools`) started on free
//! local ports and stopped on drop. Each instance has its own state directory, so tests
//! that each start one share nothing; [`Swtpm::restart`] keeps the state (persistent
//! objects survive, PCRs reset) the way a host reboot does.
//!
//! A missing `swtpm` binary is an error that names the package: tests `expect()` it and
//! fail, they never skip.

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{SwtpmStart, TestkitError};

/// A running swtpm with a TCP server port N and its control port N+1 (the layout the
/// libtss2 `swtpm` TCTI expects).
#[derive(Debug)]
pub struct Swtpm {
    child: Option<Child>,
    port: u16,
    state: tempfile::TempDir,
}

/// Two consecutive free ports on 127.0.0.1 (N for commands, N+1 for control).
fn free_port_pair() -> std::io::Result<u16> {
    for _ in 0..64 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = a.local_addr()?.port();
        if port == u16::MAX {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(
        "no two consecutive free ports on 127.0.0.1",
    ))
}

impl Swtpm {
    /// Starts a fresh swtpm (empty state: a new endorsement and owner seed).
    pub fn start() -> Result<Swtpm, TestkitError> {
        let state = tempfile::Builder::new()
            .prefix("swtpm-state-")
            .tempdir()
            .map_err(TestkitError::SwtpmState)?;
        let mut tpm = Swtpm {
            child: None,
            port: 0,
            state,
        };
        tpm.spawn()?;
        Ok(tpm)
    }

    /// The TCTI string for this instance: `swtpm:host=127.0.0.1,port=N`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Stops the process (SIGKILL, as a crash would) and starts it again on the same
    /// state, on new ports: persistent objects and the seeds survive, PCRs and transient
    /// objects do not.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        self.spawn()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        // A port found free may be taken before swtpm binds it; try a few pairs.
        const ATTEMPTS: usize = 5;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port_pair().map_err(TestkitError::SwtpmPorts)?;
            let log = self.state.path().join("swtpm.log");
            let mut child = match Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", self.state.path().display()))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .arg("--log")
                .arg(format!("file={},level=1", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
            {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(TestkitError::SwtpmMissing)
                }
                Err(e) => return Err(TestkitError::SwtpmSpawn(e)),
            };
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    self.child = Some(child);
                    self.port = port;
                    return Ok(());
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if attempt == ATTEMPTS {
                        return Err(TestkitError::SwtpmNotStarted(e));
                    }
                }
            }
        }
    }
}

fn wait_ready(child: &mut Child, port: u16) -> Result<(), SwtpmStart> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().map_err(SwtpmStart::Wait)? {
            let mut stderr = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut stderr);
            }
            return Err(SwtpmStart::Exited {
                status,
                stderr: stderr.trim().to_string(),
            });
        }
        if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
            && TcpStream::connect((Ipv4Addr::LOCALHOST, port + 1)).is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(SwtpmStart::NotListening(port));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Path of a tool that tests need, or an error naming the Debian package.
pub fn require_tool(tool: &str, package: &'static str) -> Result<PathBuf, TestkitError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| TestkitError::MissingTool {
            tool: tool.to_string(),
            package,
        })
}
