//! Each test names the rule of the SPIFFE conformance notes it checks.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn ca() -> Authority {
    Authority::self_signed(&td(), Duration::from_secs(3600)).unwrap()
}

fn leaf(ca: &Authority) -> (IssuedSvid, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let svid = ca
        .sign_leaf(
            &key,
            &id("spiffe://example.org/web"),
            &["web.example.org".into()],
            Duration::from_secs(600),
        )
        .unwrap();
    (svid, key)
}

#[test]
fn x5_18_issued_leaf_passes_the_leaf_checklist() {
    let ca = ca();
    let (svid, _) = leaf(&ca);
    assert_eq!(svid.chain.len(), 1);
    let der = &svid.chain[0];
    assert_eq!(check_leaf(der).unwrap(), id("spiffe://example.org/web"));

    let (_, cert) = X509Certificate::from_der(der).unwrap();
    assert_eq!(cert.version().0, 2, "v3");
    let serial = cert.raw_serial();
    assert!(
        serial.len() <= 20 && serial[0] & 0x80 == 0,
        "positive serial of at most 20 octets"
    );
    assert_eq!(
        cert.signature_algorithm.algorithm.to_id_string(),
        "1.2.840.10045.4.3.2",
        "ecdsa-with-SHA256"
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth, "X5-15");
    let aki = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == "2.5.29.35")
        .unwrap();
    assert!(!aki.critical, "AKI must not be critical");
    assert_eq!(
        cert.issuer().as_raw(),
        X509Certificate::from_der(ca.cert())
            .unwrap()
            .1
            .subject()
            .as_raw(),
        "X5-6"
    );
}

#[test]
fn x5_19_authority_passes_the_ca_checklist() {
    let ca = ca();
    check_ca(ca.cert()).unwrap();
    let (_, cert) = X509Certificate::from_der(ca.cert()).unwrap();
    assert!(
        cert.extended_key_usage().unwrap().is_none(),
        "X5-16: no EKU on CAs"
    );
    assert!(
        cert.extensions()
            .iter()
            .any(|e| e.oid.to_id_string() == "2.5.29.14"),
        "SKI present"
    );
    assert_eq!(
        spiffe_id_of(ca.cert()).unwrap().to_string(),
        "spiffe://example.org",
        "ID-12: no trailing slash"
    );
}

#[test]
fn x5_3_leaf_needs_a_path_and_the_right_trust_domain() {
    let ca = ca();
    let key = KeyPair::generate().unwrap();
    assert!(matches!(
        ca.sign_leaf(
            &key,
            &id("spiffe://example.org"),
            &[],
            Duration::from_secs(60)
        ),
        Err(IssueError::RootPath(_))
    ));
    assert!(matches!(
        ca.sign_leaf(
            &key,
            &id("spiffe://other.org/x"),
            &[],
            Duration::from_secs(60)
        ),
        Err(IssueError::ForeignId(..))
    ));
}

#[test]
fn svid_lifetime_is_capped_by_the_authority_and_backdated() {
    let ca = Authority::self_signed(&td(), Duration::from_secs(120)).unwrap();
    let key = KeyPair::generate().unwrap();
    let before = SystemTime::now();
    let svid = ca
        .sign_leaf(
            &key,
            &id("spiffe://example.org/web"),
            &[],
            Duration::from_secs(3600),
        )
        .unwrap();
    assert!(svid.not_after <= ca.not_after());
    let (_, cert) = X509Certificate::from_der(&svid.chain[0]).unwrap();
    let not_before = cert.validity().not_before.timestamp();
    let now = before
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        not_before <= now - 5,
        "notBefore is backdated for clock skew"
    );
}

/// Signs a certificate with arbitrary params, to feed the checks.
fn custom(params: CertificateParams) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

fn leaf_like() -> CertificateParams {
    let t = SystemTime::now();
    leaf_params(
        &td(),
        &id("spiffe://example.org/web"),
        &[],
        t,
        t + Duration::from_secs(60),
    )
    .unwrap()
}

#[test]
fn x5_1_exactly_one_uri_san() {
    let mut p = leaf_like();
    p.subject_alt_names.push(SanType::URI(
        "spiffe://example.org/other".try_into().unwrap(),
    ));
    assert_eq!(check_leaf(&custom(p)), Err(CheckError::UriSanCount(2)));
    let mut p = leaf_like();
    p.subject_alt_names.clear();
    assert_eq!(check_leaf(&custom(p)), Err(CheckError::UriSanCount(0)));
}

#[test]
fn x5_7_x5_8_leaf_needs_basic_constraints_ca_false() {
    let mut p = leaf_like();
    p.is_ca = IsCa::NoCa; // rcgen omits the extension
    assert_eq!(
        check_leaf(&custom(p)),
        Err(CheckError::BasicConstraints { expected: false })
    );
    let mut p = leaf_like();
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    assert_eq!(
        check_leaf(&custom(p)),
        Err(CheckError::BasicConstraints { expected: false })
    );
}

#[test]
fn x5_11_to_x5_14_leaf_key_usage() {
    let mut p = leaf_like();
    p.key_usages.clear();
    assert!(matches!(
        check_leaf(&custom(p)),
        Err(CheckError::KeyUsage(_))
    ));
    let mut p = leaf_like();
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    assert!(matches!(
        check_leaf(&custom(p)),
        Err(CheckError::KeyUsage(_))
    ));
    let mut p = leaf_like();
    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert!(matches!(
        check_leaf(&custom(p)),
        Err(CheckError::KeyUsage(_))
    ));
}

#[test]
fn x5_15_eku_must_have_both_purposes() {
    let mut p = leaf_like();
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    assert_eq!(check_leaf(&custom(p)), Err(CheckError::ExtendedKeyUsage));
}

#[test]
fn x5_12_ca_needs_key_cert_sign() {
    let t = SystemTime::now();
    let mut p = ca_params(&td(), t, t + Duration::from_secs(60));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    assert_eq!(
        check_ca(&custom(p)),
        Err(CheckError::KeyUsage("keyCertSign"))
    );
}

#[test]
fn csr_round_trip_and_refusals() {
    let key = KeyPair::generate().unwrap();
    let web = id("spiffe://example.org/web");
    let der = build_csr(&key, Some(&web)).unwrap();
    let csr = Csr::from_der(&der).unwrap();
    assert_eq!(csr.spiffe_id(), Some(&web));

    // A tampered signature is refused.
    let mut bad = der.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(Csr::from_der(&bad).unwrap_err(), CsrError::Malformed);

    assert_eq!(
        Csr::from_der(&vec![0u8; MAX_CSR_LEN + 1]).unwrap_err(),
        CsrError::TooLarge
    );
    assert_eq!(Csr::from_der(b"garbage").unwrap_err(), CsrError::Malformed);

    // Two URI SANs are refused.
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI("spiffe://example.org/a".try_into().unwrap()),
        SanType::URI("spiffe://example.org/b".try_into().unwrap()),
    ];
    let two = params.serialize_request(&key).unwrap().der().to_vec();
    assert_eq!(Csr::from_der(&two).unwrap_err(), CsrError::UriSanCount(2));
}

#[test]
fn authority_survives_a_round_trip_through_its_parts() {
    let ca = ca();
    let again = Authority::from_parts(td(), ca.cert().clone(), ca.key().clone()).unwrap();
    let (svid, _) = leaf(&again);
    check_leaf(&svid.chain[0]).unwrap();
    assert!(format!("{again:?}").contains("[elided]"));
}

#[test]
fn serials_are_random_and_positive() {
    let a = new_serial().to_bytes();
    let b = new_serial().to_bytes();
    assert_ne!(a, b);
    assert!(a[0] & 0x80 == 0 && a.len() == 16);
}
