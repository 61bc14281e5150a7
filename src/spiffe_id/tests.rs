//! Each test names the rule of the SPIFFE conformance notes it checks.

use super::*;

fn parse(s: &str) -> Result<SpiffeId, ParseError> {
    s.parse()
}

#[test]
fn valid_ids_split_into_trust_domain_and_path() {
    let id = parse("spiffe://example.org/ns/prod/sa/web").unwrap();
    assert_eq!(id.trust_domain_name(), "example.org");
    assert_eq!(id.path(), "/ns/prod/sa/web");
    assert!(id.is_workload_id());
    assert_eq!(id.to_string(), "spiffe://example.org/ns/prod/sa/web");
}

#[test]
fn id1_scheme_must_be_spiffe() {
    assert_eq!(parse("https://example.org/x"), Err(ParseError::WrongScheme));
    assert_eq!(parse("example.org/x"), Err(ParseError::WrongScheme));
    assert_eq!(parse("spiffe:/example.org/x"), Err(ParseError::WrongScheme));
}

#[test]
fn id2_trust_domain_is_required() {
    assert_eq!(parse("spiffe://"), Err(ParseError::MissingTrustDomain));
    assert_eq!(parse("spiffe:///path"), Err(ParseError::MissingTrustDomain));
}

#[test]
fn id3_no_query_or_fragment() {
    assert_eq!(parse("spiffe://td/x?q=1"), Err(ParseError::QueryOrFragment));
    assert_eq!(parse("spiffe://td/x#f"), Err(ParseError::QueryOrFragment));
}

#[test]
fn id4_no_userinfo_or_port() {
    assert_eq!(parse("spiffe://u@td/x"), Err(ParseError::UserInfoOrPort));
    assert_eq!(parse("spiffe://td:1/x"), Err(ParseError::UserInfoOrPort));
}

#[test]
fn id5_id6_uppercase_scheme_and_trust_domain_are_refused() {
    assert_eq!(
        parse("SPIFFE://example.org/x"),
        Err(ParseError::WrongScheme)
    );
    assert_eq!(
        parse("spiffe://Example.org/x"),
        Err(ParseError::BadTrustDomainChar('E'))
    );
    assert_eq!(
        TrustDomain::new("Example.org"),
        Err(ParseError::BadTrustDomainChar('E'))
    );
}

#[test]
fn id7_id8_trust_domain_charset() {
    assert!(TrustDomain::new("a-b_c.9").is_ok());
    assert_eq!(
        TrustDomain::new("a%20b"),
        Err(ParseError::BadTrustDomainChar('%'))
    );
    assert_eq!(
        TrustDomain::new("a+b"),
        Err(ParseError::BadTrustDomainChar('+'))
    );
}

#[test]
fn id9_ipv4_names_are_ordinary_names_and_ipv6_is_refused() {
    assert!(parse("spiffe://10.0.0.1/x").is_ok());
    assert!(parse("spiffe://[::1]/x").is_err());
}

#[test]
fn id10_id11_trust_domain_length_and_labels() {
    let label = "a".repeat(63);
    assert!(TrustDomain::new(&label).is_ok());
    assert_eq!(
        TrustDomain::new(&"a".repeat(64)),
        Err(ParseError::TrustDomainTooLong)
    );
    let long = vec!["a".repeat(50); 6].join(".");
    assert!(long.len() > MAX_TRUST_DOMAIN_LEN);
    assert_eq!(TrustDomain::new(&long), Err(ParseError::TrustDomainTooLong));
    for bad in ["example..org", ".example.org", "example.org."] {
        assert_eq!(TrustDomain::new(bad), Err(ParseError::EmptyLabel), "{bad}");
    }
}

#[test]
fn id12_trust_domain_id_has_no_trailing_slash() {
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(td.id_string(), "spiffe://example.org");
    let id = parse("spiffe://example.org").unwrap();
    assert!(!id.is_workload_id());
    assert_eq!(
        parse("spiffe://example.org/"),
        Err(ParseError::EmptySegment)
    );
    assert_eq!(TrustDomain::new("spiffe://example.org").unwrap(), td);
    assert_eq!(
        TrustDomain::new("spiffe://example.org/x"),
        Err(ParseError::UnexpectedPath)
    );
}

#[test]
fn id13_no_percent_encoding_in_path() {
    assert_eq!(
        parse("spiffe://td/a%20b"),
        Err(ParseError::BadPathChar('%'))
    );
}

#[test]
fn id14_id15_no_empty_dot_or_trailing_segments() {
    assert_eq!(parse("spiffe://td//a"), Err(ParseError::EmptySegment));
    assert_eq!(parse("spiffe://td/a/"), Err(ParseError::EmptySegment));
    assert_eq!(parse("spiffe://td/./a"), Err(ParseError::DotSegment));
    assert_eq!(parse("spiffe://td/a/.."), Err(ParseError::DotSegment));
    assert!(parse("spiffe://td/a.b/..c").is_ok());
}

#[test]
fn id16_id18_path_charset_is_case_sensitive_and_strict() {
    let id = parse("spiffe://td/Ns/Web-1_x.y").unwrap();
    assert_eq!(id.path(), "/Ns/Web-1_x.y");
    for c in ['~', ':', '@', '[', '!', '*', ' ', 'é'] {
        let s = format!("spiffe://td/a{c}b");
        assert_eq!(parse(&s), Err(ParseError::BadPathChar(c)), "{s}");
    }
}

#[test]
fn id19_ids_up_to_2048_bytes() {
    let prefix = "spiffe://td/";
    let max = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
    assert_eq!(max.len(), MAX_SPIFFE_ID_LEN);
    assert!(parse(&max).is_ok());
    let over = format!("{max}b");
    assert_eq!(parse(&over), Err(ParseError::TooLong));
}

#[test]
fn empty_string_is_refused() {
    assert_eq!(parse(""), Err(ParseError::Empty));
    assert_eq!(TrustDomain::new(""), Err(ParseError::MissingTrustDomain));
}

#[test]
fn display_round_trips_and_serde_validates() {
    for s in ["spiffe://td", "spiffe://td/a/b", "spiffe://a-b.c_d/x.y/Z"] {
        let id = parse(s).unwrap();
        assert_eq!(parse(&id.to_string()).unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }
    assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/a/\"").is_err());
}

#[test]
fn membership_and_paths_under_a_trust_domain() {
    let td = TrustDomain::new("example.org").unwrap();
    let id = td.id_with_path("/sigil/server").unwrap();
    assert_eq!(id.as_str(), "spiffe://example.org/sigil/server");
    assert_eq!(td.server_id(), id);
    assert!(id.is_member_of(&td));
    assert!(!id.is_member_of(&TrustDomain::new("example.com").unwrap()));
}
