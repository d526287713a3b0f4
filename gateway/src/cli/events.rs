//! `events deliver`: sends what the event spool holds to the sink, with backoff,
//! until it is empty or the limits are spent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::delivery::{Backoff, Delivery, DrainLimits, Sink, Spool};
use crate::layout::StateLayout;
use crate::GatewayError;

#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// Deliver the queued events (STATE/spool/events) to an HTTP CloudEvents sink,
    /// oldest first, retrying with exponential backoff and jitter. Exit 0 the spool
    /// is empty, 4 events are still queued (nothing is dropped).
    Deliver(DeliverArgs),
}

#[derive(Debug, clap::Args)]
pub struct DeliverArgs {
    /// Gateway state (its spool).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/capsule-gateway")]
    pub state: PathBuf,
    /// The sink: `http://host:port/path`.
    #[arg(long, value_name = "URL")]
    pub sink: String,
    /// One attempt's limit (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Attempts per event before giving up (the event stays queued).
    #[arg(long, default_value_t = 5)]
    pub attempts: u32,
    /// The whole command's limit (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 120_000)]
    pub budget_ms: u64,
}

pub fn run(command: EventsCommand) -> Result<ExitCode, GatewayError> {
    match command {
        EventsCommand::Deliver(args) => {
            let sink = Sink::parse(&args.sink, Duration::from_millis(args.timeout_ms))?;
            let spool = Spool::open(&StateLayout::new(&args.state).spool())?;
            let delivery = Delivery::new(spool, sink)?;
            let report = delivery.drain(DrainLimits {
                budget: Duration::from_millis(args.budget_ms),
                attempts: args.attempts.max(1),
                backoff: Backoff::default(),
            })?;
            crate::output::println_stdout(serde_json::json!({
                "delivered": report.delivered,
                "rejected": report.rejected,
                "pending": report.pending,
                "busy": report.busy,
                "last_error": report.last_error,
            }))?;
            Ok(ExitCode::from(if report.pending == 0 {
                0
            } else {
                super::EXIT_RUNTIME
            }))
        }
    }
}
