//! Attestation with a join token: the request's checks and the token's
//! single use.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_checks_the_request_and_uses_a_token_once() {
    let mut s = server().await;
    let (token, agent_id) = s.token().await;
    let key = PrivateKey::generate_p256().unwrap();
    let csr = sigil::x509::build_csr(&key.key_pair().unwrap(), None).unwrap();
    let mut client = s.agent_client(None).await;

    let status = attest_with(&mut client, "tpm", &token, csr.clone())
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::InvalidArgument,
        "params.data.type: unsupported attestation type \"tpm\"",
    );
    let status = attest_with(&mut client, "join_token", &token, b"junk".to_vec())
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::InvalidArgument,
        "params.csr: is malformed or its signature does not verify",
    );

    // Refused requests did not use up the token.
    let svid = attest_with(&mut client, "join_token", &token, csr.clone())
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id, agent_id);
    assert_eq!(
        sigil::x509::check_leaf(&svid.cert_chain[0])
            .unwrap()
            .as_str(),
        agent_id
    );
    let bundle = svid.bundle.unwrap();
    assert_eq!(bundle.trust_domain, "example.org");
    assert_eq!(
        bundle.x509_authorities,
        [s.bundle.authorities()[0].to_vec()]
    );

    let status = attest_with(&mut client, "join_token", &token, csr)
        .await
        .unwrap_err();
    assert_status(
        &status,
        tonic::Code::PermissionDenied,
        "join token is not valid (unknown or already used)",
    );
    s.stop().await;
}

#[test]
fn attestation_payloads_are_checked_before_the_token_is_used() {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = sigil::x509::build_csr(&key, None).unwrap();
    let cases = [
        (
            params("join_token", &[b'a'; 257], csr.clone()),
            "params.data.payload: a join token has at most 256 bytes",
        ),
        (
            params("join_token", &[0xff, 0xfe], csr.clone()),
            "params.data.payload: the join token is not UTF-8",
        ),
        (
            params("join_token", b"", csr.clone()),
            "params.data.payload: the join token is required",
        ),
        (
            params("join_token", b"token", Vec::new()),
            "params.csr: is required",
        ),
        (
            AttestationParams {
                data: None,
                csr: csr.clone(),
            },
            "params.data: is required",
        ),
    ];
    for (p, message) in cases {
        let status = super::super::validate_attestation(&p)
            .and_then(|(data, _)| crate::attest::join_token::parse(&data.payload).map(|_| ()))
            .unwrap_err();
        assert_status(&status, tonic::Code::InvalidArgument, message);
    }
    let ok = params("join_token", &[b'a'; 256], csr);
    let (data, _) = super::super::validate_attestation(&ok).unwrap();
    assert_eq!(
        crate::attest::join_token::parse(&data.payload)
            .unwrap()
            .len(),
        256
    );
}
