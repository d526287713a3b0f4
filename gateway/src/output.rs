//! How decisions are printed: one JSON object per capsule per line (`--json`), or one
//! human-readable line. Everything a command prints on stdout goes through
//! [`print_stdout`], so that a reader that went away (`| head -1`) ends it quietly.

use std::io::{self, Write};

use serde_json::Value;
use verify_core::Decision;

use crate::GatewayError;

/// Writes `text` to stdout and flushes. A closed pipe is not an error: the reader has
/// what it wanted, and the command ends with the exit code it would have had (the
/// verdicts, recordings and runs do not depend on anyone reading them).
pub fn print_stdout(text: &str) -> Result<(), GatewayError> {
    let mut out = io::stdout().lock();
    quiet_pipe(out.write_all(text.as_bytes()).and_then(|()| out.flush()))
}

/// Decision lines on stdout through one buffer: written in 64 KiB blocks (one
/// `write` each, instead of one per line through stdout's line buffering), flushed by
/// [`Lines::finish`] and, when the command ends early with an error, by the drop, so
/// that no line already produced is lost. A closed pipe ends the output quietly.
pub struct Lines<'a> {
    out: io::BufWriter<io::StdoutLock<'a>>,
    json: bool,
    /// The reader went away (`EPIPE`): nothing more is written.
    closed: bool,
}

impl std::fmt::Debug for Lines<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines")
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

impl Lines<'static> {
    /// `--json` lines (DESIGN.md) when `json`, else the human-readable ones.
    pub fn stdout(json: bool) -> Lines<'static> {
        Lines {
            out: io::BufWriter::with_capacity(64 * 1024, io::stdout().lock()),
            json,
            closed: false,
        }
    }
}

impl Lines<'_> {
    /// One decision's line; `capsule` is the argument as given.
    pub fn decision(&mut self, capsule: &str, d: &Decision) -> Result<(), GatewayError> {
        if self.closed {
            return Ok(());
        }
        let written = if self.json {
            // Straight into the buffer: no `Value` or `String` per line.
            serde_json::to_writer(
                &mut self.out,
                &crate::evidence::DecisionRecord::new(capsule, d),
            )
            .map_err(io::Error::from)
        } else {
            self.out.write_all(decision_line(capsule, d).as_bytes())
        }
        .and_then(|()| self.out.write_all(b"\n"));
        self.settle(written)
    }

    /// Flushes what is buffered.
    pub fn finish(mut self) -> Result<(), GatewayError> {
        if self.closed {
            return Ok(());
        }
        let flushed = self.out.flush();
        self.settle(flushed)
    }

    fn settle(&mut self, result: io::Result<()>) -> Result<(), GatewayError> {
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::BrokenPipe) {
            self.closed = true;
        }
        quiet_pipe(result)
    }
}

/// [`print_stdout`] of `line` and a newline.
pub fn println_stdout(line: impl std::fmt::Display) -> Result<(), GatewayError> {
    print_stdout(&format!("{line}\n"))
}

/// A write to stdout's result, with `EPIPE` (Rust ignores SIGPIPE) counted as done.
pub fn quiet_pipe(result: io::Result<()>) -> Result<(), GatewayError> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| GatewayError::io("<stdout>", e)),
    }
}

/// The `--json` line of DESIGN.md; `capsule` is the argument as given. The same
/// record as an evidence bundle's `decision.json`.
pub fn decision_json(capsule: &str, d: &Decision) -> Value {
    // A struct of strings and numbers: serialising cannot fail.
    serde_json::to_value(crate::evidence::DecisionRecord::new(capsule, d)).unwrap_or(Value::Null)
}

pub fn decision_line(capsule: &str, d: &Decision) -> String {
    let id = match (&d.capsule_id, d.version) {
        (Some(id), Some(v)) => format!(" {id}@{v}"),
        _ => String::new(),
    };
    match d.reason {
        None => format!("admit {capsule}{id}: {}", d.detail),
        Some(r) => format!("deny  {capsule}{id}: {r}: {}", d.detail),
    }
}
