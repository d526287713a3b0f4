//! `agent --config agent.toml [--once]`: the pull-only edge runner. One CloudEvent
//! per new capsule on stdout (as `run` prints), logs on stderr.
//!
//! `--once` does one pass and exits 0 if everything it found was admitted and ran
//! (exit code 0, evidence pushed; capsules that ran before are left alone), 1 if
//! anything was denied or failed (a registry unreachable counts: nothing was
//! admitted from it), 2 for configuration errors. Without `--once` it polls until
//! SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use super::EXIT_DENIED;
use crate::agent::{Agent, AgentConfig};
use crate::GatewayError;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// agent.toml (a trust file: see docs/agent.md).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// One pass, then exit (0 all admitted and ran, 1 anything denied or failed).
    #[arg(long)]
    pub once: bool,
}

pub fn run(args: &AgentArgs) -> Result<ExitCode, GatewayError> {
    let config = AgentConfig::load(&args.config)?;
    let cancel = super::cancel_on_signals()?;
    let mut agent = Agent::open(config, cancel)?;
    if args.once {
        let report = agent.pass();
        tracing::info!(
            ok = report.ok,
            denied = report.denied,
            failed = report.failed,
            unreachable = report.unreachable,
            already_ran = report.already_ran,
            paused = report.paused.as_deref().unwrap_or("no"),
            "pass done"
        );
        return Ok(if report.all_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_DENIED)
        });
    }
    agent.run_forever();
    Ok(ExitCode::SUCCESS)
}
