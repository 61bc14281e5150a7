//! The server's configuration: a TOML file and command-line flags (flags
//! win), validated as a whole so that every problem is reported at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sigil::TrustDomain;
use sigil::keys::KeyType;

use crate::ca::keys::KeyManagerKind;
use crate::ca::upstream::DiskUpstreamConfig;

mod node_attestors;
mod store;
mod upstream;

use node_attestors::node_attestors;
pub(crate) use node_attestors::{
    K8sPsatClusterConfig, K8sPsatConfig, K8sPsatKeys, NodeAttestorsConfig, X509PopConfig,
};
pub(crate) use store::StoreConfig;
use upstream::upstream_authority;

/// Default address of the agent API.
pub(crate) const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:8081";
/// Default path of the admin socket.
pub(crate) const DEFAULT_ADMIN_SOCKET: &str = "/tmp/sigil-server/admin.sock";
/// Default data directory.
const DEFAULT_DATA_DIR: &str = "./.sigil-server";

/// The flags of `sigil-server run`; each overrides the key of the same name
/// in the configuration file.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct RunArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Trust domain of the server, e.g. `example.org` (required).
    #[arg(long, value_name = "NAME")]
    pub(crate) trust_domain: Option<String>,
    /// Address of the agent API [default: 0.0.0.0:8081].
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) bind_address: Option<String>,
    /// Path of the admin API's Unix socket [default: /tmp/sigil-server/admin.sock].
    #[arg(long, value_name = "PATH")]
    pub(crate) admin_socket_path: Option<String>,
    /// Group allowed to open the admin socket (mode 0660); without it 0600.
    #[arg(long, value_name = "GROUP")]
    pub(crate) admin_socket_group: Option<String>,
    /// Directory of the server's state [default: ./.sigil-server].
    #[arg(long, value_name = "DIR")]
    pub(crate) data_dir: Option<String>,
    /// File the audit events are appended to, mode 0600 [default: <data_dir>/audit.log].
    #[arg(long, value_name = "FILE")]
    pub(crate) audit_log_path: Option<String>,
    /// Lifetime of workload X.509-SVIDs whose entry sets none [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub(crate) default_x509_svid_ttl: Option<String>,
    /// Lifetime of each X.509 signing authority; SVID lifetimes are capped at a sixth of it [default: 24h].
    #[arg(long, value_name = "DURATION")]
    pub(crate) ca_ttl: Option<String>,
    /// Lifetime of agent SVIDs [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub(crate) agent_svid_ttl: Option<String>,
    /// Key type of the X.509 signing authorities: `ec-p256`, `ec-p384` or `rsa-2048` [default: ec-p256].
    #[arg(long, value_name = "TYPE")]
    pub(crate) ca_key_type: Option<String>,
    /// Where the authorities' keys are kept: `disk` or `memory` (a restart starts new authorities) [default: disk].
    #[arg(long, value_name = "KIND")]
    pub(crate) key_manager: Option<String>,
    /// Log filter, e.g. `info` or `debug` (RUST_LOG, when set, wins) [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub(crate) log_level: Option<String>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub(crate) log_format: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The admin socket's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketGroup {
    /// The group's name.
    pub(crate) name: String,
    /// Its ID.
    pub(crate) gid: u32,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The trust domain.
    pub(crate) trust_domain: TrustDomain,
    /// Address of the agent API.
    pub(crate) bind_address: SocketAddr,
    /// Path of the admin socket.
    pub(crate) admin_socket_path: PathBuf,
    /// Group of the admin socket.
    pub(crate) admin_socket_group: Option<SocketGroup>,
    /// Directory of the server's state.
    pub(crate) data_dir: PathBuf,
    /// File of the audit log.
    pub(crate) audit_log_path: PathBuf,
    /// Lifetime of workload SVIDs whose entry sets none.
    pub(crate) default_x509_svid_ttl: Duration,
    /// Lifetime of each X.509 signing authority.
    pub(crate) ca_ttl: Duration,
    /// Lifetime of agent SVIDs.
    pub(crate) agent_svid_ttl: Duration,
    /// Key type of the X.509 signing authorities.
    pub(crate) ca_key_type: KeyType,
    /// Where the authorities' keys are kept.
    pub(crate) key_manager: KeyManagerKind,
    /// `[upstream_authority.disk]`: the CA that signs the authorities.
    pub(crate) upstream_authority: Option<DiskUpstreamConfig>,
    /// Log filter directives.
    pub(crate) log_level: String,
    /// Log format.
    pub(crate) log_format: LogFormat,
    /// The node attestors besides `join_token`.
    pub(crate) node_attestors: NodeAttestorsConfig,
    /// `[store]`: where the durable state lives.
    pub(crate) store: StoreConfig,
}

/// Every problem found in the configuration, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigErrors(pub(crate) Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration:")?;
        for problem in &self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The keys of the configuration file.
const KEYS: &[&str] = &[
    "trust_domain",
    "bind_address",
    "admin_socket_path",
    "admin_socket_group",
    "data_dir",
    "audit_log_path",
    "default_x509_svid_ttl",
    "ca_ttl",
    "agent_svid_ttl",
    "ca_key_type",
    "key_manager",
    "upstream_authority",
    "log_level",
    "log_format",
    "node_attestors",
    "store",
];

/// Reads the file named by `--config` (if any) and merges the flags.
pub(crate) fn load(args: &RunArgs) -> Result<Config, ConfigErrors> {
    match &args.config {
        None => from_sources(args, None),
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => from_sources(args, Some((path, &text))),
            Err(e) => Err(ConfigErrors(vec![format!(
                "{}: cannot read: {e}",
                path.display()
            )])),
        },
    }
}

/// Merges the flags over a file's text (`(path, text)`) and validates.
pub(crate) fn from_sources(
    args: &RunArgs,
    file: Option<(&Path, &str)>,
) -> Result<Config, ConfigErrors> {
    let mut problems = Vec::new();
    let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut node_attestors_table = None;
    let mut upstream_table = None;
    let mut store_table = None;

    if let Some((path, text)) = file {
        match text.parse::<toml::Table>() {
            Ok(table) => {
                for (key, value) in table {
                    let Some(known) = KEYS.iter().find(|k| **k == key) else {
                        problems.push(format!("{}: unknown key {key:?}", path.display()));
                        continue;
                    };
                    match value {
                        toml::Value::Table(t) if *known == "upstream_authority" => {
                            upstream_table = Some(t);
                        }
                        other if *known == "upstream_authority" => problems.push(format!(
                            "upstream_authority: expected a table in {}, found {}",
                            path.display(),
                            other.type_str()
                        )),
                        toml::Value::Table(t) if *known == "node_attestors" => {
                            node_attestors_table = Some(t);
                        }
                        toml::Value::Table(t) if *known == "store" => {
                            store_table = Some(t);
                        }
                        other if *known == "store" => problems.push(format!(
                            "store: expected a table in {}, found {}",
                            path.display(),
                            other.type_str()
                        )),
                        toml::Value::String(s) if *known != "node_attestors" => {
                            values.insert(known, s);
                        }
                        toml::Value::Integer(n) if known.ends_with("_ttl") && n >= 0 => {
                            values.insert(known, format!("{n}s"));
                        }
                        other => problems.push(format!(
                            "{key}: expected a string in {}, found {}",
                            path.display(),
                            other.type_str()
                        )),
                    }
                }
            }
            Err(e) => problems.push(format!("{}: {}", path.display(), e.to_string().trim_end())),
        }
    }

    let flags = [
        ("trust_domain", &args.trust_domain),
        ("bind_address", &args.bind_address),
        ("admin_socket_path", &args.admin_socket_path),
        ("admin_socket_group", &args.admin_socket_group),
        ("data_dir", &args.data_dir),
        ("audit_log_path", &args.audit_log_path),
        ("default_x509_svid_ttl", &args.default_x509_svid_ttl),
        ("ca_ttl", &args.ca_ttl),
        ("agent_svid_ttl", &args.agent_svid_ttl),
        ("ca_key_type", &args.ca_key_type),
        ("key_manager", &args.key_manager),
        ("log_level", &args.log_level),
        ("log_format", &args.log_format),
    ];
    for (key, flag) in flags {
        if let Some(value) = flag {
            values.insert(key, value.clone());
        }
    }

    let mut take = |key: &str| values.remove(key);
    let trust_domain = match take("trust_domain") {
        None => {
            problems.push(
                "trust_domain: is required (set it in the config file or with --trust-domain)"
                    .into(),
            );
            None
        }
        Some(v) => TrustDomain::new(&v)
            .map_err(|e| problems.push(format!("trust_domain: {v:?}: {e}")))
            .ok(),
    };
    let bind = take("bind_address").unwrap_or_else(|| DEFAULT_BIND_ADDRESS.into());
    let bind_address = bind
        .parse::<SocketAddr>()
        .map_err(|_| problems.push(format!("bind_address: {bind:?}: must be IP:PORT")))
        .ok();
    let admin_socket_path =
        PathBuf::from(take("admin_socket_path").unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()));
    if admin_socket_path.as_os_str().is_empty() {
        problems.push("admin_socket_path: must not be empty".into());
    }
    let admin_socket_group = take("admin_socket_group").and_then(|name| {
        resolve_group(&name)
            .map_err(|e| problems.push(format!("admin_socket_group: {e}")))
            .ok()
    });
    let data_dir = PathBuf::from(take("data_dir").unwrap_or_else(|| DEFAULT_DATA_DIR.into()));
    if data_dir.as_os_str().is_empty() {
        problems.push("data_dir: must not be empty".into());
    }
    let audit_log_path =
        take("audit_log_path").map_or_else(|| data_dir.join("audit.log"), PathBuf::from);
    if audit_log_path.as_os_str().is_empty() {
        problems.push("audit_log_path: must not be empty".into());
    }
    let mut duration = |key: &str, default: &str, problems: &mut Vec<String>| {
        let text = take(key).unwrap_or_else(|| default.into());
        parse_duration(&text)
            .map_err(|e| problems.push(format!("{key}: {text:?}: {e}")))
            .ok()
    };
    let default_x509_svid_ttl = duration("default_x509_svid_ttl", "1h", &mut problems);
    let ca_ttl = duration("ca_ttl", "24h", &mut problems);
    let agent_svid_ttl = duration("agent_svid_ttl", "1h", &mut problems);
    let log_level = take("log_level").unwrap_or_else(|| "info".into());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        problems.push(format!("log_level: {log_level:?}: {e}"));
    }
    let log_format = match take("log_format").as_deref() {
        None | Some("text") => Some(LogFormat::Text),
        Some("json") => Some(LogFormat::Json),
        Some(other) => {
            problems.push(format!("log_format: {other:?}: must be `text` or `json`"));
            None
        }
    };

    let ca_key_type = take("ca_key_type").map_or(KeyType::default(), |text| {
        text.parse::<KeyType>().unwrap_or_else(|e| {
            problems.push(format!("ca_key_type: {e}"));
            KeyType::default()
        })
    });
    let key_manager = take("key_manager").map_or(KeyManagerKind::default(), |text| {
        text.parse::<KeyManagerKind>().unwrap_or_else(|e| {
            problems.push(format!("key_manager: {e}"));
            KeyManagerKind::default()
        })
    });
    let upstream_authority = upstream_table.and_then(|t| upstream_authority(t, &mut problems));
    let store = store_table.map_or_else(StoreConfig::default, |t| store::store(t, &mut problems));

    let node_attestors = match (&trust_domain, node_attestors_table) {
        (Some(td), Some(table)) => node_attestors(td, table, &mut problems),
        _ => NodeAttestorsConfig::default(),
    };

    match (
        trust_domain,
        bind_address,
        default_x509_svid_ttl,
        ca_ttl,
        agent_svid_ttl,
        log_format,
    ) {
        (
            Some(trust_domain),
            Some(bind_address),
            Some(default_x509_svid_ttl),
            Some(ca_ttl),
            Some(agent_svid_ttl),
            Some(log_format),
        ) if problems.is_empty() => Ok(Config {
            trust_domain,
            bind_address,
            admin_socket_path,
            admin_socket_group,
            data_dir,
            audit_log_path,
            default_x509_svid_ttl,
            ca_ttl,
            agent_svid_ttl,
            ca_key_type,
            key_manager,
            upstream_authority,
            log_level,
            log_format,
            node_attestors,
            store,
        }),
        _ => Err(ConfigErrors(problems)),
    }
}

/// A string value of a section, noting a wrong type.
fn string_key(
    section: &mut toml::Table,
    prefix: &str,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    match section.remove(key)? {
        toml::Value::String(s) => Some(s),
        other => {
            problems.push(format!(
                "{prefix}.{key}: expected a string, found {}",
                other.type_str()
            ));
            None
        }
    }
}

fn unknown_keys(section: &toml::Table, prefix: &str, problems: &mut Vec<String>) {
    for key in section.keys() {
        problems.push(format!("{prefix}: unknown key {key:?}"));
    }
}

/// Parses a humantime duration (`30s`, `1h`, `1h 30m`) of at least a second.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

fn resolve_group(name: &str) -> Result<SocketGroup, String> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(SocketGroup {
            name: name.to_owned(),
            gid: group.gid.as_raw(),
        }),
        Ok(None) => Err(format!("no group named {name:?}")),
        Err(e) => Err(format!("looking up group {name:?}: {e}")),
    }
}

#[cfg(test)]
mod tests;
