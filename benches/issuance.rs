//! SVID issuance rate of `sigil-server` through the real agent API (mTLS,
//! batched CSRs), beside the crypto bound measured in the same run: one
//! P-256 CSR signature verification plus one leaf signature per SVID, on
//! all cores, with no RPC around it.
//!
//! Run: `cargo build --release -p sigil-server -p sigil-agent &&
//! cargo bench --bench issuance`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    reason = "benchmark harness"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sigil::proto::sigil::admin::v1::{
    BatchCreateEntryRequest, CreateJoinTokenRequest, GetBundleRequest,
};
use sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient;
use sigil::proto::sigil::agent::v1::{
    AttestRequest, AttestationData, AttestationParams, BatchNewX509SvidRequest, X509SvidParams,
    attest_request, attest_response,
};
use sigil::proto::sigil::types::v1 as pb;
use tokio::time::Instant;

const ENTRIES: usize = 2000;
const BATCH: usize = 500;
const ROUNDS: usize = 7;
const IN_FLIGHT: usize = 4;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, address, mut admin) = start_server(dir.path()).await;
    let td = sigil::TrustDomain::new(TD).unwrap();

    // An agent identity and entries under it.
    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            agent_id: format!("spiffe://{TD}/node/bench"),
            ttl: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::with_capacity(ENTRIES);
    for chunk in (0..ENTRIES).collect::<Vec<_>>().chunks(BATCH) {
        let request = BatchCreateEntryRequest {
            entries: chunk
                .iter()
                .map(|i| pb::Entry {
                    spiffe_id: format!("spiffe://{TD}/bench/{i}"),
                    parent_id: token.agent_id.clone(),
                    selectors: vec![pb::Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{i}"),
                    }],
                    ..Default::default()
                })
                .collect(),
        };
        let results = admin
            .batch_create_entry(request)
            .await
            .unwrap()
            .into_inner()
            .results;
        entries.extend(results.into_iter().map(|r| r.entry.unwrap()));
    }

    // Attest with the token, as an agent does.
    let bundle = admin
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundle = sigil::bundle::X509Bundle::new(
        td.clone(),
        bundle
            .x509_authorities
            .into_iter()
            .map(Into::into)
            .collect(),
    );
    let roots = Arc::new(sigil::tls::TrustStore::new(&bundle).unwrap());
    let server_id = td.id_with_path("/sigil/server").unwrap();
    let verifier = Arc::new(sigil::tls::SpiffeServerVerifier::new(roots, server_id));
    let agent_key = sigil::keys::PrivateKey::generate_p256().unwrap();
    let csr = sigil::x509::build_csr(&agent_key.key_pair().unwrap(), None).unwrap();
    let anonymous = Arc::new(sigil::tls::client_config(verifier.clone(), None).unwrap());
    let mut client = AgentApiClient::new(sigil::transport::tls_channel(&address, anonymous));
    let first = AttestRequest {
        step: Some(attest_request::Step::Params(AttestationParams {
            data: Some(AttestationData {
                r#type: "join_token".into(),
                payload: token.token.into_bytes(),
            }),
            csr,
        })),
    };
    let mut replies = client
        .attest(tokio_stream::iter([first]))
        .await
        .unwrap()
        .into_inner();
    let Some(attest_response::Step::Result(svid)) = replies.message().await.unwrap().unwrap().step
    else {
        panic!("attestation did not return an SVID");
    };
    let chain = svid.cert_chain.into_iter().map(Into::into).collect();
    let identity = Arc::new(sigil::tls::SvidResolver::new(chain, &agent_key).unwrap());
    let config = Arc::new(sigil::tls::client_config(verifier, Some(identity)).unwrap());
    let client = AgentApiClient::new(sigil::transport::tls_channel(&address, config));

    // CSRs are made by agents; make them before timing.
    let items: Vec<X509SvidParams> = entries
        .iter()
        .map(|e| {
            let key = rcgen::KeyPair::generate().unwrap();
            let id: sigil::SpiffeId = e.spiffe_id.parse().unwrap();
            X509SvidParams {
                entry_id: e.id.clone(),
                csr: sigil::x509::build_csr(&key, Some(&id)).unwrap(),
            }
        })
        .collect();
    let batches: Vec<BatchNewX509SvidRequest> = items
        .chunks(BATCH)
        .map(|c| BatchNewX509SvidRequest { params: c.to_vec() })
        .collect();

    // Warm up connections and caches.
    client
        .clone()
        .batch_new_x509_svid(batches[0].clone())
        .await
        .unwrap();

    // The machine is shared: alternate the two measurements and compare
    // medians, so both see the same background load.
    let ca = Arc::new(sigil::x509::Authority::self_signed(&td, Duration::from_secs(3600)).unwrap());
    let mut api = Vec::new();
    let mut bound = Vec::new();
    for round in 1..=ROUNDS {
        bound.push(crypto_bound(&ca, &items));
        api.push(api_rate(&client, &batches).await);
        println!(
            "round {round}: agent API {:.0} SVIDs/s, crypto bound {:.0} SVIDs/s",
            api[round - 1],
            bound[round - 1]
        );
    }
    let (api, bound) = (median(api), median(bound));
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "agent API issuance: {api:.0} SVIDs/s (median; batches of {BATCH}, {IN_FLIGHT} in flight)"
    );
    println!("crypto bound:       {bound:.0} SVIDs/s (median; CSR verify + leaf sign, all cores)");
    println!("ratio:              {:.2}", api / bound);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every batch once through the agent API, `IN_FLIGHT` at a time.
async fn api_rate(
    client: &AgentApiClient<tonic::transport::Channel>,
    batches: &[BatchNewX509SvidRequest],
) -> f64 {
    let started = Instant::now();
    let mut issued = 0usize;
    for group in batches.chunks(IN_FLIGHT) {
        let calls = group.iter().map(|b| {
            let mut client = client.clone();
            let b = b.clone();
            async move {
                client
                    .batch_new_x509_svid(b)
                    .await
                    .unwrap()
                    .into_inner()
                    .svids
                    .len()
            }
        });
        issued += futures::future::join_all(calls).await.iter().sum::<usize>();
    }
    issued as f64 / started.elapsed().as_secs_f64()
}

/// CSR verification plus leaf signing for every item, split across all
/// cores, with nothing else.
fn crypto_bound(ca: &Arc<sigil::x509::Authority>, items: &[X509SvidParams]) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    {
        std::thread::scope(|s| {
            for chunk in items.chunks(items.len().div_ceil(threads)) {
                let ca = ca.clone();
                s.spawn(move || {
                    for item in chunk {
                        let csr = sigil::x509::Csr::from_der(&item.csr).unwrap();
                        let id = csr.spiffe_id().unwrap().clone();
                        ca.sign_leaf(csr.public_key(), &id, &[], Duration::from_secs(3600))
                            .unwrap();
                    }
                });
            }
        });
    }
    items.len() as f64 / started.elapsed().as_secs_f64()
}
