//! Logging to stderr, as text or JSON. `RUST_LOG`, when set, overrides the
//! configured level.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `level` has been checked already.
pub(crate) fn init(level: &str, format: LogFormat) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => match EnvFilter::builder().parse(&env) {
            Ok(filter) => filter,
            Err(e) => {
                eprintln!("warning: ignoring RUST_LOG ({e}); using log level {level:?}");
                EnvFilter::new(level)
            }
        },
        _ => EnvFilter::new(level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A subscriber already installed (only possible in tests) is kept.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
