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

// === key types ===

use std::sync::Arc;

use rustls::pki_types::{ServerName, UnixTime};

use crate::bundle::X509Bundle;
use crate::keys::KeyType;
use crate::tls::{SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver, TrustStore};

/// The signature algorithm OID of certificates signed by a key of `t`.
fn signature_oid(t: KeyType) -> &'static str {
    match t {
        KeyType::EcP256 => "1.2.840.10045.4.3.2", // ecdsa-with-SHA256
        KeyType::EcP384 => "1.2.840.10045.4.3.3", // ecdsa-with-SHA384
        KeyType::Rsa2048 => "1.2.840.113549.1.1.11", // sha256WithRSAEncryption
    }
}

fn signature_oid_of(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.signature_algorithm.algorithm.to_id_string()
}

fn root_of(t: KeyType) -> Authority {
    let key = PrivateKey::generate(t).unwrap();
    Authority::self_signed_with(&td(), key, SystemTime::now(), Duration::from_secs(3600)).unwrap()
}

/// Signs a leaf for `id` over a new key of type `t` from a CSR, as the
/// server does for agents.
fn leaf_of(ca: &Authority, t: KeyType, id: &SpiffeId) -> (IssuedSvid, PrivateKey) {
    let key = PrivateKey::generate(t).unwrap();
    let csr = Csr::from_der(&build_csr(&key.key_pair().unwrap(), Some(id)).unwrap()).unwrap();
    let svid = ca
        .sign_leaf(csr.public_key(), id, &[], Duration::from_secs(600))
        .unwrap();
    (svid, key)
}

/// Runs a TLS handshake in memory between a server presenting `server` and
/// a client presenting `client`, both verified against `bundle`.
fn handshake(
    bundle: &X509Bundle,
    server: (&IssuedSvid, &PrivateKey, &SpiffeId),
    client: (&IssuedSvid, &PrivateKey),
) -> Result<(), rustls::Error> {
    let store = Arc::new(TrustStore::new(bundle).unwrap());
    let server_config = crate::tls::server_config(
        Arc::new(SvidResolver::new(server.0.chain.clone(), server.1).unwrap()),
        Arc::new(SpiffeClientVerifier::new(Arc::clone(&store))),
    )
    .unwrap();
    let client_config = crate::tls::client_config(
        Arc::new(SpiffeServerVerifier::new(store, server.2.clone())),
        Some(Arc::new(
            SvidResolver::new(client.0.chain.clone(), client.1).unwrap(),
        )),
    )
    .unwrap();
    let mut c = rustls::ClientConnection::new(
        Arc::new(client_config),
        ServerName::try_from("sigil").unwrap(),
    )?;
    let mut s = rustls::ServerConnection::new(Arc::new(server_config))?;
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        s.write_tls(&mut buf).unwrap();
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets()?;
        }
    }
    Err(rustls::Error::General("handshake did not finish".into()))
}

#[test]
fn every_ca_key_type_signs_leaves_of_every_workload_key_type() {
    let web = id("spiffe://example.org/web");
    for ca_type in KeyType::ALL {
        let ca = root_of(ca_type);
        check_ca(ca.cert()).unwrap();
        assert_eq!(signature_oid_of(ca.cert()), signature_oid(ca_type));
        let bundle = X509Bundle::new(td(), vec![ca.cert().clone()]);
        let store = TrustStore::new(&bundle).unwrap();
        for leaf_type in [KeyType::EcP256, KeyType::Rsa2048] {
            let case = format!("CA {ca_type}, leaf {leaf_type}");
            let (svid, key) = leaf_of(&ca, leaf_type, &web);
            assert_eq!(svid.chain.len(), 1, "{case}");
            let leaf = &svid.chain[0];
            assert_eq!(check_leaf(leaf).unwrap(), web, "{case}");
            assert_eq!(signature_oid_of(leaf), signature_oid(ca_type), "{case}");
            // X5-13, X5-18: digitalSignature only, RSA included.
            let (_, cert) = X509Certificate::from_der(leaf).unwrap();
            let ku = cert.key_usage().unwrap().unwrap();
            assert!(ku.critical, "{case}");
            assert_eq!(ku.value.flags, 1, "{case}: digitalSignature only");
            for usage in [
                webpki::KeyUsage::server_auth(),
                webpki::KeyUsage::client_auth(),
            ] {
                let got = store
                    .verify_svid(leaf, &svid.chain[1..], UnixTime::now(), usage)
                    .unwrap();
                assert_eq!(got, web, "{case}");
            }
            // Both ends of a TLS connection can present it and verify it.
            let server_id = td().server_id();
            let (server_svid, server_key) = leaf_of(&ca, leaf_type, &server_id);
            handshake(
                &bundle,
                (&server_svid, &server_key, &server_id),
                (&svid, &key),
            )
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        }
    }
}

#[test]
fn an_intermediate_authority_hands_out_its_chain() {
    // An upstream root of one key type, a Sigil intermediate of another.
    let root = root_of(KeyType::EcP384);
    let root_pair = root.key().key_pair().unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(root.cert(), root_pair).unwrap();
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let now = SystemTime::now();
    let cert = ca_params(&td(), now - BACKDATE, now + Duration::from_secs(600))
        .signed_by(&key.key_pair().unwrap(), &issuer)
        .unwrap();
    check_ca(cert.der()).unwrap();
    assert_eq!(signature_oid_of(cert.der()), signature_oid(KeyType::EcP384));
    let intermediate = Authority::from_parts(td(), cert.der().clone(), key)
        .unwrap()
        .with_upstream_chain(Vec::new());
    assert_eq!(intermediate.chain(), [cert.der().clone()]);

    let web = id("spiffe://example.org/web");
    let (svid, key) = leaf_of(&intermediate, KeyType::Rsa2048, &web);
    assert_eq!(svid.chain.len(), 2, "leaf, then the intermediate");
    assert_eq!(svid.chain[1], *cert.der());
    check_leaf(&svid.chain[0]).unwrap();
    // Verifiers hold only the root.
    let bundle = X509Bundle::new(td(), vec![root.cert().clone()]);
    let store = TrustStore::new(&bundle).unwrap();
    let got = store
        .verify_svid(
            &svid.chain[0],
            &svid.chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
    assert_eq!(got, web);
    let server_id = td().server_id();
    let (server_svid, server_key) = leaf_of(&intermediate, KeyType::EcP256, &server_id);
    handshake(
        &bundle,
        (&server_svid, &server_key, &server_id),
        (&svid, &key),
    )
    .unwrap();
    // Without the intermediate the leaf does not chain to the root.
    assert!(
        store
            .verify_svid(
                &svid.chain[0],
                &[],
                UnixTime::now(),
                webpki::KeyUsage::client_auth()
            )
            .is_err()
    );
}
