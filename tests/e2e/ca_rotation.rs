//! Scheduled rotation of the signing authority with a 3-minute CA lifetime:
//! the next authority is published at 90 s and signs from 150 s on. A
//! workload stream open throughout receives the two-authority bundle before
//! any SVID signed by the new authority, and every SVID it receives
//! verifies against the bundle that came with it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::support::*;

/// Whether `chain` (leaf first) verifies to one of `authorities`, with
/// rustls-webpki, for client and server authentication.
fn verifies(chain: &[CertificateDer<'_>], authorities: &[CertificateDer<'_>]) -> bool {
    let anchors: Vec<_> = authorities
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap().to_owned())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ]
    .into_iter()
    .all(|usage| {
        leaf.verify_for_usage(
            algs,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .is_ok()
    })
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    pem::parse_many(pem.as_bytes())
        .unwrap()
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_stream_follows_a_scheduled_ca_rotation() {
    let dir = scratch();
    let server = Server::start_with(
        dir.path(),
        &["--ca-ttl", "3m", "--default-x509-svid-ttl", "30s"],
    );
    let started = Instant::now();
    // The agent SVID lifetime (1 h by default) exceeds a sixth of ca_ttl.
    let log = server.log();
    assert!(
        log.contains("agent_svid_ttl") && log.contains("capped"),
        "no warning about the capped agent SVID lifetime:\n{log}"
    );

    let uid = own_uid_selector();
    let (token, agent_id) = server.token(&["--spiffe-id", "spiffe://example.org/node/a"]);
    server.create_entry("spiffe://example.org/web", &agent_id, &[uid.as_str()], &[]);
    let agent = Agent::start(&server, "agent-a", Some(&token));

    let first_ca = pem_certs(&server.bundle_pem());
    assert_eq!(first_ca.len(), 1);

    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();

    let mut two_cas_at: Option<Duration> = None;
    let mut updates = 0;
    let new_ca_svid_at = loop {
        let context = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("no update on the workload stream within 60 s")
            .unwrap()
            .unwrap();
        updates += 1;
        let elapsed = started.elapsed();
        let svid = context.default_svid().unwrap();
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_ref().to_vec()))
            .collect();
        let bundle: Vec<CertificateDer<'static>> = context
            .bundle_set()
            .get(&td)
            .unwrap()
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_ref().to_vec()))
            .collect();
        assert!(
            verifies(&chain, &bundle),
            "update {updates} at {elapsed:?}: the SVID does not verify against the bundle sent with it"
        );
        assert!(
            bundle.contains(&first_ca[0]),
            "the first CA left the bundle too early"
        );

        if bundle.len() == 2 && two_cas_at.is_none() {
            two_cas_at = Some(elapsed);
            // The server shows what the workload got.
            assert_eq!(pem_certs(&server.bundle_pem()), bundle);
        }
        assert!(bundle.len() <= 2, "{} CAs in the bundle", bundle.len());

        if !verifies(&chain, &first_ca) {
            // Signed by the new authority, which must have been published
            // before: in an earlier update on this same stream.
            let published = two_cas_at.expect("an SVID of the new CA came before its bundle");
            assert!(
                published < elapsed,
                "the new CA was published at {published:?}, with its first SVID at {elapsed:?}"
            );
            break elapsed;
        }
        assert!(
            elapsed < Duration::from_secs(230),
            "no SVID of the new CA after {elapsed:?}"
        );
    };

    let published = two_cas_at.unwrap();
    assert!(
        published >= Duration::from_secs(80),
        "the next CA was published at {published:?}, before half of the first one's life"
    );
    assert!(
        new_ca_svid_at >= Duration::from_secs(140),
        "the new CA signed at {new_ca_svid_at:?}, before a sixth of the first one's life remained"
    );
    let log = server.log();
    assert!(log.contains("prepared the next signing authority"), "{log}");
    assert!(log.contains("activated a new signing authority"), "{log}");
}
