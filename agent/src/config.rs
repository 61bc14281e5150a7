//! The configuration of `sigil-agent run`: a TOML file whose every key is
//! also a command-line flag, except the `[workload_attestors]` table (see
//! [`AttestorsConfig`]). Flags win over the file. Every problem found is
//! reported at once, so an operator fixes them in one go.

use std::fmt;
use std::path::{Path, PathBuf};

use sigil::TrustDomain;
use sigil::keys::KeyType;
use tracing_subscriber::EnvFilter;
use zeroize::Zeroizing;

use crate::node::NodeAttestorConfig;
use crate::workload::AttestorsConfig;

/// Default directory of the agent's own SVID, key and bundle.
pub(crate) const DEFAULT_DATA_DIR: &str = "./.sigil-agent";

/// Default path of the Workload API socket.
pub(crate) const DEFAULT_SOCKET_PATH: &str = "/tmp/sigil-agent/public/api.sock";

/// Default log level.
pub(crate) const DEFAULT_LOG_LEVEL: &str = "info";

/// The keys a configuration file may hold.
const KEYS: &[&str] = &[
    "trust_domain",
    "server_address",
    "trust_bundle_path",
    "join_token",
    "join_token_file",
    "data_dir",
    "socket_path",
    "log_level",
    "log_format",
    "workload_key_type",
    "workload_attestors",
    "node_attestor",
];

/// A join token: a one-time secret. It never appears in logs or `Debug`
/// output, and its memory is wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct JoinToken(Zeroizing<String>);

impl JoinToken {
    /// Wraps a token, refusing an empty one.
    pub(crate) fn new(token: String) -> Result<Self, String> {
        let token = Zeroizing::new(token);
        if token.trim().is_empty() {
            return Err("the join token is empty".to_owned());
        }
        Ok(Self(token))
    }

    /// Reads a token file; surrounding whitespace is ignored.
    pub(crate) fn read_file(path: &Path) -> Result<Self, std::io::Error> {
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        Self::new(text.trim().to_owned()).map_err(std::io::Error::other)
    }

    /// The token's bytes, to send to the server.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken([redacted])")
    }
}

/// Parses `--join-token`.
fn parse_join_token(s: &str) -> Result<JoinToken, String> {
    JoinToken::new(s.to_owned())
}

/// Where the join token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JoinTokenSource {
    /// Given directly.
    Inline(JoinToken),
    /// Read from a file when it is needed.
    File(PathBuf),
}

/// The log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The flags of `sigil-agent run`. Each one overrides the configuration
/// file's key of the same name (with `_` instead of `-`).
#[derive(Debug, Default, clap::Args)]
pub(crate) struct RunArgs {
    /// TOML configuration file; flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The trust domain, e.g. `example.org` (required).
    #[arg(long, value_name = "NAME")]
    pub(crate) trust_domain: Option<String>,
    /// The server's agent API, `host:port` (required).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) server_address: Option<String>,
    /// PEM file with the server's CA certificates, used to verify the server
    /// at the first attestation.
    #[arg(long, value_name = "FILE")]
    pub(crate) trust_bundle_path: Option<PathBuf>,
    /// One-time join token for the first attestation.
    #[arg(long, value_name = "TOKEN", value_parser = parse_join_token)]
    pub(crate) join_token: Option<JoinToken>,
    /// File holding the join token.
    #[arg(long, value_name = "FILE")]
    pub(crate) join_token_file: Option<PathBuf>,
    /// Directory of the agent's SVID, key and bundle [default: ./.sigil-agent].
    #[arg(long, value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Path of the Workload API socket [default: /tmp/sigil-agent/public/api.sock].
    #[arg(long, value_name = "PATH")]
    pub(crate) socket_path: Option<PathBuf>,
    /// Log filter, e.g. `info` or `debug`; RUST_LOG, when set, wins [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub(crate) log_level: Option<String>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub(crate) log_format: Option<String>,
    /// Key type of workload SVIDs: `ec-p256` or `rsa-2048` [default: ec-p256].
    #[arg(long, value_name = "TYPE")]
    pub(crate) workload_key_type: Option<String>,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The trust domain.
    pub(crate) trust_domain: TrustDomain,
    /// The server's agent API, `host:port`.
    pub(crate) server_address: String,
    /// The bootstrap bundle, needed only for the first attestation.
    pub(crate) trust_bundle_path: Option<PathBuf>,
    /// The join token, needed only when no agent SVID is stored.
    pub(crate) join_token: Option<JoinTokenSource>,
    /// Where the agent's SVID, key and bundle live.
    pub(crate) data_dir: PathBuf,
    /// The Workload API socket.
    pub(crate) socket_path: PathBuf,
    /// The log filter.
    pub(crate) log_level: String,
    /// The log format.
    pub(crate) log_format: LogFormat,
    /// The key type of workload SVIDs.
    pub(crate) workload_key_type: KeyType,
    /// The optional workload attestors.
    pub(crate) workload_attestors: AttestorsConfig,
    /// The node attestor (`[node_attestor]`; a join token without it).
    pub(crate) node_attestor: NodeAttestorConfig,
}

/// Everything wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) struct ConfigError {
    /// One line per problem.
    pub(crate) problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration:")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// The values given in one place (the file or the flags), unchecked.
#[derive(Debug, Default)]
struct Layer {
    trust_domain: Option<String>,
    server_address: Option<String>,
    trust_bundle_path: Option<PathBuf>,
    join_token: Option<JoinToken>,
    join_token_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    socket_path: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<String>,
    workload_key_type: Option<String>,
    workload_attestors: Option<AttestorsConfig>,
    node_attestor: Option<NodeAttestorConfig>,
}

impl Config {
    /// Reads the configuration file named by `--config`, if any, applies the
    /// flags over it, and checks the result.
    pub(crate) fn load(args: RunArgs) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let file = match &args.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => parse_file(&text, path, &mut problems),
                Err(e) => {
                    problems.push(format!("cannot read {}: {e}", path.display()));
                    Layer::default()
                }
            },
            None => Layer::default(),
        };
        let flags = Layer {
            trust_domain: args.trust_domain,
            server_address: args.server_address,
            trust_bundle_path: args.trust_bundle_path,
            join_token: args.join_token,
            join_token_file: args.join_token_file,
            data_dir: args.data_dir,
            socket_path: args.socket_path,
            log_level: args.log_level,
            log_format: args.log_format,
            workload_key_type: args.workload_key_type,
            workload_attestors: None,
            node_attestor: None,
        };
        check(flags, file, problems)
    }
}

/// Parses a configuration file, noting every unknown key and every value of
/// the wrong type.
fn parse_file(text: &str, path: &Path, problems: &mut Vec<String>) -> Layer {
    let origin = path.display();
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let message = e.message().to_owned();
            problems.push(format!("{origin}: not valid TOML: {message}"));
            return Layer::default();
        }
    };
    let mut layer = Layer::default();
    for (key, value) in table {
        if key == "node_attestor" {
            match NodeAttestorConfig::from_toml(value) {
                Ok(attestor) => layer.node_attestor = Some(attestor),
                Err(e) => problems.push(format!("{origin}: {e}")),
            }
            continue;
        }
        if key == "workload_attestors" {
            match AttestorsConfig::from_toml(value) {
                Ok(attestors) => layer.workload_attestors = Some(attestors),
                Err(e) => problems.push(format!("{origin}: {e}")),
            }
            continue;
        }
        let Some(s) = value.as_str().map(str::to_owned) else {
            if KEYS.contains(&key.as_str()) {
                problems.push(format!("{origin}: `{key}` must be a string"));
            } else {
                problems.push(format!("{origin}: unknown key `{key}`"));
            }
            continue;
        };
        match key.as_str() {
            "trust_domain" => layer.trust_domain = Some(s),
            "server_address" => layer.server_address = Some(s),
            "trust_bundle_path" => layer.trust_bundle_path = Some(s.into()),
            "join_token" => match JoinToken::new(s) {
                Ok(t) => layer.join_token = Some(t),
                Err(e) => problems.push(format!("{origin}: join_token: {e}")),
            },
            "join_token_file" => layer.join_token_file = Some(s.into()),
            "data_dir" => layer.data_dir = Some(s.into()),
            "socket_path" => layer.socket_path = Some(s.into()),
            "log_level" => layer.log_level = Some(s),
            "log_format" => layer.log_format = Some(s),
            "workload_key_type" => layer.workload_key_type = Some(s),
            _ => problems.push(format!("{origin}: unknown key `{key}`")),
        }
    }
    layer
}

/// Merges the flags over the file and checks every value.
fn check(flags: Layer, file: Layer, mut problems: Vec<String>) -> Result<Config, ConfigError> {
    let trust_domain = match flags.trust_domain.or(file.trust_domain) {
        None => {
            problems.push("trust_domain is required (--trust-domain)".to_owned());
            None
        }
        Some(name) => match TrustDomain::new(&name) {
            Ok(td) => Some(td),
            Err(e) => {
                problems.push(format!("trust_domain: {name:?} {e}"));
                None
            }
        },
    };

    let server_address = match flags.server_address.or(file.server_address) {
        None => {
            problems.push("server_address is required (--server-address)".to_owned());
            None
        }
        Some(addr) => match check_host_port(&addr) {
            Ok(()) => Some(addr),
            Err(e) => {
                problems.push(format!("server_address: {addr:?} {e}"));
                None
            }
        },
    };

    // The token settings count as one: a flag for either replaces both keys
    // of the file.
    let (token, token_file) = if flags.join_token.is_some() || flags.join_token_file.is_some() {
        (flags.join_token, flags.join_token_file)
    } else {
        (file.join_token, file.join_token_file)
    };
    let join_token = match (token, token_file) {
        (Some(_), Some(_)) => {
            problems.push("set only one of join_token and join_token_file".to_owned());
            None
        }
        (Some(t), None) => Some(JoinTokenSource::Inline(t)),
        (None, Some(p)) => Some(JoinTokenSource::File(p)),
        (None, None) => None,
    };

    let data_dir = flags
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    if data_dir.as_os_str().is_empty() {
        problems.push("data_dir must not be empty".to_owned());
    }
    let socket_path = flags
        .socket_path
        .or(file.socket_path)
        .unwrap_or_else(|| DEFAULT_SOCKET_PATH.into());
    if socket_path.as_os_str().is_empty() {
        problems.push("socket_path must not be empty".to_owned());
    }
    let trust_bundle_path = flags.trust_bundle_path.or(file.trust_bundle_path);

    let log_level = flags
        .log_level
        .or(file.log_level)
        .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
    if let Err(e) = EnvFilter::builder().parse(&log_level) {
        problems.push(format!(
            "log_level: {log_level:?} is not a valid filter: {e}"
        ));
    }
    let log_format = match flags.log_format.or(file.log_format).as_deref() {
        None | Some("text") => Some(LogFormat::Text),
        Some("json") => Some(LogFormat::Json),
        Some(other) => {
            problems.push(format!(
                "log_format: {other:?} is not one of `text`, `json`"
            ));
            None
        }
    };

    let workload_key_type = match flags.workload_key_type.or(file.workload_key_type) {
        None => KeyType::default(),
        Some(name) => match name.parse::<KeyType>() {
            Ok(t @ (KeyType::EcP256 | KeyType::Rsa2048)) => t,
            _ => {
                problems.push(format!(
                    "workload_key_type: {name:?} is not one of `ec-p256`, `rsa-2048`"
                ));
                KeyType::default()
            }
        },
    };

    let node_attestor = flags
        .node_attestor
        .or(file.node_attestor)
        .unwrap_or_default();
    if node_attestor.reattests() && join_token.is_some() {
        problems.push(format!(
            "join_token and join_token_file are for the join_token node attestor, and [node_attestor.{}] is set",
            node_attestor.name()
        ));
    }

    let workload_attestors = flags
        .workload_attestors
        .or(file.workload_attestors)
        .unwrap_or_default();

    match (trust_domain, server_address, log_format) {
        (Some(trust_domain), Some(server_address), Some(log_format)) if problems.is_empty() => {
            Ok(Config {
                trust_domain,
                server_address,
                trust_bundle_path,
                join_token,
                data_dir,
                socket_path,
                log_level,
                log_format,
                workload_key_type,
                workload_attestors,
                node_attestor,
            })
        }
        _ => Err(ConfigError { problems }),
    }
}

/// Checks a `host:port` address: a non-empty host (an IPv6 address in
/// brackets) and a port from 1 to 65535.
fn check_host_port(addr: &str) -> Result<(), &'static str> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("must be host:port");
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains([':', '/', ' '])
    };
    if !host_ok {
        return Err("must be host:port with a host name or an IP address (IPv6 in brackets)");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("must end with a port from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_file(text: &str, args: RunArgs) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(RunArgs {
            config: Some(path),
            ..args
        })
    }

    #[test]
    fn the_workload_key_type_is_p256_unless_set() {
        let base = "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:8081\"\n";
        let config = load_file(base, RunArgs::default()).unwrap();
        assert_eq!(config.workload_key_type, KeyType::EcP256);
        let text = format!("{base}workload_key_type = \"rsa-2048\"\n");
        let config = load_file(&text, RunArgs::default()).unwrap();
        assert_eq!(config.workload_key_type, KeyType::Rsa2048);
        let flag = RunArgs {
            workload_key_type: Some("ec-p256".into()),
            ..RunArgs::default()
        };
        let config = load_file(&text, flag).unwrap();
        assert_eq!(config.workload_key_type, KeyType::EcP256, "the flag wins");
        for bad in ["ec-p384", "dsa"] {
            let text = format!("{base}workload_key_type = \"{bad}\"\n");
            let err = load_file(&text, RunArgs::default()).unwrap_err();
            assert_eq!(
                err.problems,
                [format!(
                    "workload_key_type: \"{bad}\" is not one of `ec-p256`, `rsa-2048`"
                )]
            );
        }
    }

    #[test]
    fn a_file_with_defaults_loads() {
        let config = load_file(
            r#"
            trust_domain = "example.org"
            server_address = "127.0.0.1:8081"
            trust_bundle_path = "/etc/sigil/bundle.pem"
            join_token_file = "/etc/sigil/token"
            "#,
            RunArgs::default(),
        )
        .unwrap();
        assert_eq!(config.trust_domain.name(), "example.org");
        assert_eq!(config.server_address, "127.0.0.1:8081");
        assert_eq!(
            config.join_token,
            Some(JoinTokenSource::File("/etc/sigil/token".into()))
        );
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(config.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(config.log_level, "info");
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn flags_win_over_the_file() {
        let config = load_file(
            r#"
            trust_domain = "example.org"
            server_address = "server:8081"
            join_token_file = "/etc/sigil/token"
            log_format = "text"
            "#,
            RunArgs {
                server_address: Some("[::1]:9000".into()),
                join_token: Some(JoinToken::new("s3cr3t".into()).unwrap()),
                log_format: Some("json".into()),
                ..RunArgs::default()
            },
        )
        .unwrap();
        assert_eq!(config.server_address, "[::1]:9000");
        assert!(
            matches!(config.join_token, Some(JoinTokenSource::Inline(ref t)) if t.expose() == "s3cr3t")
        );
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn every_problem_is_reported_and_unknown_keys_are_named() {
        let err = load_file(
            r#"
            trust_domain = "Example.org"
            server_adress = "server:8081"
            data_dir = 7
            join_token = "a"
            join_token_file = "/t"
            log_format = "xml"
            "#,
            RunArgs::default(),
        )
        .unwrap_err();
        let all = err.to_string();
        assert!(all.starts_with("invalid configuration:"), "{all}");
        let expected = [
            "unknown key `server_adress`",
            "`data_dir` must be a string",
            "trust_domain: \"Example.org\"",
            "server_address is required",
            "set only one of join_token and join_token_file",
            "log_format: \"xml\" is not one of `text`, `json`",
        ];
        for e in expected {
            assert!(
                err.problems.iter().any(|p| p.contains(e)),
                "missing {e:?} in {all}"
            );
        }
        assert_eq!(err.problems.len(), expected.len(), "{all}");
    }

    #[test]
    fn required_keys_are_named_without_a_file() {
        let err = Config::load(RunArgs::default()).unwrap_err();
        assert_eq!(
            err.problems,
            [
                "trust_domain is required (--trust-domain)",
                "server_address is required (--server-address)"
            ]
        );
    }

    #[test]
    fn server_addresses_need_a_host_and_a_port() {
        for ok in ["server:1", "10.0.0.1:8081", "[::1]:8081", "a.b.c:65535"] {
            assert_eq!(check_host_port(ok), Ok(()), "{ok}");
        }
        for bad in [
            "server", ":8081", "server:0", "server:x", "::1:80", "[::1]:", "a b:1",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let args = RunArgs {
            join_token: Some(JoinToken::new("s3cr3t-token".into()).unwrap()),
            trust_domain: Some("example.org".into()),
            server_address: Some("server:1".into()),
            ..RunArgs::default()
        };
        assert!(!format!("{args:?}").contains("s3cr3t"));
        let config = Config::load(args).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("JoinToken([redacted])"), "{shown}");
    }

    #[test]
    fn workload_attestors_are_off_unless_configured() {
        let base = "trust_domain = \"example.org\"\nserver_address = \"server:1\"\n";
        let config = load_file(base, RunArgs::default()).unwrap();
        assert_eq!(config.workload_attestors, AttestorsConfig::default());

        let config = load_file(
            &format!(
                "{base}[workload_attestors.docker]\nsocket_path = \"/run/docker.sock\"\n\
                 [workload_attestors.systemd]\n"
            ),
            RunArgs::default(),
        )
        .unwrap();
        let attestors = config.workload_attestors;
        assert_eq!(
            attestors.docker.unwrap().socket_path,
            PathBuf::from("/run/docker.sock")
        );
        assert!(attestors.systemd.is_some());

        let err = load_file(
            &format!("{base}[workload_attestors.docker]\nsocket = \"/x\"\n"),
            RunArgs::default(),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(
            err.problems[0].contains("workload_attestors: unknown field `socket`"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_are_reported_with_the_file() {
        let err = load_file("trust_domain = ", RunArgs::default()).unwrap_err();
        assert!(err.problems[0].contains("not valid TOML"), "{err}");
    }
}
