//! Attestation, storage and renewal against the fake server over real TLS.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient;
use sigil::tls::{SvidResolver, TrustStore};

use super::*;
use crate::config::{Config, JoinToken, JoinTokenSource, LogFormat};
use crate::testing::{BAD_TOKEN, FakeServer, td};

mod reattestation;

fn config(server: &FakeServer, data_dir: &std::path::Path, token: Option<&str>) -> Config {
    Config {
        trust_domain: td(),
        server_address: server.addr.to_string(),
        trust_bundle_path: Some(server.bundle_path()),
        join_token: token.map(|t| JoinTokenSource::Inline(JoinToken::new(t.into()).unwrap())),
        data_dir: data_dir.to_owned(),
        socket_path: data_dir.join("api.sock"),
        log_level: "info".into(),
        log_format: LogFormat::Text,
        workload_attestors: Default::default(),
        workload_key_type: Default::default(),
        node_attestor: Default::default(),
    }
}

#[tokio::test]
async fn attests_stores_and_restarts_from_the_stored_svid() {
    let server = FakeServer::start().await;
    server.add_token("t0ken");
    let data = tempfile::tempdir().unwrap();
    let storage = Storage::new(data.path());

    let first = establish(&config(&server, data.path(), Some("t0ken")), &storage)
        .await
        .unwrap();
    assert_eq!(
        first.spiffe_id.as_str(),
        "spiffe://example.org/sigil/agent/join_token/1"
    );
    assert_eq!(
        sigil::x509::check_leaf(&first.chain[0]).unwrap(),
        first.spiffe_id
    );
    assert_eq!(first.bundle.authorities(), [server.ca.cert().clone()]);

    let key_mode = std::fs::metadata(data.path().join("agent_key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let stored_pem = std::fs::read_to_string(data.path().join("agent_svid.pem")).unwrap();
    assert!(stored_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let bundle_pem = std::fs::read(data.path().join("bundle.pem")).unwrap();
    assert_eq!(
        sigil::bundle::X509Bundle::from_pem(td(), &bundle_pem).unwrap(),
        first.bundle
    );

    // A restart without a token uses what was stored, without attesting.
    let again = establish(&config(&server, data.path(), None), &storage)
        .await
        .unwrap();
    assert_eq!(again.spiffe_id, first.spiffe_id);
    assert_eq!(again.chain, first.chain);
    assert_eq!(again.key.der(), first.key.der());
    assert_eq!(server.state.lock().unwrap().attestations, 1);

    // The stored SVID works as client certificate on the agent API.
    let trust = Arc::new(TrustStore::new(&again.bundle).unwrap());
    let resolver = Arc::new(SvidResolver::new(again.chain.clone(), &again.key).unwrap());
    let tls = crate::client::tls_config(&td(), trust, Some(resolver)).unwrap();
    let mut api = AgentApiClient::new(crate::client::lazy_channel(&server.addr.to_string(), tls));
    let mut stream = api
        .sync_entries(sigil::proto::sigil::agent::v1::SyncEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first_message = stream.message().await.unwrap().unwrap();
    assert_eq!(first_message.bundle.unwrap().trust_domain, "example.org");
}

#[tokio::test]
async fn a_refused_token_is_fatal_with_the_server_message() {
    let server = FakeServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let err = establish(
        &config(&server, data.path(), Some("wrong")),
        &Storage::new(data.path()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.to_string(), format!("attestation refused: {BAD_TOKEN}"));
    assert!(!data.path().join("agent_svid.pem").exists());
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let server = FakeServer::start().await;
    server.add_token("t0ken");
    let other = FakeServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(&server, data.path(), Some("t0ken"));
    cfg.trust_bundle_path = Some(other.bundle_path());

    let err = establish(&cfg, &Storage::new(data.path()))
        .await
        .unwrap_err()
        .to_string();
    let prefix = format!("cannot connect to the server at {}: ", server.addr);
    assert!(err.starts_with(&prefix), "{err}");
    assert!(err.contains("invalid peer certificate"), "{err}");
    // The token was never sent, so it is still good.
    assert!(server.state.lock().unwrap().tokens.contains("t0ken"));
}

#[tokio::test]
async fn no_token_and_nothing_stored_says_so() {
    let server = FakeServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let err = establish(
        &config(&server, data.path(), None),
        &Storage::new(data.path()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("no stored agent SVID and no join token: "),
        "{err}"
    );
    assert!(err.contains("agent_svid.pem does not exist"), "{err}");
}

#[tokio::test]
async fn a_token_file_is_read_when_attesting() {
    let server = FakeServer::start().await;
    server.add_token("from-a-file");
    let data = tempfile::tempdir().unwrap();
    let token_file = data.path().join("token");
    std::fs::write(&token_file, "from-a-file\n").unwrap();
    let mut cfg = config(&server, &data.path().join("state"), None);
    cfg.join_token = Some(JoinTokenSource::File(token_file));
    let storage = Storage::new(&cfg.data_dir);
    storage.create().unwrap();
    let mode = std::fs::metadata(&cfg.data_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let identity = establish(&cfg, &storage).await.unwrap();
    assert!(
        identity
            .spiffe_id
            .path()
            .starts_with("/sigil/agent/join_token/")
    );
}

#[tokio::test]
async fn the_agent_svid_is_renewed_then_an_eviction_is_fatal() {
    let server = FakeServer::start().await;
    server.add_token("t0ken");
    // Issued 10 s back-dated, 12 s ahead: half-life is 1 s from now.
    server.state.lock().unwrap().agent_ttl = Some(Duration::from_secs(12));
    let data = tempfile::tempdir().unwrap();
    let storage = Storage::new(data.path());
    let identity = establish(&config(&server, data.path(), Some("t0ken")), &storage)
        .await
        .unwrap();

    let trust = Arc::new(TrustStore::new(&identity.bundle).unwrap());
    let resolver = Arc::new(SvidResolver::new(identity.chain.clone(), &identity.key).unwrap());
    let tls =
        crate::client::tls_config(&td(), Arc::clone(&trust), Some(Arc::clone(&resolver))).unwrap();
    let channel = Arc::new(crate::client::AgentChannel::new(
        &server.addr.to_string(),
        tls,
    ));
    let renewer = Renewer::new(
        channel,
        storage.clone(),
        trust,
        resolver,
        identity.clone(),
        Arc::new(tokio::sync::Notify::new()),
    );
    let task = tokio::spawn(renewer.run());

    // Each renewed SVID is due again after 1 s: a second renewal means the
    // first one was stored and put to use.
    server.wait_for(|s| s.renewals >= 2).await;
    let stored = storage.load(&td()).unwrap();
    assert_ne!(stored.chain, identity.chain);
    assert_eq!(stored.spiffe_id, identity.spiffe_id);
    assert_ne!(
        stored.key.der(),
        identity.key.der(),
        "a new key per renewal"
    );

    server
        .state
        .lock()
        .unwrap()
        .evicted
        .insert(identity.spiffe_id.clone());
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap();
    let text = err.to_string();
    assert!(
        text.starts_with("the server refused the agent SVID (agent spiffe://example.org/sigil/agent/join_token/1 is evicted); a new join token is needed"),
        "{text}"
    );
    assert!(!data.path().join("agent_svid.pem").exists());
    assert!(!data.path().join("agent_key.pem").exists());
}
