//! Log setup: human-readable lines by default, JSON on request; `RUST_LOG` filters as usual.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// The log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Install the global subscriber (once; later calls are no-ops).
pub fn init(format: Format) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        Format::Text => builder.with_target(false).try_init(),
        Format::Json => builder.json().try_init(),
    };
}
