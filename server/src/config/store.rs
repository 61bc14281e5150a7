//! The `[store]` section of the configuration: where the server's durable
//! state lives.

use super::{string_key, unknown_keys};

/// The validated `[store]` section.
#[derive(Debug, Clone, Default)]
pub(crate) enum StoreConfig {
    /// The embedded sled database in `<data_dir>/store`.
    #[default]
    Sled,
    /// A PostgreSQL database; its `Debug` hides the password.
    Postgres(Box<tokio_postgres::Config>),
}

/// Parses the `[store]` table: `backend` (`sled` or `postgres`) and, for
/// `postgres`, `connection_string` (libpq `key=value` pairs or a URL).
pub(crate) fn store(mut table: toml::Table, problems: &mut Vec<String>) -> StoreConfig {
    let backend = string_key(&mut table, "store", "backend", problems);
    let connection_string = string_key(&mut table, "store", "connection_string", problems);
    unknown_keys(&table, "store", problems);
    match backend.as_deref() {
        None | Some("sled") => {
            if connection_string.is_some() {
                problems.push(
                    "store.connection_string: is only used with backend = \"postgres\"".into(),
                );
            }
            StoreConfig::Sled
        }
        Some("postgres") => match connection_string {
            None => {
                problems.push(
                    "store.connection_string: is required with backend = \"postgres\"".into(),
                );
                StoreConfig::Sled
            }
            Some(text) => match postgres_config(&text) {
                Ok(config) => StoreConfig::Postgres(Box::new(config)),
                Err(problem) => {
                    problems.push(format!("store.connection_string: {problem}"));
                    StoreConfig::Sled
                }
            },
        },
        Some(other) => {
            problems.push(format!(
                "store.backend: {other:?}: must be `sled` or `postgres`"
            ));
            StoreConfig::Sled
        }
    }
}

/// Parses a connection string; the message never repeats its values (it
/// may hold a password).
fn postgres_config(text: &str) -> Result<tokio_postgres::Config, String> {
    let config = text
        .parse::<tokio_postgres::Config>()
        .map_err(|e| crate::store::postgres::detail(&e))?;
    use tokio_postgres::config::SslMode;
    if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
        return Err(
            "sslmode: TLS to PostgreSQL is not supported; connect over a Unix socket or the loopback interface"
                .into(),
        );
    }
    if config.get_hosts().is_empty() {
        return Err("names no host (a Unix socket directory or a host name)".into());
    }
    Ok(config)
}
