use clap::Parser;

use super::*;

fn fields() -> EntryFields {
    EntryFields {
        spiffe_id: Some("spiffe://example.org/web".into()),
        parent_id: Some("spiffe://example.org/agent".into()),
        selectors: vec!["unix:uid:1000".into()],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        dns_names: Vec::new(),
        hint: None,
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
        entry_expiry: None,
    }
}

/// Parses `sigil-server entry <args>`.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: EntryCommand,
}

fn parse(args: &[&str]) -> Result<EntryCommand, clap::Error> {
    let mut full = vec!["entry"];
    full.extend_from_slice(args);
    Cli::try_parse_from(full).map(|cli| cli.command)
}

#[test]
fn flags_are_validated_with_their_names() {
    let mut f = fields();
    f.spiffe_id = Some("spiffe://Bad/x".into());
    let err = f.to_proto(String::new()).unwrap_err().to_string();
    assert!(err.starts_with("--spiffe-id \"spiffe://Bad/x\": "), "{err}");

    let mut f = fields();
    f.selectors.push("unix".into());
    assert_eq!(
        f.to_proto(String::new()).unwrap_err().to_string(),
        "--selector \"unix\": must be `type:value`"
    );

    let mut f = fields();
    f.dns_names.push("bad name".into());
    let err = f.to_proto(String::new()).unwrap_err().to_string();
    assert!(err.starts_with("--dns-name \"bad name\": "), "{err}");

    let mut f = fields();
    f.federates_with.push("Partner.org".into());
    let err = f.to_proto(String::new()).unwrap_err().to_string();
    assert!(
        err.starts_with("--federates-with \"Partner.org\": "),
        "{err}"
    );

    assert_eq!(
        fields().to_proto("a/b".into()).unwrap_err().to_string(),
        "--entry-id \"a/b\": only ASCII letters, digits, `-`, `_` and `.` are allowed"
    );
}

#[test]
fn valid_flags_become_a_wire_entry() {
    let mut f = fields();
    f.x509_svid_ttl = Some(60);
    f.jwt_svid_ttl = Some(30);
    f.hint = Some("h".into());
    f.federates_with = vec!["partner.org".into()];
    f.admin = true;
    f.downstream = true;
    f.entry_expiry = Some(1_900_000_000);
    let e = f.to_proto("id1".into()).unwrap();
    assert_eq!(e.id, "id1");
    assert_eq!(e.selectors[0].r#type, "unix");
    assert_eq!(e.selectors[0].value, "uid:1000");
    assert_eq!(e.x509_svid_ttl, 60);
    assert_eq!(e.jwt_svid_ttl, 30);
    assert_eq!(e.hint, "h");
    assert_eq!(e.federates_with, ["partner.org"]);
    assert!(e.admin && e.downstream);
    assert_eq!(e.expires_at, 1_900_000_000);
}

#[test]
fn the_expiry_is_rfc3339_or_unix_seconds() {
    assert_eq!(parse_expiry("1900000000"), Ok(1_900_000_000));
    assert_eq!(parse_expiry("0"), Ok(0));
    assert_eq!(parse_expiry("2030-01-01T00:00:00Z"), Ok(1_893_456_000));
    let err = parse_expiry("tomorrow").unwrap_err();
    assert!(err.starts_with("\"tomorrow\" is not a time"), "{err}");
    assert!(parse_expiry("-5").is_err());
    assert!(parse_expiry("99999999999999999999").is_err());
}

#[test]
fn data_conflicts_with_the_field_flags() {
    for args in [
        &[
            "create",
            "--data",
            "f.json",
            "--spiffe-id",
            "spiffe://example.org/a",
        ][..],
        &["create", "--data", "f.json", "--admin"],
        &["create", "--data", "f.json", "--entry-id", "x"],
        &["update", "--data", "f.json", "--entry-id", "x"],
        &["update", "--data", "f.json", "--hint", "h"],
        &["delete", "--data", "f.json", "--entry-id", "x"],
    ] {
        let err = parse(args).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{args:?}"
        );
    }
    assert!(parse(&["create", "--data", "f.json"]).is_ok());
    assert!(parse(&["update", "--data", "f.json"]).is_ok());
    assert!(parse(&["delete", "--data", "f.json"]).is_ok());

    let err = parse(&["create", "--spiffe-id", "spiffe://example.org/a"]).unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
}

#[test]
fn filters_become_a_list_request() {
    let EntryCommand::Show(show) = parse(&[
        "show",
        "--entry-id",
        "e1",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--federates-with",
        "partner.org",
        "--hint",
        "h",
        "--selector",
        "unix:uid:1",
        "--selector",
        "unix:gid:2",
        "--match",
        "any",
    ])
    .unwrap() else {
        panic!("not show");
    };
    let request = show.filter.to_request().unwrap();
    assert_eq!(request.by_id, "e1");
    assert_eq!(request.by_spiffe_id, "spiffe://example.org/web");
    assert_eq!(request.by_parent_id, "");
    assert_eq!(request.by_federates_with, ["partner.org"]);
    assert_eq!(request.by_hint, "h");
    assert_eq!(request.by_selectors.len(), 2);
    assert_eq!(request.selector_match, i32::from(SelectorMatch::Any));

    let EntryCommand::Count(count) = parse(&["count", "--selector", "unix:uid:1"]).unwrap() else {
        panic!("not count");
    };
    let request = count.filter.to_request().unwrap();
    assert_eq!(request.selector_match, i32::from(SelectorMatch::Superset));

    let err = parse(&["show", "--match", "exact"]).unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);

    let EntryCommand::Show(bad) = parse(&["show", "--selector", "nocolon"]).unwrap() else {
        panic!("not show");
    };
    assert_eq!(
        bad.filter.to_request().unwrap_err().to_string(),
        "--selector \"nocolon\": must be `type:value`"
    );
}
