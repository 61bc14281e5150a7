//! Operator commands beside the registration: `x509 mint`, `healthcheck`
//! and `validate`, through the real binaries.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::support::*;

#[test]
fn a_minted_svid_verifies_with_openssl_and_its_key_stays_private() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let out_dir = dir.path().join("minted");
    let id = format!("spiffe://{TD}/ops/backup");
    let printed = server.cli_ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        &id,
        "--ttl",
        "600",
        "--dns-name",
        "backup.example.org",
        "--write",
        out_dir.to_str().unwrap(),
    ]);
    assert!(printed.contains(&format!("SPIFFE ID: {id}")), "{printed}");
    assert!(printed.contains("svid.pem"), "{printed}");

    let mode = std::fs::metadata(out_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(out_dir.join("bundle.pem"))
        .arg(out_dir.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        stdout(&verify),
        stderr(&verify)
    );
    assert!(
        stdout(&verify).contains("svid.pem: OK"),
        "{}",
        stdout(&verify)
    );

    let svid = pem::parse_many(std::fs::read(out_dir.join("svid.pem")).unwrap()).unwrap();
    assert_eq!(svid.len(), 1);
    let leaf = svid[0].contents();
    assert_eq!(sigil::x509::spiffe_id_of(leaf).unwrap().as_str(), id);
    sigil::x509::check_leaf(leaf).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!((600..=610).contains(&life), "lifetime {life}s");
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(
        san.value.general_names.iter().any(|n| matches!(
            n,
            x509_parser::extensions::GeneralName::DNSName("backup.example.org")
        )),
        "{:?}",
        san.value
    );

    // The key written is the key the SVID certifies.
    let key = sigil::keys::PrivateKey::from_pem(
        &std::fs::read_to_string(out_dir.join("key.pem")).unwrap(),
    )
    .unwrap();
    let pair = key.key_pair().unwrap();
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&pair).as_slice()
    );
}

#[test]
fn mint_prints_the_pems_without_write_and_refuses_ids_it_must_not_sign() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let id = format!("spiffe://{TD}/ops/once");
    let doc: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        &id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(doc["spiffe_id"], id.as_str());
    let svid = pem::parse(doc["svid_pem"].as_str().unwrap()).unwrap();
    assert_eq!(
        sigil::x509::spiffe_id_of(svid.contents()).unwrap().as_str(),
        id
    );
    assert!(
        doc["key_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert_eq!(doc["bundle_pem"].as_str().unwrap(), server.bundle_pem());

    let text = server.cli_ok(&["x509", "mint", "--spiffe-id", &id]);
    let blocks = pem::parse_many(&text).unwrap();
    let tags: Vec<&str> = blocks.iter().map(|b| b.tag()).collect();
    assert_eq!(tags, ["CERTIFICATE", "PRIVATE KEY", "CERTIFICATE"]);

    let refusals = [
        (
            format!("spiffe://{TD}/sigil/agent/x"),
            format!(
                "Error: csr: URI SAN spiffe://{TD}/sigil/agent/x is under /sigil/, which is reserved for the server and agents\n"
            ),
        ),
        (
            "spiffe://other.org/web".to_owned(),
            format!("Error: csr: URI SAN spiffe://other.org/web is not in trust domain {TD}\n"),
        ),
        (
            format!("spiffe://{TD}"),
            format!("Error: csr: URI SAN spiffe://{TD} has no path; an SVID needs one\n"),
        ),
    ];
    for (id, message) in refusals {
        let out = server.cli(&["x509", "mint", "--spiffe-id", &id]);
        assert_eq!(out.status.code(), Some(1), "{id}");
        assert_eq!(stderr(&out), message);
        assert!(stdout(&out).is_empty());
    }
    let out = server.cli(&["x509", "mint", "--spiffe-id", &id, "--dns-name", "no way"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("Error: dns_names[0]: \"no way\" "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn healthcheck_succeeds_only_against_a_serving_process() {
    let domain = Domain::start(&[]);
    let out = domain.server.cli(&["healthcheck"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Server is healthy\n");

    let out = output_of(
        Command::new(agent_bin())
            .args(["healthcheck", "--socket-path"])
            .arg(&domain.agent.socket),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Agent is healthy\n");

    let missing = domain.dir.path().join("missing.sock");
    let out = output_of(
        Command::new(server_bin())
            .args(["healthcheck", "--socket-path"])
            .arg(&missing),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "Error: cannot reach the server's admin socket {}",
            missing.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let out = output_of(
        Command::new(agent_bin())
            .args(["healthcheck", "--socket-path"])
            .arg(&missing),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "Error: cannot reach the Workload API at {}",
            missing.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Runs `<bin> validate --config <config>` in the config file's directory.
fn validate(bin: std::path::PathBuf, config: &std::path::Path) -> std::process::Output {
    output_of(
        Command::new(bin)
            .args(["validate", "--config"])
            .arg(config)
            .current_dir(config.parent().unwrap()),
    )
}

#[test]
fn validate_accepts_good_configurations_and_reports_every_problem() {
    let dir = scratch();
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        "trust_domain = \"example.org\"\nbind_address = \"127.0.0.1:8081\"\nca_ttl = \"12h\"\n",
    )
    .unwrap();
    let out = validate(server_bin(), &path);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Configuration is valid\n");

    std::fs::write(
        &path,
        "trust_domain = \"Example.org\"\nbind_address = \"nowhere\"\ncolour = \"blue\"\nlog_format = \"xml\"\n",
    )
    .unwrap();
    let out = validate(server_bin(), &path);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    let expected = [
        format!("{}: unknown key \"colour\"", path.display()),
        "trust_domain: \"Example.org\": ".to_owned(),
        "bind_address: \"nowhere\": must be IP:PORT".to_owned(),
        "log_format: \"xml\": must be `text` or `json`".to_owned(),
    ];
    assert_eq!(err.lines().count(), expected.len(), "{err}");
    for prefix in &expected {
        assert!(
            err.lines().any(|l| l.starts_with(prefix.as_str())),
            "missing {prefix:?} in {err}"
        );
    }
    // Nothing was started: no data directory appeared.
    assert!(!dir.path().join(".sigil-server").exists());

    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "trust_domain = \"example.org\"\nserver_address = \"server:8081\"\njoin_token_file = \"/etc/sigil/token\"\n",
    )
    .unwrap();
    let out = validate(agent_bin(), &path);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Configuration is valid\n");

    std::fs::write(
        &path,
        "trust_domain = \"example.org\"\nserver_adress = \"server:8081\"\njoin_token = \"a\"\njoin_token_file = \"/t\"\nlog_format = \"xml\"\n",
    )
    .unwrap();
    let out = validate(agent_bin(), &path);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let expected = [
        format!("{}: unknown key `server_adress`", path.display()),
        "server_address is required (--server-address)".to_owned(),
        "set only one of join_token and join_token_file".to_owned(),
        "log_format: \"xml\" is not one of `text`, `json`".to_owned(),
    ];
    assert_eq!(err.lines().count(), expected.len(), "{err}");
    for line in &expected {
        assert!(err.lines().any(|l| l == line), "missing {line:?} in {err}");
    }
}

#[test]
fn other_trust_domains_bundles_are_set_listed_and_deleted() {
    use sigil::TrustDomain;
    use sigil::bundle::X509Bundle;
    use sigil::x509::Authority;

    let dir = scratch();
    let mut server = Server::start(dir.path());
    let authority = |td: &TrustDomain| {
        Authority::self_signed(td, std::time::Duration::from_secs(3600))
            .unwrap()
            .cert()
            .clone()
    };
    let other = TrustDomain::new("other.org").unwrap();
    let third = TrustDomain::new("third.org").unwrap();
    let other_bundle = X509Bundle::new(other.clone(), vec![authority(&other)]);
    let third_bundle = X509Bundle::new(third.clone(), vec![authority(&third), authority(&third)]);
    let pem_path = dir.path().join("other.pem");
    std::fs::write(&pem_path, other_bundle.to_pem()).unwrap();
    let json_path = dir.path().join("third.json");
    std::fs::write(&json_path, third_bundle.to_spiffe_json(9, 60).unwrap()).unwrap();

    let out = server.cli_ok(&[
        "bundle",
        "set",
        "--id",
        "spiffe://other.org",
        "--path",
        pem_path.to_str().unwrap(),
    ]);
    assert_eq!(out, "Bundle set for spiffe://other.org (1 certificates)\n");
    let out = server.cli_ok(&[
        "bundle",
        "set",
        "--id",
        "spiffe://third.org",
        "--format",
        "spiffe",
        "--path",
        json_path.to_str().unwrap(),
    ]);
    assert_eq!(out, "Bundle set for spiffe://third.org (2 certificates)\n");

    // Stored durably, listed by name, in both formats.
    server.restart();
    let pem = server.cli_ok(&["bundle", "list"]);
    assert_eq!(
        pem,
        format!(
            "# spiffe://other.org\n{}\n# spiffe://third.org\n{}\n",
            other_bundle.to_pem(),
            third_bundle.to_pem()
        )
    );
    let docs: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "list", "--format", "spiffe"])).unwrap();
    let doc = serde_json::to_vec(&docs["spiffe://third.org"]).unwrap();
    let (listed, sequence) = X509Bundle::from_spiffe_json(third.clone(), &doc).unwrap();
    assert_eq!(listed, third_bundle);
    assert_eq!(sequence, Some(9));
    assert_eq!(docs.as_object().unwrap().len(), 2);
    // The server's own bundle is not among them.
    assert!(!pem.contains(&server.bundle_pem()));

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    let refusals: [(Vec<&str>, String); 5] = [
        (
            vec!["set", "--id", "spiffe://example.org", "--path", pem_path.to_str().unwrap()],
            "Error: bundle.trust_domain: example.org is the server's own trust domain; its bundle is managed by the server\n".to_owned(),
        ),
        (
            vec!["set", "--id", "spiffe://other.org", "--path", empty.to_str().unwrap()],
            format!("Error: --path {}: no certificate found\n", empty.display()),
        ),
        (
            vec![
                "set",
                "--id",
                "spiffe://other.org",
                "--format",
                "spiffe",
                "--path",
                pem_path.to_str().unwrap(),
            ],
            format!(
                "Error: --path {}: malformed bundle document: not JSON: invalid number at line 1 column 2\n",
                pem_path.display()
            ),
        ),
        (
            vec!["delete", "--id", "spiffe://nowhere.org"],
            "Error: no bundle for trust domain nowhere.org\n".to_owned(),
        ),
        (
            vec!["delete", "--id", "spiffe://example.org"],
            "Error: trust_domain: example.org is the server's own trust domain; its bundle is managed by the server\n".to_owned(),
        ),
    ];
    for (args, message) in refusals {
        let mut full = vec!["bundle"];
        full.extend(args);
        let out = server.cli(&full);
        assert_eq!(out.status.code(), Some(1), "{full:?}");
        assert_eq!(stderr(&out), message, "{full:?}");
    }

    let out = server.cli_ok(&["bundle", "delete", "--id", "spiffe://other.org"]);
    assert_eq!(out, "Bundle deleted for spiffe://other.org\n");
    assert_eq!(
        server.cli_ok(&["bundle", "list"]),
        format!("# spiffe://third.org\n{}\n", third_bundle.to_pem())
    );
}

/// `bundle show --format spiffe` is a SPIFFE bundle (TB-1, TB-2, X5-20..22):
/// one `x509-svid` key per authority, carrying exactly that certificate in
/// `x5c` (standard base64), with a sequence number and a refresh hint.
#[test]
fn the_bundle_is_shown_as_a_spiffe_bundle() {
    use base64::Engine;

    let dir = scratch();
    let server = Server::start(dir.path());
    let pem = server.bundle_pem();
    let der = pem::parse(pem.as_bytes()).unwrap().into_contents();
    let doc: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();

    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{doc}");
    assert_eq!(keys[0]["use"], "x509-svid");
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert!(keys[0].get("kid").is_none(), "{doc}");
    let x5c = keys[0]["x5c"].as_array().unwrap();
    assert_eq!(x5c.len(), 1);
    let cert = base64::engine::general_purpose::STANDARD
        .decode(x5c[0].as_str().unwrap())
        .unwrap();
    assert_eq!(cert, der);
    assert!(doc["spiffe_sequence"].as_u64().is_some(), "{doc}");
    assert!(
        doc["spiffe_refresh_hint"].as_u64().is_some_and(|h| h > 0),
        "{doc}"
    );

    let bad = server.cli(&["bundle", "show", "--format", "der"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("invalid value 'der' for '--format <FORMAT>'"),
        "{}",
        stderr(&bad)
    );
}
