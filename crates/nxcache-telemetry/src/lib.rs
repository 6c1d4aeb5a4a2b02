//! Logging and the metrics registry, set up once per process by the binary.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

mod audit;
mod tracing_export;

pub use audit::{AuditLimiter, Bucket};

pub use tracing_export::{TraceExport, continue_trace, inject_trace};

/// Installs the global `tracing` subscriber for logs only (see [`init`]).
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    init(format, filter, None)
}

/// Installs the global `tracing` subscriber: log lines on stderr in `format`, and, with
/// `export`, every span sent as an OpenTelemetry span. `RUST_LOG`, when set, wins over
/// `filter`. Calling it twice is harmless (the second call changes nothing), which lets
/// tests start several servers in one process.
pub fn init(format: LogFormat, filter: &str, export: Option<&TraceExport>) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.trim().is_empty() => EnvFilter::try_new(from_env),
        _ => EnvFilter::try_new(filter),
    }
    .map_err(|e| format!("invalid log filter: {e}"))?;
    let spans = export.map(|e| tracing_opentelemetry::layer().with_tracer(e.tracer()));
    let registry = tracing_subscriber::registry().with(filter).with(spans);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if installed.is_err() {
        tracing::debug!("a log subscriber was already installed; keeping it");
    }
    Ok(())
}

/// A registry for one node, with the standard `process_*` metrics (CPU, memory, open
/// files) already in it.
pub fn new_registry() -> prometheus::Registry {
    let registry = prometheus::Registry::new();
    #[cfg(target_os = "linux")]
    {
        let collector = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(err) = registry.register(Box::new(collector)) {
            tracing::warn!(%err, "process metrics unavailable");
        }
    }
    registry
}

#[cfg(test)]
mod tests {
    #[test]
    fn registry_exposes_process_metrics() {
        let families = super::new_registry().gather();
        assert!(
            families
                .iter()
                .any(|f| f.name() == "process_resident_memory_bytes"),
            "{:?}",
            families
                .iter()
                .map(|f| f.name().to_owned())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_bad_filter_is_reported() {
        assert!(
            super::init_logging(super::LogFormat::Text, "[[[").is_err()
                || std::env::var("RUST_LOG").is_ok()
        );
    }
}
