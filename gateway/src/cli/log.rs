//! `log verify`: the admission log checked offline, a whole state or one sealed
//! segment. Exit 0 everything holds, 1 something does not (named by a stable code),
//! 2 usage (no such state, a file that is not a segment's).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::admission_log::signer::Expect;
use crate::admission_log::{segment, Failure};
use crate::output::print_stdout;
use crate::state::StateDir;
use crate::GatewayError;

use super::{usage, EXIT_DENIED};

#[derive(Debug, clap::Subcommand)]
pub enum LogCommand {
    /// Check the admission log: every record, its chain, its signed checkpoints and
    /// its sealed segments. Exit 0 holds, 1 broken (the first failure named), 2 usage.
    Verify(VerifyLogArgs),
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// The state directory (serve must not be running on it).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// One sealed segment file (STATE/log/segment-NNNNNNNN.jsonl), checked alone.
    #[arg(long, value_name = "FILE")]
    pub segment: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct VerifyLogArgs {
    #[command(flatten)]
    pub target: Target,
    /// The state whose software custody key must have signed the checkpoints
    /// (with --segment; default: the state the segment lies in).
    #[arg(long, value_name = "DIR", requires = "segment")]
    pub key_state: Option<PathBuf>,
    /// Print one JSON object: `{"verdict": "ok"|"broken", ...}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: LogCommand) -> Result<ExitCode, GatewayError> {
    let LogCommand::Verify(args) = command;
    let outcome = match (&args.target.state, &args.target.segment) {
        (Some(dir), _) => verify_state(dir)?,
        (None, Some(file)) => verify_segment(file, args.key_state.as_deref())?,
        (None, None) => return Err(usage("log verify: --state DIR or --segment FILE")),
    };
    let (text, code) = match outcome {
        Ok(report) => {
            let text = if args.json {
                let mut v = report;
                v["verdict"] = "ok".into();
                v.to_string()
            } else {
                format!("ok: {}", summary(&report))
            };
            (text, ExitCode::SUCCESS)
        }
        Err(f) => {
            let text = if args.json {
                serde_json::json!({"verdict": "broken", "code": f.code, "detail": f.detail})
                    .to_string()
            } else {
                format!("broken: {}: {}", f.code.as_str(), f.detail)
            };
            (text, ExitCode::from(EXIT_DENIED))
        }
    };
    print_stdout(&format!("{text}\n"))?;
    Ok(code)
}

fn summary(report: &serde_json::Value) -> String {
    format!(
        "{} records, {} checkpoints, {} sealed segments",
        report["records"],
        report["checkpoints"].as_u64().unwrap_or(1),
        report["segments"].as_array().map_or(0, Vec::len)
    )
}

type Outcome = Result<serde_json::Value, Failure>;

fn verify_state(dir: &std::path::Path) -> Result<Outcome, GatewayError> {
    let clock = crate::admission::system_clock();
    let Some(state) = StateDir::locate(dir, false, clock.as_ref())? else {
        return Err(usage(format!("{}: no state there", dir.display())));
    };
    let expect = Expect::of_state(dir).map_err(|e| usage(e.to_string()))?;
    Ok(state
        .audit_log(&expect)
        .map(|r| serde_json::to_value(r).unwrap_or_default()))
}

fn verify_segment(
    file: &std::path::Path,
    key_state: Option<&std::path::Path>,
) -> Result<Outcome, GatewayError> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if segment::parse_name(name).is_none() {
        return Err(usage(format!(
            "{}: not a segment file (segment-NNNNNNNN.jsonl)",
            file.display()
        )));
    }
    let bytes = std::fs::read(file).map_err(|e| GatewayError::io(file, e))?;
    // STATE/log/segment-… : the state is two levels up.
    let state = key_state
        .map(std::path::Path::to_path_buf)
        .or_else(|| file.parent().and_then(|p| p.parent()).map(Into::into));
    let expect = match state {
        Some(s) => Expect::of_state(&s).map_err(|e| usage(e.to_string()))?,
        None => Expect::default(),
    };
    Ok(segment::verify(&bytes, &expect).map(|r| {
        let mut v = serde_json::to_value(&r).unwrap_or_default();
        v["records"] = r.records.into();
        v["checkpoints"] = 1.into();
        v
    }))
}
