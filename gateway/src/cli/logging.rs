//! `--log-format` and `--log-level`: one `tracing` subscriber for the process,
//! writing to stderr (stdout stays the commands' output). The level comes from
//! `--log-level`, else `RUST_LOG`, else `info`; either may be a level (`debug`) or
//! `tracing-subscriber` directives (`info,capsule_gateway::handshake=debug`).

use tracing_subscriber::EnvFilter;

use crate::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event: time, level, target, message, key=value fields
    Text,
    /// One JSON object per line, the event's fields at the top level
    Json,
}

/// Installs the subscriber. A filter that does not parse is a usage error naming
/// where it came from.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), GatewayError> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l)
            .map_err(|e| GatewayError::Usage(format!("--log-level `{l}`: {e}")))?,
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v)
                .map_err(|e| GatewayError::Usage(format!("RUST_LOG `{v}`: {e}")))?,
            _ => EnvFilter::new("info"),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Only fails when a subscriber is already installed (a second init in tests).
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    Ok(())
}
