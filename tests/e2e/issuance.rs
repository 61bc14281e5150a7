//! A workload receives its SVID, and the chain verifies with two independent
//! verifiers: rustls-webpki and `openssl verify -x509_strict`.

use std::process::Command;

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::support::*;

#[test]
fn workload_receives_an_svid_that_verifies_against_the_bundle() {
    let uid = own_uid_selector();
    let domain = Domain::start(&[("/web", &[uid.as_str()], &["--dns-name", "web.example.org"])]);
    let out_dir = domain.dir.path().join("out");

    let out = domain.agent.fetch(None, Some(&out_dir));
    assert!(out.status.success(), "fetch failed: {}", stderr(&out));
    assert!(
        stdout(&out).contains("spiffe://example.org/web"),
        "{}",
        stdout(&out)
    );

    // The files a user would hand to other tools.
    let svid_pem = std::fs::read(out_dir.join("svid.0.pem")).unwrap();
    let bundle_pem = std::fs::read(out_dir.join("bundle.0.pem")).unwrap();
    let key_meta = std::fs::metadata(out_dir.join("svid.0.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_meta.permissions()) & 0o777,
        0o600
    );

    // The bundle the workload got is the server's.
    assert_eq!(
        pem::parse_many(&bundle_pem).unwrap(),
        pem::parse_many(domain.server.bundle_pem().as_bytes()).unwrap()
    );

    // The leaf follows the X.509-SVID profile and carries the entry's names.
    let chain: Vec<CertificateDer<'static>> = pem::parse_many(&svid_pem)
        .unwrap()
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    let id = sigil::x509::check_leaf(&chain[0]).unwrap();
    assert_eq!(id.to_string(), "spiffe://example.org/web");

    // rustls-webpki: the chain verifies to the bundle for client and server
    // authentication.
    let anchors: Vec<_> = pem::parse_many(&bundle_pem)
        .unwrap()
        .into_iter()
        .map(|p| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(p.into_contents()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            algs,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .unwrap();
    }
    leaf.verify_is_valid_for_subject_name(
        &rustls_pki_types::ServerName::try_from("web.example.org").unwrap(),
    )
    .unwrap();

    // openssl, strict mode.
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(out_dir.join("bundle.0.pem"))
        .arg(out_dir.join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl: {}{}",
        stdout(&verify),
        stderr(&verify)
    );
    assert!(
        stdout(&verify).trim_end().ends_with(": OK"),
        "{}",
        stdout(&verify)
    );

    // The key matches the leaf.
    let key_check = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(out_dir.join("svid.0.pem"))
        .output()
        .unwrap();
    let key_pub = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(out_dir.join("svid.0.key"))
        .output()
        .unwrap();
    assert_eq!(stdout(&key_check), stdout(&key_pub));
}
