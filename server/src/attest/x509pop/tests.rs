//! Tests of the x509pop attestor: chain verification, the challenge, and
//! what it vouches for.

use std::time::{Duration, SystemTime};

use rcgen::KeyUsagePurpose;
use rustls_pki_types::UnixTime;
use sigil::TrustDomain;
use sigil::proto::sigil::agent::v1::X509PopAttestation;

use super::*;
use crate::attest::testing::{NodeCa, NodeCert};

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn attestor(roots: &[&NodeCa], template: &str) -> X509Pop {
    X509Pop::new(
        td(),
        &X509PopConfig {
            ca_bundle_path: "node-ca.pem".into(),
            ca_certs: roots.iter().map(|r| r.cert.clone()).collect(),
            agent_path_template: template.into(),
        },
    )
}

fn evidence(chain: &[&CertificateDer<'static>]) -> X509PopAttestation {
    X509PopAttestation {
        cert_chain: chain.iter().map(|c| c.to_vec()).collect(),
    }
}

fn begin(pop: &X509Pop, chain: &[&CertificateDer<'static>]) -> Result<Challenge, Status> {
    pop.begin(&evidence(chain).encode_to_vec())
}

fn answer(node: &NodeCert, challenge: &Challenge) -> Vec<u8> {
    node.sign(&signed_message(challenge.nonce(), &node.cert))
}

fn assert_denied(status: &Status, prefix: &str) {
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().starts_with(prefix),
        "{:?} does not start with {prefix:?}",
        status.message()
    );
}

fn selectors(attested: &Attested) -> Vec<String> {
    attested.selectors.iter().map(ToString::to_string).collect()
}

#[test]
fn a_node_with_a_trusted_certificate_and_its_key_is_attested() {
    let root = NodeCa::root("Node Root");
    let node = root.issue("node1");
    let pop = attestor(&[&root], DEFAULT_PATH_TEMPLATE);
    let challenge = begin(&pop, &[&node.cert]).unwrap();
    assert_eq!(challenge.nonce().len(), NONCE_LEN);
    let signature = answer(&node, &challenge);
    let attested = challenge.verify(&signature).unwrap();

    let fp = fingerprint(&node.cert);
    assert_eq!(fp.len(), 40);
    assert_eq!(
        attested.agent_id.as_str(),
        format!("spiffe://example.org/sigil/agent/x509pop/{fp}")
    );
    assert_eq!(attested.attestor, "x509pop");
    assert_eq!(
        selectors(&attested),
        [
            format!("x509pop:ca:fingerprint:{}", fingerprint(&root.cert)),
            "x509pop:san:dns:node1.nodes.test".to_owned(),
            "x509pop:serialnumber:1a2b3c".to_owned(),
            "x509pop:subject:cn:node1".to_owned(),
        ]
    );
}

#[test]
fn intermediates_are_verified_and_named_in_the_selectors() {
    let root = NodeCa::root("Node Root");
    let intermediate = root.intermediate("Node Intermediate");
    let node = intermediate.issue("node2");
    let pop = attestor(&[&root], "/node/{subject_cn}");

    // Without the intermediate, the chain does not reach the root.
    let status = begin(&pop, &[&node.cert]).unwrap_err();
    assert_denied(
        &status,
        "params.data.payload: the certificate chain does not verify against the x509pop CA bundle: UnknownIssuer",
    );

    let challenge = begin(&pop, &[&node.cert, &intermediate.cert]).unwrap();
    let signature = answer(&node, &challenge);
    let attested = challenge.verify(&signature).unwrap();
    assert_eq!(
        attested.agent_id.as_str(),
        "spiffe://example.org/node/node2"
    );
    let got = selectors(&attested);
    for ca in [&root.cert, &intermediate.cert] {
        let expected = format!("x509pop:ca:fingerprint:{}", fingerprint(ca));
        assert!(got.contains(&expected), "{expected} missing in {got:?}");
    }
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    let root = NodeCa::root("Node Root");
    let other = NodeCa::root("Node Root");
    let node = other.issue("node1");
    let status = begin(&attestor(&[&root], DEFAULT_PATH_TEMPLATE), &[&node.cert]).unwrap_err();
    assert_denied(
        &status,
        "params.data.payload: the certificate chain does not verify against the x509pop CA bundle",
    );
}

#[test]
fn expired_not_yet_valid_and_non_signing_certificates_are_refused() {
    let root = NodeCa::root("Node Root");
    let pop = attestor(&[&root], DEFAULT_PATH_TEMPLATE);
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let expired = root.issue_with(
        "old",
        vec![KeyUsagePurpose::DigitalSignature],
        now - 2 * day,
        now - day,
    );
    assert_denied(
        &begin(&pop, &[&expired.cert]).unwrap_err(),
        "params.data.payload: cert_chain[0]: the certificate expired at ",
    );
    let future = root.issue_with(
        "new",
        vec![KeyUsagePurpose::DigitalSignature],
        now + day,
        now + 2 * day,
    );
    assert_denied(
        &begin(&pop, &[&future.cert]).unwrap_err(),
        "params.data.payload: cert_chain[0]: the certificate is not valid before ",
    );
    let no_signing = root.issue_with(
        "enc",
        vec![KeyUsagePurpose::KeyEncipherment],
        now - day,
        now + day,
    );
    assert_denied(
        &begin(&pop, &[&no_signing.cert]).unwrap_err(),
        "params.data.payload: cert_chain[0]: the certificate lacks the digitalSignature key usage",
    );
    // The check uses the time given.
    let later = UnixTime::since_unix_epoch(
        (now + 3 * day)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap(),
    );
    let fresh = root.issue("fresh");
    assert_denied(
        &pop.begin_at(evidence(&[&fresh.cert]), later).unwrap_err(),
        "params.data.payload: cert_chain[0]: the certificate expired at ",
    );
}

#[test]
fn a_signature_by_another_key_is_refused() {
    let root = NodeCa::root("Node Root");
    let node = root.issue("node1");
    let impostor = root.issue("node1");
    let pop = attestor(&[&root], DEFAULT_PATH_TEMPLATE);
    let challenge = begin(&pop, &[&node.cert]).unwrap();
    // The right message, signed by a key that is not the certificate's.
    let forged = impostor.sign(&signed_message(challenge.nonce(), &node.cert));
    let status = challenge.verify(&forged).unwrap_err();
    assert_denied(
        &status,
        "challenge_response: the signature does not verify with the key of the node certificate",
    );
}

#[test]
fn an_answer_to_another_challenge_is_refused() {
    let root = NodeCa::root("Node Root");
    let node = root.issue("node1");
    let pop = attestor(&[&root], DEFAULT_PATH_TEMPLATE);
    let first = begin(&pop, &[&node.cert]).unwrap();
    let second = begin(&pop, &[&node.cert]).unwrap();
    assert_ne!(first.nonce(), second.nonce());
    let replayed = answer(&node, &first);
    assert_denied(
        &second.verify(&replayed).unwrap_err(),
        "challenge_response: the signature does not verify",
    );
    // A signature of the bare nonce (not bound to the certificate) fails too.
    let third = begin(&pop, &[&node.cert]).unwrap();
    let bare = node.sign(third.nonce());
    assert_denied(
        &third.verify(&bare).unwrap_err(),
        "challenge_response: the signature does not verify",
    );
}

#[test]
fn malformed_evidence_is_an_invalid_argument() {
    let root = NodeCa::root("Node Root");
    let pop = attestor(&[&root], DEFAULT_PATH_TEMPLATE);
    let status = pop.begin(b"\xff\xff").unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("params.data.payload: not an X509PopAttestation"),
        "{status:?}"
    );
    let status = begin(&pop, &[]).unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::InvalidArgument,
            "params.data.payload: cert_chain is empty"
        )
    );
}

#[test]
fn templates_are_checked() {
    assert_eq!(check_template(&td(), DEFAULT_PATH_TEMPLATE), Ok(()));
    assert_eq!(
        check_template(&td(), "/n/{subject_cn}/{fingerprint}"),
        Ok(())
    );
    assert_eq!(
        check_template(&td(), "/n/{hostname}").unwrap_err(),
        "unknown placeholder {hostname}: use {fingerprint} or {subject_cn}"
    );
    assert!(check_template(&td(), "n/{fingerprint}").is_err());
    assert_eq!(
        check_template(&td(), "/sigil/server").unwrap_err(),
        "\"/sigil/server\" is reserved for the server"
    );
}
