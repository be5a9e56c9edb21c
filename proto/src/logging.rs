//! How the hub and the agent log: to stderr, filtered by `OUTPOST_LOG` (tracing's filter
//! syntax, e.g. `info` or `outpost_hub=debug,warn`; `RUST_LOG` is read when it is not set), as
//! text or, with `OUTPOST_LOG_FORMAT=json`, as one JSON object per line carrying the fields of
//! the spans it happened in (agent, bundle, rollout).

use tracing_subscriber::EnvFilter;

/// The log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The format `OUTPOST_LOG_FORMAT` asks for (`json` or `text`), and a complaint about any other
/// value.
pub fn format_from(value: Option<&str>) -> (Format, Option<String>) {
    match value.map(str::trim) {
        None | Some("") | Some("text") => (Format::Text, None),
        Some("json") => (Format::Json, None),
        Some(other) => (
            Format::Text,
            Some(format!(
                "OUTPOST_LOG_FORMAT={other:?} is not json or text; logging as text"
            )),
        ),
    }
}

/// Starts logging; `default` is the filter when neither `OUTPOST_LOG` nor `RUST_LOG` is set.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_env("OUTPOST_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    let (format, complaint) = format_from(std::env::var("OUTPOST_LOG_FORMAT").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        Format::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        Format::Text => builder.init(),
    }
    if let Some(complaint) = complaint {
        tracing::warn!("{complaint}");
    }
}
