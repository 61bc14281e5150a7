//! Tests of the configuration's settings and the `[upstream_authority]` section.

use super::*;

fn args() -> RunArgs {
    RunArgs::default()
}

fn file(text: &str) -> Result<Config, ConfigErrors> {
    from_sources(&args(), Some((Path::new("server.toml"), text)))
}

#[test]
fn key_settings_and_the_upstream_authority() {
    let config = file("trust_domain = \"example.org\"").unwrap();
    assert_eq!(config.ca_key_type, KeyType::EcP256);
    assert_eq!(config.key_manager, KeyManagerKind::Disk);
    assert_eq!(config.upstream_authority, None);

    let text = "trust_domain = \"example.org\"\nca_key_type = \"rsa-2048\"\nkey_manager = \"memory\"\n\
                [upstream_authority.disk]\ncert_file_path = \"/u/cert.pem\"\nkey_file_path = \"/u/key.pem\"\n";
    let config = file(text).unwrap();
    assert_eq!(config.ca_key_type, KeyType::Rsa2048);
    assert_eq!(config.key_manager, KeyManagerKind::Memory);
    assert_eq!(
        config.upstream_authority,
        Some(DiskUpstreamConfig {
            cert_file_path: "/u/cert.pem".into(),
            key_file_path: "/u/key.pem".into(),
            bundle_file_path: None,
        })
    );
    let args = RunArgs {
        ca_key_type: Some("ec-p384".into()),
        ..args()
    };
    let config = from_sources(&args, Some((Path::new("f.toml"), text))).unwrap();
    assert_eq!(config.ca_key_type, KeyType::EcP384, "the flag wins");
}

#[test]
fn the_upstream_example_configuration_loads() {
    let text = include_str!("../../../deploy/config/server-upstream.toml");
    let config = from_sources(&args(), Some((Path::new("server-upstream.toml"), text))).unwrap();
    assert_eq!(config.ca_key_type, KeyType::EcP256);
    assert_eq!(config.key_manager, KeyManagerKind::Disk);
    let upstream = config.upstream_authority.unwrap();
    assert_eq!(
        upstream.cert_file_path,
        PathBuf::from("/etc/sigil/upstream/ca.pem")
    );
    assert_eq!(upstream.bundle_file_path, None);
}

#[test]
fn bad_key_settings_are_reported() {
    let text = "trust_domain = \"example.org\"\nca_key_type = \"ed25519\"\nkey_manager = \"vault\"\n\
                [upstream_authority.disk]\ncert_file_path = 3\nbundle = \"x\"\n\
                [upstream_authority.vault]\nurl = \"x\"\n";
    let err = file(text).unwrap_err();
    let mut got = err.0.clone();
    got.sort();
    assert_eq!(
        got,
        [
            "ca_key_type: unknown key type \"ed25519\"; expected one of `ec-p256`, `ec-p384`, `rsa-2048`",
            "key_manager: \"vault\": must be `disk` or `memory`",
            "upstream_authority.disk.cert_file_path: expected a string, found integer",
            "upstream_authority.disk.key_file_path: is required",
            "upstream_authority.disk: unknown key \"bundle\"",
            "upstream_authority.vault: unknown upstream authority (known: disk)",
        ],
        "{err}"
    );
}

#[test]
fn defaults_apply_when_only_the_trust_domain_is_set() {
    let config = file("trust_domain = \"example.org\"").unwrap();
    assert_eq!(config.trust_domain.name(), "example.org");
    assert_eq!(config.bind_address, "0.0.0.0:8081".parse().unwrap());
    assert_eq!(
        config.admin_socket_path,
        PathBuf::from("/tmp/sigil-server/admin.sock")
    );
    assert_eq!(config.admin_socket_group, None);
    assert_eq!(config.data_dir, PathBuf::from("./.sigil-server"));
    assert_eq!(
        config.audit_log_path,
        PathBuf::from("./.sigil-server/audit.log")
    );
    assert_eq!(config.default_x509_svid_ttl, Duration::from_secs(3600));
    assert_eq!(config.ca_ttl, Duration::from_secs(86400));
    assert_eq!(config.agent_svid_ttl, Duration::from_secs(3600));
    assert_eq!(config.log_level, "info");
    assert_eq!(config.log_format, LogFormat::Text);
}

#[test]
fn flags_win_over_the_file() {
    let args = RunArgs {
        bind_address: Some("127.0.0.1:0".into()),
        ca_ttl: Some("2h".into()),
        ..args()
    };
    let text = "trust_domain = \"example.org\"\nbind_address = \"0.0.0.0:9\"\nca_ttl = \"5h\"\nagent_svid_ttl = 90\nlog_format = \"json\"\n";
    let config = from_sources(&args, Some((Path::new("f.toml"), text))).unwrap();
    assert_eq!(config.bind_address, "127.0.0.1:0".parse().unwrap());
    assert_eq!(config.ca_ttl, Duration::from_secs(7200));
    assert_eq!(config.agent_svid_ttl, Duration::from_secs(90));
    assert_eq!(config.log_format, LogFormat::Json);
}

#[test]
fn the_audit_log_follows_the_data_dir_unless_set() {
    let args = RunArgs {
        trust_domain: Some("example.org".into()),
        data_dir: Some("/var/lib/sigil".into()),
        ..args()
    };
    let config = from_sources(&args, None).unwrap();
    assert_eq!(
        config.audit_log_path,
        PathBuf::from("/var/lib/sigil/audit.log")
    );
    let text = "trust_domain = \"example.org\"\naudit_log_path = \"/var/log/sigil-audit.log\"\n";
    let config = file(text).unwrap();
    assert_eq!(
        config.audit_log_path,
        PathBuf::from("/var/log/sigil-audit.log")
    );
}

#[test]
fn every_problem_is_reported() {
    let text = "trust_domain = \"Example.org\"\nbind_address = \"nowhere\"\ncolour = \"blue\"\nca_ttl = \"soon\"\nagent_svid_ttl = \"0s\"\nlog_format = \"xml\"\nlog_level = \"[\"\ndata_dir = 3\n";
    let err = file(text).unwrap_err();
    let expected_prefixes = [
        "server.toml: unknown key \"colour\"",
        "data_dir: expected a string in server.toml, found integer",
        "trust_domain: \"Example.org\": trust domain has the character 'E'",
        "bind_address: \"nowhere\": must be IP:PORT",
        "ca_ttl: \"soon\": ",
        "agent_svid_ttl: \"0s\": must be at least 1s",
        "log_level: \"[\": ",
        "log_format: \"xml\": must be `text` or `json`",
    ];
    assert_eq!(err.0.len(), expected_prefixes.len(), "{err}");
    for prefix in expected_prefixes {
        assert!(
            err.0.iter().any(|p| p.starts_with(prefix)),
            "missing {prefix:?} in {err}"
        );
    }
}

#[test]
fn the_trust_domain_is_required() {
    let err = from_sources(&args(), None).unwrap_err();
    assert_eq!(
        err.0,
        ["trust_domain: is required (set it in the config file or with --trust-domain)"]
    );
}

#[test]
fn malformed_toml_is_reported_with_the_file_name() {
    let err = file("trust_domain = ").unwrap_err();
    assert!(err.0[0].starts_with("server.toml: "), "{err}");
}

#[test]
fn an_unknown_group_is_reported() {
    let args = RunArgs {
        trust_domain: Some("example.org".into()),
        admin_socket_group: Some("no-such-group-sigil".into()),
        ..args()
    };
    let err = from_sources(&args, None).unwrap_err();
    assert_eq!(
        err.0,
        ["admin_socket_group: no group named \"no-such-group-sigil\""]
    );
}

#[test]
fn the_store_is_sled_unless_postgres_is_configured() {
    let config = file("trust_domain = \"example.org\"").unwrap();
    assert!(matches!(config.store, StoreConfig::Sled));
    let config = file("trust_domain = \"example.org\"\n[store]\nbackend = \"sled\"\n").unwrap();
    assert!(matches!(config.store, StoreConfig::Sled));

    let text = "trust_domain = \"example.org\"\n[store]\nbackend = \"postgres\"\n\
                connection_string = \"postgresql://sigil:hunter2@localhost:5433/state\"\n";
    let config = file(text).unwrap();
    let StoreConfig::Postgres(postgres) = &config.store else {
        panic!("{:?}", config.store);
    };
    assert_eq!(postgres.get_user(), Some("sigil"));
    assert_eq!(postgres.get_dbname(), Some("state"));
    assert_eq!(postgres.get_ports(), [5433]);
    assert!(
        !format!("{config:?}").contains("hunter2"),
        "the password is not in Debug output"
    );
}

#[test]
fn the_postgres_example_configuration_loads() {
    let text = include_str!("../../../deploy/config/server-postgres.toml");
    let config = from_sources(&args(), Some((Path::new("server-postgres.toml"), text))).unwrap();
    let StoreConfig::Postgres(postgres) = &config.store else {
        panic!("{:?}", config.store);
    };
    assert_eq!(postgres.get_dbname(), Some("sigil"));
    assert_eq!(postgres.get_user(), Some("sigil"));
}

#[test]
fn bad_store_settings_are_reported_without_the_password() {
    let err = |text: &str| {
        file(&format!("trust_domain = \"example.org\"\n{text}"))
            .unwrap_err()
            .0
    };
    assert_eq!(
        err("[store]\nbackend = \"etcd\"\nextra = 1\n"),
        [
            "store: unknown key \"extra\"",
            "store.backend: \"etcd\": must be `sled` or `postgres`",
        ]
    );
    assert_eq!(
        err("[store]\nbackend = \"postgres\"\n"),
        ["store.connection_string: is required with backend = \"postgres\""]
    );
    assert_eq!(
        err("[store]\nconnection_string = \"host=/run/postgresql\"\n"),
        ["store.connection_string: is only used with backend = \"postgres\""]
    );
    assert_eq!(err("store = \"postgres\"\n").len(), 1);
    let problems = err(
        "[store]\nbackend = \"postgres\"\nconnection_string = \"host=h password=hunter2 port=x\"\n",
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("store.connection_string: "),
        "{problems:?}"
    );
    assert!(!problems[0].contains("hunter2"), "{problems:?}");
    let problems =
        err("[store]\nbackend = \"postgres\"\nconnection_string = \"host=h sslmode=require\"\n");
    assert!(
        problems[0].contains("TLS to PostgreSQL is not supported"),
        "{problems:?}"
    );
}
